"""The tile plan: which (row-block, column-block) tiles of the N x N Gram are computed.

Rows and columns are ordered train then test and cut into blocks of `size` rows. `size` must divide
n_train (so the blocked Cholesky in `solve` can use train tiles as blocks); the test rows are cut by the
same size with a ragged last block. Only tiles with I <= J are computed: the train x train upper triangle,
train x test, and test x test (upper triangle) only when asked for.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from cntk_gram.pipeline.errors import UserError


def check_tile_size(*, n_train: int, size: int) -> None:
    """Raise UserError unless `size` divides n_train, proposing the nearest valid sizes."""
    if size >= 1 and n_train % size == 0:
        return
    divisors = [d for d in range(1, n_train + 1) if n_train % d == 0]
    nearest = sorted(divisors, key=lambda d: (abs(d - size), d))[:4]
    raise UserError(f"tiles.size={size} must divide the number of training images ({n_train}); "
                    f"valid sizes near it: {', '.join(map(str, sorted(nearest)))}")


def block_bounds(*, n_train: int, n_test: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) row range of every block, train blocks first; the last test block may be short."""
    n = n_train + n_test
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def plan_tiles(*, n_train: int, n_test: int, size: int, test_test: bool = False) -> list[tuple[int, int]]:
    """Tiles (I, J) with I <= J, row-major. I is a train block unless test_test."""
    check_tile_size(n_train=n_train, size=size)
    n_blocks = len(block_bounds(n_train=n_train, n_test=n_test, size=size))
    n_train_blocks = n_train // size
    last_row_block = n_blocks if test_test else n_train_blocks
    return [(i, j) for i in range(last_row_block) for j in range(i, n_blocks)]


def tile_pairs(bounds: list[tuple[int, int]], tile: tuple[int, int]) -> int:
    """Distinct kernel entries a tile contributes (a diagonal tile counts its upper triangle only)."""
    (r0, r1), (c0, c1) = bounds[tile[0]], bounds[tile[1]]
    n, m = r1 - r0, c1 - c0
    return n * (n + 1) // 2 if tile[0] == tile[1] else n * m


# --- what a run costs: pairs and bytes, checked against the free disk before the first tile ---------

CHUNK_OVERHEAD = 4                 # bytes per stored chunk beyond its float32 values: the crc32c codec
DISK_MARGIN = 256 * 2**20          # free space a run leaves untouched: records, temp files, the file system


@dataclasses.dataclass(frozen=True)
class RunCost:
    """What the tiles of a run cost. tiles/pairs: planned in all and still to compute; store_bytes: the Gram arrays
    once complete (every planned tile writes one full tile x tile float32 chunk per array); bytes_todo: what the
    tiles still to compute will add (and, for a new store, its input images: run.plan_cost); free_bytes: free space
    on the store's file system now."""
    tiles_total: int
    tiles_todo: int
    pairs_total: int
    pairs_todo: int
    arrays: int
    store_bytes: int
    bytes_todo: int
    free_bytes: int

    @property
    def fits(self) -> bool:
        return self.bytes_todo + DISK_MARGIN <= self.free_bytes


def run_cost(*, n_train: int, n_test: int, size: int, test_test: bool, arrays: int, todo=None,
             store_path: str | os.PathLike) -> RunCost:
    """The cost of the plan of these sizes; todo: the tiles still to compute (None: every planned tile)."""
    planned = plan_tiles(n_train=n_train, n_test=n_test, size=size, test_test=test_test)
    todo = planned if todo is None else list(todo)
    bounds = block_bounds(n_train=n_train, n_test=n_test, size=size)
    chunk = size * size * 4 + CHUNK_OVERHEAD
    return RunCost(tiles_total=len(planned), tiles_todo=len(todo),
                   pairs_total=sum(tile_pairs(bounds, t) for t in planned),
                   pairs_todo=sum(tile_pairs(bounds, t) for t in todo), arrays=arrays,
                   store_bytes=len(planned) * arrays * chunk, bytes_todo=len(todo) * arrays * chunk,
                   free_bytes=free_bytes(store_path))


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes (for this user) on the file system that holds `path`, or would hold it once created."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk(cost: RunCost, store_path) -> None:
    """UserError naming both numbers when the tiles still to compute cannot fit the free disk."""
    if not cost.fits:
        raise UserError(f"the store {store_path} needs {gib(cost.bytes_todo)} more for {cost.tiles_todo} tiles "
                        f"x {cost.arrays} arrays, but its disk has {gib(cost.free_bytes)} free (and "
                        f"{gib(DISK_MARGIN)} stays free); free space or choose another store path")


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
