"""The cluster YAMLs pass Ray's own validator offline, and never open Ray's ports to the internet."""
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.check_config import check_file, security_problems, validate

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "ray_cluster.yaml"
ONPREM = ROOT / "cluster" / "onprem.yaml"


@pytest.fixture
def no_network(monkeypatch):
    """Validation must not need the cloud: any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"validation tried to open a connection: {args[1:]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    with pytest.raises(AssertionError, match="tried to open a connection"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)  # the guard itself works


def _load(path):
    return yaml.safe_load(path.read_text())


def test_aws_cluster_passes_rays_validator_offline(no_network):
    prepared = validate(_load(AWS))
    assert prepared["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["max_workers"] == 0 and "InstanceMarketOptions" not in head["node_config"]
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    spot = {name for name, t in workers.items() if "InstanceMarketOptions" in t["node_config"]}
    assert len(workers) == 2 and len(spot) == 1  # an on-demand and a spot type of the same node
    for worker in workers.values():
        assert worker["node_config"]["InstanceType"] in {"g5.12xlarge", "g5.48xlarge", "p4d.24xlarge", "p5.48xlarge"}
        assert worker["min_workers"] == 0 and worker["max_workers"] > 0  # autoscaling GPU workers
    (spot_type,) = (workers[name] for name in spot)
    (on_demand,) = (t for name, t in workers.items() if name not in spot)
    assert spot_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert ({k: v for k, v in spot_type["node_config"].items() if k != "InstanceMarketOptions"}
            == on_demand["node_config"])
    assert sum(t["max_workers"] for t in workers.values()) == prepared["max_workers"]
    # prepare_config merged setup_commands into both roles: torch, then the project, on every node
    for role in ("head_setup_commands", "worker_setup_commands"):
        cmds = " && ".join(prepared[role])
        assert "ray[default,train,tune]" in cmds
        assert cmds.index("torch==") < cmds.index("deeplabv3-ray @ git+")
    assert "boto3" in " ".join(prepared["head_setup_commands"])  # our head commands replace Ray's default
    assert any("cluster.spot_watch" in cmd for cmd in prepared["worker_start_ray_commands"])
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


def test_onprem_cluster_passes_rays_validator_offline(no_network):
    config = _load(ONPREM)
    prepared = validate(config)
    (node_type,) = prepared["available_node_types"].values()
    n = len(config["provider"]["worker_ips"])
    assert n >= 1 and node_type["min_workers"] == node_type["max_workers"] == n
    assert prepared["provider"]["head_ip"] == config["provider"]["head_ip"]


@pytest.mark.parametrize("path", [AWS, ONPREM], ids=["aws", "onprem"])
def test_shipped_configs_keep_ray_ports_closed(path):
    assert security_problems(_load(path)) == []
    check_file(path)


def _aws_with_rules(*rules):
    config = _load(AWS)
    config["provider"]["security_group"] = {"GroupName": "ray", "IpPermissions": list(rules)}
    return config


WORLD4 = {"IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
WORLD6 = {"Ipv6Ranges": [{"CidrIpv6": "::/0"}]}


@pytest.mark.parametrize("rule,ports", [
    ({"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, **WORLD4}, "8265"),
    ({"IpProtocol": "tcp", "FromPort": 6000, "ToPort": 7000, **WORLD6}, "6379"),
    ({"IpProtocol": "-1", **WORLD4}, "6379"),  # all traffic
    ({"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535,
      "IpRanges": [{"CidrIp": "10.0.0.0/8"}, {"CidrIp": "0.0.0.0/0"}]}, "10001"),
])
def test_checker_catches_world_open_ray_ports(rule, ports):
    problems = security_problems(_aws_with_rules(rule))
    assert len(problems) == 1 and ports in problems[0] and "IpPermissions[0]" in problems[0]


def _tcp(low, high, *cidrs):
    return {"IpProtocol": "tcp", "FromPort": low, "ToPort": high,
            "IpRanges": [{"CidrIp": c} for c in cidrs if ":" not in c],
            "Ipv6Ranges": [{"CidrIpv6": c} for c in cidrs if ":" in c]}


@pytest.mark.parametrize("rules,ports", [
    ([_tcp(8265, 8265, "0.0.0.0/1", "128.0.0.0/1")], "8265"),                       # halves in one rule
    ([_tcp(8265, 8265, "0.0.0.0/1"), _tcp(8100, 9000, "128.0.0.0/1")], "8265"),     # halves in two rules
    ([_tcp(10001, 10001, "::/1"), _tcp(10001, 10001, "8000::/1")], "10001"),        # IPv6 halves
    ([_tcp(8260, 8270, *[f"{i * 32}.0.0.0/3" for i in range(8)])], "8265"),         # eighths, a port range
    ([_tcp(6379, 6379, "0.0.0.0/2")], "6379"),                                      # a quarter of the internet
])
def test_checker_judges_by_coverage_not_prefix(rules, ports):
    """0.0.0.0/0 split into pieces, across rules or IP versions, is still the internet on that port."""
    problems = security_problems(_aws_with_rules(*rules))
    assert len(problems) == 1 and ports in problems[0], problems
    assert "to the internet" in problems[0]


def test_checker_counts_only_public_sources_against_the_limit():
    """Private ranges never count, and one office /24 plus a VPN /20 stays under a /16."""
    ok = _aws_with_rules(_tcp(8265, 8265, "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"),
                         _tcp(0, 65535, "198.51.100.0/24"), _tcp(8265, 8265, "203.0.112.0/20"))
    assert security_problems(ok) == []
    # 0.0.0.0/0 less 10/8, 172.16/12, 192.168/16, 100.64/10, 127/8 and 169.254/16
    public = 2 ** 32 - 2 ** 24 - 2 ** 20 - 2 ** 16 - 2 ** 22 - 2 ** 24 - 2 ** 16
    (problem,) = security_problems(_aws_with_rules(_tcp(6379, 6379, "0.0.0.0/0")))
    assert f"{public:.3g} public IPv4 addresses" in problem


def test_checker_catches_gcp_firewall_and_missing_security_group():
    gcp = {"provider": {"type": "gcp", "firewall": [
        {"sourceRanges": ["0.0.0.0/0"], "allowed": [{"IPProtocol": "tcp", "ports": ["22", "8000-9000"]}]}]}}
    assert "8265" in security_problems(gcp)[0]
    config = _load(AWS)
    del config["available_node_types"]["gpu_worker"]["node_config"]["SecurityGroupIds"]
    (problem,) = security_problems(config)
    assert "gpu_worker" in problem and "SecurityGroupIds" in problem


@pytest.mark.parametrize("change,problem", [
    (lambda c: c["available_node_types"]["gpu_spot_worker"]["node_config"]["InstanceMarketOptions"].update(
        MarketType="Spot"), "AWS knows only 'spot'"),
    (lambda c: c["available_node_types"]["gpu_spot_worker"]["node_config"]["InstanceMarketOptions"]["SpotOptions"]
        .update(SpotInstanceType="persistent"), "SpotInstanceType='persistent'"),
    (lambda c: c["available_node_types"]["gpu_spot_worker"]["node_config"]["InstanceMarketOptions"]["SpotOptions"]
        .update(MaxPrize="3"), "SpotOptions.MaxPrize is not a spot option"),
    (lambda c: c["available_node_types"]["head"]["node_config"].update(InstanceMarketOptions={"MarketType": "spot"}),
     "head node on spot"),
])
def test_spot_settings_that_fail_at_launch_are_caught_offline(tmp_path, change, problem):
    from cluster.check_config import spot_problems

    config = _load(AWS)
    assert spot_problems(config) == []
    change(config)
    (found,) = spot_problems(config)
    assert problem in found
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        check_file(path)


def test_checker_allows_ssh_and_private_ranges():
    ok = _aws_with_rules(
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, **WORLD4},
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]},
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-0123456789abcdef0"}]},
    )
    assert security_problems(ok) == []


def test_cli_reports_each_file_and_fails_on_a_bad_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_aws_with_rules({"IpProtocol": "tcp", "FromPort": 10001, "ToPort": 10001, **WORLD4})))
    invalid = tmp_path / "invalid.yaml"
    config = _load(ONPREM)
    config["not_a_ray_field"] = 1
    invalid.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "cluster.check_config", str(AWS), str(bad), str(invalid)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert f"ok: {AWS}" in out.stdout
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 2, out.stderr
    assert str(bad) in errors[0] and "10001" in errors[0]
    assert str(invalid) in errors[1] and "not_a_ray_field" in errors[1]


# ------------------------------------------------ issue 20: the config as Ray runs it, every port, every provider
def _write(tmp_path, name, config):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config) if isinstance(config, dict) else config)
    return path


SAFE_START = {"head_start_ray_commands": ["ray stop", "ray start --head --port=6379 --dashboard-host=127.0.0.1 "
                                          "--autoscaling-config=~/ray_bootstrap_config.yaml"],
              "worker_start_ray_commands": ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"]}


def test_a_minimal_aws_config_is_judged_with_rays_defaults(tmp_path):
    """No node types, no start commands: Ray fills in its own (m5.large nodes without a security group, so its
    default group with SSH open to 0.0.0.0/0, and `--dashboard-host=0.0.0.0`). The raw YAML said "ok"."""
    path = _write(tmp_path, "minimal.yaml", "cluster_name: mini\nprovider:\n  type: aws\n  region: us-west-2\n"
                                            "auth:\n  ssh_user: ubuntu\n")
    with pytest.raises(ValueError) as e:
        check_file(path)
    assert "node type 'ray.head.default' has no SecurityGroupIds" in str(e.value) and "(and 2 more)" in str(e.value)
    problems = security_problems(validate(_load(path)))
    assert any("'ray.worker.default' has no SecurityGroupIds" in p for p in problems)
    assert any("--dashboard-host=0.0.0.0" in p and "head_start_ray_commands[1]" in p for p in problems)


@pytest.mark.parametrize("low, high, named", [
    (8000, 8000, "8000 (Serve HTTP)"), (52365, 52365, "52365 (dashboard agent)"),
    (15000, 15100, "10002-19999 (worker ports)"), (50000, 60000, "52365 (dashboard agent)"),
])
def test_serve_and_ray_ports_beyond_the_first_three_are_checked(low, high, named):
    (problem,) = security_problems(validate(_aws_with_rules(_tcp(low, high, "0.0.0.0/0"))))
    assert named in problem and "to the internet" in problem


def test_ports_moved_by_start_commands_are_the_ones_checked(tmp_path):
    config = _load(AWS)
    config["head_start_ray_commands"] = [
        "ray stop",
        "ulimit -n 65536; ray start --head --port=7000 --dashboard-port 9265 --ray-client-server-port=11001 "
        "--metrics-export-port=9100 --dashboard-host=127.0.0.1 --autoscaling-config=~/ray_bootstrap_config.yaml",
        "nohup python -m cluster.serve /models/m.onnx --host 0.0.0.0 --port 8443 > serve.log 2>&1 &"]
    for port, named in [(7000, "7000 (GCS)"), (9265, "9265 (dashboard/job API)"), (11001, "11001 (Ray client)"),
                        (9100, "9100 (metrics export)"), (8443, "8443 (Serve HTTP)")]:
        config["provider"]["security_group"] = {"GroupName": "ray", "IpPermissions": [_tcp(port, port, "0.0.0.0/0")]}
        (problem,) = security_problems(validate(config))
        assert named in problem, problem
    config["provider"]["security_group"]["IpPermissions"] = [_tcp(6379, 6379, "0.0.0.0/0")]
    assert security_problems(validate(config)) == []  # nothing listens on 6379 any more
    config["head_start_ray_commands"][1] = config["head_start_ray_commands"][1].replace("127.0.0.1", "0.0.0.0")
    (problem,) = security_problems(validate(config))
    assert "head_start_ray_commands[1]: ray start --dashboard-host=0.0.0.0" in problem


@pytest.mark.parametrize("rule", [
    {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "PrefixListIds": [{"PrefixListId": "pl-0123abcd"}]},
    {"IpProtocol": "-1", "PrefixListIds": [{"PrefixListId": "pl-0123abcd"}]},
    {"IpProtocol": -1, "FromPort": 22, "ToPort": 22, **WORLD4},  # -1 as a YAML number: every port, FromPort ignored
])
def test_prefix_lists_and_protocol_minus_one_are_judged(tmp_path, rule):
    path = _write(tmp_path, "rules.yaml", _aws_with_rules(rule))
    with pytest.raises(ValueError, match=r"pl-0123abcd on .*8265.*: its addresses cannot be checked offline"
                                         r"|6379 \(GCS\).* to the internet"):
        check_file(path)


GCP = {"cluster_name": "g", "provider": {"type": "gcp", "region": "us-west1", "availability_zone": "us-west1-a",
                                         "project_id": "my-project"}, "auth": {"ssh_user": "ubuntu"}, **SAFE_START}
AZURE = {"cluster_name": "a", "provider": {"type": "azure", "location": "westus2", "resource_group": "ray"},
         "auth": {"ssh_user": "ubuntu"}, **SAFE_START}


def test_providers_whose_firewall_is_not_in_the_file_are_not_checked_never_ok(tmp_path):
    files = [_write(tmp_path, "gcp.yaml", GCP), _write(tmp_path, "azure.yaml", AZURE), ONPREM]
    out = subprocess.run([sys.executable, "-m", "cluster.check_config", *map(str, files)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line.split(":")[:2] for line in lines] == [["not checked", " gcp"], ["not checked", " azure"],
                                                       ["not checked", " local"]]
    assert "ok:" not in out.stdout
    gcp_default = dict(GCP)
    del gcp_default["head_start_ray_commands"]  # Ray's GCP default binds the dashboard to 0.0.0.0
    with pytest.raises(ValueError, match="--dashboard-host=0.0.0.0"):
        check_file(_write(tmp_path, "gcp-default.yaml", gcp_default))
