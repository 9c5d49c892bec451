"""Config loading: the issue's YAML shape, validation messages, overrides, resume comparison."""
import pytest

from cntk_gram.pipeline.config import build_config, config_differences, load_config, parse_bytes, to_dict
from cntk_gram.pipeline.errors import UserError

ISSUE_YAML = """
data:    {source: cifar10, root: /some/dir, train: 2000, test: 2000}
kernel:  {archs: [vanilla, gap], kinds: [ntk, nngp], depths: [3, 4, 6, 11, 21]}
tiles:   {size: 500}
backend: auto
store:   runs/quickstart.zarr
"""


def test_issue_yaml_loads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(ISSUE_YAML)
    config = load_config(path)
    assert (config.data.train, config.data.test, config.data.root) == (2000, 2000, "/some/dir")
    assert config.kernel.archs == ("vanilla", "gap")
    assert config.kernel.keys == ("ntk-vanilla", "nngp-vanilla", "ntk-gap", "nngp-gap")
    assert config.kernel.depths == (3, 4, 6, 11, 21)
    assert config.tiles.size == 500 and config.backend == "auto"
    assert config.store == "runs/quickstart.zarr"
    assert config.data.test_test is False and config.cluster.workers == 1


def test_config_is_frozen():
    config = build_config({})
    with pytest.raises(AttributeError):
        config.backend = "gpu"


def test_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(ISSUE_YAML)
    config = load_config(path, {"data.train": 100, "tiles.size": 50, "store": "elsewhere.zarr",
                                "kernel.depths": [4, 3, 4], "cluster.scheduler": "tcp://x:1", "data.test": None})
    assert (config.data.train, config.data.test, config.tiles.size) == (100, 2000, 50)
    assert config.store == "elsewhere.zarr" and config.cluster.scheduler == "tcp://x:1"
    assert config.kernel.depths == (3, 4)


@pytest.mark.parametrize("raw, words", [
    ({"kernel": {"archs": ["vanilla", "resnet"]}}, ["kernel.archs", "'resnet'", "vanilla, gap, fc"]),
    ({"kernel": {"kinds": ["ntk", "rbf"]}}, ["kernel.kinds", "'rbf'", "ntk, nngp"]),
    ({"kernel": {"depths": [1, 3]}}, ["kernel.depths", "[2, 200]", "1"]),
    ({"backend": "tpu"}, ["backend", "auto, cpu, gpu"]),
    ({"tiles": {"size": 0}}, ["tiles.size"]),
    ({"data": {"train": "many"}}, ["data.train", "integer"]),
    ({"data": {"classes": [0, 10]}}, ["data.classes", "[0, 9]"]),
    ({"data": {"source": "mnist"}}, ["data.source", "cifar10"]),
    ({"data": {"trian": 5}}, ["'trian'", "train"]),
    ({"kernels": {}}, ["'kernels'", "kernel"]),
    ({"data": {"train_index": [1, 2], "classes": [0]}}, ["train_index", "classes"]),
    ({"data": {"train_index": [1, 2], "train": 3}}, ["data.train=3", "2 entries"]),
    ({"cluster": {"scheduler": "tcp://a:1", "scheduler_file": "f"}}, ["scheduler_file"]),
    ({"cluster": {"slots": 0}}, ["cluster.slots", ">= 1", "0"]),
    ({"cluster": {"slots": "two"}}, ["cluster.slots", "integer", "'two'"]),
    ({"cluster": {"slots": 1.5}}, ["cluster.slots", "integer"]),
])
def test_bad_values_name_field_and_allowed(raw, words):
    with pytest.raises(UserError) as info:
        build_config(raw)
    message = info.value.message
    assert "\n" not in message
    for word in words:
        assert word in message


def test_slots_default_to_the_backend_and_accept_any_positive_count():
    assert build_config({}).cluster.slots is None  # the cluster picks: 3 per GPU worker, 1 per CPU worker
    assert build_config({"cluster": {"slots": 3}}).cluster.slots == 3
    assert build_config({}, {"cluster.slots": 2}).cluster.slots == 2  # as `cntk run --slots 2` passes it


def test_bad_yaml_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_root_defaults_to_environment(monkeypatch):
    monkeypatch.setenv("CNTK_CIFAR_ROOT", "/from/env")
    assert build_config({}).data.root == "/from/env"
    assert build_config({"data": {"root": "given"}}).data.root == "given"


def test_differences_ignore_non_result_fields():
    a = build_config({"data": {"train": 10}, "kernel": {"depths": [3]}})
    b = build_config({"data": {"train": 10, "root": "x"}, "kernel": {"depths": [3]}, "store": "s.zarr",
                      "backend": "cpu", "cluster": {"workers": 2, "slots": 2}})
    assert config_differences(to_dict(a), to_dict(b)) == []
    c = build_config({"data": {"train": 10}, "kernel": {"depths": [3, 4]}})
    (difference,) = config_differences(to_dict(a), to_dict(c))
    assert difference.startswith("kernel.depths") and "[3]" in difference and "[3, 4]" in difference


@pytest.mark.parametrize("value, amount", [
    ("12GiB", 12 * 2**30), ("12 GB", 12 * 10**9), ("800MiB", 800 * 2**20), ("4MiB", 4 * 2**20), ("500MB", 500 * 10**6),
    ("1.5GiB", 3 * 2**29), (" 2 gib ", 2 * 2**30), ("12gb", 12 * 10**9), ("1048576", 2**20), (2**20, 2**20),
    (3 * 2**30, 3 * 2**30), (1.5e9, 1_500_000_000), ("2097152B", 2 * 2**20)])
def test_byte_sizes_read_by_dask_parse_bytes(value, amount):
    assert parse_bytes("--memory-budget", value) == amount


@pytest.mark.parametrize("value, message", [
    ("lots", "cannot read 'lots'"), ("", "cannot read ''"), ("GiB", "cannot read 'GiB'"), ("12 GiBs", "cannot read"),
    (True, "cannot read True"), (None, "cannot read None"), ([1], "cannot read"), ("1e400", "cannot read"),
    ("1KiB", "must be at least 1MiB"), (1000, "must be at least 1MiB"), ("-4MiB", "must be at least 1MiB")])
def test_unreadable_or_small_byte_sizes_name_the_option(value, message):
    with pytest.raises(UserError, match=f"^--memory-budget: {message}"):
        parse_bytes("--memory-budget", value)
