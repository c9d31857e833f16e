r"""Shared pieces of the proxy, pair-list and ranking objectives (``proxy``, ``tuples``,
``ranking``): the reference set with custom relevance, masked log-sum-exp, global aux.

**Custom relevance.** Every objective of those modules accepts, instead of integer
``labels``, explicit ``pos_mask`` / ``neg_mask`` (bool [B, M], this device's rows against the
reference set: the ``all_gather`` of every device's rows, then the memory rows), so that
multi-label data and hierarchies work. The self-pair (column ``query_offset + i`` of row
``i``) is removed from ``pos_mask`` whatever the caller passes, and an entry in both masks is
a positive only (``neg_mask & ~pos_mask``). Labels and masks exclude each other (a
``ValueError`` when both are given, as the two relevances could disagree), except for the
margin loss, whose labels only pick each anchor's β. With a cross-batch memory the masks cover
its columns too (after the gathered batch); an empty slot is whatever the caller's masks say
(make its columns false in both). Integer labels stay the simple path:
:func:`hnm.distances.label_masks`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from hnm import _checks
from hnm import distances
from hnm.objectives import _common

Aux = dict[str, jax.Array]
# Re-exported for the objectives built on this module.
check_positive, masked_sum, ratio = _common.check_positive, _common.masked_sum, _common.ratio


class Pairs(NamedTuple):
    """What a pair-based objective works on: local anchors against the reference set."""
    emb: jax.Array        # [B, D] (normalised if asked)
    ref: jax.Array        # [M, D] the reference rows (gathered batch, then memory)
    pos_mask: jax.Array   # [B, M] bool, self-pairs removed
    neg_mask: jax.Array   # [B, M] bool
    query_offset: jax.Array  # int32 scalar
    labels: jax.Array | None
    ref_labels: jax.Array | None


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown `{name}`={value!r}; expected one of {choices}.")


def check_mask(mask: Any, name: str, shape: tuple[int, int]) -> jax.Array:
    """A bool [B, M] relevance mask of exactly ``shape``."""
    mask = jnp.asarray(mask)
    if mask.ndim != 2 or mask.shape != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)} (rows x reference rows); "
                         f"got {mask.shape}.")
    if mask.dtype != jnp.bool_:
        raise TypeError(f"`{name}` must be a bool array; got dtype {mask.dtype}.")
    return mask


def self_mask(num_rows: int, num_cols: int, query_offset: ArrayLike) -> jax.Array:
    """[B, M] bool, true at each row's own column ``i + query_offset``."""
    rows = jnp.arange(num_rows)[:, None] + query_offset
    return rows == jnp.arange(num_cols)[None, :]


def pairs(embeddings: ArrayLike, labels: ArrayLike | None, *, normalize: bool,
          axis_name: str | None, memory: Any = None, pos_mask: ArrayLike | None = None,
          neg_mask: ArrayLike | None = None, labels_with_masks: bool = False) -> Pairs:
    """Checks the inputs and builds the (global, memory-extended) reference set and masks.

    Either ``labels`` [B] or both ``pos_mask`` and ``neg_mask`` [B, M] must be given, not
    both (unless ``labels_with_masks``: the caller uses the labels for something else).
    """
    if labels is not None:   # values first, before asarray can wrap an int64 label
        _checks.check_label_values(labels, "labels", reserved=distances.MASKED_LABEL)
    embeddings = jnp.asarray(embeddings)
    _checks.check_floating_matrix(embeddings, "embeddings")
    _checks.check_nonempty(embeddings, "embeddings", ("B (rows)", "D (columns)"))
    if (pos_mask is None) != (neg_mask is None):
        raise ValueError("pass both `pos_mask` and `neg_mask`, or neither.")
    custom = pos_mask is not None
    if custom and labels is not None and not labels_with_masks:
        raise ValueError("pass either `labels` or `pos_mask` / `neg_mask`, not both.")
    if labels is None and not custom:
        raise ValueError("`labels` is required unless `pos_mask` and `neg_mask` are given.")
    if custom and labels is None:
        labels = jnp.zeros((embeddings.shape[0],), jnp.int32)  # only for the gather below
    labels = jnp.asarray(labels)
    _checks.check_labels(labels, "labels", embeddings.shape[0], "embeddings")
    emb = distances.l2_normalize(embeddings) if normalize else embeddings
    ref = distances.reference_set(emb, labels, axis_name, memory, normalize_memory=normalize)
    num_ref = ref.embeddings.shape[0]
    if custom:
        shape = (emb.shape[0], num_ref)
        pos = check_mask(pos_mask, "pos_mask", shape)
        neg = check_mask(neg_mask, "neg_mask", shape)
        pos = pos & ~self_mask(shape[0], shape[1], ref.query_offset)
        return Pairs(emb, ref.embeddings, pos, neg & ~pos, ref.query_offset, None, None)
    pos, neg = distances.label_masks(labels, ref.labels, query_offset=ref.query_offset)
    return Pairs(emb, ref.embeddings, pos, neg, ref.query_offset, labels, ref.labels)


def finish(loss: jax.Array, aux: Aux, pr: Pairs) -> tuple[jax.Array, Aux]:
    """``(loss, aux)`` NaN when any reference row (every device's, the memory's) is non-finite,
    as ``hnm.objectives._common.finish``: masks would otherwise drop a NaN row silently."""
    finite = distances.all_finite(pr.ref)  # replicated under shard_map
    poison = jax.lax.stop_gradient(jnp.where(finite, 0.0, jnp.nan)).astype(loss.dtype)
    return loss + poison, dict(aux, loss=aux["loss"] + poison.astype(aux["loss"].dtype))


def masked_logsumexp(x: jax.Array, mask: jax.Array, *, axis: int = -1,
                     add_one: bool = False) -> jax.Array:
    r""":math:`\log(\sum_{j \in mask} e^{x_j} [+ 1])` along ``axis``; 0 for an empty mask
    (PML's ``lmu.logsumexp``). Finite values and gradients: masked entries never reach exp."""
    row_max = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True)
    if add_one:
        row_max = jnp.maximum(row_max, 0.0)  # the implicit 1 is exp(0)
    # stop_gradient: the shift cancels out; it only keeps exp from overflowing.
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    # Double where: exp of an unmasked huge entry times 0 is NaN in the backward pass.
    exps = jnp.where(mask, jnp.exp(jnp.where(mask, x - row_max, 0.0)), 0.0)
    total = jnp.sum(exps, axis=axis)
    row_max = jnp.squeeze(row_max, axis)
    if add_one:
        total = total + jnp.exp(-row_max)
        return row_max + jnp.log(total)
    has_any = jnp.any(mask, axis=axis)
    return jnp.where(has_any, row_max + jnp.log(jnp.where(has_any, total, 1.0)), 0.0)


def global_stats(axis_name: str | None, dtype, **terms: ArrayLike) -> dict[str, jax.Array]:
    """Sums scalars over devices with one ``psum``; no gradient."""
    names = list(terms)
    stacked = jnp.stack([jnp.asarray(terms[n], dtype) for n in names])
    stacked = distances.global_sum(jax.lax.stop_gradient(stacked), axis_name)
    return dict(zip(names, stacked))


def pair_aux(loss: jax.Array, cos: jax.Array, pos_mask: jax.Array, neg_mask: jax.Array, *,
             num_valid: ArrayLike, num_active: ArrayLike, num_units: ArrayLike,
             axis_name: str | None) -> Aux:
    """The aux dict of a pair objective (keys as ``hnm.objectives``): ``loss`` (global),
    ``num_valid``, ``frac_active``, ``frac_hard_ephn`` (anchors whose most similar negative
    beats their most similar positive, among anchors with both; these objectives form no
    triplets, so no ``frac_hard``), ``mean_sim_ap`` / ``mean_sim_an`` over all positive /
    negative pairs, in ``cos`` (stopped)."""
    cos = jax.lax.stop_gradient(cos)
    has_both = jnp.any(pos_mask, axis=1) & jnp.any(neg_mask, axis=1)
    max_pos = jnp.max(jnp.where(pos_mask, cos, -jnp.inf), axis=1)
    max_neg = jnp.max(jnp.where(neg_mask, cos, -jnp.inf), axis=1)
    s = global_stats(axis_name, loss.dtype, loss=loss, n=num_valid, active=num_active,
                     units=num_units, hard=jnp.sum(has_both & (max_neg > max_pos)),
                     both=jnp.sum(has_both), ap=masked_sum(cos, pos_mask),
                     n_ap=jnp.sum(pos_mask), an=masked_sum(cos, neg_mask),
                     n_an=jnp.sum(neg_mask))
    return dict(loss=s["loss"], num_valid=s["n"].astype(jnp.int32),
                frac_active=ratio(s["active"], s["units"]),
                frac_hard_ephn=ratio(s["hard"], s["both"]),
                mean_sim_ap=ratio(s["ap"], s["n_ap"]), mean_sim_an=ratio(s["an"], s["n_an"]))


def num_devices(axis_name: str | None) -> jax.Array:
    """The number of devices along ``axis_name`` (1 without one)."""
    return distances.global_sum(jnp.ones((), jnp.float32), axis_name)
