r"""Pair objectives: contrastive, multi-similarity, SupCon and distance-weighted sampling.

Every objective here has the signature of the triplet objectives in ``hnm.objectives``
(which merges :data:`OBJECTIVES` into its registry)::

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
* ``frac_hard``: among anchors having at least one positive and one negative, the fraction
  whose most similar negative is strictly more similar (cosine) than its most similar
  positive, i.e. whose easy-positive / hard-negative triplet is hard (``S_an > S_ap``).
* ``mean_sim_ap`` / ``mean_sim_an``: mean cosine similarity over the positive / negative
  pairs the objective considered (all pairs; the mined pairs for ``multi_similarity``; the
  pairs of the valid triplets for ``distance_weighted``). 0 when there is none.

Memory is O(B M): one [B, M] similarity matrix and masks of that shape, never [B, M, M].
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from hnm import _checks
from hnm import distances
from hnm import losses
from hnm import miners
from hnm.memory import Memory

# Similarity names of hnm.distances that are negated distances (sim = -d): PML's
# non-inverted distances, whose margins are in distance units.
_NEGATED_DISTANCES = ("euclidean", "squared_euclidean")
DW_LOSSES = ("margin", "triplet")

Aux = dict[str, jax.Array]


# ----------------------------------------------------------------------------- helpers
def _prepare(embeddings: ArrayLike, labels: ArrayLike) -> tuple[jax.Array, jax.Array]:
    embeddings, labels = jnp.asarray(embeddings), jnp.asarray(labels)
    _checks.check_embeddings_and_labels(embeddings, labels)
    return embeddings, labels


def _check_positive(value: Any, name: str) -> None:
    """Checks a Python number at trace time; traced values are the caller's business."""
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"`{name}` must be > 0; got {value!r}.")


def _masked_logsumexp(x: jax.Array, mask: jax.Array, *, add_one: bool = False) -> jax.Array:
    r"""Row-wise :math:`\log(\sum_{j \in mask} e^{x_j} [+ 1])`, [A, M] -> [A].

    A row with an empty mask gives 0 (PML's ``lmu.logsumexp`` masks it to 0 as well). Finite
    values and gradients for any input: masked-out entries never reach ``exp``.
    """
    row_max = jnp.max(jnp.where(mask, x, -jnp.inf), axis=1, keepdims=True)
    if add_one:
        row_max = jnp.maximum(row_max, 0.0)  # the implicit 1 is exp(0)
    # stop_gradient: the shift cancels out; it only keeps exp from overflowing.
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    # Double where: an unmasked entry of x - row_max may be huge, and exp(huge) * 0 is NaN
    # in the backward pass.
    exps = jnp.where(mask, jnp.exp(jnp.where(mask, x - row_max, 0.0)), 0.0)
    total = jnp.sum(exps, axis=1)
    if add_one:
        total = total + jnp.exp(-row_max[:, 0])
    has_any = jnp.any(mask, axis=1)
    return jnp.where(has_any, row_max[:, 0] + jnp.log(jnp.where(has_any, total, 1.0)), 0.0)


def _avg_nonzero(per_unit: jax.Array, valid: jax.Array,
                 axis_name: str | None) -> tuple[jax.Array, jax.Array]:
    """PML's ``AvgNonZeroReducer``: mean over the valid units with loss > 0; 0 if none.

    Returns this device's share (local sum / global count) and the local count.
    """
    total, count = losses.nonzero_sum_count(per_unit, valid)
    return distances.global_mean_of(total, count, axis_name), count


def _frac_hard_counts(cos: jax.Array, pos_mask: jax.Array,
                      neg_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(anchors whose closest negative beats their closest positive, anchors with both)."""
    has_both = jnp.any(pos_mask, axis=1) & jnp.any(neg_mask, axis=1)
    max_pos = jnp.max(jnp.where(pos_mask, cos, -jnp.inf), axis=1)
    max_neg = jnp.max(jnp.where(neg_mask, cos, -jnp.inf), axis=1)
    return jnp.sum(has_both & (max_neg > max_pos)), jnp.sum(has_both)


def _aux(loss_share: jax.Array, cos: jax.Array, pos_mask: jax.Array, neg_mask: jax.Array, *,
         sim_ap_sum: ArrayLike, num_ap: ArrayLike, sim_an_sum: ArrayLike, num_an: ArrayLike,
         num_valid: ArrayLike, num_active: ArrayLike, num_units: ArrayLike,
         axis_name: str | None) -> Aux:
    """Global aux scalars from local (sum, count) pairs, with a single ``psum``."""
    dtype = loss_share.dtype
    num_hard, num_both = _frac_hard_counts(cos, pos_mask, neg_mask)
    local = jnp.stack([jnp.asarray(v, dtype) for v in (
        loss_share, num_valid, num_hard, num_both, sim_ap_sum, num_ap, sim_an_sum, num_an,
        num_active, num_units)])
    (loss, valid, hard, both, ap_sum, n_ap, an_sum, n_an, active, units) = (
        distances.global_sum(jax.lax.stop_gradient(local), axis_name))

    def ratio(num, den):
        return num / jnp.maximum(den, 1.0)

    return {
        "loss": loss,
        "num_valid": valid.astype(jnp.int32),
        "frac_hard": ratio(hard, both),
        "mean_sim_ap": ratio(ap_sum, n_ap),
        "mean_sim_an": ratio(an_sum, n_an),
        "frac_active": ratio(active, units),
    }


def _masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0))


def _cosine_of(sim: jax.Array, x: jax.Array, ref: jax.Array, distance: str,
               normalize: bool) -> jax.Array:
    """Cosine similarity for the aux statistics, derived from ``sim`` when possible."""
    sim = jax.lax.stop_gradient(sim)
    if distance == "cosine" or (normalize and distance == "dot"):
        return sim
    if normalize and distance == "euclidean":      # unit vectors: d^2 = 2 - 2 cos
        return 1.0 - 0.5 * sim * sim
    if normalize and distance == "squared_euclidean":
        return 1.0 + 0.5 * sim
    # Unnormalised dot / Euclidean: the one case that needs a second (gradient-free) matmul.
    return distances.cosine_similarity(jax.lax.stop_gradient(x), jax.lax.stop_gradient(ref))


# ------------------------------------------------------------------------- contrastive
def contrastive(embeddings: ArrayLike, labels: ArrayLike, key: jax.Array | None = None, *,
                axis_name: str | None = None, memory: Memory | None = None,
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
      labels: [B] integer labels.
      key: unused (deterministic objective); accepted for a uniform signature.
      axis_name: pmap / shard_map axis to mine across devices; None for one device.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
      pos_margin: :math:`m_+`, in the units of ``distance``.
      neg_margin: :math:`m_-`, in the units of ``distance``.
      distance: a name of :func:`hnm.distances.get_similarity`.
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
    embeddings, labels = _prepare(embeddings, labels)
    sim_fn = distances.get_similarity(distance)
    x = distances.l2_normalize(embeddings) if normalize else embeddings
    ref = distances.reference_set(x, labels, axis_name, memory, normalize_memory=normalize)
    sim = sim_fn(x, ref.embeddings)
    pos_mask, neg_mask = distances.label_masks(labels, ref.labels,
                                               query_offset=ref.query_offset)
    if distance in _NEGATED_DISTANCES:
        dist = -sim
        pos_loss = jax.nn.relu(dist - pos_margin)
        neg_loss = jax.nn.relu(neg_margin - dist)
    else:
        pos_loss = jax.nn.relu(pos_margin - sim)
        neg_loss = jax.nn.relu(sim - neg_margin)
    pos_share, pos_active = _avg_nonzero(pos_loss, pos_mask, axis_name)
    neg_share, neg_active = _avg_nonzero(neg_loss, neg_mask, axis_name)
    loss = pos_share + neg_share

    cos = _cosine_of(sim, x, ref.embeddings, distance, normalize)
    aux = _aux(loss, cos, pos_mask, neg_mask,
               sim_ap_sum=_masked_sum(cos, pos_mask), num_ap=jnp.sum(pos_mask),
               sim_an_sum=_masked_sum(cos, neg_mask), num_an=jnp.sum(neg_mask),
               num_valid=pos_active + neg_active, num_active=pos_active + neg_active,
               num_units=jnp.sum(pos_mask) + jnp.sum(neg_mask), axis_name=axis_name)
    return loss, aux


# -------------------------------------------------------------------- multi-similarity
def mine_multi_similarity(sim: ArrayLike, labels: ArrayLike,
                          ref_labels: ArrayLike | None = None, *,
                          query_offset: ArrayLike = 0,
                          epsilon: ArrayLike = 0.1) -> tuple[jax.Array, jax.Array]:
    r"""Multi-similarity pair mining (Wang et al.), as PML's ``MultiSimilarityMiner``.

    On a stopped-gradient similarity, a positive pair is kept when it is less similar than
    the anchor's most similar negative plus :math:`\epsilon`, a negative pair when it is
    more similar than the anchor's least similar positive minus :math:`\epsilon`:

    .. math::
        s_{ap} - \epsilon < \max_n s_{an}, \qquad s_{an} + \epsilon > \min_p s_{ap}.

    An anchor without negatives keeps no positive and vice versa.

    Args:
      sim: [A, M] similarities (larger = closer), anchors against the reference set.
      labels: [A] anchor labels.
      ref_labels: [M] reference labels; defaults to ``labels``.
      query_offset: row of anchor 0 in the reference set (removes self-pairs).
      epsilon: :math:`\epsilon`, in similarity units.

    Returns:
      ``(pos_keep, neg_keep)``: bool [A, M] masks of the mined pairs.

    References:
      Wang, Han, Huang, Dong, Scott. Multi-Similarity Loss with General Pair Weighting for
      Deep Metric Learning. CVPR 2019.
    """
    sim, labels = jnp.asarray(sim), jnp.asarray(labels)
    ref_labels = labels if ref_labels is None else jnp.asarray(ref_labels)
    _checks.check_sim(sim, labels, ref_labels)
    pos_mask, neg_mask = distances.label_masks(labels, ref_labels, query_offset=query_offset)
    sim = jax.lax.stop_gradient(sim)  # choosing pairs is not differentiated
    max_neg = jnp.max(jnp.where(neg_mask, sim, -jnp.inf), axis=1, keepdims=True)
    min_pos = jnp.min(jnp.where(pos_mask, sim, jnp.inf), axis=1, keepdims=True)
    pos_keep = pos_mask & (sim - epsilon < max_neg)
    neg_keep = neg_mask & (sim + epsilon > min_pos)
    return pos_keep, neg_keep


def multi_similarity(embeddings: ArrayLike, labels: ArrayLike, key: jax.Array | None = None,
                     *, axis_name: str | None = None, memory: Memory | None = None,
                     alpha: ArrayLike = 2.0,
                     beta: ArrayLike = 50.0, base: ArrayLike = 0.5,
                     epsilon: ArrayLike = 0.1) -> tuple[jax.Array, Aux]:
    r"""Multi-similarity loss with its pair miner, as PML's MS loss + MS miner.

    Cosine similarities :math:`s` on L2-normalised embeddings; pairs mined by
    :func:`mine_multi_similarity` (sets :math:`\mathcal P_i`, :math:`\mathcal N_i`); then

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
      labels: [B] integer labels.
      key: unused (deterministic objective).
      axis_name: pmap / shard_map axis to mine across devices; None for one device.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
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
    embeddings, labels = _prepare(embeddings, labels)
    _check_positive(alpha, "alpha")
    _check_positive(beta, "beta")
    x = distances.l2_normalize(embeddings)
    ref = distances.reference_set(x, labels, axis_name, memory, normalize_memory=True)
    sim = distances.dot_similarity(x, ref.embeddings)
    pos_mask, neg_mask = distances.label_masks(labels, ref.labels,
                                               query_offset=ref.query_offset)
    pos_keep, neg_keep = mine_multi_similarity(sim, labels, ref.labels,
                                               query_offset=ref.query_offset, epsilon=epsilon)
    num_pos, num_neg = jnp.sum(pos_keep), jnp.sum(neg_keep)
    global_pos, global_neg = distances.global_sum(jnp.stack([num_pos, num_neg]), axis_name)
    # PML's GenericPairLoss returns zero when every index tensor has length <= 1.
    enough = (global_pos > 1) | (global_neg > 1)

    pos_term = _masked_logsumexp(-alpha * (sim - base), pos_keep, add_one=True) / alpha
    neg_term = _masked_logsumexp(beta * (sim - base), neg_keep, add_one=True) / beta
    total = jnp.where(enough, jnp.sum(pos_term + neg_term), 0.0)
    loss = distances.global_mean_of(total, labels.shape[0], axis_name)

    cos = jax.lax.stop_gradient(sim)
    num_mined = jnp.where(enough, num_pos + num_neg, 0)
    aux = _aux(loss, cos, pos_mask, neg_mask,
               sim_ap_sum=_masked_sum(cos, pos_keep), num_ap=num_pos,
               sim_an_sum=_masked_sum(cos, neg_keep), num_an=num_neg,
               num_valid=num_mined, num_active=num_mined,
               num_units=jnp.sum(pos_mask) + jnp.sum(neg_mask), axis_name=axis_name)
    return loss, aux


# ---------------------------------------------------------------------------- SupCon
def supcon(embeddings: ArrayLike, labels: ArrayLike, key: jax.Array | None = None, *,
           axis_name: str | None = None, memory: Memory | None = None,
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
      labels: [B] integer labels.
      key: unused (deterministic objective).
      axis_name: pmap / shard_map axis to mine across devices; None for one device.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
      temperature: :math:`\tau > 0`.

    Returns:
      ``(loss, aux)`` as in :func:`contrastive`.

    Raises:
      ValueError / TypeError: bad shapes or dtypes, ``temperature`` not positive.

    References:
      Khosla et al. Supervised Contrastive Learning. NeurIPS 2020.
    """
    del key
    embeddings, labels = _prepare(embeddings, labels)
    _check_positive(temperature, "temperature")
    x = distances.l2_normalize(embeddings)
    ref = distances.reference_set(x, labels, axis_name, memory, normalize_memory=True)
    sim = distances.dot_similarity(x, ref.embeddings)
    pos_mask, neg_mask = distances.label_masks(labels, ref.labels,
                                               query_offset=ref.query_offset)
    logits = sim / temperature
    shift_from = logits
    if memory is not None:  # empty memory slots must not move the shift (exact no-op memory)
        usable = (ref.labels != distances.MASKED_LABEL)[None, :]
        shift_from = jnp.where(usable, logits, -jnp.inf)
    # stop_gradient: PML detaches the row max; the shift cancels in log_prob anyway.
    logits = logits - jax.lax.stop_gradient(jnp.max(shift_from, axis=1, keepdims=True))
    log_denominator = _masked_logsumexp(logits, pos_mask | neg_mask)
    log_prob = logits - log_denominator[:, None]
    num_pos = jnp.sum(pos_mask, axis=1)
    per_anchor = -jnp.sum(jnp.where(pos_mask, log_prob, 0.0), axis=1) / jnp.maximum(num_pos, 1)

    global_pairs = distances.global_sum(jnp.stack([jnp.sum(pos_mask), jnp.sum(neg_mask)]),
                                        axis_name)
    batch_ok = (global_pairs[0] > 0) & (global_pairs[1] > 0)
    has_pos = batch_ok & (num_pos > 0)
    loss, num_active = _avg_nonzero(per_anchor, has_pos, axis_name)

    cos = jax.lax.stop_gradient(sim)
    active = has_pos & (per_anchor > 0)
    aux = _aux(loss, cos, pos_mask, neg_mask,
               sim_ap_sum=_masked_sum(cos, pos_mask), num_ap=jnp.sum(pos_mask),
               sim_an_sum=_masked_sum(cos, neg_mask), num_an=jnp.sum(neg_mask),
               num_valid=jnp.sum(jnp.where(active, num_pos, 0)), num_active=num_active,
               num_units=jnp.sum(has_pos), axis_name=axis_name)
    return loss, aux


# ------------------------------------------------------------ distance-weighted sampling
def distance_weighted_log_weights(dist: ArrayLike, neg_mask: ArrayLike, *, dim: int,
                                  cutoff: ArrayLike = 0.5,
                                  nonzero_loss_cutoff: ArrayLike = 1.4) -> jax.Array:
    r"""Log of Wu et al.'s negative sampling weights, :math:`-\infty` where not sampleable.

    For unit vectors in :math:`\mathbb R^n` the pairwise distance has density
    :math:`q(d) \propto d^{n-2} (1 - d^2/4)^{(n-3)/2}`. Sampling with weight :math:`1/q`
    spreads the negatives over all distances:

    .. math::
        \log w_{an} = (2 - n) \log \bar d - \tfrac{n-3}{2} \log(1 - \bar d^2/4),
        \qquad \bar d = \max(d_{an}, \text{cutoff}),

    and :math:`w_{an} = 0` for non-negatives, for :math:`d_{an} \ge` ``nonzero_loss_cutoff``
    (they would have zero loss) and where :math:`1 - \bar d^2/4 \le 0`. Computed in log space
    because :math:`\bar d^{\,2-n}` overflows float32 for large :math:`n`.

    Args:
      dist: [A, M] Euclidean distances between unit vectors (no gradient is taken).
      neg_mask: [A, M] bool, true for the anchor's negatives.
      dim: :math:`n`, the embedding dimension (a Python int).
      cutoff: lower clip of the distance (limits the weight of very close negatives).
      nonzero_loss_cutoff: negatives at this distance or farther are never sampled.

    Returns:
      [A, M] log-weights (unnormalised), ``-inf`` where the weight is zero.

    References:
      Wu, Manmatha, Smola, Krähenbühl. Sampling Matters in Deep Embedding Learning.
      ICCV 2017, Section 4.
    """
    dist = jax.lax.stop_gradient(jnp.asarray(dist))
    clipped = jnp.maximum(dist, cutoff)
    one_minus = 1.0 - 0.25 * clipped * clipped
    sampleable = jnp.asarray(neg_mask) & (dist < nonzero_loss_cutoff) & (one_minus > 0)
    log_w = ((2.0 - dim) * jnp.log(clipped)
             - 0.5 * (dim - 3.0) * jnp.log(jnp.where(sampleable, one_minus, 1.0)))
    return jnp.where(sampleable, log_w, -jnp.inf)


def sample_distance_weighted(key: jax.Array, log_weights: ArrayLike, *,
                             query_offset: ArrayLike = 0) -> tuple[jax.Array, jax.Array]:
    r"""One negative per (anchor, column), drawn with probability :math:`\propto w_{an}`.

    Row :math:`a` of the output holds :math:`M` independent draws from the anchor's
    categorical distribution :math:`\mathrm{softmax}(\log w_{a\cdot})`, one for each
    reference column (i.e. for each candidate positive).

    Inverse-CDF sampling rather than ``jax.random.categorical``: drawing :math:`M` samples
    per anchor with the Gumbel trick needs an [A, M, M] noise tensor, while a row-wise
    cumulative sum and ``searchsorted`` need only [A, M]. The uniforms of anchor row
    :math:`a` come from ``fold_in(key, query_offset + a)``, so a device holding rows
    ``query_offset ...`` of a global batch draws exactly what one device holding the whole
    batch would (pass the same ``key`` on every device); they are float32 in any precision.

    Args:
      key: a PRNG key.
      log_weights: [A, M] from :func:`distance_weighted_log_weights`.
      query_offset: global row of local anchor 0.

    Returns:
      ``(neg_idx, has_neg)``: int32 [A, M] sampled column indices (in range; meaningless
      where ``has_neg`` is false) and bool [A], true when the anchor has a sampleable
      negative.
    """
    log_weights = jax.lax.stop_gradient(jnp.asarray(log_weights))
    num_anchors, num_ref = log_weights.shape
    sampleable = log_weights > -jnp.inf
    has_neg = jnp.any(sampleable, axis=1)
    # Shift by the row max over the sampleable entries (all of them may be far below 0).
    row_max = jnp.max(log_weights, axis=1, keepdims=True)
    row_max = jnp.where(has_neg[:, None], row_max, 0.0)
    weights = jnp.where(sampleable, jnp.exp(jnp.where(sampleable, log_weights - row_max,
                                                      0.0)), 0.0)
    cdf = jnp.cumsum(weights, axis=1)
    rows = query_offset + jnp.arange(num_anchors)
    # float32 uniforms whatever the dtype: the draws do not change under jax_enable_x64.
    uniforms = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r), (num_ref,),
                                                     dtype=jnp.float32))(rows)
    uniforms = uniforms.astype(cdf.dtype)
    targets = uniforms * cdf[:, -1:]
    # First column whose cdf exceeds the target: a column of zero weight never qualifies.
    neg_idx = jax.vmap(lambda c, t: jnp.searchsorted(c, t, side="right"))(cdf, targets)
    # Rounding can push u * total onto the total; fall back to the last sampleable column.
    last = num_ref - 1 - jnp.argmax(sampleable[:, ::-1], axis=1)
    neg_idx = jnp.minimum(neg_idx, last[:, None])
    return neg_idx.astype(jnp.int32), has_neg


def mine_distance_weighted(key: jax.Array, dist: ArrayLike, labels: ArrayLike,
                           ref_labels: ArrayLike | None = None, *, dim: int,
                           query_offset: ArrayLike = 0, cutoff: ArrayLike = 0.5,
                           nonzero_loss_cutoff: ArrayLike = 1.4) -> miners.Triplets:
    r"""Every (anchor, positive) pair with one distance-weighted sampled negative.

    Combines :func:`distance_weighted_log_weights` and :func:`sample_distance_weighted`:
    triplet ``(a, j, negative[a, j])`` for every reference column ``j``, valid when ``j`` is
    a positive of ``a`` and ``a`` has a sampleable negative (a negative closer than
    ``nonzero_loss_cutoff``).

    Args:
      key: a PRNG key (same on every device, see :func:`sample_distance_weighted`).
      dist: [A, M] Euclidean distances between unit vectors, anchors against references.
      labels: [A] anchor labels.
      ref_labels: [M] reference labels; defaults to ``labels``.
      dim: the embedding dimension :math:`n`.
      query_offset: row of anchor 0 in the reference set (removes self-pairs; seeds rows).
      cutoff: lower clip of the distance in the weights.
      nonzero_loss_cutoff: negatives this far or farther are never sampled.

    Returns:
      :class:`hnm.miners.Triplets` with [A, M] fields.

    References:
      Wu, Manmatha, Smola, Krähenbühl. Sampling Matters in Deep Embedding Learning.
      ICCV 2017.
    """
    dist, labels = jnp.asarray(dist), jnp.asarray(labels)
    ref_labels = labels if ref_labels is None else jnp.asarray(ref_labels)
    _checks.check_sim(dist, labels, ref_labels)
    pos_mask, neg_mask = distances.label_masks(labels, ref_labels, query_offset=query_offset)
    log_w = distance_weighted_log_weights(dist, neg_mask, dim=dim, cutoff=cutoff,
                                          nonzero_loss_cutoff=nonzero_loss_cutoff)
    negative, has_neg = sample_distance_weighted(key, log_w, query_offset=query_offset)
    anchor = jnp.broadcast_to(jnp.arange(dist.shape[0], dtype=jnp.int32)[:, None], dist.shape)
    positive = jnp.broadcast_to(jnp.arange(dist.shape[1], dtype=jnp.int32), dist.shape)
    return miners.Triplets(anchor, positive, negative, pos_mask & has_neg[:, None])


def distance_weighted(embeddings: ArrayLike, labels: ArrayLike, key: jax.Array | None = None,
                      *, axis_name: str | None = None, memory: Memory | None = None,
                      cutoff: ArrayLike = 0.5,
                      nonzero_loss_cutoff: ArrayLike = 1.4, margin: ArrayLike = 0.2,
                      beta: ArrayLike = 1.2, loss: str = "margin") -> tuple[jax.Array, Aux]:
    r"""Distance-weighted negative sampling (Wu et al.) with the margin or triplet loss.

    Euclidean distances :math:`d` between L2-normalised embeddings. Every (anchor, positive)
    pair gets one negative sampled with ``key`` from :func:`distance_weighted_log_weights`
    (weights :math:`\propto 1/q(d)`); anchors without a sampleable negative drop out.

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
      labels: [B] integer labels.
      key: PRNG key for the sampling (required). With ``axis_name`` pass the same key on
        every device: the draws depend on the global anchor row only (see
        :func:`sample_distance_weighted`), so sharding does not change them.
      axis_name: pmap / shard_map axis to mine across devices; None for one device.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
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
    embeddings, labels = _prepare(embeddings, labels)
    _check_positive(cutoff, "cutoff")
    _check_positive(nonzero_loss_cutoff, "nonzero_loss_cutoff")
    x = distances.l2_normalize(embeddings)
    ref = distances.reference_set(x, labels, axis_name, memory, normalize_memory=True)
    dist2 = distances.euclidean_distance(x, ref.embeddings, squared=True)
    dist = distances.safe_sqrt(dist2)
    pos_mask, neg_mask = distances.label_masks(labels, ref.labels,
                                               query_offset=ref.query_offset)
    t = mine_distance_weighted(key, dist, labels, ref.labels, dim=embeddings.shape[1],
                               query_offset=ref.query_offset, cutoff=cutoff,
                               nonzero_loss_cutoff=nonzero_loss_cutoff)
    valid = t.valid
    d_ap, d_an = miners.gather_sims(dist, t)   # distances here, not similarities
    if loss == "margin":
        # The per-triplet loss sums two hinges; PML's MarginLoss and Wu's code divide by
        # the number of non-zero hinges, not of triplets.
        pos_term = jax.nn.relu(d_ap - beta + margin)
        neg_term = jax.nn.relu(beta - d_an + margin)
        per_triplet = pos_term + neg_term
        divisor = jnp.sum(valid & (pos_term > 0)) + jnp.sum(valid & (neg_term > 0))
        share = distances.global_mean_of(_masked_sum(per_triplet, valid), divisor, axis_name)
    else:
        per_triplet = jax.nn.relu(d_ap - d_an + margin)
        share, _ = _avg_nonzero(per_triplet, valid, axis_name)

    cos = jax.lax.stop_gradient(1.0 - 0.5 * dist2)   # unit vectors: d^2 = 2 - 2 cos
    cos_ap, cos_an = miners.gather_sims(cos, t)
    num_valid = jnp.sum(valid)
    aux = _aux(share, cos, pos_mask, neg_mask,
               sim_ap_sum=_masked_sum(cos_ap, valid), num_ap=num_valid,
               sim_an_sum=_masked_sum(cos_an, valid), num_an=num_valid,
               num_valid=num_valid, num_active=jnp.sum(valid & (per_triplet > 0)),
               num_units=num_valid, axis_name=axis_name)
    return share, aux


OBJECTIVES: dict[str, Callable[..., tuple[jax.Array, Aux]]] = {
    "contrastive": contrastive,
    "multi_similarity": multi_similarity,
    "supcon": supcon,
    "distance_weighted": distance_weighted,
}
