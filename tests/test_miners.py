"""Miners: properties over many label patterns, NumPy loop references, hand-made cases."""
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from hnm import miners

B = 12
PER_ANCHOR = {
    "hardest": miners.mine_hardest,
    "ephn": miners.mine_easy_positive_hard_negative,
    "epshn": miners.mine_easy_positive_semihard_negative,
}
ALL_MINERS = dict(PER_ANCHOR, semihard=miners.mine_semihard)
# One compilation per miner (and one with a reference set), reused by every case.
_JIT = {name: jax.jit(fn) for name, fn in ALL_MINERS.items()}
_JIT_REF = {name: jax.jit(lambda s, y, r, o, fn=fn: fn(s, y, r, query_offset=o))
            for name, fn in ALL_MINERS.items()}


def _label_patterns():
    rng = np.random.default_rng(0)
    patterns = [np.zeros(B, int), np.arange(B), np.repeat(np.arange(B // 2), 2),
                np.repeat(np.arange(3), 4), np.r_[np.zeros(B - 1, int), 1]]
    patterns += [rng.integers(0, k, size=B) for k in (2, 3, 5, 8, 11) for _ in range(3)]
    return patterns


def _np_first_best(values, candidates, largest=True):
    """First index of the best value among candidates (None if none): explicit loop."""
    best = None
    for j in candidates:
        if best is None or (values[j] > values[best] if largest else values[j] < values[best]):
            best = j
    return best


def _np_reference(name, sim, labels, ref_labels, offset, dup=0.9999):
    """(positive, negative) per anchor, or None when invalid, from the definitions."""
    out = []
    for a in range(sim.shape[0]):
        s = sim[a]
        pos = [j for j in range(len(ref_labels)) if ref_labels[j] == labels[a] and j != a + offset]
        neg = [j for j in range(len(ref_labels)) if ref_labels[j] != labels[a]]
        if name == "hardest":
            p = _np_first_best(s, pos, largest=False)
        else:
            p = _np_first_best(s, [j for j in pos if s[j] <= dup])
        if p is not None and name == "epshn":
            neg = [j for j in neg if s[j] <= s[p]]
        n = _np_first_best(s, neg)
        out.append(None if p is None or n is None else (p, n))
    return out


class MinerPropertiesTest(parameterized.TestCase):

    def test_properties_over_label_patterns(self):
        rng = np.random.default_rng(1)
        for k, labels in enumerate(_label_patterns()):
            sim = rng.uniform(-1, 1, size=(B, B)).astype(np.float32)
            for name, fn in _JIT.items():
                with self.subTest(pattern=k, miner=name):
                    t = fn(jnp.asarray(sim), jnp.asarray(labels))
                    self._check(name, t, sim, labels, labels, 0)

    def test_properties_with_query_offset(self):
        rng = np.random.default_rng(2)
        for k, ref_labels in enumerate(_label_patterns()[:8]):
            offset = 4 * (k % 3)
            labels = ref_labels[offset:offset + 4]
            sim = rng.uniform(-1, 1, size=(4, B)).astype(np.float32)
            for name, fn in _JIT_REF.items():
                with self.subTest(pattern=k, miner=name):
                    t = fn(jnp.asarray(sim), jnp.asarray(labels), jnp.asarray(ref_labels),
                           offset)
                    self._check(name, t, sim, labels, ref_labels, offset)

    def _check(self, name, t, sim, labels, ref_labels, offset):
        a_n, m_n = sim.shape
        shape = (a_n, m_n) if name == "semihard" else (a_n,)
        for field in t:
            self.assertEqual(field.shape, shape)
        for field in (t.anchor, t.positive, t.negative):
            self.assertEqual(field.dtype, jnp.int32)
            self.assertTrue(bool(((field >= 0) & (field < m_n)).all()))
        self.assertEqual(t.valid.dtype, jnp.bool_)
        anchor, pos, neg, valid = (np.asarray(f) for f in t)
        has_neg = np.array([(ref_labels != y).any() for y in labels])
        if name == "semihard":
            want_valid = ((labels[:, None] == ref_labels[None, :])
                          & (np.arange(m_n)[None, :] != np.arange(a_n)[:, None] + offset)
                          & has_neg[:, None])
            np.testing.assert_array_equal(valid, want_valid)
        else:
            want = _np_reference(name, sim, labels, ref_labels, offset)
            np.testing.assert_array_equal(valid, [w is not None for w in want])
            for a, w in enumerate(want):
                if w is not None:
                    self.assertEqual((pos[a], neg[a]), w, msg=f"anchor {a}")
        # Label properties of every valid triplet.
        a_idx = anchor[valid]
        self.assertTrue((ref_labels[pos[valid]] == labels[a_idx]).all())
        self.assertTrue((pos[valid] != a_idx + offset).all())
        self.assertTrue((ref_labels[neg[valid]] != labels[a_idx]).all())

    def test_semihard_matches_pair_loop(self):
        rng = np.random.default_rng(3)
        for k, labels in enumerate(_label_patterns()[:10]):
            sim = rng.uniform(-1, 1, size=(B, B)).astype(np.float32)
            t = _JIT["semihard"](jnp.asarray(sim), jnp.asarray(labels))
            neg, valid = np.asarray(t.negative), np.asarray(t.valid)
            for a, p in zip(*np.nonzero(valid)):
                negs = [n for n in range(B) if labels[n] != labels[a]]
                below = [n for n in negs if sim[a, n] < sim[a, p]]
                want = (_np_first_best(sim[a], below) if below
                        else _np_first_best(sim[a], negs, largest=False))
                with self.subTest(pattern=k, pair=(a, p)):
                    self.assertEqual(neg[a, p], want)

    def test_vmap_over_problems(self):
        rng = np.random.default_rng(4)
        sims = jnp.asarray(rng.uniform(-1, 1, size=(3, B, B)), jnp.float32)
        labels = jnp.asarray(np.stack(_label_patterns()[5:8]))
        for name, fn in ALL_MINERS.items():
            with self.subTest(name):
                batched = jax.vmap(fn)(sims, labels)
                for i in range(3):
                    one = fn(sims[i], labels[i])
                    for got, want in zip(batched, one):
                        np.testing.assert_array_equal(got[i], want)


class HandMadeCasesTest(absltest.TestCase):

    def test_batch_hard_first_index_wins_ties(self):
        sim = jnp.array([[1.0, 0.2, 0.2, 0.7, 0.7],
                         [0.2, 1.0, 0.5, 0.1, 0.1],
                         [0.2, 0.5, 1.0, 0.3, 0.3],
                         [0.7, 0.1, 0.3, 1.0, 0.0],
                         [0.7, 0.1, 0.3, 0.0, 1.0]])
        t = miners.mine_hardest(sim, jnp.array([0, 0, 0, 1, 1]))
        self.assertEqual(int(t.positive[0]), 1)   # 0.2 at columns 1 and 2
        self.assertEqual(int(t.negative[0]), 3)   # 0.7 at columns 3 and 4
        self.assertEqual(int(t.negative[1]), 3)   # 0.1 at columns 3 and 4

    def test_duplicate_cut(self):
        sim = jnp.array([[1.0, 0.99995, np.float32(0.9999), 0.5, 0.1],
                         [0.99995, 1.0, 0.3, 0.2, 0.1],
                         [0.9999, 0.3, 1.0, 0.2, 0.1],
                         [0.5, 0.2, 0.2, 1.0, 0.0],
                         [0.1, 0.1, 0.1, 0.0, 1.0]], jnp.float32)
        labels = jnp.array([0, 0, 0, 0, 1])
        t = miners.mine_easy_positive_hard_negative(sim, labels)
        # 0.99995 > 0.9999 is a near-duplicate and skipped; exactly 0.9999 is kept.
        self.assertEqual(int(t.positive[0]), 2)
        self.assertEqual(int(t.positive[1]), 2)
        t = miners.mine_easy_positive_hard_negative(sim, labels, duplicate_threshold=0.9)
        self.assertEqual(int(t.positive[0]), 3)
        t = miners.mine_easy_positive_hard_negative(sim, labels, duplicate_threshold=1.0)
        self.assertEqual(int(t.positive[0]), 1)

    def test_only_duplicates_makes_anchor_invalid(self):
        sim = jnp.array([[1.0, 1.0, 0.3], [1.0, 1.0, 0.3], [0.3, 0.3, 1.0]])
        t = miners.mine_easy_positive_hard_negative(sim, jnp.array([0, 0, 1]))
        self.assertEqual(t.valid.tolist(), [False, False, False])

    def test_epshn_keeps_a_tie_with_the_positive(self):
        sim = jnp.array([[1.0, 0.5, 0.5, 0.6],
                         [0.5, 1.0, 0.1, 0.2],
                         [0.5, 0.1, 1.0, 0.0],
                         [0.6, 0.2, 0.0, 1.0]])
        t = miners.mine_easy_positive_semihard_negative(sim, jnp.array([0, 0, 1, 1]))
        self.assertEqual(int(t.negative[0]), 2)   # 0.5 == S_ap kept, 0.6 > S_ap masked
        self.assertTrue(bool(t.valid[0]))
        # Anchor 2: positive 3 at 0.0, negatives at 0.5 and 0.1: none below, invalid.
        self.assertFalse(bool(t.valid[2]))

    def test_semihard_fallback_to_the_least_similar_negative(self):
        sim = jnp.array([[1.0, 0.2, 0.6, 0.4, 0.5],
                         [0.2, 1.0, 0.1, 0.2, 0.0],
                         [0.6, 0.1, 1.0, 0.0, 0.0],
                         [0.4, 0.2, 0.0, 1.0, 0.0],
                         [0.5, 0.0, 0.0, 0.0, 1.0]])
        t = miners.mine_semihard(sim, jnp.array([0, 0, 1, 1, 1]))
        # Pair (0, 1): S_ap = 0.2, every negative is more similar: the least similar, 3 (0.4).
        self.assertEqual(int(t.negative[0, 1]), 3)
        # Pair (1, 0): S_ap = 0.2, negatives 0.1, 0.2 (a tie: not below), 0.0: strictly
        # below and most similar is 2.
        self.assertEqual(int(t.negative[1, 0]), 2)
        # Strictly below: pair (2, 3) has S_ap = 0.0 and negatives 0.6, 0.1: fallback, 1.
        self.assertEqual(int(t.negative[2, 3]), 1)

    def test_gather_sims_is_differentiable_only_at_chosen_entries(self):
        sim = jnp.array([[1.0, 0.75, 0.25], [0.75, 1.0, 0.5], [0.25, 0.5, 1.0]])
        labels = jnp.array([0, 0, 1])

        def f(s):
            t = miners.mine_hardest(s, labels)
            s_ap, s_an = miners.gather_sims(s, t)
            return jnp.sum(jnp.where(t.valid, s_an - s_ap, 0.0))
        g = jax.grad(f)(sim)
        want = np.zeros((3, 3))
        want[0, 1] -= 1
        want[0, 2] += 1
        want[1, 0] -= 1
        want[1, 2] += 1
        np.testing.assert_allclose(g, want)

    def test_bad_inputs(self):
        with self.assertRaisesRegex(ValueError, "sim"):
            miners.mine_hardest(jnp.zeros(3), jnp.zeros(3, jnp.int32))
        with self.assertRaisesRegex(TypeError, "labels"):
            miners.mine_semihard(jnp.zeros((3, 3)), jnp.zeros(3))
        with self.assertRaisesRegex(ValueError, "ref_labels"):
            miners.mine_easy_positive_hard_negative(jnp.zeros((3, 4)), jnp.zeros(3, jnp.int32))
        with self.assertRaisesRegex(TypeError, "sim"):
            miners.mine_hardest(jnp.zeros((3, 3), jnp.int32), jnp.zeros(3, jnp.int32))
        for name, fn in ALL_MINERS.items():  # an empty batch: a clear error, not a top_k one
            with self.subTest(name):
                with self.assertRaisesRegex(ValueError, r"`sim` is empty along A \(rows\)"):
                    fn(jnp.zeros((0, 0)), jnp.zeros(0, jnp.int32))
                with self.assertRaisesRegex(ValueError, r"`sim` is empty along M"):
                    fn(jnp.zeros((2, 0)), jnp.zeros(2, jnp.int32), jnp.zeros(0, jnp.int32))


if __name__ == "__main__":
    absltest.main()
