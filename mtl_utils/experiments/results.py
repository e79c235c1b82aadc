"""Results on disk and what is made of them: Δm, summaries over seeds, tables."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtl_utils.experiments.config import SINGLE_TASK, ExperimentConfig, Run
from mtl_utils.experiments.data import experiment_tasks
from mtl_utils.tasks import Task

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"


def setting_differences(wanted: Mapping, recorded: Mapping) -> dict[str, tuple]:
    """The fields whose values differ between two settings: ``{field: (a, b)}``.

    Settings are compared as JSON stores them (tuples as lists).
    """
    wanted, recorded = json.loads(json.dumps(wanted)), json.loads(json.dumps(recorded))
    keys = sorted(set(wanted) | set(recorded))
    return {
        k: (wanted.get(k), recorded.get(k))
        for k in keys
        if wanted.get(k) != recorded.get(k)
    }


def _read_json(path: Path) -> dict:
    """A results file, or a ``ValueError`` naming it and the way out."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"results file {path} is not valid JSON ({err}); restore it from git, "
            "or delete it (with --restart / restart=True the runs are trained again)"
        ) from err


def _read_results(path: Path, config: ExperimentConfig) -> dict[str, dict]:
    if not path.exists():
        return {}
    stored = _read_json(path)
    differ = sorted(setting_differences(config.setting(), stored.get("setting", {})))
    if differ:
        raise ValueError(
            f"{path} was written with a different setting (differing: {differ}); "
            "expected the same data, model and training settings to resume. Use "
            "another output folder, or restart=True (--restart) to discard it"
        )
    return {_key_of(row): row for row in stored.get("runs", [])}


def _record_files(out: Path) -> list[Path]:
    return sorted((Path(out) / "runs").glob("*.json"))


def read_run_records(out: str | os.PathLike, config: ExperimentConfig) -> dict:
    """The runs recorded one file each in ``out/runs/`` for ``config``'s setting."""
    setting = json.loads(json.dumps(config.setting()))
    rows = {}
    for path in _record_files(Path(out)):
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"run record {path} is unreadable ({err}); delete it to train that "
                "run again"
            ) from err
        if stored.get("setting") != setting:
            raise ValueError(
                f"run record {path} was written with a different setting; expected "
                "the setting of this experiment. Use another output folder, or "
                "restart=True (--restart) to discard it"
            )
        rows[_key_of(stored["row"])] = stored["row"]
    return rows


def _key_of(row: Mapping[str, Any]) -> str:
    return Run(
        row["architecture"], row["strategy"], int(row["seed"]), row["learning_rate"]
    ).key


def _write_results(output_dir: Path, config: ExperimentConfig, rows: dict) -> None:
    order = [r.key for r in config.runs]
    ordered = [rows[k] for k in order if k in rows]
    ordered += [rows[k] for k in rows if k not in order]
    payload = {"setting": config.setting(), "runs": ordered}
    _atomic_write(output_dir / RESULTS_JSON, json.dumps(payload, indent=1))
    table = _frame(ordered)
    if len(table):
        table = add_delta_m(
            table,
            experiment_tasks(config),
            baseline_learning_rate=config.baseline_learning_rate,
            strict=False,
        )
    _atomic_write(output_dir / RESULTS_CSV, table.to_csv(index=False))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _frame(rows: Sequence[Mapping[str, Any]]):
    import pandas as pd

    return pd.DataFrame(
        [{k: v for k, v in r.items() if k not in _NOT_COLUMNS} for r in rows]
    )


_NOT_COLUMNS = ("history", "environment")


def load_results(path: str | os.PathLike):
    """The results of :func:`run_experiments` from ``results.json`` or its folder.

    Returns
    -------
    (pandas.DataFrame, dict)
        The rows (with a ``history`` column of per-epoch logs) and the setting.
    """
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_JSON
    stored = _read_json(path)
    return pd.DataFrame(stored["runs"]), stored["setting"]


# ---------------------------------------------------------------------------
# delta_m and summaries
# ---------------------------------------------------------------------------


def _metric_columns(results, prefix: str = "") -> dict[str, list[str]]:
    """``{task: [metric, ...]}`` from columns ``"<prefix><task>/<metric>"``."""
    from mtl_utils.metrics import HIGHER_IS_BETTER

    found: dict[str, list[str]] = {}
    for column in results.columns:
        if not column.startswith(prefix):
            continue
        parts = column[len(prefix) :].split("/")
        if len(parts) == 2 and parts[1] in HIGHER_IS_BETTER and parts[0] != "val":
            found.setdefault(parts[0], []).append(parts[1])
    return found


def _nested(row, layout: Mapping[str, list[str]], prefix: str) -> dict:
    return {
        task: {m: float(row[f"{prefix}{task}/{m}"]) for m in metrics}
        for task, metrics in layout.items()
    }


def add_delta_m(
    results,
    tasks: Sequence[Task] | None = None,
    baseline_learning_rate: float | None = None,
    strict: bool = True,
):
    """Add Δm columns: each run against the single-task networks.

    Uses :func:`mtl_utils.metrics.delta_m` ("drop" convention, in %, lower is
    better; every metric of every task counts once):

    * ``delta_m``: test metrics against the single-task metrics averaged over
      seeds, the book's score. Its value for the single-task runs themselves
      averages to 0 over seeds; their spread shows how much seeds alone move
      Δm.
    * ``delta_m_same_seed``: test metrics against the single-task run of the
      same seed (NaN where that seed has none). It adds the baseline's own
      seed noise to every run of the seed.
    * ``val_delta_m``: validation metrics against the seed-averaged
      validation metrics of the single-task runs, used to choose learning
      rates (:func:`summarise`).
    * ``delta_<task>``: the Δ of one task's metrics alone (test, against the
      seed-averaged baseline): where Δm comes from.

    Parameters
    ----------
    results:
        A DataFrame of :func:`run_experiments` rows.
    tasks:
        Tasks whose metrics count (default: every ``"<task>/<metric>"`` column).
    baseline_learning_rate:
        Which single-task runs are the baseline, when they were trained with
        several learning rates: one rate, ``{task: rate}``, or ``"tuned"`` (each
        task's rate chosen on validation, :func:`tune_single_task_rates`).
    strict:
        Raise when there are no single-task runs; else leave Δm NaN.

    Returns
    -------
    pandas.DataFrame
        A copy of ``results`` with the Δ columns.
    """
    from mtl_utils.metrics import delta_m

    table = results.copy()
    layout = _metric_columns(table)
    if tasks is not None:
        layout = {t.name: list(t.metrics) for t in tasks}
    base = single_task_baseline(table, baseline_learning_rate, layout)
    columns = ["delta_m", "delta_m_same_seed", "val_delta_m"]
    columns += [f"delta_{t}" for t in layout]
    for column in columns:
        table[column] = np.nan
    if not len(base):
        if strict:
            raise ValueError(
                "no single-task runs (architecture 'single_task') to compare with; "
                "expected at least one as the Δm baseline"
            )
        return table
    by_seed = {int(row["seed"]): row for _, row in base.iterrows()}
    mean_base, mean_val = (
        {
            t: {m: float(base[f"{prefix}{t}/{m}"].mean()) for m in ms}
            for t, ms in layout.items()
        }
        for prefix in ("", "val/")
    )
    for i, row in table.iterrows():
        test = _nested(row, layout, "")
        table.loc[i, "delta_m"] = delta_m(test, mean_base, strict=strict)
        table.loc[i, "val_delta_m"] = delta_m(
            _nested(row, layout, "val/"), mean_val, strict=strict
        )
        for t in layout:
            table.loc[i, f"delta_{t}"] = delta_m(
                {t: test[t]}, {t: mean_base[t]}, strict=strict
            )
        same = by_seed.get(int(row["seed"]))
        if same is not None:
            table.loc[i, "delta_m_same_seed"] = delta_m(
                test, _nested(same, layout, ""), strict=strict
            )
    return table


def tune_single_task_rates(results, tasks: Sequence[Task] | None = None) -> dict:
    """Each task's single-task learning rate, chosen on the validation set.

    For every task, the rate whose seed-averaged validation metrics of that
    task have the lowest Δ (:func:`mtl_utils.metrics.delta_m`) against the
    average over all rates. Test metrics are not looked at.

    Returns
    -------
    dict
        ``{task: learning_rate}``.
    """
    from mtl_utils.metrics import delta_m

    layout = _metric_columns(results)
    if tasks is not None:
        layout = {t.name: list(t.metrics) for t in tasks}
    base = results[results["architecture"] == SINGLE_TASK]
    if not len(base):
        raise ValueError("no single-task runs to tune; expected architecture rows")
    groups = dict(list(base.groupby("learning_rate")))
    chosen = {}
    for t, metrics in layout.items():
        val = {
            lr: {t: {m: float(g[f"val/{t}/{m}"].mean()) for m in metrics}}
            for lr, g in groups.items()
        }
        mean = {
            t: {m: float(np.mean([v[t][m] for v in val.values()])) for m in metrics}
        }
        chosen[t] = float(min(val, key=lambda lr: delta_m(val[lr], mean)))
    return chosen


def single_task_baseline(results, baseline_learning_rate=None, layout=None):
    """The single-task runs that are the Δm baseline: one row per seed.

    ``baseline_learning_rate``: ``None`` (the single-task runs use one rate), a
    rate, ``{task: rate}`` or ``"tuned"`` (:func:`tune_single_task_rates`). With
    a rate per task, a seed's row takes each task's metrics from that task's
    network trained at that task's rate (``learning_rate`` is then NaN).
    """
    import pandas as pd

    base = results[results["architecture"] == SINGLE_TASK]
    if layout is None:
        layout = _metric_columns(results)
    rates = sorted(set(base["learning_rate"])) if len(base) else []
    if isinstance(baseline_learning_rate, str):
        if baseline_learning_rate != "tuned":
            raise ValueError(
                f"baseline_learning_rate={baseline_learning_rate!r}; expected a "
                "number, a {task: rate} dict or 'tuned'"
            )
        baseline_learning_rate = tune_single_task_rates(base) if len(base) else None
    if baseline_learning_rate is None:
        if len(rates) > 1:
            raise ValueError(
                f"single-task runs use learning rates {rates}; pass "
                "baseline_learning_rate to choose the baseline"
            )
        return base
    if not isinstance(baseline_learning_rate, Mapping):
        return base[np.isclose(base["learning_rate"], baseline_learning_rate)]
    missing = [t for t in layout if t not in baseline_learning_rate]
    if missing:
        raise ValueError(
            f"baseline_learning_rate has no rate for task(s) {missing}; expected "
            f"one per task of {list(layout)}"
        )
    rows = []
    for seed in sorted(set(base["seed"])):
        row = {"architecture": SINGLE_TASK, "strategy": "none", "seed": int(seed)}
        row["learning_rate"] = np.nan
        for t in layout:
            lr = baseline_learning_rate[t]
            pick = base[(base["seed"] == seed) & np.isclose(base["learning_rate"], lr)]
            if len(pick) != 1:
                break
            for column in base.columns:
                if column.startswith((f"{t}/", f"val/{t}/")):
                    row[column] = pick.iloc[0][column]
        else:
            rows.append(row)
    return pd.DataFrame(rows)


def summarise(
    results,
    metrics: Sequence[str] | None = None,
    tuned: Sequence[str] = ("equal",),
    baseline_learning_rate: float | None = None,
):
    """Mean and standard deviation over seeds of every run group.

    A group is one (architecture, strategy, learning rate). For every strategy
    in ``tuned`` trained with several learning rates, a row
    ``"<strategy> (tuned)"`` repeats the group whose learning rate has the
    lowest mean *validation* Δm (:func:`add_delta_m`), so that the choice never
    sees the test set.

    Parameters
    ----------
    results:
        Rows of :func:`run_experiments` (Δm columns are added when missing).
    metrics:
        Columns to summarise; default ``delta_m`` then every test metric.
    tuned:
        Strategies whose learning rate is tuned on the validation set.
    baseline_learning_rate:
        See :func:`add_delta_m`.

    Returns
    -------
    pandas.DataFrame
        Index ``(architecture, strategy, learning_rate)``; columns a MultiIndex
        ``(quantity, "mean" | "std")`` plus ``("runs", "count")``. The standard
        deviation is the sample one (``ddof=1``), NaN for a single seed.
    """
    import pandas as pd

    table = results
    if "delta_m" not in table.columns:
        table = add_delta_m(table, baseline_learning_rate=baseline_learning_rate)
    if metrics is None:
        metrics = ["delta_m"] + [
            f"{t}/{m}" for t, ms in _metric_columns(table).items() for m in ms
        ]
    missing = [m for m in metrics if m not in table.columns]
    if missing:
        raise ValueError(
            f"results have no column(s) {missing}; columns are {list(table.columns)}"
        )
    keys = ["architecture", "strategy", "learning_rate"]
    arch_order = {a: i for i, a in enumerate(dict.fromkeys(table["architecture"]))}
    strategy_order = {s: i for i, s in enumerate(dict.fromkeys(table["strategy"]))}
    groups = dict(list(table.groupby(keys, sort=False)))
    ordered = sorted(
        groups, key=lambda k: (arch_order[k[0]], strategy_order[k[1]], k[2])
    )
    # strategies in ``tuned``: the learning rate with the best validation Δm
    best_rate = {}
    for arch, strategy in dict.fromkeys((k[0], k[1]) for k in ordered):
        rates = [k[2] for k in ordered if k[:2] == (arch, strategy)]
        if strategy not in tuned or len(rates) < 2:
            continue
        val = {lr: groups[(arch, strategy, lr)]["val_delta_m"].mean() for lr in rates}
        if all(np.isnan(v) for v in val.values()):
            warnings.warn(
                f"cannot tune the learning rate of {strategy!r} ({arch}): no "
                "validation Δm, as there are no single-task runs to compare with",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        best_rate[(arch, strategy)] = min(
            rates, key=lambda lr: np.inf if np.isnan(val[lr]) else val[lr]
        )
    rows = []
    for i, key in enumerate(ordered):
        rows.append((key, key))
        last = i + 1 == len(ordered) or ordered[i + 1][:2] != key[:2]
        if last and key[:2] in best_rate:
            lr = best_rate[key[:2]]
            rows.append(((key[0], f"{key[1]} (tuned)", lr), (key[0], key[1], lr)))
    records = []
    for _, source in rows:
        group = groups[source]
        record = {}
        for m in metrics:
            values = group[m].astype(float)
            record[(m, "mean")] = values.mean()
            record[(m, "std")] = values.std(ddof=1) if len(values) > 1 else np.nan
        record[("runs", "count")] = len(group)
        records.append(record)
    index = pd.MultiIndex.from_tuples([label for label, _ in rows], names=keys)
    summary = pd.DataFrame(records, index=index)
    summary.columns = pd.MultiIndex.from_tuples(summary.columns)
    return summary


def format_summary(summary, digits: int = 3, rename: Mapping[str, str] | None = None):
    """The summary as text: ``"mean ± std"`` per quantity (``"mean"`` for one seed).

    Values are rounded to ``digits`` significant digits.
    """
    import pandas as pd

    quantities = [q for q in dict.fromkeys(summary.columns.get_level_values(0))]
    out = pd.DataFrame(index=summary.index)
    for q in quantities:
        if q == "runs":
            out["runs"] = summary[("runs", "count")].astype(int)
            continue
        mean, std = summary[(q, "mean")], summary[(q, "std")]
        out[(rename or {}).get(q, q)] = [
            _fmt(m, digits) + ("" if pd.isna(s) else f" ± {_fmt(s, digits)}")
            for m, s in zip(mean, std, strict=True)
        ]
    return out


def _fmt(x: float, digits: int) -> str:
    """``x`` with ``digits`` significant digits, without exponent or "-0"."""
    if x is None or not np.isfinite(x):
        return "nan"
    if abs(x) < 1e-9:  # e.g. a mean of relative changes that cancel exactly
        return "0"
    decimals = max(digits - 1 - math.floor(math.log10(abs(x))), 0)
    text = f"{x:.{decimals}f}"
    return "0" if float(text) == 0 else text


def _markdown(table) -> str:
    """A DataFrame as a Markdown table (without pandas' optional tabulate)."""
    header = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


#: Two-sided 95 % Student-t quantiles t_{0.975, df} for df = 1 .. 30.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def _t975(df: int) -> float:
    if df < 1:
        return math.nan
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def at_tuned_rate(results, seeds: int | None = None) -> dict:
    """Each multi-task (architecture, strategy) at its rate tuned on validation.

    The rate with the lowest mean validation Δm (``val_delta_m``) among the
    rates the group was trained at; with ``seeds``, only rates trained with
    that many seeds count (a grid still running leaves out the others).

    Returns
    -------
    dict
        ``{(architecture, strategy): rows at the chosen rate}``.
    """
    if "val_delta_m" not in results.columns:
        raise ValueError("results have no val_delta_m column; add it with add_delta_m")
    groups = results[results["architecture"] != SINGLE_TASK]
    chosen = {}
    for (arch, strategy), g in groups.groupby(["architecture", "strategy"], sort=False):
        count = g.groupby("learning_rate")["seed"].nunique()
        rates = count.index if seeds is None else count.index[count >= seeds]
        if not len(rates):
            continue
        val = g.groupby("learning_rate")["val_delta_m"].mean().loc[rates]
        chosen[(arch, strategy)] = g[np.isclose(g["learning_rate"], val.idxmin())]
    return chosen


def single_task_deltas(results, tasks: Sequence[Task] | None = None):
    """The tuned single-task networks of each seed, scored against their mean.

    One row per seed (each task's network at its rate tuned on validation,
    :func:`single_task_baseline`) with the Δ columns of :func:`add_delta_m`:
    how far seeds alone move the score. The standard deviation of
    ``delta_m`` over these rows is the seed noise of the comparison.
    """
    base = single_task_baseline(results, "tuned")
    if not len(base):
        raise ValueError("no single-task runs with every task at its tuned rate")
    return add_delta_m(base.assign(learning_rate=0.0), tasks=tasks)


def mean_interval(values) -> tuple[float, float, float]:
    """Mean and 95 % Student-t interval of the mean: ``(mean, low, high)``."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    half = _t975(n - 1) * float(x.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    return mean, mean - half, mean + half


def delta_table(results, columns: Sequence[str] | None = None, seeds=None):
    """Per-task Δ and Δm of every method at its tuned rate, with 95 % intervals.

    The first row is the tuned single-task networks (:func:`single_task_deltas`,
    mean 0 by construction: its interval is the seed noise), then every
    multi-task (architecture, strategy) at its validation-tuned rate
    (:func:`at_tuned_rate`). ``results`` must have the Δ columns of
    :func:`add_delta_m` (``baseline_learning_rate="tuned"``).

    Returns
    -------
    pandas.DataFrame
        Index ``(architecture, strategy)``; columns ``(column, "mean" | "low" |
        "high")``, ``("learning_rate", "")`` and ``("seeds", "n")``.
    """
    import pandas as pd

    if columns is None:
        columns = [c for c in results.columns if c.startswith("delta_")]
        columns = [c for c in columns if c != "delta_m_same_seed"]
        columns = sorted(columns, key=lambda c: c == "delta_m")
    groups = {(SINGLE_TASK, "none"): single_task_deltas(results)}
    groups.update(at_tuned_rate(results, seeds))
    records = []
    for g in groups.values():
        record = {("learning_rate", ""): float(g["learning_rate"].iloc[0])}
        record[("seeds", "n")] = int(g["seed"].nunique())
        for column in columns:
            mean, low, high = mean_interval(g[column])
            record.update({(column, "mean"): mean, (column, "low"): low})
            record[(column, "high")] = high
        records.append(record)
    index = pd.MultiIndex.from_tuples(list(groups), names=["architecture", "strategy"])
    out = pd.DataFrame(records, index=index)
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    out.loc[(SINGLE_TASK, "none"), ("learning_rate", "")] = np.nan
    return out


def format_delta_table(table, columns: Sequence[str] | None = None, digits: int = 1):
    """:func:`delta_table` as text: ``"mean ± half-width"`` of the 95 % interval, in %.

    The Student-t interval is symmetric about the mean, so ``"+3.2 ± 1.5"`` is
    the interval [+1.7, +4.7]. Rows are labelled ``"architecture / strategy"``
    (``hard_sharing`` shortened to ``HS``); the ``lr`` column reads "per task"
    for the single-task networks, whose rates are tuned task by task; ``seeds``
    counts the seeds behind each row.
    """
    import pandas as pd

    if columns is None:
        columns = list(
            dict.fromkeys(c for c, _ in table.columns if c.startswith("delta"))
        )

    def cell(row, c):
        mean, high = row[(c, "mean")], row[(c, "high")]
        return f"{mean:+.{digits}f} ± {high - mean:.{digits}f}"

    rates = table[("learning_rate", "")]
    out = {
        "lr": [("per task" if np.isnan(lr) else f"{lr:g}") for lr in rates],
        "seeds": table[("seeds", "n")].astype(int).tolist(),
    }
    for c in columns:
        name = "Δm" if c == "delta_m" else "Δ " + c.removeprefix("delta_")
        out[f"{name} (%)"] = [cell(row, c) for _, row in table.iterrows()]
    labels = [f"{_short(a)} / {s}" for a, s in table.index]
    return pd.DataFrame(out, index=labels)


def _short(architecture: str) -> str:
    return {"hard_sharing": "HS", "single_task": "single-task", "mtan": "MTAN"}.get(
        architecture, architecture
    )


def paired_differences(
    results,
    reference: tuple[str, str] = ("hard_sharing", "equal"),
    columns: Sequence[str] = ("delta_m",),
    seeds: int | None = None,
):
    """Each (architecture, strategy) against a reference, paired by seed.

    Every group is taken at its learning rate with the lowest mean validation
    Δm (``val_delta_m``), the reference too; then for each seed both share,
    ``difference = group - reference`` in each column (same seed, same data).
    Reports the mean difference, its sample standard deviation, the number of
    seeds and a 95 % Student-t interval ``mean ± t_{0.975, n-1} sd / sqrt(n)``.
    With Δ columns (lower is better) a negative interval means the strategy
    beats the reference. With ``seeds``, only rates trained with that many
    seeds are considered (:func:`at_tuned_rate`).

    Returns
    -------
    pandas.DataFrame
        Index ``(architecture, strategy)``; columns ``(column, "mean" | "low" |
        "high" | "sd")`` and ``("seeds", "n")``.
    """
    import pandas as pd

    needed = ["val_delta_m", *columns]
    missing = [c for c in needed if c not in results.columns]
    if missing:
        raise ValueError(
            f"results have no column(s) {missing}; add them with add_delta_m"
        )
    chosen = at_tuned_rate(results, seeds)
    if tuple(reference) not in chosen:
        raise ValueError(f"no runs of the reference {reference}; have {sorted(chosen)}")
    ref = chosen[tuple(reference)].set_index("seed")
    records, index = [], []
    for key, g in chosen.items():
        if key == tuple(reference):
            continue
        g = g.set_index("seed")
        seeds = sorted(set(g.index) & set(ref.index))
        record = {("seeds", "n"): len(seeds)}
        for column in columns:
            d = (g.loc[seeds, column] - ref.loc[seeds, column]).to_numpy(float)
            mean, low, high = mean_interval(d)
            sd = float(d.std(ddof=1)) if len(d) > 1 else math.nan
            record.update({(column, "mean"): mean, (column, "low"): low})
            record.update({(column, "high"): high, (column, "sd"): sd})
        records.append(record)
        index.append(key)
    out = pd.DataFrame(
        records,
        index=pd.MultiIndex.from_tuples(index, names=["architecture", "strategy"]),
    )
    wanted = [(c, k) for c in columns for k in ("mean", "low", "high", "sd")]
    out = out.reindex(columns=[("seeds", "n"), *wanted])  # also when no method
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    return out
