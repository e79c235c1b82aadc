"""Masked per-task losses against Keras and NumPy references."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mtl_utils.losses import (
    MaskedLoss,
    classification_loss,
    depth_loss,
    loss_for,
    normal_loss,
    segmentation_loss,
)
from mtl_utils.tasks import Task

RNG = np.random.default_rng(0)


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _log_softmax(logits):
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_segmentation_loss_matches_keras_cross_entropy_with_ignore_class():
    y = RNG.integers(-1, 5, (3, 6, 7)).astype("int32")
    logits = RNG.normal(size=(3, 6, 7, 5)).astype("float32")
    ref = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)
    np.testing.assert_allclose(segmentation_loss(y, logits), ref(y, logits), rtol=1e-5)


def test_segmentation_loss_matches_numpy_mean_over_labelled_pixels():
    y = RNG.integers(-1, 4, (2, 5, 5))
    logits = RNG.normal(size=(2, 5, 5, 4)).astype("float32")
    nll = -np.take_along_axis(_log_softmax(logits), np.maximum(y, 0)[..., None], -1)
    mask = y >= 0
    expected = nll[..., 0][mask].mean()
    np.testing.assert_allclose(segmentation_loss(y, logits), expected, rtol=1e-5)


def test_depth_loss_is_l1_over_valid_pixels_only():
    y = RNG.uniform(0.5, 3.0, (2, 4, 4, 1)).astype("float32")
    y[0, :2] = 0.0  # invalid pixels
    pred = RNG.normal(size=(2, 4, 4, 1)).astype("float32")
    mask = y != 0
    expected = np.abs(pred - y)[mask].mean()
    np.testing.assert_allclose(depth_loss(y, pred), expected, rtol=1e-6)


def test_normal_loss_is_one_minus_cosine_over_valid_pixels():
    y = _unit(RNG.normal(size=(2, 4, 4, 3))).astype("float32")
    y[1, 1:3] = 0.0
    pred = RNG.normal(size=(2, 4, 4, 3)).astype("float32") * 5.0
    valid = np.any(y != 0, axis=-1)
    cos = (_unit(pred) * y).sum(-1)
    np.testing.assert_allclose(normal_loss(y, pred), (1 - cos)[valid].mean(), rtol=1e-5)


def test_normal_loss_ignores_prediction_length():
    y = _unit(RNG.normal(size=(1, 3, 3, 3))).astype("float32")
    pred = RNG.normal(size=(1, 3, 3, 3)).astype("float32")
    np.testing.assert_allclose(
        normal_loss(y, pred), normal_loss(y, 7.0 * pred), rtol=1e-5
    )


def test_normal_loss_is_zero_for_exact_and_two_for_opposite_normals():
    y = _unit(RNG.normal(size=(1, 2, 2, 3))).astype("float32")
    np.testing.assert_allclose(normal_loss(y, 3.0 * y), 0.0, atol=1e-6)
    np.testing.assert_allclose(normal_loss(y, -y), 2.0, atol=1e-6)


def test_classification_loss_matches_keras_on_labelled_samples():
    y = np.array([2, -1, 0, 4, -1], "int32")
    logits = RNG.normal(size=(5, 6)).astype("float32")
    keep = y >= 0
    ref = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    np.testing.assert_allclose(
        classification_loss(y, logits), ref(y[keep], logits[keep]), rtol=1e-5
    )


def _dense_case(kind):
    if kind == "segmentation":
        return np.full((2, 4, 4), -1, "int32"), RNG.normal(size=(2, 4, 4, 5))
    if kind == "depth":
        return np.zeros((2, 4, 4, 1), "float32"), RNG.normal(size=(2, 4, 4, 1))
    if kind == "normal":
        return np.zeros((2, 4, 4, 3), "float32"), np.zeros((2, 4, 4, 3))
    return np.full((2,), -1, "int32"), RNG.normal(size=(2, 5))


@pytest.mark.parametrize("kind", ["segmentation", "depth", "normal", "classification"])
def test_unlabelled_batch_gives_zero_loss_and_zero_gradient(kind):
    y, pred = _dense_case(kind)
    channels = pred.shape[-1]
    fn = loss_for(Task(kind, kind, channels))
    pred = tf.Variable(pred.astype("float32"))
    with tf.GradientTape() as tape:
        value = fn(y, pred)
    grad = tape.gradient(value, pred)
    assert float(value) == 0.0
    assert np.all(np.isfinite(grad.numpy()))
    assert np.all(grad.numpy() == 0.0)


def test_sample_without_label_contributes_nothing_to_loss_or_gradient():
    # Sample 1 lacks depth entirely; the loss must equal the loss of sample 0 alone.
    y = RNG.uniform(1, 2, (2, 3, 3, 1)).astype("float32")
    y[1] = 0.0
    pred = tf.Variable(RNG.normal(size=(2, 3, 3, 1)).astype("float32"))
    with tf.GradientTape() as tape:
        value = depth_loss(y, pred)
    grad = tape.gradient(value, pred).numpy()
    np.testing.assert_allclose(value, np.abs(pred.numpy()[0] - y[0]).mean(), rtol=1e-6)
    assert np.all(grad[1] == 0.0)


def test_losses_accept_float16_predictions():
    y = RNG.integers(0, 3, (1, 2, 2)).astype("int32")
    logits = RNG.normal(size=(1, 2, 2, 3))
    value = segmentation_loss(y, logits.astype("float16"))
    assert value.dtype == tf.float32
    np.testing.assert_allclose(value, segmentation_loss(y, logits), rtol=1e-2)


@pytest.mark.parametrize(
    "fn, y_shape, pred_shape, match",
    [
        (
            segmentation_loss,
            (2, 8, 8, 1),
            (2, 8, 8, 5),
            r"segmentation target .*\(B, H, W\)",
        ),
        (
            segmentation_loss,
            (2, 8, 8),
            (2, 8, 4, 5),
            r"batch and spatial sizes must match",
        ),
        (
            segmentation_loss,
            (2, 8, 8),
            (2, 8, 8),
            r"segmentation prediction .*\(B, H, W, C\)",
        ),
        (
            depth_loss,
            (8, 64, 64),
            (8, 64, 64, 1),
            r"depth target has shape \(8, 64, 64\)",
        ),
        (depth_loss, (2, 4, 4, 3), (2, 4, 4, 3), r"expected \(B, H, W, 1\)"),
        (
            normal_loss,
            (2, 4, 4, 3),
            (2, 4, 4, 1),
            r"normal prediction .*\(B, H, W, 3\)",
        ),
        (classification_loss, (4, 1), (4, 7), r"classification target .*\(B,\)"),
        (classification_loss, (3,), (4, 7), r"must match"),
    ],
)
def test_mismatched_shapes_raise_value_error_naming_shapes(
    fn, y_shape, pred_shape, match
):
    y = np.zeros(y_shape, "float32")
    pred = np.zeros(pred_shape, "float32")
    with pytest.raises(ValueError, match=match):
        fn(y, pred)


@pytest.mark.parametrize(
    "kind, channels, fn",
    [
        ("segmentation", 5, segmentation_loss),
        ("depth", 1, depth_loss),
        ("normal", 3, normal_loss),
        ("classification", 7, classification_loss),
    ],
)
def test_loss_for_returns_the_masked_loss_of_the_task_kind(kind, channels, fn):
    loss = loss_for(Task("t", kind, channels))
    assert isinstance(loss, MaskedLoss)
    assert loss._fn is fn


def test_loss_for_rejects_non_task():
    with pytest.raises(ValueError, match="Task"):
        loss_for("depth")


def test_labelled_count_counts_valid_pixels():
    y = np.zeros((2, 3, 3, 3), "float32")
    y[0, 0, 0] = (0.0, 0.0, 1.0)
    y[1, 2, 1] = (1.0, 0.0, 0.0)
    assert float(loss_for(Task("n", "normal", 3)).labelled_count(y)) == 2.0
