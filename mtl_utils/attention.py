"""Attention written from scratch, held equal to Keras, and attention for MTL.

The module has three layers of building blocks:

* :func:`scaled_dot_product_attention`, the pure core
  ``softmax(Q K^T / sqrt(d)) V`` on tensors with any leading batch axes
  (Vaswani et al. 2017);
* :class:`MultiHeadAttention`, a Keras layer built on that core. It keeps the
  weight layout of :class:`keras.layers.MultiHeadAttention`, so that
  :meth:`MultiHeadAttention.load_from_keras` copies a Keras layer's weights and
  both layers then compute the same function (the tests hold them equal to
  1e-5, masks and returned scores included);
* attention for multi-task learning: :class:`TaskAttention`, the task-specific
  attention module of MTAN (Liu, Johns and Davison 2019), the helper
  :func:`mtan_attention_branch` that chains it along a shared encoder, and
  :class:`TaskQueryAttentionHead`, in which each task owns learnable query tokens
  that attend over a shared CNN feature map, and :class:`CrossTaskAttention`, in
  which the tokens of every task's feature map attend to each other (InvPT-style).

Shapes use ``B`` batch, ``Tq`` query length, ``Tk`` key length, ``N`` heads,
``H, W`` feature-map height and width, ``C`` channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

__all__ = [
    "scaled_dot_product_attention",
    "MultiHeadAttention",
    "TaskAttention",
    "mtan_attention_branch",
    "TaskQueryAttentionHead",
    "CrossTaskAttention",
]

_FULLY_MASKED_ROWS = ("uniform", "zero")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _shape(x: Any) -> tuple:
    """Static shape of a tensor, array or KerasTensor as a tuple (None = unknown)."""
    return tuple(None if d is None else int(d) for d in x.shape)


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"{name} must be a positive integer; received {name}={value!r}"
        )


def _check_task_names(task_names: Sequence[str]) -> list[str]:
    task_names = list(task_names)
    if not task_names or len(set(task_names)) != len(task_names):
        raise ValueError(
            f"task_names={task_names!r}; expected a non-empty list of distinct names"
        )
    return task_names


def _compatible(a: int | None, b: int | None) -> bool:
    """True when two static sizes may be equal (an unknown size matches anything)."""
    return a is None or b is None or a == b


def _large_negative(dtype: str) -> float:
    """The value masked scores are set to (as ``keras.layers.Softmax`` does)."""
    return -3e4 if keras.backend.standardize_dtype(dtype) == "float16" else -1e9


def _check_broadcastable(mask_shape: tuple, target: tuple, what: str) -> None:
    """Raise unless ``mask_shape`` broadcasts to ``target`` (right-aligned, numpy)."""
    problem = len(mask_shape) > len(target) or any(
        m is not None and t is not None and m not in (1, t)
        for m, t in zip(mask_shape[::-1], target[::-1], strict=False)
    )
    if problem:
        raise ValueError(
            f"{what} has shape {mask_shape}; expected a shape broadcastable to the "
            f"attention scores {target} (same rank or less, each axis 1 or equal)"
        )


# ---------------------------------------------------------------------------
# the pure core
# ---------------------------------------------------------------------------


def scaled_dot_product_attention(
    query: Any,
    key: Any,
    value: Any,
    mask: Any = None,
    dropout: float = 0.0,
    training: bool | None = False,
    seed: int | keras.random.SeedGenerator | None = None,
    fully_masked_rows: str = "uniform",
) -> tuple[Any, Any]:
    r"""Scaled dot-product attention, ``softmax(Q K^T / sqrt(d) + mask) V``.

    The scores are dot products of every query with every key: one matrix
    product over the feature axis ``d``, for each leading batch index. Leading
    axes (batch, heads, ...) are batch axes and broadcast like ``ops.matmul``.

    Parameters
    ----------
    query:
        Queries, shape ``(..., Tq, d)``.
    key:
        Keys, shape ``(..., Tk, d)``.
    value:
        Values, shape ``(..., Tk, dv)``.
    mask:
        Optional mask broadcastable (numpy rules, right-aligned) to the scores
        ``(..., Tq, Tk)``; ``True``/non-zero means "query may attend to this key".
        Masked scores are replaced by a large negative number (``-1e9``; ``-3e4``
        in float16) before the softmax, as ``keras.layers.Softmax`` does.
    dropout:
        Rate of dropout applied to the attention *probabilities* (not to the
        values or outputs), only when ``training`` is true.
    training:
        Whether dropout is active.
    seed:
        Seed or ``keras.random.SeedGenerator`` for the dropout.
    fully_masked_rows:
        What a query that may attend to no key at all gets:

        * ``"uniform"`` (default): uniform weights over all keys, as
          ``keras.ops.dot_product_attention`` gives (softmax of equal values);
        * ``"zero"``: all-zero weights (its output is 0), as ``keras.layers.Softmax``
          with a mask gives (it zeroes masked positions after the softmax).

        Rows with at least one allowed key are identical in both modes.

    Returns
    -------
    output:
        Shape ``(..., Tq, dv)``.
    weights:
        Attention probabilities before dropout, shape ``(..., Tq, Tk)``.

    References
    ----------
    Vaswani et al., "Attention Is All You Need", NeurIPS 2017, eq. (1).

    Examples
    --------
    >>> import numpy as np
    >>> q = np.zeros((2, 3, 4), "float32"); kv = np.ones((2, 5, 4), "float32")
    >>> out, w = scaled_dot_product_attention(q, kv, kv)
    >>> tuple(out.shape), tuple(w.shape)
    ((2, 3, 4), (2, 3, 5))
    """
    if fully_masked_rows not in _FULLY_MASKED_ROWS:
        raise ValueError(
            f"fully_masked_rows={fully_masked_rows!r}; expected one of "
            f"{_FULLY_MASKED_ROWS}"
        )
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout={dropout!r}; expected a rate in [0, 1)")
    query = ops.convert_to_tensor(query)
    key = ops.convert_to_tensor(key, dtype=query.dtype)
    value = ops.convert_to_tensor(value, dtype=query.dtype)
    q_shape, k_shape, v_shape = _shape(query), _shape(key), _shape(value)
    if min(len(q_shape), len(k_shape), len(v_shape)) < 2:
        raise ValueError(
            f"query, key and value need at least 2 axes (..., T, d); received "
            f"query {q_shape}, key {k_shape}, value {v_shape}"
        )
    if q_shape[-1] is None or not _compatible(q_shape[-1], k_shape[-1]):
        raise ValueError(
            f"query and key must have the same known feature size d: received "
            f"query {q_shape} and key {k_shape}; expected (..., Tq, d) and (..., Tk, d)"
        )
    if not _compatible(k_shape[-2], v_shape[-2]):
        raise ValueError(
            f"key and value must have the same length Tk: received key {k_shape} "
            f"and value {v_shape}; expected (..., Tk, d) and (..., Tk, dv)"
        )

    scale = 1.0 / math.sqrt(q_shape[-1])
    # (..., Tq, d) @ (..., d, Tk) -> (..., Tq, Tk): every query against every key.
    scores = ops.matmul(query, ops.swapaxes(key, -1, -2)) * ops.cast(scale, query.dtype)
    if mask is not None:
        mask = ops.convert_to_tensor(mask)
        if keras.backend.standardize_dtype(mask.dtype) != "bool":
            mask = ops.not_equal(mask, 0)
        _check_broadcastable(_shape(mask), _shape(scores), "mask")
        scores = ops.where(mask, scores, _large_negative(scores.dtype))
    # The softmax runs in at least float32 (mixed precision), as Keras does.
    if keras.backend.standardize_dtype(scores.dtype) in ("float16", "bfloat16"):
        weights = ops.cast(
            ops.softmax(ops.cast(scores, "float32"), axis=-1), query.dtype
        )
    else:
        weights = ops.softmax(scores, axis=-1)
    if mask is not None and fully_masked_rows == "zero":
        weights = ops.where(mask, weights, ops.zeros_like(weights))
    dropped = weights
    if dropout > 0.0 and training:
        dropped = keras.random.dropout(weights, rate=dropout, seed=seed)
    return ops.matmul(dropped, value), weights


# ---------------------------------------------------------------------------
# multi-head attention
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="mtl_utils")
class MultiHeadAttention(keras.layers.Layer):
    """Multi-head attention written from scratch, equal to Keras' layer.

    ``num_heads`` heads each project queries and keys into their own learned
    ``key_dim``-dimensional subspace (and values into ``value_dim``), attend
    with :func:`scaled_dot_product_attention`, and the heads' outputs are merged
    back (concatenated) and mapped by an output projection:

    1. project: ``q = query @ Wq + bq`` with ``Wq`` of shape ``(d_q, N, key_dim)``,
       giving ``(B, Tq, N, key_dim)``; likewise ``k`` and ``v``;
    2. move the head axis before the position axis, ``(B, N, Tq, key_dim)``, so
       that the score matmul compares positions with positions inside each head
       (without it, ``matmul(q, k^T)`` on ``(B, Tq, N, d)`` compares heads with
       heads);
    3. attend per head: ``(B, N, Tq, value_dim)``;
    4. move heads back and merge: ``(B, Tq, N * value_dim)``;
    5. output projection with ``Wo`` of shape ``(N, value_dim, d_out)``.

    The weights have the shapes, names and order of
    :class:`keras.layers.MultiHeadAttention`'s (query, key, value, output; each
    kernel then bias), so ``layer.set_weights(keras_layer.get_weights())`` and
    :meth:`load_from_keras` both work.

    Parameters
    ----------
    num_heads:
        Number of heads ``N``.
    key_dim:
        Size of each head's query and key projection.
    value_dim:
        Size of each head's value projection; defaults to ``key_dim``.
    dropout:
        Dropout rate on the attention probabilities (as in Keras), in training.
    use_bias:
        Whether the four projections have biases.
    output_shape:
        Shape of each output position (int or tuple); defaults to the query's
        feature size.
    kernel_initializer, bias_initializer:
        Initialisers of the projection kernels and biases.
    seed:
        Seed of the dropout.

    Call arguments
    --------------
    query:
        ``(B, Tq, d_q)``.
    value:
        ``(B, Tk, d_v)``.
    key:
        ``(B, Tk, d_k)``; defaults to ``value``.
    attention_mask:
        Boolean (or 0/1) mask, ``True`` = attend, of shape ``(B, Tq, Tk)`` or one
        Keras broadcasts to it: ``(Tq, Tk)``, ``(B, Tq, Tk)`` or
        ``(B, N, Tq, Tk)``, each axis 1 or equal. A rank-2 or rank-3 mask gets a
        head axis inserted before ``Tq`` (not at the front).
    return_attention_scores:
        Also return the attention probabilities ``(B, N, Tq, Tk)``.
    training:
        Whether dropout is active.

    Notes
    -----
    A query row whose mask is all ``False`` has no key to attend to. Keras 3
    (checked with 3.15, TensorFlow backend) gives it *uniform* weights when it
    takes its fused path (``dropout == 0`` and ``return_attention_scores=False``:
    ``keras.ops.dot_product_attention``) and *zero* weights (output = output
    bias) otherwise (``keras.layers.Softmax`` zeroes masked positions). This
    layer reproduces both cases, so it stays a drop-in replacement. Implicit
    masks (``Embedding(mask_zero=True)``) are merged into the attention mask as
    Keras does: padded queries and padded keys are masked. ``attention_axes``,
    ``use_causal_mask``, gates and sliding windows are not supported.

    References
    ----------
    Vaswani et al., "Attention Is All You Need", NeurIPS 2017, section 3.2.2.

    Examples
    --------
    >>> import numpy as np, keras
    >>> x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype("float32")
    >>> ref = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8)
    >>> _ = ref(x, x)
    >>> mine = MultiHeadAttention.from_keras(ref)
    >>> bool(np.allclose(mine(x, x), ref(x, x), atol=1e-5))
    True
    """

    def __init__(
        self,
        num_heads: int,
        key_dim: int,
        value_dim: int | None = None,
        dropout: float = 0.0,
        use_bias: bool = True,
        output_shape: int | Sequence[int] | None = None,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        _check_positive_int(num_heads, "num_heads")
        _check_positive_int(key_dim, "key_dim")
        if value_dim is not None:
            _check_positive_int(value_dim, "value_dim")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout={dropout!r}; expected a rate in [0, 1)")
        if output_shape is not None:
            if isinstance(output_shape, int):
                output_shape = (output_shape,)
            output_shape = tuple(output_shape)
            for size in output_shape:
                _check_positive_int(size, "every entry of output_shape")
        super().__init__(**kwargs)
        self.supports_masking = True  # the output keeps the query's implicit mask
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = value_dim if value_dim is not None else key_dim
        self.dropout = float(dropout)
        self.use_bias = use_bias
        self._output_shape = output_shape
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.seed = seed
        self._seed_generator = (
            keras.random.SeedGenerator(seed) if self.dropout > 0.0 else None
        )

    # -- weights -----------------------------------------------------------

    def build(
        self, query_shape: tuple, value_shape: tuple, key_shape: tuple | None = None
    ) -> None:
        key_shape = value_shape if key_shape is None else key_shape
        query_shape, value_shape, key_shape = (
            tuple(query_shape),
            tuple(value_shape),
            tuple(key_shape),
        )
        self._check_shapes(query_shape, value_shape, key_shape)
        for name, shape in (
            ("query", query_shape),
            ("key", key_shape),
            ("value", value_shape),
        ):
            if shape[-1] is None:
                raise ValueError(
                    f"{name} has shape {shape}; its feature size (last axis) must be "
                    "known to build the projection"
                )
        n = self.num_heads
        out_shape = self._output_shape or (query_shape[-1],)
        self.query_kernel, self.query_bias = self._projection(
            "query", (query_shape[-1], n, self.key_dim), (n, self.key_dim)
        )
        self.key_kernel, self.key_bias = self._projection(
            "key", (key_shape[-1], n, self.key_dim), (n, self.key_dim)
        )
        self.value_kernel, self.value_bias = self._projection(
            "value", (value_shape[-1], n, self.value_dim), (n, self.value_dim)
        )
        self.output_kernel, self.output_bias = self._projection(
            "attention_output", (n, self.value_dim, *out_shape), out_shape
        )
        self._feature_sizes = {
            "query": query_shape[-1],
            "key": key_shape[-1],
            "value": value_shape[-1],
        }
        self._out_shape = tuple(out_shape)

    def _projection(self, name: str, kernel_shape: tuple, bias_shape: tuple):
        # Keras clones the initialiser per sublayer; so do we (same distribution).
        kernel_init = self.kernel_initializer.__class__.from_config(
            self.kernel_initializer.get_config()
        )
        kernel = self.add_weight(
            name=f"{name}_kernel", shape=kernel_shape, initializer=kernel_init
        )
        bias = None
        if self.use_bias:
            bias = self.add_weight(
                name=f"{name}_bias", shape=bias_shape, initializer=self.bias_initializer
            )
        return kernel, bias

    @classmethod
    def from_keras(
        cls, keras_mha: keras.layers.MultiHeadAttention
    ) -> MultiHeadAttention:
        """A new layer with ``keras_mha``'s configuration and a copy of its weights."""
        if not isinstance(keras_mha, keras.layers.MultiHeadAttention):
            raise ValueError(
                f"expected a keras.layers.MultiHeadAttention; received "
                f"{type(keras_mha).__name__}"
            )
        layer = cls(
            num_heads=keras_mha.num_heads,
            key_dim=keras_mha.key_dim,
            value_dim=keras_mha.value_dim,
            dropout=keras_mha.dropout,
            use_bias=keras_mha.use_bias,
            output_shape=getattr(keras_mha, "_output_shape", None),
        )
        return layer.load_from_keras(keras_mha)

    def load_from_keras(
        self, keras_mha: keras.layers.MultiHeadAttention
    ) -> MultiHeadAttention:
        """Copy the weights of a built ``keras.layers.MultiHeadAttention``.

        Afterwards ``self(q, v, k, mask)`` equals ``keras_mha(q, v, k, mask)``.
        Builds this layer from the Keras kernels' shapes when it is not built.

        Raises
        ------
        ValueError
            If the Keras layer is not built, uses features this layer lacks
            (gates, custom attention axes, sliding windows) or its configuration
            or weight shapes differ from this layer's.

        Returns
        -------
        self
        """
        if not isinstance(keras_mha, keras.layers.MultiHeadAttention):
            raise ValueError(
                f"expected a keras.layers.MultiHeadAttention; received "
                f"{type(keras_mha).__name__}"
            )
        if not keras_mha.built:
            raise ValueError(
                "the Keras MultiHeadAttention layer is not built; call it once on "
                "inputs of shape (B, Tq, d_q) and (B, Tk, d_v) first"
            )
        if getattr(keras_mha, "_use_gate", False) or getattr(
            keras_mha, "_sliding_window", None
        ):
            raise ValueError(
                "Keras layers with use_gate or sliding_window are not supported"
            )
        if tuple(keras_mha.attention_axes or ()) not in ((), (1,)):
            raise ValueError(
                f"Keras layer has attention_axes={keras_mha.attention_axes}; only "
                "attention over axis 1 of (B, T, d) inputs is supported"
            )
        ours = (self.num_heads, self.key_dim, self.value_dim, self.use_bias)
        theirs = (
            keras_mha.num_heads,
            keras_mha.key_dim,
            keras_mha.value_dim,
            keras_mha.use_bias,
        )
        if ours != theirs:
            raise ValueError(
                "configuration differs: (num_heads, key_dim, value_dim, use_bias) is "
                f"{ours} here and {theirs} in the Keras layer"
            )
        dense = (
            keras_mha.query_dense,
            keras_mha.key_dense,
            keras_mha.value_dense,
            keras_mha.output_dense,
        )
        kernels = [tuple(d.kernel.shape) for d in dense]
        if len(kernels[0]) != 3:
            raise ValueError(
                f"Keras query kernel has shape {kernels[0]}; expected (d_q, N, key_dim)"
                " (a layer built on (B, T, d) inputs)"
            )
        if not self.built:
            self.build(
                (None, None, kernels[0][0]),
                (None, None, kernels[2][0]),
                (None, None, kernels[1][0]),
            )
        targets = [
            self.query_kernel,
            self.key_kernel,
            self.value_kernel,
            self.output_kernel,
        ]
        for layer_dense, target in zip(dense, targets, strict=True):
            if tuple(layer_dense.kernel.shape) != tuple(target.shape):
                raise ValueError(
                    f"weight {target.path}: Keras kernel {layer_dense.name} has shape "
                    f"{tuple(layer_dense.kernel.shape)}; expected {tuple(target.shape)}"
                )
        weights = []
        for layer_dense in dense:
            weights.append(layer_dense.kernel.numpy())
            if self.use_bias:
                weights.append(layer_dense.bias.numpy())
        self.set_weights(weights)
        return self

    # -- checks ------------------------------------------------------------

    def _check_shapes(
        self, query_shape: tuple, value_shape: tuple, key_shape: tuple
    ) -> None:
        for name, shape in (
            ("query", query_shape),
            ("value", value_shape),
            ("key", key_shape),
        ):
            if len(shape) != 3:
                raise ValueError(
                    f"{name} has shape {shape}; expected rank 3 (B, T, features)"
                )
        if not _compatible(key_shape[1], value_shape[1]):
            raise ValueError(
                f"key and value must have the same length Tk: received key shape "
                f"{key_shape} and value shape {value_shape}; expected (B, Tk, d_k) "
                "and (B, Tk, d_v)"
            )
        batch = [s[0] for s in (query_shape, value_shape, key_shape)]
        known = {b for b in batch if b is not None}
        if len(known) > 1:
            raise ValueError(
                f"query {query_shape}, value {value_shape} and key {key_shape} must "
                "have the same batch size B"
            )
        if self.built:
            for name, shape in (
                ("query", query_shape),
                ("value", value_shape),
                ("key", key_shape),
            ):
                expected = self._feature_sizes[name]
                if not _compatible(shape[-1], expected):
                    raise ValueError(
                        f"{name} has {shape[-1]} features (shape {shape}); this "
                        f"layer was built for {name} of shape (B, T, {expected})"
                    )

    def _prepare_mask(self, attention_mask: Any, scores_shape: tuple) -> Any:
        """Cast to bool and insert the head axis as Keras does: (B, 1, Tq, Tk)."""
        mask = ops.convert_to_tensor(attention_mask)
        shape = _shape(mask)
        b, _, tq, tk = scores_shape
        expected = (
            f"expected (B, Tq, Tk) = ({b}, {tq}, {tk}) or a shape Keras broadcasts to "
            "it: (Tq, Tk), (B, Tq, Tk) or (B, num_heads, Tq, Tk), each axis 1 or equal"
        )
        if len(shape) not in (2, 3, 4):
            raise ValueError(f"attention_mask has shape {shape}; {expected}")
        if keras.backend.standardize_dtype(mask.dtype) != "bool":
            mask = ops.cast(mask, "bool")  # non-zero = attend, like Keras' cast
        while len(_shape(mask)) < 4:
            mask = ops.expand_dims(mask, axis=-3)  # the head axis, before Tq
        full = _shape(mask)
        if any(
            m is not None and t is not None and m not in (1, t)
            for m, t in zip(full, scores_shape, strict=True)
        ):
            hint = ""
            if len(shape) == 2:
                hint = (
                    "; a rank-2 mask is read as (Tq, Tk) -- for a key padding mask "
                    "of shape (B, Tk) pass mask[:, None, :]"
                )
            raise ValueError(f"attention_mask has shape {shape}; {expected}{hint}")
        return mask

    # -- forward -----------------------------------------------------------

    def _split_heads(self, x: Any, kernel: Any, bias: Any) -> Any:
        """(B, T, d) -> (B, N, T, head_dim): project, then move heads before T."""
        x = ops.einsum("btd,dnh->btnh", x, kernel)
        if bias is not None:
            x = x + bias
        return ops.transpose(x, (0, 2, 1, 3))

    def call(
        self,
        query: Any,
        value: Any,
        key: Any = None,
        attention_mask: Any = None,
        return_attention_scores: bool = False,
        training: bool | None = None,
        query_mask: Any = None,
        value_mask: Any = None,
        key_mask: Any = None,
    ):
        # Keras fills query_mask/value_mask/key_mask from the inputs' implicit
        # masks (e.g. Embedding(mask_zero=True)); like keras.layers.MultiHeadAttention
        # they are merged into the attention mask: (B, Tq, 1) & (B, 1, Tk).
        key_given = key is not None and key is not value
        if key is None:
            key = value
        self._check_shapes(_shape(query), _shape(value), _shape(key))
        implicit = []
        if query_mask is not None:
            implicit.append(ops.expand_dims(ops.cast(query_mask, "bool"), -1))
        if value_mask is not None:
            implicit.append(ops.expand_dims(ops.cast(value_mask, "bool"), -2))
        if key_mask is not None and key_given:
            implicit.append(ops.expand_dims(ops.cast(key_mask, "bool"), -2))
        if implicit:
            if attention_mask is not None:
                implicit.append(ops.cast(attention_mask, "bool"))
            attention_mask = implicit[0]
            for extra in implicit[1:]:
                attention_mask = ops.logical_and(attention_mask, extra)
        q = self._split_heads(query, self.query_kernel, self.query_bias)  # (B,N,Tq,k)
        k = self._split_heads(key, self.key_kernel, self.key_bias)  # (B,N,Tk,k)
        v = self._split_heads(value, self.value_kernel, self.value_bias)  # (B,N,Tk,v)
        mask = None
        if attention_mask is not None:
            scores_shape = (
                _shape(query)[0],
                self.num_heads,
                _shape(query)[1],
                _shape(key)[1],
            )
            mask = self._prepare_mask(attention_mask, scores_shape)
        # Keras' fused path (no dropout, no returned scores) gives fully masked
        # rows uniform weights; its Softmax-layer path gives them zeros.
        fused = self.dropout == 0.0 and not return_attention_scores
        out, weights = scaled_dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            dropout=self.dropout,
            training=training,
            seed=self._seed_generator,
            fully_masked_rows="uniform" if fused else "zero",
        )
        # (B, N, Tq, v) -> (B, Tq, N, v) -> merge heads: (B, Tq, N * v).
        out = ops.transpose(out, (0, 2, 1, 3))
        tq = ops.shape(out)[1]
        merged = ops.reshape(out, (-1, tq, self.num_heads * self.value_dim))
        kernel = ops.reshape(self.output_kernel, (self.num_heads * self.value_dim, -1))
        output = ops.matmul(merged, kernel)
        if len(self._out_shape) > 1:
            output = ops.reshape(output, (-1, tq, *self._out_shape))
        if self.output_bias is not None:
            output = output + self.output_bias
        if return_attention_scores:
            return output, weights
        return output

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "value_dim": self.value_dim,
                "dropout": self.dropout,
                "use_bias": self.use_bias,
                "output_shape": self._output_shape,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "seed": self.seed,
            }
        )
        return config


# ---------------------------------------------------------------------------
# MTAN task attention
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="mtl_utils")
class TaskAttention(keras.layers.Layer):
    """The task-specific attention module of MTAN (Liu, Johns and Davison 2019).

    For shared encoder block ``j`` MTAN uses two shared tensors: ``u_j``, the
    output of the block's *first* convolution (``shared_features``), and
    ``p_j``, the output of the block's *last* convolution (``shared_output``).
    The task learns a soft mask

    ``a_j = sigmoid(BN(conv1x1(ReLU(BN(conv1x1([u_j, f(a_hat_{j-1})]))))))``

    from the concatenation of ``u_j`` and the previous attended features
    ``f(a_hat_{j-1})`` (``previous``; absent for the first block), and returns the
    attended features ``a_hat_j = a_j * p_j`` (element-wise). ``f`` (a 3x3
    convolution and the pooling that brings the previous block's features to
    this block's size) is outside this layer; see :func:`mtan_attention_branch`.

    Parameters
    ----------
    hidden_channels:
        Channels of the first 1x1 convolution; defaults to the channels of
        ``shared_output`` (as in MTAN).
    use_bias:
        Whether the 1x1 convolutions have biases.
    momentum, epsilon:
        Batch-normalisation settings.
    kernel_initializer:
        Initialiser of the 1x1 convolutions.

    Call arguments
    --------------
    shared_features:
        ``u_j``, shape ``(B, H, W, C_u)``.
    shared_output:
        ``p_j``, shape ``(B, H, W, C)``; the mask has this shape.
    previous:
        ``f(a_hat_{j-1})``, shape ``(B, H, W, C_prev)``, or ``None`` (first block).
    return_mask:
        Also return the mask ``a_j`` (for visualisation).
    training:
        Batch-normalisation mode.

    Returns
    -------
    ``a_hat_j`` of shape ``(B, H, W, C)``, or ``(a_hat_j, a_j)`` with
    ``return_mask=True``; every mask entry lies in (0, 1).

    References
    ----------
    Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019, section 3.2 and eq. (1).

    Examples
    --------
    >>> import numpy as np
    >>> u = np.ones((2, 8, 8, 16), "float32"); p = np.ones((2, 8, 8, 16), "float32")
    >>> out, mask = TaskAttention()(u, p, return_mask=True)
    >>> tuple(out.shape), tuple(mask.shape)
    ((2, 8, 8, 16), (2, 8, 8, 16))
    """

    def __init__(
        self,
        hidden_channels: int | None = None,
        use_bias: bool = True,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        kernel_initializer: Any = "he_normal",
        **kwargs: Any,
    ) -> None:
        if hidden_channels is not None:
            _check_positive_int(hidden_channels, "hidden_channels")
        super().__init__(**kwargs)
        self.hidden_channels = hidden_channels
        self.use_bias = use_bias
        self.momentum = momentum
        self.epsilon = epsilon
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    @staticmethod
    def _check(
        shared_features: tuple, shared_output: tuple, previous: tuple | None
    ) -> None:
        named = [("shared_features", shared_features), ("shared_output", shared_output)]
        if previous is not None:
            named.append(("previous", previous))
        for name, shape in named:
            if len(shape) != 4:
                raise ValueError(f"{name} has shape {shape}; expected (B, H, W, C)")
        for name, shape in named[1:]:
            for axis, label in ((0, "B"), (1, "H"), (2, "W")):
                if not _compatible(shape[axis], shared_features[axis]):
                    raise ValueError(
                        f"{name} has shape {shape} and shared_features has shape "
                        f"{shared_features}; expected the same {label} (same B, H, W)"
                    )

    def build(
        self,
        shared_features_shape: tuple,
        shared_output_shape: tuple,
        previous_shape: tuple | None = None,
    ) -> None:
        u, p = tuple(shared_features_shape), tuple(shared_output_shape)
        prev = None if previous_shape is None else tuple(previous_shape)
        self._check(u, p, prev)
        channels = [u[-1], p[-1]] + ([] if prev is None else [prev[-1]])
        if any(c is None for c in channels):
            raise ValueError("the channel axis of every input must be known")
        c_out = p[-1]
        hidden = self.hidden_channels or c_out
        self._in_channels = (u[-1], None if prev is None else prev[-1])
        self._out_channels = c_out
        c_in = u[-1] + (0 if prev is None else prev[-1])
        common = {
            "use_bias": self.use_bias,
            "kernel_initializer": self.kernel_initializer,
        }
        self.conv1 = keras.layers.Conv2D(hidden, 1, name="conv1", **common)
        self.bn1 = keras.layers.BatchNormalization(
            momentum=self.momentum, epsilon=self.epsilon, name="bn1"
        )
        self.conv2 = keras.layers.Conv2D(c_out, 1, name="conv2", **common)
        self.bn2 = keras.layers.BatchNormalization(
            momentum=self.momentum, epsilon=self.epsilon, name="bn2"
        )
        in_shape = (*u[:-1], c_in)
        self.conv1.build(in_shape)
        self.bn1.build((*u[:-1], hidden))
        self.conv2.build((*u[:-1], hidden))
        self.bn2.build((*u[:-1], c_out))

    def call(
        self,
        shared_features: Any,
        shared_output: Any,
        previous: Any = None,
        return_mask: bool = False,
        training: bool | None = None,
    ):
        u, p = _shape(shared_features), _shape(shared_output)
        prev = None if previous is None else _shape(previous)
        self._check(u, p, prev)
        got = (u[-1], None if prev is None else prev[-1])
        if got != self._in_channels or p[-1] != self._out_channels:
            raise ValueError(
                "TaskAttention was built for shared_features with "
                f"{self._in_channels[0]} channels, previous with "
                f"{self._in_channels[1]} channels (None = no previous) and "
                f"shared_output with {self._out_channels}; received {got[0]}, "
                f"{got[1]} and {p[-1]}"
            )
        x = shared_features
        if previous is not None:
            x = ops.concatenate([shared_features, previous], axis=-1)
        h = ops.relu(self.bn1(self.conv1(x), training=training))
        mask = ops.sigmoid(self.bn2(self.conv2(h), training=training))
        attended = mask * shared_output
        if return_mask:
            return attended, mask
        return attended

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "hidden_channels": self.hidden_channels,
                "use_bias": self.use_bias,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config


def mtan_attention_branch(
    shared_blocks: Sequence[tuple[Any, Any]],
    name: str,
    return_masks: bool = False,
):
    """Chain :class:`TaskAttention` modules along a shared encoder for one task.

    Functional-API helper. For block ``j`` it applies a :class:`TaskAttention`
    to ``(u_j, p_j)`` and the previous attended features; between blocks it
    applies MTAN's ``f``: a 3x3 convolution to block ``j+1``'s channels, batch
    normalisation, ReLU and max pooling by the ratio of the two blocks' heights
    (no pooling when they are equal).

    Parameters
    ----------
    shared_blocks:
        Per encoder block ``(u_j, p_j)``: the KerasTensor output of the block's
        first convolution ``(B, H_j, W_j, C_j)`` and of its last convolution
        (before pooling) ``(B, H_j, W_j, C_j)``. Spatial sizes must be known.
    name:
        Prefix of the created layers' names (e.g. the task name).
    return_masks:
        Also return the list of masks ``a_j``.

    Returns
    -------
    The last block's attended features ``a_hat_J`` ``(B, H_J, W_J, C_J)``, and the
    masks when ``return_masks`` is true.

    References
    ----------
    Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019, figure 2.
    """
    if len(shared_blocks) == 0:
        raise ValueError("shared_blocks is empty; expected one (u_j, p_j) per block")
    previous, masks, attended = None, [], None
    for j, (u, p) in enumerate(shared_blocks):
        attended, mask = TaskAttention(name=f"{name}_attention_{j}")(
            u, p, previous=previous, return_mask=True
        )
        masks.append(mask)
        if j + 1 == len(shared_blocks):
            break
        next_u = _shape(shared_blocks[j + 1][0])
        here = _shape(p)
        if None in (here[1], next_u[1], next_u[-1]) or here[1] % next_u[1]:
            raise ValueError(
                f"block {j} has shape {here} and block {j + 1} has shape {next_u}; "
                "expected known sizes with H_j a multiple of H_(j+1)"
            )
        x = keras.layers.Conv2D(
            next_u[-1], 3, padding="same", use_bias=False, name=f"{name}_f_{j}_conv"
        )(attended)
        x = keras.layers.BatchNormalization(name=f"{name}_f_{j}_bn")(x)
        x = keras.layers.ReLU(name=f"{name}_f_{j}_relu")(x)
        factor = here[1] // next_u[1]
        if factor > 1:
            x = keras.layers.MaxPooling2D(factor, name=f"{name}_f_{j}_pool")(x)
        previous = x
    if return_masks:
        return attended, masks
    return attended


# ---------------------------------------------------------------------------
# task queries over a shared feature map
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="mtl_utils")
class TaskQueryAttentionHead(keras.layers.Layer):
    """Per-task learnable queries attending over a shared CNN feature map.

    The shared feature map ``(B, H, W, C)`` is flattened into ``H * W`` tokens.
    Each task owns ``num_queries`` learnable query vectors of size ``C``; all
    tasks' queries attend over the tokens through one :class:`MultiHeadAttention`
    (shared projections, task-specific queries, one batched call), in the
    spirit of DETR's learned object queries. A task's output tokens feed its
    prediction head (e.g. a ``Dense`` for counting); its attention maps
    ``(B, N, num_queries, H, W)`` show where on the image the task looks.
    The tokens carry no position encoding: the queries select by content.

    Parameters
    ----------
    task_names:
        Names of the tasks (keys of the output dicts).
    num_queries:
        Query tokens per task.
    num_heads, key_dim, value_dim, dropout:
        Passed to :class:`MultiHeadAttention` (``self.attention``).
    output_dim:
        Size of each output token; defaults to ``C``.

    Call arguments
    --------------
    features:
        Shared features, ``(B, H, W, C)``.
    return_attention_scores:
        Also return ``{task: (B, N, num_queries, H, W)}`` attention maps.
    training:
        Whether dropout is active.

    Returns
    -------
    ``{task: (B, num_queries, output_dim)}``, and the attention maps when asked.

    References
    ----------
    Vaswani et al. 2017 (attention); Carion et al., "End-to-End Object Detection
    with Transformers", ECCV 2020 (learned queries).

    Examples
    --------
    >>> import numpy as np
    >>> head = TaskQueryAttentionHead(["count", "depth"], num_queries=2, key_dim=8)
    >>> out = head(np.zeros((3, 4, 5, 16), "float32"))
    >>> {t: tuple(o.shape) for t, o in out.items()}
    {'count': (3, 2, 16), 'depth': (3, 2, 16)}
    """

    def __init__(
        self,
        task_names: Sequence[str],
        num_queries: int = 1,
        num_heads: int = 4,
        key_dim: int = 16,
        value_dim: int | None = None,
        output_dim: int | None = None,
        dropout: float = 0.0,
        query_initializer: Any = None,
        **kwargs: Any,
    ) -> None:
        task_names = _check_task_names(task_names)
        _check_positive_int(num_queries, "num_queries")
        if output_dim is not None:
            _check_positive_int(output_dim, "output_dim")
        super().__init__(**kwargs)
        self.task_names = task_names
        self.num_queries = num_queries
        self.output_dim = output_dim
        self.query_initializer = keras.initializers.get(
            query_initializer or keras.initializers.RandomNormal(stddev=0.02)
        )
        self.attention = MultiHeadAttention(
            num_heads=num_heads,
            key_dim=key_dim,
            value_dim=value_dim,
            dropout=dropout,
            output_shape=output_dim,
            name="attention",
        )

    def build(self, features_shape: tuple) -> None:
        shape = tuple(features_shape)
        if len(shape) != 4 or shape[-1] is None:
            raise ValueError(
                f"features have shape {shape}; expected (B, H, W, C) with known C"
            )
        channels = shape[-1]
        self.queries = self.add_weight(
            name="queries",
            shape=(len(self.task_names), self.num_queries, channels),
            initializer=self.query_initializer,
        )
        total = len(self.task_names) * self.num_queries
        self.attention.build((None, total, channels), (None, None, channels))
        self._channels = channels

    def call(
        self,
        features: Any,
        return_attention_scores: bool = False,
        training: bool | None = None,
    ):
        shape = _shape(features)
        if len(shape) != 4 or not _compatible(shape[-1], self._channels):
            raise ValueError(
                f"features have shape {shape}; expected (B, H, W, {self._channels})"
            )
        dynamic = ops.shape(features)
        batch, height, width = dynamic[0], dynamic[1], dynamic[2]
        tokens = ops.reshape(features, (batch, -1, self._channels))  # (B, H*W, C)
        total = len(self.task_names) * self.num_queries
        queries = ops.reshape(self.queries, (1, total, self._channels))
        queries = ops.broadcast_to(queries, (batch, total, self._channels))
        out, scores = self.attention(
            queries, tokens, return_attention_scores=True, training=training
        )
        q = self.num_queries
        outputs = {
            name: out[:, i * q : (i + 1) * q] for i, name in enumerate(self.task_names)
        }
        if not return_attention_scores:
            return outputs
        n = self.attention.num_heads
        maps = {
            name: ops.reshape(
                scores[:, :, i * q : (i + 1) * q], (batch, n, q, height, width)
            )
            for i, name in enumerate(self.task_names)
        }
        return outputs, maps

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "task_names": self.task_names,
                "num_queries": self.num_queries,
                "num_heads": self.attention.num_heads,
                "key_dim": self.attention.key_dim,
                "value_dim": self.attention.value_dim,
                "output_dim": self.output_dim,
                "dropout": self.attention.dropout,
                "query_initializer": keras.initializers.serialize(
                    self.query_initializer
                ),
            }
        )
        return config


class CrossTaskAttention(keras.layers.Layer):
    """Joint attention across tasks and positions over per-task feature maps.

    Every task's feature map ``(B, H, W, C)`` is flattened into ``H * W`` tokens,
    a learned task embedding (one vector of size ``C`` per task) is added so that
    a token says which task it comes from, and all ``T * H * W`` tokens attend to
    each other through one :class:`MultiHeadAttention`: a depth token can take
    evidence from the segmentation tokens anywhere in the image, and the reverse.
    The attended tokens are added to their inputs (residual) and normalised
    (``LayerNormalization``), then split back into one map per task. This is the
    joint task-and-space attention of InvPT (Ye and Xu 2022) in one layer; PAD-Net
    (Xu et al. 2018) and MTI-Net (Vandenhende et al. 2020) distil across tasks with
    per-position gates and convolutions instead. The tokens carry no position
    encoding. Cost: the score matrix has ``(T H W)^2`` entries.

    Parameters
    ----------
    task_names:
        Names of the tasks (keys of the input and output dicts), in token order.
    num_heads, key_dim, dropout:
        Passed to :class:`MultiHeadAttention` (``self.attention``).
    embedding_initializer:
        Initialiser of the task embeddings ``(T, C)``.

    Call arguments
    --------------
    features:
        ``{task: (B, H, W, C)}``, the same ``H, W, C`` for every task.
    return_attention_scores:
        Also return the scores ``(B, N, T * H * W, T * H * W)``; query and key
        tokens are ordered task by task, position by position (row-major).
    training:
        Whether dropout is active.

    Returns
    -------
    ``{task: (B, H, W, C)}``, and the scores when asked.

    References
    ----------
    Ye and Xu, "Inverted Pyramid Multi-task Transformer for Dense Scene
    Understanding", ECCV 2022; Xu et al., "PAD-Net", CVPR 2018; Vandenhende et
    al., "MTI-Net", ECCV 2020.

    Examples
    --------
    >>> import numpy as np
    >>> layer = CrossTaskAttention(["seg", "depth"], num_heads=2, key_dim=4)
    >>> x = np.zeros((3, 4, 5, 8), "float32")
    >>> out = layer({"seg": x, "depth": x})
    >>> {t: tuple(o.shape) for t, o in out.items()}
    {'seg': (3, 4, 5, 8), 'depth': (3, 4, 5, 8)}
    """

    def __init__(
        self,
        task_names: Sequence[str],
        num_heads: int = 2,
        key_dim: int = 16,
        dropout: float = 0.0,
        embedding_initializer: Any = None,
        **kwargs: Any,
    ) -> None:
        self.task_names = _check_task_names(task_names)
        super().__init__(**kwargs)
        self.embedding_initializer = keras.initializers.get(
            embedding_initializer or keras.initializers.RandomNormal(stddev=0.02)
        )
        self.attention = MultiHeadAttention(
            num_heads=num_heads, key_dim=key_dim, dropout=dropout, name="attention"
        )
        self.norm = keras.layers.LayerNormalization(epsilon=1e-6, name="norm")

    def _map_shape(self, shapes: Any) -> tuple:
        """The one (H, W, C) of all tasks' maps, or a ValueError naming them."""
        if not isinstance(shapes, dict) or sorted(shapes) != sorted(self.task_names):
            got = sorted(shapes) if isinstance(shapes, dict) else type(shapes).__name__
            raise ValueError(
                f"features {got}; expected a dict with one (B, H, W, C) map per "
                f"task {self.task_names}"
            )
        found = {t: tuple(shapes[t]) for t in self.task_names}
        first = found[self.task_names[0]]
        if (
            any(len(s) != 4 for s in found.values())
            or len({s[1:] for s in found.values()}) != 1
            or None in first[1:]
        ):
            raise ValueError(
                f"feature maps have shapes {found}; expected (B, H, W, C) with the "
                "same known H, W and C for every task"
            )
        return first[1:]

    def build(self, features_shape: dict) -> None:
        height, width, channels = self._map_shape(features_shape)
        self.task_embedding = self.add_weight(
            name="task_embedding",
            shape=(len(self.task_names), channels),
            initializer=self.embedding_initializer,
        )
        tokens = (None, len(self.task_names) * height * width, channels)
        self.attention.build(tokens, tokens)
        self.norm.build(tokens)
        self._map = (height, width, channels)

    def call(
        self,
        features: dict,
        return_attention_scores: bool = False,
        training: bool | None = None,
    ):
        shape = self._map_shape({t: _shape(x) for t, x in features.items()})
        if shape != self._map:
            raise ValueError(
                f"feature maps of size {shape}; this layer was built for {self._map}"
            )
        height, width, channels = self._map
        batch = ops.shape(features[self.task_names[0]])[0]
        tokens = ops.concatenate(
            [
                ops.reshape(features[t], (batch, height * width, channels))
                + self.task_embedding[i]
                for i, t in enumerate(self.task_names)
            ],
            axis=1,
        )  # (B, T*H*W, C)
        attended, scores = self.attention(
            tokens, tokens, return_attention_scores=True, training=training
        )
        out = self.norm(tokens + attended)
        n = height * width
        outputs = {
            t: ops.reshape(
                out[:, i * n : (i + 1) * n], (batch, height, width, channels)
            )
            for i, t in enumerate(self.task_names)
        }
        if return_attention_scores:
            return outputs, scores
        return outputs

    def compute_output_shape(self, features_shape: dict) -> dict:
        return {t: tuple(features_shape[t]) for t in self.task_names}

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "task_names": self.task_names,
                "num_heads": self.attention.num_heads,
                "key_dim": self.attention.key_dim,
                "dropout": self.attention.dropout,
                "embedding_initializer": keras.initializers.serialize(
                    self.embedding_initializer
                ),
            }
        )
        return config
