"""Tests of hnm.metrics against brute-force NumPy references and hand-computed cases."""
import doctest

import jax
import numpy as np
from absl.testing import absltest, parameterized
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from hnm import metrics

KS = (1, 2, 4, 8)


# ------------------------------------------------------------------------------------------
# Independent reference: full similarity matrix in float64, explicit loops, definitions of
# Musgrave et al. (2020). Ties: stable order by gallery index (what the module documents).
# ------------------------------------------------------------------------------------------

def _ref_sim(q, g, kind):
    q, g = np.asarray(q, np.float64), np.asarray(g, np.float64)
    if kind == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        return q @ g.T
    if kind == "dot":
        return q @ g.T
    # Explicit differences, not the expanded form the module uses.
    diff = q[:, None, :] - g[None, :, :]
    return -np.sqrt(np.sum(diff * diff, axis=2))


def _ref_metrics(q, ql, g=None, gl=None, ks=KS, kind="cosine", qmask=None, gmask=None,
                 count_lone=False):
    loo = g is None
    if loo:
        g, gl, gmask = q, ql, qmask
    nq, ng = len(q), len(g)
    qmask = np.ones(nq, bool) if qmask is None else np.asarray(qmask)
    gmask = np.ones(ng, bool) if gmask is None else np.asarray(gmask)
    sim = _ref_sim(q, g, kind)
    hits = {k: [] for k in ks}
    rps, aps, rrs = [], [], []
    prec = {k: [] for k in ks}
    apk = {k: [] for k in ks}
    for i in range(nq):
        if not qmask[i]:
            continue
        cands = [j for j in range(ng) if gmask[j] and not (loo and j == i)]
        order = sorted(cands, key=lambda j: (-sim[i, j], j))
        rel = [int(gl[j] == ql[i]) for j in order]
        r = sum(rel)
        if r == 0:
            if count_lone:
                for k in ks:
                    hits[k].append(0.0)
            continue
        for k in ks:
            hits[k].append(float(any(rel[:k])))
        rps.append(sum(rel[:r]) / r)
        precision = [sum(rel[:n + 1]) / (n + 1) for n in range(len(rel))]
        aps.append(sum(precision[n] for n in range(r) if rel[n]) / r)
        for k in ks:  # P@K divides by K; AP@K by min(K, R)
            prec[k].append(sum(rel[:k]) / k)
            apk[k].append(sum(precision[n] for n in range(min(k, len(rel))) if rel[n])
                          / min(k, r))
        first = rel.index(1) + 1  # r > 0, so some candidate is relevant
        rrs.append(1.0 / first if first <= max(ks) else 0.0)
    out = {f"recall@{k}": float(np.mean(hits[k])) if hits[k] else 0.0 for k in ks}
    out["map@r"] = float(np.mean(aps)) if aps else 0.0
    out["r_precision"] = float(np.mean(rps)) if rps else 0.0
    for k in ks:
        out[f"precision@{k}"] = float(np.mean(prec[k])) if prec[k] else 0.0
    for k in ks:
        out[f"map@{k}"] = float(np.mean(apk[k])) if apk[k] else 0.0
    out["mrr"] = float(np.mean(rrs)) if rrs else 0.0
    return out


def _data(seed, n, d=6, num_classes=6):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    centers = rng.normal(size=(num_classes, d))
    emb = centers[labels] + 0.9 * rng.normal(size=(n, d))
    return emb.astype(np.float32), labels.astype(np.int32)


# Leave-one-out set: 23 rows (prime, so no block size divides it) and a singleton class 9.
X, Y = _data(0, 23)
Y[5] = 9
# Query/gallery set: queries of class 7 have no gallery item (lone queries).
QX, QY = _data(1, 13)
QY[[2, 11]] = 7
GX, GY = _data(2, 19)


class RetrievalMetricsTest(parameterized.TestCase):

    def assertMetricsClose(self, got, want, places=6):
        self.assertEqual(sorted(got), sorted(want))
        for name in want:
            with self.subTest(name):
                self.assertAlmostEqual(got[name], want[name], places=places, msg=name)

    @parameterized.product(
        kind=("cosine", "dot", "euclidean"),
        block_size=(None, 7, (5, 8), 64))
    def test_leave_one_out_matches_reference(self, kind, block_size):
        got = metrics.retrieval_metrics(X, Y, ks=KS, similarity=kind, block_size=block_size)
        self.assertMetricsClose(got, _ref_metrics(X, Y, kind=kind))

    @parameterized.product(block_size=(None, 4, (6, 5)), count_lone=(False, True))
    def test_query_gallery_matches_reference(self, block_size, count_lone):
        got = metrics.retrieval_metrics(QX, QY, GX, GY, ks=KS, block_size=block_size,
                                        count_lone_queries=count_lone)
        want = _ref_metrics(QX, QY, GX, GY, count_lone=count_lone)
        self.assertMetricsClose(got, want)
        with self.subTest("lone queries change recall only"):
            other = _ref_metrics(QX, QY, GX, GY, count_lone=not count_lone)
            self.assertNotAlmostEqual(want["recall@8"], other["recall@8"])
            self.assertAlmostEqual(want["map@r"], other["map@r"])

    def test_reference_is_not_trivial(self):
        # The data must make the metrics informative, else agreement proves little.
        want = _ref_metrics(X, Y)
        self.assertBetween(want["recall@1"], 0.2, 0.95)
        self.assertBetween(want["map@r"], 0.1, 0.9)
        self.assertLess(want["recall@1"], want["recall@8"])

    def test_masked_rows_are_ignored_as_queries_and_candidates(self):
        mask = np.ones(23, bool)
        mask[[0, 7, 22]] = False
        garbage = X.copy()
        # Masked rows would be everyone's nearest neighbour (and NaN) if they counted.
        garbage[0], garbage[7], garbage[22] = 1e6, np.nan, X[3] * 1.0001
        got = metrics.retrieval_metrics(garbage, Y, block_size=5, query_mask=mask)
        want = _ref_metrics(X[mask], Y[mask])
        self.assertMetricsClose(got, want)
        self.assertMetricsClose(got, _ref_metrics(X, Y, qmask=mask))

    def test_gallery_and_query_masks(self):
        qmask = np.arange(13) % 4 != 1
        gmask = np.arange(19) % 3 != 0
        g = GX.copy()
        g[~gmask] = GX[0] * 0 + QX[0]  # masked copies of a query: would be top-1 if counted
        got = metrics.retrieval_metrics(QX, QY, g, GY, block_size=(4, 4), query_mask=qmask,
                                        gallery_mask=gmask)
        want = _ref_metrics(QX[qmask], QY[qmask], GX[gmask], GY[gmask])
        self.assertMetricsClose(got, want)

    def test_k_beyond_the_candidates(self):
        # K exceeds the valid candidates, so self and masked rows fill the tail of the top-k
        # list (at -inf) and must still not count as hits.
        x, _ = _data(8, 4)
        labels = np.array([0, 1, 1, 0])
        mask = np.array([True, True, True, False])
        for block_size in (None, 1):
            with self.subTest(block_size=block_size):
                got = metrics.retrieval_metrics(x, labels, ks=(1, 8), block_size=block_size,
                                                query_mask=mask, count_lone_queries=True)
                self.assertEqual(got["recall@8"], 2 / 3)  # query 0 is lone (row 3 masked)
                got = metrics.retrieval_metrics(x[:2], labels[:2], x, labels, ks=(8,),
                                                block_size=block_size, gallery_mask=~mask,
                                                count_lone_queries=True)
                self.assertEqual(got["recall@8"], 0.5)  # only row 3 is a candidate

    def test_duplicates_with_exact_ties(self):
        # Integer coordinates: every squared distance and dot product is exact in float32, so
        # ties are real ties and the documented lower-index-first rule is what is tested.
        rng = np.random.default_rng(3)
        base = rng.integers(-2, 3, size=(8, 3)).astype(np.float32)
        emb = np.concatenate([base, base[[0, 0, 1, 2]], base[[3, 4]]])  # 14 rows
        labels = np.array([0, 1, 2, 3, 0, 1, 2, 3,
                           0, 5, 1, 2,     # row 0 twice: same class, then another class
                           4, 0])
        for kind in ("dot", "euclidean"):
            for block_size in (None, 3):
                with self.subTest(kind=kind, block_size=block_size):
                    got = metrics.retrieval_metrics(emb, labels, ks=(1, 2, 3), similarity=kind,
                                                    block_size=block_size)
                    self.assertMetricsClose(
                        got, _ref_metrics(emb, labels, ks=(1, 2, 3), kind=kind))

    def test_duplicate_of_query_counts_but_query_itself_does_not(self):
        # Rows 0 and 1 coincide; row 2 is a lone point of another class, far away.
        emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
        got = metrics.retrieval_metrics(emb, np.array([0, 0, 1]), ks=(1,))
        self.assertEqual(got, {"recall@1": 1.0, "map@r": 1.0, "r_precision": 1.0,
                               "precision@1": 1.0, "map@1": 1.0, "mrr": 1.0})
        # Twins of different classes: each twin is the other's wrong top-1 (row 0 is lone;
        # row 2 ties rows 0 and 1 at similarity 0 and takes row 0 first).
        got = metrics.retrieval_metrics(emb, np.array([0, 1, 1]), ks=(1, 2),
                                        count_lone_queries=True)
        self.assertEqual({k: got[k] for k in ("recall@1", "recall@2", "map@r", "r_precision")},
                         {"recall@1": 0.0, "recall@2": 2 / 3, "map@r": 0.0,
                          "r_precision": 0.0})

    @parameterized.parameters((0, 1.0), (1, 0.0))
    def test_ties_go_to_the_lower_gallery_index(self, same_class_index, recall_at_1):
        # Query at 0; gallery at -1 and +1 (equidistant), one per gallery block.
        gallery = np.array([[-1.0], [1.0]], np.float32)
        gallery_labels = np.where(np.arange(2) == same_class_index, 0, 1)
        got = metrics.retrieval_metrics(np.zeros((1, 1), np.float32), np.array([0]),
                                        gallery, gallery_labels, ks=(1,),
                                        similarity="euclidean", block_size=1)
        self.assertEqual(got["recall@1"], recall_at_1)

    def test_points_on_a_line_by_hand(self):
        # x = 0, 1, 3, 4, 10 with labels a, a, b, a, b.
        # q=0 (a): 1(a) 3(b) 4(a) 10(b) -> R=2, rel 1,0,1: hit@1, RP 1/2, AP (1/1)/2 = 1/2
        # q=1 (a): 0(a) 3(b) 4(a) 10(b) -> same: 1/2, 1/2
        # q=3 (b): 4(a) 1(a) 0(a) 10(b) -> R=1, rel 0,0,0,1: miss@1..3, hit@4, RP 0, AP 0
        # q=4 (a): 3(b) 1(a) 0(a) 10(b) -> R=2, rel 0,1,1: hit@2, RP 1/2, AP (1/2)/2 = 1/4
        # q=10 (b): 4(a) 3(b) ... -> R=1, rel 0,1: hit@2, RP 0, AP 0
        x = np.array([[0.0], [1.0], [3.0], [4.0], [10.0]], np.float32)
        labels = np.array([0, 0, 1, 0, 1])
        got = metrics.retrieval_metrics(x, labels, ks=(1, 2, 4), similarity="euclidean",
                                        block_size=2)
        want = {"recall@1": 2 / 5, "recall@2": 4 / 5, "recall@4": 1.0,
                "map@r": (0.5 + 0.5 + 0 + 0.25 + 0) / 5, "r_precision": 1.5 / 5,
                # P@K = hits in the first K / K; AP@K / min(K, R); first relevant rank 1,1,4,2,2
                "precision@1": 2 / 5, "precision@2": (0.5 + 0.5 + 0 + 0.5 + 0.5) / 5,
                "precision@4": (0.5 + 0.5 + 0.25 + 0.5 + 0.25) / 5,
                "map@1": 2 / 5, "map@2": (0.5 + 0.5 + 0 + 0.25 + 0.5) / 5,
                "map@4": ((1 + 2 / 3) / 2 + (1 + 2 / 3) / 2 + 0.25 + (0.5 + 2 / 3) / 2 + 0.5) / 5,
                "mrr": (1 + 1 + 0.25 + 0.5 + 0.5) / 5}
        self.assertMetricsClose(got, want)

    def test_singleton_classes_only(self):
        x, _ = _data(4, 6)
        got = metrics.retrieval_metrics(x, np.arange(6))
        self.assertEqual(set(got.values()), {0.0})

    def test_recall_at_k_agrees(self):
        got = metrics.recall_at_k(QX, QY, GX, GY, ks=(1, 3), block_size=4)
        want = _ref_metrics(QX, QY, GX, GY, ks=(1, 3))
        self.assertEqual(sorted(got), [1, 3])
        self.assertAlmostEqual(got[1], want["recall@1"])
        self.assertAlmostEqual(got[3], want["recall@3"])

    def test_large_labels_and_list_inputs(self):
        labels = Y.astype(np.int64) * 10**12 - 5  # do not fit int32
        got = metrics.retrieval_metrics(X.tolist(), labels, ks=(1, 4))
        self.assertMetricsClose(got, _ref_metrics(X, Y, ks=(1, 4)))

    def test_block_memory_is_not_quadratic(self):
        # Compile the block function for N = 8192 with 256 x 512 blocks: the scratch memory
        # must be far below one N x N float32 matrix (256 MiB).
        n, d, bq, bg = 8192, 32, 256, 512
        f = metrics._query_block_metrics
        emb = jax.ShapeDtypeStruct((n, d), np.float32)
        ints = jax.ShapeDtypeStruct((n,), np.int32)
        compiled = f.lower(emb, ints, ints, emb, ints, jax.ShapeDtypeStruct((n,), bool),
                           jax.ShapeDtypeStruct((), np.int32), query_block=bq,
                           gallery_block=bg, num_gallery_blocks=n // bg, k=8, ks=KS,
                           kind="cosine", exclude_self=True).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            self.skipTest("no memory analysis on this backend")
        self.assertLess(analysis.temp_size_in_bytes, 4 * bq * bg * 4)

    @parameterized.named_parameters(
        ("query_rank", lambda: dict(query=X[0]), "`query`"),
        ("query_dtype", lambda: dict(query=Y[:, None] * np.ones((1, 3), np.int32)), "`query`"),
        ("labels_length", lambda: dict(query_labels=Y[:-1]), "`query_labels`"),
        ("labels_dtype", lambda: dict(query_labels=Y.astype(np.float32)), "`query_labels`"),
        ("gallery_alone", lambda: dict(gallery=GX), "`gallery_labels`"),
        ("labels_alone", lambda: dict(gallery_labels=GY), "`gallery_labels`"),
        ("gallery_dim", lambda: dict(gallery=GX[:, :4], gallery_labels=GY), "`gallery`"),
        ("ks_empty", lambda: dict(ks=()), "`ks`"),
        ("ks_zero", lambda: dict(ks=(1, 0)), "`ks`"),
        ("similarity", lambda: dict(similarity="l1"), "`similarity`"),
        ("block_size", lambda: dict(block_size=0), "`block_size`"),
        ("mask_length", lambda: dict(query_mask=np.ones(5, bool)), "`query_mask`"),
        ("mask_dtype", lambda: dict(query_mask=np.ones(23, np.float32)), "`query_mask`"),
        ("gallery_mask_loo", lambda: dict(gallery_mask=np.ones(23, bool)), "`gallery_mask`"),
        ("all_masked", lambda: dict(query_mask=np.zeros(23, bool)), "`query`"),
        ("nan", lambda: dict(query=np.where(np.arange(23)[:, None] == 4, np.nan, X)),
         "`query`"),
    )
    def test_bad_input_raises_naming_the_argument(self, make_kwargs, name):
        kwargs = dict(query=X, query_labels=Y)
        kwargs.update(make_kwargs())
        with self.assertRaisesRegex((ValueError, TypeError), name):
            metrics.retrieval_metrics(**kwargs)


class NMITest(parameterized.TestCase):

    @parameterized.parameters(
        (0, 50, 4, 6), (1, 50, 1, 3), (2, 40, 5, 1), (3, 7, 7, 7), (4, 30, 1, 1))
    def test_normalized_mutual_info_matches_sklearn(self, seed, n, num_true, num_pred):
        rng = np.random.default_rng(seed)
        u = rng.integers(0, num_true, n) * 3 + 100
        v = rng.integers(0, num_pred, n) - 2
        self.assertAlmostEqual(metrics.normalized_mutual_info(u, v),
                               normalized_mutual_info_score(u, v), places=12)

    def test_nmi_of_perfect_clusters_is_one(self):
        rng = np.random.default_rng(5)
        labels = np.repeat(np.arange(5), 8)
        directions = np.eye(6)[:5]
        emb = directions[labels] + 0.01 * rng.normal(size=(40, 6))
        value = metrics.nmi(emb.astype(np.float32), labels, jax.random.key(1))
        self.assertAlmostEqual(value, 1.0, places=6)
        # Padded garbage rows masked out leave the score unchanged.
        padded = np.concatenate([emb, np.full((3, 6), 50.0)]).astype(np.float32)
        mask = np.arange(43) < 40
        self.assertAlmostEqual(metrics.nmi(padded, np.concatenate([labels, [0, 0, 0]]),
                                           jax.random.key(1), mask=mask), 1.0, places=6)

    def test_kmeans_is_a_lloyd_fixed_point_and_nmi_uses_its_assignment(self):
        x, labels = _data(6, 60, d=4, num_classes=4)
        centers, assign = metrics.kmeans(jax.random.key(2), x, 4)
        centers, assign = np.asarray(centers, np.float64), np.asarray(assign)
        d2 = ((x[:, None, :].astype(np.float64) - centers[None]) ** 2).sum(-1)
        with self.subTest("each point at its nearest centre"):
            np.testing.assert_allclose(d2[np.arange(60), assign], d2.min(1), rtol=1e-5)
        with self.subTest("each centre the mean of its points"):
            for c in range(4):
                if (assign == c).any():
                    np.testing.assert_allclose(centers[c], x[assign == c].mean(0), atol=1e-5)
        with self.subTest("nmi == sklearn on the same assignment"):
            got = metrics.nmi(x, labels, jax.random.key(2), normalize=False)
            self.assertAlmostEqual(got, normalized_mutual_info_score(labels, assign),
                                   places=12)
            self.assertBetween(got, 0.05, 0.999)

    def test_bad_input(self):
        x, labels = _data(7, 10)
        with self.assertRaisesRegex(ValueError, "`embeddings`"):
            metrics.nmi(x[0], labels)
        with self.assertRaisesRegex(ValueError, "`labels`"):
            metrics.nmi(x, labels[:3])
        with self.assertRaisesRegex(ValueError, "`num_clusters`"):
            metrics.nmi(x, labels, num_clusters=11)
        with self.assertRaisesRegex(ValueError, "`x`"):
            metrics.kmeans(jax.random.key(0), np.where(x > 0, np.nan, x), 2)
        with self.assertRaisesRegex(ValueError, "`labels_pred`"):
            metrics.normalized_mutual_info(labels, labels[:4])


class AMITest(parameterized.TestCase):

    @parameterized.parameters((0, 40, 3, 4), (1, 200, 10, 7), (2, 500, 25, 25), (3, 7, 1, 3),
                              (4, 50, 50, 2))
    def test_matches_sklearn(self, seed, n, classes, clusters):
        rng = np.random.default_rng(seed)
        u, v = rng.integers(0, classes, n), rng.integers(0, clusters, n)
        v[: n // 2] = u[: n // 2] % clusters  # partly informative
        self.assertAlmostEqual(metrics.adjusted_mutual_info(u, v),
                               adjusted_mutual_info_score(u, v), places=10)

    def test_limits(self):
        self.assertEqual(metrics.adjusted_mutual_info(np.zeros(5, int), np.zeros(5, int)), 1.0)
        self.assertAlmostEqual(metrics.adjusted_mutual_info(np.arange(6) % 2,
                                                            np.arange(6) % 2 + 3), 1.0)
        with self.assertRaisesRegex(ValueError, "same length"):
            metrics.adjusted_mutual_info(np.zeros(3, int), np.zeros(4, int))

    def test_clustering_metrics_one_clustering_both_scores(self):
        x, y = _data(5, 60)
        got = metrics.clustering_metrics(x, y, jax.random.key(1))
        self.assertEqual(sorted(got), ["ami", "nmi"])
        self.assertAlmostEqual(got["nmi"], metrics.nmi(x, y, jax.random.key(1)), places=12)
        _, assign = metrics.kmeans(jax.random.key(1), metrics.l2_normalize(x),
                                   len(np.unique(y)))
        self.assertAlmostEqual(got["ami"], adjusted_mutual_info_score(y, np.asarray(assign)),
                               places=10)


class DocTest(absltest.TestCase):

    def test_docstring_examples(self):
        result = doctest.testmod(metrics, optionflags=doctest.ELLIPSIS)
        self.assertGreater(result.attempted, 0)
        self.assertEqual(result.failed, 0)




class ShardedQueriesTest(absltest.TestCase):
    """Query blocks dealt over several devices give exactly the single-device metrics."""

    def test_devices_do_not_change_results(self):
        rng = np.random.default_rng(7)
        x = rng.normal(size=(203, 6)).astype(np.float32)
        y = rng.integers(0, 9, size=203)
        one = metrics.retrieval_metrics(x, y, block_size=(16, 64))
        many = metrics.retrieval_metrics(x, y, block_size=(16, 64),
                                             devices=jax.devices()[:4])
        self.assertEqual(one, many)
        g = rng.normal(size=(57, 6)).astype(np.float32)
        gl = rng.integers(0, 9, size=57)
        self.assertEqual(
            metrics.retrieval_metrics(x, y, g, gl, block_size=16),
            metrics.retrieval_metrics(x, y, g, gl, block_size=16,
                                          devices=jax.devices()[:3]))


if __name__ == "__main__":
    absltest.main()
