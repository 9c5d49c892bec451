"""Image sources, subset selection and preprocessing into the rows of the Gram matrix.

Sources (data.source):
- cifar10: the official python batches under `root/cifar-10-batches-py/`;
- cifar100: the official python batches under `root/cifar-100-python/` (`train`, `test`), fine labels (100
  classes) or with data.label coarse the 20 superclasses;
- svhn: the official cropped digits `root/train_32x32.mat`, `root/test_32x32.mat` (label 10 is the digit 0);
- arrays: data.path, an .npz file or a Zarr group holding x_train, y_train, x_test, y_test: images (N, H, W, C)
  or (N, H, W), uint8 (pixels 0..255) or float, labels non-negative integers.
The three official sources are downloaded from their official URLs (md5 verified) into `root` when absent and
data.download is true. Every load also fingerprints its files (`Source`), which the store keeps so that a resume
from other files is refused.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass, field
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
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_DIR = "cifar-100-python"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_FILES = {"train": ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
              "test": ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3")}
ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
ARRAYS_HELP = ("an arrays source holds x_train, y_train, x_test, y_test: images (N, H, W, C) or (N, H, W), uint8 "
               "(0..255) or float, finite; labels (N,) non-negative integers, one per image")


@dataclass(frozen=True)
class Inputs:
    """The rows of the Gram matrix, train then test.

    images (N, 32, 32, 3) float32 preprocessed; labels (N,) int64; index (N,) int64 into the original
    split; split (N,) int8, 0 = train, 1 = test; mean, std (3,) float64 of the selected training images.
    zca: None (data.preprocess standard), or what identifies the whitening: {"epsilon", "source_fingerprint" (of
    the standardised images before whitening), "mean_sha256", "matrix_sha256" (float64 bytes of zca_fit's mean
    (D,) and matrix (D, D))}; the images are then the whitened ones.
    source: what the rows were read from (Source.record(): name, label, files with their sha256, image_shape).
    """
    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    split: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    zca: dict | None = None
    source: dict | None = None

    @property
    def n_train(self) -> int:
        return int((self.split == 0).sum())

    @property
    def n_test(self) -> int:
        return int((self.split == 1).sum())


def prepare_inputs(data: DataConfig) -> Inputs:
    """Load the configured source, select the subsets, standardise with the selected training images and, with
    data.preprocess zca, whiten train and test with the ZCA fitted on the selected (standardised) training images."""
    raw = load_source(data)
    rows = {}
    for split, count, explicit in (("train", data.train, data.train_index), ("test", data.test, data.test_index)):
        labels = raw[f"{split}_labels"]
        index = select_indices(labels=labels, count=count, classes=data.classes, explicit=explicit, split=split)
        rows[split] = (raw[f"{split}_images"][index], labels[index], index)
    try:
        mean, std = channel_stats(rows["train"][0])
    except ValueError as exc:
        raise UserError(f"data: the selected training images cannot be standardised: {exc}") from None
    images = np.concatenate([preprocess(rows[s][0], mean, std) for s in ("train", "test")])
    labels = np.concatenate([rows[s][1] for s in ("train", "test")]).astype(np.int64)
    index = np.concatenate([rows[s][2] for s in ("train", "test")]).astype(np.int64)
    split = np.repeat(np.array([0, 1], np.int8), [len(rows["train"][2]), len(rows["test"][2])])
    zca = None
    if data.preprocess == "zca":
        images, zca = whiten(images, split=split, epsilon=data.zca_epsilon)
        zca["source_fingerprint"] = fingerprint_arrays(images=zca.pop("source"), labels=labels, index=index,
                                                       split=split)
    return Inputs(images=images, labels=labels, index=index, split=split, mean=mean, std=std, zca=zca,
                  source=raw["source"].record())


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
        explicit = np.asarray(explicit, np.int64)
        if explicit.size and explicit.max() >= len(labels):
            raise UserError(f"data.{split}_index: index {int(explicit.max())} is out of range; the {split} split "
                            f"has {len(labels)} images (indices 0..{len(labels) - 1})")
        return explicit
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


@dataclass
class Source:
    """What a load read: the source's name, its label set (cifar100) and {file name: {"bytes", "sha256"}}."""
    name: str
    label: str | None = None
    files: dict[str, dict] = field(default_factory=dict)
    image_shape: tuple[int, ...] = ()

    def add(self, key: str, content: bytes, *, name: str | None = None) -> None:
        """Record one file's size and sha256 under `key` (name: the file's own name when the key is a role, e.g. an
        arrays source's "npz", so that a renamed or moved copy of the same file still matches)."""
        self.files[key] = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest(),
                           **({} if name is None else {"name": name})}

    def record(self) -> dict:
        """The store's `source` attribute."""
        return {"name": self.name, "label": self.label, "files": dict(sorted(self.files.items())),
                "image_shape": list(self.image_shape)}


def source_differences(stored: dict, current: dict) -> list[str]:
    """Human-readable differences between two Source records (empty: the same files and image shape)."""
    out = []
    if stored.get("name") != current.get("name"):
        out.append(f"source {stored.get('name')} vs {current.get('name')}")
    a, b = stored.get("files") or {}, current.get("files") or {}
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            out.append(f"file {name} {'only now' if name not in a else 'missing now'}")
        elif a[name].get("sha256") != b[name].get("sha256"):
            was, now = (f" ({f['name']})" if f.get("name") else "" for f in (a[name], b[name]))
            out.append(f"{name}: sha256 {a[name].get('sha256', '?')[:12]}{was} ({a[name].get('bytes')} bytes) in the "
                       f"store, {b[name].get('sha256', '?')[:12]}{now} ({b[name].get('bytes')} bytes) now")
    if list(stored.get("image_shape") or []) != list(current.get("image_shape") or []):
        out.append(f"image shape {stored.get('image_shape')} vs {current.get('image_shape')}")
    return out


def load_source(data: DataConfig) -> dict:
    """The configured source, whole: {train,test}_images (N, P, Q, C) uint8 or float64 pixels on the 0..255 scale,
    {train,test}_labels int64 (N,), and source (a Source)."""
    if data.source == "cifar10":
        out = load_cifar10(root=data.root, download=data.download, with_source=True)
    elif data.source == "cifar100":
        out = load_cifar100(root=data.root, download=data.download, label=data.label or "fine")
    elif data.source == "svhn":
        out = load_svhn(root=data.root, download=data.download)
    elif data.source == "arrays":
        out = load_arrays(data.path)
    else:  # config validation allows only the sources above
        raise UserError(f"data.source: unknown source {data.source!r}")
    out["source"].image_shape = tuple(int(s) for s in out["train_images"].shape[1:])
    return out


def load_cifar10(*, root: str | Path, download: bool = True, with_source: bool = False) -> dict:
    """All of CIFAR-10: {train,test}_images uint8 (N, 32, 32, 3) and {train,test}_labels int64 (N,) (with_source:
    also source, the Source of the batch files)."""
    batch_dir = Path(root) / BATCH_DIR
    if not (batch_dir / TEST_BATCHES[0]).exists():
        if not download:
            raise UserError(f"no CIFAR-10 under {batch_dir} (data.download is false); put the python batches "
                            f"there or set data.root")
        _download(Path(root), url=CIFAR10_URL, md5=CIFAR10_MD5, what="CIFAR-10", unpacks=BATCH_DIR)
    source = Source("cifar10")
    out = {}
    for split, names in (("train", TRAIN_BATCHES), ("test", TEST_BATCHES)):
        images, labels = [], []
        for name in names:
            batch = _read_pickle(batch_dir / name, "CIFAR-10 batch", source)
            images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[b"labels"], np.int64))
        out[f"{split}_images"] = np.ascontiguousarray(np.concatenate(images))
        out[f"{split}_labels"] = np.concatenate(labels)
    if with_source:
        out["source"] = source
    return out


def load_cifar100(*, root: str | Path, download: bool = True, label: str = "fine") -> dict:
    """All of CIFAR-100 from root/cifar-100-python/{train,test}: images uint8 (N, 32, 32, 3), labels int64 (N,)
    (label "fine": 0..99, "coarse": the 20 superclasses), source."""
    batch_dir = Path(root) / CIFAR100_DIR
    if not (batch_dir / "test").exists():
        if not download:
            raise UserError(f"no CIFAR-100 under {batch_dir} (data.download is false); put the python batches "
                            f"(train, test) there or set data.root")
        _download(Path(root), url=CIFAR100_URL, md5=CIFAR100_MD5, what="CIFAR-100", unpacks=CIFAR100_DIR)
    source = Source("cifar100", label=label)
    out = {}
    key = f"{label}_labels".encode()
    for split in ("train", "test"):
        batch = _read_pickle(batch_dir / split, "CIFAR-100 file", source)
        try:
            data, labels = batch[b"data"], batch[key]
            images = np.asarray(data, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = np.asarray(labels, np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"CIFAR-100 file {batch_dir / split} is not the official format (needs b'data' and "
                            f"{key!r}): {type(exc).__name__} {exc}") from None
        if len(images) != len(labels):
            raise UserError(f"CIFAR-100 file {batch_dir / split}: {len(images)} images but {len(labels)} labels")
        out[f"{split}_images"] = np.ascontiguousarray(images)
        out[f"{split}_labels"] = labels
    out["source"] = source
    return out


def load_svhn(*, root: str | Path, download: bool = True) -> dict:
    """SVHN's cropped digits from root/{train,test}_32x32.mat ('X' (32, 32, 3, N) uint8, 'y' (N, 1) with 10 for the
    digit 0): images uint8 (N, 32, 32, 3), labels int64 (N,) = the digit, source."""
    from scipy.io import loadmat

    root = Path(root)
    source = Source("svhn")
    out = {}
    for split, (name, md5) in SVHN_FILES.items():
        path = root / name
        if not path.exists():
            if not download:
                raise UserError(f"no SVHN file {path} (data.download is false); put the official {name} there or "
                                f"set data.root")
            _download(root, url=SVHN_URL + name, md5=md5, what="SVHN", unpacks=None)
        content = _read_bytes(path, "SVHN file")
        source.add(name, content)
        try:
            mat = loadmat(io.BytesIO(content))
            x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
        except Exception as exc:  # scipy raises several types for a damaged or foreign file
            raise UserError(f"cannot read SVHN file {path} (needs 'X' (32, 32, 3, N) and 'y' (N, 1)): "
                            f"{type(exc).__name__} {exc}") from None
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y) or x.dtype != np.uint8:
            raise UserError(f"SVHN file {path}: 'X' has shape {x.shape} dtype {x.dtype} for {len(y)} labels; "
                            f"expected uint8 (32, 32, 3, N) with N = the labels in 'y'")
        labels = y.astype(np.int64)
        if labels.size and (labels.min() < 1 or labels.max() > 10):
            raise UserError(f"SVHN file {path}: labels must be 1..10 (10 = the digit 0), got "
                            f"{labels.min()}..{labels.max()}")
        out[f"{split}_images"] = np.ascontiguousarray(x.transpose(3, 0, 1, 2))
        out[f"{split}_labels"] = labels % 10
    out["source"] = source
    return out


def load_arrays(path: str | Path | None) -> dict:
    """An arrays source: an .npz file or a Zarr group holding x_train, y_train, x_test, y_test (ARRAYS_HELP).
    Images come back as (N, H, W, C): uint8 as they are, float as float64 x 255 (so that preprocess's / 255 gives
    the values given); labels int64. Every problem is one UserError naming it and what is allowed."""
    if path is None:
        raise UserError(f"data.path: source arrays needs a path; {ARRAYS_HELP}")
    path = Path(path)
    source = Source("arrays")
    if path.is_dir():
        arrays = _zarr_arrays(path, source)
    elif path.is_file():
        arrays = _npz_arrays(path, source)
    else:
        raise UserError(f"data.path: no file or directory {path}; give an .npz file or a Zarr group ({ARRAYS_HELP})")
    out = {"source": source}
    shapes = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        x = _check_images(x, f"{path}: x_{split}")
        y = _check_labels(y, f"{path}: y_{split}")
        if len(x) != len(y):
            raise UserError(f"{path}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels; they must "
                            f"have one label per image")
        shapes[split] = x.shape[1:]
        out[f"{split}_images"], out[f"{split}_labels"] = x, y
    if shapes["train"] != shapes["test"]:
        raise UserError(f"{path}: x_train images are {shapes['train']} (H, W, C) but x_test images are "
                        f"{shapes['test']}; both splits need one image shape")
    if len(out["train_images"]) == 0:
        raise UserError(f"{path}: x_train holds no images; {ARRAYS_HELP}")
    return out


def _npz_arrays(path: Path, source: Source) -> dict:
    content = _read_bytes(path, "arrays file")
    source.add("npz", content, name=path.name)
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as npz:
            missing = [key for key in ARRAY_KEYS if key not in npz.files]
            if missing:
                raise UserError(f"{path}: no array {missing[0]!r} (has {', '.join(sorted(npz.files)) or 'none'}); "
                                f"{ARRAYS_HELP}")
            return {key: npz[key] for key in ARRAY_KEYS}
    except UserError:
        raise
    except Exception as exc:  # not a zip, an object array (needs pickle), a damaged member...
        raise UserError(f"data.path {path} is not a readable .npz of plain arrays ({type(exc).__name__}: {exc}); "
                        f"{ARRAYS_HELP}") from None


def _zarr_arrays(path: Path, source: Source) -> dict:
    import zarr

    try:
        group = zarr.open_group(path, mode="r")
    except Exception as exc:
        raise UserError(f"data.path {path} is a directory but not a Zarr group ({type(exc).__name__}); give an .npz "
                        f"file or a Zarr group ({ARRAYS_HELP})") from None
    arrays = {}
    for key in ARRAY_KEYS:
        try:
            arrays[key] = np.asarray(group[key][...])
        except KeyError:
            raise UserError(f"{path}: no array {key!r} in the Zarr group; {ARRAYS_HELP}") from None
        except Exception as exc:
            raise UserError(f"{path}: cannot read {key} ({type(exc).__name__}: {exc})") from None
        digest = hashlib.sha256(f"{arrays[key].dtype.str}{arrays[key].shape}".encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
        source.files[key] = {"bytes": int(arrays[key].nbytes), "sha256": digest.hexdigest()}
    return arrays


def _check_images(x: np.ndarray, where: str) -> np.ndarray:
    """(N, H, W, C) or (N, H, W) uint8 or float, finite, non-empty image dimensions -> (N, H, W, C) uint8 or float64."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or min(x.shape[1:]) < 1:
        raise UserError(f"{where} has shape {x.shape}; allowed: (N, H, W, C) or (N, H, W) with H, W, C >= 1")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"{where} has dtype {x.dtype}; allowed: uint8 (0..255, scaled by 1/255) or float")
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise UserError(f"{where} has {bad} non-finite values (NaN or inf); every pixel must be finite")
    return x.astype(np.float64) * 255.0


def _check_labels(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise UserError(f"{where} has shape {y.shape}; allowed: (N,) or (N, 1), one integer label per image")
    if not np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_):
        raise UserError(f"{where} has dtype {y.dtype}; labels must be integers >= 0 (class numbers)")
    if y.size and y.min() < 0:
        raise UserError(f"{where} holds the negative label {int(y.min())}; labels must be integers >= 0")
    return y.astype(np.int64)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _read_pickle(path: Path, what: str, source: Source) -> dict:
    content = _read_bytes(path, what)
    source.add(path.name, content)
    try:
        batch = pickle.loads(content, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"cannot read {what} {path}: {exc}") from None
    if not isinstance(batch, dict):
        raise UserError(f"cannot read {what} {path}: not a dict of arrays")
    return batch


def _download(root: Path, *, url: str, md5: str, what: str, unpacks: str | None) -> None:
    """Fetch an official file into root, check its md5; an archive (unpacks: the directory it holds) is unpacked."""
    target = root / url.rsplit("/", 1)[-1]
    where = root / unpacks if unpacks else target
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            partial = target.with_name(target.name + ".part")
            with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
            if hashlib.md5(partial.read_bytes()).hexdigest() != md5 and unpacks is None:
                partial.unlink()
                raise UserError(f"the download of {url} has the wrong md5 (expected {md5}); retry")
            partial.replace(target)
    except OSError as exc:
        raise UserError(f"no {what} at {where} and the download from {url} failed ({exc}); put the official "
                        f"files there or set data.root") from None
    actual = hashlib.md5(target.read_bytes()).hexdigest()
    if actual != md5:
        raise UserError(f"{target} has md5 {actual}, expected {md5}; delete it and retry")
    if unpacks is None:
        return
    with tarfile.open(target, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse unsafe member paths
            tar.extractall(root, filter="data")
        else:
            tar.extractall(root)
