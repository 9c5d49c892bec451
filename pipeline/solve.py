"""Solve a store: kernel ridge regression for every selected kernel and depth (and random-features draw),
results saved into the store as they are made, and reused when the same options solve the store again.

`solve_store(store, options)` walks the store's gram/ arrays in order (kernel, depth, draw). For each one it
either takes the row saved under solve/... (pipeline.results) when that row was solved with the same result
options (ridge.SolveOptions.record) and `force` is off, or reads the Gram matrix lazily (store.open_gram),
solves it (ridge.solve_kernel: linear algebra in pipeline.linalg) and saves the arrays and then the row. So a
solve killed part-way loses at most the kernel it was solving; rerunning it continues there. A kernel whose
tiles are not all computed gives a row with an error (not saved: it is tried again next time); the others are
still solved. Scratch directories of killed solves (linalg.remove_stale_scratch) are removed first.
"""
from __future__ import annotations

import time

import numpy as np

from cntk_gram.pipeline.linalg import (DeviceUnavailable, IncompleteKernel, NotPositiveDefinite, Progress,
                                       array_module, remove_stale_scratch)
from cntk_gram.pipeline.results import FitSummary, SelectionSummary, SolveRow, save_row, saved_row, solution_path
from cntk_gram.pipeline.ridge import Fit, KernelSolution, SolveOptions, solve_kernel

__all__ = ["solve_store", "confusion_matrix", "DeviceUnavailable", "SolveOptions"]


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
    array_module(options.device)   # DeviceUnavailable before anything is solved
    remove_stale_scratch(options.scratch_dir)
    record = options.record(n_train)
    group = zarr.open_group(str(store_path), mode="r+")
    rows = []
    for key, depth, draw in todo:
        name = f"{key} depth {depth}" + ("" if draw is None else f" draw {draw}")
        saved = None if force else saved_row(group, solution_path(key, depth, draw))
        if saved is not None and saved.options == record:
            if progress:
                progress(f"{name}: solved before with the same options, reused (--force solves it again)")
            saved.reused = True
            rows.append(saved)
            continue
        if progress:
            progress(f"solving {name}")
        row = SolveRow(kernel=key, depth=depth, n_train=n_train, n_test=inputs["n_test"], draw=draw, options=record)
        started = time.time()
        try:
            solution = solve_kernel(open_gram(store_path, key, depth, draw), labels=labels, n_train=n_train,
                                    options=options, progress=progress, label=f"{name}: ")
        except IncompleteKernel as err:
            row.error = str(err)
            rows.append(row)
            continue
        except NotPositiveDefinite as err:   # no λ of the grid factors on the fit images
            row.error = str(err)
            solution = None
        arrays = {} if solution is None else _fill(row, solution, labels[n_train:])
        row.solved_at, row.solve_seconds = time.time(), round(time.time() - started, 3)
        save_row(group, row, arrays)
        rows.append(row)
    return rows


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

