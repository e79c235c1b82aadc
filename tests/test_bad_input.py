"""Bad input is refused where it enters, with an error naming it, or made harmless.

Each test feeds one kind of bad input (NaN, out-of-range labels, 0..255 images, a
bare string for a task list, a zero Δm baseline, corrupt files) and checks the error
type and that the message names the offending task, array or file. Where the input
used to give a silently wrong result, the reference is what correct handling gives:
training that skips a NaN step equals training without that batch.
"""

import json
import re
import warnings

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from test_experiments import _InterruptAfterBatches
from test_training import STRATEGIES, TASKS, scene_like_batch, tiny_model

from mtl_utils import augment
from mtl_utils import weighting as W
from mtl_utils.data.nyuv2 import load_nyuv2, save_nyuv2_layout
from mtl_utils.data.pipeline import make_dataset
from mtl_utils.data.scenes import (
    MAX_OBJECTS,
    Object3D,
    Scene,
    render_batch,
    render_scenes,
)
from mtl_utils.experiments import ExperimentConfig, Run
from mtl_utils.losses import loss_for
from mtl_utils.metrics import (
    TaskMetrics,
    classification_metrics,
    delta_m,
    segmentation_metrics,
)
from mtl_utils.tasks import Task, scene_tasks
from mtl_utils.validation import check_number

# ------------------------------------------------------- training: NaN-safe steps


def _poisoned_batch(labelled: bool):
    """8 samples; sample 5 (second batch of 4) holds a NaN pixel.

    ``labelled=False``: sample 5 has no label for any task, so every masked loss
    stays finite and only the backward pass meets the NaN (0 x NaN = NaN).
    """
    x, y = scene_like_batch(8)
    x = np.clip(x, -3, 3)
    x[5, 3, 3, 0] = np.nan
    if not labelled:
        for t in TASKS:
            y[t.name][5] = t.missing_value
    return x, y


def _train(strategy, x, y, epochs=1, **compile_kwargs):
    keras.utils.set_random_seed(7)
    model = tiny_model(TASKS)
    model.compile(
        keras.optimizers.Adam(1e-3),
        losses=TASKS,
        weighting=STRATEGIES[strategy](),
        **compile_kwargs,
    )
    batch_size = None if isinstance(x, tf.data.Dataset) else 4
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return model


def _first(y, rows):
    return {k: v[rows] for k, v in y.items()}


@pytest.mark.parametrize("labelled", [False, True], ids=["unlabelled", "labelled"])
@pytest.mark.parametrize("strategy", ["equal", "uncertainty", "pcgrad", "gradnorm"])
def test_nan_input_stops_before_the_weights_change(strategy, labelled):
    x, y = _poisoned_batch(labelled)
    with pytest.warns(RuntimeWarning, match=r"inputs at epoch 1, batch 2: the step"):
        model = _train(strategy, x, y, epochs=3)
    assert "inputs" in model.nan_loss_message
    # Reference: the same model trained on the first (clean) batch alone.
    reference = _train(strategy, x[:4], _first(y, slice(0, 4)))
    for v, r in zip(model.weights, reference.weights, strict=True):
        assert np.isfinite(v.numpy()).all(), v.path
        np.testing.assert_allclose(v.numpy(), r.numpy(), rtol=1e-6, err_msg=v.path)


def test_without_stop_on_nan_the_bad_step_is_skipped_and_training_goes_on():
    x, y = scene_like_batch(12)
    x[5, 0, 0, 1] = np.inf
    for t in TASKS:
        y[t.name][5] = t.missing_value
    model = _train("equal", x, y, stop_on_nan=False)
    keep = np.r_[0:4, 8:12]  # the batches without the bad sample
    reference = _train("equal", x[keep], _first(y, keep))
    for v, r in zip(model.weights, reference.weights, strict=True):
        np.testing.assert_allclose(v.numpy(), r.numpy(), rtol=1e-6, err_msg=v.path)


def test_nan_target_names_the_task_and_leaves_the_weights_finite():
    x, y = scene_like_batch(8)
    y["normal"][6, 2, 2] = np.nan  # a labelled pixel
    # fit refuses such arrays; a dataset built without make_dataset reaches the step
    with pytest.raises(ValueError, match=r"task 'normal' \(normal\) target holds"):
        _train("pcgrad", x, y)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    with pytest.warns(RuntimeWarning, match=r"loss for task\(s\) \['normal'\]"):
        model = _train("pcgrad", data, None, epochs=2)
    reference = _train("pcgrad", x[:4], _first(y, slice(0, 4)))
    for v, r in zip(model.weights, reference.weights, strict=True):
        np.testing.assert_allclose(v.numpy(), r.numpy(), rtol=1e-6, err_msg=v.path)


def test_fit_refuses_out_of_range_labels_naming_the_task():
    x, y = scene_like_batch(8)
    y["segmentation"][2, 0, 0] = 7  # 5 classes
    model = tiny_model(TASKS)
    model.compile("adam", losses=TASKS)
    with pytest.raises(ValueError, match=r"'segmentation'.*labels \[7\].*sample 2"):
        model.fit(x, y, batch_size=4, verbose=0)


def test_fit_warns_on_images_that_look_like_0_to_255():
    x, y = scene_like_batch(4)
    x = np.abs(x) * 60
    model = tiny_model(TASKS)
    model.compile("adam", losses=TASKS)
    with pytest.warns(RuntimeWarning, match=r"look like 0\.\.255"):
        model.fit(x, y, batch_size=4, verbose=0)


def test_task_with_the_wrong_channel_count_is_refused_by_its_loss():
    loss = loss_for(Task("segmentation", "segmentation", 3))
    labels = np.zeros((2, 4, 4), "int32")
    with pytest.raises(ValueError, match=r"'segmentation'.*3 channels.*\(2, 4, 4, 5\)"):
        loss(labels, np.zeros((2, 4, 4, 5), "float32"))


# ------------------------------------------------------------- make_dataset


@pytest.fixture(scope="module")
def scenes():
    return render_scenes(6, size=16, seed=3)


def test_make_dataset_refuses_out_of_range_segmentation_labels(scenes):
    arrays = dict(scenes, segmentation=scenes["segmentation"].copy())
    arrays["segmentation"][4, 1, 1] = 7
    with pytest.raises(ValueError, match=r"'segmentation'.*5 classes.*\[7\].*sample 4"):
        make_dataset(arrays, scene_tasks(["segmentation", "depth"]))


def test_make_dataset_refuses_a_count_beyond_its_classes(scenes):
    arrays = dict(scenes, count=scenes["count"].copy())
    arrays["count"][1] = 99
    with pytest.raises(ValueError, match=r"'count'.*\[99\]"):
        make_dataset(arrays, scene_tasks(["count"]))


def test_make_dataset_refuses_uint8_images_with_the_conversion(scenes):
    arrays = dict(scenes, image=(scenes["image"] * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"dtype uint8.*astype\('float32'\) / 255"):
        make_dataset(arrays, ["depth"])


def test_make_dataset_refuses_float_images_in_0_to_255(scenes):
    arrays = dict(scenes, image=scenes["image"] * 255)
    with pytest.raises(ValueError, match=r"image'\] values lie in .*divide by 255"):
        make_dataset(arrays, ["depth"])


def test_make_dataset_refuses_nan_images_naming_the_sample(scenes):
    arrays = dict(scenes, image=scenes["image"].copy())
    arrays["image"][3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"image'\] holds 1 NaN.*sample 3"):
        make_dataset(arrays, ["depth"])


def test_make_dataset_refuses_nan_and_negative_depth(scenes):
    arrays = dict(scenes, depth=scenes["depth"].copy())
    arrays["depth"][2, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"target 'depth' holds 1 NaN.*sample 2"):
        make_dataset(arrays, ["depth"])
    arrays["depth"][2, 0, 0] = -1.0
    with pytest.raises(ValueError, match=r"'depth'.*negative depth.*sample 2"):
        make_dataset(arrays, scene_tasks(["depth"]))


@pytest.mark.parametrize("call", ["make_dataset", "scene_tasks"])
def test_a_bare_task_name_is_not_split_into_letters(scenes, call):
    with pytest.raises(ValueError, match=r"single str 'depth'.*\['depth'\]"):
        if call == "make_dataset":
            make_dataset(scenes, "depth")
        else:
            scene_tasks("depth")


# ----------------------------------------------------------------------- scenes


@pytest.mark.parametrize("n", [MAX_OBJECTS + 1, MAX_OBJECTS + 2])
def test_a_scene_with_more_than_max_objects_is_counted_not_clipped(n):
    # n small spheres side by side, 3 units away, every one in view
    spheres = tuple(
        Object3D("sphere", float(x), 3.0, (0.15, 0.15, 0.15), (0.9, 0.2, 0.2))
        for x in np.linspace(-1.2, 1.2, n)
    )
    out = render_batch([Scene(objects=spheres), Scene()], 64, object_ids=True)
    assert out["count"].tolist() == [n, 0]
    np.testing.assert_array_equal(np.unique(out["object_id"][0]), np.arange(-1, n))
    # the count task has MAX_OBJECTS + 1 classes: its dataset refuses that label
    with pytest.raises(ValueError, match=rf"'count'.*labels \[{n}\].*sample 0"):
        make_dataset(out, scene_tasks(["count"]))


# ------------------------------------------------------------------ NYUv2 files


@pytest.fixture
def nyu_root(tmp_path):
    arrays = render_scenes(2, size=16, seed=0)
    save_nyuv2_layout(arrays, tmp_path, "val")
    return tmp_path


def test_load_nyuv2_refuses_255_labels_naming_the_file(nyu_root):
    path = nyu_root / "val" / "label" / "1.npy"
    label = np.load(path)
    label[0, 0] = 255
    np.save(path, label)
    with pytest.raises(ValueError, match=r"label/1\.npy: labels \[255\].*map them"):
        load_nyuv2(nyu_root, "val", size=None)


def test_load_nyuv2_names_a_truncated_file(nyu_root):
    path = nyu_root / "val" / "depth" / "0.npy"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"depth/0\.npy: cannot be read \(truncated"):
        load_nyuv2(nyu_root, "val", size=None)


def test_load_nyuv2_refuses_nan_normals_naming_the_file(nyu_root):
    path = nyu_root / "val" / "normal" / "0.npy"
    normal = np.load(path)
    normal[1, 1] = np.nan
    np.save(path, normal)
    with pytest.raises(ValueError, match=r"normal/0\.npy holds 3 NaN"):
        load_nyuv2(nyu_root, "val", size=None)


# ---------------------------------------------------------------------- metrics


def test_classification_metrics_refuse_a_label_beyond_the_logits():
    logits = np.eye(7, dtype="float32")[[1, 2, 3]]
    with pytest.raises(ValueError, match=r"classification target.*\[99\] outside"):
        classification_metrics(np.array([1, 2, 99]), logits)
    # in range, the accuracy is the plain fraction of argmax hits
    ok = classification_metrics(np.array([1, 2, -1]), logits)
    assert ok == {"accuracy": 1.0}


def test_segmentation_metrics_refuse_nan_logits():
    logits = np.full((1, 4, 4, 5), np.nan, "float32")
    with pytest.raises(ValueError, match=r"segmentation: logits hold 80 NaN"):
        segmentation_metrics(np.zeros((1, 4, 4), int), logits, 5)


def test_segmentation_metrics_refuse_logits_with_another_class_count():
    logits = np.zeros((1, 4, 4, 3), "float32")
    with pytest.raises(ValueError, match=r"3 channels; expected one channel.*5"):
        segmentation_metrics(np.zeros((1, 4, 4), int), logits, 5)
    task = Task("seg", "segmentation", 5)
    with pytest.raises(ValueError, match=r"seg: logits have shape"):
        TaskMetrics(task).update(np.zeros((1, 4, 4), int), logits)


def test_delta_m_with_a_zero_baseline_is_nan_with_a_warning_unless_strict():
    metrics = {"count": {"accuracy": 0.2}, "depth": {"abs_err": 0.9}}
    baseline = {"count": {"accuracy": 0.0}, "depth": {"abs_err": 1.0}}
    with pytest.raises(ValueError, match=r"baseline count/accuracy is 0"):
        delta_m(metrics, baseline)
    with pytest.warns(RuntimeWarning, match=r"count/accuracy is 0.*NaN"):
        assert np.isnan(delta_m(metrics, baseline, strict=False))
    # a non-zero baseline is unaffected by strict (closed form: -10 %)
    one = {"depth": {"abs_err": 0.9}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = delta_m(one, {"depth": {"abs_err": 1.0}}, strict=False)
    assert got == pytest.approx(-10.0)


# ----------------------------------------------------------------- augmentation


def _example(image, segmentation):
    return {"image": image, "segmentation": segmentation}


def test_augmentations_refuse_uint8_images():
    image = np.zeros((8, 8, 3), np.uint8)
    labels = np.zeros((8, 8), np.int32)
    with pytest.raises(ValueError, match=r"dtype uint8.*tf\.float32\) / 255"):
        augment.hflip(_example(image, labels))
    with pytest.raises(ValueError, match=r"dtype uint8"):
        augment.photometric(_example(image, labels), tf.constant([1, 2]))


def test_rotate_refuses_an_unsigned_mask_that_cannot_hold_minus_one():
    image = np.zeros((8, 8, 3), np.float32)
    labels = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match=r"'segmentation' has dtype uint8.*-1"):
        augment.rotate(_example(image, labels), 0.3)


def test_photometric_refuses_float_images_in_0_to_255():
    image = np.full((8, 8, 3), 200.0, np.float32)
    example = _example(image, np.zeros((8, 8), np.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"exceed 1"):
        augment.photometric(example, tf.constant([1, 2]))


# -------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "value, message",
    [
        (float("nan"), "expected a finite number"),
        (0.0, "expected > 0"),
        ("x", "a number"),
    ],
)
def test_check_number_names_the_setting(value, message):
    with pytest.raises(ValueError, match=rf"DWA temperature is .*{message}"):
        check_number(value, "DWA temperature", low=0.0, low_open=True)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: W.DynamicWeightAverage(temperature=0),
            r"temperature is 0\.0; expected > 0",
        ),
        (lambda: W.CAGrad(c=float("nan")), r"CAGrad c is nan; expected a finite"),
        (lambda: W.GradNorm(alpha=float("nan")), r"GradNorm alpha is nan"),
        (
            lambda: W.StaticWeighting({"depth": -1.0}),
            r"weight 'depth' is -1\.0; expected >= 0",
        ),
        (
            lambda: W.UncertaintyWeighting(initial_log_variance=float("inf")),
            r"initial_log_variance is inf",
        ),
    ],
    ids=["dwa", "cagrad", "gradnorm", "static", "uncertainty"],
)
def test_strategy_settings_are_checked_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_mgda_weights_refuse_nan_gradients():
    G = np.array([[1.0, np.nan], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"mgda_weights: the gradients G holds 1 NaN"):
        W.mgda_weights(G)


GRADIENT_STRATEGIES = [n for n in sorted(W._BY_NAME) if W.get(n).mode != "losses"]


@pytest.mark.parametrize("name", GRADIENT_STRATEGIES)
def test_a_gram_matrix_of_another_size_is_refused_before_the_state_changes(name):
    strategy = W.get(name)
    strategy.build(["depth", "normal"], model_optimizer=keras.optimizers.SGD(0.1))
    before = [v.numpy().copy() for v in strategy.state_variables()]
    gram = np.eye(3, dtype="float32") + 0.5  # 3x3 for 2 tasks
    with pytest.raises(
        ValueError, match=r"gram has shape \(3, 3\); expected \(2, 2\).*depth, normal"
    ):
        strategy.combine_gradients(gram, np.ones(2, "float32"))
    for v, b in zip(strategy.state_variables(), before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)


# ------------------------------------------------------------------ experiments


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: Run("hard_sharing", "pcgard", 0, 1e-3),
            r"unknown strategy 'pcgard'.*'pcgrad'",
        ),
        # weighting.get would take it, but the runner seeds only 'pcgrad'
        (lambda: Run("mtan", "PCGrad", 0, 1e-3), r"unknown strategy 'PCGrad'"),
        (
            lambda: Run("mtan", "equal", -1, 1e-3),
            r"seed is -1; expected .*0\.\.4294967295",
        ),
        (lambda: Run("mtan", "equal", 2**32, 1e-3), r"seed is 4294967296; expected"),
        (
            lambda: Run("mtan", "equal", 0, float("inf")),
            r"learning_rate must be a finite number > 0; received inf",
        ),
        (
            lambda: ExperimentConfig(image_size=48),
            r"image_size is 48; expected a positive multiple of 32",
        ),
        (lambda: ExperimentConfig(image_size=0), r"image_size is 0; expected"),
        (lambda: ExperimentConfig(data_seed=-3), r"data_seed is -3; expected"),
    ],
    ids=[
        "strategy",
        "strategy-case",
        "seed",
        "seed-big",
        "lr-inf",
        "size-48",
        "size-0",
        "data-seed",
    ],
)
def test_runs_and_configs_are_refused_at_construction_not_when_the_run_trains(
    make, message
):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_zero_baseline_leaves_the_experiment_writing_its_table(tmp_path):
    """Serious case 2: a single-task count accuracy of exactly 0 used to make every
    rerun train one more run and then fail writing ``results.csv``."""
    from mtl_utils.experiments import experiment_tasks, run_experiments, write_report

    runs = [Run("single_task", "none", 0, 1e-3), Run("hard_sharing", "equal", 0, 1e-3)]
    config = ExperimentConfig(
        runs=runs,
        tasks=("depth", "count"),
        num_train=8, num_val=4, num_test=4, image_size=32,
        encoder="vgg11", width=0.0625, batch_norm=False, epochs=1, batch_size=4,
    )  # fmt: skip
    # the single-task run, already finished: count accuracy exactly 0
    baseline = {"depth": {"abs_err": 1.0, "rel_err": 0.5}, "count": {"accuracy": 0.0}}
    for task in experiment_tasks(config):  # every metric the runs report
        assert set(task.metrics) == set(baseline[task.name])
    row = {"architecture": "single_task", "strategy": "none", "seed": 0}
    row.update(learning_rate=1e-3, epochs=1)
    for prefix in ("", "val/"):
        for task, metrics in baseline.items():
            row.update({f"{prefix}{task}/{m}": v for m, v in metrics.items()})
    (tmp_path / "results.json").write_text(
        json.dumps({"setting": config.setting(), "runs": [row]})
    )
    with pytest.warns(RuntimeWarning, match=r"baseline count/accuracy is 0.*NaN"):
        table = run_experiments(config, tmp_path, verbose=0)  # trains hard_sharing
    written = pd.read_csv(tmp_path / "results.csv")
    assert list(written["architecture"]) == ["single_task", "hard_sharing"]
    multi = written.iloc[1]
    assert np.isnan(multi["delta_m"]) and np.isnan(multi["delta_count"])
    # the depth column is still the closed form: mean relative error change, in %
    expected = np.mean(
        [(multi[f"depth/{m}"] - b) / b * 100 for m, b in baseline["depth"].items()]
    )
    assert multi["delta_depth"] == pytest.approx(expected, rel=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        summary = write_report(table, tmp_path)
    assert (tmp_path / "summary.csv").exists() and len(summary) == 2


def test_an_interrupted_run_is_not_resumed_under_another_setting_or_from_a_bad_file(
    tmp_path,
):
    """Serious case 4: a checkpoint left by an interrupted run used to be resumed
    under another data_seed, and a corrupt one raised a bare BadZipFile."""
    import dataclasses

    from mtl_utils.experiments import run_experiments

    config = ExperimentConfig(
        runs=[Run("hard_sharing", "equal", 0, 1e-3)], tasks=("depth",),
        num_train=8, num_val=4, num_test=4, image_size=32,
        encoder="vgg11", width=0.0625, batch_norm=False, epochs=2, batch_size=4,
    )  # fmt: skip
    stop = _InterruptAfterBatches(3)  # in epoch 2, after epoch 1's checkpoint
    with pytest.raises(KeyboardInterrupt):
        run_experiments(config, tmp_path, verbose=0, callbacks=[stop])
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.npz")
    assert not (tmp_path / "results.json").exists()  # nothing else tells the setting

    other = dataclasses.replace(config, data_seed=1)
    refused = r"belongs to another run or setting \(differing: \['setting'\]"
    with pytest.raises(ValueError, match=refused):
        run_experiments(other, tmp_path, verbose=0)

    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    name = re.escape(str(checkpoint))
    unreadable = rf"checkpoint {name} is unreadable.*delete it.*--restart"
    with pytest.raises(ValueError, match=unreadable):
        run_experiments(config, tmp_path, verbose=0)
