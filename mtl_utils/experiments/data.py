"""The data of an experiment: splits, partial labels, batches of an epoch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtl_utils.experiments.config import ExperimentConfig
from mtl_utils.tasks import Task, default_metrics, scene_tasks


def experiment_tasks(config: ExperimentConfig) -> list[Task]:
    """The :class:`~mtl_utils.tasks.Task` objects of ``config.tasks``.

    Scenes: :func:`mtl_utils.tasks.scene_tasks`. NYUv2: 13-class segmentation,
    depth and normals with the book's default metrics.
    """
    if config.nyuv2 is None:
        return scene_tasks(config.tasks)
    from mtl_utils.data.nyuv2 import NYUV2_CLASSES

    known = {
        "segmentation": Task(
            "segmentation",
            "segmentation",
            NYUV2_CLASSES,
            default_metrics("segmentation"),
        ),
        "depth": Task("depth", "depth", 1, default_metrics("depth")),
        "normal": Task("normal", "normal", 3, default_metrics("normal")),
    }
    unknown = [t for t in config.tasks if t not in known]
    if unknown:
        raise ValueError(
            f"NYUv2 has no task(s) {unknown}; expected a subset of {sorted(known)}"
        )
    return [known[t] for t in config.tasks]


def _head(arrays: Mapping[str, np.ndarray], n: int | None, tail: bool = False) -> dict:
    total = len(arrays["image"])
    if n is None:
        n = total
    if n > total:
        raise ValueError(f"asked for {n} samples but the split holds {total}")
    pick = slice(total - n, total) if tail else slice(0, n)
    return {k: v[pick] for k, v in arrays.items()}


def load_data(config: ExperimentConfig) -> dict[str, dict[str, np.ndarray]]:
    """The ``train``, ``val`` and ``test`` arrays of an experiment.

    Returns
    -------
    dict
        ``{"train": arrays, "val": arrays, "test": arrays}``, each as returned by
        :func:`mtl_utils.data.scenes.render_scenes` (``image`` (N, H, W, 3) and one
        target per task), with ``config.missing`` labels removed from ``train``.
    """
    names = [t.name for t in experiment_tasks(config)]
    if config.nyuv2 is None:
        from mtl_utils.data.scenes import render_scenes

        size, seed, layout = config.image_size, config.data_seed, config.layout
        splits = {
            split: render_scenes(n or 0, size=size, seed=seed + i, layout=layout)
            for i, (split, n) in enumerate(
                [
                    ("train", config.num_train),
                    ("val", config.num_val),
                    ("test", config.num_test),
                ]
            )
        }
    else:
        from mtl_utils.data.nyuv2 import load_nyuv2

        train = load_nyuv2(config.nyuv2, "train", size=None)
        num_val = config.num_val or 0
        available = len(train["image"]) - num_val
        num_train = available if config.num_train is None else config.num_train
        if num_train > available:
            raise ValueError(
                f"NYUv2 train split has {len(train['image'])} images: too few for "
                f"num_train={num_train} plus num_val={num_val}"
            )
        test = load_nyuv2(config.nyuv2, "val", max_samples=config.num_test, size=None)
        splits = {
            "train": _head(train, num_train),
            "val": _head(train, num_val, tail=True),
            "test": test,
        }
    splits = {
        split: {k: v for k, v in arrays.items() if k == "image" or k in names}
        for split, arrays in splits.items()
    }
    if config.missing:
        splits["train"] = drop_labels(
            splits["train"], config.missing, experiment_tasks(config), config.data_seed
        )
    return splits


def drop_labels(
    arrays: Mapping[str, np.ndarray],
    fractions: Mapping[str, float],
    tasks: Sequence[Task] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Partial labels: remove a task's label from a random fraction of samples.

    The removed targets are set to the task's missing value
    (:data:`mtl_utils.tasks.MISSING_VALUE`: -1 for segmentation and
    classification, 0 for depth and normals), which the losses and metrics of
    :mod:`mtl_utils` skip. The image and the other tasks' labels are kept.

    Parameters
    ----------
    arrays:
        ``image`` (N, H, W, 3) and one target per task, keyed by task name.
    fractions:
        ``{task: fraction}``; ``round(fraction * N)`` samples lose that label,
        chosen independently for every task.
    tasks:
        Tasks giving each name's kind; default :func:`~mtl_utils.tasks.scene_tasks`.
    seed:
        Seed of the choice of samples.

    Returns
    -------
    dict
        A copy of ``arrays`` with the labels removed.

    Examples
    --------
    >>> arrays = {"image": np.zeros((4, 32, 32, 3)), "count": np.arange(4)}
    >>> drop_labels(arrays, {"count": 0.5}, seed=0)["count"]
    array([ 0,  1, -1, -1])
    """
    tasks = {t.name: t for t in (tasks if tasks is not None else scene_tasks())}
    out = {k: np.array(v, copy=True) for k, v in arrays.items()}
    n = len(out["image"]) if "image" in out else None
    rng = np.random.default_rng(seed)
    for name, fraction in fractions.items():
        if name not in out or name not in tasks:
            raise ValueError(
                f"cannot drop labels of {name!r}: the arrays hold {sorted(out)} and "
                f"the known tasks are {sorted(tasks)}"
            )
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(
                f"fraction of {name!r} is {fraction!r}; expected a number in [0, 1]"
            )
        size = len(out[name]) if n is None else n
        drop = rng.permutation(size)[: int(round(float(fraction) * size))]
        out[name][np.sort(drop)] = tasks[name].missing_value
    return out


def alternate_tasks(dataset: Any, tasks: Sequence[Task]) -> Any:
    """Alternating task batches: each batch becomes ``T`` batches of one task.

    Batch ``(image, {task: target})`` is followed by ``T`` copies of itself, the
    ``k``-th keeping only task ``k``'s targets (the others set to the task's
    missing value, so their losses and gradients are zero). One epoch then
    makes ``T`` times as many updates, each driven by one task, and every task
    sees each of its labels once.

    Parameters
    ----------
    dataset:
        A ``tf.data.Dataset`` of ``(image, {task: target})`` batches, e.g. from
        :func:`mtl_utils.data.pipeline.make_dataset`.
    tasks:
        The tasks in the order they take turns.

    Returns
    -------
    tf.data.Dataset
        ``T`` times as many batches, same structure.
    """
    import tensorflow as tf

    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks is empty; expected the tasks that take turns")

    def expand(image, targets):
        missing = [t.name for t in tasks if t.name not in targets]
        if missing:
            raise ValueError(
                f"the dataset has no targets for {missing}; it has {sorted(targets)}"
            )
        turns = None
        for keep in tasks:
            masked = {
                name: y
                if name == keep.name
                else tf.fill(tf.shape(y), tf.cast(_missing_of(tasks, name), y.dtype))
                for name, y in targets.items()
            }
            one = tf.data.Dataset.from_tensors((image, masked))
            turns = one if turns is None else turns.concatenate(one)
        return turns

    turns = dataset.flat_map(expand)
    known = int(dataset.cardinality())
    if known >= 0:  # flat_map forgets the length; Keras wants it for an epoch
        turns = turns.apply(tf.data.experimental.assert_cardinality(known * len(tasks)))
    return turns


def _missing_of(tasks: Sequence[Task], name: str) -> float:
    for t in tasks:
        if t.name == name:
            return t.missing_value
    raise ValueError(f"no task named {name!r} among {[t.name for t in tasks]}")


def _epoch_dataset(train, tasks, config: ExperimentConfig, seed: int, epoch: int):
    """The training batches of one epoch; their order depends on (seed, epoch)."""
    from mtl_utils.data.pipeline import make_dataset

    n = len(train["image"])
    order = np.random.default_rng([seed, epoch, 2718]).permutation(n)
    names = [t.name for t in tasks]
    shuffled = {k: train[k][order] for k in ["image", *names]}
    ds = make_dataset(shuffled, tasks, batch_size=config.batch_size, shuffle=False)
    if config.schedule == "alternating" and len(tasks) > 1:
        ds = alternate_tasks(ds, tasks)
    return ds
