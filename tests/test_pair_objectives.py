"""Tests of hnm.objectives.pair and the pair miners of hnm.miners against slow NumPy float64
references written from the papers.

The references loop over explicit pairs / anchors / triplets (PML 2.9's documented behaviour
for the reductions) and never call hnm. Gradients are compared with central finite
differences of the references, values and gradients in float64 (``jax.enable_x64``).
"""
import functools
import inspect
import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest
from scipy import stats

from hnm import distances
from hnm import miners
from hnm.objectives import pair as pl

B, D = 12, 5          # one shape for every single-device case: one compilation per function
NUM_DEVICES = 8
LABELS = {
    "pk": np.repeat(np.arange(4), 3),                              # P x K = 4 x 3
    "odd_singletons": np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5]),   # 2 singletons
    "shuffled": np.array([2, 0, 1, 2, 7, 0, 1, 2, 9, 1, 0, 2]),    # interleaved, singletons
}
DW_DEFAULTS = dict(cutoff=0.5, nonzero_loss_cutoff=1.4, margin=0.2, beta=1.2)


# ------------------------------------------------------------------ NumPy references
def np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def np_avg_nonzero(values):
    values = [v for v in values if v > 0]
    return sum(values) / len(values) if values else 0.0


def ref_contrastive(emb, labels, pos_margin=0.0, neg_margin=1.0, distance="euclidean",
                    normalize=True):
    """Hadsell's loss over all ordered pairs i != j, PML's avg_nonzero per group."""
    x = np_normalize(emb) if normalize else emb
    pos, neg = [], []
    for i in range(len(x)):
        for j in range(len(x)):
            if i == j:
                continue
            if distance == "euclidean":
                d = math.sqrt(sum((x[i, k] - x[j, k]) ** 2 for k in range(x.shape[1])))
                pos_l, neg_l = max(d - pos_margin, 0.0), max(neg_margin - d, 0.0)
            else:  # cosine: a similarity, PML flips the hinges
                s = float(np.dot(x[i], x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j])))
                pos_l, neg_l = max(pos_margin - s, 0.0), max(s - neg_margin, 0.0)
            if labels[i] == labels[j]:
                pos.append(pos_l)
            else:
                neg.append(neg_l)
    return np_avg_nonzero(pos) + np_avg_nonzero(neg)


def ref_multi_similarity(emb, labels, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
    """Wang et al.'s MS loss over the pairs kept by the MS miner, mean over all anchors."""
    x = np_normalize(emb)
    n = len(x)
    s = [[float(np.dot(x[i], x[j])) for j in range(n)] for i in range(n)]
    mined = []
    for a in range(n):
        pos = [p for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [q for q in range(n) if labels[q] != labels[a]]
        if not pos or not neg:
            mined.append(([], []))
            continue
        max_neg = max(s[a][q] for q in neg)
        min_pos = min(s[a][p] for p in pos)
        mined.append(([p for p in pos if s[a][p] - epsilon < max_neg],
                      [q for q in neg if s[a][q] + epsilon > min_pos]))
    if sum(len(m[0]) for m in mined) <= 1 and sum(len(m[1]) for m in mined) <= 1:
        return 0.0   # PML's GenericPairLoss: every index tensor of length <= 1 -> zero
    total = 0.0
    for a, (pos, neg) in enumerate(mined):
        if pos:
            total += math.log(1 + sum(math.exp(-alpha * (s[a][p] - base)) for p in pos)) / alpha
        if neg:
            total += math.log(1 + sum(math.exp(beta * (s[a][q] - base)) for q in neg)) / beta
    return total / n


def ref_supcon(emb, labels, temperature=0.1):
    """Khosla et al.'s SupCon (PML): mean over anchors with non-zero loss."""
    x = np_normalize(emb)
    n = len(x)
    has_pos = any(labels[i] == labels[j] for i in range(n) for j in range(n) if i != j)
    has_neg = any(labels[i] != labels[j] for i in range(n) for j in range(n))
    if not (has_pos and has_neg):
        return 0.0
    per_anchor = []
    for a in range(n):
        pos = [p for p in range(n) if p != a and labels[p] == labels[a]]
        if not pos:
            continue
        z = [float(np.dot(x[a], x[j])) / temperature for j in range(n)]
        log_den = math.log(sum(math.exp(z[j]) for j in range(n) if j != a))
        per_anchor.append(-sum(z[p] - log_den for p in pos) / len(pos))
    return np_avg_nonzero(per_anchor)


def ref_dw_probs(emb, labels, cutoff=0.5, nonzero_loss_cutoff=1.4):
    """Wu et al.'s sampling distribution per anchor, w = 1/q(d) in plain powers."""
    x = np_normalize(emb)
    n, dim = x.shape
    probs = np.zeros((n, n))
    for a in range(n):
        for j in range(n):
            d = float(np.linalg.norm(x[a] - x[j]))
            if labels[j] == labels[a] or d >= nonzero_loss_cutoff:
                continue
            d = max(d, cutoff)
            probs[a, j] = 1.0 / (d ** (dim - 2) * (1.0 - d * d / 4.0) ** ((dim - 3) / 2.0))
        if probs[a].sum() > 0:
            probs[a] /= probs[a].sum()
    return probs


def ref_dw_loss(emb, triplets, loss="margin", margin=0.2, beta=1.2):
    """Margin loss (Wu; PML MarginLoss divisor) or hinge (PML avg_nonzero) on triplets."""
    x = np_normalize(emb)

    def d(i, j):
        return float(np.linalg.norm(x[i] - x[j]))

    if loss == "margin":
        pos = [max(d(a, p) - beta + margin, 0.0) for a, p, _ in triplets]
        neg = [max(beta - d(a, q) + margin, 0.0) for a, _, q in triplets]
        count = sum(v > 0 for v in pos) + sum(v > 0 for v in neg)
        return (sum(pos) + sum(neg)) / count if count else 0.0
    return np_avg_nonzero([max(d(a, p) - d(a, q) + margin, 0.0) for a, p, q in triplets])


def fd_grad(f, x, h=1e-6):
    """Central finite differences of a float64 NumPy function."""
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


# ------------------------------------------------------------------ jitted functions
@functools.lru_cache(maxsize=None)
def value_and_grad_fn(name, static=()):
    """jit(value_and_grad) of an objective; numeric options are traced (no recompiles)."""
    objective = functools.partial(pl.OBJECTIVES[name], **dict(static))

    def loss_fn(emb, labels, key, opts):
        return objective(emb, labels, key, **opts)

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


@functools.lru_cache(maxsize=None)
def dw_triplets_fn():
    """The triplets distance_weighted samples, from the public miner (same ops, same key)."""
    def fn(emb, labels, key, cutoff, nonzero_loss_cutoff):
        x = distances.l2_normalize(emb)
        dist = distances.euclidean_distance(x)
        return miners.mine_distance_weighted(key, dist, labels, dim=emb.shape[1],
                                             cutoff=cutoff,
                                             nonzero_loss_cutoff=nonzero_loss_cutoff)
    return jax.jit(fn)


def triplet_list(t):
    a, p, n, v = (np.asarray(f) for f in t)
    return [(int(i), int(j), int(k)) for i, j, k, ok in zip(a.ravel(), p.ravel(), n.ravel(),
                                                             v.ravel()) if ok]


def random_emb(seed, n=B, dim=D):
    return np.random.default_rng(seed).normal(size=(n, dim))


def numeric_defaults(name):
    """The objective's numeric keyword options and their defaults (traced in every call)."""
    params = inspect.signature(pl.OBJECTIVES[name]).parameters.values()
    return {p.name: p.default for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY and isinstance(p.default, float)}


def run(name, emb, labels, key=None, static=(), **opts):
    """(loss, aux, grad) in float64; every numeric option traced, so shapes decide compiles."""
    with jax.enable_x64(True):
        key = jax.random.key(0) if key is None else key
        opts = {k: jnp.float64(v) for k, v in {**numeric_defaults(name), **opts}.items()}
        (loss, aux), grad = value_and_grad_fn(name, tuple(static))(
            jnp.asarray(emb, jnp.float64), jnp.asarray(labels, jnp.int32), key, opts)
        return float(loss), jax.tree.map(np.asarray, aux), np.asarray(grad)


# ------------------------------------------------------------------ references, per objective
class ReferenceTest(parameterized.TestCase):
    """Loss and gradient vs the NumPy references (float64)."""

    @parameterized.product(
        labels=list(LABELS),
        setting=[
            dict(static=(), opts=dict(pos_margin=0.0, neg_margin=1.0)),
            dict(static=(), opts=dict(pos_margin=0.8, neg_margin=1.3)),
            dict(static=(("distance", "cosine"),), opts=dict(pos_margin=0.9, neg_margin=0.1)),
            dict(static=(("normalize", False),), opts=dict(pos_margin=1.0, neg_margin=2.5)),
        ])
    def test_contrastive(self, labels, setting):
        labels, emb = LABELS[labels], random_emb(1)
        static = dict(setting["static"])
        kwargs = dict(distance=static.get("distance", "euclidean"),
                      normalize=static.get("normalize", True), **setting["opts"])
        loss, aux, grad = run("contrastive", emb, labels, static=setting["static"],
                              **setting["opts"])
        self.assertGreater(loss, 0.0)
        self.assertAlmostEqual(loss, ref_contrastive(emb, labels, **kwargs), places=10)
        np.testing.assert_allclose(grad, fd_grad(lambda e: ref_contrastive(e, labels, **kwargs),
                                                 emb), atol=1e-6)

    @parameterized.product(labels=list(LABELS),
                           opts=[dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1),
                                 dict(alpha=1.0, beta=10.0, base=0.3, epsilon=0.3)])
    def test_multi_similarity(self, labels, opts):
        labels, emb = LABELS[labels], random_emb(2)
        loss, aux, grad = run("multi_similarity", emb, labels, **opts)
        self.assertGreater(loss, 0.0)
        self.assertAlmostEqual(loss, ref_multi_similarity(emb, labels, **opts), places=10)
        np.testing.assert_allclose(
            grad, fd_grad(lambda e: ref_multi_similarity(e, labels, **opts), emb), atol=1e-6)

    @parameterized.product(labels=list(LABELS), temperature=[0.1, 0.5])
    def test_supcon(self, labels, temperature):
        labels, emb = LABELS[labels], random_emb(3)
        loss, aux, grad = run("supcon", emb, labels, temperature=temperature)
        self.assertGreater(loss, 0.0)
        self.assertAlmostEqual(loss, ref_supcon(emb, labels, temperature), places=9)
        np.testing.assert_allclose(
            grad, fd_grad(lambda e: ref_supcon(e, labels, temperature), emb), atol=1e-5)

    @parameterized.product(labels=list(LABELS), loss=["margin", "triplet"])
    def test_distance_weighted(self, labels, loss):
        # The sampled negatives are piecewise constant in the embeddings: the reference gets
        # the triplets the public miner draws with the same key and differentiates with them
        # held fixed.
        labels, emb = LABELS[labels], random_emb(4)
        key = jax.random.key(7)
        opts = dict(DW_DEFAULTS, margin=0.6 if loss == "triplet" else 0.2)
        value, aux, grad = run("distance_weighted", emb, labels, key=key,
                               static=(("loss", loss),) if loss == "triplet" else (), **opts)
        with jax.enable_x64(True):
            t = dw_triplets_fn()(jnp.asarray(emb), jnp.asarray(labels), key, 0.5, 1.4)
        triplets = triplet_list(t)
        self.assertNotEmpty(triplets)
        self.assertEqual(int(aux["num_valid"]), len(triplets))
        # frac_hard: as in every triplet objective, the sampled triplets with d_an < d_ap.
        x = np_normalize(emb)
        dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
        hard = np.mean([dist[a, n] < dist[a, p] for a, p, n in triplets])
        self.assertAlmostEqual(float(aux["frac_hard"]), hard, places=10)
        self.assertNotIn("frac_hard_ephn", aux)
        ref = functools.partial(ref_dw_loss, triplets=triplets, loss=loss,
                                margin=opts["margin"], beta=opts["beta"])
        self.assertGreater(value, 0.0)
        self.assertAlmostEqual(value, ref(emb), places=10)
        np.testing.assert_allclose(grad, fd_grad(ref, emb), atol=1e-6)

    def test_aux_statistics(self):
        """aux against loops over pairs (cosine), on the contrastive and supcon paths."""
        labels, emb = LABELS["odd_singletons"], random_emb(5)
        x = np_normalize(emb)
        cos = x @ x.T
        same = labels[:, None] == labels[None, :]
        off = ~np.eye(B, dtype=bool)
        hard, both = 0, 0
        for a in range(B):
            pos = [cos[a, p] for p in range(B) if p != a and labels[p] == labels[a]]
            neg = [cos[a, q] for q in range(B) if labels[q] != labels[a]]
            if pos and neg:
                both += 1
                hard += max(neg) > max(pos)
        for name in ("contrastive", "supcon"):
            _, aux, _ = run(name, emb, labels)
            with self.subTest(name):
                self.assertAlmostEqual(float(aux["frac_hard_ephn"]), hard / both, places=10)
                self.assertNotIn("frac_hard", aux)  # no triplets: not the triplet statistic
                self.assertAlmostEqual(float(aux["mean_sim_ap"]), cos[same & off].mean(),
                                       places=10)
                self.assertAlmostEqual(float(aux["mean_sim_an"]), cos[~same].mean(),
                                       places=10)
        loss, aux, _ = run("contrastive", emb, labels)
        self.assertAlmostEqual(float(aux["loss"]), loss, places=12)
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        active = (same & off & (d > 0)).sum() + (~same & (d < 1.0)).sum()
        self.assertEqual(int(aux["num_valid"]), active)
        self.assertAlmostEqual(float(aux["frac_active"]), active / (off.sum()), places=10)
        _, aux, _ = run("multi_similarity", emb, labels)
        self.assertBetween(float(aux["frac_active"]), 0.01, 0.99)


# ------------------------------------------------------------------ closed forms, edge cases
class ClosedFormTest(parameterized.TestCase):
    """Cases done on paper: three points at right angles in 2-D (their own shape)."""

    # x0 = e1, x1 = e2, x2 = e1; labels 0, 0, 1: s01 = 0, s02 = 1, s12 = 0.
    EMB = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    LAB = np.array([0, 0, 1])

    def test_contrastive(self):
        loss, aux, _ = run("contrastive", self.EMB, self.LAB)
        self.assertAlmostEqual(loss, math.sqrt(2.0) + 1.0, places=12)
        # Anchor 0: closest negative s02 = 1 > s01 = 0, hard; anchor 1: s12 = s10 = 0, a tie,
        # not hard; anchor 2 has no positive.
        self.assertEqual(float(aux["frac_hard_ephn"]), 0.5)
        self.assertAlmostEqual(float(aux["mean_sim_ap"]), 0.0, places=12)
        self.assertAlmostEqual(float(aux["mean_sim_an"]), 0.5, places=12)
        self.assertEqual(int(aux["num_valid"]), 4)      # 2 positive + 2 coincident negative
        self.assertEqual(float(aux["frac_active"]), 4 / 6)

    def test_multi_similarity(self):
        loss, aux, _ = run("multi_similarity", self.EMB, self.LAB)
        expected = (math.log(1 + math.e)
                    + (math.log(1 + math.exp(25.0)) + math.log(1 + math.exp(-25.0))) / 50) / 3
        self.assertAlmostEqual(loss, expected, places=12)
        self.assertEqual(int(aux["num_valid"]), 4)

    def test_supcon(self):
        loss, _, _ = run("supcon", self.EMB, self.LAB, temperature=1.0)
        self.assertAlmostEqual(loss, (math.log(1 + math.e) + math.log(2.0)) / 2, places=12)

    def test_multi_similarity_single_mined_pair_is_zero(self):
        # Anchor 0 mines exactly one positive and one negative, nobody else mines: PML's
        # GenericPairLoss returns 0 (test_multi_similarity above mines 4 pairs and is not 0).
        emb = np.array([[1.0, 0.0], [math.cos(0.5), math.sin(0.5)],
                        [math.cos(0.5), -math.sin(0.5)]])
        self.assertGreater(math.cos(0.5) - 0.1, math.cos(1.0))   # anchor 1 mines nothing
        loss, aux, grad = run("multi_similarity", emb, np.array([0, 0, 1]))
        self.assertEqual(loss, 0.0)
        self.assertEqual(int(aux["num_valid"]), 0)
        np.testing.assert_array_equal(grad, 0.0)

    def test_distance_weighted_weights(self):
        # n = 3: q(d) = d (1 - d^2/4)^0 = d, so w = 1/max(d, cutoff); d >= 1.4 never drawn.
        dist = jnp.array([[0.0, 0.3, 0.8, 1.2, 1.5]])
        neg = jnp.array([[False, True, True, True, True]])
        log_w = miners.distance_weighted_log_weights(dist, neg, dim=3)
        w = np.exp(np.asarray(log_w[0]))
        np.testing.assert_allclose(w, [0.0, 1 / 0.5, 1 / 0.8, 1 / 1.2, 0.0], rtol=1e-6)


class EdgeCaseTest(parameterized.TestCase):

    def test_one_kind_of_pair_missing_keeps_the_other(self):
        emb = random_emb(6)
        no_pos = np.arange(B)                 # all singletons: negatives only
        one_class = np.zeros(B, dtype=int)    # no negatives
        for labels in (no_pos, one_class):
            loss, _, _ = run("contrastive", emb, labels, pos_margin=0.0, neg_margin=1.5)
            self.assertGreater(loss, 0.0)
            self.assertAlmostEqual(loss, ref_contrastive(emb, labels, 0.0, 1.5), places=10)
        # SupCon and MS need both kinds: 0, as in PML.
        for name in ("supcon", "multi_similarity"):
            for labels in (no_pos, one_class):
                self.assertEqual(run(name, emb, labels)[0], 0.0)

    @parameterized.parameters("contrastive", "multi_similarity", "supcon",
                              "distance_weighted")
    def test_nothing_valid(self, name):
        emb, labels = random_emb(7), np.arange(B)   # no positive pair anywhere
        opts = {}
        if name == "contrastive":                   # every hinge inactive instead
            labels, opts = LABELS["pk"], dict(pos_margin=10.0, neg_margin=0.0)
        loss, aux, grad = run(name, emb, labels, **opts)
        self.assertEqual(loss, 0.0)
        self.assertEqual(int(aux["num_valid"]), 0)
        self.assertEqual(float(aux["loss"]), 0.0)
        np.testing.assert_array_equal(grad, 0.0)
        for k, v in aux.items():
            self.assertTrue(np.isfinite(v), k)

    def test_distance_weighted_far_negatives_drop_out(self):
        # Class 1 sits at the antipode of class 0 (d ~ 2 > 1.4): nothing can be sampled.
        emb = 0.1 * random_emb(8)
        emb[:6, 0] += 1.0
        emb[6:, 0] -= 1.0
        labels = np.repeat([0, 1], 6)
        loss, aux, grad = run("distance_weighted", emb, labels)
        self.assertEqual(loss, 0.0)
        self.assertEqual(int(aux["num_valid"]), 0)
        self.assertTrue(np.all(np.isfinite(grad)))

    @parameterized.parameters("contrastive", "multi_similarity", "supcon",
                              "distance_weighted")
    def test_duplicate_and_zero_embeddings_have_finite_grads(self, name):
        emb = random_emb(9)
        emb[1] = emb[0]        # duplicate within a class (distance 0)
        emb[4] = emb[0]        # duplicate across classes
        emb[7] = 0.0           # zero vector
        loss, aux, grad = run(name, emb, LABELS["pk"])
        self.assertTrue(np.isfinite(loss))
        self.assertTrue(np.all(np.isfinite(grad)))
        self.assertTrue(all(np.isfinite(v) for v in aux.values()))

    @pytest.mark.slow  # numerical gradients of four objectives
    def test_check_grads(self):
        # One compilation: a weighted sum of the four objectives (a wrong gradient in any of
        # them breaks the sum's). Kinks (hinges, mining) are far from these random points.
        weights = dict(contrastive=1.0, multi_similarity=2.0, supcon=0.5,
                       distance_weighted=3.0)
        with jax.enable_x64(True):
            labels = jnp.asarray(LABELS["odd_singletons"])
            key = jax.random.key(3)

            @jax.jit
            def total(e):
                return sum(w * pl.OBJECTIVES[name](e, labels, key)[0]
                           for name, w in weights.items())

            check_grads(total, (jnp.asarray(random_emb(10)),), order=1, modes=("rev",),
                        eps=1e-6)

    def test_bad_input_raises_naming_the_argument(self):
        emb, labels = jnp.ones((4, 3)), jnp.array([0, 0, 1, 1])
        cases = [
            (lambda: pl.contrastive(jnp.ones((4,)), labels), ValueError, "embeddings"),
            (lambda: pl.contrastive(jnp.ones((4, 3), jnp.int32), labels), TypeError,
             "embeddings"),
            (lambda: pl.supcon(emb, jnp.array([0, 1, 1])), ValueError, "labels"),
            (lambda: pl.supcon(emb, jnp.zeros(4)), TypeError, "labels"),
            (lambda: pl.contrastive(emb, labels, distance="manhattan"), ValueError,
             "distance"),
            (lambda: pl.supcon(emb, labels, temperature=0.0), ValueError, "temperature"),
            (lambda: pl.multi_similarity(emb, labels, beta=-1.0), ValueError, "beta"),
            (lambda: pl.distance_weighted(emb, labels), ValueError, "key"),
            (lambda: pl.distance_weighted(emb, labels, jax.random.key(0), loss="hinge"),
             ValueError, "loss"),
        ]
        for fn, error, name in cases:
            with self.subTest(name):
                with self.assertRaisesRegex(error, f"`{name}"):
                    fn()


# ------------------------------------------------------------------ the DW sampler
class SamplerTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        # Anchor 9 (class 3) faces every other class from the far side of the sphere
        # (cosine < 0, so d > sqrt(2) > 1.4): it has no negative to sample.
        self.emb = random_emb(11)
        self.labels = LABELS["odd_singletons"]
        others = self.labels != 3
        self.emb[others, 0] = np.abs(self.emb[others, 0]) + 0.3
        self.emb[9] = [-1.0, 0.0, 0.0, 0.0, 0.0]
        self.dist = np.linalg.norm(np_normalize(self.emb)[:, None] - np_normalize(self.emb)[None],
                                   axis=-1)

    def test_sampled_negatives_are_valid(self):
        keys = jax.random.split(jax.random.key(0), 64)
        t = jax.vmap(dw_triplets_fn(), in_axes=(None, None, 0, None, None))(
            jnp.asarray(self.emb, jnp.float32), jnp.asarray(self.labels), keys, 0.5, 1.4)
        a, p, n, valid = (np.asarray(f) for f in t)
        self.assertEqual(n.shape, (64, B, B))
        self.assertEqual(n.dtype, np.int32)
        probs = ref_dw_probs(self.emb, self.labels)
        has_neg = probs.sum(1) > 0
        self.assertTrue(has_neg.any() and not has_neg.all())
        same = self.labels[:, None] == self.labels[None, :]
        expected_valid = same & ~np.eye(B, dtype=bool) & has_neg[:, None]
        np.testing.assert_array_equal(valid, np.broadcast_to(expected_valid, valid.shape))
        self.assertTrue(np.all((n >= 0) & (n < B)))
        v = valid
        self.assertTrue(np.all(self.labels[n[v]] != self.labels[a[v]]))
        self.assertTrue(np.all(self.dist[a[v], n[v]] < 1.4))
        self.assertTrue(np.all(self.labels[p[v]] == self.labels[a[v]]))

    def test_fixed_key_is_deterministic(self):
        fn = dw_triplets_fn()
        args = (jnp.asarray(self.emb, jnp.float32), jnp.asarray(self.labels))
        t1 = fn(*args, jax.random.key(5), 0.5, 1.4)
        t2 = fn(*args, jax.random.key(5), 0.5, 1.4)
        t3 = fn(*args, jax.random.key(6), 0.5, 1.4)
        np.testing.assert_array_equal(t1.negative, t2.negative)
        self.assertFalse(np.array_equal(np.asarray(t1.negative)[np.asarray(t1.valid)],
                                        np.asarray(t3.negative)[np.asarray(t3.valid)]))

    def test_sampling_is_shift_invariant(self):
        # Weights are defined up to a factor: log-weights far below (or above) 0 must draw
        # the same negatives, not underflow to "nothing sampleable".
        with jax.enable_x64(True):
            neg_mask = jnp.asarray(self.labels[:, None] != self.labels[None, :])
            log_w = miners.distance_weighted_log_weights(jnp.asarray(self.dist), neg_mask, dim=D)
            sample = jax.jit(miners.sample_distance_weighted)
            ref_idx, ref_has = sample(jax.random.key(9), log_w)
            for shift in (-1000.0, 1000.0):
                idx, has = sample(jax.random.key(9), log_w + shift)
                np.testing.assert_array_equal(has, ref_has)
                np.testing.assert_array_equal(idx, ref_idx)

    def test_weights_and_frequencies_match_the_reference(self):
        probs = ref_dw_probs(self.emb, self.labels)
        dist = jnp.asarray(self.dist, jnp.float32)
        neg_mask = jnp.asarray(self.labels[:, None] != self.labels[None, :])
        log_w = miners.distance_weighted_log_weights(dist, neg_mask, dim=D)
        has = probs.sum(1) > 0
        np.testing.assert_allclose(np.asarray(jax.nn.softmax(log_w[has], axis=1)), probs[has],
                                   atol=1e-6)
        self.assertGreater(probs[has].max(axis=1).min() / probs[probs > 0].min(), 2.0)
        num_keys = 400
        keys = jax.random.split(jax.random.key(1), num_keys)
        neg_idx, has_neg = jax.jit(jax.vmap(miners.sample_distance_weighted, in_axes=(0, None)))(
            keys, log_w)
        np.testing.assert_array_equal(has_neg[0], has)
        neg_idx = np.asarray(neg_idx)
        for a in np.flatnonzero(has):
            counts = np.bincount(neg_idx[:, a].ravel(), minlength=B)
            support = probs[a] > 0
            with self.subTest(anchor=int(a)):
                self.assertEqual(counts[~support].sum(), 0)
                expected = probs[a, support] * counts.sum()
                chi2 = ((counts[support] - expected) ** 2 / expected).sum()
                # p-value of the chi-square statistic: a wrong weight formula gives ~0.
                self.assertGreater(stats.chi2.sf(chi2, support.sum() - 1), 1e-4)


# ------------------------------------------------------------------ jit / vmap / devices
OBJ_NAMES = ("contrastive", "multi_similarity", "supcon", "distance_weighted")
# The pmap check runs two of them by default and the other two in the slow run.
DEFAULT_OBJECTIVES = ("multi_similarity", "distance_weighted")


def _default(names):
    return tuple(n for n in names if n in DEFAULT_OBJECTIVES)


def _others(names):
    return tuple(n for n in names if n not in DEFAULT_OBJECTIVES)


class TransformTest(parameterized.TestCase):

    @parameterized.parameters(*OBJ_NAMES)
    def test_vmap_equals_loop(self, name):
        # vmap (float32) vs the float64 jit of ReferenceTest, one batch at a time.
        embs = np.stack([random_emb(s) for s in (12, 13, 14)])
        labels = np.stack([LABELS[k] for k in LABELS])
        keys = jax.random.split(jax.random.key(2), 3)
        fn = jax.jit(jax.vmap(lambda e, l, k: pl.OBJECTIVES[name](e, l, k)))
        batched_loss, batched_aux = fn(jnp.asarray(embs, jnp.float32), jnp.asarray(labels),
                                       keys)
        for i in range(3):
            loss, aux, _ = run(name, embs[i], labels[i], key=keys[i])
            self.assertGreater(loss, 0.0)
            np.testing.assert_allclose(batched_loss[i], loss, rtol=1e-4)
            self.assertEqual(int(batched_aux["num_valid"][i]), int(aux["num_valid"]))

    @parameterized.parameters(*_default(OBJ_NAMES))
    def test_pmap_shares_equal_single_device(self, name):
        self._test_pmap_shares_equal_single_device(name)

    @parameterized.parameters(*_others(OBJ_NAMES))
    @pytest.mark.slow
    def test_pmap_shares_equal_single_device_others(self, name):
        self._test_pmap_shares_equal_single_device(name)

    def _test_pmap_shares_equal_single_device(self, name):
        # Labels interleaved across devices (positives live on other devices); the DW draws
        # depend on (key, global anchor row) only, so one key gives identical negatives.
        per_device = 3
        n = NUM_DEVICES * per_device
        self.assertGreaterEqual(jax.local_device_count(), NUM_DEVICES)
        rng = np.random.default_rng(15)
        emb = jnp.asarray(rng.normal(size=(n, D)), jnp.float32)
        labels = jnp.asarray(np.concatenate([rng.integers(0, 6, n - 2), [40, 41]]))
        key = jax.random.key(4)
        objective = pl.OBJECTIVES[name]

        def local(e, l, k):
            (loss, aux), g = jax.value_and_grad(
                lambda e: objective(e, l, k, axis_name="d"), has_aux=True)(e)
            return loss, aux, g

        shares, aux, grads = jax.pmap(local, axis_name="d", in_axes=(0, 0, None),
                                      devices=jax.local_devices()[:NUM_DEVICES])(
            emb.reshape(NUM_DEVICES, per_device, D), labels.reshape(NUM_DEVICES, per_device),
            key)
        (loss, aux1), grad = jax.jit(jax.value_and_grad(
            lambda e: objective(e, labels, key), has_aux=True))(emb)
        self.assertGreater(float(loss), 0.0)
        np.testing.assert_allclose(jnp.sum(shares), loss, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(grads.reshape(n, D), grad, rtol=2e-4, atol=2e-6)
        for k, v in aux1.items():
            with self.subTest(k):
                np.testing.assert_allclose(aux[k], np.broadcast_to(v, aux[k].shape),
                                           rtol=2e-5, atol=1e-6)

    def test_traced_options_do_not_retrace(self):
        traces = []

        def f(emb, labels, temperature):
            traces.append(1)
            return pl.supcon(emb, labels, temperature=temperature)[0]

        fn = jax.jit(f)
        emb = jnp.asarray(random_emb(16), jnp.float32)
        values = [float(fn(emb, jnp.asarray(LABELS[k]), jnp.float32(t)))
                  for k in LABELS for t in (0.1, 0.2)]
        self.assertLen(traces, 1)
        self.assertLen(set(values), len(values))


# ------------------------------------------------------------------ PML, when installed
try:
    import torch
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
    HAVE_PML = True
except ImportError:   # optional: torch is never a dependency of hnm
    HAVE_PML = False


@absltest.skipUnless(HAVE_PML, "torch / pytorch_metric_learning not installed")
class PMLTest(parameterized.TestCase):
    """Equality with pytorch-metric-learning 2.9 (float64, loss and gradient)."""

    @staticmethod
    def pml(name):
        if name == "contrastive":
            return lambda e, l: pml_losses.ContrastiveLoss()(e, l)
        if name == "contrastive_cosine":
            return lambda e, l: pml_losses.ContrastiveLoss(
                pos_margin=0.9, neg_margin=0.1, distance=pml_distances.CosineSimilarity())(e, l)
        if name == "multi_similarity":
            return lambda e, l: pml_losses.MultiSimilarityLoss()(
                e, l, pml_miners.MultiSimilarityMiner()(e, l))
        return lambda e, l: pml_losses.SupConLoss(temperature=0.1)(e, l)

    @parameterized.product(name=["contrastive", "contrastive_cosine", "multi_similarity",
                                 "supcon"], labels=list(LABELS) + ["single_class"])
    def test_equals_pml(self, name, labels):
        labels = np.zeros(B, dtype=int) if labels == "single_class" else LABELS[labels]
        for seed in (20, 21):
            emb = random_emb(seed)
            emb_t = torch.tensor(emb, requires_grad=True)
            loss_t = self.pml(name)(emb_t, torch.tensor(labels))
            loss_t.backward()
            if name == "contrastive_cosine":
                loss, _, grad = run("contrastive", emb, labels,
                                    static=(("distance", "cosine"),), pos_margin=0.9,
                                    neg_margin=0.1)
            else:
                loss, _, grad = run(name, emb, labels)
            self.assertAlmostEqual(loss, loss_t.item(), places=10)
            np.testing.assert_allclose(grad, emb_t.grad.numpy(), atol=1e-10)


if __name__ == "__main__":
    absltest.main()
