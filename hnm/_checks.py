"""Trace-time argument checks (plain Python on static shapes; free under ``jit``).

Every public function of the core validates its inputs here so that a wrong shape or dtype
raises a message naming the argument and showing what it got, instead of a NaN or an XLA
broadcasting error three calls deeper (optax's ``check_rank`` idea).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


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
    """The common check of every objective: emb [B, D] floating with B, D >= 1, labels [B]
    integer."""
    check_floating_matrix(embeddings, "embeddings")
    check_nonempty(embeddings, "embeddings", ("B (rows)", "D (columns)"))
    check_labels(labels, "labels", embeddings.shape[0], "embeddings")


def check_nonempty(x: Any, name: str, axes: tuple[str, ...]) -> None:
    """Raises ``ValueError`` naming ``name`` and the axis when an axis of ``x`` has length 0."""
    for size, axis in zip(x.shape, axes):
        if size == 0:
            raise ValueError(f"`{name}` is empty along {axis}: got {_describe(x)}; it needs "
                             "at least one.")


INT32_RANGE = (int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max))


def check_label_values(labels: Any, name: str = "labels", reserved: int | None = None) -> None:
    """Checks the *values* of concrete integer labels; traced labels pass unchecked.

    Call it before ``jnp.asarray``: without ``jax_enable_x64`` an int64 label >= 2**31 is
    silently wrapped to int32, so two classes could merge (2**32 becomes 0).

    Args:
      labels: labels as given (list, NumPy or JAX array); a tracer is skipped.
      name: the argument's name, for the message.
      reserved: a value no label may take (the internal mask label), or None.

    Raises:
      ValueError: a label outside the int32 range, or equal to ``reserved``; the message
        names the argument and the offending value.
    """
    if isinstance(labels, jax.core.Tracer):
        return
    values = np.asarray(labels)   # a JAX array: one small host copy of B integers
    if values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        return
    lo, hi = int(values.min()), int(values.max())
    for v in (lo, hi):
        if not INT32_RANGE[0] <= v <= INT32_RANGE[1]:
            raise ValueError(f"`{name}` holds {v}, outside the int32 range "
                             f"[{INT32_RANGE[0]}, {INT32_RANGE[1]}] labels are compared in; "
                             "map the class ids to smaller integers (e.g. np.unique(..., "
                             "return_inverse=True)).")
    if reserved is not None and lo <= reserved <= hi and np.any(values == reserved):
        raise ValueError(f"`{name}` holds {reserved}, the value reserved for masked rows "
                         "(hnm.distances.MASKED_LABEL); use another label for this class.")


def check_sim(sim: Any, labels: Any, ref_labels: Any) -> None:
    """Checks a similarity matrix [A, M] (A, M >= 1) against query labels [A] and reference
    labels [M]."""
    check_floating_matrix(sim, "sim")
    check_nonempty(sim, "sim", ("A (rows)", "M (columns)"))
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


# ---------------------------------------------------------------------------------------------
# Options (hyperparameters) of the objectives: one declarative spec per option.


class OptionSpec(NamedTuple):
    """What values an option accepts.

    Attributes:
      kind: ``"real"`` (a finite real number, not a bool), ``"int"`` (an integer, not a
        bool), ``"bool"`` or ``"choice"`` (one of ``choices``, a string).
      low: lower bound of a ``"real"`` / ``"int"``, or None.
      low_open: the bound is strict (``> low``) rather than ``>= low``.
      high: upper bound (inclusive), or None.
      choices: the valid strings of a ``"choice"``.
    """
    kind: str
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        """A short human phrase: ``"a real number > 0"``, ``"one of ('or', 'and')"``."""
        if self.kind == "choice":
            return f"one of {self.choices}"
        if self.kind == "bool":
            return "a bool"
        text = "a real number" if self.kind == "real" else "an integer"
        if self.low is not None:
            text += f" {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            text += f"{' and' if self.low is not None else ''} <= {self.high:g}"
        return text


def real(*, gt: float | None = None, ge: float | None = None,
         le: float | None = None) -> OptionSpec:
    """Spec of a finite real option, optionally bounded (``gt``: >, ``ge``: >=, ``le``: <=)."""
    if gt is not None and ge is not None:
        raise ValueError("give at most one of `gt` and `ge`.")
    return OptionSpec("real", gt if gt is not None else ge, gt is not None, le)


def integer(*, ge: int | None = None, le: int | None = None) -> OptionSpec:
    """Spec of an integer option (bools are not integers here), optionally bounded."""
    return OptionSpec("int", ge, False, le)


def choice(choices: tuple[str, ...]) -> OptionSpec:
    """Spec of a string option with a fixed set of values."""
    return OptionSpec("choice", choices=tuple(choices))


BOOL = OptionSpec("bool")
REAL = real()
POSITIVE = real(gt=0)
NON_NEGATIVE = real(ge=0)


def check_option(value: Any, name: str, spec: OptionSpec, where: str = "") -> None:
    """Raises ``TypeError`` / ``ValueError`` naming option ``name`` and ``value`` unless the
    value fits ``spec``.

    Arrays (``jax.Array``, traced or not, and NumPy arrays) are schedulable values: only their
    dtype is checked, never their values (a traced value has none at trace time).

    Args:
      value: the option's value.
      name: the option's name, for the message.
      spec: an :class:`OptionSpec`.
      where: appended to the name in the message, e.g. ``" of objective 'sct'"``.
    """
    label = f"`{name}`{where}"
    if isinstance(value, (jax.Array, np.ndarray)):
        dtype = value.dtype
        numeric = (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))
        ok = {"real": numeric, "int": jnp.issubdtype(dtype, jnp.integer),
              "bool": dtype == jnp.bool_, "choice": False}[spec.kind]
        if not ok:
            raise TypeError(f"{label} must be {spec.describe()}; got an array of dtype {dtype}.")
        return
    if spec.kind == "choice":
        if not isinstance(value, str) or value not in spec.choices:
            raise ValueError(f"{label} must be {spec.describe()}; got {value!r}.")
        return
    if spec.kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{label} must be a bool (True or False); got {value!r} "
                            f"({type(value).__name__}).")
        return
    wanted = numbers.Integral if spec.kind == "int" else numbers.Real
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, wanted):
        raise TypeError(f"{label} must be {spec.describe()}; got {value!r} "
                        f"({type(value).__name__}).")
    if not math.isfinite(value):
        raise ValueError(f"{label} must be finite; got {value!r}.")
    too_low = spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low)
    too_high = spec.high is not None and value > spec.high
    if too_low or too_high:
        raise ValueError(f"{label} must be {spec.describe()}; got {value!r}.")


def check_positive(value: Any, name: str) -> None:
    """``value > 0`` for a Python / NumPy number; arrays (possibly traced) pass unchecked."""
    check_option(value, name, POSITIVE)
