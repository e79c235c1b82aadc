"""MultiTaskModel: fit with every strategy, updates equal to reference computations,
partial labels, errors, and the uncertainty / GradNorm toy problems."""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from mtl_utils import weighting as W
from mtl_utils.losses import loss_for
from mtl_utils.tasks import Task
from mtl_utils.training import MultiTaskModel

TASKS = [
    Task("segmentation", "segmentation", 5),
    Task("depth", "depth", 1),
    Task("normal", "normal", 3),
    Task("count", "classification", 7),
]


def tiny_model(tasks, representation=True, skip=False, tie=False, size=16):
    """Shared trunk (two convolutions, ``trunk*``) and one small head per task.

    ``representation``: ``True`` (the trunk output), ``"inner"`` (the first trunk
    layer's output) or ``False``.
    ``skip``: dense heads also read the first trunk layer (U-Net style).
    ``tie``: the first dense head calls the shared layer ``trunk2`` again.
    """
    inputs = keras.Input((size, size, 3), name="image")
    conv = keras.layers.Conv2D
    h = conv(4, 3, padding="same", activation="relu", name="trunk1")(inputs)
    trunk2 = conv(6, 3, padding="same", activation="relu", name="trunk2")
    z = trunk2(h)
    outputs = {}
    for t in tasks:
        if t.kind == "classification":
            pooled = keras.layers.GlobalAveragePooling2D(name=f"{t.name}_pool")(z)
            outputs[t.name] = keras.layers.Dense(t.channels, name=f"{t.name}_out")(
                pooled
            )
            continue
        a = conv(4, 3, padding="same", activation="relu", name=f"{t.name}_conv")(z)
        if skip:
            a = keras.layers.Concatenate(name=f"{t.name}_skip")([a, h])
        if tie:
            a, tie = trunk2(a), False
        outputs[t.name] = conv(t.channels, 1, name=f"{t.name}_out")(a)
    rep = {True: z, "inner": h, False: None}[representation]
    return MultiTaskModel(inputs, outputs, representation=rep)


def scene_like_batch(n=8, size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size, size, 3)).astype("float32")
    normals = rng.normal(size=(n, size, size, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    y = {
        "segmentation": rng.integers(-1, 5, (n, size, size)).astype("int32"),
        "depth": rng.uniform(0.5, 3.0, (n, size, size, 1)).astype("float32"),
        "normal": normals.astype("float32"),
        "count": rng.integers(-1, 7, (n,)).astype("int32"),
    }
    return x, y


def _copy_weights(model):
    return {v.path: v.numpy().copy() for v in model.trainable_variables}


def reference_task_gradients(model, x, y, tasks):
    """Per-task gradients by separate forward/backward passes (the definition)."""
    out = []
    for t in tasks:
        with tf.GradientTape() as tape:
            loss = loss_for(t)(y[t.name], model(x, training=True)[t.name])
        grads = tape.gradient(
            loss,
            [v.value for v in model.trainable_variables],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        out.append(
            {
                v.path: g.numpy()
                for v, g in zip(model.trainable_variables, grads, strict=True)
            }
        )
    return out


def _is_shared(path):
    return path.startswith("trunk")


def _flat(grads, paths):
    return np.concatenate([grads[p].ravel() for p in paths])


def _assert_sgd_update(model, before, expected_grads, lr, rtol=1e-4):
    for v in model.trainable_variables:
        expected = before[v.path] - lr * expected_grads[v.path]
        np.testing.assert_allclose(
            v.numpy(), expected, rtol=rtol, atol=1e-6, err_msg=v.path
        )


STRATEGIES = {
    "equal": W.EqualWeighting,
    "static": lambda: W.StaticWeighting({"depth": 2.0, "count": 0.5}),
    "uncertainty": W.UncertaintyWeighting,
    "uncertainty_paper": lambda: W.UncertaintyWeighting(form="paper"),
    "dwa": W.DynamicWeightAverage,
    "rlw": lambda: W.RandomLossWeighting(seed=1),
    "gradnorm": W.GradNorm,
    "pcgrad": lambda: W.PCGrad(seed=1),
    "mgda": W.MGDA,
    "mgda_ub": lambda: W.MGDA(upper_bound=True, normalization="loss+"),
    "cagrad": W.CAGrad,
    "imtl": W.IMTL,
    "nash_mtl": W.NashMTL,
    "aligned_mtl": W.AlignedMTL,
    "imtl_l": W.IMTLL,
    "imtl_hybrid": lambda: W.IMTL(loss_scale=True),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_fit_trains_with_every_strategy_and_logs_losses_and_weights(name):
    keras.utils.set_random_seed(0)
    model = tiny_model(TASKS)
    x, y = scene_like_batch()
    model.compile(
        keras.optimizers.Adam(1e-3), losses=TASKS, weighting=STRATEGIES[name]()
    )
    before = _copy_weights(model)
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    logs = history.history
    for t in TASKS:
        assert np.isfinite(logs[f"{t.name}_loss"][0])
        assert np.isfinite(logs[f"weight_{t.name}"][0])
    assert np.isfinite(logs["loss"][0])
    changed = [
        p for p, w in before.items() if not np.allclose(w, _copy_weights(model)[p])
    ]
    assert any(_is_shared(p) for p in changed) and any(
        not _is_shared(p) for p in changed
    )


@pytest.mark.parametrize("name", ["equal", "uncertainty", "pcgrad", "gradnorm"])
def test_fit_traces_the_training_step_once(name, monkeypatch):
    """Batches of one shape need one trace of ``train_step``; a second one (as
    when the optimizer's slots are created inside the first trace) doubles the
    start-up time of every fit."""
    calls = []
    step = MultiTaskModel.train_step

    def counted(self, data):
        calls.append(1)
        return step(self, data)

    monkeypatch.setattr(MultiTaskModel, "train_step", counted)
    keras.utils.set_random_seed(0)
    model = tiny_model(TASKS)
    model.compile(keras.optimizers.Adam(1e-3), losses=TASKS, weighting=name)
    x, y = scene_like_batch()
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert len(calls) == 1


def test_history_records_validation_losses_and_weights_every_epoch():
    keras.utils.set_random_seed(0)
    model = tiny_model(TASKS)
    x, y = scene_like_batch()
    model.compile(
        keras.optimizers.Adam(1e-3), losses=TASKS, weighting=W.DynamicWeightAverage()
    )
    history = model.fit(x, y, batch_size=4, epochs=3, validation_data=(x, y), verbose=0)
    logs = history.history
    for t in TASKS:
        assert len(logs[f"{t.name}_loss"]) == 3
        assert len(logs[f"val_{t.name}_loss"]) == 3
        assert len(logs[f"weight_{t.name}"]) == 3
        assert f"val_weight_{t.name}" not in logs
    # DWA (Liu et al. 2019): weight 1 in epochs 1 and 2, then the formula applied to
    # the epoch-averaged losses of epochs 1 and 2 as logged in History.
    r = np.array([logs[f"{t.name}_loss"][1] / logs[f"{t.name}_loss"][0] for t in TASKS])
    expected = 4 * np.exp(r / 2) / np.exp(r / 2).sum()
    got = np.array([logs[f"weight_{t.name}"] for t in TASKS])
    np.testing.assert_allclose(got[:, :2], 1.0)
    np.testing.assert_allclose(got[:, 2], expected, rtol=1e-4)


def test_validation_loss_equals_loss_computed_directly():
    keras.utils.set_random_seed(0)
    model = tiny_model(TASKS)
    x, y = scene_like_batch()
    model.compile("sgd", losses=TASKS)
    logs = model.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    pred = model(x, training=False)
    for t in TASKS:
        np.testing.assert_allclose(
            logs[f"{t.name}_loss"], loss_for(t)(y[t.name], pred[t.name]), rtol=1e-5
        )


# --------------------------------------------------------- updates vs references

TWO = [TASKS[1], TASKS[0]]  # depth, segmentation


@pytest.mark.parametrize(
    "representation, skip, tie",
    [
        (True, False, False),
        (False, False, False),
        (True, True, False),
        (True, False, True),
    ],
    ids=["representation", "no-representation", "skip-connections", "tied-weights"],
)
def test_pcgrad_step_equals_reference_projection_of_separate_task_gradients(
    representation, skip, tie
):
    keras.utils.set_random_seed(1)
    model = tiny_model(TWO, representation=representation, skip=skip, tie=tie)
    x, y = scene_like_batch(4)
    lr = 0.5
    model.compile(keras.optimizers.SGD(lr), losses=TWO, weighting=W.PCGrad(seed=0))
    assert model._mtl.info["boundary_ok"] == (not tie)  # tied: Jacobian path
    before = _copy_weights(model)
    grads = reference_task_gradients(model, x, y, TWO)
    shared = [p for p in before if _is_shared(p)]
    g1, g2 = _flat(grads[0], shared), _flat(grads[1], shared)
    if g1 @ g2 < 0:  # Yu et al. 2020 for two tasks
        d = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g1 @ g2) / (g1 @ g1) * g1)
    else:
        d = g1 + g2
    expected, start = {}, 0
    for p in shared:
        expected[p] = d[start : start + before[p].size].reshape(before[p].shape)
        start += before[p].size
    for p in before:
        if not _is_shared(p):
            expected[p] = grads[0][p] + grads[1][p]  # each head: its own gradient
    model.train_on_batch(x, y)
    _assert_sgd_update(model, before, expected, lr)


def test_task_gradients_match_separate_backward_passes():
    keras.utils.set_random_seed(2)
    model = tiny_model(TASKS, representation=False)
    x, y = scene_like_batch(4)
    model.compile("sgd", losses=TASKS)
    G, _ = model.task_gradients(x, y)
    paths = [v.path for v in model._mtl.info["shared_vars"]]
    assert paths == ["trunk1/kernel", "trunk1/bias", "trunk2/kernel", "trunk2/bias"]
    ref = []
    for t in TASKS:
        with tf.GradientTape() as tape:
            loss = loss_for(t)(y[t.name], model(x, training=False)[t.name])
        vs = model._mtl.info["shared_vars"]
        ref.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, vs)]))
    np.testing.assert_allclose(G, np.stack(ref), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("representation", [True, "inner"])
def test_mgda_ub_step_uses_min_norm_weights_of_representation_gradients(
    representation,
):
    keras.utils.set_random_seed(3)
    model = tiny_model(TWO, representation=representation)
    x, y = scene_like_batch(4)
    lr = 0.5
    model.compile(
        keras.optimizers.SGD(lr), losses=TWO, weighting=W.MGDA(upper_bound=True)
    )
    before = _copy_weights(model)
    # Reference: gradients of each loss w.r.t. z by separate passes, then the
    # two-task closed form of Sener and Koltun 2018.
    probe = keras.Model(model.input, [model.representation, model.output])
    zg = []
    for t in TWO:
        with tf.GradientTape() as tape:
            z, out = probe(x, training=True)
            tape.watch(z)
            loss = loss_for(t)(y[t.name], out[t.name])
        zg.append(tape.gradient(loss, z).numpy().ravel())
    g1, g2 = zg
    gamma = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
    alpha = (gamma, 1 - gamma)
    grads = reference_task_gradients(model, x, y, TWO)
    expected = {p: alpha[0] * grads[0][p] + alpha[1] * grads[1][p] for p in before}
    model.train_on_batch(x, y)
    _assert_sgd_update(model, before, expected, lr)


def test_update_every_reuses_the_last_mgda_weights_between_recomputations():
    keras.utils.set_random_seed(8)
    model = tiny_model(TWO)
    x, y = scene_like_batch(4)
    lr = 0.2
    model.compile(
        keras.optimizers.SGD(lr), losses=TWO, weighting=W.MGDA(update_every=2)
    )
    shared = [v.path for v in model.trainable_variables if _is_shared(v.path)]
    alpha = None
    for step in range(3):
        before = _copy_weights(model)
        grads = reference_task_gradients(model, x, y, TWO)
        if step % 2 == 0:  # recomputed: two-task closed form (Sener and Koltun)
            g1, g2 = (_flat(g, shared) for g in grads)
            gamma = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
            alpha = (gamma, 1 - gamma)
        expected = {p: alpha[0] * grads[0][p] + alpha[1] * grads[1][p] for p in before}
        model.train_on_batch(x, y)
        _assert_sgd_update(model, before, expected, lr)


def test_gradnorm_first_step_matches_chen_et_al_update_of_the_weights():
    keras.utils.set_random_seed(4)
    model = tiny_model(TWO)
    x, y = scene_like_batch(4)
    lr, w_lr, alpha = 0.1, 0.01, 1.5
    strategy = W.GradNorm(alpha=alpha, optimizer=keras.optimizers.SGD(w_lr))
    model.compile(keras.optimizers.SGD(lr), losses=TWO, weighting=strategy)
    assert model._mtl.info["last_layer"].name == "trunk2"
    before = _copy_weights(model)
    grads = reference_task_gradients(model, x, y, TWO)
    layer = ["trunk2/kernel", "trunk2/bias"]
    norms = np.array([np.linalg.norm(_flat(g, layer)) for g in grads])
    # Step 0: w = 1 and L(0) = L, so r_i = 1 and the target is mean(G).
    w = np.ones(2) - w_lr * np.sign(norms - norms.mean()) * norms
    w = w * 2 / w.sum()
    expected = {p: grads[0][p] + grads[1][p] for p in before}
    model.train_on_batch(x, y)
    _assert_sgd_update(model, before, expected, lr)
    np.testing.assert_allclose(strategy.weights.numpy(), w, rtol=1e-5)


def test_uncertainty_weighting_step_trains_log_variances_with_kendall_gradient():
    keras.utils.set_random_seed(5)
    model = tiny_model(TWO)
    x, y = scene_like_batch(4)
    lr = 0.1
    strategy = W.UncertaintyWeighting()
    model.compile(keras.optimizers.SGD(lr), losses=TWO, weighting=strategy)
    before = _copy_weights(model)
    pred = model(x, training=True)
    losses = np.array([float(loss_for(t)(y[t.name], pred[t.name])) for t in TWO])
    grads = reference_task_gradients(model, x, y, TWO)
    expected = {p: 0.5 * (grads[0][p] + grads[1][p]) for p in before}  # s = 0
    model.train_on_batch(x, y)
    _assert_sgd_update(model, before, expected, lr)
    # d/ds [0.5 exp(-s) L + 0.5 s] = 0.5 - 0.5 L at s = 0
    np.testing.assert_allclose(
        strategy.log_variance.numpy(), -lr * (0.5 - 0.5 * losses), rtol=1e-5
    )


# --------------------------------------------------------------- partial labels


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_batch_without_labels_for_a_task_leaves_its_head_unchanged(name):
    keras.utils.set_random_seed(6)
    model = tiny_model(TASKS)
    x, y = scene_like_batch(4)
    y["count"][:] = -1  # nobody in this batch has a count label
    model.compile(keras.optimizers.SGD(0.1), losses=TASKS, weighting=STRATEGIES[name]())
    before = _copy_weights(model)
    logs = model.train_on_batch(x, y, return_dict=True)
    after = _copy_weights(model)
    assert all(np.all(np.isfinite(w)) for w in after.values())
    np.testing.assert_array_equal(after["count_out/kernel"], before["count_out/kernel"])
    assert logs["count_loss"] == 0.0
    assert logs["weight_count"] == 0.0  # one rule: an absent task's weight is 0
    assert not np.allclose(after["trunk2/kernel"], before["trunk2/kernel"])


def test_gradnorm_weights_stay_in_range_when_a_task_is_absent_from_the_first_batch():
    """Chen et al.'s ratios L_i / L_i(0) need a real first loss: a task without
    labels in the first batch takes its L_i(0) from its first labelled batch."""
    keras.utils.set_random_seed(2)
    model = tiny_model(TASKS)
    x, y = scene_like_batch(16)
    y["count"][:4] = -1  # no count labels in the first batch
    y["count"][4:] = np.maximum(y["count"][4:], 0)
    strategy = W.GradNorm(optimizer=keras.optimizers.Adam(0.05))
    model.compile(keras.optimizers.Adam(1e-3), losses=TASKS, weighting=strategy)
    history = model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
    weights = strategy.weights.numpy()
    assert np.all(np.isfinite(weights))
    assert np.all(weights >= 0.05) and np.all(weights <= len(TASKS)), weights
    assert strategy.initial_losses.numpy()[3] > 0  # count: its first labelled loss
    for t in TASKS:
        assert np.all(np.isfinite(history.history[f"weight_{t.name}"]))


def test_saved_model_reloads_with_its_representation_and_predictions(tmp_path):
    keras.utils.set_random_seed(9)
    model = tiny_model(TASKS, skip=True)
    x, y = scene_like_batch(4)
    model.compile("adam", losses=TASKS, weighting=W.GradNorm())
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(loaded, MultiTaskModel)
    assert loaded.representation.shape == model.representation.shape
    expected, got = model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    for t in TASKS:
        np.testing.assert_allclose(got[t.name], expected[t.name], rtol=1e-6)
    loaded.compile("adam", losses=TASKS, weighting=W.GradNorm())
    assert loaded._mtl.info["last_layer"].name == "trunk2"


# ------------------------------------------------------------------------ errors


def test_unknown_task_name_in_losses_lists_the_model_outputs():
    model = tiny_model(TASKS[:2])
    with pytest.raises(
        ValueError,
        match=r"unknown task\(s\) \['normals'\].*\['segmentation', 'depth'\]",
    ):
        model.compile("adam", losses={"normals": "mse", "depth": "mae"})


def test_gradnorm_without_representation_asks_for_it():
    model = tiny_model(TASKS[:2], representation=False)
    with pytest.raises(ValueError, match="representation="):
        model.compile("adam", losses=TASKS[:2], weighting=W.GradNorm())


def test_outputs_must_be_a_dict_keyed_by_task():
    inputs = keras.Input((4,))
    with pytest.raises(ValueError, match=r"dict \{task_name: tensor\}"):
        MultiTaskModel(inputs, [keras.layers.Dense(1)(inputs)])


def test_representation_must_feed_every_task():
    inputs = keras.Input((4,))
    z = keras.layers.Dense(3)(inputs)
    outputs = {"a": keras.layers.Dense(1)(z), "b": keras.layers.Dense(1)(inputs)}
    with pytest.raises(
        ValueError, match="output 'b' does not depend on the representation"
    ):
        MultiTaskModel(inputs, outputs, representation=z)


def test_missing_target_for_a_task_is_a_clear_error():
    model = tiny_model(TASKS[:2])
    x, y = scene_like_batch(4)
    model.compile("adam", losses=TASKS[:2])
    with pytest.raises(ValueError, match=r"no target for task\(s\) \['depth'\]"):
        model.train_on_batch(x, {"segmentation": y["segmentation"]})


def test_nan_loss_stops_training_with_a_message_naming_the_task():
    keras.utils.set_random_seed(7)
    model = tiny_model(TASKS)
    x, y = scene_like_batch(8)
    y["depth"][4:] = np.nan  # the second batch has NaN depth targets
    model.compile(keras.optimizers.Adam(1e-3), losses=TASKS)
    # NumPy targets are checked before training: the error names task and sample
    with pytest.raises(ValueError, match=r"task 'depth'.*NaN.*first in sample 4"):
        model.fit(x, y, batch_size=4, epochs=5, shuffle=False, verbose=0)
    # a tf.data pipeline is not checked up front: the step finds the NaN loss
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    with pytest.warns(RuntimeWarning, match=r"depth.*epoch 1, batch 2"):
        history = model.fit(ds, epochs=5, verbose=0)
    assert len(history.history["loss"]) == 1
    assert "depth" in model.nan_loss_message


# ---------------------------------------------------------------- toy problems


def _mse(y_true, y_pred):
    return ops.mean(ops.square(y_true - y_pred))


def test_uncertainty_weighting_learns_sigma_equal_to_each_task_residual_noise():
    # Kendall et al. 2018: with L = MSE, 0.5 exp(-s) L + 0.5 s is minimal at
    # exp(s) = sigma^2 = L, so the learned sigma tracks each task's residual error.
    rng = np.random.default_rng(0)
    n, d = 1024, 4
    x = rng.normal(size=(n, d)).astype("float32")
    noise = {"a": 0.5, "b": 2.0}
    y = {
        k: (x @ rng.normal(size=(d, 1)) + s * rng.normal(size=(n, 1))).astype("float32")
        for k, s in noise.items()
    }
    keras.utils.set_random_seed(0)
    inputs = keras.Input((d,))
    z = keras.layers.Dense(8, name="trunk")(inputs)
    outputs = {k: keras.layers.Dense(1, name=f"head_{k}")(z) for k in noise}
    model = MultiTaskModel(inputs, outputs, representation=z)
    strategy = W.UncertaintyWeighting()
    model.compile(
        keras.optimizers.Adam(0.05), losses={"a": _mse, "b": _mse}, weighting=strategy
    )
    model.fit(x, y, batch_size=128, epochs=30, verbose=0)
    pred = model.predict(x, verbose=0)
    residual = np.array([np.sqrt(np.mean((pred[k] - y[k]) ** 2)) for k in ("a", "b")])
    sigma = np.asarray(strategy.sigma)
    np.testing.assert_allclose(sigma / residual, 1.0, atol=0.1)
    np.testing.assert_allclose(sigma[1] / sigma[0], residual[1] / residual[0], rtol=0.1)


def test_gradnorm_balances_training_rates_better_than_equal_weighting():
    # Chen et al. 2018, Section 4: regression tasks sigma_i tanh((B + eps_i) x) with
    # scales 1 and 100 sharing a 4-layer ReLU trunk.
    rng = np.random.default_rng(0)
    d_in, d_out, n = 50, 20, 2000
    base = rng.normal(0, 10, (d_in, d_out))
    x = (rng.normal(size=(n, d_in)) / np.sqrt(d_in)).astype("float32")
    y = {
        f"t{i}": (s * np.tanh(x @ (base + rng.normal(0, 3.5, (d_in, d_out))))).astype(
            "float32"
        )
        for i, s in enumerate((1.0, 100.0))
    }

    def spread(strategy):
        keras.utils.set_random_seed(1)
        inputs = keras.Input((d_in,))
        h = inputs
        for k in range(4):
            h = keras.layers.Dense(64, activation="relu", name=f"trunk{k}")(h)
        outputs = {k: keras.layers.Dense(d_out, name=f"head_{k}")(h) for k in y}
        model = MultiTaskModel(inputs, outputs, representation=h)
        model.compile(
            keras.optimizers.Adam(3e-3), losses={k: _mse for k in y}, weighting=strategy
        )
        initial = model.evaluate(x, y, batch_size=500, verbose=0, return_dict=True)
        logs = model.fit(x, y, batch_size=200, epochs=10, verbose=0).history
        # L_i(t) / L_i(0) per epoch; spread across tasks over the last five epochs
        ratios = np.stack(
            [np.array(logs[f"{k}_loss"]) / initial[f"{k}_loss"] for k in y], 1
        )
        return float(np.mean((ratios.max(1) - ratios.min(1))[5:]))

    equal = spread(W.EqualWeighting())
    gradnorm = spread(W.GradNorm(alpha=0.12, optimizer=keras.optimizers.Adam(0.025)))
    assert gradnorm < 0.5 * equal, (gradnorm, equal)


@pytest.mark.parametrize("compile_first", [True, False])
def test_save_weights_resumes_the_strategy_like_uninterrupted_training(
    tmp_path, compile_first
):
    """Reference: the same run without interruption. Two steps, save, one more
    step; a fresh model that loads the file (before or after compile) and takes
    the third step must end with the same weights and GradNorm weights. Without
    the strategy's state it would restart GradNorm from weights 1 and step 0."""
    x, y = scene_like_batch()

    def fresh():
        keras.utils.set_random_seed(0)
        return tiny_model(TASKS)

    def compile_(model):
        model.compile(keras.optimizers.SGD(0.05), losses=TASKS, weighting="gradnorm")

    model = fresh()
    compile_(model)
    for _ in range(2):
        model.train_on_batch(x, y)
    path = tmp_path / "run.weights.h5"
    model.save_weights(path)
    saved_gradnorm = model.weighting.weights.numpy()
    assert np.max(np.abs(saved_gradnorm - 1.0)) > 1e-4  # GradNorm has moved
    model.train_on_batch(x, y)

    resumed = fresh()
    if compile_first:
        compile_(resumed)
        resumed.load_weights(path)
    else:
        resumed.load_weights(path)
        compile_(resumed)
    np.testing.assert_array_equal(resumed.weighting.weights.numpy(), saved_gradnorm)
    resumed.train_on_batch(x, y)
    np.testing.assert_allclose(
        resumed.weighting.weights.numpy(), model.weighting.weights.numpy(), atol=1e-6
    )
    for a, b in zip(resumed.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_loading_another_strategys_state_warns_with_both_shapes(tmp_path):
    keras.utils.set_random_seed(0)
    model = tiny_model(TASKS)
    model.compile(keras.optimizers.SGD(0.05), losses=TASKS, weighting="gradnorm")
    path = tmp_path / "gradnorm.weights.h5"
    model.save_weights(path)
    other = tiny_model(TASKS)
    other.compile(keras.optimizers.SGD(0.05), losses=TASKS, weighting="equal")
    with pytest.warns(
        UserWarning, match=r"shapes \[\(4,\), \(4,\), \(4,\), \(\), \(\)\]"
    ):
        other.load_weights(path)
    np.testing.assert_array_equal(other.get_weights()[0], model.get_weights()[0])


def test_dwa_resumed_from_save_weights_updates_like_uninterrupted_training(tmp_path):
    """DWA's weights after epoch 3 use the losses of epochs 2 and 3; a run
    resumed after epoch 2 from ``save_weights`` must know epoch 2's losses
    (reference: three epochs without interruption)."""
    x, y = scene_like_batch()

    def fresh():
        keras.utils.set_random_seed(0)
        model = tiny_model(TASKS)
        model.compile(keras.optimizers.SGD(0.05), losses=TASKS, weighting="dwa")
        return model

    def fit(model, epochs):
        model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, verbose=0)

    reference = fresh()
    fit(reference, 3)
    first = fresh()
    fit(first, 2)
    first.save_weights(tmp_path / "dwa.weights.h5")
    resumed = fresh()
    resumed.load_weights(tmp_path / "dwa.weights.h5")
    fit(resumed, 1)
    expected = reference.weighting.weights.numpy()
    assert np.max(np.abs(expected - first.weighting.weights.numpy())) > 1e-4
    np.testing.assert_allclose(resumed.weighting.weights.numpy(), expected, atol=1e-6)


# ------------------------------------------------ the gradient step's named pieces


def _per_task_gradients(model, x, y):
    """The gradient step's forward pass, scaled losses and per-task gradients."""
    from mtl_utils.training import _TaskGradients

    st = model._mtl
    share, _ = model._replica_shares(model._labelled_counts(x, y))
    with tf.GradientTape(persistent=True) as tape:
        outputs, cut = model._split_forward(tape, x)
        scaled, _ = model._scaled_task_losses(model._task_losses(y, outputs), share)
        scaled_vec = ops.stack(scaled)
    heads = [st.info["head_vars"][t] for t in model.task_names]
    return _TaskGradients(tape, cut, scaled, scaled_vec, heads), cut


@pytest.mark.parametrize("variant", ["plain", "skip", "tie"])
def test_per_task_gradient_pieces_equal_separate_backward_passes(variant):
    keras.utils.set_random_seed(4)
    model = tiny_model(TASKS, skip=variant == "skip", tie=variant == "tie")
    model.compile(keras.optimizers.SGD(0.1), losses=TASKS, weighting=W.PCGrad())
    x, y = scene_like_batch(4)
    grads, cut = _per_task_gradients(model, x, y)
    # staged through 1 or 2 boundary tensors (U-Net skip), or the Jacobian path
    assert (cut.staged, len(cut.boundary)) == {
        "plain": (True, 1),
        "skip": (True, 2),
        "tie": (False, 0),
    }[variant]
    ref = reference_task_gradients(model, x, y, TASKS)
    shared = model._mtl.info["shared_vars"]
    G_ref = np.stack([_flat(r, [v.path for v in shared]) for r in ref])
    G = np.asarray(grads.matrix(shared))
    np.testing.assert_allclose(G, G_ref, rtol=1e-4, atol=1e-7)
    coef = np.array([0.5, 2.0, 0.0, 1.5], "float32")
    got = np.concatenate(
        [np.ravel(g) for g in grads.weighted(ops.convert_to_tensor(coef), shared)]
    )
    np.testing.assert_allclose(got, coef @ G_ref, rtol=1e-4, atol=1e-7)
    for t, r, head in zip(TASKS, ref, grads.heads(), strict=True):
        head_vars = model._mtl.info["head_vars"][t.name]
        for v, g in zip(head_vars, head, strict=True):
            np.testing.assert_allclose(g, r[v.path], rtol=1e-4, atol=1e-7)


def test_scaled_task_losses_carry_the_loss_scale_and_label_share():
    keras.utils.set_random_seed(5)
    model = tiny_model(TWO)
    scale = 2.0**10
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1), initial_scale=scale
    )
    model.compile(optimizer, losses=TWO, weighting=W.PCGrad())
    losses = [ops.convert_to_tensor(0.75), ops.convert_to_tensor(3.0)]
    share = ops.convert_to_tensor([1.0, 0.25])
    scaled, factor = model._scaled_task_losses(losses, share)
    assert float(factor) == scale  # one replica: factor = loss scale
    np.testing.assert_allclose([float(s) for s in scaled], [0.75 * scale, 0.75 * scale])
    # The strategy reads gradients at true scale: the scale divided out again.
    local = np.arange(6, dtype="float32").reshape(2, 3) * scale
    np.testing.assert_allclose(model._global_task_matrix(local, factor), local / scale)


def test_strategy_coefficients_are_mgda_closed_form_and_finite_for_nan_gradients():
    keras.utils.set_random_seed(6)
    model = tiny_model(TWO)
    model.compile(keras.optimizers.SGD(0.1), losses=TWO, weighting=W.MGDA())
    g1, g2 = np.array([1.0, 0.0, 2.0]), np.array([-1.0, 1.0, 0.5])
    G = np.stack([g1, g2]).astype("float32")
    gram = ops.convert_to_tensor(G @ G.T)
    losses, present = ops.ones((2,)), ops.ones((2,))
    shared, heads = model._coefficients(gram, losses, ops.convert_to_tensor(G), present)
    gamma = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)  # Sener & Koltun
    np.testing.assert_allclose(shared, [gamma, 1 - gamma], rtol=1e-5)
    # A non-finite Gram matrix gets the identity as stand-in: orthonormal
    # gradients, whose min-norm point weighs both tasks 1/2.
    nan = ops.convert_to_tensor(np.full((2, 2), np.nan, "float32"))
    shared, _ = model._coefficients(nan, losses, ops.convert_to_tensor(G), present)
    np.testing.assert_allclose(shared, [0.5, 0.5], rtol=1e-5)


def test_no_method_of_multitaskmodel_exceeds_80_lines():
    lengths = {}
    for name, member in vars(MultiTaskModel).items():
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if isinstance(member, property):
            member = member.fget
        if inspect.isfunction(member):
            lengths[name] = len(inspect.getsourcelines(member)[0])
    assert len(lengths) > 30  # every method was found, decorators included
    too_long = {name: n for name, n in lengths.items() if n > 80}
    assert not too_long, f"methods over 80 lines (name them as pieces): {too_long}"
    step = lengths["_gradient_step"]
    assert step <= 50, f"_gradient_step has {step} lines; its main path should be ~40"
