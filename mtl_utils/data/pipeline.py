"""tf.data input pipeline: arrays keyed by task name -> ``(image, {task: target})``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from mtl_utils.tasks import Task, resolve_task_names

#: An augmentation: ``fn(example, seed)`` with ``example`` a dict holding ``"image"``
#: and the targets, and ``seed`` an int32/int64 tensor of shape (2,) for stateless ops.
Augment = Callable[[dict, "object"], dict]


def check_arrays(arrays: Mapping[str, np.ndarray], names: Sequence[str]) -> int:
    """Check that ``arrays`` holds an image batch and ``names``; return N.

    Raises
    ------
    ValueError
        If the image is missing or not (N, H, W, 3), or a target's first axis is not N.
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
    return n


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
    batch_size:
        Samples per batch. Smaller batches mean more updates per epoch.
    shuffle:
        Reshuffle every epoch (seeded: the order of epoch ``e`` is reproducible).
    augment:
        Optional ``fn(example, seed)`` applied per sample before batching; ``seed``
        is a (2,) int64 tensor that differs per sample and per epoch, so stateless
        random ops give reproducible yet fresh augmentations.
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

    known = [k for k in arrays if k != "image"]
    names = resolve_task_names(tasks, known)
    n = check_arrays(arrays, names)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    example = {"image": np.asarray(arrays["image"], np.float32)}
    example.update({name: np.asarray(arrays[name]) for name in names})
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
