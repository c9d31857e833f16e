r"""Exact k-nearest-neighbour search on devices, blocked (never an ``[Nq, Ng]`` matrix), and a
gallery :class:`Index` with labels/ids, ``.npz`` persistence and an optional faiss backend.

:func:`knn` takes blocks of queries, computes their similarities to blocks of the gallery with
one matmul, keeps a running ``jax.lax.top_k`` merged across gallery blocks, and returns the
top-``k`` similarities and gallery indices of every query. The block function is jitted once:
the last query and gallery blocks are padded to the block size and the padding is masked out.
Query blocks are dealt round-robin to the given devices (all local devices by default); JAX's
asynchronous dispatch runs the blocks of different devices concurrently. ``hnm.metrics``
runs the same block search (:func:`block_top_k`) and reduces each top-``k`` list to its
retrieval metrics on the device.

Similarity, larger means closer (the house convention):

* ``"cosine"``: :math:`\langle q, g\rangle / (\lVert q\rVert\,\lVert g\rVert)`;
* ``"dot"``: :math:`\langle q, g\rangle`;
* ``"euclidean"``: :math:`-\lVert q - g\rVert`; ``"squared_euclidean"``: :math:`-\lVert q -
  g\rVert^2` (both rank the gallery in the same order).

Ties: equal similarities are ranked by gallery index, the lower first (``top_k`` is stable and
earlier gallery blocks are merged first), i.e. a stable ``argsort`` of ``-sim``, whatever the
block sizes.

Memory: O((query_block + gallery_block) * D + query_block * (gallery_block + k)) per device on
top of one padded copy of the (normalised) embeddings per device.

References:
  Johnson, Douze, Jégou, "Billion-scale similarity search with GPUs", IEEE TBD 2019 (faiss;
  its exact ``IndexFlatIP`` is the blocked matmul + top-k this module reproduces).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from hnm import _checks
from hnm import distances
from hnm.distances import l2_normalize

# The one similarity registry (hnm.distances). "euclidean" and "squared_euclidean" both rank
# by -||q - g||^2 inside the search.
SIMILARITIES = tuple(distances.SIMILARITIES)
# Default block shape: 1024 queries x ~8192 gallery rows (32 MiB of float32 similarities)
# measured fastest on a 2-core CPU for D = 512 (matmul-bound; faiss uses similar blocks).
DEFAULT_QUERY_BLOCK = 1024
DEFAULT_GALLERY_BLOCK = 8192
BACKENDS = ("exact", "faiss")
INDEX_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Host-side argument handling.
# --------------------------------------------------------------------------------------------

def check_similarity(similarity: str) -> str:
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown `similarity`={similarity!r}; expected one of {SIMILARITIES}.")
    return similarity


def check_block_size(block_size: int | tuple[int, int] | None) -> tuple[int | None, ...]:
    """``(query_block, gallery_block)`` from an int, a pair or None (defaults)."""
    if block_size is None:
        return None, None
    sizes = (block_size, block_size) if not isinstance(block_size, (tuple, list)) else block_size
    if len(sizes) != 2 or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool)
                                  and b >= 1 for b in sizes):
        raise ValueError("`block_size` must be a positive int or a pair (query_block, "
                         f"gallery_block) of positive ints; got {block_size!r}.")
    return int(sizes[0]), int(sizes[1])


def check_mask(mask: ArrayLike | None, n: int, name: str, length_of: str) -> np.ndarray:
    if mask is None:
        return np.ones(n, bool)
    mask = np.asarray(mask)
    if mask.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D boolean array [N]; got shape {mask.shape}.")
    if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer)):
        raise TypeError(f"`{name}` must be boolean (or 0/1 integers); got dtype {mask.dtype}.")
    if mask.shape[0] != n:
        raise ValueError(f"`{name}` has {mask.shape[0]} rows but `{length_of}` has {n}; "
                         "they must match.")
    return mask.astype(bool)


def balanced_block(n: int, target: int) -> int:
    """The smallest block (a multiple of 8, at most ``n``) covering ``n`` rows in
    ``ceil(n / target)`` blocks: the padding of the last block stays small."""
    block = math.ceil(n / math.ceil(n / target))
    return min(n, 8 * math.ceil(block / 8))


def block_shape(nq: int, ng: int, block_size) -> tuple[int, int]:
    bq, bg = check_block_size(block_size)
    bq = balanced_block(nq, DEFAULT_QUERY_BLOCK) if bq is None else min(bq, nq)
    bg = balanced_block(ng, DEFAULT_GALLERY_BLOCK) if bg is None else min(bg, ng)
    return bq, bg


def as_matrix(x: ArrayLike, name: str):
    x = jnp.asarray(x) if not hasattr(x, "ndim") else x
    _checks.check_floating_matrix(x, name)
    return x


# --------------------------------------------------------------------------------------------
# Device side.
# --------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("rows", "kind"))
def prepare(x: jax.Array, valid: jax.Array, *, rows: int, kind: str):
    """Normalises (cosine) and zero-pads ``x`` to ``rows`` rows; also says if valid rows are
    finite (one device pass, one extra copy of the embeddings)."""
    finite = jnp.all(jnp.isfinite(x) | ~valid[:, None])
    x = x.astype(jnp.float32)
    if kind == "cosine":
        x = l2_normalize(x)
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, 0))), finite


def prepare_checked(x, valid: np.ndarray, rows: int, kind: str, name: str) -> jax.Array:
    out, finite = prepare(x, jnp.asarray(valid), rows=rows, kind=kind)
    if not bool(finite):
        raise ValueError(f"`{name}` has non-finite values (NaN or inf) in valid rows.")
    return out


# Columns per chunk of :func:`chunked_top_k` (the first that divides the row), and the least
# row length, in multiples of k * chunk, for which it pays. Measured on a [1024, 7504]
# similarity tile, k = 9 (XLA:CPU, 2 cores): lax.top_k 14.5 ms; chunks of 8 / 16 columns
# 6.3 / 5.1 ms; on [1024, 7680]: 16 / 32 / 64 columns 4.8 / 5.1 / 5.0 ms (its matmul at
# D = 512: 27.5 ms).
TOP_K_CHUNKS = (16, 32, 64, 8)
TOP_K_MIN_RATIO = 4


def chunked_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k(x, k)`` of a 2-D ``x``, exactly, with ties to the lower index, in two
    small top-k's instead of one over the whole row.

    The row is cut into chunks of c columns. Each of the k largest entries lies in a chunk
    whose maximum is at least the k-th largest entry, and at most k chunk maxima are (they
    are distinct entries); so the k chunks with the largest maxima (ties: the lower chunk,
    which holds the lower-index entry) hold the answer, and a top-k over their k·c entries,
    kept in column order, gives it with ``top_k``'s own tie rule. Plain ``top_k`` when no
    chunk size of :data:`TOP_K_CHUNKS` divides the row or the row is short.
    """
    rows, n = x.shape
    c = next((c for c in TOP_K_CHUNKS if n % c == 0), None)
    if c is None or n < TOP_K_MIN_RATIO * k * c:
        return jax.lax.top_k(x, k)
    chunks = x.reshape(rows, n // c, c)
    _, best = jax.lax.top_k(jnp.max(chunks, axis=2), k)
    best = jnp.sort(best, axis=1)  # column order, so top_k's tie rule is the global one
    cand = jnp.take_along_axis(chunks, best[:, :, None], axis=1).reshape(rows, k * c)
    cols = (best[:, :, None] * c + jnp.arange(c, dtype=best.dtype)).reshape(rows, k * c)
    values, pick = jax.lax.top_k(cand, k)
    return values, jnp.take_along_axis(cols, pick, axis=1)


def block_top_k(q: jax.Array, q_idx: jax.Array, gallery: jax.Array, gallery_valid: jax.Array,
                *, gallery_block: int, num_gallery_blocks: int, k: int, kind: str,
                exclude_self: bool) -> tuple[jax.Array, jax.Array]:
    """Top-``k`` (similarity, gallery index) of a query block ``q`` [B, D] (traced).

    ``gallery`` [num_gallery_blocks * gallery_block, D] is padded so every ``dynamic_slice``
    is in bounds (a clamped start would silently shift the indices). Masked, padded and (with
    ``exclude_self``) self entries score ``-inf``; when a query has fewer than ``k``
    candidates its list ends with such entries, whose index may be -1 or a masked row.
    For the Euclidean kinds the score is ``-||q - g||^2``.
    """
    q_sq = jnp.sum(q * q, axis=1)

    def one_block(g_start, kb):
        g = jax.lax.dynamic_slice_in_dim(gallery, g_start, gallery_block)
        g_valid = jax.lax.dynamic_slice_in_dim(gallery_valid, g_start, gallery_block)
        # HIGHEST: exact float32 products on accelerators too (TF32 would reorder neighbours).
        sim = jnp.matmul(q, g.T, precision=jax.lax.Precision.HIGHEST)
        if kind in ("euclidean", "squared_euclidean"):
            sim = -jnp.maximum(q_sq[:, None] + jnp.sum(g * g, axis=1)[None, :] - 2.0 * sim, 0.0)
        keep = jnp.broadcast_to(g_valid[None, :], sim.shape)
        if exclude_self:
            g_idx = g_start + jnp.arange(gallery_block, dtype=jnp.int32)
            keep = keep & (q_idx[:, None] != g_idx[None, :])
        values, idx = chunked_top_k(jnp.where(keep, sim, -jnp.inf), kb)
        return values, idx + g_start

    if num_gallery_blocks == 1:
        return one_block(0, k)
    kb = min(k, gallery_block)

    def merge(carry, b):
        run_values, run_idx = carry
        values, idx = one_block(b * gallery_block, kb)
        # Running entries come from earlier (lower-index) blocks and go first, so the stable
        # top_k keeps the lower index on ties, as one global top_k would.
        values, pick = jax.lax.top_k(jnp.concatenate([run_values, values], axis=1), k)
        idx = jnp.take_along_axis(jnp.concatenate([run_idx, idx], axis=1), pick, axis=1)
        return (values, idx), None

    init = (jnp.full((q.shape[0], k), -jnp.inf, jnp.float32),
            jnp.full((q.shape[0], k), -1, jnp.int32))
    (values, idx), _ = jax.lax.scan(merge, init, jnp.arange(num_gallery_blocks, dtype=jnp.int32))
    return values, idx


@functools.partial(jax.jit, static_argnames=(
    "query_block", "gallery_block", "num_gallery_blocks", "k", "kind", "exclude_self"))
def _knn_block(query, gallery, gallery_valid, query_start, *, query_block, gallery_block,
               num_gallery_blocks, k, kind, exclude_self):
    q = jax.lax.dynamic_slice_in_dim(query, query_start, query_block)
    q_idx = query_start + jnp.arange(query_block, dtype=jnp.int32)
    values, idx = block_top_k(q, q_idx, gallery, gallery_valid, gallery_block=gallery_block,
                              num_gallery_blocks=num_gallery_blocks, k=k, kind=kind,
                              exclude_self=exclude_self)
    # Entries that are no candidate (fewer than k left) get index -1, whatever top_k chose.
    return values, jnp.where(jnp.isfinite(values), idx, -1)


def run_blocks(block_fn, args: tuple, num_q_blocks: int, query_block: int,
               devices: Sequence[Any] | None) -> list:
    """Calls ``block_fn(*args, start)`` for every query block, round-robin over ``devices``.

    Each device holds one copy of ``args``; the outputs stay on their devices until read.
    """
    devices = list(devices) if devices is not None else [None]
    if not devices:
        raise ValueError("`devices` is empty; pass None for the default device.")
    placed = [args if d is None else jax.device_put(args, d) for d in devices]
    return [block_fn(*placed[i % len(devices)], jnp.int32(i * query_block))
            for i in range(num_q_blocks)]


def knn(query: ArrayLike, gallery: ArrayLike | None, k: int, *, similarity: str = "cosine",
        exclude_self: bool = False, gallery_mask: ArrayLike | None = None,
        block_size: int | tuple[int, int] | None = None,
        devices: Sequence[Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    r"""Exact top-``k`` neighbours of each query row in ``gallery``, blocked, on devices.

    .. math:: \pi_q = \operatorname{argsort}_{g}^{\downarrow}\, s(q, g),\qquad
        \text{returns } \big(s(q, g_{\pi_q(i)}),\ \pi_q(i)\big)_{i \le k}

    Args:
      query: [Nq, D] floating.
      gallery: [Ng, D] floating, or None to search ``query`` itself (then ``exclude_self``
        usually wants to be True).
      k: neighbours per query, 1 <= k <= the number of gallery rows (minus one with
        ``exclude_self``).
      similarity: one of :data:`SIMILARITIES` (see the module docstring).
      exclude_self: query row i never retrieves gallery row i (leave-one-out); an identical
        copy at another index is an ordinary candidate.
      gallery_mask: [Ng] bool, False rows are never retrieved.
      block_size: rows per query/gallery block, an int or a pair; None for ~1024 x 8192.
        Results do not depend on it.
      devices: deal the query blocks over these devices; default: all local devices.

    Returns:
      ``(scores [Nq, k] float32, indices [Nq, k] int32)`` in decreasing similarity (ties:
      lower index first). If a query has fewer than ``k`` candidates (masked gallery), its
      list ends with score ``-inf`` and index -1.

    Raises:
      ValueError / TypeError: bad shapes, dtypes, ``k``, ``similarity`` or non-finite values;
        the message names the argument.

    Examples:
      >>> x = np.array([[0.0], [1.0], [3.0], [4.0]], np.float32)
      >>> scores, idx = knn(x, None, 2, similarity="euclidean", exclude_self=True)
      >>> idx.tolist(), scores[0].tolist()
      ([[1, 2], [0, 2], [3, 1], [2, 1]], [-1.0, -3.0])
    """
    kind = check_similarity(similarity)
    query = as_matrix(query, "query")
    nq, dim = query.shape
    self_search = gallery is None
    if not self_search:
        gallery = as_matrix(gallery, "gallery")
        if gallery.shape[1] != dim:
            raise ValueError(f"`gallery` has dimension {gallery.shape[1]} but `query` has "
                             f"{dim}; they must match.")
    ng = nq if self_search else gallery.shape[0]
    g_valid = check_mask(gallery_mask, ng, "gallery_mask", "gallery")
    max_k = ng - (1 if exclude_self else 0)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= max_k:
        raise ValueError(f"`k` must be an int in [1, {max_k}] (gallery rows"
                         f"{' minus self' if exclude_self else ''}); got {k!r}.")
    if nq == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    bq, bg = block_shape(nq, ng, block_size)
    num_q_blocks, num_g_blocks = math.ceil(nq / bq), math.ceil(ng / bg)
    q_rows, g_rows = num_q_blocks * bq, num_g_blocks * bg
    if self_search:  # one padded copy serves as both query and gallery
        q_rows = g_rows = max(q_rows, g_rows)
    q_emb = prepare_checked(query, np.ones(nq, bool), q_rows, kind, "query")
    g_emb = q_emb if self_search else prepare_checked(gallery, g_valid, g_rows, kind,
                                                      "gallery")
    g_valid_dev = jnp.asarray(np.pad(g_valid, (0, g_rows - ng)))
    block_fn = functools.partial(
        _knn_block, query_block=bq, gallery_block=bg, num_gallery_blocks=num_g_blocks,
        k=int(k), kind=kind, exclude_self=bool(exclude_self))
    devices = jax.local_devices() if devices is None else devices
    outs = run_blocks(block_fn, (q_emb, g_emb, g_valid_dev), num_q_blocks, bq, devices)
    scores = np.concatenate([np.asarray(o[0]) for o in outs])[:nq]
    indices = np.concatenate([np.asarray(o[1]) for o in outs])[:nq].astype(np.int32)
    if kind == "euclidean":
        scores = -np.sqrt(np.maximum(-scores, 0.0))
    return scores.astype(np.float32), indices


# --------------------------------------------------------------------------------------------
# The gallery index.
# --------------------------------------------------------------------------------------------

class SearchResult(NamedTuple):
    """Neighbours of each query: all fields [Nq, k]; ``labels``/``ids`` None when not held."""
    scores: np.ndarray
    indices: np.ndarray
    labels: np.ndarray | None
    ids: np.ndarray | None


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class Index:
    """Gallery embeddings with optional labels and ids; exact (hnm) or faiss search.

    The exact backend is :func:`knn` (on devices, blocked). ``backend="faiss"`` uses faiss's
    exact flat indices (``IndexFlatIP`` on normalised rows for cosine, ``IndexFlatIP`` for dot,
    ``IndexFlatL2`` for the Euclidean kinds) when ``faiss`` is installed; it is an optional
    dependency, and the two backends give the same neighbours up to float rounding of ties.

    Examples:
      >>> index = Index(similarity="cosine")
      >>> index.add(np.eye(3, dtype=np.float32), labels=[7, 8, 9], ids=["a", "b", "c"])
      >>> res = index.search(np.array([[0.9, 0.1, 0.0]], np.float32), k=2)
      >>> res.indices.tolist(), res.labels.tolist(), res.ids.tolist()
      ([[0, 1]], [[7, 8]], [['a', 'b']])
    """

    def __init__(self, *, similarity: str = "cosine", backend: str = "exact"):
        self.similarity = check_similarity(similarity)
        if backend not in BACKENDS:
            raise ValueError(f"unknown `backend`={backend!r}; expected one of {BACKENDS}.")
        if backend == "faiss" and not faiss_available():
            raise ValueError("`backend`='faiss' needs the optional faiss package "
                             "(pip install faiss-cpu); use backend='exact'.")
        self.backend = backend
        self.embeddings = None  # float32 [N, D]
        self.labels = None      # int64 [N] or None
        self.ids = None         # [N] (str or int) or None
        self._faiss = None

    def __len__(self) -> int:
        return 0 if self.embeddings is None else len(self.embeddings)

    @property
    def dim(self) -> int | None:
        return None if self.embeddings is None else self.embeddings.shape[1]

    def add(self, embeddings: ArrayLike, labels: ArrayLike | None = None,
            ids: Sequence[Any] | None = None) -> None:
        """Appends gallery rows; labels and ids must be given for all rows or for none."""
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
            raise ValueError(f"`embeddings` must be a floating array [N, D]; got shape "
                             f"{emb.shape} and dtype {emb.dtype}.")
        if not np.all(np.isfinite(emb)):
            raise ValueError("`embeddings` has non-finite values (NaN or inf).")
        if self.dim is not None and emb.shape[1] != self.dim:
            raise ValueError(f"`embeddings` has dimension {emb.shape[1]} but the index holds "
                             f"dimension {self.dim}.")
        n = emb.shape[0]
        parts = {}
        for name, value, held in (("labels", labels, self.labels), ("ids", ids, self.ids)):
            if value is None:
                if held is not None:
                    raise ValueError(f"the index holds `{name}`; give them for the new rows.")
                continue
            if len(self) and held is None:
                raise ValueError(f"the index holds rows without `{name}`; cannot add rows "
                                 "with them.")
            value = np.asarray(value)
            if value.shape != (n,):
                raise ValueError(f"`{name}` must have shape [{n}] (one per row of "
                                 f"`embeddings`); got {value.shape}.")
            if name == "labels" and not np.issubdtype(value.dtype, np.integer):
                raise ValueError(f"`labels` must be integers; got dtype {value.dtype}.")
            if name == "ids" and value.dtype == object:
                value = value.astype(str)
            parts[name] = value
        emb = emb.astype(np.float32)
        self.embeddings = emb if self.embeddings is None else np.concatenate(
            [self.embeddings, emb])
        if "labels" in parts:
            lab = parts["labels"].astype(np.int64)
            self.labels = lab if self.labels is None else np.concatenate([self.labels, lab])
        if "ids" in parts:
            self.ids = parts["ids"] if self.ids is None else np.concatenate(
                [self.ids, parts["ids"]])
        self._faiss = None  # rebuilt on the next faiss search

    def search(self, query: ArrayLike, k: int, *, exclude_self: bool = False,
               devices: Sequence[Any] | None = None) -> SearchResult:
        """Top-``k`` gallery rows of each query (see :func:`knn`), with their labels/ids."""
        if not len(self):
            raise ValueError("the index is empty; `add` gallery embeddings first.")
        query = np.asarray(query)
        if query.ndim != 2 or query.shape[1] != self.dim:
            raise ValueError(f"`query` must be [N, {self.dim}] (the index dimension); got "
                             f"shape {query.shape}.")
        if not np.issubdtype(query.dtype, np.floating):
            raise ValueError(f"`query` must be floating; got dtype {query.dtype}.")
        if self.backend == "faiss":
            scores, indices = self._faiss_search(query, k, exclude_self)
        else:
            scores, indices = knn(query, self.embeddings, k, similarity=self.similarity,
                                  exclude_self=exclude_self, devices=devices)
        safe = np.maximum(indices, 0)
        labels = None if self.labels is None else np.where(indices >= 0, self.labels[safe], -1)
        ids = None if self.ids is None else self.ids[safe]
        return SearchResult(scores, indices, labels, ids)

    def _faiss_search(self, query: np.ndarray, k: int, exclude_self: bool):
        import faiss

        max_k = len(self) - (1 if exclude_self else 0)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= max_k:
            raise ValueError(f"`k` must be an int in [1, {max_k}]; got {k!r}.")
        if not np.all(np.isfinite(query)):
            raise ValueError("`query` has non-finite values (NaN or inf).")

        def norm(x):
            x = np.ascontiguousarray(x, np.float32)
            if self.similarity == "cosine":
                x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            return np.ascontiguousarray(x, np.float32)

        if self._faiss is None:
            euclid = self.similarity in ("euclidean", "squared_euclidean")
            self._faiss = (faiss.IndexFlatL2 if euclid else faiss.IndexFlatIP)(self.dim)
            self._faiss.add(norm(self.embeddings))
        # One more neighbour when excluding self: faiss returns the query itself first.
        kk = k + 1 if exclude_self else k
        scores, indices = self._faiss.search(norm(query), kk)
        if exclude_self:
            rows = np.arange(len(query))[:, None]
            keep = indices != rows
            # Drop the self entry when present, else the last one (k + 1 -> k per row).
            drop = np.where(keep.all(axis=1), kk - 1, np.argmin(keep, axis=1))
            mask = np.ones_like(indices, bool)
            mask[np.arange(len(query)), drop] = False
            scores, indices = scores[mask].reshape(-1, k), indices[mask].reshape(-1, k)
        if self.similarity == "euclidean":
            scores = -np.sqrt(np.maximum(scores, 0.0))
        elif self.similarity == "squared_euclidean":
            scores = -scores
        return scores.astype(np.float32), indices.astype(np.int32)

    def save(self, path: str | os.PathLike) -> str:
        """Writes the index as one ``.npz`` (no pickles); returns the path written."""
        if not len(self):
            raise ValueError("the index is empty; nothing to save.")
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        arrays = {"embeddings": self.embeddings, "similarity": np.array(self.similarity),
                  "format_version": np.array(INDEX_FORMAT_VERSION)}
        if self.labels is not None:
            arrays["labels"] = self.labels
        if self.ids is not None:
            arrays["ids"] = self.ids
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        np.savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, backend: str = "exact") -> "Index":
        """Reads an index written by :meth:`save` (or any ``.npz`` with ``embeddings``)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"index file {path!r} not found.")
        try:
            f = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path!r} is not a readable .npz index ({e}).") from None
        with f:
            if "embeddings" not in f.files:
                raise ValueError(f"{path!r} has no `embeddings` array (it has {f.files}); "
                                 "write one with hnm.search.Index.save or hnm embed.")
            similarity = str(f["similarity"]) if "similarity" in f.files else "cosine"
            index = cls(similarity=similarity, backend=backend)
            index.add(f["embeddings"], f["labels"] if "labels" in f.files else None,
                      f["ids"] if "ids" in f.files else None)
        return index


def search_command(argv: Sequence[str]) -> None:
    """``hnm search --index=I.npz --query=Q.npz -k 10 [--output=OUT.npz] [--backend=...]``.

    ``I``: an :class:`Index` ``.npz`` (``embeddings`` [N, D], optional ``labels``, ``ids``);
    ``Q``: an ``.npz`` with ``embeddings`` [Nq, D] (or a ``.npy`` of them, as ``hnm embed``
    writes). Prints one line per query (neighbour ids or indices with scores), or writes
    ``scores``, ``indices`` (and ``labels``, ``ids``) to ``--output`` (``.npz``, or ``.json``).

    Raises:
      ValueError: a missing or malformed file, a dimension mismatch, a bad ``k``.
    """
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="hnm search", add_help=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--query", required=True)
    parser.add_argument("-k", "--k", type=int, default=10)
    parser.add_argument("--output", default=None)
    parser.add_argument("--backend", default="exact", choices=BACKENDS)
    parser.add_argument("--exclude_self", action="store_true")
    args = _parse(parser, argv)
    index = Index.load(args.index, backend=args.backend)
    query = load_embeddings(args.query)
    k = args.k
    res = index.search(query, k, exclude_self=args.exclude_self)
    names = res.ids if res.ids is not None else res.indices
    if args.output is None:
        for i in range(len(query)):
            print(f"{i}: " + " ".join(f"{n}:{s:.4f}" for n, s in zip(names[i], res.scores[i])))
        return
    out = {"scores": res.scores, "indices": res.indices}
    if res.labels is not None:
        out["labels"] = res.labels
    if res.ids is not None:
        out["ids"] = res.ids
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    if args.output.endswith(".json"):
        with open(args.output, "w") as f:
            json.dump({k_: v.tolist() for k_, v in out.items()}, f)
    else:
        np.savez(args.output, **out)
    print(f"wrote {len(query)} x {k} neighbours to {args.output}")


def load_embeddings(path: str) -> np.ndarray:
    """Float embeddings [N, D] from a ``.npy`` or an ``.npz`` holding ``embeddings``."""
    if not os.path.isfile(path):
        raise ValueError(f"query file {path!r} not found.")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path!r} is not a readable .npy/.npz ({e}).") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            if "embeddings" not in data.files:
                raise ValueError(f"{path!r} has no `embeddings` array (it has {data.files}).")
            data = data["embeddings"]
    if data.ndim != 2 or not np.issubdtype(data.dtype, np.floating):
        raise ValueError(f"{path!r} must hold floating embeddings [N, D]; got shape "
                         f"{data.shape} and dtype {data.dtype}.")
    return data


def _parse(parser, argv):
    """argparse without its own exit: a usage error becomes a ValueError (one line)."""
    def error(message):
        raise ValueError(f"{parser.prog}: {message}")

    parser.error = error
    return parser.parse_args(list(argv))
