"""Tests of the parameter-free pair / list / AP objectives (hnm.objectives.tuples, .ranking).

References are float64 NumPy loops written from the papers (explicit pairs, anchors and
positives; never calling hnm), in a general form: anchors X against reference rows R with
boolean relevance masks, so the same reference checks labels, a cross-batch memory (R = the
batch followed by the memory rows) and custom multi-label masks. Loss to 1e-9, gradients to
1e-6 against central finite differences of the reference (h = 1e-6). PML 2.9 equality (same
inputs, float64) to 1e-9, skipped without torch; except SmoothAPLoss, which computes in
float32 (1e-6) and is only correct when the number of classes equals the class size (its
``num_classes_batch`` is really the class size), and HistogramLoss, which bins in float32
(1e-6). Then: check_grads, finite gradients for duplicate and zero embeddings, zero loss and
gradient when nothing is valid, one trace per shape, and 8 pmapped devices (psum of losses
and gradients) equal to one device on the concatenated batch.
"""
import functools
import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from _reference_utils import fd_grad, np_logsumexp, np_normalize
from hnm import memory as memory_lib
from hnm import objectives

B, D = 12, 6
NUM_DEVICES = 8
LABELS = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])       # 4 classes x 3, interleaved
NAMES = ("circle", "lifted_structure", "generalized_lifted_structure", "n_pairs", "ntxent",
         "tuplet_margin", "fast_ap", "smooth_ap", "histogram")
# Non-default options where the default would hide a mistake (e.g. huge scales saturate).
OPTIONS = {
    "circle": dict(m=0.25, gamma=8.0),
    "lifted_structure": dict(pos_margin=0.1, neg_margin=0.9),
    "generalized_lifted_structure": dict(pos_margin=0.1, neg_margin=0.9),
    "n_pairs": dict(),
    "ntxent": dict(temperature=0.5),
    "tuplet_margin": dict(margin=0.2, scale=8.0),
    "fast_ap": dict(num_bins=5),
    "smooth_ap": dict(temperature=0.1),
    "histogram": dict(num_bins=10),
}
MASKED = ("circle", "ntxent", "tuplet_margin", "generalized_lifted_structure", "fast_ap",
          "smooth_ap")     # references written on (X, R, pos, neg): labels, memory, masks


# ------------------------------------------------------------------ NumPy references
def masks_from_labels(labels, ref_labels, offset=0):
    pos = labels[:, None] == ref_labels[None, :]
    rows = np.arange(len(labels))[:, None] + offset
    pos &= rows != np.arange(len(ref_labels))[None, :]
    return pos, labels[:, None] != ref_labels[None, :]


def cos(u, v):
    return float(np.dot(u, v))


def dist(u, v):
    return float(np.linalg.norm(u - v))


def ref_circle(x, r, pos, neg, m, gamma, frozen=None):
    """Sun et al. 2020, Eq. 4 with alpha_p = [1 + m - s_p]_+, alpha_n = [s_n + m]_+;
    PML's mean over anchors with a non-zero loss. The weights alpha are constants of the
    gradient (detached in the paper's code and PML): ``frozen`` = (x, r) they are read from."""
    xa, ra = frozen if frozen is not None else (x, r)
    losses = []
    for a in range(len(x)):
        p_terms = [-gamma * max(1 + m - cos(xa[a], ra[j]), 0) * (cos(x[a], r[j]) - (1 - m))
                   for j in range(len(r)) if pos[a, j]]
        n_terms = [gamma * max(cos(xa[a], ra[j]) + m, 0) * (cos(x[a], r[j]) - m)
                   for j in range(len(r)) if neg[a, j]]
        if p_terms and n_terms:
            z = np_logsumexp(p_terms) + np_logsumexp(n_terms)
            losses.append(math.log1p(math.exp(z)) if z < 30 else z + math.log1p(math.exp(-z)))
    losses = [v for v in losses if v > 0]
    return sum(losses) / len(losses) if losses else 0.0


def ref_generalized_lifted(x, r, pos, neg, pos_margin, neg_margin):
    """Hermans et al. 2017, Sec. 2: per anchor, mean over all anchors."""
    total = 0.0
    for a in range(len(x)):
        lp = np_logsumexp([dist(x[a], r[j]) - pos_margin for j in range(len(r)) if pos[a, j]])
        ln = np_logsumexp([neg_margin - dist(x[a], r[j]) for j in range(len(r)) if neg[a, j]])
        total += max(lp + ln, 0.0)
    return total / len(x)


def ref_ntxent(x, r, pos, neg, temperature):
    """InfoNCE per positive pair, the anchor's negatives in the denominator."""
    losses = []
    for a in range(len(x)):
        negs = [cos(x[a], r[j]) / temperature for j in range(len(r)) if neg[a, j]]
        for p in range(len(r)):
            if pos[a, p]:
                s = cos(x[a], r[p]) / temperature
                losses.append(np_logsumexp([s] + negs) - s)
    return sum(losses) / len(losses) if losses else 0.0


def ref_tuplet(x, r, pos, neg, margin, scale):
    """Yu & Tao 2019, Eq. 5: log(1 + sum_n exp(s (cos t_an - cos(t_ap - beta))))."""
    losses = []
    for a in range(len(x)):
        for p in range(len(r)):
            if pos[a, p]:
                theta = math.acos(min(max(cos(x[a], r[p]), -1.0), 1.0))
                terms = [scale * (cos(x[a], r[n]) - math.cos(theta - margin))
                         for n in range(len(r)) if neg[a, n]]
                losses.append(np_logsumexp([0.0] + terms))
    return sum(losses) / len(losses) if losses else 0.0


def ref_fast_ap(x, r, pos, neg, num_bins):
    """Cakir et al. 2019, Eq. 9 with triangular kernels on d^2 in [0, 4] (their code)."""
    delta = 4.0 / num_bins
    centres = [l * delta for l in range(num_bins + 1)]
    values = []
    for a in range(len(x)):
        if not pos[a].any():
            continue
        hp = [sum(max(1 - abs(dist(x[a], r[j]) ** 2 - z) / delta, 0) for j in range(len(r))
                  if pos[a, j]) for z in centres]
        hn = [sum(max(1 - abs(dist(x[a], r[j]) ** 2 - z) / delta, 0) for j in range(len(r))
                  if neg[a, j]) for z in centres]
        ap, cum_p, cum = 0.0, 0.0, 0.0
        for l in range(len(centres)):
            cum_p += hp[l]
            cum += hp[l] + hn[l]
            if hp[l] * cum_p > 0 and cum > 0:
                ap += hp[l] * cum_p / cum
        values.append(1 - ap / pos[a].sum())
    return sum(values) / len(values) if values else 0.0


def sigmoid(z):
    return 1 / (1 + math.exp(-z)) if z > -500 else 0.0


def ref_smooth_ap(x, r, pos, neg, temperature, include_self=False, offset=0):
    """Brown et al. 2020, Eq. 6 (rank of each positive among all candidates and among the
    positives, sigmoid relaxation); include_self ranks the query itself too."""
    values = []
    for a in range(len(x)):
        p_set = [j for j in range(len(r)) if pos[a, j]]
        if not p_set:
            continue
        c_set = [j for j in range(len(r)) if pos[a, j] or neg[a, j]]
        if include_self:
            p_set, c_set = p_set + [a + offset], c_set + [a + offset]
        ap = 0.0
        for p in p_set:
            s_p = cos(x[a], r[p])
            r_pos = 1 + sum(sigmoid((cos(x[a], r[j]) - s_p) / temperature) for j in p_set
                            if j != p)
            r_all = 1 + sum(sigmoid((cos(x[a], r[j]) - s_p) / temperature) for j in c_set
                            if j != p)
            ap += r_pos / r_all
        values.append(1 - ap / len(p_set))
    return sum(values) / len(values)


def ref_lifted(x, labels, pos_margin, neg_margin):
    """Oh Song et al. 2016, Eq. 4: 1/(2|P|) sum over unordered positive pairs of
    [log(sum_{k in N(i)} e^{m - D_ik} + sum_{l in N(j)} e^{m - D_jl}) + D_ij - m_+]_+^2."""
    n = len(x)
    total, pairs = 0.0, 0
    for i in range(n):
        for j in range(i + 1, n):
            if labels[i] != labels[j]:
                continue
            terms = [neg_margin - dist(x[i], x[k]) for k in range(n) if labels[k] != labels[i]]
            terms += [neg_margin - dist(x[j], x[k]) for k in range(n) if labels[k] != labels[j]]
            total += max(np_logsumexp(terms) + dist(x[i], x[j]) - pos_margin, 0.0) ** 2
            pairs += 1
    return total / (2 * pairs)


def ref_n_pairs(x, labels):
    """Sohn 2016, Eq. 6 with one (anchor, positive) per class: its first two rows."""
    anchors, positives = [], []
    for c in sorted(set(labels), key=list(labels).index):
        rows = [i for i in range(len(x)) if labels[i] == c]
        if len(rows) >= 2:
            anchors.append(rows[0])
            positives.append(rows[1])
    total = 0.0
    for k, a in enumerate(anchors):
        logits = [cos(x[a], x[p]) for p in positives]
        total += np_logsumexp(logits) - logits[k]
    return total / len(anchors)


def ref_histogram(x, labels, num_bins):
    """Ustinova & Lempitsky 2016, Eqs. 1-4: linear-interpolation histograms of the cosines
    of all unordered positive / negative pairs on nodes -1 + r * 2 / num_bins."""
    delta = 2.0 / num_bins
    h_pos, h_neg = np.zeros(num_bins + 1), np.zeros(num_bins + 1)
    n_pos = n_neg = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            s = cos(x[i], x[j])
            r = min(int(math.floor((s + 1) / delta)), num_bins - 1)
            hist = h_pos if labels[i] == labels[j] else h_neg
            hist[r] += (r + 1) - (s + 1) / delta
            hist[r + 1] += (s + 1) / delta - r
            if labels[i] == labels[j]:
                n_pos += 1
            else:
                n_neg += 1
    p_pos, p_neg = h_pos / n_pos, h_neg / n_neg
    return float(np.sum(p_neg * np.cumsum(p_pos)))


def reference(name, emb, labels, mem_emb=None, mem_labels=None, pos=None, neg=None,
              frozen_emb=None, **o):
    """The reference loss on raw embeddings (normalised here), optionally with a memory;
    ``frozen_emb``: the embeddings circle's detached weights are computed from."""
    x = np_normalize(emb)
    if name == "lifted_structure":
        return ref_lifted(x, labels, **o)
    if name == "n_pairs":
        return ref_n_pairs(x, labels)
    if name == "histogram":
        return ref_histogram(x, labels, **o)
    r, ref_labels = x, labels
    if mem_emb is not None:
        r = np.concatenate([x, np_normalize(mem_emb)])
        ref_labels = np.concatenate([labels, mem_labels])
    if pos is None:
        pos, neg = masks_from_labels(labels, ref_labels)
    if name == "circle" and frozen_emb is not None:
        xf = np_normalize(frozen_emb)
        rf = xf if mem_emb is None else np.concatenate([xf, np_normalize(mem_emb)])
        o = dict(o, frozen=(xf, rf))
    fn = {"circle": ref_circle, "ntxent": ref_ntxent, "tuplet_margin": ref_tuplet,
          "generalized_lifted_structure": ref_generalized_lifted, "fast_ap": ref_fast_ap,
          "smooth_ap": ref_smooth_ap}[name]
    return fn(x, r, pos, neg, **o)


def ours(name, emb, labels, **kwargs):
    """(loss, aux, grad) in float64, jitted."""
    opts = {k: v for k, v in kwargs.items() if k not in ("memory", "pos_mask", "neg_mask")}
    call = {k: v for k, v in kwargs.items() if k in ("memory", "pos_mask", "neg_mask")}
    fn = objectives.get(name, **opts)
    f = jax.jit(jax.value_and_grad(lambda e, c: fn(e, jnp.asarray(labels), **c), has_aux=True))
    (loss, aux), grad = f(jnp.asarray(emb, jnp.float64), call)
    return float(loss), aux, np.asarray(grad)


@functools.lru_cache(maxsize=None)
def case(name):
    """One seeded case per objective, shared by the reference and the PML test."""
    emb = np.random.default_rng(NAMES.index(name)).normal(size=(B, D))
    with jax.enable_x64(True):
        return emb, ours(name, emb, LABELS, **OPTIONS[name])


def check_memory(test, name):
    """A half-full memory: the reference ranks against the batch and the memory rows;
    empty slots take no part; no gradient flows into the memory."""
    rng = np.random.default_rng(40)
    emb, mem_emb = rng.normal(size=(B, D)), rng.normal(size=(8, D))
    mem_labels = np.array([0, 1, 2, 3, 5, 0, 0, 0])
    mem = memory_lib.init(8, D)
    mem = memory_lib.enqueue(mem, jnp.asarray(mem_emb[:5], jnp.float32),
                             jnp.asarray(mem_labels[:5]))
    opts = OPTIONS[name]
    with jax.enable_x64(True):
        mem64 = mem._replace(embeddings=mem.embeddings.astype(jnp.float64))
        loss, _, grad = ours(name, emb, LABELS, memory=mem64, **opts)
    used = np.asarray(mem.embeddings[:5], np.float64)
    want = reference(name, emb, LABELS, used, mem_labels[:5], **opts)
    test.assertAlmostEqual(loss, want, places=9)
    want_g = fd_grad(lambda e: reference(name, e, LABELS, used, mem_labels[:5],
                                         frozen_emb=emb, **opts), emb)
    np.testing.assert_allclose(grad, want_g, atol=1e-6)


def check_masks(test, name):
    """Multi-label: rows 0 and 1 also count as relevant to each other, rows 2 and 3 are
    neither relevant nor irrelevant to each other; labels=None."""
    pos, neg = masks_from_labels(LABELS, LABELS)
    pos[0, 1] = pos[1, 0] = True
    neg[0, 1] = neg[1, 0] = False
    neg[2, 3] = neg[3, 2] = False
    emb = np.random.default_rng(41).normal(size=(B, D))
    opts = OPTIONS[name]
    fn = objectives.get(name, **opts)
    with jax.enable_x64(True):
        loss, _ = jax.jit(lambda e, p, n: fn(e, None, pos_mask=p, neg_mask=n))(
            jnp.asarray(emb), jnp.asarray(pos), jnp.asarray(neg))
    want = reference(name, emb, LABELS, pos=pos, neg=neg, **opts)
    test.assertAlmostEqual(float(loss), want, places=9)


class ReferenceTest(parameterized.TestCase):

    @parameterized.parameters(*NAMES)
    def test_loss_and_gradient_match_reference(self, name):
        emb, (loss, aux, grad) = case(name)
        opts = OPTIONS[name]
        self.assertAlmostEqual(loss, reference(name, emb, LABELS, **opts), places=9)
        self.assertAlmostEqual(float(aux["loss"]), loss, places=9)
        want = fd_grad(lambda e: reference(name, e, LABELS, frozen_emb=emb, **opts), emb)
        np.testing.assert_allclose(grad, want, atol=1e-6)

    @parameterized.parameters("circle", "smooth_ap")
    def test_memory_rows_join_the_candidates(self, name):
        check_memory(self, name)

    @parameterized.parameters("ntxent", "fast_ap")
    def test_custom_relevance_masks(self, name):
        check_masks(self, name)

    def test_masks_equal_labels(self):
        pos, neg = masks_from_labels(LABELS, LABELS)
        emb = jnp.asarray(np.random.default_rng(42).normal(size=(B, D)), jnp.float32)
        for name in ("lifted_structure", "histogram"):
            with self.subTest(name):
                fn = objectives.get(name, **OPTIONS[name])
                a, _ = fn(emb, jnp.asarray(LABELS))
                b, _ = fn(emb, None, pos_mask=jnp.asarray(pos), neg_mask=jnp.asarray(neg))
                self.assertAlmostEqual(float(a), float(b), places=5)

    def test_smooth_ap_include_self_and_slots(self):
        emb = np.random.default_rng(43).normal(size=(B, D))
        pos, neg = masks_from_labels(LABELS, LABELS)
        with jax.enable_x64(True):
            full, _, _ = ours("smooth_ap", emb, LABELS, temperature=0.1, include_self=True)
            short, aux, _ = ours("smooth_ap", emb, LABELS, temperature=0.1, include_self=True,
                                 max_positives=3)
            cut, aux_cut, _ = ours("smooth_ap", emb, LABELS, temperature=0.1,
                                   max_positives=1)
        want = ref_smooth_ap(np_normalize(emb), np_normalize(emb), pos, neg, 0.1,
                             include_self=True)
        self.assertAlmostEqual(full, want, places=9)
        self.assertAlmostEqual(short, want, places=9)     # 3 slots: exact on 4 x 3
        self.assertEqual(int(aux["num_dropped"]), 0)
        self.assertEqual(int(aux_cut["num_dropped"]), B)  # each anchor had 2 positives
        self.assertNotAlmostEqual(cut, want, places=3)

    def test_hand_case_ntxent(self):
        # Anchor with one positive at cos 1 and one negative at cos 0, T = 1.
        emb = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        loss, aux = objectives.ntxent(emb, jnp.array([0, 0, 1]), temperature=1.0)
        # pairs (0,1), (1,0): log(1 + e^-1) each; row 2 has no positive.
        self.assertAlmostEqual(float(loss), math.log1p(math.exp(-1.0)), places=6)
        self.assertEqual(int(aux["num_valid"]), 2)


class PmlTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.torch = pytest.importorskip("torch")
        self.L = pytest.importorskip("pytorch_metric_learning.losses")

    def pml(self, name):
        L, o = self.L, OPTIONS[name]
        return {
            "circle": lambda: L.CircleLoss(m=o["m"], gamma=o["gamma"]),
            "lifted_structure": lambda: L.LiftedStructureLoss(**o),
            "generalized_lifted_structure": lambda: L.GeneralizedLiftedStructureLoss(**o),
            "n_pairs": L.NPairsLoss,
            "ntxent": lambda: L.NTXentLoss(temperature=o["temperature"]),
            "tuplet_margin": lambda: L.TupletMarginLoss(margin=math.degrees(o["margin"]),
                                                        scale=o["scale"]),
            "fast_ap": lambda: L.FastAPLoss(num_bins=o["num_bins"]),
            "histogram": lambda: L.HistogramLoss(n_bins=o["num_bins"]),
        }[name]()

    @parameterized.parameters(*(n for n in NAMES if n != "smooth_ap"))
    def test_equals_pml(self, name):
        torch = self.torch
        emb, (loss, _, grad) = case(name)
        emb_t = torch.tensor(emb, requires_grad=True)
        loss_t = self.pml(name)(emb_t, torch.tensor(LABELS))
        loss_t.backward()
        tol = 1e-6 if name == "histogram" else 1e-9   # PML bins in float32
        self.assertAlmostEqual(loss, loss_t.item(), delta=tol)
        np.testing.assert_allclose(grad, emb_t.grad.numpy(), atol=tol)

    def test_smooth_ap_equals_pml_when_classes_equal_class_size(self):
        torch = self.torch
        labels = np.repeat(np.arange(4), 4)     # PML: contiguous classes, P == K
        emb = np.random.default_rng(44).normal(size=(16, D))
        with jax.enable_x64(True):
            loss, _, grad = ours("smooth_ap", emb, labels, temperature=0.1, include_self=True)
        emb_t = torch.tensor(emb, requires_grad=True)
        loss_t = self.L.SmoothAPLoss(temperature=0.1)(emb_t, torch.tensor(labels))
        loss_t.backward()
        self.assertAlmostEqual(loss, loss_t.item(), delta=1e-6)  # PML's mask is float32
        np.testing.assert_allclose(grad, emb_t.grad.numpy(), atol=1e-6)


class PropertyTest(parameterized.TestCase):

    @parameterized.parameters(*NAMES)
    def test_one_trace_finite_and_zero_when_nothing_valid(self, name):
        fn = objectives.get(name, **OPTIONS[name])
        step = jax.value_and_grad(lambda e, y: fn(e, y), has_aux=True)
        chex.clear_trace_counter()
        jitted = jax.jit(chex.assert_max_traces(lambda e, y: step(e, y), n=1))
        rng = np.random.default_rng(50)
        emb = rng.normal(size=(B, D)).astype(np.float32)
        for labels in (LABELS, np.roll(LABELS, 5), np.repeat(np.arange(6), 2)):
            (loss, _), grad = jitted(jnp.asarray(emb), jnp.asarray(labels))
            self.assertTrue(np.isfinite(float(loss)) and np.all(np.isfinite(grad)))
        with self.subTest("duplicates and zeros"):
            dup = np.tile(emb[:1], (B, 1))
            dup[:3] = 0.0
            dup[3] = -dup[4]                        # antipodal pair: cos = -1
            (loss, _), grad = jitted(jnp.asarray(dup), jnp.asarray(LABELS))
            self.assertTrue(np.isfinite(float(loss)))
            self.assertTrue(np.all(np.isfinite(grad)))
        if name == "generalized_lifted_structure":
            return   # pushes negatives even without positives: see the single-row test
        with self.subTest("nothing valid"):
            # Every row its own class: no positive pair anywhere.
            (loss, aux), grad = jitted(jnp.asarray(emb), jnp.asarray(np.arange(B)))
            self.assertEqual(float(loss), 0.0)
            self.assertEqual(int(aux["num_valid"]), 0)
            np.testing.assert_array_equal(grad, 0.0)

    def test_generalized_lifted_single_row_is_zero(self):
        loss, _ = objectives.generalized_lifted_structure(jnp.ones((1, D)), jnp.array([0]))
        self.assertEqual(float(loss), 0.0)
        g = jax.grad(lambda e: objectives.generalized_lifted_structure(e, jnp.array([0]))[0])(
            jnp.ones((1, D)))
        np.testing.assert_array_equal(g, 0.0)

    def test_errors(self):
        emb, labels = jnp.ones((B, D)), jnp.asarray(LABELS)
        with self.assertRaisesRegex(ValueError, "pos_mask"):
            objectives.circle(emb, None, pos_mask=jnp.ones((B, B + 1), bool),
                              neg_mask=jnp.ones((B, B + 1), bool))
        with self.assertRaisesRegex(ValueError, "both"):
            objectives.ntxent(emb, labels, pos_mask=jnp.ones((B, B), bool))
        with self.assertRaisesRegex(TypeError, "bool"):
            objectives.fast_ap(emb, None, pos_mask=jnp.ones((B, B)), neg_mask=jnp.ones((B, B)))
        with self.assertRaisesRegex(ValueError, "labels"):
            objectives.histogram(emb, None)
        with self.assertRaisesRegex(ValueError, "num_bins"):
            objectives.get("fast_ap", num_bins=0)
        with self.assertRaisesRegex(ValueError, "margin"):
            objectives.get("tuplet_margin", margin=5.73)   # degrees, not radians


@pytest.mark.slow
class MemoryAndMasksSlowTest(parameterized.TestCase):

    @parameterized.parameters("ntxent", "tuplet_margin", "generalized_lifted_structure",
                              "fast_ap")
    def test_memory_rows_join_the_candidates(self, name):
        check_memory(self, name)

    @parameterized.parameters("circle", "tuplet_margin", "generalized_lifted_structure",
                              "smooth_ap")
    def test_custom_relevance_masks(self, name):
        check_masks(self, name)


@pytest.mark.slow
class CheckGradsTest(parameterized.TestCase):

    # Not circle: its weights alpha_p, alpha_n are detached (paper code, PML), so by design
    # its gradient is not the derivative of its value; ReferenceTest checks it against finite
    # differences of the reference with alpha frozen.
    @parameterized.parameters(*(n for n in NAMES if n != "circle"))
    def test_check_grads(self, name):
        fn = objectives.get(name, **OPTIONS[name])
        labels = jnp.asarray(LABELS[:8])
        with jax.enable_x64(True):
            emb = jnp.asarray(np.random.default_rng(60).normal(size=(8, D)))
            check_grads(lambda e: fn(e, labels)[0], (emb,), order=1, modes=("rev",),
                        atol=1e-5, rtol=1e-5)


def check_pmap(test, name, local=2):
    if jax.local_device_count() < NUM_DEVICES:
        test.skipTest("needs 8 devices (tests/conftest.py)")
    rng = np.random.default_rng(70)
    labels = np.repeat(np.arange(NUM_DEVICES * local // 2), 2)   # whole classes per device
    emb = jnp.asarray(rng.normal(size=(NUM_DEVICES * local, D)), jnp.float32)
    single = objectives.get(name, **OPTIONS[name])
    multi = objectives.get(name, axis_name="d", **OPTIONS[name])
    want, want_g = jax.value_and_grad(lambda e: single(e, jnp.asarray(labels))[0])(emb)
    got, got_g = jax.pmap(jax.value_and_grad(lambda e, y: multi(e, y)[0]), axis_name="d")(
        emb.reshape(NUM_DEVICES, local, D), jnp.asarray(labels).reshape(NUM_DEVICES, local))
    np.testing.assert_allclose(np.sum(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_g).reshape(emb.shape), want_g, rtol=1e-4,
                               atol=1e-6)


class CrossDeviceTest(parameterized.TestCase):

    @parameterized.parameters(("histogram",))  # lifted_structure: CrossDeviceSlowTest
    def test_pmap_equals_single_device(self, name):
        check_pmap(self, name)


@pytest.mark.slow
class CrossDeviceSlowTest(parameterized.TestCase):

    @parameterized.parameters("circle", "lifted_structure", "generalized_lifted_structure", "n_pairs", "ntxent",
                              "tuplet_margin", "fast_ap", "smooth_ap")
    def test_pmap_equals_single_device(self, name):
        check_pmap(self, name)


if __name__ == "__main__":
    absltest.main()
