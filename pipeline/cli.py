"""`cntk` command line: thin click wrappers over cntk_gram.pipeline.schedule / cntk_gram.pipeline.inspect."""
from __future__ import annotations

import time
from pathlib import Path

import click

from cntk_gram.pipeline.errors import UserError


@click.group()
@click.version_option(package_name="cntk-gram")
def main():
    """Exact convolutional neural tangent kernels on CIFAR-10, as a tiled, resumable Gram matrix."""


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [v.strip() for v in text.split(",") if v.strip()]


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--store", help="Store path (overrides `store`).")
@click.option("--data-root", help="Directory holding cifar-10-batches-py/ (overrides data.root).")
@click.option("--train", type=int, help="First N training images (overrides data.train).")
@click.option("--test", type=int, help="First N test images (overrides data.test).")
@click.option("--tile-size", type=int, help="Tile edge in images; must divide the training count.")
@click.option("--archs", help="Comma-separated: vanilla,gap,fc (overrides kernel.archs).")
@click.option("--kinds", help="Comma-separated: ntk,nngp (overrides kernel.kinds).")
@click.option("--depths", help="Comma-separated depths, e.g. 3,4,6,11,21 (overrides kernel.depths).")
@click.option("--backend", type=click.Choice(["auto", "cpu", "gpu"]), help="Kernel backend.")
@click.option("--scheduler", help="Address of an existing Dask scheduler, e.g. tcp://host:8786.")
@click.option("--scheduler-file", help="Scheduler file of an existing Dask cluster.")
@click.option("--workers", type=int, help="Worker processes of the embedded local cluster.")
@click.option("--threads", type=int, help="Numba threads per local worker (default: cores / workers).")
@click.option("--max-in-flight", type=int, help="Tile tasks submitted at once.")
@click.option("--retries", type=int, help="Retries of a failed tile task.")
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
@click.option("--trust-records", is_flag=True,
              help="On resume, skip re-checking the checksums of tiles already done (faster on huge stores).")
def run(config_file, store, data_root, train, test, tile_size, archs, kinds, depths, backend, scheduler,
        scheduler_file, workers, threads, max_in_flight, retries, progress, trust_records):
    """Compute (or resume) the Gram matrix described by CONFIG_FILE."""
    from cntk_gram.pipeline.config import load_config
    from cntk_gram.pipeline.schedule import run as run_config

    overrides = {
        "store": store, "data.root": data_root, "data.train": train, "data.test": test,
        "tiles.size": tile_size, "kernel.archs": _names(archs), "kernel.kinds": _names(kinds),
        "kernel.depths": _ints(depths), "backend": backend, "cluster.scheduler": scheduler,
        "cluster.scheduler_file": scheduler_file, "cluster.workers": workers, "cluster.threads": threads,
        "cluster.max_in_flight": max_in_flight, "cluster.retries": retries,
    }
    config = _guard(load_config, config_file, overrides)
    s = _guard(run_config, config, progress=progress, verify=not trust_records)
    click.echo(f"store     {s['store']}\n"
               f"kernels   {', '.join(s['kernels'])} at depths {', '.join(map(str, s['depths']))} "
               f"(backend {s['backend']})\n"
               f"images    {s['n_train']} train + {s['n_test']} test, tile {s['tile']}\n"
               f"tiles     {s['tiles_computed']} computed ({s['tiles_damaged']} damaged recomputed), "
               f"{s['tiles_done_before']} already done, {s['tiles_total']} total\n"
               f"pairs     {s['pairs_computed']:,} computed in {s['wall_seconds']:.1f} s wall")


@main.command()
@click.argument("store", type=click.Path())
def status(store):
    """Done / total tiles per kernel array, throughput and ETA."""
    from cntk_gram.pipeline.inspect import format_seconds, status as store_status

    s = _guard(store_status, store)
    click.echo(f"tiles {s['tiles_done']}/{s['tiles_total']}, pairs {s['pairs_done']:,}/{s['pairs_total']:,}")
    for name, (done, total) in s["per_array"].items():
        click.echo(f"  {name:28s} {done}/{total}")
    rate = s["pairs_per_second"]
    last = "never" if s["last_finished"] is None else time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime(s["last_finished"]))
    click.echo(f"throughput {'unknown' if rate is None else f'{rate:,.1f} pairs/s'} (recent tiles), "
               f"ETA {format_seconds(s['eta_seconds']) if s['tiles_done'] < s['tiles_total'] else 'done'}, "
               f"last tile finished {last}")


@main.command()
@click.argument("store", type=click.Path())
@click.option("--tile", nargs=2, type=int, metavar="I J", help="Statistics and a heatmap of one tile.")
@click.option("--kernel", help="Kernel for the --tile heatmap, e.g. ntk-vanilla.")
@click.option("--depth", type=int, help="Depth for the --tile heatmap.")
@click.option("--out", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Directory for the PNG files.")
def inspect(store, tile, kernel, depth, out):
    """Summary and a coverage PNG of done tiles; with --tile I J, one tile's statistics and heatmap."""
    from cntk_gram.pipeline.inspect import coverage_png, summary, tile_report

    out = Path(out)
    _guard(out.mkdir, parents=True, exist_ok=True)
    if tile:
        report = _guard(tile_report, store, tuple(tile), kernel=kernel, depth=depth,
                        heatmap=out / f"tile-{tile[0]}-{tile[1]}.png")
        click.echo(f"tile {tile[0]},{tile[1]}: {'done' if report['record'] else 'not done'}")
        for name, st in report["stats"].items():
            cells = ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in st.items() if v is not None)
            click.echo(f"  {name:28s} {cells}")
        click.echo(f"heatmap {report['heatmap']}")
        return
    s = _guard(summary, store)
    click.echo(f"store {store} (cntk-gram {s['version']}, data {s['data_fingerprint'][:12]})\n"
               f"  {s['n_train']} train + {s['n_test']} test rows, tile {s['tile']}, {s['blocks']} blocks, "
               f"test x test {'yes' if s['test_test'] else 'no'}\n"
               f"  kernels {', '.join(s['kernels'])}; depths {', '.join(map(str, s['depths']))}\n"
               f"  tiles done {s['tiles_done']}/{s['tiles_total']}; {s['disk_bytes'] / 2**20:.1f} MiB on disk")
    click.echo(f"coverage {_guard(coverage_png, store, out / 'coverage.png')}")


@main.command()
@click.argument("store", type=click.Path())
def verify(store):
    """Check checksums, NaNs, diagonal positivity and diagonal-tile symmetry; exit 1 on damage."""
    from cntk_gram.pipeline.inspect import verify as verify_store

    report = _guard(verify_store, store)
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
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .npy file.")
def export(store, kernel, depth, out):
    """Write the assembled symmetric N x N matrix of one kernel and depth to a .npy file."""
    from cntk_gram.pipeline.inspect import export as export_gram

    click.echo(f"wrote {_guard(export_gram, store, kernel=kernel, depth=depth, out=out)}")


def _guard(fn, *args, **kwargs):
    """Call fn, turning expected low-level failures into one-line UserErrors."""
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except PermissionError as exc:
        raise UserError(f"permission denied: {exc.filename or exc}") from None
    except OSError as exc:
        raise UserError(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None


# --- commands of other modules: register them here ----------------------------------------------
# Each engineer adds one guarded line for their command, e.g.
#     from cntk_gram.pipeline.solve_cli import solve; main.add_command(solve)
from cntk_gram.pipeline.cluster import cancel_command, submit_command  # noqa: E402  (issue 5: submit-and-detach)
main.add_command(submit_command)
main.add_command(cancel_command)
from cntk_gram.pipeline.solve_cli import paper, solve  # noqa: E402  (issue 4: solve, scoring, paper tables)
main.add_command(solve)
main.add_command(paper)
# ------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    main()
