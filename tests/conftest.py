import os

import pytest
import torch

# No project package is imported here: a test imports what it uses (a package registers its config sections when
# imported), so each test file holds alone, as each command runs alone.

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
