"""`cntk solve` / `cntk paper` end to end on small stores, and the report helpers."""
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cntk_gram.pipeline import paper as paper_tables
from cntk_gram.pipeline import report
from cntk_gram.pipeline.config import build_config
from cntk_gram.pipeline.data import Inputs
from cntk_gram.pipeline.cli import paper, solve
from cntk_gram.pipeline.store import prepare_store
from cntk_gram.workers.preprocess import targets

# the paper's tables as published (a copy of the project's shared docs/paper-tables.md, kept in the repository)
PAPER_TABLES_MD = Path(__file__).resolve().parent / "data" / "paper-tables.md"
N_TRAIN, N_TEST, TILE = 40, 15, 10   # test rows 40..54: a ragged last tile of 5


def _gram(rng, labels, *, rank=None):
    """SPD (or rank-deficient) Gram with class signal, float32 as the store keeps it."""
    n = labels.size
    signal = np.eye(10)[labels] * 0.25
    noise = rng.standard_normal((n, rank or 3 * n))
    x = np.concatenate([signal, noise / np.sqrt(noise.shape[1])], axis=1) if rank is None else \
        np.concatenate([signal, noise], axis=1)[:, :rank]
    return (x @ x.T).astype(np.float32)


def make_store(tmp_path, rng, *, rank_deficient=(), missing=()):
    """A store in the pipeline's layout with synthetic Gram arrays for ntk-vanilla depths 3 and 6.

    Returns (store path, labels (N,), {(key, depth): float32 (N, N) matrix})."""
    n = N_TRAIN + N_TEST
    labels = np.concatenate([np.arange(N_TRAIN) % 10, rng.integers(0, 10, N_TEST)]).astype(np.int64)
    inputs = Inputs(images=rng.standard_normal((n, 32, 32, 3)).astype(np.float32), labels=labels,
                    index=np.arange(n, dtype=np.int64),
                    split=np.repeat(np.array([0, 1], np.int8), [N_TRAIN, N_TEST]),
                    mean=np.zeros(3), std=np.ones(3))
    config = build_config({"data": {"train": N_TRAIN, "test": N_TEST, "root": str(tmp_path)},
                           "kernel": {"archs": ["vanilla"], "kinds": ["ntk"], "depths": [3, 6]},
                           "tiles": {"size": TILE}, "store": str(tmp_path / "tiny.zarr")})
    store = tmp_path / "tiny.zarr"
    prepare_store(store, config=config, inputs=inputs)
    group = zarr.open_group(str(store), mode="r+")
    grams = {}
    for depth in (3, 6):
        k = _gram(rng, labels, rank=12 if depth in rank_deficient else None)
        grams[("ntk-vanilla", depth)] = k
        arr = group[f"gram/ntk-vanilla/depth-{depth}"]
        for i0 in range(0, n, TILE):
            for j0 in range(i0, n, TILE):
                if i0 >= N_TRAIN or (depth in missing and (i0, j0) == (0, 10)):
                    continue  # test x test is never written; a missing tile stays NaN
                arr[i0:i0 + TILE, j0:j0 + TILE] = k[i0:i0 + TILE, j0:j0 + TILE]
    return store, labels, grams


def reference_fit(k, labels, lam=0.0):
    """numpy.linalg.solve oracle: alpha (n_train, 10), test predictions."""
    k = k.astype(np.float64)
    ktr = k[:N_TRAIN, :N_TRAIN]
    alpha = np.linalg.solve(ktr + lam * np.mean(np.diag(ktr)) * np.eye(N_TRAIN), targets(labels[:N_TRAIN]))
    return alpha, (k[N_TRAIN:, :N_TRAIN] @ alpha).argmax(axis=1)


def test_cli_solve_end_to_end_on_a_store_with_ragged_tiles(tmp_path, rng):
    store, labels, grams = make_store(tmp_path, rng)
    before = {d: zarr.open_array(str(store), path=f"gram/ntk-vanilla/depth-{d}", mode="r")[:] for d in (3, 6)}
    out = tmp_path / "report"
    result = CliRunner().invoke(solve, [str(store), "--out", str(out), "--lambdas", "0,1e-3,1e-1",
                                        "--device", "cpu"])
    assert result.exit_code == 0, result.output
    # a tiny store follows none of the paper's protocols: every paper cell is n/a, no paper number printed
    assert "n/a" in result.output and not any(f"{v:.2f}" in result.output
                                              for c in paper_tables.COLUMNS for v in c.accuracy.values())
    summary = json.loads((out / "results.json").read_text())
    group = zarr.open_group(str(store), mode="r")
    for row in summary["rows"]:
        k = grams[(row["kernel"], row["depth"])]
        alpha, pred = reference_fit(k, labels)
        base = f"solve/{row['kernel']}/depth-{row['depth']}/ridgeless"
        assert np.linalg.norm(group[f"{base}/alpha"][:] - alpha) <= 1e-8 * np.linalg.norm(alpha)
        assert np.array_equal(group[f"{base}/predictions"][:], pred)
        assert row["ridgeless"]["accuracy"] == np.mean(pred == labels[N_TRAIN:])
        alpha_v, pred_v = reference_fit(k, labels, lam=row["validated"]["lambda"])
        assert np.array_equal(group[f"solve/{row['kernel']}/depth-{row['depth']}/validated/predictions"][:], pred_v)
        assert np.sum(row["ridgeless"]["confusion"]) == N_TEST
    for d in (3, 6):   # gram/ untouched
        after = zarr.open_array(str(store), path=f"gram/ntk-vanilla/depth-{d}", mode="r")[:]
        assert np.array_equal(before[d], after, equal_nan=True)
    for name in ("results.md", "accuracy_vs_depth.png", "confusion_best.png"):
        assert (out / name).stat().st_size > 0
    assert "| ntk-vanilla | 6 |" in (out / "results.md").read_text()


def test_default_report_directory_is_beside_the_store(tmp_path, rng):
    store, _, _ = make_store(tmp_path, rng)
    result = CliRunner().invoke(solve, [str(store), "--no-validation", "--depth", "3"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny-report" / "results.json").exists()


def test_not_positive_definite_and_incomplete_kernels_are_reported(tmp_path, rng):
    store, _, _ = make_store(tmp_path, rng, rank_deficient=(3,), missing=(6,))
    out = tmp_path / "r"
    result = CliRunner().invoke(solve, [str(store), "--out", str(out), "--lambdas", "0,1e-4,1e-1"])
    assert result.exit_code == 0, result.output
    rows = {r["depth"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert "not positive definite" in rows[3]["ridgeless"]["error"]
    assert rows[3]["ridgeless"]["smallest_working_lambda"] == 1e-4
    assert "smallest λ in the grid" in result.output and "incomplete" in result.output
    assert "not computed" in rows[6]["error"]


@pytest.mark.parametrize("args,words", [
    (["--lambdas", "0,abc"], "--lambdas"),
    (["--lambdas", "-1"], "--lambdas"),
    (["--memory-budget", "lots"], "--memory-budget"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--kernel", "ntk-gap"], "ntk-vanilla@3"),
    (["--depth", "6", "--depth", "11"], "--depth 11: not in"),
])
def test_bad_options_give_one_clear_error(tmp_path, rng, args, words):
    store, _, _ = make_store(tmp_path, rng)
    result = CliRunner().invoke(solve, [str(store), "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2 and words in result.output, result.output
    assert "Traceback" not in result.output
    assert "solve" not in zarr.open_group(str(store), mode="r")  # nothing written


def test_gpu_without_a_device_is_a_user_error(tmp_path, rng, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "cupy", None)    # as on a machine without CuPy
    store, _, _ = make_store(tmp_path, rng)
    result = CliRunner().invoke(solve, [str(store), "--device", "gpu", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--device gpu" in result.output, result.output


def test_missing_store_is_a_user_error(tmp_path):
    result = CliRunner().invoke(solve, [str(tmp_path / "nope.zarr")])
    assert result.exit_code == 2 and "no store" in result.output


def test_best_kernel_is_chosen_by_validation_not_test_accuracy():
    def row(depth, val_acc, test_acc):
        fit = {"lambda": 0.0, "accuracy": test_acc, "confusion": [[1]]}
        return {"kernel": "ntk-gap", "depth": depth, "ridgeless": fit, "validated": fit,
                "selection": {"val_accuracy": [{"lambda": 0.0, "accuracy": val_acc}]}}
    best, how = report.best_row([row(3, 0.9, 0.5), row(6, 0.6, 0.8)])
    assert (best["depth"], how) == (3, "validated")


def _paper_tables_md() -> dict[tuple[str, str], dict[int, float]]:
    """(table, column) -> {depth: value} parsed from the repository's copy of the paper's tables."""
    text = PAPER_TABLES_MD.read_text()
    parsed, table, names = {}, None, None
    for line in text.splitlines():
        if line.startswith("## Table"):
            table, names = " ".join(line.split()[1:3]).rstrip(":"), None
        elif line.startswith("| depth") and table:
            names = [cell.strip() for cell in line.strip("|").split("|")][1:]
        elif names and line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            for name, value in zip(names, cells[1:]):
                parsed.setdefault((table, name), {})[int(cells[0])] = float(value)
    return parsed


def test_paper_values_equal_the_published_tables():
    published = _paper_tables_md()
    assert len(published) >= 10     # the parser found both tables
    for column in paper_tables.COLUMNS:
        if column.source == paper_tables.SOURCE:      # the FC reference columns come from another publication
            assert column.accuracy == published[(column.table, column.column)], column.label


def test_paper_columns_apply_only_under_the_same_protocol():
    def labels(protocol):
        return {kernel: column.label for kernel, column in paper_tables.matching_columns(protocol).items()}
    assert labels(paper_tables.Protocol(n_train=2000, n_test=10000)) == {
        "ntk-vanilla": "Table 1 CNTK-V-2K", "ntk-gap": "Table 1 CNTK-GAP-2K"}
    assert labels(paper_tables.Protocol(n_train=50000, n_test=10000))["ntk-vanilla"] == "Table 1 CNTK-V"
    assert labels(paper_tables.Protocol(n_train=10000, n_test=2000, classes=(0, 1))) == {
        "ntk-vanilla": "Table 2 CNTK-V", "ntk-gap": "Table 2 CNTK-GAP",
        "rf-ntk-vanilla": "Table 2 RF from CNTK-V", "rf-ntk-gap": "Table 2 RF from CNTK-GAP"}
    for other in (paper_tables.Protocol(n_train=5000, n_test=2000), paper_tables.Protocol(n_train=2000, n_test=2000),
                  paper_tables.Protocol(n_train=50000, n_test=10000, first_images=False),
                  paper_tables.Protocol(n_train=10000, n_test=2000), None):
        assert labels(other) == {}
    config = {"data": {"train": 2000, "classes": None, "train_index": None, "test_index": None}}
    assert paper_tables.Protocol.from_config(config, n_train=2000, n_test=10000) == paper_tables.Protocol(2000, 10000)


def test_table_names_the_paper_column_and_prints_na_elsewhere():
    fit = {"lambda": 0.0, "accuracy": 0.5, "confusion": [[1]]}
    rows = [{"kernel": key, "depth": 6, "ridgeless": fit} for key in ("ntk-vanilla", "nngp-vanilla")]
    columns = paper_tables.matching_columns(paper_tables.Protocol(n_train=2000, n_test=10000))
    text = report.format_table(rows, {"ntk-vanilla": columns["ntk-vanilla"]})
    assert "paper Table 1 CNTK-V-2K (%)" in text.splitlines()[0]
    assert "43.43" in text and text.splitlines()[2].rstrip().endswith("n/a")   # the NNGP row
    text = report.format_table([{"kernel": "ntk-gap", "depth": 11, "error": "x"}],
                               paper_tables.matching_columns(paper_tables.Protocol(n_train=5000, n_test=2000)))
    assert "n/a" in text and "incomplete" in text and "77.43" not in text


def test_cli_paper_runs_kernel_solve_and_report_on_cifar(cifar_format_root, tmp_path):
    """`cntk paper` on 60 CIFAR-format images (the synthetic set): kernel (cntk_gram.pipeline.run.run) -> solve ->
    report."""
    import yaml

    from cntk_gram.pipeline.store import open_gram

    config = tmp_path / "table1.yaml"     # the name no longer matters: 40 train / 20 test follow no paper protocol
    store = tmp_path / "cifar60.zarr"
    config.write_text(yaml.safe_dump({
        "data": {"train": 40, "test": 20, "root": str(cifar_format_root)},
        "kernel": {"archs": ["vanilla"], "kinds": ["ntk"], "depths": [3, 6]},
        "tiles": {"size": 20}, "backend": "cpu", "store": str(store),
        "cluster": {"workers": 1, "threads": 1}}))
    out = tmp_path / "report"
    result = CliRunner().invoke(paper, [str(config), "--out", str(out), "--lambdas", "0,1e-3,1e-1"])
    assert result.exit_code == 0, result.output
    assert "66.03" not in result.output and "n/a" in result.output
    summary = json.loads((out / "results.json").read_text())
    assert summary["paper_reference"]["columns"] == []
    assert "n/a everywhere" in (out / "results.md").read_text()
    labels = zarr.open_group(str(store), mode="r")["inputs/labels"][:]
    for row in summary["rows"]:
        k = open_gram(store, row["kernel"], row["depth"])[:, :40].compute()   # (60, 40): all the fit uses
        _, pred = reference_fit(k, labels)
        assert row["ridgeless"]["accuracy"] == np.mean(pred == labels[40:])


# ---------------------------------------------------------------- --json, resume, old results.json files

def solve_json(args):
    """`cntk solve ARGS --json`: exit 0 and exactly one JSON object on stdout."""
    result = CliRunner().invoke(solve, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def _same_results(a: dict, b: dict) -> bool:
    """Rows equal but for when and how they were made."""
    def strip(row):
        return {k: v for k, v in row.items() if k not in ("solved_at", "solve_seconds", "reused")}
    return [strip(r) for r in a["rows"]] == [strip(r) for r in b["rows"]]


def test_solve_json_is_one_object_on_stdout_with_rows_and_paths(tmp_path, rng):
    store, labels, grams = make_store(tmp_path, rng)
    out = tmp_path / "report"
    doc, stderr = solve_json([store, "--out", out, "--lambdas", "0,1e-3,1e-1", "--device", "cpu"])
    assert set(doc) == {"store", "rows", "paths", "paper_columns"} and doc["paper_columns"] == {}
    assert doc["paths"]["json"] == str(out / "results.json") and Path(doc["paths"]["accuracy_plot"]).exists()
    assert [(r["kernel"], r["depth"]) for r in doc["rows"]] == [("ntk-vanilla", 3), ("ntk-vanilla", 6)]
    for row in doc["rows"]:
        _, pred = reference_fit(grams[(row["kernel"], row["depth"])], labels)
        assert row["ridgeless"]["accuracy"] == np.mean(pred == labels[N_TRAIN:])
        assert row["selection"]["scheme"] == "full" and row["selection"]["n_fit"] + row["selection"]["n_val"] == N_TRAIN
        assert row["options"] == {"lambdas": [0.0, 1e-3, 1e-1], "validate": True, "scheme": "full", "seed": 0,
                                  "val_fraction": 0.1}
        assert row["reused"] is False
    assert doc["rows"] == json.loads((out / "results.json").read_text())["rows"]
    assert "solving ntk-vanilla depth 3" in stderr          # progress on stderr


def test_solve_json_errors_stay_one_line_on_stderr(tmp_path, rng):
    store, _, _ = make_store(tmp_path, rng)
    result = CliRunner().invoke(solve, [str(store), "--json", "--lambdas", "x"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().startswith("Error: --lambdas") and len(result.stderr.strip().splitlines()) == 1


def test_an_interrupted_solve_resumes_without_solving_again_what_is_saved(tmp_path, rng, monkeypatch):
    from cntk_gram.pipeline import solve as solve_module

    store, _, _ = make_store(tmp_path, rng)
    clean = tmp_path / "clean.zarr"
    import shutil
    shutil.copytree(store, clean)
    reference, _ = solve_json([clean, "--out", tmp_path / "clean-report", "--validation", "subset",
                               "--val-fit", "25", "--val-size", "10"])
    assert {r["selection"]["scheme"] for r in reference["rows"]} == {"subset"}
    args = [store, "--out", tmp_path / "r", "--validation", "subset", "--val-fit", "25", "--val-size", "10"]

    solved = []
    original = solve_module.solve_kernel

    def second_kernel_dies(gram, **kw):
        solved.append(kw["label"])
        if len(solved) == 2:
            raise KeyboardInterrupt("killed while solving the second kernel")
        return original(gram, **kw)

    monkeypatch.setattr(solve_module, "solve_kernel", second_kernel_dies)
    result = CliRunner().invoke(solve, [str(a) for a in args])
    assert result.exit_code != 0 and solved == ["ntk-vanilla depth 3: ", "ntk-vanilla depth 6: "]
    group = zarr.open_group(str(store), mode="r")
    assert "kernel" in group["solve/ntk-vanilla/depth-3"].attrs and "solve/ntk-vanilla/depth-6" not in group

    solved.clear()
    monkeypatch.setattr(solve_module, "solve_kernel",
                        lambda gram, **kw: solved.append(kw["label"]) or original(gram, **kw))
    doc, stderr = solve_json(args)
    assert solved == ["ntk-vanilla depth 6: "]               # depth 3 came from the store
    assert [r["reused"] for r in doc["rows"]] == [True, False]
    assert "ntk-vanilla depth 3: solved before with the same options, reused" in stderr
    assert _same_results(doc, reference)
    for d in (3, 6):
        for name in ("ridgeless/alpha", "validated/predictions"):
            a = zarr.open_array(str(store), path=f"solve/ntk-vanilla/depth-{d}/{name}", mode="r")[:]
            b = zarr.open_array(str(clean), path=f"solve/ntk-vanilla/depth-{d}/{name}", mode="r")[:]
            assert np.array_equal(a, b)

    solved.clear()                                           # other options: solved again
    doc, _ = solve_json([*args[:-1], "20", "--depth", "3"])
    assert solved == ["ntk-vanilla depth 3: "] and doc["rows"][0]["selection"]["n_val"] == 20
    solved.clear()                                           # --force: everything again
    doc, _ = solve_json([*args, "--force"])
    assert solved == ["ntk-vanilla depth 3: ", "ntk-vanilla depth 6: "] and _same_results(doc, reference)


OLD_RESULTS = {   # a results.json written before the λ = 0 setting was renamed from 'paper' to 'ridgeless'
    "title": "old", "paper_reference": {"source": "x", "protocol": None, "columns": []},
    "rows": [{"kernel": "ntk-vanilla", "depth": 3, "n_train": 40, "n_test": 15,
              "paper": {"lambda": 0.0, "accuracy": 0.4, "confusion": [[1]]},
              "validated": {"lambda": 0.001, "accuracy": 0.5, "confusion": [[1]]},
              "selection": {"lambda": 0.001, "val_accuracy": [{"lambda": 0.0, "accuracy": 0.3},
                                                              {"lambda": 0.001, "accuracy": 0.6}],
                            "n_fit": 36, "n_val": 4, "seed": 0, "val_fraction": 0.1}},
             {"kernel": "rf-ntk-vanilla", "depth": 3, "n_train": 40, "n_test": 15, "draw": 0,
              "paper": {"lambda": 0.0, "accuracy": 0.35, "confusion": [[1]]}}],
    "rf_summary": [{"kernel": "rf-ntk-vanilla", "depth": 3, "draws": 1, "draws_failed": 0,
                    "paper": {"median": 0.35, "min": 0.35, "max": 0.35}, "validated": None,
                    "val_accuracy": None, "lambdas": []}],
    "best": {"kernel": "ntk-vanilla", "depth": 3, "setting": "paper", "chosen_by": "test accuracy"},
}


def test_old_results_json_files_are_read_with_the_new_key(tmp_path):
    from cntk_gram.pipeline.results import SolveRow, read_results

    (tmp_path / "results.json").write_text(json.dumps(OLD_RESULTS))
    doc = read_results(tmp_path)
    assert [r["ridgeless"]["accuracy"] for r in doc["rows"]] == [0.4, 0.35]
    assert not any("paper" in r for r in doc["rows"])
    assert doc["rf_summary"][0]["ridgeless"]["median"] == 0.35 and doc["best"]["setting"] == "ridgeless"
    assert doc["paper_reference"] == OLD_RESULTS["paper_reference"]       # the published paper's part is kept
    row = SolveRow.from_dict(OLD_RESULTS["rows"][0])
    assert (row.ridgeless.accuracy, row.validated.lam, row.selection.scheme) == (0.4, 0.001, "full")
    # the report functions take old row dicts, new ones and SolveRow objects alike
    assert report.format_table(OLD_RESULTS["rows"]) == report.format_table(doc["rows"]) == \
        report.format_table([SolveRow.from_dict(r) for r in OLD_RESULTS["rows"]])
    assert "40.00" in report.format_table(OLD_RESULTS["rows"])
    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu-5000"
    if (committed / "results.json").exists():      # a report committed before the rename
        assert all("ridgeless" in r for r in read_results(committed)["rows"] if "error" not in r)


def test_a_row_cut_short_by_a_kill_is_solved_again(tmp_path, rng, monkeypatch):
    from cntk_gram.pipeline import solve as solve_module
    from cntk_gram.pipeline.ridge import SolveOptions

    store, _, _ = make_store(tmp_path, rng)
    options = SolveOptions(lambdas=(0.0, 1e-3), validate=False)
    first = solve_module.solve_store(store, options)
    meta = store / "solve" / "ntk-vanilla" / "depth-3" / "zarr.json"
    meta.write_text(meta.read_text()[:40])                  # the attributes' write was cut off
    solved = []
    original = solve_module.solve_kernel
    monkeypatch.setattr(solve_module, "solve_kernel",
                        lambda gram, **kw: solved.append(kw["label"]) or original(gram, **kw))
    again = solve_module.solve_store(store, options)
    assert solved == ["ntk-vanilla depth 3: "] and [r.reused for r in again] == [False, True]
    assert [r.ridgeless for r in again] == [r.ridgeless for r in first]
