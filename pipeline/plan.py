"""The tile plan: which (row-block, column-block) tiles of the N x N Gram are computed.

Rows and columns are ordered train then test and cut into blocks of `size` rows. `size` must divide
n_train (so the blocked Cholesky in `solve` can use train tiles as blocks); the test rows are cut by the
same size with a ragged last block. Only tiles with I <= J are computed: the train x train upper triangle,
train x test, and test x test (upper triangle) only when asked for.
"""
from __future__ import annotations

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
