"""What the project relies on in Ray's private APIs (cluster/ray_internals.py), pinned against the installed Ray
with a real two-node cluster started here (ray.cluster_utils.Cluster). A failure here after a Ray upgrade names
the function to fix before the bound on ``ray`` in pyproject.toml is raised.

The cluster lives under its own Ray temp folder (RAY_TMPDIR), so the ``ray start`` record it writes is this
module's alone: other Ray clusters on the machine neither see it nor disturb it."""
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from cluster import ray_internals
from cluster.ray_session import free_port

ROOT = Path(__file__).resolve().parents[1]


def _wait_for(condition, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


@pytest.fixture(scope="module")
def temp_dir():
    """A Ray temp folder of this module's own (short: Ray's socket paths must stay under 108 characters)."""
    folder = tempfile.mkdtemp(prefix="rti", dir="/tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", folder)
        patch.delenv("RAY_ADDRESS", raising=False)
        yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_nothing_is_recorded_or_connected_before_a_cluster_starts(temp_dir):
    import ray

    ray.shutdown()
    assert ray_internals.recorded_cluster_address() is None
    assert ray_internals.session_dir() is None and ray_internals.logs_dir() is None


@pytest.fixture(scope="module")
def two_nodes(temp_dir):
    """A head and one more node, one CPU each, this process connected as a driver."""
    import ray
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_port": free_port()})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    nodes.connect()
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


def test_the_recorded_cluster_is_the_one_a_head_start_wrote(two_nodes, temp_dir):
    assert ray_internals.recorded_cluster_address() == two_nodes.gcs_address
    assert (Path(temp_dir) / "ray" / "ray_current_cluster").read_text().strip() == two_nodes.gcs_address


def test_the_session_and_logs_folders_are_this_drivers_in_the_temp_folder(two_nodes, temp_dir):
    import ray

    session = Path(ray_internals.session_dir())
    assert session.parent == Path(temp_dir) / "ray" and session.name.startswith("session_") and session.is_dir()
    assert Path(ray_internals.logs_dir()) == session / "logs"
    # where Ray writes its processes' logs: a task's stdout lands in a worker-*.out file there
    token = f"pinned-{os.getpid()}-{time.time_ns()}"
    ray.get(ray.remote(num_cpus=0)(lambda: print(token)).remote())

    def written():
        return any(token in f.read_text(errors="replace") for f in (session / "logs").glob("worker-*.out"))

    assert _wait_for(written)


def test_replacing_rays_printer_changes_what_the_driver_prints_of_a_cluster_report(two_nodes):
    """A worker killed mid-task: the raylet reports it and Ray's error listener prints it through the hook,
    looked up at each call, so a replaced hook gets the report instead of the terminal."""
    import ray

    original = ray_internals.ray_printer()
    assert callable(original)
    reports = []
    ray_internals.set_ray_printer(lambda data, ignore_prefix: reports.append(data))
    try:
        assert ray_internals.ray_printer() is not original

        @ray.remote(max_retries=0, num_cpus=0)
        def crash():
            os._exit(1)

        with pytest.raises(ray.exceptions.WorkerCrashedError):
            ray.get(crash.remote())
        assert _wait_for(lambda: any("worker died" in line.lower() for r in reports for line in r["lines"]))
        report = next(r for r in reports if any("worker died" in line.lower() for line in r["lines"]))
        assert report["pid"] == "raylet" and report["is_err"] is False
    finally:
        ray_internals.set_ray_printer(original)
    assert ray_internals.ray_printer() is original


def test_a_replaced_forwarded_line_handler_gets_each_tasks_printed_lines(two_nodes):
    import ray

    handlers = ray_internals.forwarded_line_handlers()
    assert "ray_print_logs" in handlers  # ray.init(log_to_driver=True), the default
    batches = []
    ray_internals.replace_forwarded_line_handler("ray_print_logs", "pinned", batches.append)
    try:
        assert set(ray_internals.forwarded_line_handlers()) == set(handlers) - {"ray_print_logs"} | {"pinned"}

        @ray.remote(num_cpus=0)
        def say(token):
            print(token)

        token = f"forwarded-{time.time_ns()}"
        ray.get(say.remote(token))
        assert _wait_for(lambda: any(token in b["lines"] for b in batches))
        batch = next(b for b in batches if token in b["lines"])
        assert batch["task_name"] == "say" and batch["pid"] and "actor_name" in batch
    finally:
        ray_internals.replace_forwarded_line_handler("pinned", "ray_print_logs", handlers["ray_print_logs"])
    assert ray_internals.forwarded_line_handlers() == handlers


def test_the_key_value_store_is_shared_by_the_driver_and_tasks_and_overwrites(two_nodes):
    import ray

    key = f"deeplab/pinned/{time.time_ns()}"
    assert ray_internals.kv_get(key) is None
    ray_internals.kv_put(key, '{"reached_iteration": 3}')
    ray.get(ray.remote(num_cpus=0)(ray_internals.kv_put).remote(key, '{"reached_iteration": 7}'))
    assert ray_internals.kv_get(key) == b'{"reached_iteration": 7}'
    assert ray.get(ray.remote(num_cpus=0)(ray_internals.kv_get).remote(key)) == b'{"reached_iteration": 7}'


def test_the_head_node_is_the_one_cluster_utils_started_first(two_nodes):
    import ray

    head = ray_internals.head_node()
    assert head["NodeID"] == two_nodes.head_node.node_id
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2  # the other node does not pass for the head
    assert head["NodeManagerAddress"] and head["MetricsExportPort"] > 0  # what cluster.serve prints


def test_ray_train_raises_its_own_error_class_and_hands_the_training_codes_error_as_is(two_nodes, temp_dir):
    """cluster.train tells a lost worker (retry) from the training code's failure (stop) by this class: the error
    fit() raises is one of Ray Train's, the worker's own error inside it is not."""
    import ray.train
    from ray.train.torch import TorchTrainer

    def fails(config):
        raise ValueError("a bad file")

    trainer = TorchTrainer(fails, scaling_config=ray.train.ScalingConfig(num_workers=1),
                           run_config=ray.train.RunConfig(name="fails", storage_path=temp_dir,
                                                          failure_config=ray.train.FailureConfig(max_failures=0)))
    with pytest.raises(ray.train.TrainingFailedError) as failed:
        trainer.fit()
    assert ray_internals.is_ray_train_error(failed.value)
    (error,) = failed.value.worker_failures.values()
    assert isinstance(error, ValueError) and not ray_internals.is_ray_train_error(error)
    assert ray_internals.is_ray_train_error(ray.train.ControllerError(RuntimeError("x")))
    assert not ray_internals.is_ray_train_error(ray.exceptions.RayError())


def _cluster_yaml(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", ["ray_cluster.yaml", "cluster/onprem.yaml"])
def test_rays_validator_accepts_the_repositorys_cluster_configs_and_fills_their_defaults(name):
    config = _cluster_yaml(name)
    prepared = ray_internals.validate_cluster_config(config)
    assert prepared["provider"]["type"] == config["provider"]["type"]
    assert set(config.get("available_node_types", {})) <= set(prepared["available_node_types"])
    for key in ("head_setup_commands", "worker_setup_commands", "head_start_ray_commands"):
        assert key in prepared  # merged from the provider's defaults
    assert prepared["head_start_ray_commands"] and prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("break_it, error, words", [
    (lambda c: c.update(max_workers="many"), "ValidationError", "'many' is not of type 'integer'"),  # JSON schema
    (lambda c: c.update(head_node_type="no-such-type"), "ValueError", "head_node_type"),  # checked after it
], ids=["schema", "head-type"])
def test_rays_validator_rejects_a_broken_cluster_config(break_it, error, words):
    config = _cluster_yaml("ray_cluster.yaml")
    break_it(config)
    with pytest.raises(Exception, match=words) as rejected:
        ray_internals.validate_cluster_config(config)
    assert type(rejected.value).__name__ == error


def test_pyproject_bounds_ray_to_the_minor_version_these_pins_ran_on():
    """The upper bound on ``ray`` is the first minor version not tested: the installed Ray (the one this module
    just ran against) is inside the range, and its next minor version is not."""
    import ray
    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (spec,) = [Requirement(d).specifier for d in project["dependencies"] if Requirement(d).name == "ray"]
    installed = Version(ray.__version__)
    assert installed in spec
    assert Version(f"{installed.major}.{installed.minor + 1}.0") not in spec


def test_outside_a_serve_request_there_is_no_request_id_and_no_serve_running(two_nodes):
    """Inside a replica serve_request_id names the request in Serve's logs (tests/test_serve_ray.py finds an error
    by it) and a running Serve's address is checked by cluster.serve's start; here, outside a request and with no
    Serve started on this cluster, both answer None rather than raise."""
    assert ray_internals.serve_request_id() is None
    assert ray_internals.running_serve_address() is None


def test_a_driver_that_joined_a_cluster_did_not_start_it(two_nodes):
    """cluster.serve's serve.ingress=auto picks HAProxy only on a Ray instance the command started: this driver
    joined cluster_utils' head, so it did not (the started case runs in tests/test_serve_haproxy.py)."""
    assert ray_internals.started_here() is False


def test_an_iteration_closed_early_leaves_only_the_parked_prefetcher_among_ray_datas_driver_threads(two_nodes):
    """cluster.segment, stopped mid-run, closes its Ray Data iterator and waits for the threads it started before
    ray.shutdown (a thread inside a Ray call then would end the process with exit 1): every one of them ends,
    except those named RAY_DATA_PARKED_THREADS; the prefetcher among them is there and stays parked."""
    import threading

    import ray.data

    before = set(threading.enumerate())
    ds = ray.data.range(64, override_num_blocks=16).map_batches(lambda batch: batch, batch_size=4)
    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    next(batches)
    started = set(threading.enumerate()) - before
    batches.close()
    parked = [t for t in started if t.name in ray_internals.RAY_DATA_PARKED_THREADS]
    assert _wait_for(lambda: all(not t.is_alive() for t in started if t not in parked)), \
        sorted(t.name for t in started if t.is_alive())
    prefetchers = [t for t in parked if t.name == "Prefetcher"]
    assert prefetchers and all(t.is_alive() for t in prefetchers), sorted(t.name for t in started)


def test_serve_reads_the_haproxy_ingress_settings_cluster_serve_gives_it():
    """The environment names cluster.serve sets for the HAProxy ingress are settings of the installed Serve, the
    config Serve renders binds the stats page and the metrics where cluster/haproxy_loopback.sh rewrites them
    (`bind *:PORT`, `bind :PORT`), Serve starts the binary as `BINARY -db -f CONFIG`, and the bundled binary runs."""
    import inspect
    import subprocess

    from ray.serve._private import constants, haproxy, haproxy_templates

    for name in [*ray_internals.HAPROXY_INGRESS_SWITCHES, ray_internals.HAPROXY_BINARY_ENV,
                 ray_internals.HAPROXY_STATS_PORT_ENV, ray_internals.HAPROXY_METRICS_PORT_ENV, ray_internals.DRAIN_ENV,
                 ray_internals.LOG_BUFFER_ENV]:
        assert hasattr(constants, name) and f'"{name}"' in inspect.getsource(constants), name
    template = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
    assert "bind *:{{ config.stats_port }}" in template and "bind :{{ config.metrics_port }}" in template
    assert 'args = [haproxy_bin, "-db", "-f", self.config_file_path]' in inspect.getsource(haproxy)
    version = subprocess.run([ray_internals.haproxy_binary(), "-v"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and "HAProxy" in version.stdout


@pytest.mark.parametrize("token, mode, expected", [(None, None, "False None"), ("a1b2c3", None, "True token"),
                                                   ("a1b2c3", "disabled", "False disabled")])
def test_a_driver_sends_this_machines_token_only_where_one_exists_and_the_mode_is_unset(tmp_path, token, mode,
                                                                                          expected):
    """cluster.ray_session joins a `ray start` head (which turns authentication on whenever a token exists) with
    send_this_machines_token: RAY_AUTH_MODE becomes token exactly when a token exists and the user set no mode
    (tests/test_ray_join.py joins such a head). A fresh interpreter: the call changes the process's Ray config."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token there
    env.update({"RAY_AUTH_TOKEN": token} if token else {}, **({"RAY_AUTH_MODE": mode} if mode else {}))
    done = subprocess.run([sys.executable, "-c", "import os; from cluster import ray_internals; "
                           "print(ray_internals.send_this_machines_token(), os.environ.get('RAY_AUTH_MODE'))"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == expected
    assert "Token authentication is enabled for this Ray cluster" not in done.stderr  # a head's warning, not ours
