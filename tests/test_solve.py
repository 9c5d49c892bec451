"""Blocked Cholesky, triangular solves (pipeline.linalg) and the validated ridge (pipeline.ridge) against
numpy.linalg on small SPD problems."""
import os

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cntk_gram.pipeline import linalg, ridge
from cntk_gram.pipeline.ridge import SolveOptions
from cntk_gram.workers.preprocess import targets
from cntk_gram.workers.vocab import gpu_unavailable_reason


def spd_gram(rng, n, *, chunk, dtype=np.float64, rank=None):
    """(n, n) SPD (or PSD of the given rank) matrix as a dask array with (chunk, chunk) blocks."""
    x = rng.standard_normal((n, rank or n + 5))
    k = (x @ x.T / x.shape[1]).astype(dtype)
    return k, da.from_array(k, chunks=(chunk, chunk))


def rel_err(x, ref):
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("n,chunk,panel_width", [
    (48, 8, None),     # in core: one panel
    (48, 8, 16),       # three panels of two tiles
    (53, 8, 16),       # ragged last tile and ragged last panel
    (53, 7, 5),        # panels that cut through tiles
    (50, 50, 1),       # column by column
])
def test_blocked_solve_matches_numpy(rng, n, chunk, panel_width):
    k, a = spd_gram(rng, n, chunk=chunk)
    b = rng.standard_normal((n, 10))
    factor = linalg.cholesky_blocked(a, shift=0.0, panel_width=panel_width)
    try:
        low = np.zeros((n, n))
        for (c0, c1), panel in zip(factor.bounds, factor.panels):
            low[c0:, c0:c1] = panel
        assert rel_err(low, np.linalg.cholesky(k)) <= 1e-8
        assert np.all(np.triu(low, 1) == 0)
        assert rel_err(linalg.cho_solve_blocked(factor, b), np.linalg.solve(k, b)) <= 1e-8
    finally:
        factor.close()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), chunk=st.integers(1, 40), panel=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_any_tile_and_panel_width_gives_the_same_solution(n, chunk, panel, seed):
    k, a = spd_gram(np.random.default_rng(seed), n, chunk=min(chunk, n))
    b = np.random.default_rng(seed + 1).standard_normal((n, 3))
    alpha = ridge.fit_alpha(a, b, lam=0.0, options=SolveOptions(panel_width=panel))
    assert rel_err(alpha, np.linalg.solve(k, b)) <= 1e-8


def test_out_of_core_panels_live_on_disk_and_are_removed(rng, tmp_path):
    n = 40
    k, a = spd_gram(rng, n, chunk=8)
    b = rng.standard_normal((n, 3))
    # a budget too small for the matrix: 8-column panels in memory-mapped scratch files
    factor = linalg.cholesky_blocked(a, memory_budget=4 * 8 * n * 8, scratch_dir=tmp_path)
    assert len(factor.bounds) == 5 and isinstance(factor.panels[0], np.memmap)
    assert rel_err(linalg.cho_solve_blocked(factor, b), np.linalg.solve(k, b)) <= 1e-8
    factor.close()
    assert list(tmp_path.iterdir()) == []


def test_float32_store_is_factored_in_float64(rng):
    k32, a = spd_gram(rng, 30, chunk=6, dtype=np.float32)
    b = rng.standard_normal((30, 2))
    alpha = ridge.fit_alpha(a, b, lam=0.0, options=SolveOptions(panel_width=12))
    assert rel_err(alpha, np.linalg.solve(k32.astype(np.float64), b)) <= 1e-8


def test_ridge_is_lambda_times_mean_diagonal(rng):
    k, a = spd_gram(rng, 24, chunk=5)
    b = rng.standard_normal((24, 4))
    lam = 0.3
    ref = np.linalg.solve(k + lam * np.mean(np.diag(k)) * np.eye(24), b)
    assert rel_err(ridge.fit_alpha(a, b, lam=lam, options=SolveOptions(panel_width=10)), ref) <= 1e-8


def test_not_positive_definite_names_row_and_smallest_working_lambda(rng):
    # rank-deficient PSD with a negative eigenvalue nudged in: lam = 0 and 1e-6 fail, 1e-3 works
    x = rng.standard_normal((30, 30))
    q, _ = np.linalg.qr(x)
    eig = np.linspace(1.0, 2.0, 30)
    eig[-1] = -1e-4 * eig.mean()
    k = (q * eig) @ q.T
    a = da.from_array(k, chunks=(7, 7))
    with pytest.raises(linalg.NotPositiveDefinite) as info:
        linalg.cholesky_blocked(a, panel_width=10)
    assert 0 <= info.value.row < 30
    grid = (1e-6, 1e-3, 1e-1)
    working = ridge.smallest_working_lambda(a, options=SolveOptions(lambdas=grid, panel_width=10))
    assert working == 1e-3   # eigenvalue -1e-4·mean: 1e-6 is too small, 1e-3·mean(diag) lifts it
    message = ridge.not_pd_message(info.value, working, grid)
    assert "not positive definite" in message and "smallest λ" in message and "0.001" in message
    assert "no λ in the grid" in ridge.not_pd_message(info.value, None, grid)


def test_validation_split_is_stratified_seeded_and_disjoint(rng):
    labels = rng.integers(0, 10, size=500)
    fit, val = ridge.validation_split(labels, fraction=0.2, seed=3)
    fit2, val2 = ridge.validation_split(labels, fraction=0.2, seed=3)
    assert np.array_equal(val, val2) and np.array_equal(fit, fit2)
    assert np.intersect1d(fit, val).size == 0 and fit.size + val.size == 500
    for c in range(10):
        count = np.sum(labels == c)
        assert np.sum(labels[val] == c) == round(0.2 * count)
    assert not np.array_equal(val, ridge.validation_split(labels, fraction=0.2, seed=4)[1])


def _labelled_problem(rng, n_train=60, n_test=30):
    """Gram of a noisy linear-class model: rows train then test, labels (N,)."""
    n = n_train + n_test
    labels = rng.integers(0, 3, size=n)
    feats = np.eye(3)[labels] * 2.0 + rng.standard_normal((n, 3))
    x = np.concatenate([feats, 0.3 * rng.standard_normal((n, 120))], axis=1)
    k = x @ x.T
    return k, da.from_array(k, chunks=(15, 15)), labels


def test_solve_kernel_matches_numpy_and_never_uses_test_labels(rng, monkeypatch):
    k, gram, labels = _labelled_problem(rng)
    n_train = 60
    seen = []
    original = ridge.select_lambda

    def spy(k_train, train_labels, **kw):
        seen.append((k_train.shape, np.array(train_labels)))
        return original(k_train, train_labels, **kw)

    monkeypatch.setattr(ridge, "select_lambda", spy)
    result = ridge.solve_kernel(gram, labels=labels, n_train=n_train,
                                options=SolveOptions(lambdas=(0.0, 1e-3, 1e-1), panel_width=20))
    # the selection saw the training block and training labels only
    assert seen[0][0] == (n_train, n_train) and np.array_equal(seen[0][1], labels[:n_train])

    # the paper's lambda = 0 fit equals numpy.linalg.solve
    y = targets(labels[:n_train], n_classes=3)
    alpha_ref = np.linalg.solve(k[:n_train, :n_train], y)
    assert rel_err(result.ridgeless.alpha, alpha_ref) <= 1e-8
    pred_ref = (k[n_train:, :n_train] @ alpha_ref).argmax(axis=1)
    assert np.array_equal(result.ridgeless.predictions, pred_ref)
    assert result.ridgeless.accuracy == np.mean(pred_ref == labels[n_train:])

    # garbage test labels change the scores but not the choice of lambda
    poisoned = labels.copy()
    poisoned[n_train:] = (labels[n_train:] + 1) % 3
    again = ridge.solve_kernel(gram, labels=poisoned, n_train=n_train,
                               options=SolveOptions(lambdas=(0.0, 1e-3, 1e-1), panel_width=20))
    assert again.selection == result.selection
    assert again.validated.lam == result.validated.lam
    assert again.ridgeless.accuracy != result.ridgeless.accuracy


@pytest.mark.parametrize("chosen, expected", [(1.0, True), (1e-2, False), (0.0, False)])
def test_a_choice_at_the_top_of_the_grid_is_flagged_and_said(rng, monkeypatch, chosen, expected):
    from cntk_gram.pipeline.results import SelectionSummary

    k, gram, labels = _labelled_problem(rng)
    grid = (0.0, 1e-2, 1.0)
    # the choice is forced (which λ validates best is not this test's business); the flag and the note follow it
    monkeypatch.setattr(ridge, "select_lambda", lambda *a, **kw: ridge.Selection(
        lam=chosen, val_accuracy={lam: 0.5 for lam in grid}, scheme="full", n_fit=45, n_val=15, seed=0,
        val_fraction=0.25))
    said = []
    result = ridge.solve_kernel(gram, labels=labels, n_train=60, options=SolveOptions(lambdas=grid),
                                progress=said.append)
    assert result.validated.lam == chosen
    assert any("largest in the grid" in line for line in said) == expected
    summary = SelectionSummary(lam=chosen, val_accuracy=[{"lambda": lam, "accuracy": 0.5} for lam in grid],
                               scheme="full", n_fit=45, n_val=15, seed=0)
    assert summary.to_dict()["at_top_of_grid"] == expected
    assert SelectionSummary.from_dict(summary.to_dict()) == summary


def test_selection_matches_a_direct_numpy_validation(rng):
    k, gram, labels = _labelled_problem(rng)
    n_train, grid = 60, (0.0, 1e-2, 1.0, 10.0)
    sel = ridge.select_lambda(gram[:n_train, :n_train], labels[:n_train], n_classes=3,
                              options=SolveOptions(lambdas=grid, val_fraction=0.25, seed=7))
    fit, val = ridge.validation_split(labels[:n_train], fraction=0.25, seed=7)
    kf = k[np.ix_(fit, fit)]
    for lam in grid:
        alpha = np.linalg.solve(kf + lam * np.mean(np.diag(kf)) * np.eye(fit.size),
                                targets(labels[fit], n_classes=3))
        acc = np.mean((k[np.ix_(val, fit)] @ alpha).argmax(axis=1) == labels[val])
        assert sel.val_accuracy[lam] == acc
    best = max(sel.val_accuracy.values())
    assert sel.lam == min(l for l, a in sel.val_accuracy.items() if a == best)


def test_nan_tiles_are_reported_as_incomplete(rng):
    k, _ = spd_gram(rng, 20, chunk=5)
    k[15:, :5] = np.nan
    with pytest.raises(linalg.IncompleteKernel):
        linalg.cholesky_blocked(da.from_array(k, chunks=(5, 5)), panel_width=5)


def fake_cupy(monkeypatch, *, free_bytes):
    """A numpy stand-in with the CuPy calls cntk_gram.pipeline.linalg makes, so the device branch runs on CPU.
    Like cuSOLVER (and unlike numpy), its cholesky returns NaN instead of raising on a non-PD block."""
    import contextlib
    import sys
    import types

    from scipy.linalg import solve_triangular

    def cholesky(a):
        try:
            return np.linalg.cholesky(a)
        except np.linalg.LinAlgError:
            return np.full_like(a, np.nan)

    xp = types.SimpleNamespace(
        asarray=np.asarray, asnumpy=lambda a: np.array(a), arange=np.arange, isfinite=np.isfinite,
        flatnonzero=np.flatnonzero, diagonal=np.diagonal, linalg=types.SimpleNamespace(cholesky=cholesky),
        cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(memGetInfo=lambda: (free_bytes, free_bytes))))
    dev_linalg = types.ModuleType("cupyx.scipy.linalg")
    dev_linalg.solve_triangular = solve_triangular
    cupyx = types.ModuleType("cupyx")
    cupyx.errstate = lambda **kw: contextlib.nullcontext()
    for name, module in (("cupyx", cupyx), ("cupyx.scipy", types.ModuleType("cupyx.scipy")),
                         ("cupyx.scipy.linalg", dev_linalg)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(linalg, "array_module", lambda device: xp)
    return xp


@pytest.mark.parametrize("free_bytes,n_panels", [(10**9, 1), (1000, 4)])
def test_device_branch_with_a_numpy_stand_in(rng, monkeypatch, free_bytes, n_panels):
    k, a = spd_gram(rng, 53, chunk=8)
    b = rng.standard_normal((53, 10))
    fake_cupy(monkeypatch, free_bytes=free_bytes)
    factor = linalg.cholesky_blocked(a, device="gpu", memory_budget=4 * 16 * 53 * 8)
    assert len(factor.bounds) == n_panels   # in core when the device has room, 16-column panels if not
    assert rel_err(linalg.cho_solve_blocked(factor, b), np.linalg.solve(k, b)) <= 1e-8
    factor.close()
    bad = k.copy()
    bad[30, 30] = -1.0
    with pytest.raises(linalg.NotPositiveDefinite):
        linalg.cholesky_blocked(da.from_array(bad, chunks=8), device="gpu", memory_budget=4 * 16 * 53 * 8)


@pytest.mark.gpu
def test_gpu_blocked_and_in_core_match_numpy(rng):
    if gpu_unavailable_reason() is not None:
        pytest.skip(gpu_unavailable_reason())
    k, a = spd_gram(rng, 53, chunk=8)
    b = rng.standard_normal((53, 10))
    for panel_width in (None, 16):
        factor = linalg.cholesky_blocked(a, device="gpu", panel_width=panel_width)
        assert rel_err(linalg.cho_solve_blocked(factor, b), np.linalg.solve(k, b)) <= 1e-8
        factor.close()


def test_cpu_panels_never_exceed_the_potrf_cap():
    """Even when the whole matrix fits the budget, CPU panels stay <= CPU_MAX_PANEL wide (whole tiles)."""
    from cntk_gram.pipeline.linalg import CPU_MAX_PANEL, plan_panels

    bounds = plan_panels(20000, chunk=500, memory_budget=12 * 2 ** 30, max_width=CPU_MAX_PANEL)
    widths = [c1 - c0 for c0, c1 in bounds]
    assert max(widths) <= CPU_MAX_PANEL and all(w % 500 == 0 for w in widths)
    assert bounds[0][0] == 0 and bounds[-1][1] == 20000
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert plan_panels(20000, chunk=500, memory_budget=12 * 2 ** 30) == [(0, 20000)]  # no cap: one panel


# ---------------------------------------------------------------- the subset scheme, options, progress, scratch

def test_subset_split_is_stratified_disjoint_seeded_and_capped(rng):
    labels = rng.integers(0, 10, size=3000)
    fit, val = ridge.subset_split(labels, fit_size=1000, val_size=500, seed=3)
    assert np.intersect1d(fit, val).size == 0 and (fit.size, val.size) == (1000, 500)
    for c in range(10):   # class proportions, up to the rounding of one image
        share = np.mean(labels == c)
        assert abs(np.sum(labels[val] == c) - 500 * share) < 1
        assert abs(np.sum(labels[fit] == c) - 1000 * np.sum(labels[np.setdiff1d(np.arange(3000), val)] == c) / 2500) < 1
    again = ridge.subset_split(labels, fit_size=1000, val_size=500, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((fit, val), again))
    assert not np.array_equal(val, ridge.subset_split(labels, fit_size=1000, val_size=500, seed=4)[1])
    # fewer images than fit + held out: the held-out subset first, the fit subset gets the rest
    small = np.repeat(np.arange(3), 10)
    fit, val = ridge.subset_split(small, fit_size=100, val_size=9, seed=0)
    assert val.size == 9 and fit.size == 21 and np.intersect1d(fit, val).size == 0


def test_auto_scheme_is_subset_above_the_threshold_then_one_fit_on_all_rows(rng, monkeypatch):
    k, gram, labels = _labelled_problem(rng, n_train=90, n_test=30)
    n_train, grid = 90, (0.0, 1e-2, 1.0)
    options = SolveOptions(lambdas=grid, subset_above=60, val_fit=40, val_size=20, seed=5, panel_width=16)
    assert options.scheme_for(90) == "subset" and options.scheme_for(60) == "full"
    factored = []
    original = ridge.cholesky_blocked
    monkeypatch.setattr(ridge, "cholesky_blocked", lambda a, **kw: factored.append(a.shape[0]) or original(a, **kw))
    result = ridge.solve_kernel(gram, labels=labels, n_train=n_train, options=options)
    sel = result.selection
    assert (sel.scheme, sel.n_fit, sel.n_val, sel.val_fraction) == ("subset", 40, 20, None)
    # every λ of the grid on the 40-image fit subset, scored on the 20 held out: as numpy does it
    fit, val = ridge.subset_split(labels[:n_train], fit_size=40, val_size=20, seed=5)
    kf = k[np.ix_(fit, fit)]
    for lam in grid:
        alpha = np.linalg.solve(kf + lam * np.mean(np.diag(kf)) * np.eye(fit.size), targets(labels[fit], n_classes=3))
        assert sel.val_accuracy[lam] == np.mean((k[np.ix_(val, fit)] @ alpha).argmax(axis=1) == labels[val])
    # then one factorisation of all 90 rows with the chosen λ (none when it is 0: the ridgeless fit is reused)
    assert factored == [90] + [40] * len(grid) + ([90] if sel.lam else [])
    ktr = k[:n_train, :n_train]
    ref = np.linalg.solve(ktr + sel.lam * np.mean(np.diag(ktr)) * np.eye(n_train),
                          targets(labels[:n_train], n_classes=3))
    assert rel_err(result.validated.alpha, ref) <= 1e-8
    assert options.record(90) == {"lambdas": list(grid), "validate": True, "scheme": "subset", "seed": 5,
                                  "val_fit": 40, "val_size": 20}
    assert options.record(60)["scheme"] == "full" and "val_fit" not in options.record(60)
    # machine fields do not change the record: a result solved on another device or budget is the same result
    import dataclasses
    other_machine = dataclasses.replace(options, memory_budget=1, panel_width=None, device="auto")
    assert other_machine.record(90) == options.record(90)


def _not_pd(rng, n=40, chunk=8):
    """Symmetric, eigenvalue -1e-4·mean: λ = 0 and 1e-6 do not factor, 1e-3 does."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.linspace(1.0, 2.0, n)
    eig[-1] = -1e-4 * eig.mean()
    k = (q * eig) @ q.T
    return k, da.from_array(k, chunks=(chunk, chunk))


def test_not_positive_definite_out_of_core_names_the_row_and_leaves_no_scratch(rng, tmp_path):
    k, a = _not_pd(rng)
    budget = 4 * 8 * 40 * 8       # 8-column panels in scratch files
    plan = linalg.plan_factor(40, chunk=8, memory_budget=budget)
    assert plan.on_disk and len(plan.bounds) == 5
    with pytest.raises(linalg.NotPositiveDefinite) as info:
        linalg.cholesky_blocked(a, memory_budget=budget, scratch_dir=tmp_path)
    assert 0 <= info.value.row < 40
    assert list(tmp_path.iterdir()) == []                   # the scratch files of the panels done are gone
    options = SolveOptions(lambdas=(0.0, 1e-6, 1e-3, 1e-1), memory_budget=budget, scratch_dir=tmp_path,
                           validate=False)
    assert ridge.smallest_working_lambda(a, options=options) == 1e-3
    assert list(tmp_path.iterdir()) == []


def test_the_smallest_working_lambda_reuses_what_is_known(rng, monkeypatch):
    k, a = _not_pd(rng)
    tried = []
    original = ridge.cholesky_blocked
    monkeypatch.setattr(ridge, "cholesky_blocked", lambda m, **kw: tried.append(kw["lam"]) or original(m, **kw))
    options = SolveOptions(lambdas=(0.0, 1e-6, 1e-3, 1e-2, 1e-1), panel_width=10)
    assert ridge.smallest_working_lambda(a, options=options, fails_at=1e-6, works_at=1e-2) == 1e-3
    assert tried == [1e-3]                                  # 1e-6 known to fail, stops before 1e-2
    tried.clear()
    assert ridge.smallest_working_lambda(a, options=options, works_at=1e-3) == 1e-3
    assert tried == [1e-6]                                  # 1e-3 known to work: not factored again


def test_each_panel_reports_progress_with_an_eta(rng, tmp_path):
    k, a = spd_gram(rng, 64, chunk=8)
    messages = []
    factor = linalg.cholesky_blocked(a, panel_width=16, progress=messages.append, label="ntk-fc depth 3: ")
    factor.close()
    assert len(messages) == 4
    assert messages[0].startswith("ntk-fc depth 3: Cholesky 16/64 columns, panel 1/4 (16% of the work)")
    assert all("elapsed, ETA" in m for m in messages) and "(100% of the work)" in messages[-1]
    assert linalg.work_done(0, 10) == 0 and linalg.work_done(10, 10) == 1 and linalg.work_done(5, 10) == 0.5
    messages.clear()
    linalg.cholesky_blocked(a, progress=messages.append).close()      # one panel: nothing to report
    assert messages == []


def test_scratch_of_a_dead_process_is_removed(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live, foreign = (tmp_path / f"{linalg.SCRATCH_PREFIX}{name}" for name in ("stale", "live", "foreign"))
    for path, owner in ((stale, f"{socket.gethostname()} {dead.stdout.strip()}"),
                        (live, f"{socket.gethostname()} {os.getppid()}"), (foreign, "otherhost 1")):
        path.mkdir()
        (path / linalg.OWNER_FILE).write_text(owner)
        (path / "panel-0.npy").write_bytes(b"x")
    mine = linalg.make_scratch(tmp_path)
    assert linalg.remove_stale_scratch(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, foreign, mine))
