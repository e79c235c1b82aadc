"""Weighting strategies: pure cores against closed forms, NumPy references and the
papers' toy problems."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from mtl_utils import toys
from mtl_utils import weighting as W

RNG = np.random.default_rng(42)


def _np(x):
    return np.asarray(x, dtype=np.float64)


def compiled(fn, **kwargs):
    """``fn`` as a TF graph: iterative solvers run their loops compiled, not eagerly."""
    return tf.function(lambda *args: fn(*args, **kwargs))


# ----------------------------------------------------------------- NumPy references


def pcgrad_reference(G, order):
    """Yu et al. 2020, Algorithm 1, on full gradient vectors."""
    out = []
    for i, g in enumerate(G):
        g = g.copy()
        for j in order[i]:
            if j == i:
                continue
            dot = g @ G[j]
            if dot < 0:
                g = g - dot / (G[j] @ G[j]) * G[j]
        out.append(g)
    return np.sum(out, axis=0)


def min_norm_reference(M):
    """Exact min-norm point on the simplex by enumerating supports (KKT)."""
    n = len(M)
    best, best_w = np.inf, None
    for k in range(1, n + 1):
        for support in itertools.combinations(range(n), k):
            s = list(support)
            kkt = np.zeros((k + 1, k + 1))
            kkt[:k, :k] = M[np.ix_(s, s)]
            kkt[:k, k] = kkt[k, :k] = 1.0
            rhs = np.zeros(k + 1)
            rhs[k] = 1.0
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:k]
            if np.all(sol >= -1e-12):
                w = np.zeros(n)
                w[s] = sol
                value = w @ M @ w
                if value < best - 1e-12:
                    best, best_w = value, w
    return best_w


def simplex_projection_reference(v):
    """Bisection on the threshold theta of w = max(v - theta, 0), sum(w) = 1."""
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(v - mid, 0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.maximum(v - 0.5 * (lo + hi), 0)


def simplex_grid(n, steps):
    if n == 2:
        t = np.linspace(0, 1, steps)
        return np.stack([t, 1 - t], 1)
    a, b = np.meshgrid(np.linspace(0, 1, steps), np.linspace(0, 1, steps))
    w = np.stack([a.ravel(), b.ravel(), 1 - a.ravel() - b.ravel()], 1)
    return w[w[:, 2] >= 0]


def cagrad_reference(G, c, steps):
    """CAGrad direction from a brute-force grid solution of the dual."""
    M = G @ G.T
    n = len(G)
    b = np.full(n, 1 / n)
    g0 = b @ G
    sqrt_phi = c * np.linalg.norm(g0)
    w = simplex_grid(n, steps)
    f = w @ M @ b + sqrt_phi * np.sqrt(np.maximum(np.einsum("ki,ij,kj->k", w, M, w), 0))
    wb = w[np.argmin(f)]
    gw = wb @ G
    return g0 + sqrt_phi / np.linalg.norm(gw) * gw


# -------------------------------------------------------------------------- PCGrad


def test_pcgrad_matches_closed_form_for_two_conflicting_gradients():
    g1 = np.array([1.0, 0.3, -0.5])
    g2 = np.array([-0.8, 0.6, 0.2])
    assert g1 @ g2 < 0
    expected = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g1 @ g2) / (g1 @ g1) * g1)
    np.testing.assert_allclose(W.pcgrad(np.stack([g1, g2])), expected, rtol=1e-5)


def test_pcgrad_of_two_tasks_has_nonnegative_dot_with_each_gradient():
    for _ in range(20):
        G = RNG.normal(size=(2, 5))
        d = _np(W.pcgrad(G))
        assert np.all(G @ d >= -1e-5)


def test_pcgrad_without_conflict_is_the_summed_gradient():
    G = np.array([[1.0, 0.2], [0.5, 1.0], [0.1, 0.1]])
    np.testing.assert_allclose(W.pcgrad(G), G.sum(0), rtol=1e-6)


@pytest.mark.parametrize("num_tasks", [3, 4, 5])
def test_pcgrad_matches_reference_algorithm_for_random_orders(num_tasks):
    G = RNG.normal(size=(num_tasks, 7))
    order = np.stack([RNG.permutation(num_tasks) for _ in range(num_tasks)])
    np.testing.assert_allclose(
        W.pcgrad(G, order), pcgrad_reference(G, order), rtol=1e-4, atol=1e-5
    )


# ---------------------------------------------------------------------------- MGDA


def test_mgda_two_task_closed_form_equals_frank_wolfe_and_brute_force():
    frank_wolfe = compiled(W.mgda_weights, method="frank_wolfe")
    for _ in range(10):
        G = RNG.normal(size=(2, 4))
        closed = _np(W.mgda_weights(G))
        general = _np(frank_wolfe(G.astype("float32")))
        grid = simplex_grid(2, 100001)
        norms = np.linalg.norm(grid @ G, axis=1)
        np.testing.assert_allclose(closed, general, atol=1e-5)
        np.testing.assert_allclose(closed, grid[np.argmin(norms)], atol=1e-4)


def test_min_norm_two_matches_textbook_formula():
    g1, g2 = np.array([2.0, 0.0]), np.array([-1.0, 1.0])
    gamma = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
    M = np.stack([g1, g2]) @ np.stack([g1, g2]).T
    np.testing.assert_allclose(W.min_norm_two(M), [gamma, 1 - gamma], rtol=1e-6)


@pytest.mark.parametrize("num_tasks", [3, 4, 6])
def test_mgda_weights_match_exact_active_set_solution(num_tasks):
    solve = compiled(W.mgda_weights, max_iterations=2000, tolerance=1e-9)
    for _ in range(5):
        G = RNG.normal(size=(num_tasks, 8)).astype("float32")
        w = _np(solve(G))
        ref = min_norm_reference(G @ G.T)
        assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
        norm, ref_norm = np.linalg.norm(w @ G), np.linalg.norm(ref @ G)
        assert norm <= ref_norm + 2e-3 * np.abs(G).max()


def test_mgda_min_norm_is_zero_for_opposing_gradients():
    G = np.array([[1.0, 2.0], [-0.5, -1.0]])
    w = _np(W.mgda_weights(G))
    np.testing.assert_allclose(w @ G, 0.0, atol=1e-6)
    np.testing.assert_allclose(w, [1 / 3, 2 / 3], rtol=1e-5)


def test_project_onto_simplex_matches_bisection_reference():
    for n in (1, 2, 5, 9):
        v = RNG.normal(size=n) * 2
        w = _np(W.project_onto_simplex(v))
        np.testing.assert_allclose(w, simplex_projection_reference(v), atol=1e-5)
        assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5


# -------------------------------------------------------------------------- CAGrad


def test_cagrad_with_zero_radius_is_the_mean_gradient():
    G = RNG.normal(size=(3, 5))
    np.testing.assert_allclose(W.cagrad(G, c=0.0), G.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("c", [0.2, 0.5, 1.0])
def test_cagrad_two_tasks_matches_brute_force_dual(c):
    for conflict in (False, True):
        G = RNG.normal(size=(2, 4))
        if conflict:
            G[1] = -0.7 * G[0] + 0.2 * RNG.normal(size=4)
        d = _np(W.cagrad(G, c=c, rescale=False))
        np.testing.assert_allclose(d, cagrad_reference(G, c, 200001), atol=2e-4)


def test_cagrad_iterative_solver_maximises_worst_task_improvement_in_the_ball():
    # Primal check (Liu et al. 2021, Eq. 3): d maximises min_i g_i . d over the
    # ball ||d - g0|| <= c ||g0||; compare with 200k random points of the ball.
    c = 0.5
    solve = compiled(W.cagrad, c=c, rescale=False)
    for _ in range(3):
        G = RNG.normal(size=(3, 3)).astype("float32")
        d = _np(solve(G))
        g0 = G.mean(0)
        radius = c * np.linalg.norm(g0)
        assert np.linalg.norm(d - g0) <= radius * (1 + 1e-4)
        u = RNG.normal(size=(200000, 3))
        u *= (RNG.random((200000, 1)) ** (1 / 3)) / np.linalg.norm(
            u, axis=1, keepdims=True
        )
        best_sampled = (G @ (g0 + radius * u).T).min(0).max()
        assert (G @ d).min() >= best_sampled - 1e-3 * np.linalg.norm(g0) ** 2


def test_cagrad_iterative_solver_agrees_with_closed_form_for_two_tasks():
    iterate = compiled(W.cagrad_coefficients, c=0.5, force_iterative=True)
    for _ in range(5):
        G = RNG.normal(size=(2, 5))
        M = (G @ G.T).astype("float32")
        exact = _np(W.cagrad_coefficients(M, 0.5))
        iterative = _np(iterate(M))
        np.testing.assert_allclose(
            iterative @ G, exact @ G, atol=5e-2 * np.abs(G).max()
        )


# ---------------------------------------------------- IMTL, Nash-MTL and Aligned-MTL


def test_imtl_update_has_equal_projection_on_every_task_direction():
    G = RNG.normal(size=(4, 9))
    a = _np(W.imtl_weights(G @ G.T))
    u = G / np.linalg.norm(G, axis=1, keepdims=True)
    projections = u @ (a @ G)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-4)
    np.testing.assert_allclose(a.sum(), 1.0, rtol=1e-5)


def test_nash_mtl_weights_solve_the_bargaining_equation():
    G = RNG.normal(size=(4, 10)) * np.array([[0.1], [1.0], [3.0], [10.0]])
    M = G @ G.T
    a = _np(W.nash_mtl_weights(M))
    assert np.all(a > 0)
    np.testing.assert_allclose(a * (M @ a), 1.0, rtol=1e-3)


def test_aligned_mtl_gradients_are_orthogonal_with_equal_norms():
    G = RNG.normal(size=(3, 6)) * np.array([[0.5], [1.0], [4.0]])
    M = G @ G.T
    lam, vec = np.linalg.eigh(M)
    B = np.sqrt(lam.min()) * vec @ np.diag(lam**-0.5) @ vec.T
    aligned = B @ G
    np.testing.assert_allclose(aligned @ aligned.T, lam.min() * np.eye(3), atol=1e-8)
    np.testing.assert_allclose(W.aligned_mtl_coefficients(M), B @ np.ones(3), rtol=1e-3)


def test_aligned_mtl_of_orthogonal_equal_norm_gradients_is_the_sum():
    G = np.eye(3) * 2.0
    np.testing.assert_allclose(
        W.aligned_mtl_coefficients(G @ G.T), np.ones(3), rtol=1e-5
    )


# ------------------------------------------------------------- loss-based cores


def test_uncertainty_weighted_loss_matches_kendall_formulas():
    losses = np.array([0.7, 2.0, 0.1])
    s = np.array([0.3, -1.0, 0.5])  # log sigma^2
    sigma2 = np.exp(s)
    cls = np.array([False, True, False])
    expected = (
        losses[0] / (2 * sigma2[0])
        + np.log(np.sqrt(sigma2[0]))
        + losses[1] / sigma2[1]
        + np.log(np.sqrt(sigma2[1]))
        + losses[2] / (2 * sigma2[2])
        + np.log(np.sqrt(sigma2[2]))
    )
    total, weights = W.uncertainty_weighted_loss(losses, s, cls)
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    np.testing.assert_allclose(
        weights, [0.5 / sigma2[0], 1 / sigma2[1], 0.5 / sigma2[2]], rtol=1e-5
    )


def test_uncertainty_regression_form_is_stationary_at_sigma_squared_equal_loss():
    losses = tf.constant([0.25, 4.0])
    s = tf.Variable(tf.math.log(losses))
    with tf.GradientTape() as tape:
        total, _ = W.uncertainty_weighted_loss(losses, s)
    np.testing.assert_allclose(tape.gradient(total, s), 0.0, atol=1e-6)


def test_dwa_weights_match_liu_et_al_equation():
    prev, older = np.array([0.5, 2.0, 1.0]), np.array([1.0, 2.5, 0.8])
    r = prev / older
    expected = 3 * np.exp(r / 2) / np.exp(r / 2).sum()
    np.testing.assert_allclose(W.dwa_weights(prev, older, 2.0), expected, rtol=1e-6)


def test_dwa_strategy_keeps_weights_one_for_two_epochs_then_follows_formula():
    dwa = W.DynamicWeightAverage()
    dwa.build(["a", "b"])
    epochs = [np.array([1.0, 4.0]), np.array([0.5, 3.9]), np.array([0.4, 3.0])]
    dwa.record_epoch(epochs[0])
    np.testing.assert_allclose(dwa.weights.numpy(), [1, 1])  # for epoch 2
    dwa.record_epoch(epochs[1])
    r = epochs[1] / epochs[0]
    np.testing.assert_allclose(
        dwa.weights.numpy(), 2 * np.exp(r / 2) / np.exp(r / 2).sum(), rtol=1e-6
    )


def test_random_loss_weights_lie_on_the_simplex_and_change_every_draw():
    import keras

    gen = keras.random.SeedGenerator(0)
    a, b = _np(W.random_loss_weights(4, gen)), _np(W.random_loss_weights(4, gen))
    for w in (a, b):
        assert np.all(w > 0) and abs(w.sum() - 1) < 1e-6
    assert not np.allclose(a, b)


def test_gradnorm_weight_gradient_matches_autodiff_of_the_gradnorm_loss():
    w = tf.Variable([0.5, 1.5, 1.0])
    norms = tf.constant([2.0, 0.3, 1.1])
    losses, initial = tf.constant([0.4, 0.9, 0.2]), tf.constant([1.0, 1.0, 0.5])
    alpha = 1.5
    with tf.GradientTape() as tape:
        g = w * norms
        ratio = losses / initial
        target = tf.stop_gradient(
            tf.reduce_mean(g) * (ratio / tf.reduce_mean(ratio)) ** alpha
        )
        l_grad = tf.reduce_sum(tf.abs(g - target))
    expected = tape.gradient(l_grad, w)
    grad, value = W.gradnorm_weight_gradient(w, norms, losses, initial, alpha)
    np.testing.assert_allclose(grad, expected, rtol=1e-6)
    np.testing.assert_allclose(value, l_grad, rtol=1e-6)


# -------------------------------------------------------------------- bad input


def test_static_weighting_with_wrong_number_of_weights_raises():
    with pytest.raises(ValueError, match=r"3 weights but there are 4 tasks"):
        W.StaticWeighting([1, 2, 3]).build(["a", "b", "c", "d"])


def test_static_weighting_with_unknown_task_name_raises():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['dpeth'\]"):
        W.StaticWeighting({"dpeth": 2.0}).build(["depth", "normal"])


@pytest.mark.parametrize(
    "strategy", [W.EqualWeighting(), W.StaticWeighting([1, 2]), W.RandomLossWeighting()]
)
def test_combine_losses_with_wrong_number_of_tasks_names_the_tasks(strategy):
    strategy.build(["depth", "normal"])
    with pytest.raises(ValueError, match=r"expected \(2,\).*depth, normal"):
        strategy.combine_losses(np.ones(3))


def test_gradient_strategy_with_wrong_gram_size_raises():
    strategy = W.MGDA()
    strategy.build(["a", "b", "c"])
    with pytest.raises(ValueError, match=r"gram has shape \(2, 2\); expected \(3, 3\)"):
        strategy.combine_gradients(np.eye(2), np.ones(2))


def test_uncertainty_paper_form_without_task_kinds_raises():
    with pytest.raises(ValueError, match="needs the kind of every task"):
        W.UncertaintyWeighting(form="paper").build(["depth"], {}, None)


def test_pure_cores_reject_a_gradient_vector():
    with pytest.raises(ValueError, match=r"expected a \(T, P\) matrix"):
        W.pcgrad(np.ones(5))


def test_get_unknown_strategy_lists_known_names():
    with pytest.raises(ValueError, match="pcgrad"):
        W.get("pc-grad")


# ------------------------------------------------------------------ toy problems


def _pcgrad_landscape_np(t):
    l1 = 20 * np.log(np.maximum(np.abs(0.5 * t[..., 0] + np.tanh(t[..., 1])), 5e-6))
    l2 = 25 * np.log(np.maximum(np.abs(0.5 * t[..., 0] - np.tanh(t[..., 1]) + 2), 5e-6))
    return np.stack([l1, l2], -1)


def _cagrad_landscape_np(x):
    x1, x2 = x[..., 0], x[..., 1]
    f1 = np.log(np.maximum(np.abs(0.5 * (-x1 - 7) - np.tanh(-x2)), 5e-6)) + 6
    f2 = np.log(np.maximum(np.abs(0.5 * (-x1 + 3) + np.tanh(-x2) + 2), 5e-6)) + 6
    c1 = np.maximum(np.tanh(x2 * 0.5), 0)
    c2 = np.maximum(np.tanh(-x2 * 0.5), 0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    return np.stack([f1 * c1 + f1_sq * c2, f2 * c1 + f2_sq * c2], -1)


@pytest.mark.parametrize(
    "landscape, reference",
    [
        (toys.pcgrad_landscape, _pcgrad_landscape_np),
        (toys.cagrad_landscape, _cagrad_landscape_np),
    ],
)
def test_toy_landscapes_and_gradients_match_numpy_reference(landscape, reference):
    points = RNG.uniform(-4, 4, (50, 2))
    np.testing.assert_allclose(
        landscape(points), reference(points), rtol=1e-4, atol=1e-4
    )
    losses, G = toys.toy_gradients(landscape, points)
    h = 1e-4
    for k in range(2):
        step = np.zeros(2)
        step[k] = h
        fd = (reference(points + step) - reference(points - step)) / (2 * h)
        np.testing.assert_allclose(G[..., k], fd, rtol=2e-2, atol=2e-2)


def test_non_dominated_matches_brute_force_pareto_check():
    losses = np.round(RNG.normal(size=(300, 2)), 1)  # with ties
    dominated = [
        np.any(np.all(losses <= p, axis=1) & np.any(losses < p, axis=1)) for p in losses
    ]
    np.testing.assert_array_equal(toys.non_dominated(losses), ~np.array(dominated))


def test_pcgrad_escapes_the_valley_where_the_summed_gradient_stalls():
    # Yu et al. 2020, Figure 1: Adam (lr 1e-3) from (0.5, -3) on L1 + L2.
    steps, every = 500_000, 10_000
    runs = {
        name: toys.optimize_toy(
            toys.pcgrad_landscape, name, toys.PCGRAD_START, steps, record_every=every
        )
        for name in ("sum", "pcgrad")
    }
    last = slice(-10, None)  # the last 100k steps
    total = {k: float(losses[last].sum(-1).mean()) for k, (_, losses) in runs.items()}
    sum_path = runs["sum"][0]
    # The sum stalls: it moves less than 0.3 during the last 400k steps ...
    assert np.linalg.norm(sum_path[-1] - sum_path[10]) < 0.3
    # ... while PCGrad reaches the valley floor near theta1 = -2 (the optimum) and
    # a clearly lower total loss.
    assert abs(runs["pcgrad"][0][-1, 0] + 2.0) < 0.05
    assert total["pcgrad"] < total["sum"] - 100.0, total


def _dominated_by(point_losses, grid_losses, tol):
    better = (grid_losses[:, 0] < point_losses[0] - tol) & (
        grid_losses[:, 1] < point_losses[1] - tol
    )
    return bool(better.any())


@pytest.fixture(scope="module")
def cagrad_grid_losses():
    a = np.linspace(-10, 10, 1601)
    x1, x2 = np.meshgrid(a, a)
    return _cagrad_landscape_np(np.stack([x1.ravel(), x2.ravel()], -1))


@pytest.mark.parametrize("method", ["cagrad", "mgda"])
def test_cagrad_and_mgda_end_on_the_pareto_front_from_the_paper_starts(
    method, cagrad_grid_losses
):
    # Liu et al. 2021, Figure 1 (also Navon et al. 2022): Adam lr 1e-3, 100k steps.
    traj, losses = toys.optimize_toy(
        toys.cagrad_landscape, method, toys.CAGRAD_STARTS, 100_000, record_every=10_000
    )
    for end, end_losses in zip(traj[-1], losses[-1], strict=True):
        # Pareto optimal: no point of a fine grid improves both objectives.
        assert not _dominated_by(end_losses, cagrad_grid_losses, tol=0.05), end
        assert -7.0 - 1e-2 <= end[0] <= 7.0 + 1e-2 and abs(end[1] + 8.36) < 0.1


def test_pareto_check_rejects_where_the_summed_gradient_gets_stuck(cagrad_grid_losses):
    traj, losses = toys.optimize_toy(
        toys.cagrad_landscape,
        "sum",
        toys.CAGRAD_STARTS[0],
        100_000,
        record_every=50_000,
    )
    assert _dominated_by(losses[-1], cagrad_grid_losses, tol=1.0)


def test_state_variables_are_every_keras_variable_a_resume_needs():
    """GradNorm: its weights, first losses and which tasks have one, plus every
    variable of its optimizer (Keras' own list); PCGrad: its seed generator's."""
    gradnorm = W.GradNorm(optimizer=keras.optimizers.Adam(1e-2))
    gradnorm.build(["a", "b"])
    expected = [gradnorm.weights, gradnorm.initial_losses, gradnorm.initialised]
    expected += list(gradnorm.optimizer.variables)
    assert [id(v) for v in gradnorm.state_variables()] == [id(v) for v in expected]
    pcgrad = W.PCGrad(seed=3)
    pcgrad.build(["a", "b"])
    assert [id(v) for v in pcgrad.state_variables()] == [
        id(pcgrad.seed_generator.state)
    ]


# ---------------------------------------------------- absent tasks (partial labels)

NAMES = ["a", "b", "c", "d"]
ABSENT = 2  # task "c" has no labels in the batch
PRESENT = np.array([1.0, 1.0, 0.0, 1.0], "float32")
KEEP = [0, 1, 3]


def _sgd():
    return keras.optimizers.SGD(0.1)


def _strategies_with_state():
    """Strategies (factories) and how to give both copies the same state."""

    def uncertainty(strategy, keep):
        strategy.log_variance.assign(np.array([0.3, -0.2, 0.1, 0.5])[keep])

    def dwa(strategy, keep):
        strategy.record_epoch(np.array([1.0, 4.0, 2.0, 0.5])[keep])
        strategy.record_epoch(np.array([0.6, 3.9, 1.0, 0.4])[keep])

    def gradnorm(strategy, keep):
        strategy.weights.assign(np.array([0.7, 1.4, 1.2, 0.7])[keep])

    def imtl_l(strategy, keep):
        strategy.log_scales.assign(np.array([0.2, -0.4, 0.3, 0.1])[keep])

    return {
        "equal": (W.EqualWeighting, None),
        "static": (lambda: W.StaticWeighting([2.0, 0.5, 3.0, 1.5]), "static"),
        "uncertainty": (
            lambda: W.UncertaintyWeighting(optimizer=_sgd()),
            uncertainty,
        ),
        "dwa": (W.DynamicWeightAverage, dwa),
        "imtl_l": (lambda: W.IMTLL(optimizer=_sgd()), imtl_l),
        "gradnorm": (lambda: W.GradNorm(optimizer=_sgd()), gradnorm),
        "mgda": (W.MGDA, None),
        "mgda_l2": (lambda: W.MGDA(normalization="l2"), None),
        "mgda_loss+_libmtl": (
            lambda: W.MGDA(normalization="loss+", weights_on="normalized_gradients"),
            None,
        ),
        "cagrad": (W.CAGrad, None),
        "imtl": (W.IMTL, None),
        "imtl_hybrid": (lambda: W.IMTL(loss_scale=True, optimizer=_sgd()), imtl_l),
        "nash_mtl": (W.NashMTL, None),
        "aligned_mtl": (W.AlignedMTL, None),
    }


def _batch_without_task_c():
    G = RNG.normal(size=(4, 12)) * np.array([[0.5], [2.0], [1.0], [8.0]])
    G[ABSENT] = 0.0  # no labels: zero loss and zero gradient
    losses = np.array([0.8, 2.5, 0.0, 0.3])
    return G.astype("float32"), losses.astype("float32")


def _build(factory, setup, keep):
    strategy = factory()
    if setup == "static":  # the weights given in task order
        spec = strategy.spec
        strategy = W.StaticWeighting([spec[k] for k in keep])
    strategy.build([NAMES[k] for k in keep])
    if callable(setup):
        setup(strategy, keep)
    return strategy


def _step(strategy, G, losses, present):
    if strategy.mode == "losses":
        total, weights = strategy.combine_losses(losses, present)
        return {"total": total, "weights": weights}
    gram = G @ G.T
    combo = strategy.combine_gradients(gram, losses, G, present)
    return {"shared": combo.shared, "heads": combo.heads}


@pytest.mark.parametrize("name", sorted(_strategies_with_state()))
def test_absent_task_gets_zero_and_the_rest_equals_the_present_tasks_alone(name):
    factory, setup = _strategies_with_state()[name]
    G, losses = _batch_without_task_c()
    full = _build(factory, setup, list(range(4)))
    alone = _build(factory, setup, KEEP)
    got = _step(full, G, losses, PRESENT)
    want = _step(alone, G[KEEP], losses[KEEP], None)
    for key, value in got.items():
        value = _np(value)
        if key == "total":
            np.testing.assert_allclose(value, _np(want[key]), rtol=1e-5)
            continue
        assert value[ABSENT] == 0.0, (key, value)
        np.testing.assert_allclose(
            value[KEEP], _np(want[key]), rtol=2e-4, atol=1e-6, err_msg=key
        )
    # Learnt state moves as for the present tasks alone; the absent task's stays.
    for v_full, v_alone in zip(
        full.trainable_variables, alone.trainable_variables, strict=True
    ):
        np.testing.assert_allclose(
            v_full.numpy()[KEEP], v_alone.numpy(), rtol=1e-5, atol=1e-7
        )
    if name == "gradnorm":
        assert full.weights.numpy()[ABSENT] == np.float32(1.2)


def test_pcgrad_with_an_absent_task_equals_pcgrad_of_the_present_tasks():
    # Two present tasks: PCGrad does not depend on the random visiting order.
    G, losses = _batch_without_task_c()
    G, losses, present = G[:3], losses[:3], PRESENT[:3].copy()
    present[1], present[2] = 0.0, 1.0
    G[1], G[2] = 0.0, -G[0] + 0.3 * G[2]
    full, alone = W.PCGrad(seed=1), W.PCGrad(seed=2)
    full.build(["a", "b", "c"])
    alone.build(["a", "c"])
    got = _step(full, G, losses, present)
    want = _step(alone, G[[0, 2]], losses[[0, 2]], None)
    for key in ("shared", "heads"):
        value = _np(got[key])
        assert value[1] == 0.0
        np.testing.assert_allclose(value[[0, 2]], _np(want[key]), rtol=1e-5)


def test_random_loss_weights_of_present_tasks_are_the_softmax_of_their_draws():
    z = _np(keras.random.normal((4,), seed=keras.random.SeedGenerator(5)))
    w = _np(W.random_loss_weights(4, keras.random.SeedGenerator(5), PRESENT))
    expected = np.exp(z[KEEP]) / np.exp(z[KEEP]).sum()
    assert w[ABSENT] == 0.0
    np.testing.assert_allclose(w[KEEP], expected, rtol=1e-5)


def test_dwa_after_an_epoch_without_labels_gives_that_task_the_neutral_rate():
    dwa = W.DynamicWeightAverage()
    dwa.build(["a", "b", "c"])
    dwa.record_epoch([1.0, 2.0, 0.0])  # task c had no labels this epoch
    dwa.record_epoch([0.5, 2.2, 1.5])
    r = np.array([0.5, 1.1, 1.0])  # c: rate 1 (loss unchanged), not 1.5 / 1e-12
    expected = 3 * np.exp(r / 2) / np.exp(r / 2).sum()
    np.testing.assert_allclose(dwa.weights.numpy(), expected, rtol=1e-6)


def test_aligned_mtl_rank_threshold_does_not_move_with_an_absent_task():
    # Present gradients with a small but real eigenvalue (1e-5 of the largest):
    # Aligned-MTL keeps it, with or without another task missing.
    base = RNG.normal(size=(3, 10))
    G = np.stack([base[0], base[1], np.zeros(10), base[0] + 0.02 * base[2]])
    G = G.astype("float32")
    M = G @ G.T
    alone = _np(W.aligned_mtl_coefficients(M[np.ix_(KEEP, KEEP)]))
    got = _np(W.aligned_mtl_coefficients(M, present=PRESENT))
    lam = np.linalg.eigvalsh(M[np.ix_(KEEP, KEEP)].astype("float64"))
    assert 1e-6 < lam.min() / lam.max() < 1e-3
    assert got[ABSENT] == 0.0
    np.testing.assert_allclose(got[KEEP], alone, rtol=1e-3)


# ------------------------------------------------------------- CAGrad exactness


def cagrad_scipy_reference(G, c):
    """CAGrad update from SciPy's SLSQP on the dual (the authors' solver), run
    from every vertex and the centre, keeping the best; float64."""
    from scipy.optimize import minimize

    n = len(G)
    A = G @ G.T
    A = A / np.mean(np.diag(A))
    b = np.full(n, 1.0 / n)
    s = c * np.sqrt(b @ A @ b)

    def dual(w):
        return w @ A @ b + s * np.sqrt(max(w @ A @ w, 0.0) + 1e-30)

    starts = [b] + [0.9 * np.eye(n)[i] + 0.1 / n for i in range(n)]
    best = min(
        (
            minimize(
                dual,
                w0,
                method="SLSQP",
                bounds=[(0, 1)] * n,
                constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                options={"ftol": 1e-15, "maxiter": 1000},
            )
            for w0 in starts
        ),
        key=lambda r: r.fun,
    )
    gw = best.x @ G
    g0 = b @ G
    return g0 + c * np.linalg.norm(g0) / np.linalg.norm(gw) * gw


@pytest.mark.parametrize("num_tasks", [3, 4, 5])
@pytest.mark.parametrize("spread", [1, 10, 100])
def test_cagrad_direction_equals_scipy_optimum_of_the_dual(num_tasks, spread):
    rng = np.random.default_rng(num_tasks * 1000 + spread)
    solve = compiled(W.cagrad, c=0.4, rescale=False)
    for trial in range(4):
        scales = np.logspace(0, np.log10(spread), num_tasks)[rng.permutation(num_tasks)]
        G = rng.normal(size=(num_tasks, 30)) * scales[:, None]
        if trial % 2:  # a strongly conflicting pair
            G[1] = scales[1] * (-0.8 * G[0] / scales[0] + 0.3 * rng.normal(size=30))
        d = _np(solve(G.astype("float32")))
        ref = cagrad_scipy_reference(G, 0.4)
        error = np.linalg.norm(d / np.linalg.norm(d) - ref / np.linalg.norm(ref))
        assert error < 1e-3, (trial, error)


# ------------------------------------------------- MGDA, Nash-MTL and IMTL options


def mgda_normalizer_reference(G, losses, normalization):
    """Sener and Koltun's ``gradient_normalizers``."""
    norms = np.linalg.norm(G, axis=1)
    return {
        "none": np.ones(len(G)),
        "l2": norms,
        "loss": losses,
        "loss+": losses * norms,
    }[normalization]


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
@pytest.mark.parametrize("weights_on", ["losses", "normalized_gradients"])
def test_mgda_normalizations_follow_the_authors_and_libmtl(normalization, weights_on):
    G = (RNG.normal(size=(3, 7)) * np.array([[0.2], [1.0], [6.0]])).astype("float32")
    losses = np.array([0.4, 2.0, 1.1], "float32")
    strategy = W.MGDA(normalization=normalization, weights_on=weights_on)
    strategy.build(["a", "b", "c"])
    combo = tf.function(strategy.combine_gradients)(G @ G.T, losses)
    n = mgda_normalizer_reference(G.astype("float64"), losses, normalization)
    Gn = G / n[:, None]
    sol = min_norm_reference(Gn @ Gn.T)
    if weights_on == "losses":  # sum_i sol_i L_i: shared and heads
        shared, heads = sol, sol
    else:  # LibMTL: sum_i sol_i g_i / n_i, heads their own gradients
        shared, heads = sol / n, np.ones(3)
    np.testing.assert_allclose(_np(combo.shared) @ G, shared @ G, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(_np(combo.heads), heads, rtol=2e-3, atol=1e-5)


def test_nash_mtl_clips_the_shared_update_to_max_norm_like_the_references():
    G = RNG.normal(size=(3, 8)) * np.array([[0.05], [0.1], [0.2]])
    M = (G @ G.T).astype("float32")
    alpha = _np(W.nash_mtl_weights(M))
    assert W.NashMTL().max_norm == 1.0  # both references' default
    for max_norm in (0.0, 1.0, 1e-3):
        strategy = W.NashMTL(max_norm=max_norm)
        strategy.build(["a", "b", "c"])
        combo = strategy.combine_gradients(M, np.ones(3))
        update = alpha @ G
        norm = np.linalg.norm(update)
        if max_norm and norm > max_norm:  # torch's clip_grad_norm_
            update = update * max_norm / norm
        np.testing.assert_allclose(_np(combo.shared) @ G, update, rtol=1e-4)
        np.testing.assert_allclose(_np(combo.heads), alpha, rtol=1e-5)


def test_imtl_weights_equal_the_papers_closed_form():
    G = RNG.normal(size=(4, 9)) * np.array([[0.3], [1.0], [2.0], [5.0]])
    U = G / np.linalg.norm(G, axis=1, keepdims=True)
    D, Ud = G[0] - G[1:], U[0] - U[1:]
    rest = G[0] @ Ud.T @ np.linalg.inv(D @ Ud.T)
    expected = np.concatenate([[1 - rest.sum()], rest])
    np.testing.assert_allclose(W.imtl_weights(G @ G.T), expected, rtol=1e-3)


def test_imtl_l_scale_gradient_is_exp_s_times_loss_minus_one():
    s = tf.Variable([0.3, -1.0, 0.0])
    losses = tf.constant([2.0, 0.5, 1.0])
    with tf.GradientTape() as tape:
        total, weights = W.imtl_l_loss(losses, s)
    np.testing.assert_allclose(
        tape.gradient(total, s), np.exp(s.numpy()) * losses.numpy() - 1, rtol=1e-6
    )
    np.testing.assert_allclose(weights, np.exp(s.numpy()), rtol=1e-6)
    # Stationary where every scaled loss is 1: s = -log L.
    s.assign(-np.log(losses.numpy()))
    with tf.GradientTape() as tape:
        total, _ = W.imtl_l_loss(losses, s)
    np.testing.assert_allclose(tape.gradient(total, s), 0.0, atol=1e-6)


def test_hybrid_imtl_combines_the_scaled_gradients_with_imtl_g():
    G = RNG.normal(size=(3, 6)).astype("float32")
    losses = np.array([2.0, 0.5, 1.0], "float32")
    s0 = np.array([0.2, -0.1, 0.4], "float32")
    strategy = W.IMTL(loss_scale=True, optimizer=keras.optimizers.SGD(0.5))
    strategy.build(["a", "b", "c"])
    strategy.log_scales.assign(s0)
    combo = strategy.combine_gradients(G @ G.T, losses)
    scaled = np.exp(s0)[:, None] * G
    U = scaled / np.linalg.norm(scaled, axis=1, keepdims=True)
    D, Ud = scaled[0] - scaled[1:], U[0] - U[1:]
    rest = scaled[0] @ Ud.T @ np.linalg.inv(D @ Ud.T)
    alpha = np.concatenate([[1 - rest.sum()], rest])
    np.testing.assert_allclose(_np(combo.shared) @ G, alpha @ scaled, rtol=1e-3)
    np.testing.assert_allclose(_np(combo.heads), np.exp(s0), rtol=1e-6)
    expected_s = s0 - 0.5 * (np.exp(s0) * losses - 1)
    np.testing.assert_allclose(strategy.log_scales.numpy(), expected_s, rtol=1e-5)
