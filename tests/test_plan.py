"""Tests of experiment plans (mtl_utils.experiments.plan) and tuned baselines."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtl_utils.experiments.config import Run
from mtl_utils.experiments.plan import (
    check_results_match_plan,
    load_plan,
    stage_runs,
    tuned_equal_rates,
)
from mtl_utils.experiments.results import (
    add_delta_m,
    single_task_baseline,
    tune_single_task_rates,
)
from mtl_utils.metrics import delta_m

REFERENCE = Path(__file__).resolve().parents[1] / "book/experiments/reference.json"


def _fake_results(plan, folder: Path, rows) -> None:
    payload = {"setting": plan.config().setting(), "runs": rows}
    (folder / "results.json").write_text(json.dumps(payload))


def _id(run: Run) -> dict:
    return {
        "architecture": run.architecture,
        "strategy": run.strategy,
        "seed": run.seed,
        "learning_rate": run.learning_rate,
    }


@pytest.mark.parametrize("name", ["reference", "reference4096"])
def test_the_reference_plan_loads_and_asks_for_the_issues_protocol(name):
    plan = load_plan(REFERENCE.with_name(f"{name}.json"))
    first = stage_runs(plan, 1, {})
    assert len(plan.seeds) >= 5 and len(plan.learning_rates) >= 3
    # single-task networks and equal weighting share the full rate grid
    for arch, strategy in [("single_task", "none"), ("hard_sharing", "equal")]:
        rates = {r.learning_rate for r in first if r.strategy == strategy}
        assert rates == set(plan.learning_rates), arch
    wanted = {"uncertainty", "dwa", "gradnorm", "pcgrad", "cagrad", "nash_mtl"}
    assert wanted <= {s for _, s in plan.around_tuned_equal}
    assert ("mtan", "equal") in plan.around_tuned_equal  # chapter 6
    # the successor changes only the data size and the schedule
    base = load_plan(REFERENCE).setting
    differ = {k for k in base if base[k] != plan.setting[k]}
    assert differ <= {"num_train", "num_test", "lr_schedule"}


def test_results_made_with_another_setting_are_refused_naming_the_field(tmp_path):
    plan_file = tmp_path / "plan.json"
    shutil.copy(REFERENCE, plan_file)
    raw = json.loads(plan_file.read_text())
    raw["around_tuned_equal"] = []
    plan_file.write_text(json.dumps(raw))
    plan = load_plan(plan_file)
    rows = [_id(r) for r in stage_runs(plan, 1, {})]
    _fake_results(plan, tmp_path, rows)
    check_results_match_plan(plan_file, tmp_path)  # the same: no error

    raw["setting"]["epochs"] = 17  # someone edits the plan the chapter shows
    plan_file.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="epochs: plan 17 vs results 16"):
        check_results_match_plan(plan_file, tmp_path)

    raw["setting"]["epochs"] = 16
    raw["seeds"] = [*raw["seeds"], 99]  # a run the results do not hold
    plan_file.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"lacks {2 * len(raw['learning_rates'])} run"):
        check_results_match_plan(plan_file, tmp_path)


def test_bad_plan_files_get_errors_naming_the_problem(tmp_path):
    path = tmp_path / "p.json"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_plan(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_plan(path)
    raw = json.loads(REFERENCE.read_text())
    del raw["seeds"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['seeds'\]"):
        load_plan(path)
    raw = json.loads(REFERENCE.read_text())
    raw["learning_rates"] = [0.002, 0.001]
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="must increase"):
        load_plan(path)


def _single_task_table():
    """Two tasks, two seeds, two rates; depth prefers 1e-3, segmentation 2e-3."""
    rows = []
    for seed in (0, 1):
        for lr, miou, err in [(1e-3, 0.5, 1.0), (2e-3, 0.7, 1.5)]:
            row = {"architecture": "single_task", "strategy": "none"}
            row.update({"seed": seed, "learning_rate": lr})
            for prefix, shift in (("", 0.01), ("val/", 0.0)):
                row[f"{prefix}segmentation/miou"] = miou + shift * seed
                row[f"{prefix}depth/abs_err"] = err + shift * seed
            rows.append(row)
    ew = {"architecture": "hard_sharing", "strategy": "equal", "seed": 0}
    ew.update({"learning_rate": 1e-3})
    for prefix in ("", "val/"):
        ew[f"{prefix}segmentation/miou"] = 0.63
        ew[f"{prefix}depth/abs_err"] = 1.1
    rows.append(ew)
    return pd.DataFrame(rows)


def test_single_task_rates_are_tuned_per_task_on_validation():
    table = _single_task_table()
    assert tune_single_task_rates(table) == {"segmentation": 2e-3, "depth": 1e-3}
    base = single_task_baseline(table, "tuned")
    # seed rows combine each task's network at its own rate
    assert base["segmentation/miou"].tolist() == [0.7, 0.71]
    assert base["depth/abs_err"].tolist() == [1.0, 1.01]


def test_delta_columns_against_the_tuned_baseline_equal_the_formula():
    table = add_delta_m(_single_task_table(), baseline_learning_rate="tuned")
    ew = table[table["strategy"] == "equal"].iloc[0]
    base = {"segmentation": {"miou": 0.705}, "depth": {"abs_err": 1.005}}
    mine = {"segmentation": {"miou": 0.63}, "depth": {"abs_err": 1.1}}
    # drop convention by hand: mean of (-1)^higher (M - B) / B, in %
    by_hand = 100 * np.mean([-(0.63 - 0.705) / 0.705, (1.1 - 1.005) / 1.005])
    assert ew["delta_m"] == pytest.approx(by_hand)
    assert ew["delta_m"] == pytest.approx(delta_m(mine, base))
    assert ew["delta_segmentation"] == pytest.approx(100 * (0.705 - 0.63) / 0.705)
    assert ew["delta_depth"] == pytest.approx(100 * (1.1 - 1.005) / 1.005)


def test_the_second_stage_uses_tuned_equal_weightings_rate_and_its_better_neighbour(
    tmp_path,
):
    plan = load_plan(REFERENCE)
    rows = {}
    val = {0.001: 3.0, 0.002: -1.0, 0.004: 0.5, 0.008: 2.0}  # EW validation Δm
    for run in stage_runs(plan, 1, {}):
        row = _id(run)
        quality = 0.0 if run.architecture == "single_task" else val[run.learning_rate]
        for prefix in ("", "val/"):
            row[f"{prefix}segmentation/miou"] = 0.8 * (1 - quality / 100)
            row[f"{prefix}depth/abs_err"] = 0.5 * (1 + quality / 100)
            row[f"{prefix}normal/mean"] = 9.0 * (1 + quality / 100)
        rows[run.key] = row
    assert tuned_equal_rates(plan, rows) == (0.002, 0.004)
    second = stage_runs(plan, 2, rows)
    assert {r.learning_rate for r in second} == {0.002, 0.004}
    # the tuned rate comes first for every strategy, so a partial grid compares
    half = len(second) // 2
    assert {r.learning_rate for r in second[:half]} == {0.002}
    assert len(second) == 2 * len(plan.around_tuned_equal) * len(plan.seeds)


def test_updates_count_the_batches_tf_data_makes():
    import dataclasses

    import tensorflow as tf

    from mtl_utils.experiments.config import ExperimentConfig

    for num_train, batch in [(4096, 32), (100, 32), (32, 32), (33, 8)]:
        batches = tf.data.Dataset.range(num_train).batch(batch).cardinality()
        config = ExperimentConfig(num_train=num_train, batch_size=batch, epochs=3)
        assert config.updates() == 3 * int(batches)
        assert config.updates(num_tasks=3) == config.updates()  # joint: one batch
        alternating = dataclasses.replace(config, schedule="alternating")
        assert alternating.updates(num_tasks=3) == 3 * config.updates()
    plan = load_plan(REFERENCE.with_name("reference4096.json"))
    assert plan.updates() == 16 * 4096 // 32
    with pytest.raises(ValueError, match="num_train is None.*pass num_images"):
        ExperimentConfig(num_train=None).updates()
    with pytest.raises(ValueError, match="num_tasks must be an integer >= 1"):
        ExperimentConfig().updates(num_tasks=0)


def test_the_cosine_schedule_equals_keras_cosine_decay():
    import keras

    from mtl_utils.experiments.runner import _set_learning_rate, cosine_to_zero

    ours = cosine_to_zero(0.002, 100)
    theirs = keras.optimizers.schedules.CosineDecay(0.002, 100, alpha=0.0)
    for step in (0, 1, 37, 99, 100, 150):
        assert float(ours(step)) == pytest.approx(float(theirs(step)), abs=1e-9)
    optimizer = keras.optimizers.Adam(ours)
    _set_learning_rate(optimizer, 0.004)  # a new run's peak, same traced step
    assert float(ours(0)) == pytest.approx(0.004)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        cosine_to_zero(0.001, 0)
    # with a linear warmup: Keras' CosineDecay from 0 with warmup_steps
    ours = cosine_to_zero(0.004, 100, warmup=10)
    theirs = keras.optimizers.schedules.CosineDecay(
        0.0, 90, alpha=0.0, warmup_target=0.004, warmup_steps=10
    )
    for step in (0, 1, 5, 9, 10, 11, 50, 99, 100, 130):
        assert float(ours(step)) == pytest.approx(float(theirs(step)), abs=1e-9)
    with pytest.raises(ValueError, match="warmup must be in"):
        cosine_to_zero(0.001, 10, warmup=10)


# the plan and results the chapters show
SHOWN = REFERENCE.with_name("reference4096.json")
SHOWN_RESULTS = REFERENCE.parents[1] / "results" / SHOWN.stem
REPRODUCE = """
import json, sys
from mtl_utils.experiments.plan import reproduce_run
plan, results, key, part, epochs = sys.argv[1:]
old, new = reproduce_run(
    plan, results, key, part=part or None, epochs=int(epochs) or None
)
print(json.dumps({"old": old, "new": new}))
"""


def _reproduce(plan_file, results_dir, key: str, part="", epochs=0) -> dict:
    """``reproduce_run`` in a fresh process (the plan's threads and kernels are
    read when TensorFlow starts): ``{"old": recorded, "new": retrained}``."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)  # the plan sets it
    args = [str(plan_file), str(results_dir), key, part, str(epochs)]
    done = subprocess.run(
        [sys.executable, "-c", REPRODUCE, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_committed_reference_run_is_reproduced_bit_for_bit(tmp_path):
    """The cheapest committed network, trained again from the plan file alone.

    A fresh process (the plan asks for one thread and oneDNN kernels, which
    TensorFlow reads when it starts) trains the depth network of a committed
    single-task run; its test and validation metrics must equal the committed
    ones exactly (one thread makes a CPU run deterministic).
    """
    key, part = "single_task/none/seed=0/lr=0.004", "depth"
    found = _reproduce(SHOWN, SHOWN_RESULTS, key, part)
    assert sorted(found["old"]) == sorted(found["new"])
    assert len(found["old"]) == 4  # depth: abs and rel error, test and validation
    assert found["new"] == found["old"]


def test_paired_differences_give_scipys_t_interval_over_shared_seeds():
    from scipy import stats

    from mtl_utils.experiments.results import _t975, paired_differences

    for df in (1, 4, 9, 29):
        assert _t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(5):
        shared = rng.normal()  # a seed effect both strategies share
        for strategy, lr, val, shift in [
            ("equal", 1e-3, 1.0, 0.0),
            ("equal", 2e-3, 0.0, 0.5),  # tuned: lower validation Δm
            ("pcgrad", 2e-3, 0.2, -1.0 + 0.3 * rng.normal()),
        ]:
            rows.append(
                {
                    "architecture": "hard_sharing",
                    "strategy": strategy,
                    "seed": seed,
                    "learning_rate": lr,
                    "val_delta_m": val,
                    "delta_m": shared + shift,
                }
            )
    table = pd.DataFrame(rows)
    out = paired_differences(table)
    pcgrad = table[table["strategy"] == "pcgrad"]["delta_m"].to_numpy()
    tuned = table[(table["strategy"] == "equal") & (table["learning_rate"] == 2e-3)][
        "delta_m"
    ].to_numpy()
    d = pcgrad - tuned
    low, high = stats.t.interval(0.95, len(d) - 1, d.mean(), stats.sem(d))
    row = out.loc[("hard_sharing", "pcgrad")]
    assert row[("delta_m", "mean")] == pytest.approx(d.mean())
    assert row[("delta_m", "low")] == pytest.approx(low, abs=1e-3)
    assert row[("delta_m", "high")] == pytest.approx(high, abs=1e-3)
    assert row[("seeds", "n")] == 5
    with pytest.raises(ValueError, match="no runs of the reference"):
        paired_differences(table, reference=("mtan", "equal"))


TINY_SETTING = {
    "tasks": ["segmentation", "depth", "normal"],
    "num_train": 32,
    "num_val": 16,
    "num_test": 16,
    "image_size": 32,
    "layout": "near",
    "width": 0.0625,
    "epochs": 2,
    "batch_size": 16,
    "baseline_learning_rate": "tuned",
    "lr_schedule": "cosine",
    "threads": 1,
    "kernels": "onednn",
}


def test_a_tiny_plan_runs_and_its_shown_networks_are_retrained_identically(tmp_path):
    """The whole route of the reference results on a plan small enough for CI.

    The command trains both stages in worker processes; ``--predictions``
    retrains the networks the chapters show in another process. Their test
    metrics must equal the recorded ones exactly, and the saved outputs must
    give the recorded depth error when scored by hand. A PCGrad run's first
    epoch is retrained once more and its validation metrics compared with the
    history recorded after that epoch.
    """
    import os
    import subprocess
    import sys

    plan_file = tmp_path / "tiny.json"
    plan_file.write_text(
        json.dumps(
            {
                "name": "tiny",
                "setting": TINY_SETTING,
                "seeds": [0],
                "learning_rates": [0.001, 0.004],
                "grid": [["single_task", "none"], ["hard_sharing", "equal"]],
                "around_tuned_equal": [["hard_sharing", "pcgrad"], ["mtan", "equal"]],
                "workers": 1,
            }
        )
    )
    out = tmp_path / "out"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)  # the plan sets it
    command = [sys.executable, "-m", "mtl_utils.experiments", "--config"]
    command += [str(plan_file), "--output", str(out), "--quiet"]
    for extra in ([], ["--predictions", "16"]):
        done = subprocess.run(
            command + extra, capture_output=True, text=True, env=env, timeout=900
        )
        assert done.returncode == 0, done.stderr[-2000:]
    check_results_match_plan(plan_file, out)
    rows = {
        (r["architecture"], r["strategy"], r["learning_rate"]): r
        for r in json.loads((out / "results.json").read_text())["runs"]
    }
    assert len(rows) == 2 * 2 + 2 * 2  # stage 1: 2 pairs x 2 rates; stage 2 alike
    saved = np.load(out / "predictions.npz")
    assert saved["image"].shape == (16, 32, 32, 3)
    for arch, task, metric in [
        ("hard_sharing", "depth", "abs_err"),
        ("mtan", "normal", "mean"),
        ("single_task", "segmentation", "miou"),
    ]:
        part = "all" if arch != "single_task" else task
        key = str(saved[f"runs/{arch}/{part}"])
        lr = float(key.rsplit("lr=", 1)[1])
        strategy = "none" if arch == "single_task" else "equal"
        recorded = rows[(arch, strategy, lr)][f"{task}/{metric}"]
        assert float(saved[f"metrics/{arch}/{task}/{metric}"]) == recorded
    error = np.abs(saved["hard_sharing/depth"] - saved["target/depth"]).mean()
    key = str(saved["runs/hard_sharing/all"])
    lr = float(key.rsplit("lr=", 1)[1])
    recorded = rows[("hard_sharing", "equal", lr)]["depth/abs_err"]
    assert error == pytest.approx(recorded, rel=1e-5)

    # run again, the command keeps the saved networks and retrains only those
    # whose run changed (here: MTAN's key, edited as if its tuned rate had moved)
    first = {k: saved[k] for k in saved.files}
    np.savez(out / "predictions.npz", **{**first, "runs/mtan/all": np.array("old")})
    again = subprocess.run(
        command[:-1] + ["--predictions", "16"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "kept the saved predictions of single_task" in again.stdout
    assert "kept the saved predictions of hard_sharing" in again.stdout
    assert "training mtan/equal/seed=0" in again.stdout
    with np.load(out / "predictions.npz") as resaved:
        assert sorted(resaved.files) == sorted(first)
        for k in first:
            np.testing.assert_array_equal(resaved[k], first[k], err_msg=k)

    pcgrad = next(k for k in rows if k[1] == "pcgrad")
    _check_first_epoch(plan_file, out, f"hard_sharing/pcgrad/seed=0/lr={pcgrad[2]:g}")


def _check_first_epoch(plan_file, results_dir, key: str) -> None:
    """Retrain a recorded multi-task run's first epoch in a fresh process; its
    nine validation metrics must equal the recorded ones exactly."""
    found = _reproduce(plan_file, results_dir, key, epochs=1)
    assert len(found["old"]) == 9  # every validation metric of the three tasks
    assert found["new"] == found["old"]


def test_the_delta_table_gives_each_method_at_its_tuned_rate_with_t_intervals():
    from scipy import stats

    from mtl_utils.experiments.results import (
        delta_table,
        format_delta_table,
        mean_interval,
        single_task_deltas,
    )

    values = [1.0, 2.5, -0.5, 4.0]
    low, high = stats.t.interval(
        0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values)
    )
    # t quantiles are tabulated to 3 decimals
    assert mean_interval(values) == pytest.approx(
        (np.mean(values), low, high), rel=1e-3
    )

    rows = [r for _, r in _single_task_table().iterrows()]
    rows = [dict(r) for r in rows if r["architecture"] == "single_task"]
    for seed in (0, 1):  # EW at two rates; 2e-3 is better on validation
        for lr, val_err, err in [(1e-3, 1.3, 1.2), (2e-3, 1.05, 1.1 + 0.1 * seed)]:
            row = {"architecture": "hard_sharing", "strategy": "equal"}
            row.update({"seed": seed, "learning_rate": lr})
            row.update({"segmentation/miou": 0.7, "val/segmentation/miou": 0.7})
            row.update({"depth/abs_err": err, "val/depth/abs_err": val_err})
            rows.append(row)
    rows.append({**rows[-1], "strategy": "pcgrad", "seed": 0})  # one seed only
    table = add_delta_m(pd.DataFrame(rows), baseline_learning_rate="tuned")
    out = delta_table(table, seeds=2)
    assert list(out.index) == [("single_task", "none"), ("hard_sharing", "equal")]
    ew = out.loc[("hard_sharing", "equal")]
    assert ew[("learning_rate", "")] == 2e-3 and ew[("seeds", "n")] == 2
    # by hand: depth Δ of the two seeds against the tuned baseline's mean 1.005
    deltas = [100 * (e - 1.005) / 1.005 for e in (1.1, 1.2)]
    expected = mean_interval(deltas)
    got = tuple(ew[("delta_depth", k)] for k in ("mean", "low", "high"))
    assert got == pytest.approx(expected)
    noise = single_task_deltas(table)["delta_m"]
    assert noise.mean() == pytest.approx(0.0, abs=1e-12)  # against its own mean
    assert out.loc[("single_task", "none"), ("delta_m", "high")] == pytest.approx(
        mean_interval(noise)[2]
    )
    assert ("hard_sharing", "pcgrad") in delta_table(table).index  # seeds=None
    text = format_delta_table(out, ["delta_depth"])
    half = expected[2] - expected[0]
    assert half == pytest.approx(expected[0] - expected[1])  # symmetric
    assert text.loc["HS / equal", "Δ depth (%)"] == f"{expected[0]:+.1f} ± {half:.1f}"
    assert text.loc["single-task / none", "lr"] == "per task"


def test_the_result_figures_draw_every_method_and_curve():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtl_utils.experiments.plots import (
        history_curves,
        plot_curves,
        plot_paired,
        plot_tradeoff,
    )
    from mtl_utils.experiments.results import delta_table, paired_differences

    rows = [dict(r) for _, r in _single_task_table().iterrows()]
    rows = [r for r in rows if r["architecture"] == "single_task"]
    for strategy, shift in (("equal", 0.0), ("pcgrad", -0.05)):
        for seed in (0, 1):
            row = {"architecture": "hard_sharing", "strategy": strategy, "seed": seed}
            row["learning_rate"] = 1e-3
            for prefix in ("", "val/"):
                row[f"{prefix}segmentation/miou"] = 0.65 - shift + 0.01 * seed
                row[f"{prefix}depth/abs_err"] = 1.1 + shift - 0.02 * seed
            row["history"] = {"val/depth/abs_err": [2.0, 1.5, 1.1 + seed]}
            rows.append(row)
    table = add_delta_m(pd.DataFrame(rows), baseline_learning_rate="tuned")
    fig = plot_tradeoff(delta_table(table), tasks=("segmentation", "depth"))
    assert len(fig.axes) == 1 and len(fig.axes[0].containers) == 3  # 3 methods
    fig = plot_paired(paired_differences(table))
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["pcgrad"]
    ew = table[table["strategy"] == "equal"]
    curves = history_curves(ew, "val/depth/abs_err")
    assert curves.tolist() == [[2.0, 1.5, 1.1], [2.0, 1.5, 2.1]]
    ax = plot_curves({"EW": curves})
    assert ax.lines[0].get_ydata().tolist() == [2.0, 1.5, 1.6]
    ax.set_xlim(1, 16)  # 16 epochs: matplotlib's default ticks would be 2.5, 5, ...
    assert all(t == int(t) for t in ax.get_xticks())
    with pytest.raises(ValueError, match="no history entry 'loss'"):
        history_curves(ew, "loss")
    plt.close("all")


def test_a_committed_pcgrad_run_is_reproduced_bit_for_bit_over_its_first_epoch():
    """Gradient surgery from the plan file alone, checked against its record.

    A fresh process trains the first of the 16 epochs of a committed PCGrad run
    (on the full run's learning-rate schedule); its validation metrics must
    equal those the run recorded after that epoch, exactly.
    """
    key = "hard_sharing/pcgrad/seed=0/lr=0.064"
    _check_first_epoch(SHOWN, SHOWN_RESULTS, key)


def test_a_corrupted_results_file_is_named_with_the_way_out(tmp_path):
    from mtl_utils.experiments import load_results

    (tmp_path / "results.json").write_text('{"setting": {"tasks": [')  # cut short
    with pytest.raises(ValueError, match=r"results\.json is not valid JSON.*restore"):
        load_results(tmp_path)
