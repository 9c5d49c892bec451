"""The package's vocabulary, defined once: kinds, architectures, backends, LAP limits, GPU detection and the grammar
of kernel keys and Gram array names. The module uses the standard library only: importing it (with the package's
__init__, NumPy) loads no numba, Dask, Zarr, CuPy or PyTorch.

Kernel keys (docs/ARCHITECTURE.md, docs/enhanced.md, docs/rf.md), one `KernelKey` each:

    {kind}-{arch}            exact kernel, e.g. "ntk-vanilla", "nngp-gap", "ntk-fc"
    {kind}-lap{c}            LAP(c) readout of the GAP recursion, e.g. "ntk-lap4" (arch "gap", lap 4)
    ...-flip                 the flip-averaged copy of either, e.g. "ntk-gap-flip", "nngp-lap4-flip"
    rf-{kind}-{arch}         random-features kernel (arch in RF_ARCHS), e.g. "rf-ntk-gap"

kind in KINDS, arch in ARCHS, c an integer >= 0 written without leading zeros. `KernelKey.parse` is the only place
that takes a key string apart and `str(KernelKey)` the only place that writes one.

Gram array names (the store's arrays, docs/ARCHITECTURE.md "Store"): "gram/{key}/depth-{D}" for an exact key,
"gram/{key}/depth-{D}/draw-{R}" for a random-features key and its draw R; `array_name` writes them,
`parse_array_name` reads them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import NamedTuple

KINDS = ("ntk", "nngp")
ARCHS = ("vanilla", "gap", "fc")
RF_ARCHS = ("vanilla", "gap")        # the architectures that have a finite random network (workers.rf_net)
LAP_ARCH = "gap"                     # LAP(c) is a readout of the GAP recursion
BACKENDS = ("cpu", "gpu")            # the backend modules cntk_gram.workers.cpu / .gpu
BACKEND_CHOICES = ("auto",) + BACKENDS   # what a config or option may say; "auto" resolves to one of BACKENDS
MAX_LAP = 8                          # LAP sizes per pass: the GPU kernel's limit (LAP_COUNT <= 8 in cntk_tile.cu,
                                     # shared memory), kept for every backend so a store resumes on either

FLIP_SUFFIX = "-flip"
RF_PREFIX = "rf-"
KEY_GRAMMAR = ("{kind}-{arch} or {kind}-lap{c}, either optionally followed by -flip, or rf-{kind}-{rf_arch}; "
               f"kind: {', '.join(KINDS)}; arch: {', '.join(ARCHS)}; rf_arch: {', '.join(RF_ARCHS)}; "
               "c: an integer >= 0 (e.g. ntk-gap, nngp-lap4-flip, rf-ntk-vanilla)")
_NUMBER = r"0|[1-9][0-9]*"
_KEY = re.compile(rf"(?P<rf>{RF_PREFIX})?(?P<kind>[a-z]+)-(?:lap(?P<lap>{_NUMBER})|(?P<arch>[a-z]+))"
                  rf"(?P<flip>{FLIP_SUFFIX})?")


# --- GPU detection -----------------------------------------------------------------------------------------------

def gpu_unavailable_reason() -> str | None:
    """None when CuPy imports and sees at least one CUDA device, else why not (one line)."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CuPy build that fails to load its CUDA libraries
        return f"cupy not importable ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver, ...
        return f"no CUDA device usable ({type(exc).__name__}: {exc})"
    return None if count > 0 else "no CUDA device present"


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    return gpu_unavailable_reason() is None


# --- kernel keys -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelKey:
    """One kernel key, e.g. KernelKey("ntk", "gap", lap=4, flip=True) <-> "ntk-lap4-flip".

    kind: "ntk" or "nngp"; arch: the architecture whose recursion computes it ("gap" for a LAP readout);
    lap: c of a LAP(c) readout, else None; flip: the flip-averaged kernel; rf: a random-features kernel (its draw is
    not part of the key: it is part of the array name). Invalid combinations raise ValueError.
    """
    kind: str
    arch: str
    lap: int | None = None
    flip: bool = False
    rf: bool = False

    def __post_init__(self):
        problem = None
        if self.kind not in KINDS:
            problem = f"kind {self.kind!r} is not one of {', '.join(KINDS)}"
        elif self.arch not in ARCHS:
            problem = f"arch {self.arch!r} is not one of {', '.join(ARCHS)}"
        elif self.lap is not None and (isinstance(self.lap, bool) or not isinstance(self.lap, int) or self.lap < 0):
            problem = f"lap must be an integer >= 0 or None, got {self.lap!r}"
        elif self.lap is not None and self.arch != LAP_ARCH:
            problem = f"LAP is a readout of the {LAP_ARCH} recursion, not of {self.arch!r}"
        elif not isinstance(self.flip, bool) or not isinstance(self.rf, bool):
            problem = f"flip and rf must be True or False, got {self.flip!r}, {self.rf!r}"
        elif self.rf and (self.arch not in RF_ARCHS or self.lap is not None or self.flip):
            problem = f"a random-features key is rf-{{kind}}-{{arch}} with arch in {', '.join(RF_ARCHS)}"
        if problem:
            raise ValueError(f"invalid kernel key: {problem}; allowed keys: {KEY_GRAMMAR}")

    @classmethod
    def parse(cls, text: str) -> KernelKey:
        """'nngp-lap4-flip' -> KernelKey('nngp', 'gap', lap=4, flip=True). ValueError naming the grammar otherwise."""
        match = _KEY.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"not a kernel key: {text!r}; allowed keys: {KEY_GRAMMAR}")
        lap = match["lap"]
        try:
            return cls(kind=match["kind"], arch=LAP_ARCH if lap is not None else match["arch"],
                       lap=None if lap is None else int(lap), flip=match["flip"] is not None,
                       rf=match["rf"] is not None)
        except ValueError:
            raise ValueError(f"not a kernel key: {text!r}; allowed keys: {KEY_GRAMMAR}") from None

    def __str__(self) -> str:
        body = f"{self.kind}-" + (self.arch if self.lap is None else f"lap{self.lap}")
        return (RF_PREFIX if self.rf else "") + body + (FLIP_SUFFIX if self.flip else "")

    def flipped(self) -> KernelKey:
        """The flip-averaged counterpart of this key."""
        return replace(self, flip=True)

    def unflipped(self) -> KernelKey:
        """The plain key this flip-averaged key averages (itself when not flipped)."""
        return replace(self, flip=False)

    def rf_twin(self) -> KernelKey | None:
        """The random-features kernel that estimates this exact one (same kind and arch), None where there is none
        (LAP, flip, fc, or already a random-features key)."""
        if self.rf or self.flip or self.lap is not None or self.arch not in RF_ARCHS:
            return None
        return replace(self, rf=True)


def output_keys(archs, lap=(), flip: bool = False, kinds=KINDS) -> list[str]:
    """Keys a tile call returns, in order: per arch both kinds ('{kind}-{arch}'), then per c both kinds
    ('{kind}-lap{c}'), then the flip-averaged copies of all of them; only those of `kinds`."""
    plain = [KernelKey(kind, arch) for arch in archs for kind in KINDS if kind in kinds]
    plain += [KernelKey(kind, LAP_ARCH, lap=int(c)) for c in lap for kind in KINDS if kind in kinds]
    return [str(key) for key in plain + ([key.flipped() for key in plain] if flip else [])]


def rf_keys(archs, kinds=KINDS) -> list[str]:
    """Random-features keys 'rf-{kind}-{arch}', arch-major, for the archs of RF_ARCHS among `archs`."""
    return [str(KernelKey(kind, arch, rf=True)) for arch in archs if arch in RF_ARCHS for kind in KINDS
            if kind in kinds]


# --- Gram array names --------------------------------------------------------------------------------------------

class ArrayName(NamedTuple):
    """A Gram array's key, depth and random-features draw (None for the exact kernels)."""
    key: str
    depth: int
    draw: int | None = None


_ARRAY = re.compile(rf"gram/(?P<key>[^/]+)/depth-(?P<depth>{_NUMBER})(?:/draw-(?P<draw>{_NUMBER}))?")


def array_name(key, depth: int, draw: int | None = None) -> str:
    """'ntk-gap', 11 -> 'gram/ntk-gap/depth-11'; 'rf-ntk-gap', 11, 0 -> 'gram/rf-ntk-gap/depth-11/draw-0';
    'ntk-lap4-flip', 11 -> 'gram/ntk-lap4-flip/depth-11'. key: a key string or a KernelKey (not checked here: a
    name asked for by a user is looked up, and reported missing, as it is). The inverse is parse_array_name."""
    return f"gram/{key}/depth-{depth}" + ("" if draw is None else f"/draw-{draw}")


def parse_array_name(name: str) -> ArrayName:
    """'gram/ntk-gap/depth-11' -> ('ntk-gap', 11, None); 'gram/rf-ntk-gap/depth-3/draw-2' -> ('rf-ntk-gap', 3, 2);
    'gram/ntk-lap4-flip/depth-11' -> ('ntk-lap4-flip', 11, None); ValueError for any other name (a random-features
    key needs its draw, an exact key has none)."""
    match = _ARRAY.fullmatch(name) if isinstance(name, str) else None
    try:
        key = KernelKey.parse(match["key"]) if match else None
    except ValueError:
        key = None
    if key is None or key.rf != (match["draw"] is not None):
        raise ValueError(f"not a Gram array name: {name!r} (expected gram/{{key}}/depth-{{D}}, key e.g. ntk-gap, "
                         f"ntk-lap4, ntk-gap-flip, or gram/rf-{{kind}}-{{arch}}/depth-{{D}}/draw-{{R}}; "
                         f"keys: {KEY_GRAMMAR})")
    draw = match["draw"]
    return ArrayName(match["key"], int(match["depth"]), None if draw is None else int(draw))
