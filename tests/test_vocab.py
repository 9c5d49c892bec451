"""The vocabulary module (cntk_gram.workers.vocab): one definition of kinds, archs, backends, LAP limit, GPU detection,
flip averaging's key, and the grammar of kernel keys and Gram array names, round-tripping every key the package makes."""
import itertools
import json
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cntk_gram.pipeline import config as config_module
from cntk_gram.pipeline.config import build_config
from cntk_gram.pipeline.errors import UserError
from cntk_gram.pipeline.paper import COLUMNS
from cntk_gram.pipeline.store import planned_arrays
from cntk_gram.workers import backends, vocab
from cntk_gram.workers.cpu import tile_kernels
from cntk_gram.workers.enhanced import flip_average
from cntk_gram.workers.reference import cntk_reference
from cntk_gram.workers.vocab import (ARCHS, BACKEND_CHOICES, BACKENDS, KINDS, RF_ARCHS, ArrayName, KernelKey,
                                     array_name, output_keys, parse_array_name, rf_keys)


def every_produced_key() -> set[str]:
    """Every key the package's key makers produce: tile-call keys over all arch subsets, LAP sets, flip and kinds, the
    random-features keys, the config's keys and the paper's columns."""
    keys = set()
    subsets = lambda items: (c for r in range(1, len(items) + 1) for c in itertools.combinations(items, r))
    for archs, kinds, lap, flip in itertools.product(subsets(ARCHS), subsets(KINDS), [(), (0,), (2, 4, 8), (16,)],
                                                     [False, True]):
        keys |= set(output_keys(archs, lap, flip, kinds))
        keys |= set(rf_keys(archs, kinds))
    config = build_config({"kernel": {"archs": list(ARCHS), "lap": [0, 4, 8], "flip": True}})
    return keys | set(config.kernel.keys) | set(config.kernel.rf_keys) | {c.kernel for c in COLUMNS}


def test_every_produced_key_round_trips():
    keys = every_produced_key()
    assert {"ntk-vanilla", "nngp-gap", "ntk-fc-flip", "ntk-lap4", "nngp-lap4-flip", "ntk-gap-flip", "rf-ntk-gap",
            "rf-nngp-vanilla", "ntk-lap0"} <= keys
    for key in keys:
        parsed = KernelKey.parse(key)
        assert str(parsed) == key and KernelKey.parse(str(parsed)) == parsed
    assert KernelKey.parse("nngp-lap4-flip") == KernelKey("nngp", "gap", lap=4, flip=True)
    assert KernelKey.parse("rf-ntk-vanilla") == KernelKey("ntk", "vanilla", rf=True)
    assert KernelKey.parse("ntk-gap-flip").unflipped() == KernelKey("ntk", "gap")
    assert str(KernelKey("nngp", "fc").flipped()) == "nngp-fc-flip"
    assert KernelKey.parse("ntk-gap").rf_twin() == KernelKey.parse("rf-ntk-gap")
    assert [KernelKey.parse(k).rf_twin() for k in ("ntk-fc", "ntk-lap4", "ntk-gap-flip", "rf-ntk-gap")] == [None] * 4


def test_keys_of_the_backends_and_the_oracle_are_in_the_grammar(rng):
    x = rng.normal(size=(2, 4, 4, 3))
    made = tile_kernels(x, archs=ARCHS, max_depth=3, lap=(1, 2), flip=True, dtype=np.float64)
    assert list(made) == output_keys(ARCHS, (1, 2), True)
    oracle = cntk_reference(x, max_depth=3, archs=("vanilla", "gap"), lap=(1,), flip=True)
    assert list(oracle) == output_keys(("vanilla", "gap"), (1,), True)
    for key in [*made, *oracle]:
        assert str(KernelKey.parse(key)) == key


def test_output_keys_order_and_kinds():
    assert output_keys(("vanilla", "gap"), (4, 8), True, ("ntk",)) == [
        "ntk-vanilla", "ntk-gap", "ntk-lap4", "ntk-lap8", "ntk-vanilla-flip", "ntk-gap-flip", "ntk-lap4-flip",
        "ntk-lap8-flip"]
    assert output_keys(("gap",), (2,)) == ["ntk-gap", "nngp-gap", "ntk-lap2", "nngp-lap2"]
    assert rf_keys(("vanilla", "gap", "fc"), ("nngp",)) == ["rf-nngp-vanilla", "rf-nngp-gap"]


BAD_KEYS = ["", "ntk", "ntk-", "-gap", "foo-gap", "ntk-bar", "ntk-lap", "ntk-lap04", "ntk-lap-1", "ntk-lapx",
            "ntk-vanilla-lap4", "ntk-lap4-gap", "rf-ntk-fc", "rf-ntk-lap4", "rf-ntk-gap-flip", "rf-rf-ntk-gap",
            "ntk-gap-flip-flip", "ntk-gap-flipped", "NTK-gap", "ntk_gap", " ntk-gap", "ntk-gap ", "ntk-gap\n",
            "flip-ntk-gap", "ntk-gap/depth-3", None, 3]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_bad_keys_are_rejected_naming_the_grammar(bad):
    with pytest.raises(ValueError, match=r"not a kernel key") as info:
        KernelKey.parse(bad)
    message = str(info.value)
    assert "{kind}-{arch}" in message and "{kind}-lap{c}" in message and "-flip" in message
    assert "rf-{kind}-{rf_arch}" in message and "vanilla, gap, fc" in message and "ntk, nngp" in message


@pytest.mark.parametrize("fields", [dict(kind="ntk", arch="vanilla", lap=2), dict(kind="ntkk", arch="gap"),
                                    dict(kind="ntk", arch="cnn"), dict(kind="ntk", arch="gap", lap=-1),
                                    dict(kind="ntk", arch="gap", lap=True), dict(kind="ntk", arch="fc", rf=True),
                                    dict(kind="ntk", arch="gap", rf=True, flip=True),
                                    dict(kind="ntk", arch="gap", lap=2, rf=True), dict(kind="ntk", arch="gap", flip=1)])
def test_invalid_key_fields_are_rejected(fields):
    with pytest.raises(ValueError, match="invalid kernel key"):
        KernelKey(**fields)


key_strategy = st.builds(
    lambda kind, arch, lap, flip, rf: KernelKey(kind, "gap" if lap is not None else arch, lap=lap, flip=flip and not rf,
                                                rf=rf and lap is None and arch in RF_ARCHS),
    st.sampled_from(KINDS), st.sampled_from(ARCHS), st.none() | st.integers(0, 10**6), st.booleans(), st.booleans())


@settings(max_examples=300, deadline=None)
@given(key_strategy)
def test_format_then_parse_is_the_identity(key):
    assert KernelKey.parse(str(key)) == key


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["ntk", "nngp", "rf", "gap", "vanilla", "fc", "lap", "lap4", "lap04", "flip", "x",
                                 "4", "-", ""]), max_size=6).map("-".join))
def test_parse_accepts_exactly_the_canonical_spellings(text):
    try:
        key = KernelKey.parse(text)
    except ValueError:
        return
    assert str(key) == text


def test_array_names_round_trip_and_follow_the_key_grammar():
    config = build_config({"kernel": {"archs": ["vanilla", "gap", "fc"], "depths": [2, 11], "lap": [4],
                                      "flip": True}})
    for name in planned_arrays(config):
        assert array_name(*parse_array_name(name)) == name
    assert parse_array_name("gram/rf-ntk-gap/depth-11/draw-0") == ArrayName("rf-ntk-gap", 11, 0)
    assert array_name(KernelKey("ntk", "gap", lap=4), 3) == "gram/ntk-lap4/depth-3"
    for bad in ("gram/ntk-cnn/depth-3", "gram/rf-ntk-gap/depth-3", "gram/ntk-gap/depth-3/draw-0",
                "gram/ntk-gap/depth-03", "gram/ntk-gap/depth-3/", "gram//depth-3", "ntk-gap/depth-3"):
        with pytest.raises(ValueError, match="not a Gram array name"):
            parse_array_name(bad)


def test_one_definition_of_each_name():
    """The other modules use the vocabulary's objects, not copies of them."""
    from cntk_gram.workers import rf, validate

    assert BACKEND_CHOICES == ("auto",) + BACKENDS and BACKENDS == ("cpu", "gpu")
    assert (config_module.ARCHS, config_module.KINDS, config_module.RF_ARCHS) == (ARCHS, KINDS, RF_ARCHS)
    assert config_module.ARCHS is validate.ARCHS is vocab.ARCHS and config_module.KINDS is validate.KINDS
    assert rf.RF_ARCHS is RF_ARCHS and rf.KINDS is KINDS and config_module.MAX_LAP is vocab.MAX_LAP
    assert backends.gpu_available is vocab.gpu_available
    with pytest.raises(UserError, match="allowed: auto, cpu, gpu"):
        build_config({"backend": "tpu"})
    with pytest.raises(ValueError, match="allowed: auto, cpu, gpu"):
        backends.resolve_backend("tpu")


def test_the_vocabulary_imports_without_numba_dask_or_zarr():
    probe = ("import json, sys; import cntk_gram.workers.vocab; "
             "print(json.dumps(sorted(m for m in ('numba', 'dask', 'distributed', 'zarr', 'cupy', 'torch') "
             "if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def _fake_cupy(count):
    def device_count():
        if isinstance(count, Exception):
            raise count
        return count
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=device_count)))


def test_one_gpu_detection_for_backends_and_solve(monkeypatch):
    from cntk_gram.pipeline import solve

    monkeypatch.setitem(sys.modules, "cupy", None)   # no CuPy
    assert vocab.gpu_unavailable_reason().startswith("cupy not importable")
    assert not vocab.gpu_available() and backends.resolve_backend("auto") == "cpu"
    assert solve.array_module("auto") is np
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(RuntimeError("no driver")))
    assert vocab.gpu_unavailable_reason() == "no CUDA device usable (RuntimeError: no driver)"
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(0))
    assert vocab.gpu_unavailable_reason() == "no CUDA device present"
    with pytest.raises(RuntimeError, match="no CUDA device is usable"):
        backends.resolve_backend("gpu")
    fake = _fake_cupy(2)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert vocab.gpu_unavailable_reason() is None and vocab.gpu_available()
    assert backends.resolve_backend("auto") == "gpu" and solve.array_module("auto") is fake


def test_flip_average_sums_in_float64(rng):
    plain = rng.normal(size=(2, 3, 3)).astype(np.float32)
    mirrored = rng.normal(size=(2, 3, 3)).astype(np.float32)
    got = flip_average(plain, mirrored)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ((plain.astype(np.float64) + mirrored) / 2).astype(np.float32))
    assert flip_average(plain.astype(np.float64), mirrored, np.float64).dtype == np.float64
