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
