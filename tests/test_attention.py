"""Tests for mtl_utils.attention: every result is held against a reference.

References: keras.layers.MultiHeadAttention with copied weights, keras.ops,
a per-row numpy implementation of attention, and numpy recomputations of the
MTAN attention module from its sublayers' weights.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import ops  # noqa: E402

from mtl_utils.attention import (  # noqa: E402
    CrossTaskAttention,
    MultiHeadAttention,
    TaskAttention,
    TaskQueryAttentionHead,
    mtan_attention_branch,
    scaled_dot_product_attention,
)

ATOL = 1e-5


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype("float32")


def _numpy_attention(q, k, v, mask=None, fully_masked="uniform"):
    """Row-by-row reference: softmax over the allowed keys only."""
    q, k, v = (np.asarray(a, dtype="float64") for a in (q, k, v))
    tq, tk = q.shape[-2], k.shape[-2]
    scores_shape = np.broadcast_shapes(q.shape[:-2], k.shape[:-2]) + (tq, tk)
    allowed = np.ones(scores_shape, bool)
    if mask is not None:
        allowed = np.broadcast_to(np.asarray(mask, bool), scores_shape)
    q = np.broadcast_to(q, scores_shape[:-1] + q.shape[-1:])
    k = np.broadcast_to(k, scores_shape[:-2] + k.shape[-2:])
    v = np.broadcast_to(v, scores_shape[:-2] + v.shape[-2:])
    weights = np.zeros(scores_shape)
    for idx in np.ndindex(*scores_shape[:-1]):
        batch = idx[:-1]
        keys = np.flatnonzero(allowed[idx])
        if keys.size == 0:
            weights[idx] = 1.0 / tk if fully_masked == "uniform" else 0.0
            continue
        s = k[batch][keys] @ q[idx] / np.sqrt(q.shape[-1])
        e = np.exp(s - s.max())
        weights[idx + (keys,)] = e / e.sum()
    return weights @ v, weights


def _keras_pair(num_heads=2, key_dim=4, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    ref = keras.layers.MultiHeadAttention(num_heads, key_dim, **kwargs)
    return ref


def _randomize(layer, rng):
    """Give a built layer random weights (so zero biases hide no bug)."""
    layer.set_weights([_normal(rng, *w.shape) * 0.3 for w in layer.get_weights()])


# ---------------------------------------------------------------------------
# scaled_dot_product_attention
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fully_masked", ["uniform", "zero"])
def test_scaled_dot_product_attention_matches_numpy_reference_with_mask(fully_masked):
    rng = _rng(1)
    q, k, v = (
        _normal(rng, 2, 3, 5, 4),
        _normal(rng, 2, 3, 6, 4),
        _normal(rng, 2, 3, 6, 7),
    )
    mask = rng.random((2, 1, 5, 6)) > 0.4  # broadcast over the middle axis
    mask[0, 0, 2] = False  # a fully masked query row
    out, w = scaled_dot_product_attention(q, k, v, mask, fully_masked_rows=fully_masked)
    ref_out, ref_w = _numpy_attention(q, k, v, mask, fully_masked)
    np.testing.assert_allclose(np.asarray(w), ref_w, atol=ATOL)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=ATOL)


def test_scaled_dot_product_attention_without_mask_matches_numpy_reference():
    rng = _rng(2)
    q, k, v = _normal(rng, 4, 3), _normal(rng, 7, 3), _normal(rng, 7, 2)
    out, w = scaled_dot_product_attention(q, k, v)
    ref_out, ref_w = _numpy_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=ATOL)
    np.testing.assert_allclose(np.asarray(w), ref_w, atol=ATOL)


def test_scaled_dot_product_attention_matches_keras_ops_dot_product_attention():
    rng = _rng(3)
    # keras.ops layout is (B, T, N, d); ours has heads as a leading batch axis.
    q, k, v = (
        _normal(rng, 2, 5, 3, 4),
        _normal(rng, 2, 6, 3, 4),
        _normal(rng, 2, 6, 3, 4),
    )
    mask = rng.random((2, 3, 5, 6)) > 0.5
    mask[1, 2, 0] = False
    ref = ops.dot_product_attention(q, k, v, mask=mask)
    out, _ = scaled_dot_product_attention(
        *(np.swapaxes(a, 1, 2) for a in (q, k, v)), mask=mask
    )
    np.testing.assert_allclose(np.swapaxes(np.asarray(out), 1, 2), ref, atol=ATOL)


def test_scaled_dot_product_attention_dropout_drops_probabilities_only():
    rng = _rng(4)
    q, k = _normal(rng, 2, 6, 4), _normal(rng, 2, 8, 4)
    eye = np.broadcast_to(np.eye(8, dtype="float32"), (2, 8, 8))  # output = weights
    rate = 0.5
    out, w = scaled_dot_product_attention(
        q, k, eye, dropout=rate, training=True, seed=keras.random.SeedGenerator(0)
    )
    out, w = np.asarray(out), np.asarray(w)
    _, ref_w = _numpy_attention(q, k, eye)
    np.testing.assert_allclose(w, ref_w, atol=ATOL)  # returned weights: pre-dropout
    kept = out != 0
    assert 0 < kept.mean() < 1
    # inverted dropout: each kept probability is scaled by 1 / (1 - rate)
    np.testing.assert_allclose(out[kept], ref_w[kept] / (1 - rate), rtol=1e-5)
    out_eval, _ = scaled_dot_product_attention(q, k, eye, dropout=rate, training=False)
    np.testing.assert_allclose(np.asarray(out_eval), ref_w, atol=ATOL)


def test_scaled_dot_product_attention_rejects_keys_and_values_of_different_length():
    rng = _rng(5)
    with pytest.raises(ValueError, match=r"same length Tk.*\(2, 6, 4\).*\(2, 5, 3\)"):
        scaled_dot_product_attention(
            _normal(rng, 2, 3, 4), _normal(rng, 2, 6, 4), _normal(rng, 2, 5, 3)
        )
    with pytest.raises(ValueError, match=r"same known feature size.*\(2, 6, 5\)"):
        scaled_dot_product_attention(
            _normal(rng, 2, 3, 4), _normal(rng, 2, 6, 5), _normal(rng, 2, 6, 3)
        )


def test_scaled_dot_product_attention_rejects_mask_that_does_not_broadcast():
    rng = _rng(6)
    q = _normal(rng, 2, 3, 4)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3, 5\).*\(2, 3, 6\)"):
        scaled_dot_product_attention(
            q,
            q[:, :1].repeat(6, 1),
            q[:, :1].repeat(6, 1),
            mask=np.ones((2, 3, 5), bool),
        )


# ---------------------------------------------------------------------------
# MultiHeadAttention held equal to keras.layers.MultiHeadAttention
# ---------------------------------------------------------------------------


def test_multi_head_attention_matches_keras_for_self_attention():
    rng = _rng(10)
    x = _normal(rng, 3, 7, 16)
    ref = _keras_pair(num_heads=4, key_dim=8)
    ref(x, x)
    _randomize(ref, rng)
    ours = MultiHeadAttention.from_keras(ref)
    np.testing.assert_allclose(np.asarray(ours(x, x)), np.asarray(ref(x, x)), atol=ATOL)
    # the weight layout is Keras': set_weights copies them as well
    other = MultiHeadAttention(num_heads=4, key_dim=8)
    other(x, x)
    other.set_weights(ref.get_weights())
    np.testing.assert_allclose(
        np.asarray(other(x, x)), np.asarray(ref(x, x)), atol=ATOL
    )


def test_multi_head_attention_matches_keras_for_cross_attention_of_different_lengths():
    rng = _rng(11)
    query, value, key = (
        _normal(rng, 2, 5, 12),
        _normal(rng, 2, 9, 10),
        _normal(rng, 2, 9, 6),
    )
    ref = _keras_pair(num_heads=3, key_dim=4)
    ref(query, value, key)
    _randomize(ref, rng)
    ours = MultiHeadAttention(num_heads=3, key_dim=4).load_from_keras(ref)
    out, scores = ours(query, value, key, return_attention_scores=True)
    ref_out, ref_scores = ref(query, value, key, return_attention_scores=True)
    assert tuple(out.shape) == (2, 5, 12) and tuple(scores.shape) == (2, 3, 5, 9)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=ATOL)
    np.testing.assert_allclose(np.asarray(scores), np.asarray(ref_scores), atol=ATOL)
    np.testing.assert_allclose(
        np.asarray(ours(query, value, key)),
        np.asarray(ref(query, value, key)),
        atol=ATOL,
    )


@pytest.mark.parametrize("return_scores", [False, True])
def test_multi_head_attention_matches_keras_with_mask_and_fully_masked_row(
    return_scores,
):
    rng = _rng(12)
    query, value = _normal(rng, 2, 4, 8), _normal(rng, 2, 6, 8)
    mask = rng.random((2, 4, 6)) > 0.4
    mask[0, 1] = False  # query 1 of sample 0 may attend to nothing
    mask[1, 2] = [True, False, False, False, False, False]
    ref = _keras_pair(num_heads=2, key_dim=4)
    ref(query, value)
    _randomize(ref, rng)
    ours = MultiHeadAttention.from_keras(ref)
    kwargs = {"attention_mask": mask, "return_attention_scores": return_scores}
    got, expected = ours(query, value, **kwargs), ref(query, value, **kwargs)
    if return_scores:
        np.testing.assert_allclose(
            np.asarray(got[1]), np.asarray(expected[1]), atol=ATOL
        )
        got, expected = got[0], expected[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=ATOL)


def test_fully_masked_row_follows_keras_uniform_and_zero_conventions():
    """Keras' fused path averages all values; its Softmax path outputs the bias."""
    rng = _rng(13)
    query, value = _normal(rng, 1, 3, 8), _normal(rng, 1, 5, 8)
    mask = np.ones((1, 3, 5), bool)
    mask[0, 0] = False
    ref = _keras_pair(num_heads=2, key_dim=4)
    ref(query, value)
    _randomize(ref, rng)
    ours = MultiHeadAttention.from_keras(ref)
    w = ref.get_weights()
    v_proj = np.einsum("bsd,dnh->bsnh", value, w[4]) + w[5]
    uniform_row = np.einsum("nh,nho->o", v_proj[0].mean(axis=0), w[6]) + w[7]
    fused = np.asarray(ours(query, value, attention_mask=mask))[0, 0]
    np.testing.assert_allclose(fused, uniform_row, atol=ATOL)
    np.testing.assert_allclose(
        fused, np.asarray(ref(query, value, attention_mask=mask))[0, 0], atol=ATOL
    )
    out, scores = ours(query, value, attention_mask=mask, return_attention_scores=True)
    np.testing.assert_allclose(np.asarray(out)[0, 0], w[7], atol=ATOL)
    np.testing.assert_array_equal(np.asarray(scores)[0, :, 0], 0.0)


@pytest.mark.parametrize("mask_shape", [(4, 6), (1, 4, 6), (2, 1, 4, 6), (2, 2, 4, 6)])
def test_multi_head_attention_matches_keras_for_broadcast_mask_shapes(mask_shape):
    rng = _rng(14)
    query, value = _normal(rng, 2, 4, 8), _normal(rng, 2, 6, 8)
    mask = (rng.random(mask_shape) > 0.3).astype("int32")  # 0/1 masks work too
    ref = _keras_pair(num_heads=2, key_dim=4)
    ref(query, value)
    ours = MultiHeadAttention.from_keras(ref)
    for scores in (False, True):
        got = ours(query, value, attention_mask=mask, return_attention_scores=scores)
        exp = ref(query, value, attention_mask=mask, return_attention_scores=scores)
        for g, e in zip(
            got if scores else [got], exp if scores else [exp], strict=True
        ):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=ATOL)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"value_dim": 6},
        {"value_dim": 3, "output_shape": 5},
        {"output_shape": (2, 3)},
        {"use_bias": False},
        {"dropout": 0.3},  # inference: no dropout, Keras' Softmax path
    ],
)
def test_multi_head_attention_matches_keras_for_other_configurations(kwargs):
    rng = _rng(15)
    query, value = _normal(rng, 2, 5, 8), _normal(rng, 2, 7, 8)
    mask = rng.random((2, 5, 7)) > 0.3
    mask[1, 4] = False
    ref = _keras_pair(num_heads=2, key_dim=4, **kwargs)
    ref(query, value)
    _randomize(ref, rng)
    ours = MultiHeadAttention.from_keras(ref)
    assert ours.count_params() == ref.count_params()
    for scores in (False, True):
        got = ours(query, value, attention_mask=mask, return_attention_scores=scores)
        exp = ref(query, value, attention_mask=mask, return_attention_scores=scores)
        for g, e in zip(
            got if scores else [got], exp if scores else [exp], strict=True
        ):
            assert g.shape == e.shape
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=ATOL)


def test_multi_head_attention_has_the_parameter_count_of_keras():
    x = np.zeros((1, 3, 32), "float32")
    ours, ref = MultiHeadAttention(8, 4), keras.layers.MultiHeadAttention(8, 4)
    ours(x, x)
    ref(x, x)
    assert [tuple(w.shape) for w in ours.weights] == [
        tuple(w.shape) for w in ref.weights
    ]
    # closed form: 3 projections d*N*k + N*k, output N*k*d + d
    assert (
        ours.count_params() == ref.count_params() == 3 * (32 * 32 + 32) + 32 * 32 + 32
    )


def test_fused_qkv_dense_has_exactly_the_parameters_of_three_projections():
    d_model = 48
    inputs = keras.Input((None, d_model))
    fused = keras.layers.Dense(3 * d_model)
    fused(inputs)
    separate = [keras.layers.Dense(d_model) for _ in range(3)]
    for layer in separate:
        layer(inputs)
    assert fused.count_params() == sum(layer.count_params() for layer in separate)
    assert fused.count_params() == 3 * (d_model * d_model + d_model)


def test_multi_head_attention_in_functional_model_matches_keras_for_any_length():
    rng = _rng(16)
    inputs = keras.Input((None, 16))
    ref = keras.layers.MultiHeadAttention(2, 8)
    ours = MultiHeadAttention(2, 8)
    ref_model = keras.Model(inputs, ref(inputs, inputs))
    our_model = keras.Model(inputs, ours(inputs, inputs))
    ours.load_from_keras(ref)
    assert our_model.output_shape == ref_model.output_shape == (None, None, 16)
    for length in (3, 11):
        x = _normal(rng, 2, length, 16)
        np.testing.assert_allclose(
            np.asarray(our_model(x)), np.asarray(ref_model(x)), atol=ATOL
        )


def test_multi_head_attention_config_round_trip_keeps_the_function():
    rng = _rng(17)
    x = _normal(rng, 2, 4, 8)
    ref = _keras_pair(num_heads=2, key_dim=3, value_dim=5, output_shape=6)
    ref(x, x)
    ours = MultiHeadAttention.from_keras(ref)
    clone = MultiHeadAttention.from_config(ours.get_config())
    clone(x, x)
    clone.set_weights(ours.get_weights())
    np.testing.assert_allclose(
        np.asarray(clone(x, x)), np.asarray(ref(x, x)), atol=ATOL
    )


# -- bad inputs ------------------------------------------------------------


@pytest.mark.parametrize("arg", ["num_heads", "key_dim"])
@pytest.mark.parametrize("bad", [0, -2])
def test_non_positive_num_heads_or_key_dim_raise_value_error_like_keras(arg, bad):
    kwargs = {"num_heads": 2, "key_dim": 4, arg: bad}
    with pytest.raises(ValueError):
        keras.layers.MultiHeadAttention(**kwargs)  # the reference rejects it too
    with pytest.raises(ValueError, match=rf"{arg} must be a positive integer.*{bad}"):
        MultiHeadAttention(**kwargs)


def test_key_and_value_of_different_lengths_raise_value_error_like_keras():
    rng = _rng(20)
    query, value, key = (
        _normal(rng, 2, 3, 8),
        _normal(rng, 2, 5, 8),
        _normal(rng, 2, 4, 8),
    )
    with pytest.raises(ValueError):
        keras.layers.MultiHeadAttention(2, 4)(query, value, key)
    with pytest.raises(ValueError, match=r"same length Tk.*\(2, 4, 8\).*\(2, 5, 8\)"):
        MultiHeadAttention(2, 4)(query, value, key)


def test_inputs_with_other_feature_sizes_than_built_raise_value_error():
    rng = _rng(21)
    layer = MultiHeadAttention(2, 4)
    layer(_normal(rng, 2, 3, 8), _normal(rng, 2, 5, 8))
    with pytest.raises(ValueError, match=r"query has 6 features.*\(B, T, 8\)"):
        layer(_normal(rng, 2, 3, 6), _normal(rng, 2, 5, 8))
    with pytest.raises(ValueError, match=r"query has shape \(3, 8\); expected rank 3"):
        layer(_normal(rng, 3, 8), _normal(rng, 2, 5, 8))


@pytest.mark.parametrize(
    ("mask_shape", "message"),
    [
        (
            (2, 3, 4),
            r"attention_mask has shape \(2, 3, 4\); expected \(B, Tq, Tk\) "
            r"= \(2, 3, 5\)",
        ),
        ((2, 5), r"attention_mask has shape \(2, 5\).*read as \(Tq, Tk\)"),
        ((5,), r"attention_mask has shape \(5,\)"),
        ((2, 3, 3, 5), r"attention_mask has shape \(2, 3, 3, 5\)"),
    ],
)
def test_attention_mask_of_wrong_shape_raises_value_error_naming_shapes(
    mask_shape, message
):
    rng = _rng(22)
    query, value = _normal(rng, 2, 3, 8), _normal(rng, 2, 5, 8)
    layer = MultiHeadAttention(2, 4)
    with pytest.raises(ValueError, match=message):
        layer(query, value, attention_mask=np.ones(mask_shape, bool))


def test_load_from_keras_rejects_a_layer_with_other_configuration():
    x = np.zeros((1, 3, 8), "float32")
    ref = keras.layers.MultiHeadAttention(2, 4)
    with pytest.raises(ValueError, match="not built"):
        MultiHeadAttention(2, 4).load_from_keras(ref)
    ref(x, x)
    with pytest.raises(
        ValueError, match=r"\(2, 5, 5, True\) here and \(2, 4, 4, True\)"
    ):
        MultiHeadAttention(2, 5).load_from_keras(ref)


# ---------------------------------------------------------------------------
# MTAN task attention
# ---------------------------------------------------------------------------


def _numpy_task_attention(layer, u, p, previous=None, batch_stats=False):
    """Recompute mask = sigmoid(BN(conv(ReLU(BN(conv([u, previous])))))) in numpy."""

    def conv1x1(x, conv):
        kernel, bias = (w.numpy() for w in (conv.kernel, conv.bias))
        return np.einsum("bhwc,cd->bhwd", x, kernel[0, 0]) + bias

    def batch_norm(x, bn):
        if batch_stats:
            mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        else:
            mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
        return (
            bn.gamma.numpy() * (x - mean) / np.sqrt(var + bn.epsilon) + bn.beta.numpy()
        )

    x = u if previous is None else np.concatenate([u, previous], axis=-1)
    h = np.maximum(batch_norm(conv1x1(x, layer.conv1), layer.bn1), 0.0)
    mask = 1.0 / (1.0 + np.exp(-batch_norm(conv1x1(h, layer.conv2), layer.bn2)))
    return mask * p, mask


@pytest.mark.parametrize("with_previous", [False, True])
def test_task_attention_mask_equals_numpy_recomputation_and_lies_in_open_unit_interval(
    with_previous,
):
    rng = _rng(30)
    u, p = _normal(rng, 2, 5, 6, 4), _normal(rng, 2, 5, 6, 8)
    previous = _normal(rng, 2, 5, 6, 3) if with_previous else None
    layer = TaskAttention(hidden_channels=6)
    layer(u, p, previous=previous)
    _randomize(layer, rng)
    for bn in (layer.bn1, layer.bn2):  # positive variances for inference mode
        bn.moving_variance.assign(np.abs(bn.moving_variance.numpy()) + 0.5)
    out, mask = layer(u, p, previous=previous, return_mask=True)
    ref_out, ref_mask = _numpy_task_attention(layer, u, p, previous)
    assert tuple(out.shape) == tuple(mask.shape) == (2, 5, 6, 8)
    np.testing.assert_allclose(np.asarray(mask), ref_mask, atol=ATOL)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=ATOL)
    assert 0.0 < float(np.min(mask)) and float(np.max(mask)) < 1.0


def test_task_attention_in_training_mode_uses_batch_statistics_like_numpy():
    rng = _rng(31)
    u, p, previous = (
        _normal(rng, 3, 4, 4, 5),
        _normal(rng, 3, 4, 4, 5),
        _normal(rng, 3, 4, 4, 5),
    )
    layer = TaskAttention()
    out, mask = layer(u, p, previous=previous, return_mask=True, training=True)
    ref_out, ref_mask = _numpy_task_attention(layer, u, p, previous, batch_stats=True)
    np.testing.assert_allclose(np.asarray(mask), ref_mask, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-4)


def test_task_attention_rejects_inputs_of_other_sizes():
    rng = _rng(32)
    layer = TaskAttention()
    with pytest.raises(
        ValueError,
        match=r"shared_output has shape \(2, 4, 4, 8\).*"
        r"\(2, 5, 5, 8\).*same H",
    ):
        layer(_normal(rng, 2, 5, 5, 8), _normal(rng, 2, 4, 4, 8))
    layer(_normal(rng, 2, 5, 5, 8), _normal(rng, 2, 5, 5, 8))
    with pytest.raises(
        ValueError,
        match=r"built for shared_features with 8 channels, "
        r"previous with None.*received 8, 8 and 8",
    ):
        layer(
            _normal(rng, 2, 5, 5, 8), _normal(rng, 2, 5, 5, 8), _normal(rng, 2, 5, 5, 8)
        )


def test_mtan_attention_branch_builds_masks_of_each_block_with_expected_parameters():
    u1, p1 = keras.Input((8, 8, 4)), keras.Input((8, 8, 4))
    u2, p2 = keras.Input((4, 4, 6)), keras.Input((4, 4, 6))
    out, masks = mtan_attention_branch([(u1, p1), (u2, p2)], "depth", return_masks=True)
    model = keras.Model([u1, p1, u2, p2], [out, *masks])
    assert model.output_shape == [(None, 4, 4, 6), (None, 8, 8, 4), (None, 4, 4, 6)]
    # closed form: attention = conv(c_in->c) + BN(c) + conv(c->c) + BN(c); f: 3x3 conv
    att1 = (4 * 4 + 4) + 4 * 4 + (4 * 4 + 4) + 4 * 4
    f1 = 3 * 3 * 4 * 6 + 4 * 6
    att2 = (12 * 6 + 6) + 4 * 6 + (6 * 6 + 6) + 4 * 6
    assert model.count_params() == att1 + f1 + att2
    rng = _rng(33)
    values = model(
        [
            _normal(rng, 2, 8, 8, 4),
            _normal(rng, 2, 8, 8, 4),
            _normal(rng, 2, 4, 4, 6),
            _normal(rng, 2, 4, 4, 6),
        ]
    )
    assert all(0.0 < float(np.min(m)) and float(np.max(m)) < 1.0 for m in values[1:])


# ---------------------------------------------------------------------------
# task queries over a feature map
# ---------------------------------------------------------------------------


def test_task_query_attention_head_equals_keras_multi_head_attention_on_its_queries():
    rng = _rng(40)
    features = _normal(rng, 2, 3, 4, 8)
    head = TaskQueryAttentionHead(
        ["seg", "count"], num_queries=2, num_heads=2, key_dim=4
    )
    outputs, maps = head(features, return_attention_scores=True)
    ref = keras.layers.MultiHeadAttention(2, 4)
    queries = np.asarray(head.queries).reshape(1, 4, 8).repeat(2, axis=0)
    tokens = features.reshape(2, 12, 8)
    ref(queries, tokens)
    ref.set_weights(head.attention.get_weights())
    ref_out, ref_scores = ref(queries, tokens, return_attention_scores=True)
    for i, task in enumerate(["seg", "count"]):
        assert tuple(outputs[task].shape) == (2, 2, 8)
        assert tuple(maps[task].shape) == (2, 2, 2, 3, 4)
        np.testing.assert_allclose(
            np.asarray(outputs[task]),
            np.asarray(ref_out)[:, 2 * i : 2 * i + 2],
            atol=ATOL,
        )
        np.testing.assert_allclose(
            np.asarray(maps[task]).reshape(2, 2, 2, 12),
            np.asarray(ref_scores)[:, :, 2 * i : 2 * i + 2],
            atol=ATOL,
        )
        # each query's map is a distribution over the H * W positions
        np.testing.assert_allclose(
            np.asarray(maps[task]).sum(axis=(-2, -1)), 1.0, atol=ATOL
        )


def test_task_query_attention_head_in_functional_model_gives_per_task_outputs():
    inputs = keras.Input((6, 6, 8))
    head = TaskQueryAttentionHead(
        ["a", "b", "c"], num_queries=1, key_dim=4, output_dim=5
    )
    model = keras.Model(inputs, head(inputs))
    out = model(_normal(_rng(41), 3, 6, 6, 8))
    assert sorted(out) == ["a", "b", "c"]
    assert all(tuple(o.shape) == (3, 1, 5) for o in out.values())
    # parameters: queries T*Q*C plus a MultiHeadAttention of the same configuration
    ref = keras.layers.MultiHeadAttention(4, 4, output_shape=5)
    ref(np.zeros((1, 3, 8), "float32"), np.zeros((1, 36, 8), "float32"))
    assert model.count_params() == 3 * 1 * 8 + ref.count_params()


def _numpy_layer_norm(x, gamma, beta, epsilon=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + epsilon) * gamma + beta


def test_cross_task_attention_equals_keras_attention_over_all_task_tokens():
    """Reference: keras.layers.MultiHeadAttention on the concatenated tokens
    (each task's map flattened row-major, plus its embedding), then a NumPy
    residual + layer normalisation."""
    rng = _rng(50)
    tasks = ["seg", "depth", "count"]
    maps = {t: _normal(rng, 2, 3, 4, 8) for t in tasks}
    layer = CrossTaskAttention(tasks, num_heads=2, key_dim=4)
    layer(maps)
    embedding = _normal(rng, 3, 8)
    gamma, beta = _normal(rng, 8), _normal(rng, 8)
    layer.task_embedding.assign(embedding)
    layer.norm.set_weights([gamma, beta])
    ref = keras.layers.MultiHeadAttention(2, 4)
    tokens = np.concatenate(
        [maps[t].reshape(2, 12, 8) + embedding[i] for i, t in enumerate(tasks)], 1
    )
    ref(tokens, tokens)
    _randomize(ref, rng)
    layer.attention.load_from_keras(ref)
    ref_out, ref_scores = ref(tokens, tokens, return_attention_scores=True)
    expected = _numpy_layer_norm(tokens + np.asarray(ref_out), gamma, beta)
    out, scores = layer(maps, return_attention_scores=True)
    assert tuple(scores.shape) == (2, 2, 36, 36)
    np.testing.assert_allclose(np.asarray(scores), np.asarray(ref_scores), atol=ATOL)
    for i, t in enumerate(tasks):
        np.testing.assert_allclose(
            np.asarray(out[t]),
            expected[:, 12 * i : 12 * (i + 1)].reshape(2, 3, 4, 8),
            atol=1e-4,
        )


def test_cross_task_attention_lets_one_task_see_another():
    """Changing the depth map changes the segmentation output (and only through
    attention: with the value projection zeroed, it does not)."""
    rng = _rng(51)
    seg, depth = _normal(rng, 1, 2, 2, 4), _normal(rng, 1, 2, 2, 4)
    layer = CrossTaskAttention(["seg", "depth"], num_heads=1, key_dim=4)
    before = np.asarray(layer({"seg": seg, "depth": depth})["seg"])
    after = np.asarray(layer({"seg": seg, "depth": depth + 1.0})["seg"])
    assert np.abs(after - before).max() > 1e-3
    weights = layer.attention.get_weights()
    layer.attention.set_weights([np.zeros_like(w) for w in weights])
    alone = np.asarray(layer({"seg": seg, "depth": depth})["seg"])
    again = np.asarray(layer({"seg": seg, "depth": depth + 1.0})["seg"])
    np.testing.assert_allclose(alone, again, atol=ATOL)


def test_cross_task_attention_parameters_are_embeddings_attention_and_norm():
    inputs = {t: keras.Input((4, 4, 8), name=t) for t in ("a", "b")}
    layer = CrossTaskAttention(["a", "b"], num_heads=2, key_dim=4)
    model = keras.Model(inputs, layer(inputs))
    ref = keras.layers.MultiHeadAttention(2, 4)
    ref(np.zeros((1, 32, 8), "float32"), np.zeros((1, 32, 8), "float32"))
    assert model.count_params() == 2 * 8 + ref.count_params() + 2 * 8


@pytest.mark.parametrize(
    "maps, message",
    [
        ({"a": np.zeros((1, 2, 2, 4), "float32")}, "one \\(B, H, W, C\\) map per task"),
        (
            {
                "a": np.zeros((1, 2, 2, 4), "float32"),
                "b": np.zeros((1, 2, 3, 4), "float32"),
            },
            "same known H, W and C",
        ),
    ],
)
def test_cross_task_attention_rejects_missing_tasks_and_unequal_maps(maps, message):
    layer = CrossTaskAttention(["a", "b"], num_heads=1, key_dim=2)
    with pytest.raises(ValueError, match=message):
        layer(maps)


def _masked_sequence_model(attention_layer):
    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(20, 8, mask_zero=True)(tokens)
    y = attention_layer(x, x)
    pooled = keras.layers.GlobalAveragePooling1D()(y)
    return keras.Model(tokens, [y, pooled])


def test_implicit_padding_masks_are_used_like_keras():
    """Embedding(mask_zero=True) masks reach the attention as Keras' layer uses them."""
    keras.utils.set_random_seed(0)
    ref = _masked_sequence_model(keras.layers.MultiHeadAttention(2, 4))
    ours = _masked_sequence_model(MultiHeadAttention(2, 4))
    ours.set_weights(ref.get_weights())
    tokens = np.array([[3, 5, 7, 0, 0, 0], [1, 2, 0, 0, 0, 0]], dtype="int32")
    longer = np.pad(tokens, ((0, 0), (0, 5)))  # more padding changes nothing
    for batch in (tokens, longer):
        (ref_seq, ref_pool), (seq, pool) = ref(batch), ours(batch)
        valid = batch != 0
        np.testing.assert_allclose(
            np.asarray(seq)[valid], np.asarray(ref_seq)[valid], atol=1e-5
        )
        np.testing.assert_allclose(np.asarray(pool), np.asarray(ref_pool), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(ours(tokens)[1]), np.asarray(ours(longer)[1]), atol=1e-5
    )
