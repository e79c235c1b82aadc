"""Tests of mtl_utils.experiments.

References: an uninterrupted run of the same experiment (resume), hand-computed
Δm values and numpy's mean and sample standard deviation (summaries), the
arrays and batches the transforms start from (partial labels, alternating
batches), NYUv2 files written in the MTAN layout (loading).
"""

from __future__ import annotations

import dataclasses
import json

import keras
import numpy as np
import pandas as pd
import pytest

from mtl_utils.data.nyuv2 import save_nyuv2_layout
from mtl_utils.data.pipeline import make_dataset
from mtl_utils.data.scenes import render_scenes
from mtl_utils.experiments import (
    ExperimentConfig,
    Run,
    add_delta_m,
    alternate_tasks,
    config_from_args,
    drop_labels,
    grid,
    load_data,
    main,
    parse_args,
    run_experiments,
    summarise,
)
from mtl_utils.losses import depth_loss, segmentation_loss
from mtl_utils.tasks import Task, scene_tasks

# Two runs of one strategy (the second reuses the first one's traced model) on
# a tiny problem; DWA keeps state between epochs, which a resume must restore.
TINY_ARGS = [
    "--architectures", "hard_sharing",
    "--strategies", "dwa",
    "--seeds", "0", "1",
    "--tasks", "depth", "segmentation",
    "--num-train", "12", "--num-val", "4", "--num-test", "4",
    "--image-size", "32", "--encoder", "vgg11", "--width", "0.0625",
    "--no-batch-norm", "--epochs", "3", "--batch-size", "4", "--quiet",
]  # fmt: skip
BATCHES_PER_EPOCH = 3  # 12 samples, batch size 4


class _InterruptAfterBatches(keras.callbacks.Callback):
    """Raises KeyboardInterrupt after a number of training batches, like Ctrl-C."""

    def __init__(self, batches: int):
        super().__init__()
        self.left = batches

    def on_train_batch_end(self, batch, logs=None):
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt("interrupted by the test")


class _CountEpochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = 0

    def on_epoch_end(self, epoch, logs=None):
        self.epochs += 1


def _stored(folder):
    """results.json and results.csv without the measured training times."""
    payload = json.loads((folder / "results.json").read_text())
    timings = ["seconds", "wall_seconds"]
    for row in payload["runs"]:
        for key in timings:
            row.pop(key)
    table = pd.read_csv(folder / "results.csv").drop(columns=timings)
    return payload, table


def test_an_interrupted_then_resumed_experiment_writes_an_uninterrupted_ones_results(
    tmp_path,
):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main([*TINY_ARGS, "--output", str(reference)]) == 0

    config = config_from_args(parse_args([*TINY_ARGS, "--output", str(resumed)]))
    # stop in the middle of the second epoch of the second run (seed 1)
    stop = _InterruptAfterBatches(3 * BATCHES_PER_EPOCH + BATCHES_PER_EPOCH + 2)
    with pytest.raises(KeyboardInterrupt):
        run_experiments(config, resumed, verbose=0, callbacks=[stop])
    finished = json.loads((resumed / "results.json").read_text())["runs"]
    assert [row["seed"] for row in finished] == [0]
    assert len(list((resumed / "checkpoints").glob("*.npz"))) == 1

    counter = _CountEpochs()
    results = run_experiments(config, resumed, verbose=0, callbacks=[counter])
    assert counter.epochs == 2  # the finished run is skipped, seed 1 resumes
    assert not list((resumed / "checkpoints").glob("*.npz"))
    assert list(results["seed"]) == [0, 1]

    got, want = _stored(resumed), _stored(reference)
    assert got[0] == want[0]
    pd.testing.assert_frame_equal(got[1], want[1])
    # the reference run also wrote the table and figure the book shows
    assert (reference / "summary.md").exists() and (reference / "summary.csv").exists()


def test_a_model_reused_for_the_next_seed_trains_exactly_like_a_fresh_one():
    """Runs of one strategy share a traced model, reset between runs; random
    (RLW), learned (uncertainty, with its own optimizer) and per-epoch (DWA's
    loss history) strategy state must be reset too."""
    args = parse_args([*TINY_ARGS, "--output", "unused", "--epochs", "2"])
    config = config_from_args(args)
    every = [Run("hard_sharing", s, seed, 1e-3) for s in ("rlw", "uncertainty", "dwa")
             for seed in (0, 1)]  # fmt: skip
    data = load_data(config)
    together = run_experiments(
        dataclasses.replace(config, runs=every), verbose=0, data=data
    )
    alone = run_experiments(
        dataclasses.replace(config, runs=every[1::2]), verbose=0, data=data
    )
    pd.testing.assert_frame_equal(
        together.iloc[1::2]
        .drop(columns=["seconds", "wall_seconds"])
        .reset_index(drop=True),
        alone.drop(columns=["seconds", "wall_seconds"]),
    )


def test_a_results_folder_of_another_setting_is_refused_naming_the_difference(
    tmp_path,
):
    config = ExperimentConfig(runs=grid(["hard_sharing"], ["equal"], [0]), epochs=2)
    other = ExperimentConfig(runs=config.runs, epochs=3)
    (tmp_path / "results.json").write_text(
        json.dumps({"setting": other.setting(), "runs": []})
    )
    with pytest.raises(ValueError, match=r"different setting.*'epochs'"):
        run_experiments(config, tmp_path, verbose=0)


# ------------------------------------------------------------ delta_m, summaries

SEG = Task("segmentation", "segmentation", 5, {"miou": True})
DEPTH = Task("depth", "depth", 1, {"abs_err": False})


def _row(arch, strategy, seed, lr, miou, abs_err, val_miou, val_abs_err):
    return {
        "architecture": arch,
        "strategy": strategy,
        "seed": seed,
        "learning_rate": lr,
        "segmentation/miou": miou,
        "depth/abs_err": abs_err,
        "val/segmentation/miou": val_miou,
        "val/depth/abs_err": val_abs_err,
    }


@pytest.fixture
def table():
    return pd.DataFrame(
        [
            _row("single_task", "none", 0, 1e-3, 0.50, 1.00, 0.50, 1.00),
            _row("single_task", "none", 1, 1e-3, 0.40, 2.00, 0.40, 2.00),
            _row("hard_sharing", "equal", 0, 1e-3, 0.55, 1.20, 0.50, 1.10),
            _row("hard_sharing", "equal", 1, 1e-3, 0.40, 1.80, 0.40, 2.00),
            _row("hard_sharing", "equal", 0, 1e-2, 0.45, 1.10, 0.55, 0.90),
            _row("hard_sharing", "equal", 1, 1e-2, 0.48, 2.20, 0.44, 1.80),
        ]
    )


def test_delta_m_columns_match_hand_computed_relative_changes(table):
    out = add_delta_m(table, [SEG, DEPTH])
    # "drop" convention: mean over metrics of (-1)^higher * (M - B) / B * 100
    want_same_seed = [
        0.0,
        0.0,
        (-(0.55 - 0.5) / 0.5 + (1.2 - 1.0) / 1.0) * 50,  # (-10 + 20) / 2 = 5
        (-(0.40 - 0.4) / 0.4 + (1.8 - 2.0) / 2.0) * 50,  # (0 - 10) / 2 = -5
        (-(0.45 - 0.5) / 0.5 + (1.1 - 1.0) / 1.0) * 50,
        (-(0.48 - 0.4) / 0.4 + (2.2 - 2.0) / 2.0) * 50,
    ]
    np.testing.assert_allclose(out["delta_m_same_seed"], want_same_seed, atol=1e-9)
    # the baseline averaged over seeds: miou 0.45, abs_err 1.5 (test and val)
    want = [
        (-(m - 0.45) / 0.45 + (e - 1.5) / 1.5) * 50
        for m, e in zip(table["segmentation/miou"], table["depth/abs_err"], strict=True)
    ]
    np.testing.assert_allclose(out["delta_m"], want, atol=1e-9)
    np.testing.assert_allclose(out["delta_m"][:2].mean(), 0.0, atol=1e-12)
    np.testing.assert_allclose(
        out["val_delta_m"][4], (-(0.55 - 0.45) / 0.45 + (0.9 - 1.5) / 1.5) * 50
    )


def test_summary_is_numpy_mean_and_sample_std_and_tunes_on_validation(table):
    summary = summarise(add_delta_m(table, [SEG, DEPTH]), tuned=("equal",))
    group = table[(table["strategy"] == "equal") & (table["learning_rate"] == 1e-3)]
    for column in ("segmentation/miou", "depth/abs_err"):
        values = group[column].to_numpy()
        row = summary.loc[("hard_sharing", "equal", 1e-3)]
        np.testing.assert_allclose(row[(column, "mean")], values.mean())
        np.testing.assert_allclose(row[(column, "std")], values.std(ddof=1))
    assert summary.loc[("hard_sharing", "equal", 1e-3), ("runs", "count")] == 2
    # validation Δm: lr 1e-3 -> mean(0, -25) = -12.5 ... lr 1e-2 -> mean(-15, -5)
    val = (
        add_delta_m(table, [SEG, DEPTH])
        .groupby(["strategy", "learning_rate"])["val_delta_m"]
        .mean()
    )
    best = float(val.loc["equal"].idxmin())
    tuned = [key for key in summary.index if key[1] == "equal (tuned)"]
    assert tuned == [("hard_sharing", "equal (tuned)", best)]


def test_delta_m_needs_a_baseline_learning_rate_when_baselines_have_several(table):
    extra = _row("single_task", "none", 0, 1e-2, 0.5, 1.0, 0.5, 1.0)
    both = pd.concat([table, pd.DataFrame([extra])], ignore_index=True)
    with pytest.raises(ValueError, match="baseline_learning_rate"):
        add_delta_m(both, [SEG, DEPTH])
    out = add_delta_m(both, [SEG, DEPTH], baseline_learning_rate=1e-3)
    np.testing.assert_allclose(out["delta_m_same_seed"][2], 5.0)


# --------------------------------------------------------------- data transforms


def test_drop_labels_removes_the_fraction_and_the_losses_skip_those_samples():
    arrays = render_scenes(8, size=16, seed=3)
    dropped = drop_labels(arrays, {"depth": 0.5, "segmentation": 0.25}, seed=1)
    gone_depth = np.all(dropped["depth"] == 0.0, axis=(1, 2, 3))
    gone_seg = np.all(dropped["segmentation"] == -1, axis=(1, 2))
    assert gone_depth.sum() == 4 and gone_seg.sum() == 2
    np.testing.assert_array_equal(
        dropped["depth"][~gone_depth], arrays["depth"][~gone_depth]
    )
    np.testing.assert_array_equal(dropped["image"], arrays["image"])
    np.testing.assert_array_equal(dropped["normal"], arrays["normal"])
    # the masked losses equal numpy losses over the labelled samples only
    rng = np.random.default_rng(0)
    depth_pred = rng.random(arrays["depth"].shape).astype("float32") * 5
    want = np.abs(depth_pred - arrays["depth"])[~gone_depth].mean()
    np.testing.assert_allclose(
        float(depth_loss(dropped["depth"], depth_pred)), want, 1e-5
    )
    logits = rng.normal(size=(*arrays["segmentation"].shape, 5)).astype("float32")
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, arrays["segmentation"][..., None], -1)[..., 0]
    np.testing.assert_allclose(
        float(segmentation_loss(dropped["segmentation"], logits)),
        nll[~gone_seg].mean(),
        rtol=1e-5,
    )


def test_drop_labels_rejects_an_unknown_task_or_fraction():
    arrays = render_scenes(2, size=16, seed=0)
    with pytest.raises(ValueError, match="'colour'"):
        drop_labels(arrays, {"colour": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_labels(arrays, {"depth": 1.5})


def test_alternating_batches_carry_one_task_each_in_turn():
    tasks = scene_tasks(["segmentation", "depth", "count"])
    arrays = render_scenes(6, size=16, seed=2)
    joint = list(make_dataset(arrays, tasks, batch_size=4))
    alternating = alternate_tasks(make_dataset(arrays, tasks, batch_size=4), tasks)
    turns = list(alternating)
    assert len(turns) == len(tasks) * len(joint) == int(alternating.cardinality())
    for i, (image, targets) in enumerate(turns):
        ref_image, ref_targets = joint[i // len(tasks)]
        keep = tasks[i % len(tasks)]
        np.testing.assert_array_equal(image, ref_image)
        for t in tasks:
            got = targets[t.name].numpy()
            if t.name == keep.name:
                np.testing.assert_array_equal(got, ref_targets[t.name])
            else:
                assert np.all(got == t.missing_value), (i, t.name)


def test_nyuv2_experiments_split_train_into_train_and_val_and_test_on_val(tmp_path):
    scenes = render_scenes(7, size=32, seed=0)
    save_nyuv2_layout(scenes, tmp_path, "train")
    save_nyuv2_layout({k: v[:3] for k, v in scenes.items()}, tmp_path, "val")
    config = ExperimentConfig(
        nyuv2=str(tmp_path), num_train=5, num_val=2, num_test=None
    )
    data = load_data(config)
    assert {k: len(v["image"]) for k, v in data.items()} == {
        "train": 5,
        "val": 2,
        "test": 3,
    }
    np.testing.assert_array_equal(data["val"]["depth"], scenes["depth"][5:7])
    assert sorted(data["train"]) == ["depth", "image", "normal", "segmentation"]


def test_runs_and_configs_reject_bad_values_naming_the_problem():
    with pytest.raises(ValueError, match="strategy='none'"):
        Run("single_task", "equal", 0, 1e-3)
    with pytest.raises(ValueError, match="'transformer'"):
        Run("transformer", "equal", 0, 1e-3)
    with pytest.raises(ValueError, match="runs repeat"):
        ExperimentConfig(runs=[Run("mtan", "equal", 0, 1e-3)] * 2)
    with pytest.raises(ValueError, match="schedule"):
        ExperimentConfig(schedule="random")
    with pytest.raises(ValueError, match="'count'"):
        ExperimentConfig(tasks=("depth",), missing={"count": 0.5})


def test_runs_accept_exactly_the_strategy_names_of_weighting_get():
    from mtl_utils import weighting
    from mtl_utils.experiments.config import STRATEGIES

    assert sorted(STRATEGIES) == sorted(weighting._BY_NAME)
    for name in STRATEGIES:
        assert Run("hard_sharing", name, 0, 1e-3).strategy == name
