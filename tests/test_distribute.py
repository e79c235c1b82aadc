"""MultiTaskModel under tf.distribute and mixed precision.

TensorFlow fixes its devices when it first runs an op, so every test runs its
TensorFlow part in a fresh subprocess (this file run as a script, see the bottom)
that configures two logical CPU devices first; the subprocess saves arrays and the
test compares them here with NumPy references. The pytest process never runs a
TensorFlow op for these tests (one test imports TensorFlow's cluster resolver).

References: one step on the *global* batch without a strategy (the definition of
data-parallel training), and PCGrad (Yu et al. 2020, Algorithm 1) written in NumPy
on per-task gradients taken with separate ``tf.GradientTape`` passes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
TOL = 1e-5  # max |weight difference| for "the same weights"
LR = 0.05  # SGD learning rate of every step here
SIZE, BATCH = 32, 8  # the smallest VGG input; the global batch (two halves of 4)


# ----------------------------------------------------------------- subprocesses


def run_script(case: str, out: Path, timeout: float = 300) -> None:
    """Run ``python tests/test_distribute.py case out`` in a clean process."""
    env = {
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        [sys.executable, str(HERE), case, str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def load_case(out: Path, name: str) -> dict:
    """Arrays and metadata one case of the subprocess saved."""
    meta = json.loads((out / f"{name}.json").read_text())
    assert "error" not in meta, f"case {name!r} failed: {meta.get('error')}"
    arrays = np.load(out / f"{name}.npz")
    return {"meta": meta, **{k: arrays[k] for k in arrays.files}}


def weights(case: dict, prefix: str) -> list[np.ndarray]:
    return [case[f"{prefix}_{i}"] for i in range(case["meta"]["num_vars"])]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------- NumPy references


def pcgrad_reference(g1: np.ndarray, g2: np.ndarray) -> np.ndarray:
    """PCGrad of two flattened gradients (Yu et al. 2020, Alg. 1), NumPy."""
    p1, p2 = g1.copy(), g2.copy()
    dot = float(g1 @ g2)
    if dot < 0:  # each projected onto the normal plane of the other's original
        p1 = g1 - dot / float(g2 @ g2) * g2
        p2 = g2 - dot / float(g1 @ g1) * g1
    return p1 + p2


def reference_step(case: dict, rows: str, surgery: str) -> list[np.ndarray]:
    """One SGD step from the initial weights with NumPy-combined gradients.

    ``rows``: which per-task gradients: ``"full"`` (the global batch) or
    ``"halves"`` (each replica's half). ``surgery``: ``"sum"`` (equal weighting)
    or ``"pcgrad"`` on the shared parameters (heads always get their own task's
    gradient). With ``"halves"`` the combination is applied to each half and
    the results averaged: gradient surgery *per replica*.
    """
    n = case["meta"]["num_vars"]
    shared = np.asarray(case["meta"]["shared"], bool)
    parts = ["full"] if rows == "full" else ["half0", "half1"]
    total = [np.zeros_like(w) for w in weights(case, "init")]
    for part in parts:
        ga = [case[f"grad_{part}_a_{i}"] for i in range(n)]
        gb = [case[f"grad_{part}_b_{i}"] for i in range(n)]
        flat_a = np.concatenate([ga[i].ravel() for i in range(n) if shared[i]])
        flat_b = np.concatenate([gb[i].ravel() for i in range(n) if shared[i]])
        if surgery == "pcgrad":
            combined = pcgrad_reference(flat_a, flat_b)
        else:
            combined = flat_a + flat_b
        start = 0
        for i in range(n):
            if shared[i]:
                size = ga[i].size
                g = combined[start : start + size].reshape(ga[i].shape)
                start += size
            else:
                g = ga[i] + gb[i]  # a head variable belongs to one task only
            total[i] += g / len(parts)
    return [w - LR * g for w, g in zip(weights(case, "init"), total, strict=True)]


# ------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """One subprocess with two logical CPUs runs every MirroredStrategy case."""
    out = tmp_path_factory.mktemp("mirrored")
    run_script("mirrored", out)
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One subprocess runs the mixed-precision cases (one CPU device)."""
    out = tmp_path_factory.mktemp("mixed")
    run_script("mixed", out)
    return out


def test_mirrored_step_equals_single_device_step_for_equal_weighting(mirrored):
    case = load_case(mirrored, "equal")
    reference = reference_step(case, "full", "sum")
    single, replicated = weights(case, "single"), weights(case, "mirrored")
    assert case["meta"]["replicas"] == 2
    assert max_diff(single, reference) < TOL
    assert max_diff(replicated, single) < TOL
    assert max_diff(replicated, reference) < TOL
    assert max_diff(replicated, weights(case, "init")) > 100 * TOL  # it trained


def test_mirrored_pcgrad_does_surgery_on_global_not_per_replica_gradients(mirrored):
    case = load_case(mirrored, "pcgrad")
    meta = case["meta"]
    # The batch is built so that the halves disagree: on replica 0 the tasks'
    # gradients are nearly opposite, on replica 1 they are identical ...
    assert meta["cosine_half0"] < -0.9
    assert meta["cosine_half1"] > 0.999
    assert meta["cosine_full"] < 0  # ... and on the global batch they conflict.
    global_ref = reference_step(case, "full", "pcgrad")
    per_replica_ref = reference_step(case, "halves", "pcgrad")
    # Per-replica surgery is a different algorithm: far more than the tolerance.
    assert max_diff(global_ref, per_replica_ref) > 100 * TOL
    single, replicated = weights(case, "single"), weights(case, "mirrored")
    assert max_diff(single, global_ref) < TOL
    assert max_diff(replicated, global_ref) < TOL
    assert max_diff(replicated, per_replica_ref) > 100 * TOL
    # the logged coefficients are those of the global batch on both
    np.testing.assert_allclose(meta["coef_mirrored"], meta["coef_single"], rtol=1e-4)


def test_mirrored_step_with_partial_labels_weights_replicas_by_label_count(mirrored):
    """Replica 0 holds far fewer depth labels than replica 1: the global loss is a
    mean over the global batch's labelled pixels, not a mean of replica means.
    (Needs the training.py patch in briefs/training_patch.diff.)"""
    case = load_case(mirrored, "partial")
    counts = case["meta"]["label_counts"]
    assert counts["a"][0] < counts["a"][1] and counts["b"][0] != counts["b"][1]
    reference = reference_step(case, "full", "sum")
    assert max_diff(weights(case, "single"), reference) < TOL
    assert max_diff(weights(case, "mirrored"), reference) < TOL
    # logged losses are the global batch's too
    for key, value in case["meta"]["logs_single"].items():
        np.testing.assert_allclose(case["meta"]["logs_mirrored"][key], value, rtol=1e-5)


def test_keras_loss_objects_are_not_divided_by_replicas_twice(mirrored):
    """Keras losses scale themselves by 1 / replicas under a strategy; the model
    must not scale them again. (Needs the training.py patch.)"""
    case = load_case(mirrored, "keras_losses")
    single = weights(case, "single")
    assert max_diff(single, reference_step(case, "full", "sum")) < TOL
    assert max_diff(weights(case, "mirrored"), single) < TOL


def test_multi_worker_mirrored_workers_end_with_identical_weights(tmp_path):
    """Two worker processes on 127.0.0.1 (TF_CONFIG) train three PCGrad steps; each
    feeds its half of every global batch. Both end with the same weights, equal
    to three single-process steps on the global batches."""
    from mtl_utils.distribute import launch_local_workers

    env = {
        "KERAS_BACKEND": "tensorflow",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "PYTHONPATH": str(ROOT),
    }
    reference = subprocess.Popen(
        [sys.executable, str(HERE), "multiworker_reference", str(tmp_path)],
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    launch_local_workers(
        [sys.executable, str(HERE), "worker", str(tmp_path)],
        num_workers=2,
        env=env,
        cwd=ROOT,
        timeout=240,
    )
    _, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err[-3000:]
    import h5py

    def read(path):
        arrays = []
        with h5py.File(path, "r") as f:
            f.visititems(
                lambda name, obj: (
                    arrays.append((name, obj[()]))
                    if isinstance(obj, h5py.Dataset)
                    else None
                )
            )
        return [a for _, a in sorted(arrays, key=lambda item: item[0])]

    w0 = read(tmp_path / "worker0.weights.h5")
    w1 = read(tmp_path / "worker1.weights.h5")
    ref = read(tmp_path / "reference.weights.h5")
    init = read(tmp_path / "init.weights.h5")
    assert len(w0) == len(w1) == len(ref) == len(init) > 0
    assert max_diff(w0, w1) < 1e-7  # identical up to float32 rounding
    assert max_diff(w0, ref) < TOL
    assert max_diff(w0, init) > 100 * TOL


def test_mixed_float16_pcgrad_gives_the_float32_coefficients(mixed):
    """Loss scaling is undone before PCGrad compares gradients: under
    "mixed_float16" the combination coefficients and the step equal float32's
    (float16 rounding aside)."""
    case = load_case(mixed, "pcgrad")
    meta = case["meta"]
    assert meta["policy_mixed"] == "mixed_float16" and meta["loss_scaled"]
    assert min(meta["coef_float32"]) > 1.05  # projections happened
    np.testing.assert_allclose(meta["coef_mixed"], meta["coef_float32"], rtol=5e-3)
    init = weights(case, "init")
    step32 = [w - i for w, i in zip(weights(case, "float32"), init, strict=True)]
    step16 = [w - i for w, i in zip(weights(case, "mixed"), init, strict=True)]
    scale = max(float(np.max(np.abs(s))) for s in step32)
    assert max_diff(step16, step32) < 0.02 * scale


def test_mixed_float16_nash_mtl_weights_do_not_see_the_loss_scale(mixed):
    """Nash-MTL's weights scale as 1 / |G|: a Gram matrix of scaled gradients would
    shrink them by the loss scale (2**12 here). They equal float32's instead."""
    meta = load_case(mixed, "nash")["meta"]
    np.testing.assert_allclose(meta["coef_mixed"], meta["coef_float32"], rtol=5e-3)


def test_mixed_float16_trains_gradnorm_and_mgda_ub(mixed):
    """Strategies that back-propagate combined float16 boundary gradients (GradNorm,
    MGDA-UB) train under mixed precision and match float32. (Needs the patch.)"""
    for name in ("gradnorm", "mgda_ub"):
        meta = load_case(mixed, name)["meta"]
        np.testing.assert_allclose(
            meta["coef_mixed"], meta["coef_float32"], rtol=5e-3, err_msg=name
        )


def test_overflowing_step_is_skipped_by_optimizer_and_strategy(mixed):
    """A loss scale of 2**30 overflows float16: the optimizer skips the step and
    lowers the scale; the strategy keeps its state (no NaN in GradNorm's
    weights) and Nash-MTL's solver does not fail. (Needs the patch.)"""
    case = load_case(mixed, "overflow")
    meta = case["meta"]
    assert meta["scale_after"] < 2.0**30
    assert max_diff(weights(case, "after"), weights(case, "init")) == 0.0
    assert meta["gradnorm_weights"] == [1.0, 1.0]
    assert meta["nash_finished"]


def test_strategy_skips_a_step_when_only_head_gradients_overflow(mixed):
    """The optimizer skips a step if *any* gradient overflows float16, including
    a head's; GradNorm's weights must then stay as they were, although the shared
    gradients it looks at are finite. The control step (no overflow) shows the
    same weights do move: the test can fail."""
    meta = load_case(mixed, "head_overflow")["meta"]
    assert meta["overflow_scale_after"] < 2.0**8  # the optimizer saw an overflow
    assert meta["overflow_moved"] == 0.0  # and skipped the step
    assert meta["overflow_weights"] == [1.0, 1.0]
    assert meta["control_scale_after"] == 1.0
    assert meta["control_moved"] > 0.0
    assert abs(meta["control_weights"][0] - meta["control_weights"][1]) > 1e-3


def test_logical_devices_cannot_change_after_tensorflow_started(mirrored):
    """Asking again for the same two devices is fine; for three, the error says
    to configure them before the first op."""
    meta = load_case(mirrored, "devices")["meta"]
    assert meta["devices"] == ["/device:CPU:0", "/device:CPU:1"]
    assert meta["again"] == meta["devices"]
    assert meta["local"] == meta["devices"]
    assert "before the first TensorFlow op" in meta["error_for_three"]


class _FakeConfig:
    """Stands in for ``tf.config`` on a machine with ``num_gpus`` physical GPUs
    (and records the logical devices asked for), so that the GPU branches of
    ``local_devices`` run without a GPU and without initialising TensorFlow."""

    def __init__(self, num_gpus: int, initialised: int | None = None):
        self.gpus = [f"PhysicalDevice:GPU:{i}" for i in range(num_gpus)]
        self.requests = []
        self.logical = initialised  # logical GPUs already fixed, or None
        self.cpu_calls = []

    def list_physical_devices(self, kind):
        return list(self.gpus) if kind == "GPU" else ["PhysicalDevice:CPU:0"]

    def set_logical_device_configuration(self, device, configs):
        if self.logical is not None:  # TensorFlow's words
            raise RuntimeError(
                "Virtual devices cannot be modified after being initialized"
            )
        self.requests.append((device, list(configs)))
        self.logical = len(configs)

    def list_logical_devices(self, kind):
        assert kind == "GPU"
        n = len(self.gpus) if self.logical is None else self.logical
        return [types.SimpleNamespace(name=f"/device:GPU:{i}") for i in range(n)]


@pytest.fixture
def fake_config(monkeypatch):
    """``fake_config(num_gpus, initialised=None)`` installs a :class:`_FakeConfig`
    in ``tf.config`` and a recording ``configure_logical_cpus``."""
    import tensorflow as tf

    import mtl_utils.distribute as distribute

    def install(num_gpus, initialised=None):
        fake = _FakeConfig(num_gpus, initialised)
        for name in (
            "list_physical_devices",
            "set_logical_device_configuration",
            "list_logical_devices",
        ):
            monkeypatch.setattr(tf.config, name, getattr(fake, name))

        def cpus(n):
            fake.cpu_calls.append(n)
            return [f"/device:CPU:{i}" for i in range(n)]

        monkeypatch.setattr(distribute, "configure_logical_cpus", cpus)
        return fake

    return install


def test_one_gpu_is_split_into_two_logical_gpus_with_a_memory_limit(fake_config):
    """TensorFlow's documented way to simulate several GPUs on one (its
    distributed-training guide): ``set_logical_device_configuration`` with one
    ``LogicalDeviceConfiguration(memory_limit=...)`` per logical GPU."""
    import tensorflow as tf

    from mtl_utils.distribute import GPU_SPLIT_MEMORY_MB, local_devices

    fake = fake_config(num_gpus=1)
    assert local_devices() == ["/device:GPU:0", "/device:GPU:1"]
    limit = tf.config.LogicalDeviceConfiguration(memory_limit=GPU_SPLIT_MEMORY_MB)
    assert fake.requests == [("PhysicalDevice:GPU:0", [limit, limit])]
    assert GPU_SPLIT_MEMORY_MB * 2 <= 15 * 1024  # both fit a Colab T4
    fake = fake_config(num_gpus=1)
    local_devices(gpu_memory_limit=1024)
    small = tf.config.LogicalDeviceConfiguration(memory_limit=1024)
    assert fake.requests == [("PhysicalDevice:GPU:0", [small, small])]
    assert fake.cpu_calls == []


def test_several_gpus_are_all_used_as_they_are(fake_config):
    from mtl_utils.distribute import local_devices

    fake = fake_config(num_gpus=4)
    assert local_devices() == [f"/device:GPU:{i}" for i in range(4)]
    assert fake.requests == [] and fake.cpu_calls == []


def test_without_a_gpu_local_devices_are_logical_cpus(fake_config):
    from mtl_utils.distribute import local_devices

    fake = fake_config(num_gpus=0)
    assert local_devices(num_cpu_devices=3) == [f"/device:CPU:{i}" for i in range(3)]
    assert fake.cpu_calls == [3] and fake.requests == []


def test_a_gpu_split_after_tensorflow_started_keeps_two_or_says_to_restart(
    fake_config,
):
    from mtl_utils.distribute import local_devices

    fake_config(num_gpus=1, initialised=2)  # split already: the cell ran twice
    assert local_devices() == ["/device:GPU:0", "/device:GPU:1"]
    fake_config(num_gpus=1, initialised=1)  # an op ran before the split
    with pytest.raises(RuntimeError, match="1 logical GPU device.*before the first"):
        local_devices()


def test_tf_config_is_what_tensorflows_cluster_resolver_reads(monkeypatch):
    import tensorflow as tf  # only the resolver; no device is initialised

    from mtl_utils.distribute import tf_config

    workers = ["127.0.0.1:20000", "127.0.0.1:20001", "10.0.0.3:2222"]
    monkeypatch.setenv("TF_CONFIG", tf_config(workers, 2))
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    assert resolver.cluster_spec().as_dict() == {"worker": workers}
    assert (resolver.task_type, resolver.task_id) == ("worker", 2)


def test_distribute_helpers_reject_bad_input_naming_it():
    from mtl_utils.distribute import (
        configure_logical_cpus,
        free_ports,
        launch_local_workers,
        local_devices,
        tf_config,
    )

    with pytest.raises(ValueError, match="'localhost'; expected 'host:port'"):
        tf_config(["localhost"], 0)
    with pytest.raises(ValueError, match="index 2 is out of range for 2 workers"):
        tf_config(["a:1", "b:2"], 2)
    with pytest.raises(ValueError, match="workers is empty"):
        tf_config([], 0)
    with pytest.raises(ValueError, match="num_devices must be >= 1, got 0"):
        configure_logical_cpus(0)
    with pytest.raises(ValueError, match="gpu_memory_limit must be >= 1, got 0"):
        local_devices(gpu_memory_limit=0)
    with pytest.raises(ValueError, match="num_ports must be an int >= 1"):
        free_ports(0)
    with pytest.raises(ValueError, match="num_workers must be >= 1, got 0"):
        launch_local_workers([sys.executable, "-c", "pass"], num_workers=0)


def test_local_workers_get_one_cluster_and_their_own_index():
    from mtl_utils.distribute import launch_local_workers

    show = "import json, os; print(os.environ['TF_CONFIG'])"
    results = launch_local_workers([sys.executable, "-c", show], num_workers=3)
    configs = [json.loads(r.stdout) for r in results]
    cluster = configs[0]["cluster"]["worker"]
    assert len(set(cluster)) == 3
    assert all(w.startswith("127.0.0.1:") for w in cluster)
    for i, config in enumerate(configs):
        assert config["cluster"]["worker"] == cluster
        assert config["task"] == {"type": "worker", "index": i}


def test_a_failing_worker_stops_the_others_and_names_itself():
    from mtl_utils.distribute import launch_local_workers

    code = (
        "import os, sys, time\n"
        "if os.environ['MTL_WORKER_INDEX'] == '1':\n"
        "    sys.exit('worker one gives up')\n"
        "time.sleep(60)\n"
    )
    with pytest.raises(RuntimeError, match="worker 1 exited with status 1") as info:
        launch_local_workers([sys.executable, "-c", code], num_workers=2, timeout=30)
    assert "worker one gives up" in str(info.value)


# ------------------------------------------------------- the subprocess side
# Everything below runs only in subprocesses (python tests/test_distribute.py).


def _setup_tf(logical_cpus: int):
    """Import TensorFlow with ``logical_cpus`` CPU devices (before any op)."""
    from mtl_utils.distribute import configure_logical_cpus

    configure_logical_cpus(logical_cpus)
    import keras
    import tensorflow as tf

    return keras, tf


def _mse(y_true, y_pred):
    from keras import ops

    diff = ops.cast(y_true, "float32") - ops.cast(y_pred, "float32")
    return ops.mean(ops.square(diff))


def _build(keras, tie_heads: bool):
    """The book's hard-sharing VGG, tiny: two one-channel regression tasks."""
    from mtl_utils.models import build_multitask
    from mtl_utils.tasks import Task

    keras.utils.set_random_seed(0)
    tasks = [Task("a", "depth", 1), Task("b", "depth", 1)]
    model = build_multitask(
        tasks, (SIZE, SIZE, 3), config="vgg11", width=0.0625, batch_norm=False
    )
    if tie_heads:  # identical heads: the tasks differ only in their targets
        for layer in model.layers:
            if layer.name == "a" or layer.name.startswith("a_"):
                twin = model.get_layer("b" + layer.name[1:])
                twin.set_weights(layer.get_weights())
    return model, tasks


def _conflict_batch(num_batches: int = 1):
    """Replica 0's half: targets +3 and -3 (opposite gradients through identical
    heads); replica 1's half: both 0.3 (identical gradients, smaller)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_batches * BATCH, SIZE, SIZE, 3)).astype("float32")
    ya = np.full((len(x), SIZE, SIZE, 1), 3.0, "float32")
    yb = ya.copy()
    for k in range(num_batches):
        half = slice(k * BATCH, k * BATCH + BATCH // 2)
        rest = slice(k * BATCH + BATCH // 2, (k + 1) * BATCH)
        yb[half] = -3.0
        ya[rest] = yb[rest] = 0.3
    return x, {"a": ya, "b": yb}


def _partial_batch():
    """Depth targets with unequal label counts on the two halves."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype("float32")
    ya = rng.uniform(1.0, 3.0, (BATCH, SIZE, SIZE, 1)).astype("float32")
    yb = rng.uniform(1.0, 3.0, (BATCH, SIZE, SIZE, 1)).astype("float32")
    ya[: BATCH // 2, :, : 3 * SIZE // 4] = 0.0  # replica 0: a quarter labelled
    yb[BATCH // 2 + 1 :] = 0.0  # replica 1: one sample of four labelled
    return x, {"a": ya, "b": yb}


def _task_gradients(tf, model, losses, x, y):
    """Per-task gradients of every trainable variable: separate tapes."""
    out = {}
    for name, fn in losses.items():
        with tf.GradientTape() as tape:
            loss = fn(y[name], model(x, training=True)[name])
        grads = tape.gradient(
            loss,
            [v.value for v in model.trainable_variables],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        out[name] = [g.numpy() for g in grads]
    return out


def _save(out: Path, name: str, meta: dict, arrays: dict) -> None:
    np.savez(out / f"{name}.npz", **arrays)
    (out / f"{name}.json").write_text(json.dumps(meta))


def _fit_one_step(keras, tf, model, losses, weighting, x, y):
    model.compile(keras.optimizers.SGD(LR), losses=losses, weighting=weighting)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    history = model.fit(ds, epochs=1, verbose=0, shuffle=False)
    logs = {k: float(v[-1]) for k, v in history.history.items()}
    return [v.numpy() for v in model.trainable_variables], logs


def _mirrored_main(out: Path) -> None:
    keras, tf = _setup_tf(2)
    from mtl_utils.distribute import configure_logical_cpus, local_devices
    from mtl_utils.losses import loss_for
    from mtl_utils.weighting import PCGrad

    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    meta = {"num_vars": 0, "devices": devices, "again": configure_logical_cpus(2)}
    meta["local"] = local_devices(num_cpu_devices=2)  # no GPU here: the CPUs
    try:
        configure_logical_cpus(3)
        meta["error_for_three"] = ""
    except RuntimeError as error:
        meta["error_for_three"] = str(error)
    _save(out, "devices", meta, {})

    # One strategy object for the whole process: a second MirroredStrategy in
    # the same process can clash with the first one's collective keys.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    cases = {
        "equal": ("tasks", None, "random"),
        "pcgrad": ("mse", "pcgrad", "conflict"),
        "partial": ("tasks", None, "partial"),
        "keras_losses": ("keras", None, "random"),
    }
    for name, (loss_kind, weighting, data) in cases.items():
        try:
            if data == "conflict":
                x, y = _conflict_batch()
            elif data == "partial":
                x, y = _partial_batch()
            else:
                rng = np.random.default_rng(2)
                x = rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype("float32")
                y = {
                    t: rng.uniform(1, 3, (BATCH, SIZE, SIZE, 1)).astype("float32")
                    for t in "ab"
                }
            model, tasks = _build(keras, tie_heads=data == "conflict")
            if loss_kind == "tasks":
                losses = {t.name: loss_for(t) for t in tasks}
            elif loss_kind == "mse":
                losses = {"a": _mse, "b": _mse}
            else:  # a Keras loss object and a Keras loss name
                losses = {"a": keras.losses.MeanAbsoluteError(), "b": "mae"}
            shared_ids = {id(v) for v in model.get_layer("encoder").trainable_variables}
            meta = {
                "num_vars": len(model.trainable_variables),
                "shared": [id(v) in shared_ids for v in model.trainable_variables],
                "replicas": strategy.num_replicas_in_sync,
            }
            arrays = {
                f"init_{i}": v.numpy() for i, v in enumerate(model.trainable_variables)
            }
            ref_losses = {
                t: (keras.losses.get(f) if isinstance(f, str) else f)
                for t, f in losses.items()
            }
            if loss_kind == "keras":
                ref_losses["b"] = keras.losses.MeanAbsoluteError()
            halves = {
                "full": slice(0, BATCH),
                "half0": slice(0, BATCH // 2),
                "half1": slice(BATCH // 2, BATCH),
            }
            for part, rows in halves.items():
                yp = {k: v[rows] for k, v in y.items()}
                grads = _task_gradients(tf, model, ref_losses, x[rows], yp)
                for t in "ab":
                    for i, g in enumerate(grads[t]):
                        arrays[f"grad_{part}_{t}_{i}"] = g
                shared = meta["shared"]
                ga, gb = (
                    np.concatenate(
                        [g.ravel() for g, s in zip(grads[t], shared, strict=True) if s]
                    )
                    for t in "ab"
                )
                cosine = ga @ gb / (np.linalg.norm(ga) * np.linalg.norm(gb))
                meta[f"cosine_{part}"] = float(cosine)
            if data == "partial":
                meta["label_counts"] = {
                    t: [int(np.sum(y[t][rows] != 0)) for rows in halves.values()][1:]
                    for t in "ab"
                }
            make = (lambda: PCGrad(seed=0)) if weighting == "pcgrad" else lambda: None
            w, logs = _fit_one_step(keras, tf, model, losses, make(), x, y)
            arrays.update({f"single_{i}": a for i, a in enumerate(w)})
            meta["logs_single"] = logs
            with strategy.scope():
                model, _ = _build(keras, tie_heads=data == "conflict")
                w, logs = _fit_one_step(keras, tf, model, losses, make(), x, y)
            arrays.update({f"mirrored_{i}": a for i, a in enumerate(w)})
            meta["logs_mirrored"] = logs
            for run in ("single", "mirrored"):
                logs = meta[f"logs_{run}"]
                meta[f"coef_{run}"] = [logs["weight_a"], logs["weight_b"]]
            _save(out, name, meta, arrays)
        except Exception as error:  # reported by the test that reads this case
            (out / f"{name}.json").write_text(
                json.dumps({"error": f"{type(error).__name__}: {error}"[-3000:]})
            )


def _mixed_main(out: Path) -> None:
    keras, tf = _setup_tf(1)
    from mtl_utils.weighting import MGDA, GradNorm, NashMTL, PCGrad

    x, y = _conflict_batch()
    losses = {"a": _mse, "b": _mse}
    # name: (strategy, steps); GradNorm's first step uses its initial weights,
    # so its second step shows the weights learnt from the first Gram matrix.
    strategies = {
        "pcgrad": (lambda: PCGrad(seed=0), 1),
        "nash": (NashMTL, 1),
        "gradnorm": (GradNorm, 2),
        "mgda_ub": (lambda: MGDA(upper_bound=True), 1),
    }

    def run(make, policy, scale=2.0**12, steps=1):
        keras.config.set_dtype_policy(policy)
        try:
            model, _ = _build(keras, tie_heads=True)
            init = [v.numpy() for v in model.trainable_variables]
            optimizer = keras.optimizers.SGD(LR)
            if policy != "float32":
                optimizer = keras.optimizers.LossScaleOptimizer(
                    optimizer, initial_scale=scale
                )
            weighting = make()
            model.compile(optimizer, losses=losses, weighting=weighting)
            for _ in range(steps):
                logs = model.train_on_batch(x, y, return_dict=True)
            after = [v.numpy() for v in model.trainable_variables]
            return model, weighting, init, after, logs
        finally:
            keras.config.set_dtype_policy("float32")

    for name, (make, steps) in strategies.items():
        try:
            meta, arrays = {}, {}
            for policy, key in (("float32", "float32"), ("mixed_float16", "mixed")):
                model, _, init, after, logs = run(make, policy, steps=steps)
                meta[f"coef_{key}"] = [float(logs["weight_a"]), float(logs["weight_b"])]
                arrays.update({f"{key}_{i}": a for i, a in enumerate(after)})
                if key == "mixed":
                    meta["policy_mixed"] = model.dtype_policy.name
                    meta["loss_scaled"] = isinstance(
                        model.optimizer, keras.optimizers.LossScaleOptimizer
                    )
            arrays.update({f"init_{i}": a for i, a in enumerate(init)})
            meta["num_vars"] = len(init)
            _save(out, name, meta, arrays)
        except Exception as error:
            (out / f"{name}.json").write_text(
                json.dumps({"error": f"{type(error).__name__}: {error}"[-3000:]})
            )
    try:
        _head_overflow_case(keras, out)
    except Exception as error:
        (out / "head_overflow.json").write_text(
            json.dumps({"error": f"{type(error).__name__}: {error}"[-3000:]})
        )
    try:  # a step whose scaled gradients overflow float16
        model, weighting, init, after, _ = run(GradNorm, "mixed_float16", 2.0**30)
        meta = {
            "num_vars": len(init),
            "scale_after": float(model.optimizer.dynamic_scale.numpy()),
            "gradnorm_weights": [float(w) for w in weighting.weights.numpy()],
        }
        arrays = {f"init_{i}": a for i, a in enumerate(init)}
        arrays.update({f"after_{i}": a for i, a in enumerate(after)})
        run(NashMTL, "mixed_float16", 2.0**30)
        meta["nash_finished"] = True
        _save(out, "overflow", meta, arrays)
    except Exception as error:
        (out / "overflow.json").write_text(
            json.dumps({"error": f"{type(error).__name__}: {error}"[-3000:]})
        )


def _head_overflow_case(keras, out: Path) -> None:
    """GradNorm under "mixed_float16" on a model whose *head* kernel gradients
    overflow float16 while the shared layer's (which GradNorm looks at) do not.

    Shared ``Dense`` with activations 400; heads ``Dense`` with kernels 1e-3.
    The output gradient of task a is 2 (1.6 + 20) / 8 = 5.4 per sample, so its
    head kernel gradient is 8 x 400 x 5.4 = 17280 times the loss scale: 4.4e6 at
    ``scale = 2**8``, past float16's 65504, while the boundary gradient (x 1e-3)
    and the shared kernel gradient stay small. At ``scale = 1`` nothing
    overflows: the control shows GradNorm's weights do move on a normal step.
    """
    from mtl_utils.training import MultiTaskModel
    from mtl_utils.weighting import GradNorm

    x = np.ones((8, 4), "float32")
    y = {"a": np.full((8, 1), -20.0, "float32"), "b": np.full((8, 1), 10.0, "float32")}
    meta, arrays = {}, {}
    for key, scale in (("overflow", 2.0**8), ("control", 1.0)):
        keras.config.set_dtype_policy("mixed_float16")
        try:
            const = keras.initializers.Constant
            inputs = keras.Input((4,))
            h = keras.layers.Dense(4, use_bias=False, kernel_initializer=const(100.0))(
                inputs
            )
            outputs = {
                t: keras.layers.Dense(
                    1, use_bias=False, kernel_initializer=const(1e-3), name=t
                )(h)
                for t in "ab"
            }
            model = MultiTaskModel(inputs, outputs, representation=h)
            weighting = GradNorm(optimizer=keras.optimizers.SGD(0.1))
            optimizer = keras.optimizers.LossScaleOptimizer(
                keras.optimizers.SGD(1e-3), initial_scale=scale
            )
            model.compile(
                optimizer, losses={t: _mse for t in "ab"}, weighting=weighting
            )
            init = [v.numpy() for v in model.trainable_variables]
            model.train_on_batch(x, y)
            after = [v.numpy() for v in model.trainable_variables]
            meta[f"{key}_scale_after"] = float(optimizer.dynamic_scale.numpy())
            meta[f"{key}_weights"] = [float(w) for w in weighting.weights.numpy()]
            meta[f"{key}_moved"] = max_diff(after, init)
        finally:
            keras.config.set_dtype_policy("float32")
    _save(out, "head_overflow", meta, arrays)


def _worker_datasets(tf, strategy, x, y):
    """Each worker feeds its own half of every global batch of BATCH."""

    def dataset_fn(context):
        index = context.input_pipeline_id
        per_worker = BATCH // context.num_input_pipelines
        rows = np.concatenate(
            [
                np.arange(k + index * per_worker, k + (index + 1) * per_worker)
                for k in range(0, len(x), BATCH)
            ]
        )
        part = (x[rows], {t: v[rows] for t, v in y.items()})
        return tf.data.Dataset.from_tensor_slices(part).batch(per_worker)

    return strategy.distribute_datasets_from_function(dataset_fn)


def _worker_main(out: Path) -> None:
    import tensorflow as tf

    # The strategy reads TF_CONFIG and must exist before any other TF op.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras

    from mtl_utils.distribute import run_train_steps
    from mtl_utils.weighting import PCGrad

    index = int(os.environ["MTL_WORKER_INDEX"])
    x, y = _conflict_batch(num_batches=3)
    with strategy.scope():
        model, _ = _build(keras, tie_heads=True)
        model.compile(
            keras.optimizers.SGD(LR),
            losses={"a": _mse, "b": _mse},
            weighting=PCGrad(seed=0),
        )
    if index == 0:
        model.save_weights(out / "init.weights.h5")
    # Keras 3's fit() fails under MultiWorkerMirroredStrategy
    # (keras-team/keras#20585): a custom loop runs the model's train_step.
    ds = _worker_datasets(tf, strategy, x, y)
    run_train_steps(model, ds, steps=len(x) // BATCH, strategy=strategy)
    model.save_weights(out / f"worker{index}.weights.h5")


def _multiworker_reference_main(out: Path) -> None:
    keras, tf = _setup_tf(1)
    from mtl_utils.weighting import PCGrad

    x, y = _conflict_batch(num_batches=3)
    model, _ = _build(keras, tie_heads=True)
    model.compile(
        keras.optimizers.SGD(LR),
        losses={"a": _mse, "b": _mse},
        weighting=PCGrad(seed=0),
    )
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    model.fit(ds, epochs=1, verbose=0, shuffle=False)
    model.save_weights(out / "reference.weights.h5")


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    main = {
        "mirrored": _mirrored_main,
        "mixed": _mixed_main,
        "worker": _worker_main,
        "multiworker_reference": _multiworker_reference_main,
    }[sys.argv[1]]
    main(Path(sys.argv[2]))
