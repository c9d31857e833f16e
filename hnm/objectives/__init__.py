r"""Named training objectives: ``(embeddings, labels, key) -> (loss, aux)``.

Each objective is a plain module-level function

    ``name(embeddings [B, D], labels [B], key=None, *, axis_name=None, memory=None, **options)``

and :func:`get` binds its options with :func:`functools.partial`, so the result is pure and
jit-able: ``loss, aux = hnm.objectives.get("sct", temperature=0.1)(emb, labels)``.
:func:`names` lists them, :func:`options` gives an objective's options with their defaults
(read from its signature).

Layout:

* :mod:`hnm.objectives.triplet`: ``ephn``, ``epshn``, ``sct`` (the official SCT code),
  ``batch_hard``, ``semihard``, ``batch_all`` (hinge recipes);
* :mod:`hnm.objectives.pair`: ``contrastive``, ``multi_similarity``, ``supcon``,
  ``distance_weighted``;
* :mod:`hnm.objectives.tuples`: ``circle``, ``lifted_structure``,
  ``generalized_lifted_structure``, ``n_pairs``, ``ntxent``, ``tuplet_margin``;
* :mod:`hnm.objectives.ranking`: ``fast_ap``, ``smooth_ap``, ``histogram``;
* :mod:`hnm.objectives.proxy`: the *parametric* objectives ``proxy_nca``, ``proxy_anchor``,
  ``norm_softmax``, ``arcface``, ``cosface``, ``sub_center_arcface``, ``soft_triple``,
  ``margin``, for which :func:`get` returns a :class:`~hnm.objectives.proxy.
  ParametricObjective` ``(init, apply)`` instead of a function (:func:`is_parametric`);
* ``_common.py`` (private): input checks and normalisation, the similarity kernels (from
  the one registry :data:`hnm.distances.SIMILARITIES`), global statistics, the aux dict and
  the reductions shared by both.

**Custom relevance** (every objective but ``n_pairs``): instead of integer ``labels``, pass
``pos_mask=`` / ``neg_mask=`` (bool [B, M], this device's rows against the reference set: the
gathered batch, then the memory rows; the proxy objectives take ``pos_mask`` [B, C] against
the classes). Labels and masks together are an error (except ``margin``, whose labels pick
each anchor's β); the self-pair is always removed. With masks the mining is dense (no
streaming). Multi-label data and hierarchies work this way.

**Cross-device** (``axis_name`` set, inside ``pmap``/``shard_map``): the anchors are the local
rows, the candidates every device's rows (``distances.reference_set``, an ``all_gather``), and
self-pairs are removed with ``query_offset``. The returned ``loss`` is this device's *share*,
local sum / global count, so that summing losses (and gradients) over devices gives exactly
the single-device loss (and gradient) on the concatenated batch.

**Cross-batch memory** (every objective, call-time keyword ``memory``, :mod:`hnm.memory`): the
memory's rows are appended to the reference set after the (gathered) batch, stopped and
normalised like the batch; the anchors stay the local rows, so the self-pair offset and the
loss normalisation are unchanged. Empty or warm-up-masked slots carry
``distances.MASKED_LABEL`` and count for nothing: an empty memory gives the plain objective.

**aux** (scalars, global over devices, no gradient):

* ``loss``: the global loss (the ``psum`` of the shares).
* ``num_valid``: how many units entered the loss (triplets, anchor-positive pairs or pairs;
  each objective's docstring says which).
* ``frac_hard`` — one meaning everywhere, the official ``hn_ratio`` of
  ``littleredxh/HardNegative``: the fraction of the objective's valid triplets (anchor,
  positive, negative), as it mined, enumerated or sampled them, whose negative is strictly
  more similar to the anchor than the positive, :math:`S_{an} > S_{ap}`, in the objective's
  similarity (ties are not hard). Reported by every objective that forms triplets: ``ephn``,
  ``epshn``, ``sct``, ``batch_hard``, ``semihard`` (per anchor-positive pair), ``batch_all``
  (every triplet) and ``distance_weighted`` (the sampled triplets).
* ``frac_hard_ephn`` — the pair objectives ``contrastive``, ``multi_similarity`` and
  ``supcon`` mine pairs, not triplets, so they report this instead: among anchors with a
  positive and a negative, the fraction whose easy-positive / hard-negative triplet (most
  similar positive, most similar negative, by cosine) is hard. It equals ``ephn``'s
  ``frac_hard`` on the same batch wherever ``ephn`` counts the anchor.
* ``mean_sim_ap`` / ``mean_sim_an``: mean positive / negative similarity of those units.
* ``frac_active``: the fraction of the units with a non-zero loss.

and, for ``sct``, ``num_easy`` / ``num_hard``. A batch with nothing to learn from gives loss
0, ``num_valid`` 0 and a zero gradient, never NaN.

**Bad input.** Options are checked by :func:`get` / :func:`check_options` (types and ranges,
:data:`OPTION_SPECS`); embeddings must be [B, D] floating with B, D >= 1, labels [B] integer;
concrete labels must lie in the int32 range and differ from ``distances.MASKED_LABEL``
(checked before any int64 -> int32 conversion could merge classes). **Non-finite input gives a
non-finite loss**: if any row of the reference set (every device's batch rows and the memory
rows) holds NaN or inf, ``loss`` and ``aux["loss"]`` are NaN on every device, so a trainer that
checks the loss stops instead of applying a NaN gradient (the other aux values are then
meaningless).

References:
  Xuan, Stylianou, Liu, Pless. Hard Negative Examples are Hard, but Useful. ECCV 2020.
  Hermans, Beyer, Leibe. In Defense of the Triplet Loss. 2017.
  Schroff, Kalenichenko, Philbin. FaceNet. CVPR 2015.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping

from hnm import _checks
from hnm.objectives import _common
from hnm.objectives import pair
from hnm.objectives import proxy
from hnm.objectives import ranking
from hnm.objectives import triplet
from hnm.objectives import tuples
from hnm.objectives.triplet import SCT_PRESETS  # noqa: F401  (re-exported)
from hnm.objectives.pair import contrastive, distance_weighted, multi_similarity, supcon
from hnm.objectives.ranking import fast_ap, histogram, smooth_ap
from hnm.objectives.triplet import batch_all, batch_hard, ephn, epshn, sct, semihard
from hnm.objectives.tuples import (circle, generalized_lifted_structure, lifted_structure,
                                   n_pairs, ntxent, tuplet_margin)

Aux = _common.Aux
Objective = _common.Objective
# Keyword arguments given per call (or by ``get`` itself), never bound as options.
CALL_TIME = ("axis_name", "memory", "pos_mask", "neg_mask")

OBJECTIVES: dict[str, Objective] = dict(sorted({**triplet.OBJECTIVES, **pair.OBJECTIVES,
                                                **tuples.OBJECTIVES,
                                                **ranking.OBJECTIVES}.items()))
# What each option of each objective accepts: {name: {option: OptionSpec}}.
OPTION_SPECS: dict[str, dict[str, _checks.OptionSpec]] = {
    **triplet.OPTION_SPECS, **pair.OPTION_SPECS, **tuples.OPTION_SPECS,
    **ranking.OPTION_SPECS, **proxy.OPTION_SPECS}
# Objectives with learnable parameters of their own (proxies, class centres, beta).
PARAMETRIC: frozenset[str] = frozenset(proxy.PARAMETRIC)
ParametricObjective = proxy.ParametricObjective

__all__ = ["Aux", "CALL_TIME", "OBJECTIVES", "OPTION_SPECS", "Objective", "PARAMETRIC",
           "ParametricObjective", "check_options", "get", "is_parametric", "names",
           "options", "pair", "proxy", "ranking", "triplet", "tuples", *OBJECTIVES]


def names() -> list[str]:
    """Sorted names of every objective (parameter-free and parametric)."""
    return sorted([*OBJECTIVES, *proxy.PARAMETRIC])


def is_parametric(name: str) -> bool:
    """Whether objective ``name`` has learnable parameters (:func:`get` then returns a
    :class:`ParametricObjective` with ``init`` and ``apply``).

    Examples:
      >>> is_parametric("proxy_anchor"), is_parametric("sct")
      (True, False)
    """
    _lookup(name)
    return name in PARAMETRIC


def _lookup(name: str) -> Objective:
    if not isinstance(name, str) or name not in names():
        raise ValueError(f"unknown objective `name`={name!r}; expected one of {names()}.")
    return OBJECTIVES.get(name) or proxy.PARAMETRIC[name][1]


def options(name: str) -> dict[str, Any]:
    """The options of objective ``name`` and their defaults (from its signature).

    Examples:
      >>> options("supcon")
      {'temperature': 0.1}
    """
    fn = _lookup(name)
    if name in proxy.PARAMETRIC:   # the options of both init and apply
        return proxy.options(name)
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in CALL_TIME}


def check_options(name: str, opts: Mapping[str, Any]) -> None:
    """Validates a configuration before anything is compiled.

    Checks that ``name`` is an objective, that every key of ``opts`` is one of its options,
    and every value's type and range (:data:`OPTION_SPECS`: temperatures and scales > 0,
    margins >= 0, known strings, bools where bools). Arrays (traced or not) are
    schedulable values: their dtype is checked, their values are not.

    Raises:
      ValueError: an unknown ``name`` or option (one line listing the valid ones), or a value
        out of range or not one of the valid strings; the message names the option and the
        value.
      TypeError: a value of the wrong type (``margin="a"``, ``normalize=1``).

    Examples:
      >>> check_options("sct", {"temperature": 0.0})
      Traceback (most recent call last):
      ...
      ValueError: `temperature` of objective 'sct' must be a real number > 0; got 0.0.
    """
    valid = options(name)
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for objective {name!r}; valid options: "
                         f"{sorted(valid)}.")
    specs = OPTION_SPECS.get(name, {})
    for key, value in opts.items():
        if key in specs:
            _checks.check_option(value, key, specs[key], where=f" of objective {name!r}")


def get(name: str, *, axis_name: str | None = None, **opts: Any) -> Objective:
    """The objective ``name`` with its options bound: ``(embeddings, labels, key=None, *,
    memory=None) -> (loss, aux)``.

    Args:
      name: one of :func:`names`.
      axis_name: device axis to mine across (inside ``pmap``/``shard_map``), or None.
      **opts: the objective's keyword options (see :func:`options`), validated by
        :func:`check_options`.

    Returns:
      A pure function, ready for ``jax.jit`` / ``jax.grad``; for a parametric objective
      (:func:`is_parametric`) a :class:`ParametricObjective` ``(name, init, apply)``:
      ``params = obj.init(key, num_classes, dim)``, ``loss, aux = obj.apply(params,
      embeddings, labels, key=None, *, axis_name=None, memory=None)`` (``axis_name`` given
      here is its default).

    Raises:
      ValueError, TypeError: see :func:`check_options`.

    Examples:
      >>> import jax.numpy as jnp
      >>> objective = get("batch_hard", margin=0.25)
      >>> loss, aux = objective(jnp.eye(4), jnp.array([0, 0, 1, 1]))  # all at distance √2
      >>> round(float(loss), 4), int(aux["num_valid"])
      (0.25, 4)
    """
    check_options(name, opts)
    if is_parametric(name):   # ``init(key, num_classes, dim)``, ``apply(params, emb, ...)``
        return proxy.bind(name, axis_name=axis_name, **opts)
    return functools.partial(_lookup(name), axis_name=axis_name, **opts)
