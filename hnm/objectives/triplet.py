r"""Triplet objectives: ``ephn``, ``epshn``, ``sct`` (the official SCT code's three), and the
hinge recipes ``batch_hard`` (Hermans), ``semihard`` (FaceNet / TF-Addons) and ``batch_all``.

Each returns ``(loss, aux)`` as described in :mod:`hnm.objectives`; here ``frac_hard`` is the
fraction of the valid mined (or, for ``batch_all``, enumerated) triplets with
:math:`S_{an} > S_{ap}` in the objective's similarity.

Speed: the per-anchor objectives (``ephn``, ``epshn``, ``sct``, ``batch_hard``) mine on one
stopped similarity matrix and recompute only the chosen similarities from gathered rows, so
their backward pass is O(B D) instead of another B x B x D matmul. ``semihard`` and
``batch_all`` need the whole live matrix but only O(B^2) memory: their hinge sums are exact
linear forms in it, with integer weights counted on stopped values in one O(B^2) pass per
positive slot (``hnm.losses.all_triplets_margin_sums`` / ``semihard_margin_sums``).

References:
  Xuan, Stylianou, Liu, Pless. Hard Negative Examples are Hard, but Useful. ECCV 2020.
  Hermans, Beyer, Leibe. In Defense of the Triplet Loss. 2017.
  Schroff, Kalenichenko, Philbin. FaceNet. CVPR 2015.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from hnm import _checks
from hnm import distances
from hnm import losses
from hnm import miners
from hnm.memory import Memory
from hnm.objectives import _common

REDUCTIONS = ("mean", "avg_nonzero")
NORMALIZATIONS = ("joint", "separate")
VALID_SIM_BOUND = 1.0  # official SCT code: chosen cosines must lie strictly inside (-1, 1)
Aux = _common.Aux


# ---------------------------------------------------------------------------------------------
# The official SCT code's objectives: ephn, epshn, sct (cosine similarity, T = 0.1).


def _official_triplets(embeddings, labels, axis_name, miner, duplicate_threshold,
                       memory=None):
    """Mining and S_ap / S_an exactly as ``littleredxh/HardNegative`` ``_code/Loss.py``.

    x / max(||x||, 1e-12); one stopped cosine matrix for the choice (self-pairs excluded);
    an anchor counts only when a positive and a negative were found and both chosen values lie
    strictly inside (-1, 1) (the official code marks "none found" with -1, so a chosen cosine
    of exactly -1, or a negative duplicate at 1, also invalidates the anchor).
    """
    emb, labels, ref = _common.prepare(embeddings, labels, True, axis_name, memory)
    # The mining matrix is computed once and never differentiated.
    mine_sim = jax.lax.stop_gradient(emb @ ref.embeddings.T)
    t = miner(mine_sim, labels, ref.labels, query_offset=ref.query_offset,
              duplicate_threshold=duplicate_threshold)
    chosen_ap, chosen_an = miners.gather_sims(mine_sim, t)
    inside = ((jnp.abs(chosen_ap) < VALID_SIM_BOUND) & (jnp.abs(chosen_an) < VALID_SIM_BOUND))
    valid = t.valid & inside
    sim_ap = _common.row_similarity(emb, ref.embeddings, t.positive, "cosine")
    sim_an = _common.row_similarity(emb, ref.embeddings, t.negative, "cosine")
    return sim_ap, sim_an, valid


def _soft_objective(embeddings, labels, axis_name, miner, temperature, duplicate_threshold,
                    memory):
    sim_ap, sim_an, valid = _official_triplets(embeddings, labels, axis_name, miner,
                                               duplicate_threshold, memory)
    per_triplet = losses.soft_triplet_loss(sim_ap, sim_an, temperature=temperature)
    loss = _common.reduce(per_triplet, valid, "mean", axis_name)
    return loss, _common.triplet_aux(sim_ap, sim_an, per_triplet, valid, loss, axis_name)


def ephn(embeddings: ArrayLike, labels: ArrayLike, key: jax.Array | None = None, *,
         axis_name: str | None = None, memory: Memory | None = None,
         temperature: ArrayLike = losses.TEMPERATURE,
         duplicate_threshold: float = miners.DUPLICATE_THRESHOLD) -> tuple[jax.Array, Aux]:
    r"""Easy-positive / hard-negative soft triplet loss (official ``hn`` setting).

    .. math::
        L = \frac{1}{|V|} \sum_{a \in V}
            \operatorname{softplus}\!\Big(\frac{S_{an(a)} - S_{ap(a)}}{T}\Big)

    with cosine S, the positive and negative of
    :func:`hnm.miners.mine_easy_positive_hard_negative`, and V the valid anchors (both found,
    both chosen cosines strictly inside (-1, 1)). No valid anchor gives 0 (the official code
    gives NaN).

    Args:
      embeddings: [B, D] floating (local rows when ``axis_name`` is set).
      labels: [B] integer.
      key: unused (deterministic); accepted for a uniform objective signature.
      axis_name: mine across devices over this ``pmap``/``shard_map`` axis.
      memory: a cross-batch memory (:mod:`hnm.memory`) whose rows join the candidates.
      temperature: T.
      duplicate_threshold: positives with cosine above this are skipped.

    Returns:
      ``(loss, aux)``: this device's share of the loss (the loss itself on one device) and
      the global statistics described in the module docstring.

    Raises:
      ValueError, TypeError: for badly shaped or typed ``embeddings`` / ``labels``.

    References:
      Xuan et al. Hard Negative Examples are Hard, but Useful. ECCV 2020.
    """
    del key
    return _soft_objective(embeddings, labels, axis_name,
                           miners.mine_easy_positive_hard_negative, temperature,
                           duplicate_threshold, memory)


def epshn(embeddings: ArrayLike, labels: ArrayLike, key: jax.Array | None = None, *,
          axis_name: str | None = None, memory: Memory | None = None,
          temperature: ArrayLike = losses.TEMPERATURE,
          duplicate_threshold: float = miners.DUPLICATE_THRESHOLD) -> tuple[jax.Array, Aux]:
    r"""Easy-positive / semi-hard-negative soft triplet loss (official ``shn`` setting).

    As :func:`ephn`, with the negative of
    :func:`hnm.miners.mine_easy_positive_semihard_negative` (the most similar negative not
    more similar than the chosen positive).

    .. math::
        L = \frac{1}{|V|} \sum_{a \in V}
            \operatorname{softplus}\!\Big(\frac{S_{an(a)} - S_{ap(a)}}{T}\Big)

    Args:
      embeddings: [B, D] floating.
      labels: [B] integer.
      key: unused.
      axis_name: mine across devices over this axis.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
      temperature: T.
      duplicate_threshold: positives with cosine above this are skipped.

    Returns:
      ``(loss, aux)``.

    Raises:
      ValueError, TypeError: for badly shaped or typed ``embeddings`` / ``labels``.

    References:
      Xuan et al. Hard Negative Examples are Hard, but Useful. ECCV 2020.
    """
    del key
    return _soft_objective(embeddings, labels, axis_name,
                           miners.mine_easy_positive_semihard_negative, temperature,
                           duplicate_threshold, memory)


def sct(embeddings: ArrayLike, labels: ArrayLike, key: jax.Array | None = None, *,
        axis_name: str | None = None, memory: Memory | None = None,
        temperature: ArrayLike = losses.TEMPERATURE, hard_weight: ArrayLike = 1.0,
        hard_threshold: ArrayLike = losses.HARD_THRESHOLD, hard_rule: str = "or",
        normalization: str = "joint",
        duplicate_threshold: float = miners.DUPLICATE_THRESHOLD) -> tuple[jax.Array, Aux]:
    r"""Selectively Contrastive Triplet loss on easy-positive / hard-negative triplets.

    ``normalization="joint"`` (the current official release):

    .. math::
        L = \frac{\sum_{a \in E} \operatorname{softplus}\big((S_{an} - S_{ap})/T\big)
                  + \lambda \sum_{a \in H} S_{an}}{\max(1,\; |E| + |H|)}

    ``normalization="separate"`` (the first release): the mean over E plus :math:`\lambda`
    times the mean over H (an empty set contributes 0). E and H are the easy and hard sets of
    :func:`hnm.losses.sct_masks` among the valid anchors (as in :func:`ephn`).

    Which setting reproduces which official release (``littleredxh/HardNegative``):

    * current release (``_code/Loss.py``, ``SCTLoss('sct')``): the defaults,
      ``hard_rule="or", hard_threshold=0.8, normalization="joint"``;
    * first public release (git 076a275, ``EPHNLoss(sct=True)``):
      ``hard_rule="and", hard_threshold=0.5, normalization="separate"``.

    Both use ``temperature=0.1``, ``hard_weight=1`` and ``duplicate_threshold=0.9999``.

    Args:
      embeddings: [B, D] floating.
      labels: [B] integer.
      key: unused.
      axis_name: mine across devices over this axis; the joint divisor is then the global
        :math:`|E| + |H|`.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
      temperature: T of the easy term.
      hard_weight: :math:`\lambda`.
      hard_threshold: t of the hard rule.
      hard_rule: ``"or"`` or ``"and"``.
      normalization: ``"joint"`` or ``"separate"``.
      duplicate_threshold: positives with cosine above this are skipped.

    Returns:
      ``(loss, aux)``; aux also has ``num_easy`` and ``num_hard``.

    Raises:
      ValueError, TypeError: for bad ``embeddings`` / ``labels`` or unknown option values.

    References:
      Xuan, Stylianou, Liu, Pless. Hard Negative Examples are Hard, but Useful. ECCV 2020.
    """
    del key
    _checks.check_choice(hard_rule, "hard_rule", losses.HARD_RULES)
    _checks.check_choice(normalization, "normalization", NORMALIZATIONS)
    sim_ap, sim_an, valid = _official_triplets(
        embeddings, labels, axis_name, miners.mine_easy_positive_hard_negative,
        duplicate_threshold, memory)
    easy, hard = losses.sct_masks(sim_ap, sim_an, hard_threshold=hard_threshold,
                                  hard_rule=hard_rule)
    easy, hard = easy & valid, hard & valid
    per_triplet = losses.sct_loss(sim_ap, sim_an, temperature=temperature,
                                  hard_weight=hard_weight, hard_threshold=hard_threshold,
                                  hard_rule=hard_rule)
    if normalization == "joint":
        loss = _common.reduce(per_triplet, easy | hard, "mean", axis_name)
    else:
        loss = (_common.reduce(per_triplet, easy, "mean", axis_name)
                + _common.reduce(per_triplet, hard, "mean", axis_name))
    aux = _common.triplet_aux(sim_ap, sim_an, per_triplet, valid, loss, axis_name,
                       num_easy=easy.sum(), num_hard=hard.sum())
    return loss, aux


# ---------------------------------------------------------------------------------------------
# Hinge objectives (Hermans batch-hard, FaceNet/TFA semi-hard, all triplets).


def _normalizes(distance: str, normalize: bool) -> bool:
    """Whether the rows are L2-normalised: on request, and always for cosine."""
    return normalize or distances.similarity(distance).unit_rows


def _check_metric_options(distance: str, reduction: str | None = None) -> None:
    distances.similarity(distance, "distance")
    if reduction is not None:
        _checks.check_choice(reduction, "reduction", REDUCTIONS)


def batch_hard(embeddings: ArrayLike, labels: ArrayLike, key: jax.Array | None = None, *,
               axis_name: str | None = None, memory: Memory | None = None,
               margin: ArrayLike = 0.2, distance: str = "euclidean", normalize: bool = True,
               soft: bool = False,
               reduction: str = "mean") -> tuple[jax.Array, Aux]:
    r"""Batch-hard triplet loss: hardest positive and hardest negative per anchor.

    .. math::
        L = \operatorname{reduce}_{a \in V}\, \max\big(0,\;
            \max_{p} d_{ap} - \min_{n} d_{an} + m\big)

    (in similarities :math:`\max(0, s_{an} - s_{ap} + m)` with the least similar positive and
    most similar negative; ties go to the first index). ``soft=True`` replaces the hinge by
    Hermans' soft margin :math:`\operatorname{softplus}(s_{an} - s_{ap})` and ignores
    ``margin``. ``reduction="mean"`` averages over valid anchors (Hermans);
    ``"avg_nonzero"`` over anchors with a non-zero loss, which with ``distance="euclidean",
    normalize=True`` equals pytorch-metric-learning's ``TripletMarginLoss(margin)`` with a
    ``BatchHardMiner``.

    Args:
      embeddings: [B, D] floating.
      labels: [B] integer.
      key: unused.
      axis_name: mine across devices over this axis.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
      margin: m, in units of the chosen distance.
      distance: a name of :data:`hnm.distances.SIMILARITIES`: ``"euclidean"``, ``"cosine"``
        (always on normalised rows), ``"squared_euclidean"`` or ``"dot"``.
      normalize: L2-normalise the embeddings first.
      soft: soft margin instead of the hinge.
      reduction: ``"mean"`` or ``"avg_nonzero"``.

    Returns:
      ``(loss, aux)``.

    Raises:
      ValueError, TypeError: for bad ``embeddings`` / ``labels`` or unknown option values.

    References:
      Hermans, Beyer, Leibe. In Defense of the Triplet Loss. arXiv 1703.07737, 2017.
    """
    del key
    _check_metric_options(distance, reduction)
    emb, labels, ref = _common.prepare(embeddings, labels, _normalizes(distance, normalize),
                                       axis_name, memory)
    # One stopped matrix for the choice; the loss recomputes only the chosen pairs.
    mine_sim = _common.mining_matrix(emb, ref.embeddings, distance)
    t = miners.mine_hardest(mine_sim, labels, ref.labels, query_offset=ref.query_offset)
    sim_ap = _common.row_similarity(emb, ref.embeddings, t.positive, distance)
    sim_an = _common.row_similarity(emb, ref.embeddings, t.negative, distance)
    if soft:
        per_triplet = losses.soft_triplet_loss(sim_ap, sim_an, temperature=1.0)
    else:
        per_triplet = losses.triplet_margin_loss(sim_ap, sim_an, margin=margin)
    loss = _common.reduce(per_triplet, t.valid, reduction, axis_name)
    return loss, _common.triplet_aux(sim_ap, sim_an, per_triplet, t.valid, loss, axis_name)


def semihard(embeddings: ArrayLike, labels: ArrayLike, key: jax.Array | None = None, *,
             axis_name: str | None = None, memory: Memory | None = None,
             margin: ArrayLike = 0.2, distance: str = "euclidean",
             normalize: bool = True) -> tuple[jax.Array, Aux]:
    r"""Semi-hard triplet loss over every anchor-positive pair (TFA ``TripletSemiHardLoss``).

    .. math::
        L = \frac{1}{|P|} \sum_{(a, p) \in P} \max\big(0,\; d_{ap} - d_{a n(a,p)} + m\big)

    where P are all anchor-positive pairs of anchors that have a negative, and
    :math:`n(a, p)` is the closest negative strictly farther than p, else the farthest
    negative (:func:`hnm.miners.mine_semihard`). Zeros count in the mean. O(B^2) memory
    (:func:`hnm.losses.semihard_margin_sums`).
    Differences from TFA: embeddings are L2-normalised first unless ``normalize=False``, and
    anchors without any negative drop out (TFA would use a garbage value).

    Args:
      embeddings: [B, D] floating.
      labels: [B] integer.
      key: unused.
      axis_name: mine across devices over this axis.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
      margin: m.
      distance: a name of :data:`hnm.distances.SIMILARITIES` (``"euclidean"`` is TFA's
        ``"L2"``).
      normalize: L2-normalise the embeddings first.

    Returns:
      ``(loss, aux)``; ``num_valid`` counts anchor-positive pairs.

    Raises:
      ValueError, TypeError: for bad ``embeddings`` / ``labels`` or unknown option values.

    References:
      Schroff, Kalenichenko, Philbin. FaceNet. CVPR 2015.
    """
    del key
    _check_metric_options(distance)
    emb, labels, ref = _common.prepare(embeddings, labels, _normalizes(distance, normalize),
                                       axis_name, memory)
    sim = _common.similarity_matrix(emb, ref.embeddings, distance)
    st = losses.semihard_margin_sums(sim, labels, ref.labels, query_offset=ref.query_offset,
                                     margin=margin)
    count = jnp.sum(st.num_pairs)
    loss = distances.global_mean_of(jnp.sum(st.loss_sum), count, axis_name)
    s = _common.global_stats(axis_name, n=count, hard=jnp.sum(st.num_hard),
                      ap=jnp.sum(st.sum_sim_ap), an=jnp.sum(st.sum_sim_an),
                      active=jnp.sum(st.num_active), loss=loss)
    return loss, _common.aux_from_stats(s)


def batch_all(embeddings: ArrayLike, labels: ArrayLike, key: jax.Array | None = None, *,
              axis_name: str | None = None, memory: Memory | None = None,
              margin: ArrayLike = 0.2, distance: str = "euclidean", normalize: bool = True,
              reduction: str = "avg_nonzero") -> tuple[jax.Array, Aux]:
    r"""Hinge triplet loss over all triplets (a, p, n) of the batch.

    .. math::
        L = \frac{1}{N} \sum_{a} \sum_{p:\, y_p = y_a,\, p \ne a} \sum_{n:\, y_n \ne y_a}
            \max(0,\; s_{an} - s_{ap} + m)

    with N the number of triplets whose loss is non-zero (``reduction="avg_nonzero"``, the
    default, as pytorch-metric-learning's ``TripletMarginLoss`` without a miner, whose result
    it equals for ``distance="euclidean", normalize=True``) or all triplets
    (``"mean"``). Computed by :func:`hnm.losses.all_triplets_margin_sums` in O(B^2 K) time
    (K the largest class in the batch) and O(B^2) memory, never a B^3 array.

    Args:
      embeddings: [B, D] floating.
      labels: [B] integer.
      key: unused.
      axis_name: mine across devices over this axis.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
      margin: m.
      distance: a name of :data:`hnm.distances.SIMILARITIES`.
      normalize: L2-normalise the embeddings first.
      reduction: ``"avg_nonzero"`` (default) or ``"mean"``.

    Returns:
      ``(loss, aux)``; ``num_valid`` counts triplets.

    Raises:
      ValueError, TypeError: for bad ``embeddings`` / ``labels`` or unknown option values.

    References:
      Hermans, Beyer, Leibe. In Defense of the Triplet Loss. 2017 (batch-all);
      Musgrave, Belongie, Lim. A Metric Learning Reality Check. ECCV 2020.
    """
    del key
    _check_metric_options(distance, reduction)
    emb, labels, ref = _common.prepare(embeddings, labels, _normalizes(distance, normalize),
                                       axis_name, memory)
    sim = _common.similarity_matrix(emb, ref.embeddings, distance)
    at = losses.all_triplets_margin_sums(sim, labels, ref.labels,
                                         query_offset=ref.query_offset, margin=margin)
    num_triplets = jnp.sum(at.num_triplets)
    count = jnp.sum(at.num_active) if reduction == "avg_nonzero" else num_triplets
    loss = distances.global_mean_of(jnp.sum(at.loss_sum), count, axis_name)
    # Means over every triplet: s_ap repeats once per negative, s_an once per positive.
    stop_sim = jax.lax.stop_gradient(sim)
    pos_mask, neg_mask = distances.label_masks(labels, ref.labels,
                                               query_offset=ref.query_offset)
    num_pos = jnp.sum(pos_mask, axis=1)
    num_neg = jnp.sum(neg_mask, axis=1)
    sum_ap = jnp.sum(jnp.where(pos_mask, stop_sim, 0.0), axis=1)
    sum_an = jnp.sum(jnp.where(neg_mask, stop_sim, 0.0), axis=1)
    s = _common.global_stats(axis_name, n=num_triplets, hard=jnp.sum(at.num_hard),
                      ap=jnp.sum(num_neg * sum_ap), an=jnp.sum(num_pos * sum_an),
                      active=jnp.sum(at.num_active), loss=loss)
    return loss, _common.aux_from_stats(s)


_DISTANCE = _checks.choice(tuple(distances.SIMILARITIES))
_OFFICIAL = dict(temperature=_checks.POSITIVE, duplicate_threshold=_checks.REAL)
# What each option accepts (checked by hnm.objectives.get / check_options before compiling).
OPTION_SPECS: dict[str, dict[str, _checks.OptionSpec]] = {
    "ephn": _OFFICIAL,
    "epshn": _OFFICIAL,
    "sct": dict(_OFFICIAL, hard_weight=_checks.NON_NEGATIVE, hard_threshold=_checks.REAL,
                hard_rule=_checks.choice(losses.HARD_RULES),
                normalization=_checks.choice(NORMALIZATIONS)),
    "batch_hard": dict(margin=_checks.NON_NEGATIVE, distance=_DISTANCE, normalize=_checks.BOOL,
                       soft=_checks.BOOL, reduction=_checks.choice(REDUCTIONS)),
    "semihard": dict(margin=_checks.NON_NEGATIVE, distance=_DISTANCE, normalize=_checks.BOOL),
    "batch_all": dict(margin=_checks.NON_NEGATIVE, distance=_DISTANCE, normalize=_checks.BOOL,
                      reduction=_checks.choice(REDUCTIONS)),
}

OBJECTIVES: dict[str, _common.Objective] = {
    "batch_all": batch_all,
    "batch_hard": batch_hard,
    "ephn": ephn,
    "epshn": epshn,
    "sct": sct,
    "semihard": semihard,
}
