"""The learning curve: kernel regression on the first n training images of a store for several n, scored on the
store's test images, and the power law fitted to its test error.

Ridgeless points (λ = 0) share ONE factorisation. For a fixed diagonal shift s (0 here) the Cholesky factor of
K[:n, :n] + s·I is the leading n x n block of the factor of K + s·I. So the factor of the largest size's block
serves every size: one forward pass over its panels for all sizes, one backward pass for all sizes at once
(linalg.prefix_solves) and one read of K(train, test) for every size's scores; in core and out of core alike.
That costs about one ridgeless solve of the largest size.

A validated λ per size (solve_store_with_curve's validate_sizes) shares nothing: the ridge λ·mean(diag K[:n, :n])
is another shift for every n, so each size has its own λ selection on its first n images (ridge.select_lambda)
and, when λ* > 0, its own factorisation of n rows.

Not positive definite at λ = 0: a factorisation that fails at row r still proves every leading block of r rows or
fewer positive definite; the largest size <= r is factored again (and so on), the sizes above r carry the error.

The power law: test error ≈ a·n^(-β) + c, least squares over the ridgeless points (fit_power_law).
"""
from __future__ import annotations

import dask.array as da
import numpy as np

from cntk_gram.pipeline.errors import UserError
from cntk_gram.pipeline.linalg import NotPositiveDefinite, Progress, cholesky_blocked, prefix_solves
from cntk_gram.pipeline.ridge import Fit, SolveOptions, predict_scores

MIN_FIT_POINTS = 4      # the power law has 3 parameters: fewer points than 4 would fit exactly


def parse_train_sizes(text: str) -> tuple[int, ...]:
    """'1000,2000,5000' -> (1000, 2000, 5000), checked by check_train_sizes (n_train unknown here)."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    for item in items or [""]:
        if not item.lstrip("+-").isdigit():
            raise UserError(f"--train-sizes: {item!r} is not a positive integer; give comma-separated training-set "
                            f"sizes, e.g. 1000,2000,5000")
    return check_train_sizes([int(item) for item in items])


def check_train_sizes(sizes, n_train: int | None = None) -> tuple[int, ...]:
    """The sizes, sorted, when each is a positive integer, none is repeated and none exceeds n_train (the store's
    training images; None: not checked). Otherwise UserError naming the bad size."""
    sizes = list(sizes)
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise UserError(f"--train-sizes: {n!r} is not a positive integer")
        if n_train is not None and n > n_train:
            raise UserError(f"--train-sizes: {n:,} is larger than the store's training set ({n_train:,} images)")
    repeated = sorted({int(n) for n in sizes if sizes.count(n) > 1})
    if repeated:
        raise UserError(f"--train-sizes: {', '.join(map(str, repeated))} given more than once")
    return tuple(sorted(int(n) for n in sizes))


def curve_record(options: SolveOptions, n: int, validate: bool) -> dict:
    """The options that decide a curve point of n images (saved with it, compared on resume): a ridgeless point
    depends on none; a validated one on the validation options (SolveOptions.record(n))."""
    return options.record(n) if validate else {"validate": False}


def prefix_gram(gram: da.Array, n: int, n_train: int) -> da.Array:
    """The Gram matrix of the first n training images and all test images: (n + n_test, n + n_test), rows and
    columns train then test, from gram (n_train + n_test, n_train + n_test)."""
    return da.block([[gram[:n, :n], gram[:n, n_train:]], [gram[n_train:, :n], gram[n_train:, n_train:]]])


def ridgeless_points(gram: da.Array, *, labels: np.ndarray, n_train: int, sizes, options: SolveOptions = SolveOptions(),
                     progress: Progress | None = None, label: str = "") -> dict[int, Fit]:
    """The λ = 0 fit on the first n training images for every n in sizes, from one factorisation (module docstring).

    gram: (N, N) dask array, rows/columns train (n_train) then test; labels: (N,) int; sizes: ints in 1..n_train.
    Returns {n: Fit}: alpha (n, C_n), scores (n_test, C_n), predictions (n_test,), accuracy, with C_n = 1 + the
    largest label among the first n images (as a store of those n images would have); or, when the first n rows
    are not positive definite, Fit(error=...). Raises linalg.IncompleteKernel (NaN tiles).
    """
    from cntk_gram.workers.preprocess import targets

    labels = np.asarray(labels)
    test_labels = labels[n_train:]
    todo, fits = sorted({int(n) for n in sizes}), {}
    while todo:
        m = todo[-1]
        if progress:
            shown = ", ".join(f"{n:,}" for n in todo)
            progress(f"{label}ridgeless curve: one factorisation of {m:,} rows for n = {shown}")
        try:
            factor = cholesky_blocked(gram[:m, :m], shift=0.0, lam=0.0, progress=progress, label=label,
                                      **options.factor_kwargs())
        except NotPositiveDefinite as err:
            failed = [n for n in todo if n > err.row] if err.row >= 0 else [m]
            for n in failed:   # their leading block holds the failing row (an unknown row: only m is known)
                fits[n] = Fit(lam=0.0, error=str(NotPositiveDefinite(lam=0.0, row=err.row, n=n)))
            todo = [n for n in todo if n not in failed]
            continue
        try:
            classes = {n: int(labels[:n].max()) + 1 for n in todo}
            alphas = prefix_solves(factor, targets(labels[:m], n_classes=max(classes.values())), todo)
        finally:
            factor.close()
        if progress:
            progress(f"{label}ridgeless curve: predicting {test_labels.size:,} test images for {len(todo)} sizes")
        fits.update(_predict(gram[:m, n_train:], {n: a[:, :classes[n]] for n, a in alphas.items()}, test_labels))
        todo = []
    return fits


def _predict(k_cross: da.Array, alphas: dict[int, np.ndarray], test_labels: np.ndarray) -> dict[int, Fit]:
    """Every size's scores from one read of k_cross (m, n_test): alphas {n: (n, C_n)} side by side, zero below
    row n, in one (m, sum C_n) matrix."""
    columns = np.cumsum([0] + [a.shape[1] for a in alphas.values()])
    stacked = np.zeros((k_cross.shape[0], columns[-1]))
    for (n, alpha), c0, c1 in zip(alphas.items(), columns, columns[1:]):
        stacked[:n, c0:c1] = alpha
    scores = predict_scores(k_cross, stacked)
    fits = {}
    for (n, alpha), c0, c1 in zip(alphas.items(), columns, columns[1:]):
        predictions = scores[:, c0:c1].argmax(axis=1)
        fits[n] = Fit(lam=0.0, accuracy=float(np.mean(predictions == test_labels)), alpha=alpha,
                      scores=np.ascontiguousarray(scores[:, c0:c1]), predictions=predictions)
    return fits


# ---------------------------------------------------------------- the power law

def fit_power_law(n, error) -> dict:
    """error ≈ a·n^(-beta) + c by least squares (scipy.optimize.curve_fit), with a >= 0, 0 <= beta <= 10 and
    0 <= c <= 1.

    n: (k,) training-set sizes; error: (k,) test error as a fraction in [0, 1]. Returns {a, beta, c (fractions of
    the error scale), rms_residual, max_residual (|error - fit|, fractions), n_min, n_max, points}; or {error
    (why there is no fit), n_min, n_max, points} with fewer than MIN_FIT_POINTS sizes or no convergence.
    """
    from scipy.optimize import curve_fit

    n, error = np.asarray(n, dtype=np.float64), np.asarray(error, dtype=np.float64)
    out = {"n_min": int(n.min()) if n.size else None, "n_max": int(n.max()) if n.size else None,
           "points": int(n.size)}
    if np.unique(n).size < MIN_FIT_POINTS:
        return {**out, "error": f"needs at least {MIN_FIT_POINTS} sizes, got {np.unique(n).size}"}
    scale = n.max()   # fit a·(n/scale)^-beta: parameters of order one

    def model(x, a, beta, c):
        return a * x ** -beta + c

    c0 = 0.5 * error.min()
    try:
        (a, beta, c), _ = curve_fit(model, n / scale, error, p0=(max(error[n.argmax()] - c0, 1e-6), 0.5, c0),
                                    bounds=([0.0, 0.0, 0.0], [np.inf, 10.0, 1.0]), maxfev=20000)
    except (RuntimeError, ValueError) as exc:
        return {**out, "error": f"the fit did not converge: {exc}"}
    residual = error - model(n / scale, a, beta, c)
    return {**out, "a": float(a * scale ** beta), "beta": float(beta), "c": float(c),
            "rms_residual": float(np.sqrt(np.mean(residual ** 2))), "max_residual": float(np.abs(residual).max())}


def power_law_fits(curve_rows: list[dict]) -> list[dict]:
    """One fit_power_law per exact kernel and depth of the curve rows (row dicts, results.SolveRow.to_dict), over
    their ridgeless test error: {kernel, depth, setting: 'ridgeless', **fit}, sorted by kernel and depth. Random-
    features rows (with a draw) are left out."""
    points: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for row in curve_rows:
        accuracy = (row.get("ridgeless") or {}).get("accuracy")
        if row.get("draw") is None and accuracy is not None:
            points.setdefault((row["kernel"], row["depth"]), []).append((row["n_train"], 1.0 - accuracy))
    return [{"kernel": kernel, "depth": depth, "setting": "ridgeless", **fit_power_law(*zip(*sorted(pts)))}
            for (kernel, depth), pts in sorted(points.items())]
