"""VGG encoders, task heads and the three multi-task architectures of the book.

* :func:`vgg_encoder` builds VGG-11/13/16/19 (Simonyan and Zisserman 2015) as a
  Keras model whose outputs are the features of *every* block, for decoders with
  skip connections and for MTAN's attention. At ``width=1.0`` without batch
  normalisation it has exactly the layers and weights of
  ``keras.applications.VGG16/VGG19(include_top=False)``, and
  :func:`load_keras_vgg_weights` copies a Keras VGG's weights into it (ImageNet
  weights in Colab). A ``width`` multiplier scales every block's channels for
  CPU-sized variants; ``batch_norm=True`` inserts batch normalisation after every
  convolution, as SegNet and MTAN's VGG do.
* :func:`dense_head` (segmentation logits, depth, surface normals at input
  resolution, through a light U-Net-style decoder) and
  :func:`classification_head` (global average pooling and a dense layer).
* :func:`build_multitask` (hard parameter sharing: one encoder, one head per
  task), :func:`build_single_task` (the same for one task, the baseline) and
  :func:`build_mtan` (shared encoder with per-task attention, Liu, Johns and
  Davison 2019; an encoder-attention variant: attention on the VGG encoder
  only, with per-task ``f`` convolutions and per-task U-Net decoders). Each
  returns a :class:`mtl_utils.training.MultiTaskModel` whose outputs are a dict
  keyed by task name.
* The SegNet family as the MTAN paper's code builds it, defined in
  :mod:`mtl_utils.segnet` and re-exported here: ``build_segnet``,
  ``build_segnet_split``, ``build_segnet_mtan`` (the paper's MTAN, attention in
  encoder and decoder) and ``build_cross_stitch``.

Shapes use ``B`` batch, ``H, W`` input height and width, ``C`` channels.

Examples
--------
>>> from mtl_utils.tasks import scene_tasks
>>> model = build_multitask(scene_tasks(), input_shape=(64, 64, 3), width=0.125)
>>> for name, out in model.output.items():
...     print(name, tuple(out.shape))
segmentation (None, 64, 64, 5)
depth (None, 64, 64, 1)
normal (None, 64, 64, 3)
count (None, 6)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras

from mtl_utils.attention import TaskAttention, mtan_attention_branch
from mtl_utils.tasks import Task
from mtl_utils.training import MultiTaskModel

__all__ = [
    "VGG_CONFIGS",
    "VGG_CHANNELS",
    "DECODERS",
    "vgg_encoder",
    "load_keras_vgg_weights",
    "dense_head",
    "classification_head",
    "task_head",
    "build_multitask",
    "build_single_task",
    "build_mtan",
    "mtan_mask_model",
]

#: Convolutions per block of each VGG configuration (Simonyan and Zisserman 2015,
#: table 1: A = vgg11, B = vgg13, D = vgg16, E = vgg19).
VGG_CONFIGS: dict[str, tuple[int, ...]] = {
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}
#: Output channels of the five VGG blocks at ``width=1.0``.
VGG_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
#: Decoders of :func:`dense_head`.
DECODERS = ("unet", "plain")
_NUM_BLOCKS = len(VGG_CHANNELS)
_STRIDE = 2**_NUM_BLOCKS  # the encoder pools five times by 2


# ---------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------


def _check_config(config: Any) -> tuple[int, ...]:
    if config not in VGG_CONFIGS:
        raise ValueError(
            f"unknown VGG config {config!r}; expected one of {tuple(VGG_CONFIGS)}"
        )
    return VGG_CONFIGS[config]


def _check_width(width: Any, name: str = "width") -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        raise ValueError(
            f"{name} must be a number > 0 (1.0 = the paper's channels, 0.125 = "
            f"8, 16, 32, 64, 64 channels); received {name}={width!r}"
        )
    return float(width)


def _check_input_shape(input_shape: Any) -> tuple[int | None, int | None, int]:
    try:
        shape = tuple(None if d is None else int(d) for d in input_shape)
    except (TypeError, ValueError):
        shape = None
    if shape is None or len(shape) != 3:
        raise ValueError(
            f"input_shape={input_shape!r}; expected (H, W, C) for one image, e.g. "
            "(64, 64, 3) or (None, None, 3)"
        )
    height, width, channels = shape
    if channels is None or channels < 1:
        raise ValueError(
            f"input_shape={input_shape!r}: the channel axis must be a known "
            "positive integer, e.g. (64, 64, 3)"
        )
    for label, size in (("height", height), ("width", width)):
        if size is not None and (size < _STRIDE or size % _STRIDE):
            raise ValueError(
                f"input_shape={input_shape!r}: {label} {size} is not a positive "
                f"multiple of {_STRIDE}; the VGG encoder pools {_NUM_BLOCKS} times "
                f"by 2, so H and W must be multiples of {_STRIDE} (e.g. 64) or None"
            )
    return shape


def _check_tasks(tasks: Any) -> list[Task]:
    if isinstance(tasks, Task):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks is empty; expected at least one mtl_utils.tasks.Task")
    for t in tasks:
        if not isinstance(t, Task):
            raise ValueError(
                f"tasks must be mtl_utils.tasks.Task objects; received {t!r} of "
                f"type {type(t).__name__}"
            )
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat: {names}; expected distinct names")
    return tasks


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


# ---------------------------------------------------------------------------
# encoder
# ---------------------------------------------------------------------------


def vgg_encoder(
    config: str = "vgg16",
    input_shape: Sequence[int | None] = (64, 64, 3),
    width: float = 1.0,
    batch_norm: bool = False,
    name: str | None = None,
) -> keras.Model:
    """A VGG convolutional encoder that returns the features of every block.

    Block ``j`` (1 to 5) is ``n_j`` 3x3 convolutions (``"same"`` padding, ReLU)
    with ``round(width * (64, 128, 256, 512, 512)[j-1])`` channels, then 2x2 max
    pooling. The layers are named as in ``keras.applications`` (``block1_conv1``,
    ..., ``block5_pool``).

    Parameters
    ----------
    config:
        ``"vgg11"``, ``"vgg13"``, ``"vgg16"`` or ``"vgg19"`` (convolutions per
        block in :data:`VGG_CONFIGS`).
    input_shape:
        ``(H, W, C)`` of one image; ``H`` and ``W`` multiples of 32, or ``None``
        (any size that is a multiple of 32 at call time).
    width:
        Channel multiplier (> 0). ``1.0`` is the paper's network; ``0.125`` gives
        8, 16, 32, 64, 64 channels, a CPU-sized variant.
    batch_norm:
        If true, every convolution is followed by ``BatchNormalization`` and then
        ReLU (``conv -> BN -> ReLU``, as SegNet and MTAN's VGG), and the
        convolutions have no bias (BN's offset replaces it). If false, each
        convolution applies its bias and ReLU itself, as Keras' VGG does.
    name:
        Model name; defaults to ``config``.

    Returns
    -------
    keras.Model
        Input ``(B, H, W, C)``; output a dict with, for every block ``j``:

        * ``"block{j}_first"``: output of the block's first convolution (after
          its ReLU), ``(B, H / 2**(j-1), W / 2**(j-1), C_j)``; MTAN's ``u_j``;
        * ``"block{j}_last"``: output of the block's last convolution, before
          pooling, same shape; the skip features of a decoder and MTAN's ``p_j``;
        * ``"block{j}_pool"``: the block's pooled output,
          ``(B, H / 2**j, W / 2**j, C_j)``.

        ``"block5_pool"`` is the output of
        ``keras.applications.VGG16(include_top=False)``.

    Raises
    ------
    ValueError
        For an unknown ``config``, ``width <= 0`` or an input size that is not a
        multiple of 32.

    References
    ----------
    Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale
    Image Recognition", ICLR 2015, table 1. Batch-normalised variant: Badrinarayanan
    et al., "SegNet", TPAMI 2017.

    Examples
    --------
    >>> encoder = vgg_encoder("vgg16", (64, 64, 3), width=0.125)
    >>> [encoder.output[f"block{j}_last"].shape[-1] for j in range(1, 6)]
    [8, 16, 32, 64, 64]
    >>> tuple(encoder.output["block5_pool"].shape)
    (None, 2, 2, 64)
    """
    convs_per_block = _check_config(config)
    width = _check_width(width)
    input_shape = _check_input_shape(input_shape)
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    features: dict[str, Any] = {}
    for j, (n_convs, channels) in enumerate(
        zip(convs_per_block, VGG_CHANNELS, strict=True), start=1
    ):
        filters = _scaled(channels, width)
        for i in range(1, n_convs + 1):
            if batch_norm:
                x = keras.layers.Conv2D(
                    filters, 3, padding="same", use_bias=False, name=f"block{j}_conv{i}"
                )(x)
                x = keras.layers.BatchNormalization(name=f"block{j}_bn{i}")(x)
                x = keras.layers.ReLU(name=f"block{j}_relu{i}")(x)
            else:
                x = keras.layers.Conv2D(
                    filters,
                    3,
                    padding="same",
                    activation="relu",
                    name=f"block{j}_conv{i}",
                )(x)
            if i == 1:
                features[f"block{j}_first"] = x
        features[f"block{j}_last"] = x
        x = keras.layers.MaxPooling2D(2, strides=2, name=f"block{j}_pool")(x)
        features[f"block{j}_pool"] = x
    return keras.Model(inputs, features, name=name or config)


def _conv_layers(model: keras.Model) -> dict[str, keras.layers.Conv2D]:
    """Conv2D layers of ``model`` and of the models nested in it, by name."""
    found: dict[str, keras.layers.Conv2D] = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.update(_conv_layers(layer))
        elif isinstance(layer, keras.layers.Conv2D):
            found[layer.name] = layer
    return found


def load_keras_vgg_weights(encoder: keras.Model, keras_vgg: keras.Model) -> int:
    """Copy the convolution weights of a Keras VGG into a :func:`vgg_encoder`.

    The encoder must have the Keras model's configuration, ``width=1.0`` and
    ``batch_norm=False``. Afterwards ``encoder(x)["block5_pool"]`` equals
    ``keras_vgg(x)`` (the tests hold them equal to 1e-5).

    Parameters
    ----------
    encoder:
        A model from :func:`vgg_encoder`, or a model that contains one (e.g. a
        :func:`build_multitask` model, whose encoder is the layer ``"encoder"``).
    keras_vgg:
        ``keras.applications.VGG16`` or ``VGG19`` (``include_top`` either way; the
        dense top is not copied). For ImageNet weights, where they can be
        downloaded (e.g. Colab), use
        ``keras.applications.VGG16(weights="imagenet", include_top=False)`` and
        feed images through ``keras.applications.vgg16.preprocess_input`` (BGR,
        mean-subtracted), the preprocessing those weights were trained with.

    Returns
    -------
    int
        Number of convolution layers copied.

    Raises
    ------
    ValueError
        If the two models do not have the same convolution layers with the same
        weight shapes (another config, a width multiplier, or batch norm).
    """
    ours, theirs = _conv_layers(encoder), _conv_layers(keras_vgg)
    if not ours or sorted(ours) != sorted(theirs):
        raise ValueError(
            f"the encoder has convolutions {sorted(ours)} but keras_vgg has "
            f"{sorted(theirs)}; expected the same VGG config (e.g. vgg_encoder("
            "'vgg16') with keras.applications.VGG16)"
        )
    for name, layer in ours.items():
        got = [tuple(w.shape) for w in layer.get_weights()]
        want = [tuple(w.shape) for w in theirs[name].get_weights()]
        if got != want:
            raise ValueError(
                f"layer {name!r} has weight shapes {got} but keras_vgg's has "
                f"{want}; expected an encoder built with width=1.0 and "
                "batch_norm=False"
            )
    for name, layer in ours.items():
        layer.set_weights(theirs[name].get_weights())
    return len(ours)


# ---------------------------------------------------------------------------
# heads
# ---------------------------------------------------------------------------


def _conv_bn_relu(x: Any, filters: int, batch_norm: bool, name: str) -> Any:
    x = keras.layers.Conv2D(
        filters, 3, padding="same", use_bias=not batch_norm, name=f"{name}_conv"
    )(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _require(features: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in features]
    if missing:
        raise ValueError(
            f"{what}: features lack {missing}; expected the output dict of "
            f"vgg_encoder (keys like 'block1_last', ..., 'block5_pool'), got keys "
            f"{sorted(features)}"
        )


def dense_head(
    features: Mapping[str, Any],
    task: Task,
    decoder: str = "unet",
    decoder_width: float = 0.5,
    batch_norm: bool = True,
) -> Any:
    """A per-pixel prediction head at input resolution (functional API).

    Starting from ``features["block5_pool"]`` (stride 32), each of five decoder
    stages ``j = 5, ..., 1`` upsamples by 2 (bilinear) and concatenates the skip
    features ``features[f"block{j}_last"]`` (``decoder="unet"``; U-Net style,
    Ronneberger et al. 2015) or not (``decoder="plain"``). Stages 5 to 2 then
    apply a 3x3 convolution with ``round(decoder_width * C_j)`` channels, batch
    norm and ReLU; at full resolution (stage 1) a 1x1 convolution reads the
    upsampled features and the block-1 skip and gives the task's output (no 3x3
    convolution there: at full resolution it would cost as much as a quarter of
    the head's multiply-adds and more of its time). The output is computed in
    float32 (also under mixed precision).

    Parameters
    ----------
    features:
        The encoder's output dict (see :func:`vgg_encoder`), or a dict with the
        same keys holding task-specific features (as :func:`build_mtan` passes).
    task:
        A dense :class:`~mtl_utils.tasks.Task` (segmentation, depth or normal).
    decoder:
        ``"unet"`` (skip connections from every block) or ``"plain"`` (only
        ``block5_pool``: the head depends on the encoder through that one
        tensor).
    decoder_width:
        Decoder channels relative to the encoder block of the same resolution.
    batch_norm:
        Batch normalisation after every decoder convolution.

    Returns
    -------
    KerasTensor
        ``(B, H, W, task.channels)``: segmentation logits, depth (linear, one
        channel) or unnormalised surface normals (the normal loss normalises).
        Layer names start with ``task.name``; the output layer is named
        ``task.name``.
    """
    if not isinstance(task, Task) or not task.dense:
        raise ValueError(
            f"dense_head needs a segmentation, depth or normal Task; received "
            f"{task!r}; use classification_head for classification tasks"
        )
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r}; expected one of {DECODERS}")
    decoder_width = _check_width(decoder_width, "decoder_width")
    skips = [f"block{j}_last" for j in range(_NUM_BLOCKS, 0, -1)]
    _require(features, [f"block{_NUM_BLOCKS}_pool"] + skips, f"task {task.name!r}")
    x = features[f"block{_NUM_BLOCKS}_pool"]
    for j in range(_NUM_BLOCKS, 0, -1):
        skip = features[f"block{j}_last"]
        stage = f"{task.name}_dec{j}"
        x = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"{stage}_up")(
            x
        )
        if decoder == "unet":
            x = keras.layers.Concatenate(name=f"{stage}_concat")([x, skip])
        if j > 1:
            filters = _scaled(skip.shape[-1], decoder_width)
            x = _conv_bn_relu(x, filters, batch_norm, stage)
    return keras.layers.Conv2D(task.channels, 1, dtype="float32", name=task.name)(x)


def classification_head(features: Mapping[str, Any] | Any, task: Task) -> Any:
    """Image-level logits: global average pooling and a dense layer.

    Parameters
    ----------
    features:
        The encoder's output dict (``features["block5_pool"]`` is used) or a
        feature map ``(B, h, w, C)``.
    task:
        A classification :class:`~mtl_utils.tasks.Task`.

    Returns
    -------
    KerasTensor
        Logits ``(B, task.channels)``, float32; the layer is named ``task.name``.
    """
    if not isinstance(task, Task) or task.kind != "classification":
        raise ValueError(
            f"classification_head needs a classification Task; received {task!r}; "
            "use dense_head for per-pixel tasks"
        )
    if isinstance(features, Mapping):
        _require(features, [f"block{_NUM_BLOCKS}_pool"], f"task {task.name!r}")
        features = features[f"block{_NUM_BLOCKS}_pool"]
    if len(features.shape) != 4:
        raise ValueError(
            f"task {task.name!r}: features have shape {tuple(features.shape)}; "
            "expected (B, h, w, C)"
        )
    x = keras.layers.GlobalAveragePooling2D(name=f"{task.name}_gap")(features)
    return keras.layers.Dense(task.channels, dtype="float32", name=task.name)(x)


def task_head(
    features: Mapping[str, Any],
    task: Task,
    decoder: str = "unet",
    decoder_width: float = 0.5,
    batch_norm: bool = True,
) -> Any:
    """:func:`dense_head` for per-pixel tasks, :func:`classification_head` else."""
    if task.dense:
        return dense_head(features, task, decoder, decoder_width, batch_norm)
    return classification_head(features, task)


# ---------------------------------------------------------------------------
# architectures
# ---------------------------------------------------------------------------


def build_multitask(
    tasks: Sequence[Task],
    input_shape: Sequence[int | None] = (64, 64, 3),
    config: str = "vgg16",
    width: float = 0.125,
    batch_norm: bool = True,
    decoder: str = "unet",
    decoder_width: float = 0.5,
    name: str = "hard_sharing",
) -> keras.Model:
    """Hard parameter sharing: one VGG encoder, one head per task.

    One forward pass of the encoder serves all ``T`` heads (Caruana 1997;
    Ruder 2017), which is where multi-task learning saves compute.

    Parameters
    ----------
    tasks:
        The :class:`~mtl_utils.tasks.Task` objects (distinct names).
    input_shape, config, width, batch_norm:
        Passed to :func:`vgg_encoder` (the encoder is the nested model
        ``"encoder"``).
    decoder, decoder_width:
        Passed to :func:`dense_head` for every dense task (batch norm in the
        decoder follows ``batch_norm``).
    name:
        Model name.

    Returns
    -------
    MultiTaskModel
        Input ``(B, H, W, C)``; output ``{task.name: prediction}`` with
        ``(B, H, W, channels)`` for dense tasks and ``(B, classes)`` logits for
        classification. ``representation`` is the encoder's ``block5_pool``
        ``(B, H/32, W/32, C_5)``, the shared tensor every head starts from. With
        ``decoder="unet"`` the dense heads also read skip features, so the
        heads depend on the encoder through more than this tensor; use
        ``decoder="plain"`` where a method needs that (MGDA-UB, Sener and Koltun
        2018).
    """
    tasks = _check_tasks(tasks)
    encoder = vgg_encoder(config, input_shape, width, batch_norm, name="encoder")
    inputs = keras.Input(shape=encoder.input.shape[1:], name="image")
    features = encoder(inputs)
    outputs = {
        t.name: task_head(features, t, decoder, decoder_width, batch_norm)
        for t in tasks
    }
    return MultiTaskModel(
        inputs, outputs, representation=features["block5_pool"], name=name
    )


def build_single_task(
    task: Task,
    input_shape: Sequence[int | None] = (64, 64, 3),
    config: str = "vgg16",
    width: float = 0.125,
    batch_norm: bool = True,
    decoder: str = "unet",
    decoder_width: float = 0.5,
    name: str | None = None,
) -> keras.Model:
    """The single-task baseline: :func:`build_multitask` with one task.

    Returns a model whose output is still a dict, ``{task.name: prediction}``,
    so it trains and evaluates with the same code; named ``single_<task>``
    unless ``name`` is given.
    """
    if not isinstance(task, Task):
        raise ValueError(
            f"build_single_task needs one mtl_utils.tasks.Task; received {task!r}"
        )
    return build_multitask(
        [task],
        input_shape,
        config,
        width,
        batch_norm,
        decoder,
        decoder_width,
        name=name or f"single_{task.name}",
    )


def build_mtan(
    tasks: Sequence[Task],
    input_shape: Sequence[int | None] = (64, 64, 3),
    config: str = "vgg16",
    width: float = 0.125,
    batch_norm: bool = True,
    decoder: str = "unet",
    decoder_width: float = 0.5,
    name: str = "mtan",
) -> keras.Model:
    """Multi-Task Attention Network on a shared VGG encoder.

    Each task owns a chain of :class:`~mtl_utils.attention.TaskAttention`
    modules, one per encoder block (:func:`~mtl_utils.attention.mtan_attention_branch`):
    block ``j``'s mask ``a_j`` in (0, 1), computed from the block's first
    convolution ``u_j`` and the task's previous attended features, selects from
    the block's last convolution ``p_j`` the task's features ``a_j * p_j``. The
    task's head (:func:`task_head`) then reads only those attended features:
    ``a_5 * p_5`` max-pooled as its start and ``a_j * p_j`` as its skips.

    Parameters
    ----------
    tasks, input_shape, config, width, batch_norm, decoder, decoder_width, name:
        As for :func:`build_multitask`; ``input_shape`` needs known ``H, W``.

    Returns
    -------
    MultiTaskModel
        Output ``{task.name: prediction}`` as in :func:`build_multitask`;
        ``representation`` is ``None``, since every head sees its own attended
        features. Use :func:`mtan_mask_model` for the attention masks.

    References
    ----------
    Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019 (the encoder half of MTAN; decoders here are per task). This
    encoder-attention variant is not the paper's network, which shares a SegNet
    decoder with attention in it too and shares the ``f`` blocks across tasks:
    see :func:`mtl_utils.segnet.build_segnet_mtan`.
    """
    tasks = _check_tasks(tasks)
    shape = _check_input_shape(input_shape)
    if shape[0] is None or shape[1] is None:
        raise ValueError(
            f"input_shape={input_shape!r}: MTAN needs known H and W (its attention "
            "modules pool by the ratio of block sizes), e.g. (64, 64, 3)"
        )
    encoder = vgg_encoder(config, shape, width, batch_norm, name="encoder")
    inputs = keras.Input(shape=shape, name="image")
    shared = encoder(inputs)
    blocks = [
        (shared[f"block{j}_first"], shared[f"block{j}_last"])
        for j in range(1, _NUM_BLOCKS + 1)
    ]
    outputs = {}
    for t in tasks:
        attended, masks = mtan_attention_branch(blocks, name=t.name, return_masks=True)
        own: dict[str, Any] = {}
        for j, mask in enumerate(masks[:-1], start=1):
            own[f"block{j}_last"] = keras.layers.Multiply(
                name=f"{t.name}_attended_{j}"
            )([mask, shared[f"block{j}_last"]])
        own[f"block{_NUM_BLOCKS}_last"] = attended
        own[f"block{_NUM_BLOCKS}_pool"] = keras.layers.MaxPooling2D(
            2, name=f"{t.name}_attended_pool"
        )(attended)
        outputs[t.name] = task_head(own, t, decoder, decoder_width, batch_norm)
    return MultiTaskModel(inputs, outputs, representation=None, name=name)


def mtan_mask_model(model: keras.Model) -> keras.Model:
    """A model returning the attention masks of a :func:`build_mtan` model.

    It shares the layers (and weights) of ``model``.

    Parameters
    ----------
    model:
        A model built by :func:`build_mtan`.

    Returns
    -------
    keras.Model
        Input as ``model``; output ``{task: [a_1, ..., a_5]}`` with mask ``a_j``
        of shape ``(B, H / 2**(j-1), W / 2**(j-1), C_j)``, entries in (0, 1).
    """
    masks: dict[str, list[Any]] = {}
    for layer in model.layers:
        if isinstance(layer, TaskAttention):
            task, _, j = layer.name.rpartition("_attention_")
            masks.setdefault(task, []).append((int(j), layer.output[1]))
    if not masks:
        raise ValueError(
            f"model {model.name!r} has no TaskAttention layers; expected a model "
            "built by build_mtan"
        )
    ordered = {
        t: [m for _, m in sorted(ms, key=lambda p: p[0])] for t, ms in masks.items()
    }
    return keras.Model(model.input, ordered, name=f"{model.name}_masks")


# The SegNet family lives in mtl_utils.segnet (which builds on this module);
# it is re-exported here, imported on first use to avoid a circular import.
_SEGNET_BUILDERS = (
    "build_segnet",
    "build_segnet_split",
    "build_segnet_mtan",
    "build_cross_stitch",
)


def __getattr__(name: str) -> Any:
    if name in _SEGNET_BUILDERS:
        from mtl_utils import segnet

        return getattr(segnet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
