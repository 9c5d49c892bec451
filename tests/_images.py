"""Small image sets for tests: the first CIFAR-10 training images of a CIFAR-format directory, preprocessed, and a
synthetic CIFAR-format directory (random pixels in the official python-batch layout) for tests that need the
format but not real images."""
import pickle
from pathlib import Path

import numpy as np

from cntk_gram.workers.preprocess import channel_stats, preprocess

BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{b}" for b in range(1, 6))
LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The synthetic set: 5 training batches of SYNTHETIC_PER_BATCH images and a test batch of SYNTHETIC_TEST, every
# class equally often in each batch (6 of each per training batch, 10 of each in the test batch).
SYNTHETIC_PER_BATCH = 60
SYNTHETIC_TRAIN = len(TRAIN_BATCHES) * SYNTHETIC_PER_BATCH
SYNTHETIC_TEST = 100


def cifar_images(root: Path, n: int) -> np.ndarray:
    """First n training images of a CIFAR-format directory, standardised. (n, 32, 32, 3) float32."""
    with open(Path(root) / BATCH_DIR / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][:max(n, 100)]
    imgs = raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    mean, std = channel_stats(imgs)
    return preprocess(imgs[:n], mean, std)


def write_cifar_batches(root: Path, *, per_batch: int = SYNTHETIC_PER_BATCH, test: int = SYNTHETIC_TEST,
                        seed: int = 0) -> Path:
    """Write root/cifar-10-batches-py/ as the official python batches are written: data_batch_1..5 and test_batch
    (pickled dicts with bytes keys b'batch_label', b'labels', b'data' uint8 (count, 3072) CHW rows, b'filenames')
    and batches.meta, holding seeded random pixels and shuffled balanced labels. Returns root."""
    rng = np.random.default_rng(seed)
    batches = Path(root) / BATCH_DIR
    batches.mkdir(parents=True, exist_ok=True)
    parts = [(name, f"training batch {b + 1} of 5", per_batch) for b, name in enumerate(TRAIN_BATCHES)]
    for name, label, count in parts + [("test_batch", "testing batch 1 of 1", test)]:
        labels = rng.permutation(np.arange(count) % len(LABEL_NAMES))
        batch = {b"batch_label": label.encode(), b"labels": [int(v) for v in labels],
                 b"data": rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
                 b"filenames": [f"{LABEL_NAMES[v]}_s{i:05d}.png".encode() for i, v in enumerate(labels)]}
        (batches / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in LABEL_NAMES],
            b"num_vis": 3 * 32 * 32}
    (batches / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return Path(root)
