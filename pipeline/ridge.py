"""Kernel ridge regression on one Gram matrix: the fit for one λ, the ridgeless fit (λ = 0) and a λ chosen on
held-out *training* images, with the options that steer all of it (SolveOptions).

What it does, exactly. Targets Y are 0.9 for the true class and -0.1 elsewhere; K is the training block:

    alpha = (K + λ·mean(diag K)·I)^-1 Y          scores = K(train, test)^T alpha          prediction = argmax

- `fit_alpha`: one factorisation (pipeline.linalg.cholesky_blocked) and two triangular solves.
- `solve_kernel`: the ridgeless fit (λ = 0); when options.validate, the λ of options.lambdas chosen by
  `select_lambda`, then ONE factorisation of the whole training block with it (the ridgeless fit is reused when
  λ* = 0). When a matrix has no Cholesky factor the fit carries the error and the smallest λ of the grid that
  does factor (`smallest_working_lambda`; a λ already known to factor or to fail is not factored again).
- `select_lambda` sees the training block and the training labels only. Two schemes (options.scheme; 'auto'
  picks 'subset' when n_train > options.subset_above, default 12,000, else 'full'):
  - 'full': each class is split (seeded, stratified) into fit images and options.val_fraction held out; every λ
    is fitted on all fit images (|grid| factorisations of ~0.9·n rows).
  - 'subset': a seeded, stratified held-out subset of options.val_size training images (default 5,000) and a
    disjoint stratified fit subset of at most options.val_fit of the others (default 10,000); every λ is fitted on
    the fit subset only (|grid| factorisations of 10,000 rows: ~35 s on 2 cores instead of hours at 45,000).
    λ is relative to the mean diagonal of the block being factored, so the choice transfers to the full fit.
  Ties go to the smallest λ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np

from cntk_gram.pipeline.linalg import (DEFAULT_MEMORY_BUDGET, IncompleteKernel, NotPositiveDefinite, Progress,
                                       cho_solve_blocked, cholesky_blocked, mean_diagonal, read_block)

DEFAULT_LAMBDAS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_VAL_FIT = 10_000        # subset scheme: at most this many training images fitted per λ
DEFAULT_VAL_SIZE = 5_000        # subset scheme: at most this many training images held out to score each λ
SUBSET_ABOVE = 12_000           # scheme 'auto': 'subset' above this many training images, else 'full'
SCHEMES = ("auto", "full", "subset")
IN_MEMORY_CHUNK = 1000          # chunk edge of a block read into memory (the panel plan keeps whole chunks)


@dataclass(frozen=True)
class SolveOptions:
    """Everything that steers a solve, from the CLI down to the factorisation.

    Result fields (recorded with every saved result; a saved result is reused only when they are the same):
      lambdas: the ridge grid (ridge = λ·mean(diag K)); validate: choose λ on held-out training images;
      scheme: 'auto' | 'full' | 'subset' (module docstring); val_fraction: held-out share per class ('full');
      val_fit, val_size: fit / held-out subset sizes ('subset'); subset_above: the n_train above which 'auto'
      means 'subset'; seed: of the split.
    Machine fields (change rounding or speed, not results): device 'cpu' | 'gpu' | 'auto'; memory_budget (bytes,
    CPU factorisation); panel_width (forces the panel width, tests); scratch_dir (out-of-core panels; None: the
    system temp dir).
    """
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    validate: bool = True
    scheme: str = "auto"
    val_fraction: float = DEFAULT_VAL_FRACTION
    val_fit: int = DEFAULT_VAL_FIT
    val_size: int = DEFAULT_VAL_SIZE
    subset_above: int = SUBSET_ABOVE
    seed: int = 0
    device: str = "cpu"
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    panel_width: int | None = None
    scratch_dir: Path | None = None

    def __post_init__(self):
        lambdas = tuple(sorted({float(x) for x in self.lambdas}))
        if not lambdas or any(not math.isfinite(x) or x < 0 for x in lambdas):
            raise ValueError(f"lambdas: need at least one finite value >= 0, got {self.lambdas!r}")
        object.__setattr__(self, "lambdas", lambdas)
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"validation fraction must lie in (0, 1), got {self.val_fraction}")
        if self.val_fit < 1 or self.val_size < 1:
            raise ValueError(f"val_fit and val_size must be >= 1, got {self.val_fit}, {self.val_size}")
        if self.scratch_dir is not None:
            object.__setattr__(self, "scratch_dir", Path(self.scratch_dir))

    def scheme_for(self, n_train: int) -> str:
        """'full' or 'subset': the validation scheme used for n_train training images."""
        if self.scheme != "auto":
            return self.scheme
        return "subset" if n_train > self.subset_above else "full"

    def record(self, n_train: int) -> dict:
        """The options that decide the results for n_train training images, as JSON: saved with every result,
        compared on resume."""
        out = {"lambdas": list(self.lambdas), "validate": self.validate}
        if self.validate:
            scheme = self.scheme_for(n_train)
            out.update(scheme=scheme, seed=self.seed)
            out.update({"val_fraction": self.val_fraction} if scheme == "full" else
                       {"val_fit": self.val_fit, "val_size": self.val_size})
        return out

    def factor_kwargs(self) -> dict:
        """Keyword arguments of linalg.cholesky_blocked."""
        return {"device": self.device, "memory_budget": self.memory_budget, "panel_width": self.panel_width,
                "scratch_dir": self.scratch_dir}


@dataclass
class Fit:
    """One ridge setting of one kernel. Solved: alpha (n_train, C), scores (n_test, C), predictions (n_test,),
    accuracy on the test labels. Not positive definite: error (one line) and smallest_working_lambda."""
    lam: float
    accuracy: float | None = None
    alpha: np.ndarray | None = field(default=None, repr=False)
    scores: np.ndarray | None = field(default=None, repr=False)
    predictions: np.ndarray | None = field(default=None, repr=False)
    error: str | None = None
    smallest_working_lambda: float | None = None

    @property
    def ok(self) -> bool:
        return self.alpha is not None


@dataclass
class Selection:
    """The λ chosen on held-out training images: val_accuracy {λ: accuracy, None when not positive definite};
    scheme 'full' | 'subset'; n_fit / n_val: images fitted / held out; val_fraction only for 'full'."""
    lam: float
    val_accuracy: dict[float, float | None]
    scheme: str
    n_fit: int
    n_val: int
    seed: int
    val_fraction: float | None = None


@dataclass
class KernelSolution:
    """solve_kernel's result: the ridgeless fit (λ = 0), the validated fit and its selection (None without
    validation; validated is the same object as ridgeless when λ* = 0)."""
    n_train: int
    n_test: int
    n_classes: int
    ridgeless: Fit
    validated: Fit | None = None
    selection: Selection | None = None


# ---------------------------------------------------------------- one λ

def fit_alpha(k_train: da.Array, y_train: np.ndarray, *, lam: float, options: SolveOptions = SolveOptions(),
              progress: Progress | None = None, label: str = "") -> np.ndarray:
    """alpha = (K + lam·mean(diag K)·I)^-1 Y. k_train (n, n); y_train (n, C) float64 -> (n, C) float64.
    Raises linalg.NotPositiveDefinite / IncompleteKernel."""
    shift = lam * mean_diagonal(k_train) if lam else 0.0
    factor = cholesky_blocked(k_train, shift=shift, lam=lam, progress=progress, label=label,
                              **options.factor_kwargs())
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


def smallest_working_lambda(k_train: da.Array, *, options: SolveOptions = SolveOptions(),
                            fails_at: float | None = None, works_at: float | None = None,
                            progress: Progress | None = None, label: str = "") -> float | None:
    """The smallest lam > 0 in options.lambdas for which K + lam·mean(diag)·I factors, or None.

    fails_at / works_at: a λ already known not to factor / to factor: smaller λ (and fails_at itself) are not
    tried, and the search stops at works_at without factoring it again."""
    unit = mean_diagonal(k_train)
    for lam in (x for x in options.lambdas if x > 0):
        if fails_at is not None and lam <= fails_at:
            continue
        if works_at is not None and lam >= works_at:
            return works_at
        if progress:
            progress(f"{label}λ = {lam:g}: does it factor? ({k_train.shape[0]:,} rows)")
        try:
            cholesky_blocked(k_train, shift=lam * unit, lam=lam, progress=progress, label=label,
                             **options.factor_kwargs()).close()
            return lam
        except NotPositiveDefinite:
            continue
    return None


def not_pd_message(err: NotPositiveDefinite | str, working: float | None, lambdas) -> str:
    """One line: what failed (the exception or its message) and the smallest lam in the grid that works (or how
    to get one)."""
    grid = ", ".join(f"{x:g}" for x in sorted(lambdas))
    if working is None:
        return f"{err}; no λ in the grid ({grid}) works: add larger values with --lambdas"
    return f"{err}; the smallest λ in the grid ({grid}) that works is {working:g}"


# ---------------------------------------------------------------- λ chosen on held-out training data

def validation_split(train_labels: np.ndarray, *, fraction: float = DEFAULT_VAL_FRACTION,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scheme 'full': stratified, seeded split of the *training* set into (fit, val) index arrays (sorted int64).

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


def _apportion(total: int, sizes: np.ndarray) -> np.ndarray:
    """Per-class counts proportional to sizes, each at most its size, summing to min(total, sum(sizes))
    (largest remainders get the rounding)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = min(int(total), int(sizes.sum()))
    if total <= 0:
        return np.zeros_like(sizes)
    exact = total * sizes / sizes.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact, kind="stable")[:total - counts.sum()]] += 1
    return np.minimum(counts, sizes)


def subset_split(train_labels: np.ndarray, *, fit_size: int = DEFAULT_VAL_FIT, val_size: int = DEFAULT_VAL_SIZE,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scheme 'subset': seeded, stratified, disjoint (fit, val) subsets of the *training* set (sorted int64).

    val_size images are held out, in class proportions (every class with two or more images keeps at least one
    held out and one not); then min(fit_size, the rest) images of the rest are fitted, in proportion to what each
    class has left. Each class's images are drawn in one seeded random order, held out first.
    """
    labels = np.asarray(train_labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    counts = np.array([m.size for m in members])
    n_val = _apportion(val_size, counts)
    n_val = np.where(counts >= 2, np.clip(n_val, 1, counts - 1), n_val)
    n_fit = _apportion(fit_size, counts - n_val)
    val = [m[:v] for m, v in zip(members, n_val)]
    fit = [m[v:v + f] for m, v, f in zip(members, n_val, n_fit)]
    return (np.sort(np.concatenate(fit)).astype(np.int64), np.sort(np.concatenate(val)).astype(np.int64))


def split_for(train_labels: np.ndarray, options: SolveOptions) -> tuple[np.ndarray, np.ndarray, str]:
    """(fit, val, scheme) of the options' validation scheme for these training labels."""
    scheme = options.scheme_for(len(train_labels))
    if scheme == "full":
        fit, val = validation_split(train_labels, fraction=options.val_fraction, seed=options.seed)
    else:
        fit, val = subset_split(train_labels, fit_size=options.val_fit, val_size=options.val_size, seed=options.seed)
    return fit, val, scheme


def select_lambda(k_train: da.Array, train_labels: np.ndarray, *, n_classes: int,
                  options: SolveOptions = SolveOptions(), progress: Progress | None = None,
                  label: str = "") -> Selection:
    """Choose λ by accuracy on held-out training images (options.scheme). Sees no test data at all.

    k_train: (n_train, n_train) dask array; train_labels: (n_train,) int. Ties go to the smallest λ.
    Raises NotPositiveDefinite when no λ in the grid factors on the fit images. The fit block (and the fit x
    held-out block) is read from the store once when it fits a quarter of the memory budget, else per λ.
    """
    from cntk_gram.workers.preprocess import targets

    train_labels = np.asarray(train_labels)
    if train_labels.shape != (k_train.shape[0],):
        raise ValueError(f"train_labels must have shape ({k_train.shape[0]},), got {train_labels.shape}")
    fit, val, scheme = split_for(train_labels, options)
    k_fit, k_fit_val = k_train[fit][:, fit], k_train[fit][:, val]
    quarter = options.memory_budget // 4
    if k_fit.size * 8 <= quarter:  # read once, reuse per λ
        if progress:
            progress(f"{label}validation ({scheme}): reading the {fit.size:,} x {fit.size:,} fit block")
        k_fit = da.from_array(read_block(k_fit, slice(None), slice(None)), chunks=IN_MEMORY_CHUNK)
        if (k_fit.size + k_fit_val.size) * 8 <= quarter:
            k_fit_val = da.from_array(read_block(k_fit_val, slice(None), slice(None)), chunks=IN_MEMORY_CHUNK)
    y_fit = targets(train_labels[fit], n_classes=n_classes)
    scores: dict[float, float | None] = {}
    last_error = None
    for lam in options.lambdas:
        if progress:
            progress(f"{label}validation ({scheme}): λ = {lam:g}, fit {fit.size:,} rows, score {val.size:,}")
        try:
            alpha = fit_alpha(k_fit, y_fit, lam=lam, options=options, progress=progress, label=label)
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
    return Selection(lam=chosen, val_accuracy=scores, scheme=scheme, n_fit=int(fit.size), n_val=int(val.size),
                     seed=options.seed, val_fraction=options.val_fraction if scheme == "full" else None)


# ---------------------------------------------------------------- one Gram matrix

def solve_kernel(gram: da.Array, *, labels: np.ndarray, n_train: int, options: SolveOptions = SolveOptions(),
                 progress: Progress | None = None, label: str = "", ridgeless: Fit | None = None) -> KernelSolution:
    """Kernel regression for one Gram matrix: the ridgeless λ = 0 fit and, with options.validate, the validated λ.

    gram: (N, N) dask array, rows/cols train then test; labels: (N,) int (test labels are used for scoring only,
    after predictions exist). ridgeless: the λ = 0 fit when it is already made (pipeline.curve factors once for
    several training-set sizes), else it is fitted here. A fit that is not positive definite carries error (its
    one line, then also the smallest λ of the grid that works) and smallest_working_lambda.
    Raises IncompleteKernel (NaN tiles) and NotPositiveDefinite (no λ of the grid factors on the fit images).
    """
    from cntk_gram.workers.preprocess import targets

    labels = np.asarray(labels)
    train_labels, test_labels = labels[:n_train], labels[n_train:]
    n_classes = int(train_labels.max()) + 1
    k_train, k_cross = gram[:n_train, :n_train], gram[:n_train, n_train:]
    y_train = targets(train_labels, n_classes=n_classes)

    def fit(lam: float) -> Fit:
        if progress:
            progress(f"{label}λ = {lam:g} on all {n_train:,} training rows")
        try:
            alpha = fit_alpha(k_train, y_train, lam=lam, options=options, progress=progress, label=label)
        except NotPositiveDefinite as err:
            return Fit(lam=lam, error=str(err))
        if progress:
            progress(f"{label}λ = {lam:g}: predicting {k_cross.shape[1]:,} test images")
        scores = predict_scores(k_cross, alpha)
        predictions = scores.argmax(axis=1)
        return Fit(lam=lam, accuracy=float(np.mean(predictions == test_labels)), alpha=alpha, scores=scores,
                   predictions=predictions)

    solution = KernelSolution(n_train=int(n_train), n_test=int(test_labels.size), n_classes=n_classes,
                              ridgeless=ridgeless if ridgeless is not None else fit(0.0))
    if options.validate:
        solution.selection = select_lambda(k_train, train_labels, n_classes=n_classes, options=options,
                                           progress=progress, label=label)
        chosen = solution.selection.lam
        if progress and chosen > 0 and chosen >= max(options.lambdas):
            progress(f"{label}note: the chosen λ = {chosen:g} is the largest in the grid; a grid reaching higher "
                     f"(--lambdas) may validate better")
        same = chosen == 0.0 and solution.ridgeless.ok
        solution.validated = solution.ridgeless if same else fit(chosen)
    # a fit that failed: name the smallest λ that factors, without factoring a λ known to work or to fail again
    fits = [f for f in (solution.ridgeless, solution.validated) if f is not None]
    failed = [f for f in fits if not f.ok]
    if failed:
        working = smallest_working_lambda(k_train, options=options, fails_at=max(f.lam for f in failed),
                                          works_at=min((f.lam for f in fits if f.ok), default=None),
                                          progress=progress, label=label)
        for f in failed:
            f.smallest_working_lambda = working
            f.error = not_pd_message(f.error, working, options.lambdas)
    return solution
