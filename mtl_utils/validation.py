"""Checks of data and settings where they enter `mtl_utils`, with errors that name them.

One module serves every entry point (:func:`mtl_utils.data.pipeline.make_dataset`,
:func:`mtl_utils.data.nyuv2.load_nyuv2`, the metrics, the augmentations and the
weighting strategies), so that a wrong dtype, value range, label or setting is
refused once, where it comes in, with a message naming the task or array, what it
holds and what was expected, rather than surfacing later as a NaN or a deep
TensorFlow traceback.

All checks take NumPy arrays (or anything ``np.asarray`` accepts) and return
nothing or the checked value; they raise :class:`ValueError`.

Examples
--------
>>> import numpy as np
>>> from mtl_utils.tasks import Task
>>> check_target(Task("seg", "segmentation", 5), np.array([[0, 4, -1]]))
>>> check_target(Task("seg", "segmentation", 5), np.array([[0, 7]]))
Traceback (most recent call last):
...
ValueError: task 'seg' (segmentation, 5 classes): labels [7] outside 0..4 (-1 marks \
unlabelled elements), first in sample 0
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from mtl_utils.tasks import MISSING_VALUE, Task

__all__ = [
    "check_finite",
    "check_image",
    "check_labels",
    "check_number",
    "check_target",
    "check_task_list",
]


def _first_sample(bad: np.ndarray) -> str:
    """``", first in sample i"`` for a boolean array whose first axis is samples."""
    if bad.ndim == 0:
        return ""
    index = int(np.argmax(bad.reshape(len(bad), -1).any(axis=1)))
    return f", first in sample {index}"


def check_task_list(tasks, what: str = "tasks") -> list:
    """``tasks`` as a list, refusing a bare string or Task (it is not a list).

    A string is iterable, so ``"depth"`` would silently become the tasks
    ``["d", "e", "p", "t", "h"]``.
    """
    if isinstance(tasks, (str, bytes, Task)):
        shown = tasks.name if isinstance(tasks, Task) else tasks
        raise ValueError(
            f"{what} is the single {type(tasks).__name__} {shown!r}; expected a list "
            f"of task names or Task objects, e.g. [{shown!r}]"
        )
    if not isinstance(tasks, Iterable):
        raise ValueError(
            f"{what} is a {type(tasks).__name__}; expected a list of task names or "
            "Task objects"
        )
    return list(tasks)


def check_finite(array, name: str) -> None:
    """Refuse NaN or infinite values in a float ``array`` (first axis: samples)."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        return
    bad = ~np.isfinite(array)
    if bad.any():
        raise ValueError(
            f"{name} holds {int(bad.sum())} NaN or infinite value(s)"
            f"{_first_sample(bad)}; expected finite numbers (mark a missing label "
            "with the task's MISSING_VALUE, not NaN)"
        )


def check_image(image, name: str = "image") -> None:
    """Refuse images that are not finite floats in [0, 1].

    Raises
    ------
    ValueError
        For an integer dtype (``uint8`` 0..255: convert with
        ``image.astype("float32") / 255``), non-finite values, or values outside
        [0, 1] (0..255 floats, or standardised images: normalise inside the model,
        e.g. with ``keras.layers.Normalization``).
    """
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(
            f"{name} has dtype {image.dtype}; expected float32 in [0, 1]. Convert "
            f"0..255 images explicitly: {name}.astype('float32') / 255"
        )
    check_finite(image, name)
    if image.size:
        low, high = float(image.min()), float(image.max())
        if low < 0.0 or high > 1.0:
            hint = (
                " (it looks like 0..255: divide by 255)"
                if high > 1.5 and low >= 0.0
                else " (normalise inside the model, e.g. keras.layers.Normalization)"
            )
            raise ValueError(
                f"{name} values lie in [{low:.4g}, {high:.4g}]; expected [0, 1]{hint}"
            )


def check_labels(
    labels, num_classes: int, name: str, missing: int = -1, hint: str = ""
) -> None:
    """Refuse class labels that are not integers in ``0..num_classes - 1``
    (or ``missing``)."""
    labels = np.asarray(labels)
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.number):
        raise ValueError(f"{name} has dtype {labels.dtype}; expected integer labels")
    if np.issubdtype(labels.dtype, np.floating):
        check_finite(labels, name)
        fractional = labels != np.rint(labels)
        if fractional.any():
            raise ValueError(
                f"{name} holds non-integer labels such as "
                f"{labels[fractional][:3].tolist()}{_first_sample(fractional)}; "
                "expected integer class labels"
            )
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != missing)
    if bad.any():
        values = np.unique(labels[bad])
        shown = values[:10].astype(np.int64).tolist()
        more = f" and {len(values) - 10} more" if len(values) > 10 else ""
        raise ValueError(
            f"{name}: labels {shown}{more} outside 0..{num_classes - 1} ({missing} "
            f"marks unlabelled elements){_first_sample(bad)}{hint}"
        )


def check_target(task: Task, target, hint: str = "") -> None:
    """Check one task's targets ``(N, ...)`` against its kind.

    Segmentation and classification: integer labels in ``0..C - 1`` or -1;
    depth: finite and ``>= 0`` (0 = missing); normal: finite. Shapes are checked
    by the losses.
    """
    kind = task.kind
    target = np.asarray(target)
    name = f"task {task.name!r} ({kind}"
    if kind in ("segmentation", "classification"):
        check_labels(
            target,
            task.channels,
            f"{name}, {task.channels} classes)",
            MISSING_VALUE[kind],
            hint,
        )
        return
    if not np.issubdtype(target.dtype, np.floating):
        target = target.astype(np.float64)
    check_finite(target, f"{name}) target")
    if kind == "depth" and target.size and float(target.min()) < 0:
        bad = target < 0
        raise ValueError(
            f"{name}) target holds {int(bad.sum())} negative depth(s), down to "
            f"{float(target.min()):.4g}{_first_sample(bad)}; expected depth >= 0 "
            "(0 marks a missing measurement)"
        )


def check_number(
    value,
    name: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """``value`` as a float, refusing NaN, infinity and values out of range.

    ``low``/``high`` bound the value (inclusive; ``low_open=True`` excludes
    ``low``). ``name`` should say whose setting it is, e.g.
    ``"DynamicWeightAverage temperature"``.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} is {value!r}; expected a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} is {number}; expected a finite number")
    if low is not None and (number <= low if low_open else number < low):
        sign = ">" if low_open else ">="
        raise ValueError(f"{name} is {number}; expected {sign} {low}")
    if high is not None and number > high:
        raise ValueError(f"{name} is {number}; expected <= {high}")
    return number
