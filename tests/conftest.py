import os

import pytest
import torch

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
