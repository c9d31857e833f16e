"""What every objective shares: input checks and normalisation, the reference set, the
similarity kernels, global (cross-device) statistics, the aux dict and the reductions.

Private to :mod:`hnm.objectives`; the names here carry no underscore because the module
itself is private (``from hnm.objectives import _common``).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from hnm import _checks
from hnm import distances
from hnm import losses
from hnm.memory import Memory

Aux = dict[str, jax.Array]
Objective = Callable[..., tuple[jax.Array, Aux]]


# ---------------------------------------------------------------------------------------------
# Inputs.


def prepare(embeddings: ArrayLike, labels: ArrayLike, normalize: bool,
            axis_name: str | None, memory: Memory | None = None
            ) -> tuple[jax.Array, jax.Array, distances.ReferenceSet]:
    """Checks, optionally L2-normalises, and builds the (possibly global) reference set,
    followed by the memory rows (normalised like the batch) when a memory is given."""
    # Values first, before jnp.asarray can wrap an int64 label into another class.
    _checks.check_label_values(labels, "labels", reserved=distances.MASKED_LABEL)
    embeddings, labels = jnp.asarray(embeddings), jnp.asarray(labels)
    _checks.check_embeddings_and_labels(embeddings, labels)
    if normalize:
        # Normalise before the gather: each device normalises only its own rows.
        embeddings = distances.l2_normalize(embeddings)
    return embeddings, labels, distances.reference_set(embeddings, labels, axis_name, memory,
                                                       normalize_memory=normalize)


def check_positive(value: Any, name: str) -> None:
    """Checks a Python number at trace time; arrays (maybe traced) are the caller's business."""
    _checks.check_positive(value, name)


# ---------------------------------------------------------------------------------------------
# Similarity kernels on rows that are already normalised where the similarity needs it.


def kernel(distance: str) -> distances.Similarity:
    """The registry entry to compute ``distance`` with on prepared rows: cosine on unit rows
    is the dot product (the caller normalised them), every other similarity is itself."""
    entry = distances.similarity(distance)
    return distances.SIMILARITIES["dot"] if entry.unit_rows else entry


def similarity_matrix(emb: jax.Array, ref: jax.Array, distance: str) -> jax.Array:
    """[A, M] live similarity of the prepared rows."""
    return kernel(distance).matrix(emb, ref)


def mining_matrix(emb: jax.Array, ref: jax.Array, distance: str) -> jax.Array:
    """A stopped [A, M] matrix ordered like the similarity: the Euclidean ones mine on
    ``-d^2`` (the square root is monotone, so the choice is the same, one pass cheaper)."""
    entry = kernel(distance)
    if entry.negated_distance:
        entry = distances.SIMILARITIES["squared_euclidean"]
    return jax.lax.stop_gradient(entry.matrix(emb, ref))


def row_similarity(emb: jax.Array, ref: jax.Array, idx: jax.Array, distance: str
                   ) -> jax.Array:
    """Similarity of ``emb[i]`` to ``ref[idx[i]]``, from gathered rows: O(A D) with an
    O(A D) backward pass (a scatter-add), never the B x B x D matmul of a full matrix."""
    return kernel(distance).rowwise(emb, ref[idx])


def cosine_of(sim: jax.Array, x: jax.Array, ref: jax.Array, distance: str,
              normalize: bool) -> jax.Array:
    """Stopped cosine similarity for the aux statistics, derived from ``sim`` when the rows
    are unit vectors (the registry's ``cosine_of_unit``), else one gradient-free matmul."""
    entry = distances.similarity(distance)
    sim = jax.lax.stop_gradient(sim)
    if entry.unit_rows or normalize:
        return entry.cosine_of_unit(sim)
    return distances.cosine_similarity(jax.lax.stop_gradient(x), jax.lax.stop_gradient(ref))


# ---------------------------------------------------------------------------------------------
# Global statistics and the aux dict.


def global_stats(axis_name: str | None, **terms: ArrayLike) -> dict[str, jax.Array]:
    """Sums scalar statistics over devices with one ``psum``; no gradient."""
    names = list(terms)
    dtype = jnp.result_type(float)  # float32, or float64 under jax.enable_x64
    stacked = jnp.stack([jnp.asarray(terms[n], dtype) for n in names])
    stacked = distances.global_sum(jax.lax.stop_gradient(stacked), axis_name)
    return dict(zip(names, stacked))


def ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / max(den, 1)``: a fraction that is 0, never NaN, when nothing was counted."""
    return num / jnp.maximum(den, 1.0)


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of ``x`` where ``mask``; selects (never multiplies) so garbage rows cannot leak."""
    return jnp.sum(jnp.where(mask, x, 0.0))


def aux_from_stats(s: dict[str, jax.Array]) -> Aux:
    """The standard aux dict from global sums ``n, hard, ap, an, active, loss``."""
    return dict(num_valid=s["n"].astype(jnp.int32), frac_hard=ratio(s["hard"], s["n"]),
                mean_sim_ap=ratio(s["ap"], s["n"]), mean_sim_an=ratio(s["an"], s["n"]),
                frac_active=ratio(s["active"], s["n"]), loss=s["loss"])


def triplet_aux(sim_ap: jax.Array, sim_an: jax.Array, per_triplet: jax.Array,
                valid: jax.Array, loss: jax.Array, axis_name: str | None,
                **extra_counts: jax.Array) -> Aux:
    """The aux dict of an objective whose mined triplets are explicit (``valid`` mask)."""
    def total(x):  # padding rows hold garbage (possibly inf): select, never multiply
        return jnp.sum(jnp.where(valid, x, 0))
    s = global_stats(
        axis_name, n=jnp.sum(valid), hard=total(sim_an > sim_ap), ap=total(sim_ap),
        an=total(sim_an), active=total(per_triplet != 0),
        loss=loss, **extra_counts)
    aux = aux_from_stats(s)
    aux.update({k: s[k].astype(jnp.int32) for k in extra_counts})
    return aux


def frac_hard_counts(cos: jax.Array, pos_mask: jax.Array,
                     neg_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(anchors whose closest negative beats their closest positive, anchors with both)."""
    has_both = jnp.any(pos_mask, axis=1) & jnp.any(neg_mask, axis=1)
    max_pos = jnp.max(jnp.where(pos_mask, cos, -jnp.inf), axis=1)
    max_neg = jnp.max(jnp.where(neg_mask, cos, -jnp.inf), axis=1)
    return jnp.sum(has_both & (max_neg > max_pos)), jnp.sum(has_both)


def pair_aux(loss_share: jax.Array, cos: jax.Array, pos_mask: jax.Array, neg_mask: jax.Array,
             *, sim_ap_sum: ArrayLike, num_ap: ArrayLike, sim_an_sum: ArrayLike,
             num_an: ArrayLike, num_valid: ArrayLike, num_active: ArrayLike,
             num_units: ArrayLike, axis_name: str | None) -> Aux:
    """Global aux scalars of a pair objective from local (sum, count) pairs, one ``psum``.

    A pair objective mines no triplets, so it has no ``frac_hard``; it reports
    ``frac_hard_ephn`` instead, the fraction of anchors (with a positive and a negative) whose
    easy-positive / hard-negative triplet (by cosine) is hard.
    """
    num_hard, num_both = frac_hard_counts(cos, pos_mask, neg_mask)
    s = global_stats(axis_name, loss=loss_share, valid=num_valid, hard=num_hard,
                     both=num_both, ap_sum=sim_ap_sum, n_ap=num_ap, an_sum=sim_an_sum,
                     n_an=num_an, active=num_active, units=num_units)
    return {
        "loss": s["loss"],
        "num_valid": s["valid"].astype(jnp.int32),
        "frac_hard_ephn": ratio(s["hard"], s["both"]),
        "mean_sim_ap": ratio(s["ap_sum"], s["n_ap"]),
        "mean_sim_an": ratio(s["an_sum"], s["n_an"]),
        "frac_active": ratio(s["active"], s["units"]),
    }


def finish(loss: jax.Array, aux: Aux, ref: distances.ReferenceSet) -> tuple[jax.Array, Aux]:
    """``(loss, aux)`` with the loss (and ``aux["loss"]``) NaN when any reference row is
    non-finite.

    Masks select, so a NaN or inf row would otherwise just drop out (its anchor invalid, its
    pairs unmined) and leave a finite loss with a NaN gradient: a trainer that watches the
    loss would apply the update. The reference set holds every device's (normalised) rows
    and the memory's, so every device's share turns NaN together. The poison is a stopped
    constant: the gradient is the one computed, never changed.
    """
    # Replicated under shard_map, so that aux may leave the step as P().
    finite = distances.all_finite(ref.embeddings)
    poison = jax.lax.stop_gradient(jnp.where(finite, 0.0, jnp.nan)).astype(loss.dtype)
    aux = dict(aux, loss=aux["loss"] + poison.astype(aux["loss"].dtype))
    return loss + poison, aux


# ---------------------------------------------------------------------------------------------
# Reductions (each returns this device's share: local sum / global count).


def reduce(per_triplet: jax.Array, valid: jax.Array, reduction: str,
           axis_name: str | None) -> jax.Array:
    """This device's share of the global mean (or AvgNonZero) of the valid triplets."""
    if reduction == "mean":
        total, count = losses.masked_sum_count(per_triplet, valid)
    else:
        total, count = losses.nonzero_sum_count(per_triplet, valid)
    return distances.global_mean_of(total, count, axis_name)


def avg_nonzero(per_unit: jax.Array, valid: jax.Array,
                axis_name: str | None) -> tuple[jax.Array, jax.Array]:
    """PML's ``AvgNonZeroReducer``: mean over the valid units with loss > 0; 0 if none.

    Returns this device's share (local sum / global count) and the local count.
    """
    total, count = losses.nonzero_sum_count(per_unit, valid)
    return distances.global_mean_of(total, count, axis_name), count


def masked_logsumexp(x: jax.Array, mask: jax.Array, *, add_one: bool = False) -> jax.Array:
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
