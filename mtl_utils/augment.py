"""Geometry-aware joint augmentation of an image and all its dense targets.

Every function here takes one **example**: a dict holding ``"image"`` (H, W, 3) and
the targets of one sample keyed by task name (``"segmentation"`` (H, W),
``"depth"`` (H, W, 1), ``"normal"`` (H, W, 3), ``"count"`` ()). It returns a new dict
with the same keys, shapes and dtypes, in which every target has moved with the image:

============  ==================  =========================================
target        resampled with      geometry
============  ==================  =========================================
image         bilinear            --
segmentation  nearest neighbour   filled pixels get -1 (ignored)
depth         nearest neighbour   divided by the zoom (MTAN) or unchanged
normal        bilinear, then      rotated with the image, negated ``x`` on a
              renormalised        flip; valid where the nearest source is
instance ids  nearest neighbour   filled pixels get -1 (no object)
count         recounted           objects left in the frame (see below)
image-level   untouched           --
============  ==================  =========================================

Invalid pixels stay invalid: a label is never interpolated. A normal is valid where
its nearest source normal is; there it is the bilinear blend of its neighbours
rescaled to unit length. An invalid normal is the zero vector, so it adds nothing to
the blend's direction and renormalising undoes the shortening it causes. Pixels
that a crop or a rotation fills from outside the image get the task's missing value
(:data:`mtl_utils.tasks.MISSING_VALUE`: -1 for segmentation, 0 for depth and
normals), so the masked losses skip them.

A crop or a rotation can push objects out of the frame, so the image-level target
``"count"`` (objects visible) would be wrong if it were passed through. When the
example also holds the renderer's instance map ``"object_id"`` (H, W) (index of the
object each pixel sees, -1 for none; ``render_scenes(..., object_ids=True)``),
the map moves like a segmentation and ``count`` becomes the number of objects left
in it: the objects the transformed segmentation shows. Without the map, ``count``
is marked missing (-1, skipped by the loss) whenever a zoom (``scale > 1``) or a
rotation (``angle != 0``) is applied. A flip moves nothing out of the frame.

The random versions take a ``seed``: a (2,) integer tensor as given by
:func:`mtl_utils.data.pipeline.make_dataset`. They use TensorFlow's stateless
random ops, so the same seed always gives the same augmentation -- eagerly, inside
``tf.data`` (graph mode) and in a parallel ``map`` -- with no global state. The
functions are written with TensorFlow ops rather than ``keras.ops`` because they run
inside ``tf.data``, which needs TensorFlow ops whatever the Keras backend is.

The kind of each target comes from its key (a key named like a task kind) or from
``kinds``: a mapping ``{key: kind}`` or a sequence of :class:`~mtl_utils.tasks.Task`.

References
----------
Liu, Johns and Davison (2019), *End-to-end multi-task learning with attention*
(MTAN): ``RandomScaleCrop`` with scales (1.0, 1.2, 1.5), depth divided by the scale.

Examples
--------
>>> from mtl_utils.data.scenes import render_scenes
>>> from mtl_utils.data.pipeline import make_dataset
>>> arrays = render_scenes(4, size=32)
>>> ds = make_dataset(arrays, ["segmentation", "depth", "normal"], augment=augment)
>>> tuple(next(iter(ds))[0].shape)
(4, 32, 32, 3)
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from mtl_utils.tasks import KINDS, Task

__all__ = [
    "COUNT_KEY",
    "DEPTH_RULES",
    "INSTANCE_KEY",
    "apply_keras_layers",
    "augment",
    "example_kinds",
    "flip_tta",
    "hflip",
    "unflip_predictions",
    "make_augment",
    "photometric",
    "random_hflip",
    "random_rotate",
    "random_scale_crop",
    "rotate",
    "scale_crop",
]

#: How ``scale_crop`` treats depth: ``"mtan"`` divides it by the zoom factor, as
#: MTAN does (exact for a world ``s`` times smaller seen through the zoomed camera,
#: roughly a camera moved closer); ``"zoom"`` keeps it (a longer focal length moves
#: nothing, so the true depth is unchanged).
DEPTH_RULES = ("mtan", "zoom")

#: Key of the optional instance map (H, W) int32: the index of the object each
#: pixel sees, -1 for floor, wall or filled pixels. It moves like a segmentation.
INSTANCE_KEY = "object_id"
#: Key of the image-level target that counts the objects visible in the frame:
#: recounted from the instance map after a crop or rotation, else marked missing.
COUNT_KEY = "count"

_DENSE_RANK = {"segmentation": 2, "depth": 3, "normal": 3}
_EXPECTED = {
    "segmentation": "(H, W) class ids",
    "depth": "(H, W, 1)",
    "normal": "(H, W, 3)",
}
_CHANNELS = {"depth": 1, "normal": 3}
_NORMAL_EPS = 1e-6

Kinds = Mapping[str, str] | Sequence[Task] | None


def _tf():
    import tensorflow as tf

    return tf


# --------------------------------------------------------------------------- checks
def _shape_str(shape) -> str:
    dims = ["None" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def example_kinds(example: Mapping, kinds: Kinds = None) -> dict[str, str]:
    """The task kind of every target of ``example`` (every key but ``"image"``).

    A key listed in ``kinds`` gets that kind; a key named like a kind
    (``"segmentation"``, ``"depth"``, ``"normal"``) gets that kind, and the
    instance map :data:`INSTANCE_KEY` is a segmentation; any other key holding a
    scalar is image-level (``"classification"``) and is left untouched.

    Parameters
    ----------
    example:
        Dict with ``"image"`` and the targets of one sample.
    kinds:
        Optional ``{key: kind}`` or a sequence of :class:`~mtl_utils.tasks.Task`.

    Raises
    ------
    ValueError
        If the image is missing, a kind is unknown, or a non-scalar target has no
        kind (it could not be moved with the image).
    """
    if not isinstance(example, Mapping):
        raise ValueError(
            f"example is a {type(example).__name__}; expected a dict with 'image' "
            "and the targets of one sample"
        )
    if "image" not in example:
        raise ValueError(
            f"example has no 'image' entry; keys are {sorted(example)}. Expected a "
            "dict with 'image' (H, W, 3) and the targets of one sample"
        )
    given: dict[str, str] = {}
    if kinds is not None:
        if isinstance(kinds, Mapping):
            given = dict(kinds)
        else:
            given = {t.name: t.kind for t in kinds}
    out = {}
    for key, value in example.items():
        if key == "image":
            continue
        default = "segmentation" if key == INSTANCE_KEY else None
        kind = given.get(key, key if key in KINDS else default)
        if kind is None:
            if len(_static_shape(value)) == 0:
                kind = "classification"
            else:
                raise ValueError(
                    f"target {key!r} has shape {_shape_str(_static_shape(value))} "
                    f"but no known kind; name it after a kind {KINDS} or pass "
                    f"kinds={{{key!r}: 'segmentation'}} (or the Task list)"
                )
        if kind not in KINDS:
            raise ValueError(f"target {key!r}: unknown kind {kind!r}; expected {KINDS}")
        out[key] = kind
    return out


def _static_shape(x) -> tuple:
    shape = getattr(x, "shape", None)
    if shape is None:
        return np.shape(x)
    return tuple(None if d is None else int(d) for d in shape)


def _check_image_dtype(image) -> None:
    """Refuse an integer image: augmentations work on floats in [0, 1]."""
    dtype = _tf().as_dtype(image.dtype)
    if not dtype.is_floating:
        raise ValueError(
            f"image has dtype {dtype.name}; expected float32 in [0, 1] (on 0..255 "
            "values photometric changes clip every pixel to 1). Convert first: "
            "tf.cast(image, tf.float32) / 255"
        )


def _check_example(example: Mapping, kinds: Kinds) -> dict[str, str]:
    """Check ranks, channels, dtypes and spatial sizes; return ``{key: kind}``."""
    found = example_kinds(example, kinds)
    _check_image_dtype(_convert({"image": example["image"]})["image"])
    for key, kind in found.items():
        dtype = _tf().as_dtype(_convert({key: example[key]})[key].dtype)
        if kind in ("segmentation", "classification") and dtype.is_unsigned:
            raise ValueError(
                f"{kind} target {key!r} has dtype {dtype.name}, which cannot hold "
                "the unlabelled label -1 (a rotation's empty corners would become "
                "a class); expected int32"
            )
    image_shape = _static_shape(example["image"])
    if len(image_shape) != 3 or image_shape[-1] != 3:
        raise ValueError(
            f"image has shape {_shape_str(image_shape)}; expected (H, W, 3) -- one "
            "sample, not a batch (augment before batching)"
        )
    for key, kind in found.items():
        if kind == "classification":
            continue
        shape = _static_shape(example[key])
        rank = _DENSE_RANK[kind]
        channels = _CHANNELS.get(kind)
        if len(shape) != rank or (channels is not None and shape[-1] != channels):
            raise ValueError(
                f"{kind} target {key!r} has shape {_shape_str(shape)}; expected "
                f"{_EXPECTED[kind]} for one sample with an image of shape "
                f"{_shape_str(image_shape)}"
            )
        for a, b in zip(shape[:2], image_shape[:2], strict=True):
            if a is not None and b is not None and a != b:
                raise ValueError(
                    f"{kind} target {key!r} has shape {_shape_str(shape)} but the "
                    f"image has shape {_shape_str(image_shape)}; their height and "
                    "width must match"
                )
    return found


def _convert(example: Mapping) -> dict:
    tf = _tf()
    return {k: tf.convert_to_tensor(v) for k, v in example.items()}


def _check_scale(scale):
    """A Python or eager scale >= 1 -> float32 tensor; symbolic ones get a check op."""
    tf = _tf()
    if isinstance(scale, numbers.Number) or (
        tf.is_tensor(scale) and not _is_symbolic(scale)
    ):
        value = float(np.asarray(scale))
        if not value >= 1.0:
            raise ValueError(
                f"scale must be >= 1 (the crop is 1/scale of the image, then "
                f"enlarged); got {value}"
            )
        return tf.constant(value, tf.float32)
    scale = tf.cast(scale, tf.float32)
    check = tf.debugging.assert_greater_equal(
        scale, 1.0, message="scale must be >= 1 (a zoom in)"
    )
    with tf.control_dependencies([check]):
        return tf.identity(scale)


def _is_symbolic(x) -> bool:
    return not hasattr(x, "numpy")


def _check_seed(seed):
    tf = _tf()
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank != 1 or (seed.shape[0] is not None and seed.shape[0] != 2):
        raise ValueError(
            f"seed has shape {_shape_str(_static_shape(seed))}; expected (2,) "
            "integers, as make_dataset passes to augment(example, seed)"
        )
    if not seed.dtype.is_integer:
        raise ValueError(f"seed has dtype {seed.dtype.name}; expected int32 or int64")
    return tf.cast(seed, tf.int64)


def _normal_valid(normal):
    tf = _tf()
    return tf.reduce_any(tf.not_equal(normal, 0), axis=-1, keepdims=True)


def _renormalise(blended, nearest):
    """Unit vectors of ``blended`` where ``nearest`` is valid, else zero.

    Where the blend of valid neighbours nearly cancels (opposite normals at a
    crease), the nearest neighbour's normal is used.
    """
    tf = _tf()
    valid = _normal_valid(nearest)
    norm = tf.norm(blended, axis=-1, keepdims=True)
    unit = tf.where(
        norm > _NORMAL_EPS, blended / tf.maximum(norm, _NORMAL_EPS), nearest
    )
    unit = unit / tf.maximum(tf.norm(unit, axis=-1, keepdims=True), _NORMAL_EPS)
    return tf.where(valid, unit, tf.zeros_like(unit))


def _recount(out: dict, example: Mapping, found: Mapping, cut) -> dict:
    """Set ``out["count"]`` to the objects left in the frame after a transform.

    ``cut`` (bool tensor) says whether the transform may have moved objects out of
    the frame. With the instance map in ``out`` (already transformed), the count is
    the number of distinct ids >= 0 in it; without it, the count is marked missing
    (-1) where ``cut`` holds. A count that was missing stays missing.
    """
    if found.get(COUNT_KEY) != "classification":
        return out
    tf = _tf()
    count = example[COUNT_KEY]
    missing = tf.constant(-1, count.dtype)
    if INSTANCE_KEY in out:
        ids = tf.reshape(out[INSTANCE_KEY], [-1])
        left = tf.size(tf.unique(tf.boolean_mask(ids, ids >= 0))[0])
        new = tf.cast(left, count.dtype)
    else:
        new = tf.where(cut, missing, count)
    out[COUNT_KEY] = tf.where(count < 0, missing, new)
    return out


# ------------------------------------------------------------------------ transforms
def hflip(example: Mapping, kinds: Kinds = None) -> dict:
    """Mirror an example left-right: every map flipped, the normals' ``x`` negated.

    The camera frame has ``x`` pointing right, so a mirrored surface's normal has
    its ``x`` component negated; ``y`` (down) and ``z`` (forward) are unchanged.
    Rendering :meth:`mtl_utils.data.scenes.Scene.mirrored` gives exactly this.

    Parameters
    ----------
    example:
        ``image`` (H, W, 3) and targets of one sample (see the module docstring).
    kinds:
        Kinds of targets not named after their kind (``{key: kind}`` or Tasks).

    Returns
    -------
    dict
        Same keys, shapes and dtypes.

    Examples
    --------
    >>> import numpy as np
    >>> ex = {"image": np.zeros((2, 2, 3), "float32"),
    ...       "normal": np.array([[[1, 0, 0], [0.6, 0, -0.8]]] * 2, "float32")}
    >>> hflip(ex)["normal"].numpy()[0].astype(float).round(2).tolist()
    [[-0.6, 0.0, -0.8], [-1.0, 0.0, 0.0]]
    """
    tf = _tf()
    found = _check_example(example, kinds)
    example = _convert(example)
    out = {"image": tf.reverse(example["image"], axis=[1])}
    for key, kind in found.items():
        value = example[key]
        if kind == "classification":
            out[key] = value
            continue
        value = tf.reverse(value, axis=[1])
        if kind == "normal":
            value = value * tf.constant([-1.0, 1.0, 1.0], value.dtype)
        out[key] = value
    return out


def _prediction_kinds(tasks) -> dict[str, str]:
    if isinstance(tasks, Mapping):
        kinds = {str(k): str(v) for k, v in tasks.items()}
    else:
        kinds = {t.name: t.kind for t in tasks}
    unknown = {k: v for k, v in kinds.items() if v not in KINDS}
    if unknown:
        raise ValueError(f"unknown task kinds {unknown}; expected kinds in {KINDS}")
    return kinds


def unflip_predictions(
    predictions: Mapping, tasks, negate_normal_x: bool = True
) -> dict:
    """Map a batch of predictions made on mirrored images back to the originals.

    Dense maps ``(B, H, W, C)`` are reversed along the width, and a normal map's
    ``x`` component is negated (the mirror image of a surface that faces right
    faces left); image-level outputs ``(B, K)`` are unchanged. This is
    :func:`hflip` for a batch of model outputs.

    Parameters
    ----------
    predictions:
        ``{task: output}`` of a model called on horizontally flipped images.
    tasks:
        :class:`~mtl_utils.tasks.Task` objects, or ``{task: kind}``.
    negate_normal_x:
        ``False`` reproduces the common bug of flipping normals like an image.
    """
    from keras import ops

    kinds = _prediction_kinds(tasks)
    out = {}
    for name, kind in kinds.items():
        value = ops.convert_to_tensor(predictions[name])
        if kind == "classification":
            out[name] = value
            continue
        if len(value.shape) != 4:
            raise ValueError(
                f"{name} prediction has shape {tuple(value.shape)}; expected "
                "(B, H, W, C) for a dense task"
            )
        value = ops.flip(value, axis=2)
        if kind == "normal" and negate_normal_x:
            value = value * ops.convert_to_tensor([-1.0, 1.0, 1.0], value.dtype)
        out[name] = value
    return out


def flip_tta(model, images, tasks, negate_normal_x: bool = True) -> dict:
    """Test-time augmentation: average the predictions on images and their mirror.

    ``model(images)`` and ``model`` on the left-right mirrored images, the latter
    mapped back with :func:`unflip_predictions`, are combined per kind:
    class scores (segmentation, classification) as the mean of the two softmax
    distributions, returned as log-probabilities (so ``argmax`` and a
    cross-entropy on logits still apply); depth as the mean; normals as the mean
    of the two unit vectors, renormalised.

    Parameters
    ----------
    model:
        Callable ``images -> {task: output}`` (a Keras model in inference mode).
    images:
        ``(B, H, W, 3)``.
    tasks:
        :class:`~mtl_utils.tasks.Task` objects, or ``{task: kind}``.
    negate_normal_x:
        ``False`` skips the negation of the normals' ``x`` (a bug, for comparison).

    Returns
    -------
    ``{task: output}`` with the shapes of ``model``'s outputs.
    """
    from keras import ops

    kinds = _prediction_kinds(tasks)
    images = ops.convert_to_tensor(images)
    if len(images.shape) != 4:
        raise ValueError(
            f"images have shape {tuple(images.shape)}; expected (B, H, W, 3)"
        )
    plain = model(images)
    mirrored = unflip_predictions(
        model(ops.flip(images, axis=2)), kinds, negate_normal_x
    )

    def unit(x):
        return x / ops.maximum(ops.norm(x, axis=-1, keepdims=True), 1e-12)

    out = {}
    for name, kind in kinds.items():
        a, b = ops.convert_to_tensor(plain[name]), mirrored[name]
        if kind in ("segmentation", "classification"):
            mean = (ops.softmax(a, axis=-1) + ops.softmax(b, axis=-1)) / 2
            out[name] = ops.log(ops.maximum(mean, 1e-12))
        elif kind == "normal":
            out[name] = unit(unit(a) + unit(b))
        else:
            out[name] = (a + b) / 2
    return out


def _zoom_axis(size, scale, start):
    """Source coordinates sampled by an axis zoomed by ``scale`` from ``start``.

    Output pixel ``i`` (centre ``i + 0.5``) sees the source point
    ``start + (i + 0.5) / scale`` (pixel-edge units); returns the nearest source
    index and the bilinear pair ``(i0, i1, weight of i1)`` with the coordinate
    clamped to the image, as ``tf.image.resize`` does with half-pixel centres.
    """
    tf = _tf()
    centre = start + (tf.range(size, dtype=tf.float32) + 0.5) / scale - 0.5
    last = tf.cast(size - 1, tf.float32)
    nearest = tf.cast(tf.clip_by_value(tf.floor(centre + 0.5), 0.0, last), tf.int32)
    clamped = tf.clip_by_value(centre, 0.0, last)
    lower = tf.floor(clamped)
    upper = tf.minimum(lower + 1.0, last)
    return nearest, tf.cast(lower, tf.int32), tf.cast(upper, tf.int32), clamped - lower


def _gather2(x, rows, cols):
    tf = _tf()
    return tf.gather(tf.gather(x, rows, axis=0), cols, axis=1)


def _bilinear(x, ry, cx):
    """Separable bilinear resampling of (H, W, C) ``x`` (float32)."""
    tf = _tf()
    n_r, r0, r1, wr = ry
    n_c, c0, c1, wc = cx
    top, bottom = tf.gather(x, r0, axis=0), tf.gather(x, r1, axis=0)
    rows = top + (bottom - top) * wr[:, None, None]
    left, right = tf.gather(rows, c0, axis=1), tf.gather(rows, c1, axis=1)
    return left + (right - left) * wc[None, :, None]


def scale_crop(
    example: Mapping,
    scale: float,
    offset: tuple[float, float] = (0.5, 0.5),
    depth_rule: str = "mtan",
    kinds: Kinds = None,
) -> dict:
    """Crop ``1/scale`` of the image and enlarge it back to (H, W): a zoom by ``scale``.

    MTAN's ``RandomScaleCrop`` (Liu et al. 2019): the crop is ``H/scale x W/scale``
    pixels at ``offset``; the image is resampled bilinearly, segmentation and depth
    by nearest neighbour, and depth divided by ``scale`` (``depth_rule="mtan"``).
    Unlike MTAN's code, normals are renormalised after interpolation (so neither a
    crease nor the zero vector of an invalid neighbour shortens them), the crop may
    have a fractional size and position, and resampling uses half-pixel centres
    (output pixel ``i`` samples ``top + (i + 0.5) / scale``), which makes the result
    *exactly* the view of a camera with focal length ``focal * scale`` (MTAN's
    ``align_corners=True`` is not). Inside an integer crop it equals
    ``keras.ops.image.resize`` of the crop; at the crop's border it reads the real
    pixels just outside the crop rather than clamping to its edge.

    Parameters
    ----------
    example:
        ``image`` (H, W, 3) and targets of one sample.
    scale:
        Zoom factor ``>= 1`` (Python number or scalar tensor).
    offset:
        ``(y, x)`` position of the crop as fractions of the free range: ``(0, 0)``
        top-left, ``(0.5, 0.5)`` centred, ``(1, 1)`` bottom-right. The crop's top
        edge is at ``y * (H - H / scale)`` pixels.
    depth_rule:
        ``"mtan"``: depth divided by ``scale`` (the scene as if ``scale`` times
        closer); ``"zoom"``: depth unchanged (the true depth of a focal-length zoom).
    kinds:
        Kinds of targets not named after their kind.

    Returns
    -------
    dict
        Same keys, shapes and dtypes; ``"count"`` recounted from the moved
        ``"object_id"`` map, or marked missing without one (module docstring).

    Raises
    ------
    ValueError
        If the scale is below 1, the offset outside [0, 1], the rule unknown, or the
        example malformed.
    """
    tf = _tf()
    found = _check_example(example, kinds)
    if depth_rule not in DEPTH_RULES:
        raise ValueError(f"depth_rule is {depth_rule!r}; expected one of {DEPTH_RULES}")
    if len(offset) != 2:
        raise ValueError(f"offset is {offset!r}; expected (y, x) fractions in [0, 1]")
    for o in offset:
        if isinstance(o, numbers.Number) and not 0.0 <= o <= 1.0:
            raise ValueError(
                f"offset is {offset!r}; expected (y, x) fractions in [0, 1]"
            )
    scale = _check_scale(scale)
    example = _convert(example)
    shape = tf.shape(example["image"])
    h, w = shape[0], shape[1]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    top = tf.cast(offset[0], tf.float32) * (hf - hf / scale)
    left = tf.cast(offset[1], tf.float32) * (wf - wf / scale)
    ry, cx = _zoom_axis(h, scale, top), _zoom_axis(w, scale, left)

    image = example["image"]
    out = {"image": tf.cast(_bilinear(tf.cast(image, tf.float32), ry, cx), image.dtype)}
    for key, kind in found.items():
        value = example[key]
        if kind == "classification":
            out[key] = value
            continue
        nearest = _gather2(value, ry[0], cx[0])
        if kind == "depth" and depth_rule == "mtan":
            nearest = nearest / tf.cast(scale, nearest.dtype)
        elif kind == "normal":
            blended = _bilinear(tf.cast(value, tf.float32), ry, cx)
            nearest = tf.cast(
                _renormalise(blended, tf.cast(nearest, tf.float32)), value.dtype
            )
        out[key] = nearest
    return _recount(out, example, found, scale > 1.0)


def _rotation_transform(angle, h, w):
    """ImageProjectiveTransform vector mapping output pixels to input pixels."""
    tf = _tf()
    c, s = tf.cos(angle), tf.sin(angle)
    y0 = (tf.cast(h, tf.float32) - 1.0) / 2.0
    x0 = (tf.cast(w, tf.float32) - 1.0) / 2.0
    # input = R(-angle) (output - centre) + centre, with the image y axis down
    return tf.stack(
        [c, -s, x0 - c * x0 + s * y0, s, c, y0 - s * x0 - c * y0, 0.0, 0.0]
    )[None]


def _warp(x, transform, interpolation: str, fill: float):
    tf = _tf()
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None],
        transforms=transform,
        output_shape=tf.stack([h, w]),
        fill_value=tf.constant(fill, tf.float32),
        interpolation=interpolation,
        fill_mode="CONSTANT",
    )[0]


def rotate(example: Mapping, angle: float, kinds: Kinds = None) -> dict:
    """Rotate an example in the image plane by ``angle`` radians about its centre.

    The result is the view of the same camera rolled by ``angle`` about its optical
    axis (:attr:`mtl_utils.data.scenes.Camera` ``roll``): a positive angle turns the
    picture counter-clockwise as displayed (camera ``y`` points down). Normals are
    rotated with it, ``(n_x, n_y) -> (c n_x + s n_y, -s n_x + c n_y)`` with
    ``c, s = cos, sin(angle)``, ``n_z`` and depth unchanged. Corners that come from
    outside the image are filled with 0 in the image and marked missing in the
    targets (segmentation -1, depth 0, normal 0).

    Parameters
    ----------
    example:
        ``image`` (H, W, 3) and targets of one sample.
    angle:
        Rotation in radians (Python number or scalar tensor).
    kinds:
        Kinds of targets not named after their kind.

    Returns
    -------
    dict
        Same keys, shapes and dtypes; ``"count"`` recounted from the moved
        ``"object_id"`` map, or marked missing without one (module docstring).
    """
    tf = _tf()
    found = _check_example(example, kinds)
    example = _convert(example)
    angle = tf.cast(angle, tf.float32)
    shape = tf.shape(example["image"])
    transform = _rotation_transform(angle, shape[0], shape[1])
    image = example["image"]
    out = {
        "image": tf.cast(
            _warp(tf.cast(image, tf.float32), transform, "BILINEAR", 0.0), image.dtype
        )
    }
    for key, kind in found.items():
        value = example[key]
        if kind == "classification":
            out[key] = value
        elif kind == "segmentation":
            # shift by one so that the fill value 0 becomes the ignore label -1
            moved = _warp(
                tf.cast(value, tf.float32)[..., None] + 1.0, transform, "NEAREST", 0.0
            )
            out[key] = tf.cast(moved[..., 0] - 1.0, value.dtype)
        elif kind == "depth":
            out[key] = tf.cast(
                _warp(tf.cast(value, tf.float32), transform, "NEAREST", 0.0),
                value.dtype,
            )
        else:
            normal = tf.cast(value, tf.float32)
            nearest = _warp(normal, transform, "NEAREST", 0.0)
            blended = _warp(normal, transform, "BILINEAR", 0.0)
            c, s = tf.cos(angle), tf.sin(angle)
            rot = tf.stack(
                [
                    tf.stack([c, -s, 0.0]),
                    tf.stack([s, c, 0.0]),
                    tf.constant([0.0, 0.0, 1.0]),
                ]
            )
            # row vectors: n' = n @ rot gives (c nx + s ny, -s nx + c ny, nz)
            nearest, blended = nearest @ rot, blended @ rot
            out[key] = tf.cast(_renormalise(blended, nearest), value.dtype)
    return _recount(out, example, found, tf.not_equal(angle, 0.0))


def photometric(
    example: Mapping,
    seed,
    brightness: float = 0.1,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.02,
) -> dict:
    """Random brightness, contrast, saturation and hue of the image only.

    Targets are returned untouched: colour changes move no pixel. The image is
    clipped to [0, 1] afterwards. A strength of 0 turns that change off.

    Parameters
    ----------
    example:
        ``image`` (H, W, 3) float in [0, 1] and any targets.
    seed:
        (2,) integer tensor (stateless randomness).
    brightness:
        Largest added offset: ``delta ~ U(-brightness, brightness)``.
    contrast, saturation:
        Factors drawn from ``U(1 - x, 1 + x)``.
    hue:
        Largest hue rotation, as a fraction of a turn (``<= 0.5``).
    """
    tf = _tf()
    if "image" not in example:
        raise ValueError(
            f"example has no 'image' entry; keys are {sorted(example)}. Expected a "
            "dict with 'image' (H, W, 3) and the targets of one sample"
        )
    for name, value, top in (
        ("brightness", brightness, 1.0),
        ("contrast", contrast, 1.0),
        ("saturation", saturation, 1.0),
        ("hue", hue, 0.5),
    ):
        if not 0.0 <= value <= top:
            raise ValueError(f"{name} is {value}; expected a number in [0, {top}]")
    seeds = tf.random.experimental.stateless_split(_check_seed(seed), num=4)
    image = tf.convert_to_tensor(example["image"])
    shape = _static_shape(image)
    if len(shape) != 3 or shape[-1] != 3:
        raise ValueError(f"image has shape {_shape_str(shape)}; expected (H, W, 3)")
    _check_image_dtype(image)
    x = tf.cast(image, tf.float32)
    check = tf.debugging.assert_less_equal(
        tf.reduce_max(x),
        1.001,
        message="photometric: image values exceed 1; expected float in [0, 1] "
        "(0..255 images would be clipped to 1: divide by 255)",
    )
    with tf.control_dependencies([check]):
        x = tf.identity(x)
    if brightness > 0:
        x = tf.image.stateless_random_brightness(x, brightness, seeds[0])
    if contrast > 0:
        x = tf.image.stateless_random_contrast(x, 1 - contrast, 1 + contrast, seeds[1])
    if saturation > 0:
        x = tf.image.stateless_random_saturation(
            x, 1 - saturation, 1 + saturation, seeds[2]
        )
    if hue > 0:
        x = tf.image.stateless_random_hue(x, hue, seeds[3])
    out = _convert(example)
    out["image"] = tf.cast(tf.clip_by_value(x, 0.0, 1.0), image.dtype)
    return out


# ------------------------------------------------------------------- random wrappers
def random_hflip(
    example: Mapping, seed, probability: float = 0.5, kinds: Kinds = None
) -> dict:
    """:func:`hflip` with probability ``probability`` (stateless, from ``seed``)."""
    tf = _tf()
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability is {probability}; expected a number in [0, 1]")
    _check_example(example, kinds)
    example = _convert(example)
    flip = tf.random.stateless_uniform([], _check_seed(seed)) < probability
    return tf.cond(flip, lambda: hflip(example, kinds), lambda: dict(example))


def _check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    scales = tuple(float(s) for s in np.atleast_1d(scales))
    if not scales or min(scales) < 1.0:
        raise ValueError(
            f"scales are {scales}; expected a non-empty set of zoom factors >= 1 "
            "such as (1.0, 1.2, 1.5)"
        )
    return scales


def random_scale_crop(
    example: Mapping,
    seed,
    scales: Sequence[float] = (1.0, 1.2, 1.5),
    depth_rule: str = "mtan",
    kinds: Kinds = None,
) -> dict:
    """:func:`scale_crop` with a scale drawn from ``scales`` and a uniform offset.

    As MTAN's ``RandomScaleCrop``: every scale equally likely, the crop anywhere
    inside the image.
    """
    tf = _tf()
    table = tf.constant(_check_scales(scales), tf.float32)
    seeds = tf.random.experimental.stateless_split(_check_seed(seed), num=2)
    index = tf.random.stateless_uniform(
        [], seeds[0], minval=0, maxval=len(table), dtype=tf.int32
    )
    offset = tf.random.stateless_uniform([2], seeds[1])
    return scale_crop(
        example,
        tf.gather(table, index),
        (offset[0], offset[1]),
        depth_rule=depth_rule,
        kinds=kinds,
    )


def random_rotate(
    example: Mapping, seed, max_angle: float = math.radians(10), kinds: Kinds = None
) -> dict:
    """:func:`rotate` by an angle drawn uniformly from ``[-max_angle, max_angle]``."""
    tf = _tf()
    if not 0.0 <= max_angle <= math.pi:
        raise ValueError(f"max_angle is {max_angle}; expected radians in [0, pi]")
    angle = tf.random.stateless_uniform(
        [], _check_seed(seed), minval=-max_angle, maxval=max_angle
    )
    return rotate(example, angle, kinds=kinds)


def augment(
    example: Mapping,
    seed,
    *,
    flip_probability: float = 0.5,
    scales: Sequence[float] = (1.0, 1.2, 1.5),
    max_angle: float = 0.0,
    color: bool = True,
    depth_rule: str = "mtan",
    kinds: Kinds = None,
) -> dict:
    """The book's augmentation: flip, scale-crop, rotation (off by default), colour.

    Usable as ``make_dataset(..., augment=augment)``; :func:`make_augment` binds
    other settings. Each step draws from its own part of ``seed``.

    Parameters
    ----------
    example:
        ``image`` (H, W, 3) and targets of one sample.
    seed:
        (2,) integer tensor, different per sample and epoch.
    flip_probability:
        Probability of :func:`hflip`.
    scales:
        Zoom factors of :func:`random_scale_crop` (MTAN: 1.0, 1.2, 1.5); ``(1.0,)``
        turns it off.
    max_angle:
        Largest rotation in radians (0 = no rotation, as in MTAN).
    color:
        Apply :func:`photometric` with its default strengths.
    depth_rule:
        See :data:`DEPTH_RULES`.
    kinds:
        Kinds of targets not named after their kind.
    """
    tf = _tf()
    scales = _check_scales(scales)
    seeds = tf.random.experimental.stateless_split(_check_seed(seed), num=4)
    _check_example(example, kinds)
    out = _convert(example)
    if flip_probability > 0:
        out = random_hflip(out, seeds[0], flip_probability, kinds=kinds)
    if scales != (1.0,):
        out = random_scale_crop(out, seeds[1], scales, depth_rule, kinds=kinds)
    if max_angle > 0:
        out = random_rotate(out, seeds[2], max_angle, kinds=kinds)
    if color:
        out = photometric(out, seeds[3])
    return out


def make_augment(**options) -> Callable[[Mapping, object], dict]:
    """:func:`augment` with its keyword options bound, for ``make_dataset``.

    Examples
    --------
    >>> fn = make_augment(max_angle=0.1, depth_rule="zoom")
    >>> fn.keywords["max_angle"]
    0.1
    """
    unknown = set(options) - {
        "flip_probability",
        "scales",
        "max_angle",
        "color",
        "depth_rule",
        "kinds",
    }
    if unknown:
        raise ValueError(
            f"unknown augment option(s) {sorted(unknown)}; expected flip_probability, "
            "scales, max_angle, color, depth_rule, kinds"
        )
    if "scales" in options:
        _check_scales(options["scales"])
    if options.get("depth_rule", "mtan") not in DEPTH_RULES:
        raise ValueError(
            f"depth_rule is {options['depth_rule']!r}; expected one of {DEPTH_RULES}"
        )
    return functools.partial(augment, **options)


# --------------------------------------------------------------------- Keras layers
#: What apply_keras_layers calls on a Keras image preprocessing layer (Keras 3.6+):
#: one random draw, then the images' and the masks' transforms with that draw.
_KERAS_LAYER_API = (
    "get_random_transformation",
    "transform_images",
    "transform_segmentation_masks",
)


def apply_keras_layers(layers: Sequence, images, masks, training: bool = True):
    """Run Keras 3 preprocessing layers jointly on images and segmentation masks.

    Keras' image layers accept ``{"images", "segmentation_masks"}`` and move the
    masks with the images. This wrapper does what such a call does (one random
    draw per layer, applied to images and masks) with one difference: the masks are
    always resampled by nearest neighbour. Keras 3.6 to 3.13 resample masks in
    ``RandomRotation``, ``RandomZoom``, ``RandomTranslation`` (and other layers with
    an ``interpolation`` option) with the images' interpolation, bilinear by
    default, which invents labels between two classes (a rotation of labels 0 and
    2 gives 1s at their border); Keras 3.14 and later use nearest neighbour. Here
    the layer's ``interpolation`` is set to ``"nearest"`` while its masks are
    transformed, which gives the same labels on every Keras version.

    The wrapper also adds and removes the masks' channel axis and casts them back
    to their integer dtype (``RandomFlip`` and ``RandomCrop`` return float masks on
    every version). Depth and normals cannot go through these layers (a flip must
    negate ``n_x``; a zoom may rescale depth), and the layers draw from a stateful
    seed generator, so use :func:`augment` for the full example.

    Parameters
    ----------
    layers:
        Keras image preprocessing layers, e.g.
        ``[keras.layers.RandomFlip("horizontal")]``.
    images:
        (B, H, W, 3) float.
    masks:
        (B, H, W) integer class ids.
    training:
        Passed to the layers. Note ``RandomCrop(training=False)`` crops the masks
        but not the images (Keras 3.8 to 3.15 at least); this wrapper raises then.

    Returns
    -------
    tuple
        ``images`` (B, H', W', 3) and ``masks`` (B, H', W') with the masks' dtype.

    Raises
    ------
    ValueError
        On wrong shapes, a layer without Keras' transformation methods (Keras
        before 3.6, or not an image preprocessing layer), or a layer that left the
        masks and the images with different sizes.
    """
    import keras
    from keras import ops

    if len(_static_shape(images)) != 4 or len(_static_shape(masks)) != 3:
        raise ValueError(
            f"images have shape {_shape_str(_static_shape(images))} and masks "
            f"{_shape_str(_static_shape(masks))}; expected (B, H, W, 3) and (B, H, W)"
        )
    masks = ops.convert_to_tensor(masks)
    dtype = masks.dtype
    images, masks = ops.convert_to_tensor(images), ops.expand_dims(masks, -1)
    for layer in layers:
        missing = [m for m in _KERAS_LAYER_API if not hasattr(layer, m)]
        if missing:
            raise ValueError(
                f"{type(layer).__name__} (Keras {keras.__version__}) has no "
                f"{', '.join(missing)}; expected a Keras image preprocessing layer "
                "(Keras 3.6 or later), whose masks can be moved with the images"
            )
        draw = layer.get_random_transformation(
            {"images": images, "segmentation_masks": masks}, training=training
        )
        images = layer.transform_images(images, draw, training=training)
        masks = _transform_masks_nearest(layer, masks, draw, training)
        if tuple(images.shape[1:3]) != tuple(masks.shape[1:3]):
            raise ValueError(
                f"{type(layer).__name__} returned images of shape "
                f"{tuple(images.shape)} but masks of shape {tuple(masks.shape)} "
                f"(training={training}); the layer did not move the masks with the "
                "images"
            )
    return images, ops.cast(masks[..., 0], dtype)


def _transform_masks_nearest(layer, masks, transformation, training: bool):
    """``layer.transform_segmentation_masks`` with nearest-neighbour resampling."""
    interpolation = getattr(layer, "interpolation", "nearest")
    if interpolation == "nearest":
        return layer.transform_segmentation_masks(masks, transformation, training)
    layer.interpolation = "nearest"
    try:
        return layer.transform_segmentation_masks(masks, transformation, training)
    finally:
        layer.interpolation = interpolation
