"""The SegNet family as the MTAN paper's code builds it, and cross-stitch networks.

Liu, Johns and Davison (2019) compare multi-task architectures on NYUv2 with one
backbone, SegNet (Badrinarayanan, Kendall and Cipolla 2017): a VGG-16-shaped
encoder of 3x3 convolution + batch normalisation + ReLU blocks, max pooling that
records where each maximum was, and a mirrored decoder that unpools with those
indices. The builders here follow their reference code (lorenmt/mtan,
``im2im_pred/model_segnet_*.py``); at ``width=1.0`` each has exactly its
reference's trainable parameters (the tests give the counts):

* :func:`build_segnet`: one task (the paper's "Single-Task" row);
* :func:`build_segnet_split`: the whole SegNet shared, one prediction layer per
  task ("Split, Standard"); hard parameter sharing;
* :func:`build_segnet_mtan`: the shared SegNet plus, per task, attention modules
  in the encoder *and* the decoder, linked by ``f`` blocks that all tasks share
  ("MTAN");
* :func:`build_cross_stitch`: one SegNet per task, the networks joined after
  every pooling and decoder stage by cross-stitch units (Misra et al. 2016).

Every builder takes the book's tasks and an input shape, has a ``width``
multiplier for CPU sizes (``1.0`` is the paper's 64, 128, 256, 512, 512
channels) and returns a :class:`~mtl_utils.training.MultiTaskModel` whose
outputs are a dict keyed by task name: segmentation logits, depth, and surface
normals before normalisation (the reference applies ``log_softmax`` and
normalises the normals inside the network; the book's losses do both). The paper
has only per-pixel tasks; a classification task here gets
:func:`~mtl_utils.models.classification_head` on the stride-32 features its
branch ends its encoder with.

The convolutions have biases and use Glorot-normal initialisation, batch
normalisation uses PyTorch's defaults (momentum 0.1, i.e. Keras' 0.9, and
epsilon 1e-5), as in the reference. One difference remains: MTAN's decoder
attention upsamples the task features with Keras' bilinear ``UpSampling2D``
(half-pixel centres) where the reference uses ``align_corners=True``; no
parameter depends on it.

Shapes use ``B`` batch, ``H, W`` input height and width (multiples of 32),
``C_j`` the channels of encoder block ``j``.

Examples
--------
>>> from mtl_utils.tasks import scene_tasks
>>> model = build_segnet_mtan(scene_tasks(["segmentation", "depth"]),
...                           input_shape=(32, 32, 3), width=0.0625)
>>> {name: tuple(out.shape) for name, out in model.output.items()}
{'segmentation': (None, 32, 32, 5), 'depth': (None, 32, 32, 1)}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from mtl_utils.attention import TaskAttention
from mtl_utils.models import (
    VGG_CHANNELS,
    _check_input_shape,
    _check_tasks,
    _check_width,
    _scaled,
    classification_head,
)
from mtl_utils.pooling import MaxPoolingWithArgmax2D, MaxUnpooling2D
from mtl_utils.tasks import Task
from mtl_utils.training import MultiTaskModel

__all__ = [
    "SEGNET_CONVS",
    "CROSS_STITCH_KINDS",
    "CrossStitch",
    "build_segnet",
    "build_segnet_split",
    "build_segnet_mtan",
    "build_cross_stitch",
]

#: Convolutions per encoder block (and per mirrored decoder stage) of SegNet:
#: VGG-16's layout.
SEGNET_CONVS: tuple[int, ...] = (2, 2, 3, 3, 3)
#: Cross-stitch units of :func:`build_cross_stitch`: ``"matrix"`` (Misra et al.:
#: each task its own mix) or ``"shared"`` (the MTAN reference code: one mix that
#: every task receives).
CROSS_STITCH_KINDS = ("matrix", "shared")
_BLOCKS = len(SEGNET_CONVS)
# PyTorch's batch-norm defaults, as the reference uses them.
_BN = {"momentum": 0.9, "epsilon": 1e-5}
_ATTENTION = {"kernel_initializer": "glorot_normal", **_BN}


# ---------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------


def _conv_bn_relu(x: Any, filters: int, name: str, init: str) -> Any:
    """3x3 convolution (with bias) + batch normalisation + ReLU."""
    x = keras.layers.Conv2D(
        filters, 3, padding="same", kernel_initializer=init, name=f"{name}_conv"
    )(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn", **_BN)(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


class _SharedBlock:
    """A conv + BN + ReLU block whose layers are called on several inputs."""

    def __init__(self, filters: int, name: str, init: str = "glorot_normal"):
        self.conv = keras.layers.Conv2D(
            filters, 3, padding="same", kernel_initializer=init, name=f"{name}_conv"
        )
        self.bn = keras.layers.BatchNormalization(name=f"{name}_bn", **_BN)
        self.relu = keras.layers.ReLU(name=f"{name}_relu")

    def __call__(self, x: Any) -> Any:
        return self.relu(self.bn(self.conv(x)))


def _channels(width: float) -> list[int]:
    return [_scaled(c, width) for c in VGG_CHANNELS]


def _encoder_block(x: Any, j: int, channels: list[int], prefix: str, init: str):
    """Encoder block ``j``: returns its first and last conv outputs."""
    first = x = _conv_bn_relu(x, channels[j], f"{prefix}enc{j + 1}_1", init)
    for i in range(2, SEGNET_CONVS[j] + 1):
        x = _conv_bn_relu(x, channels[j], f"{prefix}enc{j + 1}_{i}", init)
    return first, x


def _decoder_stage(x: Any, j: int, channels: list[int], prefix: str, init: str):
    """Decoder stage mirroring encoder block ``j``: its first and last outputs.

    The first convolution goes from ``C_j`` to the channels of block ``j - 1``
    (block 1's stage keeps ``C_1``), the others keep them.
    """
    out = channels[max(j - 1, 0)]
    first = x = _conv_bn_relu(x, out, f"{prefix}dec{j + 1}_1", init)
    for i in range(2, SEGNET_CONVS[j] + 1):
        x = _conv_bn_relu(x, out, f"{prefix}dec{j + 1}_{i}", init)
    return first, x


def _prediction(x: Any, task: Task, init: str) -> Any:
    """SegNet's prediction layer: 3x3 conv (no BN, no ReLU), then 1x1 conv."""
    x = keras.layers.Conv2D(
        x.shape[-1],
        3,
        padding="same",
        kernel_initializer=init,
        name=f"{task.name}_pred_conv",
    )(x)
    return keras.layers.Conv2D(
        task.channels, 1, kernel_initializer=init, dtype="float32", name=task.name
    )(x)


def _segnet_encoder(x: Any, channels: list[int], init: str):
    """The encoder: per block the first and last conv outputs, pooled maps, indices."""
    firsts, lasts, pooled, indices = [], [], [], []
    for j in range(_BLOCKS):
        first, last = _encoder_block(x, j, channels, "", init)
        x, where = MaxPoolingWithArgmax2D(name=f"pool{j + 1}")(last)
        firsts.append(first)
        lasts.append(last)
        pooled.append(x)
        indices.append(where)
    return firsts, lasts, pooled, indices


def _segnet_decoder(x: Any, indices: list, channels: list[int], init: str):
    """The shared decoder: per stage (deepest first) unpooled input, first, last."""
    unpooled, firsts, lasts = [], [], []
    for j in reversed(range(_BLOCKS)):
        x = MaxUnpooling2D(name=f"unpool{j + 1}")(x, indices[j])
        unpooled.append(x)
        first, x = _decoder_stage(x, j, channels, "", init)
        firsts.append(first)
        lasts.append(x)
    return unpooled, firsts, lasts


def _check_sized_input(input_shape: Any, what: str) -> tuple:
    shape = _check_input_shape(input_shape)
    if shape[0] is None or shape[1] is None:
        raise ValueError(
            f"input_shape={input_shape!r}: {what} needs known H and W, e.g. "
            "(64, 64, 3) or NYUv2's (288, 384, 3)"
        )
    return shape


def _head(task: Task, dense_features: Any, encoded: Any, init: str) -> Any:
    if task.dense:
        return _prediction(dense_features, task, init)
    return classification_head(encoded, task)


# ---------------------------------------------------------------------------
# single task and split
# ---------------------------------------------------------------------------


def _shared_segnet(tasks: list[Task], input_shape: Any, width: float, name: str):
    """A SegNet shared by ``tasks``, one SegNet prediction layer per task."""
    width = _check_width(width)
    shape = _check_input_shape(input_shape)
    channels = _channels(width)
    init = "glorot_normal"
    inputs = keras.Input(shape=shape, name="image")
    _, _, pooled, indices = _segnet_encoder(inputs, channels, init)
    encoded = pooled[-1]
    decoded = None
    if any(t.dense for t in tasks):
        decoded = _segnet_decoder(encoded, indices, channels, init)[2][-1]
    outputs = {t.name: _head(t, decoded, encoded, init) for t in tasks}
    dense_count = sum(t.dense for t in tasks)
    representation = decoded if dense_count == len(tasks) > 1 else encoded
    return MultiTaskModel(inputs, outputs, representation=representation, name=name)


def build_segnet(
    task: Task,
    input_shape: Sequence[int | None] = (64, 64, 3),
    width: float = 0.125,
    name: str | None = None,
) -> MultiTaskModel:
    """Single-task SegNet, as the MTAN paper's single-task baseline builds it.

    Encoder: five blocks of 2, 2, 3, 3, 3 (3x3 conv + BN + ReLU) with
    ``C_j = round(width * (64, 128, 256, 512, 512)[j])`` channels, each followed
    by 2x2 :class:`~mtl_utils.pooling.MaxPoolingWithArgmax2D`. Decoder: five
    stages mirroring the blocks, each :class:`~mtl_utils.pooling.MaxUnpooling2D`
    with the indices of its block, then as many conv + BN + ReLU as the block
    (the first one to the channels of the block above). Prediction layer: a 3x3
    convolution with ``C_1`` channels and a 1x1 convolution to the task's
    channels.

    Parameters
    ----------
    task:
        One :class:`~mtl_utils.tasks.Task`.
    input_shape:
        ``(H, W, C)`` with ``H, W`` multiples of 32 (or ``None``).
    width:
        Channel multiplier; ``1.0`` is the paper's network (24,981,069 trainable
        parameters for 13-class segmentation).
    name:
        Model name, default ``segnet_<task>``.

    Returns
    -------
    MultiTaskModel
        Output ``{task.name: (B, H, W, task.channels)}`` (``(B, classes)`` for a
        classification task, from the stride-32 encoder output);
        ``representation`` is the encoder output ``(B, H/32, W/32, C_5)``.

    References
    ----------
    Badrinarayanan, Kendall and Cipolla, "SegNet", TPAMI 2017; Liu, Johns and
    Davison, CVPR 2019, table 3 ("Single-Task").
    """
    if not isinstance(task, Task):
        raise ValueError(
            f"build_segnet needs one mtl_utils.tasks.Task; received {task!r}; "
            "use build_segnet_split for several tasks"
        )
    return _shared_segnet([task], input_shape, width, name or f"segnet_{task.name}")


def build_segnet_split(
    tasks: Sequence[Task],
    input_shape: Sequence[int | None] = (64, 64, 3),
    width: float = 0.125,
    name: str = "segnet_split",
) -> MultiTaskModel:
    """SegNet shared by all tasks, one prediction layer per task ("Split").

    Hard parameter sharing with the whole encoder-decoder shared: the tasks
    differ only in their prediction layers (see :func:`build_segnet`).

    Parameters
    ----------
    tasks:
        :class:`~mtl_utils.tasks.Task` objects with distinct names.
    input_shape, width:
        As for :func:`build_segnet`. At ``width=1.0`` with NYUv2's tasks the
        model has 25,055,185 trainable parameters, as the reference.
    name:
        Model name.

    Returns
    -------
    MultiTaskModel
        Output ``{task.name: prediction}``. ``representation`` is the shared
        decoder's output ``(B, H, W, C_1)`` when every task is per-pixel (the
        only tensor the prediction layers read), else the encoder output.

    References
    ----------
    Liu, Johns and Davison, CVPR 2019, table 3 ("Split, Standard").
    """
    return _shared_segnet(_check_tasks(tasks), input_shape, width, name)


# ---------------------------------------------------------------------------
# MTAN
# ---------------------------------------------------------------------------


def _mtan_encoder_branch(shared: tuple, blocks: list[_SharedBlock], task: str):
    """One task's encoder attention: ``a_hat_j = a_j * p_j``, then shared ``f``."""
    firsts, lasts = shared
    previous = None
    for j in range(_BLOCKS):
        attended = TaskAttention(name=f"{task}_enc_att_{j + 1}", **_ATTENTION)(
            firsts[j], lasts[j], previous=previous
        )
        x = blocks[j](attended)
        previous = keras.layers.MaxPooling2D(2, name=f"{task}_enc_f_pool_{j + 1}")(x)
    return previous


def _mtan_decoder_branch(
    x: Any, shared: tuple, blocks: list[_SharedBlock], task: str
) -> Any:
    """One task's decoder attention, from its attended encoder output ``x``.

    Stage by stage (deepest first): upsample the task's features by 2, apply the
    shared ``f``, concatenate with the shared unpooled features, compute the mask
    and multiply the shared decoder stage's output.
    """
    unpooled, lasts = shared
    for k, j in enumerate(reversed(range(_BLOCKS))):
        x = keras.layers.UpSampling2D(
            2, interpolation="bilinear", name=f"{task}_dec_up_{j + 1}"
        )(x)
        x = blocks[j](x)
        x = TaskAttention(name=f"{task}_dec_att_{j + 1}", **_ATTENTION)(
            unpooled[k], lasts[k], previous=x
        )
    return x


def build_segnet_mtan(
    tasks: Sequence[Task],
    input_shape: Sequence[int | None] = (64, 64, 3),
    width: float = 0.125,
    name: str = "segnet_mtan",
) -> MultiTaskModel:
    """SegNet-MTAN: a shared SegNet with task attention in encoder and decoder.

    Each task owns one :class:`~mtl_utils.attention.TaskAttention` module per
    encoder block and per decoder stage (1x1 conv, BN, ReLU, 1x1 conv, BN,
    sigmoid: a mask ``a`` with the shape of the shared features it gates).

    * Encoder block ``j``: the mask is computed from the block's first conv
      output ``u_j`` concatenated with the task's previous features (``u_1``
      alone for the first block) and multiplies the block's last conv output
      ``p_j``; the attended ``a_j * p_j`` passes through ``f_j`` (3x3 conv + BN +
      ReLU to the next block's channels) and 2x2 max pooling.
    * Decoder stage ``j`` (deepest first): the task's features are upsampled by
      2 (bilinear), pass through the decoder's ``f_j`` (conv + BN + ReLU to the
      stage's output channels), are concatenated with the stage's unpooled input
      and give the mask that multiplies the stage's output.
    * The task's prediction layer reads its last attended decoder features.

    The ``f`` blocks are shared by all tasks, as in the paper's code; only the
    attention modules and prediction layers are per task.

    Parameters
    ----------
    tasks:
        :class:`~mtl_utils.tasks.Task` objects with distinct names.
    input_shape:
        ``(H, W, C)``, ``H, W`` known multiples of 32.
    width:
        Channel multiplier. At ``width=1.0`` with NYUv2's three tasks the model
        has 44,229,073 trainable parameters, 1.77 times a single-task SegNet
        (the paper's "#P").
    name:
        Model name.

    Returns
    -------
    MultiTaskModel
        Output ``{task.name: prediction}``; ``representation`` is the output
        of the shared encoder's last convolution ``(B, H/16, W/16, C_5)``
        (before pooling), which every task's branch reads (the branches also
        read other shared features).

    References
    ----------
    Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019, section 3 and figure 2; table 3 ("MTAN").
    """
    tasks = _check_tasks(tasks)
    width = _check_width(width)
    shape = _check_sized_input(input_shape, "SegNet-MTAN")
    channels = _channels(width)
    init = "glorot_normal"
    inputs = keras.Input(shape=shape, name="image")
    firsts, lasts, pooled, indices = _segnet_encoder(inputs, channels, init)
    encoded = pooled[-1]
    nxt = channels[1:] + channels[-1:]
    enc_f = [_SharedBlock(nxt[j], f"enc_f{j + 1}") for j in range(_BLOCKS)]
    outputs = {}
    dense = any(t.dense for t in tasks)
    if dense:
        unpooled, _, dec_lasts = _segnet_decoder(encoded, indices, channels, init)
        dec_f = [
            _SharedBlock(channels[max(j - 1, 0)], f"dec_f{j + 1}")
            for j in range(_BLOCKS)
        ]
    for t in tasks:
        x = _mtan_encoder_branch((firsts, lasts), enc_f, t.name)
        if t.dense:
            x = _mtan_decoder_branch(x, (unpooled, dec_lasts), dec_f, t.name)
        outputs[t.name] = _head(t, x, x, init)
    representation = lasts[-1]  # every branch reads it, attention included
    return MultiTaskModel(inputs, outputs, representation=representation, name=name)


# ---------------------------------------------------------------------------
# cross-stitch
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="mtl_utils")
class CrossStitch(keras.layers.Layer):
    """A cross-stitch unit: learnt linear combinations of ``T`` task features.

    With ``kind="matrix"`` (Misra et al. 2016) task ``i`` receives
    ``sum_k alpha[i, k] * x_k`` from a learnt ``(T, T)`` matrix initialised to
    ``self_weight`` on the diagonal and ``(1 - self_weight) / (T - 1)`` off it.
    With ``kind="shared"`` (the MTAN paper's code) there is one learnt vector
    ``alpha`` of ``T`` weights, initialised to ones, and every task receives the
    same ``sum_k alpha[k] * x_k``.

    Parameters
    ----------
    kind:
        ``"matrix"`` or ``"shared"``.
    self_weight:
        Initial diagonal of the matrix (Misra et al. use 0.9 with two tasks).

    Call arguments
    --------------
    inputs:
        List of ``T`` tensors of equal shape (``T >= 2``).

    Returns
    -------
    List of ``T`` tensors of that shape.

    References
    ----------
    Misra, Shrivastava, Gupta and Hebert, "Cross-Stitch Networks for Multi-Task
    Learning", CVPR 2016, section 3.

    Examples
    --------
    >>> import numpy as np
    >>> a, b = np.ones((1, 2, 2, 3), "float32"), np.zeros((1, 2, 2, 3), "float32")
    >>> [float(o[0, 0, 0, 0]) for o in CrossStitch()([a, b])]
    [0.9, 0.1]
    """

    def __init__(self, kind: str = "matrix", self_weight: float = 0.9, **kwargs):
        if kind not in CROSS_STITCH_KINDS:
            raise ValueError(f"kind={kind!r}; expected one of {CROSS_STITCH_KINDS}")
        super().__init__(**kwargs)
        self.kind = kind
        self.self_weight = float(self_weight)

    def build(self, input_shape: Sequence[tuple]) -> None:
        shapes = [tuple(s) for s in input_shape]
        if len(shapes) < 2 or any(s[1:] != shapes[0][1:] for s in shapes):
            raise ValueError(
                f"CrossStitch received shapes {shapes}; expected a list of two or "
                "more tensors of the same shape"
            )
        n = len(shapes)
        if self.kind == "matrix":
            off = (1.0 - self.self_weight) / (n - 1)
            init = off + (self.self_weight - off) * ops.eye(n)
            shape = (n, n)
        else:
            init, shape = ops.ones((n,)), (n,)
        self.alpha = self.add_weight(
            name="alpha",
            shape=shape,
            initializer=lambda shape, dtype=None: ops.cast(init, dtype),
        )
        self._count = n

    def call(self, inputs: Sequence[Any]) -> list:
        inputs = list(inputs)
        if len(inputs) != self._count:
            raise ValueError(
                f"CrossStitch was built for {self._count} tasks; received "
                f"{len(inputs)} tensors"
            )
        stacked = ops.stack(inputs, axis=0)  # (T, B, ...)
        alpha = ops.cast(self.alpha, stacked.dtype)
        if self.kind == "shared":
            mixed = ops.tensordot(alpha, stacked, axes=1)
            return [mixed] * self._count
        mixed = ops.tensordot(alpha, stacked, axes=1)  # (T, B, ...)
        return [mixed[i] for i in range(self._count)]

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "kind": self.kind,
            "self_weight": self.self_weight,
        }


def build_cross_stitch(
    tasks: Sequence[Task],
    input_shape: Sequence[int | None] = (64, 64, 3),
    width: float = 0.125,
    kind: str = "matrix",
    name: str = "cross_stitch",
) -> MultiTaskModel:
    """One SegNet per task, joined by cross-stitch units (soft parameter sharing).

    Each task has its own encoder and decoder (see :func:`build_segnet`) and
    prediction layer. A :class:`CrossStitch` unit mixes the tasks' features after
    every pooling (four between encoder blocks, one before the decoder) and
    after every decoder stage but the last (four): nine units. Each task unpools
    with its own encoder's indices. Classification tasks have no decoder: they
    take part in the encoder's units and read their own stride-32 features; the
    decoder's units mix the per-pixel tasks.

    Parameters
    ----------
    tasks:
        Two or more :class:`~mtl_utils.tasks.Task` objects with distinct names.
    input_shape, width:
        As for :func:`build_segnet`.
    kind:
        ``"matrix"`` (Misra et al.: a ``(T, T)`` matrix per unit, each task its
        own mix) or ``"shared"`` (the MTAN reference code: ``T`` weights per unit
        and one mix for all tasks; at ``width=1.0`` with NYUv2's tasks
        74,941,804 trainable parameters, as the reference). ``"matrix"`` has
        ``9 T (T - 1)`` more parameters.
    name:
        Model name.

    Returns
    -------
    MultiTaskModel
        Output ``{task.name: prediction}``; ``representation`` is ``None`` (no
        single tensor is shared by all tasks), so GradNorm and MGDA-UB do not
        apply.

    References
    ----------
    Misra, Shrivastava, Gupta and Hebert, "Cross-Stitch Networks for Multi-Task
    Learning", CVPR 2016; Liu, Johns and Davison, CVPR 2019, table 3.
    """
    tasks = _check_tasks(tasks)
    if len(tasks) < 2:
        raise ValueError(
            f"a cross-stitch network joins two or more tasks; received "
            f"{[t.name for t in tasks]}; use build_segnet for one task"
        )
    if kind not in CROSS_STITCH_KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {CROSS_STITCH_KINDS}")
    width = _check_width(width)
    shape = _check_input_shape(input_shape)
    channels = _channels(width)
    init = "glorot_uniform"  # the reference's cross-stitch model uses Xavier uniform
    inputs = keras.Input(shape=shape, name="image")

    def stitch(features: list, label: str) -> list:
        if len(features) < 2:
            return features
        return CrossStitch(kind, name=f"stitch_{label}")(features)

    xs, indices = [inputs] * len(tasks), [[] for _ in tasks]
    for j in range(_BLOCKS):
        pooled = []
        for i, t in enumerate(tasks):
            _, last = _encoder_block(xs[i], j, channels, f"{t.name}_", init)
            x, where = MaxPoolingWithArgmax2D(name=f"{t.name}_pool{j + 1}")(last)
            pooled.append(x)
            indices[i].append(where)
        xs = stitch(pooled, f"enc{j + 1}")
    outputs = {
        t.name: classification_head(xs[i], t)
        for i, t in enumerate(tasks)
        if not t.dense
    }
    dense = [i for i, t in enumerate(tasks) if t.dense]
    xs = [xs[i] for i in dense]
    for j in reversed(range(_BLOCKS)):
        stage = []
        for x, i in zip(xs, dense, strict=True):
            prefix = f"{tasks[i].name}_"
            x = MaxUnpooling2D(name=f"{prefix}unpool{j + 1}")(x, indices[i][j])
            stage.append(_decoder_stage(x, j, channels, prefix, init)[1])
        xs = stitch(stage, f"dec{j + 1}") if j > 0 else stage
    for x, i in zip(xs, dense, strict=True):
        outputs[tasks[i].name] = _prediction(x, tasks[i], init)
    ordered = {t.name: outputs[t.name] for t in tasks}
    return MultiTaskModel(inputs, ordered, representation=None, name=name)
