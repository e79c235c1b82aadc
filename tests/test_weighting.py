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
    with pytest.raises(ValueError, match=r"expected \(3,\)"):
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
    """GradNorm: its weights, first losses and step counter plus every variable of
    its optimizer (Keras' own list); PCGrad: the state of its seed generator."""
    gradnorm = W.GradNorm(optimizer=keras.optimizers.Adam(1e-2))
    gradnorm.build(["a", "b"])
    expected = [gradnorm.weights, gradnorm.initial_losses, gradnorm.step]
    expected += list(gradnorm.optimizer.variables)
    assert [id(v) for v in gradnorm.state_variables()] == [id(v) for v in expected]
    pcgrad = W.PCGrad(seed=3)
    pcgrad.build(["a", "b"])
    assert [id(v) for v in pcgrad.state_variables()] == [
        id(pcgrad.seed_generator.state)
    ]
