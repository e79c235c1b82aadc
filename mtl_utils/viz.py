"""Figures the book shows, built with matplotlib (no state kept between calls)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: One colour per segmentation class of the scenes benchmark (floor, wall, sphere,
#: box, cylinder); unlabelled pixels (-1) are drawn black.
SEGMENTATION_COLOURS = np.array(
    [
        [0.55, 0.45, 0.35],
        [0.75, 0.80, 0.90],
        [0.90, 0.30, 0.25],
        [0.25, 0.60, 0.30],
        [0.30, 0.40, 0.85],
    ]
)


def colour_segmentation(labels: np.ndarray, colours: np.ndarray = SEGMENTATION_COLOURS):
    """RGB image (..., 3) of a label map; -1 (unlabelled) is black."""
    labels = np.asarray(labels)
    out = np.zeros(labels.shape + (3,))
    valid = labels >= 0
    out[valid] = colours[labels[valid] % len(colours)]
    return out


def colour_normals(normal: np.ndarray) -> np.ndarray:
    """Map unit normals in [-1, 1] to RGB in [0, 1]; invalid (zero) normals black."""
    normal = np.asarray(normal, np.float64)
    valid = np.linalg.norm(normal, axis=-1, keepdims=True) > 0
    return np.where(valid, (normal + 1) / 2, 0.0)


def scene_grid(arrays: Mapping[str, np.ndarray], n: int = 4, class_names=None):
    """Grid of ``n`` samples: image, segmentation, depth, normals; count in titles.

    Parameters
    ----------
    arrays:
        Output of :func:`mtl_utils.data.scenes.render_scenes` (or any dict with the
        same keys; missing keys are skipped).
    n:
        Number of samples (rows).

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    columns = [k for k in ("image", "segmentation", "depth", "normal") if k in arrays]
    n = min(n, len(arrays["image"]))
    fig, axes = plt.subplots(
        n, len(columns), figsize=(2.2 * len(columns), 2.2 * n), squeeze=False
    )
    for i in range(n):
        for j, key in enumerate(columns):
            ax = axes[i, j]
            value = arrays[key][i]
            if key == "segmentation":
                ax.imshow(colour_segmentation(value), interpolation="nearest")
            elif key == "depth":
                shown = np.ma.masked_equal(value[..., 0], 0)
                im = ax.imshow(shown, cmap="viridis", interpolation="nearest")
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="depth")
            elif key == "normal":
                ax.imshow(colour_normals(value), interpolation="nearest")
            else:
                ax.imshow(np.clip(value, 0, 1), interpolation="nearest")
            if i == 0:
                ax.set_title(key)
            ax.set_xticks([])
            ax.set_yticks([])
        if "count" in arrays:
            axes[i, 0].set_ylabel(f"count = {int(arrays['count'][i])}")
    if class_names is not None and "segmentation" in columns:
        from matplotlib.patches import Patch

        handles = [
            Patch(color=SEGMENTATION_COLOURS[k], label=name)
            for k, name in enumerate(class_names)
        ]
        fig.legend(
            handles=handles, loc="lower center", ncol=len(handles), frameon=False
        )
        fig.subplots_adjust(bottom=0.08)
    fig.tight_layout(rect=(0, 0.05 if class_names is not None else 0, 1, 1))
    return fig
