"""Tests of hnm.search: knn against a float64 brute-force argsort, the Index, faiss parity."""
import os

import jax
import numpy as np
from absl.testing import absltest, parameterized

from hnm import search


def _ref_sim(q, g, kind):
    q, g = np.asarray(q, np.float64), np.asarray(g, np.float64)
    if kind == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    if kind in ("cosine", "dot"):
        return q @ g.T
    d2 = np.sum((q[:, None, :] - g[None, :, :]) ** 2, axis=2)  # explicit differences
    return -np.sqrt(d2) if kind == "euclidean" else -d2


def _ref_knn(q, g, k, kind, exclude_self=False, gmask=None):
    sim = _ref_sim(q, g, kind)
    out_s, out_i = [], []
    for i in range(len(q)):
        cands = [j for j in range(len(g)) if (gmask is None or gmask[j])
                 and not (exclude_self and i == j)]
        order = sorted(cands, key=lambda j: (-sim[i, j], j))[:k]
        out_i.append(order + [-1] * (k - len(order)))
        out_s.append([sim[i, j] for j in order] + [-np.inf] * (k - len(order)))
    return np.array(out_s), np.array(out_i)


def _data(seed, n, d=5):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


class KnnTest(parameterized.TestCase):

    # Every similarity unblocked with self, and blocked (3 x 7 tiles over 29 rows) without.
    @parameterized.product(kind=search.SIMILARITIES,
                           setting=((None, False), ((3, 7), True)))
    def test_self_search_matches_reference(self, kind, setting):
        block_size, exclude_self = setting
        x = _data(0, 29)
        scores, idx = search.knn(x, None, 5, similarity=kind, exclude_self=exclude_self,
                                 block_size=block_size)
        want_s, want_i = _ref_knn(x, x, 5, kind, exclude_self)
        np.testing.assert_array_equal(idx, want_i)
        # The expanded -|q|^2 - |g|^2 + 2 q.g cancels near 0: sqrt(1e-7) ~ 3e-4 at self.
        atol = 1e-3 if kind == "euclidean" else 1e-4
        np.testing.assert_allclose(scores, want_s, rtol=1e-4, atol=atol)
        self.assertEqual((scores.dtype, idx.dtype), (np.float32, np.int32))

    @parameterized.parameters((None,), (5,), ((4, 6),))
    def test_query_vs_gallery_with_mask_on_all_devices(self, block_size):
        q, g = _data(1, 17), _data(2, 23)
        gmask = np.arange(23) % 4 != 1
        scores, idx = search.knn(q, g, 7, gallery_mask=gmask, block_size=block_size)
        want_s, want_i = _ref_knn(q, g, 7, "cosine", gmask=gmask)
        np.testing.assert_array_equal(idx, want_i)
        np.testing.assert_allclose(scores, want_s, atol=1e-5)
        self.assertFalse(np.isin(idx, np.flatnonzero(~gmask)).any())
        # The result does not depend on how the blocks are dealt to devices.
        one = search.knn(q, g, 7, gallery_mask=gmask, block_size=block_size,
                         devices=jax.local_devices()[:1])
        np.testing.assert_array_equal(one[1], idx)

    def test_fewer_candidates_than_k_pad_with_minus_one(self):
        g = _data(3, 6)
        gmask = np.array([True, False, True, False, False, False])
        scores, idx = search.knn(g[:2], g, 4, gallery_mask=gmask)
        self.assertEqual(idx[:, 2:].tolist(), [[-1, -1], [-1, -1]])
        self.assertTrue(np.all(np.isneginf(scores[:, 2:])))
        self.assertTrue(set(idx[:, :2].ravel()) <= {0, 2})

    def test_ties_go_to_the_lower_index_across_blocks(self):
        g = np.array([[-1.0], [1.0], [1.0], [-1.0]], np.float32)
        _, idx = search.knn(np.zeros((1, 1), np.float32), g, 4, similarity="euclidean",
                            block_size=1)
        self.assertEqual(idx.tolist(), [[0, 1, 2, 3]])

    def test_identical_copy_is_a_candidate_but_self_is_not(self):
        x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
        _, idx = search.knn(x, None, 1, exclude_self=True)
        self.assertEqual(idx[:, 0].tolist(), [1, 0, 0])

    def test_bad_arguments_name_the_argument(self):
        x = _data(4, 5)
        for kwargs, word in ((dict(k=0), "`k`"), (dict(k=5, exclude_self=True), "`k`"),
                             (dict(k=2, similarity="manhattan"), "similarity"),
                             (dict(k=2, block_size=0), "block_size"),
                             (dict(k=2, gallery_mask=np.ones(3, bool)), "gallery_mask")):
            with self.subTest(word), self.assertRaisesRegex(ValueError, word):
                search.knn(x, None, **kwargs)
        with self.assertRaisesRegex(ValueError, "dimension"):
            search.knn(x, _data(5, 5, d=3), 2)
        bad = x.copy()
        bad[2, 1] = np.nan
        with self.assertRaisesRegex(ValueError, "non-finite"):
            search.knn(bad, None, 2)
        with self.assertRaisesRegex(TypeError, "floating"):
            search.knn(np.ones((3, 2), np.int32), None, 1)


class ChunkedTopKTest(parameterized.TestCase):
    """``search.chunked_top_k`` against a NumPy stable sort (value descending, then index)."""

    @parameterized.parameters((9, 7504), (9, 7680), (1, 640), (4, 1024), (9, 100))
    def test_equals_a_stable_sort_with_ties_and_minus_inf(self, k, n):
        rng = np.random.default_rng(k * n)
        x = np.round(rng.normal(size=(40, n)) * 8) / 8          # many exact ties
        x[3] = 1.0                                               # a row of one value
        x[5] = -np.inf
        x[5, [7, n - 1]] = 2.0                                   # fewer finite than k
        x[6, n // 2:] = x[6].max() + 1                           # the top in the last half
        x = x.astype(np.float32)
        values, idx = jax.jit(lambda a: search.chunked_top_k(a, k))(x)
        order = np.lexsort((np.broadcast_to(np.arange(n), x.shape), -x), axis=1)[:, :k]
        np.testing.assert_array_equal(np.asarray(idx), order)
        np.testing.assert_array_equal(np.asarray(values), np.take_along_axis(x, order, 1))


class IndexTest(parameterized.TestCase):

    def test_add_search_save_load_round_trip(self):
        g = _data(6, 20)
        index = search.Index(similarity="dot")
        index.add(g[:12], labels=np.arange(12) % 3, ids=[f"img{i}" for i in range(12)])
        index.add(g[12:], labels=np.arange(12, 20) % 3, ids=[f"img{i}" for i in range(12, 20)])
        self.assertLen(index, 20)
        q = _data(7, 4)
        res = index.search(q, 3)
        _, want_i = _ref_knn(q, g, 3, "dot")
        np.testing.assert_array_equal(res.indices, want_i)
        np.testing.assert_array_equal(res.labels, want_i % 3)
        self.assertEqual(res.ids[0].tolist(), [f"img{j}" for j in want_i[0]])
        path = index.save(os.path.join(self.create_tempdir().full_path, "gallery"))
        self.assertTrue(path.endswith(".npz"))
        with np.load(path, allow_pickle=False) as f:  # plain arrays, no pickles
            self.assertEqual(sorted(f.files),
                             ["embeddings", "format_version", "ids", "labels", "similarity"])
        again = search.Index.load(path)
        self.assertEqual(again.similarity, "dot")
        res2 = again.search(q, 3)
        np.testing.assert_array_equal(res2.indices, res.indices)
        np.testing.assert_array_equal(res2.ids, res.ids)

    def test_index_errors(self):
        index = search.Index()
        with self.assertRaisesRegex(ValueError, "empty"):
            index.search(_data(0, 2), 1)
        index.add(_data(0, 4), labels=[0, 1, 0, 1])
        with self.assertRaisesRegex(ValueError, "labels"):
            index.add(_data(1, 2))
        with self.assertRaisesRegex(ValueError, r"\[N, 5\]"):
            index.search(_data(2, 2, d=3), 1)
        with self.assertRaisesRegex(ValueError, "backend"):
            search.Index(backend="annoy")
        with self.assertRaisesRegex(ValueError, "not found"):
            search.Index.load("/nonexistent/index.npz")

    @parameterized.product(kind=("cosine", "dot", "euclidean", "squared_euclidean"),
                           exclude_self=(False, True))
    def test_faiss_backend_equals_exact(self, kind, exclude_self):
        if not search.faiss_available():
            self.skipTest("faiss is not installed")
        rng = np.random.default_rng(8)
        labels = rng.integers(0, 40, 600)
        centers = rng.normal(size=(40, 32))
        g = (centers[labels] + 1.5 * rng.normal(size=(600, 32))).astype(np.float32)
        exact, fast = search.Index(similarity=kind), search.Index(similarity=kind,
                                                                  backend="faiss")
        for index in (exact, fast):
            index.add(g, labels=labels)
        a = exact.search(g, 8, exclude_self=exclude_self)
        b = fast.search(g, 8, exclude_self=exclude_self)
        if exclude_self:
            self.assertFalse((b.indices == np.arange(600)[:, None]).any())
        r1 = [float(np.mean(r.labels[:, 0] == labels)) for r in (a, b)]
        self.assertLess(abs(r1[0] - r1[1]), 1e-4)
        # Same neighbours except where float rounding reorders near-ties.
        self.assertGreater(np.mean(a.indices == b.indices), 0.99)
        # Euclidean self-distances cancel in the expanded form (sqrt(eps |x|^2) ~ 1e-2 here).
        atol = 1e-2 if kind == "euclidean" else 1e-4
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=atol)


class SearchCommandTest(absltest.TestCase):

    def test_writes_neighbours_and_rejects_bad_input(self):
        tmp = self.create_tempdir().full_path
        g = _data(9, 10)
        index = search.Index()
        index.add(g, ids=[f"g{i}" for i in range(10)])
        index_path = index.save(os.path.join(tmp, "index.npz"))
        np.savez(os.path.join(tmp, "q.npz"), embeddings=g[:3])
        out = os.path.join(tmp, "out.npz")
        search.search_command([f"--index={index_path}", f"--query={tmp}/q.npz", "-k", "2",
                               f"--output={out}"])
        with np.load(out) as f:
            self.assertEqual(f["indices"][:, 0].tolist(), [0, 1, 2])  # each finds itself
            self.assertEqual(f["ids"][:, 0].tolist(), ["g0", "g1", "g2"])
        np.save(os.path.join(tmp, "bad.npy"), g[:, :3])
        for argv, word in (([f"--index={tmp}/none.npz", f"--query={tmp}/q.npz"], "not found"),
                           ([f"--index={index_path}", f"--query={tmp}/bad.npy"], r"\[N, 5\]"),
                           ([f"--index={index_path}", f"--query={tmp}/q.npz", "-k", "11"],
                            "`k`"),
                           ([f"--index={index_path}"], "required")):
            with self.subTest(word), self.assertRaisesRegex(ValueError, word):
                search.search_command(argv)


if __name__ == "__main__":
    absltest.main()
