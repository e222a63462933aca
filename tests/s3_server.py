"""A real S3 server for the tests: moto's `moto_server` on loopback, one per test module (import the fixture:
``from s3_server import s3_server``). Requests are logged to ``S3Server.log`` (one line each, method and key),
so a test can tell what a command wrote."""
from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from ray_nodes import free_port


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # HOST:PORT, for ?endpoint_override= and boto3's endpoint_url
    log: Path

    def client(self):
        """boto3's client of this server: the test's own look at the bucket, independent of pyarrow."""
        import boto3

        return boto3.client("s3", endpoint_url=f"http://{self.endpoint}", region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def requests(self) -> list:
        """(method, path) of every request so far, in order."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            parts = re.sub(r"\x1b\[[0-9;]*m", "", line).split('"')  # werkzeug colours failed requests
            if len(parts) >= 3 and parts[1].count(" ") == 2:
                method, path, _ = parts[1].split(" ")
                found.append((method, path))
        return found


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on loopback. The port answers as moto (S3's bucket list), not merely accepts: a free port
    can be taken by another process before moto binds it, and a server that is not S3 answers 200 to uploads it
    never stores."""
    if not shutil.which("moto_server"):
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    folder = tmp_path_factory.mktemp("moto")
    for attempt in range(3):
        port = free_port()
        path = folder / f"moto{attempt}.log"
        log = open(path, "w")
        server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
        try:
            if _answers_as_s3(server, port):
                yield S3Server(f"127.0.0.1:{port}", path)
                return
        finally:
            server.kill()
            server.wait()
            log.close()
    pytest.fail("moto_server did not come up as S3 on three free ports: " + (folder / "moto2.log").read_text())


def _answers_as_s3(server, port: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as reply:
                body = reply.read()
            return server.poll() is None and b"ListAllMyBucketsResult" in body
        except OSError:
            time.sleep(0.2)
    return False
