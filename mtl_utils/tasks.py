"""Tasks: the single source of truth that keys data, outputs, losses and metrics.

A :class:`Task` names one prediction problem. Its ``name`` is the key used for the
task's target in the dataset, the model's output, its loss, its metrics and its
entry in the multi-task score :func:`mtl_utils.metrics.delta_m`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

KINDS = ("segmentation", "depth", "normal", "classification")

#: How a missing target is marked, per task kind (partial labels). A sample whose
#: target is entirely this value contributes nothing to that task's loss.
MISSING_VALUE = {"segmentation": -1, "depth": 0.0, "normal": 0.0, "classification": -1}


@dataclass(frozen=True)
class Task:
    """One prediction task.

    Parameters
    ----------
    name:
        Key of the task everywhere (dataset targets, model outputs, losses, metrics).
    kind:
        One of ``"segmentation"``, ``"depth"``, ``"normal"``, ``"classification"``.
    channels:
        Number of classes (segmentation, classification) or output channels
        (1 for depth, 3 for surface normals).
    metrics:
        Metric name -> ``True`` when higher is better. Used by ``delta_m``.

    Examples
    --------
    >>> Task("depth", "depth", 1).target_shape((64, 64))
    (64, 64, 1)
    """

    name: str
    kind: str
    channels: int
    metrics: Mapping[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"task {self.name!r}: unknown kind {self.kind!r}; "
                f"expected one of {KINDS}"
            )
        if self.channels < 1:
            raise ValueError(
                f"task {self.name!r}: channels must be >= 1, got {self.channels}"
            )
        if self.kind == "depth" and self.channels != 1:
            raise ValueError(
                f"task {self.name!r}: a depth task has 1 channel, got {self.channels}"
            )
        if self.kind == "normal" and self.channels != 3:
            raise ValueError(
                f"task {self.name!r}: a normal task has 3 channels, got {self.channels}"
            )

    @property
    def dense(self) -> bool:
        """True for per-pixel tasks (segmentation, depth, normal)."""
        return self.kind != "classification"

    @property
    def missing_value(self) -> float:
        """Target value that marks an unlabelled pixel or sample."""
        return MISSING_VALUE[self.kind]

    def target_shape(self, image_size: tuple[int, int]) -> tuple[int, ...]:
        """Shape of one sample's target for an image of ``(H, W)`` pixels."""
        h, w = image_size
        if self.kind == "segmentation":
            return (h, w)
        if self.kind == "classification":
            return ()
        return (h, w, self.channels)


SEGMENTATION_METRICS = {"miou": True, "pixel_acc": True}
DEPTH_METRICS = {"abs_err": False, "rel_err": False}
NORMAL_METRICS = {
    "mean": False,
    "median": False,
    "within_11.25": True,
    "within_22.5": True,
    "within_30": True,
}
CLASSIFICATION_METRICS = {"accuracy": True}

_DEFAULT_METRICS = {
    "segmentation": SEGMENTATION_METRICS,
    "depth": DEPTH_METRICS,
    "normal": NORMAL_METRICS,
    "classification": CLASSIFICATION_METRICS,
}


def default_metrics(kind: str) -> dict[str, bool]:
    """The metrics the book reports for a task kind (name -> higher is better)."""
    if kind not in _DEFAULT_METRICS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
    return dict(_DEFAULT_METRICS[kind])


def scene_tasks(names: Iterable[str] | None = None) -> list[Task]:
    """The four tasks of the synthetic scenes benchmark.

    ``segmentation`` (5 classes: floor, wall, sphere, box, cylinder), ``depth``
    (camera z-distance), ``normal`` (unit surface normals in the camera frame) and
    ``count`` (number of visible objects, 0 to ``MAX_OBJECTS``).

    Parameters
    ----------
    names:
        Optional subset (in the order wanted), e.g. ``["segmentation", "depth"]``.
    """
    from mtl_utils.data.scenes import CLASS_NAMES, MAX_OBJECTS

    every = {
        "segmentation": Task("segmentation", "segmentation", len(CLASS_NAMES)),
        "depth": Task("depth", "depth", 1),
        "normal": Task("normal", "normal", 3),
        "count": Task("count", "classification", MAX_OBJECTS + 1),
    }
    every = {
        name: Task(t.name, t.kind, t.channels, default_metrics(t.kind))
        for name, t in every.items()
    }
    if names is None:
        return list(every.values())
    return [every[n] for n in resolve_task_names(names, every)]


def resolve_task_names(names: Iterable[str | Task], known: Iterable[str]) -> list[str]:
    """Names of ``names`` (strings or Tasks), checked against ``known``.

    Raises
    ------
    ValueError
        Naming every unknown task and listing the known ones.
    """
    from mtl_utils.validation import check_task_list

    known = list(known)
    out = [n.name if isinstance(n, Task) else n for n in check_task_list(names)]
    unknown = [n for n in out if n not in known]
    if unknown:
        raise ValueError(f"unknown task name(s) {unknown}; known tasks are {known}")
    if len(set(out)) != len(out):
        raise ValueError(f"task names repeat: {out}")
    return out
