"""Max pooling that remembers where each maximum was, and the unpooling that uses it.

SegNet (Badrinarayanan, Kendall and Cipolla 2017) upsamples in its decoder by
putting every value back where the encoder's max pooling found its maximum, and
zeros elsewhere: no weights are learnt for the upsampling, and boundaries stay
sharp. Keras has no layer for either half, so this module provides both:

* :class:`MaxPoolingWithArgmax2D` returns the pooled map *and* the flat position
  ``row * W + col`` of every maximum in its ``(H, W)`` input plane (the indices of
  PyTorch's ``max_pool2d(..., return_indices=True)``);
* :class:`MaxUnpooling2D` scatters values back to those positions
  (PyTorch's ``max_unpool2d``).

Pooling windows do not overlap (``strides = pool_size``). When ``H`` or ``W`` is
not a multiple of the pool size the last rows or columns are dropped, as in
``"valid"`` pooling; unpooling with ``output_size=(H, W)`` restores the original
size, with zeros there. Within a window that holds the maximum more than once,
the first one in row-major order wins (as in PyTorch and ``numpy.argmax``), and
the pooling's gradient goes to that position only.

Shapes use ``B`` batch, ``H, W`` input height and width, ``C`` channels and
``p`` the pool size.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

__all__ = ["MaxPoolingWithArgmax2D", "MaxUnpooling2D"]


def _check_pool_size(pool_size: Any) -> int:
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
        raise ValueError(
            f"pool_size must be an integer >= 1 (windows of pool_size x pool_size, "
            f"stride pool_size); received pool_size={pool_size!r}"
        )
    return pool_size


def _check_rank4(x: Any, name: str) -> None:
    if len(x.shape) != 4:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (B, H, W, C)")


@keras.saving.register_keras_serializable(package="mtl_utils")
class MaxPoolingWithArgmax2D(keras.layers.Layer):
    """``p x p`` max pooling with stride ``p`` that also returns argmax indices.

    Parameters
    ----------
    pool_size:
        Window side ``p`` (and stride); SegNet uses 2.

    Call arguments
    --------------
    inputs:
        ``(B, H, W, C)``.

    Returns
    -------
    ``(pooled, indices)``, both ``(B, H // p, W // p, C)``. ``indices`` (int32)
    holds, for every output, the flat position ``row * W + col`` of its maximum
    in the input plane of its sample and channel.

    References
    ----------
    Badrinarayanan, Kendall and Cipolla, "SegNet: A Deep Convolutional
    Encoder-Decoder Architecture for Image Segmentation", TPAMI 2017, section 3.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[1, 5, 2], [3, 4, 9], [7, 0, 8]], "float32")[None, :, :, None]
    >>> pooled, indices = MaxPoolingWithArgmax2D()(x)
    >>> float(pooled[0, 0, 0, 0]), int(indices[0, 0, 0, 0])
    (5.0, 1)
    """

    def __init__(self, pool_size: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool_size = _check_pool_size(pool_size)

    def call(self, inputs: Any):
        _check_rank4(inputs, "inputs")
        p = self.pool_size
        _, height, width, channels = ops.shape(inputs)
        rows, cols = height // p, width // p
        x = inputs[:, : rows * p, : cols * p, :]
        x = ops.reshape(x, (-1, rows, p, cols, p, channels))
        x = ops.transpose(x, (0, 1, 3, 5, 2, 4))  # (B, h, w, C, p, p)
        windows = ops.reshape(x, (-1, rows, cols, channels, p * p))
        local = ops.argmax(windows, axis=-1)  # first maximum, row-major
        pooled = ops.take_along_axis(windows, local[..., None], axis=-1)[..., 0]
        local = ops.cast(local, "int32")
        row = ops.reshape(ops.arange(rows, dtype="int32") * p, (1, -1, 1, 1))
        col = ops.reshape(ops.arange(cols, dtype="int32") * p, (1, 1, -1, 1))
        indices = (row + local // p) * ops.cast(width, "int32") + col + local % p
        return pooled, indices

    def get_config(self) -> dict:
        return {**super().get_config(), "pool_size": self.pool_size}


@keras.saving.register_keras_serializable(package="mtl_utils")
class MaxUnpooling2D(keras.layers.Layer):
    """Put values back at the positions a :class:`MaxPoolingWithArgmax2D` recorded.

    Every input value goes to the position its index names in a zero map of
    ``output_size``; nothing else is written. ``unpool(*pool(x))`` therefore keeps
    each window's maximum in place and zeros the rest.

    Parameters
    ----------
    pool_size:
        The pooling's ``p``.

    Call arguments
    --------------
    inputs:
        ``(B, h, w, C)`` values (e.g. decoder features at the pooled size).
    indices:
        ``(B, h, w, C)`` integer indices from the pooling.
    output_size:
        ``(H, W)`` of the pooling's input; default ``(h * p, w * p)``. Give it when
        the pooled map had an odd size, or the indices are read with the wrong
        row length.

    Returns
    -------
    ``(B, H, W, C)``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[1, 5, 2], [3, 4, 9], [7, 0, 8]], "float32")[None, :, :, None]
    >>> pooled, indices = MaxPoolingWithArgmax2D()(x)
    >>> MaxUnpooling2D()(pooled, indices, output_size=(3, 3))[0, :, :, 0].numpy()
    array([[0., 5., 0.],
           [0., 0., 0.],
           [0., 0., 0.]], dtype=float32)
    """

    def __init__(self, pool_size: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool_size = _check_pool_size(pool_size)

    def _sizes(self, shape: tuple, output_size: Any) -> tuple[Any, Any]:
        p = self.pool_size
        if output_size is None:
            return shape[1] * p, shape[2] * p
        try:
            height, width = (int(s) for s in output_size)
        except (TypeError, ValueError):
            raise ValueError(
                f"output_size={output_size!r}; expected (H, W), two integers"
            ) from None
        for label, size, pooled in (("H", height, shape[1]), ("W", width, shape[2])):
            if isinstance(pooled, int) and not pooled * p <= size < (pooled + 1) * p:
                raise ValueError(
                    f"output_size {label}={size} cannot have been pooled to "
                    f"{pooled} by pool_size {p}; expected {pooled * p} to "
                    f"{pooled * p + p - 1}"
                )
        return height, width

    def call(self, inputs: Any, indices: Any, output_size: Any = None):
        _check_rank4(inputs, "inputs")
        _check_rank4(indices, "indices")
        static, dynamic = tuple(inputs.shape), ops.shape(inputs)
        if tuple(indices.shape)[1:] != static[1:]:
            raise ValueError(
                f"indices have shape {tuple(indices.shape)} and inputs "
                f"{static}; expected the same shape"
            )
        p = self.pool_size
        height, width = self._sizes(dynamic, output_size)
        _, rows, cols, channels = dynamic
        indices = ops.cast(indices, "int32")
        local = (indices // width % p) * p + indices % width % p
        spread = ops.one_hot(local, p * p, dtype=inputs.dtype) * inputs[..., None]
        x = ops.reshape(spread, (-1, rows, cols, channels, p, p))
        x = ops.transpose(x, (0, 1, 4, 2, 5, 3))  # (B, h, p, w, p, C)
        x = ops.reshape(x, (-1, rows * p, cols * p, channels))
        pad = [[0, 0], [0, height - rows * p], [0, width - cols * p], [0, 0]]
        return ops.pad(x, pad)

    def get_config(self) -> dict:
        return {**super().get_config(), "pool_size": self.pool_size}
