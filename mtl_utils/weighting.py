"""Task-balancing strategies: loss weighting and gradient combination.

Two layers, as everywhere in ``mtl_utils``:

* **Pure cores**: the maths of each method as a function on tensors, either a
  vector of task losses ``(T,)`` or a matrix of flattened per-task gradients
  ``G`` of shape ``(T, P)`` (row ``i`` is the gradient of task ``i``'s loss with
  respect to the ``P`` shared parameters), or its Gram matrix ``G G^T`` of shape
  ``(T, T)``. Every gradient method here needs only the Gram matrix to decide
  how to combine the rows, so each has a ``*_coefficients``/``*_weights`` form
  on the Gram matrix and the update is ``alpha @ G``.
  :func:`pcgrad`, :func:`mgda_weights`, :func:`cagrad`, :func:`imtl_weights`,
  :func:`nash_mtl_weights`, :func:`aligned_mtl_coefficients`,
  :func:`uncertainty_weighted_loss`, :func:`dwa_weights`,
  :func:`random_loss_weights`, :func:`gradnorm_weight_gradient`.
* **Strategies**: one interface (:class:`Weighting`) that
  :class:`mtl_utils.training.MultiTaskModel` calls once per training step. A
  strategy declares in ``mode`` what it needs:

  ======================  =================================================  =====
  mode                    input per step                                     cost
  ======================  =================================================  =====
  ``losses``              the loss vector ``(T,)``                           1.0x
  ``representation``      gradients w.r.t. the shared representation ``z``   1.02x
  ``last_shared_layer``   gradients w.r.t. the last shared layer's weights   1.02x
  ``shared_parameters``   gradients w.r.t. all shared parameters ``(T, P)``  1.75x
  ======================  =================================================  =====

  (Step time relative to equal weighting, measured by
  ``benchmarks/weighting_speed.py`` for the chapter model with four tasks on a
  CPU; the last row grows with the number of tasks: one backward pass through
  the shared layers per task.)

  Loss-based strategies return a scalar objective; gradient-based ones return a
  :class:`Combination`: coefficients ``shared`` for the rows of ``G`` (the shared
  update is ``shared @ G``) and ``heads`` (task ``i``'s head is updated with
  ``heads[i]`` times the gradient of its own loss).

Scale conventions. :class:`EqualWeighting` minimises the *sum* of task losses
(weights 1). DWA and GradNorm keep weights summing to ``T``, :class:`PCGrad`
sums the projected gradients and :class:`CAGrad` is scaled so that ``c = 0``
is exactly equal weighting; MGDA, IMTL and random weights sum to 1 as in their
papers, and Nash-MTL's scale is set by its bargaining solution (its shared
update clipped to norm 1, as in the references).

Partial labels: one rule for every strategy. A task without labels in the batch
(``present[i] = 0``; its loss and gradient are 0) gets coefficient 0, logged as
weight 0, and the present tasks are combined exactly as the same strategy would
combine them alone, with its scale convention applied to the ``K`` present
tasks (equal weighting and PCGrad sum them, CAGrad's ``c = 0`` is their sum, DWA
and GradNorm weights of the present tasks sum to what they would alone, MGDA,
IMTL and random weights sum to 1 over them). Tests hold every strategy with a
task absent equal to the same strategy built on the present tasks.

References
----------
Kendall, Gal and Cipolla 2018 (uncertainty); Liu, Johns and Davison 2019
(DWA, MTAN); Lin et al. 2021 (random loss weighting); Chen et al. 2018
(GradNorm); Yu et al. 2020 (PCGrad); Sener and Koltun 2018 (MGDA, MGDA-UB);
Liu et al. 2021 (CAGrad); Liu et al. 2021 (IMTL); Navon et al. 2022
(Nash-MTL); Senushkin et al. 2023 (Aligned-MTL).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import keras
import numpy as np
from keras import ops

from mtl_utils.validation import check_finite, check_number

__all__ = [
    "CAGRAD_EXACT_MAX_TASKS",
    "CAGrad",
    "Combination",
    "DynamicWeightAverage",
    "EqualWeighting",
    "GradNorm",
    "IMTL",
    "IMTLL",
    "MGDA",
    "NashMTL",
    "AlignedMTL",
    "PCGrad",
    "RandomLossWeighting",
    "StaticWeighting",
    "UncertaintyWeighting",
    "Weighting",
    "aligned_mtl_coefficients",
    "cagrad",
    "cagrad_coefficients",
    "dwa_weights",
    "get",
    "gradnorm_weight_gradient",
    "gram_matrix",
    "imtl_l_loss",
    "imtl_weights",
    "mgda_weights",
    "mgda_weights_from_gram",
    "min_norm_two",
    "nash_mtl_weights",
    "pcgrad",
    "pcgrad_coefficients",
    "project_onto_simplex",
    "random_loss_weights",
    "uncertainty_weighted_loss",
]

_TINY = 1e-12

# --------------------------------------------------------------------------- checks


def _as_float(x):
    return ops.cast(ops.convert_to_tensor(x), "float32")


def _check_matrix(G, what: str = "G"):
    G = _as_float(G)
    if len(G.shape) != 2:
        raise ValueError(
            f"{what} has shape {tuple(G.shape)}; expected a (T, P) matrix with one "
            "flattened gradient per task"
        )
    return G


def _check_gram(gram):
    gram = _as_float(gram)
    shape = tuple(gram.shape)
    if len(shape) != 2 or (None not in shape and shape[0] != shape[1]):
        raise ValueError(
            f"gram has shape {shape}; expected a square (T, T) matrix G @ G.T"
        )
    return gram


def _num_tasks(x) -> int:
    n = x.shape[0]
    if n is None:
        raise ValueError(
            "the number of tasks (first axis) must be known statically; got "
            f"shape {tuple(x.shape)}"
        )
    return int(n)


def _check_vector(v, num_tasks: int, what: str, names: Sequence[str] | None = None):
    v = _as_float(v)
    if tuple(v.shape) != (num_tasks,):
        listed = f" ({', '.join(names)})" if names else ""
        raise ValueError(
            f"{what} has shape {tuple(v.shape)}; expected ({num_tasks},): one value "
            f"per task{listed}"
        )
    return v


def _mask(present, num_tasks: int):
    """The ``(T,)`` float mask of present tasks (all present when ``None``)."""
    if present is None:
        return ops.ones((num_tasks,), "float32")
    return _check_vector(present, num_tasks, "present")


# ---------------------------------------------------------------- pure cores: basics


def gram_matrix(G):
    """Gram matrix ``G @ G.T`` of per-task gradients.

    Parameters
    ----------
    G:
        ``(T, P)`` flattened per-task gradients.

    Returns
    -------
    ``(T, T)`` inner products ``g_i . g_j``.
    """
    G = _check_matrix(G)
    return ops.matmul(G, ops.transpose(G))


def project_onto_simplex(v):
    """Euclidean projection of ``v`` onto the probability simplex.

    The sort-based algorithm of Held, Wolfe and Crowder (1974), as popularised by
    Duchi et al. (2008): ``argmin_w ||w - v||`` subject to ``w >= 0``,
    ``sum(w) = 1``.

    Parameters
    ----------
    v:
        ``(T,)`` vector.

    Returns
    -------
    ``(T,)`` non-negative vector summing to one.
    """
    v = _as_float(v)
    if len(v.shape) != 1:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected a vector (T,)")
    n = _num_tasks(v)
    u = ops.flip(ops.sort(v))
    css = ops.cumsum(u)
    k = ops.arange(1, n + 1, dtype="float32")
    support = ops.cast(u - (css - 1.0) / k > 0, "float32")
    rho = ops.maximum(ops.sum(support), 1.0)
    theta = (ops.take(css, ops.cast(rho, "int32") - 1) - 1.0) / rho
    return ops.maximum(v - theta, 0.0)


def min_norm_two(gram):
    """Closed-form min-norm point of the segment between two gradients.

    ``gamma = argmin_{g in [0, 1]} ||g g_1 + (1 - g) g_2||^2`` is
    ``clip((g_2.g_2 - g_1.g_2) / ||g_1 - g_2||^2, 0, 1)`` (Sener and Koltun
    2018, Algorithm 1).

    Parameters
    ----------
    gram:
        ``(2, 2)`` Gram matrix of the two gradients.

    Returns
    -------
    ``(2,)`` weights ``(gamma, 1 - gamma)``.
    """
    gram = _check_gram(gram)
    if _num_tasks(gram) != 2:
        raise ValueError(f"min_norm_two needs a (2, 2) Gram matrix, got {gram.shape}")
    g11, g12, g22 = gram[0, 0], gram[0, 1], gram[1, 1]
    denom = g11 + g22 - 2.0 * g12
    gamma = ops.where(
        denom > _TINY * (g11 + g22 + _TINY),
        (g22 - g12) / ops.maximum(denom, _TINY),
        0.5,
    )
    gamma = ops.clip(gamma, 0.0, 1.0)
    return ops.stack([gamma, 1.0 - gamma])


# ------------------------------------------------------------------- pure cores: MGDA


def _segment_step(aa, ab, bb):
    """argmin over t in [0, 1] of ||(1 - t) a + t b||^2 given inner products."""
    denom = aa + bb - 2.0 * ab
    t = ops.where(denom > _TINY, (aa - ab) / ops.maximum(denom, _TINY), 0.0)
    return ops.clip(t, 0.0, 1.0)


def mgda_weights_from_gram(
    gram,
    max_iterations: int = 250,
    tolerance: float = 1e-7,
    method: str = "auto",
    present=None,
):
    """MGDA weights from the Gram matrix (see :func:`mgda_weights`).

    ``present``: optional ``(T,)`` mask; the min-norm point is taken over the
    present tasks only and absent tasks get weight 0.
    """
    gram = _check_gram(gram)
    n = _num_tasks(gram)
    if method not in ("auto", "frank_wolfe"):
        raise ValueError(f"method must be 'auto' or 'frank_wolfe'; got {method!r}")
    mask = _mask(present, n)
    if n == 1:
        return mask
    if method == "frank_wolfe":
        best_w = mask / ops.maximum(ops.sum(mask), 1.0)
    elif n == 2:
        # One task present: all weight on it (the mask itself).
        return ops.where(ops.sum(mask) > 1.5, min_norm_two(gram), mask)
    else:
        best_w = _best_pair(gram, n, mask)

    def cond(i, w, change):
        return ops.logical_and(i < max_iterations, change > tolerance)

    def body(i, w, change):
        gw = ops.matmul(gram, w)  # (T,) = G g_w
        t = ops.argmin(ops.where(mask > 0, gw, np.inf))
        aa = ops.sum(w * gw)
        ab = ops.take(gw, t)
        bb = ops.take(ops.diagonal(gram), t)
        step = _segment_step(aa, ab, bb)
        new_w = (1.0 - step) * w + step * ops.one_hot(t, n)
        return i + 1, new_w, ops.sum(ops.abs(new_w - w))

    _, w, _ = ops.while_loop(
        cond, body, (ops.array(0, "int32"), best_w, ops.array(1.0, "float32"))
    )
    return w


def _best_pair(gram, n, mask):
    """Min-norm point over all pairs of present tasks (Sener and Koltun's start),
    or the single present task."""
    best_w = mask / ops.maximum(ops.sum(mask), 1.0)
    best_value = ops.where(ops.sum(mask) > 1.5, np.inf, 0.0)
    for i in range(n):
        for j in range(i + 1, n):
            sub = ops.stack(
                [
                    ops.stack([gram[i, i], gram[i, j]]),
                    ops.stack([gram[j, i], gram[j, j]]),
                ]
            )
            pair = min_norm_two(sub)
            w = pair[0] * ops.one_hot(i, n) + pair[1] * ops.one_hot(j, n)
            value = ops.sum(w * ops.matmul(gram, w))
            value = ops.where(mask[i] * mask[j] > 0, value, np.inf)
            better = value < best_value
            best_w = ops.where(better, w, best_w)
            best_value = ops.minimum(value, best_value)
    return best_w


def mgda_weights(
    G,
    max_iterations: int = 250,
    tolerance: float = 1e-7,
    method: str = "auto",
    present=None,
):
    """Min-norm point of the convex hull of task gradients (MGDA).

    Solves ``min_{a in simplex} || sum_i a_i g_i ||^2`` (Sener and Koltun 2018,
    Algorithm 2): two tasks use the exact closed form :func:`min_norm_two`; more
    tasks start from the best pair and run Frank-Wolfe with exact line search.
    Descending along ``a @ G`` decreases every task whose gradient is not already
    in conflict at a Pareto-stationary point (where the min norm is 0).

    Parameters
    ----------
    G:
        ``(T, P)`` per-task gradients.
    max_iterations, tolerance:
        Frank-Wolfe stops after ``max_iterations`` or when the L1 change of the
        weights falls below ``tolerance``.
    method:
        ``"auto"`` (closed form for two tasks, else Frank-Wolfe from the best
        pair) or ``"frank_wolfe"`` (Frank-Wolfe from uniform weights for any
        number of tasks).
    present:
        Optional ``(T,)`` mask of tasks with labels in the batch; the weights
        are those of the present tasks alone, 0 for the others.

    Returns
    -------
    ``(T,)`` weights on the simplex (non-negative, summing to one).

    Examples
    --------
    >>> import numpy as np
    >>> mgda_weights(np.array([[1.0, 0.0], [0.0, 1.0]])).numpy().round(3)
    array([0.5, 0.5], dtype=float32)
    """
    try:  # concrete values are checked; a symbolic tensor (inside fit) is not
        values = np.asarray(G, np.float64)
    except (TypeError, ValueError, NotImplementedError):
        values = None
    if values is not None:
        check_finite(values, "mgda_weights: the gradients G")
    return mgda_weights_from_gram(
        gram_matrix(G), max_iterations, tolerance, method, present
    )


# ----------------------------------------------------------------- pure cores: PCGrad


def pcgrad_coefficients(gram, order=None):
    """PCGrad as coefficients on the rows of ``G`` (see :func:`pcgrad`).

    Every projected gradient is a linear combination of the original ones, so
    PCGrad runs entirely on the ``(T, T)`` Gram matrix: row ``c_i`` represents
    ``g_i^PC = c_i @ G`` and projecting onto the normal plane of ``g_j`` is
    ``c_i -= min(c_i . gram[:, j], 0) / gram[j, j] * e_j``.

    Parameters
    ----------
    gram:
        ``(T, T)`` Gram matrix.
    order:
        Optional ``(T, T)`` integer array; row ``i`` is the order in which task
        ``i`` visits the other tasks (entries equal to ``i`` are skipped). The
        paper draws a random order each step; default ``0, 1, ..., T-1``.

    Returns
    -------
    ``(T,)`` coefficients ``a`` with ``pcgrad(G) = a @ G``.
    """
    gram = _check_gram(gram)
    n = _num_tasks(gram)
    if order is None:
        order = np.tile(np.arange(n), (n, 1))
    order = ops.cast(ops.convert_to_tensor(order), "int32")
    if tuple(order.shape) != (n, n):
        raise ValueError(f"order has shape {tuple(order.shape)}; expected ({n}, {n})")
    total = ops.zeros((n,), "float32")
    diag = ops.diagonal(gram)
    for i in range(n):
        c = ops.one_hot(i, n)
        for k in range(n):
            j = order[i, k]
            e_j = ops.one_hot(j, n)
            dot = ops.sum(c * ops.take(gram, j, axis=1))
            norm2 = ops.take(diag, j)
            active = ops.logical_and(
                ops.logical_and(dot < 0.0, norm2 > _TINY), ops.not_equal(j, i)
            )
            factor = ops.where(active, dot / ops.maximum(norm2, _TINY), 0.0)
            c = c - factor * e_j
        total = total + c
    return total


def pcgrad(G, order=None):
    """Projecting conflicting gradients (PCGrad; Yu et al. 2020, Algorithm 1).

    For each task ``i`` and each other task ``j`` (in ``order``): if the current
    ``g_i^PC`` conflicts with ``g_j`` (negative inner product), remove its
    component along ``g_j``. The update is the *sum* of the projected gradients,
    so without conflicts PCGrad equals the gradient of the summed loss.

    Parameters
    ----------
    G:
        ``(T, P)`` per-task gradients.
    order:
        Optional ``(T, T)`` visiting order, see :func:`pcgrad_coefficients`.

    Returns
    -------
    ``(P,)`` combined gradient.

    Examples
    --------
    >>> import numpy as np
    >>> pcgrad(np.array([[1.0, 0.0], [-1.0, 1.0]])).numpy()
    array([0.5, 1.5], dtype=float32)
    """
    G = _check_matrix(G)
    return ops.matmul(pcgrad_coefficients(gram_matrix(G), order), G)


# ----------------------------------------------------------------- pure cores: CAGrad


def _cagrad_objective(w, gram, b, sqrt_phi):
    """``g_w . g_0 + sqrt(phi) ||g_w||`` for ``(..., T)`` weights ``w``."""
    gw = ops.matmul(w, gram)
    return ops.sum(gw * b, axis=-1) + sqrt_phi * ops.sqrt(
        ops.maximum(ops.sum(gw * w, axis=-1), 0.0)
    )


# Up to this many tasks the CAGrad dual is solved exactly by visiting every face
# of the simplex (2^T - 1 small linear solves, batched); beyond it iteratively.
CAGRAD_EXACT_MAX_TASKS = 12


def cagrad_coefficients(
    gram,
    c: float = 0.5,
    rescale: bool = True,
    iterations: int = 200,
    force_iterative: bool = False,
    present=None,
):
    """CAGrad as coefficients on the rows of ``G`` (see :func:`cagrad`).

    Solves the dual ``min_{w in simplex} g_w . g_0 + sqrt(phi) ||g_w||`` with
    ``g_0`` the mean gradient, ``g_w = w @ G`` and ``phi = c^2 ||g_0||^2``.

    Up to :data:`CAGRAD_EXACT_MAX_TASKS` tasks the solution is exact
    (:func:`_cagrad_dual_exact`): the minimiser lies inside one face of the
    simplex, where the stationarity conditions have a closed form, so every
    face is solved and the best feasible point kept. More tasks (or
    ``force_iterative=True``) use projected gradient descent on the simplex
    (``iterations`` steps of size ``0.5 / sqrt(k + 1)``, keeping the best
    iterate), which is approximate.

    Parameters
    ----------
    gram:
        ``(T, T)`` Gram matrix.
    c, rescale:
        As for :func:`cagrad`.
    present:
        Optional ``(T,)`` mask of tasks with labels in the batch: the mean
        gradient and the dual are over the present tasks alone, and absent tasks
        get coefficient 0.

    Returns
    -------
    ``(T,)`` coefficients ``a`` with ``cagrad(G) = a @ G``.
    """
    gram = _check_gram(gram)
    n = _num_tasks(gram)
    mask = _mask(present, n)
    # The Gram matrix normalised to unit mean diagonal: same solution, and
    # tolerances independent of the gradients' scale.
    scale = ops.sum(ops.diagonal(gram) * mask) / ops.maximum(ops.sum(mask), 1.0)
    m = gram / ops.maximum(scale, _TINY)
    b = mask / ops.maximum(ops.sum(mask), 1.0)
    sqrt_phi = c * ops.sqrt(ops.maximum(ops.sum(b * ops.matmul(m, b)), 0.0))
    if n <= CAGRAD_EXACT_MAX_TASKS and not force_iterative:
        w = _cagrad_dual_exact(m, b, sqrt_phi, mask)
    else:
        w = _cagrad_dual_iterative(m, b, sqrt_phi, iterations, mask)
    gw_norm = ops.sqrt(ops.maximum(ops.sum(w * ops.matmul(m, w)), 0.0))
    lam = sqrt_phi / (gw_norm + 1e-6)
    coef = b + lam * w
    if rescale:
        coef = coef / (1.0 + c**2)
    return coef


def _simplex_faces(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every face of the ``n``-simplex: ``(support, first)``, ``(2^n - 1, n)``
    indicators of its vertices and of its first vertex."""
    support = (np.arange(1, 2**n)[:, None] >> np.arange(n)) & 1
    first = np.zeros_like(support)
    first[np.arange(len(support)), np.argmax(support, axis=1)] = 1
    return support.astype("float64"), first.astype("float64")


def _cagrad_dual_exact(m, b, sqrt_phi, mask):
    """Exact minimiser of the CAGrad dual by solving it on every face.

    The dual depends on ``w`` only through ``g = g_w``:
    ``f(g) = g . g_0 + s ||g||`` (``s = sqrt(phi)``), convex, minimised over
    the convex hull of the gradients. Its minimiser is a convex combination of
    affinely independent gradients with positive weights (Caratheodory), so it
    is stationary on the affine hull of one face ``S``. Write
    ``g = g_k + D l`` (``k`` the face's first vertex, the columns of ``D`` the
    edges ``g_j - g_k``). ``D^T grad f = 0`` reads
    ``D^T g = -(r / s) D^T g_0`` with ``r = ||g||``, so ``g = p + r q``: ``p``
    the point of the affine hull nearest the origin and
    ``q = -P_D g_0 / s`` (``P_D`` the projection onto the edges' span). As
    ``p`` is orthogonal to the edges, ``r^2 = ||p||^2 + r^2 ||q||^2``, so
    ``r = ||p|| / sqrt(1 - ||q||^2)`` when ``||q|| < 1`` (otherwise the face
    holds no minimiser). Everything is an inner product, read from the Gram
    matrix; the ``2^T - 1`` faces are solved as one batch in float64. A face
    whose weights are negative is infeasible; among the feasible ones the
    lowest dual value wins (a vertex is always feasible).
    """
    n = _num_tasks(m)
    support, first = _simplex_faces(n)
    edges = support - first  # the other vertices of each face
    a = ops.cast(m, "float64")
    s = ops.maximum(ops.cast(sqrt_phi, "float64"), 1e-30)
    g0 = ops.matmul(a, ops.cast(b, "float64"))  # (T,): g_i . g_0
    a_k = ops.matmul(first, a)  # (F, T): g_k . g_i
    a_kk = ops.sum(a_k * first, axis=1)  # (F,)
    g0_k = ops.matmul(first, g0[:, None])[:, 0]  # (F,)
    outer = edges[:, :, None] * edges[:, None, :]
    # D^T D, padded with the identity outside the face's edges.
    dtd = (a[None] - a_k[:, :, None] - a_k[:, None, :] + a_kk[:, None, None]) * outer
    dtd = dtd + np.eye(n) * (1.0 - edges)[:, :, None]
    trace = ops.maximum(ops.trace(a), 1e-30)
    dtd = dtd + 1e-13 * trace * np.eye(n)  # exactly dependent edges stay finite
    dgk = (a_k - a_kk[:, None]) * edges  # D^T g_k
    dg0 = (g0[None] - g0_k[:, None]) * edges  # D^T g_0
    solved = ops.solve(dtd, ops.stack([-dgk, -dg0], axis=-1))
    l_p, l_q = solved[..., 0], solved[..., 1] / s  # g = g_k + D (l_p + r l_q)
    p2 = ops.maximum(a_kk + ops.sum(l_p * dgk, axis=1), 0.0)  # ||p||^2
    q2 = -ops.sum(l_q * dg0, axis=1) / s  # ||q||^2
    r = ops.sqrt(p2 / ops.maximum(1.0 - q2, 1e-30))
    lam = l_p + r[:, None] * l_q
    w = lam + first * (1.0 - ops.sum(lam, axis=1))[:, None]
    inside = ops.logical_or(ops.sum(edges, axis=1) == 0, q2 < 1.0)
    feasible = ops.logical_and(inside, ops.all(w >= -1e-9, axis=1))
    feasible = ops.logical_and(feasible, ops.all(ops.isfinite(w), axis=1))
    # Faces of present tasks only.
    absent = ops.cast(1.0 - mask, "float64")
    feasible = ops.logical_and(feasible, ops.matmul(support, absent) == 0)
    w = ops.where(feasible[:, None], ops.maximum(w, 0.0), first)
    w = w / ops.sum(w, axis=1, keepdims=True)
    value = _cagrad_objective(w, a, ops.cast(b, "float64"), s)
    value = ops.where(feasible, value, np.inf)
    best = ops.take(w, ops.argmin(value), axis=0)
    return ops.cast(best, "float32") * mask


def _cagrad_dual_iterative(m, b, sqrt_phi, iterations, mask):
    """Projected gradient descent on the simplex of the present tasks for the
    CAGrad dual (approximate)."""
    w0 = b
    f0 = _cagrad_objective(w0, m, b, sqrt_phi)
    absent = (1.0 - mask) * 1e6  # pushes absent tasks out of every projection

    def body(k, state):
        w, best_w, best_f = state
        gw = ops.matmul(m, w)
        norm = ops.sqrt(ops.maximum(ops.sum(w * gw), _TINY))
        grad = ops.matmul(m, b) + sqrt_phi * gw / norm
        step = 0.5 / ops.sqrt(ops.cast(k, "float32") + 1.0)
        w = project_onto_simplex(w - step * grad - absent)
        f = _cagrad_objective(w, m, b, sqrt_phi)
        better = f < best_f
        return w, ops.where(better, w, best_w), ops.where(better, f, best_f)

    _, w, _ = ops.fori_loop(0, iterations, body, (w0, w0, f0))
    return w


def cagrad(
    G, c: float = 0.5, rescale: bool = True, iterations: int = 200, present=None
):
    """Conflict-averse gradient descent (CAGrad; Liu et al. 2021, Algorithm 1).

    Finds the update ``d`` that maximises the worst-case task improvement
    ``min_i g_i . d`` within a ball ``||d - g_0|| <= c ||g_0||`` around the mean
    gradient ``g_0``: ``d = g_0 + sqrt(phi) / ||g_w|| g_w`` with ``w`` from the dual
    problem (:func:`cagrad_coefficients`). ``c = 0`` gives ``g_0``; larger ``c``
    moves towards MGDA-like conflict avoidance.

    Parameters
    ----------
    G:
        ``(T, P)`` per-task gradients.
    c:
        Radius of the ball relative to ``||g_0||`` (the paper uses 0.4-0.5).
    rescale:
        Divide by ``1 + c^2`` as the authors' code does.
    iterations:
        Solver steps beyond :data:`CAGRAD_EXACT_MAX_TASKS` tasks.
    present:
        Optional ``(T,)`` mask: CAGrad of the present tasks alone.

    Returns
    -------
    ``(P,)`` update direction (mean scale, like ``g_0``).
    """
    G = _check_matrix(G)
    coef = cagrad_coefficients(gram_matrix(G), c, rescale, iterations, present=present)
    return ops.matmul(coef, G)


# ---------------------------------------------------- pure cores: IMTL, Nash, Aligned


def imtl_weights(gram, present=None):
    """IMTL-G weights (Liu et al. 2021, "Towards impartial multi-task learning").

    Finds ``a`` (summing to one) such that ``g = a @ G`` has the same projection
    onto every unit gradient ``u_i = g_i / ||g_i||``. The paper writes the
    solution with task 1 as reference, ``a_{2:T} = g_1 U^T (D U^T)^{-1}`` (rows
    ``D_i = g_1 - g_i``, ``U_i = u_1 - u_i``). Equivalently, ``u_i . g = kappa``
    for every ``i`` reads ``G G^T a = kappa n`` (``n`` the gradient norms), so
    ``a = (G G^T)^{-1} n / (1^T (G G^T)^{-1} n)``: one linear solve, symmetric
    in the tasks.

    Parameters
    ----------
    gram:
        ``(T, T)`` Gram matrix (gradients must be linearly independent).
    present:
        Optional ``(T,)`` mask: the weights of the present tasks alone (their
        block of the Gram matrix), 0 for the others.

    Returns
    -------
    ``(T,)`` weights.
    """
    gram = _check_gram(gram)
    n = _num_tasks(gram)
    mask = _mask(present, n)
    norms = ops.sqrt(ops.maximum(ops.diagonal(gram), _TINY))
    block = _present_block(gram, mask, ops.max(ops.diagonal(gram) * mask))
    x = ops.solve(block, (norms * mask)[:, None])[:, 0]
    return x / _nonzero(ops.sum(x))


def _present_block(gram, mask, fill):
    """``gram`` with the rows and columns of absent tasks replaced by
    ``fill`` times the identity: a block-diagonal matrix whose present block is
    the present tasks' Gram matrix, so that solvers acting on matrix functions
    or linear systems treat the present tasks exactly as if alone."""
    n = _num_tasks(gram)
    both = mask[:, None] * mask[None, :]
    fill = ops.where(fill > _TINY, fill, 1.0)
    return gram * both + ops.eye(n) * ((1.0 - mask) * fill)[:, None]


def _nonzero(x):
    """``x`` with values of magnitude below ``_TINY`` moved to ``+-_TINY``."""
    return ops.where(ops.abs(x) > _TINY, x, ops.where(x < 0, -_TINY, _TINY))


def imtl_l_loss(losses, log_scales, present=None):
    """IMTL-L, the loss-scale half of IMTL (Liu et al. 2021, Sec. 3.2).

    Each task loss becomes ``exp(s_i) L_i - s_i`` with a learnable ``s_i``. Its
    gradient in ``s_i``, ``exp(s_i) L_i - 1``, vanishes at ``exp(s_i) L_i = 1``:
    every scaled loss is driven to 1, the same for every task.

    Parameters
    ----------
    losses:
        ``(T,)`` task losses.
    log_scales:
        ``(T,)`` learnable ``s_i``.
    present:
        Optional ``(T,)`` mask; an absent task adds no term.

    Returns
    -------
    ``(total, weights)``: the scalar objective and the ``(T,)`` loss weights
    ``exp(s_i)`` (0 for absent tasks).
    """
    losses = _as_float(losses)
    n = _num_tasks(losses)
    s = _check_vector(log_scales, n, "log_scales")
    mask = _mask(present, n)
    weights = ops.exp(s) * mask
    return ops.sum(weights * losses - s * mask), weights


def nash_mtl_weights(gram, iterations: int = 30, ridge: float = 1e-6, present=None):
    """Nash bargaining weights (Nash-MTL; Navon et al. 2022).

    The bargaining solution is the ``a > 0`` with ``(G G^T a)_i = 1 / a_i``. With
    ``G G^T = D C D`` (``D`` the gradient norms, ``C`` the cosine matrix) and
    ``a = b / D`` this reads ``b_i (C b)_i = 1``, whose solution is the unique
    minimiser of the strictly convex ``0.5 b^T C b - sum_i log b_i``, found here by
    damped Newton steps ``b += delta / (1 + lambda)`` (``lambda`` the Newton
    decrement; the steps keep ``b`` positive). The paper iterates convex-concave
    programs instead; the solution is the same.

    Parameters
    ----------
    gram:
        ``(T, T)`` Gram matrix. ``ridge`` is added to the diagonal of ``C`` so that
        linearly dependent gradients still give finite weights.
    present:
        Optional ``(T,)`` mask: the bargaining solution of the present tasks
        alone, 0 for the others.

    Returns
    -------
    ``(T,)`` positive weights.
    """
    gram = _check_gram(gram)
    n = _num_tasks(gram)
    mask = _mask(present, n)
    norms = ops.sqrt(ops.maximum(ops.diagonal(gram), _TINY))
    cos = gram / (norms[:, None] * norms[None, :])
    cos = _present_block(cos, mask, ops.ones(())) + ridge * ops.eye(n)
    b0 = ops.ones((n,), "float32")

    def body(_, b):
        grad = ops.matmul(cos, b) - 1.0 / b
        hess = cos + ops.diag(1.0 / ops.square(b))
        delta = -ops.solve(hess, grad[:, None])[:, 0]
        decrement = ops.sqrt(ops.maximum(-ops.sum(grad * delta), 0.0))
        return b + delta / (1.0 + decrement)

    return ops.fori_loop(0, iterations, body, b0) / norms * mask


def aligned_mtl_coefficients(
    gram, weights=None, rank_tolerance: float = 1e-6, present=None
):
    """Aligned-MTL (Senushkin et al. 2023) as coefficients on the rows of ``G``.

    With ``G G^T = V diag(lambda) V^T``, the aligned gradients
    ``B G``, ``B = sqrt(lambda_min) V diag(lambda)^{-1/2} V^T``, are orthogonal
    with equal norms ``sqrt(lambda_min)`` (condition number 1); the update is
    ``weights @ (B G)``. Eigenvalues below ``rank_tolerance * lambda_max`` are
    treated as zero (their directions dropped).

    Parameters
    ----------
    gram:
        ``(T, T)`` Gram matrix.
    weights:
        ``(T,)`` task pre-weights; default ones (for already orthogonal,
        equal-norm gradients the update is then the plain sum).
    present:
        Optional ``(T,)`` mask: the coefficients of the present tasks alone, 0
        for the others. (The absent tasks' block is filled with the present
        block's largest eigenvalue, which moves neither ``lambda_max`` nor
        ``lambda_min``.)

    Returns
    -------
    ``(T,)`` coefficients ``a`` with update ``a @ G``.
    """
    gram = _check_gram(gram)
    n = _num_tasks(gram)
    if weights is None:
        weights = ops.ones((n,), "float32")
    weights = _check_vector(weights, n, "weights")
    mask = _mask(present, n)
    if present is not None:
        top = ops.max(ops.eigh(gram * mask[:, None] * mask[None, :])[0])
        gram = _present_block(gram, mask, top)
    lam, vec = ops.eigh(gram)
    keep = lam > rank_tolerance * ops.maximum(ops.max(lam), _TINY)
    lam_min = ops.min(ops.where(keep, lam, ops.max(lam)))
    inv_sqrt = ops.where(keep, 1.0 / ops.sqrt(ops.maximum(lam, _TINY)), 0.0)
    b = ops.sqrt(ops.maximum(lam_min, 0.0)) * ops.matmul(
        vec * inv_sqrt[None, :], ops.transpose(vec)
    )
    return ops.matmul(b, weights * mask)  # B symmetric: (w @ B G) = (B w) @ G


# ----------------------------------------------------- pure cores: loss-based methods


def uncertainty_weighted_loss(losses, log_variances, classification=None, present=None):
    """Homoscedastic-uncertainty weighting (Kendall, Gal and Cipolla 2018).

    With ``s_i = log sigma_i^2``, a regression task contributes
    ``0.5 exp(-s_i) L_i + 0.5 s_i`` (Gaussian likelihood, the paper's
    ``L / (2 sigma^2) + log sigma``) and a classification task
    ``exp(-s_i) L_i + 0.5 s_i`` (``L / sigma^2 + log sigma``).

    Parameters
    ----------
    losses:
        ``(T,)`` task losses.
    log_variances:
        ``(T,)`` learnable ``s_i``.
    classification:
        Optional ``(T,)`` booleans; ``True`` uses the classification form. Default:
        regression form for every task (the common implementation).
    present:
        Optional ``(T,)`` mask; a task without labels in the batch (0) adds no
        term, so its ``s`` is not pushed down by a zero loss.

    Returns
    -------
    ``(total, weights)``: the scalar objective and the ``(T,)`` effective weights
    on the losses (``0.5 exp(-s)`` or ``exp(-s)``; 0 for absent tasks).
    """
    losses = _as_float(losses)
    n = _num_tasks(losses)
    s = _check_vector(log_variances, n, "log_variances")
    factor = ops.full((n,), 0.5)
    if classification is not None:
        cls = ops.cast(ops.convert_to_tensor(classification), "float32")
        cls = _check_vector(cls, n, "classification")
        factor = ops.where(cls > 0, 1.0, 0.5)
    mask = _mask(present, n)
    weights = factor * ops.exp(-s) * mask
    total = ops.sum(weights * losses + 0.5 * s * mask)
    return total, weights


def dwa_weights(previous, before_previous, temperature: float = 2.0, present=None):
    """Dynamic weight average (Liu, Johns and Davison 2019, Eq. 7).

    ``w_i = K exp(r_i / temperature) / sum_j exp(r_j / temperature)`` over the
    ``K`` present tasks, with the relative descending rate
    ``r_i = L_i(t-1) / L_i(t-2)`` of the epoch-averaged losses.

    A task without labels in one of the two epochs (epoch loss 0) has no rate;
    it gets the neutral rate 1 (loss unchanged), as every task has while DWA's
    first two epochs give weights 1.

    Parameters
    ----------
    previous, before_previous:
        ``(T,)`` epoch-averaged losses of the last two epochs.
    present:
        Optional ``(T,)`` mask of tasks with labels in the batch; absent tasks
        get weight 0 and the present ones DWA's weights among themselves.

    Returns
    -------
    ``(T,)`` weights summing to the number of present tasks.
    """
    previous = _as_float(previous)
    n = _num_tasks(previous)
    before_previous = _check_vector(before_previous, n, "before_previous")
    mask = _mask(present, n)
    known = ops.logical_and(previous > 0, before_previous > 0)
    r = ops.where(known, previous / ops.maximum(before_previous, _TINY), 1.0)
    return _masked_softmax(r / temperature, mask) * ops.sum(mask)


def _masked_softmax(logits, mask):
    """Softmax over the entries where ``mask`` is 1; 0 elsewhere."""
    logits = ops.where(mask > 0, logits, ops.min(logits))
    e = ops.where(mask > 0, ops.exp(logits - ops.max(logits)), 0.0)
    return e / ops.maximum(ops.sum(e), _TINY)


def random_loss_weights(num_tasks: int, seed=None, present=None):
    """Random loss weights (RLW; Lin et al. 2021): ``softmax(z)``, ``z ~ N(0, I)``.

    Parameters
    ----------
    num_tasks:
        ``T``.
    seed:
        Integer or :class:`keras.random.SeedGenerator`.
    present:
        Optional ``(T,)`` mask: the softmax runs over the present tasks' draws
        only (absent tasks get 0).

    Returns
    -------
    ``(T,)`` weights summing to one.
    """
    z = keras.random.normal((num_tasks,), seed=seed)
    return _masked_softmax(z, _mask(present, num_tasks))


def gradnorm_weight_gradient(
    weights, grad_norms, losses, initial_losses, alpha, present=None
):
    """Gradient of the GradNorm loss with respect to the task weights.

    GradNorm (Chen et al. 2018) measures ``G_i = w_i ||grad_W L_i||`` at the last
    shared layer ``W`` and pulls it towards ``mean(G) * r_i^alpha``, where
    ``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))`` is the relative inverse
    training rate. ``L_grad = sum_i |G_i - target_i|`` with the target held
    constant, so ``dL_grad / dw_i = sign(G_i - target_i) ||grad_W L_i||``.

    Parameters
    ----------
    weights, grad_norms, losses, initial_losses:
        ``(T,)`` vectors: ``w``, ``||grad_W L_i||``, ``L_i(t)``, ``L_i(0)``.
    alpha:
        Asymmetry: larger values pull training rates together harder.
    present:
        Optional ``(T,)`` mask: the means run over the present tasks, and
        absent tasks get gradient 0 and add nothing to ``L_grad``.

    Returns
    -------
    ``(gradient, L_grad)``: the ``(T,)`` gradient and the scalar GradNorm loss.
    """
    weights = _as_float(weights)
    n = _num_tasks(weights)
    grad_norms = _check_vector(grad_norms, n, "grad_norms")
    losses = _check_vector(losses, n, "losses")
    initial_losses = _check_vector(initial_losses, n, "initial_losses")
    mask = _mask(present, n)
    count = ops.maximum(ops.sum(mask), 1.0)
    g = weights * grad_norms
    ratio = losses / ops.maximum(initial_losses, _TINY) * mask
    r = ratio / ops.maximum(ops.sum(ratio) / count, _TINY)
    target = ops.sum(g * mask) / count * ops.power(r, alpha)
    gap = (g - target) * mask
    return ops.sign(gap) * grad_norms, ops.sum(ops.abs(gap))


def _num_replicas() -> int:
    """Replicas of the current ``tf.distribute`` strategy (1 without one)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def _zero_absent(weights, present):
    return weights if present is None else weights * _as_float(present)


# ----------------------------------------------------------------------- strategies


class Combination(NamedTuple):
    """How a gradient-based strategy combines per-task gradients.

    Attributes
    ----------
    shared:
        ``(T,)`` coefficients: the shared update is ``shared @ G``.
    heads:
        ``(T,)`` multipliers of each task head's own gradient.
    """

    shared: Any
    heads: Any


def _state_variable(value, name: str) -> keras.Variable:
    """A strategy's non-trainable state: every replica computes the same value,
    so the first replica's assignment is kept (``aggregation``)."""
    return keras.Variable(
        value, trainable=False, name=name, aggregation="only_first_replica"
    )


class Weighting:
    """Base class: one interface for every balancing strategy.

    A strategy is built for an ordered list of task names (``build``), is told
    the per-step loss vector and (for gradient modes) per-task gradients, and
    returns either a scalar objective (``combine_losses``) or a
    :class:`Combination` (``combine_gradients``). ``weights`` returned alongside
    are logged by :class:`~mtl_utils.training.MultiTaskModel` as
    ``weight_<task>``. Strategies with learnable parameters keep them in Keras
    variables (``trainable_variables``) and train them with ``optimizer``
    (default: a fresh copy of the model's optimizer, made at compile time).

    Subclasses set ``mode`` (see the module docstring) and override
    ``combine_losses`` (mode ``"losses"``) or ``combine_gradients``.

    ``update_every=k`` (mode ``"shared_parameters"``) recomputes the per-task
    gradients and the combination only every ``k``-th step and reuses the last
    coefficients in between, which then cost one backward pass like equal
    weighting. Navon et al. (2022) do this for Nash-MTL; for other methods it is
    an approximation of the paper's update. Default 1 (every step).
    """

    mode: str = "losses"

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer | None = None,
        update_every: int = 1,
    ):
        self.task_names: list[str] | None = None
        self.task_kinds: dict[str, str] = {}
        self.optimizer = optimizer
        if int(update_every) < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.update_every = int(update_every)
        self.last_combination = None

    # -- building ---------------------------------------------------------------
    @property
    def built(self) -> bool:
        return self.task_names is not None

    @property
    def num_tasks(self) -> int:
        if self.task_names is None:
            raise ValueError(f"{type(self).__name__} is not built; call build(tasks)")
        return len(self.task_names)

    def build(
        self,
        task_names: Sequence[str],
        task_kinds: Mapping[str, str] | None = None,
        model_optimizer: keras.optimizers.Optimizer | None = None,
    ) -> None:
        """Create the strategy's state for ``task_names`` (in this order).

        Parameters
        ----------
        task_names:
            Ordered task names; the loss vector and gradient rows follow it.
        task_kinds:
            Optional name -> task kind (``"segmentation"``, ``"depth"``, ...),
            used by :class:`UncertaintyWeighting` ``form="paper"``.
        model_optimizer:
            Copied to train the strategy's own variables when no ``optimizer``
            was given.
        """
        names = [str(n) for n in task_names]
        if not names:
            raise ValueError(f"{type(self).__name__} needs at least one task")
        if len(set(names)) != len(names):
            raise ValueError(f"task names repeat: {names}")
        if self.built and names != self.task_names:
            raise ValueError(
                f"{type(self).__name__} was built for tasks {self.task_names}; "
                f"cannot rebuild it for {names}. Create a new strategy."
            )
        first = not self.built
        self.task_names = names
        self.task_kinds = dict(task_kinds or {})
        if first:
            self.create_state()
            if self.update_every > 1:
                self.last_combination = _state_variable(
                    np.ones((2, len(names)), "float32"), "last_combination"
                )
        if self.trainable_variables and self.optimizer is None:
            if model_optimizer is None:
                raise ValueError(
                    f"{type(self).__name__} has learnable parameters: pass "
                    "optimizer=... or build it through MultiTaskModel.compile"
                )
            # A LossScaleOptimizer's own scale would shrink these (unscaled)
            # gradients; copy the optimizer it wraps.
            base = getattr(model_optimizer, "inner_optimizer", model_optimizer)
            self.optimizer = base.__class__.from_config(base.get_config())
        if self.trainable_variables and not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)

    def create_state(self) -> None:
        """Create Keras variables (called once by ``build``)."""

    def state_variables(self) -> list:
        """Every Keras variable of the strategy's state, in a fixed order.

        Its own variables (weights, counters, the last combination), the state
        of its random-seed generators, and its optimizer's variables: what must
        be saved to resume training, or restored to undo a step.
        """
        found, seen = [], set()

        def add(value):
            if isinstance(value, keras.random.SeedGenerator):
                value = value.state
            if isinstance(value, keras.Variable) and id(value) not in seen:
                seen.add(id(value))
                found.append(value)

        for value in vars(self).values():
            add(value)
        for value in self.trainable_variables:
            add(value)
        if self.optimizer is not None and self.optimizer.built:
            for value in self.optimizer.variables:
                add(value)
        return found

    @property
    def trainable_variables(self) -> list:
        """Learnable parameters of the strategy (trained by ``optimizer``)."""
        return []

    def apply_gradients(self, gradients: Sequence) -> None:
        """One optimizer step on ``trainable_variables``."""
        self.optimizer.apply(list(gradients), self.trainable_variables)

    # -- per-step interface -----------------------------------------------------
    def check_losses(self, losses):
        """``losses`` as a float32 ``(T,)`` tensor, or a ValueError naming tasks."""
        return _check_vector(losses, self.num_tasks, "loss vector", self.task_names)

    def check_gram(self, gram):
        """``gram`` as a float32 ``(T, T)`` tensor, or a ValueError naming tasks.

        A Gram matrix of another size (e.g. 3x3 for 2 tasks) would otherwise give
        coefficients for tasks that do not exist.
        """
        gram = _check_gram(gram)
        n, shape = self.num_tasks, tuple(gram.shape)
        if any(d is not None and d != n for d in shape):
            raise ValueError(
                f"gram has shape {shape}; expected ({n}, {n}): one row and column "
                f"per task ({', '.join(self.task_names)})"
            )
        return gram

    def combine_losses(self, losses, present=None):
        """Mode ``"losses"``: ``(objective, weights)`` for the ``(T,)`` losses.

        ``present`` is an optional ``(T,)`` mask of tasks with at least one label
        in the batch (partial labels); absent tasks have loss 0.
        """
        raise NotImplementedError(f"{type(self).__name__} combines gradients")

    def combine_gradients(
        self, gram, losses, gradients=None, present=None
    ) -> Combination:
        """Gradient modes: a :class:`Combination` from the Gram matrix.

        Parameters
        ----------
        gram:
            ``(T, T)`` Gram matrix of the per-task gradients.
        losses:
            ``(T,)`` task losses.
        gradients:
            Optional ``(T, P)`` gradients themselves.
        present:
            Optional ``(T,)`` mask of tasks with labels in the batch; an absent
            task's gradient row is zero.
        """
        raise NotImplementedError(f"{type(self).__name__} combines losses")

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None) -> None:
        """Hook called by ``MultiTaskModel.fit`` after each epoch."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EqualWeighting(Weighting):
    """Sum of task losses, every weight 1: the strong baseline (Kurin et al. 2022;
    Xin et al. 2022)."""

    def combine_losses(self, losses, present=None):
        losses = self.check_losses(losses)
        w = _mask(present, self.num_tasks)
        return ops.sum(w * losses), w


class StaticWeighting(Weighting):
    """Fixed, hand-chosen loss weights.

    Parameters
    ----------
    weights:
        A mapping ``{task: weight}`` (missing tasks get weight 1) or a sequence in
        task order.
    """

    def __init__(self, weights: Mapping[str, float] | Sequence[float]):
        super().__init__()
        self.spec = dict(weights) if isinstance(weights, Mapping) else list(weights)
        items = (
            self.spec.items() if isinstance(self.spec, dict) else enumerate(self.spec)
        )
        for key, value in items:
            check_number(value, f"StaticWeighting weight {key!r}", low=0.0)

    def create_state(self) -> None:
        if isinstance(self.spec, dict):
            unknown = [k for k in self.spec if k not in self.task_names]
            if unknown:
                raise ValueError(
                    f"StaticWeighting got weights for unknown task(s) {unknown}; "
                    f"the tasks are {self.task_names}"
                )
            values = [float(self.spec.get(n, 1.0)) for n in self.task_names]
        else:
            if len(self.spec) != self.num_tasks:
                raise ValueError(
                    f"StaticWeighting has {len(self.spec)} weights but there are "
                    f"{self.num_tasks} tasks {self.task_names}"
                )
            values = [float(v) for v in self.spec]
        self._weights = np.asarray(values, "float32")

    def combine_losses(self, losses, present=None):
        losses = self.check_losses(losses)
        w = ops.convert_to_tensor(self._weights) * _mask(present, self.num_tasks)
        return ops.sum(w * losses), w


class UncertaintyWeighting(Weighting):
    """Learned homoscedastic-uncertainty weights (Kendall, Gal and Cipolla 2018).

    Holds one learnable log-variance ``s_i = log sigma_i^2`` per task, trained
    jointly with the network on the objective of
    :func:`uncertainty_weighted_loss`.

    Parameters
    ----------
    form:
        ``"regression"`` (default): ``0.5 exp(-s) L + 0.5 s`` for every task, the
        common implementation. ``"paper"``: the classification form
        ``exp(-s) L + 0.5 s`` for segmentation/classification tasks (needs task
        kinds, given when ``compile`` receives :class:`~mtl_utils.tasks.Task`
        objects). Or a mapping ``{task: "regression" | "classification"}``.
    initial_log_variance:
        Starting ``s`` (0: every sigma 1).
    optimizer:
        Trains ``s``; default a copy of the model's optimizer.
    """

    def __init__(
        self,
        form: str | Mapping[str, str] = "regression",
        initial_log_variance: float = 0.0,
        optimizer: keras.optimizers.Optimizer | None = None,
    ):
        super().__init__(optimizer)
        if isinstance(form, str) and form not in ("regression", "paper"):
            raise ValueError(
                f"form must be 'regression', 'paper' or a mapping; got {form!r}"
            )
        self.form = form
        self.initial_log_variance = check_number(
            initial_log_variance, "UncertaintyWeighting initial_log_variance"
        )
        self.log_variance = None

    def create_state(self) -> None:
        if isinstance(self.form, Mapping):
            forms = dict(self.form)
            unknown = [k for k in forms if k not in self.task_names]
            bad = {
                k: v
                for k, v in forms.items()
                if v not in ("regression", "classification")
            }
            if unknown or bad:
                raise ValueError(
                    f"form mapping must use task names {self.task_names} and values "
                    f"'regression'/'classification'; got {forms}"
                )
            cls = [
                forms.get(n, "regression") == "classification" for n in self.task_names
            ]
        elif self.form == "paper":
            missing = [n for n in self.task_names if n not in self.task_kinds]
            if missing:
                raise ValueError(
                    "form='paper' needs the kind of every task; unknown for "
                    f"{missing}. "
                    "Pass Task objects to compile(losses=...) or give form as a "
                    "mapping {task: 'regression' | 'classification'}"
                )
            cls = [
                self.task_kinds[n] in ("segmentation", "classification")
                for n in self.task_names
            ]
        else:
            cls = [False] * self.num_tasks
        self.classification = np.asarray(cls, bool)
        self.log_variance = keras.Variable(
            np.full((self.num_tasks,), self.initial_log_variance, "float32"),
            trainable=True,
            name="log_variance",
        )

    @property
    def trainable_variables(self) -> list:
        return [] if self.log_variance is None else [self.log_variance]

    @property
    def sigma(self):
        """``(T,)`` current standard deviations ``exp(s / 2)``."""
        return ops.exp(0.5 * ops.convert_to_tensor(self.log_variance))

    def combine_losses(self, losses, present=None):
        losses = self.check_losses(losses)
        return uncertainty_weighted_loss(
            losses, self.log_variance, self.classification.astype("float32"), present
        )


class DynamicWeightAverage(Weighting):
    """Dynamic weight average (Liu, Johns and Davison 2019).

    Weights are 1 during the first two epochs; afterwards
    :func:`dwa_weights` of the two previous epochs' average (unweighted) task
    losses, read from the training logs (``<task>_loss``) at each epoch end.
    In a batch without labels for a task, that task gets weight 0 and the
    present ones DWA's weights among themselves (summing to their number).

    Parameters
    ----------
    temperature:
        Softness of the weights (2 in the paper).
    """

    def __init__(self, temperature: float = 2.0):
        super().__init__()
        self.temperature = check_number(
            temperature, "DynamicWeightAverage temperature", low=0.0, low_open=True
        )

    def create_state(self) -> None:
        self.weights = _state_variable(
            np.ones((self.num_tasks,), "float32"), "dwa_weights"
        )
        # The last two epochs' average losses (rows: older, newer) and how many
        # epochs were recorded: Keras state, so that it is saved and restored.
        self.recent_losses = _state_variable(
            np.zeros((2, self.num_tasks), "float32"), "dwa_recent_losses"
        )
        self.epochs_recorded = _state_variable(
            np.array(0, "int32"), "dwa_epochs_recorded"
        )

    def combine_losses(self, losses, present=None):
        losses = self.check_losses(losses)
        # DWA's weights are a softmax times the number of tasks: restricted to
        # the present tasks, the same softmax over them alone.
        mask = _mask(present, self.num_tasks)
        w = ops.copy(self.weights) * mask
        w = w * ops.sum(mask) / ops.maximum(ops.sum(w), _TINY)
        return ops.sum(w * losses), w

    def record_epoch(self, epoch_losses: Sequence[float]) -> None:
        """Add one epoch's average task losses and update the weights."""
        values = np.asarray(epoch_losses, "float32")
        if values.shape != (self.num_tasks,):
            raise ValueError(
                f"expected {self.num_tasks} epoch losses "
                f"({', '.join(self.task_names)}), got shape {values.shape}"
            )
        previous = np.asarray(self.recent_losses.numpy()[1])
        self.recent_losses.assign(np.stack([previous, values]))
        self.epochs_recorded.assign_add(1)
        if int(self.epochs_recorded.numpy()) >= 2:
            self.weights.assign(dwa_weights(values, previous, self.temperature))

    def on_epoch_end(self, epoch, logs):
        logs = logs or {}
        keys = [f"{n}_loss" for n in self.task_names]
        missing = [k for k in keys if k not in logs]
        if missing:
            raise ValueError(
                f"DynamicWeightAverage needs the epoch's task losses {keys} in the "
                f"logs; missing {missing}"
            )
        self.record_epoch([float(logs[k]) for k in keys])


class RandomLossWeighting(Weighting):
    """Random loss weights drawn every step (RLW; Lin et al. 2021).

    Parameters
    ----------
    seed:
        Seed of the strategy's :class:`keras.random.SeedGenerator`.
    """

    def __init__(self, seed: int | None = None):
        super().__init__()
        self.seed = seed

    def create_state(self) -> None:
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    def combine_losses(self, losses, present=None):
        losses = self.check_losses(losses)
        w = random_loss_weights(self.num_tasks, self.seed_generator, present)
        return ops.sum(w * losses), w


class GradNorm(Weighting):
    """Gradient normalisation (Chen et al. 2018).

    Loss weights ``w`` (initially 1) are trained on
    :func:`gradnorm_weight_gradient`, measured at the last shared layer, then
    renormalised to sum to ``T``. The network is trained on ``sum_i w_i L_i``
    with the weights of the current step.

    Partial labels: a task's initial loss ``L_i(0)`` is its loss in the first
    batch that has labels for it (``initialised`` records which tasks have
    one). In a batch without labels for a task, that task gets coefficient 0,
    its weight is left as it is, and the present tasks are updated as GradNorm
    of those tasks alone (their weights keep their sum).

    Parameters
    ----------
    alpha:
        Restoring-force strength (the paper uses 0.12 to 1.5; 1.5 on NYUv2).
    optimizer:
        Trains ``w``; default a copy of the model's optimizer.
    """

    mode = "last_shared_layer"

    def __init__(
        self, alpha: float = 1.5, optimizer: keras.optimizers.Optimizer | None = None
    ):
        super().__init__(optimizer)
        self.alpha = check_number(alpha, "GradNorm alpha", low=0.0)
        self.weights = None

    def create_state(self) -> None:
        n = self.num_tasks
        self.weights = keras.Variable(
            np.ones((n,), "float32"), trainable=True, name="gradnorm_weights"
        )
        self.initial_losses = _state_variable(
            np.zeros((n,), "float32"), "initial_losses"
        )
        self.initialised = _state_variable(np.zeros((n,), "float32"), "initialised")

    @property
    def trainable_variables(self) -> list:
        return [] if self.weights is None else [self.weights]

    def combine_gradients(
        self, gram, losses, gradients=None, present=None
    ) -> Combination:
        losses = self.check_losses(losses)
        gram = self.check_gram(gram)
        mask = _mask(present, self.num_tasks)
        # Read the state now: a converted variable is read lazily, which would see
        # the assignments below.
        w = ops.copy(self.weights)
        new = mask * (1.0 - ops.copy(self.initialised))
        initial = ops.where(new > 0, losses, ops.copy(self.initial_losses))
        self.initial_losses.assign(initial)
        self.initialised.assign(ops.maximum(ops.copy(self.initialised), mask))
        norms = ops.sqrt(ops.maximum(ops.diagonal(gram), 0.0))
        grad, _ = gradnorm_weight_gradient(w, norms, losses, initial, self.alpha, mask)
        # Every replica computes the same gradient and the optimizer sums them.
        self.apply_gradients([grad / _num_replicas()])
        stepped = ops.maximum(ops.copy(self.weights), 1e-6)
        # Renormalise the present tasks' weights to their sum before the step
        # (``T`` when every task is present); absent tasks keep theirs.
        total = ops.sum(w * mask) / ops.maximum(ops.sum(stepped * mask), _TINY)
        self.weights.assign(ops.where(mask > 0, stepped * total, w))
        return Combination(shared=w * mask, heads=w * mask)


class PCGrad(Weighting):
    """Projecting conflicting gradients (Yu et al. 2020); see :func:`pcgrad`.

    Shared parameters get the summed projected gradients (tasks visited in a
    fresh random order each step); each head gets its own task's gradient.

    Parameters
    ----------
    seed:
        Seed of the random task orders.
    update_every:
        Recompute the combination every this many steps (see
        :class:`Weighting`); default 1.
    """

    mode = "shared_parameters"

    def __init__(self, seed: int | None = None, update_every: int = 1):
        super().__init__(update_every=update_every)
        self.seed = seed

    def create_state(self) -> None:
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    def combine_gradients(
        self, gram, losses, gradients=None, present=None
    ) -> Combination:
        gram = self.check_gram(gram)
        n = self.num_tasks
        keys = keras.random.uniform((n, n), seed=self.seed_generator)
        order = ops.argsort(keys, axis=-1)
        mask = _mask(present, n)
        coef = pcgrad_coefficients(gram, order) * mask
        return Combination(shared=coef, heads=mask)


class MGDA(Weighting):
    """Multiple-gradient descent (Sener and Koltun 2018); see :func:`mgda_weights`.

    Parameters
    ----------
    upper_bound:
        ``False``: min-norm weights of the gradients of all shared parameters.
        ``True`` (MGDA-UB): of the gradients with respect to the shared
        representation ``z`` (the encoder output), an upper bound that needs no
        per-task backward pass through the encoder.
    normalization:
        Gradient normaliser ``n_i`` applied before solving, as in the authors'
        ``gradient_normalizers``: ``"none"`` (1), ``"l2"`` (``||g_i||``),
        ``"loss"`` (``L_i``) or ``"loss+"`` (``L_i ||g_i||``). The min-norm
        weights ``a`` are those of the normalised gradients ``g_i / n_i``.
    weights_on:
        What the weights ``a`` multiply. ``"losses"`` (default; Sener and
        Koltun's code): the network is trained on ``sum_i a_i L_i``, so the
        shared update is ``sum_i a_i g_i`` and head ``i`` gets ``a_i`` times its
        gradient. ``"normalized_gradients"`` (LibMTL's ``MGDA``): the shared
        update is ``sum_i a_i g_i / n_i`` and every head its own gradient. The
        two agree for ``normalization="none"`` except for the heads.
    update_every:
        Full MGDA only: recompute the weights every this many steps (see
        :class:`Weighting`); default 1.

    Tasks without labels in the batch get weight 0; the others get the
    min-norm weights of the present tasks alone.
    """

    normalizations = ("none", "l2", "loss", "loss+")

    def __init__(
        self,
        upper_bound: bool = False,
        normalization: str = "none",
        update_every: int = 1,
        weights_on: str = "losses",
    ):
        super().__init__(update_every=update_every)
        if normalization not in self.normalizations:
            raise ValueError(
                "normalization must be 'none', 'l2', 'loss' or 'loss+'; got "
                f"{normalization!r}"
            )
        if weights_on not in ("losses", "normalized_gradients"):
            raise ValueError(
                "weights_on must be 'losses' (Sener and Koltun) or "
                f"'normalized_gradients' (LibMTL); got {weights_on!r}"
            )
        self.upper_bound = bool(upper_bound)
        self.normalization = normalization
        self.weights_on = weights_on
        self.mode = "representation" if upper_bound else "shared_parameters"

    def normalizers(self, gram, losses, present=None):
        """``(T,)`` normalisers ``n_i`` (1 for absent tasks)."""
        mask = _mask(present, self.num_tasks)
        norms = ops.sqrt(ops.maximum(ops.diagonal(self.check_gram(gram)), 0.0))
        losses = self.check_losses(losses)
        d = {
            "none": ops.ones_like(norms),
            "l2": norms,
            "loss": losses,
            "loss+": losses * norms,
        }[self.normalization]
        return ops.where(mask > 0, ops.maximum(d, _TINY), 1.0)

    def combine_gradients(
        self, gram, losses, gradients=None, present=None
    ) -> Combination:
        gram = self.check_gram(gram)
        mask = _mask(present, self.num_tasks)
        d = self.normalizers(gram, losses, mask)
        scaled = gram / (d[:, None] * d[None, :])
        w = mgda_weights_from_gram(scaled, present=mask)
        if self.weights_on == "losses":
            return Combination(shared=w, heads=w)
        return Combination(shared=w / d, heads=mask)

    def __repr__(self) -> str:
        return (
            f"MGDA(upper_bound={self.upper_bound}, "
            f"normalization={self.normalization!r}, weights_on={self.weights_on!r})"
        )


class CAGrad(Weighting):
    """Conflict-averse gradient descent (Liu et al. 2021); see :func:`cagrad`.

    The shared update is ``K * cagrad(G, c)`` over the ``K`` tasks with labels
    in the batch, so that ``c = 0`` equals equal weighting (the gradient of the
    summed loss); heads get their own gradients. Absent tasks get coefficient 0.

    Parameters
    ----------
    c:
        Ball radius (0.4 on NYUv2 in the paper).
    rescale:
        Divide by ``1 + c^2`` as the authors' code does.
    iterations:
        Solver steps beyond :data:`CAGRAD_EXACT_MAX_TASKS` tasks
        (:func:`cagrad_coefficients`).
    update_every:
        Recompute the combination every this many steps (see
        :class:`Weighting`); default 1.
    """

    mode = "shared_parameters"

    def __init__(
        self,
        c: float = 0.4,
        rescale: bool = True,
        iterations: int = 200,
        update_every: int = 1,
    ):
        super().__init__(update_every=update_every)
        self.c = check_number(c, "CAGrad c", low=0.0)
        self.rescale = bool(rescale)
        self.iterations = int(iterations)

    def combine_gradients(
        self, gram, losses, gradients=None, present=None
    ) -> Combination:
        gram = self.check_gram(gram)
        mask = _mask(present, self.num_tasks)
        coef = cagrad_coefficients(
            gram, self.c, self.rescale, self.iterations, present=mask
        )
        return Combination(shared=ops.sum(mask) * coef, heads=mask)

    def __repr__(self) -> str:
        return f"CAGrad(c={self.c})"


class _GramSolver(Weighting):
    """Strategies whose shared coefficients are a function of the Gram matrix
    of the tasks present in the batch (``solve(gram, present)``); absent tasks
    get coefficient 0.

    ``heads_follow``: the heads are trained with the same coefficients (the
    network minimises ``sum_i a_i L_i``), else each with its own gradient.
    """

    mode = "shared_parameters"
    heads_follow = False

    def __init__(
        self,
        update_every: int = 1,
        optimizer: keras.optimizers.Optimizer | None = None,
    ):
        super().__init__(optimizer, update_every=update_every)

    def solve(self, gram, present):
        raise NotImplementedError

    def combine_gradients(
        self, gram, losses, gradients=None, present=None
    ) -> Combination:
        mask = _mask(present, self.num_tasks)
        coef = self.solve(self.check_gram(gram), mask)
        return Combination(shared=coef, heads=coef if self.heads_follow else mask)


class _LearntLogScales:
    """IMTL-L's learnt log scales ``s`` (one per task, initially 0) as the
    strategy's trainable variables: shared by :class:`IMTL` and :class:`IMTLL`.
    """

    def create_state(self) -> None:
        self.log_scales = keras.Variable(
            np.zeros((self.num_tasks,), "float32"),
            trainable=True,
            name="imtl_log_scales",
        )

    @property
    def trainable_variables(self) -> list:
        return [] if self.log_scales is None else [self.log_scales]


class IMTL(_LearntLogScales, _GramSolver):
    """Impartial MTL (Liu et al. 2021); see :func:`imtl_weights`.

    Parameters
    ----------
    loss_scale:
        ``False`` (default): IMTL-G, the shared update ``a @ G`` with equal
        projections on every task's direction; heads get their own gradients.
        ``True``: the paper's hybrid IMTL. Every loss is scaled as in IMTL-L
        (:func:`imtl_l_loss`: ``exp(s_i) L_i - s_i``, ``s`` learnt), the heads
        are trained on the scaled losses and IMTL-G combines the scaled
        gradients ``exp(s_i) g_i``. (IMTL-L alone is :class:`IMTLL`.)
    optimizer:
        Trains ``s`` (``loss_scale=True``); default a copy of the model's.
    update_every:
        See :class:`Weighting`.
    """

    def __init__(
        self,
        loss_scale: bool = False,
        optimizer: keras.optimizers.Optimizer | None = None,
        update_every: int = 1,
    ):
        super().__init__(update_every, optimizer)
        self.loss_scale = bool(loss_scale)
        self.log_scales = None

    def create_state(self) -> None:
        if self.loss_scale:
            super().create_state()

    def solve(self, gram, present):
        return imtl_weights(gram, present)

    def combine_gradients(
        self, gram, losses, gradients=None, present=None
    ) -> Combination:
        if not self.loss_scale:
            return super().combine_gradients(gram, losses, gradients, present)
        gram = self.check_gram(gram)
        losses = self.check_losses(losses)
        mask = _mask(present, self.num_tasks)
        scale = ops.exp(ops.copy(self.log_scales)) * mask
        # d/ds of exp(s) L - s; every replica computes the same gradient.
        self.apply_gradients([(scale * losses - mask) / _num_replicas()])
        gram = gram * scale[:, None] * scale[None, :]
        return Combination(shared=imtl_weights(gram, mask) * scale, heads=scale)

    def __repr__(self) -> str:
        return f"IMTL(loss_scale={self.loss_scale})"


class IMTLL(_LearntLogScales, Weighting):
    """IMTL-L alone (Liu et al. 2021): every task loss scaled to
    ``exp(s_i) L_i - s_i`` with learnt ``s``; see :func:`imtl_l_loss`.

    Parameters
    ----------
    optimizer:
        Trains ``s``; default a copy of the model's optimizer.
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer | None = None):
        super().__init__(optimizer)
        self.log_scales = None

    def combine_losses(self, losses, present=None):
        losses = self.check_losses(losses)
        return imtl_l_loss(losses, self.log_scales, present)


class NashMTL(_GramSolver):
    """Nash bargaining (Navon et al. 2022); see :func:`nash_mtl_weights`.

    The network is trained on ``sum_i a_i L_i``, and the shared update is
    clipped to norm ``max_norm`` as both references do (``clip_grad_norm_`` on
    the shared parameters, default 1.0; 0 or ``None`` turns it off). With
    ``update_every > 1`` the clipped coefficients are reused until the next
    recomputation.
    """

    heads_follow = True

    def __init__(self, max_norm: float | None = 1.0, update_every: int = 1):
        super().__init__(update_every)
        self.max_norm = float(max_norm or 0.0)

    def solve(self, gram, present):
        return nash_mtl_weights(gram, present=present)

    def combine_gradients(
        self, gram, losses, gradients=None, present=None
    ) -> Combination:
        combo = super().combine_gradients(gram, losses, gradients, present)
        if self.max_norm <= 0:
            return combo
        a = combo.shared
        norm = ops.sqrt(ops.maximum(ops.sum(a * ops.matmul(_as_float(gram), a)), 0.0))
        clip = ops.minimum(1.0, self.max_norm / ops.maximum(norm, _TINY))
        return Combination(shared=a * clip, heads=combo.heads)

    def __repr__(self) -> str:
        return f"NashMTL(max_norm={self.max_norm})"


class AlignedMTL(_GramSolver):
    """Aligned-MTL (Senushkin et al. 2023); see :func:`aligned_mtl_coefficients`.
    Heads get their own gradients."""

    def solve(self, gram, present):
        return aligned_mtl_coefficients(gram, present=present)


_BY_NAME = {
    "equal": EqualWeighting,
    "uncertainty": UncertaintyWeighting,
    "dwa": DynamicWeightAverage,
    "rlw": RandomLossWeighting,
    "gradnorm": GradNorm,
    "pcgrad": PCGrad,
    "mgda": MGDA,
    "mgda_ub": lambda: MGDA(upper_bound=True),
    "cagrad": CAGrad,
    "imtl": IMTL,
    "imtl_l": IMTLL,
    "imtl_hybrid": lambda: IMTL(loss_scale=True),
    "nash_mtl": NashMTL,
    "aligned_mtl": AlignedMTL,
}


def get(identifier: str | Weighting | None) -> Weighting:
    """A strategy from a short name (``"pcgrad"``, ``"mgda_ub"``, ...) or as is.

    ``None`` gives :class:`EqualWeighting`.
    """
    if identifier is None:
        return EqualWeighting()
    if isinstance(identifier, Weighting):
        return identifier
    if isinstance(identifier, str) and identifier.lower() in _BY_NAME:
        return _BY_NAME[identifier.lower()]()
    raise ValueError(
        f"unknown weighting {identifier!r}; expected a Weighting or one of "
        f"{sorted(_BY_NAME)}"
    )
