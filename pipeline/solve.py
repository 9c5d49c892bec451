"""Solve a store: kernel ridge regression for every selected kernel and depth (and random-features draw),
results saved into the store as they are made, and reused when the same options solve the store again.

`solve_store(store, options)` walks the store's gram/ arrays in order (kernel, depth, draw). For each one it
either takes the row saved under solve/... (pipeline.results) when that row was solved with the same result
options (ridge.SolveOptions.record) and `force` is off, or reads the Gram matrix lazily (store.open_gram),
solves it (ridge.solve_kernel: linear algebra in pipeline.linalg) and saves the arrays and then the row. So a
solve killed part-way loses at most the kernel it was solving; rerunning it continues there. A kernel whose
tiles are not all computed gives a row with an error (not saved: it is tried again next time); the others are
still solved. Scratch directories of killed solves (linalg.remove_stale_scratch) are removed first.

`solve_store_with_curve(store, options, train_sizes=...)` does the same and adds the learning curve: per kernel the
points of the first n training images (pipeline.curve), saved under the row's group as train-{n} and reused the
same way; the ridgeless points and the row's λ = 0 fit come from one factorisation.
"""
from __future__ import annotations

import time

import numpy as np

from cntk_gram.pipeline.curve import check_train_sizes, curve_record, prefix_gram, ridgeless_points
from cntk_gram.pipeline.linalg import (DeviceUnavailable, IncompleteKernel, NotPositiveDefinite, Progress,
                                       array_module, remove_stale_scratch)
from cntk_gram.pipeline.results import (FitSummary, SelectionSummary, SolveRow, curve_path, save_row, saved_row,
                                        solution_path)
from cntk_gram.pipeline.ridge import Fit, KernelSolution, SolveOptions, solve_kernel

__all__ = ["solve_store", "solve_store_with_curve", "confusion_matrix", "DeviceUnavailable", "SolveOptions"]


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts, rows = true class, columns = predicted class."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (true, predicted), 1)
    return counts


def solve_store(store_path, options: SolveOptions = SolveOptions(), *, kernels=None, depths=None,
                force: bool = False, progress: Progress | None = None) -> list[SolveRow]:
    """Solve every (kernel, depth) of a store, and every draw of a random-features kernel; save
    alpha/scores/predictions and the row under solve/; return the rows sorted by kernel, depth, draw.

    kernels/depths: optional filters (UserError naming what the store has when one matches nothing).
    force: solve again even where a row with the same options is saved. progress: one-line messages (the CLI
    prints them on stderr): each kernel, each λ fitted, each panel of a long factorisation with an ETA.
    """
    return solve_store_with_curve(store_path, options, kernels=kernels, depths=depths, force=force,
                                  progress=progress)[0]


def solve_store_with_curve(store_path, options: SolveOptions = SolveOptions(), *, train_sizes=(),
                           validate_sizes: bool = False, kernels=None, depths=None, force: bool = False,
                           progress: Progress | None = None) -> tuple[list[SolveRow], list[SolveRow]]:
    """solve_store, and the learning curve (pipeline.curve): kernel regression on the first n training images for
    every n in train_sizes, scored on all test images, saved under solve/.../train-{n} and reused like a row.

    Returns (rows, curve): rows as solve_store returns them; curve: one row per kernel, depth (, draw) and size,
    n_train = the size, for the sizes of train_sizes and the store's own training-set size (that one is its row of
    `rows`), sorted by kernel, depth, draw and size; empty without train_sizes. The ridgeless points of one kernel
    share one factorisation with its row; validate_sizes also chooses λ per size (its own factorisations).
    UserError for a size that is not a positive integer, repeated, or larger than the store's training set.
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
    sizes = [n for n in check_train_sizes(train_sizes, n_train) if n != n_train]
    if validate_sizes and not (train_sizes and options.validate):
        raise UserError("--validate-sizes: needs --train-sizes and validation (drop --no-validation)")
    stored = stored_arrays(layout(store_path))
    todo = [a for a in stored if (not kernels or a.key in kernels) and (not depths or a.depth in depths)]
    unknown = [f"--kernel {k}" for k in kernels or () if k not in {a.key for a in stored}] + \
              [f"--depth {d}" for d in depths or () if d not in {a.depth for a in stored}]
    if unknown or not todo:
        available = ", ".join(sorted({f"{a.key}@{a.depth}" for a in stored}))
        raise UserError(f"{', '.join(unknown) or '--kernel/--depth'}: not in {store_path}; "
                        f"the store has {available}")
    array_module(options.device)   # DeviceUnavailable before anything is solved
    remove_stale_scratch(options.scratch_dir)
    record = options.record(n_train)
    group = zarr.open_group(str(store_path), mode="r+")
    rows, curve = [], []
    for key, depth, draw in todo:
        name = f"{key} depth {depth}" + ("" if draw is None else f" draw {draw}")

        def new_row(n: int, **fields) -> SolveRow:
            """This kernel's row of the first n training images (n_train: the ordinary row)."""
            return SolveRow(kernel=key, depth=depth, n_train=n, n_test=inputs["n_test"], draw=draw, **fields,
                            options=record if n == n_train else curve_record(options, n, validate_sizes))

        saved = None if force else saved_row(group, solution_path(key, depth, draw))
        main = saved if saved is not None and saved.options == record else None
        if main is not None:
            main.reused = True
        points = {} if force else _saved_points(group, key, depth, draw, sizes, options, validate_sizes)
        missing = [n for n in sizes if n not in points]
        if progress and main is not None:
            progress(f"{name}: solved before with the same options, reused (--force solves it again)")
        if progress and points:
            progress(f"{name}: curve points n = {', '.join(f'{n:,}' for n in points)} solved before, reused")
        if main is None or missing:
            if progress:
                progress(f"solving {name}" + ("" if not missing else
                                              f": curve points n = {', '.join(f'{n:,}' for n in missing)}"))
            gram = open_gram(store_path, key, depth, draw)
            started = time.time()
            try:
                fits = ridgeless_points(gram, labels=labels, n_train=n_train, options=options, progress=progress,
                                        label=f"{name}: ", sizes=missing + ([n_train] if main is None else [])
                                        ) if sizes else {}
            except IncompleteKernel as err:   # nothing is saved: tried again next time
                main = main or new_row(n_train, error=str(err))
                points.update({n: new_row(n, error=str(err)) for n in missing})
                missing = []
            if main is None:
                main = new_row(n_train)
                _solve(group, main, gram, started=started, labels=labels, n_train=n_train, options=options,
                       progress=progress, label=f"{name}: ", ridgeless=fits.get(n_train))
            for n in missing:
                points[n] = new_row(n)
                _solve(group, points[n], prefix_gram(gram, n, n_train), started=started,
                       labels=np.concatenate([labels[:n], labels[n_train:]]), n_train=n, options=options,
                       progress=progress, label=f"{name}, n = {n:,}: ", ridgeless=fits[n], validate=validate_sizes,
                       path=curve_path(key, depth, draw, n))
        rows.append(main)
        if train_sizes:
            curve += [points[n] for n in sorted(points)] + [main]
    return rows, curve


def _saved_points(group, key, depth, draw, sizes, options: SolveOptions, validate: bool) -> dict[int, SolveRow]:
    """{n: the curve row saved for n with the same options}, marked reused."""
    points = {}
    for n in sizes:
        row = saved_row(group, curve_path(key, depth, draw, n))
        if row is not None and row.options == curve_record(options, n, validate):
            row.reused = True
            points[n] = row
    return points


def _solve(group, row: SolveRow, gram, *, started: float, labels: np.ndarray, n_train: int, options: SolveOptions,
           progress: Progress | None, label: str, ridgeless: Fit | None, validate: bool = True,
           path: str | None = None) -> None:
    """Solve `row` on gram (rows/columns: n_train train, then test; labels likewise) and save it at path (default
    its own), unless its tiles are not all computed (row.error says so; nothing saved: tried again next time).
    ridgeless: the λ = 0 fit when made already; validate False: that fit only (a curve point)."""
    if validate:
        try:
            solution = solve_kernel(gram, labels=labels, n_train=n_train, options=options, progress=progress,
                                    label=label, ridgeless=ridgeless)
        except IncompleteKernel as err:
            row.error = str(err)
            return
        except NotPositiveDefinite as err:   # no λ of the grid factors on the fit images
            row.error = str(err)
            solution = None
    else:   # a ridgeless curve point: not positive definite is its error (no λ searched)
        row.error = ridgeless.error
        solution = None if not ridgeless.ok else KernelSolution(
            n_train=n_train, n_test=labels.size - n_train, n_classes=ridgeless.alpha.shape[1], ridgeless=ridgeless)
    arrays = {} if solution is None else _fill(row, solution, labels[n_train:])
    row.solved_at, row.solve_seconds = time.time(), round(time.time() - started, 3)
    save_row(group, row, arrays, path)


def _fill(row: SolveRow, solution: KernelSolution, test_labels: np.ndarray) -> dict[str, dict]:
    """Put the solution's summaries into `row`; return the arrays to save {setting: {name: array}}."""
    n_classes = max(solution.n_classes, int(test_labels.max()) + 1)
    arrays = {}
    for setting in ("ridgeless", "validated"):
        fit: Fit | None = getattr(solution, setting)
        if fit is None:
            continue
        summary = FitSummary(lam=fit.lam, accuracy=fit.accuracy, error=fit.error,
                             smallest_working_lambda=fit.smallest_working_lambda)
        if fit.ok:
            summary.confusion = confusion_matrix(test_labels, fit.predictions, n_classes).tolist()
            arrays[setting] = {"alpha": fit.alpha, "scores": fit.scores, "predictions": fit.predictions}
        setattr(row, setting, summary)
    sel = solution.selection
    if sel is not None:
        row.selection = SelectionSummary(
            lam=sel.lam, val_accuracy=[{"lambda": lam, "accuracy": acc} for lam, acc in sel.val_accuracy.items()],
            scheme=sel.scheme, n_fit=sel.n_fit, n_val=sel.n_val, seed=sel.seed, val_fraction=sel.val_fraction)
    return arrays

