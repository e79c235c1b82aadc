"""Tests of mtl_utils.pooling: max pooling with indices and max unpooling.

References: loop-based NumPy re-implementations of PyTorch's ``max_pool2d(...,
return_indices=True)`` and ``max_unpool2d`` semantics (first maximum of a window
in row-major order; flat index ``row * W + col`` per plane), and TensorFlow's
``tf.nn.max_pool_with_argmax`` on inputs without ties.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from mtl_utils.pooling import MaxPoolingWithArgmax2D, MaxUnpooling2D


def numpy_pool(x, p=2):
    """Loop reference: pooled values and flat ``row * W + col`` indices."""
    b, height, width, c = x.shape
    rows, cols = height // p, width // p
    pooled = np.zeros((b, rows, cols, c), x.dtype)
    indices = np.zeros((b, rows, cols, c), np.int64)
    for n in range(b):
        for ch in range(c):
            for i in range(rows):
                for j in range(cols):
                    window = x[n, i * p : (i + 1) * p, j * p : (j + 1) * p, ch]
                    k = int(np.argmax(window))  # first maximum, row-major
                    pooled[n, i, j, ch] = window.flat[k]
                    indices[n, i, j, ch] = (i * p + k // p) * width + j * p + k % p
    return pooled, indices


def numpy_unpool(values, indices, size):
    """Loop reference: scatter every value to its flat index in a zero map."""
    b, _, _, c = values.shape
    out = np.zeros((b, size[0] * size[1], c), values.dtype)
    for n in range(b):
        for ch in range(c):
            out[n, indices[n, ..., ch].ravel(), ch] = values[n, ..., ch].ravel()
    return out.reshape(b, size[0], size[1], c)


@pytest.mark.parametrize(("height", "width"), [(6, 8), (7, 5), (5, 9)])
def test_pooling_matches_numpy_reference_with_ties_and_odd_sizes(height, width):
    # values in {0, 1, 2}: most windows hold their maximum more than once
    x = np.random.default_rng(0).integers(0, 3, (2, height, width, 3))
    x = x.astype("float32")
    pooled, indices = MaxPoolingWithArgmax2D()(x)
    want_pooled, want_indices = numpy_pool(x)
    assert indices.dtype == "int32"
    np.testing.assert_array_equal(np.asarray(pooled), want_pooled)
    np.testing.assert_array_equal(np.asarray(indices), want_indices)


def test_pool_size_three_matches_numpy_reference():
    x = np.random.default_rng(1).integers(0, 4, (1, 8, 7, 2)).astype("float32")
    pooled, indices = MaxPoolingWithArgmax2D(pool_size=3)(x)
    want_pooled, want_indices = numpy_pool(x, p=3)
    np.testing.assert_array_equal(np.asarray(pooled), want_pooled)
    np.testing.assert_array_equal(np.asarray(indices), want_indices)


def test_indices_match_tensorflow_max_pool_with_argmax_without_ties():
    x = np.random.default_rng(2).normal(size=(2, 8, 6, 3)).astype("float32")
    pooled, indices = MaxPoolingWithArgmax2D()(x)
    tf_pooled, tf_argmax = tf.nn.max_pool_with_argmax(x, 2, 2, "VALID")
    channels = x.shape[-1]
    # TensorFlow's index is (row * W + col) * C + c within one sample
    ours = np.asarray(indices) * channels + np.arange(channels)
    np.testing.assert_array_equal(ours, np.asarray(tf_argmax))
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(tf_pooled))


@pytest.mark.parametrize(("height", "width"), [(6, 8), (7, 5)])
def test_unpooling_matches_numpy_reference_with_ties_and_odd_sizes(height, width):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, (2, height, width, 3)).astype("float32")
    _, indices = MaxPoolingWithArgmax2D()(x)
    values = rng.normal(size=indices.shape).astype("float32")
    got = MaxUnpooling2D()(values, indices, output_size=(height, width))
    want = numpy_unpool(values, np.asarray(indices), (height, width))
    assert got.shape == x.shape
    np.testing.assert_array_equal(np.asarray(got), want)


def test_pooling_gradient_goes_to_the_recorded_maximum_only():
    """PyTorch's rule: d pooled / d x is the unpooling of the upstream gradient."""
    rng = np.random.default_rng(4)
    x = tf.constant(rng.integers(0, 3, (2, 7, 5, 2)).astype("float32"))
    upstream = rng.normal(size=(2, 3, 2, 2)).astype("float32")
    with tf.GradientTape() as tape:
        tape.watch(x)
        pooled, indices = MaxPoolingWithArgmax2D()(x)
        loss = tf.reduce_sum(pooled * upstream)
    want = numpy_unpool(upstream, np.asarray(indices), (7, 5))
    np.testing.assert_array_equal(np.asarray(tape.gradient(loss, x)), want)


def test_unpooling_in_a_functional_model_of_unknown_size_matches_reference():
    inputs = keras.Input((None, None, 4))
    pooled, indices = MaxPoolingWithArgmax2D()(inputs)
    model = keras.Model(inputs, MaxUnpooling2D()(pooled, indices))
    x = np.random.default_rng(5).normal(size=(2, 6, 10, 4)).astype("float32")
    want_pooled, want_indices = numpy_pool(x)
    want = numpy_unpool(want_pooled, want_indices, (6, 10))
    np.testing.assert_array_equal(np.asarray(model(x)), want)


def test_pooling_layers_reject_bad_arguments_naming_the_problem():
    with pytest.raises(ValueError, match="pool_size must be an integer >= 1"):
        MaxPoolingWithArgmax2D(pool_size=0)
    with pytest.raises(ValueError, match="expected \\(B, H, W, C\\)"):
        MaxPoolingWithArgmax2D()(np.zeros((4, 4, 3), "float32"))
    x = np.zeros((1, 3, 2, 1), "float32")
    indices = np.zeros((1, 3, 2, 1), "int32")
    with pytest.raises(ValueError, match="cannot have been pooled to 3"):
        MaxUnpooling2D()(x, indices, output_size=(8, 4))
    with pytest.raises(ValueError, match="expected the same shape"):
        MaxUnpooling2D()(x, np.zeros((1, 3, 3, 1), "int32"))
