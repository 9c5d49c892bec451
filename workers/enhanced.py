"""Shared bits of the enhanced readouts (docs/enhanced.md): LAP(c) weights, the horizontal flip and its average,
input checks and the depth selection of a tile call's output.

Key names (every value is (max_depth - 1, n, m), depth d at index d - 2, like the plain kernels), written and read by
cntk_gram.workers.vocab (KernelKey, output_keys):
    "{kind}-lap{c}"          LAP(c) readout of the GAP recursion, kind in ("ntk", "nngp"), e.g. "ntk-lap4"
    "{kind}-{arch}-flip"     flip-averaged kernel of any plain key, e.g. "ntk-gap-flip", "nngp-vanilla-flip"
    "{kind}-lap{c}-flip"     flip-averaged LAP(c), e.g. "ntk-lap4-flip"
"""
import numpy as np

from .vocab import LAP_ARCH


def check_lap(lap, archs, image_shape=None) -> tuple[int, ...]:
    """Validate the LAP sizes c (integers >= 0) against the requested architectures and, given, the image size.

    lap: an int or an iterable of ints (empty: no LAP); archs: validated tuple of architectures. LAP is a readout of
    the GAP recursion, so "gap" must be among archs (vanilla and fc have no position pairs left to weight).
    image_shape: (P, Q, ...) of the images, or None (not known yet, e.g. when a config is read): then every c must be
    at most max_lap(P, Q) = max(P, Q); a larger c shifts by more pixels than the image has on either axis.
    Returns the distinct c in the given order. Raises ValueError naming the problem and what is allowed.
    """
    if lap is None:
        return ()
    values = (lap,) if isinstance(lap, (int, np.integer)) else tuple(lap)
    for c in values:
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)) or c < 0:
            raise ValueError(f"lap sizes must be integers >= 0 (pixels of shift per axis), got {c!r} in {values!r}")
    if values and LAP_ARCH not in archs:
        raise ValueError(f"lap={list(values)} is a readout of the GAP recursion: add 'gap' to archs (got "
                         f"{list(archs)}); 'vanilla' and 'fc' have no position pairs to weight")
    if image_shape is not None:
        p, q = (int(v) for v in tuple(image_shape)[:2])
        limit = max_lap(p, q)
        too_large = [int(c) for c in values if c > limit]
        if too_large:
            raise ValueError(f"lap sizes must be at most {limit} for {p}x{q} images (a shift of at most the larger "
                             f"image side per axis), got {too_large} in {list(values)!r}")
    return tuple(dict.fromkeys(int(c) for c in values))


def max_lap(p: int, q: int) -> int:
    """Largest LAP size c allowed for P x Q images: the larger side, max(P, Q). Beyond it the shifts are larger than
    the image on both axes (the weights are still defined, and tend to GAP's as c grows: docs/enhanced.md)."""
    return max(int(p), int(q))


def check_flip(flip) -> bool:
    if not isinstance(flip, (bool, np.bool_)):
        raise ValueError(f"flip must be True or False, got {flip!r}")
    return bool(flip)


def triangle(c: int, delta: np.ndarray) -> np.ndarray:
    """(1 - |delta| / (2c + 1))_+ in float64: the fraction of shift pairs (s, s') in [-c, c] with s' - s = delta."""
    return np.maximum(1.0 - np.abs(delta) / (2.0 * c + 1.0), 0.0)


def lap_weights(cs, p: int, q: int) -> np.ndarray:
    """w_c(di, dj) for every true displacement: float64 (len(cs), 2p-1, 2q-1), [k, di + p - 1, dj + q - 1]."""
    di, dj = np.arange(-(p - 1), p), np.arange(-(q - 1), q)
    out = np.empty((len(cs), 2 * p - 1, 2 * q - 1))
    for k, c in enumerate(cs):
        out[k] = np.outer(triangle(c, di), triangle(c, dj))
    return out


def flip_images(x: np.ndarray) -> np.ndarray:
    """Horizontal mirror of (n, P, Q, C) images: the column axis Q reversed (a contiguous copy)."""
    return np.ascontiguousarray(x[:, :, ::-1, :])


def flip_average(plain: np.ndarray, mirrored: np.ndarray, dtype=np.float32) -> np.ndarray:
    """The flip-averaged kernel (K(x, y) + K(x, flip y)) / 2 from its two halves, summed in float64, in `dtype`."""
    return ((np.asarray(plain).astype(np.float64) + mirrored) / 2).astype(dtype)

