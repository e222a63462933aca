import os
import sys

import pytest
import torch

_EXIT_STATUS = pytest.StashKey[int]()

# No project package is imported here: a test imports what it uses (a package registers its config sections when
# imported), so each test file holds alone, as each command runs alone.

# Two cores are shared by torch, Ray workers and pytest; keep each process from oversubscribing.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Ray Train's controller takes one report per worker per poll, every 2 s by default: a tiny test run reports
# several times in a few seconds and then waits ~6 s for the controller to catch up before it ends (29 s ->
# 23 s for one `cluster.train` run of tests/test_train_interrupt.py). Polling every 0.5 s changes only that pace
# (Ray passes the variable to its controller; commands a test starts inherit it). A test may still set its own.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture
def tiny_model_config():
    from deeplab.config import ModelConfig

    return ModelConfig(backbone="resnet_tiny", num_classes=5, aspp_channels=16)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster and immune to a busy machine's OpenMP contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave the test process with pytest's own status, skipping the interpreter's teardown. This process hosts
    Ray clusters, torch, onnxruntime and OpenVINO at once; a fresh-clone run once crashed (SIGSEGV) in that
    teardown after every test had passed and the summary was printed, turning a green run into `make` error 2.
    Every fixture has stopped what it started by now (clusters, servers, namespaces); the commands themselves
    run in their own interpreters, whose exit codes the tests check."""
    if _EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[_EXIT_STATUS])
