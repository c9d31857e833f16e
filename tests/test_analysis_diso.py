"""Tests of hnm.analysis' d_iso bounds, collapse boundary, relative collapse test and the
official notebook's one-step simulation, each against an independent reference (scipy's LP
solver, a float64 transcription of the notebook, closed forms done by hand)."""
import functools
import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from hnm import analysis


# ---- references --------------------------------------------------------------------------


def lp_relaxation(emb, labels, margin):
    """min t s.t. |e_ij - D_ij| <= t, e_ij >= 0, e_ap + margin <= e_an (scipy linprog)."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    b = len(labels)
    pairs = [(i, j) for i in range(b) for j in range(i + 1, b)]
    col = {p: k + 1 for k, p in enumerate(pairs)}  # column 0 is t
    key = lambda i, j: col[(min(i, j), max(i, j))]
    a_ub, b_ub = [], []
    for (i, j) in pairs:
        row = np.zeros(len(pairs) + 1)
        row[0], row[col[(i, j)]] = -1.0, 1.0
        a_ub.append(row), b_ub.append(d[i, j])
        row = np.zeros(len(pairs) + 1)
        row[0], row[col[(i, j)]] = -1.0, -1.0
        a_ub.append(row), b_ub.append(-d[i, j])
    for a in range(b):
        for p in range(b):
            if p == a or labels[p] != labels[a]:
                continue
            for n in range(b):
                if labels[n] == labels[a]:
                    continue
                row = np.zeros(len(pairs) + 1)
                row[key(a, p)] += 1.0
                row[key(a, n)] -= 1.0
                a_ub.append(row), b_ub.append(-margin)
    c = np.zeros(len(pairs) + 1)
    c[0] = 1.0
    res = optimize.linprog(c, A_ub=np.array(a_ub), b_ub=np.array(b_ub),
                           bounds=[(0, None)] * (len(pairs) + 1), method="highs")
    assert res.status == 0, res.message
    return res.fun


def np_separated(g, labels, margin):
    d = np.linalg.norm(g[:, None] - g[None], axis=-1)
    ok = True
    for a in range(len(labels)):
        pos = [d[a, p] for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        neg = [d[a, n] for n in range(len(labels)) if labels[n] != labels[a]]
        if pos and neg:
            ok &= max(pos) + margin <= min(neg) + 1e-6
    return ok


def np_distortion(f, g):
    x = f / np.linalg.norm(f, axis=1, keepdims=True)
    df = np.linalg.norm(x[:, None] - x[None], axis=-1)
    dg = np.linalg.norm(g[:, None] - g[None], axis=-1)
    return np.max(np.abs(df - dg))


def notebook_map(kind, s_ap, s_an, projection, entanglement, lr):
    """Float64 transcription of Triplet_Map_1st / Triplet_Map_std of the official notebook
    (littleredxh/HardNegative, triplet_gradient_simulation.ipynb), line by line."""
    S_ap, S_an = np.asarray(s_ap, np.float64), np.asarray(s_an, np.float64)
    p_vert_norm = np.sqrt(1 - S_ap ** 2)
    n_vert_norm = np.sqrt(1 - S_an ** 2)
    p_vert_norm_in_an = p_vert_norm * projection
    p_norm_in_an = np.sqrt(p_vert_norm_in_an ** 2 + S_ap ** 2)
    p_vert_norm_to_an = np.sqrt(np.maximum(1 - p_norm_in_an ** 2, 0))
    S_pn = S_ap * S_an + p_vert_norm * n_vert_norm * projection
    if kind == "1st":
        beta = lr * np.exp(S_an) / (np.exp(S_ap) + np.exp(S_an))
        S_ap_new = (1 + beta ** 2) * S_ap + 2 * beta - beta ** 2 * S_an - beta * S_pn
        S_an_new = (1 + beta ** 2) * S_an - 2 * beta - beta ** 2 * S_ap + beta * S_pn
        fp_norm = np.sqrt((1 + beta * S_ap) ** 2 + (beta * p_vert_norm) ** 2)
        fn_norm = np.sqrt((1 - beta * S_an) ** 2 + (beta * n_vert_norm) ** 2)
    else:
        beta = lr * 2
        S_ap_new = ((1 - beta + beta ** 2) * S_ap + 2 * beta - beta ** 2 - beta ** 2 * S_an
                    - beta * (1 - beta) * S_pn)
        S_an_new = ((1 + beta + beta ** 2) * S_an - 2 * beta - beta ** 2 - beta ** 2 * S_ap
                    + beta * (1 + beta) * S_pn)
        fp_norm = np.sqrt((1 - beta + beta * S_ap) ** 2 + (beta * p_vert_norm) ** 2)
        fn_norm = np.sqrt((1 + beta - beta * S_an) ** 2 + (beta * n_vert_norm) ** 2)
    fa_norm = np.sqrt((1 + beta * S_ap - beta * S_an) ** 2
                      + (beta * (p_vert_norm_in_an - n_vert_norm)) ** 2
                      + (1 - projection ** 2) * (beta * p_vert_norm_to_an) ** 2)
    D_pos = S_ap_new / (fp_norm * fa_norm) - S_ap
    D_neg = S_an_new / (fn_norm * fa_norm) - S_an
    m = entanglement * (S_ap * S_an)
    return D_pos + m * D_neg, D_neg + m * D_pos


def notebook_grid(n=20):
    s_ap = np.tile(np.linspace(0, 1, n), (n, 1))
    s_an = np.tile(np.linspace(1, 0, n), (n, 1)).T
    return s_ap, s_an


NCA = lambda s_ap, s_an: jax.nn.softplus(s_an - s_ap)
LINEAR = lambda s_ap, s_an: s_an - s_ap


# ---- d_iso ---------------------------------------------------------------------------------


class DisoLowerTest(parameterized.TestCase):

    @parameterized.product(seed=[0, 1, 2, 3], shape=[(6, 3, 3), (8, 2, 4), (7, 5, 3)],
                           margin=[0.2, 0.7])
    def test_matches_linprog(self, seed, shape, margin):
        b, d, c = shape
        rng = np.random.default_rng(seed)
        emb = rng.normal(size=(b, d)).astype(np.float32)
        labels = rng.integers(0, c, size=b)
        labels[:2] = [0, 0]  # at least one valid anchor
        labels[2] = 1
        got = float(jax.jit(analysis.diso_lower_bound)(emb, labels, margin))
        want = lp_relaxation(emb.astype(np.float64), labels, margin)
        np.testing.assert_allclose(got, want, atol=1e-5)

    def test_between_half_violation_and_violation(self):
        rng = np.random.default_rng(5)
        for _ in range(10):
            emb = rng.normal(size=(12, 4)).astype(np.float32)
            labels = np.repeat(np.arange(6), 2)
            v = float(jax.jit(analysis.collapse_diagnostics)(emb, labels, 0.3)
                      ["separation_violation_max"])
            low = float(analysis.diso_lower_bound(emb, labels, 0.3))
            self.assertBetween(low, v / 2 - 1e-6, v + 1e-6)

    def test_hand_case_on_the_line(self):
        # 1-D points 0, 0.5 (class 0) and 0.6 (class 1), unnormalised: P_a - N_a + m for
        # anchor 0 is 0.5 - 0.6 + 0.2 = 0.1 -> t = 0.05; anchor 0.5: 0.5 - 0.1 + 0.2 = 0.6 ->
        # t = max(0.3, 0.2 - 0.1) = 0.3.
        emb = np.array([[0.0], [0.5], [0.6]], np.float32)
        got = analysis.diso_lower_bound(emb, np.array([0, 0, 1]), 0.2, normalize=False)
        np.testing.assert_allclose(float(got), 0.3, atol=1e-6)
        np.testing.assert_allclose(
            lp_relaxation_unnormalised(emb, [0, 0, 1], 0.2), 0.3, atol=1e-6)


def lp_relaxation_unnormalised(emb, labels, margin):
    # the LP reference on the raw points: normalising 1-D points would map them to +-1
    emb = np.asarray(emb, np.float64)
    d = np.abs(emb - emb.T)
    b = len(labels)
    pairs = [(i, j) for i in range(b) for j in range(i + 1, b)]
    col = {p: k + 1 for k, p in enumerate(pairs)}
    key = lambda i, j: col[(min(i, j), max(i, j))]
    a_ub, b_ub = [], []
    for (i, j) in pairs:
        for sgn in (1.0, -1.0):
            row = np.zeros(len(pairs) + 1)
            row[0], row[col[(i, j)]] = -1.0, sgn
            a_ub.append(row), b_ub.append(sgn * d[i, j])
    for a in range(b):
        for p in range(b):
            if p != a and labels[p] == labels[a]:
                for n in range(b):
                    if labels[n] != labels[a]:
                        row = np.zeros(len(pairs) + 1)
                        row[key(a, p)] += 1.0
                        row[key(a, n)] -= 1.0
                        a_ub.append(row), b_ub.append(-margin)
    c = np.zeros(len(pairs) + 1)
    c[0] = 1.0
    return optimize.linprog(c, A_ub=np.array(a_ub), b_ub=np.array(b_ub),
                            bounds=[(0, None)] * (len(pairs) + 1), method="highs").fun


class DisoBoundsTest(parameterized.TestCase):

    def test_triplet_separated_batch_is_zero_zero(self):
        emb = np.array([[1, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0, 0.99, 0.1], [0, 0, 1.0],
                        [0.1, 0, 0.99]], np.float32)
        labels = np.array([0, 0, 1, 1, 2, 2])
        b = jax.jit(analysis.diso_bounds)(emb, labels, 0.2)
        self.assertEqual(float(b["lower"]), 0.0)
        self.assertLess(float(b["upper"]), 1e-6)  # the embeddings themselves (float rounding)
        self.assertTrue(bool(b["feasible"]))

    @parameterized.parameters(2, 5)
    def test_collapsed_batch_lower_is_margin(self, num_classes):
        labels = np.repeat(np.arange(num_classes), 2)
        b = analysis.diso_bounds(np.ones((2 * num_classes, 4), np.float32), labels, 0.3)
        np.testing.assert_allclose(float(b["lower"]), 0.3, atol=1e-6)
        self.assertGreaterEqual(float(b["upper"]), 0.3 - 1e-6)

    @parameterized.product(seed=[0, 1], dim=[None, 3])
    def test_upper_config_is_checked_and_bounds_ordered(self, seed, dim):
        rng = np.random.default_rng(seed)
        emb = rng.normal(size=(16, 8)).astype(np.float32)
        labels = np.repeat(np.arange(8), 2)
        b = analysis.diso_bounds(emb, labels, 0.2, dim=dim, num_steps=100)
        g = np.asarray(b["config"], np.float64)
        self.assertEqual(g.shape, (16, 8 if dim is None else dim))
        self.assertTrue(bool(b["feasible"]))
        self.assertTrue(np_separated(g, labels, 0.2))  # independent check of the claim
        np.testing.assert_allclose(float(b["upper"]), np_distortion(emb, g), atol=1e-5)
        self.assertLessEqual(float(b["lower"]), float(b["upper"]) + 1e-6)

    @pytest.mark.slow
    def test_search_never_worse_than_the_start(self):
        rng = np.random.default_rng(3)
        emb = rng.normal(size=(16, 8)).astype(np.float32)
        labels = np.repeat(np.arange(8), 2)
        few = float(analysis.diso_bounds(emb, labels, 0.2, num_steps=0)["upper"])
        many = float(analysis.diso_bounds(emb, labels, 0.2, num_steps=100)["upper"])
        self.assertLessEqual(many, few + 1e-6)

    def test_circle_packing_limit_square(self):
        self._check_circle_packing_limit(4)

    @pytest.mark.slow
    def test_circle_packing_limit_more_classes(self):
        for num_classes in (3, 5, 7, 9):
            with self.subTest(num_classes=num_classes):
                self._check_circle_packing_limit(num_classes)

    def _check_circle_packing_limit(self, num_classes):
        # Collapsed embeddings, configurations in the plane: d_iso equals the least diameter
        # of num_classes points pairwise >= margin apart; no configuration may beat it.
        labels = np.repeat(np.arange(num_classes), 2)
        emb = np.tile(np.array([[0.6, 0.8]], np.float32), (2 * num_classes, 1))
        b = analysis.diso_bounds(emb, labels, 0.2, dim=2, num_steps=300)
        limit = analysis.packing_diameter(num_classes, 2, 0.2)
        self.assertGreaterEqual(float(b["upper"]), limit - 1e-6)
        self.assertTrue(np_separated(np.asarray(b["config"], np.float64), labels, 0.2))
        if num_classes <= 4:  # the search finds the triangle / the square
            self.assertLessEqual(float(b["upper"]), 1.05 * limit)

    def test_packing_diameter_hand_values(self):
        self.assertEqual(analysis.packing_diameter(3, 2, 1.0), 1.0)
        self.assertAlmostEqual(analysis.packing_diameter(4, 2, 1.0), math.sqrt(2))
        self.assertAlmostEqual(analysis.packing_diameter(5, 2, 1.0), (1 + 5 ** 0.5) / 2)
        self.assertEqual(analysis.packing_diameter(4, 3, 0.5), 0.5)  # tetrahedron
        self.assertEqual(analysis.packing_diameter(5, 1, 1.0), 4.0)
        # the Jung/volume bound is below the exact planar values it replaces
        jung = lambda p: 0.5 * (p ** 0.5 - 1) / math.sqrt(2 / 6)
        for p in range(3, 8):
            self.assertLessEqual(jung(p), analysis.PLANE_MIN_DIAMETER[p] + 1e-12)
        self.assertGreaterEqual(analysis.packing_diameter(20, 2, 1.0), jung(20) - 1e-12)

    def test_bad_input(self):
        emb, labels = np.ones((4, 2), np.float32), np.array([0, 0, 1, 1])
        with self.assertRaisesRegex(ValueError, "dim"):
            analysis.diso_bounds(emb, labels, dim=0)
        with self.assertRaisesRegex(ValueError, "num_steps"):
            analysis.diso_bounds(emb, labels, num_steps=-1)
        with self.assertRaisesRegex(ValueError, "embeddings"):
            analysis.diso_bounds(np.ones((1, 2), np.float32), np.array([0]))

    @pytest.mark.slow
    def test_training_diagnostics_jits_and_has_the_keys(self):
        rng = np.random.default_rng(0)
        emb = rng.normal(size=(16, 4)).astype(np.float32)
        labels = np.repeat(np.arange(8), 2)
        out = jax.jit(analysis.training_diagnostics)(emb, labels, 0.2)
        ref = analysis.collapse_diagnostics(emb, labels, 0.2)
        for k, v in ref.items():
            np.testing.assert_allclose(out[k], v, rtol=1e-5, atol=1e-6)
        self.assertLessEqual(float(out["diso_lower"]), float(out["diso_upper"]) + 1e-6)
        np.testing.assert_allclose(out["diso_lower"],
                                   analysis.diso_lower_bound(emb, labels, 0.2), rtol=1e-6)
        self.assertEqual(float(out["diso_feasible"]), 1.0)


# ---- collapse boundary --------------------------------------------------------------------


class CollapseBoundaryTest(parameterized.TestCase):

    def test_circle_by_hand(self):
        # margin 1 = chord of 60 degrees: a hexagon, 6 classes fit on the circle, 7 do not
        b = analysis.collapse_boundary(np.array([5, 6, 7, 12]), 2, margin=1.0)
        self.assertEqual(b["capacity"].tolist(), [6] * 4)
        self.assertEqual(b["collapse_predicted"].tolist(), [False, False, True, True])
        # margin sqrt(2): a square; margin 0.2: floor(pi / asin(0.1)) = 31
        self.assertEqual(int(analysis.collapse_boundary(4, 2, math.sqrt(2))["capacity"]), 4)
        self.assertEqual(int(analysis.collapse_boundary(4, 2, math.sqrt(2) + 1e-6)
                             ["capacity"]), 3)
        b = analysis.collapse_boundary(np.array([31, 32]), 2, 0.2)
        self.assertEqual(b["collapse_predicted"].tolist(), [False, True])

    def test_sphere_bounds_are_consistent(self):
        for dim in (3, 4, 8):
            lo, hi = analysis.sphere_capacity(dim, math.sqrt(2))
            self.assertGreaterEqual(lo, 2 * dim)   # cross-polytope
            self.assertGreaterEqual(hi, lo)
        lo, hi = analysis.sphere_capacity(3, 1.0)  # the kissing configuration has 12 points
        self.assertLessEqual(lo, 12)
        self.assertGreaterEqual(hi, 12)
        # cap bound in 3-d: 1 / ((1 - cos(theta/2)) / 2)
        half = math.asin(0.1)
        self.assertEqual(analysis.sphere_capacity(3, 0.2)[1],
                         int(math.floor(2 / (1 - math.cos(half)))))

    def test_broadcast_and_monotone(self):
        b = analysis.collapse_boundary(np.array([[4], [64]]), np.array([2, 3, 8]), 0.2)
        self.assertEqual(b["capacity"].shape, (2, 3))
        self.assertTrue((np.diff(b["capacity"][0]) >= 0).all())
        self.assertEqual(b["collapse_predicted"].tolist(), [[False] * 3, [True, False, False]])

    def test_bad_input(self):
        with self.assertRaises(TypeError):
            analysis.collapse_boundary(4.5, 2)
        with self.assertRaisesRegex(ValueError, "margin"):
            analysis.sphere_capacity(2, 0.0)


# ---- relative collapse test ---------------------------------------------------------------


class RelativeCollapseTest(parameterized.TestCase):

    def test_cases(self):
        d0 = {"mean_distance": 0.069}
        self.assertFalse(bool(analysis.is_collapsed_relative(d0, d0)))
        self.assertFalse(bool(analysis.is_collapsed_relative(d0, d0, loss_ratio=1.0)))
        small = {"mean_distance": 0.001}
        self.assertTrue(bool(analysis.is_collapsed_relative(small, d0)))
        self.assertTrue(bool(analysis.is_collapsed_relative(small, d0, loss_ratio=1.05)))
        self.assertFalse(bool(analysis.is_collapsed_relative(small, d0, loss_ratio=0.5)))
        zero = {"mean_distance": 0.0}
        self.assertFalse(bool(analysis.is_collapsed_relative(zero, zero)))
        np.testing.assert_allclose(analysis.spread_ratio(small, d0), 0.001 / 0.069, rtol=1e-6)
        # the absolute test calls this initial state collapsed; the relative one does not
        self.assertTrue(bool(analysis.is_collapsed(d0)))

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "mean_distance"):
            analysis.is_collapsed_relative({}, {"mean_distance": 1.0})
        with self.assertRaisesRegex(ValueError, "max_spread_ratio"):
            analysis.is_collapsed_relative({"mean_distance": 1.0}, {"mean_distance": 1.0},
                                           max_spread_ratio=1.5)


def _load_glyph_test_images(n):
    try:
        from hnm.data import glyphs  # where the data helper may move it
    except ImportError:
        from hnm import glyphs
    images, labels = glyphs.load_glyphs("test")
    return images[:n], labels[:n]


@pytest.mark.slow
class UntrainedNetworkTest(parameterized.TestCase):
    """An untrained network is never collapsed by the relative test (issue 9)."""

    @parameterized.product(backbone=["cnn", "mlp"], dim=[2, 8, 32, 128])
    def test_untrained_is_not_collapsed(self, backbone, dim):
        from hnm import models
        images, labels = _load_glyph_test_images(500)
        model = models.create({"backbone": backbone, "embedding_dim": dim})
        variables = model.init(jax.random.PRNGKey(0), jnp.asarray(images[:2]))
        emb = model.apply(variables, jnp.asarray(images))
        diag = analysis.collapse_diagnostics(emb, labels, 0.2)
        loss_ratio = 1.0  # even with the loss at its collapse value
        self.assertFalse(bool(analysis.is_collapsed_relative(diag, diag,
                                                             loss_ratio=loss_ratio)))
        # a second, independent draw of the same network is not collapsed relative to it
        variables2 = model.init(jax.random.PRNGKey(1), jnp.asarray(images[:2]))
        diag2 = analysis.collapse_diagnostics(model.apply(variables2, jnp.asarray(images)),
                                              labels, 0.2)
        ratio = float(analysis.spread_ratio(diag2, diag))
        self.assertGreater(ratio, analysis.DEFAULT_SPREAD_RATIO, msg=(backbone, dim, ratio))


# ---- the notebook's one-step simulation ---------------------------------------------------


class OneStepSimilarityChangeTest(parameterized.TestCase):

    @parameterized.product(kind=["1st", "std"], projection=[0.0, 1.0],
                           entanglement=[0.0, 0.5], lr=[0.1, 0.03])
    def test_matches_notebook_transcription(self, kind, projection, entanglement, lr):
        s_ap, s_an = notebook_grid(20)
        loss_fn, form = (NCA, "cosine") if kind == "1st" else (LINEAR, "squared_euclidean")
        f = jax.jit(functools.partial(analysis.one_step_similarity_change, loss_fn,
                                      learning_rate=lr, projection=projection,
                                      entanglement=entanglement, form=form))
        got = f(jnp.asarray(s_ap, jnp.float32), jnp.asarray(s_an, jnp.float32))
        want = notebook_map(kind, s_ap, s_an, projection, entanglement, lr)
        np.testing.assert_allclose(got.delta_ap, want[0], atol=2e-6)
        np.testing.assert_allclose(got.delta_an, want[1], atol=2e-6)

    def test_hand_case(self):
        # S_ap = S_an = 0, projection 0, linear cosine loss s_an - s_ap, lr 0.1:
        # f_a = e1 + 0.1 e2 - 0.1 e3, f_p = e2 + 0.1 e1, f_n = e3 - 0.1 e1.
        # |f_a| = sqrt(1.02), |f_p| = |f_n| = sqrt(1.01);
        # f_a.f_p = 0.1 + 0.1 = 0.2, f_a.f_n = -0.1 - 0.1 = -0.2.
        want = 0.2 / math.sqrt(1.02 * 1.01)
        lin = lambda s_ap, s_an: s_an - s_ap
        d = analysis.one_step_similarity_change(lin, jnp.array([0.0]), jnp.array([0.0]),
                                                learning_rate=0.1, projection=0.0,
                                                entanglement=0.0)
        np.testing.assert_allclose(d.delta_ap, [want], rtol=1e-6)
        np.testing.assert_allclose(d.delta_an, [-want], rtol=1e-6)
        # with entanglement p at S_ap = S_an = 0.5: m = p / 4 couples the two
        d0 = analysis.one_step_similarity_change(lin, jnp.array([0.5]), jnp.array([0.5]),
                                                 learning_rate=0.1, entanglement=0.0)
        d1 = analysis.one_step_similarity_change(lin, jnp.array([0.5]), jnp.array([0.5]),
                                                 learning_rate=0.1, entanglement=0.8)
        np.testing.assert_allclose(d1.delta_ap, d0.delta_ap + 0.2 * d0.delta_an, rtol=1e-6)
        np.testing.assert_allclose(d1.delta_an, d0.delta_an + 0.2 * d0.delta_ap, rtol=1e-6)

    @parameterized.parameters(("hinge", 1.0), ("soft", 1.0), ("soft", 0.0))
    def test_small_step_limit_matches_embedding_gradients(self, kind, projection):
        loss_fn = {"hinge": lambda a, n: jax.nn.relu(n - a + 0.2),
                   "soft": lambda a, n: jax.nn.softplus((n - a) / 0.5)}[kind]
        s_ap = jnp.array([0.1, 0.3, 0.6, 0.2, 0.8])
        s_an = jnp.array([0.7, 0.2, 0.5, 0.9, 0.1])
        lr = 1e-3
        d = analysis.one_step_similarity_change(loss_fn, s_ap, s_an, learning_rate=lr,
                                                projection=projection, entanglement=0.0)
        sim_pn = None if projection == 1.0 else s_ap * s_an
        r = analysis.embedding_gradients(loss_fn, s_ap, s_an, 3, sim_pn=sim_pn)
        d_an, d_ap = np.sqrt(2 - 2 * s_an), np.sqrt(2 - 2 * s_ap)
        np.testing.assert_allclose(d.delta_an / lr, -d_an * r.rate_an, atol=5e-3)
        np.testing.assert_allclose(d.delta_ap / lr, -d_ap * r.rate_ap, atol=5e-3)

    def test_hard_pull_share(self):
        s_ap = jnp.array([0.1, 0.5, 0.9])
        s_an = jnp.array([0.2, 0.6, 0.1])
        self.assertAlmostEqual(float(analysis.hard_pull_share(jnp.array([1.0, -1.0, 1.0]),
                                                              s_ap, s_an)), 0.5)
        self.assertEqual(float(analysis.hard_pull_share(jnp.ones(1), jnp.ones(1),
                                                        jnp.zeros(1))), 0.0)
        # float32 rounding of a cosine (SCT at S_an = 1: about 2e-8) is not a pull
        rounding = jnp.array([2e-8, -1.0, 1.0])
        self.assertEqual(float(analysis.hard_pull_share(rounding, s_ap, s_an)), 0.0)
        self.assertAlmostEqual(float(analysis.hard_pull_share(rounding, s_ap, s_an, atol=0.0)),
                               0.5)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "form"):
            analysis.one_step_similarity_change(LINEAR, jnp.zeros(2), jnp.zeros(2),
                                                form="l1")
        with self.assertRaisesRegex(ValueError, "projection"):
            analysis.one_step_similarity_change(LINEAR, jnp.zeros(2), jnp.zeros(2),
                                                projection=2.0)
        with self.assertRaises(TypeError):
            analysis.one_step_similarity_change(None, jnp.zeros(2), jnp.zeros(2))
        with self.assertRaisesRegex(ValueError, "sim_ap"):
            analysis.one_step_similarity_change(LINEAR, jnp.zeros(2), jnp.zeros(3))



@pytest.mark.parametrize("name", ["_fields", "_collapse", "_diso"])
def test_docstring_examples_of_the_submodules(name):
    # tests/test_doctests.py walks hnm's top-level modules only; the package's parts are here.
    import doctest
    import importlib
    module = importlib.import_module(f"hnm.analysis.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


if __name__ == "__main__":
    absltest.main()
