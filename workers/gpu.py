"""GPU tile worker: launches the fused CNTK kernels of `cntk_tile.cu` through `cupy.RawModule`.

Same contract as every backend (docs/ARCHITECTURE.md): `tile_kernels(x, y=None, *, archs, max_depth)`. The planning
half of this module (`plan_tile`, `pair_lists`, `same_images`, `compile_options`) is pure NumPy and imports without
CuPy; CuPy is imported only when a tile actually runs. Design, blocking and the instruction count: docs/gpu.md.

Flow of one tile: the images of a sub-tile (rows chunk x cols chunk, sized to the free device memory) go to the
device once, `diag_maps` turns them into per-image 1/sqrt(d), sqrt(d) maps for every layer, and the pair list of the
sub-tile runs through the tile kernel in launches of `pairs_per_launch` pairs on a non-default stream. Each launch
writes float64 sums into one of two output slots; a second stream copies a finished slot to pinned host memory
while the next launch runs, and the host scatters it into the result arrays.
"""
import functools
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .validate import check_archs, check_depth, check_pair, same_images

KERNEL_SOURCE = Path(__file__).parent / "cntk_tile.cu"
SIDE, CHANNELS = 32, 3
IMAGE_BYTES = SIDE * SIDE * CHANNELS * 4
MAP_BYTES_PER_LAYER = 2 * SIDE * SIDE * 8      # float2 {r, g}, rows repeated twice (see cntk_tile.cu)
PAIR_INDEX_BYTES = 4 + 4 + 1                   # pair_x, pair_y int32, pair_self uint8
ENTRIES_PER_PAIR = {"gap": SIDE ** 4, "vanilla": SIDE ** 2}
KERNEL_NAMES = {"gap": "cntk_gap_tile", "vanilla": "cntk_vanilla_tile"}
# -D options of cntk_tile.cu (documented there); part of the module cache key.
DEFAULT_OPTIONS = (("WARPS_PER_BLOCK", 8), ("BLOCKS_PER_WARP", 1), ("MIN_BLOCKS_PER_SM", 2), ("MAX_LAYERS", 32))
MAX_LAYERS = dict(DEFAULT_OPTIONS)["MAX_LAYERS"]
WORK_PER_LAUNCH = 2 ** 33                      # entry-layers per launch: ~10 ms of GPU time, small output slots
MAX_PAIRS_PER_LAUNCH = 65536
# Instructions per entry-layer: the SASS of the layer loop (sm_90, nvcc 13, compile_options()) over its 32 rows;
# all issued instructions, and those on the FP32 pipe (FFMA/FMUL/FADD/FMNMX/FSETP/FSEL). See docs/gpu.md.
# .ci/check_cuda.sh fails when `bench_gpu.py --check-sass` counts more than half an instruction off these.
INSTR_PER_ENTRY_LAYER = {"gap": 50, "vanilla": 47}
FP32_INSTR_PER_ENTRY_LAYER = {"gap": 38, "vanilla": 36}

_device_id = None
_device_lock = threading.Lock()


def compile_options(options=DEFAULT_OPTIONS) -> tuple[str, ...]:
    """NVRTC / nvcc flags for cntk_tile.cu: C++17, flush-to-zero float32 and one -DNAME=value per option (a tuple of
    (name, int) pairs). -ftz=true is explicit because NVRTC's default differs between CuPy versions; the SASS count
    (INSTR_PER_ENTRY_LAYER) and the timings must come from the same code."""
    return ("-std=c++17", "-ftz=true") + tuple(f"-D{name}={int(value)}" for name, value in options)


@dataclass(frozen=True)
class TilePlan:
    """How a tile is cut for the device: `chunk` images per side of a sub-tile, `pairs_per_launch` per kernel."""
    chunk: int
    pairs_per_launch: int
    device_bytes: int


def plan_tile(n: int, m: int, *, layers: int, arch: str, budget_bytes: int) -> TilePlan:
    """Largest sub-tile (chunk x chunk images, at most n x m) whose device buffers fit in `budget_bytes`.

    Device buffers: images and diagonal maps of 2*chunk images, the pair lists of chunk^2 pairs and two output slots
    of pairs_per_launch * layers * 2 float64. Raises ValueError when not even one pair fits.
    """
    if arch not in ENTRIES_PER_PAIR:
        raise ValueError(f"unknown conv architecture {arch!r}; allowed: {', '.join(ENTRIES_PER_PAIR)}")
    if not 1 <= layers <= MAX_LAYERS:
        raise ValueError(f"the GPU kernels run 1..{MAX_LAYERS} conv layers (max_depth 2..{MAX_LAYERS + 1}), "
                         f"got {layers}")
    per_image = IMAGE_BYTES + layers * MAP_BYTES_PER_LAYER
    work = ENTRIES_PER_PAIR[arch] * layers
    launch_pairs = int(np.clip(WORK_PER_LAUNCH // work, 1, MAX_PAIRS_PER_LAUNCH))

    def need(chunk):
        pairs = chunk * chunk
        slots = 2 * min(launch_pairs, pairs) * layers * 2 * 8
        return 2 * chunk * per_image + pairs * PAIR_INDEX_BYTES + slots

    chunk = max(n, m)
    while chunk > 1 and need(chunk) > budget_bytes:
        chunk = (chunk + 1) // 2
    if need(chunk) > budget_bytes:
        raise ValueError(f"GPU memory budget of {budget_bytes} bytes cannot hold even one image pair "
                         f"({need(1)} bytes needed at {layers} layers)")
    return TilePlan(chunk=chunk, pairs_per_launch=min(launch_pairs, chunk * chunk), device_bytes=need(chunk))


def pair_lists(n: int, m: int, *, diagonal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row-major pair indices (a, b) of an n x m sub-tile; diagonal keeps a <= b only. int32 arrays."""
    a, b = np.meshgrid(np.arange(n, dtype=np.int32), np.arange(m, dtype=np.int32), indexing="ij")
    keep = a <= b if diagonal else np.ones(a.shape, bool)
    return a[keep], b[keep]


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


def free_device_bytes(device_id: int) -> int:
    """Free device memory plus what CuPy's pool holds unused."""
    import cupy
    with cupy.cuda.Device(device_id):
        free, _ = cupy.cuda.runtime.memGetInfo()
        return int(free + cupy.get_default_memory_pool().free_bytes())


def tile_kernels(x, y=None, *, archs=("vanilla", "gap"), max_depth: int = 21) -> dict:
    """CNTK and NNGP blocks for every depth 2..max_depth on the GPU, one pass per architecture.

    x: (n, 32, 32, 3) float32 preprocessed images; y: (m, 32, 32, 3) or None (a diagonal tile: pairs a <= b are
    computed and mirrored). archs: any of "vanilla", "gap", "fc" ("fc" runs cntk_gram.workers.fc on the host). Returns
    {"{kind}-{arch}": float32 (max_depth-1, n, m)} host arrays, depth d at index d-2.
    """
    x, y = check_pair(x, y)
    archs = check_archs(archs)
    max_depth = check_depth(max_depth)
    out = {}
    conv = [a for a in archs if a != "fc"]
    if conv:
        if x.shape[1:] != (SIDE, SIDE, CHANNELS):
            raise ValueError(f"the GPU kernels take {SIDE}x{SIDE}x{CHANNELS} images, got {x.shape[1:]}")
        x32 = np.ascontiguousarray(x, np.float32)
        y32 = None if y is None else np.ascontiguousarray(y, np.float32)
        with _device_lock:
            for arch in conv:
                out.update(_conv_tile(x32, y32, arch=arch, layers=max_depth - 1))
    if "fc" in archs:
        from .fc import fc_kernels
        out.update(fc_kernels(x, y, max_depth=max_depth))
    return {f"{kind}-{arch}": out[f"{kind}-{arch}"] for arch in archs for kind in ("ntk", "nngp")}


def _conv_tile(x, y, *, arch: str, layers: int) -> dict:
    """One architecture over the whole tile, sub-tile by sub-tile. Returns {"ntk-arch", "nngp-arch"} float32."""
    import cupy
    diagonal = y is None
    y_host = x if diagonal else y
    n, m = len(x), len(y_host)
    device_id = current_device()
    module = load_module(device_id, compile_options())
    with cupy.cuda.Device(device_id):
        plan = plan_tile(n, m, layers=layers, arch=arch, budget_bytes=int(0.8 * free_device_bytes(device_id)))
        same = same_images(x, y_host)
        result = np.zeros((2, layers, n, m), np.float32)
        runner = _LaunchRunner(module, arch=arch, layers=layers, pairs_per_launch=plan.pairs_per_launch,
                               result=result, mirror=diagonal)
        for r0 in range(0, n, plan.chunk):
            rows = slice(r0, min(r0 + plan.chunk, n))
            for c0 in range(r0 if diagonal else 0, m, plan.chunk):
                cols = slice(c0, min(c0 + plan.chunk, m))
                runner.run_subtile(x[rows], y_host[cols], same[rows, cols], rows=rows, cols=cols,
                                   diagonal=diagonal and r0 == c0)
        runner.finish()
    return {f"ntk-{arch}": result[0], f"nngp-{arch}": result[1]}


class _LaunchRunner:
    """Launches one architecture's kernel over sub-tiles with two output slots (see module docstring)."""

    def __init__(self, module, *, arch, layers, pairs_per_launch, result, mirror):
        import cupy
        import cupyx
        self.cupy = cupy
        self.kernel = module.get_function(KERNEL_NAMES[arch])
        self.maps_kernel = module.get_function("diag_maps")
        self.arch, self.layers, self.batch = arch, layers, pairs_per_launch
        self.result, self.mirror = result, mirror
        self.scale = 1.0 / ENTRIES_PER_PAIR["gap"] if arch == "gap" else 1.0
        self.warps = dict(DEFAULT_OPTIONS)["WARPS_PER_BLOCK"]
        self.gap_chunks = SIDE * SIDE // (self.warps * dict(DEFAULT_OPTIONS)["BLOCKS_PER_WARP"])
        self.compute = cupy.cuda.Stream(non_blocking=True)
        self.copy = cupy.cuda.Stream(non_blocking=True)
        self.slots = [{"device": cupy.zeros((self.batch, layers, 2), cupy.float64),
                       "host": cupyx.empty_pinned((self.batch, layers, 2), np.float64),
                       "copied": None, "pending": None} for _ in range(2)]
        self.launches = 0

    def _maps(self, images_dev):
        maps = self.cupy.empty((len(images_dev), self.layers, 2 * SIDE, SIDE, 2), self.cupy.float32)
        self.maps_kernel((len(images_dev),), (SIDE * SIDE,),
                         (images_dev, np.int32(len(images_dev)), np.int32(self.layers), maps))
        return maps

    def run_subtile(self, xs, ys, same, *, rows, cols, diagonal):
        """All pairs of xs (n, 32, 32, 3) x ys (m, 32, 32, 3) float32; same (n, m) bool; rows/cols place them."""
        cupy = self.cupy
        pair_a, pair_b = pair_lists(len(xs), len(ys), diagonal=diagonal)
        with self.compute:
            x_dev = cupy.asarray(xs)
            y_dev = x_dev if diagonal else cupy.asarray(ys)
            x_maps = self._maps(x_dev)
            y_maps = x_maps if diagonal else self._maps(y_dev)
            pa_dev, pb_dev = cupy.asarray(pair_a), cupy.asarray(pair_b)
            self_dev = cupy.asarray(same[pair_a, pair_b].astype(np.uint8))
            for start in range(0, len(pair_a), self.batch):
                stop = min(start + self.batch, len(pair_a))
                slot = self._free_slot()
                count = stop - start
                out = slot["device"][:count]
                out.fill(0)
                grid = count * self.gap_chunks if self.arch == "gap" else -(-count // self.warps)
                self.kernel((grid,), (32 * self.warps,),
                            (x_dev, y_dev, x_maps, y_maps, pa_dev[start:stop], pb_dev[start:stop],
                             self_dev[start:stop], np.int32(count), np.int32(self.layers), out))
                done = self.compute.record()
                self.copy.wait_event(done)
                out.get(stream=self.copy, out=slot["host"][:count], blocking=False)
                slot["copied"] = self.copy.record()
                slot["pending"] = (rows.start + pair_a[start:stop], cols.start + pair_b[start:stop], count)
                self.launches += 1
            # this sub-tile's images and maps are freed on return: let its launches finish first
            self.compute.synchronize()

    def _free_slot(self):
        """The slot of the next launch; a slot still holding results is scattered first (waits for its copy)."""
        slot = self.slots[self.launches % 2]
        if slot["pending"] is not None:
            self._scatter(slot)
        return slot

    def _scatter(self, slot):
        slot["copied"].synchronize()
        ga, gb, count = slot["pending"]
        values = slot["host"][:count].transpose(2, 1, 0) * self.scale   # (2 kinds, layers, count)
        self.result[:, :, ga, gb] = values
        if self.mirror:
            self.result[:, :, gb, ga] = values
        slot["pending"] = None

    def finish(self):
        for slot in self.slots:
            if slot["pending"] is not None:
                self._scatter(slot)
