import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("real Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (the README's test command does)")
    return FASHION
