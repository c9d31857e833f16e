r"""Blocked and streaming mining: the triplet objectives' kernels in O(A·block + M·D) memory.

Every triplet objective of :mod:`hnm.objectives` mines A anchors against a reference set of
M rows: the (gathered) batch, followed by a cross-batch memory's rows (:mod:`hnm.memory`).
The dense way builds the A x M similarity matrix; at M = 65,536 memory rows that is 256 MiB
per matrix. This module never builds it. It walks the reference set in blocks of ``block``
rows (``lax.scan``), computes one A x block tile of similarities at a time, folds it into a
small running state and throws it away:

* per-anchor rules (``ephn``, ``epshn``, ``sct``, ``batch_hard``): a running top-1 (value,
  index) per anchor and per selection (:func:`mine_per_anchor`); the loss then recomputes
  only the chosen similarities from gathered rows (O(A D) forward and backward);
* ``semihard`` (TFA's rule, every anchor-positive pair): a running semi-hard negative per
  positive slot and a running farthest negative (:func:`semihard_sums`);
* ``batch_all``: running sums of the active-triplet counts and of their gradient
  (:func:`batch_all_sums`).

The anchors' positives are found without a similarity pass: one stable ``argsort`` of the
reference labels puts each class in a contiguous run of rows in column order, so the k-th
positive of anchor a is ``order[lo[a] + k]`` (skipping a's own row): O(M log M) on labels
only. They are handled in chunks of ``slots`` positives (a ``lax.while_loop`` whose trip
count is the largest number of positives of an anchor divided by ``slots``, one on a P x K
batch), each chunk one sweep over the reference blocks (``semihard``, ``batch_all``). The
per-anchor rules take their positive from the same index, so that only the negative costs
masked passes over the tiles (two: the max, then its first column): with one tile the
positives' values are gathered from the tile, when streaming they are dot products of
gathered rows (and EPSHN's semi-hard negative, which needs the final positive, still needs
one sweep, not two). Measured against masked positive passes (fwd + bwd of ``ephn``, quiet
machine): B = 1024, D = 64 2.4 -> 1.6 ms; B = 4096, D = 64 31.5 -> 19 ms; B = 1024,
D = 512 7.6 -> 5.9 ms.

Exactness. Ties go to the first column, as in :mod:`hnm.miners` (a later block replaces the
running best only when strictly better, and inside a block the first maximal column wins);
the duplicate threshold, the semi-hard rule and the validity rules are those of the dense
miners. Each tile is computed with the same formula as the dense matrix (``e @ r.T``, the
expanded squared distance), so the choices agree with the dense path on the same values.
When the whole reference set is one tile (a batch without memory, the default up to
2^20 anchor x reference values) every rule reads the positives' similarities from the tile
itself, so every comparison is the dense one. When streaming, those similarities are dot
products of gathered rows, not matrix entries, so a positive and a negative whose
similarities differ only in the last bit of a float32 matmul could be ordered differently
(exactly equal rows still tie).

Speed (XLA:CPU, ``experiments/bench_losses.py``): every reduction over a tile reads a
materialised copy of its masked input, so the cost of a tile is its number of masked
reductions; keeping a block's tile in the 2 MiB L2 (blocks of anchors) is what makes those
passes cheap. Tried and not kept, because they were not faster here in fwd + bwd within
the noise of this shared machine: the tile transposed (reductions over the major axis),
column ids as floats for the first-index reduction (2x faster alone, no gain in context),
float instead of int32 row counts, bf16 mining matmuls (XLA:CPU's bf16 dot is no faster than
float32 on this CPU).

Gradients. ``mine_per_anchor`` returns stopped indices; the objectives differentiate the
gathered rows. ``semihard_sums`` and ``batch_all_sums`` return a *first-order* surrogate
scalar: its value is the hinge sum and its gradient with respect to the anchors and the live
reference rows is exact (accumulated block by block with ``jax.vjp`` of the tile formula), but
it has no meaningful second derivative. Memory rows are candidates only: no gradient, no
backward matmul.

Block size (``block_size`` option of the objectives; 0 there means ``None`` here): ``None``
picks :func:`auto_block`, which keeps the whole reference set in one tile while ``A·M`` is
at most :data:`DENSE_ELEMENTS` values and streams in tiles of about :data:`DENSE_ELEMENTS`
values beyond that. The per-anchor rules and, on a batch, ``semihard`` / ``batch_all`` run
the one-tile case in blocks of anchors (``lax.map``; :data:`ANCHOR_TILE`, :data:`HINGE_TILE`,
:data:`HINGE_MIN_ANCHOR_BLOCK`), each against the whole reference set, so that a block's tile
stays in cache through its masked passes; the per-anchor rules do so while the reference
rows fit in cache (:data:`REF_CACHED`), and otherwise stream all anchors against blocks of
reference rows, so that a large memory is read once. An int forces that many reference rows
per tile.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from hnm import distances
from hnm import memory as memory_lib

# Values in one anchor x reference tile before the reference set is streamed. 2^20 float32
# is 4 MiB: the tile and its masks stay in this machine's L2 + L3 share (2 MiB L2 per core,
# 32 MiB L3), measured fastest at B = 1024..4096 (experiments/bench_losses.py).
DENSE_ELEMENTS = 1 << 20
# Anchor x reference values per tile of the per-anchor miners (lax.map over blocks of
# ANCHOR_TILE // M anchors, at least 64): 2^20 float32 is 4 MiB. With the positives gathered
# (two masked passes per tile, not four) larger tiles won, the matmul being more efficient:
# ephn fwd + bwd on a quiet machine, tiles of 2^18 / 2^19 / 2^20 / 2^21 values: B = 1024,
# D = 64 2.17 / 1.88 / 1.58 / 1.75 ms; B = 4096, D = 64 26.3 / 21.4 / 19.1 / 27.4 ms;
# B = 1024, D = 512 6.7 / 6.0 / 5.9 / 6.0 ms.
ANCHOR_TILE = 1 << 20
MIN_ANCHOR_BLOCK = 64
# ... but only while the reference rows (M x D) stay in the L3 cache (2^21 float32: 8 MiB);
# beyond, all anchors against streamed blocks of reference rows (the memory read once).
REF_CACHED = 1 << 21
# semihard on one tile: from this embedding dimension on, the gradient goes through a dense
# coefficient tile (one matmul) instead of gathered rows (a scatter): measured at B = 1024,
# 1.5x vs 2.0x the limit at D = 512, 1.8x vs 0.8-1.4x at D = 64.
DENSE_GRAD_DIM = 256
# semihard / batch_all on a batch: the single-tile path in blocks of anchors (lax.map, each
# block against the whole batch, so that the slot passes over a block's tile stay in cache),
# of HINGE_TILE // M anchors but at least HINGE_MIN_ANCHOR_BLOCK; the coefficient blocks
# are assembled into one A x M matrix for the gradient (one matmul by w + w.T). Measured
# (x the limit, loaded machine): B = 512 as one block 1.22x / 0.93x (batch_all, D = 64 /
# 512) vs 1.33x / 1.01x in blocks of 256; B = 1024, 2048: blocks of 128 and 256 equal,
# 64 slower (semihard 1.44x vs 1.0x); the whole batch as one tile at B = 2048 3.5x slower.
HINGE_MIN_ANCHOR_BLOCK = 128
# Anchor x reference values per such block: 2^19 was 2-9% faster than 2^18 (quiet machine,
# semihard / batch_all at B = 1024, 2048), 2^20 up to 2x slower.
HINGE_TILE = 1 << 19
SLOTS = 4          # positive slots per sweep without a memory (P x K batches: K - 1 = 3)
SLOTS_MEMORY = 8   # with a memory: batch positives plus a few from past batches
_BIG = int(jnp.iinfo(jnp.int32).max)


class Reference:
    """The reference set as segments: live rows (the batch, or every device's gathered
    batch; differentiable) followed by stopped memory rows, never concatenated in memory.

    Column ``j < live_rows`` is ``live[j]``; column ``live_rows + i`` is memory row ``i``,
    L2-normalised on the fly when ``normalize_memory`` (as the dense path normalises the
    whole memory). ``labels`` are the concatenated labels (small: M integers).
    """

    def __init__(self, live: jax.Array, live_labels: jax.Array, query_offset: jax.Array,
                 memory: Any = None, normalize_memory: bool = False):
        self.live = live
        self.query_offset = jnp.asarray(query_offset, jnp.int32)
        self.live_rows = live.shape[0]
        self.normalize_memory = normalize_memory
        if memory is None:
            self.mem = None
            self.labels = live_labels
        else:
            memory_lib.check_memory(memory, live.shape[1])
            mem = jax.lax.stop_gradient(jnp.asarray(memory.embeddings)).astype(live.dtype)
            self.mem = mem
            dtype = jnp.promote_types(live_labels.dtype, jnp.int32)
            self.labels = jnp.concatenate([live_labels.astype(dtype),
                                           jnp.asarray(memory.labels).astype(dtype)])
        self.size = self.labels.shape[0]

    def with_live(self, live: jax.Array) -> "Reference":
        """The same reference set with other live rows (e.g. stopped ones)."""
        out = Reference.__new__(Reference)
        out.__dict__.update(self.__dict__)
        out.live = live
        return out

    def all_finite(self) -> jax.Array:
        """Whether every live and memory row is finite (a reduction, no copy)."""
        ok = jnp.all(jnp.isfinite(self.live))
        return ok if self.mem is None else ok & jnp.all(jnp.isfinite(self.mem))

    def segments(self):
        """``(rows, start column, size, live)`` of each segment."""
        out = [(self.live, 0, self.live_rows, True)]
        if self.mem is not None:
            out.append((self.mem, self.live_rows, self.mem.shape[0], False))
        return out

    def rows(self, cols: jax.Array) -> jax.Array:
        """Rows ``cols`` (any int shape) of the reference set, ``[..., D]``; live rows stay
        differentiable, memory rows are stopped (and normalised if asked)."""
        live = self.live[jnp.clip(cols, 0, self.live_rows - 1)]
        if self.mem is None:
            return live
        mem = self.mem[jnp.clip(cols - self.live_rows, 0, self.mem.shape[0] - 1)]
        if self.normalize_memory:
            mem = distances.l2_normalize(mem)
        return jnp.where((cols < self.live_rows)[..., None], live, mem)

    def block(self, rows: jax.Array, start, size: int) -> jax.Array:
        blk = jax.lax.dynamic_slice_in_dim(rows, start, size)
        if rows is self.mem and self.normalize_memory:
            blk = distances.l2_normalize(blk)
        return blk


def auto_block(num_anchors: int, num_ref: int, block_size: int | None = None) -> int:
    """Reference rows per tile: ``block_size`` if given, else all of them while
    ``num_anchors * num_ref <= DENSE_ELEMENTS``, else ``DENSE_ELEMENTS // num_anchors``
    (at least 128, rounded down to a multiple of 128)."""
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"`block_size` must be a positive int or None; got "
                             f"{block_size!r}.")
        return min(block_size, num_ref)
    if num_anchors * num_ref <= DENSE_ELEMENTS:
        return num_ref
    return min(num_ref, max(128, (DENSE_ELEMENTS // num_anchors) // 128 * 128))


# ---------------------------------------------------------------------------------------------
# Tiles.


def _sq_norms(x: jax.Array) -> jax.Array:
    return jnp.sum(x * x, axis=-1)


def tile_values(q: jax.Array, r: jax.Array, distance: str, squared_mining: bool = False
                ) -> jax.Array:
    """The [A, n] similarity tile, the dense formula of ``hnm.distances`` entry for entry:
    ``q @ r.T`` (cosine / dot), ``-max(|q|^2 + |r|^2 - 2 q.r, 0)`` (squared Euclidean; also
    the Euclidean *mining* matrix when ``squared_mining``), ``-safe_sqrt`` of it
    (Euclidean)."""
    dot = q @ r.T
    if distance in ("cosine", "dot"):
        return dot
    d2 = jnp.maximum(_sq_norms(q)[:, None] + _sq_norms(r)[None, :] - 2.0 * dot, 0.0)
    if distance == "squared_euclidean" or squared_mining:
        return -d2
    return -distances.safe_sqrt(d2)


def _tile_and_slope(q, r, distance):
    """The tile of :func:`tile_values` (materialised once: XLA:CPU would otherwise recompute
    the square root in every consumer fusion) and, for the Euclidean kinds, ``dv/dx`` with
    ``x = |q|^2 + |r|^2 - 2 q.r`` (None for the dot product): the derivative autodiff takes
    through ``max(x, 0)`` and ``safe_sqrt``, without autodiff's unfused backward graph."""
    dot = q @ r.T
    if distance in ("cosine", "dot"):
        return dot, None
    x = _sq_norms(q)[:, None] + _sq_norms(r)[None, :] - 2.0 * dot
    d2 = jnp.maximum(x, 0.0)
    # d max(x, 0) / dx: 1 above 0, 1/2 at 0 (JAX's rule for max), 0 below.
    clip = jnp.where(x > 0, 1.0, jnp.where(x == 0, 0.5, 0.0)).astype(q.dtype)
    if distance == "squared_euclidean":
        v, slope = -d2, -clip
    else:
        ok = d2 > distances.SQRT_EPS
        root = jnp.sqrt(jnp.where(ok, d2, 1.0))
        v = jnp.where(ok, -root, 0.0)
        slope = jnp.where(ok, -0.5 / root, 0.0) * clip
    v, slope = jax.lax.optimization_barrier((v, slope))
    return v, slope


def _tile_vjp(q, r, coef, slope, live, symmetric=False):
    """``(d/dq, d/dr)`` of ``sum(coef * tile)``: ``coef @ r`` / ``coef.T @ q`` for the dot
    product; through ``x = |q|^2 + |r|^2 - 2 q.r`` for the Euclidean kinds. ``d/dr`` is None
    unless ``live``. ``symmetric``: ``r`` *is* ``q`` (a batch against itself, one tile), so
    both parts go to ``q`` with one matmul by ``w + w.T`` instead of two."""
    w = coef if slope is None else coef * slope
    return _weighted_vjp(q, r, w, slope is not None, live, symmetric)


def _weighted_vjp(q, r, w, euclidean, live, symmetric=False):
    """:func:`_tile_vjp` with the slope already folded in: ``w = coef * slope``."""
    if symmetric:
        both = w + w.T
        if not euclidean:
            return both @ q, None
        return 2.0 * (q * jnp.sum(both, axis=1)[:, None] - both @ q), None
    if not euclidean:
        return w @ r, (w.T @ q if live else None)
    dq = 2.0 * (q * jnp.sum(w, axis=1)[:, None] - w @ r)
    dr = 2.0 * (r * jnp.sum(w, axis=0)[:, None] - w.T @ q) if live else None
    return dq, dr


def _by_anchor_blocks(fn, rows, block):
    """``fn(*row_blocks) -> (per_row, sums)`` over blocks of ``block`` anchors (``lax.map``;
    the last block zero-padded): ``per_row`` (a tuple of arrays with a leading anchor axis)
    reassembled to the A rows, ``sums`` (a tuple of scalars) summed over blocks. One block
    when A <= ``block``. ``fn`` must make a padded row (zeros, row id -1, ``found`` False)
    contribute nothing to ``sums``."""
    num = rows[0].shape[0]
    if num <= block:
        return fn(*rows)
    nblk = -(-num // block)
    pad = nblk * block - num

    def split(x):
        fill = -1 if x.dtype == jnp.int32 and x.ndim == 1 else 0
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
        return x.reshape((nblk, block) + x.shape[1:])

    per_row, sums = jax.lax.map(lambda xs: fn(*xs), tuple(split(x) for x in rows))
    per_row = tuple(x.reshape((nblk * block,) + x.shape[2:])[:num] for x in per_row)
    return per_row, tuple(jnp.sum(x, axis=0) for x in sums)


def pair_values(q: jax.Array, r: jax.Array, distance: str) -> jax.Array:
    """Similarity of ``q[..., :]`` to ``r[..., :]`` row by row (``q`` broadcast against
    ``r``), with the expanded formula of :func:`tile_values`."""
    dot = jnp.sum(q * r, axis=-1)
    if distance in ("cosine", "dot"):
        return dot
    d2 = jnp.maximum(_sq_norms(q) + _sq_norms(r) - 2.0 * dot, 0.0)
    return -d2 if distance == "squared_euclidean" else -distances.safe_sqrt(d2)


def _usable(labels: jax.Array) -> jax.Array | None:
    if distances._can_hold_masked_label(labels.dtype):  # pylint: disable=protected-access
        return labels != distances.MASKED_LABEL
    return None


def _tile_masks(q_labels, r_labels, rows, cols):
    """(pos, neg) of a tile: same label and not the anchor's own row / different label;
    reference rows labelled MASKED_LABEL are neither (``distances.label_masks``)."""
    same = q_labels[:, None] == r_labels[None, :]
    pos, neg = same & (rows[:, None] != cols[None, :]), ~same
    usable = _usable(r_labels)
    if usable is not None:
        pos, neg = pos & usable[None, :], neg & usable[None, :]
    return pos, neg


def _top1(values: jax.Array, cols: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Max over the last axis and its first column. Two fused reductions (max, then the
    smallest column holding it): on XLA:CPU 2x faster than ``lax.top_k(., 1)`` on a
    masked copy and 6x faster than ``argmax`` (a variadic reduction) at 1024 x 1024."""
    best = jnp.max(values, axis=-1)
    idx = jnp.min(jnp.where(values == best[..., None], cols, _BIG), axis=-1)
    return best, idx.astype(jnp.int32)


def _merge_top1(old, new):
    """Running top-1: the later block wins only when strictly better (first index on ties)."""
    if old is None:
        return new
    take = new[0] > old[0]
    return jnp.where(take, new[0], old[0]), jnp.where(take, new[1], old[1])


def _sweep(ref: Reference, block: int, fn: Callable, state: Any, live_only=False) -> Any:
    """Folds ``fn(state, rows [n, D], labels [n], cols [n], live) -> state`` over the
    reference set in blocks of ``block`` rows: full blocks in a ``lax.scan``, the remainder
    as one static smaller block. ``state=None`` means "no block yet": ``fn`` must then
    return a fresh state (so no loop carry starts as a constant, which ``shard_map`` would
    reject as not varying like the body's outputs)."""
    for rows, start, size, live in ref.segments():
        if live_only and not live:
            continue
        num_full, tail = divmod(size, block)

        def one(st, offset, n, rows=rows, start=start, live=live):
            r = ref.block(rows, offset, n)
            y = jax.lax.dynamic_slice_in_dim(ref.labels, start + offset, n)
            cols = start + offset + jnp.arange(n, dtype=jnp.int32)
            return fn(st, r, y, cols, live)

        first = 0
        if num_full and state is None:
            state, first = one(None, 0, block), 1
        if num_full - first > 0:
            def body(st, i, one=one):
                return one(st, i * block, block), None
            state, _ = jax.lax.scan(body, state,
                                    jnp.arange(first, num_full, dtype=jnp.int32))
        if tail:
            state = one(state, num_full * block, tail)
    return state


# ---------------------------------------------------------------------------------------------
# Per-anchor rules: ephn / epshn / sct / batch_hard.

RULES = ("hardest", "easy_hard", "easy_semihard")


class PerAnchor(NamedTuple):
    """One mined triplet per anchor (stopped)."""
    positive: jax.Array   # [A] int32 column of the reference set
    negative: jax.Array   # [A] int32
    sim_ap: jax.Array     # [A] the chosen positive's mining value (garbage if not found)
    sim_an: jax.Array     # [A]
    valid: jax.Array      # [A] bool: a positive and a negative were found


def mine_per_anchor(q: jax.Array, labels: jax.Array, ref: Reference, rule: str, *,
                    distance: str = "cosine", duplicate_threshold: float = 0.9999,
                    block_size: int | None = None,
                    anchor_block: int | None = None) -> PerAnchor:
    r"""One triplet per anchor, by rule, on the mining values (never differentiated).

    * ``"hardest"`` (batch-hard): :math:`\arg\min_p S_{ap}`, :math:`\arg\max_n S_{an}`;
    * ``"easy_hard"`` (EPHN): :math:`\arg\max_{p: S_{ap} \le \tau} S_{ap}`,
      :math:`\arg\max_n S_{an}`;
    * ``"easy_semihard"`` (EPSHN): that positive and
      :math:`\arg\max_{n: S_{an} \le S_{ap}} S_{an}`

    with :math:`\tau` = ``duplicate_threshold``, exactly as
    :func:`hnm.miners.mine_hardest` / ``mine_easy_positive_hard_negative`` /
    ``mine_easy_positive_semihard_negative`` on the dense matrix (first index on ties).
    The mining values are cosines (``distance="cosine"``) or ``-d^2`` for the Euclidean
    distances (monotone in the distance, as the dense objectives mine).

    Cost: one A x M x D matmul in tiles plus two masked passes over them (the negative's
    max and first column); the positive comes from the label index (gathered from the tile
    with one tile, the default for a batch, whose anchor blocks are reduced while in cache;
    from gathered rows when streaming, with a running top-1 for the negative).
    """
    if rule not in RULES:
        raise ValueError(f"unknown mining `rule`={rule!r}; expected one of {RULES}.")
    q = jax.lax.stop_gradient(q)
    num = q.shape[0]
    if anchor_block is None:
        anchor_block = max(MIN_ANCHOR_BLOCK, ANCHOR_TILE // ref.size)
    ab = min(num, anchor_block)
    block = auto_block(ab, ref.size, block_size)
    one_tile = block >= ref.size
    if block_size is None and ref.size * q.shape[1] > REF_CACHED:
        one_tile = False  # every block of anchors would read it from memory again
    if not one_tile:
        # Streaming: all anchors against each block of reference rows, so that the reference
        # set (a memory of M x D, 128 MiB at M = 65,536, D = 512) is read once, not once per
        # block of anchors (measured 1.07x vs 1.23x one B x M x D matmul there).
        ab = num
        block = auto_block(num, ref.size, block_size)
    stopped = ref.with_live(jax.lax.stop_gradient(ref.live))
    if one_tile and ref.mem is not None:  # small enough for one tile: one segment
        stopped = Reference(jax.lax.stop_gradient(ref.rows(jnp.arange(ref.size))),
                            ref.labels, ref.query_offset)
    thr = duplicate_threshold

    def negatives(qb, ql, rid, r, y, cols, sim_ap):
        """A tile's running-top-1 candidate negative per anchor (semi-hard: not more similar
        than ``sim_ap``, the final positive's value)."""
        m = tile_values(qb, r, distance, squared_mining=True)
        _, neg = _tile_masks(ql, y, rid, cols)
        if sim_ap is not None:
            neg = neg & (m <= sim_ap[:, None])
        return _top1(jnp.where(neg, m, -jnp.inf), cols)

    def block_of_anchors(qb, ql, rid, lo, count, self_rank):
        if one_tile:
            return _one_tile_block(qb, ql, rid, (order, lo, count, self_rank))

        # The positive from the label index (gathered rows: no masked pass over the tiles),
        # then one sweep for the negatives (EPSHN's semi-hard one needs the final positive).
        pv, pi = _gathered_positives(qb, ql, stopped, distance, rule, thr)
        sim_ap = pv if rule == "easy_semihard" else None

        def fn(state, r, y, cols, _live):
            new = negatives(qb, ql, rid, r, y, cols, sim_ap)
            return new if state is None else _merge_top1(state, new)
        nv, ni = _sweep(stopped, block, fn, None)
        found = (pv > -jnp.inf) & (nv > -jnp.inf)
        pv = -pv if rule == "hardest" else pv
        return pi, ni, pv, nv, found

    def _one_tile_block(qb, ql, rid, index):
        """A block of anchors against the whole (single-segment) reference set in one tile:
        the positives' values are *gathered from the tile* at the label index's columns
        (O(A P), no masked pass), so only the negatives take masked reductions over the
        tile (two: the max, then its first column). Every value is a tile entry, so every
        comparison is the dense path's."""
        r = stopped.live
        cols = jnp.arange(ref.size, dtype=jnp.int32)
        m = tile_values(qb, r, distance, squared_mining=True)

        def chunk(carry, pcols, pfound, _c):
            pv = jnp.take_along_axis(m, pcols, axis=1)
            if rule == "hardest":
                key = jnp.where(pfound, -pv, -jnp.inf)
            else:  # near-duplicates (S > tau) are skipped
                key = jnp.where(pfound & (pv <= thr), pv, -jnp.inf)
            # Chunks come in column order (the label index is a stable sort), so the
            # strictly-better running top-1 keeps the first column on ties.
            return _merge_top1(carry, _top1(key, pcols))

        init = (jnp.full(qb.shape[:1], -jnp.inf, qb.dtype),
                jnp.zeros(qb.shape[:1], jnp.int32))
        pv, pi = _index_chunks(index, SLOTS, chunk, init, qb)
        _, neg = _tile_masks(ql, stopped.labels, rid, cols)
        if rule == "easy_semihard":
            neg = neg & (m <= pv[:, None])
        nv, ni = _top1(jnp.where(neg, m, -jnp.inf), cols)
        found = (pv > -jnp.inf) & (nv > -jnp.inf)
        pv = -pv if rule == "hardest" else pv
        return pi, ni, pv, nv, found

    rid = jnp.arange(num, dtype=jnp.int32) + ref.query_offset
    if one_tile:
        order, lo, count, self_rank = _positive_index(labels, stopped)
    else:  # unused placeholders of the same shapes
        order = None
        lo = count = self_rank = jnp.zeros((num,), jnp.int32)
    if ab >= num:
        out = block_of_anchors(q, labels, rid, lo, count, self_rank)
    else:
        nblk = -(-num // ab)
        pad = nblk * ab - num

        def split(x, fill=0):
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
            return x.reshape((nblk, ab) + x.shape[1:])
        # Padded anchors: row id -1 and no positives (count 0); their outputs are dropped.
        out = jax.lax.map(
            lambda x: block_of_anchors(*x),
            (split(q), split(labels), split(rid, -1), split(lo), split(count),
             split(self_rank, _BIG)))
        out = tuple(o.reshape(-1)[:num] for o in out)
    pi, ni, pv, nv, found = out
    return PerAnchor(pi, ni, pv, nv, found)


# ---------------------------------------------------------------------------------------------
# Positive slots from sorted labels.


def _positive_index(labels: jax.Array, ref: Reference):
    """``(order, lo, count, self_rank)``: the stable order of the reference labels, where
    each anchor's class run starts, how many positives it has (its own row excluded) and the
    rank of its own row in ``order``."""
    ref_labels = ref.labels
    labels = labels.astype(ref_labels.dtype) if ref.mem is not None else labels
    order = jnp.argsort(ref_labels, stable=True).astype(jnp.int32)
    sorted_labels = ref_labels[order]
    lo = jnp.searchsorted(sorted_labels, labels, side="left").astype(jnp.int32)
    hi = jnp.searchsorted(sorted_labels, labels, side="right").astype(jnp.int32)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
    own = jnp.arange(labels.shape[0], dtype=jnp.int32) + ref.query_offset
    self_rank = rank[jnp.clip(own, 0, ref.size - 1)]
    self_in = (self_rank >= lo) & (self_rank < hi) & (own < ref.live_rows)
    count = hi - lo - self_in.astype(jnp.int32)
    usable = _usable(ref_labels)
    if usable is not None:  # an anchor labelled MASKED_LABEL has no positive
        count = jnp.where(labels.astype(ref_labels.dtype) == distances.MASKED_LABEL, 0, count)
    self_rank = jnp.where(self_in, self_rank, _BIG)
    return order, lo, count, self_rank


def _slots(index, first: jax.Array, num_slots: int):
    """Columns [A, S] of positives ``first .. first + S - 1`` (column order) and ``found``."""
    order, lo, count, self_rank = index
    k = first + jnp.arange(num_slots, dtype=jnp.int32)[None, :]
    r = lo[:, None] + k
    r = r + (r >= self_rank[:, None]).astype(jnp.int32)  # skip the anchor's own row
    cols = order[jnp.clip(r, 0, order.shape[0] - 1)]
    return cols, k < count[:, None]


def _index_chunks(index, slots, body, init, like):
    """``body(carry, cols, found, chunk) -> carry`` over the positives of ``index`` in chunks
    of ``slots``: chunk 0 straight-line (a P x K batch needs no loop), the rest in a
    ``lax.while_loop`` whose trip count is ceil(max positives / slots)."""
    num_chunks = (jnp.max(index[2], initial=0) + slots - 1) // slots

    def step(state):
        c, carry = state
        cols, found = _slots(index, c * slots, slots)
        return c + 1, body(carry, cols, found, c)

    cols, found = _slots(index, jnp.zeros((), jnp.int32), slots)
    state = _vary((jnp.ones((), jnp.int32), init), like)
    state = (state[0], body(state[1], cols, found, jnp.zeros((), jnp.int32)))
    return jax.lax.while_loop(lambda s: s[0] < num_chunks, step, state)[1]


def _gathered_positives(q, labels, ref, distance, rule, thr, slots=SLOTS_MEMORY):
    """Each anchor's positive by ``rule`` from the positives of the label index in chunks of
    ``slots`` (:func:`_chunks`), as ``(key, column)``: the key is the mining value (``-`` it
    for ``"hardest"``, whose positive is the least similar), the column the first on ties;
    near-duplicates (value > ``thr``) are skipped except by ``"hardest"``. O(A P D) for P
    positives per anchor instead of masked passes over every tile of the reference set.
    The values are dot products of gathered rows (see "Exactness")."""
    kind = "dot" if distance in ("cosine", "dot") else "squared_euclidean"

    def body(carry, cols, found, _chunk):
        m = pair_values(q[:, None, :], ref.rows(cols), kind)
        key = (jnp.where(found, -m, -jnp.inf) if rule == "hardest"
               else jnp.where(found & (m <= thr), m, -jnp.inf))
        return _merge_top1(carry, _top1(key, cols))

    init = (jnp.full(q.shape[:1], -jnp.inf, q.dtype), jnp.zeros(q.shape[:1], jnp.int32))
    return _chunks(q, labels, ref, slots, body, init)


def _count(mask: jax.Array) -> jax.Array:
    return jnp.sum(mask, dtype=jnp.int32)


def _vary(tree, like):
    return distances.vary_like(tree, like)


def _chunks(q, labels, ref, slots, body, init):
    """:func:`_index_chunks` over the positives of ``labels`` in ``ref``."""
    return _index_chunks(_positive_index(labels, ref), slots, body, init, q)


def _grad_pairs(q, ref, cols, weight, distance):
    """Exact gradient of ``sum(weight * pair_values(q, ref.rows(cols)))`` with respect to
    ``q`` and the live rows (memory rows are stopped), evaluated now (inside a loop)."""
    def f(q_, live_):
        return pair_values(q_[:, None, :], ref.with_live(live_).rows(cols), distance)
    _, vjp = jax.vjp(f, q, ref.live)
    return vjp(weight.astype(q.dtype))


def _surrogate(value, q, dq, live, dlive):
    """A scalar equal to ``value`` whose gradient is ``dq`` (wrt q) and ``dlive``."""
    dq, dlive = jax.lax.stop_gradient(dq), jax.lax.stop_gradient(dlive)
    lin = jnp.sum(q * dq) + jnp.sum(live * dlive)
    return jax.lax.stop_gradient(value) + lin - jax.lax.stop_gradient(lin)


class HingeSums(NamedTuple):
    """Global sums of an all-pairs hinge objective (scalars)."""
    loss_sum: jax.Array    # differentiable (first order): sum of the hinge over its set
    num: jax.Array         # triplets (batch_all) or anchor-positive pairs (semihard)
    num_active: jax.Array  # with a non-zero hinge
    num_hard: jax.Array    # with s_an > s_ap
    sum_ap: jax.Array      # sum of s_ap over the set (stopped)
    sum_an: jax.Array      # sum of s_an over the set (stopped)


def _setup(q, ref, block_size, slots, anchor_block):
    slots = slots or (SLOTS if ref.mem is None else SLOTS_MEMORY)
    if anchor_block is None:
        anchor_block = max(HINGE_MIN_ANCHOR_BLOCK, HINGE_TILE // ref.size)
    # Automatic: one tile per block of anchors up to 2^20 values. A whole B = 2048 batch as
    # one 16 MiB tile was measured slower (semihard 4.9x, batch_all 13.7x the limit) than
    # tiles of 512 rows (3.0x, 9.2x): its many passes fall out of cache.
    ab = min(q.shape[0], anchor_block)
    block = auto_block(ab, ref.size, block_size)
    qs = jax.lax.stop_gradient(q)
    # Everything inside the loops is stopped: the gradient is assembled by hand (the tile's
    # vector-Jacobian product), and a live input would make JAX carry a tangent through them.
    sref = ref.with_live(jax.lax.stop_gradient(ref.live))
    rid = jnp.arange(q.shape[0], dtype=jnp.int32) + ref.query_offset
    # One tile holds the whole reference set (a batch, no memory): the tile stays in hand, so
    # the positives' similarities are read from it and every gradient goes through one
    # dense coefficient matrix (no gather / scatter of rows, slow on XLA:CPU at large D).
    # Done in blocks of ``ab`` anchors (each against the whole batch).
    single = ref.mem is None and block >= ref.size
    if not single:  # streaming: all anchors against blocks of reference rows
        block = auto_block(q.shape[0], ref.size, block_size)
    # ... and the batch against itself (no device axis): one matmul by w + w.T.
    symmetric = single and ref.live is q
    return slots, block, ab, qs, sref, rid, single, symmetric


def _semihard_tile(v, neg, sap, cols):
    """Per slot k: the most similar negative with ``v < sap[:, k]`` (unrolled 2-D passes);
    and the least similar negative (as a max of ``-v``)."""
    sh = [_top1(jnp.where(neg & (v < sap[:, k:k + 1]), v, -jnp.inf), cols)
          for k in range(sap.shape[1])]
    shv, shi = jnp.stack([x[0] for x in sh], 1), jnp.stack([x[1] for x in sh], 1)
    return (shv, shi), _top1(jnp.where(neg, -v, -jnp.inf), cols)


def _one_hot_weights(cols, idx, weight):
    """``sum_k weight[:, k] * (cols == idx[:, k])``: an [A, n] coefficient tile."""
    out = jnp.zeros((idx.shape[0], cols.shape[0]), weight.dtype)
    for k in range(idx.shape[1]):
        out = out + jnp.where(cols[None, :] == idx[:, k:k + 1], weight[:, k:k + 1], 0)
    return out


def semihard_sums(q: jax.Array, labels: jax.Array, ref: Reference, *, margin,
                  distance: str, block_size: int | None = None,
                  slots: int | None = None,
                  anchor_block: int | None = None) -> HingeSums:
    r"""TFA semi-hard hinge over every anchor-positive pair, streamed.

    For each pair (a, p): the most similar negative strictly less similar than p, else the
    least similar negative; :math:`\sum \max(0, s_{an} - s_{ap} + m)` over pairs of anchors
    that have a negative (as :func:`hnm.losses.semihard_margin_sums`). A sweep keeps, per
    positive slot, a running semi-hard top-1 and, per anchor, the running farthest negative;
    the gradient goes through the chosen pairs only.
    """
    slots, block, ab, qs, sref, rid, single, symmetric = _setup(q, ref, block_size, slots,
                                                               anchor_block)
    margin = jnp.asarray(margin, q.dtype)
    zero = jnp.zeros((), q.dtype)
    dense_grad = single and qs.shape[1] >= DENSE_GRAD_DIM
    euclidean = distance not in ("cosine", "dot")

    def choose(sap, shv, shi, farv, fari, found):
        """Per pair: the negative and the hinge's weight; the block's sums."""
        has_neg = farv > -jnp.inf
        found_sh = shv > -jnp.inf
        nidx = jnp.where(found_sh, shi, fari[:, None])
        san = jnp.where(found_sh, shv, -farv[:, None])
        pair = found & has_neg[:, None]
        act = pair & (san - sap + margin > 0)
        sums = (jnp.sum(jnp.where(act, san - sap + margin, zero)), _count(pair),
                _count(act), _count(pair & (san > sap)), jnp.sum(jnp.where(pair, sap, zero)),
                jnp.sum(jnp.where(pair, san, zero)))
        return nidx, act.astype(q.dtype), sums

    def one_tile(qb, lb, rb, pb, fb):
        """A block of anchors against the whole batch (the tile stays in hand)."""
        cols = jnp.arange(ref.size, dtype=jnp.int32)
        v, slope = _tile_and_slope(qb, sref.live, distance)
        _, neg = _tile_masks(lb, sref.labels, rb, cols)
        sap = jnp.take_along_axis(v, pb, axis=1)
        (shv, shi), (farv, fari) = _semihard_tile(v, neg, sap, cols)
        nidx, w, sums = choose(sap, shv, shi, farv, fari, fb)
        if not dense_grad:
            return (nidx, w), sums
        # d/ds_an = +1, d/ds_ap = -1 per active pair, as one coefficient tile: one more
        # matmul, but no row scatter (which costs more than the matmul at large D).
        coef = _one_hot_weights(cols, nidx, w) - _one_hot_weights(cols, pb, w)
        return (nidx, w, coef if slope is None else coef * slope), sums

    def body(carry, pcols, found, _chunk):
        if single:
            per_row, sums = _by_anchor_blocks(one_tile, (qs, labels, rid, pcols, found), ab)
            nidx, w = per_row[:2]
        else:
            sap = pair_values(qs[:, None, :], sref.rows(pcols), distance)

            def fn(state, r, y, cols, _live):
                v = tile_values(qs, r, distance)
                _, neg = _tile_masks(labels, y, rid, cols)
                new_sh, new_far = _semihard_tile(v, neg, sap, cols)
                if state is None:
                    return new_sh, new_far
                return _merge_top1(state[0], new_sh), _merge_top1(state[1], new_far)

            (shv, shi), (farv, fari) = _sweep(sref, block, fn, None)
            nidx, w, sums = choose(sap, shv, shi, farv, fari, found)
        if dense_grad:
            dq, dl = _weighted_vjp(qs, sref.live, per_row[2], euclidean, True, symmetric)
            dl = jnp.zeros_like(qs) if dl is None else dl
        else:
            dq_n, dl_n = _grad_pairs(qs, sref, nidx, w, distance)
            dq_p, dl_p = _grad_pairs(qs, sref, pcols, -w, distance)
            dq, dl = dq_n + dq_p, dl_n + dl_p
        *totals, c_dq, c_dl = carry
        return (*(a + b for a, b in zip(totals, sums)), c_dq + dq, c_dl + dl)

    izero = jnp.zeros((), jnp.int32)
    init = (zero, izero, izero, izero, zero, zero, jnp.zeros_like(qs),
            jnp.zeros_like(sref.live))
    value, n, n_act, n_hard, s_ap, s_an, dq, dl = _chunks(qs, labels, sref, slots, body, init)
    return HingeSums(_surrogate(value, q, dq, ref.live, dl), n, n_act, n_hard, s_ap, s_an)


def _batch_all_tile(v, neg, found, sap, margin):
    """Per tile: ``coef[a, n]`` = active triplets using negative n, ``n_act[a, k]`` = active
    triplets of positive slot k, ``n_hard`` = triplets with ``s_an > s_ap``. One 2-D pass
    per slot (unrolled): XLA:CPU fuses these far better than one [A, S, n] broadcast
    reduced over its middle axis."""
    coef, n_act, n_hard = jnp.zeros_like(v), [], jnp.zeros((), jnp.int32)
    for k in range(sap.shape[1]):
        ok = neg & found[:, k:k + 1]
        act = ok & (v - sap[:, k:k + 1] + margin > 0)
        coef = coef + act.astype(v.dtype)
        n_act.append(jnp.sum(act, axis=1, dtype=jnp.int32))
        n_hard = n_hard + _count(ok & (v > sap[:, k:k + 1]))
    return coef, jnp.stack(n_act, axis=1), n_hard


def batch_all_sums(q: jax.Array, labels: jax.Array, ref: Reference, *, margin,
                   distance: str, block_size: int | None = None,
                   slots: int | None = None,
                   anchor_block: int | None = None) -> HingeSums:
    r"""Hinge over *every* triplet, streamed: :math:`\sum_{a,p,n} \max(0, s_{an} - s_{ap}
    + m)` (as :func:`hnm.losses.all_triplets_margin_sums`).

    Per tile, the active-triplet count of each negative
    :math:`c_{an} = \#\{p : s_{an} - s_{ap} + m > 0\}` weights the tile's vector-Jacobian
    product (``c @ r`` for the anchors, ``c.T @ q`` for live reference rows), so the
    backward work is that of the dense matrix, in tiles; the positives get
    :math:`-\#\text{active}(a, p)`.
    """
    slots, block, ab, qs, sref, rid, single, symmetric = _setup(q, ref, block_size, slots,
                                                               anchor_block)
    margin = jnp.asarray(margin, q.dtype)
    zero = jnp.zeros((), q.dtype)
    live_rows = ref.live_rows
    euclidean = distance not in ("cosine", "dot")

    def body(carry, pcols, found, chunk):
        first = chunk == 0  # per-anchor statistics over negatives: counted once

        def fn(state, r, y, cols, live, sap):
            v, slope = _tile_and_slope(qs, r, distance)
            _, neg = _tile_masks(labels, y, rid, cols)
            coef, n_act, n_hard = _batch_all_tile(v, neg, found, sap, margin)
            value = jnp.sum(coef * v)
            s_neg = jnp.where(first, jnp.sum(jnp.where(neg, v, zero), axis=1), zero)
            n_neg = jnp.where(first, jnp.sum(neg, axis=1, dtype=jnp.int32), 0)
            dq, dr = _tile_vjp(qs, r, coef, slope, live)
            new = [value, n_act, n_hard, s_neg, n_neg, dq]
            if state is None:
                state = _vary([zero, jnp.zeros_like(n_act), jnp.zeros((), jnp.int32),
                               jnp.zeros_like(s_neg), jnp.zeros_like(n_neg),
                               jnp.zeros_like(dq), jnp.zeros((live_rows, q.shape[1]),
                                                             q.dtype)], qs)
            out = [a + b for a, b in zip(state[:6], new)]
            dl = state[6]
            if dr is not None:
                start = cols[0]
                dl = jax.lax.dynamic_update_slice_in_dim(
                    dl, jax.lax.dynamic_slice_in_dim(dl, start, r.shape[0]) + dr, start, 0)
            return out + [dl, sap]

        def one_tile(qb, lb, rb, pb, fb):
            """A block of anchors against the whole batch: the positives' values are the
            tile's entries and their coefficients are folded into the tile's."""
            cols = jnp.arange(ref.size, dtype=jnp.int32)
            v, slope = _tile_and_slope(qb, sref.live, distance)
            _, neg = _tile_masks(lb, sref.labels, rb, cols)
            sap = jnp.take_along_axis(v, pb, axis=1)
            coef, n_act, n_hard = _batch_all_tile(v, neg, fb, sap, margin)
            value = jnp.sum(coef * v)
            s_neg = jnp.where(first, jnp.sum(jnp.where(neg, v, zero), axis=1), zero)
            n_neg = jnp.where(first, jnp.sum(neg, axis=1, dtype=jnp.int32), 0)
            coef = coef - _one_hot_weights(cols, pb, jnp.where(fb, n_act, 0).astype(v.dtype))
            w = coef if slope is None else coef * slope
            return (n_act, s_neg, n_neg, sap, w), (value, n_hard)

        if single:
            (n_act, s_neg, n_neg, sap, w), (value, n_hard) = _by_anchor_blocks(
                one_tile, (qs, labels, rid, pcols, found), ab)
            # One coefficient matrix for every block: one matmul (two across devices).
            dq, dl = _weighted_vjp(qs, sref.live, w, euclidean, True, symmetric)
            dl = jnp.zeros((live_rows, q.shape[1]), q.dtype) if dl is None else dl
        else:
            sap = pair_values(qs[:, None, :], sref.rows(pcols), distance)
            value, n_act, n_hard, s_neg, n_neg, dq, dl, _ = _sweep(
                sref, block, lambda st, r, y, c, lv: fn(None if st is None else st[:7],
                                                        r, y, c, lv, sap), None)
            # The positive side: d/ds_ap = -(active triplets of the pair).
            w = jnp.where(found, -n_act, 0).astype(q.dtype)
            dq_p, dl_p = _grad_pairs(qs, sref, pcols, w, distance)
            dq, dl = dq + dq_p, dl + dl_p
        npos = jnp.sum(found, axis=1, dtype=jnp.int32)
        c_value, c_act, c_hard, c_ap, c_dq, c_dl, c_npos, c_nneg, c_sneg = carry
        return (c_value + value - jnp.sum(jnp.where(found, n_act * sap, zero))
                + margin * jnp.sum(n_act, dtype=jnp.int32).astype(q.dtype),
                c_act + jnp.sum(n_act, dtype=jnp.int32), c_hard + n_hard,
                # sum over triplets of s_ap: each positive repeats once per negative.
                c_ap + jnp.sum(jnp.where(found, sap, zero), axis=1),
                c_dq + dq, c_dl + dl, c_npos + npos, c_nneg + n_neg, c_sneg + s_neg)

    num = q.shape[0]
    izero = jnp.zeros((), jnp.int32)
    fzero_a, izero_a = jnp.zeros((num,), q.dtype), jnp.zeros((num,), jnp.int32)
    init = (zero, izero, izero, fzero_a, jnp.zeros_like(qs), jnp.zeros_like(sref.live),
            izero_a, izero_a, fzero_a)
    value, n_act, n_hard, sum_ap_a, dq, dl, npos, nneg, sneg = _chunks(
        qs, labels, sref, slots, body, init)
    num_triplets = jnp.sum(npos * nneg, dtype=jnp.int32)
    sum_ap = jnp.sum(nneg.astype(q.dtype) * sum_ap_a)
    sum_an = jnp.sum(npos.astype(q.dtype) * sneg)
    return HingeSums(_surrogate(value, q, dq, ref.live, dl), num_triplets, n_act, n_hard,
                     sum_ap, sum_an)
