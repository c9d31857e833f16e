r"""Triplet objectives: ``ephn``, ``epshn``, ``sct`` (the official SCT code's three), and the
hinge recipes ``batch_hard`` (Hermans), ``semihard`` (FaceNet / TF-Addons) and ``batch_all``.

Each returns ``(loss, aux)`` as described in :mod:`hnm.objectives`; here ``frac_hard`` is the
fraction of the valid mined (or, for ``batch_all``, enumerated) triplets with
:math:`S_{an} > S_{ap}` in the objective's similarity.

Speed and memory (:mod:`hnm.streaming`): no objective here builds the A x M similarity
matrix of its A anchors against the M reference rows. The per-anchor objectives (``ephn``,
``epshn``, ``sct``, ``batch_hard``) mine in tiles of anchors x reference rows with fused
masked reductions (a running top-1 per anchor) and recompute only the chosen similarities
from gathered rows, so their backward pass is O(A D). ``semihard`` and ``batch_all`` find
each anchor's positives from sorted labels and sweep the reference set once per chunk of
positives with running semi-hard choices / running active-triplet counts and gradients.
Option ``block_size`` (all six): ``0`` (default) picks the tile automatically
(:func:`hnm.streaming.auto_block`): the whole reference set in one tile while anchors x
reference rows is at most 2^20 values, per block of anchors (so a plain batch is one tile
per block; ``semihard`` / ``batch_all`` stream a batch above 8192), else tiles of about
2^20 values, e.g. against a cross-batch memory; the
peak temporary memory is O(A x block + M x D) whatever the memory size M. An int > 0 forces
that many reference rows per tile. Loss and gradient equal the dense ones
(``tests/test_streaming.py``).

**Custom relevance** (all six): instead of ``labels``, explicit ``pos_mask`` / ``neg_mask``
(bool [B, M], this device's rows against the reference set: the ``all_gather`` of every
device's rows, then the memory rows), for multi-label data and hierarchies, with the rules
of :mod:`hnm.objectives._relevance`: both masks or neither, not together with ``labels``, the
self-pair removed from ``pos_mask``, an entry in both masks a positive only; the memory's
columns are whatever the masks say. Masks derived from labels give the labels' result. With
masks the objectives take the **dense** path (the mining rules of :mod:`hnm.miners` and
:func:`hnm.losses.semihard_margin_sums` / :func:`hnm.losses.all_triplets_margin_sums` on the
B x M matrix, O(B M) memory): ``block_size`` is ignored and nothing is streamed.

References:
  Xuan, Stylianou, Liu, Pless. Hard Negative Examples are Hard, but Useful. ECCV 2020.
  Hermans, Beyer, Leibe. In Defense of the Triplet Loss. 2017.
  Schroff, Kalenichenko, Philbin. FaceNet. CVPR 2015.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from hnm import _checks
from hnm import distances
from hnm import losses
from hnm import miners
from hnm import streaming
from hnm.memory import Memory
from hnm.objectives import _common
from hnm.objectives import _relevance

REDUCTIONS = ("mean", "avg_nonzero")
NORMALIZATIONS = ("joint", "separate")
VALID_SIM_BOUND = 1.0  # official SCT code: chosen cosines must lie strictly inside (-1, 1)
Aux = _common.Aux


# ---------------------------------------------------------------------------------------------
# The official SCT code's objectives: ephn, epshn, sct (cosine similarity, T = 0.1).


def _prepare(embeddings, labels, normalize, axis_name, memory):
    """Checks, optionally L2-normalises, and builds the reference set as segments (the
    (gathered) live batch, then the memory rows, never concatenated: see
    :class:`hnm.streaming.Reference`)."""
    emb, labels, ref = _common.prepare(embeddings, labels, normalize, axis_name, None)
    return emb, labels, streaming.Reference(ref.embeddings, ref.labels, ref.query_offset,
                                            memory, normalize_memory=normalize)


def _finish(loss, aux, ref):
    """:func:`hnm.objectives._common.finish` on a segmented reference set: NaN loss when any
    reference row (batch or memory) is non-finite, checked without concatenating them."""
    class _Rows:  # finish reads only ``.embeddings``; a [1, 1] flag stands in for the rows
        embeddings = jnp.where(ref.all_finite(), 0.0, jnp.nan).reshape(1, 1)
    return _common.finish(loss, aux, _Rows)


def _block(block_size):
    return None if block_size == 0 else block_size


# ---------------------------------------------------------------------------------------------
# Custom relevance (pos_mask / neg_mask): the dense path.


def _custom(labels, pos_mask, neg_mask) -> bool:
    """Whether the call gives relevance masks (or no labels: then the masks are required,
    and :func:`hnm.objectives._relevance.pairs` says so)."""
    return labels is None or pos_mask is not None or neg_mask is not None


class _Dense:
    """The concatenated reference rows of the dense path, with the two methods of
    :class:`hnm.streaming.Reference` the objectives use."""

    def __init__(self, pr: _relevance.Pairs):
        self.pairs = pr

    def rows(self, cols: jax.Array) -> jax.Array:
        return self.pairs.ref[cols]

    def all_finite(self) -> jax.Array:
        return distances.all_finite(self.pairs.ref)


class _Mined(NamedTuple):
    """One triplet per anchor (stopped), the fields of ``streaming.PerAnchor``."""
    positive: jax.Array
    negative: jax.Array
    sim_ap: jax.Array   # mining values (cosine, or -d^2 for the Euclidean kinds)
    sim_an: jax.Array
    valid: jax.Array


_RULE_MINERS = {"hardest": miners.mine_hardest,
                "easy_hard": miners.mine_easy_positive_hard_negative,
                "easy_semihard": miners.mine_easy_positive_semihard_negative}


def _masked_pairs(embeddings, labels, normalize, axis_name, memory, pos_mask, neg_mask):
    pr = _relevance.pairs(embeddings, labels, normalize=normalize, axis_name=axis_name,
                          memory=memory, pos_mask=pos_mask, neg_mask=neg_mask)
    return pr.emb, _Dense(pr)


def _mine_masked(embeddings, labels, normalize, axis_name, memory, pos_mask, neg_mask, rule,
                 distance, duplicate_threshold=miners.DUPLICATE_THRESHOLD):
    """``(emb, ref, mined)`` of a per-anchor rule on the dense stopped mining matrix with
    the caller's masks (the dense miners of :mod:`hnm.miners`, first index on ties, as
    :func:`hnm.streaming.mine_per_anchor` with labels)."""
    emb, ref = _masked_pairs(embeddings, labels, normalize, axis_name, memory, pos_mask,
                             neg_mask)
    pr = ref.pairs
    m = _common.mining_matrix(emb, pr.ref, distance)
    kw = {} if rule == "hardest" else dict(duplicate_threshold=duplicate_threshold)
    t = _RULE_MINERS[rule](m, query_offset=pr.query_offset, pos_mask=pr.pos_mask,
                           neg_mask=pr.neg_mask, **kw)
    def value(idx):
        return jnp.take_along_axis(m, idx[:, None], axis=1)[:, 0]
    return emb, ref, _Mined(t.positive, t.negative, value(t.positive), value(t.negative),
                            t.valid)


class _Sums(NamedTuple):
    """Global sums of semihard / batch_all, the fields of ``streaming.HingeSums``."""
    loss_sum: jax.Array
    num: jax.Array
    num_active: jax.Array
    num_hard: jax.Array
    sum_ap: jax.Array
    sum_an: jax.Array


def _dense_hinge_sums(kind, embeddings, labels, normalize, axis_name, memory, pos_mask,
                      neg_mask, margin, distance):
    """``(sums, ref)`` of ``semihard`` / ``batch_all`` with the caller's masks, from
    :func:`hnm.losses.semihard_margin_sums` / ``all_triplets_margin_sums`` on the live
    B x M similarity matrix."""
    emb, ref = _masked_pairs(embeddings, labels, normalize, axis_name, memory, pos_mask,
                             neg_mask)
    pr = ref.pairs
    sim = _common.similarity_matrix(emb, pr.ref, distance)
    kw = dict(query_offset=pr.query_offset, margin=margin, pos_mask=pr.pos_mask,
              neg_mask=pr.neg_mask)
    i32 = jnp.int32
    if kind == "semihard":
        st = losses.semihard_margin_sums(sim, **kw)
        return _Sums(jnp.sum(st.loss_sum), jnp.sum(st.num_pairs, dtype=i32),
                     jnp.sum(st.num_active, dtype=i32), jnp.sum(st.num_hard, dtype=i32),
                     jnp.sum(st.sum_sim_ap), jnp.sum(st.sum_sim_an)), ref
    at = losses.all_triplets_margin_sums(sim, **kw)
    stop = jax.lax.stop_gradient(sim)
    pos, neg = pr.pos_mask, pr.neg_mask
    npos = jnp.sum(pos, axis=1).astype(sim.dtype)
    nneg = jnp.sum(neg, axis=1).astype(sim.dtype)
    # Over every triplet: s_ap repeats once per negative, s_an once per positive.
    sum_ap = jnp.sum(nneg * jnp.sum(jnp.where(pos, stop, 0.0), axis=1))
    sum_an = jnp.sum(npos * jnp.sum(jnp.where(neg, stop, 0.0), axis=1))
    return _Sums(jnp.sum(at.loss_sum), jnp.sum(at.num_triplets, dtype=i32),
                 jnp.sum(at.num_active, dtype=i32), jnp.sum(at.num_hard, dtype=i32),
                 sum_ap, sum_an), ref


def _chosen_similarities(emb, ref, mined, distance):
    """Live similarities of the chosen pairs from gathered rows (O(A D) backward)."""
    rowwise = _common.kernel(distance).rowwise
    return (rowwise(emb, ref.rows(mined.positive)), rowwise(emb, ref.rows(mined.negative)))


def _official_triplets(embeddings, labels, axis_name, rule, duplicate_threshold,
                       memory=None, block_size=0, pos_mask=None, neg_mask=None):
    """Mining and S_ap / S_an exactly as ``littleredxh/HardNegative`` ``_code/Loss.py``.

    x / max(||x||, 1e-12); stopped cosines for the choice (self-pairs excluded), the rule of
    :func:`hnm.miners.mine_easy_positive_hard_negative` (``rule="easy_hard"``) or
    ``mine_easy_positive_semihard_negative`` (``"easy_semihard"``), computed tile by tile
    (:func:`hnm.streaming.mine_per_anchor`); an anchor counts only when a positive and a
    negative were found and both chosen values lie strictly inside (-1, 1) (the official
    code marks "none found" with -1, so a chosen cosine of exactly -1, or a negative
    duplicate at 1, also invalidates the anchor).
    """
    if _custom(labels, pos_mask, neg_mask):
        emb, ref, mined = _mine_masked(embeddings, labels, True, axis_name, memory, pos_mask,
                                       neg_mask, rule, "cosine", duplicate_threshold)
    else:
        emb, labels, ref = _prepare(embeddings, labels, True, axis_name, memory)
        mined = streaming.mine_per_anchor(emb, labels, ref, rule, distance="cosine",
                                          duplicate_threshold=duplicate_threshold,
                                          block_size=_block(block_size))
    inside = ((jnp.abs(mined.sim_ap) < VALID_SIM_BOUND)
              & (jnp.abs(mined.sim_an) < VALID_SIM_BOUND))
    valid = mined.valid & inside
    sim_ap, sim_an = _chosen_similarities(emb, ref, mined, "cosine")
    return sim_ap, sim_an, valid, ref


def _soft_objective(embeddings, labels, axis_name, rule, temperature, duplicate_threshold,
                    memory, block_size, pos_mask, neg_mask):
    sim_ap, sim_an, valid, ref = _official_triplets(embeddings, labels, axis_name, rule,
                                                    duplicate_threshold, memory, block_size,
                                                    pos_mask, neg_mask)
    per_triplet = losses.soft_triplet_loss(sim_ap, sim_an, temperature=temperature)
    loss = _common.reduce(per_triplet, valid, "mean", axis_name)
    return _finish(loss, _common.triplet_aux(sim_ap, sim_an, per_triplet, valid, loss,
                                                    axis_name), ref)


def ephn(embeddings: ArrayLike, labels: ArrayLike | None = None,
         key: jax.Array | None = None, *, axis_name: str | None = None,
         memory: Memory | None = None, pos_mask: ArrayLike | None = None,
         neg_mask: ArrayLike | None = None,
         temperature: ArrayLike = losses.TEMPERATURE,
         duplicate_threshold: float = miners.DUPLICATE_THRESHOLD,
         block_size: int = 0) -> tuple[jax.Array, Aux]:
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
      labels: [B] integer, or None with ``pos_mask`` / ``neg_mask``.
      key: unused (deterministic); accepted for a uniform objective signature.
      axis_name: mine across devices over this ``pmap``/``shard_map`` axis.
      memory: a cross-batch memory (:mod:`hnm.memory`) whose rows join the candidates.
      pos_mask, neg_mask: bool [B, M] relevance instead of ``labels`` (module
        docstring; the dense path, ``block_size`` ignored).
      temperature: T.
      duplicate_threshold: positives with cosine above this are skipped.
      block_size: reference rows per tile; 0 picks it (:mod:`hnm.streaming`).

    Returns:
      ``(loss, aux)``: this device's share of the loss (the loss itself on one device) and
      the global statistics described in the module docstring.

    Raises:
      ValueError, TypeError: for badly shaped or typed ``embeddings`` / ``labels``.

    Examples:
      Four unit vectors, classes {0, 1} and {2, 3}. Anchor 1's positive (cosine 0.6) is less
      similar than its negative 2 (0.8): hard; anchor 2 ties (0.8 and 0.8): not hard. The loss
      is the mean of softplus(-6), softplus(2), softplus(0), softplus(-5.2):

      >>> import jax.numpy as jnp
      >>> emb = jnp.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
      >>> loss, aux = ephn(emb, jnp.array([0, 0, 1, 1]))
      >>> round(float(loss), 4), float(aux["frac_hard"])
      (0.707, 0.25)

    References:
      Xuan et al. Hard Negative Examples are Hard, but Useful. ECCV 2020.
    """
    del key
    return _soft_objective(embeddings, labels, axis_name,
                           "easy_hard", temperature, duplicate_threshold, memory,
                           block_size, pos_mask, neg_mask)


def epshn(embeddings: ArrayLike, labels: ArrayLike | None = None,
          key: jax.Array | None = None, *, axis_name: str | None = None,
          memory: Memory | None = None, pos_mask: ArrayLike | None = None,
          neg_mask: ArrayLike | None = None,
          temperature: ArrayLike = losses.TEMPERATURE,
          duplicate_threshold: float = miners.DUPLICATE_THRESHOLD,
         block_size: int = 0) -> tuple[jax.Array, Aux]:
    r"""Easy-positive / semi-hard-negative soft triplet loss (official ``shn`` setting).

    As :func:`ephn`, with the negative of
    :func:`hnm.miners.mine_easy_positive_semihard_negative` (the most similar negative not
    more similar than the chosen positive).

    .. math::
        L = \frac{1}{|V|} \sum_{a \in V}
            \operatorname{softplus}\!\Big(\frac{S_{an(a)} - S_{ap(a)}}{T}\Big)

    Args:
      embeddings: [B, D] floating.
      labels: [B] integer, or None with ``pos_mask`` / ``neg_mask``.
      key: unused.
      axis_name: mine across devices over this axis.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
      pos_mask, neg_mask: bool [B, M] relevance instead of ``labels`` (module
        docstring; the dense path, ``block_size`` ignored).
      temperature: T.
      duplicate_threshold: positives with cosine above this are skipped.
      block_size: reference rows per tile; 0 picks it (:mod:`hnm.streaming`).

    Returns:
      ``(loss, aux)``.

    Raises:
      ValueError, TypeError: for badly shaped or typed ``embeddings`` / ``labels``.

    References:
      Xuan et al. Hard Negative Examples are Hard, but Useful. ECCV 2020.
    """
    del key
    return _soft_objective(embeddings, labels, axis_name,
                           "easy_semihard", temperature, duplicate_threshold, memory,
                           block_size, pos_mask, neg_mask)


def sct(embeddings: ArrayLike, labels: ArrayLike | None = None,
        key: jax.Array | None = None, *, axis_name: str | None = None,
        memory: Memory | None = None, pos_mask: ArrayLike | None = None,
        neg_mask: ArrayLike | None = None,
        temperature: ArrayLike = losses.TEMPERATURE, hard_weight: ArrayLike = 1.0,
        hard_threshold: ArrayLike = losses.HARD_THRESHOLD, hard_rule: str = "or",
        normalization: str = "joint",
        duplicate_threshold: float = miners.DUPLICATE_THRESHOLD,
        block_size: int = 0) -> tuple[jax.Array, Aux]:
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
      ``hard_rule="and", hard_threshold=0.5, normalization="separate"``;
    * the paper's rule (ECCV 2020, §4: a triplet is hard when :math:`S_{an} > S_{ap}`, no
      threshold): ``hard_rule="or", hard_threshold=1.0, normalization="joint"`` (with the
      threshold at 1 the "or" term :math:`S_{an} > 1` never fires).

    :data:`SCT_PRESETS` holds the three by name: ``objectives.get("sct",
    **objectives.SCT_PRESETS["paper"])``.

    Both use ``temperature=0.1``, ``hard_weight=1`` and ``duplicate_threshold=0.9999``.

    Args:
      embeddings: [B, D] floating.
      labels: [B] integer, or None with ``pos_mask`` / ``neg_mask``.
      key: unused.
      axis_name: mine across devices over this axis; the joint divisor is then the global
        :math:`|E| + |H|`.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
      pos_mask, neg_mask: bool [B, M] relevance instead of ``labels`` (module
        docstring; the dense path, ``block_size`` ignored).
      temperature: T of the easy term.
      hard_weight: :math:`\lambda`.
      hard_threshold: t of the hard rule.
      hard_rule: ``"or"`` or ``"and"``.
      normalization: ``"joint"`` or ``"separate"``.
      duplicate_threshold: positives with cosine above this are skipped.
      block_size: reference rows per tile; 0 picks it (:mod:`hnm.streaming`).

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
    sim_ap, sim_an, valid, ref = _official_triplets(
        embeddings, labels, axis_name, "easy_hard", duplicate_threshold, memory, block_size,
        pos_mask, neg_mask)
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
    return _finish(loss, aux, ref)


# ---------------------------------------------------------------------------------------------
# Hinge objectives (Hermans batch-hard, FaceNet/TFA semi-hard, all triplets).


def _normalizes(distance: str, normalize: bool) -> bool:
    """Whether the rows are L2-normalised: on request, and always for cosine."""
    return normalize or distances.similarity(distance).unit_rows


def _check_metric_options(distance: str, reduction: str | None = None) -> None:
    distances.similarity(distance, "distance")
    if reduction is not None:
        _checks.check_choice(reduction, "reduction", REDUCTIONS)


def batch_hard(embeddings: ArrayLike, labels: ArrayLike | None = None,
               key: jax.Array | None = None, *, axis_name: str | None = None,
               memory: Memory | None = None, pos_mask: ArrayLike | None = None,
               neg_mask: ArrayLike | None = None,
               margin: ArrayLike = 0.2, distance: str = "euclidean", normalize: bool = True,
               soft: bool = False, reduction: str = "mean",
               block_size: int = 0) -> tuple[jax.Array, Aux]:
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
      labels: [B] integer, or None with ``pos_mask`` / ``neg_mask``.
      key: unused.
      axis_name: mine across devices over this axis.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
      pos_mask, neg_mask: bool [B, M] relevance instead of ``labels`` (module
        docstring; the dense path, ``block_size`` ignored).
      margin: m, in units of the chosen distance.
      distance: a name of :data:`hnm.distances.SIMILARITIES`: ``"euclidean"``, ``"cosine"``
        (always on normalised rows), ``"squared_euclidean"`` or ``"dot"``.
      normalize: L2-normalise the embeddings first.
      soft: soft margin instead of the hinge.
      reduction: ``"mean"`` or ``"avg_nonzero"``.
      block_size: reference rows per tile; 0 picks it (:mod:`hnm.streaming`).

    Returns:
      ``(loss, aux)``.

    Raises:
      ValueError, TypeError: for bad ``embeddings`` / ``labels`` or unknown option values.

    References:
      Hermans, Beyer, Leibe. In Defense of the Triplet Loss. arXiv 1703.07737, 2017.
    """
    del key
    _check_metric_options(distance, reduction)
    if _custom(labels, pos_mask, neg_mask):
        emb, ref, mined = _mine_masked(embeddings, labels, _normalizes(distance, normalize),
                                       axis_name, memory, pos_mask, neg_mask, "hardest",
                                       distance)
    else:
        emb, labels, ref = _prepare(embeddings, labels, _normalizes(distance, normalize),
                                    axis_name, memory)
        # Stopped tiles for the choice; the loss recomputes only the chosen pairs.
        mined = streaming.mine_per_anchor(emb, labels, ref, "hardest", distance=distance,
                                          block_size=_block(block_size))
    sim_ap, sim_an = _chosen_similarities(emb, ref, mined, distance)
    t = mined
    if soft:
        per_triplet = losses.soft_triplet_loss(sim_ap, sim_an, temperature=1.0)
    else:
        per_triplet = losses.triplet_margin_loss(sim_ap, sim_an, margin=margin)
    loss = _common.reduce(per_triplet, t.valid, reduction, axis_name)
    return _finish(
        loss, _common.triplet_aux(sim_ap, sim_an, per_triplet, t.valid, loss, axis_name), ref)


def _hinge_sums(kind, embeddings, labels, normalize, axis_name, memory, pos_mask, neg_mask,
                margin, distance, block_size):
    """``(sums, ref)`` of the ``semihard`` / ``batch_all`` hinge: dense with custom masks,
    else streamed over the reference rows (:mod:`hnm.streaming`)."""
    if _custom(labels, pos_mask, neg_mask):
        return _dense_hinge_sums(kind, embeddings, labels, normalize, axis_name, memory,
                                 pos_mask, neg_mask, margin, distance)
    emb, labels, ref = _prepare(embeddings, labels, normalize, axis_name, memory)
    sums = {"semihard": streaming.semihard_sums, "batch_all": streaming.batch_all_sums}[kind]
    return sums(emb, labels, ref, margin=margin, distance=distance,
                block_size=_block(block_size)), ref


def semihard(embeddings: ArrayLike, labels: ArrayLike | None = None,
             key: jax.Array | None = None, *, axis_name: str | None = None,
             memory: Memory | None = None, pos_mask: ArrayLike | None = None,
             neg_mask: ArrayLike | None = None,
             margin: ArrayLike = 0.2, distance: str = "euclidean",
             normalize: bool = True, block_size: int = 0) -> tuple[jax.Array, Aux]:
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
      labels: [B] integer, or None with ``pos_mask`` / ``neg_mask``.
      key: unused.
      axis_name: mine across devices over this axis.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
      pos_mask, neg_mask: bool [B, M] relevance instead of ``labels`` (module
        docstring; the dense path, ``block_size`` ignored).
      margin: m.
      distance: a name of :data:`hnm.distances.SIMILARITIES` (``"euclidean"`` is TFA's
        ``"L2"``).
      normalize: L2-normalise the embeddings first.
      block_size: reference rows per tile; 0 picks it (:mod:`hnm.streaming`).

    Returns:
      ``(loss, aux)``; ``num_valid`` counts anchor-positive pairs.

    Raises:
      ValueError, TypeError: for bad ``embeddings`` / ``labels`` or unknown option values.

    References:
      Schroff, Kalenichenko, Philbin. FaceNet. CVPR 2015.
    """
    del key
    _check_metric_options(distance)
    st, ref = _hinge_sums("semihard", embeddings, labels, _normalizes(distance, normalize),
                          axis_name, memory, pos_mask, neg_mask, margin, distance, block_size)
    loss = distances.global_mean_of(st.loss_sum, st.num, axis_name)
    s = _common.global_stats(axis_name, n=st.num, hard=st.num_hard, ap=st.sum_ap,
                             an=st.sum_an, active=st.num_active, loss=loss)
    return _finish(loss, _common.aux_from_stats(s), ref)


def batch_all(embeddings: ArrayLike, labels: ArrayLike | None = None,
              key: jax.Array | None = None, *, axis_name: str | None = None,
              memory: Memory | None = None, pos_mask: ArrayLike | None = None,
              neg_mask: ArrayLike | None = None,
              margin: ArrayLike = 0.2, distance: str = "euclidean", normalize: bool = True,
              reduction: str = "avg_nonzero",
              block_size: int = 0) -> tuple[jax.Array, Aux]:
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
      labels: [B] integer, or None with ``pos_mask`` / ``neg_mask``.
      key: unused.
      axis_name: mine across devices over this axis.
      memory: a cross-batch memory whose rows join the candidates (not the anchors).
      pos_mask, neg_mask: bool [B, M] relevance instead of ``labels`` (module
        docstring; the dense path, ``block_size`` ignored).
      margin: m.
      distance: a name of :data:`hnm.distances.SIMILARITIES`.
      normalize: L2-normalise the embeddings first.
      reduction: ``"avg_nonzero"`` (default) or ``"mean"``.
      block_size: reference rows per tile; 0 picks it (:mod:`hnm.streaming`).

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
    at, ref = _hinge_sums("batch_all", embeddings, labels, _normalizes(distance, normalize),
                          axis_name, memory, pos_mask, neg_mask, margin, distance, block_size)
    count = at.num_active if reduction == "avg_nonzero" else at.num
    loss = distances.global_mean_of(at.loss_sum, count, axis_name)
    # Means over every triplet: s_ap repeats once per negative, s_an once per positive.
    s = _common.global_stats(axis_name, n=at.num, hard=at.num_hard, ap=at.sum_ap,
                             an=at.sum_an, active=at.num_active, loss=loss)
    return _finish(loss, _common.aux_from_stats(s), ref)


_DISTANCE = _checks.choice(tuple(distances.SIMILARITIES))
_BLOCK = _checks.integer(ge=0)  # 0: automatic (hnm.streaming.auto_block)
_OFFICIAL = dict(temperature=_checks.POSITIVE, duplicate_threshold=_checks.REAL,
                 block_size=_BLOCK)
# What each option accepts (checked by hnm.objectives.get / check_options before compiling).
# The SCT settings of the two official code releases and of the paper's text (see :func:`sct`).
SCT_PRESETS: dict[str, dict[str, Any]] = {
    "official": dict(hard_rule="or", hard_threshold=0.8, normalization="joint"),
    "first_release": dict(hard_rule="and", hard_threshold=0.5, normalization="separate"),
    "paper": dict(hard_rule="or", hard_threshold=1.0, normalization="joint"),
}


OPTION_SPECS: dict[str, dict[str, _checks.OptionSpec]] = {
    "ephn": _OFFICIAL,
    "epshn": _OFFICIAL,
    "sct": dict(_OFFICIAL, hard_weight=_checks.NON_NEGATIVE, hard_threshold=_checks.REAL,
                hard_rule=_checks.choice(losses.HARD_RULES),
                normalization=_checks.choice(NORMALIZATIONS)),
    "batch_hard": dict(margin=_checks.NON_NEGATIVE, distance=_DISTANCE, normalize=_checks.BOOL,
                       soft=_checks.BOOL, reduction=_checks.choice(REDUCTIONS),
                       block_size=_BLOCK),
    "semihard": dict(margin=_checks.NON_NEGATIVE, distance=_DISTANCE, normalize=_checks.BOOL,
                     block_size=_BLOCK),
    "batch_all": dict(margin=_checks.NON_NEGATIVE, distance=_DISTANCE, normalize=_checks.BOOL,
                      reduction=_checks.choice(REDUCTIONS), block_size=_BLOCK),
}

OBJECTIVES: dict[str, _common.Objective] = {
    "batch_all": batch_all,
    "batch_hard": batch_hard,
    "ephn": ephn,
    "epshn": epshn,
    "sct": sct,
    "semihard": semihard,
}
