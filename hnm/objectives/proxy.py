r"""Objectives with learnable parameters: proxies, margin softmax, the margin loss's β.

A parametric objective is a pair of pure functions, optax-style::

    obj = hnm.objectives.get("proxy_anchor", alpha=32.0, margin=0.1)
    params = obj.init(key, num_classes, dim)                 # a pytree of arrays
    loss, aux = obj.apply(params, embeddings, labels, key=None, axis_name=None, memory=None)

and the trainer keeps ``params`` in the train state beside the model's (with their own
learning-rate multiplier). Layout of ``params`` (so users and tests can set them):

* ``params["proxies"]`` [C, D] for ``proxy_nca``, ``proxy_anchor``, ``norm_softmax``,
  ``arcface``, ``cosface``: row c is the proxy (class weight) of class c.
* ``params["proxies"]`` [C·K, D] for ``sub_center_arcface`` (K = ``sub_centers``) and
  ``soft_triple`` (K = ``centers_per_class``), **class-major**: row ``c * K + k`` is centre k
  of class c (PML's ``W[:, c * K + k]``; ``proxies.reshape(C, K, D)[c]`` are class c's).
* ``params["beta"]`` [C] for ``margin`` (Wu et al.'s class-specific boundary β).

Proxies start as random unit vectors; every loss here uses only their direction (cosine),
so their norm only sets the effective learning rate.

**Labels** are class indices in ``[0, C)``; a row whose label is outside (e.g. padding with
``hnm.distances.MASKED_LABEL``) counts for nothing. Every proxy objective also accepts an
explicit relevance ``pos_mask`` [B, C] (bool, multi-label: a row may have several positive
classes; a row with none counts for nothing) instead of labels, not both; the softmax losses
then take ``-log`` of the probability of any positive class (ProxyNCA's rule; the same as the
label for a one-hot row) and apply their margin to each positive. ``margin`` takes
``pos_mask`` / ``neg_mask`` [B, M] against its reference set like the pair objectives, and
its labels still pick each anchor's β.

**Cross-device** (``axis_name``): the per-sample losses (all but ``proxy_anchor``) return
local sum / global count; ``proxy_anchor``, whose per-proxy log-sum-exps run over the whole
batch, gathers the [B, C] cosines of every device (differentiable ``all_gather``) and returns
its global loss divided by the number of devices. Either way the ``psum`` over devices of
the loss and of the gradients (w.r.t. the embeddings' rows and the replicated parameters)
equals one device on the concatenated batch. ``margin`` mines over the gathered batch like
the pair objectives.

**Memory**: ``margin`` appends the cross-batch memory rows to its candidates like the pair
objectives; the proxy losses have no reference set (the proxies are the memory) and raise a
ValueError when given one.

**Non-finite input gives a non-finite loss**, as for every objective: if any embedding row
of any device (``axis_name``: a ``psum`` of the count), any proxy, or for ``margin`` any
memory row or β, holds NaN or inf, ``loss`` and ``aux["loss"]`` are NaN on every device, even
where the row would be masked out (a label outside ``[0, C)``, a ``pos_mask`` row without
positives), so a trainer that checks the loss stops instead of applying a NaN gradient (the
other aux values are then meaningless).

**aux** (global, no gradient): ``loss``, ``num_valid`` (rows that counted; triplets for
``margin``), ``mean_sim_ap`` (cosine to the own proxy), ``mean_sim_an`` (to the other
proxies), ``frac_hard_ephn`` (rows whose most similar other proxy beats their own: the
easy-positive / hard-negative triplet with proxies as references; ``margin``: as the pair
objectives), and ``frac_active``.

References:
  Movshovitz-Attias et al. No Fuss Distance Metric Learning using Proxies. ICCV 2017.
  Teh, DeVries, Taylor. ProxyNCA++. ECCV 2020.
  Kim, Kim, Cho, Kwak. Proxy Anchor Loss for Deep Metric Learning. CVPR 2020.
  Zhai, Wu. Classification is a Strong Baseline for Deep Metric Learning. BMVC 2019.
  Deng et al. ArcFace. CVPR 2019; Deng et al. Sub-center ArcFace. ECCV 2020.
  Wang et al. CosFace. CVPR 2018.
  Qian et al. SoftTriple Loss. ICCV 2019.
  Wu, Manmatha, Smola, Krähenbühl. Sampling Matters in Deep Embedding Learning. ICCV 2017.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from hnm import _checks
from hnm import distances
from hnm.objectives import _relevance as rel

Params = dict[str, jax.Array]
Aux = dict[str, jax.Array]


class ParametricObjective(NamedTuple):
    """An objective with learnable parameters: ``init`` and ``apply``, options bound."""
    name: str
    init: Callable[..., Params]       # (key, num_classes, dim) -> params
    apply: Callable[..., tuple[jax.Array, Aux]]
    # (params, embeddings, labels, key=None, *, axis_name=None, memory=None) -> (loss, aux)


# ---------------------------------------------------------------------------- init
def _check_init(num_classes: Any, dim: Any) -> None:
    for value, name in ((num_classes, "num_classes"), (dim, "dim")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int; got {value!r}.")


def _unit_rows(key: jax.Array, rows: int, dim: int) -> jax.Array:
    return distances.l2_normalize(jax.random.normal(key, (rows, dim), jnp.float32))


def init_proxies(key: jax.Array, num_classes: int, dim: int) -> Params:
    """``{"proxies": [C, D]}``: random unit vectors (isotropic normal, row-normalised)."""
    _check_init(num_classes, dim)
    return {"proxies": _unit_rows(key, num_classes, dim)}


def init_sub_centers(key: jax.Array, num_classes: int, dim: int, *, sub_centers: int = 3
                     ) -> Params:
    """``{"proxies": [C·K, D]}``, row ``c * K + k`` the k-th centre of class c."""
    _check_init(num_classes, dim)
    _check_init(sub_centers, 1)
    return {"proxies": _unit_rows(key, num_classes * sub_centers, dim)}


def init_soft_triple(key: jax.Array, num_classes: int, dim: int, *,
                     centers_per_class: int = 10) -> Params:
    """``{"proxies": [C·K, D]}``, row ``c * K + k`` the k-th centre of class c."""
    return init_sub_centers(key, num_classes, dim, sub_centers=centers_per_class)


def init_beta(key: jax.Array, num_classes: int, dim: int, *, beta: float = 1.2) -> Params:
    """``{"beta": [C]}``, every class starting at ``beta`` (Wu et al.: 1.2)."""
    del key
    _check_init(num_classes, dim)
    return {"beta": jnp.full((num_classes,), beta, jnp.float32)}


# ------------------------------------------------------------------------- helpers
def _proxies(params: Any, name: str = "proxies") -> jax.Array:
    if not isinstance(params, dict) or name not in params:
        raise ValueError(f"`params` must be a dict with key {name!r} (from `init`); got "
                         f"{type(params).__name__} with keys "
                         f"{sorted(params) if isinstance(params, dict) else None}.")
    value = jnp.asarray(params[name])
    return value


def _no_memory(memory: Any, name: str) -> None:
    if memory is not None:
        raise ValueError(f"`memory` is not supported by {name!r} (its proxies already stand "
                         "for the whole training set); pass memory=None.")


def _inputs(params: Any, embeddings: ArrayLike, labels: ArrayLike | None, per_class: int,
            pos_mask: ArrayLike | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(unit embeddings [B, D], unit proxies [C·K, D], targets [B, C] bool, valid [B])."""
    proxies = _proxies(params)
    embeddings = jnp.asarray(embeddings)
    _checks.check_floating_matrix(embeddings, "embeddings")
    _checks.check_floating_matrix(proxies, "params['proxies']")
    if proxies.shape[1] != embeddings.shape[1]:
        raise ValueError(f"`params['proxies']` has dimension {proxies.shape[1]} but the "
                         f"embeddings have {embeddings.shape[1]}; they must match.")
    if proxies.shape[0] % per_class:
        raise ValueError(f"`params['proxies']` has {proxies.shape[0]} rows, not a multiple "
                         f"of {per_class} centres per class.")
    num_classes = proxies.shape[0] // per_class
    if pos_mask is not None:
        if labels is not None:
            raise ValueError("pass either `labels` or `pos_mask`, not both.")
        target = rel.check_mask(pos_mask, "pos_mask", (embeddings.shape[0], num_classes))
        valid = jnp.any(target, axis=1)
    else:
        if labels is None:
            raise ValueError("`labels` is required unless `pos_mask` is given.")
        labels = jnp.asarray(labels)
        _checks.check_labels(labels, "labels", embeddings.shape[0], "embeddings")
        valid = (labels >= 0) & (labels < num_classes)
        target = jnp.arange(num_classes)[None, :] == labels[:, None]
    x = distances.l2_normalize(embeddings)
    p = distances.l2_normalize(proxies.astype(x.dtype))
    return x, p, target, valid


def _proxy_aux(loss: jax.Array, cos: jax.Array, target: jax.Array, valid: jax.Array,
               per_row: jax.Array, axis_name: str | None) -> Aux:
    """Aux of a proxy loss from the stopped [B, C] cosines to the class proxies."""
    cos = jax.lax.stop_gradient(cos)
    rows = valid[:, None]
    pos, neg = target & rows, ~target & rows
    max_pos = jnp.max(jnp.where(pos, cos, -jnp.inf), axis=1)
    max_neg = jnp.max(jnp.where(neg, cos, -jnp.inf), axis=1)
    s = rel.global_stats(axis_name, loss.dtype, loss=loss, n=jnp.sum(valid),
                         hard=jnp.sum(valid & (max_neg > max_pos)),
                         active=jnp.sum(valid & (per_row > 0)),
                         ap=rel.masked_sum(cos, pos), n_ap=jnp.sum(pos),
                         an=rel.masked_sum(cos, neg), n_an=jnp.sum(neg))
    return dict(loss=s["loss"], num_valid=s["n"].astype(jnp.int32),
                frac_hard_ephn=rel.ratio(s["hard"], s["n"]),
                frac_active=rel.ratio(s["active"], s["n"]),
                mean_sim_ap=rel.ratio(s["ap"], s["n_ap"]),
                mean_sim_an=rel.ratio(s["an"], s["n_an"]))


def _cross_entropy(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Per-row softmax cross-entropy with a bool target [B, C]: ``-log`` of the probability
    of the target classes (one-hot: of the label; multi-hot ``pos_mask``: of any of them,
    as ProxyNCA). For a one-hot row the log-sum-exp of the one logit is that logit exactly."""
    log_z = jax.nn.logsumexp(logits, axis=1)
    return log_z - rel.masked_logsumexp(logits, target)


def _mean_share(per_row: jax.Array, valid: jax.Array, axis_name: str | None) -> jax.Array:
    """This device's share of the global mean over valid rows."""
    return distances.global_mean_of(rel.masked_sum(per_row, valid), jnp.sum(valid), axis_name)


def _finish(loss: jax.Array, aux: Aux, x: jax.Array, p: jax.Array,
            axis_name: str | None) -> tuple[jax.Array, Aux]:
    """``(loss, aux)`` with ``loss`` and ``aux["loss"]`` NaN on every device when any
    embedding row of any device, or any proxy, is non-finite.

    A proxy loss has no gathered reference set, and a non-finite row whose label is out of
    range (or, with ``pos_mask``, without positives) is masked out of the sum: without this
    the loss would stay finite (on the other devices always) while the gradient is NaN, and
    a trainer that watches the loss would apply the update. The poison is a stopped
    constant: the gradient is the one computed, never changed.
    """
    bad = jnp.sum(~jnp.isfinite(x)) + jnp.sum(~jnp.isfinite(p))
    bad = distances.global_sum(jax.lax.stop_gradient(bad).astype(jnp.float32), axis_name)
    # all_finite: the flag typed replicated under shard_map (a psum over what still varies).
    finite = distances.all_finite(jnp.where(bad > 0, jnp.nan, 0.0))
    poison = jax.lax.stop_gradient(jnp.where(finite, 0.0, jnp.nan)).astype(loss.dtype)
    return loss + poison, dict(aux, loss=aux["loss"] + poison.astype(aux["loss"].dtype))


def _softmax_objective(per_row, cos, target, valid, axis_name, extra=0.0, *, rows):
    loss = _mean_share(per_row, valid, axis_name) + extra
    return _finish(loss, _proxy_aux(loss, cos, target, valid, per_row, axis_name), *rows,
                   axis_name)


# ----------------------------------------------------------------------- ProxyNCA
def proxy_nca(params: Params, embeddings: ArrayLike, labels: ArrayLike | None = None,
              key: jax.Array | None = None, *, axis_name: str | None = None,
              memory: Any = None, pos_mask: ArrayLike | None = None,
              temperature: ArrayLike = 1.0) -> tuple[jax.Array, Aux]:
    r"""ProxyNCA / ProxyNCA++: softmax over negative squared distances to the proxies.

    With :math:`\hat x`, :math:`\hat p_c` unit vectors and :math:`d^2_{ic} =
    \lVert \hat x_i - \hat p_c\rVert^2`:

    .. math::
        L = \frac1{|V|}\sum_{i\in V} -\log \frac{\sum_{c \in P_i} e^{-d^2_{ic}/T}}
            {\sum_{c} e^{-d^2_{ic}/T}}

    (:math:`P_i = \{y_i\}` with labels). The denominator includes the positive proxy, as in
    ProxyNCA++ and pytorch-metric-learning's ``ProxyNCALoss`` (whose ``softmax_scale`` is
    :math:`1/T`, equal for ``temperature=1/softmax_scale``); ProxyNCA++'s recipe uses
    ``temperature=1/9``. No proxy scaling, no fast-moving proxies (those are optimiser
    settings: ``param_lr_mult``).

    Args:
      params: ``{"proxies": [C, D]}``.
      embeddings: [B, D] floating (this device's rows).
      labels: [B] class indices in ``[0, C)``; others do not count.
      key: unused.
      axis_name: device axis; the result is this device's share.
      memory: must be None.
      pos_mask: [B, C] bool positive proxies instead of ``labels`` (multi-label).
      temperature: :math:`T > 0`.

    Returns:
      ``(loss, aux)``.

    References:
      Movshovitz-Attias et al. No Fuss Distance Metric Learning using Proxies. ICCV 2017;
      Teh, DeVries, Taylor. ProxyNCA++. ECCV 2020.
    """
    del key
    _no_memory(memory, "proxy_nca")
    rel.check_positive(temperature, "temperature")
    x, p, target, valid = _inputs(params, embeddings, labels, 1, pos_mask)
    logits = distances.negative_squared_euclidean(x, p) / temperature
    log_z = jax.nn.logsumexp(logits, axis=1)
    log_pos = rel.masked_logsumexp(logits, target)
    per_row = jnp.where(valid, log_z - log_pos, 0.0)
    return _softmax_objective(per_row, x @ p.T, target, valid, axis_name, rows=(x, p))


# --------------------------------------------------------------------- Proxy-Anchor
def proxy_anchor(params: Params, embeddings: ArrayLike, labels: ArrayLike | None = None,
                 key: jax.Array | None = None, *, axis_name: str | None = None,
                 memory: Any = None, pos_mask: ArrayLike | None = None,
                 alpha: ArrayLike = 32.0, margin: ArrayLike = 0.1) -> tuple[jax.Array, Aux]:
    r"""Proxy-Anchor loss (Kim et al. 2020): each proxy is an anchor against the batch.

    With cosines :math:`s(x, p)`, :math:`P^+` the proxies having a positive in the (global)
    batch, :math:`X_p^+` / :math:`X_p^-` the rows that are / are not of proxy p's class:

    .. math::
        L = \frac1{|P^+|}\sum_{p\in P^+}\log\Big(1 + \sum_{x\in X_p^+} e^{-\alpha(s(x,p)
            - \delta)}\Big) + \frac1{|P|}\sum_{p\in P}\log\Big(1 + \sum_{x\in X_p^-}
            e^{\alpha(s(x,p) + \delta)}\Big)

    (:math:`\alpha` = ``alpha`` = 32, :math:`\delta` = ``margin`` = 0.1, the paper's and
    PML's ``ProxyAnchorLoss`` defaults; equal to PML's). Rows with no valid label are in
    no :math:`X_p^\pm`. With ``axis_name`` the sums run over every device's rows (the
    [B, C] cosines are gathered), and the result is the global loss / number of devices.

    Args:
      params: ``{"proxies": [C, D]}``.
      embeddings: [B, D] floating.
      labels: [B] class indices in ``[0, C)``.
      key: unused.
      axis_name: device axis.
      memory: must be None.
      pos_mask: [B, C] bool instead of labels (multi-label: :math:`X_p^+` are the rows
        with ``pos_mask[:, p]``).
      alpha: :math:`\alpha > 0`, the scale.
      margin: :math:`\delta`.

    Returns:
      ``(loss, aux)``.

    References:
      Kim, Kim, Cho, Kwak. Proxy Anchor Loss for Deep Metric Learning. CVPR 2020.
    """
    del key
    _no_memory(memory, "proxy_anchor")
    rel.check_positive(alpha, "alpha")
    x, p, target, valid = _inputs(params, embeddings, labels, 1, pos_mask)
    cos = x @ p.T
    local_cos, local_target, local_valid = cos, target, valid
    if axis_name is not None:
        cos = jax.lax.all_gather(cos, axis_name, tiled=True)
        target = jax.lax.all_gather(target, axis_name, tiled=True)
        valid = jax.lax.all_gather(valid, axis_name, tiled=True)
    pos = target & valid[:, None]
    neg = ~target & valid[:, None]
    pos_term = rel.masked_logsumexp(-alpha * (cos - margin), pos, axis=0, add_one=True)
    neg_term = rel.masked_logsumexp(alpha * (cos + margin), neg, axis=0, add_one=True)
    with_pos = jnp.any(pos, axis=0)
    num_classes = cos.shape[1]
    # add_one: a proxy without positives has pos_term log(1) = 0 but is excluded anyway.
    loss = (jnp.sum(jnp.where(with_pos, pos_term, 0.0)) / jnp.maximum(jnp.sum(with_pos), 1)
            + jnp.sum(neg_term) / num_classes)
    loss = jnp.where(jnp.any(valid), loss, 0.0)
    share = loss / rel.num_devices(axis_name)
    # aux on the local rows (its psum restores the global counts), loss is the global one.
    per_row = local_valid.astype(cos.dtype)
    return _finish(share, _proxy_aux(share, local_cos, local_target, local_valid, per_row,
                                     axis_name), x, p, axis_name)


# --------------------------------------------------------------- NormSoftmax etc.
def norm_softmax(params: Params, embeddings: ArrayLike, labels: ArrayLike | None = None,
                 key: jax.Array | None = None, *, axis_name: str | None = None,
                 memory: Any = None, pos_mask: ArrayLike | None = None,
                 temperature: ArrayLike = 0.05) -> tuple[jax.Array, Aux]:
    r"""Normalised softmax (NormSoftmax, Zhai & Wu 2019): cross-entropy on cosines / T.

    .. math::
        L = \frac1{|V|}\sum_{i\in V} -\log\frac{e^{\cos(x_i, w_{y_i})/T}}
            {\sum_c e^{\cos(x_i, w_c)/T}}

    (PML ``NormalizedSoftmaxLoss(temperature)``, its ``W`` being ``proxies.T``).

    Args:
      params: ``{"proxies": [C, D]}``.
      embeddings: [B, D]; labels: [B] class indices; key: unused; axis_name: device axis;
      memory: must be None.
      pos_mask: [B, C] bool positive classes instead of ``labels`` (multi-label: the
        probability of any of them; margins apply to each).
      temperature: :math:`T > 0` (0.05, as the paper and PML).

    Returns:
      ``(loss, aux)``.

    References:
      Zhai, Wu. Classification is a Strong Baseline for Deep Metric Learning. BMVC 2019.
    """
    del key
    _no_memory(memory, "norm_softmax")
    rel.check_positive(temperature, "temperature")
    x, p, target, valid = _inputs(params, embeddings, labels, 1, pos_mask)
    cos = x @ p.T
    per_row = jnp.where(valid, _cross_entropy(cos / temperature, target), 0.0)
    return _softmax_objective(per_row, cos, target, valid, axis_name, rows=(x, p))


def _sine(cos: jax.Array) -> jax.Array:
    """sin(arccos(c)) with a finite gradient at c = +-1 (safe square root)."""
    return distances.safe_sqrt(jnp.maximum(1.0 - cos * cos, 0.0), eps=1e-12)


def _arc_margin(cos: jax.Array, margin: ArrayLike) -> jax.Array:
    r""":math:`\cos(\theta + m)` where :math:`\theta \le \pi - m`, else
    :math:`\cos\theta - m \sin m` (ArcFace's monotone extension, as PML)."""
    cos_m, sin_m = jnp.cos(margin), jnp.sin(margin)
    plus = cos * cos_m - _sine(cos) * sin_m
    # theta <= pi - m  <=>  cos(theta) >= cos(pi - m) = -cos(m)
    return jnp.where(cos >= -cos_m, plus, cos - margin * sin_m)


def _margin_softmax(cos, target, valid, target_logit, scale, axis_name, extra=0.0, *, rows):
    logits = scale * jnp.where(target, target_logit, cos)
    per_row = jnp.where(valid, _cross_entropy(logits, target), 0.0)
    return _softmax_objective(per_row, cos, target, valid, axis_name, extra, rows=rows)


def arcface(params: Params, embeddings: ArrayLike, labels: ArrayLike | None = None,
            key: jax.Array | None = None, *, axis_name: str | None = None,
            memory: Any = None, pos_mask: ArrayLike | None = None,
            margin: ArrayLike = 0.5,
            scale: ArrayLike = 64.0) -> tuple[jax.Array, Aux]:
    r"""ArcFace (additive angular margin): cross-entropy on :math:`s\cos(\theta_{y} + m)`.

    .. math::
        L = \frac1{|V|}\sum_{i} -\log\frac{e^{s\,\psi(\theta_{i y_i})}}{e^{s\,\psi(\theta_{i
            y_i})} + \sum_{c \ne y_i} e^{s \cos\theta_{ic}}}, \quad
        \psi(\theta) = \begin{cases}\cos(\theta + m) & \theta \le \pi - m\\
                       \cos\theta - m\sin m & \text{else}\end{cases}

    ``margin`` is in **radians** (0.5, the paper's); PML's ``ArcFaceLoss`` takes degrees:
    ``ArcFaceLoss(margin=math.degrees(m), scale=s)`` equals this (its default 28.6° is
    0.4992 rad). :math:`\cos(\theta + m)` is computed as :math:`c\cos m - \sqrt{1 - c^2}
    \sin m` with a safe square root, so the gradient is finite at :math:`c = \pm 1`.

    Args:
      params: ``{"proxies": [C, D]}``.
      embeddings: [B, D]; labels: [B] class indices; key: unused; axis_name: device axis;
      memory: must be None.
      pos_mask: [B, C] bool positive classes instead of ``labels`` (multi-label: the
        probability of any of them; margins apply to each).
      margin: m in radians.
      scale: s.

    Returns:
      ``(loss, aux)``.

    References:
      Deng, Guo, Xue, Zafeiriou. ArcFace: Additive Angular Margin Loss for Deep Face
      Recognition. CVPR 2019.
    """
    del key
    _no_memory(memory, "arcface")
    check_arc_margin(margin)
    x, p, target, valid = _inputs(params, embeddings, labels, 1, pos_mask)
    cos = x @ p.T
    return _margin_softmax(cos, target, valid, _arc_margin(cos, margin), scale, axis_name,
                           rows=(x, p))


def cosface(params: Params, embeddings: ArrayLike, labels: ArrayLike | None = None,
            key: jax.Array | None = None, *, axis_name: str | None = None,
            memory: Any = None, pos_mask: ArrayLike | None = None,
            margin: ArrayLike = 0.35,
            scale: ArrayLike = 64.0) -> tuple[jax.Array, Aux]:
    r"""CosFace (large margin cosine loss): cross-entropy on :math:`s(\cos\theta_y - m)`.

    .. math::
        L = \frac1{|V|}\sum_{i} -\log\frac{e^{s(\cos\theta_{iy_i} - m)}}{e^{s(\cos\theta_{iy_i}
            - m)} + \sum_{c \ne y_i} e^{s\cos\theta_{ic}}}

    (PML ``CosFaceLoss(margin, scale)``; defaults m = 0.35, s = 64.)

    Args:
      params: ``{"proxies": [C, D]}``.
      embeddings: [B, D]; labels: [B]; key: unused; axis_name: device axis;
      memory: must be None.
      pos_mask: [B, C] bool positive classes instead of ``labels`` (multi-label: the
        probability of any of them; margins apply to each).
      margin: m.
      scale: s.

    Returns:
      ``(loss, aux)``.

    References:
      Wang et al. CosFace: Large Margin Cosine Loss for Deep Face Recognition. CVPR 2018.
    """
    del key
    _no_memory(memory, "cosface")
    x, p, target, valid = _inputs(params, embeddings, labels, 1, pos_mask)
    cos = x @ p.T
    return _margin_softmax(cos, target, valid, cos - margin, scale, axis_name, rows=(x, p))


def sub_center_arcface(params: Params, embeddings: ArrayLike, labels: ArrayLike | None = None,
                       key: jax.Array | None = None, *, axis_name: str | None = None,
                       memory: Any = None, pos_mask: ArrayLike | None = None,
                       margin: ArrayLike = 0.5, scale: ArrayLike = 64.0,
                       sub_centers: int = 3) -> tuple[jax.Array, Aux]:
    r"""Sub-center ArcFace: ArcFace on the most similar of K sub-centres per class.

    .. math::
        \cos\theta_{ic} = \max_{k < K} \cos(x_i, w_{cK + k}), \quad\text{then ArcFace.}

    ``params["proxies"]`` is [C·K, D] class-major (row ``c*K + k``), like PML's
    ``SubCenterArcFaceLoss`` (``W.view(D, C, K)``), which it equals for
    ``margin=math.degrees(m)``. The max picks one sub-centre per class; only it gets gradient.

    Args:
      params: ``{"proxies": [C·K, D]}``.
      embeddings: [B, D]; labels: [B]; key: unused; axis_name: device axis;
      memory: must be None.
      pos_mask: [B, C] bool positive classes instead of ``labels`` (multi-label: the
        probability of any of them; margins apply to each).
      margin: m in radians.
      scale: s.
      sub_centers: K (also the ``init`` option).

    Returns:
      ``(loss, aux)``.

    References:
      Deng, Guo, Liu, Zafeiriou. Sub-center ArcFace. ECCV 2020.
    """
    del key
    _no_memory(memory, "sub_center_arcface")
    check_arc_margin(margin)
    x, p, target, valid = _inputs(params, embeddings, labels, sub_centers, pos_mask)
    cos = jnp.max((x @ p.T).reshape(x.shape[0], -1, sub_centers), axis=2)
    return _margin_softmax(cos, target, valid, _arc_margin(cos, margin), scale, axis_name,
                           rows=(x, p))


def soft_triple(params: Params, embeddings: ArrayLike, labels: ArrayLike | None = None,
                key: jax.Array | None = None, *, axis_name: str | None = None,
                memory: Any = None, pos_mask: ArrayLike | None = None,
                centers_per_class: int = 10, la: ArrayLike = 20.0,
                gamma: ArrayLike = 0.1, margin: ArrayLike = 0.01,
                tau: ArrayLike = 0.0) -> tuple[jax.Array, Aux]:
    r"""SoftTriple loss (Qian et al. 2019): a soft max over K centres per class.

    .. math::
        S_{ic} = \sum_k \frac{e^{s_{ick}/\gamma}}{\sum_{k'} e^{s_{ick'}/\gamma}} s_{ick},
        \qquad \ell_i = -\log\frac{e^{\lambda(S_{iy_i} - \delta)}}{e^{\lambda(S_{iy_i} -
        \delta)} + \sum_{c\ne y_i} e^{\lambda S_{ic}}}

    with :math:`s_{ick}` the cosine to centre ``c*K + k``; :math:`L` is the mean of
    :math:`\ell_i` plus :math:`\tau R`, the paper's centre regulariser
    :math:`R = \sum_c\sum_{k<k'}\sqrt{2 + 10^{-5} - 2 s(w_{ck}, w_{ck'})} / (CK(K-1))`
    (the official code). ``tau=0`` (default) equals PML's ``SoftTripleLoss(
    centers_per_class, la, gamma, margin)``, which has no regulariser; the paper uses
    :math:`\tau = 0.2`. Defaults λ = 20, γ = 0.1, δ = 0.01, K = 10 (PML's and the paper's).
    Under ``axis_name`` each device adds :math:`\tau R` / devices.

    Args:
      params: ``{"proxies": [C·K, D]}`` class-major.
      embeddings: [B, D]; labels: [B]; key: unused; axis_name: device axis;
      memory: must be None.
      pos_mask: [B, C] bool positive classes instead of ``labels`` (multi-label: the
        probability of any of them; margins apply to each).
      centers_per_class: K (also the ``init`` option).
      la: :math:`\lambda`, the scale.
      gamma: :math:`\gamma > 0`, the temperature of the centre softmax.
      margin: :math:`\delta`.
      tau: :math:`\tau`, weight of the centre regulariser.

    Returns:
      ``(loss, aux)``.

    References:
      Qian, Shang, Sun, Hu, Li, Jin. SoftTriple Loss: Deep Metric Learning Without Triplet
      Sampling. ICCV 2019.
    """
    del key
    _no_memory(memory, "soft_triple")
    rel.check_positive(gamma, "gamma")
    x, p, target, valid = _inputs(params, embeddings, labels, centers_per_class, pos_mask)
    k = centers_per_class
    sim = (x @ p.T).reshape(x.shape[0], -1, k)
    prob = jax.nn.softmax(sim / gamma, axis=2)
    sim_class = jnp.sum(prob * sim, axis=2)
    extra = 0.0
    if k > 1 and not (isinstance(tau, (int, float)) and tau == 0):
        centers = p.reshape(-1, k, p.shape[1])
        pair_sim = jnp.einsum("ckd,cld->ckl", centers, centers)
        upper = jnp.triu(jnp.ones((k, k), bool), 1)
        reg = jnp.sum(jnp.where(upper, jnp.sqrt(jnp.maximum(2.0 + 1e-5 - 2.0 * pair_sim,
                                                            1e-12)), 0.0))
        reg = reg / (centers.shape[0] * k * (k - 1))
        extra = tau * reg / rel.num_devices(axis_name)
    logits = la * (sim_class - margin * target)
    per_row = jnp.where(valid, _cross_entropy(logits, target), 0.0)
    return _softmax_objective(per_row, sim_class, target, valid, axis_name, extra,
                              rows=(x, p))


# ---------------------------------------------------------------- margin loss (β)
def margin(params: Params, embeddings: ArrayLike, labels: ArrayLike | None = None,
           key: jax.Array | None = None, *, axis_name: str | None = None,
           memory: Any = None, pos_mask: ArrayLike | None = None,
           neg_mask: ArrayLike | None = None, margin: ArrayLike = 0.2,
           nu: ArrayLike = 0.0) -> tuple[jax.Array, Aux]:
    r"""Margin loss of Wu et al. with a learnable, class-specific boundary :math:`\beta_c`.

    Euclidean distances :math:`d` between L2-normalised embeddings, over all triplets
    (a, p, n) of the batch (against the gathered batch and the memory rows):

    .. math::
        L = \frac{\sum_{(a,p,n)} [d_{ap} - \beta_{y_a} + m]_+ + [\beta_{y_a} - d_{an} + m]_+
            + \nu\,\beta_{y_a}}{\#\{[d_{ap} - \beta_{y_a} + m]_+ > 0\} +
            \#\{[\beta_{y_a} - d_{an} + m]_+ > 0\}}

    which is PML's ``MarginLoss(margin, nu, beta, learn_beta=True, num_classes=C)`` without
    a miner (all triplets, its ``DivisorReducer``). Computed in O(B M) memory, never a
    B x M x M array: each sum over triplets factors into per-pair sums times the anchor's
    number of negatives (or positives). Gradients reach ``params["beta"]``. With custom
    ``pos_mask`` / ``neg_mask`` the ``labels`` still pick each anchor's :math:`\beta`.

    Args:
      params: ``{"beta": [C]}``.
      embeddings: [B, D]; labels: [B] class indices in ``[0, C)`` (others do not count);
      key: unused; axis_name: device axis; memory: a cross-batch memory (candidates only).
      pos_mask, neg_mask: [B, M] bool relevance instead of label equality.
      margin: m.
      nu: :math:`\nu`, weight of the :math:`\beta` regulariser (0 in PML's default).

    Returns:
      ``(loss, aux)``; ``num_valid`` counts triplets.

    References:
      Wu, Manmatha, Smola, Krähenbühl. Sampling Matters in Deep Embedding Learning.
      ICCV 2017, Eq. (7).
    """
    del key
    beta = _proxies(params, "beta")
    if beta.ndim != 1:
        raise ValueError(f"`params['beta']` must be 1-D [C]; got shape {beta.shape}.")
    if labels is None:
        raise ValueError("`labels` is required by 'margin' (they index `params['beta']`).")
    pr = rel.pairs(embeddings, labels, normalize=True, axis_name=axis_name, memory=memory,
                   pos_mask=pos_mask, neg_mask=neg_mask, labels_with_masks=True)
    labels = jnp.asarray(labels)
    in_range = (labels >= 0) & (labels < beta.shape[0])
    beta_a = beta[jnp.clip(labels, 0, beta.shape[0] - 1)].astype(pr.emb.dtype)[:, None]
    pos, neg = pr.pos_mask & in_range[:, None], pr.neg_mask & in_range[:, None]
    dist = distances.euclidean_distance(pr.emb, pr.ref)
    pos_term = jax.nn.relu(dist - beta_a + margin)
    neg_term = jax.nn.relu(beta_a - dist + margin)
    num_pos = jnp.sum(pos, axis=1).astype(dist.dtype)
    num_neg = jnp.sum(neg, axis=1).astype(dist.dtype)
    total = (jnp.sum(num_neg * jnp.sum(jnp.where(pos, pos_term, 0.0), axis=1))
             + jnp.sum(num_pos * jnp.sum(jnp.where(neg, neg_term, 0.0), axis=1))
             + nu * jnp.sum(num_pos * num_neg * beta_a[:, 0]))
    divisor = (jnp.sum(num_neg * jnp.sum(pos & (pos_term > 0), axis=1))
               + jnp.sum(num_pos * jnp.sum(neg & (neg_term > 0), axis=1)))
    num_triplets = jnp.sum(num_pos * num_neg)
    # PML: no triplet at all gives 0 (its divisor would be 0 too).
    share = distances.global_mean_of(total, divisor, axis_name)
    cos = pr.emb @ pr.ref.T
    # rel.finish: NaN when any gathered or memory row is non-finite; non-finite beta too.
    share = share + jax.lax.stop_gradient(
        jnp.where(jnp.all(jnp.isfinite(beta)), 0.0, jnp.nan)).astype(share.dtype)
    aux = rel.pair_aux(share, cos, pos, neg, num_valid=num_triplets, num_active=divisor,
                       num_units=2 * num_triplets, axis_name=axis_name)
    return rel.finish(share, aux, pr)


# ------------------------------------------------------------------------ registry
# name -> (init, apply). ``get`` splits the options between them by signature.
PARAMETRIC: dict[str, tuple[Callable[..., Params], Callable[..., tuple[jax.Array, Aux]]]] = {
    "arcface": (init_proxies, arcface),
    "cosface": (init_proxies, cosface),
    "margin": (init_beta, margin),
    "norm_softmax": (init_proxies, norm_softmax),
    "proxy_anchor": (init_proxies, proxy_anchor),
    "proxy_nca": (init_proxies, proxy_nca),
    "soft_triple": (init_soft_triple, soft_triple),
    "sub_center_arcface": (init_sub_centers, sub_center_arcface),
}
_ARC_MARGIN = _checks.real(ge=0, le=math.pi / 2)   # radians
# What each option accepts (validated by ``hnm.objectives.check_options`` / ``get``).
OPTION_SPECS: dict[str, dict[str, _checks.OptionSpec]] = {
    "proxy_nca": dict(temperature=_checks.POSITIVE),
    "proxy_anchor": dict(alpha=_checks.POSITIVE, margin=_checks.NON_NEGATIVE),
    "norm_softmax": dict(temperature=_checks.POSITIVE),
    "arcface": dict(margin=_ARC_MARGIN, scale=_checks.POSITIVE),
    "cosface": dict(margin=_checks.NON_NEGATIVE, scale=_checks.POSITIVE),
    "sub_center_arcface": dict(margin=_ARC_MARGIN, scale=_checks.POSITIVE,
                               sub_centers=_checks.integer(ge=1)),
    "soft_triple": dict(centers_per_class=_checks.integer(ge=1), la=_checks.POSITIVE,
                        gamma=_checks.POSITIVE, margin=_checks.NON_NEGATIVE,
                        tau=_checks.NON_NEGATIVE),
    "margin": dict(margin=_checks.NON_NEGATIVE, nu=_checks.NON_NEGATIVE,
                   beta=_checks.POSITIVE),
}
# Call-time keywords of ``apply``, never bound as options.
CALL_TIME = ("axis_name", "memory", "pos_mask", "neg_mask")


def _keyword_defaults(fn: Callable) -> dict[str, Any]:
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in CALL_TIME}


def options(name: str) -> dict[str, Any]:
    """Options of parametric objective ``name`` (of ``init`` and ``apply``) and defaults."""
    init_fn, apply_fn = PARAMETRIC[name]
    return {**_keyword_defaults(init_fn), **_keyword_defaults(apply_fn)}


def bind(name: str, *, axis_name: str | None = None, **opts: Any) -> ParametricObjective:
    """:class:`ParametricObjective` ``name`` with ``opts`` bound (``get`` calls this).

    An option both ``init`` and ``apply`` know (``sub_centers``, ``centers_per_class``)
    goes to both, so the parameter shapes and the loss agree.
    """
    init_fn, apply_fn = PARAMETRIC[name]
    init_keys, apply_keys = _keyword_defaults(init_fn), _keyword_defaults(apply_fn)
    unknown = sorted(set(opts) - set(init_keys) - set(apply_keys))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for objective {name!r}; valid options: "
                         f"{sorted({**init_keys, **apply_keys})}.")
    init = functools.partial(init_fn, **{k: v for k, v in opts.items() if k in init_keys})
    apply = functools.partial(apply_fn, axis_name=axis_name,
                              **{k: v for k, v in opts.items() if k in apply_keys})
    return ParametricObjective(name, init, apply)


def check_arc_margin(margin_rad: float) -> None:
    """ArcFace margins are radians; a value above pi/2 is almost surely degrees."""
    if isinstance(margin_rad, (int, float)) and not 0 <= margin_rad < math.pi / 2:
        raise ValueError(f"`margin` is in radians and must lie in [0, pi/2); got "
                         f"{margin_rad!r} (PML's ArcFaceLoss takes degrees: pass "
                         "math.radians(...)).")
