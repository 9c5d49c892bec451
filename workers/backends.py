"""Backend selection: every backend module exposes the same `tile_kernels` (docs/ARCHITECTURE.md)."""
import importlib

from .vocab import BACKEND_CHOICES, BACKENDS, gpu_available


def resolve_backend(name: str) -> str:
    """'auto' -> 'gpu' when a GPU is usable, else 'cpu'. 'gpu' without one raises a clear error."""
    if name == "auto":
        return "gpu" if gpu_available() else "cpu"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; allowed: {', '.join(BACKEND_CHOICES)}")
    if name == "gpu" and not gpu_available():
        raise RuntimeError("backend 'gpu' requested but no CUDA device is usable (is cupy installed and a GPU "
                           "visible?); use backend: cpu or auto")
    return name


def get_backend(name: str):
    """The module implementing `tile_kernels` for a resolved backend name ('cpu' or 'gpu')."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    return importlib.import_module(f"cntk_gram.workers.{name}")
