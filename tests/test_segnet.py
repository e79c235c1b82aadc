"""Tests of mtl_utils.segnet: the SegNet family of the MTAN paper and cross-stitch.

References:

* Parameter counts of the reference PyTorch modules of lorenmt/mtan
  (``im2im_pred/model_segnet_single.py``, ``model_segnet_split.py``,
  ``model_segnet_mtan.py``, ``model_segnet_cross.py``, commit c36c30b), for
  NYUv2 (13 classes, depth, normals; 288x384 input). They were obtained by
  instantiating each file's ``SegNet`` class with torch 2.13.0 (CPU), options
  ``task`` in semantic/depth/normal and ``type="standard"``, and summing
  ``p.numel()`` over ``named_parameters()`` with ``requires_grad``, excluding
  ``logsigma`` (uncertainty weights, not part of the network). The single-task
  semantic count, 24,981,069, is also the divisor the reference code prints its
  relative size with; MTAN / that = 1.7705, the paper's "#P" of 1.77.
* A closed-form count from SegNet's layer table at a reduced width.
* NumPy re-implementations of MTAN's encoder and decoder attention steps
  (1x1 conv, BN, ReLU, 1x1 conv, BN, sigmoid, product with the shared features,
  shared ``f`` block, bilinear upsampling, concatenation).
* Misra et al.'s cross-stitch formula, by hand.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from test_models import _batch

from mtl_utils.cost import count_params
from mtl_utils.models import (
    build_cross_stitch,
    build_segnet,
    build_segnet_mtan,
    build_segnet_split,
)
from mtl_utils.segnet import CrossStitch
from mtl_utils.tasks import Task, scene_tasks
from mtl_utils.training import MultiTaskModel
from mtl_utils.weighting import EqualWeighting, PCGrad

NYUV2_SHAPE = (288, 384, 3)
NYUV2_TASKS = [
    Task("semantic", "segmentation", 13),
    Task("depth", "depth", 1),
    Task("normal", "normal", 3),
]
# Trainable parameters of the reference modules (see the module docstring).
REFERENCE_SINGLE = {"semantic": 24_981_069, "depth": 24_980_289, "normal": 24_980_419}
REFERENCE_SPLIT = 25_055_185
REFERENCE_MTAN = 44_229_073
REFERENCE_CROSS = 74_941_804  # three single-task SegNets + 27 cross-stitch weights
TINY = {"input_shape": (32, 32, 3), "width": 0.0625}


def _trainable(model):
    return count_params(model, trainable_only=True)


# ----------------------------------------------------- parameters at full width


@pytest.mark.parametrize("task", NYUV2_TASKS, ids=lambda t: t.name)
def test_segnet_has_the_reference_parameters_at_full_width(task):
    model = build_segnet(task, NYUV2_SHAPE, width=1.0)
    assert _trainable(model) == REFERENCE_SINGLE[task.name]


def test_segnet_split_has_the_reference_parameters_at_full_width():
    model = build_segnet_split(NYUV2_TASKS, NYUV2_SHAPE, width=1.0)
    assert _trainable(model) == REFERENCE_SPLIT


def test_segnet_mtan_has_the_reference_parameters_and_the_papers_ratio():
    model = build_segnet_mtan(NYUV2_TASKS, NYUV2_SHAPE, width=1.0)
    assert _trainable(model) == REFERENCE_MTAN
    # Liu, Johns and Davison 2019, table 3: MTAN's #P is 1.77 single-task SegNets
    assert round(_trainable(model) / REFERENCE_SINGLE["semantic"], 2) == 1.77


def test_cross_stitch_has_the_reference_parameters_at_full_width():
    shared = build_cross_stitch(NYUV2_TASKS, NYUV2_SHAPE, width=1.0, kind="shared")
    assert _trainable(shared) == REFERENCE_CROSS
    # Misra et al.'s units: a 3x3 matrix instead of 3 weights at each of 9 units
    matrix = build_cross_stitch(NYUV2_TASKS, NYUV2_SHAPE, width=1.0)
    assert _trainable(matrix) == REFERENCE_CROSS + 9 * (3 * 3 - 3)


def test_segnet_width_multiplier_matches_the_closed_form():
    width, classes = 0.25, 13
    c = [round(k * width) for k in (64, 128, 256, 512, 512)]
    encoder = [(3, c[0]), (c[0], c[0]), (c[0], c[1]), (c[1], c[1])]
    decoder = [(c[1], c[0]), (c[0], c[0]), (c[0], c[0]), (c[0], c[0])]
    for j in (2, 3, 4):
        encoder += [(c[j - 1], c[j]), (c[j], c[j]), (c[j], c[j])]
        decoder += [(c[j], c[j - 1]), (c[j - 1], c[j - 1]), (c[j - 1], c[j - 1])]
    # 3x3 kernel + bias + BN gamma and beta per conv; prediction 3x3 + 1x1 convs
    convs = sum(9 * a * b + 3 * b for a, b in encoder + decoder)
    prediction = 9 * c[0] * c[0] + c[0] + c[0] * classes + classes
    model = build_segnet(NYUV2_TASKS[0], (64, 64, 3), width=width)
    assert _trainable(model) == convs + prediction


# ------------------------------------------------------------ training a step

BUILDERS = {
    "segnet": lambda tasks: build_segnet(tasks[0], **TINY),
    "segnet_split": lambda tasks: build_segnet_split(tasks, **TINY),
    "segnet_mtan": lambda tasks: build_segnet_mtan(tasks, **TINY),
    "cross_stitch": lambda tasks: build_cross_stitch(tasks, **TINY),
    "cross_stitch_shared": lambda tasks: build_cross_stitch(
        tasks, kind="shared", **TINY
    ),
}
# Every kind of task at least once, kept small for a 2-core CPU.
BUILDER_TASKS = {
    "segnet": ["segmentation"],
    "segnet_split": ["segmentation", "normal", "count"],
    "segnet_mtan": ["segmentation", "depth", "count"],
    "cross_stitch": ["depth", "normal"],
    "cross_stitch_shared": ["segmentation", "count"],
}
STRATEGIES = {"ew": lambda: EqualWeighting(), "pcgrad": lambda: PCGrad(seed=0)}


# PCGrad combines the gradients of two or more tasks: not for the single task.
CASES = [(b, s) for b in sorted(BUILDERS) for s in sorted(STRATEGIES)]
CASES.remove(("segnet", "pcgrad"))


@pytest.mark.parametrize(("builder", "strategy"), CASES)
def test_builder_outputs_a_dict_keyed_by_task_name_and_trains_a_step(builder, strategy):
    keras.utils.set_random_seed(0)
    tasks = scene_tasks(BUILDER_TASKS[builder])
    model = BUILDERS[builder](tasks)
    assert isinstance(model, MultiTaskModel)
    x, y = _batch(tasks)
    out = model(x, training=False)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        t.name: (2, 32, 32, t.channels) if t.dense else (2, t.channels) for t in tasks
    }
    model.compile(
        keras.optimizers.SGD(0.1), losses=tasks, weighting=STRATEGIES[strategy]()
    )
    before = [np.array(v) for v in model.trainable_variables]
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    for t in tasks:
        assert np.isfinite(history.history[f"{t.name}_loss"][0])
    unchanged = [
        v.path
        for b, v in zip(before, model.trainable_variables, strict=True)
        if np.array_equal(b, np.asarray(v))
    ]
    assert not unchanged


# ------------------------------------------------------- the attention blocks


def _conv(x, layer):
    """NumPy 'same' convolution with a Keras Conv2D's kernel and bias."""
    kernel, bias = (np.asarray(w) for w in layer.get_weights())
    k = kernel.shape[0]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    height, width = x.shape[1:3]
    out = np.zeros((*x.shape[:3], kernel.shape[-1]))
    for dy in range(k):
        for dx in range(k):
            patch = xp[:, dy : dy + height, dx : dx + width]
            out += patch @ kernel[dy, dx]
    return out + bias


def _bn(x, layer):
    gamma, beta, mean, var = (np.asarray(w) for w in layer.get_weights())
    return (x - mean) / np.sqrt(var + layer.epsilon) * gamma + beta


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _attention(u, previous, p, module):
    """MTAN's attention module: mask from [u, previous], times p."""
    x = np.concatenate([u, previous], axis=-1)
    h = np.maximum(_bn(_conv(x, module.conv1), module.bn1), 0.0)
    mask = _sigmoid(_bn(_conv(h, module.conv2), module.bn2))
    return mask * p


def _f(x, model, name):
    """A shared f block: 3x3 conv, BN, ReLU."""
    conv, bn = model.get_layer(f"{name}_conv"), model.get_layer(f"{name}_bn")
    return np.maximum(_bn(_conv(x, conv), bn), 0.0)


def _max_pool(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _bilinear_up2(x):
    """Bilinear upsampling by 2 with half-pixel centres (tf.image.resize)."""

    def axis_weights(n):
        src = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        m = np.zeros((2 * n, n))
        m[np.arange(2 * n), lo] += 1 - (src - lo)
        m[np.arange(2 * n), hi] += src - lo
        return m

    rows, cols = axis_weights(x.shape[1]), axis_weights(x.shape[2])
    return np.einsum("yh,bhwc,xw->byxc", rows, x, cols)


def test_mtan_attention_blocks_match_a_numpy_reimplementation():
    keras.utils.set_random_seed(0)
    tasks = scene_tasks(["segmentation", "depth"])
    model = build_segnet_mtan(tasks, input_shape=(32, 32, 3), width=0.125)
    rng = np.random.default_rng(0)
    # random biases and BN parameters and statistics (kernels keep Glorot scale)
    for w in model.weights:
        if w.name in ("bias", "beta", "moving_mean"):
            w.assign(0.2 * rng.normal(size=w.shape))
        elif w.name in ("gamma", "moving_variance"):
            w.assign(rng.uniform(0.5, 1.5, size=w.shape))
    tensors = {
        "u2": model.get_layer("enc2_1_relu").output,
        "p2": model.get_layer("enc2_2_relu").output,
        "unpooled3": model.get_layer("unpool3").output,
        "decoded3": model.get_layer("dec3_3_relu").output,
    }
    for t in tasks:
        for key, name in (
            ("enc1", f"{t.name}_enc_att_1"),
            ("enc2", f"{t.name}_enc_att_2"),
            ("dec4", f"{t.name}_dec_att_4"),
            ("dec3", f"{t.name}_dec_att_3"),
        ):
            tensors[f"{t.name}/{key}"] = model.get_layer(name).output
    probe = keras.Model(model.input, tensors)
    x = rng.random((2, 32, 32, 3), dtype=np.float32)
    got = {k: np.asarray(v, np.float64) for k, v in probe(x, training=False).items()}
    for t in tasks:
        # encoder block 2: f_1 (shared), pooling, mask from [u_2, f], times p_2
        previous = _max_pool(_f(got[f"{t.name}/enc1"], model, "enc_f1"))
        module = model.get_layer(f"{t.name}_enc_att_2")
        want = _attention(got["u2"], previous, got["p2"], module)
        np.testing.assert_allclose(got[f"{t.name}/enc2"], want, rtol=1e-4, atol=1e-4)
        # decoder stage 3: upsample, f_3 (shared), mask from [unpooled, f]
        previous = _f(_bilinear_up2(got[f"{t.name}/dec4"]), model, "dec_f3")
        module = model.get_layer(f"{t.name}_dec_att_3")
        want = _attention(got["unpooled3"], previous, got["decoded3"], module)
        assert want.std() > 1e-2  # not a saturated or zero output
        np.testing.assert_allclose(got[f"{t.name}/dec3"], want, rtol=1e-4, atol=1e-4)
    # the f blocks exist once, shared by both tasks
    names = [layer.name for layer in model.layers]
    assert names.count("enc_f1_conv") == 1 and names.count("dec_f3_conv") == 1


def test_cross_stitch_unit_matches_misras_formula_and_the_reference_form():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(2, 4, 4, 3)).astype("float32") for _ in range(3)]
    unit = CrossStitch()
    outs = unit(xs)
    alpha = np.asarray(unit.alpha)
    np.testing.assert_allclose(np.diag(alpha), 0.9)
    np.testing.assert_allclose(alpha.sum(axis=1), 1.0, rtol=1e-6)
    alpha = rng.normal(size=(3, 3)).astype("float32")
    unit.alpha.assign(alpha)
    for i, out in enumerate(unit(xs)):
        want = sum(alpha[i, k] * xs[k] for k in range(3))
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    shared = CrossStitch(kind="shared")
    outs = shared(xs)
    np.testing.assert_allclose(outs[0], xs[0] + xs[1] + xs[2], rtol=1e-6)
    assert shared.alpha.shape == (3,) and all(o is outs[0] for o in outs)


def test_segnet_builders_reject_bad_arguments_naming_the_problem():
    seg, depth = scene_tasks(["segmentation", "depth"])
    with pytest.raises(ValueError, match="use build_segnet_split"):
        build_segnet([seg, depth], **TINY)
    with pytest.raises(ValueError, match="SegNet-MTAN needs known H and W"):
        build_segnet_mtan([seg, depth], input_shape=(None, None, 3))
    with pytest.raises(ValueError, match="joins two or more tasks"):
        build_cross_stitch([seg], **TINY)
    with pytest.raises(ValueError, match="kind='tied'"):
        build_cross_stitch([seg, depth], kind="tied", **TINY)
    with pytest.raises(ValueError, match="height 40 is not a positive multiple"):
        build_segnet_split([seg, depth], input_shape=(40, 32, 3))
    with pytest.raises(ValueError, match="task names repeat"):
        build_segnet_split([seg, seg], **TINY)
    with pytest.raises(ValueError, match="expected a list of two or more tensors"):
        CrossStitch()([np.zeros((1, 2, 2, 3)), np.zeros((1, 2, 2, 4))])
