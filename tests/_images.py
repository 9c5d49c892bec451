"""Small image sets for tests: random ones and the first pixel-exact CIFAR-10 training images, preprocessed."""
import pickle
from pathlib import Path

import numpy as np

from cntk_gram.workers.preprocess import channel_stats, preprocess


def cifar_images(root: Path, n: int) -> np.ndarray:
    """First n training images of CIFAR-10 (pixel-exact in the local build), standardised. (n, 32, 32, 3) float32."""
    with open(Path(root) / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][:max(n, 100)]
    imgs = raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    mean, std = channel_stats(imgs)
    return preprocess(imgs[:n], mean, std)
