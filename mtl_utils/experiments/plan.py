"""Experiment plans: a grid described in one JSON file, run in stages by workers.

A plan file (``book/experiments/<name>.json``) holds the shared setting
(:class:`~mtl_utils.experiments.config.ExperimentConfig` fields), the seeds,
the learning-rate grid and two lists of ``[architecture, strategy]`` pairs:

* ``grid``: trained at every learning rate of the grid (the single-task
  networks and equal weighting, whose rates are then chosen on validation);
* ``around_tuned_equal``: trained at tuned equal weighting's rate and at the
  neighbour in the grid where equal weighting did better on validation.

:func:`run_plan` trains the first stage, chooses the rates, then trains the
second stage, with ``workers`` processes side by side. Every finished run is
recorded at once (``runs/`` in the output folder), so an interrupted plan
started again continues where it stopped, and ``results.json`` gathers them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtl_utils.experiments.config import SINGLE_TASK, ExperimentConfig, Run
from mtl_utils.experiments.results import (
    RESULTS_JSON,
    _key_of,
    _write_results,
    add_delta_m,
    read_run_records,
    setting_differences,
)

__all__ = [
    "Plan",
    "load_plan",
    "run_plan",
    "stage_runs",
    "tuned_equal_rates",
    "check_results_match_plan",
    "reference_files",
    "reproduce_run",
    "save_predictions",
    "shown_runs",
]

_KEYS = ("setting", "seeds", "learning_rates", "grid", "around_tuned_equal")


@dataclasses.dataclass(frozen=True)
class Plan:
    """A plan file, parsed (see the module docstring for its fields)."""

    name: str
    setting: Mapping[str, Any]
    seeds: tuple[int, ...]
    learning_rates: tuple[float, ...]
    grid: tuple[tuple[str, str], ...]
    around_tuned_equal: tuple[tuple[str, str], ...] = ()
    workers: int = 1
    description: str = ""

    def config(self, runs: Sequence[Run] = ()) -> ExperimentConfig:
        """The :class:`ExperimentConfig` of the plan's setting with ``runs``."""
        return ExperimentConfig(runs=tuple(runs), **dict(self.setting))

    def updates(self, num_tasks: int = 1) -> int:
        """Optimizer updates of one network of ``num_tasks`` tasks over all
        epochs (:meth:`ExperimentConfig.updates`)."""
        return self.config().updates(num_tasks)


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and check a plan file; errors name the file and the bad field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"plan file {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"plan file {path} is not valid JSON: {err}") from err
    missing = [k for k in _KEYS[:4] if k not in raw]
    if missing:
        raise ValueError(f"plan file {path} lacks field(s) {missing}")
    known = {f.name for f in dataclasses.fields(Plan)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"plan file {path} has unknown field(s) {unknown}")
    pairs = {}
    for key in ("grid", "around_tuned_equal"):
        items = raw.get(key, [])
        if not all(isinstance(p, list) and len(p) == 2 for p in items):
            raise ValueError(
                f"plan file {path}: {key} must be a list of [architecture, "
                f"strategy] pairs; received {items!r}"
            )
        pairs[key] = tuple(tuple(p) for p in items)
    rates = tuple(float(r) for r in raw["learning_rates"])
    if rates != tuple(sorted(rates)) or len(set(rates)) != len(rates):
        raise ValueError(
            f"plan file {path}: learning_rates must increase; received {rates}"
        )
    plan = Plan(
        name=raw.get("name", path.stem),
        setting=dict(raw["setting"]),
        seeds=tuple(int(s) for s in raw["seeds"]),
        learning_rates=rates,
        grid=pairs["grid"],
        around_tuned_equal=pairs["around_tuned_equal"],
        workers=int(raw.get("workers", 1)),
        description=raw.get("description", ""),
    )
    try:
        plan.config()
    except TypeError as err:
        raise ValueError(f"plan file {path}: bad setting ({err})") from err
    return plan


def _runs(pairs, seeds, rates) -> list[Run]:
    return [Run(a, s, seed, lr) for a, s in pairs for lr in rates for seed in seeds]


def tuned_equal_rates(plan: Plan, rows: Mapping[str, Mapping]) -> tuple[float, float]:
    """Tuned equal weighting's learning rate and its better grid neighbour.

    Both are chosen on the validation Δm (against the single-task baseline
    whose rates are tuned per task on validation), averaged over seeds.
    """
    from mtl_utils.experiments.results import _frame

    table = add_delta_m(
        _frame(list(rows.values())), baseline_learning_rate="tuned", strict=False
    )
    ew = table[
        (table["architecture"] == "hard_sharing") & (table["strategy"] == "equal")
    ]
    val = {
        lr: ew[np.isclose(ew["learning_rate"], lr)]["val_delta_m"].mean()
        for lr in plan.learning_rates
    }
    if any(np.isnan(v) for v in val.values()):
        raise ValueError(
            f"equal weighting's validation Δm is missing at some rate ({val}); "
            "the first stage is not finished"
        )
    rates = list(plan.learning_rates)
    best = min(rates, key=lambda lr: val[lr])
    i = rates.index(best)
    neighbours = [rates[j] for j in (i - 1, i + 1) if 0 <= j < len(rates)]
    return best, min(neighbours, key=lambda lr: val[lr])


def stage_runs(plan: Plan, stage: int, rows: Mapping[str, Mapping]) -> list[Run]:
    """The runs of stage 1 (the grid) or 2 (around tuned equal weighting)."""
    if stage == 1:
        return _runs(plan.grid, plan.seeds, plan.learning_rates)
    if stage == 2:
        if not plan.around_tuned_equal:
            return []
        # Every strategy at tuned equal weighting's rate first, then at the
        # neighbour, so that a partial grid already compares at the tuned rate.
        rates = tuned_equal_rates(plan, rows)
        return [
            r for lr in rates for r in _runs(plan.around_tuned_equal, plan.seeds, [lr])
        ]
    raise ValueError(f"stage must be 1 or 2; received {stage!r}")


def _claims(out: Path) -> Path:
    return out / "claims"


def claim_run(out: Path) -> Callable[[Run], bool]:
    """A ``claim`` for :func:`run_experiments`: first process to ask gets the run."""
    folder = _claims(out)
    folder.mkdir(parents=True, exist_ok=True)

    def claim(run: Run) -> bool:
        try:
            fd = os.open(folder / run.key.replace("/", "__"), os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    return claim


def _gather(plan: Plan, out: Path) -> dict[str, dict]:
    rows = read_run_records(out, plan.config())
    stored = out / RESULTS_JSON
    if stored.exists():
        for row in json.loads(stored.read_text()).get("runs", []):
            rows.setdefault(_key_of(row), row)
    return rows


def _write_all(plan: Plan, out: Path, rows: Mapping[str, dict]) -> None:
    order = stage_runs(plan, 1, rows)
    try:
        order += stage_runs(plan, 2, rows)
    except ValueError:
        pass
    config = plan.config(order)
    _write_results(out, config, dict(rows))


def run_plan(
    plan_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    workers: int | None = None,
    log: Callable[[str], None] = print,
    poll_seconds: float = 30.0,
) -> dict[str, dict]:
    """Train every run of a plan not yet recorded in ``output_dir``, in stages.

    Each stage starts ``workers`` processes (default: the plan's) of
    ``python -m mtl_utils.experiments --config PLAN --output DIR --worker N``;
    they take runs in turn, record each one when it finishes and resume
    checkpointed ones. Progress is printed every ``poll_seconds``; worker logs
    go to ``logs/`` in the output folder. Returns the finished runs by key and
    writes ``results.json``/``results.csv``.
    """
    plan = load_plan(plan_path)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = plan.workers if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1; received {workers}")
    started = time.perf_counter()
    for stage in (1, 2):
        rows = _gather(plan, out)
        runs = stage_runs(plan, stage, rows)
        pending = [r for r in runs if r.key not in rows]
        log(
            f"stage {stage}: {len(runs) - len(pending)} of {len(runs)} runs "
            f"finished; training {len(pending)} with {workers} worker(s)"
        )
        if not pending:
            continue
        for f in _claims(out).glob("*"):
            f.unlink()
        (out / "logs").mkdir(exist_ok=True)
        procs = []
        for w in range(workers):
            cmd = [sys.executable, "-m", "mtl_utils.experiments", "--config"]
            cmd += [str(plan_path), "--output", str(out), "--worker", str(stage)]
            with open(out / "logs" / f"stage{stage}_worker{w}.log", "a") as f:
                procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT))
        while any(p.poll() is None for p in procs):
            time.sleep(poll_seconds)
            done = sum(r.key in read_run_records(out, plan.config()) for r in pending)
            minutes = (time.perf_counter() - started) / 60
            log(f"  stage {stage}: {done}/{len(pending)} runs, {minutes:.1f} min")
        failed = [p.args for p in procs if p.returncode != 0]
        if failed:
            raise RuntimeError(
                f"{len(failed)} worker(s) failed; see {out / 'logs'} (command: "
                f"{' '.join(failed[0])})"
            )
        _write_all(plan, out, _gather(plan, out))
    rows = _gather(plan, out)
    _write_all(plan, out, rows)
    return rows


def work(plan_path: str | os.PathLike, output_dir: str | os.PathLike, stage: int):
    """One worker of :func:`run_plan`: trains the stage's runs it can claim."""
    from mtl_utils.experiments.runner import run_experiments

    plan = load_plan(plan_path)
    out = Path(output_dir)
    runs = stage_runs(plan, stage, _gather(plan, out))
    run_experiments(
        plan.config(runs),
        out,
        verbose=2,
        log=lambda line: print(line, flush=True),
        claim=claim_run(out),
    )


def check_results_match_plan(
    plan_path: str | os.PathLike, results_dir, require_all: bool = True
) -> list[str]:
    """Raise ``ValueError`` unless the results were made with the plan's setting.

    Compares the plan file's setting with the one recorded in
    ``results.json``, field by field, and checks that every run the plan asks
    for is recorded (the rates of its second stage chosen from the results).
    With ``require_all=False`` missing runs are returned instead (a grid still
    running), by key.
    """
    plan = load_plan(plan_path)
    path = Path(results_dir) / RESULTS_JSON
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")
    stored = json.loads(path.read_text())
    differ = setting_differences(plan.config().setting(), stored.get("setting", {}))
    if differ:
        detail = ", ".join(
            f"{k}: plan {mine!r} vs results {theirs!r}"
            for k, (mine, theirs) in differ.items()
        )
        raise ValueError(
            f"{plan_path} differs from the setting recorded in {path}: {detail}"
        )
    rows = {_key_of(r): r for r in stored.get("runs", [])}
    wanted = stage_runs(plan, 1, rows)
    try:
        wanted += stage_runs(plan, 2, rows)
    except ValueError:  # the first stage is unfinished: no second-stage rates yet
        if require_all:
            raise
    missing = [r.key for r in wanted if r.key not in rows]
    if missing and require_all:
        raise ValueError(
            f"{path} lacks {len(missing)} run(s) of the plan, e.g. {missing[:3]}"
        )
    return missing


def _train_again(plan: Plan, run: Run, part: str | None = None, epochs=None):
    """Train ``run`` of ``plan`` again, writing nothing: (data, tasks, results).

    ``results`` maps each trained part (a task name for a single-task run,
    ``"all"`` otherwise) to the runner's result, model included.
    """
    from mtl_utils.experiments.data import experiment_tasks, load_data
    from mtl_utils.experiments.runner import _configure_tensorflow, _Runner

    config = plan.config([run])
    _configure_tensorflow(config)
    tasks = experiment_tasks(config)
    data = load_data(config)
    runner = _Runner(config, data, tasks, None, 0, print, None)
    if run.architecture != SINGLE_TASK:
        return data, tasks, {"all": runner.train(run, tasks, "all", epochs)}
    chosen = [t for t in tasks if part in (None, t.name)]
    if not chosen:
        raise ValueError(f"part {part!r} is not a task of {[t.name for t in tasks]}")
    return data, tasks, {t.name: runner.train(run, [t], t.name, epochs) for t in chosen}


def _flat_metrics(results: Mapping[str, dict]) -> dict[str, float]:
    new = {}
    for result in results.values():
        for split, prefix in (("test", ""), ("val", "val/")):
            for task, values in result[split].items():
                new.update({f"{prefix}{task}/{m}": v for m, v in values.items()})
    return new


def _recorded_run(rows: Mapping[str, Mapping], key: str, where) -> Run:
    if key not in rows:
        raise ValueError(f"no run {key!r} in {where}; it has {sorted(rows)[:5]}")
    r = rows[key]
    return Run(r["architecture"], r["strategy"], r["seed"], r["learning_rate"])


def reproduce_run(
    plan_path, results_dir, key: str, part: str | None = None, epochs=None
):
    """Train one recorded run again from its plan; return (recorded, new) metrics.

    ``key`` is a run key (``Run.key``); for a single-task run, ``part`` names
    the task whose network is trained (default: all of them). Metrics are the
    test and validation ones, ``{"<task>/<metric>": value}`` and
    ``{"val/<task>/<metric>": value}``, for the tasks trained.

    With ``epochs``, only the first ``epochs`` epochs are trained (on the full
    run's learning-rate schedule) and the validation metrics after the last of
    them are compared with those the run recorded in its history then.
    """
    plan = load_plan(plan_path)
    rows = _gather(plan, Path(results_dir))
    run = _recorded_run(rows, key, results_dir)
    results = _train_again(plan, run, part, epochs)[2]
    if epochs is None:
        new = _flat_metrics(results)
        old = {k: rows[key][k] for k in new if k in rows[key]}
        return old, {k: new[k] for k in old}
    history = rows[key].get("history") or {}
    old, new = {}, {}
    for name, result in results.items():
        for k, v in result["logs"][-1].items():
            logged = k if name == "all" else f"{name}/{k}"  # as _row names them
            if k.startswith("val/") and logged in history:
                old[k] = history[logged][epochs - 1]
                new[k] = v
    return old, new


PREDICTIONS = "predictions.npz"


def shown_runs(plan: Plan, rows: Mapping[str, Mapping], seed: int) -> dict:
    """The networks whose predictions the chapters show, one per architecture.

    ``{architecture: [(run, part), ...]}``: the single-task networks at each
    task's rate tuned on validation, hard sharing with equal weighting at its
    tuned rate, and MTAN with equal weighting at whichever of its recorded
    rates did better on validation (tuned equal weighting's, if none is).
    """
    from mtl_utils.experiments.results import _frame, tune_single_task_rates

    table = _frame(list(rows.values()))
    single = tune_single_task_rates(table)
    shown = {
        SINGLE_TASK: [
            (Run(SINGLE_TASK, "none", seed, lr), t) for t, lr in single.items()
        ]
    }
    ew_rate = tuned_equal_rates(plan, rows)[0]
    shown["hard_sharing"] = [(Run("hard_sharing", "equal", seed, ew_rate), None)]
    scored = add_delta_m(table, baseline_learning_rate="tuned", strict=False)
    mtan = scored[(scored["architecture"] == "mtan") & (scored["strategy"] == "equal")]
    val = mtan.groupby("learning_rate")["val_delta_m"].mean().dropna()
    rate = float(val.idxmin()) if len(val) else ew_rate
    shown["mtan"] = [(Run("mtan", "equal", seed, rate), None)]
    return shown


def save_predictions(
    plan_path, results_dir, seed: int = 0, count: int = 6, log=print
) -> Path:
    """Retrain the networks the chapters show and save their test predictions.

    Trains, for ``seed``, the runs of :func:`shown_runs` again from the plan
    (bit-identical to the recorded ones on the same CPU set-up), and writes
    ``predictions.npz`` to ``results_dir``: the first ``count`` test images
    and targets (``image``, ``target/<task>``), each network's outputs
    (``<architecture>/<task>``) and, as ``metrics/<architecture>/<task>/<metric>``,
    the test metrics of the retrained networks, for comparison with the record.

    An architecture whose networks an existing ``predictions.npz`` already
    holds (the same runs, the same ``count``) is kept, not retrained, and the
    file is written after each architecture: the command can run while the
    grid is unfinished, and again when it ends, to retrain only what changed.
    """
    plan = load_plan(plan_path)
    out = Path(results_dir)
    path = out / PREDICTIONS
    rows = _gather(plan, out)
    old: dict[str, np.ndarray] = {}
    if path.exists():
        with np.load(path) as saved:
            old = {k: saved[k] for k in saved.files}
    if "image" in old and len(old["image"]) != count:
        old = {}  # another number of test images: nothing can be kept
    arrays: dict[str, np.ndarray] = {}
    for arch, parts in shown_runs(plan, rows, seed).items():
        names = {f"runs/{arch}/{part or 'all'}": run.key for run, part in parts}
        if all(k in old and str(old[k]) == key for k, key in names.items()):
            log(f"kept the saved predictions of {arch}")
            arrays.update(
                {
                    k: v
                    for k, v in old.items()
                    if k in ("image",)
                    or k.startswith(("target/", f"{arch}/", f"runs/{arch}/"))
                    or k.startswith(f"metrics/{arch}/")
                }
            )
            continue
        for run, part in parts:
            log(f"training {run.key}" + (f" ({part})" if part else ""))
            data, tasks, results = _train_again(plan, run, part)
            shown = data["test"]["image"][:count]
            arrays["image"] = shown
            for t in tasks:
                arrays[f"target/{t.name}"] = data["test"][t.name][:count]
            arrays[f"runs/{arch}/{part or 'all'}"] = np.array(run.key)
            for result in results.values():
                outputs = result["model"](shown, training=False)
                if not isinstance(outputs, Mapping):
                    outputs = {part: outputs}
                arrays.update(
                    {f"{arch}/{k}": np.asarray(v) for k, v in outputs.items()}
                )
                for task, values in result["test"].items():
                    arrays.update(
                        {
                            f"metrics/{arch}/{task}/{m}": np.float64(v)
                            for m, v in values.items()
                        }
                    )
        np.savez_compressed(path, **{**old, **arrays})  # progress so far
    np.savez_compressed(path, **arrays)
    log(f"wrote {path}")
    return path


_FILES = ("results.json", PREDICTIONS)


def reference_files(name: str = "reference", repo_url: str | None = None):
    """The plan file and results folder of a committed reference grid.

    Looks for ``book/experiments/<name>.json`` and ``book/results/<name>/``
    from the working directory upwards (a clone of the book's repository, the
    chapters' folder included). Outside a clone (a notebook opened alone, as
    in Colab), ``repo_url`` (a GitHub repository URL, the setup cell's
    ``REPO_URL``) names where to fetch the committed files from; they are
    saved under ``~/.cache/mtl_utils/<name>``.

    Returns
    -------
    tuple[pathlib.Path, pathlib.Path]
        ``(plan_file, results_dir)``.
    """
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        plan = folder / "book" / "experiments" / f"{name}.json"
        results = folder / "book" / "results" / name
        if plan.exists() and (results / RESULTS_JSON).exists():
            return plan, results
    if repo_url is None:
        raise FileNotFoundError(
            f"no book/experiments/{name}.json and book/results/{name}/ in {here} or "
            "above; run from a clone of the book's repository, or pass repo_url"
        )
    import urllib.request

    owner_name = repo_url.rstrip("/").removesuffix(".git").split("github.com/")[-1]
    raw = f"https://raw.githubusercontent.com/{owner_name}/main/book"
    cache = Path.home() / ".cache" / "mtl_utils" / name
    cache.mkdir(parents=True, exist_ok=True)
    wanted = [(f"experiments/{name}.json", cache / f"{name}.json")]
    wanted += [(f"results/{name}/{f}", cache / f) for f in _FILES]
    for path, target in wanted:
        if not target.exists():
            try:
                urllib.request.urlretrieve(f"{raw}/{path}", target)
            except OSError as err:
                raise FileNotFoundError(
                    f"could not fetch {raw}/{path} ({err}); set REPO_URL in the "
                    "setup cell to the repository that holds this book"
                ) from err
    return cache / f"{name}.json", cache
