"""Bad input through the CLI: one clear line, non-zero exit, nothing computed is touched; --json output."""
import dataclasses
import json
import socket

import pytest
import yaml
from click.testing import CliRunner

import cntk_gram.pipeline.data
from cntk_gram.pipeline.cli import main
from cntk_gram.pipeline.config import build_config
from cntk_gram.pipeline.data import prepare_inputs
from cntk_gram.pipeline.run import RunSummary
from cntk_gram.pipeline.store import prepare_store

TINY = {"data": {"train": 20, "test": 0}, "kernel": {"archs": ["vanilla"], "depths": [2]},
        "tiles": {"size": 20}, "backend": "cpu", "cluster": {"threads": 1}}


def config_file(tmp_path, *, root, store=None, **changes):
    raw = {**TINY, **changes}
    raw["data"] = {**raw["data"], "root": str(root)}
    raw["store"] = str(store or tmp_path / "g.zarr")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def fails_with_one_line(args, *needles, exit_code=None):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code not in (0, 1) and not isinstance(result.exception, (KeyError, TypeError)), \
        (result.exit_code, result.output, result.exception)
    assert exit_code is None or result.exit_code == exit_code, (result.exit_code, result.output)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_data(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(cntk_gram.pipeline.data, "CIFAR10_URL", (tmp_path / "nowhere.tar.gz").as_uri())
    fails_with_one_line(["run", config_file(tmp_path, root=empty)], "no CIFAR-10 at", "download")
    no_download = {**TINY["data"], "download": False}
    fails_with_one_line(["run", config_file(tmp_path, root=empty, data=no_download)], "data.download")
    assert not (tmp_path / "g.zarr").exists()


def test_bad_tile_size(tmp_path, cifar_format_root):
    fails_with_one_line(["run", config_file(tmp_path, root=cifar_format_root), "--tile-size", "7"],
                        "tiles.size=7", "divide", "20", "valid sizes near it: ")
    assert not (tmp_path / "g.zarr").exists()


def test_bad_slots(tmp_path, cifar_format_root):
    fails_with_one_line(["run", config_file(tmp_path, root=cifar_format_root), "--slots", "0"], "cluster.slots", ">= 1")
    assert not (tmp_path / "g.zarr").exists()


def test_unknown_kernel(tmp_path, cifar_format_root):
    fails_with_one_line(["run", config_file(tmp_path, root=cifar_format_root), "--archs", "vanilla,resnet"],
                        "kernel.archs", "'resnet'", "vanilla, gap, fc")
    fails_with_one_line(["run", config_file(tmp_path, root=cifar_format_root), "--kinds", "rbf"], "kernel.kinds")


def test_bad_yaml_and_missing_config(tmp_path):
    (tmp_path / "bad.yaml").write_text("kernel: [archs: \n")
    fails_with_one_line(["run", tmp_path / "bad.yaml"], "not valid YAML")
    fails_with_one_line(["run", tmp_path / "none.yaml"], "not found")


def test_store_from_another_config_is_refused(tmp_path, cifar_format_root):
    store = tmp_path / "g.zarr"
    config = build_config({**TINY, "data": {**TINY["data"], "root": str(cifar_format_root)}, "store": str(store)})
    prepare_store(store, config=config, inputs=prepare_inputs(config.data))
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    fails_with_one_line(["run", config_file(tmp_path, root=cifar_format_root), "--depths", "2,3"],
                        "different config", "kernel.depths", "[2]", "[2, 3]")
    fails_with_one_line(["run", config_file(tmp_path, root=cifar_format_root), "--train", "10", "--tile-size", "10"],
                        "data.train", "tiles.size")
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


def test_unreachable_scheduler(tmp_path, cifar_format_root):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    # the verdict is the message and the exit status; how long the product waits to connect is its setting
    fails_with_one_line(["run", config_file(tmp_path, root=cifar_format_root), "--scheduler",
                         f"tcp://127.0.0.1:{port}"],
                        "cannot reach the Dask scheduler", f"tcp://127.0.0.1:{port}", exit_code=2)
    fails_with_one_line(["run", config_file(tmp_path, root=cifar_format_root), "--scheduler-file",
                         tmp_path / "missing.json"], "scheduler file")


def test_unwritable_store_path(tmp_path, cifar_format_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    fails_with_one_line(["run", config_file(tmp_path, root=cifar_format_root, store=blocker / "g.zarr")],
                        "cannot create store", str(blocker / "g.zarr"))
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("command", [["status"], ["inspect"], ["verify"],
                                     ["export", "--kernel", "ntk-vanilla", "--depth", "2", "--out", "x.npy"]])
def test_read_commands_on_missing_store(tmp_path, command):
    fails_with_one_line([command[0], tmp_path / "nothing.zarr", *command[1:]], "no store at")


def test_export_unknown_kernel(tmp_path, cifar_format_root):
    store = tmp_path / "g.zarr"
    config = build_config({**TINY, "data": {**TINY["data"], "root": str(cifar_format_root)}, "store": str(store)})
    prepare_store(store, config=config, inputs=prepare_inputs(config.data))
    fails_with_one_line(["export", store, "--kernel", "ntk-gap", "--depth", "2", "--out", tmp_path / "x.npy"],
                        "no gram/ntk-gap/depth-2", "ntk-vanilla")


def invoke_json(args):
    """A --json command: exit 0 and exactly one JSON object on stdout (progress and messages on stderr)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def test_run_status_and_paper_print_one_json_object(tmp_path, cifar_root):
    store = tmp_path / "g.zarr"
    config = config_file(tmp_path, root=cifar_root, data={"train": 20, "test": 10}, tiles={"size": 10})
    summary, stderr = invoke_json(["run", config, "--json"])     # with the progress bar: it goes to stderr
    assert summary == {**summary, "store": str(store), "backend": "cpu", "kernels": ["ntk-vanilla", "nngp-vanilla"],
                       "depths": [2], "n_train": 20, "n_test": 10, "tile": 10, "tiles_total": 5,
                       "tiles_done_before": 0, "tiles_damaged": 0, "tiles_computed": 5,
                       "pairs_computed": 20 * 21 // 2 + 20 * 10}
    assert set(summary) == {f.name for f in dataclasses.fields(RunSummary)} and summary["wall_seconds"] > 0
    assert "pair" in stderr                                     # tqdm's bar

    status, _ = invoke_json(["status", store, "--json"])
    assert (status["tiles_done"], status["tiles_total"]) == (5, 5) and status["pairs_done"] == status["pairs_total"]
    assert status["per_array"]["gram/ntk-vanilla/depth-2"] == {"done": 5, "total": 5}
    assert status["store"] == str(store) and status["pairs_per_second"] > 0 and status["last_finished"] > 0

    doc, _ = invoke_json(["paper", config, "--json", "--no-validation", "--out", tmp_path / "report"])
    assert doc["run"]["tiles_computed"] == 0 and doc["run"]["tiles_done_before"] == 5
    assert [(r["kernel"], r["depth"]) for r in doc["rows"]] == [("nngp-vanilla", 2), ("ntk-vanilla", 2)]
    assert all(0 <= r["ridgeless"]["accuracy"] <= 1 for r in doc["rows"])
    assert json.loads((tmp_path / "report" / "results.json").read_text())["kernel_run"] == doc["run"]

    other = tmp_path / "other.zarr"      # --store as in `cntk run`: the config's store is left alone
    doc, _ = invoke_json(["paper", config, "--store", other, "--json", "--no-validation", "--out", tmp_path / "r2"])
    assert doc["store"] == doc["run"]["store"] == str(other) and doc["run"]["tiles_computed"] == 5


def test_json_commands_keep_the_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["status", str(tmp_path / "nothing.zarr"), "--json"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("Error: no store at") and len(result.stderr.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["run", str(tmp_path / "none.yaml"), "--json"])
    assert result.exit_code == 2 and result.stdout == "" and result.stderr.startswith("Error: ")
