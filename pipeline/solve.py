"""Kernel regression on a stored Gram matrix: blocked Cholesky, triangular solves, ridge on a validation split.

The training block K (n, n) is read from a dask array whose chunks are the store's tiles. It is factored
left-looking, one column *panel* at a time (a panel is a run of whole tiles, the last one may be ragged):

    P = K[c0:, c0:c1] + shift·I  -  sum_{j<k} L[c0:, panel j] · L[c0:c1, panel j]^T
    L[c0:c1, c0:c1] = chol(P[:w]);   L[c1:, c0:c1] = P[w:] · L[c0:c1, c0:c1]^-T

Memory (CPU): a panel is at most memory_budget / 4 bytes and at most two panels are in memory at once
(in-place BLAS/LAPACK); when the whole factor is larger than half the budget its panels live in
memory-mapped files in a scratch directory. With the default 12 GiB budget, n <= 34,000 is factored in
one in-core LAPACK call and n = 50,000 in ~8,000-column panels (about 10 GB of scratch disk), which fits
a 24 GiB machine. On GPU (CuPy) the same loop runs with device arrays; one panel when it fits the device.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
from scipy.linalg import blas, lapack, solve_triangular

from cntk_gram.workers.vocab import gpu_available

DEFAULT_MEMORY_BUDGET = 12 * 2**30          # bytes of host memory the CPU factorisation may use
DEFAULT_LAMBDAS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_VAL_FRACTION = 0.1


class NotPositiveDefinite(ArithmeticError):
    """K + lam·mean(diag)·I has no Cholesky factor; `row` is the first failing row (0-based) or -1 if unknown."""

    def __init__(self, *, lam: float, row: int, n: int):
        self.lam, self.row, self.n = lam, row, n
        where = f"at row {row} of {n}" if row >= 0 else f"(size {n})"
        super().__init__(f"K(train, train) + {lam:g}·mean(diag)·I is not positive definite: "
                         f"Cholesky failed {where}")


class DeviceUnavailable(RuntimeError):
    """--device gpu asked for where CuPy sees no CUDA device."""


class IncompleteKernel(ValueError):
    """The Gram matrix still holds NaN (tiles not computed)."""


def array_module(device: str):
    """numpy for 'cpu', cupy for 'gpu', cupy if it sees a device for 'auto'."""
    if device == "cpu":
        return np
    if gpu_available():
        import cupy
        return cupy
    if device == "gpu":
        raise DeviceUnavailable("--device gpu: CuPy cannot see a CUDA device here; use --device cpu or auto")
    return np


# ---------------------------------------------------------------- factorisation

@dataclass
class CholeskyFactor:
    """Lower factor L (n, n) float64 of K + shift·I, stored by column panel.

    panels[k] = L[c0:, c0:c1] for bounds[k] = (c0, c1): an (n - c0, c1 - c0) array (numpy, memmap or cupy).
    """
    n: int
    bounds: list[tuple[int, int]]
    panels: list = field(default_factory=list)
    scratch: Path | None = None
    xp: object = np

    def close(self) -> None:
        self.panels.clear()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


# Multithreaded OpenBLAS dpotrf (SciPy's and NumPy's builds) segfaults on very large blocks: seen at n = 20,000 on
# AVX-512, fine at 10,000. CPU panels stay at most this wide, so potrf only sees diagonal blocks of this size and the
# bulk of the work runs in dtrsm/dgemm.
CPU_MAX_PANEL = 8192


def plan_panels(n: int, *, chunk: int, memory_budget: int, panel_width: int | None = None,
                in_core_bytes: int | None = None, max_width: int | None = None) -> list[tuple[int, int]]:
    """Column panels [(c0, c1), ...] covering 0..n; one panel when n·n float64 fits 3/4 of the budget, but
    never wider than max_width (whole tiles when possible)."""
    if panel_width is None:
        limit = memory_budget * 3 // 4 if in_core_bytes is None else in_core_bytes
        if n * n * 8 <= limit:
            panel_width = n
        else:  # two panels in memory at once, each at most budget / 4; whole tiles when possible
            cols = memory_budget // 4 // (8 * n)
            panel_width = max(chunk, cols // chunk * chunk) if cols >= chunk else max(1, cols)
        if max_width is not None and panel_width > max_width:
            panel_width = max(chunk, max_width // chunk * chunk) if max_width >= chunk else max_width
    w = max(1, min(int(panel_width), n))
    return [(c0, min(c0 + w, n)) for c0 in range(0, n, w)]


def read_block(a: da.Array, rows: slice, cols: slice) -> np.ndarray:
    """a[rows, cols] as a C-ordered float64 host array, written chunk by chunk (no second full copy)."""
    block = a[rows, cols].astype(np.float64)
    out = np.empty(block.shape, dtype=np.float64)
    da.store(block, out, lock=False, scheduler="threads")
    if not np.isfinite(out).all():
        raise IncompleteKernel("the Gram matrix holds NaN/inf: some tiles are not computed yet")
    return out


def _device_fits(xp, n: int) -> int | None:
    """Bytes allowed for an in-core device factorisation (None on CPU)."""
    if xp is np:
        return None
    free, _ = xp.cuda.runtime.memGetInfo()
    return int(free * 0.4)  # the matrix, cuSOLVER's copy and workspace


def _cholesky_diag(xp, p, w: int, *, lam: float, c0: int, n: int):
    """Factor p[:w] (w, w) to its lower Cholesky factor (in place on CPU); return the panel holding it.
    Raises NotPositiveDefinite."""
    if xp is np:
        # p[:w] is C-ordered, so its transpose is Fortran-ordered: LAPACK's upper factor U of K = U^T U
        # written into p[:w].T is exactly L = U^T in p[:w]; in place, no copy.
        c, info = lapack.dpotrf(p[:w].T, lower=0, clean=1, overwrite_a=1)
        if info > 0:
            raise NotPositiveDefinite(lam=lam, row=c0 + info - 1, n=n)
        if not np.shares_memory(c, p):
            p[:w] = c.T
        return p
    import cupyx

    try:
        with cupyx.errstate(linalg="raise"):  # CuPy's default is to ignore cuSOLVER's info
            lkk = xp.linalg.cholesky(p[:w])
    except np.linalg.LinAlgError:
        raise NotPositiveDefinite(lam=lam, row=-1, n=n) from None
    bad = xp.flatnonzero(~xp.isfinite(xp.diagonal(lkk)))
    if bad.size:
        raise NotPositiveDefinite(lam=lam, row=c0 + int(bad[0]), n=n)
    if p.shape[0] == w:
        return lkk  # in core: no third n x n copy on the device
    p[:w] = lkk
    return p


def _solve_below(xp, p, w: int) -> None:
    """p[w:] <- p[w:] · L_kk^-T with L_kk = p[:w] (in place on CPU)."""
    if p.shape[0] == w:
        return
    if xp is np:
        # (B L^-T)^T = L^-1 B^T; p[:w].T is L^T Fortran-ordered, p[w:].T is B^T Fortran-ordered
        x = blas.dtrsm(1.0, p[:w].T, p[w:].T, side=0, lower=0, trans_a=1, overwrite_b=1)
        if not np.shares_memory(x, p):
            p[w:] = x.T
        return
    from cupyx.scipy.linalg import solve_triangular as dev_solve_triangular
    p[w:] = dev_solve_triangular(p[:w], p[w:].T, lower=True).T


def _subtract_outer(xp, p, lrows) -> None:
    """p -= lrows · lrows[:w]^T, with lrows = L[c0:, panel j] (in place on CPU)."""
    w = p.shape[1]
    if xp is np:
        c = blas.dgemm(-1.0, lrows[:w].T, lrows.T, beta=1.0, c=p.T, trans_a=1, overwrite_c=1)
        if not np.shares_memory(c, p):
            p[...] = c.T
        return
    p -= lrows @ lrows[:w].T


def cholesky_blocked(a: da.Array, *, shift: float = 0.0, lam: float = 0.0, device: str = "cpu",
                     memory_budget: int = DEFAULT_MEMORY_BUDGET, panel_width: int | None = None,
                     scratch_dir: str | Path | None = None) -> CholeskyFactor:
    """Lower Cholesky factor of a + shift·I.

    a: (n, n) symmetric dask array, any float dtype, chunks = store tiles (only a[c0:, c0:c1], the lower
    part, is read). shift: added to the diagonal (lam is only used in error messages).
    Raises NotPositiveDefinite (with the failing row) and IncompleteKernel (NaN tiles).
    """
    n = a.shape[0]
    if a.shape != (n, n):
        raise ValueError(f"expected a square matrix, got shape {a.shape}")
    xp = array_module(device)
    bounds = plan_panels(n, chunk=a.chunks[0][0], memory_budget=memory_budget, panel_width=panel_width,
                         in_core_bytes=_device_fits(xp, n), max_width=CPU_MAX_PANEL if xp is np else None)
    factor = CholeskyFactor(n=n, bounds=bounds, xp=xp)
    on_disk = len(bounds) > 1 and (n * n * 4 + n * 8 * (bounds[0][1] - bounds[0][0])) > memory_budget // 2
    if on_disk:
        factor.scratch = Path(tempfile.mkdtemp(prefix="cntk-factor-", dir=scratch_dir))
    try:
        for k, (c0, c1) in enumerate(bounds):
            w = c1 - c0
            p = xp.asarray(read_block(a, slice(c0, n), slice(c0, c1)))
            p[xp.arange(w), xp.arange(w)] += shift
            for (d0, _), lj in zip(bounds[:k], factor.panels):
                _subtract_outer(xp, p, xp.asarray(lj[c0 - d0:]))
            p = _cholesky_diag(xp, p, w, lam=lam, c0=c0, n=n)
            _solve_below(xp, p, w)
            factor.panels.append(_keep(p, factor, k))
    except BaseException:
        factor.close()
        raise
    return factor


def _keep(p, factor: CholeskyFactor, k: int):
    """Where a finished panel lives: on the device (single panel), in RAM, or in a scratch memmap."""
    xp = factor.xp
    if len(factor.bounds) == 1:
        return p
    host = p if xp is np else xp.asnumpy(p)
    if factor.scratch is None:
        return host
    mm = np.lib.format.open_memmap(factor.scratch / f"panel-{k}.npy", mode="w+", dtype=np.float64,
                                   shape=host.shape)
    mm[...] = host
    mm.flush()
    return mm


def cho_solve_blocked(factor: CholeskyFactor, b: np.ndarray) -> np.ndarray:
    """x = (L L^T)^-1 b. b: (n, m) float64 host array. Returns (n, m) float64 host array."""
    xp = factor.xp
    x = xp.asarray(np.array(b, dtype=np.float64))
    if factor.n != x.shape[0]:
        raise ValueError(f"right-hand side has {x.shape[0]} rows, factor has {factor.n}")
    tri = solve_triangular if xp is np else __import__("cupyx.scipy.linalg", fromlist=["x"]).solve_triangular
    for (c0, c1), panel in zip(factor.bounds, factor.panels):         # forward: L y = b
        lk = xp.asarray(panel)
        w = c1 - c0
        x[c0:c1] = tri(lk[:w], x[c0:c1], lower=True)
        x[c1:] -= lk[w:] @ x[c0:c1]
    for (c0, c1), panel in reversed(list(zip(factor.bounds, factor.panels))):   # backward: L^T x = y
        lk = xp.asarray(panel)
        w = c1 - c0
        x[c0:c1] -= lk[w:].T @ x[c1:]
        x[c0:c1] = tri(lk[:w], x[c0:c1], lower=True, trans="T")
    return x if xp is np else xp.asnumpy(x)


def mean_diagonal(a: da.Array) -> float:
    """mean(diag(a)) in float64: the unit of the ridge lam·mean(diag)·I."""
    return float(da.diagonal(a).astype(np.float64).mean().compute(scheduler="threads"))


def fit_alpha(k_train: da.Array, y_train: np.ndarray, *, lam: float, **solver) -> np.ndarray:
    """alpha = (K + lam·mean(diag K)·I)^-1 Y. k_train (n, n); y_train (n, C) float64 -> (n, C) float64."""
    shift = lam * mean_diagonal(k_train) if lam else 0.0
    factor = cholesky_blocked(k_train, shift=shift, lam=lam, **solver)
    try:
        return cho_solve_blocked(factor, y_train)
    finally:
        factor.close()


def predict_scores(k_cross: da.Array, alpha: np.ndarray) -> np.ndarray:
    """scores = k_cross^T alpha. k_cross (n_train, m) dask array; alpha (n_train, C) -> (m, C) float64."""
    scores = (k_cross.T.astype(np.float64) @ da.from_array(alpha, chunks=(k_cross.chunks[0], -1)))
    out = scores.compute(scheduler="threads")
    if not np.isfinite(out).all():
        raise IncompleteKernel("K(train, test) holds NaN/inf: some tiles are not computed yet")
    return out


def smallest_working_lambda(k_train: da.Array, *, lambdas, **solver) -> float | None:
    """The smallest lam > 0 in `lambdas` for which K + lam·mean(diag)·I factors, or None."""
    unit = mean_diagonal(k_train)
    for lam in sorted(x for x in lambdas if x > 0):
        try:
            cholesky_blocked(k_train, shift=lam * unit, lam=lam, **solver).close()
            return lam
        except NotPositiveDefinite:
            continue
    return None


def not_pd_message(err: NotPositiveDefinite, working: float | None, lambdas) -> str:
    """One line: what failed and the smallest lam in the grid that works (or how to get one)."""
    grid = ", ".join(f"{x:g}" for x in sorted(lambdas))
    if working is None:
        return f"{err}; no λ in the grid ({grid}) works: add larger values with --lambdas"
    return f"{err}; the smallest λ in the grid ({grid}) that works is {working:g}"


# ---------------------------------------------------------------- ridge chosen on held-out training data

def validation_split(train_labels: np.ndarray, *, fraction: float = DEFAULT_VAL_FRACTION,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of the *training* set into (fit, val) index arrays (sorted int64).

    Each class keeps round(fraction · count) images for validation (at least one when it has two or more).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must lie in (0, 1), got {fraction}")
    labels = np.asarray(train_labels)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(fraction * members.size))
        if members.size >= 2:
            n_val = min(max(n_val, 1), members.size - 1)
        val.append(members[:n_val])
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    fit_idx = np.setdiff1d(np.arange(labels.size), val_idx).astype(np.int64)
    return fit_idx, val_idx


def select_lambda(k_train: da.Array, train_labels: np.ndarray, *, lambdas=DEFAULT_LAMBDAS, n_classes: int,
                  val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0, **solver) -> dict:
    """Choose lam by accuracy on a validation split of the training set. Sees no test data at all.

    k_train: (n_train, n_train) dask array; train_labels: (n_train,) int.
    Returns {"lambda", "val_accuracy": {lam: acc or None if not PD}, "n_fit", "n_val", "seed"}.
    Ties go to the smallest lam. Raises NotPositiveDefinite when no lam in the grid factors.
    """
    from cntk_gram.workers.preprocess import targets

    train_labels = np.asarray(train_labels)
    if train_labels.shape != (k_train.shape[0],):
        raise ValueError(f"train_labels must have shape ({k_train.shape[0]},), got {train_labels.shape}")
    fit, val = validation_split(train_labels, fraction=val_fraction, seed=seed)
    k_fit, k_fit_val = k_train[fit][:, fit], k_train[fit][:, val]
    if k_fit.size * 8 <= solver.get("memory_budget", DEFAULT_MEMORY_BUDGET) // 4:  # read once, reuse per lam
        k_fit = da.from_array(read_block(k_fit, slice(None), slice(None)), chunks=k_fit.chunks)
    y_fit = targets(train_labels[fit], n_classes=n_classes)
    scores: dict[float, float | None] = {}
    last_error = None
    for lam in sorted(lambdas):
        try:
            alpha = fit_alpha(k_fit, y_fit, lam=lam, **solver)
        except NotPositiveDefinite as err:
            scores[lam], last_error = None, err
            continue
        pred = predict_scores(k_fit_val, alpha).argmax(axis=1)
        scores[lam] = float(np.mean(pred == train_labels[val]))
    ok = {lam: acc for lam, acc in scores.items() if acc is not None}
    if not ok:
        raise last_error
    best = max(ok.values())
    chosen = min(lam for lam, acc in ok.items() if acc == best)
    return {"lambda": chosen, "val_accuracy": scores, "n_fit": int(fit.size), "n_val": int(val.size),
            "seed": seed, "val_fraction": val_fraction}


def solve_kernel(gram: da.Array, *, labels: np.ndarray, n_train: int, lambdas=DEFAULT_LAMBDAS,
                 val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0, validate: bool = True,
                 **solver) -> dict:
    """Kernel regression for one Gram matrix: the paper's lam = 0 and the validated lam.

    gram: (N, N) dask array, rows/cols train then test; labels: (N,) int (test labels are used for
    scoring only, after predictions exist). Returns {"paper": fit, "validated": fit, "selection": ...}
    where a fit is {"lambda", "accuracy", "alpha" (n_train, C), "scores" (n_test, C), "predictions"}
    or {"lambda", "error", "smallest_working_lambda"} when K is not positive definite.
    """
    from cntk_gram.workers.preprocess import targets

    labels = np.asarray(labels)
    train_labels, test_labels = labels[:n_train], labels[n_train:]
    n_classes = int(train_labels.max()) + 1
    k_train, k_cross = gram[:n_train, :n_train], gram[:n_train, n_train:]
    y_train = targets(train_labels, n_classes=n_classes)

    def fit(lam: float) -> dict:
        try:
            alpha = fit_alpha(k_train, y_train, lam=lam, **solver)
        except NotPositiveDefinite as err:
            working = smallest_working_lambda(k_train, lambdas=lambdas, **solver)
            return {"lambda": lam, "error": not_pd_message(err, working, lambdas),
                    "smallest_working_lambda": working}
        scores = predict_scores(k_cross, alpha)
        predictions = scores.argmax(axis=1)
        return {"lambda": lam, "accuracy": float(np.mean(predictions == test_labels)), "alpha": alpha,
                "scores": scores, "predictions": predictions}

    result = {"n_train": int(n_train), "n_test": int(test_labels.size), "n_classes": n_classes,
              "paper": fit(0.0)}
    if validate:
        selection = select_lambda(k_train, train_labels, lambdas=lambdas, n_classes=n_classes,
                                  val_fraction=val_fraction, seed=seed, **solver)
        result["selection"] = selection
        same = selection["lambda"] == 0.0 and "alpha" in result["paper"]
        result["validated"] = result["paper"] if same else fit(selection["lambda"])
    return result


# ---------------------------------------------------------------- every kernel and depth of a store

def confusion_matrix(true: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts, rows = true class, columns = predicted class."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (true, predicted), 1)
    return counts


def solve_store(store_path, *, kernels=None, depths=None, progress=None, **options) -> list[dict]:
    """Solve every (kernel, depth) of a store, and every draw of a random-features kernel; save
    alpha/scores/predictions under solve/, return rows.

    kernels/depths: optional filters. options: lambdas, val_fraction, seed, validate, device,
    memory_budget, panel_width, scratch_dir. A row is JSON-able: kernel, depth, n_train, n_test, draw (only for
    random-features kernels, 'rf-...') and per setting ('paper': lam = 0, 'validated') lambda, accuracy (or
    error), confusion; plus 'selection'. Incomplete kernels give a row with 'error' instead of failing the whole
    store. Rows come sorted by kernel, depth, draw.
    """
    import zarr

    from cntk_gram.pipeline.errors import UserError
    from cntk_gram.pipeline.store import layout, open_gram, read_inputs, stored_arrays

    inputs = read_inputs(store_path)
    labels, n_train = np.asarray(inputs["labels"], dtype=np.int64), inputs["n_train"]
    if not (np.all(inputs["split"][:n_train] == 0) and np.all(inputs["split"][n_train:] == 1)):
        raise UserError(f"store {store_path}: inputs/split must list train rows before test rows")
    if inputs["n_test"] == 0:
        raise UserError(f"store {store_path} has no test images; nothing to score")
    stored = stored_arrays(layout(store_path))
    todo = [a for a in stored if (not kernels or a.key in kernels) and (not depths or a.depth in depths)]
    unknown = [f"--kernel {k}" for k in kernels or () if k not in {a.key for a in stored}] + \
              [f"--depth {d}" for d in depths or () if d not in {a.depth for a in stored}]
    if unknown or not todo:
        available = ", ".join(sorted({f"{a.key}@{a.depth}" for a in stored}))
        raise UserError(f"{', '.join(unknown) or '--kernel/--depth'}: not in {store_path}; "
                        f"the store has {available}")
    group = zarr.open_group(str(store_path), mode="r+")
    rows = []
    for key, depth, draw in todo:
        where = "" if draw is None else f" draw {draw}"
        if progress:
            progress(f"solving {key} depth {depth}{where}")
        row = {"kernel": key, "depth": depth, "n_train": n_train, "n_test": inputs["n_test"]}
        if draw is not None:
            row["draw"] = draw
        try:
            result = solve_kernel(open_gram(store_path, key, depth, draw), labels=labels, n_train=n_train,
                                  **options)
        except (IncompleteKernel, NotPositiveDefinite) as err:
            rows.append({**row, "error": str(err)})
            continue
        path = f"solve/{key}/depth-{depth}" + ("" if draw is None else f"/draw-{draw}")
        _save(group, path, result, labels[n_train:], row)
        rows.append(row)
    return rows


def _save(group, path: str, result: dict, test_labels: np.ndarray, row: dict) -> None:
    """Write arrays of each setting into the store and fill `row` with the JSON-able summary."""
    for setting in ("paper", "validated"):
        fit = result.get(setting)
        if fit is None:
            continue
        summary = {k: fit[k] for k in ("lambda", "accuracy", "error", "smallest_working_lambda") if k in fit}
        if "alpha" in fit:
            summary["confusion"] = confusion_matrix(test_labels, fit["predictions"],
                                                    max(result["n_classes"], int(test_labels.max()) + 1)).tolist()
            for name in ("alpha", "scores", "predictions"):
                group.create_array(f"{path}/{setting}/{name}", data=np.asarray(fit[name]), overwrite=True)
        row[setting] = summary
    if "selection" in result:
        sel = result["selection"]
        row["selection"] = {**sel, "val_accuracy": [{"lambda": lam, "accuracy": acc}
                                                    for lam, acc in sel["val_accuracy"].items()]}
    group.require_group(path).attrs.update({k: v for k, v in row.items()})
