"""Tile plan: coverage of the upper triangle, ragged test blocks, tile-size validation."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cntk_gram.pipeline.errors import UserError
from cntk_gram.pipeline.plan import block_bounds, check_tile_size, plan_tiles, tile_pairs


@settings(max_examples=60, deadline=None)
@given(blocks=st.integers(1, 8), size=st.integers(1, 9), n_test=st.integers(0, 40), test_test=st.booleans())
def test_plan_covers_each_needed_pair_once(blocks, size, n_test, test_test):
    n_train = blocks * size
    bounds = block_bounds(n_train=n_train, n_test=n_test, size=size)
    assert bounds[0][0] == 0 and bounds[-1][1] == n_train + n_test
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(0 < stop - start <= size for start, stop in bounds)
    tiles = plan_tiles(n_train=n_train, n_test=n_test, size=size, test_test=test_test)
    covered = set()
    for i, j in tiles:
        assert i <= j
        for r in range(*bounds[i]):
            for c in range(*bounds[j]):
                if i != j or r <= c:
                    assert (r, c) not in covered
                    covered.add((r, c))
    n = n_train + n_test
    needed = {(r, c) for r in range(n) for c in range(r, n) if r < n_train or test_test}
    assert covered == needed
    assert sum(tile_pairs(bounds, t) for t in tiles) == len(needed)


def test_bad_tile_size_proposes_divisors():
    with pytest.raises(UserError) as info:
        check_tile_size(n_train=2000, size=300)
    message = info.value.message
    assert "tiles.size=300" in message and "2000" in message
    proposed = [int(v) for v in message.split(": ")[-1].split(", ")]
    assert proposed and all(2000 % v == 0 for v in proposed)
    assert 250 in proposed and 400 in proposed
    with pytest.raises(UserError):
        plan_tiles(n_train=10, n_test=5, size=4)
