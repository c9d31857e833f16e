r"""Triplet gradient geometry and collapse diagnostics (pure JAX; no matplotlib, no TF).

Two questions from the hard-negative literature, answered for any loss and any embeddings:

* **Where does a loss push a triplet?** Every triplet loss of hnm is elementwise in
  :math:`(S_{ap}, S_{an})`. :func:`loss_gradient_field` draws its gradient over that plane
  (Xuan et al. 2020, Fig. 2); :func:`triplet_on_sphere` and :func:`embedding_gradients` follow
  the gradient back to three unit embeddings and report how fast one gradient-descent step
  changes :math:`\lVert f_a - f_n\rVert` and :math:`\lVert f_a - f_p\rVert`. A negative rate for
  the anchor-negative distance means the loss pulls the negative *toward* the anchor: the
  collapse mechanism of Xuan et al. (2020, §3).
* **Has a network collapsed?** :func:`collapse_diagnostics` measures the spread of a batch of
  embeddings and its worst triplet-separation violation, the batch estimate of the distance
  :math:`d_{iso}(f, \mathcal F_{TS})` of Xu et al. (2022); :func:`loss_relative_to_collapse`
  and :func:`is_collapsed` turn them into the criterion the sweep uses.

Losses are passed in as ``loss_fn(sim_ap, sim_an) -> per-triplet loss`` (e.g.
``hnm.losses.triplet_margin_loss`` or ``functools.partial(hnm.losses.sct_loss,
hard_weight=0.5)``); this module never imports them.

References:
  Xuan, Stylianou, Liu, Pless. Hard negative examples are hard, but useful. ECCV 2020
  (arXiv 2007.12749).
  Xu, Hsieh, Vundurthy, Cohen, Choset, Li. Mathematical justification of hard negative
  mining via isometric approximation theorem. arXiv 2210.11173.
  Roy, Vetterli. The effective rank: a measure of effective dimensionality. EUSIPCO 2007.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from hnm import _checks
from hnm import distances

LossFn = Callable[[jax.Array, jax.Array], jax.Array]

LOG_2 = math.log(2.0)
# Gram determinant below -REALISABLE_TOL: the three cosines cannot be realised (float32 slack).
REALISABLE_TOL = 1e-6
# Singular values below this fraction of ||X||_F are float32 rounding of the centring.
RANK_RTOL = 1e-5
DEFAULT_DISTANCE_THRESHOLD = 0.1
COLLAPSE_KINDS = ("hinge", "soft", "sct")


# --------------------------------------------------------------------------------------------
# Gradient fields over the (S_ap, S_an) plane.
# --------------------------------------------------------------------------------------------


class LossGradients(NamedTuple):
    """Partial derivatives of a per-triplet loss, each shaped like the input grid."""
    grad_sim_ap: jax.Array  # dL/dS_ap
    grad_sim_an: jax.Array  # dL/dS_an


def _check_loss_fn(loss_fn: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable (sim_ap, sim_an) -> per-triplet loss; "
                        f"got {type(loss_fn).__name__}.")


def _grid_pair(sim_ap: ArrayLike, sim_an: ArrayLike) -> tuple[jax.Array, jax.Array]:
    sim_ap, sim_an = jnp.asarray(sim_ap), jnp.asarray(sim_an)
    _checks.check_same_shape(sim_ap, sim_an, "sim_ap", "sim_an")
    return sim_ap, sim_an


def _scalar_loss(loss_fn: LossFn) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``loss_fn`` on one triplet, fed as shape-[1] arrays (losses may check for rank >= 1)."""
    def one(s_ap: jax.Array, s_an: jax.Array) -> jax.Array:
        out = jnp.asarray(loss_fn(s_ap[None], s_an[None]))
        if out.size != 1:
            raise ValueError("`loss_fn` must be elementwise: one loss per (sim_ap, sim_an) "
                             f"pair; for one pair of shape [1] it returned shape {out.shape}.")
        return jnp.sum(out)
    return one


def loss_gradient_field(loss_fn: LossFn, sim_ap: ArrayLike, sim_an: ArrayLike) -> LossGradients:
    r"""Gradient of an elementwise triplet loss at every point of a similarity grid.

    .. math:: \Big(\frac{\partial \ell}{\partial S_{ap}},\;
              \frac{\partial \ell}{\partial S_{an}}\Big)(S_{ap}, S_{an})

    Computed with ``jax.grad`` of ``loss_fn`` on one triplet, ``vmap``-ed over the flattened
    grid, so whatever the loss does (kinks, ``stop_gradient`` in SCT's hard branch) is what
    is drawn; nothing is differentiated by hand. Gradient descent moves a triplet along
    :math:`-\nabla\ell`; Xuan et al. (2020, Fig. 2) draw exactly that field.

    Args:
      loss_fn: elementwise ``loss_fn(sim_ap, sim_an) -> per-triplet loss``, e.g.
        ``hnm.losses.triplet_margin_loss``; bind hyperparameters with ``functools.partial``.
      sim_ap: anchor-positive similarities, any shape (e.g. a ``jnp.meshgrid`` output).
      sim_an: anchor-negative similarities, the same shape as ``sim_ap``.

    Returns:
      ``LossGradients(grad_sim_ap, grad_sim_an)``, each shaped like ``sim_ap``.

    Raises:
      TypeError: ``loss_fn`` is not callable, or the similarities are not floating.
      ValueError: the shapes differ, or ``loss_fn`` is not elementwise.

    Examples:
      >>> hinge = lambda s_ap, s_an: jax.nn.relu(s_an - s_ap + 0.2)
      >>> g = loss_gradient_field(hinge, jnp.array([0.5, 0.5]), jnp.array([0.6, 0.0]))
      >>> g.grad_sim_an.tolist()   # active (S_an > S_ap - m), then inactive
      [1.0, 0.0]

    References:
      Xuan et al., Hard negative examples are hard, but useful, ECCV 2020, §3 and Fig. 2.
    """
    _check_loss_fn(loss_fn)
    sim_ap, sim_an = _grid_pair(sim_ap, sim_an)
    grad_fn = jax.vmap(jax.grad(_scalar_loss(loss_fn), argnums=(0, 1)))
    g_ap, g_an = grad_fn(sim_ap.ravel(), sim_an.ravel())
    return LossGradients(g_ap.reshape(sim_ap.shape), g_an.reshape(sim_an.shape))


# --------------------------------------------------------------------------------------------
# From the plane back to unit embeddings.
# --------------------------------------------------------------------------------------------


class SphereTriplet(NamedTuple):
    """Unit anchor, positive and negative vectors realising given cosines."""
    anchor: jax.Array    # [..., dim]
    positive: jax.Array  # [..., dim]
    negative: jax.Array  # [..., dim]
    valid: jax.Array     # [...] bool: the requested cosines are realisable


def _check_dim(dim: Any, minimum: int) -> None:
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < minimum:
        raise ValueError(f"`dim` must be an int >= {minimum} here; got {dim!r}.")


def triplet_on_sphere(sim_ap: ArrayLike, sim_an: ArrayLike, dim: int = 3, *,
                      sim_pn: ArrayLike | None = None) -> SphereTriplet:
    r"""Unit vectors :math:`f_a, f_p, f_n \in \mathbb R^{dim}` with prescribed cosines.

    With :math:`\theta_p = \arccos S_{ap}`, :math:`\theta_n = \arccos S_{an}`:

    .. math::
        f_a = e_1,\quad f_p = \cos\theta_p\, e_1 + \sin\theta_p\, e_2,\quad
        f_n = \cos\theta_n\, e_1 + u\, e_2 + w\, e_3,

    :math:`u = (S_{pn} - S_{ap} S_{an}) / \sin\theta_p`,
    :math:`w = \sqrt{1 - S_{an}^2 - u^2}`. By default (``sim_pn=None``) the three lie in one
    plane with the negative on the positive's side (:math:`u = \sin\theta_n`, :math:`w = 0`),
    i.e. :math:`S_{pn} = \cos(\theta_p - \theta_n)`, the largest value the cosines allow: the
    positive as close to the negative as it can be, the configuration of a hard triplet in
    Xuan et al.'s argument. Every point of :math:`[-1, 1]^2` is realisable that way.

    **Outside the realisable set** no error is raised (the function is jit-able and meant for
    grids): a cell is realisable iff both cosines (and ``sim_pn``) lie in [-1, 1] and the Gram
    determinant :math:`1 - S_{ap}^2 - S_{an}^2 - S_{pn}^2 + 2 S_{ap} S_{an} S_{pn} \ge 0`
    (tolerance ``REALISABLE_TOL``). Elsewhere ``valid`` is False and the vectors are those of
    the clipped cosines: unit-norm, finite, and not to be interpreted.

    Args:
      sim_ap: cosines :math:`S_{ap}`, any shape.
      sim_an: cosines :math:`S_{an}`, the shape of ``sim_ap``.
      dim: ambient dimension; >= 2 by default, >= 3 when ``sim_pn`` is given.
      sim_pn: optional positive-negative cosines, the shape of ``sim_ap``.

    Returns:
      ``SphereTriplet(anchor, positive, negative, valid)``; vectors ``[..., dim]``.

    Raises:
      ValueError: ``dim`` too small, or the shapes differ.
      TypeError: non-floating cosines.

    Examples:
      >>> t = triplet_on_sphere(jnp.array(0.0), jnp.array(1.0), dim=2)
      >>> t.positive.tolist(), t.negative.tolist()
      ([0.0, 1.0], [1.0, 0.0])
    """
    sim_ap, sim_an = _grid_pair(sim_ap, sim_an)
    _check_dim(dim, 2 if sim_pn is None else 3)
    in_range = (jnp.abs(sim_ap) <= 1.0) & (jnp.abs(sim_an) <= 1.0)
    s_ap, s_an = jnp.clip(sim_ap, -1.0, 1.0), jnp.clip(sim_an, -1.0, 1.0)
    sin_p = jnp.sqrt(jnp.maximum(1.0 - s_ap ** 2, 0.0))
    sin_n = jnp.sqrt(jnp.maximum(1.0 - s_an ** 2, 0.0))
    if sim_pn is None:
        u, w2 = sin_n, jnp.zeros_like(s_an)
    else:
        sim_pn = jnp.asarray(sim_pn)
        _checks.check_same_shape(sim_ap, sim_pn, "sim_ap", "sim_pn")
        in_range &= jnp.abs(sim_pn) <= 1.0
        # Double-where: p = +-a has no e_2 component, and then u must be 0 (det = -(..)^2).
        safe_sin_p = jnp.where(sin_p > 0.0, sin_p, 1.0)
        u = jnp.where(sin_p > 0.0, (sim_pn - s_ap * s_an) / safe_sin_p, 0.0)
        # det(Gram) = sin_p^2 * (1 - s_an^2 - u^2); w2 is its sign carrier when sin_p > 0.
        det = (1.0 - s_ap ** 2 - s_an ** 2 - sim_pn ** 2 + 2.0 * s_ap * s_an * sim_pn)
        in_range &= det >= -REALISABLE_TOL
        u = jnp.clip(u, -sin_n, sin_n)  # keep f_n unit-norm in unrealisable cells
        w2 = 1.0 - s_an ** 2 - u ** 2
    w = jnp.sqrt(jnp.maximum(w2, 0.0))
    zeros, ones = jnp.zeros_like(s_ap), jnp.ones_like(s_ap)
    pad = [zeros] * (dim - 3)
    third = [] if dim == 2 else [zeros]
    anchor = jnp.stack([ones, zeros] + third + pad, axis=-1)
    positive = jnp.stack([s_ap, sin_p] + third + pad, axis=-1)
    negative = jnp.stack([s_an, u] + ([] if dim == 2 else [w]) + pad, axis=-1)
    return SphereTriplet(anchor, positive, negative, in_range)


class EmbeddingGradients(NamedTuple):
    """Loss gradients on three unit embeddings and the distance rates they cause."""
    grad_anchor: jax.Array    # [..., dim], tangent to the sphere at f_a
    grad_positive: jax.Array  # [..., dim]
    grad_negative: jax.Array  # [..., dim]
    rate_an: jax.Array        # [...] d||f_a - f_n|| / d(eta); > 0: the negative is pushed away
    rate_ap: jax.Array        # [...] d||f_a - f_p|| / d(eta); < 0: the positive is pulled in
    valid: jax.Array          # [...] bool, from triplet_on_sphere


def _tangent(g: jax.Array, x: jax.Array) -> jax.Array:
    """Projects ``g`` onto the tangent space of the unit sphere at ``x``: (I - x x^T) g."""
    return g - jnp.dot(g, x) * x


def _distance(x: jax.Array, y: jax.Array) -> jax.Array:
    return distances.safe_sqrt(jnp.sum((x - y) ** 2))


def _one_triplet_gradients(loss_fn: LossFn):
    scalar_loss = _scalar_loss(loss_fn)

    def loss_on_vectors(a, p, n):
        # The loss sees normalised vectors, as a network with an L2-normalised head does.
        a, p, n = (distances.l2_normalize(v) for v in (a, p, n))
        return scalar_loss(jnp.dot(a, p), jnp.dot(a, n))

    def one(a, p, n):
        g_a, g_p, g_n = jax.grad(loss_on_vectors, argnums=(0, 1, 2))(a, p, n)
        # Already tangent through the normaliser; the projection removes rounding and says so.
        g_a, g_p, g_n = _tangent(g_a, a), _tangent(g_p, p), _tangent(g_n, n)
        # One step x <- x - eta * g of all three; first order in eta (renormalising after the
        # step changes the distances only at second order, since g is tangent).
        _, rate_an = jax.jvp(_distance, (a, n), (-g_a, -g_n))
        _, rate_ap = jax.jvp(_distance, (a, p), (-g_a, -g_p))
        return g_a, g_p, g_n, rate_an, rate_ap

    return one


def embedding_gradients(loss_fn: LossFn, sim_ap: ArrayLike, sim_an: ArrayLike,
                        dim: int = 3, *, sim_pn: ArrayLike | None = None
                        ) -> EmbeddingGradients:
    r"""Loss gradients on the unit embeddings of a triplet and the distance changes they cause.

    The triplet is :func:`triplet_on_sphere` (by default coplanar, the negative on the
    positive's side). The loss is evaluated on normalised vectors,
    :math:`\ell(\hat f_a\cdot\hat f_p,\ \hat f_a\cdot\hat f_n)`, differentiated by autodiff and
    projected onto the tangent space of the sphere. The rates are the first-order change of
    the distances under one gradient-descent step :math:`f \leftarrow f - \eta g` of all three
    embeddings, :math:`\rho_{an} = \frac{d}{d\eta}\lVert f_a - f_n\rVert\big|_{\eta=0}`.

    **Closed form** (what the tests check). Write :math:`L_p = \partial\ell/\partial S_{ap}`,
    :math:`L_n = \partial\ell/\partial S_{an}`. Since
    :math:`\nabla_{f_a}(\hat f_a\cdot\hat f_p) = (I - f_a f_a^\top) f_p = f_p - S_{ap} f_a`
    on the sphere,

    .. math::
        g_a = L_p (f_p - S_{ap} f_a) + L_n (f_n - S_{an} f_a),\quad
        g_p = L_p (f_a - S_{ap} f_p),\quad g_n = L_n (f_a - S_{an} f_n).

    With :math:`\rho_{an} = -(f_a - f_n)\cdot(g_a - g_n) / d_{an}`,
    :math:`(f_a - f_n)\cdot(f_p - S_{ap} f_a) = S_{ap} S_{an} - S_{pn}` and
    :math:`(f_a - f_n)\cdot(f_n - f_a) = -d_{an}^2`, where
    :math:`d_{an} = \sqrt{2 - 2 S_{an}}`:

    .. math::
        \rho_{an} = L_n (1 + S_{an})\, d_{an} + L_p \frac{S_{pn} - S_{ap} S_{an}}{d_{an}},
        \qquad
        \rho_{ap} = L_p (1 + S_{ap})\, d_{ap} + L_n \frac{S_{pn} - S_{ap} S_{an}}{d_{ap}}.

    The first term of :math:`\rho_{an}` pushes the negative away whenever :math:`L_n > 0`.
    The second is the anchor being pulled toward the positive (:math:`L_p < 0`); in the
    default layout :math:`S_{pn} - S_{ap}S_{an} = \sin\theta_p\sin\theta_n \ge 0`, so it pulls
    the anchor toward the negative too. For the hinge (:math:`L_p = -1, L_n = 1`) the
    distance shrinks when :math:`\sin\theta_p > 2\sin\theta_n`, i.e. for hard negatives much
    closer than the positive: the collapse mechanism of Xuan et al. (2020, §3). SCT's hard
    branch has :math:`L_p = 0`, hence :math:`\rho_{an} = \lambda (1 + S_{an}) d_{an} > 0`.
    At :math:`d = 0` the rate is reported as 0.

    Args:
      loss_fn: elementwise ``loss_fn(sim_ap, sim_an) -> per-triplet loss``.
      sim_ap: cosines :math:`S_{ap}`, any shape.
      sim_an: cosines :math:`S_{an}`, the shape of ``sim_ap``.
      dim: embedding dimension (>= 2; >= 3 with ``sim_pn``).
      sim_pn: optional :math:`S_{pn}`; default: the coplanar layout of
        :func:`triplet_on_sphere`.

    Returns:
      ``EmbeddingGradients(grad_anchor, grad_positive, grad_negative, rate_an, rate_ap,
      valid)``; gradients ``[..., dim]``, rates and ``valid`` shaped like ``sim_ap``.
      Unrealisable cells (``valid`` False) hold zeros.

    Raises:
      TypeError, ValueError: as :func:`loss_gradient_field` and :func:`triplet_on_sphere`.

    Examples:
      >>> hinge = lambda s_ap, s_an: jax.nn.relu(s_an - s_ap + 0.2)
      >>> r = embedding_gradients(hinge, jnp.array([0.0]), jnp.array([0.9]))
      >>> bool(r.rate_an[0] < 0)   # the hard negative gets closer to the anchor
      True

    References:
      Xuan et al., Hard negative examples are hard, but useful, ECCV 2020, §3.
    """
    _check_loss_fn(loss_fn)
    t = triplet_on_sphere(sim_ap, sim_an, dim, sim_pn=sim_pn)
    shape = t.valid.shape
    flat = [x.reshape(-1, dim) for x in (t.anchor, t.positive, t.negative)]
    g_a, g_p, g_n, rate_an, rate_ap = jax.vmap(_one_triplet_gradients(loss_fn))(*flat)
    valid = t.valid.reshape(-1)
    keep_vec = lambda g: jnp.where(valid[:, None], g, 0.0).reshape(shape + (dim,))
    keep = lambda r: jnp.where(valid, r, 0.0).reshape(shape)
    return EmbeddingGradients(keep_vec(g_a), keep_vec(g_p), keep_vec(g_n),
                              keep(rate_an), keep(rate_ap), t.valid)


# --------------------------------------------------------------------------------------------
# Collapse and triplet-separation diagnostics.
# --------------------------------------------------------------------------------------------


def _row_stats(x_centred, sq_norms, x_unit, labels, idx, start, margin):
    """Per-anchor statistics of the rows ``idx`` [B] against all N rows: O(B N) memory."""
    n = x_centred.shape[0]
    rows = jnp.minimum(idx, n - 1)  # padded rows (idx >= n) read row n-1 and are masked out
    d2 = sq_norms[rows][:, None] + sq_norms[None, :] - 2.0 * (x_centred[rows] @ x_centred.T)
    dist = distances.safe_sqrt(jnp.maximum(d2, 0.0))
    cos = x_unit[rows] @ x_unit.T
    pos_mask, neg_mask = distances.label_masks(labels[rows], labels, query_offset=start)
    other = idx[:, None] != jnp.arange(n)[None, :]
    has_pos, has_neg = pos_mask.any(axis=1), neg_mask.any(axis=1)
    anchor_ok = has_pos & has_neg
    # Empty rows give +-inf here; they are replaced (not multiplied) before any arithmetic.
    far_pos = jnp.max(jnp.where(pos_mask, dist, -jnp.inf), axis=1)
    near_neg = jnp.min(jnp.where(neg_mask, dist, jnp.inf), axis=1)
    gap = jnp.where(anchor_ok, far_pos, 0.0) - jnp.where(anchor_ok, near_neg, 0.0)
    violation = jnp.where(anchor_ok, jax.nn.relu(gap + margin), 0.0)
    easy_pos = jnp.max(jnp.where(pos_mask, cos, -jnp.inf), axis=1)
    hard_neg = jnp.max(jnp.where(neg_mask, cos, -jnp.inf), axis=1)
    return dict(
        sum_dist=jnp.sum(jnp.where(other, dist, 0.0), axis=1),
        min_dist=jnp.min(jnp.where(other, dist, jnp.inf), axis=1),
        sum_cos=jnp.sum(jnp.where(other, cos, 0.0), axis=1),
        violation=violation,
        anchor_ok=anchor_ok,
        hard=anchor_ok & (hard_neg > easy_pos),
    )


def _effective_rank(x_centred: jax.Array) -> jax.Array:
    sv = jnp.linalg.svd(x_centred, compute_uv=False)
    # Centring identical rows leaves float rounding, not spread: call that zero.
    sv = jnp.where(sv > RANK_RTOL * jnp.sqrt(jnp.sum(x_centred ** 2) + 1.0), sv, 0.0)
    total = jnp.sum(sv)
    p = sv / jnp.where(total > 0.0, total, 1.0)
    entropy = -jnp.sum(jnp.where(p > 0.0, p * jnp.log(jnp.where(p > 0.0, p, 1.0)), 0.0))
    return jnp.where(total > 0.0, jnp.exp(entropy), 0.0)


def collapse_diagnostics(embeddings: ArrayLike, labels: ArrayLike, margin: ArrayLike = 0.2, *,
                         block_size: int | None = None, normalize: bool = True
                         ) -> dict[str, jax.Array]:
    r"""Spread, collapse and triplet-separation measures of one batch of embeddings.

    Let :math:`x_i` be the embeddings, L2-normalised first when ``normalize`` (the default:
    hnm's objectives compare normalised embeddings and ``margin`` is in those units), and
    :math:`D_{ij} = \lVert x_i - x_j\rVert`. Pairs are distinct, :math:`i \ne j`. An anchor
    is *valid* when it has a positive (same label, not itself) and a negative.

    * ``mean_distance``, ``min_distance``: mean and min of :math:`D_{ij}` over pairs.
    * ``one_minus_mean_cosine``: :math:`1 - \operatorname{mean}_{i\ne j}\hat x_i\cdot\hat x_j`
      (always on normalised vectors).
    * ``cov_trace``: :math:`\frac1N\sum_i\lVert x_i - \bar x\rVert^2` (population covariance).
    * ``effective_rank``: :math:`\exp(-\sum_k p_k\log p_k)`, :math:`p_k = \sigma_k/\sum\sigma`,
      the singular values of the **centred** matrix :math:`X - \bar x` (Roy & Vetterli 2007).
      It measures the shape of the spread, not its size. Conventions: a set without spread
      (all rows equal; singular values below ``RANK_RTOL`` :math:`\lVert X\rVert_F` count
      as 0) has effective rank **0**; :math:`n` orthonormal vectors have **n - 1** (centring
      removes their mean direction); the symmetric set :math:`\{\pm e_1,\dots,\pm e_n\}` has
      exactly **n**.
    * ``frac_hard``: fraction of valid anchors whose hardest negative (largest cosine) is
      strictly more similar than their easiest positive (largest cosine): the ``hn_ratio``
      of easy-positive/hard-negative mining (no near-duplicate cut).
    * ``separation_violation_max`` / ``_mean``: per valid anchor

      .. math:: v_i = \big[\max_{p} D_{ip} - \min_{n} D_{in} + \alpha\big]_+ ,

      then the max and the mean over valid anchors (0 if there is none). :math:`v_i = 0` for
      every anchor iff the batch is *triplet-separated* with margin :math:`\alpha`. Xu et al.
      (2022) show that hard-negative triplet training minimises a Hausdorff-like distance
      :math:`d_{iso}(f, \mathcal F_{TS})` between the network and the set of
      triplet-separated functions, controlled (isometric approximation theorem) by the
      *worst-case* violation; their estimator is not public, so ``_max`` (the sup over the
      batch) is hnm's batch estimate of it and ``_mean`` its smooth companion. ``_mean``
      equals the batch-hard hinge loss (mean over valid anchors) on these distances.
    * ``num_valid_anchors``: the count those anchor averages use.

    Memory is O(N^2) (O(``block_size`` N) when blocked: anchors are processed in blocks with
    ``lax.map``) plus an [N, D] SVD. Jit with ``block_size`` and ``normalize`` static;
    ``margin`` may be traced. ``mean_distance`` and the separation violations are
    differentiable (almost everywhere; zero distances get gradient 0).

    Args:
      embeddings: [N, D] floating, N >= 2.
      labels: [N] integer class labels.
      margin: :math:`\alpha`, in distance units of the (normalised) embeddings.
      block_size: anchors per block; None computes all N rows at once.
      normalize: L2-normalise the embeddings before measuring distances and spread.

    Returns:
      A dict of scalar arrays with the keys above.

    Raises:
      ValueError: wrong shapes, N < 2 or a bad ``block_size``.
      TypeError: non-floating embeddings or non-integer labels.

    Examples:
      >>> emb = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
      >>> d = collapse_diagnostics(emb, jnp.array([0, 0, 1, 1]))
      >>> float(d["separation_violation_max"]), float(d["min_distance"])
      (0.0, 0.0)

    References:
      Xu et al., Mathematical justification of hard negative mining via isometric
      approximation theorem, arXiv 2210.11173. Roy & Vetterli, The effective rank, 2007.
      Xuan et al., ECCV 2020 (``hn_ratio``).
    """
    embeddings, labels = jnp.asarray(embeddings), jnp.asarray(labels)
    _checks.check_embeddings_and_labels(embeddings, labels)
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError(f"`embeddings` needs at least 2 rows to have pairs; got shape "
                         f"{embeddings.shape}.")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"`block_size` must be None or a positive int; got {block_size!r}.")
    x_unit = distances.l2_normalize(embeddings)
    x = x_unit if normalize else embeddings
    # Distances are translation invariant; centring first keeps the expanded form
    # |x|^2 + |y|^2 - 2 x.y accurate for a nearly collapsed set (no cancellation of ~1s).
    x_centred = x - jnp.mean(x, axis=0, keepdims=True)
    sq_norms = jnp.sum(x_centred ** 2, axis=1)
    margin = jnp.asarray(margin, x.dtype)

    block = n if block_size is None else min(block_size, n)
    num_blocks = -(-n // block)
    if num_blocks == 1:
        stats = _row_stats(x_centred, sq_norms, x_unit, labels, jnp.arange(n), 0, margin)
    else:
        idx = jnp.arange(num_blocks * block).reshape(num_blocks, block)
        stats = jax.lax.map(
            lambda i: _row_stats(x_centred, sq_norms, x_unit, labels, i, i[0], margin), idx)
        stats = {k: v.reshape(-1)[:n] for k, v in stats.items()}  # drop the padded rows

    num_pairs = n * (n - 1)
    num_valid = jnp.sum(stats["anchor_ok"])
    denom = jnp.maximum(num_valid, 1).astype(x.dtype)
    return dict(
        mean_distance=jnp.sum(stats["sum_dist"]) / num_pairs,
        min_distance=jnp.min(stats["min_dist"]),
        one_minus_mean_cosine=1.0 - jnp.sum(stats["sum_cos"]) / num_pairs,
        cov_trace=jnp.sum(sq_norms) / n,
        effective_rank=_effective_rank(x_centred),
        frac_hard=jnp.sum(stats["hard"]) / denom,
        separation_violation_max=jnp.max(stats["violation"]),
        separation_violation_mean=jnp.sum(stats["violation"]) / denom,
        num_valid_anchors=num_valid,
    )


def loss_collapse_value(kind: str = "hinge", margin: float = 0.2, temperature: float = 0.1,
                        hard_weight: float = 1.0) -> float:
    r"""The per-triplet loss of a collapsed network, where :math:`S_{ap} = S_{an} = 1`.

    ``"hinge"``: :math:`[S_{an} - S_{ap} + m]_+ = m`. ``"soft"``:
    :math:`\operatorname{softplus}((S_{an} - S_{ap})/T) = \log 2` for every temperature
    :math:`T > 0` (``temperature`` is validated, it does not change the value). ``"sct"``
    (``hard_rule="or"``): :math:`S_{an} = 1 > 0.8` makes every triplet hard, loss
    :math:`\lambda S_{an} = \lambda` (``hard_weight``). With ``hard_rule="and"`` exact
    collapse puts triplets in neither set (loss 0), so there is no collapse value.

    Raises:
      ValueError: unknown ``kind``, or a non-positive margin, temperature or hard weight.
    """
    if kind not in COLLAPSE_KINDS:
        raise ValueError(f"unknown `kind`={kind!r}; expected one of {COLLAPSE_KINDS}.")
    name, value = {"hinge": ("margin", margin), "soft": ("temperature", temperature),
                   "sct": ("hard_weight", hard_weight)}[kind]
    if not float(value) > 0.0:
        raise ValueError(f"`{name}` must be > 0 for kind={kind!r}; got {value!r}.")
    return {"hinge": float(margin), "soft": LOG_2, "sct": float(hard_weight)}[kind]


def loss_relative_to_collapse(loss: ArrayLike, kind: str = "hinge", margin: float = 0.2,
                              temperature: float = 0.1, hard_weight: float = 1.0) -> jax.Array:
    r"""The loss divided by its value at collapse: :math:`\ell / \ell_{collapse}`.

    .. math:: \ell_{collapse} = m \text{ (hinge)},\quad \log 2 \text{ (soft: }
              \operatorname{softplus}(0/T)\text{, any } T),\quad \lambda \text{ (sct)}.

    A ratio stuck near 1 is the "loss stuck at the margin" signature of collapse (Xu et al.
    2022). It is also ~1 at a random initialisation in high dimension (:math:`S_{ap} \approx
    S_{an} \approx 0`), so it is a symptom, not a proof; see :func:`is_collapsed`.

    Args:
      loss: mean per-triplet loss, any shape.
      kind: ``"hinge"``, ``"soft"`` or ``"sct"``; see :func:`loss_collapse_value`.
      margin: m of the hinge. temperature: T of the soft form. hard_weight: SCT's lambda.

    Returns:
      ``loss / loss_collapse_value(...)``, shaped like ``loss``.

    Examples:
      >>> float(loss_relative_to_collapse(0.1, "hinge", margin=0.2))
      0.5
    """
    return jnp.asarray(loss) / loss_collapse_value(kind, margin, temperature, hard_weight)


def is_collapsed(diag: dict[str, ArrayLike], *,
                 distance_threshold: float = DEFAULT_DISTANCE_THRESHOLD,
                 max_effective_rank: float | None = None,
                 loss_ratio: ArrayLike | None = None,
                 loss_ratio_tol: float = 0.05) -> jax.Array:
    r"""The collapse criterion of hnm's sweeps, from :func:`collapse_diagnostics` output.

    .. math:: \text{collapsed} \iff \operatorname{mean}_{i\ne j} D_{ij} < \delta
              \ \big[\ \vee\ \text{erank} \le r\ \big]
              \ \big[\ \vee\ |\ell/\ell_{collapse} - 1| \le \epsilon\ \big]

    By default only the distance test is used (:math:`\delta = 0.1` on normalised
    embeddings, i.e. mean cosine above about 0.995; random unit vectors have mean distance
    about :math:`\sqrt2`). It is scale-based and reproducible. The bracketed tests are
    opt-in: the effective rank of a centred, nearly collapsed set measures the shape of
    float noise, and the loss ratio is also ~1 at a random initialisation.

    Args:
      diag: a dict with ``mean_distance`` (and ``effective_rank`` if used).
      distance_threshold: :math:`\delta`.
      max_effective_rank: :math:`r`; None disables the rank test.
      loss_ratio: :func:`loss_relative_to_collapse` output; None disables the loss test.
      loss_ratio_tol: :math:`\epsilon`.

    Returns:
      A bool array (scalar for scalar diagnostics).

    Raises:
      ValueError: a needed key is missing from ``diag``.
    """
    needed = ["mean_distance"] + (["effective_rank"] if max_effective_rank is not None else [])
    missing = [k for k in needed if k not in diag]
    if missing:
        raise ValueError(f"`diag` lacks {missing}; pass collapse_diagnostics(...) output.")
    collapsed = jnp.asarray(diag["mean_distance"]) < distance_threshold
    if max_effective_rank is not None:
        collapsed |= jnp.asarray(diag["effective_rank"]) <= max_effective_rank
    if loss_ratio is not None:
        collapsed |= jnp.abs(jnp.asarray(loss_ratio) - 1.0) <= loss_ratio_tol
    return collapsed
