"""An experiment end to end: solve a store and write its report; reproduce a paper table (run, then solve
and report). The `cntk solve` and `cntk paper` commands are thin wrappers over these."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cntk_gram.pipeline.errors import UserError
from cntk_gram.pipeline.paper import PaperColumn, Protocol
from cntk_gram.pipeline.results import SolveRow
from cntk_gram.pipeline.ridge import SolveOptions


@dataclass(frozen=True)
class Solved:
    """rows: solve_store's rows; paths: {name: path} of the report files; columns: kernel key -> the paper
    column printed beside it (only those measured under the store's protocol); store: the store solved;
    run: the kernel run's summary (pipeline.run.RunSummary) when the store was computed first (`reproduce`);
    curve: the learning curve's rows (solve.solve_store_with_curve), empty without train sizes."""
    rows: list[SolveRow]
    paths: dict[str, Path]
    columns: dict[str, PaperColumn]
    store: Path | None = None
    run: object | None = None
    curve: list[SolveRow] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        """What `cntk solve --json` / `cntk paper --json` print: {store, rows: [row dicts, results.SolveRow],
        paths: {json, markdown, accuracy_plot, confusion_plot (when a kernel was solved)}: file paths,
        paper_columns: {kernel: the paper column beside it}}, plus run (RunSummary fields) for `cntk paper`; with a
        learning curve also curve (its row dicts) and power_law (curve.power_law_fits; paths.learning_curve)."""
        out = {"store": None if self.store is None else str(self.store),
               "rows": [row.to_dict() for row in self.rows],
               "paths": {name: str(path) for name, path in self.paths.items()},
               "paper_columns": {kernel: column.label for kernel, column in sorted(self.columns.items())}}
        if self.curve:
            from cntk_gram.pipeline.curve import power_law_fits

            out["curve"] = [row.to_dict() for row in self.curve]
            out["power_law"] = power_law_fits(out["curve"])
        if self.run is not None:
            out["run"] = dataclasses.asdict(self.run)
        return out


def store_protocol(store: str | Path) -> Protocol:
    """How the store's images were chosen, from its attributes: decides which paper columns apply."""
    from cntk_gram.pipeline.store import layout, store_attrs

    info = layout(store)
    return Protocol.from_config(store_attrs(store)["config"], n_train=info["n_train"], n_test=info["n_test"])


def default_out(store: str | Path) -> Path:
    """Report directory beside the store: runs/cifar.zarr -> runs/cifar-report."""
    path = Path(store).resolve()
    return path.parent / f"{path.name.removesuffix('.zarr')}-report"


def solve_and_report(store: str | Path, options: SolveOptions = SolveOptions(), *, kernels=None, depths=None,
                     force: bool = False, out: str | Path | None = None, reference: bool = True,
                     title: str | None = None, extra: dict | None = None, train_sizes=(),
                     validate_sizes: bool = False, progress: Callable[[str], None] | None = None) -> Solved:
    """Solve every selected kernel of `store` (solve.solve_store) and write the report (report.write_report).

    options: how to solve (ridge.SolveOptions); its scratch_dir None means beside the store (same disk).
    kernels/depths: filters; force: solve again what is saved with the same options; out: report directory
    (default_out when None); reference: print the paper's values where its protocol matches the store's
    (pipeline.paper); extra: more top-level fields of results.json; train_sizes / validate_sizes: the learning curve
    (solve.solve_store_with_curve; its rows, power law and learning_curve.png go into the report).
    """
    from cntk_gram.pipeline.report import columns_for, write_report
    from cntk_gram.pipeline.solve import DeviceUnavailable, solve_store_with_curve

    store = Path(store)
    if not store.exists():
        raise UserError(f"no store at {store}; make one with `cntk run CONFIG`")
    if options.scratch_dir is None:
        options = dataclasses.replace(options, scratch_dir=store.resolve().parent)
    try:
        rows, curve = solve_store_with_curve(store, options, train_sizes=train_sizes, validate_sizes=validate_sizes,
                                             kernels=kernels, depths=depths, force=force, progress=progress)
    except DeviceUnavailable as exc:
        raise UserError(str(exc)) from None
    protocol = store_protocol(store) if reference else None
    paths = write_report(rows, out_dir=Path(out) if out else default_out(store),
                         title=title or f"Kernel regression on {store.name}", protocol=protocol, extra=extra,
                         curve=curve)
    return Solved(rows=rows, paths=paths, columns=columns_for(rows, protocol), store=store, curve=curve)


def reproduce(config_path: str | Path, options: SolveOptions = SolveOptions(), *, scheduler: str | None = None,
              scheduler_file: str | None = None, store: str | None = None, **report_options) -> Solved:
    """Compute the Gram matrix of a config such as configs/paper/table1.yaml (run.run, with a progress bar on
    stderr), then solve_and_report on its store (`store`, else the config's). report_options: the keyword
    arguments of solve_and_report."""
    from cntk_gram.pipeline.config import load_config
    from cntk_gram.pipeline.run import run

    config = load_config(config_path, {"store": store})
    summary = run(config, scheduler=scheduler, scheduler_file=scheduler_file, progress=True)
    solved = solve_and_report(config.store, options, title=f"{Path(config_path).name}: ours vs the paper",
                              extra={"config": str(config_path), "kernel_run": dataclasses.asdict(summary)},
                              **report_options)
    return dataclasses.replace(solved, run=summary)
