"""Looking into a store while or after it is computed: status, summary, pictures, verification, export."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import zarr

from cntk_gram.pipeline.errors import UserError
from cntk_gram.pipeline.plan import tile_pairs
from cntk_gram.pipeline.records import read_prediction, read_record, stray_files
from cntk_gram.pipeline.store import (all_records, array_name, bounds_of, open_gram, parse_array_name, planned_tiles,
                                      store_attrs, stored_draws, stored_kernels, verify_tile)

RATE_WINDOW = 50  # recent records used for throughput and ETA


def status(store_path: str | Path) -> dict:
    """Progress from the completion records.

    Returns tiles_done, tiles_total, pairs_done, pairs_total, per_array {name: (done, total)},
    pairs_per_second (over the last RATE_WINDOW records, None if unknown), eta_seconds, eta_source ('predicted':
    the latest run's predicted time less the time since, until one of its tiles finishes; 'measured': from
    pairs_per_second; None: unknown), predicted_seconds (the latest run's prediction, None if none),
    last_finished.
    """
    info = store_attrs(store_path)["layout"]
    bounds, planned = bounds_of(info), planned_tiles(info)
    records = all_records(store_path)
    per_array = {name: (sum(name in r["checksums"] for r in records.values()), len(planned))
                 for name in info["arrays"]}
    pairs_total = sum(tile_pairs(bounds, t) for t in planned)
    pairs_done = sum(tile_pairs(bounds, t) for t in records)
    recent = sorted(records.values(), key=lambda r: r["finished"])[-RATE_WINDOW:]
    rate = None
    if recent:
        span = recent[-1]["finished"] - min(r["started"] for r in recent)
        rate = sum(r["pairs"] for r in recent) / span if span > 0 else None
    eta, source = ((pairs_total - pairs_done) / rate, "measured") if rate else (None, None)
    predicted = read_prediction(store_path) or {}
    if predicted.get("seconds") is not None and pairs_done < pairs_total and \
            not any(r["finished"] >= predicted["made"] for r in records.values()):
        eta, source = max(0.0, predicted["seconds"] - (time.time() - predicted["made"])), "predicted"
    return {
        "tiles_done": len(records), "tiles_total": len(planned),
        "pairs_done": pairs_done, "pairs_total": pairs_total, "per_array": per_array,
        "pairs_per_second": rate,
        "eta_seconds": eta, "eta_source": source, "predicted_seconds": predicted.get("seconds"),
        "last_finished": recent[-1]["finished"] if recent else None,
    }


def summary(store_path: str | Path) -> dict:
    """What the store holds: sizes, kernels, depths, draws (random features), progress, version, data
    fingerprint, disk use."""
    attrs = store_attrs(store_path)
    info = attrs["layout"]
    disk = sum(p.stat().st_size for p in Path(store_path).rglob("*") if p.is_file())
    return {
        "n_train": info["n_train"], "n_test": info["n_test"], "tile": info["tile"],
        "blocks": len(bounds_of(info)), "test_test": info["test_test"],
        "kernels": sorted({key for key, _ in stored_kernels(info)}),
        "depths": sorted({depth for _, depth in stored_kernels(info)}),
        "draws": {key: stored_draws(info, key) for key, _ in stored_kernels(info) if stored_draws(info, key)},
        "random_features": attrs.get("random_features"),
        "tiles_done": len(all_records(store_path)), "tiles_total": len(planned_tiles(info)),
        "version": attrs["version"], "data_fingerprint": attrs["data_fingerprint"], "disk_bytes": disk,
    }


def coverage_png(store_path: str | Path, out: str | Path) -> Path:
    """PNG of the block grid: done tiles, planned-but-missing tiles, tiles never computed."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    info = store_attrs(store_path)["layout"]
    n_blocks = len(bounds_of(info))
    grid = np.zeros((n_blocks, n_blocks))  # 0 never computed (mirrored or test x test)
    for tile in planned_tiles(info):
        grid[tile] = 1
    for tile in all_records(store_path):
        grid[tile] = 2
    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
    cmap = ListedColormap(["#dddddd", "#d62728", "#2ca02c"])
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
    n_train_blocks = info["n_train"] // info["tile"]
    ax.axhline(n_train_blocks - 0.5, color="k", lw=0.8)
    ax.axvline(n_train_blocks - 0.5, color="k", lw=0.8)
    ax.set_title(f"tiles done (green) / missing (red); {int((grid == 2).sum())} of {int((grid > 0).sum())}")
    ax.set_xlabel("column block J")
    ax.set_ylabel("row block I")
    out = Path(out)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    return out


def tile_report(store_path: str | Path, tile: tuple[int, int], *, heatmap: str | Path | None = None,
                kernel: str | None = None, depth: int | None = None, draw: int | None = None) -> dict:
    """Statistics of every array on one tile ({name: {min, max, mean, nan, diag_min}}), the record,
    and optionally a heatmap PNG of one array (default: the first array; draw 0 of a random-features kernel
    unless `draw` is given)."""
    info = store_attrs(store_path)["layout"]
    bounds = bounds_of(info)
    if not 0 <= tile[0] <= tile[1] < len(bounds):
        raise UserError(f"tile {tile}: need 0 <= I <= J < {len(bounds)} (only the upper triangle is stored)")
    (r0, r1), (c0, c1) = bounds[tile[0]], bounds[tile[1]]
    group = zarr.open_group(store_path, mode="r")
    stats, blocks = {}, {}
    for name in info["arrays"]:
        block = group[name][r0:r1, c0:c1]
        blocks[name] = block
        finite = block[np.isfinite(block)]
        stats[name] = {
            "min": float(finite.min()) if finite.size else None,
            "max": float(finite.max()) if finite.size else None,
            "mean": float(finite.mean()) if finite.size else None,
            "nan": int(np.isnan(block).sum()),
            "diag_min": float(np.diag(block).min()) if tile[0] == tile[1] else None,
        }
    first = parse_array_name(info["arrays"][0])
    key = kernel or first.key
    if draw is None and stored_draws(info, key):
        draw = stored_draws(info, key)[0]
    chosen = array_name(key, depth or first.depth, draw)
    if chosen not in blocks:
        raise UserError(f"store has no {chosen}; arrays: {', '.join(info['arrays'])}")
    report = {"tile": tile, "stats": stats, "record": read_record(store_path, tile), "heatmap": None}
    if heatmap is not None:
        report["heatmap"] = str(_heatmap(blocks[chosen], title=f"{chosen} tile {tile}", out=Path(heatmap)))
    return report


def _heatmap(block: np.ndarray, *, title: str, out: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    image = ax.imshow(block, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax)
    ax.set_title(title)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    return out


def verify(store_path: str | Path) -> dict:
    """Check every planned tile: done tiles get checksums, NaNs, diagonal positivity and symmetry of
    diagonal tiles; the stored inputs are checked against the data fingerprint.

    Returns {'tiles_checked', 'tiles_missing', 'problems': [str]}; problems empty = no damage."""
    from cntk_gram.pipeline.data import fingerprint_arrays

    attrs = store_attrs(store_path)
    info = attrs["layout"]
    group = zarr.open_group(store_path, mode="r")
    problems = []
    try:
        stored = {name: group[f"inputs/{name}"][:] for name in ("images", "labels", "index", "split")}
        if fingerprint_arrays(**stored) != attrs["data_fingerprint"]:
            problems.append("inputs: stored images/labels do not match the data fingerprint")
    except Exception as exc:  # a damaged input chunk fails its codec on decode
        problems.append(f"inputs: unreadable ({type(exc).__name__})")
    problems += [f"stray file {p.relative_to(Path(store_path))}: left by an interrupted write; "
                 "cntk run/submit remove it" for p in stray_files(store_path, older_than_s=60)]
    records = all_records(store_path)
    for tile in planned_tiles(info):
        if tile in records:
            problems += verify_tile(store_path, tile, record=records[tile], deep=True)
    return {"tiles_checked": len(records), "tiles_missing": len(planned_tiles(info)) - len(records),
            "problems": problems}


def export(store_path: str | Path, *, kernel: str, depth: int, out: str | Path, draw: int | None = None) -> Path:
    """Write the assembled symmetric (N, N) float32 matrix to a .npy file, block by block (no full copy
    in memory). Blocks never computed (test x test unless asked for) are NaN. draw: which draw of a
    random-features kernel ('rf-...'; required there)."""
    gram = open_gram(store_path, kernel, depth, draw)
    out = Path(out)
    try:
        target = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=gram.shape)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    gram.store(target, lock=False, scheduler="threads")
    target.flush()
    del target
    return out


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))
