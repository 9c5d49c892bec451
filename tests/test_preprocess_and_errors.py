"""Preprocessing as the paper's protocol, and one clear error for each kind of bad input."""
import numpy as np
import pytest

from cntk_gram.workers import kernel_block
from cntk_gram.workers.cpu import tile_kernels
from cntk_gram.workers.preprocess import channel_stats, preprocess, targets
from cntk_gram.workers.reference import cntk_reference


def test_standardisation_uses_training_statistics(rng):
    train = rng.integers(0, 256, size=(50, 4, 4, 3), dtype=np.uint8)
    test = rng.integers(0, 256, size=(7, 4, 4, 3), dtype=np.uint8)
    mean, std = channel_stats(train)
    for c in range(3):
        pixels = train[..., c].astype(np.float64).ravel() / 255
        assert mean[c] == pytest.approx(pixels.mean(), rel=1e-12)
        assert std[c] == pytest.approx(pixels.std(), rel=1e-12)
    out = preprocess(test, mean, std)
    assert out.dtype == np.float32 and out.shape == test.shape
    np.testing.assert_allclose(out[..., 1], (test[..., 1] / 255 - mean[1]) / std[1], rtol=1e-6)
    z = preprocess(train, mean, std).astype(np.float64)
    np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0, atol=1e-6)
    np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1, atol=1e-5)


def test_targets_are_point_nine_and_minus_point_one():
    y = targets(np.array([3, 0, 9]))
    assert y.shape == (3, 10)
    assert y[0, 3] == 0.9 and y[1, 0] == 0.9 and y[2, 9] == 0.9
    assert np.sum(y == -0.1) == 27


@pytest.mark.parametrize("call, message", [
    (lambda x: tile_kernels(x[0], max_depth=3), "shape (N, height, width, channels)"),
    (lambda x: tile_kernels(np.where(x > 1, np.nan, x), max_depth=3), "non-finite"),
    (lambda x: tile_kernels(x, max_depth=1), "max_depth must be an integer >= 2"),
    (lambda x: tile_kernels(x, archs=("resnet",), max_depth=3), "unknown architecture"),
    (lambda x: tile_kernels(x, x[:, :3], max_depth=3), "differ in shape"),
    (lambda x: tile_kernels(x.astype(np.int32), max_depth=3), "floating point"),
    (lambda x: kernel_block(x, backend="tpu"), "unknown backend"),
    (lambda x: cntk_reference(x, max_depth=0), "max_depth"),
    (lambda x: targets(np.array([0, 10])), "labels must lie in [0, 10)"),
])
def test_bad_input_raises_one_clear_error(rng, call, message):
    x = rng.normal(size=(2, 4, 4, 3))
    with pytest.raises(ValueError, match=None) as err:
        call(x)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_public_api_matches_backend(rng):
    x = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
    a = kernel_block(x, archs=("vanilla",), max_depth=4, backend="cpu")
    b = tile_kernels(x, archs=("vanilla",), max_depth=4)
    np.testing.assert_array_equal(a["ntk-vanilla"], b["ntk-vanilla"])
