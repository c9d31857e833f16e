"""Trace-time argument checks (plain Python on static shapes; free under ``jit``).

Every public function of the core validates its inputs here so that a wrong shape or dtype
raises a message naming the argument and showing what it got, instead of a NaN or an XLA
broadcasting error three calls deeper (optax's ``check_rank`` idea).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def _describe(x: Any) -> str:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", type(x).__name__)
    return f"shape {tuple(shape) if shape is not None else '()'} and dtype {dtype}"


def check_floating_matrix(x: Any, name: str) -> None:
    """Raises unless ``x`` is a 2-D floating array (e.g. embeddings [N, D])."""
    if not hasattr(x, "ndim") or x.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array [N, D]; got {_describe(x)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`{name}` must have a floating dtype; got {_describe(x)}.")


def check_labels(labels: Any, name: str = "labels", length: int | None = None,
                                  length_of: str = "embeddings") -> None:
    """Raises unless ``labels`` is a 1-D integer array, of ``length`` rows if given."""
    if not hasattr(labels, "ndim") or labels.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D integer array [N]; got {_describe(labels)}.")
    if not (jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_):
        raise TypeError(f"`{name}` must have an integer dtype; got {_describe(labels)}.")
    if length is not None and labels.shape[0] != length:
        raise ValueError(
                f"`{name}` has {labels.shape[0]} rows but `{length_of}` has {length}; "
                "they must match.")


def check_embeddings_and_labels(embeddings: Any, labels: Any) -> None:
    """The common check of every objective: emb [N, D] floating, labels [N] integer."""
    check_floating_matrix(embeddings, "embeddings")
    check_labels(labels, "labels", embeddings.shape[0], "embeddings")


def check_sim(sim: Any, labels: Any, ref_labels: Any) -> None:
    """Checks a similarity matrix [A, M] against query labels [A] and reference labels [M]."""
    check_floating_matrix(sim, "sim")
    check_labels(labels, "labels", sim.shape[0], "sim (rows)")
    check_labels(ref_labels, "ref_labels", sim.shape[1], "sim (columns)")


def check_same_shape(a: Any, b: Any, name_a: str, name_b: str) -> None:
    """Raises unless two arrays share one shape (elementwise losses)."""
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(f"`{name_a}` and `{name_b}` must have the same shape; got "
                                          f"{jnp.shape(a)} and {jnp.shape(b)}.")
    for x, n in ((a, name_a), (b, name_b)):
        dtype = getattr(x, "dtype", None)
        if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"`{n}` must have a floating dtype; got {_describe(x)}.")


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown `{name}`={value!r}; expected one of {tuple(choices)}.")
