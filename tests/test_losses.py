"""Per-triplet losses, reductions and the all-pairs hinge sums vs formulas and NumPy loops."""
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.test_util import check_grads

from hnm import losses


def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


def _np_all_triplets(sim, labels, margin):
    """Triple loop over explicit (a, p, n), from the definition of the batch-all hinge."""
    a_n, m_n = sim.shape
    loss_sum = np.zeros(a_n)
    num_active = np.zeros((a_n, m_n), int)
    num_hard = np.zeros((a_n, m_n), int)
    for a in range(a_n):
        for p in range(m_n):
            if p == a or labels[p] != labels[a]:
                continue
            for n in range(m_n):
                if labels[n] == labels[a]:
                    continue
                term = sim[a, n] - sim[a, p] + margin
                if term > 0:
                    loss_sum[a] += term
                    num_active[a, p] += 1
                num_hard[a, p] += sim[a, n] > sim[a, p]
    return loss_sum, num_active, num_hard


def _np_semihard(sim, labels, margin):
    """TFA's rule pair by pair: closest negative farther than p, else the farthest."""
    a_n = sim.shape[0]
    loss_sum = np.zeros(a_n)
    negative = np.full(sim.shape, -1)
    for a in range(a_n):
        negs = [n for n in range(sim.shape[1]) if labels[n] != labels[a]]
        if not negs:
            continue
        for p in range(sim.shape[1]):
            if p == a or labels[p] != labels[a]:
                continue
            below = [n for n in negs if sim[a, n] < sim[a, p]]
            if below:
                n = max(below, key=lambda n: (sim[a, n], -n))
            else:
                n = min(negs, key=lambda n: (sim[a, n], n))
            negative[a, p] = n
            loss_sum[a] += max(0.0, sim[a, n] - sim[a, p] + margin)
    return loss_sum, negative


_JIT_ALL = jax.jit(lambda s, y: losses.all_triplets_margin_sums(s, y, margin=0.3))
_JIT_SEMI = jax.jit(lambda s, y: losses.semihard_margin_sums(s, y, margin=0.3))


def _random_problem(seed, b=10, num_classes=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, num_classes, size=b)
    return x @ x.T, labels


class ElementwiseLossTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.sim_ap = rng.uniform(-1, 1, size=50).astype(np.float32)
        self.sim_an = rng.uniform(-1, 1, size=50).astype(np.float32)

    def test_triplet_margin_matches_formula(self):
        got = jax.jit(losses.triplet_margin_loss)(self.sim_ap, self.sim_an, 0.3)
        np.testing.assert_allclose(got, np.maximum(0, self.sim_an - self.sim_ap + 0.3),
                                   atol=1e-6)

    def test_soft_triplet_is_two_way_softmax(self):
        got = jax.jit(losses.soft_triplet_loss)(self.sim_ap, self.sim_an, 0.1)
        logits = np.stack([self.sim_ap, self.sim_an], 1).astype(np.float64) / 0.1
        want = -(logits[:, 0] - np.log(np.exp(logits).sum(1)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def test_margin_may_be_traced(self):
        f = jax.jit(lambda m: losses.triplet_margin_loss(jnp.array([0.5]), jnp.array([0.25]),
                                                         margin=m))
        np.testing.assert_allclose(f(0.5), [0.25])
        np.testing.assert_allclose(f(0.1), [0.0])

    def test_sct_loss_matches_definition(self):
        for rule in ("or", "and"):
            with self.subTest(rule=rule):
                got = losses.sct_loss(self.sim_ap, self.sim_an, temperature=0.2,
                                      hard_weight=0.7, hard_threshold=0.3, hard_rule=rule)
                for ap, an, g in zip(self.sim_ap, self.sim_an, np.asarray(got)):
                    if rule == "or":
                        hard, easy = (an > ap) or (an > 0.3), (an < ap) and (an < 0.3)
                    else:
                        hard = (an > ap) and (an > 0.3)
                        easy = not hard
                    want = _softplus((an - ap) / 0.2) if easy else (0.7 * an if hard else 0.0)
                    self.assertAlmostEqual(float(g), float(want), places=5)

    def test_sct_masks_or_rule_ties_in_neither_set(self):
        sim_ap = jnp.array([0.5, 0.5, 0.9, 0.2, 0.9])
        sim_an = jnp.array([0.5, 0.3, 0.8, 0.4, 0.85])
        easy, hard = losses.sct_masks(sim_ap, sim_an)
        # tie s_an == s_ap; easy; s_an == threshold (0.8) below s_ap: neither; s_an > s_ap;
        # above the threshold though below s_ap: hard.
        self.assertEqual(easy.tolist(), [False, True, False, False, False])
        self.assertEqual(hard.tolist(), [False, False, False, True, True])

    def test_sct_masks_and_rule_of_the_first_release(self):
        sim_ap = jnp.array([0.5, 0.3, 0.2, 0.6])
        sim_an = jnp.array([0.5, 0.4, 0.6, 0.7])
        easy, hard = losses.sct_masks(sim_ap, sim_an, hard_threshold=0.5, hard_rule="and")
        # tie: easy (not hard); above s_ap but below 0.5: easy; both: hard.
        self.assertEqual(hard.tolist(), [False, False, True, True])
        self.assertEqual(easy.tolist(), [True, True, False, False])
        easy_or, hard_or = losses.sct_masks(sim_ap, sim_an, hard_threshold=0.5)
        self.assertEqual(hard_or.tolist(), [False, True, True, True])
        self.assertEqual(easy_or.tolist(), [False, False, False, False])

    def test_sct_hard_term_has_no_positive_gradient(self):
        g_ap, g_an = jax.grad(lambda a, n: losses.sct_loss(a, n, hard_weight=0.5).sum(),
                              argnums=(0, 1))(jnp.array([0.2, 0.1]), jnp.array([0.5, 0.9]))
        np.testing.assert_allclose(g_ap, [0.0, 0.0])
        np.testing.assert_allclose(g_an, [0.5, 0.5])

    def test_sct_easy_term_gradient(self):
        ap, an = 0.5, 0.3
        g_ap, g_an = jax.grad(lambda a, n: losses.sct_loss(a, n).sum(), argnums=(0, 1))(
            jnp.array([ap]), jnp.array([an]))
        sig = 1 / (1 + np.exp(-(an - ap) / 0.1))
        np.testing.assert_allclose(g_an, [sig / 0.1], rtol=1e-5)
        np.testing.assert_allclose(g_ap, [-sig / 0.1], rtol=1e-5)

    @parameterized.named_parameters(
        ("margin", lambda a, n: losses.triplet_margin_loss(a, n, 0.2)),
        ("soft", lambda a, n: losses.soft_triplet_loss(a, n, 0.5)),
        ("sct_easy", lambda a, n: losses.sct_loss(a, n, hard_threshold=2.0)),
        ("sct_hard", lambda a, n: losses.sct_loss(a - 1.0, n)),
    )
    def test_check_grads(self, fn):
        # Points away from the kinks (hinge at 0, the SCT set boundaries).
        sim_ap = jnp.array([0.9, 0.7, 0.8])
        sim_an = jnp.array([0.1, 0.6, 0.3])
        check_grads(fn, (sim_ap, sim_an), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)

    def test_analysis_style_use_under_grad_and_vmap(self):
        grid = jnp.linspace(-0.9, 0.9, 5)
        for fn in (losses.triplet_margin_loss, losses.soft_triplet_loss, losses.sct_loss):
            g = jax.vmap(jax.grad(lambda a, n: fn(a, n), argnums=(0, 1)))(grid, grid[::-1])
            self.assertTrue(all(np.isfinite(np.asarray(x)).all() for x in g))

    def test_bad_inputs(self):
        with self.assertRaisesRegex(ValueError, "sim_ap"):
            losses.triplet_margin_loss(jnp.zeros(3), jnp.zeros(4))
        with self.assertRaisesRegex(TypeError, "sim_an"):
            losses.soft_triplet_loss(jnp.zeros(3), jnp.zeros(3, jnp.int32))
        with self.assertRaisesRegex(ValueError, "hard_rule"):
            losses.sct_loss(jnp.zeros(3), jnp.zeros(3), hard_rule="xor")
        for fn in (losses.soft_triplet_loss, losses.sct_loss):
            for t in (0.0, -0.1):  # T <= 0 gives inf / an inverted loss: refused
                with self.assertRaisesRegex(ValueError, r"`temperature` must be .*> 0; got"):
                    fn(jnp.zeros(3), jnp.zeros(3), temperature=t)
        # A traced temperature (a schedule) has no value to check at trace time.
        value = jax.jit(losses.soft_triplet_loss)(jnp.zeros(1), jnp.ones(1), jnp.float32(0.5))
        np.testing.assert_allclose(value, [np.log1p(np.exp(2.0))], rtol=1e-6)


class ReductionTest(parameterized.TestCase):

    def test_masked_mean(self):
        values = jnp.array([1.0, 2.0, 3.0, 100.0])
        mask = jnp.array([True, True, True, False])
        self.assertAlmostEqual(float(losses.masked_mean(values, mask)), 2.0)
        self.assertEqual(float(losses.masked_mean(values, jnp.zeros(4, bool))), 0.0)
        total, count = losses.masked_sum_count(values, mask)
        self.assertEqual((float(total), int(count)), (6.0, 3))

    def test_avg_nonzero(self):
        values = jnp.array([0.0, 0.5, 1.0, 7.0])
        mask = jnp.array([True, True, True, False])
        self.assertAlmostEqual(float(losses.avg_nonzero(values, mask)), 0.75)
        self.assertEqual(float(losses.avg_nonzero(jnp.zeros(4), mask)), 0.0)
        total, count = losses.nonzero_sum_count(values, mask)
        self.assertEqual((float(total), int(count)), (1.5, 2))

    def test_padding_values_never_leak_into_value_or_gradient(self):
        values = jnp.array([1.0, jnp.inf])
        mask = jnp.array([True, False])
        self.assertEqual(float(losses.masked_mean(values, mask)), 1.0)
        g = jax.grad(lambda v: losses.avg_nonzero(v * 2.0, mask))(jnp.array([1.0, 3.0]))
        np.testing.assert_allclose(g, [2.0, 0.0])

    def test_bad_inputs(self):
        with self.assertRaisesRegex(ValueError, "mask"):
            losses.masked_mean(jnp.zeros(3), jnp.zeros(4, bool))
        with self.assertRaisesRegex(TypeError, "mask"):
            losses.avg_nonzero(jnp.zeros(3), jnp.zeros(3))


class AllPairsSumsTest(parameterized.TestCase):

    @parameterized.parameters(0, 1, 2, 3)
    def test_all_triplets_matches_triple_loop(self, seed):
        sim, labels = _random_problem(seed)
        at = _JIT_ALL(jnp.asarray(sim, jnp.float32), jnp.asarray(labels))
        loss_sum, num_active, num_hard = _np_all_triplets(sim, labels, 0.3)
        np.testing.assert_allclose(at.loss_sum, loss_sum, atol=1e-4)
        np.testing.assert_array_equal(at.num_active, num_active.sum(1))
        np.testing.assert_array_equal(at.num_hard, num_hard.sum(1))
        pos = [(labels == y).sum() - 1 for y in labels]
        np.testing.assert_array_equal(at.num_triplets,
                                      [p * (labels != y).sum() for p, y in zip(pos, labels)])
        self.assertGreater(num_active.sum(), 0)

    @parameterized.parameters(0, 1, 2, 3)
    def test_semihard_matches_pair_loop(self, seed):
        sim, labels = _random_problem(seed)
        st = _JIT_SEMI(jnp.asarray(sim, jnp.float32), jnp.asarray(labels))
        loss_sum, negative = _np_semihard(sim, labels, 0.3)
        np.testing.assert_allclose(st.loss_sum, loss_sum, atol=1e-5)
        pairs = negative >= 0
        np.testing.assert_array_equal(st.num_pairs, pairs.sum(1))
        rows = np.arange(len(labels))[:, None]
        sim_an = np.where(pairs, sim[rows, np.maximum(negative, 0)], 0.0)
        np.testing.assert_allclose(st.sum_sim_an, sim_an.sum(1), atol=1e-5)
        np.testing.assert_allclose(st.sum_sim_ap, np.where(pairs, sim, 0).sum(1), atol=1e-5)
        np.testing.assert_array_equal(st.num_hard, (pairs & (sim_an > sim)).sum(1))
        np.testing.assert_array_equal(
            st.num_active, (pairs & (sim_an - sim + 0.3 > 0)).sum(1))

    def test_gradients_match_finite_differences_of_the_loops(self):
        sim, labels = _random_problem(5, b=7, num_classes=3)
        with jax.enable_x64(True):
            for name, fn, ref in (
                    ("all", losses.all_triplets_margin_sums,
                     lambda s: _np_all_triplets(s, labels, 0.3)[0].sum()),
                    ("semihard", losses.semihard_margin_sums,
                     lambda s: _np_semihard(s, labels, 0.3)[0].sum())):
                with self.subTest(name):
                    grad = jax.grad(lambda s: fn(s, jnp.asarray(labels), margin=0.3)
                                    .loss_sum.sum())(jnp.asarray(sim))
                    fd = np.zeros_like(sim)
                    h = 1e-7
                    for idx in np.ndindex(*sim.shape):
                        d = np.zeros_like(sim)
                        d[idx] = h
                        fd[idx] = (ref(sim + d) - ref(sim - d)) / (2 * h)
                    np.testing.assert_allclose(grad, fd, atol=1e-5)
                    self.assertGreater(np.abs(fd).sum(), 0.0)

    def test_query_offset_removes_self_pairs_only(self):
        sim, labels = _random_problem(7, b=12, num_classes=3)
        rows = slice(4, 8)
        at = losses.all_triplets_margin_sums(jnp.asarray(sim[rows], jnp.float32),
                                             jnp.asarray(labels[rows]), jnp.asarray(labels),
                                             query_offset=4, margin=0.3)
        loss_sum, num_active, _ = _np_all_triplets(sim, labels, 0.3)
        np.testing.assert_allclose(at.loss_sum, loss_sum[rows], atol=1e-4)
        np.testing.assert_array_equal(at.num_active, num_active[rows].sum(1))

    def test_no_positive_or_no_negative_gives_zero(self):
        for labels in ([0, 0, 0, 0], [0, 1, 2, 3], [0]):
            with self.subTest(labels=labels):
                n = len(labels)
                sim = jnp.asarray(np.random.default_rng(0).uniform(size=(n, n)), jnp.float32)
                at = losses.all_triplets_margin_sums(sim, jnp.array(labels))
                st = losses.semihard_margin_sums(sim, jnp.array(labels))
                self.assertEqual(float(jnp.abs(at.loss_sum).sum()), 0.0)
                self.assertEqual(float(jnp.abs(st.loss_sum).sum()), 0.0)
                self.assertEqual(int(st.num_pairs.sum()), 0)

    def test_bad_inputs(self):
        with self.assertRaisesRegex(ValueError, "labels"):
            losses.all_triplets_margin_sums(jnp.zeros((3, 3)), jnp.zeros(4, jnp.int32))
        with self.assertRaisesRegex(ValueError, "sim"):
            losses.semihard_margin_sums(jnp.zeros(3), jnp.zeros(3, jnp.int32))


if __name__ == "__main__":
    absltest.main()
