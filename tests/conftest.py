"""Shared fixtures. `cifar_root`: a directory holding CIFAR-10's python batches (never committed), from the
first of these that has them:

1. $CNTK_CIFAR_ROOT;
2. a copy rebuilt from ../shared/data/build_cifar10.py (into a session temp dir), when that builder exists
   ($CNTK_TEST_SHARED_BUILDER names another builder; an empty value means none);
3. the package's own default data path, ./data of the repository, downloaded there as `cntk run` does.

When none works (offline, no data) every test that asks for `cifar_root` is skipped with one reason saying
why and what to do; the data-free tests run as usual.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUILDER = REPO.parent / "shared" / "data" / "build_cifar10.py"
DEFAULT_DATA = REPO / "data"  # the config's default data.root, taken from the repository root


def _has_cifar(root: Path) -> bool:
    return (root / "cifar-10-batches-py" / "test_batch").exists()


def shared_builder() -> Path | None:
    """The builder script of ../shared/data, or the one $CNTK_TEST_SHARED_BUILDER names ('' = none)."""
    named = os.environ.get("CNTK_TEST_SHARED_BUILDER")
    path = DEFAULT_BUILDER if named is None else Path(named) if named else None
    return path if path is not None and path.is_file() else None


def find_cifar(*, env_root: str | None, builder: Path | None, build_dir, default_root: Path) -> Path:
    """The first source in the module docstring's order that yields the batches; `build_dir()` makes the
    directory for a rebuilt copy. Raises pytest's Skipped with the reason when no source does."""
    from cntk_gram.pipeline.data import load_cifar10
    from cntk_gram.pipeline.errors import UserError

    if env_root and _has_cifar(Path(env_root)):
        return Path(env_root)
    if builder is not None:
        root = build_dir()
        subprocess.run([sys.executable, str(builder), str(root)], check=True, stdout=subprocess.DEVNULL)
        return root
    try:
        load_cifar10(root=default_root, download=True)  # no-op read when present, else the official download
    except UserError as exc:
        unset = "is unset" if not env_root else f"={env_root} holds no cifar-10-batches-py"
        pytest.skip(f"CIFAR-10 not available: CNTK_CIFAR_ROOT {unset}, no ../shared/data builder, and "
                    f"./data failed ({exc}); set CNTK_CIFAR_ROOT or allow the download into ./data")
    return default_root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """Directory holding cifar-10-batches-py/ (see the module docstring); skips its tests when there is none.
    Session-scoped: the search (and a skip) happens once, and every test that needs data gets its outcome."""
    return find_cifar(env_root=os.environ.get("CNTK_CIFAR_ROOT"), builder=shared_builder(),
                      build_dir=lambda: tmp_path_factory.mktemp("cifar"), default_root=DEFAULT_DATA)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
