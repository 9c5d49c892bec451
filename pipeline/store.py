"""The Zarr v3 store: inputs, one float32 N x N array per kernel and depth, per-tile completion records.

Layout (a user-facing contract; see docs/store.md):

    inputs/images  float32 (N, H, W, C)  (CIFAR: (N, 32, 32, 3)) preprocessed (standardised, or ZCA-whitened), chunks of `tile` rows
    inputs/labels  int64 (N,)   inputs/index int64 (N,)   inputs/split int8 (N,) 0 = train, 1 = test
    gram/{key}/depth-{D}          float32 (N, N), chunks (tile, tile), fill NaN, crc32c codec;
                                  only chunks (I, J) with I <= J are written. key: an output key of the tile
                                  call (cntk_gram.workers.vocab.output_keys): {kind}-{arch}, {kind}-lap{c},
                                  and with kernel.flip each of them + '-flip' (ntk-gap-flip, ntk-lap4-flip)
    gram/rf-{kind}-{arch}/depth-{D}/draw-{R}   the same, for random-features draw R (kernel.random_features)
    (key and array-name grammar: cntk_gram.workers.vocab, KernelKey, array_name, parse_array_name)
    tiles/done/{I}-{J}            completion record (cntk_gram.pipeline.records)
    attrs: config, data_fingerprint, version, layout {n_train, n_test, tile, test_test, arrays},
           preprocessing {mean, std, zca (only with data.preprocess zca: epsilon, source_fingerprint,
           mean_sha256, matrix_sha256)}, random_features {torch, width, draws, seed} (only with random features),
           source {name, label (cifar100: fine | coarse, else null), files {file name: {bytes, sha256}},
           image_shape [H, W, C]} (stores made before sources existed have none)

A record is written atomically after every chunk of its tile; it holds the crc32c of each chunk's
decoded float32 bytes, so a damaged or missing chunk is detected and the tile recomputed on resume.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from importlib import metadata
from pathlib import Path

import crc32c
import dask.array as da
import numpy as np
import zarr
from dask.highlevelgraph import HighLevelGraph
from zarr.codecs import Crc32cCodec

from cntk_gram.pipeline.config import RunConfig, config_differences, to_dict
from cntk_gram.pipeline.data import Inputs, fingerprint, source_differences
from cntk_gram.pipeline.errors import UserError
from cntk_gram.pipeline.plan import block_bounds, plan_tiles
from cntk_gram.pipeline.records import RECORDS, read_record, record_complete, write_record
from cntk_gram.workers.vocab import ArrayName, array_name, parse_array_name   # the array-name grammar


def package_version() -> str:
    """Installed version of cntk-gram, else the one in the source tree's pyproject.toml."""
    try:
        return metadata.version("cntk-gram")
    except metadata.PackageNotFoundError:
        try:
            import tomllib  # Python >= 3.11
            pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (ImportError, OSError, KeyError, ValueError):
            return "unknown"


def _order(name: ArrayName) -> tuple:
    return name.key, name.depth, -1 if name.draw is None else name.draw


def stored_arrays(info: dict) -> list[ArrayName]:
    """Every Gram array of a store's layout, sorted by key, depth, draw."""
    return sorted((parse_array_name(name) for name in info["arrays"]), key=_order)


def stored_kernels(info: dict) -> list[tuple[str, int]]:
    """[(key, depth), ...] of the Gram arrays in a store's layout (each once, whatever its draws), sorted."""
    return sorted({(name.key, name.depth) for name in stored_arrays(info)})


def stored_draws(info: dict, key: str) -> list[int]:
    """The draws stored for a random-features kernel key (empty for an exact kernel)."""
    return sorted({name.draw for name in stored_arrays(info) if name.key == key and name.draw is not None})


def planned_arrays(config: RunConfig) -> list[str]:
    """The exact arrays, then every random-features draw (kernel.random_features)."""
    kernel = config.kernel
    names = [array_name(key, depth) for key in kernel.keys for depth in kernel.depths]
    if kernel.random_features is not None:
        names += [array_name(key, depth, draw) for key in kernel.rf_keys for depth in kernel.depths
                  for draw in range(kernel.random_features.draws)]
    return names


def torch_version() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


# --- creating and opening -------------------------------------------------------------------------

def check_existing(store_path: str | Path, config: RunConfig) -> bool:
    """Before loading data: False if no store at the path; True if a store made with an equivalent
    config is there; UserError naming the difference otherwise (nothing is touched)."""
    path = Path(store_path)
    if not path.exists():
        return False
    attrs = _attrs(path)
    differences = config_differences(attrs["config"], to_dict(config))
    if differences:
        raise UserError(f"store {path} was made with a different config ({'; '.join(differences)}); "
                        f"use another store path or the store's own config")
    return True


def prepare_store(store_path: str | Path, *, config: RunConfig, inputs: Inputs) -> None:
    """Create the store, or check that an existing one holds exactly these inputs. Never overwrites."""
    path = Path(store_path)
    digest = fingerprint(inputs)
    if check_existing(path, config):
        attrs = _attrs(path)
        stored_source = attrs.get("source")
        if stored_source is not None and inputs.source is not None:
            differences = source_differences(stored_source, inputs.source)
            if differences:
                raise UserError(f"store {path} was made from different data, other source files "
                                f"({'; '.join(differences)}); "
                                f"point data.root / data.path at the files it was made from, or use another "
                                f"store path")
        stored = attrs["data_fingerprint"]
        if stored != digest and not _same_zca_source(attrs, inputs):
            raise UserError(f"store {path} was made from different data (fingerprint {stored[:12]} vs "
                            f"{digest[:12]} now: the {_source_name(attrs)} files differ); use another store path")
        return
    try:
        _create(path, config=config, inputs=inputs, digest=digest)
    except OSError as exc:
        if (path / "zarr.json").exists():  # another client created it first: check theirs instead
            return prepare_store(store_path, config=config, inputs=inputs)
        raise UserError(f"cannot create store at {path}: {exc.strerror or exc}") from None


def _source_name(attrs: dict) -> str:
    source = (attrs.get("source") or {}).get("name") or attrs["config"].get("data", {}).get("source", "cifar10")
    return {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "arrays": "arrays"}.get(source, source)


def _same_zca_source(attrs: dict, inputs: Inputs) -> bool:
    """Whether a ZCA store was whitened from exactly these standardised images (same epsilon by the config check):
    then the whitened images may differ from the stored ones only by the float64 rounding of another machine's
    eigendecomposition, and the store's own images (which every tile reads) stay authoritative."""
    stored = (attrs.get("preprocessing") or {}).get("zca") or {}
    return inputs.zca is not None and stored.get("source_fingerprint") == inputs.zca["source_fingerprint"]


def _create(path: Path, *, config: RunConfig, inputs: Inputs, digest: str) -> None:
    """Build the store in a sibling temp dir and rename it into place (an interrupted creation leaves no
    half-made store at `path`)."""
    t = config.tiles.size
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex[:8]}")
    try:
        group = zarr.open_group(tmp, mode="w-", zarr_format=3)
        n = len(inputs.labels)
        group.create_array("inputs/images", data=inputs.images, chunks=(t, *inputs.images.shape[1:]),
                           compressors=[Crc32cCodec()])
        for name in ("labels", "index", "split"):
            group.create_array(f"inputs/{name}", data=getattr(inputs, name), compressors=[Crc32cCodec()])
        for name in planned_arrays(config):
            group.create_array(name, shape=(n, n), chunks=(t, t), dtype="float32", fill_value=np.nan,
                               compressors=[Crc32cCodec()])
        group.create_group(RECORDS)
        group.attrs.update({
            "config": to_dict(config),
            "data_fingerprint": digest,
            "version": package_version(),
            "preprocessing": {"mean": inputs.mean.tolist(), "std": inputs.std.tolist(),
                              **({} if inputs.zca is None else {"zca": dict(inputs.zca)})},
            "layout": {"n_train": inputs.n_train, "n_test": inputs.n_test, "tile": t,
                       "test_test": config.data.test_test, "arrays": planned_arrays(config)},
        })
        if inputs.source is not None:
            group.attrs.update({"source": inputs.source})
        rf = config.kernel.random_features
        if rf is not None:  # each tile record also names the torch version of the worker that computed it
            group.attrs.update({"random_features": {"torch": torch_version(), "width": rf.width,
                                                    "draws": rf.draws, "seed": rf.seed}})
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _attrs(path: Path) -> dict:
    """Group attributes of a cntk store; UserError if the path is not one."""
    try:
        attrs = json.loads((path / "zarr.json").read_text())["attributes"]
        if {"layout", "config", "data_fingerprint"} <= set(attrs):
            return attrs
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise UserError(f"{path} exists but is not a cntk-gram store; use another path")


def layout(store_path: str | Path) -> dict:
    """{'n_train', 'n_test', 'tile', 'test_test', 'arrays'} of an existing store."""
    path = Path(store_path)
    if not path.exists():
        raise UserError(f"no store at {path}")
    return _attrs(path)["layout"]


def store_attrs(store_path: str | Path) -> dict:
    path = Path(store_path)
    if not path.exists():
        raise UserError(f"no store at {path}")
    return _attrs(path)


def read_inputs(store_path: str | Path) -> dict:
    """labels (N,) int64, split (N,) int8, index (N,) int64 as numpy; n_train, n_test, tile as ints."""
    info = layout(store_path)
    group = zarr.open_group(store_path, mode="r")
    out = {name: group[f"inputs/{name}"][:] for name in ("labels", "split", "index")}
    out.update(n_train=int(info["n_train"]), n_test=int(info["n_test"]), tile=int(info["tile"]))
    return out


def bounds_of(info: dict) -> list[tuple[int, int]]:
    return block_bounds(n_train=info["n_train"], n_test=info["n_test"], size=info["tile"])


def planned_tiles(info: dict) -> list[tuple[int, int]]:
    return plan_tiles(n_train=info["n_train"], n_test=info["n_test"], size=info["tile"],
                      test_test=info["test_test"])


# --- completion records ---------------------------------------------------------------------------

def write_tile(store_path: str | Path, tile: tuple[int, int], blocks: dict[str, np.ndarray],
               record: dict) -> dict:
    """Write one chunk per array ({'gram/ntk-gap/depth-3': float32 block}), then the completion record
    (`record` plus tile, rows, cols, checksums, finished = epoch seconds). Returns the full record."""
    info = layout(store_path)
    (r0, r1), (c0, c1) = (bounds_of(info)[i] for i in tile)
    group = zarr.open_group(store_path, mode="r+")
    checksums = {}
    for name, block in blocks.items():
        block = np.ascontiguousarray(block, dtype=np.float32)
        if block.shape != (r1 - r0, c1 - c0):
            raise ValueError(f"{name}: block shape {block.shape} != tile shape {(r1 - r0, c1 - c0)}")
        group[name][r0:r1, c0:c1] = block
        checksums[name] = checksum(block)
    full = {**record, "tile": list(tile), "rows": [r0, r1], "cols": [c0, c1], "checksums": checksums,
            "finished": time.time()}
    write_record(store_path, tile, full)
    return full


def all_records(store_path: str | Path) -> dict[tuple[int, int], dict]:
    info = layout(store_path)
    records = {}
    for tile in planned_tiles(info):
        record = read_record(store_path, tile)
        if record_complete(record, tile, info["arrays"]):
            records[tile] = record
    return records


def tile_status(store_path: str | Path) -> tuple[set[tuple[int, int]], list[tuple[int, int]]]:
    """(done, planned): tiles with a complete record (cheap: records only, chunks not read), all tiles."""
    info = layout(store_path)
    return set(all_records(store_path)), planned_tiles(info)


def checksum(block: np.ndarray) -> int:
    """crc32c of a block's float32 C-order bytes."""
    return crc32c.crc32c(np.ascontiguousarray(block, dtype=np.float32).tobytes())


def verify_tile(store_path: str | Path, tile: tuple[int, int], *, record: dict | None = None,
                deep: bool = True) -> list[str]:
    """Problems with a done tile (empty list = fine). Checksums always; with deep also NaNs, positive
    diagonal and symmetry of diagonal tiles."""
    info = layout(store_path)
    record = record if record is not None else read_record(store_path, tile)
    if not record_complete(record, tile, info["arrays"]):
        return [f"tile {tile}: no complete record"]
    (r0, r1), (c0, c1) = (bounds_of(info)[i] for i in tile)
    group = zarr.open_group(store_path, mode="r")
    problems = []
    for name in info["arrays"]:
        try:
            block = group[name][r0:r1, c0:c1]
        except Exception as exc:  # a corrupted chunk fails its crc32c codec on decode
            problems.append(f"tile {tile} {name}: chunk unreadable ({type(exc).__name__})")
            continue
        if checksum(block) != record["checksums"][name]:
            problems.append(f"tile {tile} {name}: checksum mismatch")
            continue
        if not deep:
            continue
        if np.isnan(block).any():
            problems.append(f"tile {tile} {name}: {int(np.isnan(block).sum())} NaN entries")
        if tile[0] == tile[1]:
            if not (np.diag(block) > 0).all():
                problems.append(f"tile {tile} {name}: non-positive diagonal entry")
            asym = np.abs(block - block.T).max()
            if asym > 1e-5 * np.abs(block).max():
                problems.append(f"tile {tile} {name}: diagonal tile not symmetric (max |K - K.T| = {asym:.3g})")
    return problems


# --- reading the Gram -----------------------------------------------------------------------------

def _read_block(store_path: str, name: str, bounds: list, i: int, j: int) -> np.ndarray:
    array = zarr.open_array(store_path, path=name, mode="r")
    if i <= j:
        (r0, r1), (c0, c1) = bounds[i], bounds[j]
        return array[r0:r1, c0:c1]
    (r0, r1), (c0, c1) = bounds[j], bounds[i]
    return np.ascontiguousarray(array[r0:r1, c0:c1].T)


def open_gram(store_path: str | Path, key: str, depth: int, draw: int | None = None) -> da.Array:
    """Lazy symmetric (N, N) float32 dask array, chunks (tile, tile); block (I, J) with I > J is read as
    the transpose of stored block (J, I). Blocks never computed (e.g. test x test) read as NaN.
    draw: which random-features draw of an 'rf-...' key (required there, None for exact kernels)."""
    info = layout(store_path)
    name = array_name(key, depth, draw)
    if name not in info["arrays"]:
        kernels = sorted({key for key, _ in stored_kernels(info)})
        depths = sorted({depth for _, depth in stored_kernels(info)})
        draws = stored_draws(info, key)
        if draws and draw is None:
            hint = f"; {key} needs a draw ({draws[0]}..{draws[-1]}, e.g. --draw 0)"
        elif draws:
            hint = f"; draws of {key}: {draws[0]}..{draws[-1]}"
        elif draw is not None:
            hint = f"; {key} is not a random-features kernel: drop the draw"
        else:
            hint = ""
        raise UserError(f"store {store_path} has no {name}; kernels: {', '.join(kernels)}; depths: {depths}{hint}")
    bounds = bounds_of(info)
    sizes = tuple(stop - start for start, stop in bounds)
    graph_name = f"gram-{key}-{depth}-{'' if draw is None else draw}-{uuid.uuid4().hex[:8]}"
    tasks = {(graph_name, i, j): (_read_block, str(store_path), name, bounds, i, j)
             for i in range(len(bounds)) for j in range(len(bounds))}
    graph = HighLevelGraph.from_collections(graph_name, tasks, dependencies=[])
    return da.Array(graph, graph_name, chunks=(sizes, sizes), dtype=np.float32)
