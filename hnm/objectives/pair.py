r"""Pair objectives: contrastive, multi-similarity, SupCon and distance-weighted sampling.

Every objective here has the signature of the triplet objectives
(:mod:`hnm.objectives.triplet`; the package merges both ``OBJECTIVES`` into one registry)::

    loss, aux = objective(embeddings [B, D], labels [B], key=None, *, axis_name=None,
                          memory=None, **options)

Options are keyword-only; numeric ones may be traced arrays (schedulable), the others
(``distance``, ``normalize``, ``loss``) are Python values bound before ``jit``.

**Reference semantics.** ``contrastive``, ``multi_similarity`` and ``supcon`` reproduce
pytorch-metric-learning 2.9 (``ContrastiveLoss``, ``MultiSimilarityLoss`` with
``MultiSimilarityMiner``, ``SupConLoss``) with their default reducers, including the
reductions that are easy to get wrong (see ``shared/SCIENCE.md`` §4 and each docstring).

**Cross-device.** With ``axis_name`` the anchors are this device's rows and the candidates
are every device's rows (:func:`hnm.distances.reference_set`, an ``all_gather``); the
self-pair is removed through its ``query_offset``. Every count in a denominator is a global
``psum``, so the returned loss is this device's *share*: summing the shares, and ``psum``-ing
the gradients, gives exactly the single-device loss and gradient on the concatenated batch.

**Cross-batch memory.** A call-time ``memory`` (:mod:`hnm.memory`) appends its stopped rows,
normalised like the batch, to the candidates (after the batch: offsets are unchanged); empty
slots (``distances.MASKED_LABEL``) are neither positives nor negatives. ``distance_weighted``
draws column ``j``'s negative from the same uniform as without the memory (threefry bits are
counter-based, so the first draws of a longer row are the draws of the shorter one).

**aux** (scalars, global over devices, no gradient):

* ``loss``: the global loss (the ``psum`` of the shares).
* ``num_valid``: how many units entered the loss: pairs for ``contrastive`` (those with a
  non-zero hinge, the ``avg_nonzero`` divisors) and ``multi_similarity`` (mined pairs),
  positive pairs of the anchors averaged over for ``supcon``, valid (anchor, positive,
  sampled negative) triplets for ``distance_weighted``.
* ``frac_active``: the fraction of the candidate units with a non-zero loss: all pairs for
  ``contrastive``; all pairs, of which the mined ones are active, for ``multi_similarity``;
  anchors having a positive for ``supcon``; valid triplets for ``distance_weighted``.
* ``frac_hard`` (``distance_weighted`` only, the one objective here with triplets): as
  everywhere, the fraction of its valid (sampled) triplets with :math:`S_{an} > S_{ap}`.
* ``frac_hard_ephn`` (``contrastive``, ``multi_similarity``, ``supcon``, which mine pairs,
  not triplets): among anchors having at least one positive and one negative, the fraction
  whose most similar negative is strictly more similar (cosine) than its most similar
  positive, i.e. whose easy-positive / hard-negative triplet is hard.
* ``mean_sim_ap`` / ``mean_sim_an``: mean cosine similarity over the positive / negative
  pairs the objective considered (all pairs; the mined pairs for ``multi_similarity``; the
  pairs of the valid triplets for ``distance_weighted``). 0 when there is none.

**Custom relevance.** Instead of ``labels``, every objective here accepts explicit
``pos_mask`` / ``neg_mask`` (bool [B, M], this device's rows against the reference set: the
``all_gather`` of every device's rows, then the memory rows), for multi-label data and
hierarchies, with the rules of :mod:`hnm.objectives._relevance`: both masks or neither, not
together with ``labels``, the self-pair removed from ``pos_mask``, an entry in both masks a
positive only, the memory's columns whatever the masks say. Masks derived from labels give
the labels' result.

Memory is O(B M): one [B, M] similarity matrix and masks of that shape, never [B, M, M].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from hnm import _checks
from hnm import distances
from hnm import miners
from hnm.memory import Memory
from hnm.objectives import _common
from hnm.objectives import _relevance

DW_LOSSES = ("margin", "triplet")
Aux = _common.Aux


def _inputs(embeddings, labels, normalize, axis_name, memory, pos_mask, neg_mask):
    """``(x, ref, pos_mask, neg_mask)``: checked (normalised) rows, the reference set and the
    relevance masks, from ``labels`` or the caller's masks (then ``ref.labels`` is None)."""
    if labels is None or pos_mask is not None or neg_mask is not None:
        pr = _relevance.pairs(embeddings, labels, normalize=normalize, axis_name=axis_name,
                              memory=memory, pos_mask=pos_mask, neg_mask=neg_mask)
        return (pr.emb, distances.ReferenceSet(pr.ref, None, pr.query_offset), pr.pos_mask,
                pr.neg_mask)
    x, labels, ref = _common.prepare(embeddings, labels, normalize, axis_name, memory)
    pos, neg = distances.label_masks(labels, ref.labels, query_offset=ref.query_offset)
    return x, ref, pos, neg


# ------------------------------------------------------------------------- contrastive
def contrastive(embeddings: ArrayLike, labels: ArrayLike | None = None,
                key: jax.Array | None = None, *, axis_name: str | None = None,
                memory: Memory | None = None, pos_mask: ArrayLike | None = None,
                neg_mask: ArrayLike | None = None,
                pos_margin: ArrayLike = 0.0,
                neg_margin: ArrayLike = 1.0, distance: str = "euclidean",
                normalize: bool = True) -> tuple[jax.Array, Aux]:
    r"""Contrastive loss (Hadsell et al.) over all ordered pairs, as PML's ``ContrastiveLoss``.

    With a distance :math:`d` (``"euclidean"``, ``"squared_euclidean"``):

    .. math::
        \ell_{ij}^+ = [d_{ij} - m_+]_+ \;(y_i = y_j,\ i \ne j), \qquad
        \ell_{ij}^- = [m_- - d_{ij}]_+ \;(y_i \ne y_j),

    .. math::
        L = \operatorname{avg}_{>0}(\ell^+) + \operatorname{avg}_{>0}(\ell^-),

    where :math:`\operatorname{avg}_{>0}` is the mean over the pairs with a non-zero loss
    (PML's ``AvgNonZeroReducer``), 0 for a group without any. With a similarity :math:`s`
    (``"cosine"``, ``"dot"``) the hinges flip as in PML: :math:`[m_+ - s]_+` and
    :math:`[s - m_-]_+` (then sensible margins are e.g. ``pos_margin=1, neg_margin=0``).

    Args:
      embeddings: [B, D] floating embeddings (this device's rows).
      labels: [B] integer labels, or None with ``pos_mask`` / ``neg_mask``.
      key: unused (deterministic objective); accepted for a uniform signature.
      axis_name: pmap / shard_map axis to mine across devices; None for one device.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
      pos_mask, neg_mask: bool [B, M] relevance instead of ``labels`` (module
        docstring).
      pos_margin: :math:`m_+`, in the units of ``distance``.
      neg_margin: :math:`m_-`, in the units of ``distance``.
      distance: a name of :data:`hnm.distances.SIMILARITIES`.
      normalize: L2-normalise the embeddings first (PML's default).

    Returns:
      ``(loss, aux)``: this device's share of the loss (the loss itself without
      ``axis_name``) and the aux scalars of the module docstring.

    Raises:
      ValueError / TypeError: bad shapes or dtypes, or an unknown ``distance``.

    Examples:
      >>> emb = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
      >>> loss, aux = contrastive(emb, jnp.array([0, 0, 1]))
      >>> round(float(loss), 4)   # sqrt(2) for the positives + 1 for the coincident negatives
      2.4142

    References:
      Hadsell, Chopra, LeCun. Dimensionality Reduction by Learning an Invariant Mapping.
      CVPR 2006.
    """
    del key
    entry = distances.similarity(distance, "distance")
    x, ref, pos_mask, neg_mask = _inputs(embeddings, labels, normalize, axis_name, memory,
                                         pos_mask, neg_mask)
    sim = entry.matrix(x, ref.embeddings)
    if entry.negated_distance:
        dist = -sim
        pos_loss = jax.nn.relu(dist - pos_margin)
        neg_loss = jax.nn.relu(neg_margin - dist)
    else:
        pos_loss = jax.nn.relu(pos_margin - sim)
        neg_loss = jax.nn.relu(sim - neg_margin)
    pos_share, pos_active = _common.avg_nonzero(pos_loss, pos_mask, axis_name)
    neg_share, neg_active = _common.avg_nonzero(neg_loss, neg_mask, axis_name)
    loss = pos_share + neg_share

    cos = _common.cosine_of(sim, x, ref.embeddings, distance, normalize)
    aux = _common.pair_aux(loss, cos, pos_mask, neg_mask,
                           sim_ap_sum=_common.masked_sum(cos, pos_mask), num_ap=jnp.sum(pos_mask),
                           sim_an_sum=_common.masked_sum(cos, neg_mask), num_an=jnp.sum(neg_mask),
                           num_valid=pos_active + neg_active, num_active=pos_active + neg_active,
                           num_units=jnp.sum(pos_mask) + jnp.sum(neg_mask), axis_name=axis_name)
    return _common.finish(loss, aux, ref)


# -------------------------------------------------------------------- multi-similarity
def multi_similarity(embeddings: ArrayLike, labels: ArrayLike | None = None,
                     key: jax.Array | None = None, *, axis_name: str | None = None,
                     memory: Memory | None = None, pos_mask: ArrayLike | None = None,
                     neg_mask: ArrayLike | None = None,
                     alpha: ArrayLike = 2.0,
                     beta: ArrayLike = 50.0, base: ArrayLike = 0.5,
                     epsilon: ArrayLike = 0.1) -> tuple[jax.Array, Aux]:
    r"""Multi-similarity loss with its pair miner, as PML's MS loss + MS miner.

    Cosine similarities :math:`s` on L2-normalised embeddings; pairs mined by
    :func:`hnm.miners.mine_multi_similarity` (sets :math:`\mathcal P_i`, :math:`\mathcal N_i`); then

    .. math::
        L = \frac1B \sum_{i=1}^B \Big[\frac1\alpha \log\big(1 + \sum_{p\in\mathcal P_i}
            e^{-\alpha (s_{ip} - \lambda)}\big) + \frac1\beta \log\big(1 +
            \sum_{n\in\mathcal N_i} e^{\beta (s_{in} - \lambda)}\big)\Big]

    with :math:`\lambda` = ``base``: a plain mean over all :math:`B` anchors (PML's
    ``MeanReducer``); anchors without mined pairs add 0. Like PML's ``GenericPairLoss``, the
    loss is 0 when at most one positive and at most one negative pair were mined in the
    whole (global) batch.

    Args:
      embeddings: [B, D] floating embeddings (this device's rows).
      labels: [B] integer labels, or None with ``pos_mask`` / ``neg_mask``.
      key: unused (deterministic objective).
      axis_name: pmap / shard_map axis to mine across devices; None for one device.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
      pos_mask, neg_mask: bool [B, M] relevance instead of ``labels`` (module
        docstring).
      alpha: :math:`\alpha > 0`, the positive scale.
      beta: :math:`\beta > 0`, the negative scale.
      base: :math:`\lambda`, the similarity offset.
      epsilon: the miner's :math:`\epsilon`.

    Returns:
      ``(loss, aux)`` as in :func:`contrastive`.

    Raises:
      ValueError / TypeError: bad shapes or dtypes, ``alpha`` or ``beta`` not positive.

    References:
      Wang, Han, Huang, Dong, Scott. Multi-Similarity Loss with General Pair Weighting for
      Deep Metric Learning. CVPR 2019.
    """
    del key
    _common.check_positive(alpha, "alpha")
    _common.check_positive(beta, "beta")
    x, ref, pos_mask, neg_mask = _inputs(embeddings, labels, True, axis_name, memory,
                                         pos_mask, neg_mask)
    sim = distances.dot_similarity(x, ref.embeddings)
    pos_keep, neg_keep = miners.mine_multi_similarity(
        sim, query_offset=ref.query_offset, epsilon=epsilon, pos_mask=pos_mask,
        neg_mask=neg_mask)
    num_pos, num_neg = jnp.sum(pos_keep), jnp.sum(neg_keep)
    global_pos, global_neg = distances.global_sum(jnp.stack([num_pos, num_neg]), axis_name)
    # PML's GenericPairLoss returns zero when every index tensor has length <= 1.
    enough = (global_pos > 1) | (global_neg > 1)

    pos_term = _common.masked_logsumexp(-alpha * (sim - base), pos_keep, add_one=True) / alpha
    neg_term = _common.masked_logsumexp(beta * (sim - base), neg_keep, add_one=True) / beta
    total = jnp.where(enough, jnp.sum(pos_term + neg_term), 0.0)
    loss = distances.global_mean_of(total, x.shape[0], axis_name)

    cos = jax.lax.stop_gradient(sim)
    num_mined = jnp.where(enough, num_pos + num_neg, 0)
    aux = _common.pair_aux(loss, cos, pos_mask, neg_mask,
                           sim_ap_sum=_common.masked_sum(cos, pos_keep), num_ap=num_pos,
                           sim_an_sum=_common.masked_sum(cos, neg_keep), num_an=num_neg,
                           num_valid=num_mined, num_active=num_mined,
                           num_units=jnp.sum(pos_mask) + jnp.sum(neg_mask), axis_name=axis_name)
    return _common.finish(loss, aux, ref)


# ---------------------------------------------------------------------------- SupCon
def supcon(embeddings: ArrayLike, labels: ArrayLike | None = None,
           key: jax.Array | None = None, *, axis_name: str | None = None,
           memory: Memory | None = None, pos_mask: ArrayLike | None = None,
           neg_mask: ArrayLike | None = None,
           temperature: ArrayLike = 0.1) -> tuple[jax.Array, Aux]:
    r"""Supervised contrastive loss (Khosla et al.), as PML's ``SupConLoss``.

    Cosine similarities on L2-normalised embeddings, logits :math:`z_{ij} = s_{ij}/\tau`.
    For an anchor :math:`a` with positives :math:`P(a)`:

    .. math::
        \ell_a = -\frac{1}{|P(a)|} \sum_{p \in P(a)} \Big[z_{ap} -
                 \log \sum_{j \ne a} e^{z_{aj}}\Big],

    and :math:`L` is the mean of :math:`\ell_a` over the anchors with :math:`\ell_a > 0`
    (PML's ``AvgNonZeroReducer``; anchors without positives have :math:`\ell_a = 0` and
    drop out). As in PML the loss is 0 unless the (global) batch holds at least one
    positive and one negative pair; the detached row maximum is subtracted from the logits
    for stability (it cancels out).

    Args:
      embeddings: [B, D] floating embeddings (this device's rows).
      labels: [B] integer labels, or None with ``pos_mask`` / ``neg_mask``.
      key: unused (deterministic objective).
      axis_name: pmap / shard_map axis to mine across devices; None for one device.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
      pos_mask, neg_mask: bool [B, M] relevance instead of ``labels`` (module
        docstring).
      temperature: :math:`\tau > 0`.

    Returns:
      ``(loss, aux)`` as in :func:`contrastive`.

    Raises:
      ValueError / TypeError: bad shapes or dtypes, ``temperature`` not positive.

    References:
      Khosla et al. Supervised Contrastive Learning. NeurIPS 2020.
    """
    del key
    _common.check_positive(temperature, "temperature")
    x, ref, pos_mask, neg_mask = _inputs(embeddings, labels, True, axis_name, memory,
                                         pos_mask, neg_mask)
    sim = distances.dot_similarity(x, ref.embeddings)
    logits = sim / temperature
    shift_from = logits
    if memory is not None or ref.labels is None:
        # Columns in neither mask (empty memory slots) must not move the shift (an exact
        # no-op memory); with labels that leaves every column but those.
        usable = pos_mask | neg_mask | _relevance.self_mask(*sim.shape, ref.query_offset)
        shift_from = jnp.where(usable, logits, -jnp.inf)
    # stop_gradient: PML detaches the row max; the shift cancels in log_prob anyway.
    logits = logits - jax.lax.stop_gradient(jnp.max(shift_from, axis=1, keepdims=True))
    log_denominator = _common.masked_logsumexp(logits, pos_mask | neg_mask)
    log_prob = logits - log_denominator[:, None]
    num_pos = jnp.sum(pos_mask, axis=1)
    per_anchor = -jnp.sum(jnp.where(pos_mask, log_prob, 0.0), axis=1) / jnp.maximum(num_pos, 1)

    global_pairs = distances.global_sum(jnp.stack([jnp.sum(pos_mask), jnp.sum(neg_mask)]),
                                        axis_name)
    batch_ok = (global_pairs[0] > 0) & (global_pairs[1] > 0)
    has_pos = batch_ok & (num_pos > 0)
    loss, num_active = _common.avg_nonzero(per_anchor, has_pos, axis_name)

    cos = jax.lax.stop_gradient(sim)
    active = has_pos & (per_anchor > 0)
    aux = _common.pair_aux(loss, cos, pos_mask, neg_mask,
                           sim_ap_sum=_common.masked_sum(cos, pos_mask), num_ap=jnp.sum(pos_mask),
                           sim_an_sum=_common.masked_sum(cos, neg_mask), num_an=jnp.sum(neg_mask),
                           num_valid=jnp.sum(jnp.where(active, num_pos, 0)), num_active=num_active,
                           num_units=jnp.sum(has_pos), axis_name=axis_name)
    return _common.finish(loss, aux, ref)


# ------------------------------------------------------------ distance-weighted sampling
def distance_weighted(embeddings: ArrayLike, labels: ArrayLike | None = None,
                      key: jax.Array | None = None, *, axis_name: str | None = None,
                      memory: Memory | None = None, pos_mask: ArrayLike | None = None,
                      neg_mask: ArrayLike | None = None,
                      cutoff: ArrayLike = 0.5,
                      nonzero_loss_cutoff: ArrayLike = 1.4, margin: ArrayLike = 0.2,
                      beta: ArrayLike = 1.2, loss: str = "margin") -> tuple[jax.Array, Aux]:
    r"""Distance-weighted negative sampling (Wu et al.) with the margin or triplet loss.

    Euclidean distances :math:`d` between L2-normalised embeddings. Every (anchor, positive)
    pair gets one negative sampled with ``key`` from
    :func:`hnm.miners.distance_weighted_log_weights` (weights :math:`\propto 1/q(d)`); anchors
    without a sampleable negative drop out.

    ``loss="margin"`` (Wu et al.'s margin loss, fixed :math:`\beta`, no learned
    per-class :math:`\beta`), reduced like PML's ``MarginLoss`` and Wu's code: the sum
    over triplets divided by the number of non-zero positive and negative terms,

    .. math::
        L = \frac{\sum_t [d_{ap} - \beta + m]_+ + [\beta - d_{an} + m]_+}
                 {\#\{[d_{ap} - \beta + m]_+ > 0\} + \#\{[\beta - d_{an} + m]_+ > 0\}}.

    ``loss="triplet"``: the hinge :math:`[d_{ap} - d_{an} + m]_+`, averaged over the
    triplets with a non-zero loss (PML's ``TripletMarginLoss`` reducer). Either is 0 when
    nothing is active.

    Args:
      embeddings: [B, D] floating embeddings (this device's rows).
      labels: [B] integer labels, or None with ``pos_mask`` / ``neg_mask``.
      key: PRNG key for the sampling (required). With ``axis_name`` pass the same key on
        every device: the draws depend on the global anchor row only (see
        :func:`hnm.miners.sample_distance_weighted`), so sharding does not change them.
      axis_name: pmap / shard_map axis to mine across devices; None for one device.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
      pos_mask, neg_mask: bool [B, M] relevance instead of ``labels`` (module
        docstring).
      cutoff: lower clip of the distance in the sampling weights.
      nonzero_loss_cutoff: negatives this far or farther are never sampled.
      margin: :math:`m`.
      beta: :math:`\beta`, the margin loss's distance boundary (fixed).
      loss: ``"margin"`` or ``"triplet"`` (static).

    Returns:
      ``(loss, aux)`` as in :func:`contrastive`.

    Raises:
      ValueError: ``key`` is None, ``loss`` unknown, a cutoff not positive; ValueError /
        TypeError for bad shapes or dtypes.

    References:
      Wu, Manmatha, Smola, Krähenbühl. Sampling Matters in Deep Embedding Learning.
      ICCV 2017.
    """
    if key is None:
        raise ValueError("`key` is required by distance_weighted (it samples negatives); "
                         "got None.")
    if loss not in DW_LOSSES:
        raise ValueError(f"unknown `loss`={loss!r}; expected one of {DW_LOSSES}.")
    _common.check_positive(cutoff, "cutoff")
    _common.check_positive(nonzero_loss_cutoff, "nonzero_loss_cutoff")
    x, ref, pos_mask, neg_mask = _inputs(embeddings, labels, True, axis_name, memory,
                                         pos_mask, neg_mask)
    dist2 = distances.euclidean_distance(x, ref.embeddings, squared=True)
    dist = distances.safe_sqrt(dist2)
    t = miners.mine_distance_weighted(key, dist, dim=x.shape[1],
                                      query_offset=ref.query_offset, cutoff=cutoff,
                                      nonzero_loss_cutoff=nonzero_loss_cutoff,
                                      pos_mask=pos_mask, neg_mask=neg_mask)
    valid = t.valid
    d_ap, d_an = miners.gather_sims(dist, t)   # distances here, not similarities
    if loss == "margin":
        # The per-triplet loss sums two hinges; PML's MarginLoss and Wu's code divide by
        # the number of non-zero hinges, not of triplets.
        pos_term = jax.nn.relu(d_ap - beta + margin)
        neg_term = jax.nn.relu(beta - d_an + margin)
        per_triplet = pos_term + neg_term
        divisor = jnp.sum(valid & (pos_term > 0)) + jnp.sum(valid & (neg_term > 0))
        share = distances.global_mean_of(_common.masked_sum(per_triplet, valid), divisor,
                                         axis_name)
    else:
        per_triplet = jax.nn.relu(d_ap - d_an + margin)
        share, _ = _common.avg_nonzero(per_triplet, valid, axis_name)

    cos = jax.lax.stop_gradient(1.0 - 0.5 * dist2)   # unit vectors: d^2 = 2 - 2 cos
    cos_ap, cos_an = miners.gather_sims(cos, t)
    # Explicit triplets: the triplet objectives' aux, frac_hard over the sampled triplets.
    return _common.finish(
        share, _common.triplet_aux(cos_ap, cos_an, per_triplet, valid, share, axis_name), ref)


# What each option accepts (checked by hnm.objectives.get / check_options before compiling).
OPTION_SPECS: dict[str, dict[str, _checks.OptionSpec]] = {
    "contrastive": dict(pos_margin=_checks.REAL, neg_margin=_checks.REAL,
                        distance=_checks.choice(tuple(distances.SIMILARITIES)),
                        normalize=_checks.BOOL),
    "multi_similarity": dict(alpha=_checks.POSITIVE, beta=_checks.POSITIVE, base=_checks.REAL,
                             epsilon=_checks.NON_NEGATIVE),
    "supcon": dict(temperature=_checks.POSITIVE),
    "distance_weighted": dict(cutoff=_checks.POSITIVE, nonzero_loss_cutoff=_checks.POSITIVE,
                              margin=_checks.NON_NEGATIVE, beta=_checks.NON_NEGATIVE,
                              loss=_checks.choice(DW_LOSSES)),
}

OBJECTIVES: dict[str, _common.Objective] = {
    "contrastive": contrastive,
    "multi_similarity": multi_similarity,
    "supcon": supcon,
    "distance_weighted": distance_weighted,
}
