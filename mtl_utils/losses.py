"""Masked per-task losses with partial-label support.

Every loss here is a mean over the *labelled* elements of a batch (pixels for
dense tasks, samples for classification). Unlabelled elements are marked in the
target itself with :data:`mtl_utils.tasks.MISSING_VALUE`:

=================  ======================  ================================
task kind          target                  missing / invalid
=================  ======================  ================================
segmentation       ``(B, H, W)`` int       label ``-1``
depth              ``(B, H, W, 1)`` float  depth ``0``
normal             ``(B, H, W, 3)`` float  all three components ``0``
classification     ``(B,)`` int            label ``-1``
=================  ======================  ================================

A sample that lacks a task's label has that task's target entirely "missing", so
it contributes nothing to the task's loss or gradient. A batch with no label at
all for a task gives that task a loss of exactly zero and a zero gradient (never
NaN): the sum over labelled elements is divided by ``max(count, 1)``.

All losses compute in float32 (mixed-precision predictions are cast up).

Examples
--------
>>> import numpy as np
>>> from mtl_utils.losses import depth_loss
>>> y_true = np.array([[[[2.0], [0.0]]]], "float32")  # second pixel invalid
>>> y_pred = np.array([[[[1.5], [9.0]]]], "float32")
>>> float(depth_loss(y_true, y_pred))
0.5
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from keras import ops

from mtl_utils.tasks import MISSING_VALUE, Task

__all__ = [
    "MaskedLoss",
    "classification_loss",
    "depth_loss",
    "labelled_mask",
    "loss_for",
    "normal_loss",
    "segmentation_loss",
]

_EPS = 1e-12


def _shape(x) -> tuple:
    return tuple(x.shape)


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def _check_rank(name: str, what: str, x, rank: int, expected: str) -> None:
    if len(_shape(x)) != rank:
        raise ValueError(
            f"{name} {what} has shape {_fmt(_shape(x))}; expected {expected}"
        )


def _check_dims_match(name: str, y_true, y_pred, dims: Sequence[int]) -> None:
    """Static (known) sizes of ``dims`` must agree between target and output."""
    ts, ps = _shape(y_true), _shape(y_pred)
    for d in dims:
        if ts[d] is not None and ps[d] is not None and ts[d] != ps[d]:
            raise ValueError(
                f"{name} target has shape {_fmt(ts)} but the prediction has shape "
                f"{_fmt(ps)}; their batch and spatial sizes must match"
            )


def _masked_mean(values, mask):
    """Mean of ``values`` over ``mask`` (zero, with zero gradient, if empty)."""
    mask = ops.cast(mask, "float32")
    values = ops.where(mask > 0, values, ops.zeros_like(values))
    count = ops.sum(mask)
    return ops.sum(values) / ops.maximum(count, 1.0)


def _sparse_ce(labels, logits, ignore_index: int):
    labels = ops.cast(labels, "int32")
    logits = ops.cast(logits, "float32")
    mask = ops.not_equal(labels, ignore_index)
    safe = ops.where(mask, labels, ops.zeros_like(labels))
    ce = ops.sparse_categorical_crossentropy(safe, logits, from_logits=True)
    return _masked_mean(ce, mask)


def segmentation_loss(y_true, y_pred, ignore_index: int = -1):
    """Pixel-wise softmax cross-entropy that ignores unlabelled pixels.

    Parameters
    ----------
    y_true:
        ``(B, H, W)`` integer class labels; ``ignore_index`` marks unlabelled
        pixels. Float labels holding integer values are cast to int32.
    y_pred:
        ``(B, H, W, C)`` logits (not probabilities).
    ignore_index:
        Label of unlabelled pixels (``-1`` as in the NYUv2 files of MTAN,
        Liu et al. 2019).

    Returns
    -------
    Scalar: the cross-entropy averaged over labelled pixels of the batch (0 if
    there are none).

    Raises
    ------
    ValueError
        If ``y_true`` is not ``(B, H, W)``, ``y_pred`` not ``(B, H, W, C)``, or
        their batch/spatial sizes differ.
    """
    _check_rank("segmentation", "prediction", y_pred, 4, "(B, H, W, C) logits")
    _check_rank(
        "segmentation",
        "target",
        y_true,
        3,
        f"(B, H, W) integer labels for a prediction of shape {_fmt(_shape(y_pred))}",
    )
    _check_dims_match("segmentation", y_true, y_pred, (0, 1, 2))
    return _sparse_ce(y_true, y_pred, ignore_index)


def depth_loss(y_true, y_pred):
    """L1 depth error averaged over valid pixels (target depth ``!= 0``).

    Parameters
    ----------
    y_true:
        ``(B, H, W, 1)`` depth; ``0`` marks invalid or unlabelled pixels.
    y_pred:
        ``(B, H, W, 1)`` predicted depth.

    Returns
    -------
    Scalar mean absolute error over valid pixels (0 if there are none), the
    depth loss of MTAN (Liu et al. 2019).
    """
    _check_rank("depth", "target", y_true, 4, "(B, H, W, 1)")
    _check_rank("depth", "prediction", y_pred, 4, "(B, H, W, 1)")
    for what, x in (("target", y_true), ("prediction", y_pred)):
        if _shape(x)[-1] not in (None, 1):
            raise ValueError(
                f"depth {what} has shape {_fmt(_shape(x))}; expected (B, H, W, 1)"
            )
    _check_dims_match("depth", y_true, y_pred, (0, 1, 2))
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    mask = ops.not_equal(y_true, MISSING_VALUE["depth"])
    return _masked_mean(ops.abs(y_pred - y_true), mask)


def _unit(x):
    return x * ops.rsqrt(
        ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), _EPS)
    )


def normal_loss(y_true, y_pred):
    """``1 - cos`` between predicted and true surface normals on valid pixels.

    Parameters
    ----------
    y_true:
        ``(B, H, W, 3)`` unit normals; a pixel whose three components are all
        ``0`` is invalid or unlabelled.
    y_pred:
        ``(B, H, W, 3)`` unnormalised predictions; the loss normalises them to
        unit length (safely: a zero vector gives a finite gradient).

    Returns
    -------
    Scalar mean of ``1 - cos(angle)`` over valid pixels (0 if there are none);
    ranges from 0 (parallel) to 2 (opposite).
    """
    _check_rank("normal", "target", y_true, 4, "(B, H, W, 3)")
    _check_rank("normal", "prediction", y_pred, 4, "(B, H, W, 3)")
    for what, x in (("target", y_true), ("prediction", y_pred)):
        if _shape(x)[-1] not in (None, 3):
            raise ValueError(
                f"normal {what} has shape {_fmt(_shape(x))}; expected (B, H, W, 3)"
            )
    _check_dims_match("normal", y_true, y_pred, (0, 1, 2))
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    mask = ops.any(ops.not_equal(y_true, MISSING_VALUE["normal"]), axis=-1)
    cos = ops.sum(_unit(y_pred) * _unit(y_true), axis=-1)
    return _masked_mean(1.0 - cos, mask)


def classification_loss(y_true, y_pred, ignore_index: int = -1):
    """Softmax cross-entropy over samples whose label is not ``ignore_index``.

    Parameters
    ----------
    y_true:
        ``(B,)`` integer labels; ``-1`` marks a sample without this label.
    y_pred:
        ``(B, C)`` logits.

    Returns
    -------
    Scalar cross-entropy averaged over labelled samples (0 if there are none).
    """
    _check_rank("classification", "prediction", y_pred, 2, "(B, C) logits")
    _check_rank(
        "classification",
        "target",
        y_true,
        1,
        f"(B,) integer labels for a prediction of shape {_fmt(_shape(y_pred))}",
    )
    _check_dims_match("classification", y_true, y_pred, (0,))
    return _sparse_ce(y_true, y_pred, ignore_index)


def labelled_mask(kind: str, y_true):
    """Boolean mask of labelled elements of a target of the given task kind.

    ``(B, H, W)`` for dense tasks, ``(B,)`` for classification.
    """
    if kind in ("segmentation", "classification"):
        return ops.not_equal(ops.cast(y_true, "int32"), MISSING_VALUE[kind])
    if kind == "depth":
        return ops.not_equal(ops.cast(y_true, "float32")[..., 0], 0.0)
    if kind == "normal":
        return ops.any(ops.not_equal(ops.cast(y_true, "float32"), 0.0), axis=-1)
    raise ValueError(
        f"unknown task kind {kind!r}; expected segmentation, depth, normal or "
        "classification"
    )


_LOSSES: dict[str, Callable] = {
    "segmentation": segmentation_loss,
    "depth": depth_loss,
    "normal": normal_loss,
    "classification": classification_loss,
}


class MaskedLoss:
    """The default loss of a :class:`~mtl_utils.tasks.Task`, as a callable.

    ``loss(y_true, y_pred)`` returns a scalar; ``loss.labelled_count(y_true)``
    returns how many elements of the batch are labelled (used by
    :class:`mtl_utils.training.MultiTaskModel` to average logged losses over
    labelled elements, so that batches without labels do not bias them).
    """

    def __init__(self, task: Task):
        self.task = task
        self.kind = task.kind
        self._fn = _LOSSES[task.kind]
        self.__name__ = f"{task.name}_loss"

    def __call__(self, y_true, y_pred):
        channels = _shape(y_pred)[-1] if _shape(y_pred) else None
        if channels is not None and channels != self.task.channels:
            raise ValueError(
                f"task {self.task.name!r} ({self.kind}) has {self.task.channels} "
                f"channels, but its prediction has shape {_fmt(_shape(y_pred))}; "
                "the output's last axis must match Task.channels"
            )
        return self._fn(y_true, y_pred)

    def labelled_count(self, y_true):
        """Number of labelled elements in ``y_true`` (float32 scalar)."""
        return ops.sum(ops.cast(labelled_mask(self.kind, y_true), "float32"))

    def __repr__(self) -> str:
        return f"MaskedLoss({self.task.name!r}, kind={self.kind!r})"


def loss_for(task: Task) -> MaskedLoss:
    """The default masked loss of ``task``: a callable ``(y_true, y_pred) -> scalar``.

    Parameters
    ----------
    task:
        A :class:`~mtl_utils.tasks.Task`; its ``kind`` picks the loss.

    Examples
    --------
    >>> from mtl_utils.tasks import Task
    >>> loss_for(Task("depth", "depth", 1))
    MaskedLoss('depth', kind='depth')
    """
    if not isinstance(task, Task):
        raise ValueError(
            f"loss_for expects a mtl_utils.tasks.Task, got {type(task).__name__}"
        )
    return MaskedLoss(task)
