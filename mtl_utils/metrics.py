"""Evaluation metrics of dense multi-task prediction and the multi-task score Δm.

Conventions follow the NYUv2 literature (Liu et al. 2019, MTAN): segmentation mIoU
and pixel accuracy from a confusion matrix, ignoring label -1; depth absolute and
relative error over valid pixels (target > 0); surface-normal angular error in
degrees over valid pixels (non-zero target), summarised by mean, median and the
percentage of pixels within 11.25, 22.5 and 30 degrees.

All functions take NumPy arrays (or tensors, converted with ``np.asarray``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np

from mtl_utils.tasks import (
    CLASSIFICATION_METRICS,
    DEPTH_METRICS,
    NORMAL_METRICS,
    SEGMENTATION_METRICS,
    Task,
)
from mtl_utils.validation import check_labels

#: Metric name -> True when higher is better, for every metric this module returns.
HIGHER_IS_BETTER: dict[str, bool] = {
    **SEGMENTATION_METRICS,
    **DEPTH_METRICS,
    **NORMAL_METRICS,
    **CLASSIFICATION_METRICS,
}
ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)


def _same_shape(what: str, target: np.ndarray, pred: np.ndarray, expected: str):
    if target.shape != pred.shape:
        raise ValueError(
            f"{what}: target has shape {target.shape} but prediction has shape "
            f"{pred.shape}; expected both {expected}"
        )


def confusion_matrix(
    target, pred, num_classes: int, ignore_index: int = -1
) -> np.ndarray:
    """Confusion matrix (C, C): rows are true classes, columns predicted classes.

    Parameters
    ----------
    target, pred:
        Integer label maps of the same shape, e.g. (B, H, W). Pixels whose target is
        ``ignore_index`` are left out.
    num_classes:
        C; labels must lie in ``0 .. C - 1``.
    """
    target, pred = np.asarray(target), np.asarray(pred)
    _same_shape("confusion_matrix", target, pred, "integer label maps like (B, H, W)")
    keep = target != ignore_index
    t, p = target[keep].astype(np.int64), pred[keep].astype(np.int64)
    bad = (t < 0) | (t >= num_classes) | (p < 0) | (p >= num_classes)
    if bad.any():
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1} (or {ignore_index} in the "
            f"target); found {np.unique(np.concatenate([t[bad], p[bad]]))[:10]}"
        )
    counts = np.bincount(t * num_classes + p, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def scores_from_confusion(cm: np.ndarray) -> dict[str, float]:
    """``miou`` (mean IoU over classes present in target or prediction) and
    ``pixel_acc`` from a confusion matrix, both in [0, 1]."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    miou = float((tp[present] / union[present]).mean()) if present.any() else np.nan
    total = cm.sum()
    return {"miou": miou, "pixel_acc": float(tp.sum() / total) if total else np.nan}


def predicted_labels(target, pred, num_classes: int | None, what: str) -> np.ndarray:
    """``pred`` as labels: logits (one more axis than ``target``) by ``argmax``.

    Raises
    ------
    ValueError
        If logits are not finite (an argmax of NaN is class 0, a made-up
        prediction) or have a channel count other than ``num_classes``.
    """
    pred = np.asarray(pred)
    if pred.ndim != np.ndim(target) + 1:
        return pred
    if num_classes is not None and pred.shape[-1] != num_classes:
        raise ValueError(
            f"{what}: logits have shape {pred.shape} with {pred.shape[-1]} channels; "
            f"expected one channel per class, {num_classes}"
        )
    if np.issubdtype(pred.dtype, np.floating) and not np.isfinite(pred).all():
        raise ValueError(
            f"{what}: logits hold {int((~np.isfinite(pred)).sum())} NaN or infinite "
            "value(s); expected finite logits (the model diverged?)"
        )
    return pred.argmax(-1)


def segmentation_metrics(target, pred, num_classes: int) -> dict[str, float]:
    """mIoU and pixel accuracy of label maps ``pred`` against ``target`` (-1 ignored).

    ``pred`` may also be logits (B, H, W, C) with C = ``num_classes``; they are
    reduced with ``argmax``.
    """
    pred = predicted_labels(target, pred, num_classes, "segmentation")
    return scores_from_confusion(confusion_matrix(target, pred, num_classes))


def depth_errors(target, pred) -> tuple[np.ndarray, np.ndarray]:
    """Absolute and relative errors at valid pixels (target > 0), flattened."""
    target, pred = np.asarray(target, np.float64), np.asarray(pred, np.float64)
    _same_shape("depth", target, pred, "(B, H, W, 1)")
    valid = target > 0
    abs_err = np.abs(pred[valid] - target[valid])
    return abs_err, abs_err / target[valid]


def depth_metrics(target, pred) -> dict[str, float]:
    """``abs_err`` and ``rel_err`` averaged over valid pixels (target > 0)."""
    abs_err, rel_err = depth_errors(target, pred)
    return {"abs_err": _mean(abs_err), "rel_err": _mean(rel_err)}


def normal_angles(target, pred) -> np.ndarray:
    """Angles in degrees between predicted and target normals at valid pixels.

    Predictions are normalised first; pixels whose target is the zero vector are
    invalid and left out.
    """
    target, pred = np.asarray(target, np.float64), np.asarray(pred, np.float64)
    _same_shape("normal", target, pred, "(B, H, W, 3)")
    if target.shape[-1] != 3:
        raise ValueError(f"normal maps have shape {target.shape}; expected (..., 3)")
    valid = np.linalg.norm(target, axis=-1) > 0
    t, p = target[valid], pred[valid]
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    p = p / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
    return np.degrees(np.arccos(np.clip((t * p).sum(-1), -1.0, 1.0)))


def angle_summary(angles: np.ndarray) -> dict[str, float]:
    """Mean, median and percentage within each threshold of angular errors."""
    out = {
        "mean": _mean(angles),
        "median": float(np.median(angles)) if angles.size else np.nan,
    }
    for thr in ANGLE_THRESHOLDS:
        key = f"within_{thr:g}"
        out[key] = float((angles < thr).mean() * 100) if angles.size else np.nan
    return out


def normal_metrics(target, pred) -> dict[str, float]:
    """Angular error statistics in degrees (and % of pixels within thresholds)."""
    return angle_summary(normal_angles(target, pred))


def classification_metrics(
    target, pred, num_classes: int | None = None
) -> dict[str, float]:
    """Accuracy of labels (or logits (B, C)) against ``target`` (B,), -1 ignored.

    Target labels must lie in ``0 .. C - 1`` (or be -1), with C = ``num_classes``
    or, when not given, the logits' channel count; an out-of-range label is an
    error, not a wrong prediction.
    """
    target = np.asarray(target)
    if num_classes is None and np.ndim(pred) == target.ndim + 1:
        num_classes = np.shape(pred)[-1]
    pred = predicted_labels(target, pred, num_classes, "classification")
    _same_shape("classification", target, pred, "(B,) labels or (B, C) logits")
    if num_classes is not None:
        check_labels(target, num_classes, "classification target")
    keep = target != -1
    return {"accuracy": _mean((pred[keep] == target[keep]).astype(np.float64))}


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else np.nan


class TaskMetrics:
    """Accumulates one task's metric over batches (exact, not batch-averaged)."""

    def __init__(self, task: Task):
        self.task = task
        self._cm = np.zeros((task.channels, task.channels), np.int64)
        self._parts: list[np.ndarray] = []

    def update(self, target, pred) -> None:
        """Add one batch: ``pred`` is the model's raw output for this task."""
        kind = self.task.kind
        if kind == "segmentation":
            pred = predicted_labels(target, pred, self.task.channels, self.task.name)
            self._cm += confusion_matrix(target, pred, self.task.channels)
        elif kind == "depth":
            self._parts.append(np.stack(depth_errors(target, pred), -1))
        elif kind == "normal":
            self._parts.append(normal_angles(target, pred))
        else:
            pred = predicted_labels(target, pred, self.task.channels, self.task.name)
            check_labels(target, self.task.channels, f"task {self.task.name!r} target")
            keep = np.asarray(target) != -1
            self._parts.append((pred[keep] == np.asarray(target)[keep]).astype(float))

    @property
    def confusion(self) -> np.ndarray:
        """Segmentation: the confusion matrix so far (true class x predicted)."""
        return self._cm.copy()

    def result(self) -> dict[str, float]:
        """The task's metrics over everything seen so far."""
        kind = self.task.kind
        if kind == "segmentation":
            return scores_from_confusion(self._cm)
        parts = np.concatenate(self._parts) if self._parts else np.zeros((0, 2))
        if kind == "depth":
            parts = parts.reshape(-1, 2)
            return {"abs_err": _mean(parts[:, 0]), "rel_err": _mean(parts[:, 1])}
        if kind == "normal":
            return angle_summary(parts.reshape(-1))
        return {"accuracy": _mean(parts.reshape(-1))}


def class_iou(cm: np.ndarray) -> np.ndarray:
    """Intersection over union of every class of a confusion matrix (NaN if absent).

    ``cm[i, j]`` counts pixels of true class ``i`` predicted as ``j``
    (:func:`confusion_matrix`); the mean of the finite entries is ``miou``.
    """
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    out = np.full(len(tp), np.nan)
    np.divide(tp, union, out=out, where=union > 0)
    return out


def evaluate(
    model, dataset, tasks: Iterable[Task], per_class: bool = False
) -> dict[str, dict[str, float]]:
    """Metrics of ``model`` over ``dataset`` (``(image, {task: target})`` batches).

    ``model(image, training=False)`` must return a dict keyed by task name.
    Returns ``{task: {metric: value}}``; with ``per_class``, segmentation tasks
    also get ``"iou_<k>"``, the IoU of class ``k`` (:func:`class_iou`).
    """
    tasks = list(tasks)
    acc = {t.name: TaskMetrics(t) for t in tasks}
    for image, targets in dataset:
        outputs = model(image, training=False)
        missing = [t.name for t in tasks if t.name not in outputs]
        if missing:
            raise ValueError(
                f"model outputs {sorted(outputs)} lack task(s) {missing}; expected a "
                "dict with one output per task"
            )
        for t in tasks:
            acc[t.name].update(np.asarray(targets[t.name]), np.asarray(outputs[t.name]))
    out = {name: a.result() for name, a in acc.items()}
    if per_class:
        for t in tasks:
            if t.kind == "segmentation":
                ious = class_iou(acc[t.name].confusion)
                out[t.name].update({f"iou_{k}": float(v) for k, v in enumerate(ious)})
    return out


def constant_baselines(train, test, tasks: Iterable[Task]) -> dict[str, dict]:
    """Metrics on ``test`` of the best constant guesses learned from ``train``.

    What a network that ignored its input would score, the floor a trained one
    must clear: the most frequent training class at every pixel
    (segmentation), the mean training depth (depth) and the mean training
    normal, normalised (normals). ``train`` and ``test`` map task names to
    label arrays (missing labels as elsewhere: class -1, depth 0, a zero
    normal). Returns ``{task: {metric: value}}`` like :func:`evaluate`.
    """
    out = {}
    for t in tasks:
        if t.name not in train or t.name not in test:
            raise ValueError(
                f"task {t.name!r} has no labels in train or test (keys "
                f"{sorted(train)} and {sorted(test)})"
            )
        labels, target = np.asarray(train[t.name]), np.asarray(test[t.name])
        if t.kind == "segmentation":
            counts = np.bincount(labels[labels >= 0].ravel(), minlength=t.channels)
            guess = np.full(target.shape, counts.argmax())
            out[t.name] = segmentation_metrics(target, guess, t.channels)
        elif t.kind == "depth":
            guess = np.full(target.shape, labels[labels > 0].mean())
            out[t.name] = depth_metrics(target, guess)
        elif t.kind == "normal":
            valid = np.linalg.norm(labels, axis=-1) > 0
            mean = labels[valid].mean(0)
            guess = np.broadcast_to(mean / np.linalg.norm(mean), target.shape)
            out[t.name] = normal_metrics(target, guess)
        else:
            raise ValueError(
                f"task {t.name!r} is of kind {t.kind!r}; constant baselines exist "
                "for segmentation, depth and normal tasks"
            )
    return out


def delta_m(
    metrics: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, bool] | None = None,
    convention: str = "drop",
    strict: bool = True,
) -> float:
    """Multi-task score of ``metrics`` relative to single-task ``baseline``, in %.

    Parameters
    ----------
    metrics, baseline:
        ``{task: {metric: value}}`` with the same tasks and metrics.
    higher_is_better:
        Metric name -> direction; defaults to :data:`HIGHER_IS_BETTER`.
    convention:
        ``"drop"`` -- the Δm% of Liu et al. (2021, CAGrad) and Navon et al. (2022,
        Nash-MTL): the mean over ALL metrics K of
        ``(-1)^{h_k} (M_k - B_k) / B_k * 100`` with ``h_k = 1`` when higher is
        better. **Lower is better**; negative means the multi-task model beats the
        baselines on average.

        ``"improvement"`` -- the average per-task relative improvement of Maninis et
        al. (2019) and Vandenhende et al. (2021):
        ``1/T sum_t (-1)^{l_t} (M_t - B_t) / B_t * 100`` with ``l_t = 1`` when lower
        is better. **Higher is better.** Where a task has several metrics, its term
        is the mean over its metrics (each task weighs the same, whatever its
        number of metrics).
    strict:
        A baseline metric of exactly 0 leaves the relative change undefined:
        raise (default), or with ``strict=False`` warn (``RuntimeWarning``, naming
        the metric) and return NaN, so that a table of runs can still be written.

    Examples
    --------
    >>> delta_m({"d": {"abs_err": 0.9}}, {"d": {"abs_err": 1.0}})  # 10% lower error
    -10.0
    """
    directions = dict(
        HIGHER_IS_BETTER if higher_is_better is None else higher_is_better
    )
    if convention not in ("drop", "improvement"):
        raise ValueError(
            f"unknown convention {convention!r}; expected 'drop' or 'improvement'"
        )
    if set(metrics) != set(baseline):
        raise ValueError(
            f"metrics cover tasks {sorted(metrics)} but the baseline covers "
            f"{sorted(baseline)}; expected the same tasks"
        )
    per_task: list[list[float]] = []
    for task in metrics:
        if set(metrics[task]) != set(baseline[task]):
            raise ValueError(
                f"task {task!r}: metrics {sorted(metrics[task])} differ from baseline "
                f"metrics {sorted(baseline[task])}"
            )
        terms = []
        for name, value in metrics[task].items():
            if name not in directions:
                raise ValueError(
                    f"metric {name!r} of task {task!r} has no known direction; pass "
                    "higher_is_better={name: bool}"
                )
            base = baseline[task][name]
            if base == 0:
                message = (
                    f"baseline {task}/{name} is 0: the relative change is undefined"
                )
                if strict:
                    raise ValueError(f"{message}; pass strict=False to get NaN")
                warnings.warn(f"{message}; Δm is NaN", RuntimeWarning, stacklevel=2)
                terms.append(np.nan)
                continue
            change = (value - base) / base * 100
            terms.append(-change if directions[name] else change)  # "drop" sign
        per_task.append(terms)
    if convention == "drop":
        return float(np.mean([x for terms in per_task for x in terms]))
    return float(np.mean([-np.mean(terms) for terms in per_task]))
