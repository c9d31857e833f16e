r"""Retrieval metrics (Recall@K, MAP@R, R-precision, P@K, MAP@K, MRR) and clustering NMI/AMI,
computed exactly.

Zero-shot retrieval evaluation in deep metric learning ranks a gallery by similarity to each
query. The datasets are large (SOP's test set has 60,502 images), so :func:`retrieval_metrics`
never forms the ``[Nq, Ng]`` similarity matrix: it takes blocks of queries, computes their
similarities to blocks of the gallery with one matmul, keeps a running ``jax.lax.top_k`` that
is merged across gallery blocks, and reduces each query's top-``k`` list to its metrics on
device (the search itself is :func:`hnm.search.block_top_k`, public as
:func:`hnm.search.knn`). The block function is jitted once: the last query block and gallery
block are padded to the block size and the padding is masked out.

Two protocols:

* **leave-one-out** (``gallery=None``; CUB-200-2011, Cars196, SOP): every query is ranked
  against all other rows of ``query``. A query never retrieves itself (excluded by index), but
  an identical copy of it at another index is an ordinary candidate.
* **query vs gallery** (In-Shop): ``query`` rows are ranked against ``gallery`` rows.

Masks mark padded rows of evaluation batches; a masked row is neither a query nor a candidate.

Ties: equal similarities are ranked by gallery index, the lower index first (``top_k`` is
stable and earlier gallery blocks are merged before later ones). The ranking therefore equals
a stable ``argsort`` of ``-sim``, whatever the block sizes.

References:
  Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020 (MAP@R, R-precision).
  Xuan, Stylianou, Liu, Pless, "Hard negative examples are hard, but useful", ECCV 2020
  (the evaluation protocol hnm reproduces).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from hnm import _checks, search
from hnm.distances import l2_normalize

DEFAULT_RECALL_KS = (1, 2, 4, 8)
# The blocked search lives in hnm.search; these names stay importable from here.
RETRIEVAL_SIMILARITIES = search.SIMILARITIES
DEFAULT_QUERY_BLOCK = search.DEFAULT_QUERY_BLOCK
DEFAULT_GALLERY_BLOCK = search.DEFAULT_GALLERY_BLOCK
# k-means assigns points to centres in row blocks of at most this many distances.
KMEANS_BLOCK_ELEMENTS = 1 << 24
DEFAULT_KMEANS_ITERS = 100


# --------------------------------------------------------------------------------------------
# Argument handling (host side, plain Python/NumPy on static shapes).
# --------------------------------------------------------------------------------------------

def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    try:
        ks = tuple(ks)
    except TypeError:
        raise TypeError(f"`ks` must be a sequence of positive ints; got {ks!r}.") from None
    if not ks or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool)
                         and k >= 1 for k in ks):
        raise ValueError(f"`ks` must be a non-empty sequence of positive ints; got {ks!r}.")
    return tuple(int(k) for k in ks)


_check_mask = search.check_mask
def _labels_to_host(labels: ArrayLike, name: str, n: int, length_of: str) -> np.ndarray:
    labels = jnp.asarray(labels) if not hasattr(labels, "ndim") else labels
    _checks.check_labels(labels, name, n, length_of)
    return np.asarray(labels).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Device side: preparation and the jitted block function.
# --------------------------------------------------------------------------------------------

def _pad1(x: np.ndarray, rows: int, value) -> np.ndarray:
    return np.pad(x, (0, rows - x.shape[0]), constant_values=value)


@functools.partial(jax.jit, static_argnames=(
    "query_block", "gallery_block", "num_gallery_blocks", "k", "ks", "kind", "exclude_self"))
def _query_block_metrics(query, query_labels, num_relevant, gallery, gallery_labels,
                         gallery_valid, query_start, *, query_block, gallery_block,
                         num_gallery_blocks, k, ks, kind, exclude_self):
    """Per-query metrics of one query block: hits@K and precision@K and AP@K [B, len(ks)],
    R-precision, AP@R and the reciprocal rank within max(ks) [B].

    The top-k list comes from :func:`hnm.search.block_top_k` (the search ``knn`` runs);
    only the reduction to metrics is here, on the device.
    """
    q = jax.lax.dynamic_slice_in_dim(query, query_start, query_block)
    q_labels = jax.lax.dynamic_slice_in_dim(query_labels, query_start, query_block)
    r = jax.lax.dynamic_slice_in_dim(num_relevant, query_start, query_block)
    q_idx = query_start + jnp.arange(query_block, dtype=jnp.int32)
    _, top_idx = search.block_top_k(q, q_idx, gallery, gallery_valid,
                                    gallery_block=gallery_block,
                                    num_gallery_blocks=num_gallery_blocks, k=k, kind=kind,
                                    exclude_self=exclude_self)

    # Relevance by index, never by value: a masked/self/placeholder entry can still fill a
    # top-k slot when a query has fewer than k candidates, and must not count.
    safe_idx = jnp.clip(top_idx, 0, gallery.shape[0] - 1)
    rel = ((top_idx >= 0) & gallery_valid[safe_idx]
           & (gallery_labels[safe_idx] == q_labels[:, None]))
    if exclude_self:
        rel = rel & (top_idx != q_idx[:, None])
    hits = jnp.stack([rel[:, :min(kk, k)].any(axis=1) for kk in ks], axis=1)

    rank = jnp.arange(1, k + 1, dtype=jnp.float32)
    in_r = rank[None, :] <= r[:, None]
    rel_r = rel & in_r
    r_safe = jnp.maximum(r, 1).astype(jnp.float32)
    r_precision = rel_r.sum(axis=1) / r_safe
    precision_at_i = jnp.cumsum(rel, axis=1) / rank[None, :]
    average_precision = jnp.where(rel_r, precision_at_i, 0.0).sum(axis=1) / r_safe
    rel_p = jnp.where(rel, precision_at_i, 0.0)
    precision_k = jnp.stack([rel[:, :min(kk, k)].sum(axis=1) / kk for kk in ks], axis=1)
    ap_k = jnp.stack([rel_p[:, :min(kk, k)].sum(axis=1)
                      / jnp.maximum(jnp.minimum(r, kk), 1) for kk in ks], axis=1)
    depth = min(max(ks), k)
    first = jnp.argmax(rel[:, :depth], axis=1)
    reciprocal_rank = jnp.where(rel[:, :depth].any(axis=1), 1.0 / (first + 1.0), 0.0)
    return hits, r_precision, average_precision, precision_k, ap_k, reciprocal_rank


def _search(query, query_labels, gallery, gallery_labels, ks, *, similarity, block_size,
            query_mask, gallery_mask, with_r, devices=None):
    """Checks arguments, runs the blocked search; per-query hits, R and the metric arrays of
    :func:`_query_block_metrics`."""
    ks = _check_ks(ks)
    search.check_similarity(similarity)
    search.check_block_size(block_size)
    query = jnp.asarray(query) if not hasattr(query, "ndim") else query
    _checks.check_floating_matrix(query, "query")
    nq, dim = query.shape
    q_labels = _labels_to_host(query_labels, "query_labels", nq, "query")
    q_valid = _check_mask(query_mask, nq, "query_mask", "query")
    leave_one_out = gallery is None
    if leave_one_out:
        if gallery_labels is not None:
            raise ValueError("`gallery_labels` was given without `gallery`.")
        if gallery_mask is not None:
            raise ValueError("`gallery_mask` was given without `gallery`; in leave-one-out "
                             "`query_mask` masks rows both as queries and as candidates.")
        g_labels, g_valid, ng = q_labels, q_valid, nq
    else:
        if gallery_labels is None:
            raise ValueError("`gallery` was given without `gallery_labels`.")
        gallery = jnp.asarray(gallery) if not hasattr(gallery, "ndim") else gallery
        _checks.check_floating_matrix(gallery, "gallery")
        ng = gallery.shape[0]
        if gallery.shape[1] != dim:
            raise ValueError(f"`gallery` has dimension {gallery.shape[1]} but `query` has "
                             f"{dim}; they must match.")
        g_labels = _labels_to_host(gallery_labels, "gallery_labels", ng, "gallery")
        g_valid = _check_mask(gallery_mask, ng, "gallery_mask", "gallery")
    # Dense int32 class ids: arbitrary int64 labels survive the trip to the device unchanged.
    classes = np.unique(np.concatenate([q_labels, g_labels]))
    q_labels, g_labels = np.searchsorted(classes, q_labels), np.searchsorted(classes, g_labels)
    if nq == 0 or not q_valid.any():
        raise ValueError("`query` has no valid row (empty, or all masked by `query_mask`).")
    if ng == 0 or not g_valid.any():
        raise ValueError("the gallery has no valid row (empty `gallery`, or all masked).")

    # R: same-class valid candidates of each query, from label counts (O(N log N), host).
    classes, counts = np.unique(g_labels[g_valid], return_counts=True)
    pos = np.clip(np.searchsorted(classes, q_labels), 0, len(classes) - 1)
    num_relevant = np.where(classes[pos] == q_labels, counts[pos], 0)
    if leave_one_out:
        num_relevant = num_relevant - q_valid  # the query itself is no candidate
    num_relevant = np.where(q_valid, num_relevant, 0)

    k = max(ks)
    if with_r:
        k = max(k, int(num_relevant.max()))
    k = min(k, ng)  # R never exceeds the number of candidates, so this cuts no R short

    bq, bg = search.block_shape(nq, ng, block_size)
    num_q_blocks, num_g_blocks = math.ceil(nq / bq), math.ceil(ng / bg)
    q_rows, g_rows = num_q_blocks * bq, num_g_blocks * bg
    if leave_one_out:  # one padded copy serves as both query and gallery
        q_rows = g_rows = max(q_rows, g_rows)
    q_emb = search.prepare_checked(query, q_valid, q_rows, similarity, "query")
    g_emb = q_emb if leave_one_out else search.prepare_checked(gallery, g_valid, g_rows,
                                                                similarity, "gallery")

    dev = dict(
        query_labels=jnp.asarray(_pad1(q_labels, q_rows, -1), jnp.int32),
        num_relevant=jnp.asarray(_pad1(num_relevant, q_rows, 0), jnp.int32),
        gallery_labels=jnp.asarray(_pad1(g_labels, g_rows, -1), jnp.int32),
        gallery_valid=jnp.asarray(_pad1(g_valid, g_rows, False)))
    block_fn = functools.partial(
        _query_block_metrics, query_block=bq, gallery_block=bg,
        num_gallery_blocks=num_g_blocks, k=k, ks=ks, kind=similarity,
        exclude_self=leave_one_out)
    # Query blocks are dealt round-robin to the devices (hnm.search.run_blocks): each device
    # holds one copy of the (padded) embeddings and labels. None: the default device only.
    args = (q_emb, dev["query_labels"], dev["num_relevant"], g_emb, dev["gallery_labels"],
            dev["gallery_valid"])
    outs = search.run_blocks(block_fn, args, num_q_blocks, bq, devices)
    per_query = tuple(np.concatenate([np.asarray(o[j]) for o in outs])[:nq]
                      for j in range(len(outs[0])))
    return (ks, q_valid, num_relevant) + per_query


def _recalls(ks, q_valid, num_relevant, hits, count_lone_queries):
    counted = q_valid if count_lone_queries else q_valid & (num_relevant > 0)
    n = counted.sum()
    return {f"recall@{kk}": float(hits[counted, i].sum() / n) if n else 0.0
            for i, kk in enumerate(ks)}


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------

def retrieval_metrics(query: ArrayLike, query_labels: ArrayLike,
                      gallery: ArrayLike | None = None, gallery_labels: ArrayLike | None = None,
                      ks: Sequence[int] = DEFAULT_RECALL_KS, *, similarity: str = "cosine",
                      block_size: int | tuple[int, int] | None = None,
                      query_mask: ArrayLike | None = None,
                      gallery_mask: ArrayLike | None = None,
                      count_lone_queries: bool = False,
                      devices: Sequence[Any] | None = None) -> dict[str, float]:
    r"""Recall@K, MAP@R and R-precision of a retrieval, exact and blocked.

    For a query q let :math:`\mathrm{rel}(i) \in \{0, 1\}` say whether its i-th nearest
    candidate shares its class, and R the number of same-class candidates (in leave-one-out,
    not counting q itself). Then

    .. math::

        \mathrm{Recall@K} = \frac{1}{|Q|}\sum_{q \in Q}
            \mathbb{1}\Big[\sum_{i \le K} \mathrm{rel}_q(i) > 0\Big],\qquad
        \mathrm{R\text{-}precision} = \frac{1}{|Q|}\sum_{q \in Q}
            \frac{1}{R_q}\sum_{i \le R_q} \mathrm{rel}_q(i),

        \mathrm{MAP@R} = \frac{1}{|Q|}\sum_{q \in Q}\frac{1}{R_q}\sum_{i \le R_q}
            P_q(i)\,\mathrm{rel}_q(i),\qquad P_q(i) = \frac{1}{i}\sum_{j \le i}\mathrm{rel}_q(j),

        \mathrm{P@K} = \frac{1}{|Q|}\sum_{q} P_q(K),\qquad
        \mathrm{MAP@K} = \frac{1}{|Q|}\sum_{q}\frac{1}{\min(K, R_q)}\sum_{i \le K}
            P_q(i)\,\mathrm{rel}_q(i),\qquad
        \mathrm{MRR} = \frac{1}{|Q|}\sum_{q}\frac{1}{\mathrm{rank}_q},

    with :math:`\mathrm{rank}_q` the rank of q's first relevant candidate, counted as
    :math:`\infty` (a 0 term) beyond rank max(ks): the MRR is cut at the deepest K asked for
    (MRR@1000 with SOP's ks), so it costs no deeper search than Recall@K. P@K divides by K
    even where fewer than K candidates exist.

    Lone queries (R = 0: no same-class candidate at all) follow pytorch-metric-learning's
    ``AccuracyCalculator``: they are left out of Q for every metric, Recall@K included. The
    usual SOP/In-Shop evaluation scripts instead keep them in Recall@K as misses;
    ``count_lone_queries=True`` reproduces that (it never changes MAP@R or R-precision). The
    standard CUB/Cars/SOP/In-Shop test sets have no lone query, so both agree there. If no
    query counts, every metric is 0.0 (PML's convention), never NaN.

    Ties are ranked by gallery index, lower first (equal to a stable argsort of ``-sim``).

    Memory is O((query_block + gallery_block) * D + query_block * (gallery_block + k)) on top
    of one padded copy of the embeddings, with k = max(max(ks), max R): never Nq x Ng.

    Args:
      query: [Nq, D] floating embeddings of the queries.
      query_labels: [Nq] integer class labels.
      gallery: [Ng, D] floating embeddings to rank; ``None`` for leave-one-out over ``query``.
      gallery_labels: [Ng] integer labels; given exactly when ``gallery`` is.
      ks: the K of Recall@K (positive ints).
      similarity: ``"cosine"`` (on L2-normalised rows; default), ``"dot"``, ``"euclidean"`` or
        ``"squared_euclidean"`` (both rank by squared distance, nearest first).
      block_size: rows per query block and per gallery block; an int for both, a pair
        ``(query_block, gallery_block)``, or ``None`` for about 1024 x 8192 (balanced so the
        last block wastes little padding). Results do not depend on it.
      query_mask: [Nq] bool, False for padded rows; in leave-one-out such a row is neither a
        query nor a candidate.
      gallery_mask: [Ng] bool, False for padded gallery rows (query vs gallery only).
      count_lone_queries: count queries with R = 0 as Recall@K misses (see above).
      devices: shard the query blocks round-robin over these devices (e.g.
        ``jax.local_devices()``); each holds one copy of the embeddings. Default: the
        default device only. Results do not depend on it.

    Returns:
      ``{"recall@K": ... for each K, "map@r", "r_precision", "precision@K" and "map@K" for
      each K, "mrr"}``, Python floats.

    Raises:
      ValueError: wrong shapes, mismatched lengths, unknown ``similarity``, bad ``ks`` or
        ``block_size``, ``gallery`` without ``gallery_labels`` (or the reverse), no valid query
        or candidate, or non-finite values in a valid row; the message names the argument.
      TypeError: non-floating embeddings, non-integer labels, non-boolean masks.

    Examples:
      >>> x = jnp.array([[0.0], [1.0], [3.0], [4.0]])   # points on a line
      >>> labels = jnp.array([0, 0, 1, 0])
      >>> m = retrieval_metrics(x, labels, ks=(1, 2), similarity="euclidean")
      >>> {name: round(value, 4) for name, value in m.items()}  # doctest: +NORMALIZE_WHITESPACE
      {'recall@1': 0.6667, 'recall@2': 1.0, 'map@r': 0.4167, 'r_precision': 0.5,
       'precision@1': 0.6667, 'precision@2': 0.5, 'map@1': 0.6667, 'map@2': 0.4167,
       'mrr': 0.8333}

    References:
      Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020, §3.2.
    """
    ks, q_valid, num_relevant, hits, r_prec, ap, prec_k, ap_k, rr = _search(
        query, query_labels, gallery, gallery_labels, ks, similarity=similarity,
        block_size=block_size, query_mask=query_mask, gallery_mask=gallery_mask, with_r=True,
        devices=devices)
    out = _recalls(ks, q_valid, num_relevant, hits, count_lone_queries)
    counted = q_valid & (num_relevant > 0)

    def mean(x):
        return float(x[counted].astype(np.float64).mean()) if counted.any() else 0.0

    out["map@r"] = mean(ap)
    out["r_precision"] = mean(r_prec)
    for i, kk in enumerate(ks):
        out[f"precision@{kk}"] = mean(prec_k[:, i])
    for i, kk in enumerate(ks):
        out[f"map@{kk}"] = mean(ap_k[:, i])
    out["mrr"] = mean(rr)
    return out


def recall_at_k(query: ArrayLike, query_labels: ArrayLike, gallery: ArrayLike | None = None,
                gallery_labels: ArrayLike | None = None,
                ks: Sequence[int] = DEFAULT_RECALL_KS, **kwargs) -> dict[int, float]:
    r"""Recall@K only, ``{K: recall}``; cheaper than :func:`retrieval_metrics` (k = max(ks)).

    .. math:: \mathrm{Recall@K} = \frac{1}{|Q|}\sum_{q\in Q}
        \mathbb{1}\big[\exists\, i \le K:\ y_{\pi_q(i)} = y_q\big]

    Same arguments (``similarity``, ``block_size``, ``query_mask``, ``gallery_mask``,
    ``count_lone_queries``), conventions and errors as :func:`retrieval_metrics`.

    Examples:
      >>> x = jnp.array([[0.0], [1.0], [3.0], [4.0]])
      >>> recall_at_k(x, jnp.array([0, 0, 1, 0]), ks=(1, 2), similarity="euclidean")
      {1: 0.6666666666666666, 2: 1.0}
    """
    count_lone_queries = kwargs.pop("count_lone_queries", False)
    ks, q_valid, num_relevant, hits, *_ = _search(
        query, query_labels, gallery, gallery_labels, ks, with_r=False,
        **{"similarity": "cosine", "block_size": None, "query_mask": None,
           "gallery_mask": None, **kwargs})
    recalls = _recalls(ks, q_valid, num_relevant, hits, count_lone_queries)
    return {kk: recalls[f"recall@{kk}"] for kk in ks}


# --------------------------------------------------------------------------------------------
# Clustering quality: k-means + NMI.
# --------------------------------------------------------------------------------------------

def _assign(x: jax.Array, centers: jax.Array, row_block: int) -> jax.Array:
    """Nearest centre of each row (squared Euclidean), in row blocks; ties -> lower index."""
    c_sq = jnp.sum(centers * centers, axis=1)

    def one(xb):
        # ||x||^2 is the same for every centre of a row: argmin needs only ||c||^2 - 2 x.c.
        d = c_sq[None, :] - 2.0 * jnp.matmul(xb, centers.T,
                                             precision=jax.lax.Precision.HIGHEST)
        return jnp.argmin(d, axis=1).astype(jnp.int32)

    n = x.shape[0]
    return jax.lax.map(one, x.reshape(n // row_block, row_block, -1)).reshape(n)


@functools.partial(jax.jit, static_argnames=("num_clusters", "num_iters", "row_block"))
def _kmeans(key, x, valid, *, num_clusters, num_iters, row_block):
    w = valid.astype(x.dtype)
    key, sub = jax.random.split(key)
    first = jax.random.categorical(sub, jnp.where(valid, 0.0, -jnp.inf))

    def sq_dist_to(c):
        return jnp.maximum(jnp.sum((x - c[None, :]) ** 2, axis=1), 0.0) * w

    # k-means++ (Arthur & Vassilvitskii 2007): next centre drawn with probability ~ D(x)^2.
    def seed(i, carry):
        centers, d2 = carry
        logits = jnp.where(d2 > 0, jnp.log(jnp.where(d2 > 0, d2, 1.0)), -jnp.inf)
        # All remaining distances 0 (duplicates): fall back to a uniform valid row.
        logits = jnp.where(jnp.any(d2 > 0), logits, jnp.where(valid, 0.0, -jnp.inf))
        idx = jax.random.categorical(jax.random.fold_in(key, i), logits)
        centers = centers.at[i].set(x[idx])
        return centers, jnp.minimum(d2, sq_dist_to(x[idx]))

    centers = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(x[first])
    centers, _ = jax.lax.fori_loop(1, num_clusters, seed, (centers, sq_dist_to(x[first])))

    def lloyd(carry):
        it, centers, assign, _ = carry
        sums = jax.ops.segment_sum(x * w[:, None], assign, num_segments=num_clusters)
        counts = jax.ops.segment_sum(w, assign, num_segments=num_clusters)
        # An empty cluster keeps its centre (no NaN from 0/0).
        centers = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None],
                            centers)
        new = _assign(x, centers, row_block)
        return it + 1, centers, new, jnp.any((new != assign) & valid)

    assign = _assign(x, centers, row_block)
    _, centers, assign, _ = jax.lax.while_loop(
        lambda c: (c[0] < num_iters) & c[3], lloyd,
        (jnp.int32(0), centers, assign, jnp.bool_(True)))
    return centers, assign


def kmeans(key: jax.Array, x: ArrayLike, num_clusters: int, *,
           num_iters: int = DEFAULT_KMEANS_ITERS,
           mask: ArrayLike | None = None) -> tuple[jax.Array, jax.Array]:
    r"""k-means (k-means++ seeding from ``key``, then Lloyd iterations), jitted.

    .. math:: \min_{c_1..c_k} \sum_i \min_j \lVert x_i - c_j \rVert^2

    Seeding is plain k-means++ (one candidate per step; scikit-learn's default is the greedy
    variant with several candidates). Lloyd stops when no assignment changes or after
    ``num_iters`` updates. An empty cluster keeps its previous centre. The assignment never
    forms an N x k matrix for large N (row blocks of ~2^24 distances).

    Args:
      key: PRNG key for the seeding.
      x: [N, D] floating points.
      num_clusters: k, at most the number of valid rows.
      num_iters: maximum Lloyd updates.
      mask: [N] bool, False rows are ignored (they are still assigned, but move no centre).

    Returns:
      ``(centers [k, D], assignments [N] int32)``.

    Raises:
      ValueError / TypeError: bad shapes, dtypes, ``num_clusters`` or ``num_iters``.
    """
    x = jnp.asarray(x) if not hasattr(x, "ndim") else x
    _checks.check_floating_matrix(x, "x")
    valid = _check_mask(mask, x.shape[0], "mask", "x")
    if not isinstance(num_clusters, (int, np.integer)) or not 1 <= num_clusters <= valid.sum():
        raise ValueError(f"`num_clusters` must be an int in [1, {int(valid.sum())}] (valid "
                         f"rows); got {num_clusters!r}.")
    if not isinstance(num_iters, (int, np.integer)) or num_iters < 0:
        raise ValueError(f"`num_iters` must be a non-negative int; got {num_iters!r}.")
    if not bool(jnp.all(jnp.isfinite(x) | ~jnp.asarray(valid)[:, None])):
        raise ValueError("`x` has non-finite values (NaN or inf) in valid rows.")
    n = x.shape[0]
    row_block = min(n, max(8, KMEANS_BLOCK_ELEMENTS // int(num_clusters)))
    rows = math.ceil(n / row_block) * row_block
    xp = jnp.pad(x.astype(jnp.float32), ((0, rows - n), (0, 0)))
    vp = jnp.asarray(_pad1(valid, rows, False))
    centers, assign = _kmeans(key, xp, vp, num_clusters=int(num_clusters),
                              num_iters=int(num_iters), row_block=row_block)
    return centers, assign[:n]


def normalized_mutual_info(labels_true: ArrayLike, labels_pred: ArrayLike) -> float:
    r"""NMI of two labelings with arithmetic-mean normalisation (scikit-learn's default).

    .. math:: \mathrm{NMI}(U, V) = \frac{I(U; V)}{\tfrac12\,(H(U) + H(V))}

    Two single-cluster labelings give 1.0; otherwise I = 0 gives 0.0 (scikit-learn's limits).

    Args:
      labels_true: [N] integer class labels.
      labels_pred: [N] integer cluster ids.

    Returns:
      NMI in [0, 1] as a Python float.

    Examples:
      >>> normalized_mutual_info(np.array([0, 0, 1, 1]), np.array([5, 5, 2, 2]))
      1.0
    """
    joint = _contingency(labels_true, labels_pred)
    n = joint.sum()
    if joint.shape[0] == joint.shape[1] <= 1:  # one cluster each (or nothing): identical
        return 1.0
    p = joint / n
    pu, pv = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float(np.sum(p[nz] * np.log(p[nz] / np.outer(pu, pv)[nz])))
    if mi <= 0.0:
        return 0.0
    h_u, h_v = -np.sum(pu * np.log(pu)), -np.sum(pv * np.log(pv))
    return float(mi / max(0.5 * (h_u + h_v), np.finfo(np.float64).eps))


def _contingency(labels_true, labels_pred):
    u, v = np.asarray(labels_true), np.asarray(labels_pred)
    for a, name in ((u, "labels_true"), (v, "labels_pred")):
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"`{name}` must be a 1-D integer array; got shape {a.shape} and "
                             f"dtype {a.dtype}.")
    if u.shape != v.shape:
        raise ValueError(f"`labels_true` and `labels_pred` must have the same length; got "
                         f"{u.shape[0]} and {v.shape[0]}.")
    _, ui = np.unique(u, return_inverse=True)
    _, vi = np.unique(v, return_inverse=True)
    joint = np.zeros((ui.max(initial=-1) + 1, vi.max(initial=-1) + 1))
    np.add.at(joint, (ui, vi), 1.0)
    return joint


def _expected_mutual_info(a: np.ndarray, b: np.ndarray, n: int) -> float:
    r"""E[I(U; V)] under the permutation model (hypergeometric cell counts; Vinh et al.)."""
    from scipy.special import gammaln  # lazy: scipy only for AMI

    # Group equal marginals: the sum depends on (a_i, b_j) only.
    a_vals, a_cnt = np.unique(a.astype(np.int64), return_counts=True)
    b_vals, b_cnt = np.unique(b.astype(np.int64), return_counts=True)
    lg = gammaln(np.arange(n + 2, dtype=np.float64))  # lg[m] = log((m - 1)!)
    total = 0.0
    for ai, ca in zip(a_vals, a_cnt):
        for bj, cb in zip(b_vals, b_cnt):
            nij = np.arange(max(1, ai + bj - n), min(ai, bj) + 1, dtype=np.int64)
            if nij.size == 0:
                continue
            log_p = (lg[ai + 1] + lg[bj + 1] + lg[n - ai + 1] + lg[n - bj + 1] - lg[n + 1]
                     - lg[nij + 1] - lg[ai - nij + 1] - lg[bj - nij + 1]
                     - lg[n - ai - bj + nij + 1])
            term = nij / n * np.log(n * nij / (float(ai) * float(bj)))
            total += ca * cb * float(np.sum(term * np.exp(log_p)))
    return total


def adjusted_mutual_info(labels_true: ArrayLike, labels_pred: ArrayLike) -> float:
    r"""Adjusted mutual information (arithmetic normalisation, scikit-learn's default).

    .. math:: \mathrm{AMI}(U, V) = \frac{I(U; V) - \mathbb{E}[I(U; V)]}
        {\tfrac12\,(H(U) + H(V)) - \mathbb{E}[I(U; V)]}

    The expectation is over random labelings with the same cluster sizes (hypergeometric
    cell counts), so AMI is ~0 for a chance clustering whatever the number of clusters, which
    NMI is not (NMI rises with k). Identical single-cluster (or all-singleton) labelings give
    1.0, as in scikit-learn.

    Args:
      labels_true: [N] integer class labels.
      labels_pred: [N] integer cluster ids.

    Returns:
      AMI (at most 1; may be slightly negative) as a Python float.

    Examples:
      >>> adjusted_mutual_info(np.array([0, 0, 1, 1]), np.array([5, 5, 2, 2]))
      1.0

    References:
      Vinh, Epps, Bailey, "Information Theoretic Measures for Clusterings Comparison",
      JMLR 11, 2010.
    """
    joint = _contingency(labels_true, labels_pred)
    n = int(joint.sum())
    r, c = joint.shape
    if r == c == 1 or r == c == 0 or (r == c == n):
        return 1.0
    p = joint / n
    pu, pv = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = max(0.0, float(np.sum(p[nz] * np.log(p[nz] / np.outer(pu, pv)[nz]))))
    h_u, h_v = -np.sum(pu * np.log(pu)), -np.sum(pv * np.log(pv))
    emi = _expected_mutual_info(joint.sum(axis=1), joint.sum(axis=0), n)
    denominator = 0.5 * (h_u + h_v) - emi
    eps = np.finfo(np.float64).eps
    denominator = min(denominator, -eps) if denominator < 0 else max(denominator, eps)
    return float((mi - emi) / denominator)


def clustering_metrics(embeddings: ArrayLike, labels: ArrayLike, key: jax.Array | None = None,
                       **kwargs) -> dict[str, float]:
    """``{"nmi", "ami"}`` of one k-means clustering of ``embeddings`` (see :func:`nmi`, whose
    keyword arguments it takes) against ``labels``."""
    assign, labels, valid = _cluster(embeddings, labels, key, **kwargs)
    return {"nmi": normalized_mutual_info(labels[valid], assign[valid]),
            "ami": adjusted_mutual_info(labels[valid], assign[valid])}


def nmi(embeddings: ArrayLike, labels: ArrayLike, key: jax.Array | None = None, *,
        num_clusters: int | None = None, num_iters: int = DEFAULT_KMEANS_ITERS,
        normalize: bool = True, mask: ArrayLike | None = None) -> float:
    r"""Normalised mutual information between k-means clusters and the class labels.

    k-means (:func:`kmeans`) with k = the number of classes (or ``num_clusters``) on the
    embeddings (L2-normalised first when ``normalize``, i.e. the cosine geometry the retrieval
    metrics use), then :func:`normalized_mutual_info` of the assignment against ``labels``.

    .. math:: \mathrm{NMI}(Y, C) = \frac{I(Y; C)}{\tfrac12\,(H(Y) + H(C))}

    Args:
      embeddings: [N, D] floating.
      labels: [N] integer class labels.
      key: PRNG key of the k-means++ seeding; ``None`` means ``jax.random.key(0)``.
      num_clusters: k; defaults to the number of distinct labels among valid rows.
      num_iters: maximum Lloyd iterations.
      normalize: L2-normalise the embeddings before clustering.
      mask: [N] bool, False for padded rows (left out of clustering and of the score).

    Returns:
      NMI in [0, 1] as a Python float.

    Raises:
      ValueError / TypeError: bad shapes or dtypes, naming the argument.

    References:
      Schütze, Manning, Raghavan, "Introduction to Information Retrieval", 2008, §16.3
      (NMI as used for metric learning by Song et al., "Deep Metric Learning via Lifted
      Structured Feature Embedding", CVPR 2016).
    """
    assign, labels, valid = _cluster(embeddings, labels, key, num_clusters=num_clusters,
                                     num_iters=num_iters, normalize=normalize, mask=mask)
    return normalized_mutual_info(labels[valid], assign[valid])


def _cluster(embeddings, labels, key=None, *, num_clusters=None,
             num_iters=DEFAULT_KMEANS_ITERS, normalize=True, mask=None):
    """k-means assignment [N] (host), host labels [N] and the valid mask [N]."""
    embeddings = jnp.asarray(embeddings) if not hasattr(embeddings, "ndim") else embeddings
    _checks.check_floating_matrix(embeddings, "embeddings")
    labels = _labels_to_host(labels, "labels", embeddings.shape[0], "embeddings")
    valid = _check_mask(mask, embeddings.shape[0], "mask", "embeddings")
    if not valid.any():
        raise ValueError("`embeddings` has no valid row (empty, or all masked by `mask`).")
    if num_clusters is None:
        num_clusters = int(np.unique(labels[valid]).size)
    key = jax.random.key(0) if key is None else key
    x = l2_normalize(embeddings) if normalize else embeddings
    _, assign = kmeans(key, x, num_clusters, num_iters=num_iters, mask=valid)
    return np.asarray(assign), labels, valid
