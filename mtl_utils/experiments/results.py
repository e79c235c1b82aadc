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


def _read_results(path: Path, config: ExperimentConfig) -> dict[str, dict]:
    if not path.exists():
        return {}
    stored = json.loads(path.read_text())
    setting = json.loads(json.dumps(config.setting()))
    if stored.get("setting") != setting:
        old = stored.get("setting", {})
        differ = sorted(
            k for k in set(old) | set(setting) if old.get(k) != setting.get(k)
        )
        raise ValueError(
            f"{path} was written with a different setting (differing: {differ}); "
            "expected the same data, model and training settings to resume. Use "
            "another output folder, or restart=True (--restart) to discard it"
        )
    return {_key_of(row): row for row in stored.get("runs", [])}


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

    return pd.DataFrame([{k: v for k, v in r.items() if k != "history"} for r in rows])


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
    stored = json.loads(path.read_text())
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

    Parameters
    ----------
    results:
        A DataFrame of :func:`run_experiments` rows.
    tasks:
        Tasks whose metrics count (default: every ``"<task>/<metric>"`` column).
    baseline_learning_rate:
        Learning rate of the baseline runs, when single-task runs were trained
        with several.
    strict:
        Raise when there are no single-task runs; else leave Δm NaN.

    Returns
    -------
    pandas.DataFrame
        A copy of ``results`` with the three columns.
    """
    from mtl_utils.metrics import delta_m

    table = results.copy()
    layout = _metric_columns(table)
    if tasks is not None:
        layout = {t.name: list(t.metrics) for t in tasks}
    base = table[table["architecture"] == SINGLE_TASK]
    rates = sorted(set(base["learning_rate"])) if len(base) else []
    if baseline_learning_rate is not None:
        base = base[np.isclose(base["learning_rate"], baseline_learning_rate)]
    elif len(rates) > 1:
        raise ValueError(
            f"single-task runs use learning rates {rates}; pass "
            "baseline_learning_rate to choose the baseline"
        )
    for column in ("delta_m", "delta_m_same_seed", "val_delta_m"):
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
        table.loc[i, "delta_m"] = delta_m(test, mean_base)
        table.loc[i, "val_delta_m"] = delta_m(_nested(row, layout, "val/"), mean_val)
        same = by_seed.get(int(row["seed"]))
        if same is not None:
            table.loc[i, "delta_m_same_seed"] = delta_m(test, _nested(same, layout, ""))
    return table


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
