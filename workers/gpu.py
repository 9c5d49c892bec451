"""GPU tile worker: launches the fused CNTK kernels of `cntk_tile.cu` through `cupy.RawModule`.

Same contract as every backend (docs/ARCHITECTURE.md): `tile_kernels(x, y=None, *, archs, max_depth, ...)`. The planning
half of this module (`plan_tile`, `pair_lists`, `same_images`, `compile_options`, `check_image_shape`) is pure NumPy
and imports without CuPy; CuPy is imported only when a tile actually runs. Design, blocking and the instruction count:
docs/gpu.md. The kernels are compiled for the images' height, width and channel count (each 1..32), one module per
shape (and LAP count), on first use.

Flow of one tile (docs/gpu.md, "Host side"): the tile is cut into sub-tiles (rows chunk x cols chunk images, sized to
the free device memory). A sub-tile's images, pair list (2-D super-tile order, `pair_lists`) and self flags go to the
device on an upload stream from pinned memory, the upload of the next sub-tile overlapping the current one's kernels
on the compute stream. There `diag_maps` makes the per-image maps, the tile kernel runs in launches of
`pairs_per_launch` pairs, and `scatter_pairs` places every launch's sums into the tile's (2, layers, rows, cols)
float32 result on the device (mirrored on diagonal tiles). The host copies that result once per tile.

LAP and flip (docs/enhanced.md, docs/gpu.md "LAP and flip"): LAP(c) readouts come from a build of the same source
with -DLAP_COUNT=k, whose GAP kernel adds k weighted sums per kind in the same pass; flip runs each architecture once
more against the mirrored column images (mirrored on the host), keeping the a <= b pair lists on diagonal tiles.
"""
import functools
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .enhanced import flip_average, flip_images, triangle
from .validate import check_tile_call, same_images
from .vocab import LAP_ARCH, MAX_LAP, KernelKey, output_keys

KERNEL_SOURCE = Path(__file__).parent / "cntk_tile.cu"
# Image shapes (P, Q, C): the kernels are compiled for the run's shape (-DIMAGE_ROWS, -DIMAGE_COLS, -DCHANNELS; one
# module per shape). Rows are registers and columns the lanes of one warp, so P, Q <= 32; C <= 32 (cntk_tile.cu).
MAX_SIDE, MAX_CHANNELS = 32, 32
SIDE, CHANNELS = 32, 3                         # the default shape (CIFAR-10); the constants below are for it
DEFAULT_SHAPE = (SIDE, SIDE, CHANNELS)
IMAGE_BYTES = SIDE * SIDE * CHANNELS * 4
MAP_BYTES_PER_LAYER = 2 * SIDE * SIDE * 8      # float2 {r, g}, rows repeated twice (see cntk_tile.cu)
PAIR_INDEX_BYTES = 4 + 4 + 1                   # pair_x, pair_y int32, pair_self uint8
ENTRIES_PER_PAIR = {"gap": SIDE ** 4, "vanilla": SIDE ** 2}
KERNEL_NAMES = {"gap": "cntk_gap_tile", "vanilla": "cntk_vanilla_tile"}
# -D options of cntk_tile.cu (documented there); part of the module cache key.
DEFAULT_OPTIONS = (("WARPS_PER_BLOCK", 8), ("BLOCKS_PER_WARP", 1), ("MIN_BLOCKS_PER_SM", 2), ("MAX_LAYERS", 32),
                   ("IMAGE_ROWS", SIDE), ("IMAGE_COLS", SIDE), ("CHANNELS", CHANNELS))
MAX_LAYERS = dict(DEFAULT_OPTIONS)["MAX_LAYERS"]
WORK_PER_LAUNCH = 2 ** 33                      # entry-layers per launch: ~10 ms of GPU time, small output slots
MAX_PAIRS_PER_LAUNCH = 65536
RESULT_BYTES_PER_PAIR_LAYER = 2 * 4            # ntk and nngp, float32, in the tile's device result
# Pair order: super-tiles of 32 x 32 pairs (row images x column images) one after the other, so the maps of the 64
# images they touch (10 MB at 20 layers) are re-read from L2 rather than HBM; inside a super-tile, groups of 2 x 4
# pairs, one CUDA block of the vanilla kernel (WARPS_PER_BLOCK = 8 warps), share 6 images' maps in L1 instead of 9.
SUPER_TILE = (32, 32)
WARP_GROUP = (2, 4)
SCATTER_THREADS = 256
# Instructions per entry-layer: the SASS of the layer loop (sm_90, nvcc 13, compile_options()) over its 32 rows;
# all issued instructions, and those on the FP32 pipe (FFMA/FMUL/FADD/FMNMX/FSETP/FSEL). See docs/gpu.md.
# .ci/check_cuda.sh fails when `bench_gpu.py --check-sass` counts more than half an instruction off these.
INSTR_PER_ENTRY_LAYER = {"gap": 50, "vanilla": 47}
FP32_INSTR_PER_ENTRY_LAYER = {"gap": 38, "vanilla": 36}
# The same count for the GAP kernel of the LAP builds (-DLAP_COUNT=k), by k; checked by .ci/check_cuda.sh as well.
LAP_INSTR_PER_ENTRY_LAYER = {1: 56, 3: 56}
# LAP sizes per pass: vocab.MAX_LAP (LAP_COUNT <= 8 in cntk_tile.cu: shared memory)

_device_id = None
_device_lock = threading.Lock()
_streams = {}                                  # device id -> (compute, upload) streams of this process


def compile_options(options=DEFAULT_OPTIONS) -> tuple[str, ...]:
    """NVRTC / nvcc flags for cntk_tile.cu: C++17, flush-to-zero float32 and one -DNAME=value per option (a tuple of
    (name, int) pairs). -ftz=true: NVRTC and nvcc both default to -ftz=false, which scales the operand of each
    MUFU.RSQ around denormals, about two more instructions per entry-layer (52 / 49 instead of 50 / 47, docs/gpu.md). The
    launcher (NVRTC) and .ci/check_cuda.sh's SASS count (nvcc) use these same flags, so INSTR_PER_ENTRY_LAYER counts
    the code that runs."""
    return ("-std=c++17", "-ftz=true") + tuple(f"-D{name}={int(value)}" for name, value in options)


def check_image_shape(shape) -> tuple[int, int, int]:
    """The image shape (P, Q, C) (height, width, channels) if the GPU kernels take it, else one ValueError naming the
    limit: 1 <= P, Q <= MAX_SIDE (rows are registers and columns the lanes of a warp) and 1 <= C <= MAX_CHANNELS.
    Pure Python (no CuPy), so a run can be refused when it is planned, before any tile runs."""
    shape = tuple(shape)
    ok = len(shape) == 3 and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shape)
    if not ok:
        raise ValueError(f"image shape must be (height, width, channels) integers, got {shape!r}")
    p, q, c = (int(v) for v in shape)
    if not (1 <= p <= MAX_SIDE and 1 <= q <= MAX_SIDE and 1 <= c <= MAX_CHANNELS):
        raise ValueError(f"the GPU kernels take images of height and width 1..{MAX_SIDE} pixels and 1.."
                         f"{MAX_CHANNELS} channels, got {p}x{q}x{c} (height x width x channels); use the CPU "
                         f"backend for larger images")
    return p, q, c


def module_options(lap_count: int = 0, shape=DEFAULT_SHAPE) -> tuple[tuple[str, int], ...]:
    """-D options of the build for images of `shape` (P, Q, C) that serves `lap_count` LAP sizes: DEFAULT_OPTIONS for
    32x32x3 and 0 (the plain kernels, same cache key and code as without LAP), with IMAGE_ROWS, IMAGE_COLS, CHANNELS
    set to the shape, plus LAP_COUNT when lap_count > 0."""
    p, q, c = check_image_shape(shape)
    sizes = {"IMAGE_ROWS": p, "IMAGE_COLS": q, "CHANNELS": c}
    options = tuple((name, sizes.get(name, value)) for name, value in DEFAULT_OPTIONS)
    return options + ((("LAP_COUNT", int(lap_count)),) if lap_count else ())


def entries_per_pair(arch: str, shape=DEFAULT_SHAPE) -> int:
    """Entries of one pair's recursion per layer: (PQ)^2 for GAP (every displacement block), PQ for vanilla."""
    pixels = shape[0] * shape[1]
    return pixels ** 2 if arch == "gap" else pixels


def lap_table(lap) -> np.ndarray:
    """Triangle weights t_c(d) of every c in `lap` for d = -32..31 (MAX_SIDE; any image shape): float64
    (len(lap), 64), [r, d + 32] (the kernel's lap_table; w_c(delta) = t_c(delta_row) t_c(delta_col))."""
    d = np.arange(-MAX_SIDE, MAX_SIDE)
    return np.stack([triangle(c, d) for c in lap]) if len(lap) else np.zeros((0, 2 * MAX_SIDE))


@dataclass(frozen=True)
class TilePlan:
    """How a tile is cut for the device: `chunk` images per side of a sub-tile, `pairs_per_launch` per kernel."""
    chunk: int
    pairs_per_launch: int
    device_bytes: int


def plan_tile(n: int, m: int, *, layers: int, arch: str, budget_bytes: int, slots: int = 2,
              shape=DEFAULT_SHAPE) -> TilePlan:
    """Largest sub-tile (chunk x chunk images, at most n x m) whose device buffers fit in `budget_bytes`.

    Device buffers: the tile's result (slots, layers, n, m) float32; two sub-tiles' inputs at once (the one computing
    and the next one uploading: images and diagonal maps of 2*chunk images, pair lists of chunk^2 pairs each); one
    sums slot of pairs_per_launch * layers * slots float64. slots: 2 (ntk, nngp), 2 (1 + k) for GAP with k LAP sizes.
    shape: the images' (P, Q, C). Raises ValueError when the result or not even one pair fits.
    """
    if arch not in ENTRIES_PER_PAIR:
        raise ValueError(f"unknown conv architecture {arch!r}; allowed: {', '.join(ENTRIES_PER_PAIR)}")
    if not 1 <= layers <= MAX_LAYERS:
        raise ValueError(f"the GPU kernels run 1..{MAX_LAYERS} conv layers (max_depth 2..{MAX_LAYERS + 1}), "
                         f"got {layers}")
    p, q, c = check_image_shape(shape)
    per_image = p * q * c * 4 + layers * 2 * p * q * 8   # image float32, maps float2 with rows repeated twice
    work = entries_per_pair(arch, shape) * layers
    launch_pairs = int(np.clip(WORK_PER_LAUNCH // work, 1, MAX_PAIRS_PER_LAUNCH))
    result = n * m * layers * RESULT_BYTES_PER_PAIR_LAYER * slots // 2

    def need(chunk):
        pairs = chunk * chunk
        inputs = 2 * chunk * per_image + pairs * PAIR_INDEX_BYTES
        slot = min(launch_pairs, pairs) * layers * slots * 8
        return result + 2 * inputs + slot

    chunk = max(n, m)
    while chunk > 1 and need(chunk) > budget_bytes:
        chunk = (chunk + 1) // 2
    if need(chunk) > budget_bytes:
        raise ValueError(f"GPU memory budget of {budget_bytes} bytes cannot hold a {n} x {m} tile's result "
                         f"({result} bytes) and one image pair ({need(1) - result} bytes) at {layers} layers; "
                         f"use a smaller tile size")
    return TilePlan(chunk=chunk, pairs_per_launch=min(launch_pairs, chunk * chunk), device_bytes=need(chunk))


@functools.lru_cache(maxsize=8)
def pair_lists(n: int, m: int, *, diagonal: bool, tile: tuple[int, int] = SUPER_TILE,
               group: tuple[int, int] = WARP_GROUP) -> tuple[np.ndarray, np.ndarray]:
    """Pair indices (a, b) of an n x m sub-tile (diagonal: a <= b only), every pair once, in super-tile order.

    Super-tiles of tile = (rows, cols) pairs follow each other row-major; inside one, groups of `group` pairs follow
    row-major, and inside a group the pairs are row-major. Edge super-tiles and groups are cut at n and m. Returns
    two read-only int32 arrays of the same length (cached: every tile of a run has the same shape).
    """
    (tr, tc), (gr, gc) = tile, group
    if tr % gr or tc % gc:
        raise ValueError(f"pair groups {group} must divide the super-tile {tile}")
    rows, cols = -(-n // tr) * tr, -(-m // tc) * tc
    a = np.arange(rows, dtype=np.int32).reshape(rows // tr, 1, tr // gr, 1, gr, 1)
    b = np.arange(cols, dtype=np.int32).reshape(1, cols // tc, 1, tc // gc, 1, gc)
    a, b = (v.ravel() for v in np.broadcast_arrays(a, b))
    keep = (a < n) & (b < m)
    if diagonal:
        keep &= a <= b
    a, b = a[keep], b[keep]
    a.flags.writeable = b.flags.writeable = False
    return a, b


def subtiles(n: int, m: int, chunk: int, *, diagonal: bool) -> list[tuple[slice, slice, bool]]:
    """Sub-tiles of an n x m tile in row-major order: (rows, cols, on_diagonal). A diagonal tile (n == m) keeps the
    sub-tiles on and above its diagonal; on_diagonal marks those whose own pairs are a <= b only."""
    out = []
    for r0 in range(0, n, chunk):
        for c0 in range(r0 if diagonal else 0, m, chunk):
            out.append((slice(r0, min(r0 + chunk, n)), slice(c0, min(c0 + chunk, m)), diagonal and r0 == c0))
    return out


def use_device(device_id: int) -> None:
    """Device that tile_kernels runs on in this process (the worker plugin sets it; default 0)."""
    global _device_id
    _device_id = int(device_id)


def current_device() -> int:
    return 0 if _device_id is None else _device_id


@functools.lru_cache(maxsize=None)
def load_module(device_id: int, options: tuple[str, ...]):
    """cupy.RawModule of cntk_tile.cu compiled for `device_id` with NVRTC `options`; built once per key."""
    import cupy
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=KERNEL_SOURCE.read_text(), options=options)
        module.compile()
    return module


def device_streams(device_id: int):
    """The (compute, upload) CUDA streams of `device_id`, created once for the process (call with _device_lock held
    and the device current). CuPy's memory pool keeps a freed block for the stream it was allocated on: with new
    streams per tile, a tile's blocks (~0.9 GB for a 1000 x 1000 CNTK-V tile) could never be reused by the next."""
    import cupy
    if device_id not in _streams:
        _streams[device_id] = (cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True))
    return _streams[device_id]


def free_device_bytes(device_id: int) -> int:
    """Free device memory plus what CuPy's pool holds unused."""
    import cupy
    with cupy.cuda.Device(device_id):
        free, _ = cupy.cuda.runtime.memGetInfo()
        return int(free + cupy.get_default_memory_pool().free_bytes())


def tile_kernels(x, y=None, *, archs=("vanilla", "gap"), max_depth: int = 21, lap=(), flip: bool = False,
                 depths=None, kinds=None) -> dict:
    """CNTK and NNGP blocks for every depth 2..max_depth on the GPU, one pass per architecture.

    x: (n, P, Q, C) float32 preprocessed images, P, Q, C <= 32 (check_image_shape; the kernels are compiled for
    the shape on first use); y: (m, P, Q, C) or None (a diagonal tile: pairs a <= b are computed and mirrored).
    archs: any of "vanilla", "gap", "fc" ("fc" runs cntk_gram.workers.fc on the host, for any image size). Returns
    {"{kind}-{arch}": float32 (max_depth-1, n, m)} host arrays, depth d at index d-2.

    lap: LAP sizes c (ints 0..max(P, Q), at most MAX_LAP distinct; needs "gap"): adds "{kind}-lap{c}" from the GAP pass (a
    -DLAP_COUNT build of its kernel). flip: adds "{key}-flip" = (K(x, y) + K(x, flip y)) / 2 for every key, from one
    more pass per architecture against the mirrored column images; on a diagonal tile that pass also computes
    a <= b only and mirrors, since K(x_b, flip x_a) = K(x_a, flip x_b). Keys and order as the CPU backend
    (cntk_gram.workers.enhanced.output_keys); without lap and flip the plain kernels run unchanged.

    depths, kinds: what to return, as in the CPU backend (None: every depth 2..max_depth, both kinds; else those
    depths in that order, index i holding depths[i], and the keys of those kinds). The kernels compute every layer
    either way; only the chosen (kind, depth) planes of the device result are copied to the host, e.g. 5 of 40 per
    vanilla tile for Table 1's NTK column.
    """
    x, y, archs, max_depth, lap, flip, depths, kinds = check_tile_call(
        x, y, archs=archs, max_depth=max_depth, lap=lap, flip=flip, depths=depths, kinds=kinds)
    if len(lap) > MAX_LAP:
        raise ValueError(f"the GPU kernel takes at most {MAX_LAP} LAP sizes per run, got {len(lap)}: {list(lap)}")
    out = {}
    conv = [a for a in archs if a != "fc"]
    if conv:
        check_image_shape(x.shape[1:])
        x32 = np.ascontiguousarray(x, np.float32)
        y32 = None if y is None else np.ascontiguousarray(y, np.float32)
        with _device_lock:
            for arch in conv:
                arch_lap = lap if arch == LAP_ARCH else ()
                pick = dict(layers=max_depth - 1, lap=arch_lap, depths=depths, kinds=kinds)
                out.update(_conv_tile(x32, y32, arch=arch, **pick))
                if flip:
                    mirrored = _conv_tile(x32, y32, arch=arch, flip=True, **pick)
                    out.update({_flipped(key): value for key, value in mirrored.items()})
    if "fc" in archs:
        from .fc import fc_kernels
        fc_keys = output_keys(("fc",), kinds=kinds)
        plain = fc_kernels(x, y, max_depth=max_depth, depths=depths)
        out.update({key: plain[key] for key in fc_keys})
        if flip:
            mirrored = fc_kernels(x, flip_images(x if y is None else y), max_depth=max_depth, depths=depths)
            out.update({_flipped(key): mirrored[key] for key in fc_keys})
    keys = output_keys(archs, lap, flip, kinds)
    for key in keys:
        parsed = KernelKey.parse(key)
        if parsed.flip:   # out holds K(x, flip y) under this key until here
            out[key] = flip_average(out[str(parsed.unflipped())], out[key], np.float32)
    return {key: out[key] for key in keys}


def _flipped(key: str) -> str:
    return str(KernelKey.parse(key).flipped())


def _conv_tile(x, y, *, arch: str, layers: int, depths, kinds, lap=(), flip: bool = False) -> dict:
    """One architecture over the whole tile, sub-tile by sub-tile. Returns {"ntk-arch", "nngp-arch"} and, for GAP
    with lap, {"ntk-lap{c}", "nngp-lap{c}"}, those of `kinds` only, float32 (len(depths), n, m). flip: the column images are mirrored (y, or x on a diagonal tile, which keeps its a <= b pairs
    and mirroring: K(x_a, flip x_b) is symmetric in a, b)."""
    import cupy
    diagonal = y is None
    y_host = x if diagonal else y
    if flip:
        y_host = flip_images(y_host)
    n, m = len(x), len(y_host)
    slots = 2 * (1 + len(lap))
    names = output_keys((arch,), lap)   # the result's slots: ntk, nngp of arch, then of each LAP(c)
    wanted = [s for s, name in enumerate(names) if KernelKey.parse(name).kind in kinds]
    layer_index = [d - 2 for d in depths]
    image_shape = x.shape[1:]
    device_id = current_device()
    module = load_module(device_id, compile_options(module_options(len(lap), image_shape)))
    with cupy.cuda.Device(device_id):
        plan = plan_tile(n, m, layers=layers, arch=arch, budget_bytes=int(0.8 * free_device_bytes(device_id)),
                         slots=slots, shape=image_shape)
        runner = _TileRunner(module, arch=arch, layers=layers, pairs_per_launch=plan.pairs_per_launch,
                             shape=(n, m), mirror=diagonal, columns_are_rows=diagonal and not flip, lap=lap,
                             image_shape=image_shape, streams=device_streams(device_id))
        result = runner.run(x, y_host, same_images(x, y_host), subtiles(n, m, plan.chunk, diagonal=diagonal),
                            slots=wanted, layers=layer_index)
    return {names[s]: result[k] for k, s in enumerate(wanted)}


_pinned = {"buffer": None}


def _pinned_buffer(shape, dtype):
    """A C-contiguous view of this process's pinned host buffer (grown when too small; callers hold _device_lock)."""
    import cupyx
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if _pinned["buffer"] is None or _pinned["buffer"].nbytes < nbytes:
        _pinned["buffer"] = None
        _pinned["buffer"] = cupyx.empty_pinned((nbytes,), np.uint8)
    return _pinned["buffer"][:nbytes].view(dtype).reshape(shape)


class _TileRunner:
    """One architecture's kernels over the sub-tiles of one tile (module docstring and docs/gpu.md, "Host side").

    Streams (the device's pair, `device_streams`, the same for every tile): `upload` copies a sub-tile's inputs from
    pinned host memory; `compute` waits for that upload's event, then runs diag_maps, the tile kernel and
    scatter_pairs into `result` (2, layers, n, m) float32. A sub-tile's device and pinned buffers are dropped only
    after the host has waited for its compute event, so the memory pool never hands them out while a kernel or copy
    still uses them; the next tile reuses them from the pool on the same streams.
    """

    def __init__(self, module, *, arch, layers, pairs_per_launch, shape, mirror, streams, columns_are_rows=None,
                 lap=(), image_shape=DEFAULT_SHAPE):
        import cupy
        self.cupy = cupy
        self.kernel = module.get_function(KERNEL_NAMES[arch])
        self.maps_kernel = module.get_function("diag_maps")
        self.scatter_kernel = module.get_function("scatter_pairs")
        self.arch, self.layers, self.batch = arch, layers, pairs_per_launch
        self.shape, self.mirror = shape, mirror
        # diagonal sub-tiles share the row images as columns unless those are mirrored (flip on a diagonal tile)
        self.columns_are_rows = mirror if columns_are_rows is None else columns_are_rows
        self.slots = 2 * (1 + len(lap))
        self.image_shape = tuple(image_shape)   # (P, Q, C): the module was compiled for it
        pixels = self.image_shape[0] * self.image_shape[1]
        self.scale = 1.0 / entries_per_pair("gap", self.image_shape) if arch == "gap" else 1.0
        self.warps = dict(DEFAULT_OPTIONS)["WARPS_PER_BLOCK"]
        per_cuda_block = self.warps * dict(DEFAULT_OPTIONS)["BLOCKS_PER_WARP"]
        self.gap_chunks = -(-pixels // per_cuda_block)   # GAP_CHUNKS of cntk_tile.cu
        self.compute, self.upload = streams
        with self.compute:
            self.result = cupy.zeros((self.slots, layers) + tuple(shape), cupy.float32)
            self.sums = cupy.empty((self.batch, layers, self.slots), cupy.float64)
            self.lap_args = ()
            if lap:   # the LAP build's GAP kernel takes its weight table before `out`
                self.lap_host = lap_table(lap)   # kept until the runner is dropped, after the host's last wait
                table = cupy.empty(self.lap_host.shape, cupy.float64)
                table.set(self.lap_host, stream=self.compute)
                self.lap_args = (table,)
        self.launches = 0

    def run(self, x, y, same, jobs, *, slots, layers) -> np.ndarray:
        """x (n, P, Q, C), y (m, P, Q, C) float32 host images, same (n, m) bool, jobs from `subtiles`.
        Returns the host copy of the result's planes [slots][:, layers], (len(slots), len(layers), n, m) float32:
        all of them in one copy, else each plane (a contiguous (n, m) block on the device) on its own."""
        previous = None
        for rows, cols, on_diagonal in jobs:
            # staged on the host and uploaded while the previous sub-tile's kernels run
            current = self._upload(x[rows], y[cols], same[rows, cols], rows=rows, cols=cols, on_diagonal=on_diagonal)
            self._enqueue(current)
            if previous is not None:
                previous["done"].synchronize()
            previous = current
        if previous is not None:
            previous["done"].synchronize()
        if list(slots) == list(range(self.slots)) and list(layers) == list(range(self.layers)):
            host = _pinned_buffer(self.result.shape, np.float32)
            self.result.get(stream=self.compute, out=host, blocking=True)
            return host.copy()
        host = _pinned_buffer((len(slots), len(layers)) + self.shape, np.float32)
        planes = [(k, i, s, h) for k, s in enumerate(slots) for i, h in enumerate(layers)]
        for number, (k, i, s, h) in enumerate(planes):   # one stream: waiting for the last copy waits for all
            self.result[s, h].get(stream=self.compute, out=host[k, i], blocking=number == len(planes) - 1)
        return host.copy()

    def _upload(self, xs, ys, same, *, rows, cols, on_diagonal) -> dict:
        import cupyx
        cupy = self.cupy
        pair_a, pair_b = pair_lists(len(xs), len(ys), diagonal=on_diagonal)
        host = {"x": xs, "a": pair_a, "b": pair_b, "self": same[pair_a, pair_b].astype(np.uint8)}
        if not (on_diagonal and self.columns_are_rows):
            host["y"] = ys
        job = {"rows": rows, "cols": cols, "diagonal": on_diagonal, "count": len(pair_a), "pinned": {}}
        with self.upload:
            for name, values in host.items():
                pinned = cupyx.empty_pinned(values.shape, values.dtype)
                np.copyto(pinned, values)
                job["pinned"][name] = pinned
                job[name] = cupy.empty(values.shape, values.dtype)
                job[name].set(pinned, stream=self.upload)
            job["uploaded"] = self.upload.record()
        if on_diagonal and self.columns_are_rows:
            job["y"] = job["x"]
        return job

    def _maps(self, images_dev):
        p, q, _ = self.image_shape
        maps = self.cupy.empty((len(images_dev), self.layers, 2 * p, q, 2), self.cupy.float32)
        self.maps_kernel((len(images_dev),), (p * q,),
                         (images_dev, np.int32(len(images_dev)), np.int32(self.layers), maps))
        return maps

    def _enqueue(self, job) -> None:
        """The sub-tile's maps, tile kernel launches and scatters on the compute stream; sets job["done"]."""
        layers = np.int32(self.layers)
        with self.compute:
            self.compute.wait_event(job["uploaded"])
            job["x_maps"] = self._maps(job["x"])
            job["y_maps"] = job["x_maps"] if job["y"] is job["x"] else self._maps(job["y"])
            for start in range(0, job["count"], self.batch):
                stop = min(start + self.batch, job["count"])
                count = stop - start
                sums = self.sums[:count]
                pa, pb = job["a"][start:stop], job["b"][start:stop]
                if self.arch == "gap":
                    sums.fill(0)          # the GAP kernel adds its CUDA blocks' totals atomically
                grid = count * self.gap_chunks if self.arch == "gap" else -(-count // self.warps)
                self.kernel((grid,), (32 * self.warps,),
                            (job["x"], job["y"], job["x_maps"], job["y_maps"], pa, pb, job["self"][start:stop],
                             np.int32(count), layers, *self.lap_args, sums))
                values = count * self.slots * self.layers
                self.scatter_kernel((-(-values // SCATTER_THREADS),), (SCATTER_THREADS,),
                                    (sums, pa, pb, np.int32(count), layers, np.float64(self.scale),
                                     np.int32(job["rows"].start), np.int32(job["cols"].start),
                                     np.int32(self.shape[0]), np.int32(self.shape[1]), np.int32(self.mirror),
                                     self.result))
                self.launches += 1
            job["done"] = self.compute.record()
