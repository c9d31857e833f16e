"""Custom relevance (``pos_mask`` / ``neg_mask``) for the triplet and pair objectives and the
per-anchor miners of ``hnm.miners``.

* Masks derived from the labels give the labels' result: loss, every aux value and the
  gradient (float32, 1e-6; the labels path streams, the masks path is dense, so the values
  agree to rounding, and the mined indices are the same).
* A multi-label case (rows relevant to more than one class, pairs that are neither) against
  brute-force float64 NumPy loops written from each objective's definition, for
  ``batch_hard``, ``ephn``, ``sct``, ``contrastive`` and ``multi_similarity``: loss to 1e-9,
  gradient to 1e-6 against central finite differences of the reference.
* 8 pmapped devices with ``axis_name`` and global masks: the psum of the losses and of the
  gradients equals one device on the concatenated batch (slow).
* Bad masks: wrong shape, wrong dtype, one mask alone, masks together with labels.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _reference_utils import fd_grad, np_normalize
from hnm import miners
from hnm import objectives

B, D = 8, 4
LABELS = np.array([0, 1, 2, 3, 0, 1, 2, 3])
OLD = ("ephn", "epshn", "sct", "batch_hard", "semihard", "batch_all", "contrastive",
       "multi_similarity", "supcon", "distance_weighted")
OPTIONS = {"sct": dict(hard_threshold=0.5), "batch_hard": dict(margin=0.5),
           "semihard": dict(margin=0.5), "batch_all": dict(margin=0.5),
           "contrastive": dict(neg_margin=1.2)}
KEY = jax.random.key(0)


def masks_from_labels(labels, ref_labels, offset=0):
    pos = labels[:, None] == ref_labels[None, :]
    pos &= (np.arange(len(labels))[:, None] + offset) != np.arange(len(ref_labels))[None, :]
    return pos, labels[:, None] != ref_labels[None, :]


def multi_label_masks():
    """Rows 0 and 1 are also relevant to each other; rows 2 and 6 (same class) are neither
    relevant nor irrelevant; row 3's own column is set in pos_mask (must be ignored)."""
    pos, neg = masks_from_labels(LABELS, LABELS)
    pos[0, 1] = pos[1, 0] = True
    neg[0, 1] = neg[1, 0] = False
    pos[2, 6] = pos[6, 2] = False
    pos[3, 3] = True
    return pos, neg


def emb_of(seed):
    return np.random.default_rng(seed).normal(size=(B, D))


@functools.lru_cache(maxsize=None)
def _value_and_grad(name):
    fn = objectives.get(name, **OPTIONS.get(name, {}))

    def f(e, labels, pos, neg):
        return fn(e, labels, KEY, pos_mask=pos, neg_mask=neg)
    return jax.jit(jax.value_and_grad(f, has_aux=True))


def run(name, emb, labels=None, pos=None, neg=None):
    (loss, aux), grad = _value_and_grad(name)(
        jnp.asarray(emb), None if labels is None else jnp.asarray(labels),
        None if pos is None else jnp.asarray(pos), None if neg is None else jnp.asarray(neg))
    return float(loss), {k: float(v) for k, v in aux.items()}, np.asarray(grad)


# ------------------------------------------------------------------ masks == labels
@pytest.mark.slow   # two compiles of loss + gradient each: 1-7 s per objective on 2 cores
@pytest.mark.parametrize("name", OLD)
def test_masks_from_labels_equal_labels(name):
    emb = emb_of(OLD.index(name)).astype(np.float32)
    loss, aux, grad = run(name, emb, LABELS)
    pos, neg = masks_from_labels(LABELS, LABELS)
    m_loss, m_aux, m_grad = run(name, emb, None, pos, neg)
    assert aux["num_valid"] > 0
    np.testing.assert_allclose(m_loss, loss, rtol=1e-6, atol=1e-7)
    assert sorted(m_aux) == sorted(aux)
    for k in aux:
        np.testing.assert_allclose(m_aux[k], aux[k], rtol=1e-6, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(m_grad, grad, rtol=1e-5, atol=1e-6)


@pytest.mark.slow   # six miners run eagerly (their while loops): ~5 s
def test_per_anchor_miners_with_masks_equal_labels():
    sim = jnp.asarray(np.random.default_rng(3).normal(size=(B, B + 2)))
    ref_labels = np.concatenate([LABELS, [0, 5]])
    pos, neg = masks_from_labels(LABELS, ref_labels)
    for miner in (miners.mine_hardest, miners.mine_easy_positive_hard_negative,
                  miners.mine_easy_positive_semihard_negative, miners.mine_semihard):
        a = miner(sim, jnp.asarray(LABELS), jnp.asarray(ref_labels))
        b = miner(sim, pos_mask=jnp.asarray(pos), neg_mask=jnp.asarray(neg))
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.where(a.valid, x, 0), np.where(b.valid, y, 0))
    a = miners.mine_multi_similarity(sim, jnp.asarray(LABELS), jnp.asarray(ref_labels))
    b = miners.mine_multi_similarity(sim, pos_mask=jnp.asarray(pos), neg_mask=jnp.asarray(neg))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    dist = jnp.abs(sim)
    a = miners.mine_distance_weighted(KEY, dist, jnp.asarray(LABELS), jnp.asarray(ref_labels),
                                      dim=D)
    b = miners.mine_distance_weighted(KEY, dist, dim=D, pos_mask=jnp.asarray(pos),
                                      neg_mask=jnp.asarray(neg))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_miner_multi_label_masks():
    """Hardest positive over the custom positives; the self column is never a positive."""
    sim = np.random.default_rng(4).normal(size=(B, B))
    pos, neg = multi_label_masks()
    t = miners.mine_hardest(jnp.asarray(sim), pos_mask=jnp.asarray(pos),
                            neg_mask=jnp.asarray(neg))
    np.fill_diagonal(pos, False)
    assert not t.valid[2] and not t.valid[6]   # their only positive was removed
    for a in (0, 1, 3, 4, 5, 7):
        assert t.valid[a]
        assert int(t.positive[a]) == np.flatnonzero(pos[a])[np.argmin(sim[a, pos[a]])]
        assert int(t.negative[a]) == np.flatnonzero(neg[a])[np.argmax(sim[a, neg[a]])]


# ------------------------------------------------------------------ multi-label references
def _relevant(pos, neg):
    pos = pos.copy()
    np.fill_diagonal(pos, False)
    return pos, neg & ~pos


def ref_batch_hard(emb, pos, neg, margin):
    x = np_normalize(emb)
    pos, neg = _relevant(pos, neg)
    total, n = 0.0, 0
    for a in range(len(x)):
        if not pos[a].any() or not neg[a].any():
            continue
        d = np.linalg.norm(x[a] - x, axis=1)
        total += max(0.0, d[pos[a]].max() - d[neg[a]].min() + margin)
        n += 1
    return total / max(n, 1)


def ref_ephn_sct(emb, pos, neg, temperature=0.1, sct=False, hard_threshold=0.8):
    """EPHN (mean softplus((s_an - s_ap)/T)) or SCT ('or' rule, joint normalisation)."""
    x = np_normalize(emb)
    pos, neg = _relevant(pos, neg)
    total, n = 0.0, 0
    for a in range(len(x)):
        s = x @ x[a]
        ok = pos[a] & (s <= 0.9999)
        if not ok.any() or not neg[a].any():
            continue
        s_ap, s_an = s[ok].max(), s[neg[a]].max()
        if abs(s_ap) >= 1 or abs(s_an) >= 1:
            continue
        if sct and (s_an > s_ap or s_an > hard_threshold):
            total += s_an
        else:
            total += np.logaddexp(0.0, (s_an - s_ap) / temperature)
        n += 1
    return total / max(n, 1)


def ref_contrastive(emb, pos, neg, pos_margin=0.0, neg_margin=1.2):
    x = np_normalize(emb)
    pos, neg = _relevant(pos, neg)
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    lp = np.maximum(d - pos_margin, 0.0)[pos]
    ln = np.maximum(neg_margin - d, 0.0)[neg]
    return sum(v[v > 0].mean() if (v > 0).any() else 0.0 for v in (lp, ln))


def ref_multi_similarity(emb, pos, neg, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
    x = np_normalize(emb)
    pos, neg = _relevant(pos, neg)
    s = x @ x.T
    total, mined = 0.0, []
    for a in range(len(x)):
        if not pos[a].any() or not neg[a].any():
            mined.append((np.zeros(0), np.zeros(0)))
            continue
        sp = s[a, pos[a]][s[a, pos[a]] - epsilon < s[a, neg[a]].max()]
        sn = s[a, neg[a]][s[a, neg[a]] + epsilon > s[a, pos[a]].min()]
        mined.append((sp, sn))
    if sum(len(p) for p, _ in mined) <= 1 and sum(len(n) for _, n in mined) <= 1:
        return 0.0
    for sp, sn in mined:
        total += np.log1p(np.sum(np.exp(-alpha * (sp - base)))) / alpha
        total += np.log1p(np.sum(np.exp(beta * (sn - base)))) / beta
    return total / len(x)


REFERENCES = {
    "batch_hard": lambda e, p, n: ref_batch_hard(e, p, n, margin=0.5),
    "ephn": ref_ephn_sct,
    "sct": lambda e, p, n: ref_ephn_sct(e, p, n, sct=True, hard_threshold=0.5),
    "contrastive": ref_contrastive,
    "multi_similarity": ref_multi_similarity,
}


@pytest.mark.slow   # one float64 compile of loss + gradient each, and finite differences
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_multi_label_masks_match_reference(name):
    pos, neg = multi_label_masks()
    emb = emb_of(10 + sorted(REFERENCES).index(name))
    with jax.enable_x64(True):
        loss, aux, grad = run(name, emb, None, pos, neg)
    want = REFERENCES[name](emb, pos, neg)
    assert aux["num_valid"] > 0
    np.testing.assert_allclose(loss, want, rtol=0, atol=1e-9)
    want_g = fd_grad(lambda e: REFERENCES[name](e, pos, neg), emb)
    np.testing.assert_allclose(grad, want_g, atol=1e-6)


# ------------------------------------------------------------------ 8 devices
NUM_DEVICES = 8


@pytest.mark.slow   # pmap compiles: a few seconds each
@pytest.mark.parametrize("name", ("batch_hard", "contrastive"))
def test_pmap_global_masks_equal_one_device(name):
    """Each device gets its rows of the global [B, B] masks (against the gathered batch);
    the psum of the shares and of the gradients is the one-device result."""
    assert jax.device_count() >= NUM_DEVICES
    pos, neg = multi_label_masks()
    emb = emb_of(20)
    fn = objectives.get(name, **OPTIONS.get(name, {}))
    with jax.enable_x64(True):
        def one(e):
            return fn(e, None, KEY, pos_mask=jnp.asarray(pos), neg_mask=jnp.asarray(neg))[0]
        want, want_g = jax.value_and_grad(one)(jnp.asarray(emb))
        per = B // NUM_DEVICES

        def shard(x):
            return jnp.asarray(x).reshape(NUM_DEVICES, per, *x.shape[1:])
        pfn = objectives.get(name, axis_name="d", **OPTIONS.get(name, {}))

        def local(e, p, n):
            return pfn(e, None, KEY, pos_mask=p, neg_mask=n)[0]
        loss, grad = jax.pmap(jax.value_and_grad(local), axis_name="d")(
            shard(emb), shard(pos), shard(neg))
    assert float(want) > 0
    np.testing.assert_allclose(np.sum(np.asarray(loss)), float(want), atol=1e-12)
    # Each device's gradient wrt its own rows holds every device's contribution (the
    # gather's transpose sums them), so the rows stack into the one-device gradient.
    np.testing.assert_allclose(np.asarray(grad).reshape(B, D), np.asarray(want_g), atol=1e-12)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("name", ("ephn", "semihard", "contrastive"))
def test_bad_masks_are_rejected(name):
    obj = objectives.get(name)
    emb = jnp.asarray(emb_of(0), jnp.float32)
    pos, neg = (jnp.asarray(m) for m in masks_from_labels(LABELS, LABELS))

    def fn(e, labels, key, **masks):   # trace only (the checks are static): no compile
        return jax.eval_shape(lambda x: obj(x, labels, key, **masks), e)
    with pytest.raises(ValueError, match="shape"):
        fn(emb, None, KEY, pos_mask=pos[:, :-1], neg_mask=neg[:, :-1])
    with pytest.raises(TypeError, match="bool"):
        fn(emb, None, KEY, pos_mask=pos.astype(jnp.int32), neg_mask=neg)
    with pytest.raises(ValueError, match="both"):
        fn(emb, None, KEY, pos_mask=pos)
    with pytest.raises(ValueError, match="not both"):
        fn(emb, jnp.asarray(LABELS), KEY, pos_mask=pos, neg_mask=neg)
    with pytest.raises(ValueError, match="labels"):
        fn(emb, None, KEY)
    fn(emb, None, KEY, pos_mask=pos, neg_mask=neg)   # and the right masks trace


def test_miner_rejects_labels_with_masks():
    sim = jnp.zeros((B, B))
    pos, neg = (jnp.asarray(m) for m in masks_from_labels(LABELS, LABELS))
    with pytest.raises(ValueError, match="not both"):
        miners.mine_hardest(sim, jnp.asarray(LABELS), pos_mask=pos, neg_mask=neg)
    with pytest.raises(ValueError, match="shape"):
        miners.mine_semihard(sim, pos_mask=pos[:2], neg_mask=neg[:2])


# ------------------------------------------------------------------ every objective
# Objectives without custom relevance, and why: n_pairs pairs one positive per class.
NO_MASKS = ("n_pairs",)
PROXY_MASKS = ("arcface", "cosface", "norm_softmax", "proxy_anchor", "proxy_nca",
               "soft_triple", "sub_center_arcface")   # pos_mask [B, C] against the classes
C = 4


def _apply_fn(name):
    from hnm.objectives import proxy
    return proxy.PARAMETRIC[name][1] if objectives.is_parametric(name) else \
        objectives.OBJECTIVES[name]


def test_every_objective_takes_masks_or_is_listed():
    """Signatures only (no compile): who takes ``pos_mask`` / ``neg_mask``."""
    import inspect
    for name in objectives.names():
        params = inspect.signature(_apply_fn(name)).parameters
        if name in NO_MASKS:
            assert "pos_mask" not in params, name
        elif name in PROXY_MASKS:
            assert "pos_mask" in params and "neg_mask" not in params, name
        else:
            assert "pos_mask" in params and "neg_mask" in params, name


@pytest.mark.slow   # 2 compiles per objective (labels, masks), loss only: ~0.5-3 s each
@pytest.mark.parametrize("name", [n for n in objectives.names()
                                  if n not in NO_MASKS + OLD])   # OLD: checked above
def test_every_objective_masks_from_labels_equal_labels(name):
    emb = jnp.asarray(emb_of(30), jnp.float32)
    labels = jnp.asarray(LABELS)
    obj = objectives.get(name)
    if objectives.is_parametric(name):
        params = obj.init(jax.random.key(1), C, D)
        fn = functools.partial(obj.apply, params)
    else:
        fn = obj
    pos, neg = (jnp.asarray(m) for m in masks_from_labels(LABELS, LABELS))
    want, _ = jax.jit(lambda e, y: fn(e, y, KEY))(emb, labels)
    if name in PROXY_MASKS:
        onehot = jnp.arange(C)[None, :] == labels[:, None]
        got, _ = jax.jit(lambda e, p: fn(e, None, KEY, pos_mask=p))(emb, onehot)
    elif name == "margin":   # its labels pick each anchor's beta; masks give relevance
        got, _ = jax.jit(lambda e, y, p, n: fn(e, y, KEY, pos_mask=p, neg_mask=n))(
            emb, labels, pos, neg)
    else:
        got, _ = jax.jit(lambda e, p, n: fn(e, None, KEY, pos_mask=p, neg_mask=n))(
            emb, pos, neg)
    assert np.isfinite(float(want))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-6)


def test_norm_softmax_multi_hot_mask_matches_reference():
    """A multi-hot row: -log of the softmax probability of any of its classes (ProxyNCA's
    rule); a row without positives counts for nothing."""
    rng = np.random.default_rng(31)
    emb, w = rng.normal(size=(B, D)), rng.normal(size=(C, D))
    mask = np.arange(C)[None, :] == (LABELS % C)[:, None]
    mask[0, 2] = True        # row 0: classes 0 and 2
    mask[5] = False          # row 5: none
    t = 0.5
    with jax.enable_x64(True):
        loss, aux = jax.jit(lambda e, p, m: objectives.proxy.norm_softmax(
            {"proxies": p}, e, pos_mask=m, temperature=t))(
                jnp.asarray(emb), jnp.asarray(w), jnp.asarray(mask))
    z = np_normalize(emb) @ np_normalize(w).T / t
    rows = [i for i in range(B) if mask[i].any()]
    want = np.mean([np.log(np.exp(z[i]).sum()) - np.log(np.exp(z[i][mask[i]]).sum())
                    for i in rows])
    np.testing.assert_allclose(float(loss), want, rtol=0, atol=1e-12)
    assert int(aux["num_valid"]) == len(rows)
