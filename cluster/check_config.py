"""Check a `ray up` cluster YAML before launching it: Ray's own validator, then our security rule.

`ray up` has no dry run, and a mistake shows up only after instances start (and bill). This runs the
validation `ray up` itself runs first (`prepare_config` merges the provider's defaults, `validate_config`
checks the JSON schema), offline, and then refuses firewall rules that together open Ray's unauthenticated
ports (GCS 6379, dashboard/job API 8265, client 10001) to the internet (more public sources than a /16,
however the ranges are split), and any AWS node type left without its own security group (Ray would create
one with SSH open to 0.0.0.0/0). Spot node types are checked against what AWS accepts for nodes Ray manages
(AWS would refuse a wrong one only at launch), and the head may not be a spot node (a reclaim ends the run).

    python -m cluster.check_config ray_cluster.yaml cluster/onprem.yaml
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

import yaml

RAY_PORTS = {6379: "GCS", 8265: "dashboard/job API", 10001: "Ray client"}
# Sources that are not the internet: RFC 1918, carrier-grade NAT, loopback, link-local, IPv6 ULA/link-local.
PRIVATE = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "fc00::/7", "fe80::/10", "::1/128")]
# The most public addresses a Ray port may admit: an office or VPN range (a /16, an IPv6 /48). Anything
# broader is "the internet", however it is split into rules and ranges.
MAX_PUBLIC = {4: 2 ** 16, 6: 2 ** 80}


def _network(cidr: str):
    try:
        return ipaddress.ip_network(str(cidr).strip(), strict=False)
    except ValueError:
        return None


def _public_parts(network) -> list:
    """``network`` minus the private ranges: the internet addresses it admits."""
    parts = [network]
    for private in PRIVATE:
        if private.version != network.version:
            continue
        rest = []
        for part in parts:
            if part.subnet_of(private):
                continue
            rest += list(part.address_exclude(private)) if private.subnet_of(part) else [part]
        parts = rest
    return parts


def _ports_in(low, high) -> list[int]:
    if low in (-1, None) or high in (-1, None):
        low, high = 0, 65535
    return [p for p in RAY_PORTS if int(low) <= p <= int(high)]


def _aws_rule(rule: dict) -> tuple[list[str], list[int]]:
    """An AWS IpPermission: its source ranges and the Ray ports it opens (protocol -1: every port)."""
    cidrs = [r.get("CidrIp", "") for r in rule.get("IpRanges", [])]
    cidrs += [r.get("CidrIpv6", "") for r in rule.get("Ipv6Ranges", [])]
    if str(rule.get("IpProtocol", "-1")).lower() in ("-1", "all"):
        return cidrs, sorted(RAY_PORTS)
    return cidrs, _ports_in(rule.get("FromPort", -1), rule.get("ToPort", -1))


def _gcp_rule(rule: dict) -> tuple[list[str], list[int]]:
    """A GCP firewall rule: its sourceRanges and the Ray ports its `allowed` entries open."""
    opened = set()
    for allow in rule.get("allowed", []):
        ports = allow.get("ports")
        if str(allow.get("IPProtocol", "all")).lower() == "all" or not ports:
            opened.update(RAY_PORTS)
        for spec in ports or []:
            low, _, high = str(spec).partition("-")
            opened.update(_ports_in(int(low), int(high or low)))
    return list(rule.get("sourceRanges", [])), sorted(opened)


def _walk(node, path="config"):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _firewall_rules(config: dict):
    """(path, source ranges, Ray ports opened) for every AWS or GCP ingress rule anywhere in the config."""
    for path, node in _walk(config):
        if not isinstance(node, dict):
            continue
        if "IpProtocol" in node or "IpRanges" in node or "Ipv6Ranges" in node:
            yield (path, *_aws_rule(node))
        elif "sourceRanges" in node:
            yield (path, *_gcp_rule(node))


def _exposure(config: dict) -> dict:
    """Ray port -> (public addresses all rules together admit on it per IP version, the rules involved)."""
    public = {port: {4: [], 6: []} for port in RAY_PORTS}
    rules = {port: [] for port in RAY_PORTS}
    for path, cidrs, ports in _firewall_rules(config):
        parts = [part for net in filter(None, map(_network, cidrs)) for part in _public_parts(net)]
        for port in ports if parts else []:
            for part in parts:
                public[port][part.version].append(part)
            rules[port].append(path)
    counts = {port: {v: sum(n.num_addresses for n in ipaddress.collapse_addresses(nets)) if nets else 0
                     for v, nets in by_version.items()} for port, by_version in public.items()}
    return {port: (counts[port], rules[port]) for port in RAY_PORTS}


def security_problems(config: dict) -> list[str]:
    """Every way `config` exposes Ray's ports to the internet, one line each (empty list: none).

    The rule is by coverage: all rules that open a Ray port are taken together, so splitting 0.0.0.0/0 into
    halves, or into one rule per range, is still the internet."""
    grouped: dict = {}
    for port, (counts, rules) in _exposure(config).items():
        if any(counts[v] > MAX_PUBLIC[v] for v in (4, 6)):
            grouped.setdefault(tuple(rules), []).append((port, counts))
    problems = []
    for rules, opened in grouped.items():
        names = ", ".join(f"{p} ({RAY_PORTS[p]})" for p, _ in opened)
        counts = opened[0][1]
        reach = " and ".join(f"{counts[v]:.3g} public IPv{v} addresses" for v in (4, 6) if counts[v])
        where = rules[0] if len(rules) == 1 else f"{len(rules)} rules ({', '.join(rules)}) together"
        problems.append(f"{where} open{'s' if len(rules) == 1 else ''} {names} to the internet ({reach}; "
                        f"at most a /16 or an IPv6 /48 may reach them: use `ray dashboard` over SSH)")
    if config.get("provider", {}).get("type") == "aws":
        for name, node_type in config.get("available_node_types", {}).items():
            if "SecurityGroupIds" not in node_type.get("node_config", {}):
                problems.append(
                    f"node type {name!r} has no SecurityGroupIds: Ray would create a group with SSH "
                    f"open to 0.0.0.0/0; give it a group that admits only your CIDR")
    return problems


SPOT_OPTIONS = {"SpotInstanceType": ("one-time",), "InstanceInterruptionBehavior": ("terminate",),
                "MaxPrice": None, "ValidUntil": None, "BlockDurationMinutes": None}


def spot_problems(config: dict) -> list[str]:
    """Every AWS spot setting that would fail at launch or undo an elastic run, one line each."""
    problems = []
    for name, node_type in config.get("available_node_types", {}).items():
        market = node_type.get("node_config", {}).get("InstanceMarketOptions")
        if market is None:
            continue
        where = f"node type {name!r}: InstanceMarketOptions"
        if market.get("MarketType") != "spot":
            problems.append(f"{where}.MarketType={market.get('MarketType')!r}: AWS knows only 'spot'")
            continue
        if name == config.get("head_node_type"):
            problems.append(f"{where}: the head node on spot ends the whole run when it is reclaimed; keep the "
                            "head on demand and put spot capacity in worker types")
        for key, value in (market.get("SpotOptions") or {}).items():
            allowed = SPOT_OPTIONS.get(key, ())
            if key not in SPOT_OPTIONS:
                problems.append(f"{where}.SpotOptions.{key} is not a spot option; known: {', '.join(SPOT_OPTIONS)}")
            elif allowed and value not in allowed:
                problems.append(f"{where}.SpotOptions.{key}={value!r}: Ray replaces reclaimed nodes itself, use "
                                f"{allowed[0]!r}")
    return problems


def validate(config: dict) -> dict:
    """Ray's own offline validation (what `ray up` runs before it touches the cloud); returns the
    config merged with the provider's defaults. Raises on an invalid config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def check_file(path: str | Path) -> dict:
    """Load, validate and security-check one cluster YAML; raise ValueError with a one-line reason."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read cluster config: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a cluster config (expected a YAML mapping)")
    try:
        prepared = validate(config)
    except Exception as e:  # jsonschema, click aborts and KeyErrors all mean "Ray rejects this file"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: Ray rejects the cluster config: {first}") from None
    problems = security_problems(config) + spot_problems(config)
    if problems:
        raise ValueError(f"{path}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return prepared


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.check_config", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="cluster YAML files (ray_cluster.yaml, cluster/onprem.yaml)")
    args = parser.parse_args(argv)
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # prepare_config's INFO chatter
    status = 0
    for f in args.files:
        try:
            prepared = check_file(f)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        types = ", ".join(prepared["available_node_types"])
        print(f"ok: {f} (provider {prepared['provider']['type']}; node types {types})")
    return status


if __name__ == "__main__":
    sys.exit(main())
