r"""Per-triplet losses on ``(sim_ap, sim_an)`` and the masked reductions that go with them.

Every loss here is elementwise: it takes the anchor-positive and anchor-negative similarities
of mined triplets (any matching shapes, e.g. [A] or [A, K]) and returns one value per
triplet, never a reduction. The caller reduces with :func:`masked_mean` or
:func:`avg_nonzero` over the miner's ``valid`` mask; across devices with the ``(sum, count)``
forms :func:`masked_sum_count` / :func:`nonzero_sum_count`.

Similarities follow ``STYLE.md`` §3 (larger means closer): for a Euclidean triplet pass
``sim = -dist`` and :func:`triplet_margin_loss` is the usual ``[d_ap - d_an + m]_+``.

:func:`all_triplets_margin_sums` and :func:`semihard_margin_sums` are the dense helpers of
the all-pairs objectives: hinge sums over every anchor-positive pair in O(A M) memory, never
an [A, M, M] array.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from hnm import _checks
from hnm import miners
from hnm.distances import label_masks

HARD_THRESHOLD = 0.8     # official SCT code: S_an > 0.8 makes a triplet hard
TEMPERATURE = 0.1        # official SCT code: softmax over [S_ap, S_an] / 0.1
HARD_RULES = ("or", "and")


def _pair(sim_ap: ArrayLike, sim_an: ArrayLike) -> tuple[jax.Array, jax.Array]:
    sim_ap, sim_an = jnp.asarray(sim_ap), jnp.asarray(sim_an)
    _checks.check_same_shape(sim_ap, sim_an, "sim_ap", "sim_an")
    return sim_ap, sim_an


def triplet_margin_loss(sim_ap: ArrayLike, sim_an: ArrayLike,
                        margin: ArrayLike = 0.2) -> jax.Array:
    r"""Hinge triplet loss on similarities.

    .. math:: \ell = \max(0,\; s_{an} - s_{ap} + m)

    Args:
      sim_ap: anchor-positive similarity, shape [A] (or any shape).
      sim_an: anchor-negative similarity, same shape as ``sim_ap``.
      margin: m, in similarity units; a float or a traced scalar (schedulable).

    Returns:
      Per-triplet loss, shaped like ``sim_ap``. Reduce with :func:`masked_mean`.

    Raises:
      ValueError, TypeError: if the shapes differ or the dtypes are not floating.

    Examples:
      >>> triplet_margin_loss(jnp.array([0.5]), jnp.array([0.25]), margin=0.5)
      Array([0.25], dtype=float32)

    References:
      Schroff, Kalenichenko, Philbin. FaceNet. CVPR 2015.
    """
    sim_ap, sim_an = _pair(sim_ap, sim_an)
    return jax.nn.relu(sim_an - sim_ap + margin)


def soft_triplet_loss(sim_ap: ArrayLike, sim_an: ArrayLike,
                      temperature: ArrayLike = TEMPERATURE) -> jax.Array:
    r"""Soft-margin (NCA) triplet loss, the official EPHN / EPSHN form.

    .. math::
        \ell = \operatorname{softplus}\!\Big(\frac{s_{an} - s_{ap}}{T}\Big)
             = -\log \operatorname{softmax}\big([s_{ap}, s_{an}] / T\big)_0

    With ``temperature=1`` on negated distances it is Hermans et al.'s soft margin
    :math:`\log(1 + e^{d_{ap} - d_{an}})`.

    Args:
      sim_ap: anchor-positive similarity, shape [A] (or any shape).
      sim_an: anchor-negative similarity, same shape as ``sim_ap``.
      temperature: T > 0; a float or a traced scalar.

    Returns:
      Per-triplet loss, shaped like ``sim_ap``.

    Raises:
      ValueError, TypeError: if the shapes differ or the dtypes are not floating.

    Examples:
      >>> soft_triplet_loss(jnp.array([0.5]), jnp.array([0.5]))
      Array([0.6931472], dtype=float32)

    References:
      Xuan et al. Hard Negative Examples are Hard, but Useful. ECCV 2020;
      Hermans, Beyer, Leibe. In Defense of the Triplet Loss. 2017.
    """
    sim_ap, sim_an = _pair(sim_ap, sim_an)
    _checks.check_positive(temperature, "temperature")
    return jax.nn.softplus((sim_an - sim_ap) / temperature)


def sct_masks(sim_ap: ArrayLike, sim_an: ArrayLike, *,
              hard_threshold: ArrayLike = HARD_THRESHOLD,
              hard_rule: str = "or") -> tuple[jax.Array, jax.Array]:
    r"""The easy and hard sets of Selectively Contrastive Triplet loss.

    ``hard_rule="or"`` (current official release, threshold 0.8):

    .. math::
        \text{hard} = (s_{an} > s_{ap}) \lor (s_{an} > t), \qquad
        \text{easy} = (s_{an} < s_{ap}) \land (s_{an} < t)

    so exact ties (:math:`s_{an} = s_{ap}` or :math:`s_{an} = t`) are in neither set.
    ``hard_rule="and"`` (first public release, git 076a275, threshold 0.5):
    :math:`\text{hard} = (s_{an} > s_{ap}) \land (s_{an} > t)` and easy is every other
    triplet (ties included), as that release's ``EasyTripletMask = ~HardTripletMask``.

    Args:
      sim_ap: anchor-positive similarity, shape [A] (or any shape).
      sim_an: anchor-negative similarity, same shape.
      hard_threshold: t; a float or a traced scalar.
      hard_rule: ``"or"`` or ``"and"`` (a Python string).

    Returns:
      ``(easy, hard)``: two bool arrays shaped like ``sim_ap``, never both true. Combine with
      the miner's ``valid`` mask.

    Raises:
      ValueError: for an unknown ``hard_rule`` or mismatched shapes.

    Examples:
      >>> easy, hard = sct_masks(jnp.array([0.5, 0.5, 0.5, 0.9]),
      ...                        jnp.array([0.3, 0.5, 0.6, 0.85]))
      >>> easy.tolist(), hard.tolist()
      ([True, False, False, False], [False, False, True, True])
    """
    _checks.check_choice(hard_rule, "hard_rule", HARD_RULES)
    sim_ap, sim_an = _pair(sim_ap, sim_an)
    # The sets are a choice, not a function to differentiate.
    sim_ap, sim_an = jax.lax.stop_gradient(sim_ap), jax.lax.stop_gradient(sim_an)
    if hard_rule == "or":
        hard = (sim_an > sim_ap) | (sim_an > hard_threshold)
        easy = (sim_an < sim_ap) & (sim_an < hard_threshold)
    else:
        hard = (sim_an > sim_ap) & (sim_an > hard_threshold)
        easy = ~hard
    return easy, hard


def sct_loss(sim_ap: ArrayLike, sim_an: ArrayLike, temperature: ArrayLike = TEMPERATURE,
             hard_weight: ArrayLike = 1.0, hard_threshold: ArrayLike = HARD_THRESHOLD,
             hard_rule: str = "or") -> jax.Array:
    r"""Selectively Contrastive Triplet loss, per triplet.

    .. math::
        \ell = \begin{cases}
          \operatorname{softplus}\big((s_{an} - s_{ap}) / T\big) & \text{easy} \\
          \lambda\, s_{an} & \text{hard} \\
          0 & \text{neither}
        \end{cases}

    with the sets of :func:`sct_masks`. The hard term depends on :math:`s_{an}` only: it
    pushes the hard negative away and leaves the positive alone (:math:`s_{ap}` gets no
    gradient there). The official objective divides the sum over easy and hard triplets by
    :math:`N_{easy} + N_{hard}`; see ``hnm.objectives.sct``.

    Args:
      sim_ap: anchor-positive similarity, shape [A] (or any shape).
      sim_an: anchor-negative similarity, same shape.
      temperature: T of the easy (softmax) term.
      hard_weight: :math:`\lambda`, weight of the hard term.
      hard_threshold: t of :func:`sct_masks`.
      hard_rule: ``"or"`` (current release) or ``"and"`` (first release).

    Returns:
      Per-triplet loss, shaped like ``sim_ap``.

    Raises:
      ValueError, TypeError: for an unknown ``hard_rule``, a Python ``temperature`` <= 0,
        mismatched shapes or non-floats.

    Examples:
      >>> loss = sct_loss(jnp.array([0.5, 0.5, 0.5]), jnp.array([0.25, 0.5, 0.75]))
      >>> [round(v, 4) for v in loss.tolist()]   # easy, tie (neither), hard
      [0.0789, 0.0, 0.75]

    References:
      Xuan, Stylianou, Liu, Pless. Hard Negative Examples are Hard, but Useful. ECCV 2020.
    """
    easy, hard = sct_masks(sim_ap, sim_an, hard_threshold=hard_threshold,
                           hard_rule=hard_rule)
    sim_ap, sim_an = _pair(sim_ap, sim_an)
    _checks.check_positive(temperature, "temperature")
    easy_loss = jax.nn.softplus((sim_an - sim_ap) / temperature)
    return jnp.where(easy, easy_loss, jnp.where(hard, hard_weight * sim_an, 0.0))


# ---------------------------------------------------------------------------------------------
# Reductions. Each has a (sum, count) form so that a cross-device caller can divide the local
# sum by the global count (``distances.global_mean_of``).


def _values_mask(values: ArrayLike, mask: ArrayLike) -> tuple[jax.Array, jax.Array]:
    values, mask = jnp.asarray(values), jnp.asarray(mask)
    if values.shape != mask.shape:
        raise ValueError(f"`values` and `mask` must have the same shape; got {values.shape} "
                         f"and {mask.shape}.")
    if mask.dtype != jnp.bool_:
        raise TypeError(f"`mask` must be boolean; got dtype {mask.dtype}.")
    return values, mask


def masked_sum_count(values: ArrayLike, mask: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """``(sum of values where mask, number of true mask entries)``; padding never leaks in."""
    values, mask = _values_mask(values, mask)
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total, jnp.sum(mask, dtype=jnp.int32)


def masked_mean(values: ArrayLike, mask: ArrayLike) -> jax.Array:
    r"""Mean of ``values`` over ``mask``; 0 (not NaN) when the mask is empty.

    .. math:: \frac{\sum_i m_i v_i}{\max(1, \sum_i m_i)}

    Args:
      values: per-triplet values, any shape.
      mask: bool, same shape (e.g. ``Triplets.valid``).

    Returns:
      Scalar mean.

    Raises:
      ValueError, TypeError: for mismatched shapes or a non-boolean mask.

    Examples:
      >>> masked_mean(jnp.array([1.0, 2.0, 100.0]), jnp.array([True, True, False]))
      Array(1.5, dtype=float32)
    """
    total, count = masked_sum_count(values, mask)
    return total / jnp.maximum(count, 1).astype(total.dtype)


def nonzero_sum_count(values: ArrayLike, mask: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """``(sum of masked values, number of masked values > 0)``: PML's AvgNonZero parts."""
    values, mask = _values_mask(values, mask)
    # Which terms count is a choice; it does not carry gradient.
    positive = mask & (jax.lax.stop_gradient(values) > 0)
    return jnp.sum(jnp.where(positive, values, 0.0)), jnp.sum(positive, dtype=jnp.int32)


def avg_nonzero(values: ArrayLike, mask: ArrayLike) -> jax.Array:
    r"""Mean over the masked values that are > 0; 0 if none is (PML's ``AvgNonZeroReducer``).

    .. math:: \frac{\sum_i m_i v_i}{\max(1, \#\{i : m_i \land v_i > 0\})}

    Args:
      values: per-triplet losses (non-negative), any shape.
      mask: bool, same shape.

    Returns:
      Scalar.

    Raises:
      ValueError, TypeError: for mismatched shapes or a non-boolean mask.

    Examples:
      >>> avg_nonzero(jnp.array([0.0, 0.2, 0.4, 9.0]), jnp.array([True, True, True, False]))
      Array(0.3, dtype=float32)

    References:
      Musgrave, Belongie, Lim. A Metric Learning Reality Check. ECCV 2020 (PML).
    """
    total, count = nonzero_sum_count(values, mask)
    return total / jnp.maximum(count, 1).astype(total.dtype)


# ---------------------------------------------------------------------------------------------
# Dense all-pairs hinge sums (batch-all, semi-hard), without an [A, M, M] array.
#
# Both are piecewise linear in ``sim``: with the active set fixed (decided on stopped values),
#   sum_{(a,p,n) active} (s_an - s_ap + m) = sum_{a,j} coef_aj s_aj + m * (number active),
# where coef_an counts the active triplets using negative n and coef_ap = -(the active
# triplets of pair (a, p)). The counts come from a loop over positive slots
# (``miners.fold_positives``) on stopped values; the loss is that linear form on the live
# matrix, so its value is the hinge sum and its gradient (coef) is exact, with no
# gather/scatter of an [A, M] array in the backward pass.


class AllTriplets(NamedTuple):
    """Per-anchor summaries of every triplet (see :func:`all_triplets_margin_sums`)."""
    loss_sum: jax.Array      # [A] float, differentiable: the hinge summed over a's triplets
    num_triplets: jax.Array  # [A] int32: positives x negatives of a
    num_active: jax.Array    # [A] int32: triplets with a non-zero hinge
    num_hard: jax.Array      # [A] int32: triplets with s_an > s_ap


def _masks(sim, labels, ref_labels, query_offset, pos_mask=None, neg_mask=None):
    if pos_mask is not None or neg_mask is not None or labels is None:
        # Custom relevance (bool [A, M]): the miners' rules and checks; ``sim`` stays live.
        _, pos_mask, neg_mask = miners._relevance(  # pylint: disable=protected-access
            sim, labels, ref_labels, query_offset, pos_mask, neg_mask)
        return jnp.asarray(sim), pos_mask, neg_mask
    sim, labels = jnp.asarray(sim), jnp.asarray(labels)
    ref_labels = labels if ref_labels is None else jnp.asarray(ref_labels)
    _checks.check_sim(sim, labels, ref_labels)
    pos_mask, neg_mask = label_masks(labels, ref_labels, query_offset=query_offset)
    return sim, pos_mask, neg_mask


def _linear_hinge(sim, coef, num_active, margin):
    """Per-anchor ``sum_j coef_aj s_aj + m * num_active_a`` on the live ``sim``."""
    return jnp.sum(coef * sim, axis=1) + margin * num_active.astype(sim.dtype)


def all_triplets_margin_sums(sim: ArrayLike, labels: ArrayLike | None = None,
                             ref_labels: ArrayLike | None = None, *,
                             query_offset: ArrayLike = 0, margin: ArrayLike = 0.2,
                             pos_mask: ArrayLike | None = None,
                             neg_mask: ArrayLike | None = None) -> AllTriplets:
    r"""Hinge triplet loss over *every* triplet, summed per anchor, in O(A M) memory.

    .. math::
        L_a = \sum_{p:\, y_p = y_a,\, p \ne a} \; \sum_{n:\, y_n \ne y_a}
              \max(0,\; s_{an} - s_{ap} + m)

    A triplet is active when :math:`s_{an} - s_{ap} + m > 0` (PML's test of a non-zero
    loss). One O(A M) pass per positive slot (:func:`hnm.miners.fold_positives`): O(A M K)
    time for at most K positives per anchor, never an [A, M, M] array. Differentiable in
    ``sim`` (the exact gradient of the piecewise-linear sum).

    Args:
      sim: live similarities [A, M].
      labels: anchor labels [A].
      ref_labels: reference labels [M]; defaults to ``labels``.
      query_offset: row of anchor 0 in the reference set (excludes self-pairs).
      margin: m.
      pos_mask, neg_mask: bool [A, M] relevance instead of labels (as the miners of
        :mod:`hnm.miners`).

    Returns:
      :class:`AllTriplets`.

    Raises:
      ValueError, TypeError: for wrongly shaped or typed arguments.

    Examples:
      >>> sim = jnp.array([[1.0, 0.5, 0.6], [0.5, 1.0, 0.2], [0.6, 0.2, 1.0]])
      >>> at = all_triplets_margin_sums(sim, jnp.array([0, 0, 1]), margin=0.25)
      >>> [round(v, 4) for v in at.loss_sum.tolist()], at.num_active.tolist()
      ([0.35, 0.0, 0.0], [1, 0, 0])
    """
    sim, pos_mask, neg_mask = _masks(sim, labels, ref_labels, query_offset, pos_mask,
                                     neg_mask)
    stop = jax.lax.stop_gradient(sim)  # which triplets are active is not differentiated

    def count(carry, sel, pos_idx, found):
        coef, num_active, num_hard = carry
        sim_ap = jnp.take_along_axis(stop, pos_idx[:, None], axis=1)
        active = neg_mask & found[:, None] & (stop - sim_ap + margin > 0)
        n_active = jnp.sum(active, axis=1, dtype=jnp.int32)
        n_hard = jnp.sum(neg_mask & found[:, None] & (stop > sim_ap), axis=1, dtype=jnp.int32)
        # d/ds_an = +1 per active triplet; d/ds_ap = -(its active count).
        coef = coef + jnp.where(active, 1.0, 0.0) - jnp.where(
            sel & found[:, None], n_active[:, None].astype(coef.dtype), 0.0)
        return coef, num_active + n_active, num_hard + n_hard

    zeros = jnp.zeros(sim.shape[:1], jnp.int32)
    coef, num_active, num_hard = miners.fold_positives(
        pos_mask, count, (jnp.zeros(sim.shape, sim.dtype), zeros, zeros))
    num_triplets = (jnp.sum(pos_mask, axis=1, dtype=jnp.int32)
                    * jnp.sum(neg_mask, axis=1, dtype=jnp.int32))
    return AllTriplets(loss_sum=_linear_hinge(sim, coef, num_active, margin),
                       num_triplets=num_triplets, num_active=num_active, num_hard=num_hard)


class SemihardTriplets(NamedTuple):
    """Per-anchor summaries of the semi-hard triplets (see :func:`semihard_margin_sums`)."""
    loss_sum: jax.Array    # [A] float, differentiable: the hinge summed over a's pairs
    num_pairs: jax.Array   # [A] int32: anchor-positive pairs (0 if a has no negative)
    num_active: jax.Array  # [A] int32: pairs with a non-zero hinge
    num_hard: jax.Array    # [A] int32: pairs whose negative is more similar than p
    sum_sim_ap: jax.Array  # [A] float, stopped: sum of s_ap over the pairs
    sum_sim_an: jax.Array  # [A] float, stopped: sum of the chosen s_an over the pairs


def semihard_margin_sums(sim: ArrayLike, labels: ArrayLike | None = None,
                         ref_labels: ArrayLike | None = None, *,
                         query_offset: ArrayLike = 0, margin: ArrayLike = 0.2,
                         pos_mask: ArrayLike | None = None,
                         neg_mask: ArrayLike | None = None) -> SemihardTriplets:
    r"""Hinge loss of every anchor-positive pair with its semi-hard negative, per anchor.

    .. math:: L_a = \sum_{p} \max(0,\; s_{a n(a,p)} - s_{ap} + m)

    with :math:`n(a, p)` of :func:`hnm.miners.mine_semihard` (TFA's rule), chosen in the same
    loop that accumulates the loss's weights; O(A M K) time, O(A M) memory, exact gradient,
    and no [A, M] gather or scatter in the backward pass.

    Args:
      sim: live similarities [A, M].
      labels: anchor labels [A].
      ref_labels: reference labels [M]; defaults to ``labels``.
      query_offset: row of anchor 0 in the reference set (excludes self-pairs).
      margin: m.
      pos_mask, neg_mask: bool [A, M] relevance instead of labels (as the miners of
        :mod:`hnm.miners`).

    Returns:
      :class:`SemihardTriplets`.

    Raises:
      ValueError, TypeError: for wrongly shaped or typed arguments.

    Examples:
      >>> sim = jnp.array([[1.0, 0.5, 0.6], [0.5, 1.0, 0.2], [0.6, 0.2, 1.0]])
      >>> st = semihard_margin_sums(sim, jnp.array([0, 0, 1]), margin=0.25)
      >>> [round(v, 4) for v in st.loss_sum.tolist()], st.num_pairs.tolist()
      ([0.35, 0.0, 0.0], [1, 1, 0])
    """
    sim, pos_mask, neg_mask = _masks(sim, labels, ref_labels, query_offset, pos_mask,
                                     neg_mask)
    stop = jax.lax.stop_gradient(sim)  # the choice of negatives is not differentiated
    far_idx, far_value, has_neg = miners.least_similar(stop, neg_mask)
    cols = jnp.arange(sim.shape[1], dtype=jnp.int32)

    def choose(carry, sel, pos_idx, found):
        coef, num_active, num_hard, sum_an = carry
        sim_ap = jnp.take_along_axis(stop, pos_idx[:, None], axis=1)[:, 0]
        idx, sim_an = miners.semihard_negative(stop, neg_mask, sim_ap[:, None],
                                               (far_idx, far_value))
        pair = found & has_neg
        act = pair & (sim_an - sim_ap + margin > 0)
        # d/ds_an = +1 and d/ds_ap = -1 for every active pair.
        coef = coef + jnp.where((cols == idx[:, None]) & act[:, None], 1.0, 0.0) - jnp.where(
            sel & act[:, None], 1.0, 0.0)
        return (coef, num_active + act, num_hard + (pair & (sim_an > sim_ap)),
                sum_an + jnp.where(pair, sim_an, 0.0))

    zeros = jnp.zeros(sim.shape[:1], jnp.int32)
    init = (jnp.zeros(sim.shape, sim.dtype), zeros, zeros, jnp.zeros(sim.shape[:1], sim.dtype))
    coef, num_active, num_hard, sum_an = miners.fold_positives(pos_mask, choose, init)
    pairs = pos_mask & has_neg[:, None]
    return SemihardTriplets(
        loss_sum=_linear_hinge(sim, coef, num_active, margin),
        num_pairs=jnp.sum(pairs, axis=1, dtype=jnp.int32), num_active=num_active,
        num_hard=num_hard, sum_sim_ap=jnp.sum(jnp.where(pairs, stop, 0.0), axis=1),
        sum_sim_an=sum_an)
