"""Where the test suite finds CIFAR-10 (tests/conftest.py): its order of sources, the download into the
package's default data path, and one clear skip reason when there is no data at all. Data-free: fake batches."""
import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

import cntk_gram.pipeline.data
from conftest import find_cifar

BATCHES = [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]


def fake_batches(root: Path) -> Path:
    """cifar-10-batches-py/ with two random images per batch under root."""
    rng = np.random.default_rng(0)
    (root / "cifar-10-batches-py").mkdir(parents=True)
    for name in BATCHES:
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [0, 1]}
        (root / "cifar-10-batches-py" / name).write_bytes(pickle.dumps(batch))
    return root


def unused(*_):
    raise AssertionError("this source should not have been tried")


def test_environment_first(tmp_path):
    env_root = fake_batches(tmp_path / "env")
    assert find_cifar(env_root=str(env_root), builder=Path("/no/builder.py"), build_dir=unused,
                      default_root=tmp_path / "data") == env_root


def test_shared_builder_when_the_environment_has_no_data(tmp_path):
    builder = tmp_path / "build_cifar10.py"
    builder.write_text("import pathlib, sys\n"
                       "d = pathlib.Path(sys.argv[1]) / 'cifar-10-batches-py'\n"
                       "d.mkdir()\n(d / 'test_batch').write_bytes(b'x')\n")
    built = tmp_path / "built"
    built.mkdir()
    root = find_cifar(env_root=str(tmp_path / "empty"), builder=builder, build_dir=lambda: built,
                      default_root=tmp_path / "data")
    assert root == built and (built / "cifar-10-batches-py" / "test_batch").exists()


def test_default_data_path_is_downloaded_like_cntk_run(tmp_path, monkeypatch):
    """No environment, no builder: the official archive (here a local stand-in) is fetched into ./data."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(fake_batches(tmp_path / "src") / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(cntk_gram.pipeline.data, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(cntk_gram.pipeline.data, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    default_root = tmp_path / "repo" / "data"
    assert find_cifar(env_root=None, builder=None, build_dir=unused, default_root=default_root) == default_root
    assert all((default_root / "cifar-10-batches-py" / name).exists() for name in BATCHES)


def test_no_data_anywhere_skips_with_one_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(cntk_gram.pipeline.data, "CIFAR10_URL", (tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(pytest.skip.Exception) as skipped:
        find_cifar(env_root=None, builder=None, build_dir=unused, default_root=tmp_path / "data")
    reason = str(skipped.value)
    assert reason.startswith("CIFAR-10 not available: CNTK_CIFAR_ROOT is unset")
    assert "download" in reason and "set CNTK_CIFAR_ROOT or allow the download into ./data" in reason
    assert "\n" not in reason
