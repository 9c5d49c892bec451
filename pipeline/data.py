"""CIFAR-10 loading, subset selection and preprocessing into the rows of the Gram matrix.

Images come from the official python batches under `root/cifar-10-batches-py/`; when absent they are
downloaded from the official URL (checksum verified) into `root`.
"""
from __future__ import annotations

import hashlib
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cntk_gram.pipeline.config import DataConfig
from cntk_gram.pipeline.errors import UserError
from cntk_gram.workers.preprocess import channel_stats, preprocess, zca_apply, zca_fit

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{b}" for b in range(1, 6))
TEST_BATCHES = ("test_batch",)


@dataclass(frozen=True)
class Inputs:
    """The rows of the Gram matrix, train then test.

    images (N, 32, 32, 3) float32 preprocessed; labels (N,) int64; index (N,) int64 into the original
    split; split (N,) int8, 0 = train, 1 = test; mean, std (3,) float64 of the selected training images.
    zca: None (data.preprocess standard), or what identifies the whitening: {"epsilon", "source_fingerprint" (of
    the standardised images before whitening), "mean_sha256", "matrix_sha256" (float64 bytes of zca_fit's mean
    (D,) and matrix (D, D))}; the images are then the whitened ones.
    """
    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    split: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    zca: dict | None = None

    @property
    def n_train(self) -> int:
        return int((self.split == 0).sum())

    @property
    def n_test(self) -> int:
        return int((self.split == 1).sum())


def prepare_inputs(data: DataConfig) -> Inputs:
    """Load CIFAR-10, select the configured subsets, standardise with the selected training images and, with
    data.preprocess zca, whiten train and test with the ZCA fitted on the selected (standardised) training images."""
    raw = load_cifar10(root=data.root, download=data.download)
    rows = {}
    for split, count, explicit in (("train", data.train, data.train_index), ("test", data.test, data.test_index)):
        labels = raw[f"{split}_labels"]
        index = select_indices(labels=labels, count=count, classes=data.classes, explicit=explicit, split=split)
        rows[split] = (raw[f"{split}_images"][index], labels[index], index)
    mean, std = channel_stats(rows["train"][0])
    images = np.concatenate([preprocess(rows[s][0], mean, std) for s in ("train", "test")])
    labels = np.concatenate([rows[s][1] for s in ("train", "test")]).astype(np.int64)
    index = np.concatenate([rows[s][2] for s in ("train", "test")]).astype(np.int64)
    split = np.repeat(np.array([0, 1], np.int8), [len(rows["train"][2]), len(rows["test"][2])])
    zca = None
    if data.preprocess == "zca":
        images, zca = whiten(images, split=split, epsilon=data.zca_epsilon)
        zca["source_fingerprint"] = fingerprint_arrays(images=zca.pop("source"), labels=labels, index=index,
                                                       split=split)
    return Inputs(images=images, labels=labels, index=index, split=split, mean=mean, std=std, zca=zca)


def whiten(images: np.ndarray, *, split: np.ndarray, epsilon: float) -> tuple[np.ndarray, dict]:
    """ZCA (cntk_gram.workers.preprocess.zca_fit) fitted on the rows with split 0 only, applied to every row.

    images: (N, P, Q, C) float32 standardised; split: (N,) int8. Returns the whitened (N, P, Q, C) float32 images and
    {"epsilon", "mean_sha256", "matrix_sha256", "source": the standardised images}."""
    if int((split == 0).sum()) < 2:
        raise UserError(f"data.preprocess zca: needs at least 2 training images, got {int((split == 0).sum())}")
    params = zca_fit(images[split == 0], epsilon)
    return zca_apply(images, params), {
        "epsilon": params["epsilon"], "source": images,
        "mean_sha256": hashlib.sha256(np.ascontiguousarray(params["mean"]).tobytes()).hexdigest(),
        "matrix_sha256": hashlib.sha256(np.ascontiguousarray(params["matrix"]).tobytes()).hexdigest(),
    }


def select_indices(*, labels: np.ndarray, count: int | None, classes: tuple[int, ...] | None,
                   explicit: tuple[int, ...] | None, split: str) -> np.ndarray:
    """Indices into one split: the explicit list, else the first `count` images of the chosen classes."""
    if explicit is not None:
        return np.asarray(explicit, np.int64)
    candidates = np.arange(len(labels), dtype=np.int64)
    if classes is not None:
        candidates = candidates[np.isin(labels, classes)]
    if count is None:
        return candidates
    if count > len(candidates):
        raise UserError(f"data.{split}={count} but only {len(candidates)} {split} images match "
                        f"(classes={list(classes) if classes else 'all'})")
    return candidates[:count]


def fingerprint(inputs: Inputs) -> str:
    """sha256 over the preprocessed images, labels, index and split (identifies the Gram's rows)."""
    return fingerprint_arrays(images=inputs.images, labels=inputs.labels, index=inputs.index, split=inputs.split)


def fingerprint_arrays(*, images: np.ndarray, labels: np.ndarray, index: np.ndarray, split: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (images, labels, index, split):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def load_cifar10(*, root: str | Path, download: bool = True) -> dict[str, np.ndarray]:
    """All of CIFAR-10: {train,test}_images uint8 (N, 32, 32, 3) and {train,test}_labels int64 (N,)."""
    batch_dir = Path(root) / BATCH_DIR
    if not (batch_dir / TEST_BATCHES[0]).exists():
        if not download:
            raise UserError(f"no CIFAR-10 under {batch_dir} (data.download is false); put the python batches "
                            f"there or set data.root")
        _download(Path(root))
    out = {}
    for split, names in (("train", TRAIN_BATCHES), ("test", TEST_BATCHES)):
        images, labels = [], []
        for name in names:
            try:
                with open(batch_dir / name, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
            except (OSError, pickle.UnpicklingError, EOFError) as exc:
                raise UserError(f"cannot read CIFAR-10 batch {batch_dir / name}: {exc}") from None
            images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[b"labels"], np.int64))
        out[f"{split}_images"] = np.ascontiguousarray(np.concatenate(images))
        out[f"{split}_labels"] = np.concatenate(labels)
    return out


def _download(root: Path) -> None:
    """Fetch the official archive into root, check its md5, unpack cifar-10-batches-py/."""
    archive = root / "cifar-10-python.tar.gz"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not archive.exists():
            partial = archive.with_suffix(".part")
            with urllib.request.urlopen(CIFAR10_URL, timeout=30) as response, open(partial, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
            partial.replace(archive)
    except OSError as exc:
        raise UserError(f"no CIFAR-10 under {root / BATCH_DIR} and the download from {CIFAR10_URL} failed "
                        f"({exc}); put the python batches there or set data.root") from None
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    if md5 != CIFAR10_MD5:
        raise UserError(f"{archive} has md5 {md5}, expected {CIFAR10_MD5}; delete it and retry")
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse unsafe member paths
            tar.extractall(root, filter="data")
        else:
            tar.extractall(root)
