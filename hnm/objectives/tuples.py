r"""Pair- and tuple-based objectives: circle, lifted structure (and its generalisation),
N-pairs, NT-Xent (InfoNCE), tuplet margin.

Signature of every objective here (as the other parameter-free objectives)::

    loss, aux = objective(embeddings [B, D], labels [B] | None, key=None, *, axis_name=None,
                          memory=None, pos_mask=None, neg_mask=None, **options)

* ``axis_name``: the anchors are this device's rows, the candidates every device's rows
  (``all_gather``) followed by the cross-batch ``memory`` rows (stopped); every count in a
  denominator is global, so the returned loss is this device's share (local sum / global
  count) and the ``psum`` of losses and gradients equals one device on the concatenated
  batch.
* ``pos_mask`` / ``neg_mask``: explicit relevance (bool [B, M], M the reference rows) instead
  of label equality, for multi-label data and hierarchies (:mod:`._relevance`); not for
  ``n_pairs``, whose pairing is by class.
* Memory is O(B M): one [B, M] similarity and masks of that shape, never [B, M, M].

Each objective reproduces pytorch-metric-learning 2.9's loss of the same name with its
default reducer (differences, where any, are in the docstring). aux as in
:func:`hnm.objectives._relevance.pair_aux`.

References:
  Sun et al. Circle Loss. CVPR 2020.
  Oh Song, Xiang, Jegelka, Savarese. Deep Metric Learning via Lifted Structured Feature
  Embedding. CVPR 2016; Hermans, Beyer, Leibe. In Defense of the Triplet Loss. 2017.
  Sohn. Improved Deep Metric Learning with Multi-class N-pair Loss Objective. NeurIPS 2016.
  Chen et al. SimCLR. ICML 2020; van den Oord et al. CPC (InfoNCE). 2018.
  Yu, Tao. Deep Metric Learning with Tuplet Margin Loss. ICCV 2019.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from hnm import _checks
from hnm import distances
from hnm.objectives import _relevance as rel

Aux = dict[str, jax.Array]


def _global_any(count: jax.Array, axis_name: str | None) -> jax.Array:
    return jax.lax.stop_gradient(distances.global_sum(count, axis_name)) > 0


# -------------------------------------------------------------------------- circle
def circle(embeddings: ArrayLike, labels: ArrayLike | None = None,
           key: jax.Array | None = None, *, axis_name: str | None = None,
           memory: Any = None, pos_mask: ArrayLike | None = None,
           neg_mask: ArrayLike | None = None, m: ArrayLike = 0.4,
           gamma: ArrayLike = 80.0) -> tuple[jax.Array, Aux]:
    r"""Circle loss (Sun et al. 2020) on cosine similarities, per anchor.

    .. math::
        \ell_a = \operatorname{softplus}\Big(\log\sum_{n} e^{\gamma\alpha_n(s_n - \Delta_n)}
                 + \log\sum_{p} e^{-\gamma\alpha_p(s_p - \Delta_p)}\Big),

    :math:`\alpha_p = [1 + m - s_p]_+`, :math:`\alpha_n = [s_n + m]_+` (stopped, as the
    paper's and PML's code), :math:`\Delta_p = 1 - m`, :math:`\Delta_n = m`. Anchors without a
    positive or a negative give 0; the loss is the mean over anchors with
    :math:`\ell_a > 0` (PML ``CircleLoss(m, gamma)`` with its ``AvgNonZeroReducer``).
    PML's defaults m = 0.4, γ = 80 are the paper's fine-grained retrieval setting.

    Args:
      embeddings: [B, D]; labels: [B] (or masks); key: unused; axis_name, memory,
      pos_mask, neg_mask: see the module docstring.
      m: the relaxation margin.
      gamma: :math:`\gamma > 0`, the scale.

    Returns:
      ``(loss, aux)``; ``num_valid`` counts anchors with a non-zero loss.

    References:
      Sun et al. Circle Loss: A Unified Perspective of Pair Similarity Optimization. CVPR 2020.
    """
    del key
    rel.check_positive(gamma, "gamma")
    pr = rel.pairs(embeddings, labels, normalize=True, axis_name=axis_name, memory=memory,
                   pos_mask=pos_mask, neg_mask=neg_mask)
    sim = pr.emb @ pr.ref.T
    stop = jax.lax.stop_gradient(sim)
    alpha_p = jax.nn.relu(1.0 + m - stop)
    alpha_n = jax.nn.relu(stop + m)
    lse_p = rel.masked_logsumexp(-gamma * alpha_p * (sim - (1.0 - m)), pr.pos_mask)
    lse_n = rel.masked_logsumexp(gamma * alpha_n * (sim - m), pr.neg_mask)
    valid = jnp.any(pr.pos_mask, axis=1) & jnp.any(pr.neg_mask, axis=1)
    per_anchor = jnp.where(valid, jax.nn.softplus(lse_p + lse_n), 0.0)
    active = valid & (per_anchor > 0)
    loss = distances.global_mean_of(jnp.sum(per_anchor), jnp.sum(active), axis_name)
    aux = rel.pair_aux(loss, stop, pr.pos_mask, pr.neg_mask, num_valid=jnp.sum(active),
                       num_active=jnp.sum(active), num_units=jnp.sum(valid),
                       axis_name=axis_name)
    return rel.finish(loss, aux, pr)


# ------------------------------------------------------------------ lifted structure
def _distances(pr: rel.Pairs) -> jax.Array:
    return distances.euclidean_distance(pr.emb, pr.ref)


def lifted_structure(embeddings: ArrayLike, labels: ArrayLike | None = None,
                     key: jax.Array | None = None, *, axis_name: str | None = None,
                     memory: Any = None, pos_mask: ArrayLike | None = None,
                     neg_mask: ArrayLike | None = None, pos_margin: ArrayLike = 0.0,
                     neg_margin: ArrayLike = 1.0) -> tuple[jax.Array, Aux]:
    r"""Lifted structured loss (Oh Song et al. 2016), over ordered positive pairs.

    Euclidean distances :math:`d` between L2-normalised embeddings; for a positive pair
    (a, p), with :math:`N(i)` the negatives of row i:

    .. math::
        J_{ap} = \log\Big(\sum_{n\in N(a)} e^{m_- - d_{an}} + \sum_{n \in N(p)}
                 e^{m_- - d_{pn}}\Big) + d_{ap} - m_+, \qquad
        L = \frac{1}{|P|}\sum_{(a,p)\in P} \tfrac12 [J_{ap}]_+^2

    over the ordered pairs P (so each unordered pair counts twice, as the paper's
    :math:`\frac{1}{2|\hat P|}\sum [J]_+^2`). Equal to PML ``LiftedStructureLoss(neg_margin,
    pos_margin)``. The inner sum over :math:`N(p)` uses row p of the distance matrix: each
    device computes :math:`r_i = \log\sum_{n\in N(i)} e^{m_- - d_{in}}` for its rows and
    gathers them (memory rows get theirs from the memory labels, no gradient), so
    :math:`J_{ap}` = logaddexp(:math:`r_a, r_p`) + :math:`d_{ap} - m_+` in O(B M).

    Args:
      embeddings: [B, D]; labels: [B] (or masks); key: unused; axis_name, memory,
      pos_mask, neg_mask: see the module docstring (with custom masks, no memory).
      pos_margin: :math:`m_+`.
      neg_margin: :math:`m_-`.

    Returns:
      ``(loss, aux)``; ``num_valid`` counts ordered positive pairs.

    References:
      Oh Song, Xiang, Jegelka, Savarese. Deep Metric Learning via Lifted Structured Feature
      Embedding. CVPR 2016.
    """
    del key
    if pos_mask is not None and memory is not None:
        raise ValueError("lifted_structure with custom `pos_mask`/`neg_mask` cannot use a "
                         "`memory` (the memory rows' own negatives are unknown).")
    pr = rel.pairs(embeddings, labels, normalize=True, axis_name=axis_name, memory=memory,
                   pos_mask=pos_mask, neg_mask=neg_mask)
    dist = _distances(pr)
    has_neg = jnp.any(pr.neg_mask, axis=1)
    # r_i = log sum_{n in N(i)} exp(m- - d_in); -inf for a row without negatives.
    r_local = jnp.where(has_neg, rel.masked_logsumexp(neg_margin - dist, pr.neg_mask),
                        -jnp.inf)
    r_ref = r_local if axis_name is None else jax.lax.all_gather(r_local, axis_name,
                                                                 tiled=True)
    if memory is not None:
        mem_emb = pr.ref[r_ref.shape[0]:]
        mem_labels = jnp.asarray(memory.labels)
        _, mem_neg = distances.label_masks(mem_labels, pr.ref_labels)
        mem_dist = jax.lax.stop_gradient(distances.euclidean_distance(mem_emb, pr.ref))
        r_mem = jnp.where(jnp.any(mem_neg, axis=1),
                          rel.masked_logsumexp(neg_margin - mem_dist, mem_neg), -jnp.inf)
        r_ref = jnp.concatenate([r_ref, jax.lax.stop_gradient(r_mem)])
    r_a = jnp.broadcast_to(r_local[:, None], dist.shape)
    r_p = jnp.broadcast_to(r_ref[None, :], dist.shape)
    some_neg = pr.pos_mask & (jnp.isfinite(r_a) | jnp.isfinite(r_p))
    # logaddexp of (-inf, -inf) has a NaN gradient: make both finite where unused.
    safe_a = jnp.where(some_neg & jnp.isfinite(r_a), r_a, -1e30)
    safe_p = jnp.where(some_neg & jnp.isfinite(r_p), r_p, -1e30)
    # An empty sum counts as log-sum 0, as PML's masked logsumexp.
    lse = jnp.where(some_neg, jnp.logaddexp(safe_a, safe_p), 0.0)
    j_ap = lse + dist - pos_margin
    per_pair = jnp.where(pr.pos_mask, 0.5 * jnp.square(jax.nn.relu(j_ap)), 0.0)
    num_pos = jnp.sum(pr.pos_mask)
    # PML: nothing without at least one positive and one negative pair in the batch.
    ok = _global_any(num_pos, axis_name) & _global_any(jnp.sum(pr.neg_mask), axis_name)
    loss = jnp.where(ok, distances.global_mean_of(jnp.sum(per_pair), num_pos, axis_name), 0.0)
    return rel.finish(loss, rel.pair_aux(loss, pr.emb @ pr.ref.T, pr.pos_mask, pr.neg_mask,
                              num_valid=num_pos, num_active=jnp.sum(per_pair > 0),
                              num_units=num_pos, axis_name=axis_name), pr)


def generalized_lifted_structure(embeddings: ArrayLike, labels: ArrayLike | None = None,
                                 key: jax.Array | None = None, *,
                                 axis_name: str | None = None, memory: Any = None,
                                 pos_mask: ArrayLike | None = None,
                                 neg_mask: ArrayLike | None = None,
                                 pos_margin: ArrayLike = 0.0,
                                 neg_margin: ArrayLike = 1.0) -> tuple[jax.Array, Aux]:
    r"""Generalised lifted structure loss (Hermans et al. 2017, §2), per anchor.

    .. math::
        L = \frac1B\sum_a \Big[\log\sum_{p} e^{d_{ap} - m_+} + \log\sum_{n} e^{m_- - d_{an}}
            \Big]_+

    (an empty sum contributes 0), Euclidean distances between L2-normalised embeddings; the
    mean runs over every anchor, as PML ``GeneralizedLiftedStructureLoss(neg_margin,
    pos_margin)``, which it equals. 0 when the (global) batch has no pair at all.

    Args:
      embeddings: [B, D]; labels: [B] (or masks); key: unused; axis_name, memory,
      pos_mask, neg_mask: see the module docstring.
      pos_margin: :math:`m_+`.
      neg_margin: :math:`m_-`.

    Returns:
      ``(loss, aux)``; ``num_valid`` counts anchors with a non-zero loss.

    References:
      Hermans, Beyer, Leibe. In Defense of the Triplet Loss for Person Re-Identification.
      2017.
    """
    del key
    pr = rel.pairs(embeddings, labels, normalize=True, axis_name=axis_name, memory=memory,
                   pos_mask=pos_mask, neg_mask=neg_mask)
    dist = _distances(pr)
    per_anchor = jax.nn.relu(rel.masked_logsumexp(dist - pos_margin, pr.pos_mask)
                             + rel.masked_logsumexp(neg_margin - dist, pr.neg_mask))
    num_pairs = jnp.sum(pr.pos_mask) + jnp.sum(pr.neg_mask)
    ok = _global_any(num_pairs, axis_name)
    num_rows = jnp.asarray(per_anchor.shape[0], jnp.int32)
    loss = jnp.where(ok, distances.global_mean_of(jnp.sum(per_anchor), num_rows, axis_name),
                     0.0)
    active = jnp.sum(per_anchor > 0)
    return rel.finish(loss, rel.pair_aux(loss, pr.emb @ pr.ref.T, pr.pos_mask, pr.neg_mask,
                              num_valid=active, num_active=active, num_units=num_rows,
                              axis_name=axis_name), pr)


# ------------------------------------------------------------------------- N-pairs
def n_pairs(embeddings: ArrayLike, labels: ArrayLike, key: jax.Array | None = None, *,
            axis_name: str | None = None, memory: Any = None,
            normalize: bool = True) -> tuple[jax.Array, Aux]:
    r"""Multi-class N-pair loss (Sohn 2016): one (anchor, positive) pair per class.

    Per class present in the (global) batch, the anchor is its first row and the positive
    its second (classes with one row drop out). With :math:`\mathcal A` the anchors and
    :math:`p(j)` the positive of anchor j:

    .. math::
        L = \frac1{|\mathcal A|}\sum_{a\in\mathcal A} -\log\frac{e^{s(a, p(a))}}
            {\sum_{j\in\mathcal A} e^{s(a, p(j))}}

    with :math:`s` the cosine (``normalize=True``, PML's default ``DotProductSimilarity``
    on normalised embeddings) or the dot product. Memory rows of other classes join the
    denominator as extra negatives. Equal to PML ``NPairsLoss()``. No :math:`L_2`
    embedding penalty (add one to the model if wanted). Labels only (no custom masks).

    Args:
      embeddings: [B, D]; labels: [B]; key: unused; axis_name, memory: see the module
      docstring.
      normalize: cosine (True) or dot-product similarity.

    Returns:
      ``(loss, aux)``; ``num_valid`` counts anchors (classes with a pair).

    References:
      Sohn. Improved Deep Metric Learning with Multi-class N-pair Loss Objective. NeurIPS
      2016.
    """
    del key
    pr = rel.pairs(embeddings, labels, normalize=normalize, axis_name=axis_name,
                   memory=memory)
    # The batch rows of the reference set (every device's), before the memory rows.
    num_batch = pr.ref.shape[0] - (0 if memory is None else memory.embeddings.shape[0])
    ref_labels = pr.ref_labels
    batch_labels = ref_labels[:num_batch]
    cols = jnp.arange(num_batch)
    same = batch_labels[:, None] == batch_labels[None, :]
    earlier = same & (cols[None, :] < cols[:, None])           # [j, k]: k < j, same class
    rank = jnp.sum(earlier, axis=1)                            # 0: first row of its class
    is_second = rank == 1                                      # the positive of its class
    rows = pr.query_offset + jnp.arange(pr.emb.shape[0])
    is_anchor = (rank[rows] == 0) & jnp.any(same[rows] & is_second[None, :], axis=1)
    # Columns of the softmax: the class positives, plus memory rows of other classes.
    target = pr.pos_mask[:, :num_batch] & is_second[None, :]
    cand = jnp.concatenate([jnp.broadcast_to(is_second[None, :], target.shape),
                            pr.neg_mask[:, num_batch:]], axis=1)
    sim = pr.emb @ pr.ref.T
    target = jnp.concatenate([target, jnp.zeros_like(pr.neg_mask[:, num_batch:])], axis=1)
    per_anchor = jnp.where(is_anchor, rel.masked_logsumexp(sim, cand)
                           - jnp.sum(jnp.where(target, sim, 0.0), axis=1), 0.0)
    loss = distances.global_mean_of(jnp.sum(per_anchor), jnp.sum(is_anchor), axis_name)
    n = jnp.sum(is_anchor)
    return rel.finish(loss, rel.pair_aux(loss, sim, pr.pos_mask, pr.neg_mask, num_valid=n,
                              num_active=jnp.sum(is_anchor & (per_anchor > 0)), num_units=n,
                              axis_name=axis_name), pr)


# -------------------------------------------------------------------------- NT-Xent
def ntxent(embeddings: ArrayLike, labels: ArrayLike | None = None,
           key: jax.Array | None = None, *, axis_name: str | None = None,
           memory: Any = None, pos_mask: ArrayLike | None = None,
           neg_mask: ArrayLike | None = None,
           temperature: ArrayLike = 0.07) -> tuple[jax.Array, Aux]:
    r"""NT-Xent / InfoNCE over every ordered positive pair, negatives of the anchor.

    .. math::
        L = \frac1{|P|}\sum_{(a,p)\in P} -\log\frac{e^{s_{ap}/\tau}}{e^{s_{ap}/\tau} +
            \sum_{n\in N(a)} e^{s_{an}/\tau}}

    cosine :math:`s`. Each positive pair is its own term, with only the anchor's negatives
    in the denominator (not the other positives: that is SupCon's ``supcon``). Equal to PML
    ``NTXentLoss(temperature)`` (0 unless the batch has a positive and a negative pair).
    SimCLR is the case of two views per "class" (label = image id).

    Args:
      embeddings: [B, D]; labels: [B] (or masks); key: unused; axis_name, memory,
      pos_mask, neg_mask: see the module docstring.
      temperature: :math:`\tau > 0`.

    Returns:
      ``(loss, aux)``; ``num_valid`` counts ordered positive pairs.

    References:
      Chen, Kornblith, Norouzi, Hinton. A Simple Framework for Contrastive Learning of
      Visual Representations. ICML 2020; van den Oord, Li, Vinyals. Representation Learning
      with Contrastive Predictive Coding. 2018.
    """
    del key
    rel.check_positive(temperature, "temperature")
    pr = rel.pairs(embeddings, labels, normalize=True, axis_name=axis_name, memory=memory,
                   pos_mask=pos_mask, neg_mask=neg_mask)
    sim = pr.emb @ pr.ref.T
    logits = sim / temperature
    lse_neg = rel.masked_logsumexp(logits, pr.neg_mask)
    has_neg = jnp.any(pr.neg_mask, axis=1, keepdims=True)
    # -log(e^x / (e^x + e^r)) = logaddexp(x, r) - x; no negative: log 1 = 0.
    per_pair = jnp.where(has_neg, jnp.logaddexp(logits, lse_neg[:, None]) - logits, 0.0)
    per_pair = jnp.where(pr.pos_mask, per_pair, 0.0)
    num_pos = jnp.sum(pr.pos_mask)
    ok = _global_any(num_pos, axis_name) & _global_any(jnp.sum(pr.neg_mask), axis_name)
    loss = jnp.where(ok, distances.global_mean_of(jnp.sum(per_pair), num_pos, axis_name), 0.0)
    return rel.finish(loss, rel.pair_aux(loss, sim, pr.pos_mask, pr.neg_mask, num_valid=num_pos,
                              num_active=jnp.sum(pr.pos_mask & (per_pair > 0)),
                              num_units=num_pos, axis_name=axis_name), pr)


# ------------------------------------------------------------------- tuplet margin
def tuplet_margin(embeddings: ArrayLike, labels: ArrayLike | None = None,
                  key: jax.Array | None = None, *, axis_name: str | None = None,
                  memory: Any = None, pos_mask: ArrayLike | None = None,
                  neg_mask: ArrayLike | None = None, margin: ArrayLike = 0.1,
                  scale: ArrayLike = 64.0) -> tuple[jax.Array, Aux]:
    r"""Tuplet margin loss (Yu & Tao 2019) over every ordered positive pair.

    .. math::
        L = \frac1{|P|}\sum_{(a,p)\in P}\log\Big(1 + \sum_{n\in N(a)}
            e^{s(\cos\theta_{an} - \cos(\theta_{ap} - \beta))}\Big)

    with :math:`\theta` the angle between L2-normalised embeddings, :math:`\beta` =
    ``margin`` in **radians** (0.1; PML's ``TupletMarginLoss`` takes degrees, its default
    5.73° is 0.1 rad) and :math:`s` = ``scale``. :math:`\cos(\theta - \beta)` is
    :math:`c\cos\beta + \sqrt{1-c^2}\sin\beta` with a safe square root (finite gradient at
    c = 1, where PML's ``acos`` has none). Equal to PML ``TupletMarginLoss(
    margin=math.degrees(beta), scale)``. The paper's intra-pair variance term is PML's
    separate ``IntraPairVarianceLoss`` (not included).

    Args:
      embeddings: [B, D]; labels: [B] (or masks); key: unused; axis_name, memory,
      pos_mask, neg_mask: see the module docstring.
      margin: :math:`\beta` in radians.
      scale: :math:`s`.

    Returns:
      ``(loss, aux)``; ``num_valid`` counts ordered positive pairs.

    References:
      Yu, Tao. Deep Metric Learning with Tuplet Margin Loss. ICCV 2019.
    """
    del key
    pr = rel.pairs(embeddings, labels, normalize=True, axis_name=axis_name, memory=memory,
                   pos_mask=pos_mask, neg_mask=neg_mask)
    sim = pr.emb @ pr.ref.T
    sine = distances.safe_sqrt(jnp.maximum(1.0 - sim * sim, 0.0))
    cos_minus = sim * jnp.cos(margin) + sine * jnp.sin(margin)      # cos(theta_ap - beta)
    # scale * (s_an - cos(theta_ap - beta)) = scale*s_an + (-scale*cos_minus): lse splits.
    lse_neg = rel.masked_logsumexp(scale * sim, pr.neg_mask)
    has_neg = jnp.any(pr.neg_mask, axis=1, keepdims=True)
    inner = lse_neg[:, None] - scale * cos_minus
    per_pair = jnp.where(pr.pos_mask & has_neg, jax.nn.softplus(inner), 0.0)
    num_pos = jnp.sum(pr.pos_mask)
    ok = _global_any(num_pos, axis_name) & _global_any(jnp.sum(pr.neg_mask), axis_name)
    loss = jnp.where(ok, distances.global_mean_of(jnp.sum(per_pair), num_pos, axis_name), 0.0)
    return rel.finish(loss, rel.pair_aux(loss, sim, pr.pos_mask, pr.neg_mask, num_valid=num_pos,
                              num_active=jnp.sum(per_pair > 0), num_units=num_pos,
                              axis_name=axis_name), pr)


# What each option accepts (validated by ``hnm.objectives.check_options`` / ``get``).
OPTION_SPECS: dict[str, dict[str, _checks.OptionSpec]] = {
    "circle": dict(m=_checks.REAL, gamma=_checks.POSITIVE),
    "lifted_structure": dict(pos_margin=_checks.REAL, neg_margin=_checks.REAL),
    "generalized_lifted_structure": dict(pos_margin=_checks.REAL, neg_margin=_checks.REAL),
    "n_pairs": dict(normalize=_checks.BOOL),
    "ntxent": dict(temperature=_checks.POSITIVE),
    "tuplet_margin": dict(margin=_checks.real(ge=0, le=math.pi / 2), scale=_checks.POSITIVE),
}

OBJECTIVES = {
    "circle": circle,
    "generalized_lifted_structure": generalized_lifted_structure,
    "lifted_structure": lifted_structure,
    "n_pairs": n_pairs,
    "ntxent": ntxent,
    "tuplet_margin": tuplet_margin,
}
