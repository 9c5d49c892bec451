"""cntk-gram: exact CNTK Gram matrices on full datasets, tiled, resumable, multi-GPU.

The public façade. Everything else lives in two subpackages:

- `cntk_gram.pipeline`: config, data, plan, store, scheduling, solve, report, CLI (the `pipeline/` folder);
- `cntk_gram.workers`: the tile kernels that run on a worker, CPU and GPU, and the float64 reference
  (the `workers/` folder).

    import cntk_gram
    config = cntk_gram.load_config("configs/quickstart.yaml")
    summary = cntk_gram.run(config)                       # compute or resume the store
    gram = cntk_gram.open_gram(config.store, "ntk-vanilla", 11)   # lazy (N, N) dask array
    solved = cntk_gram.solve_and_report(config.store, out="report")   # accuracies + report files

Names resolve on first use, so `import cntk_gram` stays cheap (no Dask, Zarr or numba until needed).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The folders pipeline/ and workers/ become cntk_gram.pipeline and cntk_gram.workers only through an install
# (pyproject.toml, package-dir; `pip install -e .` for a checkout): this package never edits its own search path.

# public name -> (module, attribute)
_EXPORTS = {
    "load_config": ("cntk_gram.pipeline.config", "load_config"),
    "build_config": ("cntk_gram.pipeline.config", "build_config"),
    "run": ("cntk_gram.pipeline.run", "run"),
    "submit": ("cntk_gram.pipeline.run", "submit"),
    "cancel": ("cntk_gram.pipeline.run", "cancel"),
    "open_gram": ("cntk_gram.pipeline.store", "open_gram"),
    "solve_store": ("cntk_gram.pipeline.solve", "solve_store"),
    "write_report": ("cntk_gram.pipeline.report", "write_report"),
    "solve_and_report": ("cntk_gram.pipeline.experiment", "solve_and_report"),
    "kernel_block": ("cntk_gram.workers", "kernel_block"),
    "UserError": ("cntk_gram.pipeline.errors", "UserError"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'cntk_gram' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
