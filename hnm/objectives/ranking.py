r"""Ranking and distribution objectives: FastAP, Smooth-AP, histogram loss.

Same signature, cross-device semantics, memory and custom relevance as
:mod:`hnm.objectives.tuples`. Memory stays O(B M): FastAP adds a bin axis of length L
(O(B M L), L = ``num_bins`` + 1, small), Smooth-AP scans over the positives of each anchor
(O(B M) live memory, ``jax.checkpoint`` so the backward pass stores no [B, M] residual per
step), the histogram loss scatters into a histogram of R bins.

References:
  Cakir, He, Xia, Kulis, Sclaroff. Deep Metric Learning to Rank (FastAP). CVPR 2019.
  Brown, Xie, Kalogeiton, Zisserman. Smooth-AP: Smoothing the Path Towards Large-Scale
  Image Retrieval. ECCV 2020.
  Ustinova, Lempitsky. Learning Deep Embeddings with Histogram Loss. NeurIPS 2016.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from hnm import _checks
from hnm import distances
from hnm.objectives import _relevance as rel

Aux = dict[str, jax.Array]


def _check_int(value: Any, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}; got {value!r}.")


# -------------------------------------------------------------------------- FastAP
def fast_ap(embeddings: ArrayLike, labels: ArrayLike | None = None,
            key: jax.Array | None = None, *, axis_name: str | None = None,
            memory: Any = None, pos_mask: ArrayLike | None = None,
            neg_mask: ArrayLike | None = None, num_bins: int = 10) -> tuple[jax.Array, Aux]:
    r"""FastAP (Cakir et al. 2019): AP from soft histograms of squared distances.

    Squared Euclidean distances :math:`d^2 \in [0, 4]` between L2-normalised embeddings are
    binned with triangular kernels at L = ``num_bins`` + 1 equally spaced centres
    :math:`z_l` (width :math:`\Delta = 4/\text{num\_bins}`): :math:`h^\pm_{al} = \sum_{j \in
    P(a) / N(a)} [1 - |d^2_{aj} - z_l|/\Delta]_+`, :math:`H^+_{al} = \sum_{l'\le l} h^+_{al'}`,
    :math:`H_{al} = \sum_{l' \le l} (h^+_{al'} + h^-_{al'})`, and

    .. math::
        \mathrm{FastAP}_a = \frac1{|P(a)|}\sum_l \frac{h^+_{al} H^+_{al}}{H_{al}},
        \qquad L = \frac1{|V|}\sum_{a\in V} (1 - \mathrm{FastAP}_a)

    over anchors V with a positive. Equal to PML ``FastAPLoss(num_bins)``.

    Args:
      embeddings: [B, D]; labels: [B] (or masks); key: unused; axis_name, memory,
      pos_mask, neg_mask: see :mod:`hnm.objectives.tuples`.
      num_bins: number of histogram bins (static int >= 1).

    Returns:
      ``(loss, aux)``; ``num_valid`` counts anchors with a positive.

    References:
      Cakir, He, Xia, Kulis, Sclaroff. Deep Metric Learning to Rank. CVPR 2019.
    """
    del key
    _check_int(num_bins, "num_bins")
    pr = rel.pairs(embeddings, labels, normalize=True, axis_name=axis_name, memory=memory,
                   pos_mask=pos_mask, neg_mask=neg_mask)
    dist2 = distances.squared_euclidean_distance(pr.emb, pr.ref)
    delta = 4.0 / num_bins
    centres = jnp.linspace(0.0, 4.0, num_bins + 1, dtype=dist2.dtype)
    pulse = jax.nn.relu(1.0 - jnp.abs(dist2[:, :, None] - centres) / delta)   # [A, M, L]
    h_pos = jnp.sum(jnp.where(pr.pos_mask[:, :, None], pulse, 0.0), axis=1)  # [A, L]
    h_neg = jnp.sum(jnp.where(pr.neg_mask[:, :, None], pulse, 0.0), axis=1)
    cum_pos = jnp.cumsum(h_pos, axis=1)
    cum_all = jnp.cumsum(h_pos + h_neg, axis=1)
    product = h_pos * cum_pos
    safe = (product > 0) & (cum_all > 0)
    ratio = jnp.where(safe, product / jnp.where(safe, cum_all, 1.0), 0.0)
    num_pos = jnp.sum(pr.pos_mask, axis=1)
    valid = num_pos > 0
    ap = jnp.sum(ratio, axis=1) / jnp.maximum(num_pos, 1)
    per_anchor = jnp.where(valid, 1.0 - ap, 0.0)
    loss = distances.global_mean_of(jnp.sum(per_anchor), jnp.sum(valid), axis_name)
    return rel.finish(loss, rel.pair_aux(loss, pr.emb @ pr.ref.T, pr.pos_mask, pr.neg_mask,
                              num_valid=jnp.sum(valid),
                              num_active=jnp.sum(valid & (per_anchor > 0)),
                              num_units=jnp.sum(valid), axis_name=axis_name), pr)


# ------------------------------------------------------------------------ Smooth-AP
def smooth_ap(embeddings: ArrayLike, labels: ArrayLike | None = None,
              key: jax.Array | None = None, *, axis_name: str | None = None,
              memory: Any = None, pos_mask: ArrayLike | None = None,
              neg_mask: ArrayLike | None = None, temperature: ArrayLike = 0.01,
              include_self: bool = False,
              max_positives: int = 0) -> tuple[jax.Array, Aux]:
    r"""Smooth-AP (Brown et al. 2020): AP with the rank indicator replaced by a sigmoid.

    For anchor a with positives :math:`P` and candidates :math:`\Omega` (its positives and
    negatives), :math:`\sigma_\tau(x) = 1/(1 + e^{-x/\tau})` and cosines :math:`s`:

    .. math::
        \mathrm{AP}_a = \frac1{|P|}\sum_{p\in P}
            \frac{1 + \sum_{j\in P,\, j\ne p}\sigma_\tau(s_{aj} - s_{ap})}
                 {1 + \sum_{j\in\Omega,\, j\ne p}\sigma_\tau(s_{aj} - s_{ap})},
        \qquad L = \frac1{|V|}\sum_{a\in V} (1 - \mathrm{AP}_a)

    over the anchors V with a positive. ``include_self=True`` also ranks the anchor itself
    as a positive of its own query (:math:`P \cup \{a\}`, :math:`\Omega \cup \{a\}`), which
    is what the official code and PML's ``SmoothAPLoss(temperature)`` compute; with it the
    result equals PML's (which moreover needs equal class sizes; this does not).

    Memory O(B M), never B x M x M: a ``lax.scan`` over the positive slots of every anchor
    (slot k is each anchor's k-th positive by column), each step O(B M) and rematerialised
    in the backward pass. The number of slots is ``max_positives`` when given (static; an
    anchor with more positives uses its first ``max_positives``, and aux ``num_dropped``
    counts the positives left out); 0 (default) means M slots (always exact). On a P x K batch
    ``max_positives=K`` is exact (K - 1 positives, K with ``include_self``) and cheaper.

    Args:
      embeddings: [B, D]; labels: [B] (or masks); key: unused; axis_name, memory,
      pos_mask, neg_mask: see :mod:`hnm.objectives.tuples`.
      temperature: :math:`\tau > 0` (0.01, the paper's).
      include_self: rank the query itself (official code / PML semantics).
      max_positives: number of positive slots scanned (static int >= 0; 0: all M).

    Returns:
      ``(loss, aux)``; ``num_valid`` counts anchors with a positive.

    References:
      Brown, Xie, Kalogeiton, Zisserman. Smooth-AP: Smoothing the Path Towards Large-Scale
      Image Retrieval. ECCV 2020.
    """
    del key
    rel.check_positive(temperature, "temperature")
    pr = rel.pairs(embeddings, labels, normalize=True, axis_name=axis_name, memory=memory,
                   pos_mask=pos_mask, neg_mask=neg_mask)
    sim = pr.emb @ pr.ref.T
    num_rows, num_cols = sim.shape
    has_pos = jnp.any(pr.pos_mask, axis=1)
    pos, cand = pr.pos_mask, pr.pos_mask | pr.neg_mask
    if include_self:
        own = rel.self_mask(num_rows, num_cols, pr.query_offset)
        pos, cand = pos | own, cand | own
    _check_int(max_positives, "max_positives", minimum=0)
    slots = num_cols if max_positives == 0 else min(max_positives, num_cols)
    cols = jnp.arange(num_cols)
    # Column of each anchor's k-th positive, k < slots: top_k of -column over positives.
    key_cols = jnp.where(pos, -cols[None, :], -num_cols - 1)
    neg_col, slot_idx = jax.lax.top_k(key_cols, slots)                 # [A, S]
    slot_found = neg_col > -num_cols - 1
    pos_f, cand_f = pos.astype(sim.dtype), cand.astype(sim.dtype)

    @jax.checkpoint
    def step(total, slot):
        idx, found = slot
        s_ap = jnp.take_along_axis(sim, idx[:, None], axis=1)          # [A, 1]
        sig = jax.nn.sigmoid((sim - s_ap) / temperature)
        not_p = (cols[None, :] != idx[:, None]).astype(sim.dtype)
        rank_pos = 1.0 + jnp.sum(sig * pos_f * not_p, axis=1)
        rank_all = 1.0 + jnp.sum(sig * cand_f * not_p, axis=1)
        return total + jnp.where(found, rank_pos / rank_all, 0.0), None

    # Under shard_map the carry must start out as varying as the per-anchor sums it takes.
    init = distances.vary_like(jnp.zeros((num_rows,), sim.dtype), sim)
    total, _ = jax.lax.scan(step, init, (slot_idx.T, slot_found.T))
    num_pos = jnp.sum(pos, axis=1)
    ap = total / jnp.maximum(jnp.minimum(num_pos, slots), 1)
    valid = has_pos
    per_anchor = jnp.where(valid, 1.0 - ap, 0.0)
    loss = distances.global_mean_of(jnp.sum(per_anchor), jnp.sum(valid), axis_name)
    aux = rel.pair_aux(loss, sim, pr.pos_mask, pr.neg_mask, num_valid=jnp.sum(valid),
                       num_active=jnp.sum(valid & (per_anchor > 0)),
                       num_units=jnp.sum(valid), axis_name=axis_name)
    dropped = jnp.sum(jnp.maximum(num_pos - slots, 0))
    aux["num_dropped"] = distances.global_sum(dropped, axis_name).astype(jnp.int32)
    return rel.finish(loss, aux, pr)


# ------------------------------------------------------------------------ histogram
def _density(values: jax.Array, mask: jax.Array, delta: float, num_nodes: int
             ) -> tuple[jax.Array, jax.Array]:
    """Unnormalised linear-interpolation histogram of ``values[mask]`` on nodes
    ``-1 + r * delta``, r < num_nodes, and the number of values."""
    scaled = (jnp.clip(values, -1.0, 1.0) + 1.0) / delta
    # floor is stopped: which bin a value falls in is not differentiated, its weights are.
    lower = jnp.clip(jnp.floor(jax.lax.stop_gradient(scaled)), 0, num_nodes - 2)
    w_upper = jnp.where(mask, scaled - lower, 0.0)
    w_lower = jnp.where(mask, lower + 1.0 - scaled, 0.0)
    lower = lower.astype(jnp.int32).ravel()
    hist = jnp.zeros((num_nodes,), values.dtype)
    hist = hist.at[lower].add(w_lower.ravel()).at[lower + 1].add(w_upper.ravel())
    return hist, jnp.sum(mask)


def histogram(embeddings: ArrayLike, labels: ArrayLike | None = None,
              key: jax.Array | None = None, *, axis_name: str | None = None,
              memory: Any = None, pos_mask: ArrayLike | None = None,
              neg_mask: ArrayLike | None = None,
              num_bins: int = 100) -> tuple[jax.Array, Aux]:
    r"""Histogram loss (Ustinova & Lempitsky 2016): the probability that a negative pair is
    more similar than a positive pair, from soft histograms of the pair cosines.

    Pair cosines in [-1, 1] are spread linearly onto R = ``num_bins`` + 1 nodes
    :math:`t_r = -1 + r\Delta`, :math:`\Delta = 2/\text{num\_bins}`, giving densities
    :math:`p^+_r`, :math:`p^-_r` (each summing to 1) over the unordered positive and negative
    pairs of the (global) batch; with :math:`\Phi^+_r = \sum_{q\le r} p^+_q`:

    .. math:: L = \sum_r p^-_r\, \Phi^+_r

    Memory rows join as the second member of pairs (each memory pair counted once). PML's
    ``HistogramLoss(n_bins)`` builds its pairs from all triplets, i.e. it drops pairs whose
    anchor lacks a positive or a negative; here every pair counts (the paper). Equal on
    batches where every row has a positive and a negative. With ``axis_name`` the
    histograms are gathered (differentiably) and the global loss is divided by the number
    of devices.

    Args:
      embeddings: [B, D]; labels: [B] (or masks); key: unused; axis_name, memory,
      pos_mask, neg_mask: see :mod:`hnm.objectives.tuples` (with custom masks, pair
      {i, j} of two batch rows is read from entry (i, j), i < j).
      num_bins: number of bins (static int >= 1; PML's default 100).

    Returns:
      ``(loss, aux)``; ``num_valid`` counts unordered positive pairs.

    References:
      Ustinova, Lempitsky. Learning Deep Embeddings with Histogram Loss. NeurIPS 2016.
    """
    del key
    _check_int(num_bins, "num_bins")
    pr = rel.pairs(embeddings, labels, normalize=True, axis_name=axis_name, memory=memory,
                   pos_mask=pos_mask, neg_mask=neg_mask)
    num_rows, num_cols = pr.pos_mask.shape
    num_batch = num_cols - (0 if memory is None else memory.embeddings.shape[0])
    rows = pr.query_offset + jnp.arange(num_rows)[:, None]
    cols = jnp.arange(num_cols)[None, :]
    once = (cols > rows) | (cols >= num_batch)      # unordered pairs: upper triangle + memory
    pos, neg = pr.pos_mask & once, pr.neg_mask & once
    num_nodes = num_bins + 1
    delta = 2.0 / num_bins
    # Batch and memory columns scatter separately: an empty memory then adds exact zeros to
    # the very same batch histogram (a joint scatter may sum in another order).
    # (The batch block's matmul too: one [B, B + K] product may round differently.)
    sim_b = pr.emb @ pr.ref[:num_batch].T
    h_pos, n_pos = _density(sim_b, pos[:, :num_batch], delta, num_nodes)
    h_neg, n_neg = _density(sim_b, neg[:, :num_batch], delta, num_nodes)
    if num_batch < num_cols:
        sim_m = pr.emb @ pr.ref[num_batch:].T
        m_pos, c_pos = _density(sim_m, pos[:, num_batch:], delta, num_nodes)
        m_neg, c_neg = _density(sim_m, neg[:, num_batch:], delta, num_nodes)
        h_pos, n_pos, h_neg, n_neg = h_pos + m_pos, n_pos + c_pos, h_neg + m_neg, n_neg + c_neg
    if axis_name is not None:
        h_pos = jnp.sum(jax.lax.all_gather(h_pos, axis_name), axis=0)
        h_neg = jnp.sum(jax.lax.all_gather(h_neg, axis_name), axis=0)
    counts = distances.global_sum(jnp.stack([n_pos, n_neg]), axis_name)
    counts = jax.lax.stop_gradient(counts).astype(h_pos.dtype)
    p_pos = h_pos / jnp.maximum(counts[0], 1.0)
    p_neg = h_neg / jnp.maximum(counts[1], 1.0)
    loss = jnp.sum(p_neg * jnp.cumsum(p_pos))
    loss = jnp.where((counts[0] > 0) & (counts[1] > 0), loss, 0.0)
    share = loss / rel.num_devices(axis_name)
    sim = jax.lax.stop_gradient(pr.emb @ pr.ref.T)
    return rel.finish(share, rel.pair_aux(share, sim, pr.pos_mask, pr.neg_mask, num_valid=n_pos,
                               num_active=n_pos, num_units=n_pos, axis_name=axis_name), pr)


# What each option accepts (validated by ``hnm.objectives.check_options`` / ``get``).
OPTION_SPECS: dict[str, dict[str, _checks.OptionSpec]] = {
    "fast_ap": dict(num_bins=_checks.integer(ge=1)),
    "smooth_ap": dict(temperature=_checks.POSITIVE, include_self=_checks.BOOL,
                      max_positives=_checks.integer(ge=0)),
    "histogram": dict(num_bins=_checks.integer(ge=1)),
}

OBJECTIVES = {
    "fast_ap": fast_ap,
    "histogram": histogram,
    "smooth_ap": smooth_ap,
}
