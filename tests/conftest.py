import os

import pytest
import torch

# Every package's config sections, registered as each package's entry points register them (on import), so a
# test's experiment holds the same sections whichever test ran first. A process importing deeplab alone is
# tested in a subprocess (tests/test_layering.py, tests/test_config.py).
import cluster  # noqa: F401,E402  (cluster, segment, serve)
import export  # noqa: F401,E402  (export)
import tuning  # noqa: F401,E402  (tune)

# Two cores are shared by torch, Ray workers and pytest; keep each process from oversubscribing.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
