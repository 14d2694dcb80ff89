import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whatever ran before it, so that no draw inside a
    test (its own, or the library's: weight initialisation, example inputs) depends on test order.
    Tests that depend on particular values still seed where they draw.  Draws made at import or
    collection time, and in module- or session-scoped fixtures, run before this: they must use their
    own ``torch.Generator`` or seed themselves."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("real Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (the README's test command does)")
    return FASHION


@pytest.fixture(scope="session")
def benchmark_script():
    """Load a script of benchmarks/ as a module: ``benchmark_script("compare")``."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
