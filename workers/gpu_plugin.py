"""Dask worker plugin for GPU workers: picks the device, caps CuPy's memory pool, compiles the kernels once.

One worker process per GPU (dask-cuda gives each worker its own CUDA_VISIBLE_DEVICES ordering, so device 0 is that
worker's GPU). Registered by cntk_gram.pipeline.cluster.register_gpu_plugin with `client.register_plugin(GPUSetup())`.
"""
from distributed import WorkerPlugin


class GPUSetup(WorkerPlugin):
    """Per-worker GPU set-up, run once when a worker starts or joins.

    device_id: CUDA device of this worker (None: 0, i.e. the first visible device). memory_fraction: cap of CuPy's
    default memory pool as a fraction of the device memory (the tile planner sizes sub-tiles to what is free).
    """

    name = "cntk-gpu-setup"

    def __init__(self, *, device_id: int | None = None, memory_fraction: float = 0.9):
        if not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        self.device_id = device_id
        self.memory_fraction = memory_fraction

    def setup(self, worker=None):
        import cupy

        from . import gpu
        device_id = 0 if self.device_id is None else int(self.device_id)
        gpu.use_device(device_id)
        with cupy.cuda.Device(device_id):
            cupy.get_default_memory_pool().set_limit(fraction=self.memory_fraction)
            module = gpu.load_module(device_id, gpu.compile_options())   # NVRTC once; cached per (device, options)
            for name in ("diag_maps", *gpu.KERNEL_NAMES.values()):
                module.get_function(name)                                  # loads the cubin on this device now
        if worker is not None:
            worker.log_event("cntk-gpu", {"device": device_id, "name": _device_name(device_id)})


def _device_name(device_id: int) -> str:
    import cupy
    name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)
