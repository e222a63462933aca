"""`ray up` for real: docs/cluster.md's on-prem commands, word for word, on simulated hosts (tests/sim_hosts.py).

A laptop, a head and a worker (sshd on both), and an S3 server (moto) on one private bridge. From a copy of the
repository on the laptop with only cluster/onprem.yaml's CHANGE lines filled in and its offline setup (an
existing environment) chosen: `python -m cluster.check_config`, `ray up`, every node up, `ray dashboard` on
docs/cluster.md's port, `ray job submit` of `cluster.train` (2 workers, one per host) with runs in the bucket, the
worker host's raylet killed with SIGKILL mid-run (the run resumes and finishes), best.ckpt and summary.json
where docs/cluster.md says, `cluster.segment` of that best.ckpt on the same cluster with its masks into the bucket,
`python -m cluster.down`, and
then no Ray process on any host. Prints each step's time (they go in docs/benchmarks.md, measured under load).
"""
import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_hosts import SimHosts, unavailable

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

PORT = "8266"  # docs/cluster.md's `ray dashboard --port`
BUCKET, S3_PORT = "deeplab", "9000"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
MAX_IT, EVAL, KILL_AT = 100, 10, 12  # the raylet dies after the first checkpoint; training outlasts Ray noticing it
TINY = ["--set", "model.backbone=resnet_tiny", "--set", "model.aspp_channels=16", "--set", "data.synthetic_size=80",
        "--set", "data.crop_size=65", "--set", "data.synthetic_train=64", "--set", "data.synthetic_val=4",
        "--set", f"train.max_iterations={MAX_IT}", "--set", f"train.eval_interval={EVAL}",
        "--set", "train.log_interval=2", "--set", "train.amp=off", "--set", "train.channels_last=false",
        "--set", "cluster.placement_strategy=SPREAD", "--set", "cluster.collective_timeout_s=30",
        "--set", "cluster.max_failures=3"]


def onprem_yaml(text: str, head: str, worker: str, venv: str) -> str:
    """cluster/onprem.yaml as a user fills it in: the CHANGE lines, and the offline setup (a) instead of the
    online one. Fails if the file no longer has exactly the lines docs/cluster.md tells a user to change."""
    subs = [(r"head_ip: \S+", f"head_ip: {head}"), (r"worker_ips: \[[^\]]*\]", f"worker_ips: [{worker}]"),
            (r"ssh_user: \S+", "ssh_user: root"), (r"ssh_private_key: \S+", "ssh_private_key: ~/.ssh/id_ed25519")]
    lines = text.splitlines()
    for pattern, value in subs:
        hits = [i for i, line in enumerate(lines) if re.search(pattern, line) and "# CHANGE" in line]
        assert len(hits) == 1, f"onprem.yaml: no single CHANGE line for {pattern}"
        lines[hits[0]] = re.sub(pattern, value, lines[hits[0]])
    online = lines.index("setup_commands:")
    offline = next(i for i, line in enumerate(lines) if line.startswith("# setup_commands:")
                   and "an existing environment" in line)
    block = [lines[offline][2:]]
    for line in lines[offline + 1:]:
        if not line.startswith("#   - "):
            break
        block.append(line[2:].replace("/opt/deeplabv3/venv", venv) if "CHANGE" in line else line[2:])
    assert any(venv in line for line in block), "onprem.yaml: the offline environment has no CHANGE path"
    end = next(i for i in range(online + 1, len(lines)) if lines[i].startswith("# Offline"))
    return "\n".join(lines[:online] + block + lines[end:]) + "\n"


def _clone(dest: Path) -> None:
    """The project as a user's clone has it (what `ray job submit --working-dir .` ships)."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.png")
    for part in ("deeplab", "export", "cluster", "tuning", "configs"):
        shutil.copytree(ROOT / part, dest / part, ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", dest)


class Times(dict):
    """Each step's seconds, printed as it is taken (docs/benchmarks.md quotes them)."""

    def __setitem__(self, step, seconds):
        super().__setitem__(step, seconds)
        print(f"ray up e2e: {step:<40s} {seconds:6.1f} s", flush=True)


def _wait(what, check, timeout, logs=()):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p}\n{Path(p).read_text(errors='replace')[-3000:]}" for p in logs
                              if Path(p).exists())
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tails}")
        time.sleep(0.5)


def _lines(path: Path) -> list:
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def _s3(laptop, code: str, ip: str) -> str:
    """Python with boto3 on the laptop, `s3` a client of the bucket's server (the test's own looks)."""
    prelude = (f"import boto3, io, json; s3 = boto3.client('s3', endpoint_url='http://{ip}:{S3_PORT}', "
               f"region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing')\n")
    return laptop.run(["python", "-c", prelude + code]).stdout


@pytest.fixture
def hosts(tmp_path):
    reason = unavailable() or (None if (Path(sys.prefix) / "bin" / "moto_server").exists()
                               else "the S3 server needs moto_server (pip install 'moto[server]')")
    if reason:
        pytest.skip(reason)
    with SimHosts(tmp_path / "hosts", ["laptop", "head", "worker", "s3"], sshd=("head", "worker")) as sim:
        yield sim


def test_ray_up_onprem_train_kill_raylet_segment_down(hosts, tmp_path):
    laptop, head, worker, s3 = hosts["laptop"], hosts["head"], hosts["worker"], hosts["s3"]
    logs = tmp_path / "logs"
    logs.mkdir()
    clone = laptop.home / "deeplabv3-ray"
    _clone(clone)
    (clone / "cluster" / "onprem.yaml").write_text(
        onprem_yaml((ROOT / "cluster" / "onprem.yaml").read_text(), head.ip, worker.ip, hosts.venv))
    here = "/root/deeplabv3-ray"  # the clone, as the laptop sees it
    laptop.env["PYTHONUNBUFFERED"] = "1"  # `ray job submit` writes its tail of the job's log to a file here, not a tty
    times = Times()

    # the S3 server, and a bucket with a few photos in it
    moto = s3.popen(["moto_server", "-H", s3.ip, "-p", S3_PORT], logs / "moto.log")
    _wait("the S3 server", lambda: moto.poll() is not None or laptop.run(
        ["bash", "-c", f"exec 3<>/dev/tcp/{s3.ip}/{S3_PORT}"], check=False).returncode == 0, 60, [logs / "moto.log"])
    assert moto.poll() is None, (logs / "moto.log").read_text()
    _s3(laptop, f"""s3.create_bucket(Bucket='{BUCKET}')
import io, numpy as np
from PIL import Image
for i in range(3):
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (40 + i, 48, 3), np.uint8)).save(b, 'PNG')
    s3.put_object(Bucket='{BUCKET}', Key=f'photos/p{{i}}.png', Body=b.getvalue())""", s3.ip)
    storage = f"s3://{BUCKET}/runs?endpoint_override={s3.ip}:{S3_PORT}&scheme=http"
    env = ["--runtime-env-json", json.dumps({"env_vars": KEYS})]

    out = laptop.run(["python", "-m", "cluster.check_config", "cluster/onprem.yaml"], cwd=here)
    assert "not checked: local" in out.stdout, out.stdout

    start = time.monotonic()
    up = laptop.run(["ray", "up", "-y", "cluster/onprem.yaml"], cwd=here, timeout=300)
    (logs / "ray_up.log").write_text(up.stdout + up.stderr)
    times["ray up (head ready)"] = time.monotonic() - start
    up_done = time.monotonic()

    laptop.popen(["ray", "dashboard", "--port", PORT, "cluster/onprem.yaml"], logs / "dashboard.log", cwd=here)
    address = f"http://127.0.0.1:{PORT}"

    def alive_nodes():
        listed = laptop.run(["ray", "list", "nodes", "--address", address, "--format", "json"], check=False)
        if listed.returncode:
            return 0
        return sorted(n["node_ip"] for n in json.loads(listed.stdout) if n["state"] == "ALIVE")

    nodes = _wait("the worker to join", lambda: (lambda n: n if n and len(n) == 2 else None)(alive_nodes()), 180,
                  [logs / "dashboard.log"])
    assert nodes == sorted([head.ip, worker.ip])
    times["worker join (after ray up)"] = time.monotonic() - up_done

    # training, 2 workers, one per host; runs in the bucket
    job_log = logs / "train_job.log"
    submitted = time.monotonic()
    job = laptop.popen(["ray", "job", "submit", "--address", address, "--working-dir", ".", *env, "--",
                        "python", "-m", "cluster.train", "--config", "configs/demo.yaml", "--num-workers", "2",
                        "--storage-path", storage, "--name", "e2e", *TINY], job_log, cwd=here)

    def iterations(after=0):
        return [(i, int(m.group(1))) for i, line in enumerate(_lines(job_log))
                if (m := re.match(r"iter (\d+)/", line)) and i >= after]

    _wait("training to start", lambda: iterations() or job.poll() is not None, 240, [job_log])
    times["job start (submit -> first iteration)"] = time.monotonic() - submitted
    _wait(f"iteration {KILL_AT}", lambda: any(it >= KILL_AT for _, it in iterations()) or job.poll() is not None,
          240, [job_log])
    assert job.poll() is None, "the run ended before the fault"
    raylets = [pid for pid, _, args in worker.processes() if "/raylet/raylet " in args]
    assert len(raylets) == 1, worker.processes()
    worker.run(["kill", "-9", str(raylets[0])])
    killed, killed_at_line = time.monotonic(), len(_lines(job_log))

    def training_again():
        lines = _lines(job_log)
        resumed = next((i for i in range(killed_at_line, len(lines)) if lines[i].startswith("resuming from")), None)
        return resumed is not None and iterations(after=resumed)

    _wait("training again after the raylet was killed", lambda: training_again() or job.poll() is not None,
          240, [job_log])
    assert training_again(), f"the run ended without resuming after the fault:\n{job_log.read_text()[-3000:]}"
    times["raylet killed -> training again"] = time.monotonic() - killed
    assert job.wait(timeout=240) == 0, job_log.read_text()[-5000:]
    times["training job (submit -> end)"] = time.monotonic() - submitted
    keys = json.loads(_s3(laptop, f"print(json.dumps([o['Key'] for o in s3.list_objects_v2(Bucket='{BUCKET}')"
                                  f".get('Contents', [])]))", s3.ip))
    assert "runs/e2e/best.ckpt" in keys and "runs/e2e/summary.json" in keys, keys
    assert not [k for k in keys if "?" in k or "endpoint_override" in k], keys  # one run folder, no query keys
    text = job_log.read_text()
    run_url = f"s3://{BUCKET}/runs/e2e?endpoint_override={s3.ip}:{S3_PORT}&scheme=http"
    best_url = f"s3://{BUCKET}/runs/e2e/best.ckpt?endpoint_override={s3.ip}:{S3_PORT}&scheme=http"
    assert f"\nrun {run_url}\n" in text and f"best checkpoint: {best_url}" in text, text[-3000:]
    summary = json.loads(_s3(laptop, f"print(s3.get_object(Bucket='{BUCKET}', Key='runs/e2e/summary.json')"
                                     f"['Body'].read().decode())", s3.ip))
    assert summary["iterations"] == MAX_IT and summary["run"] == run_url and summary["best_checkpoint"] == best_url
    assert summary["resumes"] and summary["resumes"][0]["checkpoint_iteration"] >= EVAL, summary["resumes"]

    # the best checkpoint segments the bucket's photos on the same cluster, masks into the bucket
    seg_log = logs / "segment_job.log"
    photos = f"s3://{BUCKET}/photos/?endpoint_override={s3.ip}:{S3_PORT}&scheme=http"
    masks_url = f"s3://{BUCKET}/masks?endpoint_override={s3.ip}:{S3_PORT}&scheme=http"
    start = time.monotonic()
    seg = laptop.popen(["ray", "job", "submit", "--address", address, "--working-dir", ".", *env, "--",
                        "python", "-m", "cluster.segment", best_url, photos, "-o", masks_url, "--workers", "2"],
                       seg_log, cwd=here)
    assert seg.wait(timeout=300) == 0, seg_log.read_text()[-5000:]
    times["segment job"] = time.monotonic() - start
    keys = json.loads(_s3(laptop, f"print(json.dumps([o['Key'] for o in s3.list_objects_v2(Bucket='{BUCKET}', "
                                  f"Prefix='masks/').get('Contents', [])]))", s3.ip))
    assert sorted(k for k in keys if not k.endswith("/")) == [
        "masks/manifest.jsonl", "masks/model.json", "masks/p0.png", "masks/p1.png", "masks/p2.png"], keys
    manifest = _s3(laptop, f"print(s3.get_object(Bucket='{BUCKET}', Key='masks/manifest.jsonl')['Body'].read()"
                           f".decode(), end='')", s3.ip).splitlines()
    assert sorted(json.loads(line)["status"] for line in manifest) == ["ok"] * 3, manifest
    sizes = json.loads(_s3(laptop, f"""from PIL import Image
print(json.dumps([Image.open(io.BytesIO(s3.get_object(Bucket='{BUCKET}', Key=f'masks/p{{i}}.png')['Body'].read())).size
                  for i in range(3)]))""", s3.ip))
    assert sizes == [[48, 40], [48, 41], [48, 42]], sizes  # one mask per photo, at the photo's size

    # Ctrl-C in `ray dashboard`'s terminal (it and its ssh), then down
    tunnel = [str(pid) for pid, _, args in laptop.processes()
              if " dashboard --port " in args or (args.startswith("ssh ") and f"-L {PORT}:localhost" in args)]
    assert tunnel, laptop.processes()
    laptop.run(["kill", "-INT", *tunnel])
    start = time.monotonic()
    down = laptop.run(["python", "-m", "cluster.down", "cluster/onprem.yaml"], cwd=here, timeout=180)
    (logs / "down.log").write_text(down.stdout + down.stderr)
    times["ray down (cluster.down)"] = time.monotonic() - start

    def left():  # anything but the host's first process, sshd and ps itself
        return {host.name: [(pid, args) for pid, _, args in host.processes()
                            if pid != 1 and not args.startswith(("sshd", "ps "))] for host in (head, worker)}

    deadline = time.monotonic() + 30  # the tunnel's remote shell ends on its hangup
    while any(left().values()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not any(left().values()), f"left after cluster.down: {left()}\n{down.stdout[-3000:]}"
