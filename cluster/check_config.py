"""Check a `ray up` cluster YAML before launching it: Ray's own validator, then our security rule.

`ray up` has no dry run, and a mistake shows up only after instances start (and bill). This runs the
validation `ray up` itself runs first (`prepare_config` merges the provider's defaults, `validate_config`
checks the JSON schema), offline, and judges the result, the config as Ray will run it: it refuses firewall
rules that together open a port Ray or Serve listens on (GCS 6379, dashboard/job API 8265, client 10001, Serve
8000, dashboard agent 52365, worker ports 10002-19999, and wherever the start commands' flags move them) to
the internet (more public sources than a /16, however the ranges are split; protocol -1 is every port; a
prefix list cannot be judged offline), `ray start --dashboard-host` other than loopback, and any AWS node type
left without its own security group (Ray would create one with SSH open to 0.0.0.0/0). Only AWS keeps its
firewall in the file: other providers are reported "not checked: PROVIDER", never "ok".
Spot node types are checked against what AWS accepts for nodes Ray manages
(AWS would refuse a wrong one only at launch), and the head may not be a spot node (a reclaim ends the run).

    python -m cluster.check_config ray_cluster.yaml cluster/onprem.yaml
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import shlex
import sys
from pathlib import Path

import yaml

from cluster import ray_internals
from deeplab.cli import error_line

# Every port a Ray node and Serve listen on by default, by what listens: (low, high). `ray start` flags in the
# start commands move them (ports_opened); a metrics port Ray picks at random is covered by the rule on
# "every port" (protocol -1 or 0-65535), which also opens 6379.
RAY_PORTS = {"GCS": (6379, 6379), "dashboard/job API": (8265, 8265), "Ray client": (10001, 10001),
             "Serve HTTP": (8000, 8000), "dashboard agent": (52365, 52365), "worker ports": (10002, 19999)}
# ray start / serve start / cluster.serve flags -> what they move
PORT_FLAGS = {"--port": "GCS", "--dashboard-port": "dashboard/job API", "--ray-client-server-port": "Ray client",
              "--dashboard-agent-listen-port": "dashboard agent", "--metrics-export-port": "metrics export",
              "--dashboard-agent-grpc-port": "dashboard agent gRPC", "--node-manager-port": "node manager",
              "--object-manager-port": "object manager", "--runtime-env-agent-port": "runtime env agent",
              "--min-worker-port": "worker ports", "--max-worker-port": "worker ports", "--http-port": "Serve HTTP"}
JUDGED = ("aws",)  # providers whose firewall this file describes (security groups); others: "not checked"
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


def _simple_commands(config: dict):
    """(where, words) of every simple command in the start commands Ray runs (split at ; && || | &)."""
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for i, command in enumerate(config.get(key) or []):
            lexer = shlex.shlex(str(command), posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            try:
                words = list(lexer)
            except ValueError:  # unbalanced quotes: Ray's shell would refuse it too; judge the plain words
                words = str(command).split()
            current: list = []
            for word in words + [";"]:
                if word in (";", "&&", "||", "|", "&"):
                    if current:
                        yield f"{key}[{i}]", current
                    current = []
                else:
                    current.append(word)


def _flags(words: list) -> dict:
    """--name=value and --name value pairs of one command."""
    flags = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            flags[name] = value if eq else (words[i + 1] if i + 1 < len(words) else "")
    return flags


def _starts(words: list) -> str:
    """Which server a command starts: "ray", "serve" or "" (none)."""
    pairs = list(zip(words, words[1:]))
    if ("ray", "start") in pairs:
        return "ray"
    if ("serve", "start") in pairs or "cluster.serve" in words:
        return "serve"
    return ""


def ports_opened(config: dict) -> dict:
    """What listens -> (low, high) port range: Ray's and Serve's defaults, moved by the start commands' flags."""
    ports = dict(RAY_PORTS)
    for _, words in _simple_commands(config):
        server = _starts(words)
        for flag, value in _flags(words).items() if server else ():
            role = "Serve HTTP" if server == "serve" and flag in ("--port", "--http-port") else PORT_FLAGS.get(flag)
            if role is None or server == "serve" and role != "Serve HTTP" or not value.isdigit():
                continue
            port = int(value)
            if flag == "--min-worker-port":
                ports[role] = (port, ports[role][1])
            elif flag == "--max-worker-port":
                ports[role] = (ports[role][0], port)
            else:
                ports[role] = (port, port)
    return ports


def dashboard_host_problems(config: dict) -> list[str]:
    """A `ray start --dashboard-host` other than loopback serves the unauthenticated job API on every
    interface (Ray's own AWS default is 0.0.0.0)."""
    problems = []
    for where, words in _simple_commands(config):
        host = _flags(words).get("--dashboard-host") if _starts(words) == "ray" else None
        if host is not None and host.strip("[]") not in ("127.0.0.1", "localhost", "::1"):
            problems.append(f"{where}: ray start --dashboard-host={host} serves the dashboard and job API to every "
                            "network the node is on; use --dashboard-host=127.0.0.1 and `ray dashboard` over SSH")
    return problems


def _label(name: str, ports: dict) -> str:
    low, high = ports[name]
    return f"{low} ({name})" if low == high else f"{low}-{high} ({name})"


def _ports_in(low, high, ports: dict) -> list[str]:
    if low in (-1, None) or high in (-1, None):
        low, high = 0, 65535
    return [name for name, (a, b) in ports.items() if int(low) <= b and a <= int(high)]


def _aws_rule(rule: dict, ports: dict) -> tuple[list[str], list[str]]:
    """An AWS IpPermission: its source ranges and the Ray ports it opens (protocol -1: every port)."""
    cidrs = [r.get("CidrIp", "") for r in rule.get("IpRanges", [])]
    cidrs += [r.get("CidrIpv6", "") for r in rule.get("Ipv6Ranges", [])]
    if str(rule.get("IpProtocol", "-1")).lower() in ("-1", "all"):
        return cidrs, list(ports)
    return cidrs, _ports_in(rule.get("FromPort", -1), rule.get("ToPort", -1), ports)


def _gcp_rule(rule: dict, ports: dict) -> tuple[list[str], list[str]]:
    """A GCP firewall rule: its sourceRanges and the Ray ports its `allowed` entries open."""
    opened = set()
    for allow in rule.get("allowed", []):
        specs = allow.get("ports")
        if str(allow.get("IPProtocol", "all")).lower() == "all" or not specs:
            opened.update(ports)
        for spec in specs or []:
            low, _, high = str(spec).partition("-")
            opened.update(_ports_in(int(low), int(high or low), ports))
    return list(rule.get("sourceRanges", [])), sorted(opened)


def _walk(node, path="config"):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _firewall_rules(config: dict, ports: dict):
    """(path, rule, source ranges, Ray ports opened) for every AWS or GCP ingress rule anywhere in the config."""
    for path, node in _walk(config):
        if not isinstance(node, dict):
            continue
        if {"IpProtocol", "IpRanges", "Ipv6Ranges", "PrefixListIds"} & set(node):
            yield (path, node, *_aws_rule(node, ports))
        elif "sourceRanges" in node:
            yield (path, node, *_gcp_rule(node, ports))


def _exposure(config: dict, ports: dict) -> dict:
    """Ray port -> (public addresses all rules together admit on it per IP version, the rules involved)."""
    public = {port: {4: [], 6: []} for port in ports}
    rules = {port: [] for port in ports}
    for path, _, cidrs, opened in _firewall_rules(config, ports):
        parts = [part for net in filter(None, map(_network, cidrs)) for part in _public_parts(net)]
        for port in opened if parts else []:
            for part in parts:
                public[port][part.version].append(part)
            rules[port].append(path)
    counts = {port: {v: sum(n.num_addresses for n in ipaddress.collapse_addresses(nets)) if nets else 0
                     for v, nets in by_version.items()} for port, by_version in public.items()}
    return {port: (counts[port], rules[port]) for port in ports}


def _prefix_list_problems(config: dict, ports: dict) -> list[str]:
    """A managed prefix list's addresses live in AWS, not in the file: a rule that admits one on a Ray port
    cannot be judged offline, so it is refused."""
    problems = []
    for path, rule, _, opened in _firewall_rules(config, ports):
        lists = [p.get("PrefixListId", "?") for p in rule.get("PrefixListIds", [])]
        if lists and opened:
            named = ", ".join(_label(p, ports) for p in opened)
            problems.append(f"{path} admits prefix list {', '.join(lists)} on {named}"
                            ": its addresses cannot be checked offline; use CIDRs (a /16 at most) or a group reference")
    return problems


def _default_group_problems(config: dict) -> list[str]:
    """AWS node types without SecurityGroupIds get Ray's default group, whose rules always include SSH from
    0.0.0.0/0 (ray.autoscaler._private.aws.config._create_default_ssh_inbound_rules)."""
    if config.get("provider", {}).get("type") != "aws":
        return []
    return [f"node type {name!r} has no SecurityGroupIds: Ray would create its default group with SSH open to "
            "0.0.0.0/0; give it a group that admits only your CIDR"
            for name, node_type in (config.get("available_node_types") or {}).items()
            if "SecurityGroupIds" not in (node_type.get("node_config") or {})]


def security_problems(config: dict) -> list[str]:
    """Every way `config` exposes Ray's or Serve's ports to the internet, one line each (empty list: none).
    Pass the config as Ray runs it (`validate`'s result): its defaults fill node types and start commands.

    The rule is by coverage: all rules that open a port are taken together, so splitting 0.0.0.0/0 into
    halves, or into one rule per range, is still the internet."""
    ports = ports_opened(config)
    grouped: dict = {}
    for port, (counts, rules) in _exposure(config, ports).items():
        if any(counts[v] > MAX_PUBLIC[v] for v in (4, 6)):
            grouped.setdefault(tuple(rules), []).append((port, counts))
    problems = []
    for rules, opened in grouped.items():
        names = ", ".join(_label(p, ports) for p, _ in opened)
        counts = opened[0][1]
        reach = " and ".join(f"{counts[v]:.3g} public IPv{v} addresses" for v in (4, 6) if counts[v])
        where = rules[0] if len(rules) == 1 else f"{len(rules)} rules ({', '.join(rules)}) together"
        problems.append(f"{where} open{'s' if len(rules) == 1 else ''} {names} to the internet ({reach}; "
                        f"at most a /16 or an IPv6 /48 may reach them: use `ray dashboard` over SSH)")
    return (problems + _prefix_list_problems(config, ports) + _default_group_problems(config)
            + dashboard_host_problems(config))


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
    return ray_internals.validate_cluster_config(config)


def check_file(path: str | Path) -> dict:
    """Load, validate and security-check one cluster YAML; raise ValueError with a one-line reason."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read cluster config: {error_line(e)}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a cluster config (expected a YAML mapping)")
    try:
        prepared = validate(config)
    except Exception as e:  # jsonschema, click aborts and KeyErrors all mean "Ray rejects this file"
        raise ValueError(f"{path}: Ray rejects the cluster config: {error_line(e)}") from None
    problems = security_problems(prepared) + spot_problems(prepared)  # as Ray runs it: its defaults filled in
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
        provider = prepared["provider"]["type"]
        if provider in JUDGED:
            print(f"ok: {f} (provider {provider}; node types {types})")
        else:  # its firewall lives outside the file (a VPC network, an NSG, the machines' own): never "ok"
            print(f"not checked: {provider}: {f} (Ray's validator and the start commands pass, but the {provider} "
                  "firewall is not in this file: keep Ray's ports closed to the internet there)")
    return status


if __name__ == "__main__":
    sys.exit(main())
