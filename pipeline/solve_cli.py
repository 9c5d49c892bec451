"""`cntk solve STORE` and `cntk paper CONFIG`: kernel regression on a store, tables and plots.

Thin click layer: options map one-to-one onto keyword arguments of cntk_gram.pipeline.solve.solve_store and
cntk_gram.pipeline.report.write_report.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import click

from cntk_gram.pipeline.errors import UserError
from cntk_gram.pipeline.paper import Protocol, matching_columns
from cntk_gram.pipeline.report import format_table, write_report
from cntk_gram.pipeline.solve import DEFAULT_LAMBDAS, DEFAULT_MEMORY_BUDGET, DEFAULT_VAL_FRACTION

UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_bytes(text: str) -> int:
    """'12GiB' / '500MB' / '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS:
        raise UserError(f"--memory-budget: cannot read {text!r}; use a number with a unit, e.g. 12GiB or 800MiB")
    value = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if value < 2**20:
        raise UserError(f"--memory-budget: {text!r} is below 1 MiB; give at least 1MiB (e.g. 12GiB)")
    return value


def parse_lambdas(text: str) -> tuple[float, ...]:
    """'0,1e-4,1e-2' -> (0.0, 1e-4, 1e-2); every value >= 0."""
    try:
        values = tuple(sorted({float(x) for x in str(text).split(",") if x.strip()}))
    except ValueError:
        raise UserError(f"--lambdas: cannot read {text!r}; give comma-separated numbers >= 0, "
                        f"e.g. 0,1e-4,1e-2") from None
    if not values or min(values) < 0 or not all(v == v and v != float("inf") for v in values):
        raise UserError(f"--lambdas: need at least one finite value >= 0, got {text!r}")
    return values


def solve_options(fn):
    """Options shared by `solve` and `paper`."""
    options = [
        click.option("--out", type=click.Path(file_okay=False), default=None,
                     help="Report directory [default: <store>-report beside the store]."),
        click.option("--kernel", "kernels", multiple=True, help="Only this kernel key (repeatable), e.g. ntk-vanilla."),
        click.option("--depth", "depths", multiple=True, type=int, help="Only this depth (repeatable)."),
        click.option("--lambdas", default=",".join(f"{x:g}" for x in DEFAULT_LAMBDAS), show_default=True,
                     help="Ridge grid λ (ridge = λ·mean(diag K)); λ=0 is always reported."),
        click.option("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, show_default=True,
                     help="Share of each training class held out to choose λ."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the validation split."),
        click.option("--no-validation", is_flag=True, help="Only the paper's λ=0, no λ selection."),
        click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
                     help="Where to factor: CuPy GPU when available for auto."),
        click.option("--memory-budget", default=f"{DEFAULT_MEMORY_BUDGET // 2**30}GiB", show_default=True,
                     help="Host memory the CPU factorisation may use; larger problems go out of core."),
        click.option("--scratch", type=click.Path(file_okay=False), default=None,
                     help="Directory for out-of-core factor panels [default: beside the store]."),
        click.option("--reference", type=click.Choice(["auto", "none"]), default="auto", show_default=True,
                     help="auto: print the paper's value where its protocol matches the store's "
                          "(training-set size, test set, classes); none: no paper column."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), fn)


def store_protocol(store: str | Path) -> Protocol:
    """How the store's images were chosen, from its attributes (decides which paper columns apply)."""
    from cntk_gram.pipeline.store import layout, store_attrs

    info = layout(store)
    return Protocol.from_config(store_attrs(store)["config"], n_train=info["n_train"], n_test=info["n_test"])


def default_out(store: str | Path) -> Path:
    path = Path(store).resolve()
    return path.parent / f"{path.name.removesuffix('.zarr')}-report"


def run_solve(store, *, out, kernels, depths, lambdas, val_fraction, seed, no_validation, device,
              memory_budget, scratch, reference, title=None, extra=None) -> dict:
    """Solve every kernel of `store`, print the table, write the report; return the written paths."""
    from cntk_gram.pipeline.solve import DeviceUnavailable, solve_store

    store = Path(store)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction: must lie strictly between 0 and 1, got {val_fraction}")
    scratch_dir = Path(scratch) if scratch else store.resolve().parent
    try:
        rows = solve_store(store, kernels=kernels, depths=depths, lambdas=parse_lambdas(lambdas),
                           val_fraction=val_fraction, seed=seed, validate=not no_validation,
                           device=device, memory_budget=parse_bytes(memory_budget), scratch_dir=scratch_dir,
                           progress=lambda msg: click.echo(msg, err=True))
    except DeviceUnavailable as exc:
        raise UserError(str(exc)) from None
    except PermissionError as exc:
        raise UserError(f"permission denied: {exc.filename or exc}") from None
    protocol = store_protocol(store) if reference == "auto" else None
    click.echo(format_table(rows, matching_columns(protocol)))
    for row in rows:
        for where in (row, row.get("paper", {}), row.get("validated", {})):
            if "error" in where:
                click.echo(f"note: {row['kernel']} depth {row['depth']}: {where['error']}", err=True)
    paths = write_report(rows, out_dir=Path(out) if out else default_out(store),
                         title=title or f"Kernel regression on {store.name}", protocol=protocol,
                         extra=extra)
    for name, path in paths.items():
        click.echo(f"{name}: {path}")
    return paths


@click.command()
@click.argument("store", type=click.Path())
@solve_options
def solve(store, **options):
    """Kernel regression for every kernel and depth in STORE: accuracies, predictions, report."""
    if not Path(store).exists():
        raise UserError(f"no store at {store}; make one with `cntk run CONFIG`")
    run_solve(store, **options)


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--scheduler", default=None, help="Dask scheduler address [default: the config's, else local].")
@click.option("--scheduler-file", default=None, type=click.Path(dir_okay=False), help="Dask scheduler file.")
@solve_options
def paper(config, scheduler, scheduler_file, **options):
    """Reproduce a paper table from CONFIG such as configs/paper/table1.yaml: kernel, solve, report.

    Runs `cntk run CONFIG`, then `cntk solve` on its store, and prints our accuracies next to the
    paper's wherever the paper measured under the same protocol."""
    from cntk_gram.pipeline import schedule
    from cntk_gram.pipeline.config import load_config

    run_config = load_config(config)
    summary = schedule.run(run_config, scheduler=scheduler, scheduler_file=scheduler_file, progress=True)
    run_solve(run_config.store, title=f"{Path(config).name}: ours vs the paper",
              extra={"config": str(config), "kernel_run": summary}, **options)
