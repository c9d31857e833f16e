"""Tests of the margin miners, top-k hardest negatives and triplet subsampling (end of
hnm/miners.py): brute-force NumPy enumeration, PML 2.9's TripletMarginMiner /
PairMarginMiner on the same inputs (sets of indices, skipped without torch), properties of
the fixed-shape outputs, custom relevance masks, and sharding-invariant sampling."""
import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _reference_utils import np_normalize
from hnm import distances
from hnm import miners

LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 3, 3])
N, D = len(LABELS), 4


def problem(seed=0):
    emb = np_normalize(np.random.default_rng(seed).normal(size=(N, D)))
    return emb, emb @ emb.T


def ref_triplets(sim, labels, margin, kind):
    out = set()
    for a, p, n in itertools.product(range(len(labels)), repeat=3):
        if p == a or labels[p] != labels[a] or labels[n] == labels[a]:
            continue
        mu = sim[a, p] - sim[a, n]
        ok = {"all": mu <= margin, "hard": mu <= 0, "semihard": 0 < mu <= margin,
              "easy": mu > margin}[kind]
        if ok:
            out.add((a, p, n))
    return out


class TripletMarginTest(parameterized.TestCase):

    @parameterized.product(kind=miners.TRIPLET_KINDS, margin=(0.1, 0.5))
    def test_mask_equals_enumeration(self, kind, margin):
        _, sim = problem()
        mask = np.asarray(miners.triplet_margin_mask(jnp.asarray(sim, jnp.float32),
                                                     jnp.asarray(LABELS), margin=margin,
                                                     kind=kind))
        got = set(map(tuple, np.argwhere(mask)))
        # float32 vs float64 can move a triplet exactly on the margin: none here.
        self.assertEqual(got, ref_triplets(sim, LABELS, margin, kind))
        self.assertNotEmpty(got)

    @parameterized.parameters(*miners.TRIPLET_KINDS)
    def test_equals_pml(self, kind):
        torch = pytest.importorskip("torch")
        pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
        emb, _ = problem(1)
        a, p, n = pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets=kind)(
            torch.tensor(emb), torch.tensor(LABELS))
        want = set(zip(a.tolist(), p.tolist(), n.tolist()))
        # PML's default distance: Euclidean on normalised rows; here sim = -d.
        with jax.enable_x64(True):
            sim = distances.negative_euclidean(jnp.asarray(emb))
            mask = miners.triplet_margin_mask(sim, jnp.asarray(LABELS), margin=0.3, kind=kind)
        self.assertEqual(set(map(tuple, np.argwhere(np.asarray(mask)))), want)

    def test_sampling_is_a_subset_uniform_and_shard_invariant(self):
        _, sim = problem(2)
        mask = miners.triplet_margin_mask(jnp.asarray(sim, jnp.float32), jnp.asarray(LABELS),
                                          margin=0.5)
        num_valid = np.asarray(mask).reshape(N, -1).sum(1)
        key = jax.random.key(0)
        t = miners.sample_triplets(key, mask, 3)
        with self.subTest("shapes and validity"):
            for f in t:
                self.assertEqual(f.shape, (N, 3))
            np.testing.assert_array_equal(np.asarray(t.valid).sum(1), np.minimum(num_valid, 3))
            m = np.asarray(mask)
            for a, p, n, v in zip(*(np.asarray(f).ravel() for f in t)):
                if v:
                    self.assertTrue(m[a, p, n])
            trip = set(zip(*(np.asarray(f)[np.asarray(t.valid)] for f in t[:3])))
            self.assertLen(trip, int(np.asarray(t.valid).sum()))     # no repeats
        with self.subTest("shard invariant"):
            lower = miners.sample_triplets(key, mask[5:], 3, query_offset=5)
            np.testing.assert_array_equal(lower.negative, np.asarray(t.negative)[5:])
        with self.subTest("uniform"):
            anchor = int(np.argmax(num_valid))
            keys = jax.random.split(jax.random.key(7), 400)
            s = jax.vmap(lambda k: miners.sample_triplets(k, mask[anchor:anchor + 1], 1))(keys)
            counts = {}
            for trip in zip(np.asarray(s.positive).ravel(), np.asarray(s.negative).ravel()):
                counts[trip] = counts.get(trip, 0) + 1
            self.assertLen(counts, num_valid[anchor])
            expect = 400 / num_valid[anchor]
            self.assertLess(max(abs(c - expect) for c in counts.values()), 5 * expect ** 0.5)

    def test_mine_triplet_margin(self):
        _, sim = problem(3)
        t = miners.mine_triplet_margin(jax.random.key(1), jnp.asarray(sim, jnp.float32),
                                       jnp.asarray(LABELS), triplets_per_anchor=4,
                                       kind="semihard", margin=0.4)
        s_ap, s_an = miners.gather_sims(jnp.asarray(sim), t)
        v = np.asarray(t.valid)
        self.assertTrue(v.any())
        self.assertTrue(np.all((np.asarray(s_ap - s_an)[v] > 0)
                               & (np.asarray(s_ap - s_an)[v] <= 0.4 + 1e-6)))


class PairMarginTest(parameterized.TestCase):

    def test_equals_enumeration_and_pml(self):
        emb, sim = problem(4)
        pos, neg = miners.mine_pair_margin(jnp.asarray(sim), jnp.asarray(LABELS),
                                           pos_margin=0.5, neg_margin=0.0)
        want_pos = {(a, b) for a in range(N) for b in range(N)
                    if a != b and LABELS[a] == LABELS[b] and sim[a, b] < 0.5}
        want_neg = {(a, b) for a in range(N) for b in range(N)
                    if LABELS[a] != LABELS[b] and sim[a, b] > 0.0}
        self.assertEqual(set(map(tuple, np.argwhere(np.asarray(pos)))), want_pos)
        self.assertEqual(set(map(tuple, np.argwhere(np.asarray(neg)))), want_neg)
        torch = pytest.importorskip("torch")
        pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
        a1, p, a2, n = pml_miners.PairMarginMiner(pos_margin=0.6, neg_margin=1.1)(
            torch.tensor(emb), torch.tensor(LABELS))
        with jax.enable_x64(True):
            pos, neg = miners.mine_pair_margin(distances.negative_euclidean(jnp.asarray(emb)),
                                               jnp.asarray(LABELS), pos_margin=-0.6,
                                               neg_margin=-1.1)
        self.assertEqual(set(map(tuple, np.argwhere(np.asarray(pos)))),
                         set(zip(a1.tolist(), p.tolist())))
        self.assertEqual(set(map(tuple, np.argwhere(np.asarray(neg)))),
                         set(zip(a2.tolist(), n.tolist())))


class HardestNegativesTest(parameterized.TestCase):

    @parameterized.parameters("hardest", "easiest")
    def test_properties(self, positive):
        _, sim = problem(5)
        t = miners.mine_hardest_negatives(jnp.asarray(sim, jnp.float32), jnp.asarray(LABELS),
                                          k=3, positive=positive)
        for f in t:
            self.assertEqual(f.shape, (N, 3))
        for a in range(N):
            with self.subTest(anchor=a):
                negs = [j for j in range(N) if LABELS[j] != LABELS[a]]
                want = sorted(negs, key=lambda j: -sim[a, j])[:3]
                np.testing.assert_array_equal(np.asarray(t.negative[a]), want)
                poss = [j for j in range(N) if j != a and LABELS[j] == LABELS[a]]
                self.assertTrue(np.all(np.asarray(t.valid[a])))
                pick = min if positive == "hardest" else max
                self.assertEqual(int(t.positive[a, 0]), pick(poss, key=lambda j: sim[a, j]))

    def test_singleton_and_few_negatives(self):
        sim = jnp.eye(3)
        t = miners.mine_hardest_negatives(sim, jnp.array([0, 0, 1]), k=2)
        np.testing.assert_array_equal(t.valid, [[True, False], [True, False], [False, False]])

    def test_custom_masks_equal_labels(self):
        _, sim = problem(6)
        pos, neg = distances.label_masks(jnp.asarray(LABELS))
        a = miners.mine_hardest_negatives(jnp.asarray(sim), jnp.asarray(LABELS), k=2)
        b = miners.mine_hardest_negatives(jnp.asarray(sim), pos_mask=pos, neg_mask=neg, k=2)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        with self.assertRaisesRegex(ValueError, "both"):
            miners.mine_pair_margin(jnp.asarray(sim), pos_mask=pos)
        with self.assertRaisesRegex(ValueError, "kind"):
            miners.triplet_margin_mask(jnp.asarray(sim), jnp.asarray(LABELS), kind="medium")


if __name__ == "__main__":
    absltest.main()
