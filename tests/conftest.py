"""Shared fixtures and the suite's data policy.

Two data fixtures:

- `cifar_format_root`: a synthetic CIFAR-10 directory built in the test session (tests/_images.py: random pixels
  and balanced labels in the official python-batch layout, a few hundred images). Always there, no network: for
  every test that needs CIFAR-format data but not the real images.
- `cifar_root`: the real CIFAR-10 python batches, only for tests whose verdict needs real images. The first of
  these that has them:
  1. $CNTK_CIFAR_ROOT;
  2. a copy rebuilt from ../shared/data/build_cifar10.py (into a session temp dir), when that builder exists
     ($CNTK_TEST_SHARED_BUILDER names another builder; an empty value means none);
  3. the package's default data path, ./data of the repository, when it holds the batches; downloaded there as
     `cntk run` does only when CNTK_TEST_DOWNLOAD=1 (never by default: no test waits on the network).

  When none has them every test that asks for `cifar_root` is skipped with one reason saying what to set; under
  CNTK_REQUIRE=data (.ci/run sets it) that is a failure instead, so CI cannot pass by skipping the data tests.

The SLURM tests (tests/test_slurm.py, marker `slurm`) skip with one reason where a local SLURM cannot start;
CNTK_REQUIRE=slurm (.ci/run sets CNTK_REQUIRE=data,slurm) makes that a failure too.

Small stores that several modules check (reference_store, lap_store, zca_store, rf_store; tests/small_stores.py) are
computed once per session on the synthetic set.

The repository root is appended to sys.path (after the installed packages), so tests import the `benchmarks`
package the way `python -m benchmarks.gpu_campaign` does, whichever directory pytest is started from.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import small_stores
from _images import write_cifar_batches

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUILDER = REPO.parent / "shared" / "data" / "build_cifar10.py"
DEFAULT_DATA = REPO / "data"  # the config's default data.root, taken from the repository root
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))


def _has_cifar(root: Path) -> bool:
    return (root / "cifar-10-batches-py" / "test_batch").exists()


def shared_builder() -> Path | None:
    """The builder script of ../shared/data, or the one $CNTK_TEST_SHARED_BUILDER names ('' = none)."""
    named = os.environ.get("CNTK_TEST_SHARED_BUILDER")
    path = DEFAULT_BUILDER if named is None else Path(named) if named else None
    return path if path is not None and path.is_file() else None


def required() -> set[str]:
    """What $CNTK_REQUIRE (comma separated) says must not be skipped: {"data"} makes missing real data a failure,
    {"slurm"} a local SLURM that cannot start (tests/test_slurm.py)."""
    return {word.strip() for word in os.environ.get("CNTK_REQUIRE", "").split(",") if word.strip()}


def download_allowed() -> bool:
    """CNTK_TEST_DOWNLOAD=1 lets `cifar_root` download the official archive into ./data; anything else forbids it."""
    return os.environ.get("CNTK_TEST_DOWNLOAD", "").strip() == "1"


def find_cifar(*, env_root: str | None, builder: Path | None, build_dir, default_root: Path,
               download: bool = False, require: bool = False) -> Path:
    """The first source in the module docstring's order that yields the batches; `build_dir()` makes the
    directory for a rebuilt copy. When no source does: pytest's Skipped with one reason, or with `require`
    pytest's Failed with the same reason."""
    from cntk_gram.pipeline.data import load_cifar10
    from cntk_gram.pipeline.errors import UserError

    if env_root and _has_cifar(Path(env_root)):
        return Path(env_root)
    if builder is not None:
        root = build_dir()
        subprocess.run([sys.executable, str(builder), str(root)], check=True, stdout=subprocess.DEVNULL)
        return root
    if _has_cifar(default_root):
        return default_root
    failed = "holds no cifar-10-batches-py (set CNTK_TEST_DOWNLOAD=1 to download it there)"
    if download:
        try:
            load_cifar10(root=default_root, download=True)
            return default_root
        except UserError as exc:
            failed = f"failed to download ({exc})"
    unset = "is unset" if not env_root else f"={env_root} holds no cifar-10-batches-py"
    reason = (f"real CIFAR-10 not available: CNTK_CIFAR_ROOT {unset}, no ../shared/data builder, and ./data "
              f"{failed}; set CNTK_CIFAR_ROOT to a directory holding cifar-10-batches-py")
    if require:
        pytest.fail(f"{reason} (CNTK_REQUIRE=data: a test that needs real data may not be skipped)",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def prediction_cache(tmp_path_factory) -> Path:
    """Every run's time prediction (pipeline.predict) caches its probes here, not in the user's cache directory;
    subprocesses inherit it."""
    path = tmp_path_factory.mktemp("cntk-cache")
    os.environ["CNTK_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """Directory holding the real cifar-10-batches-py/ (see the module docstring); skips its tests when there is
    none, or fails them under CNTK_REQUIRE=data. Session-scoped: the search happens once, and every test that needs
    real data gets its outcome."""
    return find_cifar(env_root=os.environ.get("CNTK_CIFAR_ROOT"), builder=shared_builder(),
                      build_dir=lambda: tmp_path_factory.mktemp("cifar"), default_root=DEFAULT_DATA,
                      download=download_allowed(), require="data" in required())


@pytest.fixture(scope="session")
def cifar_format_root(tmp_path_factory) -> Path:
    """Directory holding a synthetic cifar-10-batches-py/ (tests/_images.py, write_cifar_batches): the official
    format with SYNTHETIC_TRAIN training and SYNTHETIC_TEST test images of random pixels. Never skips."""
    return write_cifar_batches(tmp_path_factory.mktemp("cifar-format"))


# Small computed stores (tests/small_stores.py), each computed once per session on the synthetic CIFAR-format set.

@pytest.fixture(scope="session")
def reference_store(cifar_format_root, tmp_path_factory) -> Path:
    """An uninterrupted in-process run of small_stores.PIPELINE on the embedded local cluster (33 tiles)."""
    store = tmp_path_factory.mktemp("ref") / "ref.zarr"
    assert small_stores.compute(small_stores.PIPELINE, cifar_format_root, store).tiles_total == 33
    return store


@pytest.fixture(scope="session")
def lap_store(cifar_format_root, tmp_path_factory) -> Path:
    """small_stores.LAP_FLIP computed: GAP with LAP(0), LAP(2) and flip (5 tiles)."""
    store = tmp_path_factory.mktemp("enhanced") / "lap.zarr"
    summary = small_stores.compute(small_stores.LAP_FLIP, cifar_format_root, store)
    assert summary.tiles_total == 5 and summary.kernels == small_stores.LAP_KEYS
    return store


@pytest.fixture(scope="session")
def zca_store(cifar_format_root, tmp_path_factory) -> Path:
    """small_stores.ZCA computed: ZCA-whitened images, the fc kernel."""
    store = tmp_path_factory.mktemp("enhanced") / "zca.zarr"
    small_stores.compute(small_stores.ZCA, cifar_format_root, store)
    return store


@pytest.fixture(scope="session")
def rf_store(cifar_format_root, tmp_path_factory) -> Path:
    """small_stores.RF_SMALL computed: exact and random-features kernels on CIFAR-2 (7 tiles); needs PyTorch."""
    pytest.importorskip("torch", reason="random features need PyTorch (pip install -e .[rf])")
    store = tmp_path_factory.mktemp("rf") / "rf.zarr"
    assert small_stores.compute(small_stores.RF_SMALL, cifar_format_root, store).tiles_total == 7
    return store


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
