"""Two-dimensional toy problems from the gradient-combination papers.

Each landscape maps parameters ``theta`` of shape ``(..., 2)`` to the two task
losses ``(..., 2)``; :func:`optimize_toy` runs Keras' Adam on ``theta`` with an
update direction built from the per-task gradients (the rows of a ``(2, 2)``
matrix ``G``), e.g. the plain sum, :func:`mtl_utils.weighting.pcgrad`,
:func:`mtl_utils.weighting.cagrad` or the MGDA combination.

* :func:`pcgrad_landscape` -- Yu et al. 2020 (PCGrad), Figure 1 / appendix:
  a valley with a steep and a flat side where the summed gradient stalls;
  start :data:`PCGRAD_START`.
* :func:`cagrad_landscape` -- Liu et al. 2021 (CAGrad), Figure 1, reused by Navon
  et al. 2022 (Nash-MTL): two objectives whose Pareto set is (close to) the
  segment ``x1`` in ``[-7, 7]`` at ``x2 ~ -8.36``; starts :data:`CAGRAD_STARTS`.

Both are written from the formulas in the papers/appendices; they use the
natural logarithm (the PCGrad appendix writes ``log``; a base-10 version only
rescales the losses, which leaves Adam's and PCGrad's paths unchanged).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from keras import ops

from mtl_utils import weighting

__all__ = [
    "CAGRAD_STARTS",
    "PCGRAD_START",
    "cagrad_landscape",
    "direction",
    "non_dominated",
    "optimize_toy",
    "pcgrad_landscape",
    "toy_gradients",
]

#: Start point of the PCGrad toy (Yu et al. 2020, appendix).
PCGRAD_START = (0.5, -3.0)
#: Start points of the CAGrad toy (Liu et al. 2021, Figure 1).
CAGRAD_STARTS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))

_LOWER = 0.000005


def pcgrad_landscape(theta):
    """The two losses of PCGrad's toy problem (Yu et al. 2020).

    ``L1 = 20 log(max(|0.5 t1 + tanh(t2)|, 5e-6))`` and
    ``L2 = 25 log(max(|0.5 t1 - tanh(t2) + 2|, 5e-6))``.

    Parameters
    ----------
    theta:
        ``(..., 2)`` points.

    Returns
    -------
    ``(..., 2)`` losses ``(L1, L2)``.
    """
    theta = ops.convert_to_tensor(theta)
    t1, t2 = theta[..., 0], theta[..., 1]
    l1 = 20.0 * ops.log(ops.maximum(ops.abs(0.5 * t1 + ops.tanh(t2)), _LOWER))
    l2 = 25.0 * ops.log(ops.maximum(ops.abs(0.5 * t1 - ops.tanh(t2) + 2.0), _LOWER))
    return ops.stack([l1, l2], axis=-1)


def cagrad_landscape(theta):
    """The two objectives of CAGrad's toy problem (Liu et al. 2021).

    For ``x2 > 0`` (weight ``tanh(x2 / 2)``) each task is a steep logarithmic
    valley; for ``x2 < 0`` (weight ``tanh(-x2 / 2)``) a quadratic bowl centred at
    ``x1 = +7`` (task 1) or ``-7`` (task 2).

    Parameters
    ----------
    theta:
        ``(..., 2)`` points ``(x1, x2)``.

    Returns
    -------
    ``(..., 2)`` losses ``(f1, f2)``.
    """
    theta = ops.convert_to_tensor(theta)
    x1, x2 = theta[..., 0], theta[..., 1]
    f1 = ops.log(ops.maximum(ops.abs(0.5 * (-x1 - 7.0) - ops.tanh(-x2)), _LOWER)) + 6.0
    f2 = ops.log(ops.maximum(ops.abs(0.5 * (-x1 + 3.0) + ops.tanh(-x2) + 2.0), _LOWER))
    f2 = f2 + 6.0
    c1 = ops.maximum(ops.tanh(0.5 * x2), 0.0)
    c2 = ops.maximum(ops.tanh(-0.5 * x2), 0.0)
    f1_sq = ((x1 - 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
    f2_sq = ((x1 + 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
    return ops.stack([f1 * c1 + f1_sq * c2, f2 * c1 + f2_sq * c2], axis=-1)


def non_dominated(losses) -> np.ndarray:
    """Mask of the Pareto-optimal rows of a set of two-objective loss pairs.

    A point is dominated if another is no worse in both losses and better in one.
    Sorting by the first loss and keeping running minima of the second gives the
    non-dominated set in ``O(N log N)`` (of exact duplicates one is kept), e.g. to
    draw the Pareto front of :func:`cagrad_landscape` from a grid of points.

    Parameters
    ----------
    losses:
        ``(N, 2)`` loss pairs.

    Returns
    -------
    ``(N,)`` boolean mask.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[1] != 2:
        raise ValueError(f"losses has shape {losses.shape}; expected (N, 2)")
    order = np.lexsort((losses[:, 1], losses[:, 0]))
    f2 = losses[order, 1]
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], f2[:-1]]))
    keep = f2 < best_before
    mask = np.zeros(len(losses), bool)
    mask[order[keep]] = True
    return mask


def toy_gradients(landscape: Callable, theta):
    """Task losses and per-task gradients at one or several points.

    Parameters
    ----------
    landscape:
        A toy landscape ``(..., 2) -> (..., 2)``.
    theta:
        ``(2,)`` point or ``(N, 2)`` points.

    Returns
    -------
    ``(losses, G)``: losses ``(..., 2)`` and gradients ``(..., 2, 2)`` whose row
    ``i`` is the gradient of task ``i``'s loss.
    """
    import tensorflow as tf

    theta = tf.convert_to_tensor(theta, tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(theta)
        losses = landscape(theta)
        # Points are independent, so the gradient of a task's loss summed over
        # points gives every point's own gradient at once.
        l1 = tf.reduce_sum(losses[..., 0])
        l2 = tf.reduce_sum(losses[..., 1])
    G = tf.stack([tape.gradient(l1, theta), tape.gradient(l2, theta)], axis=-2)
    return losses, G


def direction(name: str, **kwargs) -> Callable:
    """A named update rule ``(G, losses) -> (2,)`` for :func:`optimize_toy`.

    ``"sum"`` (gradient of the summed loss), ``"mean"``, ``"pcgrad"``,
    ``"mgda"``, ``"cagrad"`` (``c`` keyword, default 0.5), ``"imtl"``,
    ``"nash_mtl"``, ``"aligned_mtl"``.
    """
    w = weighting
    rules = {
        "sum": lambda G, L: ops.sum(G, axis=0),
        "mean": lambda G, L: ops.mean(G, axis=0),
        "pcgrad": lambda G, L: w.pcgrad(G),
        "mgda": lambda G, L: ops.matmul(w.mgda_weights(G), G),
        "cagrad": lambda G, L: w.cagrad(G, c=kwargs.get("c", 0.5)),
        "imtl": lambda G, L: ops.matmul(w.imtl_weights(w.gram_matrix(G)), G),
        "nash_mtl": lambda G, L: ops.matmul(w.nash_mtl_weights(w.gram_matrix(G)), G),
        "aligned_mtl": lambda G, L: ops.matmul(
            w.aligned_mtl_coefficients(w.gram_matrix(G)), G
        ),
    }
    if name not in rules:
        raise ValueError(f"unknown direction {name!r}; expected one of {sorted(rules)}")
    return rules[name]


def optimize_toy(
    landscape: Callable,
    update: str | Callable,
    start,
    steps: int,
    learning_rate: float = 1e-3,
    record_every: int = 100,
    epsilon: float = 1e-8,
):
    """Run Adam on a 2-D toy with a multi-task update rule.

    Parameters
    ----------
    landscape:
        :func:`pcgrad_landscape`, :func:`cagrad_landscape` or any function
        ``(..., 2) -> (..., 2)``.
    update:
        A name for :func:`direction` or a callable ``(G, losses) -> (2,)`` where
        ``G`` is the ``(2, 2)`` matrix of per-task gradients (rows) at one point.
    start:
        ``(2,)`` start point or ``(N, 2)`` start points, optimised side by side
        (independently: Adam is element-wise).
    steps:
        Number of Adam steps (a multiple of ``record_every``).
    learning_rate, epsilon:
        Adam's step size and epsilon (``keras.optimizers.Adam``; epsilon 1e-8 as
        in the papers' PyTorch code).
    record_every:
        Record ``theta`` every this many steps.

    Returns
    -------
    ``(trajectory, losses)`` as NumPy arrays: points of shape
    ``(steps // record_every + 1, [N,] 2)`` and the task losses at them.

    Examples
    --------
    >>> traj, losses = optimize_toy(pcgrad_landscape, "pcgrad", PCGRAD_START, 200)
    >>> traj.shape, losses.shape
    ((3, 2), (3, 2))
    """
    import keras
    import tensorflow as tf

    if steps % record_every:
        raise ValueError(
            f"steps ({steps}) must be a multiple of record_every ({record_every})"
        )
    rule = direction(update) if isinstance(update, str) else update
    start = np.asarray(start, "float32")
    if start.shape[-1:] != (2,) or start.ndim > 2:
        raise ValueError(f"start has shape {start.shape}; expected (2,) or (N, 2)")
    points = start.reshape(-1, 2)
    theta = keras.Variable(points, name="theta")
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate, epsilon=epsilon)
    optimizer.build([theta])

    def step():
        losses, G = toy_gradients(landscape, theta.value)
        d = tf.stack([rule(G[n], losses[n]) for n in range(points.shape[0])])
        optimizer.apply([d], [theta])

    @tf.function(jit_compile=True)
    def run(n):
        def body(i):
            step()
            return [i + 1]

        return tf.while_loop(lambda i: i < n, body, [tf.constant(0)])

    recorded = [points.copy()]
    for _ in range(steps // record_every):
        run(tf.constant(record_every))
        recorded.append(theta.numpy().copy())
    trajectory = np.stack(recorded).reshape((-1,) + start.shape)
    return trajectory, np.asarray(landscape(trajectory))
