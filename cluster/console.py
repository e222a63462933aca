"""The console of a training run: the project's lines for a person to read; Ray's own lines in its logs.

Ray forwards everything its processes print to the driver's terminal: Ray Train's INFO lines (process groups,
devices, every report), Ray Core's C++ log lines, other Ray actors' output (placement-group cleaners,
preemption watchers) and the same worker traceback from several processes. By default the console keeps what
the training workers print (progress, evaluations, warnings) and the controller's warnings; a failure is
reported by the driver in one line. Every forwarded line also goes to ``RUN_DIR/logs/console.log``, Ray
Train's own log files are copied to ``RUN_DIR/logs/ray_train/``, and ``--verbose`` shows everything.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from typing import Optional

from cluster import ray_internals

PROJECT_PROCESSES = ("RayTrainWorker", "TrainController")  # the training function and its controller
_RAY_CORE_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z] \d+ \d+\] ")  # C++ glog format
_TRACEBACK_START = ("Traceback (most recent call last)", "Error in training function", "Error in control loop")
_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b")


def _warnings_and_up(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def quiet_worker_console() -> None:
    """In a training worker: the root logger's console output from WARNING up. Ray Train logs some worker INFO
    lines ("Reporting training result") through a logger its LoggingConfig does not reach; its log files keep
    them."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and _warnings_and_up not in handler.filters:
            handler.addFilter(_warnings_and_up)


def quiet_ray_data(verbose: bool) -> None:
    """On a Ray Data driver: Ray Data's INFO lines (each execution plan, "execution finished") and its note that
    progress bars are off (the command prints its own progress line) go to its log file only (ray-data.log in
    the session's logs folder); warnings and errors still reach the console. ``verbose``: everything."""
    import ray.data  # noqa: F401  (configures the ray.data logger)

    if verbose:
        return
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            if _not_the_progress_bar_note not in handler.filters:
                handler.addFilter(_not_the_progress_bar_note)


def _not_the_progress_bar_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Progress bars disabled")


_TUNE_ADVICE = ("Experiment has been interrupted", "Trials did not complete")  # Tuner.restore(...); the trial list


def _not_tune_advice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_TUNE_ADVICE)


def quiet_tune(verbose: bool) -> None:
    """On a Tune driver: no configuration box (RAY_AIR_NEW_OUTPUT=0 selects Tune's older reporter, silent at
    verbose=0), and neither the list of unfinished trials nor the advice to resume with ``Tuner.restore(...)``
    after a stop (the project's answer is to run the same command again; its own lines say which trials
    ended how). ``verbose``: Tune prints as it always does."""
    if verbose:
        return
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    tune_logger = logging.getLogger("ray.tune.tune")
    if _not_tune_advice not in tune_logger.filters:
        tune_logger.addFilter(_not_tune_advice)


def ray_init_options(verbose: bool) -> dict:
    """ray.init options for the console: Ray's own INFO lines only with --verbose."""
    return {"logging_level": logging.INFO if verbose else logging.WARNING}


# Lines Ray prints on the driver's console that a user can neither act on nor should worry about (--verbose
# shows them). Serve's controller ends itself inside graceful_shutdown, so every `serve.shutdown()` makes the
# raylet report "(raylet) Task ServeController.graceful_shutdown failed ... retried". Ray Data's actor pool passes
# its map function by object reference to actors it restarts, and the driver's core worker logs an E line on its
# own stderr for every such actor ("core_worker.cc: Actor with class name ... has constructor arguments in the
# object store and max_restarts > 0"); segment's outputs do not depend on it (a replaced actor is tested).
SERVE_SHUTDOWN_NOISE = re.compile(r"Task ServeController\.graceful_shutdown failed")
ACTOR_ARGUMENTS_NOISE = re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the "
                                   r"object store and max_restarts > 0")


def quiet_ray_reports(noise: re.Pattern, verbose: bool) -> None:
    """The errors Ray reports to this driver (printed as ``(raylet) ...``) without the lines ``noise`` matches,
    unless ``verbose``. Ray prints them through its printing hook (cluster.ray_internals.ray_printer) from its
    error-listener thread; where that private function is gone, Ray prints as it always did."""
    show = ray_internals.ray_printer()
    if show is None or verbose or getattr(show, "noise", None) is noise:
        return

    def print_to_stdstream(data, ignore_prefix: bool):
        lines = [line for line in data.get("lines", []) if not noise.search(line)]
        if lines:
            show({**data, "lines": lines}, ignore_prefix)

    print_to_stdstream.noise = noise
    ray_internals.set_ray_printer(print_to_stdstream)


_STDERR_FILTER = """import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: forward to the end
signal.signal(signal.SIGTERM, signal.SIG_IGN)
noise = re.compile(sys.argv[1].encode())
for line in sys.stdin.buffer:
    if not noise.search(line):
        sys.stderr.buffer.write(line)
        sys.stderr.buffer.flush()
"""


@contextmanager
def quiet_stderr(noise: re.Pattern, verbose: bool):
    """Inside the block, the lines ``noise`` matches are left out of this process's stderr (file descriptor 2:
    also what C++ libraries write there, such as Ray's core worker), unless ``verbose``. A small filter process
    forwards the rest as it comes, so a line written just before a crash still arrives; on the way out stderr is
    this process's own again and the filter has forwarded everything."""

    if verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    forward = subprocess.Popen([sys.executable, "-I", "-S", "-c", _STDERR_FILTER, noise.pattern],
                               stdin=subprocess.PIPE, stderr=saved)
    os.dup2(forward.stdin.fileno(), 2)
    forward.stdin.close()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        try:
            forward.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a child of ours still holds the pipe: it forwards until that ends
            pass


class ConsoleFilter:
    """Which forwarded lines the default console shows. Tracebacks are left out (the driver states the failure
    in one line; the traceback is in console.log), so the filter remembers, per process, that it is inside
    one: they arrive split over several batches."""

    def __init__(self, processes: tuple = PROJECT_PROCESSES):
        self.processes, self._in_traceback = processes, set()

    def keep(self, batch: dict, line: str) -> bool:
        if (batch.get("actor_name") or "") not in self.processes or _RAY_CORE_LINE.match(line) or not line.strip():
            return False
        pid = batch.get("pid")
        if line.startswith(_TRACEBACK_START):
            self._in_traceback.add(pid)
            return False
        if pid in self._in_traceback:
            if line[:1].isspace():
                return False
            self._in_traceback.discard(pid)
            return not _EXCEPTION_LINE.match(line)  # the traceback's last line, else a new message
        return True


class _Console:
    """The handler that replaces Ray's printing of forwarded lines for the rest of the process (late lines
    of a failed run arrive after fit() returns); ``log`` is the run's console.log while a run is on."""

    def __init__(self, show, verbose: bool, processes: tuple = PROJECT_PROCESSES):
        self.show, self.verbose, self.filter, self.log = show, verbose, ConsoleFilter(processes), None
        self.lock = threading.Lock()  # Ray's logger thread writes while the driver opens and closes the log

    def open_log(self, path: Optional[str]) -> None:
        with self.lock:
            if self.log:
                self.log.close()
            self.log = open(path, "a") if path else None

    def __call__(self, batch: dict) -> None:
        lines = batch.get("lines", [])
        with self.lock:
            if self.log:
                name = batch.get("actor_name") or batch.get("task_name") or ""
                self.log.writelines(f"({name} pid={batch.get('pid')}) {line}\n" for line in lines)
                self.log.flush()
        if self.verbose:
            self.show(batch, ignore_prefix=False)
            return
        kept = [line for line in lines if self.filter.keep(batch, line)]
        if kept:
            self.show({**batch, "lines": kept}, ignore_prefix=True)


def _install(verbose: bool, processes: tuple) -> Optional[_Console]:
    """Our handler in place of Ray's ``ray_print_logs`` (None where Ray forwards nothing or has moved the
    private dispatcher: then Ray prints as it always did); ``processes``: whose lines the console shows."""
    handlers = ray_internals.forwarded_line_handlers()
    if handlers is None:
        return None
    if "deeplab_console" in handlers:
        console = handlers["deeplab_console"]
        console.verbose, console.filter = verbose, ConsoleFilter(processes)
        return console
    if "ray_print_logs" not in handlers:  # ray.init(log_to_driver=False)
        return None
    console = _Console(ray_internals.ray_printer(), verbose, processes)
    ray_internals.replace_forwarded_line_handler("ray_print_logs", "deeplab_console", console)
    return console


def _copy_ray_train_logs(log_dir: str) -> None:
    """Ray Train's own log files (every level) from this machine's session folder into the run dir."""
    session = ray_internals.session_dir()
    source = os.path.join(session, "logs", "train") if session else None
    if source and os.path.isdir(source):
        shutil.copytree(source, os.path.join(log_dir, "ray_train"), dirs_exist_ok=True)


@contextmanager
def project_console(log_dir: Optional[str], verbose: bool = False, processes: tuple = PROJECT_PROCESSES):
    """Inside the block, forwarded lines are filtered for the console (all shown with ``verbose``) and logged
    to ``log_dir/console.log``; on the way out Ray Train's log files are copied to ``log_dir/ray_train``.
    ``processes``: the Ray actors whose lines the console shows (none: the driver's own lines only)."""
    console = _install(verbose, processes)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    if console:
        console.open_log(os.path.join(log_dir, "console.log") if log_dir else None)
    try:
        yield
    finally:
        if console:
            console.open_log(None)
        if log_dir:
            _copy_ray_train_logs(log_dir)
