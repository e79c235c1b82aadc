"""tf.data input pipeline: arrays keyed by task name -> ``(image, {task: target})``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from mtl_utils.augment import INSTANCE_KEY
from mtl_utils.tasks import Task, resolve_task_names
from mtl_utils.validation import (
    check_finite,
    check_image,
    check_target,
    check_task_list,
)

#: An augmentation: ``fn(example, seed)`` with ``example`` a dict holding ``"image"``
#: and the targets, and ``seed`` an int32/int64 tensor of shape (2,) for stateless ops.
Augment = Callable[[dict, "object"], dict]


def check_arrays(
    arrays: Mapping[str, np.ndarray],
    names: Sequence[str],
    tasks: Sequence[Task] = (),
) -> int:
    """Check that ``arrays`` holds an image batch and ``names``; return N.

    The image must be float in [0, 1] and every float target finite; the targets
    of ``tasks`` (Task objects) are checked against their kind
    (:func:`mtl_utils.validation.check_target`: class labels in range, depth
    ``>= 0``).

    Raises
    ------
    ValueError
        If the image is missing, not (N, H, W, 3), not finite floats in [0, 1], a
        target's first axis is not N, or a target is out of range (naming it).
    """
    if "image" not in arrays:
        raise ValueError(f"arrays have no 'image' entry; keys are {sorted(arrays)}")
    image = arrays["image"]
    if np.ndim(image) != 4 or np.shape(image)[-1] != 3:
        raise ValueError(f"image has shape {np.shape(image)}; expected (N, H, W, 3)")
    n = np.shape(image)[0]
    for name in names:
        if np.shape(arrays[name])[:1] != (n,):
            raise ValueError(
                f"target {name!r} has shape {np.shape(arrays[name])}; expected its "
                f"first axis to be N = {n} like the image"
            )
    check_image(image, "arrays['image']")
    by_name = {t.name: t for t in tasks}
    for name in names:
        if name in by_name:
            check_target(by_name[name], arrays[name])
        else:
            check_finite(arrays[name], f"target {name!r}")
    return n


def _instance_map(ids, image: np.ndarray) -> np.ndarray:
    """The instance map as int32, checked to be (N, H, W) like the image."""
    ids = np.asarray(ids)
    if ids.shape != image.shape[:3] or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"arrays[{INSTANCE_KEY!r}] has shape {ids.shape} and dtype {ids.dtype}; "
            f"expected integer object ids of shape {image.shape[:3]} (N, H, W) like "
            "the image, -1 where no object is seen"
        )
    return ids.astype(np.int32)


def make_dataset(
    arrays: Mapping[str, np.ndarray],
    tasks: Sequence[str | Task],
    batch_size: int = 32,
    shuffle: bool = False,
    augment: Augment | None = None,
    seed: int = 0,
    drop_remainder: bool = False,
):
    """Batches of ``(image, {task: target})`` for ``keras.Model.fit``.

    Parameters
    ----------
    arrays:
        ``"image"`` (N, H, W, 3) float32 plus one array per task, keyed by task name
        (the output of :func:`mtl_utils.data.scenes.render_scenes`). Samples without
        a label for a task carry the task's missing value
        (:data:`mtl_utils.tasks.MISSING_VALUE`) and are masked out of its loss.
    tasks:
        Task names or :class:`~mtl_utils.tasks.Task` objects to yield targets for.
        A Task's targets are checked against its kind (labels in ``0..C - 1`` or
        -1, depth ``>= 0``); with a bare name only finiteness is checked.
    batch_size:
        Samples per batch. Smaller batches mean more updates per epoch.
    shuffle:
        Reshuffle every epoch (seeded: the order of epoch ``e`` is reproducible).
    augment:
        Optional ``fn(example, seed)`` applied per sample before batching; ``seed``
        is a (2,) int64 tensor that differs per sample and per epoch, so stateless
        random ops give reproducible yet fresh augmentations. When ``arrays``
        holds the instance map ``"object_id"`` (``render_scenes(...,
        object_ids=True)``), the example passed to ``fn`` holds it too, so that
        :func:`mtl_utils.augment.augment` can recount ``"count"`` after a crop; it
        is not part of the batches.
    seed:
        Seed of shuffling and augmentation.

    Returns
    -------
    tf.data.Dataset
        Yields ``image`` (B, H, W, 3) and a dict of targets keyed by task name.

    Examples
    --------
    >>> from mtl_utils.data.scenes import render_scenes
    >>> ds = make_dataset(render_scenes(8, size=32), ["depth", "count"], batch_size=4)
    >>> image, targets = next(iter(ds))
    >>> tuple(image.shape), sorted(targets)
    ((4, 32, 32, 3), ['count', 'depth'])
    """
    import tensorflow as tf

    tasks = check_task_list(tasks)
    known = [k for k in arrays if k != "image"]
    names = resolve_task_names(tasks, known)
    n = check_arrays(arrays, names, [t for t in tasks if isinstance(t, Task)])
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    example = {"image": np.asarray(arrays["image"], np.float32)}
    example.update({name: np.asarray(arrays[name]) for name in names})
    if augment is not None and INSTANCE_KEY in arrays:
        # travels to the augmentation, which recounts "count" from it; batches
        # below keep only the tasks' targets
        example[INSTANCE_KEY] = _instance_map(arrays[INSTANCE_KEY], example["image"])
    ds = tf.data.Dataset.from_tensor_slices(example)
    if shuffle:
        ds = ds.shuffle(max(n, 1), seed=seed, reshuffle_each_iteration=True)
    if augment is not None:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, seeds.batch(2))
        ds = ds.map(
            lambda ex, s: augment(ex, s),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
    ds = ds.map(lambda ex: (ex["image"], {name: ex[name] for name in names}))
    return ds.prefetch(tf.data.AUTOTUNE)
