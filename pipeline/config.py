"""Run configuration: YAML -> one frozen, validated dataclass tree.

The YAML users write (every key optional except where noted):

    data:    {source: cifar10, root: DIR, train: 2000, test: 2000, classes: [0, 1],
              train_index: [...], test_index: [...], test_test: false, download: true,
              preprocess: standard, zca_epsilon: 0.1}        # preprocess: standard | zca (docs/enhanced.md)
             # source: cifar10 | cifar100 (label: fine | coarse) | svhn | arrays (path: FILE.npz or a Zarr group)
    kernel:  {archs: [vanilla, gap], kinds: [ntk, nngp], depths: [3, 4, 6, 11, 21],
              lap: [2, 4, 8], flip: false,                   # LAP(c) readouts (need gap), flip-averaged kernels
              random_features: {width: 128, draws: 10, seed: 0, max_bytes: 1GiB}}   # optional; needs torch
    tiles:   {size: 500}
    backend: auto                 # auto | cpu | gpu
    store:   runs/quickstart.zarr
    cluster: {scheduler: null, scheduler_file: null, workers: 1, threads: null, slots: null,
              max_in_flight: null, retries: 2}

Validation happens once, in `load_config` / `build_config`; every error names the field and what is allowed.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cntk_gram.pipeline.errors import UserError
from cntk_gram.workers.enhanced import check_lap
from cntk_gram.workers.preprocess import check_zca_epsilon
from cntk_gram.workers.vocab import ARCHS, BACKEND_CHOICES, KINDS, MAX_LAP, RF_ARCHS, output_keys, rf_keys

SOURCES = ("cifar10", "cifar100", "svhn", "arrays")
# Images per split of each source with a fixed size (an arrays source is checked when its file is read).
SOURCE_SPLITS = {"cifar10": {"train": 50_000, "test": 10_000}, "cifar100": {"train": 50_000, "test": 10_000},
                 "svhn": {"train": 73_257, "test": 26_032}}
# Classes of each source (an arrays source: whatever its labels hold); cifar100 by data.label.
SOURCE_CLASSES = {"cifar10": 10, "cifar100:fine": 100, "cifar100:coarse": 20, "svhn": 10}
CIFAR100_LABELS = ("fine", "coarse")
N_CLASSES = 10
SPLIT_SIZES = SOURCE_SPLITS["cifar10"]
UNBOUNDED = 2**62   # an arrays source's counts, indices and classes are bounded only by its file
PREPROCESS = ("standard", "zca")


def torch_available() -> bool:
    """Whether PyTorch is importable here (checked without importing it: random features need it)."""
    return importlib.util.find_spec("torch") is not None


@dataclass(frozen=True)
class RandomFeaturesConfig:
    """The random-features kernels (`docs/rf.md`): per draw R = 0..draws-1, the empirical NTK (and NNGP) of one
    random CNN of `width` channels per (arch, depth), drawn from `seed`. max_bytes: memory budget of one tile's
    gradients (bounds a worker's memory, whatever the tile size); it does not change the kernel."""
    width: int = 128
    draws: int = 10
    seed: int = 0
    max_bytes: int = 2**30


@dataclass(frozen=True)
class DataConfig:
    """Which images. `train`/`test`: first N of each split (after class filtering); None = all.
    source: cifar10 | cifar100 | svhn (official files under root, downloaded when absent and download is true)
    | arrays (path: an .npz file or a Zarr group holding x_train, y_train, x_test, y_test). label: cifar100 only,
    "fine" (100 classes, the default) or "coarse" (20 superclasses); None for every other source.
    preprocess: "standard" (the paper's per-channel standardisation) or "zca" (then ZCA whitening fitted on the
    selected training images, regulariser zca_epsilon * mean eigenvalue; zca_epsilon is ignored for "standard")."""
    source: str = "cifar10"
    root: str = "data"
    train: int | None = None
    test: int | None = None
    classes: tuple[int, ...] | None = None
    train_index: tuple[int, ...] | None = None
    test_index: tuple[int, ...] | None = None
    test_test: bool = False
    download: bool = True
    preprocess: str = "standard"
    zca_epsilon: float = 0.1
    label: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class KernelConfig:
    archs: tuple[str, ...] = ("vanilla", "gap")
    kinds: tuple[str, ...] = ("ntk", "nngp")
    depths: tuple[int, ...] = (3, 4, 6, 11, 21)
    lap: tuple[int, ...] = ()
    flip: bool = False
    random_features: RandomFeaturesConfig | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """Exact kernel keys in the tile call's order (cntk_gram.workers.vocab.output_keys) for the chosen kinds:
        '{kind}-{arch}' (arch-major), '{kind}-lap{c}', then with flip every one of them again + '-flip'."""
        return tuple(output_keys(self.archs, self.lap, self.flip, self.kinds))

    @property
    def rf_archs(self) -> tuple[str, ...]:
        """Architectures that also get random-features kernels (none without a random_features block)."""
        return () if self.random_features is None else tuple(a for a in self.archs if a in RF_ARCHS)

    @property
    def rf_keys(self) -> tuple[str, ...]:
        """Random-features kernel keys 'rf-{kind}-{arch}' (arch-major), empty without random_features."""
        return tuple(rf_keys(self.rf_archs, self.kinds))


@dataclass(frozen=True)
class TileConfig:
    size: int = 500


@dataclass(frozen=True)
class ClusterConfig:
    """Where tasks run. No scheduler = an embedded local cluster of `workers` processes.

    threads: numba threads per worker (default: cores // workers); slots: tile tasks one worker of the
    embedded cluster runs at once (default: 3 for GPU workers, so that other tiles' input reads, copies to the
    host and store writes overlap the current tile's kernels, which the GPU backend serialises; 1 for CPU workers, whose
    numba kernels already use all the worker's threads); max_in_flight: tasks submitted at once (default: 2 per
    task slot of the cluster); retries: re-runs of a failed tile task before giving up. On an existing cluster
    the workers' own thread counts (`dask worker --nthreads`) are the slots and `slots` is unused.
    """
    scheduler: str | None = None
    scheduler_file: str | None = None
    workers: int = 1
    threads: int | None = None
    slots: int | None = None
    max_in_flight: int | None = None
    retries: int = 2


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    tiles: TileConfig = field(default_factory=TileConfig)
    backend: str = "auto"
    store: str = "runs/cntk.zarr"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


SECTIONS = {"data": DataConfig, "kernel": KernelConfig, "tiles": TileConfig, "cluster": ClusterConfig}
# Fields that do not change any computed number: ignored when a store's config is compared on resume.
# data.path is where an arrays source lies, like data.root: what it holds is the store's source fingerprint.
NON_RESULT_FIELDS = ("data.root", "data.download", "data.path", "backend", "store", "cluster",
                     "kernel.random_features.max_bytes")
# Fields added after stores were first made: a store's config without them means these values.
ABSENT_MEANS = {"kernel.lap": [], "kernel.flip": False, "data.preprocess": "standard", "data.label": None}


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML file, apply dotted-path `overrides` ({"data.train": 100}), validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config {path}: top level must be a mapping with keys {_allowed(RunConfig)}")
    return build_config(raw, overrides)


def build_config(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Validate a plain mapping (as read from YAML) into a RunConfig."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, name = dotted.partition(".")
        if name:
            raw.setdefault(section, {})
            if not isinstance(raw[section], dict):
                raise UserError(f"config: '{section}' must be a mapping")
            raw[section][name] = value
        else:
            raw[section] = value
    _check_keys("config", raw, _allowed(RunConfig))
    if "root" not in (raw.get("data") or {}) and os.environ.get("CNTK_CIFAR_ROOT"):
        raw.setdefault("data", {})["root"] = os.environ["CNTK_CIFAR_ROOT"]
    sections = {}
    for name, cls in SECTIONS.items():
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            raise UserError(f"config: '{name}' must be a mapping with keys {_allowed(cls)}")
        _check_keys(name, value, _allowed(cls))
        sections[name] = value
    config = RunConfig(
        data=_data(sections["data"]),
        kernel=_kernel(sections["kernel"]),
        tiles=TileConfig(size=_int("tiles.size", sections["tiles"].get("size", TileConfig.size), low=1)),
        backend=_choice("backend", raw.get("backend", "auto"), BACKEND_CHOICES),
        store=_str("store", raw.get("store", RunConfig.store)),
        cluster=_cluster(sections["cluster"]),
    )
    return config


def to_dict(config: RunConfig) -> dict[str, Any]:
    """Plain JSON-able dict (tuples -> lists), as stored in the store's attributes."""
    return _plain(dataclasses.asdict(config))


def result_fields(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Flatten to {'data.train': 100, 'kernel.random_features.width': 128, ...} keeping only fields that
    change computed numbers. A null block and an absent one compare equal (config_differences uses .get)."""
    flat = {}

    def walk(prefix: str, value: Any) -> None:
        if prefix in NON_RESULT_FIELDS:
            return
        if isinstance(value, dict):
            for name, v in value.items():
                walk(f"{prefix}.{name}" if prefix else name, v)
        else:
            flat[prefix] = value

    walk("", config_dict)
    for name, value in ABSENT_MEANS.items():
        if flat.get(name, value) == value:
            flat.pop(name, None)
    if flat.get("data.preprocess") != "zca":  # the epsilon only changes numbers of a ZCA store
        flat.pop("data.zca_epsilon", None)
    return flat


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences in result-changing fields: ["kernel.depths: store [3] vs config [3, 4]"]."""
    a, b = result_fields(stored), result_fields(current)
    return [f"{k}: store has {a.get(k)!r}, config has {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# --- validation helpers -------------------------------------------------------------------------

def _data(raw: dict) -> DataConfig:
    source = _choice("data.source", raw.get("source", "cifar10"), SOURCES)
    label = raw.get("label")
    if source == "cifar100":
        label = _choice("data.label", "fine" if label is None else label, CIFAR100_LABELS)
    elif label is not None:
        raise UserError(f"data.label: only for source cifar100 (fine or coarse), not for source {source}; drop it")
    path = raw.get("path")
    if source == "arrays":
        if path is None:
            raise UserError("data.path: source arrays needs data.path, an .npz file or a Zarr group holding "
                            "x_train, y_train, x_test, y_test (or give --data-path)")
        path = _str("data.path", path)
    elif path is not None:
        raise UserError(f"data.path: only for source arrays; source {source} reads data.root")
    n_classes = SOURCE_CLASSES.get(source if label is None else f"{source}:{label}", UNBOUNDED)
    classes = _int_list("data.classes", raw.get("classes"), low=0, high=n_classes - 1)
    if classes is not None and len(set(classes)) != len(classes):
        raise UserError(f"data.classes: repeated class in {list(classes)}")
    counts, indexes = {}, {}
    for split in ("train", "test"):
        size = SOURCE_SPLITS.get(source, {}).get(split, UNBOUNDED)
        counts[split] = _int(f"data.{split}", raw.get(split), low=0 if split == "test" else 1,
                             high=size, optional=True)
        indexes[split] = _int_list(f"data.{split}_index", raw.get(f"{split}_index"), low=0, high=size - 1)
        index = indexes[split]
        if index is not None:
            if len(set(index)) != len(index):
                raise UserError(f"data.{split}_index: repeated indices are not allowed")
            if classes is not None:
                raise UserError(f"data.{split}_index cannot be combined with data.classes; pick one")
            if counts[split] is not None and counts[split] != len(index):
                raise UserError(f"data.{split}={counts[split]} but data.{split}_index has {len(index)} "
                                f"entries; drop data.{split} or make them agree")
            if split == "train" and not index:
                raise UserError("data.train_index: needs at least one index")
    return DataConfig(
        source=source, root=_str("data.root", raw.get("root", DataConfig.root)),
        train=counts["train"], test=counts["test"], classes=classes,
        train_index=indexes["train"], test_index=indexes["test"],
        test_test=_bool("data.test_test", raw.get("test_test", False)),
        download=_bool("data.download", raw.get("download", True)),
        preprocess=_choice("data.preprocess", raw.get("preprocess", DataConfig.preprocess), PREPROCESS),
        zca_epsilon=_zca_epsilon(raw.get("zca_epsilon", DataConfig.zca_epsilon)),
        label=label, path=path,
    )


def _zca_epsilon(value: Any) -> float:
    try:
        return check_zca_epsilon(value)
    except ValueError as exc:
        raise UserError(f"data.{exc}") from None


def _lap(value: Any, archs: tuple[str, ...]) -> tuple[int, ...]:
    """LAP sizes: distinct integers >= 0, sorted; at most MAX_LAP; only with the gap architecture."""
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise UserError(f"kernel.lap: must be a list of integers >= 0 (pixels of shift per axis, e.g. [2, 4, 8]), "
                        f"got {value!r}")
    try:
        lap = check_lap(value, archs)
    except ValueError as exc:
        raise UserError(f"kernel.{exc}") from None
    if len(lap) > MAX_LAP:
        raise UserError(f"kernel.lap: at most {MAX_LAP} distinct sizes per store (the GPU kernel's limit), "
                        f"got {len(lap)}: {list(lap)}")
    return tuple(sorted(lap))


def _kernel(raw: dict) -> KernelConfig:
    archs = _names("kernel.archs", raw.get("archs", KernelConfig.archs), ARCHS)
    kinds = _names("kernel.kinds", raw.get("kinds", KernelConfig.kinds), KINDS)
    depths = _int_list("kernel.depths", raw.get("depths", KernelConfig.depths), low=2, high=200)
    if not depths:
        raise UserError("kernel.depths: needs at least one depth (integers >= 2, e.g. [3, 4, 6, 11, 21])")
    rf = raw.get("random_features")
    if rf is False:  # `random_features: false` (or `cntk run --no-random-features`): the exact kernels only
        rf = None
    if rf is not None:
        rf = _random_features(rf)
        if not any(a in RF_ARCHS for a in archs):
            raise UserError(f"kernel.random_features: needs an architecture with a random network in kernel.archs; "
                            f"allowed: {', '.join(RF_ARCHS)}")
    return KernelConfig(archs=archs, kinds=kinds, depths=tuple(sorted(set(depths))),
                        lap=_lap(raw.get("lap"), archs), flip=_bool("kernel.flip", raw.get("flip", False)),
                        random_features=rf)


def _random_features(raw: Any) -> RandomFeaturesConfig:
    where = "kernel.random_features"
    allowed = _allowed(RandomFeaturesConfig)
    if not isinstance(raw, dict):
        raise UserError(f"{where}: must be a mapping with keys {', '.join(allowed)}, or false")
    _check_keys(where, raw, allowed)
    defaults = RandomFeaturesConfig()
    config = RandomFeaturesConfig(
        width=_int(f"{where}.width", raw.get("width", defaults.width), low=1),
        draws=_int(f"{where}.draws", raw.get("draws", defaults.draws), low=1),
        seed=_int(f"{where}.seed", raw.get("seed", defaults.seed), low=0),
        max_bytes=parse_bytes(f"{where}.max_bytes", raw.get("max_bytes", defaults.max_bytes)),
    )
    if not torch_available():  # checked here, before any store is opened or created
        raise UserError(f"{where}: random features need PyTorch, which is not installed here: "
                        f"pip install -e .[rf] (or remove {where})")
    return config


def parse_bytes(name: str, value: Any) -> int:
    """An integer number of bytes, or a string such as '1GiB' / '500MB' / '12 GB' (dask.utils.parse_bytes: the
    binary units KiB..PiB and the decimal kB..PB, case-insensitive); at least 1 MiB. `name` (a config field or a
    CLI option) starts the error message."""
    from dask.utils import parse_bytes as dask_parse_bytes

    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not any(map(str.isdigit, str(value))):
            raise ValueError(value)
        amount = dask_parse_bytes(value)
    except (ValueError, OverflowError):
        raise UserError(f"{name}: cannot read {value!r}; give bytes or a number with a unit, e.g. 1GiB or 800MiB"
                        ) from None
    if amount < 2**20:
        raise UserError(f"{name}: must be at least 1MiB (e.g. 1GiB), got {value!r}")
    return amount


def _cluster(raw: dict) -> ClusterConfig:
    scheduler = raw.get("scheduler")
    scheduler_file = raw.get("scheduler_file")
    if scheduler is not None and scheduler_file is not None:
        raise UserError("cluster: give either scheduler (an address) or scheduler_file, not both")
    return ClusterConfig(
        scheduler=None if scheduler is None else _str("cluster.scheduler", scheduler),
        scheduler_file=None if scheduler_file is None else _str("cluster.scheduler_file", scheduler_file),
        workers=_int("cluster.workers", raw.get("workers", 1), low=1),
        threads=_int("cluster.threads", raw.get("threads"), low=1, optional=True),
        slots=_int("cluster.slots", raw.get("slots"), low=1, optional=True),
        max_in_flight=_int("cluster.max_in_flight", raw.get("max_in_flight"), low=1, optional=True),
        retries=_int("cluster.retries", raw.get("retries", 2), low=0),
    )


def _allowed(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_keys(where: str, raw: dict, allowed: list[str]) -> None:
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed)}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise UserError(f"{name}: unknown value {value!r}; allowed: {', '.join(allowed)}")
    return value


def _names(name: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise UserError(f"{name}: must be a non-empty list from {', '.join(allowed)}")
    for v in value:
        _choice(name, v, allowed)
    return tuple(v for v in allowed if v in value)  # canonical order, duplicates dropped


def _int(name: str, value: Any, *, low: int | None = None, high: int | None = None,
         optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name}: must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise UserError(f"{name}: must be {bounds}, got {value}")
    return value


def _int_list(name: str, value: Any, *, low: int, high: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{name}: must be a list of integers in [{low}, {high}], got {value!r}")
    return tuple(_int(name, v, low=low, high=high) for v in value)


def _str(name: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise UserError(f"{name}: must be a non-empty string, got {value!r}")
    return str(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{name}: must be true or false, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
