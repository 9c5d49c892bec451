"""Shared fixtures: a CIFAR-10 directory rebuilt from ../shared/data (never committed)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_BUILDER = REPO.parent / "shared" / "data" / "build_cifar10.py"


def _has_cifar(root: Path) -> bool:
    return (root / "cifar-10-batches-py" / "test_batch").exists()


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """Directory holding cifar-10-batches-py/: $CNTK_CIFAR_ROOT, else rebuilt from ../shared/data."""
    env = os.environ.get("CNTK_CIFAR_ROOT")
    if env and _has_cifar(Path(env)):
        return Path(env)
    if not SHARED_BUILDER.exists():
        pytest.fail(f"no CIFAR-10: set CNTK_CIFAR_ROOT or provide {SHARED_BUILDER}")
    root = tmp_path_factory.mktemp("cifar")
    subprocess.run([sys.executable, str(SHARED_BUILDER), str(root)], check=True,
                   stdout=subprocess.DEVNULL)
    return root


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
