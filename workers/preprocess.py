"""The paper's preprocessing (Arora et al. 2019, App. A): pixels / 255, per-channel standardisation with
statistics of the training images only, and 0.9 / -0.1 regression targets."""
import numpy as np

from .validate import check_images


def channel_stats(train_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of training images.

    train_images: (N, P, Q, C) raw pixels 0..255 (uint8 or float).
    Returns (mean, std), each (C,) float64, in units of pixels / 255.
    """
    x = check_images(train_images, name="train_images", allow_uint8=True).astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 1, 2))
    std = x.std(axis=(0, 1, 2))
    if np.any(std <= 0):
        raise ValueError("train_images: a channel has zero variance; cannot standardise")
    return mean, std


def preprocess(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(images / 255 - mean) / std per channel.

    images: (N, P, Q, C) raw pixels 0..255 (uint8 or float); mean, std: (C,) from `channel_stats`.
    Returns (N, P, Q, C) float32.
    """
    x = check_images(images, name="images", allow_uint8=True).astype(np.float64) / 255.0
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if mean.shape != (x.shape[-1],) or std.shape != (x.shape[-1],):
        raise ValueError(f"mean/std must have shape ({x.shape[-1]},), got {mean.shape} and {std.shape}")
    return ((x - mean) / std).astype(np.float32)


def targets(labels: np.ndarray, n_classes: int = 10) -> np.ndarray:
    """Regression targets: 0.9 for the true class, -0.1 elsewhere.

    labels: (N,) integers in [0, n_classes). Returns (N, n_classes) float64.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{labels.min()}, {labels.max()}]")
    y = np.full((labels.size, n_classes), -0.1)
    y[np.arange(labels.size), labels] = 0.9
    return y
