"""Cost accounting: parameters, multiply-adds per image and measured latency.

FLOPs are counted analytically, from each layer's configuration and its input
and output shapes, by walking the model's functional graph with one image
(batch size 1). Nested models are walked recursively; a custom layer that holds
counted sublayers (e.g. :class:`mtl_utils.attention.TaskAttention`) is traced
symbolically into a small functional graph and walked too.

Counted: the multiply-adds (MACs) of ``Dense``, ``Conv1D/2D/3D`` (with groups),
``Conv1D/2D/3DTranspose``, ``DepthwiseConv1D/2D`` and ``SeparableConv1D/2D``.
Not counted: biases, batch normalisation, activations, pooling, resizing,
element-wise operations, ``EinsumDense`` and attention matmuls; in a CNN the
convolutions dominate. :func:`flops_per_image` reports ``FLOPs = 2 * MACs`` (one
multiply and one add per MAC). Many papers' "FLOPs" are MACs: VGG-16's
"15.5 GFLOPs" at 224x224 are 15.5 G multiply-adds, 31 GFLOPs in this convention.

TensorFlow's (v1) profiler, ``tf.compat.v1.profiler.profile`` with
``float_operation()`` on a frozen graph, counts the same 2 x MACs for ``Conv2D``
and ``MatMul`` ops (plus bias adds), but only for the TensorFlow backend and only
on a frozen graph; the analytic count works for any backend and breaks the cost
down by layer (:func:`macs_by_layer`). The tests hold the two equal.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
from keras import tree

__all__ = [
    "count_params",
    "macs_by_layer",
    "macs_per_image",
    "flops_per_image",
    "training_step_macs",
    "exact_gradient_cost_ratio",
    "measure_latency",
]

_KerasTensor = keras.KerasTensor


def count_params(
    model: keras.Model | keras.layers.Layer, trainable_only: bool = False
) -> int:
    """Number of scalar parameters of a built model or layer.

    Every variable counts once, also when a layer is shared by several models or
    called several times. Non-trainable variables (batch-norm moving mean and
    variance) count unless ``trainable_only``; this equals
    ``model.count_params()``.
    """
    if not model.built:
        raise ValueError(
            f"{model.name!r} is not built; call it on data or build it with an "
            "input shape before counting its parameters"
        )
    weights = model.trainable_weights if trainable_only else model.weights
    return int(sum(math.prod(w.shape) for w in weights))


# ---------------------------------------------------------------------------
# multiply-adds
# ---------------------------------------------------------------------------

_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_CONV_T = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_COUNTED = (keras.layers.Dense, *_CONV, *_CONV_T, *_DEPTHWISE, *_SEPARABLE)


def _spatial_and_channels(shape: tuple, data_format: str) -> tuple[int, int]:
    """(number of spatial positions, channels) of one sample's shape."""
    dims = tuple(shape[1:])
    if data_format == "channels_first":
        channels, spatial = dims[0], dims[1:]
    else:
        channels, spatial = dims[-1], dims[:-1]
    return math.prod(spatial), channels


def _layer_macs(layer: keras.layers.Layer, in_shape: tuple, out_shape: tuple) -> int:
    """Multiply-adds of one call of a counted layer on one sample."""
    if any(d is None for d in (*in_shape[1:], *out_shape[1:])):
        raise ValueError(
            f"layer {layer.name!r} has input shape {in_shape} and output shape "
            f"{out_shape}; the sizes must be known to count its multiply-adds: "
            "pass input_shape=(H, W, C) or build the model with a fixed size"
        )
    if isinstance(layer, keras.layers.Dense):
        return math.prod(in_shape[1:]) * layer.units
    fmt = layer.data_format
    kernel = math.prod(layer.kernel_size)
    n_in, c_in = _spatial_and_channels(in_shape, fmt)
    n_out, c_out = _spatial_and_channels(out_shape, fmt)
    if isinstance(layer, _SEPARABLE):
        depthwise = n_out * c_in * layer.depth_multiplier * kernel
        return depthwise + n_out * c_in * layer.depth_multiplier * c_out
    if isinstance(layer, _DEPTHWISE):
        return n_out * c_out * kernel
    if isinstance(layer, _CONV_T):
        # every input element is multiplied by every kernel tap of every filter
        return n_in * c_in * kernel * c_out
    return n_out * c_out * kernel * (c_in // getattr(layer, "groups", 1))


def _is_functional(op: Any) -> bool:
    return hasattr(op, "_run_through_graph") and hasattr(op, "_nodes_by_depth")


def _sublayers(op: Any) -> list:
    flatten = getattr(op, "_flatten_layers", None)
    return list(flatten(include_self=False)) if flatten else []


def _trace_graph(model: Any, inputs: Any, prefix: str, record: dict) -> Any:
    def operation_fn(op):
        def run(*args, **kwargs):
            return _trace_op(op, args, kwargs, prefix, record)

        return run

    return model._run_through_graph(inputs, operation_fn=operation_fn)


def _trace_model(model: Any, inputs: Any, prefix: str, record: dict) -> Any:
    """Walk a functional or Sequential model's layers on input specs."""
    if _is_functional(model):
        return _trace_graph(model, inputs, prefix, record)
    x = inputs
    for layer in model.layers:
        x = _trace_op(layer, (x,), {}, prefix, record)
    return x


def _trace_op(op: Any, args: tuple, kwargs: dict, prefix: str, record: dict) -> Any:
    """Output spec of ``op(*args, **kwargs)``; adds its MACs to ``record``."""
    path = prefix + getattr(op, "name", type(op).__name__)
    if _is_functional(op) or isinstance(op, keras.Sequential):
        return _trace_model(op, args[0], path + "/", record)
    if isinstance(op, _COUNTED):
        out = op.compute_output_spec(*args, **kwargs)
        macs = _layer_macs(op, tuple(args[0].shape), tuple(out.shape))
        record[path] = record.get(path, 0) + macs
        return out
    if any(isinstance(s, _COUNTED) for s in _sublayers(op)):
        return _trace_custom_layer(op, args, kwargs, path + "/", record)
    return op.compute_output_spec(*args, **kwargs)


def _trace_custom_layer(
    op: Any, args: tuple, kwargs: dict, prefix: str, record: dict
) -> Any:
    """Trace a subclassed layer's ``call`` into a functional graph and walk it."""
    specs = [x for x in tree.flatten((args, kwargs)) if isinstance(x, _KerasTensor)]
    fresh = {id(s): keras.Input(batch_shape=s.shape, dtype=s.dtype) for s in specs}

    def swap(x):
        return fresh[id(x)] if isinstance(x, _KerasTensor) else x

    new_args, new_kwargs = tree.map_structure(swap, (list(args), kwargs))
    outputs = op.call(*new_args, **new_kwargs)
    graph = keras.Model([fresh[id(s)] for s in specs], outputs)
    return _trace_graph(graph, specs, prefix, record)


def _input_specs(model: keras.Model, input_shape: Any) -> list:
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            f"model {model.name!r} has no symbolic inputs; expected a functional "
            "or Sequential model built with keras.Input"
        )
    if input_shape is None:
        shapes = [tuple(x.shape[1:]) for x in inputs]
    elif len(inputs) == 1 and all(d is None or isinstance(d, int) for d in input_shape):
        shapes = [tuple(input_shape)]
    else:
        shapes = [tuple(s) for s in input_shape]
    if len(shapes) != len(inputs):
        raise ValueError(
            f"input_shape gives {len(shapes)} shapes but model {model.name!r} has "
            f"{len(inputs)} inputs"
        )
    specs = []
    for x, shape in zip(inputs, shapes, strict=True):
        if len(shape) != len(x.shape) - 1 or any(d is None for d in shape):
            raise ValueError(
                f"input {x.name!r} of model {model.name!r} has shape {tuple(x.shape)}"
                f"; counting needs the known shape of one sample: pass "
                f"input_shape with {len(x.shape) - 1} known sizes, e.g. (64, 64, 3)"
            )
        specs.append(_KerasTensor((1, *shape), dtype=x.dtype))
    return specs


def macs_by_layer(
    model: keras.Model, input_shape: Sequence[int] | None = None
) -> dict[str, int]:
    """Multiply-adds per image of each counted layer, by layer path.

    Parameters
    ----------
    model:
        A functional or Sequential Keras model (nested models and custom layers
        with Dense/convolution sublayers are walked).
    input_shape:
        Shape of one sample without the batch axis, e.g. ``(64, 64, 3)``; needed
        when the model's input has unknown sizes. A list of shapes for a model
        with several inputs.

    Returns
    -------
    dict
        ``"encoder/block1_conv1" -> MACs`` (paths joined by ``/``); a layer
        called several times appears once with the sum of its calls.

    Examples
    --------
    >>> conv = keras.layers.Conv2D(4, 3, name="conv")
    >>> m = keras.Sequential([keras.Input((8, 8, 3)), conv])
    >>> macs_by_layer(m)  # 6 x 6 outputs x 4 filters x (3 x 3 x 3) taps
    {'conv': 3888}
    """
    record: dict[str, int] = {}
    specs = _input_specs(model, input_shape)
    if not (_is_functional(model) or isinstance(model, keras.Sequential)):
        raise ValueError(
            f"model {model.name!r} is a {type(model).__name__}; expected a "
            "functional or Sequential keras.Model"
        )
    _trace_model(model, specs if len(specs) > 1 else specs[0], "", record)
    return record


def macs_per_image(model: keras.Model, input_shape: Sequence[int] | None = None) -> int:
    """Total multiply-adds of one image's forward pass (see :func:`macs_by_layer`)."""
    return int(sum(macs_by_layer(model, input_shape).values()))


def flops_per_image(
    model: keras.Model, input_shape: Sequence[int] | None = None
) -> int:
    """Floating-point operations of one image's forward pass, ``2 * MACs``.

    Counts the Dense and convolution layers (see the module docstring);
    ``flops_per_image(m) == 2 * macs_per_image(m)``.
    """
    return 2 * macs_per_image(model, input_shape)


def training_step_macs(
    model: keras.Model,
    input_shape: Sequence[int] | None = None,
    shared: str = "encoder",
) -> dict[str, dict[str, int]]:
    """Multiply-adds per image of one training step, shared part and heads.

    A backward pass does twice its forward pass's multiply-adds (gradients with
    respect to each layer's input and to its weights), except in the first
    counted layer of the shared part, which reads the image: its input gradient
    is never computed.

    Parameters
    ----------
    model:
        A multi-task model whose shared part is the nested model (or layer-path
        prefix) ``shared``, as in :func:`mtl_utils.models.build_multitask`.
    input_shape:
        See :func:`macs_by_layer`.
    shared:
        Path prefix of the shared layers in :func:`macs_by_layer`'s keys.

    Returns
    -------
    dict
        ``{"shared": {"forward": .., "backward": ..}, "heads": {..}}``.
    """
    macs = macs_by_layer(model, input_shape)
    prefix = shared.rstrip("/") + "/"
    shared_macs = [v for k, v in macs.items() if k.startswith(prefix)]
    if not shared_macs:
        raise ValueError(
            f"no counted layer's path starts with {prefix!r}; the model's counted "
            f"layers are {list(macs)}"
        )
    first = shared_macs[0]
    forward = sum(shared_macs)
    heads = sum(macs.values()) - forward
    return {
        "shared": {"forward": forward, "backward": 2 * forward - first},
        "heads": {"forward": heads, "backward": 2 * heads},
    }


def exact_gradient_cost_ratio(step: dict, num_tasks: int) -> float:
    """Multiply-adds of a step with exact per-task gradients over equal weighting's.

    Exact per-task-gradient methods (PCGrad, MGDA, CAGrad, ...) back-propagate
    each task through the shared part separately: ``num_tasks - 1`` shared
    backward passes more than one step on the summed loss. ``step`` is
    :func:`training_step_macs`'s result.
    """
    if int(num_tasks) < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    equal = sum(sum(part.values()) for part in step.values())
    extra = (int(num_tasks) - 1) * step["shared"]["backward"]
    return (equal + extra) / equal


# ---------------------------------------------------------------------------
# latency
# ---------------------------------------------------------------------------


def _as_callable(model: Any) -> Callable[[Any], Any]:
    if isinstance(model, keras.Model):
        return model.predict_on_batch
    if callable(model):
        return model
    raise ValueError(
        f"expected a keras.Model, a callable or a sequence of them; received "
        f"{type(model).__name__}"
    )


def _wait(outputs: Any) -> None:
    """Block until every output is computed (copies to host memory)."""
    for leaf in tree.flatten(outputs):
        keras.ops.convert_to_numpy(leaf)


def measure_latency(
    model_or_fn: Any, batch: Any, repeats: int = 20, warmup: int = 3
) -> float:
    """Median wall time (seconds) of inference on one batch.

    Parameters
    ----------
    model_or_fn:
        A ``keras.Model`` (run with ``predict_on_batch``, Keras' compiled
        inference), a callable ``fn(batch)``, or a sequence of them run one after
        another in each repeat (e.g. ``T`` single-task models).
    batch:
        The input batch, e.g. an array ``(B, H, W, C)``; converted to a backend
        tensor once, outside the timing.
    repeats:
        Timed repeats; the median is returned.
    warmup:
        Untimed calls first (tracing, compilation, caches).

    Returns
    -------
    float
        Median seconds per repeat, outputs computed to host memory included.

    Examples
    --------
    >>> import time
    >>> measure_latency(lambda x: time.sleep(0.01), None, repeats=3) >= 0.01
    True
    """
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; received {value!r}")
    if isinstance(model_or_fn, Sequence) and not isinstance(model_or_fn, str):
        if not model_or_fn:
            raise ValueError("model_or_fn is an empty sequence; expected models")
        fns = [_as_callable(m) for m in model_or_fn]
    else:
        fns = [_as_callable(model_or_fn)]
    if batch is not None:
        batch = tree.map_structure(keras.ops.convert_to_tensor, batch)

    def once() -> None:
        for fn in fns:
            _wait(fn(batch))

    for _ in range(warmup):
        once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
