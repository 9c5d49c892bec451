"""`cntk` command line: every command, as thin click wrappers over the library modules.

Library code raises UserError, or OSError for files; _Command turns either into one `Error: ...` line (on stderr)
and exit status 2, for every command. `verify` exits 1 when it finds damage.

`run`, `status`, `solve` and `paper` take --json: then stdout holds exactly one JSON object (fields in each
command's help) and nothing else; progress bars and messages always go to stderr.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import click

from cntk_gram.pipeline.config import parse_bytes
from cntk_gram.pipeline.curve import parse_train_sizes
from cntk_gram.pipeline.errors import UserError
from cntk_gram.pipeline.ridge import (DEFAULT_LAMBDAS, DEFAULT_MEMORY_BUDGET, DEFAULT_VAL_FIT, DEFAULT_VAL_FRACTION,
                                      DEFAULT_VAL_SIZE, SUBSET_ABOVE, SolveOptions)
from cntk_gram.workers.vocab import BACKEND_CHOICES


# --- errors at the edge ---------------------------------------------------------------------------

def error_line(exc: UserError | OSError) -> str:
    """The one line shown for an error the user can cause and fix."""
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or exc}"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    return str(exc)


class _Failure(click.ClickException):
    exit_code = 2


class _Command(click.Command):
    """A command that ends a UserError or OSError with error_line and exit status 2, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UserError, OSError) as exc:
            raise _Failure(error_line(exc)) from None


class _Group(click.Group):
    command_class = _Command


@click.group(cls=_Group)
@click.version_option(package_name="cntk-gram")
def main():
    """Exact convolutional neural tangent kernels on CIFAR-10 (or CIFAR-100, SVHN, your own arrays), as a tiled,
    resumable Gram matrix."""


# --- option parsing -------------------------------------------------------------------------------

def scheduler_options(fn):
    """--scheduler and --scheduler-file: an existing Dask cluster (default: the config's cluster)."""
    fn = click.option("--scheduler-file", default=None, metavar="FILE",
                      help="Scheduler file of a running Dask cluster (`dask scheduler --scheduler-file`).")(fn)
    return click.option("--scheduler", default=None, metavar="ADDRESS",
                        help="Address of a running Dask scheduler, e.g. tcp://host:8786.")(fn)


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated integers, got {text!r}") from None


def echo_json(obj) -> None:
    """The one JSON object of a --json command, on stdout."""
    click.echo(json.dumps(obj, allow_nan=False))


def json_option(fields: str):
    """--json: print one JSON object with `fields` on stdout instead of the text."""
    return click.option("--json", "as_json", is_flag=True,
                        help=f"Print one JSON object on stdout instead of the text: {fields}. "
                             f"Progress and messages go to stderr.")


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [v.strip() for v in text.split(",") if v.strip()]


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


# --- computing the Gram matrix --------------------------------------------------------------------

@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--store", help="Store path (overrides `store`).")
@click.option("--data-root", help="Directory holding the source's official files, e.g. cifar-10-batches-py/ "
                                  "(overrides data.root).")
@click.option("--data-path", help="An arrays source's .npz file or Zarr group (overrides data.path).")
@click.option("--train", type=int, help="First N training images (overrides data.train).")
@click.option("--test", type=int, help="First N test images (overrides data.test).")
@click.option("--tile-size", type=int, help="Tile edge in images; must divide the training count.")
@click.option("--archs", help="Comma-separated: vanilla,gap,fc (overrides kernel.archs).")
@click.option("--kinds", help="Comma-separated: ntk,nngp (overrides kernel.kinds).")
@click.option("--depths", help="Comma-separated depths, e.g. 3,4,6,11,21 (overrides kernel.depths).")
@click.option("--lap", help="Comma-separated LAP sizes c >= 0, e.g. 2,4,8 (overrides kernel.lap; needs gap).")
@click.option("--flip/--no-flip", default=None, help="Flip-averaged kernels too (overrides kernel.flip).")
@click.option("--no-random-features", is_flag=True,
              help="Ignore the config's kernel.random_features block: exact kernels only.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), help="Kernel backend.")
@scheduler_options
@click.option("--workers", type=int, help="Worker processes of the embedded local cluster.")
@click.option("--threads", type=int, help="Numba threads per local worker (default: cores / workers).")
@click.option("--slots", type=int,
              help="Tile tasks one local worker runs at once (default: 3 per GPU worker, 1 per CPU worker).")
@click.option("--max-in-flight", type=int, help="Tile tasks submitted at once.")
@click.option("--retries", type=int, help="Retries of a failed tile task.")
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
@click.option("--dry-run", is_flag=True,
              help="Print what the run would cost (tiles, pairs, store bytes, free disk, predicted time) and compute "
                   "nothing; with --json: the cost fields, fits, and predicted {seconds, worker_seconds, workers, "
                   "backend, parts, source, load, reason} (docs/predict.md).")
@click.option("--recalibrate", is_flag=True,
              help="Probe this machine again for the predicted time instead of using its cached rates.")
@click.option("--trust-records", is_flag=True,
              help="On resume, skip re-checking the checksums of tiles already done (faster on huge stores).")
@json_option("store, backend, kernels, depths, n_train, n_test, tile, tiles_total, tiles_done_before, "
             "tiles_damaged, tiles_computed, pairs_computed, wall_seconds, prepare_seconds, store_bytes, "
             "predicted_seconds")
def run(config_file, store, data_root, data_path, train, test, tile_size, archs, kinds, depths, lap, flip, no_random_features,
        backend, scheduler, scheduler_file, workers, threads, slots, max_in_flight, retries, progress,
        trust_records, dry_run, recalibrate, as_json):
    """Compute (or resume) the Gram matrix described by CONFIG_FILE."""
    import dataclasses

    from cntk_gram.pipeline.config import load_config
    from cntk_gram.pipeline.run import run as run_config

    overrides = {
        "store": store, "data.root": data_root, "data.path": data_path, "data.train": train, "data.test": test,
        "tiles.size": tile_size, "kernel.archs": _names(archs), "kernel.kinds": _names(kinds),
        "kernel.depths": _ints(depths), "kernel.lap": _ints(lap), "kernel.flip": flip,
        "kernel.random_features": False if no_random_features else None,
        "backend": backend, "cluster.scheduler": scheduler,
        "cluster.scheduler_file": scheduler_file, "cluster.workers": workers, "cluster.threads": threads,
        "cluster.slots": slots, "cluster.max_in_flight": max_in_flight, "cluster.retries": retries,
    }
    config = load_config(config_file, overrides)
    if dry_run:
        _show_plan(config, as_json, recalibrate=recalibrate)
        return
    s = run_config(config, progress=progress, verify=not trust_records, recalibrate=recalibrate)
    if as_json:
        echo_json(dataclasses.asdict(s))
        return
    click.echo(f"store     {s.store}\n"
               f"kernels   {', '.join(s.kernels)} at depths {', '.join(map(str, s.depths))} "
               f"(backend {s.backend})\n"
               f"images    {s.n_train} train + {s.n_test} test, tile {s.tile}\n"
               f"tiles     {s.tiles_computed} computed ({s.tiles_damaged} damaged recomputed), "
               f"{s.tiles_done_before} already done, {s.tiles_total} total\n"
               f"pairs     {s.pairs_computed:,} computed in {s.wall_seconds:.1f} s wall")


def _show_plan(config, as_json: bool, *, recalibrate: bool = False) -> None:
    """--dry-run: the run's cost (tiles, pairs, bytes, free disk) and predicted time (the slow-CPU warning on
    stderr); an Error line and exit 2 when it cannot fit."""
    import dataclasses

    from cntk_gram.pipeline.run import check_disk, describe_cost, dry_run

    cost, prediction, warning = dry_run(config, recalibrate=recalibrate)
    if warning:
        click.echo(warning, err=True)
    if as_json:
        predicted = {k: v for k, v in dataclasses.asdict(prediction).items() if k not in ("rates", "made")}
        echo_json({"store": str(config.store), **dataclasses.asdict(cost), "fits": cost.fits, "predicted": predicted})
    else:
        click.echo(describe_cost(cost, prediction))
    check_disk(cost, config.store)


@main.command("submit")
@click.argument("config_path", metavar="CONFIG")
@scheduler_options
@click.option("--store", default=None, help="Store path (overrides the config's store).")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default=None,
              help="Tile backend on the workers (overrides the config).")
def submit(config_path, scheduler, scheduler_file, store, backend):
    """Queue CONFIG's missing tiles on a running cluster and return; follow with `cntk status STORE`."""
    from cntk_gram.pipeline.config import load_config
    from cntk_gram.pipeline.run import submit as submit_config

    config = load_config(config_path, {"store": store, "backend": backend})
    summary = submit_config(config, scheduler=scheduler, scheduler_file=scheduler_file)
    click.echo(f"submitted {summary['tiles_submitted']} of {summary['tiles_total']} tiles "
               f"({summary['tiles_done_before']} already done, {summary['tiles_damaged']} damaged) "
               f"to {summary['scheduler']}, backend {summary['backend']}"
               + (" (no worker has joined yet: each tile's worker decides)" if summary["backend"] == "auto" else ""))
    click.echo(f"follow with: cntk status {summary['store']}")


@main.command("cancel")
@click.argument("store_path", metavar="STORE")
@scheduler_options
def cancel(store_path, scheduler, scheduler_file):
    """Stop STORE's outstanding tiles: queued tasks are dropped, running tiles finish."""
    from cntk_gram.pipeline.run import cancel as cancel_store

    summary = cancel_store(store_path, scheduler=scheduler, scheduler_file=scheduler_file)
    dropped = "" if summary["tasks_cancelled"] is None else f"; {summary['tasks_cancelled']} queued tasks dropped"
    click.echo(f"cancel flag set in {summary['store']}{dropped}; `cntk submit` clears it")


@main.command("tls")
@click.argument("scheduler_file", metavar="SCHEDULER_FILE", type=click.Path(dir_okay=False))
@click.option("--new", is_flag=True, help="Make a fresh certificate and key even when the folder has them.")
def tls(scheduler_file, new):
    """Make the TLS certificate and key of the cluster whose scheduler will write SCHEDULER_FILE, in the private
    folder beside it (runs/scheduler.json -> runs/scheduler-tls/), unless they are there already. The deploy/
    scripts call this; the scheduler, its workers and every `cntk` command given the scheduler file find them."""
    from cntk_gram.pipeline.cluster import make_tls, tls_dir

    click.echo(make_tls(tls_dir(scheduler_file), new=new))


# --- looking into a store -------------------------------------------------------------------------

@main.command()
@click.argument("store", type=click.Path())
@json_option("store, tiles_done, tiles_total, pairs_done, pairs_total, per_array {array: {done, total}}, "
             "pairs_per_second (recent tiles; null if unknown), eta_seconds (null if unknown), eta_source "
             "(predicted until the latest run's first tile finishes, then measured; null if unknown), "
             "predicted_seconds (the latest run's prediction; null if none), "
             "last_finished (epoch seconds; null if none)")
def status(store, as_json):
    """Done / total tiles per kernel array, throughput and ETA."""
    from cntk_gram.pipeline.inspect import format_seconds, status as store_status

    s = store_status(store)
    if as_json:
        per_array = {name: {"done": done, "total": total} for name, (done, total) in s["per_array"].items()}
        echo_json({"store": str(store), **s, "per_array": per_array})
        return
    click.echo(f"tiles {s['tiles_done']}/{s['tiles_total']}, pairs {s['pairs_done']:,}/{s['pairs_total']:,}")
    for name, (done, total) in s["per_array"].items():
        click.echo(f"  {name:28s} {done}/{total}")
    rate = s["pairs_per_second"]
    last = "never" if s["last_finished"] is None else time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime(s["last_finished"]))
    running = s["tiles_done"] < s["tiles_total"]
    eta = f"{format_seconds(s['eta_seconds'])}" + (f" ({s['eta_source']})" if s["eta_source"] else "") \
        if running else "done"
    click.echo(f"throughput {'unknown' if rate is None else f'{rate:,.1f} pairs/s'} (recent tiles), "
               f"ETA {eta}, last tile finished {last}")


@main.command()
@click.argument("store", type=click.Path())
@click.option("--tile", nargs=2, type=int, metavar="I J", help="Statistics and a heatmap of one tile.")
@click.option("--kernel", help="Kernel for the --tile heatmap, e.g. ntk-vanilla.")
@click.option("--depth", type=int, help="Depth for the --tile heatmap.")
@click.option("--draw", type=int, help="Draw of a random-features kernel (rf-...) for the --tile heatmap [default: 0].")
@click.option("--out", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Directory for the PNG files.")
def inspect(store, tile, kernel, depth, draw, out):
    """Summary and a coverage PNG of done tiles; with --tile I J, one tile's statistics and heatmap."""
    from cntk_gram.pipeline.inspect import coverage_png, summary, tile_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tile:
        report = tile_report(store, tuple(tile), kernel=kernel, depth=depth, draw=draw,
                             heatmap=out / f"tile-{tile[0]}-{tile[1]}.png")
        click.echo(f"tile {tile[0]},{tile[1]}: {'done' if report['record'] else 'not done'}")
        for name, st in report["stats"].items():
            cells = ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in st.items() if v is not None)
            click.echo(f"  {name:28s} {cells}")
        click.echo(f"heatmap {report['heatmap']}")
        return
    s = summary(store)
    click.echo(f"store {store} (cntk-gram {s['version']}, data {s['data_fingerprint'][:12]})\n"
               f"  {s['n_train']} train + {s['n_test']} test rows, tile {s['tile']}, {s['blocks']} blocks, "
               f"test x test {'yes' if s['test_test'] else 'no'}\n"
               f"  kernels {', '.join(s['kernels'])}; depths {', '.join(map(str, s['depths']))}\n"
               + "".join(f"  {key}: draws {d[0]}..{d[-1]}\n" for key, d in s["draws"].items())
               + ("" if not s["random_features"] else
                  f"  random features: width {s['random_features']['width']}, seed {s['random_features']['seed']}, "
                  f"torch {s['random_features']['torch']}\n") +
               f"  tiles done {s['tiles_done']}/{s['tiles_total']}; {s['disk_bytes'] / 2**20:.1f} MiB on disk")
    click.echo(f"coverage {coverage_png(store, out / 'coverage.png')}")


@main.command()
@click.argument("store", type=click.Path())
def verify(store):
    """Check checksums, NaNs, diagonal positivity and diagonal-tile symmetry; exit 1 on damage."""
    from cntk_gram.pipeline.inspect import verify as verify_store

    report = verify_store(store)
    for problem in report["problems"]:
        click.echo(problem)
    click.echo(f"{report['tiles_checked']} tiles checked, {report['tiles_missing']} not computed yet, "
               f"{len(report['problems'])} problems")
    if report["problems"]:
        raise SystemExit(1)


@main.command()
@click.argument("store", type=click.Path())
@click.option("--kernel", required=True, help="Kernel key, e.g. ntk-gap.")
@click.option("--depth", required=True, type=int, help="Depth, e.g. 11.")
@click.option("--draw", type=int, default=None, help="Draw of a random-features kernel (rf-...), e.g. 0.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .npy file.")
def export(store, kernel, depth, draw, out):
    """Write the assembled symmetric N x N matrix of one kernel, depth (and draw) to a .npy file."""
    from cntk_gram.pipeline.inspect import export as export_gram

    click.echo(f"wrote {export_gram(store, kernel=kernel, depth=depth, draw=draw, out=out)}")


# --- kernel regression and reports ----------------------------------------------------------------

SOLVE_JSON = ("store, rows (one per kernel, depth and draw: the rows of results.json, docs/solve.md), "
              "paths {json, markdown, accuracy_plot, confusion_plot[, learning_curve]}, paper_columns {kernel: paper "
              "column}; with --train-sizes also curve (rows, one per kernel, depth and size) and power_law")


def solve_options(fn):
    """Options shared by `solve` and `paper`."""
    options = [
        click.option("--out", type=click.Path(file_okay=False), default=None,
                     help="Report directory [default: <store>-report beside the store]."),
        click.option("--kernel", "kernels", multiple=True, help="Only this kernel key (repeatable), e.g. ntk-vanilla."),
        click.option("--depth", "depths", multiple=True, type=int, help="Only this depth (repeatable)."),
        click.option("--lambdas", default=",".join(f"{x:g}" for x in DEFAULT_LAMBDAS), show_default=True,
                     help="Ridge grid λ (ridge = λ·mean(diag K)); λ=0 (ridgeless) is always reported."),
        click.option("--validation", type=click.Choice(["auto", "full", "subset"]), default="auto",
                     show_default=True,
                     help=f"How λ is chosen on held-out training images. full: hold out --val-fraction of each "
                          f"class, fit every λ on the rest; subset: hold out --val-size training images, fit every "
                          f"λ on at most --val-fit others; then one fit on all training images with the chosen λ; "
                          f"auto: subset above {SUBSET_ABOVE:,} training images, else full."),
        click.option("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, show_default=True,
                     help="full: share of each training class held out to choose λ."),
        click.option("--val-fit", type=int, default=DEFAULT_VAL_FIT, show_default=True,
                     help="subset: at most this many training images (not held out) fitted per λ."),
        click.option("--val-size", type=int, default=DEFAULT_VAL_SIZE, show_default=True,
                     help="subset: this many training images held out, scored per λ."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the validation split."),
        click.option("--no-validation", is_flag=True, help="Only the ridgeless λ=0, no λ selection."),
        click.option("--train-sizes", default=None,
                     help="Also a learning curve: kernel regression on the first n training images for each n, "
                          "e.g. 1000,2000,5000, scored on all test images; the ridgeless points share one "
                          "factorisation (learning_curve.png, results.json's curve and power_law)."),
        click.option("--validate-sizes", is_flag=True,
                     help="With --train-sizes: choose λ for each size too (a factorisation per λ and size)."),
        click.option("--device", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
                     help="Where to factor: CuPy GPU when available for auto."),
        click.option("--memory-budget", default=f"{DEFAULT_MEMORY_BUDGET // 2**30}GiB", show_default=True,
                     help="Host memory the CPU factorisation may use; larger problems go out of core."),
        click.option("--scratch", type=click.Path(file_okay=False), default=None,
                     help="Directory for out-of-core factor panels [default: beside the store]; removed after."),
        click.option("--force", is_flag=True,
                     help="Solve again the kernels whose results are saved in the store with the same options "
                          "(default: reuse them)."),
        click.option("--reference", type=click.Choice(["auto", "none"]), default="auto", show_default=True,
                     help="auto: print the paper's value where its protocol matches the store's "
                          "(training-set size, test set, classes); none: no paper column."),
        json_option(SOLVE_JSON),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), fn)


def _solve_arguments(*, out, kernels, depths, lambdas, validation, val_fraction, val_fit, val_size, seed,
                     no_validation, train_sizes, validate_sizes, device, memory_budget, scratch, force, reference,
                     as_json) -> dict:
    """solve_options' values -> the SolveOptions and keyword arguments of experiment.solve_and_report."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction: must lie strictly between 0 and 1, got {val_fraction}")
    for name, value in (("--val-fit", val_fit), ("--val-size", val_size)):
        if value < 1:
            raise UserError(f"{name}: must be >= 1, got {value}")
    options = SolveOptions(lambdas=parse_lambdas(lambdas), validate=not no_validation, scheme=validation,
                           val_fraction=val_fraction, val_fit=val_fit, val_size=val_size, seed=seed, device=device,
                           memory_budget=parse_bytes("--memory-budget", memory_budget),
                           scratch_dir=Path(scratch) if scratch else None)
    sizes = () if train_sizes is None else parse_train_sizes(train_sizes)
    if validate_sizes and (not sizes or no_validation):
        raise UserError("--validate-sizes: needs --train-sizes and validation (drop --no-validation)")
    return {"options": options, "kernels": kernels, "depths": depths, "force": force, "out": out,
            "reference": reference == "auto", "progress": lambda message: click.echo(message, err=True),
            "train_sizes": sizes, "validate_sizes": validate_sizes}


def _show(solved, *, as_json: bool) -> None:
    """The accuracy table, notes on kernels that could not be solved (stderr), the report files; or the JSON."""
    from cntk_gram.pipeline.report import format_table

    points = [row for row in solved.curve if not any(row is main for main in solved.rows)]   # the smaller sizes
    for row in [*solved.rows, *points]:
        for where in (row, row.ridgeless, row.validated):
            if where is not None and where.error is not None:
                draw = "" if row.draw is None else f" draw {row.draw}"
                size = f", first {row.n_train:,} images" if row in points else ""
                click.echo(f"note: {row.kernel} depth {row.depth}{draw}{size}: {where.error}", err=True)
    if as_json:
        echo_json(solved.to_json())
        return
    click.echo(format_table(solved.rows, solved.columns))
    if solved.curve:
        from cntk_gram.pipeline.report import format_curve

        click.echo("\n" + format_curve(solved.curve))
    for name, path in solved.paths.items():
        click.echo(f"{name}: {path}")


@main.command()
@click.argument("store", type=click.Path())
@solve_options
@click.option("--dry-run", is_flag=True,
              help="Print the factorisations the solve would do (rows, in core or out of core, peak memory, predicted "
                   "time) and solve nothing; with --json: {store, seconds, peak_bytes, device, solved, reused, "
                   "source, load, factorisations [{what, n, panels, out_of_core, peak_bytes, seconds}]}.")
@click.option("--recalibrate", is_flag=True, help="With --dry-run: probe again instead of using the cached rates.")
def solve(store, dry_run, recalibrate, **options):
    """Kernel regression for every kernel and depth in STORE: accuracies, predictions, report.

    Results are saved in STORE kernel by kernel: a rerun (after an interruption, say) reuses every kernel
    already solved with the same options and solves the rest (--force: solve all again)."""
    from cntk_gram.pipeline.experiment import solve_and_report

    arguments = _solve_arguments(**options)
    if dry_run:
        _show_solve_plan(store, arguments, as_json=options["as_json"], recalibrate=recalibrate)
        return
    _show(solve_and_report(store, arguments.pop("options"), **arguments), as_json=options["as_json"])


def _show_solve_plan(store, arguments: dict, *, as_json: bool, recalibrate: bool) -> None:
    """solve --dry-run: pipeline.predict.predict_solve as text or JSON."""
    import dataclasses

    from cntk_gram.pipeline.predict import duration, predict_solve

    p = predict_solve(store, arguments["options"], kernels=arguments["kernels"], depths=arguments["depths"],
                      force=arguments["force"], train_sizes=arguments.get("train_sizes", ()),
                      validate_sizes=arguments.get("validate_sizes", False), recalibrate=recalibrate)
    if as_json:
        echo_json({"store": str(store), **{k: v for k, v in dataclasses.asdict(p).items() if k != "rates"}})
        return
    load = f", measured at load {p.load:.1f} per core" if p.load is not None and p.load > 0.5 else ""
    click.echo(f"solve plan: {len(p.factorisations)} factorisations, {p.solved} solves ({p.reused} saved, reused), "
               f"device {p.device}; predicted {duration(p.seconds)}, peak memory {p.peak_bytes / 2**30:.2f} GiB "
               f"({'probe cached' if p.source == 'cache' else 'probed now'}{load})")
    for f in p.factorisations:
        where = f"out of core, {f.panels} panels" if f.out_of_core else f"in core, {f.panels} panel" + \
            ("s" if f.panels > 1 else "")
        click.echo(f"  {f.what:48s} {f.n:>7,} rows  {where:24s} peak {f.peak_bytes / 2**30:6.2f} GiB  "
                   f"{duration(f.seconds)}")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@scheduler_options
@click.option("--store", default=None, help="Store path (overrides the config's store).")
@solve_options
def paper(config, scheduler, scheduler_file, store, **options):
    """Reproduce a paper table from CONFIG such as configs/paper/table1.yaml: kernel, solve, report.

    Runs `cntk run CONFIG`, then `cntk solve` on its store, and prints our accuracies next to the
    paper's wherever the paper measured under the same protocol. --json adds run (the `cntk run --json`
    fields) to the solve's JSON."""
    from cntk_gram.pipeline.experiment import reproduce

    arguments = _solve_arguments(**options)
    _show(reproduce(config, arguments.pop("options"), scheduler=scheduler, scheduler_file=scheduler_file,
                    store=store, **arguments), as_json=options["as_json"])


if __name__ == "__main__":
    main()
