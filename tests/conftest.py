from __future__ import annotations

import os
import shutil
import socket
import warnings
from pathlib import Path

import ignite.distributed as idist
import pytest
import torch
import torch.distributed as dist

from monai_mae.data import preprocess_dataset, write_synthetic_dataset

warnings.filterwarnings("ignore", message="torch.meshgrid")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def single_process_group(monkeypatch):
    """The environment torchrun gives one process, so the multi-GPU configs' own ``init_process_group`` runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    idist.sync()  # Ignite caches the distributed context it last saw: back to serial for the tests that follow


@pytest.fixture
def cxx_compiler():
    """``torch.compile`` (inductor) builds C++ kernels on the CPU: a machine without a compiler fails, naming why."""
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        pytest.fail("torch.compile (inductor) needs a C++ compiler on the CPU (g++, c++ or $CXX); install one.")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Three CT phantoms 24 x 24 x 16 with labels: phantom_000 and phantom_001 training, phantom_002 validation."""
    root = tmp_path_factory.mktemp("phantoms")
    write_synthetic_dataset(root, num=3, num_validation=1, shape=(24, 24, 16), num_organs=2)
    return root


@pytest.fixture(scope="module")
def preprocessed(phantoms, tmp_path_factory) -> Path:
    """``phantoms`` preprocessed with the CT preset, labels kept (read-only for the tests using it)."""
    out = tmp_path_factory.mktemp("pre") / "ct"
    preprocess_dataset(phantoms, out, "ct", workers=1)
    return out
