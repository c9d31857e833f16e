r"""Similarities, distances, label masks and the cross-device reference set.

Convention (``STYLE.md`` §3): everything downstream of this module speaks *similarity*,
larger means closer. A Euclidean user passes :func:`negative_euclidean` (``-||x - y||``), so
``relu(sim_an - sim_ap + margin)`` is the usual distance triplet hinge as well. Arrays named
``sim`` hold similarities, arrays named ``dist`` true distances.

All functions are pure, jit-able, vmap-able and have finite gradients for zero and duplicate
embeddings (the square root gets a floor, the normaliser divides by ``max(norm, eps)``).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from hnm import _checks

NORM_EPS = 1e-12      # the official SCT code: x / max(||x||, 1e-12)
SQRT_EPS = 1e-12      # floor of a squared distance under sqrt: finite gradient at 0
# Label of reference rows that take part in nothing (empty cross-batch memory slots,
# padding): never a positive, never a negative. The int32 minimum, which no dataset uses.
MASKED_LABEL = int(jnp.iinfo(jnp.int32).min)


def l2_normalize(x: ArrayLike, axis: int = -1, eps: float = NORM_EPS) -> jax.Array:
    r"""Scales rows to unit L2 norm: :math:`x / \max(\lVert x \rVert, \epsilon)`.

    A zero vector stays zero (and has a finite gradient) instead of becoming NaN. The norm is
    computed as :math:`m \lVert x / m \rVert` with :math:`m = \max_i |x_i|`, so squaring
    never overflows or underflows: rows of magnitude 1e20 or 1e-20 (float32) get their exact
    norm (rows whose norm is below ``eps`` are divided by ``eps``, as in the official code),
    and float16 / bfloat16 rows keep their precision. Non-finite input stays non-finite.

    Args:
      x: array whose ``axis`` is normalised.
      axis: the axis to normalise.
      eps: :math:`\epsilon`, the smallest divisor.

    Examples:
      >>> l2_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0], [3e30, 4e30]]))
      Array([[0.6, 0.8],
             [0. , 0. ],
             [0.6, 0.8]], dtype=float32)
    """
    x = jnp.asarray(x)
    # The scale m only conditions the arithmetic (x / ||x|| does not depend on it), so it
    # takes no gradient; m = 0 (a zero row) and m = NaN (NaN propagates through x) become 1.
    scale = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    y = x / scale
    sq = jnp.sum(y * y, axis=axis, keepdims=True)       # in [1, D] unless the row is zero
    zero = sq == 0
    # Double-where: sqrt's gradient at 0 is inf, so never evaluate it there.
    root = jnp.sqrt(jnp.where(zero, 1.0, sq))
    norm = jnp.where(zero, 0.0, scale * root)
    small = norm < eps                                  # false for NaN: NaN stays NaN
    return jnp.where(small, x / eps, y / root)


def _pair(x: ArrayLike, y: ArrayLike | None) -> tuple[jax.Array, jax.Array]:
    x = jnp.asarray(x)
    _checks.check_floating_matrix(x, "x")
    if y is None:
        return x, x
    y = jnp.asarray(y)
    _checks.check_floating_matrix(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"`x` and `y` must have the same feature dimension; got "
                         f"{x.shape} and {y.shape}.")
    return x, y


def dot_similarity(x: ArrayLike, y: ArrayLike | None = None) -> jax.Array:
    r"""Inner products :math:`S_{ij} = x_i \cdot y_j`, shape [N, M] (``y`` defaults to ``x``)."""
    x, y = _pair(x, y)
    return x @ y.T


def cosine_similarity(x: ArrayLike, y: ArrayLike | None = None) -> jax.Array:
    r"""Cosine similarity :math:`S_{ij} = \hat x_i \cdot \hat y_j`, shape [N, M].

    Examples:
      >>> cosine_similarity(jnp.array([[1.0, 0.0], [1.0, 1.0]]))
      Array([[1.        , 0.70710677],
             [0.70710677, 0.99999994]], dtype=float32)
    """
    x, y = _pair(x, y)
    xn = l2_normalize(x)
    return xn @ (xn if y is x else l2_normalize(y)).T


def squared_euclidean_distance(x: ArrayLike, y: ArrayLike | None = None) -> jax.Array:
    r""":math:`D^2_{ij} = \lVert x_i\rVert^2 + \lVert y_j\rVert^2 - 2 x_i\cdot y_j`, clipped at 0.

    Expanded form: one matmul, O(N M) memory, never an [N, M, D] difference tensor.
    """
    x, y = _pair(x, y)
    x2 = jnp.sum(x * x, axis=1)
    y2 = x2 if y is x else jnp.sum(y * y, axis=1)
    return jnp.maximum(x2[:, None] + y2[None, :] - 2.0 * (x @ y.T), 0.0)


def safe_sqrt(d2: jax.Array, eps: float = SQRT_EPS) -> jax.Array:
    """``sqrt`` with a finite gradient at 0: values below ``eps`` map to 0, gradient 0."""
    safe = jnp.where(d2 > eps, d2, 1.0)
    return jnp.where(d2 > eps, jnp.sqrt(safe), 0.0)


def euclidean_distance(x: ArrayLike, y: ArrayLike | None = None,
                       squared: bool = False) -> jax.Array:
    r"""Euclidean distance :math:`D_{ij} = \lVert x_i - y_j \rVert`, shape [N, M].

    Finite gradient for coincident points (the gradient of a zero distance is taken as 0).

    Examples:
      >>> euclidean_distance(jnp.array([[0.0, 0.0], [3.0, 4.0]]))
      Array([[0., 5.],
             [5., 0.]], dtype=float32)
    """
    d2 = squared_euclidean_distance(x, y)
    return d2 if squared else safe_sqrt(d2)


def negative_euclidean(x: ArrayLike, y: ArrayLike | None = None) -> jax.Array:
    """``-euclidean_distance(x, y)``: a Euclidean metric in the similarity convention."""
    return -euclidean_distance(x, y)


def negative_squared_euclidean(x: ArrayLike, y: ArrayLike | None = None) -> jax.Array:
    """``-euclidean_distance(x, y, squared=True)`` in the similarity convention."""
    return -squared_euclidean_distance(x, y)


def _rowwise_dot(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.sum(x * y, axis=-1)


def _rowwise_cosine(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.sum(l2_normalize(x) * l2_normalize(y), axis=-1)


def _rowwise_neg_sq(x: jax.Array, y: jax.Array) -> jax.Array:
    return -jnp.sum(jnp.square(x - y), axis=-1)


def _rowwise_neg_euclidean(x: jax.Array, y: jax.Array) -> jax.Array:
    return -safe_sqrt(jnp.sum(jnp.square(x - y), axis=-1))


class Similarity(NamedTuple):
    """One entry of :data:`SIMILARITIES`: a similarity and what callers need to know of it.

    Attributes:
      matrix: ``(x [N, D], y [M, D] | None) -> sim [N, M]``, larger means closer.
      rowwise: ``(x [A, D], y [A, D]) -> sim [A]`` of matched rows ``x[i]``, ``y[i]``: O(A D)
        with an O(A D) backward pass, for recomputing only the chosen pairs of a miner.
      negated_distance: ``sim = -dist`` (the Euclidean kinds): a margin is in distance units
        and a hinge on a distance is ``[d - m]_+`` (pytorch-metric-learning's non-inverted
        distances).
      unit_rows: the similarity L2-normalises its inputs itself (cosine). A caller that has
        already normalised its rows gets the same values from the ``"dot"`` entry, cheaper.
      cosine_of_unit: maps the similarity of two *unit* vectors to their cosine
        (``d^2 = 2 - 2 cos``), for statistics reported in cosine whatever the similarity.
    """
    matrix: Callable[..., jax.Array]
    rowwise: Callable[[jax.Array, jax.Array], jax.Array]
    negated_distance: bool
    unit_rows: bool
    cosine_of_unit: Callable[[jax.Array], jax.Array]


# The one registry of similarity names (objectives' ``distance=``, retrieval metrics'
# ``similarity=``): every other module looks names up here.
SIMILARITIES: dict[str, Similarity] = {
    "cosine": Similarity(cosine_similarity, _rowwise_cosine, False, True, lambda s: s),
    "dot": Similarity(dot_similarity, _rowwise_dot, False, False, lambda s: s),
    "euclidean": Similarity(negative_euclidean, _rowwise_neg_euclidean, True, False,
                            lambda s: 1.0 - 0.5 * s * s),
    "squared_euclidean": Similarity(negative_squared_euclidean, _rowwise_neg_sq, True, False,
                                    lambda s: 1.0 + 0.5 * s),
}


def similarity(name: str, argument: str = "distance") -> Similarity:
    """The registry entry :class:`Similarity` of ``name``.

    Raises:
      ValueError: ``name`` is not a key of :data:`SIMILARITIES`; the message names
        ``argument`` (the caller's keyword) and lists the valid names.

    Examples:
      >>> similarity("euclidean").negated_distance
      True
    """
    if not isinstance(name, str) or name not in SIMILARITIES:
        raise ValueError(f"unknown `{argument}`={name!r}; expected one of "
                         f"{sorted(SIMILARITIES)}.")
    return SIMILARITIES[name]


def get_similarity(name: str) -> Callable[..., jax.Array]:
    """The pairwise similarity function called ``name`` (``"cosine"``, ``"dot"``, ...)."""
    return similarity(name).matrix


def label_masks(labels: ArrayLike, ref_labels: ArrayLike | None = None, *,
                query_offset: ArrayLike = 0) -> tuple[jax.Array, jax.Array]:
    """Positive and negative masks of a query batch against a reference batch.

    ``pos_mask[i, j]`` is true when ``labels[i] == ref_labels[j]`` and ``j`` is not the
    query's own row in the reference set (``j != i + query_offset``); ``neg_mask[i, j]`` when
    the labels differ. With the reference set the ``all_gather`` of every device's batch,
    ``query_offset = axis_index * local_batch`` removes exactly the self-pairs.

    A reference row labelled :data:`MASKED_LABEL` (an empty cross-batch memory slot,
    padding) is neither a positive nor a negative of any query: its column of both masks is
    false, so every miner, loss and statistic built on these masks ignores it.

    Args:
      labels: [A] integer labels of the queries (anchors).
      ref_labels: [M] integer labels of the reference set; defaults to ``labels``.
      query_offset: row of query 0 inside the reference set (may be traced).

    Returns:
      ``(pos_mask, neg_mask)``, both bool [A, M].

    Examples:
      >>> pos, neg = label_masks(jnp.array([0, 1]), jnp.array([0, 1, MASKED_LABEL, 0]))
      >>> pos.tolist(), neg.tolist()
      ([[False, False, False, True], [False, False, False, False]], \
[[False, True, False, False], [True, False, False, True]])
    """
    labels = jnp.asarray(labels)
    ref_labels = labels if ref_labels is None else jnp.asarray(ref_labels)
    _checks.check_labels(labels, "labels")
    _checks.check_labels(ref_labels, "ref_labels")
    same = labels[:, None] == ref_labels[None, :]
    rows = jnp.arange(labels.shape[0])[:, None] + query_offset
    cols = jnp.arange(ref_labels.shape[0])[None, :]
    pos_mask, neg_mask = same & (rows != cols), ~same
    if _can_hold_masked_label(ref_labels.dtype):  # else no entry can be masked
        usable = (ref_labels != MASKED_LABEL)[None, :]
        pos_mask, neg_mask = pos_mask & usable, neg_mask & usable
    return pos_mask, neg_mask


def _can_hold_masked_label(dtype) -> bool:
    return (jnp.issubdtype(dtype, jnp.signedinteger)
            and int(jnp.iinfo(dtype).min) <= MASKED_LABEL)


class ReferenceSet(NamedTuple):
    """What the anchors of one device mine against: every device's rows, or their own."""
    embeddings: jax.Array   # [M, D]
    labels: jax.Array       # [M]
    query_offset: jax.Array  # int32 scalar: row of local anchor 0 inside ``embeddings``


def reference_set(embeddings: jax.Array, labels: jax.Array,
                  axis_name: str | None = None, memory: Any = None, *,
                  normalize_memory: bool = False) -> ReferenceSet:
    """The local batch, or with ``axis_name`` the ``all_gather`` of all devices' batches,
    followed by the rows of a cross-batch memory when one is given.

    The gather is differentiable: its transpose sums each device's cotangent back onto the
    rows it came from, so a loss on local anchors against the global reference set gets the
    same gradient as one device holding the concatenated batch (after the caller ``psum``s
    the parameter gradients).

    Memory rows (:class:`hnm.memory.Memory`: ``embeddings [K, D]``, ``labels [K]``, the same
    on every device) come *after* the batch rows, so ``query_offset`` is unchanged; they are
    stopped (no gradient) and their empty slots carry :data:`MASKED_LABEL`.

    Args:
      embeddings: [B, D] this device's (already normalised, if the caller normalises) rows.
      labels: [B] integer.
      axis_name: gather over this ``pmap``/``shard_map`` axis; None for one device.
      memory: None, or a cross-batch memory whose rows are appended.
      normalize_memory: L2-normalise the memory rows (when the caller normalised the batch).

    Returns:
      :class:`ReferenceSet` with ``B * devices (+ K)`` rows.

    Raises:
      ValueError, TypeError: a memory of the wrong shape, dtype or dimension.
    """
    if axis_name is None:
        ref_emb, ref_labels = embeddings, labels
        offset = jnp.zeros((), jnp.int32)
    else:
        ref_emb = jax.lax.all_gather(embeddings, axis_name, tiled=True)
        ref_labels = jax.lax.all_gather(labels, axis_name, tiled=True)
        offset = (jax.lax.axis_index(axis_name) * embeddings.shape[0]).astype(jnp.int32)
    if memory is not None:
        if not (hasattr(memory, "embeddings") and hasattr(memory, "labels")):
            raise TypeError("`memory` must be a hnm.memory.Memory or None; got "
                            f"{type(memory).__name__}.")
        mem_emb, mem_labels = jnp.asarray(memory.embeddings), jnp.asarray(memory.labels)
        _checks.check_floating_matrix(mem_emb, "memory.embeddings")
        _checks.check_nonempty(mem_emb, "memory.embeddings", ("M (slots)", "D (columns)"))
        _checks.check_labels(mem_labels, "memory.labels", mem_emb.shape[0],
                             "memory.embeddings")
        if mem_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(f"`memory.embeddings` has dimension {mem_emb.shape[1]} but the "
                             f"embeddings have {embeddings.shape[1]}; they must match.")
        # Memory rows were embedded by older parameters: candidates only, never trained.
        mem_emb = jax.lax.stop_gradient(mem_emb).astype(ref_emb.dtype)
        if normalize_memory:
            mem_emb = l2_normalize(mem_emb)
        ref_emb = jnp.concatenate([ref_emb, mem_emb])
        # A dtype that holds MASKED_LABEL (int8 / bool labels would wrap it to a real class).
        dtype = jnp.promote_types(ref_labels.dtype, jnp.int32)
        ref_labels = jnp.concatenate([ref_labels.astype(dtype), mem_labels.astype(dtype)])
    return ReferenceSet(ref_emb, ref_labels, offset)


def global_sum(x: ArrayLike, axis_name: str | None = None) -> jax.Array:
    """``psum`` over ``axis_name`` when given, else ``x`` itself (single-device code path)."""
    x = jnp.asarray(x)
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def global_mean_of(total: ArrayLike, count: ArrayLike,
                   axis_name: str | None = None) -> jax.Array:
    """This device's share of a global mean: ``total / max(psum(count), 1)``.

    Summed over devices (as the train step does with the gradients) it is the mean over the
    global batch; with no count anywhere it is 0, never NaN.
    """
    denom = jax.lax.stop_gradient(global_sum(count, axis_name)).astype(jnp.result_type(total))
    return jnp.asarray(total) / jnp.maximum(denom, 1.0)


# ---------------------------------------------------------------------------------------------
# shard_map's varying-axes types (one home for the miners, objectives and the device seam).


def varying_axes(x: Any) -> frozenset:
    """The ``shard_map`` axes ``x`` varies over (empty outside ``shard_map`` and in pmap)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)   # JAX >= 0.9
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))          # older JAX


def vary_like(tree: Any, like: jax.Array) -> Any:
    """``tree`` cast to vary over the ``shard_map`` axes that ``like`` varies over (a no-op
    outside ``shard_map`` and under pmap): loop carries and replicated inputs must start out
    as varying as the values they are combined with."""
    axes = varying_axes(like)
    if not axes:
        return tree

    def cast(x):
        missing = tuple(sorted(axes - varying_axes(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x
    return jax.tree.map(cast, tree)


def all_finite(x: ArrayLike) -> jax.Array:
    """``all(isfinite(x))`` as a bool scalar typed *replicated* under ``shard_map``.

    Under ``shard_map`` an ``all_gather``-ed array is typed per-device (varying) even though
    its value is the same everywhere; a flag derived from it could not leave the step as a
    replicated output. The ``psum`` over exactly those axes makes it invariant (it only
    scales a count). Nothing varies outside ``shard_map`` or in pmap: no collective then.
    """
    bad = jnp.sum(~jnp.isfinite(jnp.asarray(x))).astype(jnp.int32)
    axes = tuple(sorted(varying_axes(bad)))
    if axes:
        bad = jax.lax.psum(bad, axes)
    return bad == 0
