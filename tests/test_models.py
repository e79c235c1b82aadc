"""Tests of mtl_utils.models and mtl_utils.cost.

References: keras.applications.VGG16/VGG19 (parameters, weights, outputs), the
VGG paper's table 1 (closed-form parameter counts), hand-computed multiply-adds,
TensorFlow's v1 profiler (FLOPs of a frozen graph), time.sleep (latency).
"""

from __future__ import annotations

import math
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)

from mtl_utils.cost import (
    count_params,
    exact_gradient_cost_ratio,
    flops_per_image,
    macs_by_layer,
    macs_per_image,
    measure_latency,
    training_step_macs,
)
from mtl_utils.models import (
    build_mtan,
    build_multitask,
    build_single_task,
    classification_head,
    dense_head,
    load_keras_vgg_weights,
    mtan_mask_model,
    vgg_encoder,
)
from mtl_utils.tasks import Task, scene_tasks
from mtl_utils.training import MultiTaskModel

KERAS_VGG = {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19}
# Simonyan and Zisserman 2015, table 1: convolutions per block (A, B, D, E).
PAPER_BLOCKS = {
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}
PAPER_CHANNELS = (64, 128, 256, 512, 512)
TINY = {"input_shape": (32, 32, 3), "width": 0.0625}


def _paper_convs(config, width=1.0):
    """(c_in, c_out) of every 3x3 convolution, from the paper's table."""
    convs, c_in = [], 3
    for n, c in zip(PAPER_BLOCKS[config], PAPER_CHANNELS, strict=True):
        c = max(1, round(c * width))
        for _ in range(n):
            convs.append((c_in, c))
            c_in = c
    return convs


def _weight_shapes(model):
    return [
        (layer.name, [tuple(w.shape) for w in layer.weights])
        for layer in model.layers
        if layer.weights
    ]


# ----------------------------------------------------------------- the encoder


@pytest.mark.parametrize("config", ["vgg16", "vgg19"])
def test_full_width_encoder_has_exactly_the_parameters_of_keras_vgg(config):
    ours = vgg_encoder(config, input_shape=(None, None, 3))
    reference = KERAS_VGG[config](weights=None, include_top=False)
    assert count_params(ours) == reference.count_params()
    assert _weight_shapes(ours) == _weight_shapes(reference)


@pytest.mark.parametrize("config", ["vgg11", "vgg13", "vgg16", "vgg19"])
def test_every_config_has_the_paper_parameter_count(config):
    expected = sum(9 * c_in * c_out + c_out for c_in, c_out in _paper_convs(config))
    assert count_params(vgg_encoder(config, (64, 64, 3))) == expected


def test_batch_norm_encoder_has_conv_bn_relu_and_no_conv_biases():
    encoder = vgg_encoder("vgg16", (64, 64, 3), width=0.125, batch_norm=True)
    convs = _paper_convs("vgg16", 0.125)
    # kernels without biases + BN (gamma, beta, moving mean, moving variance)
    expected = sum(9 * c_in * c_out + 4 * c_out for c_in, c_out in convs)
    assert count_params(encoder) == expected
    bns = [
        la for la in encoder.layers if isinstance(la, keras.layers.BatchNormalization)
    ]
    assert len(bns) == len(convs) == 13


def test_encoder_weights_copied_from_keras_vgg16_give_the_same_last_block_output():
    reference = keras.applications.VGG16(
        weights=None, include_top=False, input_shape=(32, 32, 3)
    )
    ours = vgg_encoder("vgg16", (32, 32, 3))
    assert load_keras_vgg_weights(ours, reference) == 13
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    want = np.asarray(reference(x))
    got = np.asarray(ours(x)["block5_pool"])
    assert np.abs(want).max() > 1e-2  # a non-trivial output
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_width_multiplier_scales_every_block_and_features_of_every_block_exist():
    encoder = vgg_encoder("vgg16", (64, 64, 3), width=0.125)
    for j, channels in enumerate((8, 16, 32, 64, 64), start=1):
        size = 64 // 2 ** (j - 1)
        for key in (f"block{j}_first", f"block{j}_last"):
            assert tuple(encoder.output[key].shape) == (None, size, size, channels)
        pooled = (None, size // 2, size // 2, channels)
        assert tuple(encoder.output[f"block{j}_pool"].shape) == pooled


# ----------------------------------------------------------------- the builders


def _batch(tasks, size=32, batch=2):
    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 3), dtype=np.float32)
    y = {}
    for t in tasks:
        if t.kind == "segmentation":
            y[t.name] = rng.integers(0, t.channels, (batch, size, size))
        elif t.kind == "depth":
            y[t.name] = rng.uniform(1, 5, (batch, size, size, 1)).astype("float32")
        elif t.kind == "normal":
            n = rng.normal(size=(batch, size, size, 3))
            y[t.name] = (n / np.linalg.norm(n, axis=-1, keepdims=True)).astype(
                "float32"
            )
        else:
            y[t.name] = rng.integers(0, t.channels, (batch,))
    return x, y


def _expected_shapes(tasks, size=32, batch=2):
    return {
        t.name: (batch, size, size, t.channels) if t.dense else (batch, t.channels)
        for t in tasks
    }


BUILDERS = {
    "hard_sharing": lambda tasks: build_multitask(tasks, **TINY),
    "single_task": lambda tasks: build_single_task(tasks[0], **TINY),
    "mtan": lambda tasks: build_mtan(tasks, **TINY),
}
# Every kind of task once per builder kind, kept small for a 2-core CPU.
BUILDER_TASKS = {
    "hard_sharing": ["segmentation", "depth", "normal", "count"],
    "single_task": ["normal"],
    "mtan": ["depth", "count"],
}


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_builder_outputs_a_dict_keyed_by_task_name_and_trains_a_step(builder):
    keras.utils.set_random_seed(0)
    tasks = scene_tasks(BUILDER_TASKS[builder])
    model = BUILDERS[builder](tasks)
    assert isinstance(model, MultiTaskModel)
    x, y = _batch(tasks)
    out = model(x, training=False)
    got = {name: tuple(value.shape) for name, value in out.items()}
    assert got == _expected_shapes(tasks)

    model.compile(keras.optimizers.SGD(0.1), losses=tasks)
    before = [np.array(v) for v in model.trainable_variables]
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    for t in tasks:
        assert np.isfinite(history.history[f"{t.name}_loss"][0])
    changed = [
        not np.array_equal(b, np.asarray(v))
        for b, v in zip(before, model.trainable_variables, strict=True)
    ]
    assert all(changed), [
        v.path for v, c in zip(model.trainable_variables, changed, strict=True) if not c
    ]


def test_hard_sharing_representation_is_the_shared_encoder_output():
    tasks = scene_tasks()
    model = build_multitask(tasks, input_shape=(64, 64, 3), width=0.125)
    assert tuple(model.representation.shape) == (None, 2, 2, 64)
    assert count_params(model.get_layer("encoder")) == sum(
        9 * a * b + 4 * b for a, b in _paper_convs("vgg16", 0.125)
    )


def test_mtan_masks_equal_the_attention_layer_applied_to_the_encoder_features():
    keras.utils.set_random_seed(0)
    tasks = scene_tasks(["segmentation", "depth"])
    model = build_mtan(tasks, **TINY)
    masks = mtan_mask_model(model)
    x, _ = _batch(tasks)
    got = masks(x, training=False)
    shared = model.get_layer("encoder")(x, training=False)
    for t in tasks:
        assert len(got[t.name]) == 5
        for j, mask in enumerate(got[t.name], start=1):
            assert mask.shape == shared[f"block{j}_last"].shape
            mask = np.asarray(mask)
            assert mask.min() > 0.0 and mask.max() < 1.0
        # block 1 has no previous attended features: a reference call by hand
        _, want = model.get_layer(f"{t.name}_attention_0")(
            shared["block1_first"], shared["block1_last"], return_mask=True
        )
        np.testing.assert_allclose(got[t.name][0], want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"config": "vgg17"}, "unknown VGG config 'vgg17'"),
        ({"width": 0}, "width must be a number > 0"),
        ({"width": -0.5}, "width must be a number > 0"),
        ({"input_shape": (60, 64, 3)}, "height 60 is not a positive multiple of 32"),
        ({"input_shape": (64, 48, 3)}, "width 48 is not a positive multiple of 32"),
        ({"input_shape": (64, 64)}, "expected \\(H, W, C\\)"),
    ],
)
def test_encoder_rejects_bad_arguments_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vgg_encoder(**{"input_shape": (64, 64, 3), **kwargs})


def test_builders_reject_bad_tasks_and_shapes_naming_the_problem():
    seg = Task("segmentation", "segmentation", 5)
    count = Task("count", "classification", 4)
    with pytest.raises(ValueError, match="task names repeat"):
        build_multitask([seg, seg], **TINY)
    with pytest.raises(ValueError, match="tasks is empty"):
        build_multitask([], **TINY)
    with pytest.raises(ValueError, match="MTAN needs known H and W"):
        build_mtan([seg], input_shape=(None, None, 3), width=0.0625)
    with pytest.raises(ValueError, match="height 40 is not a positive multiple"):
        build_single_task(seg, input_shape=(40, 32, 3), width=0.0625)
    features = vgg_encoder("vgg11", (32, 32, 3), width=0.0625).output
    with pytest.raises(ValueError, match="use classification_head"):
        dense_head(features, count)
    with pytest.raises(ValueError, match="use dense_head"):
        classification_head(features, seg)
    with pytest.raises(ValueError, match="features lack"):
        dense_head({"block5_pool": features["block5_pool"]}, seg)


def test_weight_copy_rejects_a_narrow_or_batch_norm_encoder():
    reference = keras.applications.VGG16(
        weights=None, include_top=False, input_shape=(32, 32, 3)
    )
    with pytest.raises(ValueError, match="width=1.0 and batch_norm=False"):
        load_keras_vgg_weights(vgg_encoder("vgg16", (32, 32, 3), width=0.5), reference)
    with pytest.raises(ValueError, match="expected the same VGG config"):
        load_keras_vgg_weights(vgg_encoder("vgg11", (32, 32, 3)), reference)


# ----------------------------------------------------------------- cost


def test_macs_of_a_small_nested_network_match_a_hand_computation():
    inner_in = keras.Input((8, 8, 3))
    inner_out = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inner_in)
    inner = keras.Model(inner_in, inner_out, name="inner")
    inputs = keras.Input((8, 8, 3))
    x = inner(inputs)
    x = keras.layers.Conv2D(4, 3, groups=2, name="grouped")(x)  # 6x6 outputs
    x = keras.layers.MaxPooling2D(name="pool")(x)  # 3x3
    x = keras.layers.Conv2DTranspose(2, 2, strides=2, name="up")(x)  # 6x6
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(5, name="dense")(x)
    model = keras.Model(inputs, outputs)
    hand = {
        "inner/conv": 8 * 8 * 4 * (3 * 3 * 3),  # outputs x taps x c_in
        "grouped": 6 * 6 * 4 * (3 * 3 * 4 // 2),  # each group sees 2 channels
        "up": 3 * 3 * 4 * (2 * 2) * 2,  # inputs x c_in x taps x c_out
        "dense": 6 * 6 * 2 * 5,
    }
    assert macs_by_layer(model) == hand
    assert flops_per_image(model) == 2 * macs_per_image(model) == 2 * sum(hand.values())


def test_training_step_macs_and_exact_gradient_ratio_match_a_hand_count():
    """Shared encoder: two 3x3 convolutions on 8x8 (3 -> 4 -> 4 channels); two
    heads, a 1x1 convolution each. Backward = 2 x forward, except the first
    layer's input gradient."""
    inner_in = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inner_in)
    h = keras.layers.Conv2D(4, 3, padding="same", name="c2")(h)
    encoder = keras.Model(inner_in, h, name="encoder")
    inputs = keras.Input((8, 8, 3))
    z = encoder(inputs)
    outputs = [keras.layers.Conv2D(1, 1, name=f"head{i}")(z) for i in range(2)]
    model = keras.Model(inputs, outputs)
    c1, c2, head = 64 * 4 * 27, 64 * 4 * 36, 64 * 1 * 4
    step = training_step_macs(model)
    assert step == {
        "shared": {"forward": c1 + c2, "backward": c1 + 2 * c2},
        "heads": {"forward": 2 * head, "backward": 4 * head},
    }
    equal = (c1 + c2) + (c1 + 2 * c2) + 6 * head
    for tasks in (1, 2, 5):
        expected = (equal + (tasks - 1) * (c1 + 2 * c2)) / equal
        assert exact_gradient_cost_ratio(step, tasks) == pytest.approx(expected)
    with pytest.raises(ValueError, match="starts with 'trunk/'"):
        training_step_macs(model, shared="trunk")


def test_vgg16_multiply_adds_at_224_match_the_closed_form():
    model = keras.applications.VGG16(
        weights=None, include_top=False, input_shape=(224, 224, 3)
    )
    sizes = [224 // 2**j for j, n in enumerate(PAPER_BLOCKS["vgg16"]) for _ in range(n)]
    convs = sum(
        s * s * 9 * c_in * c_out
        for s, (c_in, c_out) in zip(sizes, _paper_convs("vgg16"), strict=True)
    )
    assert macs_per_image(model) == convs
    # with the dense top (7*7*512*4096 + 4096*4096 + 4096*1000 MACs) this is the
    # paper's "15.5 G" (15.47 G multiply-adds)
    top = 7 * 7 * 512 * 4096 + 4096 * 4096 + 4096 * 1000
    assert math.isclose((convs + top) / 1e9, 15.47, abs_tol=0.005)


def _tensorflow_profiler_flops(model, shape):
    fn = tf.function(lambda x: model(x, training=False))
    graph = convert_variables_to_constants_v2(
        fn.get_concrete_function(tf.TensorSpec((1, *shape), tf.float32))
    ).graph
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    options["account_type_regexes"] = ["Conv2D", "MatMul", "Conv2DBackpropInput"]
    return tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops


def test_flops_of_mtan_with_custom_attention_layers_match_tensorflow_profiler():
    tasks = scene_tasks(["segmentation", "count"])
    model = build_mtan(tasks, config="vgg11", **TINY)
    assert flops_per_image(model) == _tensorflow_profiler_flops(model, (32, 32, 3))


def test_flops_need_a_known_input_size():
    encoder = vgg_encoder("vgg11", (None, None, 3), width=0.0625)
    with pytest.raises(ValueError, match="counting needs the known shape"):
        flops_per_image(encoder)
    fixed = vgg_encoder("vgg11", (32, 32, 3), width=0.0625)
    assert flops_per_image(encoder, input_shape=(32, 32, 3)) == flops_per_image(fixed)


def test_count_params_matches_a_hand_count_and_keras():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3),  # 3*3*3*4 + 4
            keras.layers.BatchNormalization(),  # 4 gamma, 4 beta + 8 moving
        ]
    )
    assert count_params(model) == 112 + 16 == model.count_params()
    assert count_params(model, trainable_only=True) == 112 + 8


def test_measure_latency_returns_the_median_wall_time_of_a_call_sequence():
    def nap(_):
        time.sleep(0.01)

    one = measure_latency(nap, None, repeats=3, warmup=1)
    two = measure_latency([nap, nap], None, repeats=3, warmup=0)
    assert 0.01 <= one < 0.5
    assert 0.02 <= two < 1.0
    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
        measure_latency(nap, None, repeats=0)
