"""Figures of experiment results."""

from __future__ import annotations

import numpy as np

from mtl_utils.experiments.config import SINGLE_TASK
from mtl_utils.experiments.results import add_delta_m, summarise


def plot_delta_m(results, summary=None, ax=None, title: str | None = None):
    """Δm per run group: mean ± std over seeds (bars) and each seed (dots).

    Parameters
    ----------
    results:
        Rows with the ``delta_m`` column (:func:`add_delta_m`).
    summary:
        :func:`summarise` of ``results`` (computed when ``None``).
    ax:
        Matplotlib axes to draw on (a new figure when ``None``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    if "delta_m" not in results.columns:
        results = add_delta_m(results)
    if summary is None:
        summary = summarise(results, metrics=["delta_m"])
    labels, means, stds, dots = [], [], [], []
    pairs = [(a, s) for a, s, _ in summary.index]
    for (arch, strategy, lr), row in summary.iterrows():
        several = pairs.count((arch, strategy.replace(" (tuned)", ""))) > 1
        name = arch.replace("_", " ")
        label = name if arch == SINGLE_TASK else f"{name}: {strategy}"
        if several or strategy.endswith("(tuned)"):
            label += f" (lr {lr:g})"
        labels.append(label)
        means.append(row[("delta_m", "mean")])
        stds.append(row[("delta_m", "std")])
        base = strategy.replace(" (tuned)", "")
        mine = results[
            (results["architecture"] == arch)
            & (results["strategy"] == base)
            & np.isclose(results["learning_rate"], lr)
        ]
        dots.append(mine["delta_m"].to_numpy(float))
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    else:
        fig = ax.figure
    y = np.arange(len(labels))[::-1]
    colours = ["tab:green" if m <= 0 else "tab:red" for m in means]
    ax.barh(y, means, xerr=np.nan_to_num(stds), color=colours, alpha=0.5, capsize=3)
    for yi, values in zip(y, dots, strict=True):
        ax.plot(values, np.full(len(values), yi), "k.", markersize=5)
    ax.axvline(0.0, color="k", linewidth=0.8)
    ax.set_yticks(y, labels)
    ax.set_xlabel("Δm vs the single-task networks' mean (%, lower is better)")
    ax.set_title(
        title or "Multi-task score per method: mean ± std over seeds, dots = seeds"
    )
    fig.tight_layout()
    return fig


def _label(arch: str, strategy: str) -> str:
    if arch == SINGLE_TASK:
        return "single-task"
    name = {"hard_sharing": "", "mtan": "MTAN "}.get(arch, f"{arch} ")
    return f"{name}{strategy}".strip()


def plot_tradeoff(table, tasks=("segmentation", "depth", "normal")):
    """Per-task Δ of each method, pairwise, with 95 % seed intervals.

    ``table`` is :func:`~mtl_utils.experiments.results.delta_table`. Each panel
    puts one task's Δ against another's (%, lower is better on both axes), so
    a method below and left of another is better at both tasks; the
    single-task networks sit at the origin, their cross the seed noise.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import itertools

    import matplotlib.pyplot as plt

    pairs = list(itertools.combinations(tasks, 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.4 * len(pairs), 3.6))
    axes = np.atleast_1d(axes)
    markers = itertools.cycle("osD^vP*Xh<>")
    styles = {key: next(markers) for key in table.index}
    for ax, (tx, ty) in zip(axes, pairs, strict=True):
        for i, (key, row) in enumerate(table.iterrows()):
            x, y = (row[(f"delta_{t}", "mean")] for t in (tx, ty))
            xerr = [
                [x - row[(f"delta_{tx}", "low")]],
                [row[(f"delta_{tx}", "high")] - x],
            ]
            yerr = [
                [y - row[(f"delta_{ty}", "low")]],
                [row[(f"delta_{ty}", "high")] - y],
            ]
            ax.errorbar(
                x,
                y,
                xerr=xerr,
                yerr=yerr,
                fmt=styles[key],
                color=f"C{i}",
                capsize=2,
                label=_label(*key),
            )
        ax.axhline(0, color="0.6", linewidth=0.8)
        ax.axvline(0, color="0.6", linewidth=0.8)
        ax.set_xlabel(f"Δ {tx} (%)")
        ax.set_ylabel(f"Δ {ty} (%)")
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle(
        "Per-task Δ against the single-task networks: mean and 95% interval over "
        "seeds (lower is better)"
    )
    fig.tight_layout()
    return fig


def plot_paired(paired, column: str = "delta_m", reference: str = "tuned EW"):
    """Each method minus the reference, paired by seed, with its 95 % interval.

    ``paired`` is :func:`~mtl_utils.experiments.results.paired_differences`.
    An interval left of zero means the method beats the reference; one that
    crosses zero means the seeds cannot tell them apart.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    labels = [_label(*key) for key in paired.index]
    mean = paired[(column, "mean")].to_numpy(float)
    low = paired[(column, "low")].to_numpy(float)
    high = paired[(column, "high")].to_numpy(float)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.4))
    y = np.arange(len(labels))[::-1]
    clear = (high < 0) | (low > 0)
    colours = np.where(clear, np.where(high < 0, "tab:green", "tab:red"), "0.4")
    for yi, m, lo, hi, c in zip(y, mean, low, high, colours, strict=True):
        ax.plot([lo, hi], [yi, yi], color=c, linewidth=2)
        ax.plot(m, yi, "o", color=c)
    ax.axvline(0.0, color="k", linewidth=0.8)
    ax.set_yticks(y, labels)
    name = "Δm" if column == "delta_m" else column.replace("delta_", "Δ ")
    ax.set_xlabel(f"{name} minus {reference}'s, same seed (percentage points)")
    ax.set_title(f"Paired difference from {reference}: mean and 95% interval")
    fig.tight_layout()
    return fig


def history_curves(rows, key: str) -> np.ndarray:
    """One history entry of several runs as an array ``(runs, epochs)``.

    ``rows`` are result rows with a ``history`` column; ``key`` is a history
    entry, e.g. ``"val/depth/abs_err"`` (single-task histories prefix it with
    their task: ``"depth/val/depth/abs_err"``).
    """
    histories = list(rows["history"])
    missing = [i for i, h in enumerate(histories) if key not in h]
    if missing:
        known = sorted(histories[missing[0]])[:8]
        raise ValueError(f"no history entry {key!r}; entries include {known}")
    return np.array([h[key] for h in histories], dtype=float)


def plot_curves(curves, ax=None, title: str = "", ylabel: str = ""):
    """Curves over epochs: the mean over runs as a line, their range shaded.

    ``curves`` maps a label to an array ``(runs, epochs)``
    (:func:`history_curves`).

    Returns
    -------
    matplotlib.axes.Axes
    """
    import matplotlib.pyplot as plt

    if ax is None:
        ax = plt.subplots(figsize=(4.2, 3.4))[1]
    for i, (label, values) in enumerate(curves.items()):
        values = np.atleast_2d(np.asarray(values, dtype=float))
        epochs = np.arange(1, values.shape[1] + 1)
        ax.plot(epochs, values.mean(0), color=f"C{i}", label=label)
        if len(values) > 1:
            ax.fill_between(
                epochs, values.min(0), values.max(0), color=f"C{i}", alpha=0.2
            )
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # no epoch 2.5
    ax.set_ylabel(ylabel)
    return ax
