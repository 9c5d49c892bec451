"""Predicted wall time of a run (`cntk run`, `submit`, `--dry-run`) and of a solve (`cntk solve --dry-run`), from
short probes on this machine; the ETA that run progress and `cntk status` show. docs/predict.md says how and when
the numbers are wrong.

Run. One probe per arch, on tiny blocks of the run's own images at the config's largest depth (one pass computes
every depth up to it), after a warm-up call (numba's JIT load or compile is not timed; see probe_kernel):

    arch (vanilla, gap with the run's lap; fc; all with the run's flip): p_arch = seconds per pair (CPU conv: per
        lane pair, columns padded to batches of 16), c_arch = seconds per call (fixed costs, image preparation)
    rf:  g_arch = seconds per image gradient of one draw at the largest depth
    io:  crc32c zarr chunks beside the store: w0 (r0) s per chunk written (read) + bytes / write_bps (read_bps)

    tile (n x m): parallel = sum_arch p_arch * pairs(n, m)                        (numba threads / GPU)
                  serial   = sum_arch c_arch  + rf  + io
                  rf = draws * sum_{arch, depth} g_arch * (depth - 1) / (max_depth - 1) * gradient_passes
                  io = arrays * (w0 + size^2 * 4 / write_bps) + 2 * r0 + (n + m) * image bytes / read_bps
    worker time of a tile = parallel * scale + serial  (scale: local CPU workers share the probe's T threads)
    run = startup + makespan of the tiles in submission order over the workers (each to the first free one)

Solve. A float64 BLAS rate (dpotrf and dgemm, GFLOP/s) and the store's chunk read rate; each factorisation of n
rows costs n^3/3 flops plus its reads, with linalg.plan_factor deciding in core or out of core exactly as the
solve does (out of core adds the scratch panels' writes and re-reads).

Rates are cached per machine (host, CPU model, cores) and package version in calibration.json under
$CNTK_CACHE_DIR, else $XDG_CACHE_HOME/cntk-gram, else ~/.cache/cntk-gram; `--recalibrate` measures again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import heapq
import json
import math
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

CACHE_ENV = "CNTK_CACHE_DIR"
CACHE_FILE = "calibration.json"
CACHE_FORMAT = 4            # bump when what a probe stores changes: older entries are then measured again
MIN_PROBE_S = 0.2           # each timed probe repeats its call until this long has passed
MAX_CALL_S = 2.0            # a kernel probe grows its block while its next call should take less (probe_kernel)
LANES = 16                  # CPU conv kernels: column images per SIMD batch (workers/_cpu_kernels.LANES)
LOCAL_START_S = 4.0         # embedded cluster: start, workers' imports and kernel load, close (measured, docs)
LOCAL_END_S = 1.0           # embedded cluster: close (what is left of LOCAL_START_S once a worker has probed)
SOLVE_START_S = 2.5         # `cntk solve`: process start, imports, report files (2 cores, bench_predict)
WARN_SECONDS = 12 * 3600    # a CPU run predicted longer than this warns, when the GPU backend takes its kernels


# --- the cache ------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """$CNTK_CACHE_DIR, else $XDG_CACHE_HOME/cntk-gram, else ~/.cache/cntk-gram."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cntk-gram"


def machine() -> dict:
    """What the cached rates hold for: host, CPU model, logical cores, package version."""
    from cntk_gram.pipeline.store import package_version

    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)
    return {"host": socket.gethostname(), "cpu": model, "cores": os.cpu_count(), "version": package_version()}


def load_per_core() -> float | None:
    """1-minute load average / cores now (None where the OS has none): ~1 means every core is busy."""
    try:
        return round(os.getloadavg()[0] / (os.cpu_count() or 1), 2)
    except (OSError, AttributeError):
        return None


def cached(key: str, measure, *, recalibrate: bool = False) -> dict:
    """measure() -> dict of rates, stored under `key` for this machine; read back unless recalibrate. The result
    carries 'cached' (bool), 'measured' (epoch seconds) and 'load' (load per core before measuring). An unwritable
    cache only costs the probe next time."""
    path = cache_dir() / CACHE_FILE
    here = machine()
    try:
        doc = json.loads(path.read_text())
        entries = doc["entries"] if doc.get("machine") == here and doc.get("format") == CACHE_FORMAT else {}
    except (OSError, ValueError, KeyError, TypeError):
        entries = {}
    if key in entries and not recalibrate:
        return {**entries[key], "cached": True}
    load = load_per_core()
    value = {**measure(), "measured": time.time(), "load": load}
    entries[key] = value
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{CACHE_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps({"format": CACHE_FORMAT, "machine": here, "entries": entries}, indent=1))
        os.replace(tmp, path)
    return {**value, "cached": False}


# --- probes ---------------------------------------------------------------------------------------

def _timed(call) -> float:
    """The fastest of repeated calls of call() (seconds), repeated until MIN_PROBE_S have passed (at least once):
    the minimum is the least disturbed by other processes."""
    best, started = math.inf, time.perf_counter()
    while time.perf_counter() - started < MIN_PROBE_S or best == math.inf:
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def _block(images: np.ndarray, count: int, start: int) -> np.ndarray:
    """`count` images from `start` on, wrapping around (a run may have fewer images than a probe block)."""
    return images[(start + np.arange(count)) % len(images)]


def numba_threads() -> int:
    """The numba threads this process may use (what a probe on a cluster worker runs with)."""
    import numba

    return numba.config.NUMBA_NUM_THREADS


@contextlib.contextmanager
def _numba_threads(threads: int):
    """Run the block with min(threads, NUMBA_NUM_THREADS) numba threads."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def probe_kernel(images: np.ndarray, *, backend: str, arch: str, max_depth: int, lap=(), flip: bool = False,
                 threads: int, tile: int) -> dict:
    """{'seconds_per_pair', 'seconds_per_call', 'warmup_seconds'}: one arch's tile kernel on this machine.

    Blocks of r x m images, from T x 16 (CPU conv: T the probe's numba threads, 16 the kernels' SIMD batch) or
    16 x 16 (fc) or 32 x 32 (GPU), doubling the shorter side (square blocks, as tiles are): every block while the
    next should take under MAX_CALL_S (the last time times the last doubling's growth: ~1x while fixed costs
    dominate, 2x once the pairs do; the second block always), within the tile and the distinct images given;
    fit_rates splits the times. images: (N, H, W, C) float32, the run's own."""
    from cntk_gram.workers.backends import get_backend

    module = get_backend(backend)
    rows, cols = (16, 16) if arch == "fc" else (threads, LANES) if backend == "cpu" else (32, 32)
    options = {"archs": (arch,), "max_depth": max_depth, "lap": tuple(lap) if arch == "gap" else (),
               "flip": flip}

    def probe(r, c):   # (seconds, images, pairs) of an r x c block
        x, y = _block(images, r, 0), _block(images, c, r)
        pairs = lane_pairs(r, c, False) if backend == "cpu" and arch != "fc" else r * c
        return _timed(lambda: module.tile_kernels(x, y, **options)), r + c, pairs

    with _numba_threads(threads):
        started = time.perf_counter()
        module.tile_kernels(images[:1], images[:1], archs=(arch,), max_depth=2)
        warmup = time.perf_counter() - started
        points = [probe(rows, cols)]
        while True:
            rows, cols = (2 * rows, cols) if rows < cols else (rows, 2 * cols)
            if max(rows, cols) > tile or rows + cols > len(images):
                break
            if len(points) > 1 and points[-1][0] * min(2.0, max(1.0, points[-1][0] / points[-2][0])) >= MAX_CALL_S:
                break
            points.append(probe(rows, cols))
    return {**fit_rates(points), "warmup_seconds": warmup}


def fit_rates(points) -> dict:
    """{'seconds_per_pair', 'seconds_per_call'}, both >= 0, of seconds = per_call + per_pair * pairs by non-negative
    least squares over points [(seconds, images, pairs)]: the largest blocks, nearest a tile's size, weigh most. The
    images' own costs (a tile's preparation) fall into these two: a separate term per image cannot be told apart
    from them in a few noisy blocks, and a tile of n x n images costs n^2 pairs. Where that leaves no cost per pair
    (one point, or times too noisy to split), the pairs of the largest block carry its whole time."""
    from scipy.optimize import nnls

    t = np.array([p[0] for p in points])
    a = np.array([[1.0, p[2]] for p in points])
    (call, pair), _ = nnls(a, t) if len(points) > 1 else ((0.0, 0.0), 0)
    if pair <= 0:
        call, pair = 0.0, points[-1][0] / points[-1][2]
    return {"seconds_per_pair": float(pair), "seconds_per_call": float(call)}


def probe_rf(images: np.ndarray, *, arch: str, max_depth: int, width: int, kinds, max_bytes: int,
             device: str) -> dict:
    """{'seconds_per_gradient'}: one random-features image gradient (one draw) of a depth-max_depth net."""
    from cntk_gram.workers.rf import gradient_passes, image_bytes, plan_memory, rf_tile_kernels

    x = _block(images, 2, 0)
    common = {"archs": (arch,), "kinds": tuple(kinds), "width": width, "max_bytes": max_bytes, "device": device}
    rf_tile_kernels(x[:1], None, depths=(2,), **common)                    # torch's first-call costs
    started = time.perf_counter()
    rf_tile_kernels(x, None, depths=(max_depth,), **common)
    seconds = time.perf_counter() - started
    plan = plan_memory(*image_bytes(arch=arch, depth=max_depth, width=width, channels=x.shape[3],
                                    image_shape=x.shape[1:3]), max_bytes, 2)
    return {"seconds_per_gradient": seconds / gradient_passes(2, 2, plan, True)}


def probe_io(directory: str | os.PathLike, *, tile: int) -> dict:
    """{'write_chunk_s', 'write_bps', 'read_chunk_s', 'read_bps'}: crc32c-checked zarr chunks written and read in a
    temp group under `directory` (removed after): a fixed cost per chunk (16 x 16 chunks; the fastest of four) plus
    bytes / rate (chunks of edge max(64, min(tile, 512)))."""
    import zarr
    from zarr.codecs import Crc32cCodec

    edge = max(64, min(tile, 512))
    data = np.random.default_rng(0).random((edge, edge), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix=".cntk-probe-", dir=directory) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        for e in (16, edge):
            group.create_array(f"a{e}", shape=(e, 4 * e), chunks=(e, e), dtype="float32", compressors=[Crc32cCodec()])

        def fastest(e, write):
            times = []
            for k in range(4):
                started = time.perf_counter()
                array = zarr.open_group(tmp, mode="r+")[f"a{e}"]      # as a tile task: open, then write or read
                if write:
                    array[:, k * e:(k + 1) * e] = data[:e, :e]
                else:
                    array[:, k * e:(k + 1) * e]
                times.append(time.perf_counter() - started)
            return min(times)

        out = {}
        for name, write in (("write", True), ("read", False)):
            small, big = fastest(16, write), fastest(edge, write)
            out.update({f"{name}_chunk_s": small, f"{name}_bps": edge * edge * 4 / max(big - small, 1e-6)})
    return out


def chunk_rate(io: dict, name: str, chunk_bytes: int) -> float:
    """Bytes per second of writing or reading (name) whole chunks of chunk_bytes, fixed costs included."""
    return chunk_bytes / (io[f"{name}_chunk_s"] + chunk_bytes / io[f"{name}_bps"])


def probe_blas(*, device: str = "cpu") -> dict:
    """{'potrf_flops', 'gemm_flops'}: float64 flop/s of a 2,048-row Cholesky and a 2,048-square product."""
    n = 2048
    a = np.random.default_rng(0).random((n, n))
    spd = a @ a.T + n * np.eye(n)
    if device == "gpu":
        import cupy

        a, spd = cupy.asarray(a), cupy.asarray(spd)
        sync = cupy.cuda.Device().synchronize
        potrf = _timed(lambda: (cupy.linalg.cholesky(spd), sync()))
        gemm = _timed(lambda: (a @ a, sync()))
    else:
        from scipy.linalg import lapack

        potrf = _timed(lambda: lapack.dpotrf(spd, lower=1))
        gemm = _timed(lambda: a @ a)
    return {"potrf_flops": n ** 3 / 3 / potrf, "gemm_flops": 2 * n ** 3 / gemm}


def _probe_dir(store: str | os.PathLike) -> str:
    """The nearest existing directory at or above the store's parent: probes write on the store's disk."""
    path = Path(store).resolve().parent
    while not path.exists():
        path = path.parent
    return str(path) if os.access(path, os.W_OK) else tempfile.gettempdir()


# --- a run ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunPrediction:
    """Predicted wall time of the tiles still to compute. seconds: on `workers` workers from now (startup
    included; None when unknown, `reason` says why); worker_seconds: all of them on one worker; workers: None
    when not known (a cluster not contacted); parts: seconds by part on one worker {parallel (the kernels' pair
    loops), serial (fixed costs per call, random features, store I/O), startup}; rates: what the probes measured;
    source: 'probe' (measured now) or 'cache'; load: load per core when measured (>~0.5: the rates are pessimistic
    for a quiet machine); made: when (epoch s)."""
    seconds: float | None
    worker_seconds: float | None = None
    workers: int | None = None
    backend: str = "cpu"
    pairs: int = 0
    parts: dict = dataclasses.field(default_factory=dict)
    rates: dict = dataclasses.field(default_factory=dict)
    source: str = "probe"
    load: float | None = None
    reason: str | None = None
    made: float = dataclasses.field(default_factory=time.time)

    @property
    def pairs_per_second(self) -> float | None:
        return self.pairs / self.seconds if self.seconds else None


def lane_pairs(n: int, m: int, diagonal: bool) -> int:
    """Pairs the CPU conv kernels compute for an n x m tile: columns padded to whole batches of LANES; a diagonal
    tile's row a starts at the batch holding a."""
    batches = -(-m // LANES)
    if not diagonal:
        return n * batches * LANES
    return int(sum(batches - a // LANES for a in range(n)) * LANES)


def tile_seconds(rates: dict, n: int, m: int, diagonal: bool, *, arrays: int, size: int, image_bytes: int,
                 rf: dict | None = None) -> tuple[float, float]:
    """(parallel seconds at the probe's parallelism, serial seconds) of one n x m tile (module docstring).
    rates: calibrate's dict; rf: {'draws', 'depths', 'max_depth', 'max_bytes', 'width', 'shape'} or None."""
    pairs = n * (n + 1) // 2 if diagonal else n * m
    conv = lane_pairs(n, m, diagonal) if rates["backend"] == "cpu" else pairs
    images = n if diagonal else n + m
    kernels = sum(r["seconds_per_pair"] * (pairs if arch == "fc" else conv) for arch, r in rates["kernels"].items())
    serial = sum(r["seconds_per_call"] for r in rates["kernels"].values())
    if rf:
        from cntk_gram.workers.rf import gradient_passes, image_bytes as rf_bytes, plan_memory

        for arch, per_gradient in rates["rf"].items():
            for depth in rf["depths"]:
                plan = plan_memory(*rf_bytes(arch=arch, depth=depth, width=rf["width"], channels=rf["shape"][2],
                                             image_shape=rf["shape"][:2]), rf["max_bytes"], m)
                share = (depth - 1) / max(1, rf["max_depth"] - 1)
                serial += rf["draws"] * per_gradient * share * gradient_passes(n, m, plan, diagonal)
    io = rates["io"]
    writes = arrays * size * size * 4 / chunk_rate(io, "write", size * size * 4)
    reads = (1 if diagonal else 2) * io["read_chunk_s"] + images * image_bytes / io["read_bps"]
    return kernels, serial + writes + reads


def makespan(durations, workers: int) -> float:
    """Wall time of tasks taken in order by `workers` workers, each task to the first free worker."""
    free = [0.0] * max(1, workers)
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def calibrate(images: np.ndarray, *, backend: str, archs, max_depth: int, lap=(), flip: bool = False,
              threads: int, store: str, tile: int, rf: dict | None = None, recalibrate: bool = False) -> dict:
    """The rates a run's prediction needs, each cached (module docstring): {'backend', 'kernels' {arch:
    {seconds_per_pair, seconds_per_call}}, 'rf' {arch: s per gradient}, 'io', 'warmup_seconds',
    'cached' (all from the cache), 'load'}. Runs where the tiles run: here, or as a task on a cluster worker.
    images: (N, H, W, C) float32, the run's own (at most the first 1,024 are used)."""
    shape = "x".join(map(str, images.shape[1:]))
    where = backend if backend == "cpu" else f"gpu:{_gpu_name()}"
    kernels, entries = {}, []
    for arch in archs:
        options = f"lap{','.join(map(str, lap))}" if arch == "gap" and lap else ""
        spin = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "")   # workers' BLAS threads spin less (cluster.py)
        key = f"kernel|{where}|{arch}|d{max_depth}|{shape}|{options}|flip{int(flip)}|t{threads}|tile{tile}|spin{spin}"
        entries.append(cached(key, lambda: probe_kernel(images, backend=backend, arch=arch, max_depth=max_depth,
                                                        lap=lap, flip=flip, threads=threads, tile=tile),
                              recalibrate=recalibrate))
        kernels[arch] = {k: entries[-1][k] for k in ("seconds_per_pair", "seconds_per_call")}
    rf_rates = {}
    for arch in (rf or {}).get("archs", ()):
        device = "cuda" if backend == "gpu" else "cpu"
        key = f"rf|{where}|{arch}|d{max_depth}|{shape}|w{rf['width']}|{','.join(rf['kinds'])}"
        entries.append(cached(key, lambda: probe_rf(images, arch=arch, max_depth=max_depth, width=rf["width"],
                                                    kinds=rf["kinds"], max_bytes=rf["max_bytes"], device=device),
                              recalibrate=recalibrate))
        rf_rates[arch] = entries[-1]["seconds_per_gradient"]
    directory = _probe_dir(store)
    entries.append(cached(f"io|{directory}|{min(tile, 512)}", lambda: probe_io(directory, tile=tile),
                          recalibrate=recalibrate))
    loads = [e["load"] for e in entries if e.get("load") is not None]
    return {"backend": backend, "kernels": kernels, "rf": rf_rates, "io": entries[-1], "threads": threads,
            "warmup_seconds": max((e.get("warmup_seconds", 0.0) for e in entries), default=0.0),
            "cached": all(e["cached"] for e in entries), "load": max(loads) if loads else None}


def _gpu_name() -> str:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:  # no CuPy or no device: the key still tells GPU rates from CPU ones
        return "unknown"


def predict_run(rates: dict, *, todo, bounds, arrays: int, size: int, image_bytes: int, workers: int | None,
                scale: float = 1.0, startup: float = 0.0, rf: dict | None = None,
                reason: str | None = None) -> RunPrediction:
    """The prediction for `todo` tiles (in submission order) of blocks `bounds` with calibrate's rates.
    workers None: unknown (seconds = None, worker_seconds given, `reason` or a default saying so); scale: kernel
    slowdown of one worker against the probe (local CPU workers share the probe's threads: the worker count);
    startup: seconds before the first tile (LOCAL_START_S for the embedded cluster)."""
    durations, parts = [], {"parallel": 0.0, "serial": 0.0, "startup": startup}
    pairs = 0
    for i, j in todo:
        (r0, r1), (c0, c1) = bounds[i], bounds[j]
        parallel, serial = tile_seconds(rates, r1 - r0, c1 - c0, i == j, arrays=arrays, size=size,
                                        image_bytes=image_bytes, rf=rf)
        durations.append(parallel * scale + serial)
        parts["parallel"] += parallel * scale
        parts["serial"] += serial
        pairs += (r1 - r0) * (r1 - r0 + 1) // 2 if i == j else (r1 - r0) * (c1 - c0)
    one = startup + sum(durations)
    wall = None if workers is None else startup + makespan(durations, workers)
    return RunPrediction(seconds=wall, worker_seconds=one, workers=workers, backend=rates["backend"], pairs=pairs,
                         parts={k: round(v, 3) for k, v in parts.items()}, rates=rates,
                         source="cache" if rates["cached"] else "probe", load=rates["load"],
                         reason=reason or (None if workers is not None else "the number of workers is not known"))


def unknown(reason: str, backend: str) -> RunPrediction:
    """No prediction, with the reason shown instead."""
    return RunPrediction(seconds=None, backend=backend, source="none", reason=reason)


def describe(p: RunPrediction) -> str:
    """A few words for the plan line: 'predicted 2 h 05 min (cpu, probed now)' and what it assumes."""
    if p.seconds is None and p.worker_seconds is None:
        return f"predicted time unknown: {p.reason}"
    how = f"{p.backend}, {'probe cached' if p.source == 'cache' else 'probed now'}"
    if p.load is not None and p.load > 0.5:
        how += f", measured at load {p.load:.1f} per core"
    if p.seconds is None:
        return f"predicted {duration(p.worker_seconds)} per worker ({how}); {p.reason}"
    workers = "" if p.workers in (None, 1) else f" on {p.workers} workers ({duration(p.worker_seconds)} on one)"
    return f"predicted {duration(p.seconds)}{workers} ({how})"


def slow_cpu_warning(p: RunPrediction, *, gpu_takes_it: bool) -> str | None:
    """The one warning line for a CPU run predicted longer than WARN_SECONDS whose kernels the GPU backend takes."""
    seconds = p.seconds if p.seconds is not None else p.worker_seconds
    if p.backend != "cpu" or not gpu_takes_it or seconds is None or seconds <= WARN_SECONDS:
        return None
    return (f"warning: this run is predicted to take {duration(seconds)} on the CPU; the GPU backend computes these "
            f"kernels far faster: use --backend gpu on a machine with a GPU, or a cluster (cntk submit)")


def duration(seconds: float | None) -> str:
    """'42 s', '4 min 10 s', '3 h 05 min', '6 d 23 h'."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


class Eta:
    """The ETA of a run in progress: the predicted time less the time since it was made (`started`, epoch s) until
    real tiles finish, then their measured rate since `measured_from` (default `started`; a run sets it when its
    first tile is submitted, so the cluster's start is not counted as tile time); text() says which."""

    def __init__(self, predicted_seconds: float | None, pairs_todo: int, started: float | None = None):
        self.predicted, self.pairs_todo = predicted_seconds, pairs_todo
        self.started = self.measured_from = time.time() if started is None else started

    def seconds(self, pairs_done: int, now: float | None = None) -> tuple[float | None, str | None]:
        """(seconds left, 'predicted' | 'measured'), or (None, None) when neither is known."""
        now = time.time() if now is None else now
        if pairs_done > 0 and now > self.measured_from:
            return (self.pairs_todo - pairs_done) * (now - self.measured_from) / pairs_done, "measured"
        if self.predicted is not None:
            return max(0.0, self.predicted - (now - self.started)), "predicted"
        return None, None

    def text(self, pairs_done: int, now: float | None = None) -> str:
        left, source = self.seconds(pairs_done, now)
        return "ETA unknown" if left is None else f"ETA {duration(left)} ({source})"


# --- a solve --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Factorisation:
    """One Cholesky factorisation a solve does: what (e.g. 'ntk-gap depth 3: λ = 0'), n rows, panels, in core or
    out of core (scratch files), peak bytes of host memory, predicted seconds (flops + reads + scratch I/O)."""
    what: str
    n: int
    panels: int
    out_of_core: bool
    peak_bytes: int
    seconds: float


def factor_cost(n: int, *, chunk: int, memory_budget: int, rates: dict, read_bytes: int, held_bytes: int = 0,
                device_bytes: int | None = None) -> tuple[int, bool, int, float]:
    """(panels, out of core, peak bytes, seconds) of factoring n rows as linalg.cholesky_blocked would (its own
    plan_factor), reading read_bytes from the store; held_bytes: memory held beside it (validation blocks)."""
    from cntk_gram.pipeline.linalg import plan_factor

    plan = plan_factor(n, chunk=chunk, memory_budget=memory_budget, device_bytes=device_bytes)
    flops = rates["potrf_flops"] if n <= 2048 else rates["gemm_flops"]
    seconds = n ** 3 / 3 / flops + read_bytes / rates["read_bps"]
    if plan.on_disk:   # every panel written once, earlier panels re-read for each later one
        reread = sum((plan.n - c0) * (d1 - d0) * 8 for k, (c0, _) in enumerate(plan.bounds)
                     for d0, d1 in plan.bounds[:k])
        seconds += plan.factor_bytes / rates["write_bps"] + reread / rates["read_bps"]
        peak = 2 * plan.resident_bytes
    else:
        peak = plan.factor_bytes
    return len(plan.bounds), plan.on_disk, peak + held_bytes, seconds


@dataclasses.dataclass(frozen=True)
class SolvePrediction:
    """Predicted wall time (seconds: the factorisations and SOLVE_START_S) and peak host memory (peak_bytes, the
    largest factorisation's) of a solve: its factorisations in order; solved / reused: kernels (or curve points)
    to solve and saved ones reused."""
    seconds: float
    peak_bytes: int
    factorisations: list[Factorisation]
    solved: int
    reused: int
    device: str
    rates: dict
    source: str
    load: float | None


def predict_solve(store, options, *, kernels=None, depths=None, force: bool = False, train_sizes=(),
                  validate_sizes: bool = False, recalibrate: bool = False) -> SolvePrediction:
    """What `cntk solve STORE` with these arguments would factor, in what memory, and how long it takes: the
    factorisations of every kernel not saved with the same options (ridgeless, one per λ of the validation grid,
    the validated fit assuming λ* > 0; with train_sizes the shared ridgeless factorisation of the curve and, with
    validate_sizes, each size's own). options: ridge.SolveOptions. Touches nothing in the store."""
    import zarr

    from cntk_gram.pipeline.curve import check_train_sizes, curve_record
    from cntk_gram.pipeline.errors import UserError
    from cntk_gram.pipeline.results import curve_path, saved_row, solution_path
    from cntk_gram.pipeline.store import layout, read_inputs, stored_arrays
    from cntk_gram.workers.vocab import gpu_available

    inputs = read_inputs(store)
    labels, n_train, n_test, tile = inputs["labels"], inputs["n_train"], inputs["n_test"], inputs["tile"]
    sizes = [n for n in check_train_sizes(train_sizes, n_train) if n != n_train]
    stored = stored_arrays(layout(store))
    todo = [a for a in stored if (not kernels or a.key in kernels) and (not depths or a.depth in depths)]
    if not todo:
        have = ", ".join(sorted({f"{a.key}@{a.depth}" for a in stored}))
        raise UserError(f"--kernel/--depth: not in {store}; the store has {have}")
    device = "gpu" if options.device != "cpu" and gpu_available() else "cpu"
    device_bytes = None
    if device == "gpu":
        import cupy

        device_bytes = int(cupy.cuda.runtime.memGetInfo()[0] * 0.4)
    blas = cached(f"blas|{device}|t{os.cpu_count()}", lambda: probe_blas(device=device), recalibrate=recalibrate)
    directory = _probe_dir(store)
    io = cached(f"io|{directory}|{min(tile, 512)}", lambda: probe_io(directory, tile=tile), recalibrate=recalibrate)
    chunk = tile * tile * 4   # the store is read in whole tiles, scratch panels written and read in large blocks
    rates = {"potrf_flops": blas["potrf_flops"], "gemm_flops": blas["gemm_flops"],
             "read_bps": chunk_rate(io, "read", chunk), "write_bps": io["write_bps"]}
    budget = options.memory_budget
    group = zarr.open_group(str(store), mode="r")
    steps, solved, reused = [], 0, 0

    def factor(what, n, *, read, held=0):
        panels, disk, peak, seconds = factor_cost(n, chunk=tile, memory_budget=budget, rates=rates,
                                                  read_bytes=read, held_bytes=held, device_bytes=device_bytes)
        steps.append(Factorisation(what=what, n=n, panels=panels, out_of_core=disk, peak_bytes=peak,
                                   seconds=seconds))

    def scores(n):   # reading K(train, test) for the predictions: added to the last factorisation
        last = steps[-1]
        steps[-1] = dataclasses.replace(last, seconds=last.seconds + n * n_test * 4 / rates["read_bps"])

    def validated(name, n):   # select_lambda on the first n training images, then the validated fit
        from cntk_gram.pipeline.ridge import split_for

        fit, val, _ = split_for(labels[:n], options)
        held = fit.size ** 2 * 8 if fit.size ** 2 * 8 <= budget // 4 else 0
        whole = n * n * 4                       # fancy-indexed reads touch every training tile
        for lam in options.lambdas:
            factor(f"{name}: validation λ = {lam:g}", fit.size, read=0 if held else whole, held=held)
        if held:   # the fit block is read once, before the first λ
            first = next(i for i, s in enumerate(steps) if s.what.startswith(f"{name}: validation"))
            steps[first] = dataclasses.replace(steps[first], seconds=steps[first].seconds + whole / rates["read_bps"])
        factor(f"{name}: validated fit (if λ* > 0)", n, read=n * n * 2)
        scores(n)

    for key, depth, draw in todo:
        name = f"{key} depth {depth}" + ("" if draw is None else f" draw {draw}")
        saved = None if force else saved_row(group, solution_path(key, depth, draw))
        main = saved is not None and saved.options == options.record(n_train)
        missing = [n for n in sizes if force or _not_saved(group, curve_path(key, depth, draw, n),
                                                             curve_record(options, n, validate_sizes))]
        reused += main + len(sizes) - len(missing)
        solved += (not main) + len(missing)
        ridgeless = ([n_train] if not main else []) + missing
        if ridgeless:
            m = max(ridgeless)
            factor(f"{name}: λ = 0" + (f" (curve n = {', '.join(map(str, missing))})" if missing else ""), m,
                   read=m * m * 2)
            scores(m)
        if not main and options.validate:
            validated(name, n_train)
        for n in missing if validate_sizes and options.validate else ():
            validated(f"{name}, n = {n}", n)
    return SolvePrediction(seconds=SOLVE_START_S + sum(s.seconds for s in steps),
                           peak_bytes=max((s.peak_bytes for s in steps), default=0),
                           factorisations=steps, solved=solved, reused=reused, device=device, rates=rates,
                           source="cache" if blas["cached"] and io["cached"] else "probe",
                           load=max((x for x in (blas["load"], io["load"]) if x is not None), default=None))


def _not_saved(group, path: str, record: dict) -> bool:
    from cntk_gram.pipeline.results import saved_row

    row = saved_row(group, path)
    return row is None or row.options != record
