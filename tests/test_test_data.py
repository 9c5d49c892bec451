"""The suite's data policy (tests/conftest.py): where `cifar_root` finds real CIFAR-10, that it never downloads
unless asked, one clear skip reason when there is no data, a failure instead under CNTK_REQUIRE=data, and the
synthetic CIFAR-format set that `cifar_format_root` builds. Data-free: fake batches."""
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import cntk_gram.pipeline.data
from _images import SYNTHETIC_TEST, SYNTHETIC_TRAIN, write_cifar_batches
from conftest import find_cifar

TESTS = Path(__file__).resolve().parent
BATCHES = [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]


def fake_batches(root: Path) -> Path:
    """cifar-10-batches-py/ with 2 random images per batch under root."""
    return write_cifar_batches(root, per_batch=2, test=2)


def unused(*_):
    raise AssertionError("this source should not have been tried")


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails the test at once."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_environment_first(tmp_path, no_network):
    env_root = fake_batches(tmp_path / "env")
    assert find_cifar(env_root=str(env_root), builder=Path("/no/builder.py"), build_dir=unused,
                      default_root=tmp_path / "data") == env_root


def test_shared_builder_when_the_environment_has_no_data(tmp_path, no_network):
    builder = tmp_path / "build_cifar10.py"
    builder.write_text("import pathlib, sys\n"
                       "d = pathlib.Path(sys.argv[1]) / 'cifar-10-batches-py'\n"
                       "d.mkdir()\n(d / 'test_batch').write_bytes(b'x')\n")
    built = tmp_path / "built"
    built.mkdir()
    root = find_cifar(env_root=str(tmp_path / "empty"), builder=builder, build_dir=lambda: built,
                      default_root=tmp_path / "data")
    assert root == built and (built / "cifar-10-batches-py" / "test_batch").exists()


def test_default_data_path_is_read_when_it_holds_the_batches(tmp_path, no_network):
    default_root = fake_batches(tmp_path / "repo" / "data")
    assert find_cifar(env_root=None, builder=None, build_dir=unused, default_root=default_root) == default_root


def test_default_data_path_is_downloaded_only_when_allowed(tmp_path, monkeypatch):
    """No environment, no builder, download allowed (CNTK_TEST_DOWNLOAD=1): the official archive (here a local
    stand-in) is fetched into ./data as `cntk run` does."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(fake_batches(tmp_path / "src") / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(cntk_gram.pipeline.data, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(cntk_gram.pipeline.data, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    default_root = tmp_path / "repo" / "data"
    assert find_cifar(env_root=None, builder=None, build_dir=unused, default_root=default_root,
                      download=True) == default_root
    assert all((default_root / "cifar-10-batches-py" / name).exists() for name in BATCHES)


def test_no_data_anywhere_skips_with_one_reason_and_no_download(tmp_path, no_network):
    with pytest.raises(pytest.skip.Exception) as skipped:
        find_cifar(env_root=None, builder=None, build_dir=unused, default_root=tmp_path / "data")
    reason = str(skipped.value)
    assert reason.startswith("real CIFAR-10 not available: CNTK_CIFAR_ROOT is unset")
    assert "CNTK_TEST_DOWNLOAD=1" in reason and "set CNTK_CIFAR_ROOT" in reason and "\n" not in reason
    assert not (tmp_path / "data").exists()


def test_no_data_fails_when_data_is_required(tmp_path, no_network):
    with pytest.raises(pytest.fail.Exception) as failed:
        find_cifar(env_root=str(tmp_path / "empty"), builder=None, build_dir=unused,
                   default_root=tmp_path / "data", require=True)
    assert "CNTK_REQUIRE=data" in str(failed.value) and "holds no cifar-10-batches-py" in str(failed.value)


def test_failed_download_is_named_in_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(cntk_gram.pipeline.data, "CIFAR10_URL", (tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(pytest.skip.Exception) as skipped:
        find_cifar(env_root=None, builder=None, build_dir=unused, default_root=tmp_path / "data", download=True)
    assert "./data failed to download" in str(skipped.value)


def test_synthetic_set_loads_like_the_official_batches(cifar_format_root):
    raw = cntk_gram.pipeline.data.load_cifar10(root=cifar_format_root, download=False)
    assert raw["train_images"].shape == (SYNTHETIC_TRAIN, 32, 32, 3) and raw["train_images"].dtype == np.uint8
    assert raw["test_images"].shape == (SYNTHETIC_TEST, 32, 32, 3)
    for split, n in (("train", SYNTHETIC_TRAIN), ("test", SYNTHETIC_TEST)):
        assert np.bincount(raw[f"{split}_labels"], minlength=10).tolist() == [n // 10] * 10
    names = sorted(p.name for p in (cifar_format_root / "cifar-10-batches-py").iterdir())
    assert names == sorted(BATCHES + ["batches.meta"])


def _pytest_without_data(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """pytest over a two-test file beside a copy of this suite's conftest, in a tree without ./data or
    ../shared, with no CIFAR-10 in the environment and no builder; `env` adds variables."""
    tests = tmp_path / "tree" / "tests"
    tests.mkdir(parents=True)
    for name in ("conftest.py", "_images.py", "small_stores.py"):
        shutil.copyfile(TESTS / name, tests / name)
    (tests / "test_tiny.py").write_text("def test_real(cifar_root):\n    pass\n\n\n"
                                        "def test_format(cifar_format_root):\n    pass\n")
    (tmp_path / "tree" / "pytest.ini").write_text("[pytest]\n")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("CNTK_CIFAR_ROOT", "CNTK_REQUIRE", "CNTK_TEST_DOWNLOAD", "PYTEST_ADDOPTS")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
                          cwd=tmp_path / "tree", env={**clean, "CNTK_TEST_SHARED_BUILDER": "", **env},
                          capture_output=True, text=True)


def test_require_data_turns_the_missing_data_skip_into_a_failure(tmp_path):
    skipped = _pytest_without_data(tmp_path / "a")
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "1 passed, 1 skipped" in skipped.stdout and "real CIFAR-10 not available" in skipped.stdout
    required = _pytest_without_data(tmp_path / "b", CNTK_REQUIRE="data")
    assert required.returncode == 1, required.stdout + required.stderr
    assert "1 passed, 1 error" in required.stdout and "CNTK_REQUIRE=data" in required.stdout


def test_ci_requires_the_data():
    script = (TESTS.parent / ".ci" / "run").read_text()
    assert "export CNTK_REQUIRE=data" in script
    assert script.index("export CNTK_REQUIRE=data") < script.index("python -m pytest")
