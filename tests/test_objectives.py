"""Triplet objectives vs independent NumPy references; gradients, devices, registry, errors.

The references are float64 loops over explicit anchors / triplets written from
``shared/SCIENCE.md`` (the official SCT code's semantics, Hermans' batch-hard, TFA's
semi-hard, PML's batch-all), not from hnm's code.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized

from hnm import distances
from hnm import objectives

TRIPLET = ("batch_all", "batch_hard", "ephn", "epshn", "sct", "semihard")
# Parameter-free objectives (the parametric ones: tests/test_parametric.py).
ALL_NAMES = tuple(n for n in objectives.names() if not objectives.is_parametric(n))
# Checks repeated over many objectives run one objective per family in the default run and
# the others in the slow run (the same check, `..._others`).
DEFAULT_OBJECTIVES = ("batch_hard", "sct", "multi_similarity", "smooth_ap")


def _default(names):
    return tuple(n for n in names if n in DEFAULT_OBJECTIVES)


def _others(names):
    return tuple(n for n in names if n not in DEFAULT_OBJECTIVES)


# ---------------------------------------------------------------------------------------------
# References.

def _normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _softplus(x):
    return np.log1p(np.exp(-abs(x))) + max(x, 0.0)


def _first_max(values, idx):
    best = None
    for j in idx:
        if best is None or values[j] > values[best]:
            best = j
    return best


def ref_official(emb, labels, method="sct", temperature=0.1, hard_weight=1.0,
                 hard_threshold=0.8, hard_rule="or", normalization="joint",
                 duplicate_threshold=0.9999):
    """littleredxh/HardNegative semantics, anchor by anchor."""
    x = _normalize(np.asarray(emb, np.float64))
    b = len(x)
    s = x @ x.T
    triplets = []
    for a in range(b):
        pos = [p for p in range(b) if p != a and labels[p] == labels[a]
               and s[a, p] <= duplicate_threshold]
        p = _first_max(s[a], pos)
        v_pos = s[a, p] if p is not None else -1.0
        neg = [n for n in range(b) if labels[n] != labels[a]]
        if method == "epshn":
            neg = [n for n in neg if s[a, n] <= v_pos]
        n = _first_max(s[a], neg)
        v_neg = s[a, n] if n is not None else -1.0
        if -1 < v_pos < 1 and -1 < v_neg < 1:
            triplets.append((s[a, p], s[a, n]))
    stats = dict(num_valid=len(triplets),
                 frac_hard=np.mean([an > ap for ap, an in triplets]) if triplets else 0.0,
                 mean_sim_ap=np.mean([ap for ap, _ in triplets]) if triplets else 0.0,
                 mean_sim_an=np.mean([an for _, an in triplets]) if triplets else 0.0)
    if method in ("ephn", "epshn"):
        values = [_softplus((an - ap) / temperature) for ap, an in triplets]
        return (np.mean(values) if values else 0.0), stats
    easy, hard = [], []
    for ap, an in triplets:
        if hard_rule == "or":
            is_hard = an > ap or an > hard_threshold
            is_easy = an < ap and an < hard_threshold
        else:
            is_hard = an > ap and an > hard_threshold
            is_easy = not is_hard
        if is_easy:
            easy.append(_softplus((an - ap) / temperature))
        elif is_hard:
            hard.append(an)
    stats.update(num_easy=len(easy), num_hard=len(hard))
    if normalization == "joint":
        loss = (sum(easy) + hard_weight * sum(hard)) / max(1, len(easy) + len(hard))
    else:
        loss = ((np.mean(easy) if easy else 0.0)
                + hard_weight * (np.mean(hard) if hard else 0.0))
    return loss, stats


def _np_sim(emb, distance, normalize):
    x = np.asarray(emb, np.float64)
    if normalize or distance == "cosine":
        x = _normalize(x)
    if distance == "cosine":
        return x @ x.T
    d2 = np.array([[np.sum((u - v) ** 2) for v in x] for u in x])
    return -np.sqrt(d2) if distance == "euclidean" else -d2


def _reduce(values, reduction):
    values = np.asarray(values, np.float64)
    if reduction == "mean":
        return values.mean() if len(values) else 0.0
    nonzero = values[values > 0]
    return nonzero.sum() / len(nonzero) if len(nonzero) else 0.0


def ref_batch_hard(emb, labels, margin=0.2, distance="euclidean", normalize=True,
                   soft=False, reduction="mean"):
    """Hermans et al.: farthest positive, closest negative, per anchor."""
    s = _np_sim(emb, distance, normalize)
    b = len(labels)
    values, triplets = [], []
    for a in range(b):
        pos = [p for p in range(b) if p != a and labels[p] == labels[a]]
        neg = [n for n in range(b) if labels[n] != labels[a]]
        if not pos or not neg:
            continue
        ap = min(s[a, p] for p in pos)
        an = max(s[a, n] for n in neg)
        triplets.append((ap, an))
        values.append(np.log1p(np.exp(an - ap)) if soft else max(0.0, an - ap + margin))
    return _reduce(values, reduction), triplets


def ref_semihard(emb, labels, margin=0.2, distance="euclidean", normalize=True):
    """TFA TripletSemiHardLoss in distances: every (a, p); closest negative with d_an > d_ap,
    else the farthest negative; sum of hinges over the number of pairs."""
    d = -_np_sim(emb, distance, normalize)
    b = len(labels)
    values, triplets = [], []
    for a in range(b):
        neg = [n for n in range(b) if labels[n] != labels[a]]
        if not neg:
            continue
        for p in range(b):
            if p == a or labels[p] != labels[a]:
                continue
            outside = [d[a, n] for n in neg if d[a, n] > d[a, p]]
            d_an = min(outside) if outside else max(d[a, n] for n in neg)
            values.append(max(0.0, d[a, p] - d_an + margin))
            triplets.append((-d[a, p], -d_an))
    return (np.mean(values) if values else 0.0), triplets


def ref_batch_all(emb, labels, margin=0.2, distance="euclidean", normalize=True,
                  reduction="avg_nonzero"):
    s = _np_sim(emb, distance, normalize)
    b = len(labels)
    values, triplets = [], []
    for a in range(b):
        for p in range(b):
            if p == a or labels[p] != labels[a]:
                continue
            for n in range(b):
                if labels[n] != labels[a]:
                    values.append(max(0.0, s[a, n] - s[a, p] + margin))
                    triplets.append((s[a, p], s[a, n]))
    return _reduce(values, reduction), triplets


def reference(name, emb, labels, **opts):
    """(loss, stats) of the reference of objective ``name``."""
    if name in ("ephn", "epshn", "sct"):
        return ref_official(emb, labels, method=name, **opts)
    fn = dict(batch_hard=ref_batch_hard, semihard=ref_semihard, batch_all=ref_batch_all)[name]
    loss, triplets = fn(emb, labels, **opts)
    ap = np.array([t[0] for t in triplets])
    an = np.array([t[1] for t in triplets])
    n = len(triplets)
    return loss, dict(num_valid=n, frac_hard=np.mean(an > ap) if n else 0.0,
                      mean_sim_ap=ap.mean() if n else 0.0, mean_sim_an=an.mean() if n else 0.0)


# ---------------------------------------------------------------------------------------------
# Problems and one jitted function per (objective, options), reused across cases.

@functools.lru_cache(maxsize=None)
def _jitted(name, opts=()):
    fn = objectives.get(name, **dict(opts))
    return jax.jit(fn), jax.jit(jax.grad(lambda e, y: fn(e, y)[0]))


def _labels(kind, b, rng):
    if kind == "pk":
        return np.repeat(np.arange(b // 3), 3)
    if kind == "odd":       # odd class sizes and singletons
        return np.array(([0] * 5 + [1] * 3 + [2] * 2 + [3] + [4] + list(range(5, 20)))[:b])
    return rng.integers(0, 4, size=b)


def _problem(seed, kind="random", b=12, d=5):
    rng = np.random.default_rng(seed)
    labels = _labels(kind, b, rng)
    return rng.normal(size=(b, d)).astype(np.float32), rng.permutation(labels)


CASES = [
    ("ephn", ()), ("epshn", ()), ("sct", ()),
    ("sct", (("hard_rule", "and"), ("hard_threshold", 0.5), ("normalization", "separate"))),
    ("sct", (("hard_threshold", 0.3), ("hard_weight", 0.5), ("temperature", 0.5))),
    ("batch_hard", ()), ("batch_hard", (("reduction", "avg_nonzero"), ("margin", 0.5))),
    ("batch_hard", (("distance", "cosine"), ("margin", 0.5))),
    ("batch_hard", (("distance", "squared_euclidean"), ("normalize", False), ("margin", 4.0))),
    ("batch_hard", (("soft", True), ("normalize", False))),
    ("semihard", ()), ("semihard", (("distance", "cosine"), ("margin", 0.5))),
    ("semihard", (("distance", "squared_euclidean"), ("normalize", False), ("margin", 3.0))),
    ("batch_all", ()), ("batch_all", (("reduction", "mean"), ("margin", 0.5))),
    ("batch_all", (("distance", "euclidean"), ("normalize", False), ("margin", 1.0))),
]


GRAD_CASES = [CASES[i] for i in (0, 1, 2, 3, 5, 8, 10, 13, 15)]


def _case_name(name, opts):
    return "_".join([name] + [f"{k}_{v}" for k, v in opts])


class ReferenceTest(parameterized.TestCase):

    @parameterized.named_parameters((_case_name(n, o), n, o) for n, o in CASES)
    def test_loss_and_aux_match_reference(self, name, opts):
        f, _ = _jitted(name, opts)
        for seed, kind in ((0, "random"), (1, "pk"), (2, "odd"), (3, "random")):
            emb, labels = _problem(seed, kind)
            loss, aux = f(jnp.asarray(emb), jnp.asarray(labels))
            want, stats = reference(name, emb, labels, **dict(opts))
            with self.subTest(seed=seed, kind=kind):
                self.assertGreater(stats["num_valid"], 0)
                np.testing.assert_allclose(loss, want, rtol=2e-4, atol=2e-5)
                np.testing.assert_allclose(aux["loss"], want, rtol=2e-4, atol=2e-5)
                for key, value in stats.items():
                    np.testing.assert_allclose(aux[key], value, rtol=2e-4, atol=2e-5,
                                               err_msg=key)

    def test_references_are_not_trivial(self):
        # The random problems exercise both SCT sets, non-zero hinges and zero hinges.
        seen = set()
        for seed, kind in ((0, "random"), (1, "pk"), (2, "odd"), (3, "random")):
            emb, labels = _problem(seed, kind)
            _, stats = ref_official(emb, labels, hard_threshold=0.3)
            seen |= {"easy"} if stats["num_easy"] else set()
            seen |= {"hard"} if stats["num_hard"] else set()
            loss, _ = ref_batch_all(emb, labels, margin=0.2)
            seen |= {"batch_all"} if loss > 0 else set()
        self.assertEqual(seen, {"easy", "hard", "batch_all"})

    @parameterized.named_parameters((_case_name(n, o), n, o) for n, o in GRAD_CASES)
    def test_gradient_matches_finite_differences_of_reference(self, name, opts):
        emb, labels = _problem(5, "odd", b=9, d=3)
        emb = emb.astype(np.float64)
        with jax.enable_x64(True):
            fn = objectives.get(name, **dict(opts))
            grad = jax.jit(jax.grad(lambda e: fn(e, jnp.asarray(labels))[0]))(
                jnp.asarray(emb))
            grad = np.asarray(grad)
        h = 1e-6
        fd = np.zeros_like(emb)
        for idx in np.ndindex(*emb.shape):
            step = np.zeros_like(emb)
            step[idx] = h
            fd[idx] = (reference(name, emb + step, labels, **dict(opts))[0]
                       - reference(name, emb - step, labels, **dict(opts))[0]) / (2 * h)
        self.assertGreater(np.abs(fd).max(), 1e-3)
        np.testing.assert_allclose(grad, fd, atol=2e-5, rtol=1e-4)


class OfficialSemanticsTest(absltest.TestCase):
    """Hand-made 2-D cases pinning the official SCT code's behaviour."""

    def test_negative_duplicate_invalidates_anchor_and_tie_is_in_neither_set(self):
        half = np.sqrt(3) / 2
        emb = jnp.array([[1.0, 0.0], [0.5, half], [1.0, 0.0]])   # 2 duplicates 0, other class
        labels = jnp.array([0, 0, 1])
        # Anchor 0: negative 2 at cosine 1 -> invalid. Anchor 1: S_ap = S_an (tie).
        # Anchor 2: no positive.
        loss, aux = objectives.get("ephn")(emb, labels)
        self.assertEqual(int(aux["num_valid"]), 1)
        self.assertAlmostEqual(float(loss), np.log(2.0), places=5)
        loss, aux = objectives.get("sct")(emb, labels)
        self.assertEqual((int(aux["num_easy"]), int(aux["num_hard"])), (0, 0))
        self.assertEqual(float(loss), 0.0)
        # The first release's "and" rule puts the tie in the easy set.
        loss, aux = objectives.get("sct", hard_rule="and", hard_threshold=0.5,
                                   normalization="separate")(emb, labels)
        self.assertEqual((int(aux["num_easy"]), int(aux["num_hard"])), (1, 0))
        self.assertAlmostEqual(float(loss), np.log(2.0), places=5)

    def test_antipodal_positive_is_invalid(self):
        emb = jnp.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
        labels = jnp.array([0, 0, 1, 1])
        _, aux = objectives.get("sct")(emb, labels)
        # Anchors 0, 1: S_ap = -1 exactly. Anchors 2, 3: positive is a duplicate (cut).
        self.assertEqual(int(aux["num_valid"]), 0)
        _, aux = objectives.get("sct")(emb.at[1, 1].set(0.1), labels)
        self.assertEqual(int(aux["num_valid"]), 2)

    def test_duplicate_positive_is_skipped(self):
        c, s = np.cos(0.5), np.sin(0.5)
        emb = jnp.array([[1.0, 0.0], [2.0, 0.0], [c, s], [0.0, 1.0]])
        labels = jnp.array([0, 0, 0, 1])
        _, aux = objectives.get("ephn")(emb, labels)
        # Anchors 0 and 1 take positive 2 (cos 0.5 rad), not each other (cos 1); anchor 2
        # takes 0 or 1, also at cos 0.5 rad; anchor 3 has no positive.
        self.assertEqual(int(aux["num_valid"]), 3)
        self.assertAlmostEqual(float(aux["mean_sim_ap"]), c, places=5)

    def test_hard_term_pushes_only_the_negative(self):
        # Anchors 0 and 1 (class 0, orthogonal) both pick negative 2, more similar than their
        # positive: two hard triplets, L = (S_02 + S_12) / 2, whatever S_01 is.
        emb = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
        labels = jnp.array([0, 0, 1])
        fn = objectives.get("sct")
        (loss, aux), grad = jax.jit(jax.value_and_grad(lambda e: fn(e, labels),
                                                       has_aux=True))(emb)
        self.assertEqual((int(aux["num_easy"]), int(aux["num_hard"])), (0, 2))
        self.assertAlmostEqual(float(loss), (0.6 + 0.8) / 2, places=6)
        # d cos(u, v) / du = v - cos(u, v) u for unit u, v; no S_01 term anywhere.
        u0, u1, v = np.eye(2)[0], np.eye(2)[1], np.array([0.6, 0.8])
        want = np.stack([0.5 * (v - 0.6 * u0), 0.5 * (v - 0.8 * u1),
                         0.5 * (u0 - 0.6 * v) + 0.5 * (u1 - 0.8 * v)])
        np.testing.assert_allclose(grad, want, atol=1e-6)


class DegenerateInputTest(parameterized.TestCase):

    @parameterized.parameters(*_default(TRIPLET))
    def test_no_triplet_gives_zero_loss_and_gradient(self, name):
        self._test_no_triplet_gives_zero_loss_and_gradient(name)

    @parameterized.parameters(*_others(TRIPLET))
    @pytest.mark.slow
    def test_no_triplet_gives_zero_loss_and_gradient_others(self, name):
        self._test_no_triplet_gives_zero_loss_and_gradient(name)

    def _test_no_triplet_gives_zero_loss_and_gradient(self, name):
        rng = np.random.default_rng(0)
        for labels in (np.zeros(6, int), np.arange(6), np.zeros(1, int)):
            emb = jnp.asarray(rng.normal(size=(len(labels), 4)), jnp.float32)
            fn = objectives.get(name)
            (loss, aux), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(
                emb, jnp.asarray(labels))
            with self.subTest(labels=labels.tolist()):
                self.assertEqual(float(loss), 0.0)
                self.assertEqual(int(aux["num_valid"]), 0)
                self.assertEqual(float(jnp.abs(grad).sum()), 0.0)
                for key, value in aux.items():
                    self.assertTrue(np.isfinite(np.asarray(value)).all(), key)

    @parameterized.named_parameters((_case_name(n, o), n, o) for n, o in GRAD_CASES)
    def test_finite_gradients_for_zero_and_duplicate_embeddings(self, name, opts):
        _, g = _jitted(name, opts)
        emb, labels = _problem(0, "pk")
        emb[1] = emb[0]          # duplicate within a class
        emb[4] = emb[0]          # duplicate across classes
        emb[7] = 0.0             # zero embedding
        grad = g(jnp.asarray(emb), jnp.asarray(labels))
        self.assertTrue(np.isfinite(np.asarray(grad)).all())
        grad = g(jnp.zeros_like(jnp.asarray(emb)), jnp.asarray(labels))
        self.assertTrue(np.isfinite(np.asarray(grad)).all())


class TransformTest(parameterized.TestCase):

    @parameterized.parameters(*_default(TRIPLET))
    def test_no_retrace_for_new_label_patterns(self, name):
        self._test_no_retrace_for_new_label_patterns(name)

    @parameterized.parameters(*_others(TRIPLET))
    @pytest.mark.slow
    def test_no_retrace_for_new_label_patterns_others(self, name):
        self._test_no_retrace_for_new_label_patterns(name)

    def _test_no_retrace_for_new_label_patterns(self, name):
        fn = objectives.get(name)
        chex.clear_trace_counter()  # counters are keyed by the wrapped function's code
        traced = jax.jit(chex.assert_max_traces(lambda e, y: fn(e, y), n=1))
        for seed, kind in ((0, "random"), (1, "pk"), (2, "odd")):
            emb, labels = _problem(seed, kind)
            loss, _ = traced(jnp.asarray(emb), jnp.asarray(labels))
            want, _ = reference(name, emb, labels)
            np.testing.assert_allclose(loss, want, rtol=2e-4, atol=2e-5)

    @parameterized.parameters(*_default(TRIPLET))
    def test_vmap_over_a_batch_of_problems(self, name):
        self._test_vmap_over_a_batch_of_problems(name)

    @parameterized.parameters(*_others(TRIPLET))
    @pytest.mark.slow
    def test_vmap_over_a_batch_of_problems_others(self, name):
        self._test_vmap_over_a_batch_of_problems(name)

    def _test_vmap_over_a_batch_of_problems(self, name):
        fn = objectives.get(name)
        problems = [_problem(s, k) for s, k in ((0, "random"), (1, "pk"), (2, "odd"))]
        emb = jnp.asarray(np.stack([p[0] for p in problems]))
        labels = jnp.asarray(np.stack([p[1] for p in problems]))
        losses, aux = jax.jit(jax.vmap(fn))(emb, labels)
        grads = jax.jit(jax.vmap(jax.grad(lambda e, y: fn(e, y)[0])))(emb, labels)
        _, single_grad = _jitted(name)
        for i, (e, y) in enumerate(problems):
            want, stats = reference(name, e, y)
            np.testing.assert_allclose(losses[i], want, rtol=2e-4, atol=2e-5)
            self.assertEqual(int(aux["num_valid"][i]), stats["num_valid"])
            np.testing.assert_allclose(grads[i], single_grad(e, y), rtol=1e-4, atol=1e-6)


class MultiDeviceTest(parameterized.TestCase):
    """pmap over 8 CPU devices == one device on the concatenated batch (loss and grads)."""

    @parameterized.parameters(*_default(TRIPLET))
    def test_sum_of_shares_equals_single_device(self, name):
        self._test_sum_of_shares_equals_single_device(name)

    @parameterized.parameters(*_others(TRIPLET))
    @pytest.mark.slow
    def test_sum_of_shares_equals_single_device_others(self, name):
        self._test_sum_of_shares_equals_single_device(name)

    def _test_sum_of_shares_equals_single_device(self, name):
        n_dev = jax.device_count()
        self.assertGreaterEqual(n_dev, 8)
        local = 3
        emb, labels = _problem(11, "odd", b=n_dev * local, d=4)
        single = objectives.get(name)
        loss, aux = single(jnp.asarray(emb), jnp.asarray(labels))
        grad = jax.grad(lambda e: single(e, jnp.asarray(labels))[0])(jnp.asarray(emb))

        sharded = objectives.get(name, axis_name="batch")

        def step(e, y):
            (l, a), g = jax.value_and_grad(lambda e: sharded(e, y), has_aux=True)(e)
            return l, a, g
        l_dev, a_dev, g_dev = jax.pmap(step, axis_name="batch")(
            jnp.asarray(emb).reshape(n_dev, local, -1), jnp.asarray(labels).reshape(n_dev, -1))
        self.assertGreater(int(aux["num_valid"]), 0)
        np.testing.assert_allclose(l_dev.sum(), loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g_dev.reshape(emb.shape), grad, rtol=1e-4, atol=1e-6)
        for key, value in aux.items():
            np.testing.assert_allclose(a_dev[key], np.full(n_dev, value), rtol=1e-5,
                                       atol=1e-6, err_msg=key)


    def test_shard_map_with_varying_axis_types(self):
        self._shard_map(name="sct")

    @parameterized.parameters("batch_all", "semihard")
    @pytest.mark.slow
    def test_shard_map_with_varying_axis_types_others(self, name):
        self._shard_map(name)

    def _shard_map(self, name):
        # shard_map checks that loop carries vary like the data (pmap does not).
        n_dev = 8
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:n_dev]), ("batch",))
        spec = jax.sharding.PartitionSpec
        emb, labels = _problem(12, "random", b=n_dev * 3, d=4)
        sharded = objectives.get(name, axis_name="batch")

        def step(e, y):
            loss, grad = jax.value_and_grad(lambda e: sharded(e, y)[0])(e)
            return jax.lax.psum(loss, "batch"), grad
        loss, grad = jax.jit(jax.shard_map(
            step, mesh=mesh, in_specs=(spec("batch"), spec("batch")),
            out_specs=(spec(), spec("batch"))))(jnp.asarray(emb), jnp.asarray(labels))
        single = objectives.get(name)
        want, want_grad = jax.value_and_grad(lambda e: single(e, jnp.asarray(labels))[0])(
            jnp.asarray(emb))
        self.assertGreater(float(want), 0.0)
        np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


class RegistryAndErrorsTest(parameterized.TestCase):

    def test_names(self):
        names = objectives.names()
        self.assertEqual(names, sorted(names))
        self.assertContainsSubset(set(TRIPLET), set(names))
        self.assertContainsSubset({"contrastive", "multi_similarity", "supcon",
                                   "distance_weighted"}, set(names))

    @pytest.mark.slow  # one compile per objective
    def test_frac_hard_has_one_meaning(self):
        """frac_hard is the mined-triplet hn_ratio; pair objectives say frac_hard_ephn."""
        emb, labels = _problem(3)
        emb, labels = jnp.asarray(emb), jnp.asarray(labels)
        pair_only = {"contrastive", "multi_similarity", "supcon", *objectives.tuples.OBJECTIVES,
                     *objectives.ranking.OBJECTIVES}
        ephn_hard = float(objectives.get("ephn")(emb, labels)[1]["frac_hard"])
        self.assertBetween(ephn_hard, 0.05, 0.95)   # a batch where the statistic can be wrong
        for name in objectives.names():
            if objectives.is_parametric(name):   # tests/test_parametric.py
                continue
            with self.subTest(name):
                _, aux = objectives.get(name)(emb, labels, jax.random.key(0))
                if name in pair_only:
                    self.assertNotIn("frac_hard", aux)
                    # The same anchors count (random rows: no cosine at +-1, no duplicates).
                    self.assertAlmostEqual(float(aux["frac_hard_ephn"]), ephn_hard, places=6)
                else:
                    self.assertNotIn("frac_hard_ephn", aux)
                    self.assertIn("frac_hard", aux)

    def test_get_binds_options(self):
        emb, labels = _problem(0)
        a, _ = objectives.get("batch_hard", margin=0.5)(jnp.asarray(emb), jnp.asarray(labels))
        b, _ = objectives.batch_hard(jnp.asarray(emb), jnp.asarray(labels), margin=0.5)
        c, _ = objectives.get("batch_hard")(jnp.asarray(emb), jnp.asarray(labels))
        self.assertEqual(float(a), float(b))
        self.assertNotEqual(float(a), float(c))

    def test_unknown_name_and_option(self):
        with self.assertRaisesRegex(ValueError, r"name.*'nope'.*batch_hard"):
            objectives.get("nope")
        with self.assertRaisesRegex(ValueError, r"\['temprature'\].*temperature"):
            objectives.get("sct", temprature=0.1)
        emb, labels = jnp.zeros((4, 2)), jnp.zeros(4, jnp.int32)
        for name, opts, arg in (("batch_hard", dict(distance="l1"), "distance"),
                                ("batch_all", dict(reduction="sum"), "reduction"),
                                ("sct", dict(hard_rule="xor"), "hard_rule"),
                                ("sct", dict(normalization="both"), "normalization")):
            with self.subTest(arg):
                with self.assertRaisesRegex(ValueError, arg):
                    objectives.get(name, **opts)(emb, labels)

    def test_every_option_has_a_spec(self):
        for name in objectives.names():
            with self.subTest(name):
                self.assertEqual(set(objectives.OPTION_SPECS[name]), set(objectives.options(name)))
                objectives.check_options(name, objectives.options(name))  # defaults pass

    def test_out_of_range_and_mistyped_options_fail_at_get(self):
        """The cases of issue 11, written out (independent of the specs)."""
        cases = [(n, "temperature", v, ValueError) for n in ("ephn", "epshn", "sct", "supcon")
                 for v in (0.0, -0.1, 0)]
        cases += [("batch_hard", "margin", "a", TypeError), ("semihard", "margin", -0.1,
                                                              ValueError),
                  ("batch_all", "margin", None, TypeError),
                  ("batch_hard", "margin", float("nan"), ValueError),
                  ("batch_hard", "margin", float("inf"), ValueError),
                  ("batch_hard", "normalize", "yes", TypeError),
                  ("batch_hard", "soft", 1, TypeError),
                  ("batch_hard", "distance", "l1", ValueError),
                  ("batch_hard", "reduction", "sum", ValueError),
                  ("sct", "hard_rule", "xor", ValueError),
                  ("sct", "hard_weight", -1.0, ValueError),
                  ("sct", "normalization", "both", ValueError),
                  ("sct", "temperature", True, TypeError),
                  ("ephn", "duplicate_threshold", "0.9", TypeError),
                  ("contrastive", "neg_margin", [1.0], TypeError),
                  ("multi_similarity", "alpha", 0.0, ValueError),
                  ("multi_similarity", "beta", -50.0, ValueError),
                  ("multi_similarity", "epsilon", -0.1, ValueError),
                  ("distance_weighted", "cutoff", 0.0, ValueError),
                  ("distance_weighted", "nonzero_loss_cutoff", -1.0, ValueError),
                  ("distance_weighted", "margin", -0.2, ValueError),
                  ("distance_weighted", "loss", "hinge", ValueError)]
        for name, option, value, error in cases:
            with self.subTest(name=name, option=option, value=value):
                with self.assertRaises(error) as ctx:
                    objectives.get(name, **{option: value})
                message = str(ctx.exception)
                self.assertIn(f"`{option}`", message)
                self.assertIn(repr(value), message)
                self.assertIn(name, message)
                self.assertNotIn("\n", message)

    def test_boundary_values_are_accepted(self):
        for name, opts in (("batch_hard", dict(margin=0)), ("sct", dict(hard_weight=0.0)),
                           ("sct", dict(temperature=1e-3)), ("contrastive",
                                                             dict(pos_margin=-0.5)),
                           ("multi_similarity", dict(epsilon=0.0)),
                           ("batch_hard", dict(margin=np.float32(0.3))),
                           ("distance_weighted", dict(beta=0))):
            with self.subTest(name=name, opts=opts):
                objectives.get(name, **opts)

    def test_array_options_are_schedulable_and_unchecked(self):
        emb, labels = _problem(0)
        emb, labels = jnp.asarray(emb), jnp.asarray(labels)

        @jax.jit
        def loss_at(temperature):  # traced: no value to check at trace time
            return objectives.get("sct", temperature=temperature)(emb, labels)[0]

        want = objectives.get("sct", temperature=0.5)(emb, labels)[0]
        np.testing.assert_allclose(loss_at(jnp.float32(0.5)), want, rtol=1e-6)
        objectives.get("sct", temperature=jnp.float32(0.0))  # concrete array: unchecked too
        with self.assertRaisesRegex(TypeError, "temperature.*dtype bool"):
            objectives.get("sct", temperature=jnp.array(True))

    def test_check_options_for_the_cli(self):
        objectives.check_options("batch_hard", {"margin": 0.1, "distance": "cosine"})
        with self.assertRaises(ValueError) as ctx:
            objectives.check_options("ephn", {"margin": 0.1})
        message = str(ctx.exception)
        self.assertEqual(message,
                         "unknown option(s) ['margin'] for objective 'ephn'; valid options: "
                         "['block_size', 'duplicate_threshold', 'temperature'].")
        with self.assertRaisesRegex(ValueError, r"name.*'nope'.*batch_hard"):
            objectives.check_options("nope", {})
        self.assertFalse(any(objectives.is_parametric(n) for n in objectives.OBJECTIVES))

    @parameterized.parameters(*_default(ALL_NAMES))
    def test_huge_and_tiny_embeddings_normalise_exactly(self, name):
        self._test_huge_and_tiny_embeddings_normalise_exactly(name)

    @parameterized.parameters(*_others(ALL_NAMES))
    @pytest.mark.slow
    def test_huge_and_tiny_embeddings_normalise_exactly_others(self, name):
        self._test_huge_and_tiny_embeddings_normalise_exactly(name)

    def _test_huge_and_tiny_embeddings_normalise_exactly(self, name):
        """Every objective normalises by default: scaling the rows by 1e20 or 1e-6 changes
        neither the loss nor, up to that factor, the gradient (the squared norm of a 1e20 row
        used to overflow: a finite wrong loss with zero gradient)."""
        fn = objectives.get(name)
        emb, labels = _problem(2)
        key = jax.random.key(0)

        loss_and_grad = jax.jit(jax.value_and_grad(lambda e: fn(e, labels, key)[0]))

        want, want_grad = loss_and_grad(emb)
        self.assertGreater(float(want), 0.0)
        for scale in (1e20, 1e-6):
            with self.subTest(scale=scale):
                loss, grad = loss_and_grad(emb * np.float32(scale))
                np.testing.assert_allclose(loss, want, rtol=2e-5, atol=1e-6)
                np.testing.assert_allclose(np.asarray(grad, np.float64) * scale, want_grad,
                                           rtol=2e-3, atol=2e-5)

    @parameterized.parameters(*_default(ALL_NAMES))
    def test_non_finite_embeddings_give_a_nan_loss(self, name):
        self._test_non_finite_embeddings_give_a_nan_loss(name)

    @parameterized.parameters(*_others(ALL_NAMES))
    @pytest.mark.slow
    def test_non_finite_embeddings_give_a_nan_loss_others(self, name):
        self._test_non_finite_embeddings_give_a_nan_loss(name)

    def _test_non_finite_embeddings_give_a_nan_loss(self, name):
        """One NaN or inf element: NaN loss and aux loss (masks would drop the row silently)."""
        fn = jax.jit(objectives.get(name))
        emb, labels = _problem(4)
        key = jax.random.key(0)
        self.assertTrue(np.isfinite(float(fn(emb, labels, key)[0])))
        for bad in (np.nan, np.inf, -np.inf):
            for row in (0, 7):
                with self.subTest(bad=bad, row=row):
                    poisoned = emb.copy()
                    poisoned[row, 1] = bad
                    loss, aux = fn(poisoned, labels, key)
                    self.assertTrue(np.isnan(float(loss)))
                    self.assertTrue(np.isnan(float(aux["loss"])))

    def test_non_finite_rows_poison_every_device_and_the_memory(self):
        self._poison(name="sct")

    @pytest.mark.slow
    def test_non_finite_rows_poison_every_device_and_the_memory_supcon(self):
        self._poison(name="supcon")

    def _poison(self, name):
        from hnm import memory as memory_lib
        n_dev, local = 8, 3
        emb, labels = _problem(5, "pk", b=n_dev * local, d=4)
        emb[7, 0] = np.nan                                   # on device 2 only
        sharded = objectives.get(name, axis_name="batch")
        key = jax.random.key(0)
        shares, aux = jax.pmap(lambda e, y: sharded(e, y, key), axis_name="batch")(
            emb.reshape(n_dev, local, -1), labels.reshape(n_dev, local))
        self.assertTrue(np.isnan(np.asarray(shares)).all())
        self.assertTrue(np.isnan(np.asarray(aux["loss"])).all())
        emb[7, 0] = 1.0
        mem = memory_lib.enqueue(memory_lib.init(8, 4), emb[:4], labels[:4])
        mem = memory_lib.Memory(mem.embeddings.at[1, 2].set(jnp.inf), mem.labels, mem.ptr)
        fn = objectives.get(name)
        self.assertTrue(np.isfinite(float(fn(emb, labels, key)[0])))
        self.assertTrue(np.isnan(float(fn(emb, labels, key, memory=mem)[0])))

    @parameterized.parameters(*_default(ALL_NAMES))
    def test_empty_batch_and_dimension_name_the_argument(self, name):
        self._test_empty_batch_and_dimension_name_the_argument(name)

    @parameterized.parameters(*_others(ALL_NAMES))
    @pytest.mark.slow
    def test_empty_batch_and_dimension_name_the_argument_others(self, name):
        self._test_empty_batch_and_dimension_name_the_argument(name)

    def _test_empty_batch_and_dimension_name_the_argument(self, name):
        fn = objectives.get(name)
        key = jax.random.key(0)
        with self.assertRaisesRegex(ValueError, r"`embeddings` is empty along B \(rows\)"):
            fn(jnp.zeros((0, 3)), jnp.zeros(0, jnp.int32), key)
        with self.assertRaisesRegex(ValueError, r"`embeddings` is empty along D \(columns\)"):
            fn(jnp.zeros((4, 0)), jnp.arange(4), key)

    @parameterized.parameters(*_default(ALL_NAMES))
    def test_labels_outside_int32_or_the_mask_value_raise(self, name):
        self._test_labels_outside_int32_or_the_mask_value_raise(name)

    @parameterized.parameters(*_others(ALL_NAMES))
    @pytest.mark.slow
    def test_labels_outside_int32_or_the_mask_value_raise_others(self, name):
        self._test_labels_outside_int32_or_the_mask_value_raise(name)

    def _test_labels_outside_int32_or_the_mask_value_raise(self, name):
        fn = objectives.get(name)
        key = jax.random.key(0)
        emb, labels = _problem(1)
        # 2**32 and 0 would wrap to one int32 class: refused, naming the value.
        big = labels.astype(np.int64)
        big[big == 0] = 2 ** 32
        with self.assertRaisesRegex(ValueError, r"`labels` holds 4294967296, outside the int32"):
            fn(emb, big, key)
        with self.assertRaisesRegex(ValueError, r"`labels` holds -2147483649"):
            fn(emb, labels.astype(np.int64) - 2 ** 31 - 1, key)
        masked = labels.astype(np.int64)
        masked[3] = distances.MASKED_LABEL
        for given in (masked, jnp.asarray(masked, jnp.int32), list(map(int, masked))):
            with self.assertRaisesRegex(ValueError, r"`labels` holds -2147483648.*MASKED_LABEL"):
                fn(emb, given, key)
        # In range, int64 labels give the int32 result; traced labels are not checked.
        want = jax.jit(fn)(emb, labels.astype(np.int32), key)[0]
        np.testing.assert_allclose(fn(emb, labels.astype(np.int64), key)[0], want, rtol=1e-6)

    @parameterized.parameters(*_default(TRIPLET))
    def test_bad_inputs_name_the_argument(self, name):
        self._test_bad_inputs_name_the_argument(name)

    @parameterized.parameters(*_others(TRIPLET))
    @pytest.mark.slow
    def test_bad_inputs_name_the_argument_others(self, name):
        self._test_bad_inputs_name_the_argument(name)

    def _test_bad_inputs_name_the_argument(self, name):
        fn = objectives.get(name)
        emb, labels = jnp.zeros((4, 2)), jnp.zeros(4, jnp.int32)
        with self.assertRaisesRegex(ValueError, "embeddings"):
            fn(jnp.zeros(4), labels)
        with self.assertRaisesRegex(TypeError, "embeddings"):
            fn(jnp.zeros((4, 2), jnp.int32), labels)
        with self.assertRaisesRegex(ValueError, "labels"):
            fn(emb, jnp.zeros((4, 1), jnp.int32))
        with self.assertRaisesRegex(TypeError, "labels"):
            fn(emb, jnp.zeros(4))
        with self.assertRaisesRegex(ValueError, "labels"):
            fn(emb, jnp.zeros(5, jnp.int32))


try:
    import torch
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
except ImportError:  # the optional side-by-side; the NumPy references above are primary
    torch = None


@absltest.skipIf(torch is None, "pytorch-metric-learning is not installed")
class PMLEqualityTest(parameterized.TestCase):

    @parameterized.parameters(0, 1, 2)
    def test_batch_hard_and_batch_all(self, seed):
        emb, labels = _problem(seed, "odd" if seed == 2 else "pk", b=12, d=6)
        e, y = torch.tensor(emb, requires_grad=True), torch.tensor(labels)
        for name, miner in (("batch_hard", pml_miners.BatchHardMiner()), ("batch_all", None)):
            loss_fn = pml_losses.TripletMarginLoss(margin=0.3)
            e.grad = None
            want = loss_fn(e, y) if miner is None else loss_fn(e, y, miner(e, y))
            want.backward()
            fn = objectives.get(name, margin=0.3, reduction="avg_nonzero")
            got = fn(jnp.asarray(emb), jnp.asarray(labels))[0]
            grad = jax.grad(lambda x: fn(x, jnp.asarray(labels))[0])(jnp.asarray(emb))
            with self.subTest(name):
                self.assertGreater(want.item(), 0.0)
                np.testing.assert_allclose(got, want.item(), rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(grad, e.grad.numpy(), rtol=1e-3, atol=1e-5)


if __name__ == "__main__":
    absltest.main()


def test_sct_paper_preset_marks_hard_exactly_when_the_negative_is_closer():
    # The paper's rule: hard iff S_an > S_ap (no threshold). Anchor 0: S_an = 0.6 > S_ap = 0.5
    # (hard, below the official 0.8 threshold).
    import numpy as np
    from hnm import objectives as objs

    def unit(deg):
        return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]
    a0, a2 = 0.0, 180.0
    emb = np.array([unit(a0), unit(a0 + np.degrees(np.arccos(0.5))),
                    unit(a2), unit(a2 + np.degrees(np.arccos(0.9)))], np.float32)
    # the negatives of each pair come from the other pair; rotate the second pair so that
    # S_an(anchor 0) = 0.6: put pair 2 at angle arccos(0.6) on the other side of anchor 0.
    emb[2] = unit(-np.degrees(np.arccos(0.6)))
    emb[3] = unit(-np.degrees(np.arccos(0.6)) - np.degrees(np.arccos(0.9)))
    labels = np.array([0, 0, 1, 1])
    sims = emb @ emb.T
    paper = objs.get("sct", **objs.SCT_PRESETS["paper"])
    official = objs.get("sct", **objs.SCT_PRESETS["official"])
    _, aux_p = paper(emb, labels)
    _, aux_o = official(emb, labels)
    # brute force: hardest negative of each anchor, easy positive (the only one)
    hard_paper = sum(sims[a, [n for n in range(4) if labels[n] != labels[a]]].max()
                     > sims[a, [p for p in range(4) if p != a and labels[p] == labels[a]]].max()
                     for a in range(4))
    assert int(aux_p["num_hard"]) == hard_paper > 0
    # The official "or" rule also marks S_an > 0.8: never fewer hard anchors than the paper's.
    assert int(aux_o["num_hard"]) >= int(aux_p["num_hard"])
