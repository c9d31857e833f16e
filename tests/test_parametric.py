"""Tests of the parametric objectives (hnm.objectives.proxy).

Each loss is checked against a float64 NumPy reference written from its paper (explicit loops
over rows, proxies and triplets; never calling hnm): the loss to 1e-9 and the gradients with
respect to the embeddings and the parameters to 1e-6 (central finite differences of the
reference, h = 1e-6). Where pytorch-metric-learning 2.9 has the loss, loss and both gradients
must equal PML's on the same inputs and parameters to 1e-9 (float64; skipped without torch).
Then: check_grads, finite gradients for duplicate and zero embeddings, zero loss and zero
gradient when no row is valid, one trace per shape, and 8 pmapped devices equal one device
on the concatenated batch (loss and gradients psum-ed, float32 to 1e-5).
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

from _reference_utils import fd_grad, np_cos, np_logsumexp, np_normalize
from hnm.objectives import proxy

B, D, C, K = 12, 5, 4, 3
NUM_DEVICES = 8
LABELS = np.array([0, 1, 2, 3, 0, 1, 2, 0, 1, 3, 3, 0])
PROXY_NAMES = ("proxy_nca", "proxy_anchor", "norm_softmax", "arcface", "cosface",
               "sub_center_arcface", "soft_triple", "margin")
# Options other than the defaults, so that each test exercises a real choice.
OPTIONS = {
    "proxy_nca": dict(temperature=1 / 3),
    "proxy_anchor": dict(alpha=16.0, margin=0.1),
    "norm_softmax": dict(temperature=0.1),
    "arcface": dict(margin=0.5, scale=16.0),
    "cosface": dict(margin=0.35, scale=16.0),
    "sub_center_arcface": dict(margin=0.4, scale=16.0, sub_centers=K),
    "soft_triple": dict(centers_per_class=K, la=20.0, gamma=0.1, margin=0.01, tau=0.2),
    "margin": dict(margin=0.2, nu=0.1),
}


def param_key(name):
    return "beta" if name == "margin" else "proxies"


def make_params(name, rng, num_classes=C, dim=D):
    if name == "margin":
        return {"beta": rng.uniform(0.8, 1.4, num_classes)}
    rows = num_classes * K if name in ("sub_center_arcface", "soft_triple") else num_classes
    return {"proxies": rng.normal(size=(rows, dim))}


# ------------------------------------------------------------------ NumPy references
def _ce(logits, target):
    return np_logsumexp(logits) - logits[target]


def ref_proxy_nca(x, y, w, temperature):
    """ProxyNCA++ (Teh et al. Eq. 4): softmax over -||x^ - p^||^2 / T, positive included."""
    x, w = np_normalize(x), np_normalize(w)
    total = 0.0
    for i in range(len(x)):
        logits = [-np.sum((x[i] - w[c]) ** 2) / temperature for c in range(len(w))]
        total += _ce(logits, y[i])
    return total / len(x)


def ref_proxy_anchor(x, y, w, alpha, margin):
    """Kim et al. 2020, Eq. 4."""
    pos_sum, neg_sum, with_pos = 0.0, 0.0, 0
    for c in range(len(w)):
        pos = [np_cos(x[i], w[c]) for i in range(len(x)) if y[i] == c]
        neg = [np_cos(x[i], w[c]) for i in range(len(x)) if y[i] != c]
        if pos:
            with_pos += 1
            pos_sum += math.log(1 + sum(math.exp(-alpha * (s - margin)) for s in pos))
        neg_sum += math.log(1 + sum(math.exp(alpha * (s + margin)) for s in neg))
    return pos_sum / with_pos + neg_sum / len(w)


def ref_norm_softmax(x, y, w, temperature):
    """Zhai & Wu 2019: cross-entropy on cos / T."""
    return np.mean([_ce([np_cos(x[i], w[c]) / temperature for c in range(len(w))], y[i])
                    for i in range(len(x))])


def _arc(theta, m):
    return math.cos(theta + m) if theta <= math.pi - m else math.cos(theta) - m * math.sin(m)


def ref_arcface(x, y, w, margin, scale, sub_centers=1):
    """ArcFace (Deng et al. 2019, Eq. 3) with its monotone extension; sub-center ArcFace
    (Deng et al. 2020) takes the max cosine over each class's sub-centres (class-major)."""
    total = 0.0
    num_classes = len(w) // sub_centers
    for i in range(len(x)):
        cos = [max(np_cos(x[i], w[c * sub_centers + k]) for k in range(sub_centers))
               for c in range(num_classes)]
        logits = [scale * (_arc(math.acos(min(max(cos[c], -1), 1)), margin) if c == y[i]
                           else cos[c]) for c in range(num_classes)]
        total += _ce(logits, y[i])
    return total / len(x)


def ref_cosface(x, y, w, margin, scale):
    """CosFace (Wang et al. 2018, Eq. 4)."""
    return np.mean([_ce([scale * (np_cos(x[i], w[c]) - (margin if c == y[i] else 0.0))
                         for c in range(len(w))], y[i]) for i in range(len(x))])


def ref_soft_triple(x, y, w, centers_per_class, la, gamma, margin, tau):
    """SoftTriple (Qian et al. 2019, Eqs. 8-11), regulariser of the official code."""
    k = centers_per_class
    num_classes = len(w) // k
    total = 0.0
    for i in range(len(x)):
        logits = []
        for c in range(num_classes):
            s = [np_cos(x[i], w[c * k + j]) for j in range(k)]
            e = [math.exp(v / gamma) for v in s]
            s_c = sum(ei * si for ei, si in zip(e, s)) / sum(e)
            logits.append(la * (s_c - (margin if c == y[i] else 0.0)))
        total += _ce(logits, y[i])
    reg = 0.0
    for c in range(num_classes):
        for a in range(k):
            for b in range(a + 1, k):
                reg += math.sqrt(2 + 1e-5 - 2 * np_cos(w[c * k + a], w[c * k + b]))
    return total / len(x) + tau * reg / (num_classes * k * (k - 1))


def ref_margin(x, y, beta, margin, nu):
    """Wu et al. 2017 Eq. 7 over all triplets, divided by the non-zero terms (their code)."""
    x = np_normalize(x)
    total, count = 0.0, 0
    for a in range(len(x)):
        for p in range(len(x)):
            if p == a or y[p] != y[a]:
                continue
            for n in range(len(x)):
                if y[n] == y[a]:
                    continue
                b = beta[y[a]]
                pos = max(np.linalg.norm(x[a] - x[p]) - b + margin, 0.0)
                neg = max(b - np.linalg.norm(x[a] - x[n]) + margin, 0.0)
                total += pos + neg + nu * b
                count += int(pos > 0) + int(neg > 0)   # np.bool_ + np.bool_ is an "or"
    return total / count if count else 0.0


def reference(name, x, y, params, **o):
    w = params[param_key(name)]
    if name == "proxy_nca":
        return ref_proxy_nca(x, y, w, o["temperature"])
    if name == "proxy_anchor":
        return ref_proxy_anchor(x, y, w, o["alpha"], o["margin"])
    if name == "norm_softmax":
        return ref_norm_softmax(x, y, w, o["temperature"])
    if name == "arcface":
        return ref_arcface(x, y, w, o["margin"], o["scale"])
    if name == "sub_center_arcface":
        return ref_arcface(x, y, w, o["margin"], o["scale"], o["sub_centers"])
    if name == "cosface":
        return ref_cosface(x, y, w, o["margin"], o["scale"])
    if name == "soft_triple":
        return ref_soft_triple(x, y, w, **o)
    return ref_margin(x, y, w, o["margin"], o["nu"])


def ours(name, params, emb, labels, **opts):
    """(loss, aux, grad_params, grad_emb) in float64."""
    obj = proxy.bind(name, **opts)

    def f(p, e):
        return obj.apply(p, e, jnp.asarray(labels, jnp.int32))

    (loss, aux), (g_p, g_e) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), params),
        jnp.asarray(emb, jnp.float64))
    return float(loss), aux, np.asarray(g_p[param_key(name)]), np.asarray(g_e)


@functools.lru_cache(maxsize=None)
def case(name, tau_off=False):
    """(emb, params, opts, ours(...)) of one seeded case, shared by the reference and the
    PML test (one compilation for both)."""
    rng = np.random.default_rng(PROXY_NAMES.index(name))
    emb, params = rng.normal(size=(B, D)), make_params(name, rng)
    opts = dict(OPTIONS[name], **({"tau": 0.0} if tau_off else {}))
    with jax.enable_x64(True):
        return emb, params, opts, ours(name, params, emb, LABELS, **opts)


class ReferenceTest(parameterized.TestCase):

    @parameterized.parameters(*PROXY_NAMES)
    def test_loss_and_gradients_match_reference(self, name):
        emb, params, opts, (loss, aux, g_p, g_e) = case(name)
        self.assertAlmostEqual(loss, reference(name, emb, LABELS, params, **opts), places=9)
        self.assertAlmostEqual(float(aux["loss"]), loss, places=9)
        want_e = fd_grad(lambda e: reference(name, e, LABELS, params, **opts), emb)
        np.testing.assert_allclose(g_e, want_e, atol=1e-6)
        key = param_key(name)
        want_p = fd_grad(lambda w: reference(name, emb, LABELS, {key: w}, **opts),
                         params[key])
        np.testing.assert_allclose(g_p, want_p, atol=1e-6)

    def test_hand_case_cosface(self):
        # Two orthogonal proxies, the row on its own proxy: logits s(1 - m) and 0.
        loss, _ = proxy.cosface({"proxies": jnp.eye(2)}, jnp.array([[2.0, 0.0]]),
                                jnp.array([0]), margin=0.25, scale=4.0)
        self.assertAlmostEqual(float(loss), math.log(1 + math.exp(-3.0)), places=6)

    def test_hand_case_arcface_uses_the_angle(self):
        # Row at 60 degrees from its proxy, 30 from the other; m = 30 degrees: 90 vs 30.
        x = jnp.array([[math.cos(math.pi / 3), math.sin(math.pi / 3)]])
        w = jnp.array([[1.0, 0.0], [math.cos(math.pi / 2.4), math.sin(math.pi / 2.4)]])
        loss, _ = proxy.arcface({"proxies": w}, x, jnp.array([0]), margin=math.pi / 6,
                                scale=1.0)
        other = math.cos(math.pi / 3 - math.pi / 2.4)
        self.assertAlmostEqual(float(loss), math.log(1 + math.exp(other - 0.0)), places=5)

    def test_proxy_nca_multi_label_mask(self):
        rng = np.random.default_rng(5)
        emb, w = rng.normal(size=(B, D)), rng.normal(size=(C, D))
        mask = np.zeros((B, C), bool)
        mask[np.arange(B), LABELS] = True
        mask[0, 1] = True      # row 0 has two positive proxies
        with jax.enable_x64(True):
            loss, aux = proxy.proxy_nca({"proxies": jnp.asarray(w)}, jnp.asarray(emb),
                                        pos_mask=jnp.asarray(mask))
        x, p = np_normalize(emb), np_normalize(w)
        want = 0.0
        for i in range(B):
            logits = [-np.sum((x[i] - p[c]) ** 2) for c in range(C)]
            want += np_logsumexp(logits) - np_logsumexp([logits[c] for c in range(C)
                                                         if mask[i, c]])
        self.assertAlmostEqual(float(loss), want / B, places=9)
        self.assertEqual(int(aux["num_valid"]), B)

    def test_proxy_anchor_multi_label_mask_equals_labels_when_one_hot(self):
        rng = np.random.default_rng(6)
        emb, w = rng.normal(size=(B, D)), rng.normal(size=(C, D))
        params = {"proxies": jnp.asarray(w)}
        mask = jnp.asarray(np.arange(C)[None, :] == LABELS[:, None])
        a, _ = proxy.proxy_anchor(params, jnp.asarray(emb), jnp.asarray(LABELS))
        b, _ = proxy.proxy_anchor(params, jnp.asarray(emb), pos_mask=mask)
        self.assertAlmostEqual(float(a), float(b), places=5)


class PmlTest(parameterized.TestCase):
    """Equality with pytorch-metric-learning 2.9 (float64, same inputs and parameters)."""

    def setUp(self):
        super().setUp()
        self.torch = __import__("pytest").importorskip("torch")
        self.pml = __import__("pytest").importorskip("pytorch_metric_learning.losses")

    def pml_loss(self, name, params):
        torch, L = self.torch, self.pml
        o = OPTIONS[name]
        if name == "proxy_nca":
            m, attr = L.ProxyNCALoss(C, D, softmax_scale=1 / o["temperature"]), "proxies"
        elif name == "proxy_anchor":
            m, attr = L.ProxyAnchorLoss(C, D, margin=o["margin"], alpha=o["alpha"]), "proxies"
        elif name == "norm_softmax":
            m, attr = L.NormalizedSoftmaxLoss(C, D, temperature=o["temperature"]), "W"
        elif name == "arcface":
            m, attr = L.ArcFaceLoss(C, D, margin=math.degrees(o["margin"]),
                                    scale=o["scale"]), "W"
        elif name == "cosface":
            m, attr = L.CosFaceLoss(C, D, margin=o["margin"], scale=o["scale"]), "W"
        elif name == "sub_center_arcface":
            m, attr = L.SubCenterArcFaceLoss(num_classes=C, embedding_size=D,
                                             margin=math.degrees(o["margin"]),
                                             scale=o["scale"], sub_centers=K), "W"
        elif name == "soft_triple":
            m, attr = L.SoftTripleLoss(C, D, centers_per_class=K, la=o["la"],
                                       gamma=o["gamma"], margin=o["margin"]), "fc"
        else:
            m = L.MarginLoss(margin=o["margin"], nu=o["nu"], learn_beta=True, num_classes=C)
            attr = "beta"
        m = m.double()
        value = params[param_key(name)]
        # PML stores class weights as [D, C] (``W``, ``fc``); hnm as [C, D] rows.
        getattr(m, attr).data = torch.tensor(value.T.copy() if attr in ("W", "fc") else value)
        return m, attr

    @parameterized.parameters(*PROXY_NAMES)
    def test_equals_pml(self, name):
        torch = self.torch
        # PML has no SoftTriple centre regulariser: tau = 0 there.
        emb, params, _, (loss, _, g_p, g_e) = case(name, tau_off=name == "soft_triple")
        module, attr = self.pml_loss(name, params)
        emb_t = torch.tensor(emb, requires_grad=True)
        loss_t = module(emb_t, torch.tensor(LABELS))
        loss_t.backward()
        g_pml = getattr(module, attr).grad.numpy()
        g_pml = g_pml.T if attr in ("W", "fc") else g_pml
        self.assertAlmostEqual(loss, loss_t.item(), places=9)
        np.testing.assert_allclose(g_e, emb_t.grad.numpy(), atol=1e-9)
        np.testing.assert_allclose(g_p, g_pml, atol=1e-9)


class PropertyTest(parameterized.TestCase):

    @parameterized.parameters(*PROXY_NAMES)
    def test_one_trace_finite_and_zero_when_nothing_valid(self, name):
        """One jitted gradient, traced once, fed batches of one shape: label patterns,
        duplicate and zero embeddings (finite gradients), and nothing valid (exact zeros)."""
        rng = np.random.default_rng(21)
        params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), make_params(name, rng))
        # SoftTriple's centre regulariser depends on the proxies only: off, so that "nothing
        # valid" means a zero loss.
        opts = dict(OPTIONS[name], **({"tau": 0.0} if name == "soft_triple" else {}))
        obj = proxy.bind(name, **opts)
        grad = jax.value_and_grad(lambda p, e, y: obj.apply(p, e, y), argnums=(0, 1),
                                  has_aux=True)
        chex.clear_trace_counter()
        step = jax.jit(chex.assert_max_traces(lambda p, e, y: grad(p, e, y), n=1))
        emb = rng.normal(size=(B, D)).astype(np.float32)
        for labels in (LABELS, np.roll(LABELS, 3), np.zeros(B, int)):
            step(params, jnp.asarray(emb), jnp.asarray(labels, jnp.int32))
        with self.subTest("duplicates and zeros"):
            dup = np.tile(emb[:1], (B, 1))
            dup[:3] = 0.0
            if name != "margin":   # a row exactly on its own proxy (cos = 1)
                per = K if name in ("sub_center_arcface", "soft_triple") else 1
                dup[5] = np.asarray(params["proxies"][int(LABELS[5]) * per])
            _, g = step(params, jnp.asarray(dup), jnp.asarray(LABELS, jnp.int32))
            for leaf in jax.tree.leaves(g):
                self.assertTrue(np.all(np.isfinite(leaf)))
        with self.subTest("nothing valid"):
            # margin: no class has two rows (labels past C index no beta either); proxy
            # losses: no label in [0, C).
            labels = np.arange(B) if name == "margin" else np.full(B, -1)
            (loss, aux), g = step(params, jnp.asarray(emb), jnp.asarray(labels, jnp.int32))
            self.assertEqual(float(loss), 0.0)
            self.assertEqual(int(aux["num_valid"]), 0)
            for leaf in jax.tree.leaves(g):
                np.testing.assert_array_equal(leaf, 0.0)

    def test_init_layout(self):
        key = jax.random.key(0)
        for name in PROXY_NAMES:
            with self.subTest(name):
                params = proxy.bind(name, **OPTIONS[name]).init(key, C, D)
                if name == "margin":
                    self.assertEqual(params["beta"].shape, (C,))
                    np.testing.assert_allclose(params["beta"], 1.2)
                    continue
                rows = C * K if name in ("sub_center_arcface", "soft_triple") else C
                self.assertEqual(params["proxies"].shape, (rows, D))
                np.testing.assert_allclose(np.linalg.norm(params["proxies"], axis=1), 1.0,
                                           rtol=1e-5)

    def test_sub_centre_order_is_class_major(self):
        # Put class 1's second sub-centre on the row: the loss then only sees class 1 close.
        w = np.tile(np.array([[0.0, 1.0]]), (2 * K, 1))
        w[1 * K + 1] = [1.0, 0.0]
        loss_right, _ = proxy.sub_center_arcface({"proxies": jnp.asarray(w)},
                                                 jnp.array([[1.0, 0.0]]), jnp.array([1]),
                                                 sub_centers=K, margin=0.0, scale=8.0)
        loss_wrong, _ = proxy.sub_center_arcface({"proxies": jnp.asarray(w)},
                                                 jnp.array([[1.0, 0.0]]), jnp.array([0]),
                                                 sub_centers=K, margin=0.0, scale=8.0)
        self.assertAlmostEqual(float(loss_right), math.log(1 + math.exp(-8.0)), places=5)
        self.assertAlmostEqual(float(loss_wrong), math.log(1 + math.exp(8.0)), places=4)

    def test_errors(self):
        params = {"proxies": jnp.ones((C, D))}
        emb, labels = jnp.ones((B, D)), jnp.asarray(LABELS)
        with self.assertRaisesRegex(ValueError, "memory"):
            proxy.norm_softmax(params, emb, labels, memory=object())
        with self.assertRaisesRegex(ValueError, "dimension"):
            proxy.arcface({"proxies": jnp.ones((C, D + 1))}, emb, labels)
        with self.assertRaisesRegex(ValueError, "radians"):
            proxy.arcface(params, emb, labels, margin=28.6)
        with self.assertRaisesRegex(ValueError, "proxies"):
            proxy.cosface({"W": jnp.ones((C, D))}, emb, labels)
        with self.assertRaisesRegex(ValueError, "multiple"):
            proxy.soft_triple(params, emb, labels, centers_per_class=3)
        with self.assertRaisesRegex(ValueError, "unknown option"):
            proxy.bind("arcface", alpha=1.0)
        with self.assertRaisesRegex(ValueError, "num_classes"):
            proxy.bind("arcface").init(jax.random.key(0), 0, D)
        with self.assertRaisesRegex(ValueError, "temperature"):
            proxy.proxy_nca(params, emb, labels, temperature=0.0)


@pytest.mark.slow
class CheckGradsTest(parameterized.TestCase):

    @parameterized.parameters(*PROXY_NAMES)
    def test_check_grads(self, name):
        rng = np.random.default_rng(20)
        with jax.enable_x64(True):
            params = jax.tree.map(jnp.asarray, make_params(name, rng))
            obj = proxy.bind(name, **OPTIONS[name])
            labels = jnp.asarray(LABELS[:6])

            def f(p, e):
                return obj.apply(p, e, labels)[0]
            check_grads(f, (params, jnp.asarray(rng.normal(size=(6, D)))), order=1,
                        modes=("rev",), atol=1e-5, rtol=1e-5)


class CrossDeviceTest(parameterized.TestCase):
    """psum over 8 pmapped devices of loss and gradients == one device, concatenated batch."""

    @parameterized.parameters(("margin",))  # proxy_anchor: tests/test_parallel.py (slow run)
    def test_pmap_equals_single_device(self, name):
        self.check_pmap(name)

    def check_pmap(self, name):
        if jax.local_device_count() < NUM_DEVICES:
            self.skipTest("needs 8 devices (tests/conftest.py)")
        rng = np.random.default_rng(30)
        local = 3
        labels = np.repeat(np.arange(C), 6)[: NUM_DEVICES * local]
        rng.shuffle(labels)
        emb = jnp.asarray(rng.normal(size=(NUM_DEVICES * local, D)), jnp.float32)
        params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), make_params(name, rng))
        obj = proxy.bind(name, **OPTIONS[name])

        def loss_fn(p, e, y, axis_name=None):
            return obj.apply(p, e, y, axis_name=axis_name)[0]

        want, (want_p, want_e) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
            params, emb, jnp.asarray(labels))
        shard = lambda x: x.reshape(NUM_DEVICES, local, *x.shape[1:])  # noqa: E731
        got, (got_p, got_e) = jax.pmap(
            jax.value_and_grad(lambda p, e, y: loss_fn(p, e, y, "d"), argnums=(0, 1)),
            axis_name="d", in_axes=(None, 0, 0))(params, shard(emb), shard(jnp.asarray(labels)))
        np.testing.assert_allclose(np.sum(got), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(got_e).reshape(emb.shape), want_e, rtol=1e-4,
                                   atol=1e-6)
        for g, w in zip(jax.tree.leaves(got_p), jax.tree.leaves(want_p)):
            np.testing.assert_allclose(np.sum(g, axis=0), w, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
class CrossDeviceSlowTest(parameterized.TestCase):

    @parameterized.parameters("proxy_nca", "norm_softmax", "arcface", "cosface",
                              "sub_center_arcface", "soft_triple")
    def test_pmap_equals_single_device(self, name):
        CrossDeviceTest.check_pmap(self, name)


if __name__ == "__main__":
    absltest.main()
