"""The campaign's rate model: how many seconds each stage and each kernel run is predicted to take, from the
instruction-count predictions of docs/gpu.md ("Campaign stage times") until the `kernels` stage has measured the
tile kernels on the device, then from those measured rates.

A stage starts only when its prediction fits the seconds left; a kernel run is capped to the paper depths whose
single pass (one pass yields every smaller depth) fits."""
from __future__ import annotations

TABLE_DEPTHS = (3, 4, 6, 11, 21)
REHEARSE_DEPTHS = (3, 4)
RATE_DEPTH = 21          # the kernels stage's rates are pairs/s of depth-21 launches (20 layers)

# Predicted rates on one H100/H200: GAP at 50% of the issue limit (3.35e13 lane-instructions/s / 50 per
# entry-layer / 2) and vanilla end to end (the copy of each tile's result to the host and the store writes, not the
# kernel, set its pace: ~1e7 pairs/s at depth 21, docs/gpu.md "Host side").
GAP_ENTRY_LAYERS_PER_S = 3.3e11
GAP_ENTRIES_PER_PAIR = 32 ** 4
VANILLA_PAIRS_PER_S_DEPTH21 = 1.0e7
RUN_START_S = 15         # a `cntk run`'s start: the embedded cluster, the worker's module compile, the store
# Whole-stage predictions (seconds). tests: the GPU tests' float64 reference calls cost ~80 s single-threaded, plus
# the NVRTC compile (~10 s); kernels: bench_gpu.py at depths 3/6/11/21 beside the baseline (docs/gpu.md).
PREDICT_S = {"env": 5, "kernels": 150, "tests": 90}
TESTS_CAP_S = 120        # the tests stage never gets more than this, so the table stages keep their time
# A validated solve per depth on the GPU (50,000 train): the store read, the fit / validation gather and 8
# Cholesky factorisations (lam = 0 and the 7 of the grid) of ~45,000^2.
VALIDATE_S_PER_DEPTH = 40
SOLVE_RESERVE_S = 90     # seconds kept after a kernel run for its lam = 0 solve
# The same on the CPU rehearsal (tiny sizes): fixed seconds per stage and per run.
REHEARSE_PREDICT_S = {"env": 2, "kernels": 30, "tests": 30}
REHEARSE_RUN_S = 30
REHEARSE_VALIDATE_S_PER_DEPTH = 3
REHEARSE_SOLVE_RESERVE_S = 30


def pairs_of(n_train: int, n_test: int) -> int:
    """Kernel pairs of a run: the train x train upper triangle (diagonal included) and train x test."""
    return n_train * (n_train + 1) // 2 + n_train * n_test


def rates_from_kernels(report: dict) -> dict[str, float]:
    """{arch: fused pairs/s at depth 21} from bench_gpu.py's JSON report (its `results` rows)."""
    return {row["arch"]: float(row["fused_pairs_per_s"]) for row in report.get("results", [])
            if row["depth"] == RATE_DEPTH}


class RateModel:
    """Predictions from `measured` ({arch: pairs/s at depth 21}, empty until the kernels stage ran). rehearse: the
    CPU rehearsal's fixed seconds instead."""

    def __init__(self, measured: dict[str, float] | None = None, *, rehearse: bool = False):
        self.measured = dict(measured or {})
        self.rehearse = rehearse

    @property
    def depths(self) -> tuple[int, ...]:
        return REHEARSE_DEPTHS if self.rehearse else TABLE_DEPTHS

    @property
    def solve_reserve_s(self) -> float:
        return REHEARSE_SOLVE_RESERVE_S if self.rehearse else SOLVE_RESERVE_S

    def pair_layers_per_s(self, arch: str) -> float:
        """Kernel pairs times layers per second of a whole `cntk run`."""
        if arch == "gap":
            pairs_per_s = self.measured.get("gap", GAP_ENTRY_LAYERS_PER_S / (GAP_ENTRIES_PER_PAIR * (RATE_DEPTH - 1)))
        else:   # the kernels stage's rate is kernel-only; end to end the host side caps it
            pairs_per_s = min(self.measured.get("vanilla", VANILLA_PAIRS_PER_S_DEPTH21), VANILLA_PAIRS_PER_S_DEPTH21)
        return pairs_per_s * (RATE_DEPTH - 1)

    def run_s(self, arch: str, pairs: int, depth: int) -> float:
        """Seconds of a kernel run of `pairs` pairs up to `depth` (one pass yields every smaller depth)."""
        if self.rehearse:
            return REHEARSE_RUN_S
        return RUN_START_S + pairs * (depth - 1) / self.pair_layers_per_s(arch)

    def depths_that_fit(self, arch: str, pairs: int, seconds: float) -> list[int]:
        """The paper depths up to the largest whose single pass fits in `seconds` ([] when not even the first)."""
        fits = [d for d in self.depths if self.run_s(arch, pairs, d) <= seconds]
        return [d for d in self.depths if fits and d <= max(fits)]

    def validate_s(self, n_depths: int) -> float:
        """Seconds of a validated solve: per depth, the lam = 0 fit again and one fit per lam of the grid."""
        return (REHEARSE_VALIDATE_S_PER_DEPTH if self.rehearse else VALIDATE_S_PER_DEPTH) * n_depths

    def stage_s(self, stage: str) -> float:
        """Seconds a whole non-table stage takes (env, kernels, tests)."""
        return (REHEARSE_PREDICT_S if self.rehearse else PREDICT_S)[stage]

    def first_run_s(self, arch: str, pairs: int, grace_s: float) -> float:
        """Seconds a table stage needs to be started: its first run at the smallest depth, its lam = 0 solve and
        the grace of an interrupted run."""
        return self.run_s(arch, pairs, self.depths[0]) + self.solve_reserve_s + grace_s
