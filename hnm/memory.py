r"""Cross-batch memory (XBM): a ring buffer of past embeddings that every objective mines.

A :class:`Memory` holds the (stopped) embeddings and labels of the last ``M`` rows seen in
training. Passed to an objective (``objective(emb, labels, key, memory=mem)``), its rows are
appended to the reference set after the (possibly gathered) batch, so the anchors of the
current batch mine positives and negatives among ``B + M`` candidates while the backward
pass still costs one batch: no gradient flows into memory rows (they were embedded by older
parameters, the "slow drift" that makes them usable, Wang et al. §3).

Empty slots carry the label :data:`hnm.distances.MASKED_LABEL`, which
:func:`hnm.distances.label_masks` treats as neither a positive nor a negative, so an empty
(or warm-up-masked, :func:`masked`) memory gives exactly the plain-batch objective.

Everything here is pure and has static shapes: :func:`enqueue` writes with modular scatter
indices, so it jits once and runs inside ``pmap``/``shard_map`` (with ``axis_name`` it
enqueues the ``all_gather`` of every device's rows, keeping the memory identical on all
devices).

Examples:
  >>> mem = init(4, 2)
  >>> mem = enqueue(mem, jnp.ones((3, 2)), jnp.array([7, 8, 9]))
  >>> mem = enqueue(mem, 2 * jnp.ones((2, 2)), jnp.array([5, 6]))
  >>> mem.labels.tolist(), int(mem.ptr)    # slot 0 was overwritten: the ring wrapped
  ([6, 8, 9, 5], 1)
  >>> float(fill_fraction(mem)), float(fill_fraction(masked(mem, jnp.array(False))))
  (1.0, 0.0)

References:
  Wang, Zhang, Huang, Scott. Cross-Batch Memory for Embedding Learning. CVPR 2020.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from hnm import _checks
from hnm.distances import MASKED_LABEL


class Memory(NamedTuple):
    """A ring buffer of ``M`` embeddings; a pytree, so it lives in the train state."""
    embeddings: jax.Array  # [M, D] float32; zeros in empty slots
    labels: jax.Array      # [M] int32; MASKED_LABEL in empty slots
    ptr: jax.Array         # int32 scalar: the slot the next row is written to


def init(size: int, dim: int) -> Memory:
    """An empty memory of ``size`` slots for ``dim``-dimensional embeddings.

    Args:
      size: M >= 1, the number of slots.
      dim: D >= 1, the embedding dimension.

    Returns:
      :class:`Memory` with zero embeddings, every label ``MASKED_LABEL`` and ``ptr = 0``.

    Raises:
      TypeError: ``size`` or ``dim`` is not an integer (a bool, a float, a string).
      ValueError: ``size`` or ``dim`` is < 1.
    """
    for value, name in ((size, "size"), (dim, "dim")):
        _checks.check_option(value, name, _checks.integer(ge=1))
        if isinstance(value, (jax.Array, np.ndarray)):
            raise TypeError(f"`{name}` must be a Python int (it fixes a shape); got an array.")
    size, dim = int(size), int(dim)
    return Memory(jnp.zeros((size, dim), jnp.float32),
                  jnp.full((size,), MASKED_LABEL, jnp.int32), jnp.zeros((), jnp.int32))


def check_memory(memory: Memory, dim: int | None = None, name: str = "memory") -> None:
    """Raises unless ``memory`` is a :class:`Memory`-like ``(embeddings [M, D], labels [M])``
    with ``D == dim`` when given (trace-time check)."""
    if not (hasattr(memory, "embeddings") and hasattr(memory, "labels")):
        raise TypeError(f"`{name}` must be a hnm.memory.Memory; got {type(memory).__name__}.")
    _checks.check_floating_matrix(memory.embeddings, f"{name}.embeddings")
    _checks.check_nonempty(memory.embeddings, f"{name}.embeddings", ("M (slots)", "D (columns)"))
    _checks.check_labels(memory.labels, f"{name}.labels", memory.embeddings.shape[0],
                         f"{name}.embeddings")
    ptr = getattr(memory, "ptr", None)
    if ptr is not None and (jnp.ndim(ptr) != 0
                            or not jnp.issubdtype(jnp.result_type(ptr), jnp.integer)):
        raise TypeError(f"`{name}.ptr` must be an integer scalar; got shape {jnp.shape(ptr)} "
                        f"and dtype {jnp.result_type(ptr)}.")
    if dim is not None and memory.embeddings.shape[1] != dim:
        raise ValueError(f"`{name}.embeddings` has dimension {memory.embeddings.shape[1]} but "
                         f"the embeddings have {dim}; they must match.")


def enqueue(memory: Memory, embeddings: ArrayLike, labels: ArrayLike, *,
            axis_name: str | None = None) -> Memory:
    r"""Writes ``B`` new rows into the ring buffer at ``ptr`` (wrapping modulo ``M``).

    Row :math:`i` goes to slot :math:`(\mathrm{ptr} + i) \bmod M` and the pointer advances to
    :math:`(\mathrm{ptr} + B) \bmod M`; when :math:`B > M` only the last ``M`` rows are kept
    (each slot holds the newest row written to it). The rows are stopped (no gradient) and
    cast to float32 / int32.

    Args:
      memory: the current :class:`Memory`.
      embeddings: [B, D] floating, this device's rows.
      labels: [B] integer.
      axis_name: inside ``pmap``/``shard_map``, enqueue the ``all_gather`` (tiled, device
        order) of every device's rows, so the memory stays identical on every device and
        equals one device's enqueue of the concatenated batch.

    Returns:
      The new :class:`Memory`.

    Raises:
      ValueError, TypeError: badly shaped or typed arguments, a dimension mismatch, or
        concrete labels outside int32 or equal to ``MASKED_LABEL`` (such a row would be
        stored as an empty slot, or as another class).
    """
    # Values before jnp.asarray: an int64 label >= 2**31 would wrap into another class.
    _checks.check_label_values(labels, "labels", reserved=MASKED_LABEL)
    embeddings, labels = jnp.asarray(embeddings), jnp.asarray(labels)
    _checks.check_embeddings_and_labels(embeddings, labels)
    check_memory(memory, embeddings.shape[1])
    embeddings = jax.lax.stop_gradient(embeddings).astype(memory.embeddings.dtype)
    labels = labels.astype(memory.labels.dtype)
    if axis_name is not None:
        embeddings = jax.lax.all_gather(embeddings, axis_name, tiled=True)
        labels = jax.lax.all_gather(labels, axis_name, tiled=True)
    size, num_new = memory.labels.shape[0], labels.shape[0]
    ptr = jnp.asarray(memory.ptr, jnp.int32)
    skip = max(num_new - size, 0)  # static: rows that a later row of this batch overwrites
    # Distinct slots (at most M rows remain), so the scatter has no write-order ambiguity.
    slots = (ptr + skip + jnp.arange(num_new - skip, dtype=jnp.int32)) % size
    return Memory(memory.embeddings.at[slots].set(embeddings[skip:]),
                  memory.labels.at[slots].set(labels[skip:]),
                  (ptr + num_new) % size)


def masked(memory: Memory, active: ArrayLike) -> Memory:
    """The memory itself when ``active``, else the memory with every slot marked empty.

    For the warm-up (XBM starts using the memory only after the embedding has stopped
    drifting fast): ``masked(mem, step >= start)`` works with a traced ``active``, so one
    compiled step serves both phases.

    Args:
      memory: a :class:`Memory`.
      active: bool scalar (may be traced).

    Returns:
      :class:`Memory` with the same embeddings and pointer; labels ``MASKED_LABEL`` where
      ``active`` is false.
    """
    labels = jnp.where(jnp.asarray(active), memory.labels, MASKED_LABEL).astype(
        memory.labels.dtype)
    return Memory(memory.embeddings, labels, memory.ptr)


def fill_fraction(memory: Memory) -> jax.Array:
    """Fraction of slots holding a row (label not ``MASKED_LABEL``), float32 scalar."""
    return jnp.mean((memory.labels != MASKED_LABEL).astype(jnp.float32))
