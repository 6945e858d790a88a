import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HYDRANETS_SHARED", REPO.parent / "shared"))
TINY_IMAGENET = SHARED / "data" / "tiny-imagenet-32.tar.gz"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One CPU thread, as train.threads=1 sets for training: evaluation does not oversubscribe a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_imagenet_archive() -> Path:
    if not TINY_IMAGENET.exists():
        pytest.skip(f"needs {TINY_IMAGENET} (the shared data folder beside the clone)")
    return TINY_IMAGENET
