"""python -m cluster.down CLUSTER.yaml: `ray down`, and on an on-prem cluster `ray stop` on every worker.

Ray 2.60's `ray down` runs `ray stop` on the head only. A cloud provider then terminates the worker instances;
the `local` provider (cluster/onprem.yaml) only marks them terminated in a file, so each worker's Ray lives on
(its raylet retries the lost head for minutes) and holds the machine's GPUs. This runs `ray down -y FILE`
first (the head, and with it the autoscaler that would restart a stopped worker), then `ray stop` over SSH on
each `worker_ips` machine, as `ray up` ran `ray start` there (the ssh_user's login shell, the same key).
Exits 1 naming each machine where that failed.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

import yaml

from deeplab.cli import UserError, command, error_line


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not YAML ({error_line(e)})") from None
    if not isinstance(config, dict) or not isinstance(config.get("provider"), dict):
        raise UserError(f"{path}: not a Ray cluster config (no provider section)")
    return config


def ssh_command(config: dict, host: str, remote: str) -> list:
    """``remote`` run on ``host`` the way Ray's SSH runner does: the ssh_user's interactive login shell, with
    ~/.bashrc (where the setup activated the environment), key only, no host-key prompts."""
    auth = config.get("auth") or {}
    key = os.path.expanduser(auth.get("ssh_private_key", "~/.ssh/id_rsa"))
    return ["ssh", "-i", key, "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            "-o", "LogLevel=ERROR", f"{auth.get('ssh_user', 'root')}@{host}",
            f"bash --login -c -i {shlex.quote('true && source ~/.bashrc && ' + remote)}"]


def stop_workers(config: dict, timeout_s: float = 120) -> list:
    """`ray stop` on every worker of a local-provider cluster; returns [(worker, reason)] where it failed."""
    failed = []
    for host in config["provider"].get("worker_ips") or []:
        print(f"ray stop on worker {host}", flush=True)
        try:
            done = subprocess.run(ssh_command(config, host, "ray stop"), stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            failed.append((host, f"no answer within {timeout_s:.0f} s"))
            continue
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            failed.append((host, lines[-1] if lines else f"exit status {done.returncode}"))
    return failed


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.down", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", metavar="CLUSTER.yaml", help="the file given to `ray up`")
    args = parser.parse_args(argv)
    config = _read(args.file)
    down = subprocess.run(["ray", "down", "-y", args.file], stdin=subprocess.DEVNULL)
    if down.returncode != 0:
        print(f"error: ray down -y {args.file} exited {down.returncode}", file=sys.stderr)
        return 1
    if config["provider"].get("type") != "local":
        return 0  # a cloud provider terminated the workers' instances
    failed = stop_workers(config)
    for host, reason in failed:
        print(f"error: ray stop on worker {host} failed: {reason}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
