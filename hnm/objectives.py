r"""Named training objectives: ``(embeddings, labels, key) -> (loss, aux)``.

Each objective is a plain module-level function

    ``name(embeddings [B, D], labels [B], key=None, *, axis_name=None, **options)``

and :func:`get` binds its options with :func:`functools.partial`, so the result is pure and
jit-able: ``loss, aux = hnm.objectives.get("sct", temperature=0.1)(emb, labels)``.

Cross-device (``axis_name`` set, inside ``pmap``/``shard_map``): the anchors are the local
rows, the candidates every device's rows (``distances.reference_set``, an ``all_gather``), and
self-pairs are removed with ``query_offset``. The returned ``loss`` is this device's *share*,
local sum / global count, so that summing losses (and gradients) over devices gives exactly
the single-device loss (and gradient) on the concatenated batch. ``aux`` values are global:
``num_valid``, ``frac_hard`` (valid triplets whose negative is more similar than their
positive, the official ``hn_ratio``), ``mean_sim_ap``, ``mean_sim_an`` (in the objective's
similarity), ``frac_active`` (valid triplets with a non-zero loss), ``loss`` (the global value,
no gradient) and, for ``sct``, ``num_easy`` / ``num_hard``.

Cross-batch memory (every objective, call-time keyword ``memory``, :mod:`hnm.memory`): the
memory's rows are appended to the reference set after the (gathered) batch, stopped and
normalised like the batch; the anchors stay the local rows, so the self-pair offset and the
loss normalisation are unchanged. Empty or warm-up-masked slots carry
``distances.MASKED_LABEL`` and count for nothing: an empty memory gives the plain objective.

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

import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from hnm import _checks
from hnm import distances
from hnm import losses
from hnm import miners
from hnm import pair_losses
from hnm.memory import Memory

Aux = dict[str, jax.Array]
Objective = Callable[..., tuple[jax.Array, Aux]]

DISTANCES = ("euclidean", "cosine", "squared_euclidean")
REDUCTIONS = ("mean", "avg_nonzero")
NORMALIZATIONS = ("joint", "separate")
# Keyword arguments given per call (or by ``get`` itself), never bound as options.
CALL_TIME = ("axis_name", "memory")
VALID_SIM_BOUND = 1.0  # official SCT code: chosen cosines must lie strictly inside (-1, 1)


# ---------------------------------------------------------------------------------------------
# Shared pieces.


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown `{name}`={value!r}; expected one of {choices}.")


def _prepare(embeddings: ArrayLike, labels: ArrayLike, normalize: bool,
             axis_name: str | None, memory: Memory | None = None
             ) -> tuple[jax.Array, jax.Array, distances.ReferenceSet]:
    """Checks, optionally L2-normalises, and builds the (possibly global) reference set,
    followed by the memory rows (normalised like the batch) when a memory is given."""
    embeddings, labels = jnp.asarray(embeddings), jnp.asarray(labels)
    _checks.check_embeddings_and_labels(embeddings, labels)
    if normalize:
        # Normalise before the gather: each device normalises only its own rows.
        embeddings = distances.l2_normalize(embeddings)
    return embeddings, labels, distances.reference_set(embeddings, labels, axis_name, memory,
                                                       normalize_memory=normalize)


def _similarity_matrix(emb: jax.Array, ref: jax.Array, distance: str) -> jax.Array:
    """[A, M] similarity; cosine assumes rows already unit-normalised."""
    if distance == "cosine":
        return emb @ ref.T
    if distance == "euclidean":
        return distances.negative_euclidean(emb, ref)
    return distances.negative_squared_euclidean(emb, ref)


def _mining_matrix(emb: jax.Array, ref: jax.Array, distance: str) -> jax.Array:
    """A stopped [A, M] matrix ordered like the similarity: the Euclidean ones mine on
    ``-d^2`` (the square root is monotone, so the choice is the same, one pass cheaper)."""
    mine = emb @ ref.T if distance == "cosine" else distances.negative_squared_euclidean(emb,
                                                                                        ref)
    return jax.lax.stop_gradient(mine)


def _row_similarity(emb: jax.Array, ref: jax.Array, idx: jax.Array, distance: str
                    ) -> jax.Array:
    """Similarity of ``emb[i]`` to ``ref[idx[i]]``, from gathered rows: O(A D) with an
    O(A D) backward pass (a scatter-add), never the B x B x D matmul of a full matrix."""
    other = ref[idx]
    if distance == "cosine":
        return jnp.sum(emb * other, axis=-1)
    d2 = jnp.sum(jnp.square(emb - other), axis=-1)
    return -(distances.safe_sqrt(d2) if distance == "euclidean" else d2)


def _global_stats(axis_name: str | None, **terms: ArrayLike) -> dict[str, jax.Array]:
    """Sums scalar statistics over devices with one ``psum``; no gradient."""
    names = list(terms)
    dtype = jnp.result_type(float)  # float32, or float64 under jax.enable_x64
    stacked = jnp.stack([jnp.asarray(terms[n], dtype) for n in names])
    stacked = distances.global_sum(jax.lax.stop_gradient(stacked), axis_name)
    return dict(zip(names, stacked))


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    return num / jnp.maximum(den, 1.0)


def _aux_from_stats(s: dict[str, jax.Array]) -> Aux:
    """The standard aux dict from global sums ``n, hard, ap, an, active, loss``."""
    return dict(num_valid=s["n"].astype(jnp.int32), frac_hard=_ratio(s["hard"], s["n"]),
                mean_sim_ap=_ratio(s["ap"], s["n"]), mean_sim_an=_ratio(s["an"], s["n"]),
                frac_active=_ratio(s["active"], s["n"]), loss=s["loss"])


def _triplet_aux(sim_ap: jax.Array, sim_an: jax.Array, per_triplet: jax.Array,
                 valid: jax.Array, loss: jax.Array, axis_name: str | None,
                 **extra_counts: jax.Array) -> Aux:
    """The aux dict of an objective whose mined triplets are explicit (``valid`` mask)."""
    def total(x):  # padding rows hold garbage (possibly inf): select, never multiply
        return jnp.sum(jnp.where(valid, x, 0))
    s = _global_stats(
        axis_name, n=jnp.sum(valid), hard=total(sim_an > sim_ap), ap=total(sim_ap),
        an=total(sim_an), active=total(per_triplet != 0),
        loss=loss, **extra_counts)
    aux = _aux_from_stats(s)
    aux.update({k: s[k].astype(jnp.int32) for k in extra_counts})
    return aux


def _reduce(per_triplet: jax.Array, valid: jax.Array, reduction: str,
            axis_name: str | None) -> jax.Array:
    """This device's share of the global mean (or AvgNonZero) of the valid triplets."""
    if reduction == "mean":
        total, count = losses.masked_sum_count(per_triplet, valid)
    else:
        total, count = losses.nonzero_sum_count(per_triplet, valid)
    return distances.global_mean_of(total, count, axis_name)


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
    emb, labels, ref = _prepare(embeddings, labels, True, axis_name, memory)
    # The mining matrix is computed once and never differentiated.
    mine_sim = jax.lax.stop_gradient(emb @ ref.embeddings.T)
    t = miner(mine_sim, labels, ref.labels, query_offset=ref.query_offset,
              duplicate_threshold=duplicate_threshold)
    chosen_ap, chosen_an = miners.gather_sims(mine_sim, t)
    inside = ((jnp.abs(chosen_ap) < VALID_SIM_BOUND) & (jnp.abs(chosen_an) < VALID_SIM_BOUND))
    valid = t.valid & inside
    sim_ap = _row_similarity(emb, ref.embeddings, t.positive, "cosine")
    sim_an = _row_similarity(emb, ref.embeddings, t.negative, "cosine")
    return sim_ap, sim_an, valid


def _soft_objective(embeddings, labels, axis_name, miner, temperature, duplicate_threshold,
                    memory):
    sim_ap, sim_an, valid = _official_triplets(embeddings, labels, axis_name, miner,
                                               duplicate_threshold, memory)
    per_triplet = losses.soft_triplet_loss(sim_ap, sim_an, temperature=temperature)
    loss = _reduce(per_triplet, valid, "mean", axis_name)
    return loss, _triplet_aux(sim_ap, sim_an, per_triplet, valid, loss, axis_name)


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
    losses._check_hard_rule(hard_rule)  # pylint: disable=protected-access
    _check_choice(normalization, "normalization", NORMALIZATIONS)
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
        loss = _reduce(per_triplet, easy | hard, "mean", axis_name)
    else:
        loss = (_reduce(per_triplet, easy, "mean", axis_name)
                + _reduce(per_triplet, hard, "mean", axis_name))
    aux = _triplet_aux(sim_ap, sim_an, per_triplet, valid, loss, axis_name,
                       num_easy=easy.sum(), num_hard=hard.sum())
    return loss, aux


# ---------------------------------------------------------------------------------------------
# Hinge objectives (Hermans batch-hard, FaceNet/TFA semi-hard, all triplets).


def _check_metric_options(distance: str, reduction: str | None = None) -> None:
    _check_choice(distance, "distance", DISTANCES)
    if reduction is not None:
        _check_choice(reduction, "reduction", REDUCTIONS)


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
      distance: ``"euclidean"``, ``"cosine"`` (similarity, always on normalised rows) or
        ``"squared_euclidean"``.
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
    emb, labels, ref = _prepare(embeddings, labels, normalize or distance == "cosine",
                                axis_name, memory)
    # One stopped matrix for the choice; the loss recomputes only the chosen pairs.
    mine_sim = _mining_matrix(emb, ref.embeddings, distance)
    t = miners.mine_hardest(mine_sim, labels, ref.labels, query_offset=ref.query_offset)
    sim_ap = _row_similarity(emb, ref.embeddings, t.positive, distance)
    sim_an = _row_similarity(emb, ref.embeddings, t.negative, distance)
    if soft:
        per_triplet = losses.soft_triplet_loss(sim_ap, sim_an, temperature=1.0)
    else:
        per_triplet = losses.triplet_margin_loss(sim_ap, sim_an, margin=margin)
    loss = _reduce(per_triplet, t.valid, reduction, axis_name)
    return loss, _triplet_aux(sim_ap, sim_an, per_triplet, t.valid, loss, axis_name)


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
      distance: ``"euclidean"`` (TFA's ``"L2"``), ``"cosine"`` or ``"squared_euclidean"``.
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
    emb, labels, ref = _prepare(embeddings, labels, normalize or distance == "cosine",
                                axis_name, memory)
    sim = _similarity_matrix(emb, ref.embeddings, distance)
    st = losses.semihard_margin_sums(sim, labels, ref.labels, query_offset=ref.query_offset,
                                     margin=margin)
    count = jnp.sum(st.num_pairs)
    loss = distances.global_mean_of(jnp.sum(st.loss_sum), count, axis_name)
    s = _global_stats(axis_name, n=count, hard=jnp.sum(st.num_hard),
                      ap=jnp.sum(st.sum_sim_ap), an=jnp.sum(st.sum_sim_an),
                      active=jnp.sum(st.num_active), loss=loss)
    return loss, _aux_from_stats(s)


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
      distance: ``"euclidean"``, ``"cosine"`` or ``"squared_euclidean"``.
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
    emb, labels, ref = _prepare(embeddings, labels, normalize or distance == "cosine",
                                axis_name, memory)
    sim = _similarity_matrix(emb, ref.embeddings, distance)
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
    s = _global_stats(axis_name, n=num_triplets, hard=jnp.sum(at.num_hard),
                      ap=jnp.sum(num_neg * sum_ap), an=jnp.sum(num_pos * sum_an),
                      active=jnp.sum(at.num_active), loss=loss)
    return loss, _aux_from_stats(s)


# ---------------------------------------------------------------------------------------------
# Registry.

TRIPLET_OBJECTIVES: dict[str, Objective] = {
    "batch_all": batch_all,
    "batch_hard": batch_hard,
    "ephn": ephn,
    "epshn": epshn,
    "sct": sct,
    "semihard": semihard,
}


def _registry() -> dict[str, Objective]:
    return {**TRIPLET_OBJECTIVES, **pair_losses.OBJECTIVES}


def names() -> list[str]:
    """Sorted names of every objective (triplet and pair)."""
    return sorted(_registry())


def options(name: str) -> dict[str, Any]:
    """The options of objective ``name`` and their defaults."""
    fn = _lookup(name)
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in CALL_TIME}


def _lookup(name: str) -> Objective:
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown objective `name`={name!r}; expected one of "
                         f"{sorted(registry)}.")
    return registry[name]


def get(name: str, *, axis_name: str | None = None, **opts: Any) -> Objective:
    """The objective ``name`` with its options bound: ``(embeddings, labels, key=None, *,
    memory=None) -> (loss, aux)``.

    Args:
      name: one of :func:`names`.
      axis_name: device axis to mine across (inside ``pmap``/``shard_map``), or None.
      **opts: the objective's keyword options (see :func:`options`).

    Returns:
      A pure function, ready for ``jax.jit`` / ``jax.grad``.

    Raises:
      ValueError: for an unknown ``name`` or an unknown option (the message lists the valid
        ones).

    Examples:
      >>> objective = get("batch_hard", margin=0.25)
      >>> loss, aux = objective(jnp.eye(4), jnp.array([0, 0, 1, 1]))  # all at distance √2
      >>> round(float(loss), 4), int(aux["num_valid"])
      (0.25, 4)
    """
    valid = options(name)
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for objective {name!r}; valid options: "
                         f"{sorted(valid)}.")
    return functools.partial(_lookup(name), axis_name=axis_name, **opts)
