"""Input checks shared by every kernel entry point: one clear ValueError per kind of bad input."""
from typing import NamedTuple

import numpy as np

from .enhanced import check_flip, check_lap
from .vocab import ARCHS, KINDS


def check_images(x, *, name: str = "x", allow_uint8: bool = False) -> np.ndarray:
    """x must be (N, P, Q, C) with finite values. Returns it as an ndarray (dtype unchanged)."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N, height, width, channels), got shape {x.shape}")
    if min(x.shape[1:]) < 1:
        raise ValueError(f"{name} has an empty image dimension: shape {x.shape}")
    if x.dtype == np.uint8 and allow_uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point (float32 or float64), got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains non-finite pixels (NaN or inf) in {int((~np.isfinite(x)).sum())} places")
    return x


def check_pair(x, y):
    """Validate a block pair; y None means y = x. Returns (x, y_or_None)."""
    x = check_images(x, name="x")
    if y is None:
        return x, None
    y = check_images(y, name="y")
    if y.shape[1:] != x.shape[1:]:
        raise ValueError(f"x and y images differ in shape: {x.shape[1:]} vs {y.shape[1:]}")
    return x, y


def check_depth(max_depth) -> int:
    """Paper depth (conv layers + 1) must be an integer >= 2."""
    if isinstance(max_depth, bool) or not isinstance(max_depth, (int, np.integer)) or max_depth < 2:
        raise ValueError(f"max_depth must be an integer >= 2 (paper depth = conv layers + 1), got {max_depth!r}")
    return int(max_depth)


def check_selection(depths, kinds, max_depth: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """What a tile call returns: depths (None = every depth 2..max_depth, else distinct integers in that range, kept in
    the order given) and kinds (None = ntk and nngp, else a non-empty subset of KINDS)."""
    if depths is None:
        depths = tuple(range(2, max_depth + 1))
    else:
        depths = (depths,) if isinstance(depths, (int, np.integer)) else tuple(depths)
        ok = all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and 2 <= d <= max_depth for d in depths)
        if not depths or not ok or len(set(depths)) != len(depths):
            raise ValueError(f"depths must be distinct integers in 2..{max_depth} (max_depth), got {list(depths)!r}")
        depths = tuple(int(d) for d in depths)
    if kinds is None:
        kinds = KINDS
    else:
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        if not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
            raise ValueError(f"kinds must be distinct names from {', '.join(KINDS)}, got {list(kinds)!r}")
    return depths, kinds


def check_archs(archs) -> tuple[str, ...]:
    archs = (archs,) if isinstance(archs, str) else tuple(archs)
    bad = [a for a in archs if a not in ARCHS]
    if bad or not archs:
        raise ValueError(f"unknown architecture {bad or archs!r}; allowed: {', '.join(ARCHS)}")
    return archs


def same_images(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n, m) bool: x[a] and y[b] are byte-identical images (their zero-displacement rho is exactly 1)."""
    hx = np.array([hash(im.tobytes()) for im in x])
    hy = hx if y is x else np.array([hash(im.tobytes()) for im in y])
    same = hx[:, None] == hy[None, :]
    for a, b in zip(*np.nonzero(same)):
        same[a, b] = np.array_equal(x[a], y[b])
    return same


class TileCall(NamedTuple):
    """The checked arguments of a backend's tile_kernels."""
    x: np.ndarray
    y: np.ndarray | None
    archs: tuple[str, ...]
    max_depth: int
    lap: tuple[int, ...]
    flip: bool
    depths: tuple[int, ...]
    kinds: tuple[str, ...]


def check_tile_call(x, y, *, archs, max_depth, lap, flip, depths, kinds) -> TileCall:
    """Every backend's tile_kernels checks, in one order: the first problem raises its ValueError."""
    x, y = check_pair(x, y)
    archs = check_archs(archs)
    max_depth = check_depth(max_depth)
    lap = check_lap(lap, archs, x.shape[1:])
    flip = check_flip(flip)
    depths, kinds = check_selection(depths, kinds, max_depth)
    return TileCall(x, y, archs, max_depth, lap, flip, depths, kinds)
