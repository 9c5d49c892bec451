"""Bad input of every kind (config, data, store, cluster): one clear `Error:` line naming the problem, a
non-zero exit, no traceback, and the already-computed store untouched (every file byte for byte)."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cntk_gram.pipeline.cli import main

from cluster_procs import cntk, finished_store, free_port, store_snapshot


@pytest.fixture(scope="module")
def computed(tmp_path_factory, cifar_format_root):
    """A finished store (40 + 20 images, tiles of 20) and its config."""
    return finished_store(tmp_path_factory.mktemp("computed"), cifar_format_root)


def variant(tmp_path: Path, config: Path, **changes) -> Path:
    """A copy of `config` with dotted-path changes ({'kernel.archs': [...]}; None deletes)."""
    raw = yaml.safe_load(config.read_text())
    for dotted, value in changes.items():
        section, _, name = dotted.partition(".")
        target, key = (raw.setdefault(section, {}), name) if name else (raw, section)
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    path = tmp_path / f"variant-{len(list(tmp_path.glob('variant-*')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def modified_cifar(tmp_path: Path, cifar_format_root: Path, *, damage: str) -> Path:
    """A CIFAR-format directory like cifar_format_root except data_batch_1: truncated, or one pixel changed."""
    root = tmp_path / "cifar-copy"
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for source in (cifar_format_root / "cifar-10-batches-py").iterdir():
        (batches / source.name).symlink_to(source)
    first = batches / "data_batch_1"
    first.unlink()
    raw = (cifar_format_root / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    if damage == "truncated":
        first.write_bytes(raw[: len(raw) // 2])
    else:
        batch = pickle.loads(raw, encoding="bytes")
        batch[b"data"][0, 0] ^= 0xFF
        first.write_bytes(pickle.dumps(batch))
    return root


def cases(tmp_path: Path, store: Path, config: Path, cifar_format_root: Path) -> dict[str, tuple[list, list[str]]]:
    """name -> (cntk arguments, words the error line must contain)."""
    dead = f"tcp://127.0.0.1:{free_port()}"
    not_a_store = tmp_path / "photos"
    not_a_store.mkdir()
    (not_a_store / "cat.jpg").write_bytes(b"\xff\xd8")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data: {train: [1, 2\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    def truncated_cifar_config():
        other = modified_cifar(tmp_path, cifar_format_root, damage="truncated")
        return variant(tmp_path, config, **{"data.root": str(other)})

    return {
        # config
        "config file missing": (["run", tmp_path / "nope.yaml"], ["config file not found", "nope.yaml"]),
        "config not YAML": (["run", bad_yaml], ["not valid YAML"]),
        "unknown config key": (["run", variant(tmp_path, config, kernal={"archs": ["gap"]})],
                               ["unknown key 'kernal'", "kernel"]),
        "unknown arch": (["run", config, "--archs", "resnet"], ["kernel.archs", "'resnet'", "vanilla, gap, fc"]),
        "tile size does not divide": (["run", config, "--store", tmp_path / "new.zarr", "--tile-size", "7"],
                                      ["tiles.size=7", "40", "8, 10"]),
        "unknown backend": (["run", variant(tmp_path, config, backend="tpu")], ["backend", "'tpu'", "auto, cpu, gpu"]),
        "depth too small": (["run", config, "--depths", "1"], ["kernel.depths", "[2, 200]"]),
        "no workers": (["run", config, "--workers", "0"], ["cluster.workers", ">= 1"]),
        # data
        "no CIFAR-10 and no download": (["run", variant(tmp_path, config, **{"data.root": str(empty)})],
                                        ["no CIFAR-10 under", "data.download is false"]),
        "more images than CIFAR-10 has": (["run", config, "--train", "60000"], ["data.train", "[1, 50000]"]),
        "class out of range": (["run", variant(tmp_path, config, **{"data.classes": [3, 12]})],
                               ["data.classes", "[0, 9]"]),
        "truncated CIFAR-10 batch": (["run", truncated_cifar_config], ["cannot read CIFAR-10 batch", "data_batch_1"]),
        # store
        "store from another config": (["run", config, "--depths", "4"], ["different config", "kernel.depths"]),
        "store path is not a store": (["run", config, "--store", not_a_store], ["not a cntk-gram store"]),
        "store path not writable": (["run", config, "--store", a_file / "g.zarr"], ["cannot create store"]),
        "status of a missing store": (["status", tmp_path / "missing.zarr"], ["no store at", "missing.zarr"]),
        "export of a kernel not in the store": (["export", store, "--kernel", "ntk-gap", "--depth", "3", "--out",
                                                 tmp_path / "k.npy"], ["no gram/ntk-gap/depth-3", "ntk-vanilla"]),
        "cancel of a path that is no store": (["cancel", tmp_path / "missing.zarr"], ["no store at"]),
        # cluster
        "run on an unreachable scheduler": (["run", config, "--store", tmp_path / "new.zarr", "--scheduler", dead],
                                            ["cannot reach", dead]),
        "submit on an unreachable scheduler": (["submit", config, "--scheduler", dead], ["cannot reach", dead]),
        "submit without a cluster": (["submit", config], ["no cluster given", "--scheduler"]),
        "submit with a missing scheduler file": (["submit", config, "--scheduler-file", tmp_path / "s.json"],
                                                 ["scheduler file", "does not exist"]),
        "submit with two cluster addresses": (["submit", config, "--scheduler", dead, "--scheduler-file",
                                               a_file], ["either --scheduler or --scheduler-file"]),
        "submit with a malformed address": (["submit", config, "--scheduler", "carrier-pigeon://coop:1"],
                                            ["cannot reach", "carrier-pigeon://coop:1"]),
    }


CASE_NAMES = [
    "config file missing", "config not YAML", "unknown config key", "unknown arch", "tile size does not divide",
    "unknown backend", "depth too small", "no workers", "no CIFAR-10 and no download",
    "more images than CIFAR-10 has", "class out of range", "truncated CIFAR-10 batch", "store from another config",
    "store path is not a store", "store path not writable", "status of a missing store",
    "export of a kernel not in the store", "cancel of a path that is no store", "run on an unreachable scheduler",
    "submit on an unreachable scheduler", "submit without a cluster", "submit with a missing scheduler file",
    "submit with two cluster addresses", "submit with a malformed address",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_gets_one_clear_error(tmp_path, computed, cifar_format_root, name):
    store, config = computed
    before = store_snapshot(store)
    args, words = cases(tmp_path, store, config, cifar_format_root)[name]
    result = CliRunner().invoke(main, [str(a() if callable(a) else a) for a in args])
    assert result.exit_code != 0, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert store_snapshot(store) == before, "the computed store changed"


def test_store_made_from_other_data_is_refused(tmp_path, computed, cifar_format_root):
    """Same config, but the CIFAR-10 files under data.root differ in one pixel of an image the store holds."""
    store, config = computed
    before = store_snapshot(store)
    other = modified_cifar(tmp_path, cifar_format_root, damage="pixel")
    result = cntk("run", variant(tmp_path, config, **{"data.root": str(other)}))
    assert result.returncode != 0
    assert result.stdout.startswith("Error: ") and "different data" in result.stdout, result.stdout
    assert "Traceback" not in result.stdout and len(result.stdout.strip().splitlines()) == 1
    assert store_snapshot(store) == before


def test_errors_in_a_real_process_have_no_traceback(tmp_path, computed):
    """The installed entry point path: exit status 2 and one line on stderr."""
    store, config = computed
    result = cntk("submit", config, "--scheduler", f"tcp://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert result.stdout.startswith("Error: cannot reach the Dask scheduler") and "Traceback" not in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1
