"""The paper's preprocessing (Arora et al. 2019, App. A): pixels / 255, per-channel standardisation with
statistics of the training images only, and 0.9 / -0.1 regression targets; optional ZCA whitening after the
standardisation (Li et al. 2019; Shankar et al. 2020), fitted on the training images only (docs/enhanced.md)."""
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


def check_zca_epsilon(epsilon) -> float:
    """zca_epsilon must be a finite number > 0 (a fraction of the mean eigenvalue)."""
    if isinstance(epsilon, (bool, np.bool_)) or not isinstance(epsilon, (int, float, np.integer, np.floating)) \
            or not np.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(f"zca_epsilon must be a finite number > 0 (regulariser as a fraction of the mean "
                         f"eigenvalue, e.g. 0.1), got {epsilon!r}")
    return float(epsilon)


def zca_fit(train: np.ndarray, epsilon: float) -> dict:
    """ZCA whitening fitted on (standardised) training images only.

    train: (N, P, Q, C) float, e.g. the output of `preprocess` for the selected training images. Each image is
    flattened to D = P*Q*C features and centred by the per-feature training mean mu (D,); with the covariance
    S = Xc^T Xc / N = U diag(lam) U^T, the whitening matrix is W = U diag(1 / sqrt(lam + epsilon * mean(lam))) U^T.
    Returns {"mean": (D,), "matrix": W (D, D), "eigenvalues": lam (D,) ascending, "epsilon": float,
    "shape": (P, Q, C)}, all float64: what a store keeps to refuse a resume with other settings.
    Raises ValueError for epsilon <= 0, bad shapes or non-finite pixels.
    """
    epsilon = check_zca_epsilon(epsilon)
    x = check_images(train, name="train").astype(np.float64)
    if len(x) < 2:
        raise ValueError(f"zca needs at least 2 training images, got {len(x)}")
    flat = x.reshape(len(x), -1)
    mean = flat.mean(axis=0)
    centred = flat - mean
    lam, u = np.linalg.eigh(centred.T @ centred / len(x))
    lam = np.maximum(lam, 0.0)  # eigh may return -1e-16 for the null space (N < D)
    scale = 1.0 / np.sqrt(lam + epsilon * lam.mean())
    matrix = (u * scale) @ u.T
    return {"mean": mean, "matrix": (matrix + matrix.T) / 2, "eigenvalues": lam, "epsilon": epsilon,
            "shape": tuple(int(s) for s in x.shape[1:])}


def zca_apply(images: np.ndarray, params: dict, dtype=np.float32) -> np.ndarray:
    """Whiten images with `zca_fit` parameters: ((x - mean) W), reshaped back. images: (N, P, Q, C) float.
    Returns (N, P, Q, C) in dtype (float32, the kernels' input precision, by default); computed in float64."""
    x = check_images(images, name="images").astype(np.float64)
    if x.shape[1:] != tuple(params["shape"]):
        raise ValueError(f"images have shape {x.shape[1:]}, the ZCA was fitted on {tuple(params['shape'])}")
    flat = (x.reshape(len(x), -1) - params["mean"]) @ params["matrix"]
    return flat.reshape(x.shape).astype(dtype)
