"""Turn an AWS spot interruption notice into a Ray preemption notice, on the node that gets it.

AWS announces a spot reclaim two minutes ahead in the instance metadata (``spot/instance-action``). This
watcher polls it and, when the notice comes, drains this Ray node with reason preemption and the deadline:
every worker of a run on it then sees ``ray.train.get_preemption_info()``, and `deeplab.train_loop` writes a
checkpoint at once, so the run loses almost nothing when the node goes. ``ray_cluster.yaml`` starts it on
every worker node after ``ray start``:

    python -m cluster.spot_watch [--interval 5] [--metadata http://169.254.169.254]
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Optional

from deeplab.cli import error_line

METADATA = "http://169.254.169.254"


def interruption(metadata: str = METADATA, timeout: float = 2.0) -> Optional[dict]:
    """The scheduled spot action ({"action": "terminate", "time": "2026-...Z"}) or None (IMDSv2: a session
    token first, then the document; 404 while no reclaim is scheduled)."""
    token_request = urllib.request.Request(f"{metadata}/latest/api/token", method="PUT",
                                           headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    with urllib.request.urlopen(token_request, timeout=timeout) as r:
        token = r.read().decode()
    request = urllib.request.Request(f"{metadata}/latest/meta-data/spot/instance-action",
                                     headers={"X-aws-ec2-metadata-token": token})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def seconds_left(notice, now: Optional[float] = None) -> int:
    """Seconds until the reclaim the notice announces (AWS gives about 120); at least 1. A notice that is not
    a JSON object with an ISO `time` raises ValueError naming what is wrong."""
    if not isinstance(notice, dict):
        raise ValueError(f"notice is not a JSON object: {str(notice)[:100]}")
    if not isinstance(notice.get("time"), str):
        raise ValueError(f"notice has no time: {json.dumps(notice)[:100]}")
    try:
        when = datetime.datetime.fromisoformat(notice["time"].replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"notice time {notice['time'][:40]!r} is not an ISO date") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)  # AWS writes UTC
    return max(1, int(when.timestamp() - (time.time() if now is None else now)))


def node_id() -> str:
    import ray

    ray.init(address="auto", log_to_driver=False)
    try:
        return ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()


def drain(node: str, seconds: int, ray_cli: str = "ray") -> None:
    """`ray drain-node` with reason preemption; raises CalledProcessError when Ray refuses."""
    subprocess.run([ray_cli, "drain-node", "--node-id", node, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                    "--reason-message", "AWS spot interruption notice", "--deadline-remaining-seconds", str(seconds)],
                   check=True)


def drain_this_node(seconds: int) -> None:
    """Tell Ray this node is being preempted (what its autoscaler does for the clouds it watches)."""
    drain(node_id(), seconds)


def _log(message: str) -> None:
    print(f"spot_watch: {message}", file=sys.stderr, flush=True)


def watch(poll: Callable[[], Optional[dict]], on_notice: Callable[[int], None], interval: float = 5.0) -> dict:
    """Poll until a notice comes and ``on_notice`` (the drain) succeeds once; return the notice. Nothing ends
    the watch early: an unreadable metadata service, a malformed notice or a failed drain is logged and
    tried again at the next interval (the notice stays up until the reclaim)."""
    while True:
        try:
            notice = poll()
        except (OSError, ValueError) as e:
            _log(f"metadata not readable ({e}); retrying")
            notice = None
        if notice is not None:
            try:
                seconds = seconds_left(notice)
            except ValueError as e:
                _log(f"malformed interruption notice ({e}); still watching")
            else:
                try:
                    on_notice(seconds)
                    return notice
                except Exception as e:  # ray drain-node failed, Ray not reachable: the next poll tries again
                    _log(f"drain failed ({error_line(e, with_type=True)}); retrying")
        time.sleep(interval)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.spot_watch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default 5)")
    parser.add_argument("--metadata", default=METADATA, help=f"instance metadata endpoint (default {METADATA})")
    args = parser.parse_args(argv)
    notice = watch(lambda: interruption(args.metadata), drain_this_node, args.interval)
    print(f"spot_watch: {notice.get('action')} at {notice.get('time')}: node drained for preemption", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
