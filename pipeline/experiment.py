"""An experiment end to end: solve a store and write its report; reproduce a paper table (run, then solve
and report). The `cntk solve` and `cntk paper` commands are thin wrappers over these."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cntk_gram.pipeline.errors import UserError


@dataclass(frozen=True)
class Solved:
    """rows: solve_store's rows; paths: {name: path} of the report files; reference: the paper table used
    (a key of report.PAPER_REFERENCE) or None."""
    rows: list[dict]
    paths: dict[str, Path]
    reference: str | None


def default_out(store: str | Path) -> Path:
    """Report directory beside the store: runs/cifar.zarr -> runs/cifar-report."""
    path = Path(store).resolve()
    return path.parent / f"{path.name.removesuffix('.zarr')}-report"


def solve_and_report(store: str | Path, *, out: str | Path | None = None, reference: str | None = None,
                     title: str | None = None, extra: dict | None = None, scratch_dir: str | Path | None = None,
                     progress: Callable[[str], None] | None = None, **solve_options) -> Solved:
    """Solve every selected kernel of `store` (solve.solve_store) and write the report (report.write_report).

    out: report directory (default_out when None); reference: paper table to compare with, None for none;
    scratch_dir: out-of-core factor panels (default: beside the store); solve_options: the keyword
    arguments of solve_store (kernels, depths, lambdas, val_fraction, seed, validate, device, memory_budget).
    """
    from cntk_gram.pipeline.report import write_report
    from cntk_gram.pipeline.solve import DeviceUnavailable, solve_store

    store = Path(store)
    if not store.exists():
        raise UserError(f"no store at {store}; make one with `cntk run CONFIG`")
    try:
        rows = solve_store(store, scratch_dir=Path(scratch_dir) if scratch_dir else store.resolve().parent,
                           progress=progress, **solve_options)
    except DeviceUnavailable as exc:
        raise UserError(str(exc)) from None
    paths = write_report(rows, out_dir=Path(out) if out else default_out(store),
                         title=title or f"Kernel regression on {store.name}", reference_name=reference, extra=extra)
    return Solved(rows=rows, paths=paths, reference=reference)


def reproduce(config_path: str | Path, *, scheduler: str | None = None, scheduler_file: str | None = None,
              reference: str | None = None, **options) -> Solved:
    """Compute the Gram matrix of a config such as configs/paper/table1.yaml (run.run, with a progress bar),
    then solve_and_report on its store. reference None picks the paper table named like the config file,
    if there is one; 'none' compares with no table. options: those of solve_and_report."""
    from cntk_gram.pipeline.config import load_config
    from cntk_gram.pipeline.report import PAPER_REFERENCE
    from cntk_gram.pipeline.run import run

    config = load_config(config_path)
    summary = run(config, scheduler=scheduler, scheduler_file=scheduler_file, progress=True)
    if reference is None:
        stem = Path(config_path).stem
        reference = stem if stem in PAPER_REFERENCE else None
    elif reference == "none":
        reference = None
    return solve_and_report(config.store, reference=reference, title=f"{Path(config_path).name}: ours vs the paper",
                            extra={"config": str(config_path), "kernel_run": summary}, **options)
