"""An experiment end to end: solve a store and write its report; reproduce a paper table (run, then solve
and report). The `cntk solve` and `cntk paper` commands are thin wrappers over these."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cntk_gram.pipeline.errors import UserError
from cntk_gram.pipeline.paper import PaperColumn, Protocol


@dataclass(frozen=True)
class Solved:
    """rows: solve_store's rows; paths: {name: path} of the report files; columns: kernel key -> the paper
    column printed beside it (only those measured under the store's protocol)."""
    rows: list[dict]
    paths: dict[str, Path]
    columns: dict[str, PaperColumn]


def store_protocol(store: str | Path) -> Protocol:
    """How the store's images were chosen, from its attributes: decides which paper columns apply."""
    from cntk_gram.pipeline.store import layout, store_attrs

    info = layout(store)
    return Protocol.from_config(store_attrs(store)["config"], n_train=info["n_train"], n_test=info["n_test"])


def default_out(store: str | Path) -> Path:
    """Report directory beside the store: runs/cifar.zarr -> runs/cifar-report."""
    path = Path(store).resolve()
    return path.parent / f"{path.name.removesuffix('.zarr')}-report"


def solve_and_report(store: str | Path, *, out: str | Path | None = None, reference: bool = True,
                     title: str | None = None, extra: dict | None = None, scratch_dir: str | Path | None = None,
                     progress: Callable[[str], None] | None = None, **solve_options) -> Solved:
    """Solve every selected kernel of `store` (solve.solve_store) and write the report (report.write_report).

    out: report directory (default_out when None); reference: print the paper's values where its protocol
    matches the store's (pipeline.paper);
    scratch_dir: out-of-core factor panels (default: beside the store); solve_options: the keyword
    arguments of solve_store (kernels, depths, lambdas, val_fraction, seed, validate, device, memory_budget).
    """
    from cntk_gram.pipeline.report import columns_for, write_report
    from cntk_gram.pipeline.solve import DeviceUnavailable, solve_store

    store = Path(store)
    if not store.exists():
        raise UserError(f"no store at {store}; make one with `cntk run CONFIG`")
    try:
        rows = solve_store(store, scratch_dir=Path(scratch_dir) if scratch_dir else store.resolve().parent,
                           progress=progress, **solve_options)
    except DeviceUnavailable as exc:
        raise UserError(str(exc)) from None
    protocol = store_protocol(store) if reference else None
    paths = write_report(rows, out_dir=Path(out) if out else default_out(store),
                         title=title or f"Kernel regression on {store.name}", protocol=protocol, extra=extra)
    return Solved(rows=rows, paths=paths, columns=columns_for(rows, protocol))


def reproduce(config_path: str | Path, *, scheduler: str | None = None, scheduler_file: str | None = None,
              **options) -> Solved:
    """Compute the Gram matrix of a config such as configs/paper/table1.yaml (run.run, with a progress bar),
    then solve_and_report on its store. options: those of solve_and_report."""
    from cntk_gram.pipeline.config import load_config
    from cntk_gram.pipeline.run import run

    config = load_config(config_path)
    summary = run(config, scheduler=scheduler, scheduler_file=scheduler_file, progress=True)
    return solve_and_report(config.store, title=f"{Path(config_path).name}: ours vs the paper",
                            extra={"config": str(config_path), "kernel_run": summary}, **options)
