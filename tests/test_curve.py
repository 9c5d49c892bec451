"""The learning curve (`cntk solve --train-sizes`, pipeline.curve): the prefix solves against numpy's dense float64
solve of each leading block, a curve point of a larger store against a store of just those images, resume, bad
sizes, the power law and the report."""
import json
import shutil

import dask.array as da
import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from cntk_gram.pipeline import curve, linalg, report
from cntk_gram.pipeline.cli import solve
from cntk_gram.pipeline.paper import DATA_NOTE, Protocol
from cntk_gram.pipeline.ridge import SolveOptions
from cntk_gram.workers.preprocess import targets


def spd(rng, n):
    x = rng.standard_normal((n, n + 5))
    return x @ x.T / x.shape[1]


def dense_point(k, labels, n_train, n):
    """numpy oracle of the point of the first n training images: alpha (n, C_n), scores (n_test, C_n), accuracy;
    k (N, N) float64, rows train (n_train) then test."""
    y = targets(labels[:n], n_classes=int(labels[:n].max()) + 1)
    alpha = np.linalg.solve(k[:n, :n], y)
    scores = k[n_train:, :n] @ alpha
    return alpha, scores, float(np.mean(scores.argmax(axis=1) == labels[n_train:]))


def rel_err(x, ref):
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


# ---------------------------------------------------------------- the prefix solves

@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), chunk=st.integers(1, 12), panel=st.integers(1, 15), seed=st.integers(0, 2**16),
       data=st.data())
def test_prefix_solves_equal_a_dense_solve_of_every_leading_block(n, chunk, panel, seed, data):
    """Sizes that cut through tiles and panels alike."""
    rng = np.random.default_rng(seed)
    k, b = spd(rng, n), rng.standard_normal((n, 3))
    sizes = data.draw(st.lists(st.integers(1, n), min_size=1, max_size=5, unique=True))
    factor = linalg.cholesky_blocked(da.from_array(k, chunks=min(chunk, n)), panel_width=panel)
    try:
        solved = linalg.prefix_solves(factor, b, sizes)
    finally:
        factor.close()
    assert sorted(solved) == sorted(sizes)
    for s in sizes:
        assert rel_err(solved[s], np.linalg.solve(k[:s, :s], b[:s])) <= 1e-8, s


def test_prefix_solves_read_out_of_core_panels(rng, tmp_path):
    n = 40
    k, b = spd(rng, n), rng.standard_normal((n, 4))
    factor = linalg.cholesky_blocked(da.from_array(k, chunks=8), memory_budget=4 * 8 * n * 8, scratch_dir=tmp_path)
    assert len(factor.bounds) == 5 and isinstance(factor.panels[0], np.memmap)   # 8-column panels on disk
    solved = linalg.prefix_solves(factor, b, [5, 8, 21, 40])
    factor.close()
    for s, x in solved.items():
        assert rel_err(x, np.linalg.solve(k[:s, :s], b[:s])) <= 1e-8
    assert rel_err(solved[40], linalg.cho_solve_blocked(
        linalg.cholesky_blocked(da.from_array(k, chunks=8)), b)) <= 1e-12
    with pytest.raises(ValueError):
        factor = linalg.cholesky_blocked(da.from_array(k, chunks=8))
        linalg.prefix_solves(factor, b, [41])


def _labelled(rng, n_train, n_test, *, classes=4):
    """A Gram matrix with class signal (rows train then test) and labels whose first 6 training images miss the
    last class (so a small prefix has fewer classes, as a store of those images would)."""
    n = n_train + n_test
    labels = rng.integers(0, classes, size=n)
    labels[:6] = rng.integers(0, classes - 1, size=6)
    x = np.concatenate([np.eye(classes)[labels] * 2.0 + rng.standard_normal((n, classes)),
                        0.4 * rng.standard_normal((n, 3 * n))], axis=1)
    return x @ x.T, labels


@pytest.mark.parametrize("budget", [None, 4 * 10 * 70 * 8])   # in core; 10-column panels in scratch files
def test_ridgeless_points_equal_numpy_for_every_size(rng, tmp_path, budget):
    n_train, n_test = 70, 25
    k, labels = _labelled(rng, n_train, n_test)
    options = SolveOptions(scratch_dir=tmp_path) if budget is None else \
        SolveOptions(memory_budget=budget, scratch_dir=tmp_path)
    sizes = [6, 13, 40, 70]
    fits = curve.ridgeless_points(da.from_array(k, chunks=10), labels=labels, n_train=n_train, sizes=sizes,
                                  options=options)
    assert sorted(fits) == sizes and list(tmp_path.iterdir()) == []
    assert fits[6].alpha.shape[1] == int(labels[:6].max()) + 1 < fits[70].alpha.shape[1]
    for n in sizes:
        alpha, scores, accuracy = dense_point(k, labels, n_train, n)
        assert rel_err(fits[n].alpha, alpha) <= 1e-8 and rel_err(fits[n].scores, scores) <= 1e-8
        assert np.array_equal(fits[n].predictions, scores.argmax(axis=1)) and fits[n].accuracy == accuracy


def test_a_block_not_positive_definite_from_row_r_fails_only_the_sizes_above_r(rng, monkeypatch):
    n_train, n_test, r = 40, 10, 25
    k = spd(rng, n_train + n_test)
    k[r, :] = k[r - 1, :]                      # row and column r repeat r - 1 ...
    k[:, r] = k[:, r - 1]
    k[r, r] = k[r - 1, r - 1] - 1e-3           # ... with a smaller diagonal: the first r rows are PD, r + 1 are not
    labels = rng.integers(0, 3, size=n_train + n_test)
    with pytest.raises(linalg.NotPositiveDefinite) as info:
        linalg.cholesky_blocked(da.from_array(k, chunks=7))
    assert info.value.row == r
    factored = []
    original = curve.cholesky_blocked

    def spy(a, **kw):
        factored.append(a.shape[0])
        return original(a, **kw)

    monkeypatch.setattr(curve, "cholesky_blocked", spy)
    fits = curve.ridgeless_points(da.from_array(k, chunks=7), labels=labels, n_train=n_train, sizes=[10, r, 30, 40],
                                  options=SolveOptions(panel_width=9))
    assert factored == [40, r]                   # the largest size, then the largest one below the failing row
    for n in (30, 40):
        assert not fits[n].ok and f"failed at row {r} of {n}" in fits[n].error
    for n in (10, r):
        assert rel_err(fits[n].alpha, dense_point(k, labels, n_train, n)[0]) <= 1e-8


# ---------------------------------------------------------------- on stores

def solve_json(args, *, code=0):
    result = CliRunner().invoke(solve, [*map(str, args), "--json", "--device", "cpu"])
    assert result.exit_code == code, result.output
    return (json.loads(result.stdout) if code == 0 else None), result.stderr


def sub_store(big, path, n):
    """A store of the first n training images and all test images of `big`: the same images (as `big` stored them)
    and the same Gram entries, written tile by tile like a run."""
    from cntk_gram.pipeline.config import build_config
    from cntk_gram.pipeline.data import Inputs
    from cntk_gram.pipeline.store import layout, prepare_store, store_attrs

    info, attrs, group = layout(big), store_attrs(big), zarr.open_group(str(big), mode="r")
    n_train, tile = info["n_train"], info["tile"]
    keep = np.r_[0:n, n_train:n_train + info["n_test"]]
    inputs = Inputs(images=group["inputs/images"][:][keep], labels=group["inputs/labels"][:][keep],
                    index=group["inputs/index"][:][keep], split=group["inputs/split"][:][keep],
                    mean=np.array(attrs["preprocessing"]["mean"]), std=np.array(attrs["preprocessing"]["std"]))
    config = dict(attrs["config"], store=str(path))
    config["data"] = dict(config["data"], train=n)
    prepare_store(path, config=build_config(config), inputs=inputs)
    small = zarr.open_group(str(path), mode="r+")
    for name in info["arrays"]:
        whole = group[name][:][np.ix_(keep, keep)]
        for i0 in range(0, n, tile):
            for j0 in range(i0, keep.size, tile):
                small[name][i0:i0 + tile, j0:j0 + tile] = whole[i0:i0 + tile, j0:j0 + tile]
    return path


def _strip(row):
    return {k: v for k, v in row.items() if k not in ("solved_at", "solve_seconds", "reused")}


def test_a_curve_point_equals_the_solve_of_a_store_of_those_images(reference_store, tmp_path):
    """reference_store: 120 training + 40 test images of the synthetic set computed by a run (CNTK-V depths 3, 11).
    Its point at n = 60 against `cntk solve` of a store of the first 60 training images; every point against
    numpy; the rows of the whole store unchanged by the curve."""
    from cntk_gram.pipeline.store import open_gram

    big = shutil.copytree(reference_store, tmp_path / "big.zarr")
    small = sub_store(big, tmp_path / "small.zarr", 60)
    common = ["--lambdas", "0,1e-3,1e-1", "--kernel", "ntk-vanilla"]
    doc, stderr = solve_json([big, "--out", tmp_path / "big-report", *common, "--train-sizes", "100,30,60",
                              "--validate-sizes"])
    plain, _ = solve_json([small, "--out", tmp_path / "small-report", *common])
    labels = zarr.open_group(str(big), mode="r")["inputs/labels"][:]
    assert [(r["depth"], r["n_train"]) for r in doc["curve"]] == [(d, n) for d in (3, 11) for n in (30, 60, 100, 120)]
    for depth in (3, 11):
        point = next(r for r in doc["curve"] if (r["depth"], r["n_train"]) == (depth, 60))
        alone = next(r for r in plain["rows"] if r["depth"] == depth)
        for setting in ("ridgeless", "validated"):
            assert point[setting]["confusion"] == alone[setting]["confusion"], (depth, setting)
            assert point[setting]["accuracy"] == alone[setting]["accuracy"]
        assert point["selection"] == alone["selection"] and point["options"] == alone["options"]
        ours = zarr.open_group(str(big), mode="r")[f"solve/ntk-vanilla/depth-{depth}/train-60"]
        theirs = zarr.open_group(str(small), mode="r")[f"solve/ntk-vanilla/depth-{depth}"]
        for name in ("ridgeless/alpha", "ridgeless/scores", "validated/alpha"):
            assert rel_err(ours[name][:], theirs[name][:]) <= 1e-8, name
        assert np.array_equal(ours["ridgeless/predictions"][:], theirs["ridgeless/predictions"][:])
        k = open_gram(big, "ntk-vanilla", depth)[:, :120].compute().astype(np.float64)
        k = np.concatenate([k, np.zeros((160, 40))], axis=1)          # test x test is never read
        for row in (r for r in doc["curve"] if r["depth"] == depth):
            n = row["n_train"]
            alpha, _, accuracy = dense_point(k, labels, 120, n)
            group = zarr.open_group(str(big), mode="r")["solve/ntk-vanilla"][f"depth-{depth}"]
            saved = group["ridgeless/alpha"] if n == 120 else group[f"train-{n}/ridgeless/alpha"]
            assert rel_err(saved[:], alpha) <= 1e-8 and row["ridgeless"]["accuracy"] == accuracy, n
    assert [_strip(r) for r in doc["rows"]] == [_strip(r) for r in doc["curve"] if r["n_train"] == 120]
    without, _ = solve_json([big, "--out", tmp_path / "again", *common, "--force"])
    assert [_strip(r) for r in without["rows"]] == [_strip(r) for r in doc["rows"]] and "curve" not in without
    assert "ridgeless curve: one factorisation of 120 rows for n = 30, 60, 100, 120" in stderr
    saved = json.loads((tmp_path / "big-report" / "results.json").read_text())
    assert saved["curve"] == doc["curve"] and saved["power_law"] == doc["power_law"]
    assert (tmp_path / "big-report" / "learning_curve.png").stat().st_size > 0


def test_curve_points_are_saved_and_reused(tmp_path, rng, monkeypatch):
    from test_report import make_store

    from cntk_gram.pipeline import solve as solve_module

    store, labels, grams = make_store(tmp_path, rng)         # 40 train + 15 test, tiles of 10
    factored = []
    original = solve_module.ridgeless_points
    monkeypatch.setattr(solve_module, "ridgeless_points",
                        lambda gram, **kw: factored.append(sorted(kw["sizes"])) or original(gram, **kw))
    args = [store, "--out", tmp_path / "r", "--no-validation", "--depth", "3"]
    first, _ = solve_json([*args, "--train-sizes", "10,25"])
    assert factored == [[10, 25, 40]]
    again, stderr = solve_json([*args, "--train-sizes", "10,25"])
    assert factored == [[10, 25, 40]] and all(r["reused"] for r in again["curve"])
    assert [_strip(r) for r in again["curve"]] == [_strip(r) for r in first["curve"]]
    assert "curve points n = 10, 25 solved before, reused" in stderr
    solve_json([*args, "--train-sizes", "10,25,32"])         # one new size: only its block is factored
    assert factored[-1] == [32]
    solve_json([store, "--out", tmp_path / "r", "--depth", "3", "--lambdas", "0,1e-2"])   # the row again, alone
    assert "train-25" in zarr.open_group(str(store), mode="r")["solve/ntk-vanilla/depth-3"]   # its points kept
    doc, _ = solve_json([*args, "--train-sizes", "10,25,32"])
    assert factored[-1] == [40] and [r["reused"] for r in doc["curve"]] == [True, True, True, False]
    solve_json([*args, "--train-sizes", "10,25", "--force"])
    assert factored[-1] == [10, 25, 40]
    k = grams[("ntk-vanilla", 3)].astype(np.float64)
    for row in doc["curve"]:
        assert row["ridgeless"]["accuracy"] == dense_point(k, labels, 40, row["n_train"])[2]


def test_not_positive_definite_and_incomplete_kernels_with_a_curve(tmp_path, rng):
    """Depth 3 of rank 12: λ = 0 fails from row 12 on (the row still names the smallest λ that works, the point of 10
    images is solved); depth 6 has a tile missing: its row and points are errors, not saved."""
    from test_report import make_store

    store, labels, grams = make_store(tmp_path, rng, rank_deficient=(3,), missing=(6,))
    doc, stderr = solve_json([store, "--out", tmp_path / "r", "--lambdas", "0,1e-4,1e-1", "--train-sizes", "10,20"])
    rows = {r["depth"]: r for r in doc["rows"]}
    points = {(r["depth"], r["n_train"]): r for r in doc["curve"]}
    assert rows[3]["ridgeless"]["smallest_working_lambda"] == 1e-4 and "not positive definite" in rows[3]["ridgeless"][
        "error"]
    assert "failed at row 12 of 20" in points[(3, 20)]["error"] and "ridgeless" not in points[(3, 20)]
    k = grams[("ntk-vanilla", 3)].astype(np.float64)
    assert points[(3, 10)]["ridgeless"]["accuracy"] == dense_point(k, labels, 40, 10)[2]
    assert all("not computed" in points[(6, n)]["error"] for n in (10, 20, 40))
    group = zarr.open_group(str(store), mode="r")
    assert "train-20" in group["solve/ntk-vanilla/depth-3"] and "depth-6" not in group["solve/ntk-vanilla"]
    assert "first 20 images: K(train, train) + 0·mean(diag)·I is not positive definite" in stderr


@pytest.mark.parametrize("sizes,words", [
    ("10,abc", "'abc' is not a positive integer"),
    ("0,10", "0 is not a positive integer"),
    ("-5", "-5 is not a positive integer"),
    ("2.5", "'2.5' is not a positive integer"),
    ("10,20,10", "10 given more than once"),
    ("10,41", "41 is larger than the store's training set (40 images)"),
])
def test_a_bad_size_is_one_error_line(tmp_path, rng, sizes, words):
    from test_report import make_store

    store, _, _ = make_store(tmp_path, rng)
    _, stderr = solve_json([store, "--out", tmp_path / "r", "--train-sizes", sizes], code=2)
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"Error: --train-sizes: {words}"), line
    assert "solve" not in zarr.open_group(str(store), mode="r")       # nothing solved or written


def test_validate_sizes_needs_sizes_and_validation(tmp_path, rng):
    from test_report import make_store

    store, _, _ = make_store(tmp_path, rng)
    for extra in ([], ["--train-sizes", "10", "--no-validation"]):
        _, stderr = solve_json([store, "--validate-sizes", *extra], code=2)
        assert stderr.startswith("Error: --validate-sizes") and len(stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- the power law and the report

def test_the_power_law_fit_recovers_known_parameters():
    n = np.array([1000, 2000, 3000, 5000, 10000, 20000, 35000, 50000])
    a, beta, c = 3.0, 0.4, 0.2
    fit = curve.fit_power_law(n, a * n ** -beta + c)
    assert fit["beta"] == pytest.approx(beta, rel=1e-4) and fit["a"] == pytest.approx(a, rel=1e-3)
    assert fit["c"] == pytest.approx(c, abs=1e-5) and fit["rms_residual"] < 1e-6
    assert (fit["n_min"], fit["n_max"], fit["points"]) == (1000, 50000, 8)
    noisy = a * n ** -beta + c + 0.01 * (-1.0) ** np.arange(n.size)     # residual of ±1 point
    assert curve.fit_power_law(n, noisy)["rms_residual"] == pytest.approx(0.01, rel=0.3)
    assert "needs at least 4 sizes" in curve.fit_power_law(n[:3], (a * n ** -beta + c)[:3])["error"]


def _curve_rows(kernel, depth, sizes, accuracy):
    return [{"kernel": kernel, "depth": depth, "n_train": n, "n_test": 10000,
             "ridgeless": {"lambda": 0.0, "accuracy": accuracy(n), "confusion": [[1]]}} for n in sizes]


def test_report_draws_the_curve_with_the_papers_points_where_the_protocol_matches(tmp_path):
    sizes = [1000, 2000, 5000, 10000, 20000, 50000]
    rows = _curve_rows("ntk-vanilla", 3, sizes, lambda n: 1 - (2.0 * n ** -0.3 + 0.2)) + \
        _curve_rows("nngp-vanilla", 3, sizes, lambda n: 1 - (2.0 * n ** -0.25 + 0.25))
    full = [r for r in rows if r["n_train"] == 50000]
    protocol = Protocol(n_train=50000, n_test=10000)
    points = report.curve_paper_points(rows, protocol)
    assert {(c.label, d, v) for c, d, v in points} == {("Table 1 CNTK-V-2K", 3, 40.94), ("Table 1 CNTK-V", 3, 64.47)}
    assert report.curve_paper_points(rows, Protocol(n_train=50000, n_test=2000)) == []           # other test set
    assert report.curve_paper_points(rows, Protocol(n_train=50000, n_test=10000, first_images=False)) == []
    assert {c.n_train for c, _, _ in report.curve_paper_points(rows[:2], protocol)} == {2000}   # only up to 2,000
    paths = report.write_report(full, out_dir=tmp_path, title="t", protocol=protocol, curve=rows)
    assert paths["learning_curve"].stat().st_size > 0
    doc = json.loads(paths["json"].read_text())
    assert [(f["kernel"], round(f["beta"], 3)) for f in doc["power_law"]] == [("nngp-vanilla", 0.25),
                                                                              ("ntk-vanilla", 0.3)]
    assert doc["curve"] == rows and doc["rows"] == full and doc["paper_reference"]["data_note"] == DATA_NOTE
    text = paths["markdown"].read_text()
    assert "## Learning curve" in text and "over n = 1,000 to 50,000" in text
    assert "| ntk-vanilla | 3 | 2,000 |" in text and "40.94 (Table 1 CNTK-V-2K)" in text
    assert text.count(DATA_NOTE) == 2                                  # under the table and under the curve
    other = report.write_report(full, out_dir=tmp_path / "o", title="t", protocol=Protocol(50000, 2000), curve=rows)
    assert DATA_NOTE not in other["markdown"].read_text()             # no published number beside ours


def test_readers_of_results_json_keep_working_with_a_curve(tmp_path):
    from cntk_gram.pipeline.results import read_results

    rows = _curve_rows("ntk-vanilla", 3, [40], lambda n: 0.5)
    curve_rows = _curve_rows("ntk-vanilla", 3, [10, 20, 30, 40], lambda n: 0.2 + n / 100)
    report.write_report(rows, out_dir=tmp_path, title="t", curve=curve_rows)
    doc = read_results(tmp_path)
    assert doc["rows"] == rows and report.format_table(doc["rows"]) == report.format_table(rows)
