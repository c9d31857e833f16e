r"""Static-shape triplet miners: one padded row per anchor plus a ``valid`` mask.

Every miner takes a similarity matrix ``sim`` [A, M] (larger means closer, ``STYLE.md`` §3)
of A query rows (anchors) against M reference rows, the anchors' ``labels`` [A] and the
reference ``ref_labels`` [M] (default: ``labels``, i.e. the batch against itself), and
``query_offset``, the row of anchor 0 inside the reference set, which removes the self-pairs
when the reference set is the ``all_gather`` of every device's batch.

Miners *choose*; they never differentiate the choice. Each one looks at
``jax.lax.stop_gradient(sim)`` and returns integer indices, so gradients flow only through
:func:`gather_sims` (or through a recomputation of the chosen similarities) on the live matrix.

**Custom relevance.** Every miner also accepts, instead of ``labels`` / ``ref_labels``,
explicit ``pos_mask`` / ``neg_mask`` (bool [A, M], the shape of ``sim``), so that multi-label
data and hierarchies work. Both masks must be given, and labels then must not be (a
``ValueError`` names the conflict: the two relevances could disagree). The self-pair (column
``i + query_offset`` of row ``i``) is removed from ``pos_mask`` whatever the caller passes, and
an entry in both masks is a positive only. Integer labels stay the simple path
(:func:`hnm.distances.label_masks` builds the same masks from them).

Padding rows (``valid == False``) hold in-range indices (the ``argmax`` of an all-masked row is
0), so gathers never go out of bounds; their values are garbage and must be masked.

Besides the per-anchor triplet miners: :func:`mine_multi_similarity` (pair masks, Wang et al.)
and distance-weighted sampling (:func:`distance_weighted_log_weights`,
:func:`sample_distance_weighted`, :func:`mine_distance_weighted`; Wu et al.), whose sampling
takes ``key`` first, like ``jax.random``.

References:
  Hermans, Beyer, Leibe. In Defense of the Triplet Loss for Person Re-Identification. 2017.
  Schroff, Kalenichenko, Philbin. FaceNet. CVPR 2015 (semi-hard negatives).
  Xuan, Stylianou, Liu, Pless. Hard Negative Examples are Hard, but Useful. ECCV 2020
  (easy-positive / hard-negative mining; official code ``littleredxh/HardNegative``).
  Wang, Han, Huang, Dong, Scott. Multi-Similarity Loss with General Pair Weighting. CVPR 2019.
  Wu, Manmatha, Smola, Krähenbühl. Sampling Matters in Deep Embedding Learning. ICCV 2017.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from hnm import _checks
from hnm import distances
from hnm.distances import label_masks

DUPLICATE_THRESHOLD = 0.9999  # official SCT code: positives above this are near-duplicates


class Triplets(NamedTuple):
    """Mined triplets, one per anchor row. All four fields share one shape, [A] or [A, K]."""
    anchor: jax.Array    # int32, index into the query batch
    positive: jax.Array  # int32, index into the reference batch
    negative: jax.Array  # int32, index into the reference batch
    valid: jax.Array     # bool; False rows are padding and must not count


def _prepare(sim: ArrayLike, labels: ArrayLike | None, ref_labels: ArrayLike | None,
             query_offset: ArrayLike, pos_mask: ArrayLike | None = None,
             neg_mask: ArrayLike | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Checks the arguments; returns the stopped similarity and the (pos, neg) masks, from
    labels or from the caller's masks (:func:`_relevance`)."""
    if pos_mask is not None or neg_mask is not None or labels is None:
        return _relevance(sim, labels, ref_labels, query_offset, pos_mask, neg_mask)
    sim = jnp.asarray(sim)
    labels = jnp.asarray(labels)
    ref_labels = labels if ref_labels is None else jnp.asarray(ref_labels)
    _checks.check_sim(sim, labels, ref_labels)
    pos_mask, neg_mask = label_masks(labels, ref_labels, query_offset=query_offset)
    # stop_gradient: choosing a triplet is not differentiated; only the chosen entries are.
    return jax.lax.stop_gradient(sim), pos_mask, neg_mask


def _masked_argmax(sim: jax.Array, mask: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row-wise argmax over ``mask``: ``(index, value, found)``, first index on ties.

    ``lax.top_k(., 1)`` instead of ``argmax``: XLA:CPU lowers ``argmax`` to a slow variadic
    reduction (about 10x slower at 2048 x 2048); TopK keeps the lower index on ties, like
    ``argmax``. A row with nothing in ``mask`` gives index 0 (in range), value ``-inf`` and
    ``found`` False.
    """
    values, idx = jax.lax.top_k(jnp.where(mask, sim, -jnp.inf), 1)
    value = values[..., 0]
    return idx[..., 0].astype(jnp.int32), value, value > -jnp.inf


def _anchors(sim: jax.Array) -> jax.Array:
    return jnp.arange(sim.shape[0], dtype=jnp.int32)


def mine_hardest(sim: ArrayLike, labels: ArrayLike | None = None,
                 ref_labels: ArrayLike | None = None, *, query_offset: ArrayLike = 0,
                 pos_mask: ArrayLike | None = None,
                 neg_mask: ArrayLike | None = None) -> Triplets:
    r"""Batch-hard mining: the least similar positive and the most similar negative.

    .. math::
        p(a) = \arg\min_{p:\, y_p = y_a,\, p \ne a} S_{ap}, \qquad
        n(a) = \arg\max_{n:\, y_n \ne y_a} S_{an}

    Ties go to the first index (``jnp.argmin``/``argmax``), as PML's ``BatchHardMiner``.

    Args:
      sim: similarities [A, M] (larger is closer).
      labels: integer labels of the anchors, [A].
      ref_labels: integer labels of the reference rows, [M]; defaults to ``labels``.
      query_offset: row of anchor 0 in the reference set (excludes self-pairs).
      pos_mask, neg_mask: bool [A, M] relevance instead of ``labels`` / ``ref_labels``
        (both or neither; see the module docstring).

    Returns:
      :class:`Triplets` with fields of shape [A]; ``valid`` is false for anchors without a
      positive or without a negative.

    Raises:
      ValueError, TypeError: for wrongly shaped or typed arguments (the message names them).

    Examples:
      >>> sim = jnp.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.5], [0.1, 0.5, 1.0]])
      >>> t = mine_hardest(sim, jnp.array([0, 0, 1]))
      >>> t.positive.tolist(), t.negative.tolist(), t.valid.tolist()
      ([1, 0, 0], [2, 2, 1], [True, True, False])

    References:
      Hermans, Beyer, Leibe. In Defense of the Triplet Loss. arXiv 1703.07737, 2017.
    """
    sim, pos_mask, neg_mask = _prepare(sim, labels, ref_labels, query_offset, pos_mask,
                                       neg_mask)
    pos, _, has_pos = _masked_argmax(-sim, pos_mask)
    neg, _, has_neg = _masked_argmax(sim, neg_mask)
    return Triplets(_anchors(sim), pos, neg, has_pos & has_neg)


def _easy_positive(sim: jax.Array, pos_mask: jax.Array, duplicate_threshold: float
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    # Near-duplicates (sim > threshold) teach nothing and make the softmax degenerate.
    return _masked_argmax(sim, pos_mask & (sim <= duplicate_threshold))


def mine_easy_positive_hard_negative(
        sim: ArrayLike, labels: ArrayLike | None = None, ref_labels: ArrayLike | None = None,
        *, query_offset: ArrayLike = 0, duplicate_threshold: float = DUPLICATE_THRESHOLD,
        pos_mask: ArrayLike | None = None, neg_mask: ArrayLike | None = None) -> Triplets:
    r"""Easy-positive / hard-negative mining (EPHN, the official SCT code).

    .. math::
        p(a) = \arg\max_{p:\, y_p = y_a,\, p \ne a,\, S_{ap} \le \tau} S_{ap}, \qquad
        n(a) = \arg\max_{n:\, y_n \ne y_a} S_{an}

    with :math:`\tau` = ``duplicate_threshold`` (positives with :math:`S_{ap} > \tau` are
    skipped as near-duplicates). The official code's extra validity rule for cosine
    similarity (both chosen values strictly inside (-1, 1)) is applied by the ``ephn``/``sct``
    objectives, not here, because this miner accepts any similarity.

    Args:
      sim: similarities [A, M] (larger is closer).
      labels: integer labels of the anchors, [A].
      ref_labels: integer labels of the reference rows, [M]; defaults to ``labels``.
      query_offset: row of anchor 0 in the reference set (excludes self-pairs).
      duplicate_threshold: :math:`\tau`; positives more similar than this are ignored.
      pos_mask, neg_mask: bool [A, M] relevance instead of ``labels`` / ``ref_labels``
        (both or neither; see the module docstring).

    Returns:
      :class:`Triplets` with fields of shape [A]; ``valid`` is false for anchors without an
      eligible positive or without a negative.

    Raises:
      ValueError, TypeError: for wrongly shaped or typed arguments (the message names them).

    Examples:
      >>> sim = jnp.array([[1.0, 0.99999, 0.5, 0.7],
      ...                  [0.99999, 1.0, 0.6, 0.2],
      ...                  [0.5, 0.6, 1.0, 0.1],
      ...                  [0.7, 0.2, 0.1, 1.0]])
      >>> t = mine_easy_positive_hard_negative(sim, jnp.array([0, 0, 0, 1]))
      >>> t.positive.tolist(), t.negative.tolist(), t.valid.tolist()
      ([2, 2, 1, 0], [3, 3, 3, 0], [True, True, True, False])

    References:
      Xuan, Stylianou, Liu, Pless. Hard Negative Examples are Hard, but Useful. ECCV 2020.
    """
    sim, pos_mask, neg_mask = _prepare(sim, labels, ref_labels, query_offset, pos_mask,
                                       neg_mask)
    pos, _, has_pos = _easy_positive(sim, pos_mask, duplicate_threshold)
    neg, _, has_neg = _masked_argmax(sim, neg_mask)
    return Triplets(_anchors(sim), pos, neg, has_pos & has_neg)


def mine_easy_positive_semihard_negative(
        sim: ArrayLike, labels: ArrayLike | None = None, ref_labels: ArrayLike | None = None,
        *, query_offset: ArrayLike = 0, duplicate_threshold: float = DUPLICATE_THRESHOLD,
        pos_mask: ArrayLike | None = None, neg_mask: ArrayLike | None = None) -> Triplets:
    r"""Easy-positive / semi-hard-negative mining (EPSHN, the official ``shn`` setting).

    The positive is chosen as in :func:`mine_easy_positive_hard_negative`; the negative is the
    most similar one *not more similar* than that positive:

    .. math:: n(a) = \arg\max_{n:\, y_n \ne y_a,\, S_{an} \le S_{a p(a)}} S_{an}

    Like the official code (which masks out negatives with ``S_an > S_ap``), a negative exactly
    as similar as the positive is kept. Anchors whose negatives are all more similar than the
    positive are invalid.

    Args:
      sim: similarities [A, M] (larger is closer).
      labels: integer labels of the anchors, [A].
      ref_labels: integer labels of the reference rows, [M]; defaults to ``labels``.
      query_offset: row of anchor 0 in the reference set (excludes self-pairs).
      duplicate_threshold: positives more similar than this are ignored.
      pos_mask, neg_mask: bool [A, M] relevance instead of ``labels`` / ``ref_labels``
        (both or neither; see the module docstring).

    Returns:
      :class:`Triplets` with fields of shape [A].

    Raises:
      ValueError, TypeError: for wrongly shaped or typed arguments (the message names them).

    Examples:
      >>> sim = jnp.array([[1.0, 0.5, 0.7, 0.4], [0.5, 1.0, 0.2, 0.3],
      ...                  [0.7, 0.2, 1.0, 0.0], [0.4, 0.3, 0.0, 1.0]])
      >>> t = mine_easy_positive_semihard_negative(sim, jnp.array([0, 0, 1, 1]))
      >>> t.negative.tolist(), t.valid.tolist()
      ([3, 3, 0, 0], [True, True, False, False])

    References:
      Xuan, Stylianou, Liu, Pless. Hard Negative Examples are Hard, but Useful. ECCV 2020.
    """
    sim, pos_mask, neg_mask = _prepare(sim, labels, ref_labels, query_offset, pos_mask,
                                       neg_mask)
    # A row without a positive has sim_ap = -inf, hence no semi-hard candidate either.
    pos, sim_ap, has_pos = _easy_positive(sim, pos_mask, duplicate_threshold)
    neg, _, has_neg = _masked_argmax(sim, neg_mask & (sim <= sim_ap[:, None]))
    return Triplets(_anchors(sim), pos, neg, has_pos & has_neg)


def fold_positives(pos_mask: jax.Array,
                   fn: Callable[[Any, jax.Array, jax.Array, jax.Array], Any], init: Any) -> Any:
    """Folds ``fn`` over the positive "slots" of every anchor.

    Step k calls ``carry = fn(carry, sel, idx, found)`` where ``idx`` [A] is the column of
    the k-th positive (by column order) of each anchor, ``found`` [A] whether the anchor has
    more than k positives (else ``idx`` is a valid dummy column), and ``sel`` [A, M] the
    one-hot of ``idx`` on rows with ``found``. The number of steps is the largest number of
    positives of an anchor (K - 1 on a P x K batch), so an ``fn`` doing O(A M) work costs
    O(A M K) time and O(A M) memory: the all-pairs methods never build an [A, M, M] array.
    (It replaces a per-row sort + binary search: XLA:CPU's sort takes ~0.7 s on a
    2048 x 2048 matrix, far longer than the whole loss should.)

    Run it on stopped (non-differentiated) values; ``lax.while_loop`` has no reverse-mode
    rule.

    Args:
      pos_mask: bool [A, M].
      fn: ``(carry, sel, idx, found) -> carry``.
      init: the initial carry (a pytree of arrays).

    Returns:
      The final carry.
    """
    num_cols = pos_mask.shape[-1]
    cols = jnp.arange(num_cols, dtype=jnp.int32)
    num_steps = jnp.max(jnp.sum(pos_mask, axis=-1, dtype=jnp.int32))

    def body(state):
        step, prev, carry = state
        # The next positive after the previous one: no [A, M] "remaining" mask is carried.
        nxt = jnp.min(jnp.where(pos_mask & (cols > prev[..., None]), cols, num_cols), axis=-1)
        found = nxt < num_cols
        idx = jnp.minimum(nxt, num_cols - 1)
        sel = (cols == nxt[..., None])
        return step + 1, nxt, fn(carry, sel, idx, found)

    prev = jnp.full(pos_mask.shape[:-1], -1, jnp.int32)
    # Inside shard_map the body's outputs vary over the device axes the data varies over; the
    # loop carry must start out just as varying.
    prev, init = distances.vary_like((prev, init), pos_mask)
    state = (jnp.zeros((), jnp.int32), prev, init)
    return jax.lax.while_loop(lambda state: state[0] < num_steps, body, state)[2]


def semihard_negative(sim: jax.Array, neg_mask: jax.Array, sim_ap: jax.Array,
                      fallback: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """One semi-hard negative per row: the most similar with ``sim < sim_ap``, else fallback.

    Args:
      sim: stopped similarities [A, M].
      neg_mask: bool [A, M].
      sim_ap: [A, 1] the positive's similarity of each row.
      fallback: ``(index [A], value [A])`` used where no negative is below ``sim_ap`` (the
        least similar negative, for the TFA rule).

    Returns:
      ``(index [A] int32, value [A])``.
    """
    idx, value, found = _masked_argmax(sim, neg_mask & (sim < sim_ap))
    return jnp.where(found, idx, fallback[0]), jnp.where(found, value, fallback[1])


def least_similar(sim: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row-wise argmin over ``mask``: ``(index, value, found)``, first index on ties."""
    idx, neg_value, found = _masked_argmax(-sim, mask)
    return idx, -neg_value, found


def mine_semihard(sim: ArrayLike, labels: ArrayLike | None = None,
                  ref_labels: ArrayLike | None = None, *, query_offset: ArrayLike = 0,
                  pos_mask: ArrayLike | None = None,
                  neg_mask: ArrayLike | None = None) -> Triplets:
    r"""Semi-hard negatives for *every* anchor-positive pair (TensorFlow Addons semantics).

    For each pair (a, p) the negative is the most similar one that is strictly less similar
    than the positive; when there is none, the least similar negative of the anchor:

    .. math::
        n(a, p) = \begin{cases}
          \arg\max_{n:\, S_{an} < S_{ap}} S_{an} & \text{if such } n \text{ exists} \\
          \arg\min_{n} S_{an} & \text{otherwise}
        \end{cases}

    In distances this is FaceNet's semi-hard rule ("closest negative farther than the
    positive, else the farthest negative"); the margin plays no part in the choice. Cost:
    O(A M) per positive slot (:func:`fold_positives`), O(A M) memory.

    Args:
      sim: similarities [A, M] (larger is closer).
      labels: integer labels of the anchors, [A].
      ref_labels: integer labels of the reference rows, [M]; defaults to ``labels``.
      query_offset: row of anchor 0 in the reference set (excludes self-pairs).
      pos_mask, neg_mask: bool [A, M] relevance instead of ``labels`` / ``ref_labels``
        (both or neither; see the module docstring).

    Returns:
      :class:`Triplets` with fields of shape [A, M]: entry (a, j) is the triplet with
      positive j; ``valid`` = j is a positive of a and a has at least one negative.

    Raises:
      ValueError, TypeError: for wrongly shaped or typed arguments (the message names them).

    Examples:
      >>> sim = jnp.array([[1.0, 0.5, 0.6, 0.7], [0.5, 1.0, 0.4, 0.3],
      ...                  [0.6, 0.4, 1.0, 0.9], [0.7, 0.3, 0.9, 1.0]])
      >>> t = mine_semihard(sim, jnp.array([0, 0, 1, 1]))
      >>> t.negative[1, 0].item(), t.negative[2, 3].item()   # below the positive
      (2, 0)
      >>> t.negative[0, 1].item()   # none below 0.5: the least similar negative
      2
      >>> t.valid[0].tolist()
      [False, True, False, False]

    References:
      Schroff, Kalenichenko, Philbin. FaceNet. CVPR 2015;
      TensorFlow Addons ``tfa.losses.TripletSemiHardLoss``.
    """
    sim, pos_mask, neg_mask = _prepare(sim, labels, ref_labels, query_offset, pos_mask,
                                       neg_mask)
    far_idx, far_value, has_neg = least_similar(sim, neg_mask)

    def choose(negative, sel, pos_idx, _):
        sim_ap = jnp.take_along_axis(sim, pos_idx[:, None], axis=1)
        idx, _ = semihard_negative(sim, neg_mask, sim_ap, (far_idx, far_value))
        return jnp.where(sel, idx[:, None], negative)

    negative = fold_positives(pos_mask, choose, jnp.zeros(sim.shape, jnp.int32))
    anchor = jnp.broadcast_to(_anchors(sim)[:, None], sim.shape)
    positive = jnp.broadcast_to(jnp.arange(sim.shape[1], dtype=jnp.int32), sim.shape)
    return Triplets(anchor, positive, negative, pos_mask & has_neg[:, None])


def gather_sims(sim: ArrayLike, t: Triplets) -> tuple[jax.Array, jax.Array]:
    """Differentiable ``(sim_ap, sim_an)`` of mined triplets, each shaped like ``t.anchor``.

    Args:
      sim: the live (differentiable) similarity matrix [A, M] the triplets were mined on.
      t: :class:`Triplets`.

    Returns:
      ``(sim_ap, sim_an)``, each shaped like ``t.anchor``.

    Examples:
      >>> sim = jnp.array([[1.0, 0.75, 0.25], [0.75, 1.0, 0.5], [0.25, 0.5, 1.0]])
      >>> s_ap, s_an = gather_sims(sim, mine_hardest(sim, jnp.array([0, 0, 1])))
      >>> s_ap.tolist(), s_an.tolist()
      ([0.75, 0.75, 0.25], [0.25, 0.5, 0.5])
    """
    sim = jnp.asarray(sim)
    _checks.check_floating_matrix(sim, "sim")
    return sim[t.anchor, t.positive], sim[t.anchor, t.negative]


# ------------------------------------------------------------------ pair mining
def mine_multi_similarity(sim: ArrayLike, labels: ArrayLike | None = None,
                          ref_labels: ArrayLike | None = None, *,
                          query_offset: ArrayLike = 0, epsilon: ArrayLike = 0.1,
                          pos_mask: ArrayLike | None = None,
                          neg_mask: ArrayLike | None = None) -> tuple[jax.Array, jax.Array]:
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
      pos_mask, neg_mask: bool [A, M] relevance instead of ``labels`` / ``ref_labels``
        (both or neither; see the module docstring).

    Returns:
      ``(pos_keep, neg_keep)``: bool [A, M] masks of the mined pairs.

    References:
      Wang, Han, Huang, Dong, Scott. Multi-Similarity Loss with General Pair Weighting for
      Deep Metric Learning. CVPR 2019.
    """
    # Stopped: choosing pairs is not differentiated.
    sim, pos_mask, neg_mask = _prepare(sim, labels, ref_labels, query_offset, pos_mask,
                                       neg_mask)
    max_neg = jnp.max(jnp.where(neg_mask, sim, -jnp.inf), axis=1, keepdims=True)
    min_pos = jnp.min(jnp.where(pos_mask, sim, jnp.inf), axis=1, keepdims=True)
    pos_keep = pos_mask & (sim - epsilon < max_neg)
    neg_keep = neg_mask & (sim + epsilon > min_pos)
    return pos_keep, neg_keep


# ------------------------------------------------------ distance-weighted sampling
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


def mine_distance_weighted(key: jax.Array, dist: ArrayLike, labels: ArrayLike | None = None,
                           ref_labels: ArrayLike | None = None, *, dim: int,
                           query_offset: ArrayLike = 0, cutoff: ArrayLike = 0.5,
                           nonzero_loss_cutoff: ArrayLike = 1.4,
                           pos_mask: ArrayLike | None = None,
                           neg_mask: ArrayLike | None = None) -> Triplets:
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
      pos_mask, neg_mask: bool [A, M] relevance instead of ``labels`` / ``ref_labels``
        (both or neither; see the module docstring).

    Returns:
      :class:`Triplets` with [A, M] fields.

    References:
      Wu, Manmatha, Smola, Krähenbühl. Sampling Matters in Deep Embedding Learning.
      ICCV 2017.
    """
    # A distance, not a similarity, but the masks do not care (stopped: no gradient).
    dist, pos_mask, neg_mask = _prepare(dist, labels, ref_labels, query_offset, pos_mask,
                                        neg_mask)
    log_w = distance_weighted_log_weights(dist, neg_mask, dim=dim, cutoff=cutoff,
                                          nonzero_loss_cutoff=nonzero_loss_cutoff)
    negative, has_neg = sample_distance_weighted(key, log_w, query_offset=query_offset)
    anchor = jnp.broadcast_to(jnp.arange(dist.shape[0], dtype=jnp.int32)[:, None], dist.shape)
    positive = jnp.broadcast_to(jnp.arange(dist.shape[1], dtype=jnp.int32), dist.shape)
    return Triplets(anchor, positive, negative, pos_mask & has_neg[:, None])


# ---------------------------------------------------------------------------------------------
# Margin miners (PML's TripletMarginMiner, PairMarginMiner), top-k hardest negatives and
# triplet subsampling. Every one also takes explicit relevance masks instead of labels.

TRIPLET_KINDS = ("all", "hard", "semihard", "easy")


def _relevance(sim: ArrayLike, labels: ArrayLike | None, ref_labels: ArrayLike | None,
               query_offset: ArrayLike, pos_mask: ArrayLike | None,
               neg_mask: ArrayLike | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stopped ``sim`` and ``(pos, neg)`` [A, M]: from labels, or the caller's bool masks
    (multi-label / hierarchies; see the module docstring: the self-pair ``i + query_offset``
    is removed from ``pos``, ``neg`` loses what ``pos`` keeps, labels and masks exclude each
    other)."""
    if pos_mask is None and neg_mask is None:
        if labels is None:
            raise ValueError("`labels` is required unless `pos_mask` and `neg_mask` are given.")
        return _prepare(sim, labels, ref_labels, query_offset)
    if pos_mask is None or neg_mask is None:
        raise ValueError("pass both `pos_mask` and `neg_mask`, or neither.")
    if labels is not None or ref_labels is not None:
        raise ValueError("pass either `labels` (and `ref_labels`) or `pos_mask` / `neg_mask`, "
                         "not both.")
    sim = jnp.asarray(sim)
    _checks.check_floating_matrix(sim, "sim")
    _checks.check_nonempty(sim, "sim", ("A (rows)", "M (columns)"))
    masks = []
    for mask, name in ((pos_mask, "pos_mask"), (neg_mask, "neg_mask")):
        mask = jnp.asarray(mask)
        if mask.shape != sim.shape:
            raise ValueError(f"`{name}` must have the shape of `sim` {sim.shape}; got "
                             f"{mask.shape}.")
        if mask.dtype != jnp.bool_:
            raise TypeError(f"`{name}` must be a bool array; got dtype {mask.dtype}.")
        masks.append(mask)
    rows = jnp.arange(sim.shape[0])[:, None] + query_offset
    pos = masks[0] & (rows != jnp.arange(sim.shape[1])[None, :])
    return jax.lax.stop_gradient(sim), pos, masks[1] & ~pos


def triplet_margin_mask(sim: ArrayLike, labels: ArrayLike | None = None,
                        ref_labels: ArrayLike | None = None, *, margin: ArrayLike = 0.2,
                        kind: str = "all", query_offset: ArrayLike = 0,
                        pos_mask: ArrayLike | None = None,
                        neg_mask: ArrayLike | None = None) -> jax.Array:
    r"""Every triplet (a, p, n) selected by PML's ``TripletMarginMiner``, as a dense mask.

    With the triplet margin :math:`\mu = s_{ap} - s_{an}` (similarities; for a distance
    :math:`d_{an} - d_{ap}`, the same number when ``sim = -d``):

    * ``"all"``: :math:`\mu \le m` (the triplets violating the margin);
    * ``"hard"``: :math:`\mu \le 0` (and :math:`\le m`): the negative is at least as close;
    * ``"semihard"``: :math:`0 < \mu \le m`;
    * ``"easy"``: :math:`\mu > m`.

    Equal to ``TripletMarginMiner(margin, type_of_triplets=kind)`` with ``sim = -d`` for its
    (non-inverted) distance d, or ``sim`` = its cosine similarity.

    Args:
      sim: [A, M] similarities (stopped here).
      labels: [A]; ref_labels: [M] (default ``labels``); or ``pos_mask`` / ``neg_mask``.
      margin: m.
      kind: one of :data:`TRIPLET_KINDS` (static).
      query_offset: row of anchor 0 in the reference set.
      pos_mask, neg_mask: [A, M] bool relevance instead of labels.

    Returns:
      bool [A, M, M], ``[a, p, n]``. O(A M^2) memory: for mining-sized batches; reduce it
      with :func:`sample_triplets` to fixed-size :class:`Triplets`.
    """
    _checks.check_choice(kind, "kind", TRIPLET_KINDS)
    sim, pos, neg = _relevance(sim, labels, ref_labels, query_offset, pos_mask, neg_mask)
    mu = sim[:, :, None] - sim[:, None, :]                 # [a, p, n] = s_ap - s_an
    if kind == "easy":
        keep = mu > margin
    else:
        keep = mu <= margin
        if kind == "hard":
            keep &= mu <= 0
        elif kind == "semihard":
            keep &= mu > 0
    return keep & pos[:, :, None] & neg[:, None, :]


def sample_triplets(key: jax.Array, triplet_mask: ArrayLike, triplets_per_anchor: int, *,
                    query_offset: ArrayLike = 0) -> Triplets:
    """Up to ``triplets_per_anchor`` triplets per anchor, drawn uniformly without replacement
    from a dense ``[A, M, M]`` triplet mask (PML's ``triplets_per_anchor`` subsampling).

    Gumbel top-k over each anchor's flattened valid entries; the noise of anchor row a comes
    from ``fold_in(key, query_offset + a)``, so sharding the anchors over devices (same key
    everywhere) draws what one device would. An anchor with fewer valid triplets than K gets
    them all, the other slots ``valid == False``.

    Args:
      key: a PRNG key.
      triplet_mask: bool [A, M, M] (e.g. :func:`triplet_margin_mask`).
      triplets_per_anchor: K, a static int >= 1.
      query_offset: global row of anchor 0.

    Returns:
      :class:`Triplets` with [A, K] fields.
    """
    mask = jnp.asarray(triplet_mask)
    if mask.ndim != 3 or mask.shape[1] != mask.shape[2] or mask.dtype != jnp.bool_:
        raise ValueError(f"`triplet_mask` must be bool [A, M, M]; got {mask.shape} "
                         f"{mask.dtype}.")
    k = triplets_per_anchor
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`triplets_per_anchor` must be an int >= 1; got {k!r}.")
    num_anchors, num_ref = mask.shape[0], mask.shape[1]
    flat = mask.reshape(num_anchors, -1)
    k = min(k, flat.shape[1])
    rows = query_offset + jnp.arange(num_anchors)
    noise = jax.vmap(lambda r: jax.random.gumbel(jax.random.fold_in(key, r), flat.shape[1:],
                                                 jnp.float32))(rows)
    score, idx = jax.lax.top_k(jnp.where(flat, noise, -jnp.inf), k)
    anchor = jnp.broadcast_to(jnp.arange(num_anchors, dtype=jnp.int32)[:, None], idx.shape)
    return Triplets(anchor, (idx // num_ref).astype(jnp.int32),
                    (idx % num_ref).astype(jnp.int32), score > -jnp.inf)


def mine_triplet_margin(key: jax.Array, sim: ArrayLike, labels: ArrayLike | None = None,
                        ref_labels: ArrayLike | None = None, *, triplets_per_anchor: int,
                        margin: ArrayLike = 0.2, kind: str = "all",
                        query_offset: ArrayLike = 0, pos_mask: ArrayLike | None = None,
                        neg_mask: ArrayLike | None = None) -> Triplets:
    """:func:`triplet_margin_mask` subsampled to K triplets per anchor (:func:`sample_triplets`).

    The fixed-shape counterpart of ``TripletMarginMiner``: ``t = mine_triplet_margin(key,
    sim, labels, triplets_per_anchor=K)``, then ``gather_sims(sim, t)`` and a per-triplet
    loss reduced with ``masked_mean(..., t.valid)``.

    Returns:
      :class:`Triplets` with [A, K] fields.
    """
    mask = triplet_margin_mask(sim, labels, ref_labels, margin=margin, kind=kind,
                               query_offset=query_offset, pos_mask=pos_mask, neg_mask=neg_mask)
    return sample_triplets(key, mask, triplets_per_anchor, query_offset=query_offset)


def mine_pair_margin(sim: ArrayLike, labels: ArrayLike | None = None,
                     ref_labels: ArrayLike | None = None, *, pos_margin: ArrayLike = 0.8,
                     neg_margin: ArrayLike = 0.2, query_offset: ArrayLike = 0,
                     pos_mask: ArrayLike | None = None,
                     neg_mask: ArrayLike | None = None) -> tuple[jax.Array, jax.Array]:
    r"""The pairs that violate their margin (PML's ``PairMarginMiner``), as [A, M] masks.

    In similarities: positives with :math:`s_{ap} < m_+` (not close enough) and negatives
    with :math:`s_{an} > m_-` (too close). For PML with a distance d (``sim = -d``):
    ``PairMarginMiner(pos_margin=a, neg_margin=b)`` is ``pos_margin=-a, neg_margin=-b``
    here; with its cosine similarity the margins are the same numbers.

    Args:
      sim: [A, M] similarities (stopped here).
      labels, ref_labels, query_offset, pos_mask, neg_mask: as :func:`triplet_margin_mask`.
      pos_margin: :math:`m_+`, in similarity units.
      neg_margin: :math:`m_-`, in similarity units.

    Returns:
      ``(pos_keep, neg_keep)``: bool [A, M].
    """
    sim, pos, neg = _relevance(sim, labels, ref_labels, query_offset, pos_mask, neg_mask)
    return pos & (sim < pos_margin), neg & (sim > neg_margin)


def mine_hardest_negatives(sim: ArrayLike, labels: ArrayLike | None = None,
                           ref_labels: ArrayLike | None = None, *, k: int,
                           query_offset: ArrayLike = 0, positive: str = "hardest",
                           pos_mask: ArrayLike | None = None,
                           neg_mask: ArrayLike | None = None) -> Triplets:
    """The k most similar negatives of each anchor, each with one positive: [A, K] triplets.

    ``positive="hardest"`` pairs them with the least similar positive (batch-hard),
    ``"easiest"`` with the most similar one (easy-positive mining, no duplicate cut).
    Ties go to the first index (``lax.top_k``). Slot j is valid when the anchor has a
    positive and at least j + 1 negatives.

    Args:
      sim: [A, M] similarities (stopped here).
      labels, ref_labels, query_offset, pos_mask, neg_mask: as :func:`triplet_margin_mask`.
      k: K >= 1 (static).
      positive: ``"hardest"`` or ``"easiest"`` (static).

    Returns:
      :class:`Triplets` with [A, K] fields; negatives in decreasing similarity.
    """
    _checks.check_choice(positive, "positive", ("hardest", "easiest"))
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an int >= 1; got {k!r}.")
    sim, pos, neg = _relevance(sim, labels, ref_labels, query_offset, pos_mask, neg_mask)
    k = min(k, sim.shape[1])
    p_idx, _, has_pos = _masked_argmax(-sim if positive == "hardest" else sim, pos)
    values, n_idx = jax.lax.top_k(jnp.where(neg, sim, -jnp.inf), k)
    shape = n_idx.shape
    return Triplets(jnp.broadcast_to(_anchors(sim)[:, None], shape),
                    jnp.broadcast_to(p_idx[:, None], shape), n_idx.astype(jnp.int32),
                    has_pos[:, None] & (values > -jnp.inf))
