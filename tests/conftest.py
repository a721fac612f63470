from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="torch.meshgrid")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
