"""Dense float64 linear algebra on a stored Gram block: the panel plan, the blocked Cholesky factorisation and the
triangular solves. Nothing here knows about labels, ridge grids or stores: it factors a dask array.

What it does, exactly:

- `plan_factor(n, ...)` decides how K (n, n) is factored: the column panels and whether finished panels stay in
  RAM or go to scratch files.
- `cholesky_blocked(a, shift=s)` returns the lower factor L of a + s·I (a: symmetric (n, n) dask array whose chunks
  are the store's tiles, any float dtype; every product is float64). Left-looking, one column panel at a time:

      P = a[c0:, c0:c1] + s·I  -  sum_{j<k} L[c0:, panel j] · L[c0:c1, panel j]^T
      L[c0:c1, c0:c1] = chol(P[:w]);   L[c1:, c0:c1] = P[w:] · L[c0:c1, c0:c1]^-T

  P is read tile by tile into one preallocated float64 buffer (only a[c0:, c0:c1], the lower part, is read),
  then updated in place with BLAS dgemm, LAPACK dpotrf and BLAS dtrsm. A factor that does not exist raises
  NotPositiveDefinite with the failing row; NaN in the store raises IncompleteKernel. Scratch files are removed
  on every exit, failures included. With `progress`, each finished panel of a multi-panel factorisation is
  reported: columns done, elapsed time and an ETA from the cubic work model (`work_done`).
- `cho_solve_blocked(L, b)`: x = (L L^T)^-1 b, reading each panel twice (forward, then backward).
- `prefix_solves(L, b, sizes)`: the same for the leading s x s block of L L^T, every s in sizes at once, still
  reading each panel twice: L[:s, :s] is the Cholesky factor of (K + shift·I)[:s, :s] for a fixed shift, so one
  factorisation serves every training-set prefix (the ridgeless learning curve, pipeline.curve).

Memory on the CPU, with memory_budget B (default 12 GiB, for a 24 GiB machine):

- panel width: all n columns when n²·8 <= 3/4·B, else the widest run of whole tiles of at most B/4 bytes
  ((n - c0)·w·8 <= B/4); in both cases never wider than CPU_MAX_PANEL = 8,192 columns (whole tiles), because
  multithreaded OpenBLAS dpotrf crashes on larger blocks. So only n <= 8,192 is one in-core LAPACK call.
- where finished panels live: in RAM, unless there is more than one panel and the factor (n²·4 bytes) plus one
  panel (n·w·8) exceeds B/2; then in memory-mapped .npy files in a fresh directory under `scratch_dir`
  (default: the system temp dir), each released from the process (madvise DONTNEED) after every use, so at most
  the panel being computed and one earlier panel are resident.
- examples at 12 GiB (500- or 1,000-row tiles): n = 8,000: one panel, 0.5 GB. n = 20,000: three 8,000-column
  panels kept in RAM (factor 2.2 GB). Panels stay in RAM up to n ~ 32,900. n = 34,000: five 8,000-column panels
  on disk (5.7 GB). n = 50,000: seven panels (6 x 8,000 + 2,000) on disk, 11.6 GB of scratch files, about
  6.4 GB resident (the panel being computed, <= 3.2 GB, and one earlier panel, <= 3.2 GB) plus the tiles
  being read.

On a GPU (CuPy, device 'gpu' or 'auto' when CuPy sees one) the same loop runs with device arrays; when n²·8 fits
40% of the free device memory the whole block is one cuSOLVER call, otherwise panels as on the CPU (no width cap),
each computed on the device and kept on the host.
"""
from __future__ import annotations

import mmap
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import dask.array as da
import numpy as np
from scipy.linalg import blas, lapack, solve_triangular

from cntk_gram.workers.vocab import gpu_available

DEFAULT_MEMORY_BUDGET = 12 * 2**30          # bytes of host memory the CPU factorisation may use

# Multithreaded OpenBLAS dpotrf (SciPy's and NumPy's builds) segfaults on very large blocks: seen at n = 20,000 on
# AVX-512, fine at 10,000. CPU panels stay at most this wide, so potrf only sees diagonal blocks of this size and the
# bulk of the work runs in dtrsm/dgemm.
CPU_MAX_PANEL = 8192

SCRATCH_PREFIX = "cntk-factor-"
OWNER_FILE = "owner"                        # in a scratch directory: "host pid" of the process that made it

Progress = Callable[[str], None]


class NotPositiveDefinite(ArithmeticError):
    """K + lam·mean(diag)·I has no Cholesky factor; `row` is the first failing row (0-based) or -1 if unknown."""

    def __init__(self, *, lam: float, row: int, n: int):
        self.lam, self.row, self.n = lam, row, n
        where = f"at row {row} of {n}" if row >= 0 else f"(size {n})"
        super().__init__(f"K(train, train) + {lam:g}·mean(diag)·I is not positive definite: "
                         f"Cholesky failed {where}")


class DeviceUnavailable(RuntimeError):
    """--device gpu asked for where CuPy sees no CUDA device."""


class IncompleteKernel(ValueError):
    """The Gram matrix still holds NaN (tiles not computed)."""


def array_module(device: str):
    """numpy for 'cpu', cupy for 'gpu', cupy if it sees a device for 'auto'."""
    if device == "cpu":
        return np
    if gpu_available():
        import cupy
        return cupy
    if device == "gpu":
        raise DeviceUnavailable("--device gpu: CuPy cannot see a CUDA device here; use --device cpu or auto")
    return np


# ---------------------------------------------------------------- the plan

def plan_panels(n: int, *, chunk: int, memory_budget: int, panel_width: int | None = None,
                in_core_bytes: int | None = None, max_width: int | None = None) -> list[tuple[int, int]]:
    """Column panels [(c0, c1), ...] covering 0..n; one panel when n·n float64 fits 3/4 of the budget
    (in_core_bytes instead, when given), otherwise panels of at most budget / 4 bytes; never wider than
    max_width; whole tiles of `chunk` columns when possible. panel_width forces the width (tests)."""
    if panel_width is None:
        limit = memory_budget * 3 // 4 if in_core_bytes is None else in_core_bytes
        if n * n * 8 <= limit:
            panel_width = n
        else:  # two panels in memory at once, each at most budget / 4; whole tiles when possible
            cols = memory_budget // 4 // (8 * n)
            panel_width = max(chunk, cols // chunk * chunk) if cols >= chunk else max(1, cols)
        if max_width is not None and panel_width > max_width:
            panel_width = max(chunk, max_width // chunk * chunk) if max_width >= chunk else max_width
    w = max(1, min(int(panel_width), n))
    return [(c0, min(c0 + w, n)) for c0 in range(0, n, w)]


@dataclass(frozen=True)
class FactorPlan:
    """How an (n, n) block is factored: bounds = the column panels; on_disk = finished panels go to scratch files.
    resident_bytes: the largest float64 panel buffer (the panel being computed); factor_bytes: all panels
    together (in RAM unless on_disk, then on disk)."""
    n: int
    bounds: list[tuple[int, int]]
    on_disk: bool

    @property
    def panel_width(self) -> int:
        return self.bounds[0][1] - self.bounds[0][0]

    @property
    def resident_bytes(self) -> int:
        return max((self.n - c0) * (c1 - c0) * 8 for c0, c1 in self.bounds)

    @property
    def factor_bytes(self) -> int:
        return sum((self.n - c0) * (c1 - c0) * 8 for c0, c1 in self.bounds)


def plan_factor(n: int, *, chunk: int, memory_budget: int = DEFAULT_MEMORY_BUDGET, panel_width: int | None = None,
                device_bytes: int | None = None) -> FactorPlan:
    """The plan cholesky_blocked follows: CPU panels capped at CPU_MAX_PANEL; device_bytes (GPU: bytes allowed
    for an in-core device factorisation) lifts the cap and replaces the in-core limit."""
    bounds = plan_panels(n, chunk=chunk, memory_budget=memory_budget, panel_width=panel_width,
                         in_core_bytes=device_bytes, max_width=CPU_MAX_PANEL if device_bytes is None else None)
    width = bounds[0][1] - bounds[0][0]
    on_disk = len(bounds) > 1 and (n * n * 4 + n * 8 * width) > memory_budget // 2
    return FactorPlan(n=n, bounds=bounds, on_disk=on_disk)


def work_done(c: int, n: int) -> float:
    """Share of a Cholesky factorisation's flops spent once columns 0..c of L exist (column j costs ~2(n - j)·j
    flops): 3(c/n)² - 2(c/n)³, the cubic work model behind the ETA."""
    x = min(max(c / n, 0.0), 1.0) if n else 1.0
    return 3 * x * x - 2 * x ** 3


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ---------------------------------------------------------------- the factor

@dataclass
class CholeskyFactor:
    """Lower factor L (n, n) float64 of K + shift·I, stored by column panel.

    panels[k] = L[c0:, c0:c1] for bounds[k] = (c0, c1): an (n - c0, c1 - c0) array (numpy, memmap or cupy).
    close() drops the panels and removes the scratch directory (if any).
    """
    n: int
    bounds: list[tuple[int, int]]
    panels: list = field(default_factory=list)
    scratch: Path | None = None
    xp: object = np

    def close(self) -> None:
        self.panels.clear()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


def make_scratch(scratch_dir: str | Path | None) -> Path:
    """A fresh scratch directory cntk-factor-XXXX under scratch_dir (default: the system temp dir), marked with
    its owner (host and pid) so that remove_stale_scratch can tell a leftover of a killed process."""
    path = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=scratch_dir))
    (path / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return path


def remove_stale_scratch(scratch_dir: str | Path | None) -> list[Path]:
    """Remove the scratch directories under scratch_dir (default: the system temp dir) left by a process of this
    host that no longer runs (a solve killed with SIGKILL cannot clean up). Returns the removed paths."""
    root = Path(scratch_dir if scratch_dir is not None else tempfile.gettempdir())
    removed = []
    for path in root.glob(f"{SCRATCH_PREFIX}*"):
        try:
            host, pid = (path / OWNER_FILE).read_text().split()
            pid = int(pid)
        except (OSError, ValueError):
            continue  # not ours, or being created right now
        if host != socket.gethostname() or pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(panel) -> None:
    """Drop a scratch panel's pages from this process (they stay in the file): keeps the resident set to the
    panels in use."""
    handle = getattr(panel, "_mmap", None) if isinstance(panel, np.memmap) else None
    if handle is not None and hasattr(handle, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        handle.madvise(mmap.MADV_DONTNEED)


def read_block(a: da.Array, rows: slice, cols: slice) -> np.ndarray:
    """a[rows, cols] as a C-ordered float64 host array, written chunk by chunk (no second full copy)."""
    block = a[rows, cols].astype(np.float64)
    out = np.empty(block.shape, dtype=np.float64)
    da.store(block, out, lock=False, scheduler="threads")
    if not np.isfinite(out).all():
        raise IncompleteKernel("the Gram matrix holds NaN/inf: some tiles are not computed yet")
    return out


def _device_fits(xp, n: int) -> int | None:
    """Bytes allowed for an in-core device factorisation (None on CPU)."""
    if xp is np:
        return None
    free, _ = xp.cuda.runtime.memGetInfo()
    return int(free * 0.4)  # the matrix, cuSOLVER's copy and workspace


def _cholesky_diag(xp, p, w: int, *, lam: float, c0: int, n: int):
    """Factor p[:w] (w, w) to its lower Cholesky factor (in place on CPU); return the panel holding it.
    Raises NotPositiveDefinite."""
    if xp is np:
        # p[:w] is C-ordered, so its transpose is Fortran-ordered: LAPACK's upper factor U of K = U^T U
        # written into p[:w].T is exactly L = U^T in p[:w]; in place, no copy.
        c, info = lapack.dpotrf(p[:w].T, lower=0, clean=1, overwrite_a=1)
        if info > 0:
            raise NotPositiveDefinite(lam=lam, row=c0 + info - 1, n=n)
        if not np.shares_memory(c, p):
            p[:w] = c.T
        return p
    import cupyx

    try:
        with cupyx.errstate(linalg="raise"):  # CuPy's default is to ignore cuSOLVER's info
            lkk = xp.linalg.cholesky(p[:w])
    except np.linalg.LinAlgError:
        raise NotPositiveDefinite(lam=lam, row=-1, n=n) from None
    bad = xp.flatnonzero(~xp.isfinite(xp.diagonal(lkk)))
    if bad.size:
        raise NotPositiveDefinite(lam=lam, row=c0 + int(bad[0]), n=n)
    if p.shape[0] == w:
        return lkk  # in core: no third n x n copy on the device
    p[:w] = lkk
    return p


def _solve_below(xp, p, w: int) -> None:
    """p[w:] <- p[w:] · L_kk^-T with L_kk = p[:w] (in place on CPU)."""
    if p.shape[0] == w:
        return
    if xp is np:
        # (B L^-T)^T = L^-1 B^T; p[:w].T is L^T Fortran-ordered, p[w:].T is B^T Fortran-ordered
        x = blas.dtrsm(1.0, p[:w].T, p[w:].T, side=0, lower=0, trans_a=1, overwrite_b=1)
        if not np.shares_memory(x, p):
            p[w:] = x.T
        return
    from cupyx.scipy.linalg import solve_triangular as dev_solve_triangular
    p[w:] = dev_solve_triangular(p[:w], p[w:].T, lower=True).T


def _subtract_outer(xp, p, lrows) -> None:
    """p -= lrows · lrows[:w]^T, with lrows = L[c0:, panel j] (in place on CPU)."""
    w = p.shape[1]
    if xp is np:
        c = blas.dgemm(-1.0, lrows[:w].T, lrows.T, beta=1.0, c=p.T, trans_a=1, overwrite_c=1)
        if not np.shares_memory(c, p):
            p[...] = c.T
        return
    p -= lrows @ lrows[:w].T


def cholesky_blocked(a: da.Array, *, shift: float = 0.0, lam: float = 0.0, device: str = "cpu",
                     memory_budget: int = DEFAULT_MEMORY_BUDGET, panel_width: int | None = None,
                     scratch_dir: str | Path | None = None, progress: Progress | None = None,
                     label: str = "") -> CholeskyFactor:
    """Lower Cholesky factor of a + shift·I (the module docstring says how, and in how much memory).

    a: (n, n) symmetric dask array, any float dtype, chunks = store tiles (only a[c0:, c0:c1], the lower
    part, is read). shift: added to the diagonal (lam is only used in error messages). progress: called with
    one line per finished panel when there is more than one ('label' starts it).
    Raises NotPositiveDefinite (with the failing row) and IncompleteKernel (NaN tiles).
    """
    n = a.shape[0]
    if a.shape != (n, n):
        raise ValueError(f"expected a square matrix, got shape {a.shape}")
    xp = array_module(device)
    plan = plan_factor(n, chunk=a.chunks[0][0], memory_budget=memory_budget, panel_width=panel_width,
                       device_bytes=_device_fits(xp, n))
    factor = CholeskyFactor(n=n, bounds=plan.bounds, xp=xp)
    if plan.on_disk:
        factor.scratch = make_scratch(scratch_dir)
    started = time.monotonic()
    try:
        for k, (c0, c1) in enumerate(plan.bounds):
            w = c1 - c0
            p = xp.asarray(read_block(a, slice(c0, n), slice(c0, c1)))
            p[xp.arange(w), xp.arange(w)] += shift
            for (d0, _), lj in zip(plan.bounds[:k], factor.panels):
                _subtract_outer(xp, p, xp.asarray(lj[c0 - d0:]))
                _release(lj)
            p = _cholesky_diag(xp, p, w, lam=lam, c0=c0, n=n)
            _solve_below(xp, p, w)
            factor.panels.append(_keep(p, factor, k))
            del p
            if progress is not None and len(plan.bounds) > 1:
                elapsed, done = time.monotonic() - started, work_done(c1, n)
                eta = elapsed * (1 - done) / done if done > 0 else 0.0
                progress(f"{label}Cholesky {c1:,}/{n:,} columns, panel {k + 1}/{len(plan.bounds)} "
                         f"({100 * done:.0f}% of the work), {_duration(elapsed)} elapsed, ETA {_duration(eta)}")
    except BaseException:
        factor.close()
        raise
    return factor


def _keep(p, factor: CholeskyFactor, k: int):
    """Where a finished panel lives: on the device (single panel), in RAM, or in a scratch memmap."""
    xp = factor.xp
    if len(factor.bounds) == 1:
        return p
    host = p if xp is np else xp.asnumpy(p)
    if factor.scratch is None:
        return host
    mm = np.lib.format.open_memmap(factor.scratch / f"panel-{k}.npy", mode="w+", dtype=np.float64,
                                   shape=host.shape)
    mm[...] = host
    mm.flush()
    _release(mm)
    return mm


def cho_solve_blocked(factor: CholeskyFactor, b: np.ndarray) -> np.ndarray:
    """x = (L L^T)^-1 b. b: (n, m) float64 host array. Returns (n, m) float64 host array."""
    return prefix_solves(factor, b, [factor.n])[factor.n]


def prefix_solves(factor: CholeskyFactor, b: np.ndarray, sizes) -> dict[int, np.ndarray]:
    """x_s = (L_s L_s^T)^-1 b[:s] for every s in sizes, with L_s = L[:s, :s] (the factor of K[:s, :s] + shift·I:
    the leading block of a Cholesky factor is the factor of the leading block), reading each panel twice in all.

    b: (n, m) float64 host array; sizes: ints in 1..n. Returns {s: (s, m) float64 host array}. Forward, one pass
    for all sizes: L y = b, since y[:s] solves L_s y_s = b[:s]. Backward, one pass in reverse panel order, every
    size at once: L_s^T x_s = y[:s], each size using the part of the panel above its row s.
    """
    xp = factor.xp
    y = xp.asarray(np.array(b, dtype=np.float64))
    if factor.n != y.shape[0]:
        raise ValueError(f"right-hand side has {y.shape[0]} rows, factor has {factor.n}")
    sizes = sorted({int(s) for s in sizes})
    if sizes and not 1 <= sizes[0] <= sizes[-1] <= factor.n:
        raise ValueError(f"sizes must lie in 1..{factor.n}, got {sizes}")
    tri = solve_triangular if xp is np else __import__("cupyx.scipy.linalg", fromlist=["x"]).solve_triangular
    for (c0, c1), panel in zip(factor.bounds, factor.panels):         # forward: L y = b
        lk = xp.asarray(panel)
        w = c1 - c0
        y[c0:c1] = tri(lk[:w], y[c0:c1], lower=True)
        y[c1:] -= lk[w:] @ y[c0:c1]
        _release(panel)
    x = {s: y[:s].copy() for s in sizes}
    for (c0, c1), panel in reversed(list(zip(factor.bounds, factor.panels))):   # backward: L_s^T x_s = y[:s]
        lk = xp.asarray(panel)
        for s in (s for s in sizes if s > c0):
            w = min(c1, s) - c0                  # the panel's columns inside the leading s x s block
            xs = x[s]
            xs[c0:c0 + w] -= lk[w:s - c0, :w].T @ xs[c0 + w:s]
            xs[c0:c0 + w] = tri(lk[:w, :w], xs[c0:c0 + w], lower=True, trans="T")
        _release(panel)
    return {s: (v if xp is np else xp.asnumpy(v)) for s, v in x.items()}


def mean_diagonal(a: da.Array) -> float:
    """mean(diag(a)) in float64: the unit of the ridge lam·mean(diag)·I."""
    return float(da.diagonal(a).astype(np.float64).mean().compute(scheduler="threads"))
