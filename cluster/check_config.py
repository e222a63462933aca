"""Check a `ray up` cluster YAML before launching it: Ray's own validator, then our security rule.

`ray up` has no dry run, and a mistake shows up only after instances start (and bill). This runs the
validation `ray up` itself runs first (`prepare_config` merges the provider's defaults, `validate_config`
checks the JSON schema), offline, and then refuses any firewall rule that opens Ray's unauthenticated
ports (GCS 6379, dashboard/job API 8265, client 10001) to the whole internet, and any AWS node type
left without its own security group (Ray would create one with SSH open to 0.0.0.0/0).

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


def _world(cidr: str) -> bool:
    try:
        return ipaddress.ip_network(cidr, strict=False).prefixlen == 0
    except ValueError:
        return False


def _open_ray_ports(low: int, high: int) -> list[int]:
    return [p for p in RAY_PORTS if low <= p <= high]


def _aws_rule(rule: dict) -> list[int]:
    """Ray ports an AWS IpPermission opens to the world (protocol -1 means every port)."""
    cidrs = [r.get("CidrIp", "") for r in rule.get("IpRanges", [])]
    cidrs += [r.get("CidrIpv6", "") for r in rule.get("Ipv6Ranges", [])]
    if not any(_world(c) for c in cidrs):
        return []
    if str(rule.get("IpProtocol", "-1")).lower() in ("-1", "all"):
        return sorted(RAY_PORTS)
    low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
    if low in (-1, None) or high in (-1, None):
        low, high = 0, 65535
    return _open_ray_ports(int(low), int(high))


def _gcp_rule(rule: dict) -> list[int]:
    """Ray ports a GCP firewall rule (sourceRanges/allowed) opens to the world."""
    if not any(_world(c) for c in rule.get("sourceRanges", [])):
        return []
    opened = set()
    for allow in rule.get("allowed", []):
        ports = allow.get("ports")
        if str(allow.get("IPProtocol", "all")).lower() == "all" or not ports:
            return sorted(RAY_PORTS)
        for spec in ports:
            low, _, high = str(spec).partition("-")
            opened.update(_open_ray_ports(int(low), int(high or low)))
    return sorted(opened)


def _walk(node, path="config"):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def security_problems(config: dict) -> list[str]:
    """Every way `config` exposes Ray's ports to the internet, one line each (empty list: none)."""
    problems = []
    for path, node in _walk(config):
        if not isinstance(node, dict):
            continue
        ports = []
        if "IpProtocol" in node or "IpRanges" in node or "Ipv6Ranges" in node:
            ports = _aws_rule(node)
        elif "sourceRanges" in node:
            ports = _gcp_rule(node)
        if ports:
            names = ", ".join(f"{p} ({RAY_PORTS[p]})" for p in ports)
            problems.append(f"{path} opens {names} to the whole internet")
    if config.get("provider", {}).get("type") == "aws":
        for name, node_type in config.get("available_node_types", {}).items():
            if "SecurityGroupIds" not in node_type.get("node_config", {}):
                problems.append(
                    f"node type {name!r} has no SecurityGroupIds: Ray would create a group with SSH "
                    f"open to 0.0.0.0/0; give it a group that admits only your CIDR")
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
    problems = security_problems(config)
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
