"""Tests for hnm.analysis: every number against NumPy written from the definitions."""
import functools
import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from jax import test_util as jtu
import numpy as np

from hnm import analysis

try:
    from hnm import losses
except ImportError:  # the losses helper works in parallel; only its tests are skipped
    losses = None
needs_losses = absltest.skipIf(losses is None, "hnm.losses is not importable yet")


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ---- NumPy references, written from the papers' definitions -------------------------------


def np_hinge(s_ap, s_an, m):
    return np.maximum(0.0, s_an - s_ap + m)


def np_hinge_grads(s_ap, s_an, m):
    active = (s_an - s_ap + m) > 0
    return np.where(active, -1.0, 0.0), np.where(active, 1.0, 0.0)


def np_soft_grads(s_ap, s_an, t):
    g = _sigmoid((s_an - s_ap) / t) / t  # d/dx softplus(x / t) = sigmoid(x / t) / t
    return -g, g


def np_sct_grads(s_ap, s_an, t, lam, thr=0.8):
    hard = (s_an > s_ap) | (s_an > thr)
    easy = (s_an < s_ap) & (s_an < thr)
    g_ap, g_an = np_soft_grads(s_ap, s_an, t)
    return (np.where(easy, g_ap, 0.0),
            np.where(hard, lam, np.where(easy, g_an, 0.0)))


def np_rates(l_p, l_n, s_ap, s_an, s_pn):
    """Closed form of d||f_a - f_n||/d(eta), d||f_a - f_p||/d(eta) (derived on paper)."""
    d_an, d_ap = np.sqrt(2 - 2 * s_an), np.sqrt(2 - 2 * s_ap)
    cross = s_pn - s_ap * s_an
    return (l_n * (1 + s_an) * d_an + l_p * cross / d_an,
            l_p * (1 + s_ap) * d_ap + l_n * cross / d_ap)


def np_fd_embedding(loss_np, a, p, n, h=1e-6):
    """Finite-difference sphere gradients and distance rates of one triplet, float64."""
    def loss_vec(a, p, n):
        a, p, n = (v / np.linalg.norm(v) for v in (a, p, n))
        return loss_np(a @ p, a @ n)

    vecs = [a, p, n]
    grads = []
    for k in range(3):
        g = np.zeros_like(vecs[k])
        for j in range(len(g)):
            up = [v.copy() for v in vecs]
            dn = [v.copy() for v in vecs]
            up[k][j] += h
            dn[k][j] -= h
            g[j] = (loss_vec(*up) - loss_vec(*dn)) / (2 * h)
        grads.append(g - (g @ vecs[k]) * vecs[k])
    g_a, g_p, g_n = grads
    eta = 1e-6
    dist = lambda x, y: np.linalg.norm(x - y)
    rate_an = (dist(a - eta * g_a, n - eta * g_n) - dist(a + eta * g_a, n + eta * g_n)) / (
        2 * eta)
    rate_ap = (dist(a - eta * g_a, p - eta * g_p) - dist(a + eta * g_a, p + eta * g_p)) / (
        2 * eta)
    return g_a, g_p, g_n, rate_an, rate_ap


def np_diagnostics(x, labels, margin, normalize=True):
    """Slow loops over pairs and anchors (Xu et al.'s violation, Roy & Vetterli's rank)."""
    x = np.asarray(x, np.float64)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    x = unit if normalize else x
    n = len(x)
    dists, coss = [], []
    viol, hard = [], []
    for i in range(n):
        pos = [j for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [j for j in range(n) if labels[j] != labels[i]]
        for j in range(n):
            if j != i:
                dists.append(np.linalg.norm(x[i] - x[j]))
                coss.append(unit[i] @ unit[j])
        if pos and neg:
            d_p = max(np.linalg.norm(x[i] - x[j]) for j in pos)
            d_n = min(np.linalg.norm(x[i] - x[j]) for j in neg)
            viol.append(max(0.0, d_p - d_n + margin))
            hard.append(max(unit[i] @ unit[j] for j in neg) > max(unit[i] @ unit[j] for j in pos))
    centred = x - x.mean(0)
    sv = np.linalg.svd(centred, compute_uv=False)
    p = sv / sv.sum()
    p = p[p > 0]
    return dict(
        mean_distance=np.mean(dists), min_distance=np.min(dists),
        one_minus_mean_cosine=1 - np.mean(coss),
        cov_trace=np.trace(np.cov(x.T, bias=True)),
        effective_rank=np.exp(-np.sum(p * np.log(p))),
        frac_hard=np.mean(hard) if hard else 0.0,
        separation_violation_max=max(viol) if viol else 0.0,
        separation_violation_mean=np.mean(viol) if viol else 0.0,
        num_valid_anchors=len(viol),
    )


def _angles(degrees):
    rad = np.deg2rad(np.asarray(degrees, np.float64))
    return jnp.asarray(np.stack([np.cos(rad), np.sin(rad)], 1), jnp.float32)


# One compilation per configuration, reused across cases.
diag_jit = jax.jit(analysis.collapse_diagnostics, static_argnames=("block_size", "normalize"))


class LossGradientFieldTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        # Random points in [-1, 1]^2, kept away from every kink tested below.
        pts = rng.uniform(-1, 1, size=(2, 400))
        far = ((np.abs(pts[1] - pts[0] + 0.25) > 1e-2) & (np.abs(pts[1] - pts[0]) > 1e-2)
               & (np.abs(pts[1] - 0.8) > 1e-2))
        self.s_ap, self.s_an = pts[0][far][:240].reshape(12, 20), pts[1][far][:240].reshape(12, 20)

    def test_generic_loss_closed_form_any_shape(self):
        # Asymmetric in its arguments, so swapping S_ap and S_an would be caught.
        loss = lambda a, n: a ** 2 * jnp.sin(n)
        s_ap, s_an = self.s_ap.reshape(3, 4, 20), self.s_an.reshape(3, 4, 20)
        g = analysis.loss_gradient_field(loss, s_ap, s_an)
        self.assertEqual(g.grad_sim_ap.shape, (3, 4, 20))
        np.testing.assert_allclose(g.grad_sim_ap, 2 * s_ap * np.sin(s_an), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g.grad_sim_an, s_ap ** 2 * np.cos(s_an), rtol=1e-5,
                                   atol=1e-6)

    @needs_losses
    def test_hinge_closed_form(self):
        fn = functools.partial(losses.triplet_margin_loss, margin=0.25)
        g = analysis.loss_gradient_field(fn, self.s_ap, self.s_an)
        ref_ap, ref_an = np_hinge_grads(self.s_ap, self.s_an, 0.25)
        self.assertGreater(ref_an.sum(), 10)
        self.assertGreater((ref_an == 0).sum(), 10)   # both regions are exercised
        np.testing.assert_array_equal(g.grad_sim_ap, ref_ap)
        np.testing.assert_array_equal(g.grad_sim_an, ref_an)

    @needs_losses
    @parameterized.parameters(0.1, 0.5)
    def test_soft_triplet_closed_form(self, temperature):
        fn = functools.partial(losses.soft_triplet_loss, temperature=temperature)
        g = analysis.loss_gradient_field(fn, self.s_ap, self.s_an)
        ref_ap, ref_an = np_soft_grads(self.s_ap, self.s_an, temperature)
        np.testing.assert_allclose(g.grad_sim_ap, ref_ap, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(g.grad_sim_an, ref_an, rtol=1e-4, atol=1e-6)

    @needs_losses
    def test_sct_hard_region_pushes_negative_only(self):
        fn = functools.partial(losses.sct_loss, temperature=0.1, hard_weight=0.7)
        g = analysis.loss_gradient_field(fn, self.s_ap, self.s_an)
        ref_ap, ref_an = np_sct_grads(self.s_ap, self.s_an, 0.1, 0.7)
        hard = (self.s_an > self.s_ap) | (self.s_an > 0.8)
        self.assertGreater(hard.sum(), 10)
        self.assertGreater((~hard).sum(), 10)
        np.testing.assert_array_equal(np.asarray(g.grad_sim_ap)[hard], 0.0)
        np.testing.assert_allclose(np.asarray(g.grad_sim_an)[hard], 0.7, rtol=1e-6)
        np.testing.assert_allclose(g.grad_sim_ap, ref_ap, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(g.grad_sim_an, ref_an, rtol=1e-4, atol=1e-6)

    @needs_losses
    def test_matches_finite_differences(self):
        fns = {"hinge": (functools.partial(losses.triplet_margin_loss, margin=0.25),
                         lambda a, n: np_hinge(a, n, 0.25)),
               "soft": (functools.partial(losses.soft_triplet_loss, temperature=0.5),
                        lambda a, n: np.logaddexp(0.0, (n - a) / 0.5))}
        a, n, h = self.s_ap.astype(np.float64), self.s_an.astype(np.float64), 1e-6
        for name, (fn, ref) in fns.items():
            with self.subTest(name):
                g = analysis.loss_gradient_field(fn, self.s_ap, self.s_an)
                fd_ap = (ref(a + h, n) - ref(a - h, n)) / (2 * h)
                fd_an = (ref(a, n + h) - ref(a, n - h)) / (2 * h)
                np.testing.assert_allclose(g.grad_sim_ap, fd_ap, atol=1e-4)
                np.testing.assert_allclose(g.grad_sim_an, fd_an, atol=1e-4)

    def test_bad_input(self):
        ok = lambda a, n: n - a
        with self.assertRaisesRegex(TypeError, "loss_fn"):
            analysis.loss_gradient_field("hinge", jnp.zeros(3), jnp.zeros(3))
        with self.assertRaisesRegex(ValueError, "sim_ap"):
            analysis.loss_gradient_field(ok, jnp.zeros(3), jnp.zeros(4))
        with self.assertRaisesRegex(TypeError, "sim_ap"):
            analysis.loss_gradient_field(ok, jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.int32))
        with self.assertRaisesRegex(ValueError, "elementwise"):
            analysis.loss_gradient_field(lambda a, n: jnp.stack([a, n]), jnp.zeros(3),
                                         jnp.zeros(3))


class TripletOnSphereTest(parameterized.TestCase):

    def test_realises_cosines_default_layout(self):
        s = np.linspace(-1, 1, 9)
        s_ap, s_an = np.meshgrid(s, s)
        t = analysis.triplet_on_sphere(s_ap, s_an, dim=4)
        self.assertEqual(t.anchor.shape, (9, 9, 4))
        self.assertTrue(bool(t.valid.all()))
        for v in (t.anchor, t.positive, t.negative):
            np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, atol=1e-6)
        dot = lambda x, y: np.sum(np.asarray(x) * np.asarray(y), -1)
        np.testing.assert_allclose(dot(t.anchor, t.positive), s_ap, atol=1e-6)
        np.testing.assert_allclose(dot(t.anchor, t.negative), s_an, atol=1e-6)
        # Coplanar, negative on the positive's side: S_pn = cos(theta_p - theta_n).
        np.testing.assert_allclose(dot(t.positive, t.negative),
                                   np.cos(np.arccos(s_ap) - np.arccos(s_an)), atol=1e-6)

    def test_given_sim_pn_and_unrealisable_cells(self):
        s_ap = np.array([0.3, 0.9, 0.5, 1.2, 0.2])
        s_an = np.array([-0.4, 0.9, 0.5, 0.0, 0.1])
        s_pn = np.array([0.1, -0.9, 0.5, 0.0, 0.3])
        # Gram determinants: realisable, < 0, realisable, |S_ap| > 1, realisable.
        t = analysis.triplet_on_sphere(s_ap, s_an, 3, sim_pn=s_pn)
        np.testing.assert_array_equal(t.valid, [True, False, True, False, True])
        for v in (t.anchor, t.positive, t.negative):
            self.assertTrue(np.isfinite(v).all())
            np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, atol=1e-6)
        ok = np.asarray(t.valid)
        dot = lambda x, y: np.sum(np.asarray(x) * np.asarray(y), -1)[ok]
        np.testing.assert_allclose(dot(t.anchor, t.positive), s_ap[ok], atol=1e-6)
        np.testing.assert_allclose(dot(t.anchor, t.negative), s_an[ok], atol=1e-6)
        np.testing.assert_allclose(dot(t.positive, t.negative), s_pn[ok], atol=1e-6)

    def test_bad_dim(self):
        with self.assertRaisesRegex(ValueError, "dim"):
            analysis.triplet_on_sphere(jnp.zeros(2), jnp.zeros(2), dim=1)
        with self.assertRaisesRegex(ValueError, "dim"):
            analysis.triplet_on_sphere(jnp.zeros(2), jnp.zeros(2), dim=2, sim_pn=jnp.zeros(2))


class EmbeddingGradientsTest(parameterized.TestCase):

    @needs_losses
    def test_hinge_closed_form_and_hand_value(self):
        fn = functools.partial(losses.triplet_margin_loss, margin=0.2)
        s_ap = np.array([0.0, 0.5, -0.3, 0.6])
        s_an = np.array([0.9, 0.2, 0.1, 0.7])
        r = analysis.embedding_gradients(fn, s_ap, s_an, dim=3)
        s_pn = np.cos(np.arccos(s_ap) - np.arccos(s_an))
        l_p, l_n = np_hinge_grads(s_ap, s_an, 0.2)
        ref_an, ref_ap = np_rates(l_p, l_n, s_ap, s_an, s_pn)
        np.testing.assert_allclose(r.rate_an, ref_an, atol=1e-5)
        np.testing.assert_allclose(r.rate_ap, ref_ap, atol=1e-5)
        # On paper: S_ap = 0, S_an = 0.9: 1.9 sqrt(0.2) - sqrt(0.19) / sqrt(0.2) = -0.12497.
        self.assertAlmostEqual(float(r.rate_an[0]), -0.124970, places=5)
        self.assertEqual(float(r.rate_an[1]), 0.0)   # inactive hinge: no motion

    @needs_losses
    def test_sct_hard_branch_never_pulls_the_negative(self):
        fn = functools.partial(losses.sct_loss, temperature=0.1, hard_weight=0.5)
        s = np.linspace(-0.95, 0.95, 12)
        s_ap, s_an = np.meshgrid(s, s)
        r = analysis.embedding_gradients(fn, s_ap, s_an)
        hard = (s_an > s_ap) | (s_an > 0.8)
        np.testing.assert_allclose(np.asarray(r.rate_an)[hard],
                                   (0.5 * (1 + s_an) * np.sqrt(2 - 2 * s_an))[hard], rtol=1e-4)
        self.assertTrue((np.asarray(r.rate_an)[hard] > 0).all())
        # The same triplets under the hinge are pulled together somewhere in that region.
        hinge = analysis.embedding_gradients(losses.triplet_margin_loss, s_ap, s_an)
        self.assertLess(float(np.min(np.asarray(hinge.rate_an)[hard])), -0.1)

    @parameterized.named_parameters(("hinge", "hinge"), ("soft", "soft"))
    def test_against_finite_differences_with_sim_pn(self, kind):
        if kind == "hinge":
            jfn, nfn = (lambda a, n: jax.nn.relu(n - a + 0.2)), (lambda a, n: np_hinge(a, n, 0.2))
            dfn = lambda a, n: np_hinge_grads(a, n, 0.2)
        else:
            jfn = lambda a, n: jax.nn.softplus((n - a) / 0.5)
            nfn = lambda a, n: np.logaddexp(0.0, (n - a) / 0.5)
            dfn = lambda a, n: np_soft_grads(a, n, 0.5)
        s_ap = np.array([0.1, 0.6, -0.2, 0.3])
        s_an = np.array([0.5, 0.3, 0.4, 0.35])
        s_pn = np.array([0.2, 0.5, -0.1, 0.9])
        r = analysis.embedding_gradients(jfn, s_ap, s_an, dim=4, sim_pn=s_pn)
        t = analysis.triplet_on_sphere(s_ap, s_an, 4, sim_pn=s_pn)
        self.assertTrue(bool(t.valid.all()))
        l_p, l_n = dfn(s_ap, s_an)
        ref_an, ref_ap = np_rates(l_p, l_n, s_ap, s_an, s_pn)
        np.testing.assert_allclose(r.rate_an, ref_an, atol=1e-5)
        np.testing.assert_allclose(r.rate_ap, ref_ap, atol=1e-5)
        for i in range(4):
            vecs = [np.asarray(v[i], np.float64) for v in (t.anchor, t.positive, t.negative)]
            g_a, g_p, g_n, fd_an, fd_ap = np_fd_embedding(nfn, *vecs)
            np.testing.assert_allclose(r.grad_anchor[i], g_a, atol=1e-4)
            np.testing.assert_allclose(r.grad_positive[i], g_p, atol=1e-4)
            np.testing.assert_allclose(r.grad_negative[i], g_n, atol=1e-4)
            self.assertAlmostEqual(float(r.rate_an[i]), fd_an, places=4)
            self.assertAlmostEqual(float(r.rate_ap[i]), fd_ap, places=4)
            for g, v in zip((r.grad_anchor, r.grad_positive, r.grad_negative), vecs):
                self.assertAlmostEqual(float(np.asarray(g[i]) @ v), 0.0, places=6)  # tangent

    def test_unrealisable_cells_are_zero_and_finite(self):
        loss = lambda a, n: jax.nn.relu(n - a + 0.2)
        r = analysis.embedding_gradients(loss, np.array([0.9, 1.5]), np.array([0.9, 0.0]),
                                         sim_pn=np.array([-0.9, 0.0]))
        self.assertFalse(bool(r.valid.any()))
        for x in r[:5]:
            np.testing.assert_array_equal(x, 0.0)


class CollapseDiagnosticsTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("normalized", True, None), ("normalized_blocked", True, 3), ("raw", False, None),
        ("raw_blocked", False, 4))
    def test_matches_numpy_reference(self, normalize, block_size):
        rng = np.random.default_rng(1)
        emb = rng.normal(size=(10, 5)).astype(np.float32)
        labels = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 4])   # class 4 is a singleton
        got = diag_jit(emb, labels, 0.3, block_size=block_size, normalize=normalize)
        ref = np_diagnostics(emb, labels, 0.3, normalize=normalize)
        self.assertEqual(int(got["num_valid_anchors"]), 9)
        for key, value in ref.items():
            with self.subTest(key):
                np.testing.assert_allclose(got[key], value, rtol=2e-5, atol=2e-5)
        self.assertGreater(ref["separation_violation_max"], 0.3)  # not a vacuous case

    def test_collapsed_set(self):
        row = np.random.default_rng(2).normal(size=(1, 6)).astype(np.float32)
        emb = np.repeat(row, 8, axis=0)
        d = diag_jit(emb, np.arange(8) % 4, 0.2, block_size=None, normalize=True)
        self.assertAlmostEqual(float(d["mean_distance"]), 0.0, places=6)
        self.assertAlmostEqual(float(d["min_distance"]), 0.0, places=6)
        self.assertAlmostEqual(float(d["one_minus_mean_cosine"]), 0.0, places=6)
        self.assertAlmostEqual(float(d["cov_trace"]), 0.0, places=10)
        self.assertEqual(float(d["effective_rank"]), 0.0)   # documented convention
        self.assertEqual(float(d["frac_hard"]), 0.0)        # ties are not hard
        # Every distance is 0, so every anchor violates by exactly the margin.
        self.assertAlmostEqual(float(d["separation_violation_max"]), 0.2, places=6)
        self.assertAlmostEqual(float(d["separation_violation_mean"]), 0.2, places=6)
        self.assertTrue(bool(analysis.is_collapsed(d)))

    def test_orthonormal_sets(self):
        eye = np.eye(8, dtype=np.float32)
        d = diag_jit(eye[:5], np.arange(5), 0.2, block_size=None, normalize=True)
        # Centred: n orthonormal vectors span n - 1 directions around their mean.
        self.assertAlmostEqual(float(d["effective_rank"]), 4.0, places=4)
        self.assertAlmostEqual(float(d["mean_distance"]), math.sqrt(2), places=5)
        self.assertAlmostEqual(float(d["one_minus_mean_cosine"]), 1.0, places=6)
        self.assertAlmostEqual(float(d["cov_trace"]), 1 - 1 / 5, places=5)
        sym = np.concatenate([eye[:4], -eye[:4]])
        d = diag_jit(sym, np.arange(8), 0.2, block_size=None, normalize=True)
        self.assertAlmostEqual(float(d["effective_rank"]), 4.0, places=4)
        self.assertFalse(bool(analysis.is_collapsed(d)))
        self.assertTrue(bool(analysis.is_collapsed(d, max_effective_rank=4.5)))

    def test_triplet_separated_set_has_no_violation(self):
        emb = _angles([0, 10, 90, 100, 200, 210])
        d = diag_jit(emb, np.array([0, 0, 1, 1, 2, 2]), 0.2, block_size=None, normalize=True)
        self.assertEqual(float(d["separation_violation_max"]), 0.0)
        self.assertEqual(float(d["separation_violation_mean"]), 0.0)
        self.assertEqual(float(d["frac_hard"]), 0.0)
        self.assertAlmostEqual(float(d["min_distance"]), 2 * math.sin(math.radians(5)), 5)

    def test_one_violating_triplet_hand_value(self):
        # Anchor at 10 deg: positive at 0 deg (2 sin 5), negative at 30 deg (2 sin 10).
        # Every other anchor is separated (checked on paper: 0, 30 and 35 deg are fine).
        emb = _angles([0, 10, 30, 35])
        d = diag_jit(emb, np.array([0, 0, 1, 1]), 0.2, block_size=None, normalize=True)
        v = 2 * math.sin(math.radians(5)) - 2 * math.sin(math.radians(10)) + 0.2
        self.assertAlmostEqual(v, 0.027015, places=6)
        self.assertAlmostEqual(float(d["separation_violation_max"]), v, places=5)
        self.assertAlmostEqual(float(d["separation_violation_mean"]), v / 4, places=5)
        # On paper: anchor 0 deg (positive 50 deg away, negative 20) and anchor 50 deg
        # (positive 50 away, negative 25) are hard; 20 and 25 deg have their positive 5 away.
        d = diag_jit(_angles([0, 50, 20, 25]), np.array([0, 0, 1, 1]), 0.2, block_size=None,
                     normalize=True)
        self.assertAlmostEqual(float(d["frac_hard"]), 0.5)

    def test_grads(self):
        rng = np.random.default_rng(3)
        labels = jnp.array([0, 0, 1, 1, 2, 2])
        with jax.enable_x64(True):
            emb = jnp.asarray(rng.normal(size=(6, 3)), jnp.float64)
            for key in ("mean_distance", "separation_violation_mean"):
                with self.subTest(key):
                    # jit: check_grads calls f many times; eager dispatch would dominate.
                    f = jax.jit(lambda e: analysis.collapse_diagnostics(e, labels, 0.5)[key])
                    jtu.check_grads(f, (emb,), order=1, modes=("fwd", "rev"), eps=1e-5)
                    self.assertGreater(float(jnp.abs(jax.grad(f)(emb)).sum()), 1e-3)

    def test_duplicate_rows_have_finite_grads(self):
        emb = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
        f = lambda e: analysis.collapse_diagnostics(e, jnp.array([0, 1, 1]))["mean_distance"]
        self.assertTrue(bool(jnp.isfinite(jax.jit(jax.grad(f))(emb)).all()))

    def test_batch_hard_objective_equals_violation_mean(self):
        try:
            from hnm import objectives
            obj = objectives.get("batch_hard", margin=0.3, distance="euclidean",
                                 normalize=True, reduction="mean")
        except (ImportError, ValueError, TypeError) as e:
            self.skipTest(f"hnm.objectives batch_hard unavailable: {e}")
        rng = np.random.default_rng(4)
        emb = rng.normal(size=(12, 6)).astype(np.float32)
        labels = np.arange(12) % 4
        loss, _ = obj(emb, labels)
        d = diag_jit(emb, labels, 0.3, block_size=None, normalize=True)
        np.testing.assert_allclose(loss, d["separation_violation_mean"], rtol=1e-5)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "embeddings"):
            analysis.collapse_diagnostics(jnp.zeros((1, 3)), jnp.zeros(1, jnp.int32))
        with self.assertRaisesRegex(ValueError, "embeddings"):
            analysis.collapse_diagnostics(jnp.zeros((2, 3, 1)), jnp.zeros(2, jnp.int32))
        with self.assertRaisesRegex(TypeError, "embeddings"):
            analysis.collapse_diagnostics(jnp.zeros((2, 3), jnp.int32), jnp.zeros(2, jnp.int32))
        with self.assertRaisesRegex(ValueError, "labels"):
            analysis.collapse_diagnostics(jnp.zeros((3, 3)), jnp.zeros(2, jnp.int32))
        with self.assertRaisesRegex(ValueError, "block_size"):
            analysis.collapse_diagnostics(jnp.ones((3, 3)), jnp.zeros(3, jnp.int32),
                                          block_size=0)


class CollapseValueTest(parameterized.TestCase):

    def test_ratios(self):
        self.assertAlmostEqual(float(analysis.loss_relative_to_collapse(0.1, "hinge", 0.2)), 0.5)
        for t in (0.1, 1.0):
            self.assertAlmostEqual(
                float(analysis.loss_relative_to_collapse(math.log(2), "soft", temperature=t)),
                1.0, places=6)
        self.assertAlmostEqual(
            float(analysis.loss_relative_to_collapse(0.25, "sct", hard_weight=0.5)), 0.5)

    @needs_losses
    def test_collapse_values_are_the_losses_at_collapse(self):
        one = jnp.ones(1)
        cases = [("hinge", losses.triplet_margin_loss(one, one, margin=0.3), dict(margin=0.3)),
                 ("soft", losses.soft_triplet_loss(one, one, temperature=0.05), {}),
                 ("sct", losses.sct_loss(one, one, hard_weight=0.7), dict(hard_weight=0.7))]
        for kind, value, kw in cases:
            with self.subTest(kind):
                self.assertAlmostEqual(analysis.loss_collapse_value(kind, **kw), float(value[0]),
                                       places=6)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "kind"):
            analysis.loss_relative_to_collapse(1.0, "contrastive")
        with self.assertRaisesRegex(ValueError, "margin"):
            analysis.loss_relative_to_collapse(1.0, "hinge", margin=0.0)
        with self.assertRaisesRegex(ValueError, "temperature"):
            analysis.loss_relative_to_collapse(1.0, "soft", temperature=-1.0)
        with self.assertRaisesRegex(ValueError, "effective_rank"):
            analysis.is_collapsed({"mean_distance": 1.0}, max_effective_rank=1.5)

    def test_is_collapsed_loss_ratio(self):
        diag = {"mean_distance": jnp.array([1.2, 1.2, 0.05])}
        got = analysis.is_collapsed(diag, loss_ratio=jnp.array([0.98, 0.5, 0.5]))
        np.testing.assert_array_equal(got, [True, False, True])


if __name__ == "__main__":
    absltest.main()
