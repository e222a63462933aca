"""cluster.spot_watch against a metadata server of our own on loopback that answers as EC2's IMDSv2 does:
a token first, 404 while no reclaim is scheduled, then the interruption notice."""
import datetime
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cluster.spot_watch import interruption, seconds_left, watch


class FakeMetadata(BaseHTTPRequestHandler):
    polls_before_notice = 3
    polls = 0
    reclaim_at = None
    bodies = []  # answers (200) to send before the real notice, one per poll after the 404s

    def log_message(self, *args):
        pass

    def do_PUT(self):
        assert self.path == "/latest/api/token" and self.headers["X-aws-ec2-metadata-token-ttl-seconds"]
        self._send(200, b"token-1")

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") != "token-1":
            return self._send(401, b"")
        assert self.path == "/latest/meta-data/spot/instance-action"
        type(self).polls += 1
        if type(self).polls <= self.polls_before_notice:
            return self._send(404, b"")
        if type(self).bodies:
            return self._send(200, type(self).bodies.pop(0))
        when = datetime.datetime.fromtimestamp(self.reclaim_at, datetime.timezone.utc)
        self._send(200, json.dumps({"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}).encode())

    def _send(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def metadata():
    FakeMetadata.polls, FakeMetadata.reclaim_at, FakeMetadata.bodies = 0, time.time() + 120, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeMetadata)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_no_notice_while_nothing_is_scheduled_then_one_drain_with_the_deadline(metadata):
    assert interruption(metadata) is None  # 404: no reclaim scheduled
    drained = []
    notice = watch(lambda: interruption(metadata), drained.append, interval=0.01)
    assert notice["action"] == "terminate"
    assert FakeMetadata.polls == FakeMetadata.polls_before_notice + 1  # stopped polling at the notice
    assert len(drained) == 1 and 115 <= drained[0] <= 120  # seconds left to the reclaim


def test_an_unreachable_metadata_service_is_retried_not_fatal():
    answers = iter([OSError("connection refused"), None, {"action": "terminate", "time": "2030-01-01T00:02:00Z"}])

    def poll():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    drained = []
    watch(poll, drained.append, interval=0.01)
    assert len(drained) == 1


def test_seconds_left_reads_the_notice_time():
    notice = {"action": "terminate", "time": "2030-01-01T00:02:00Z"}
    start = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
    assert seconds_left(notice, now=start) == 120
    assert seconds_left(notice, now=start + 500) == 1  # already late: drain at once


def test_malformed_notices_are_logged_and_the_watch_goes_on(metadata, capsys):
    """A notice without `time`, JSON that is not an object, a time that is no date, or a body that is not JSON
    at all: each is one log line, and the real notice after them is still drained."""
    FakeMetadata.polls_before_notice = 1
    FakeMetadata.bodies = [b'{"action": "terminate"}', b'["terminate"]', b'"terminate"',
                           b'{"action": "terminate", "time": "soon"}', b"<html>not json</html>"]
    drained = []
    notice = watch(lambda: interruption(metadata), drained.append, interval=0.01)
    assert notice["action"] == "terminate" and len(drained) == 1 and 115 <= drained[0] <= 120
    assert FakeMetadata.polls == 1 + 5 + 1
    log = capsys.readouterr().err.splitlines()
    assert len(log) == 5, log
    assert "notice has no time" in log[0] and "not a JSON object" in log[1] and "not a JSON object" in log[2]
    assert "not an ISO date" in log[3] and "metadata not readable" in log[4]


def test_a_failed_drain_is_logged_and_tried_again_at_the_next_poll(metadata, tmp_path, capsys):
    """`ray drain-node` (a stand-in script on the same command line) fails twice, then drains: the watcher
    keeps polling the notice and calls it again each time."""
    from cluster.spot_watch import drain

    calls = tmp_path / "calls"
    fake_ray = tmp_path / "ray"
    fake_ray.write_text("#!/bin/sh\necho \"$@\" >> %s\n[ $(wc -l < %s) -ge 3 ]\n" % (calls, calls))
    fake_ray.chmod(0o755)
    FakeMetadata.polls_before_notice = 0
    notice = watch(lambda: interruption(metadata), lambda s: drain("node-1", s, ray_cli=str(fake_ray)), interval=0.01)
    assert notice["action"] == "terminate"
    lines = calls.read_text().splitlines()
    assert len(lines) == 3 and FakeMetadata.polls == 3
    assert lines[0].startswith("drain-node --node-id node-1 --reason DRAIN_NODE_REASON_PREEMPTION")
    log = capsys.readouterr().err.splitlines()
    assert len(log) == 2 and all("drain failed (CalledProcessError" in line for line in log), log
