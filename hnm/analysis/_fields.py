r"""Triplet gradient geometry over the (S_ap, S_an) plane and on the unit sphere.

Every triplet loss of hnm is elementwise in :math:`(S_{ap}, S_{an})`. This module draws its
gradient over that plane (:func:`loss_gradient_field`), follows the gradient back to three
unit embeddings (:func:`triplet_on_sphere`, :func:`embedding_gradients`: first-order distance
rates) and reproduces the finite-step simulation of the official notebook of Xuan et al.
(:func:`one_step_similarity_change`).

References:
  Xuan, Stylianou, Liu, Pless. Hard negative examples are hard, but useful. ECCV 2020
  (arXiv 2007.12749); official notebook ``triplet_gradient_simulation.ipynb`` in
  littleredxh/HardNegative.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from hnm import _checks
from hnm import distances

LossFn = Callable[[jax.Array, jax.Array], jax.Array]

# Gram determinant below -REALISABLE_TOL: the three cosines cannot be realised (float32 slack).
REALISABLE_TOL = 1e-6


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
    :math:`-\nabla\ell`. This is hnm's own picture of the loss on the plane, **not** the
    figure of Xuan et al.: their figure (the official notebook) draws the *change* of
    :math:`(S_{ap}, S_{an})` after one finite SGD step on the three embeddings, with
    re-normalisation and an entanglement term; that is :func:`one_step_similarity_change`.

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
      Xuan et al., Hard negative examples are hard, but useful, ECCV 2020, §3 (the loss as a
      function of the two similarities; the field itself is hnm's).
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
# The official notebook's finite-step simulation.
# --------------------------------------------------------------------------------------------

FORMS = ("cosine", "squared_euclidean")


class SimilarityChange(NamedTuple):
    """Change of the two similarities after one SGD step, each shaped like ``sim_ap``."""
    delta_ap: jax.Array  # Delta S_ap (with entanglement)
    delta_an: jax.Array  # Delta S_an (with entanglement)


def _notebook_triplet(s_ap: jax.Array, s_an: jax.Array, projection: jax.Array):
    """Unit f_a, f_p, f_n in R^3 with cosines (s_ap, s_an) and the notebook's S_pn."""
    p_vert = jnp.sqrt(jnp.maximum(1.0 - s_ap ** 2, 0.0))
    n_vert = jnp.sqrt(jnp.maximum(1.0 - s_an ** 2, 0.0))
    ortho = jnp.sqrt(jnp.maximum(1.0 - projection ** 2, 0.0))
    zero, one = jnp.zeros_like(s_ap), jnp.ones_like(s_ap)
    a = jnp.stack([one, zero, zero])
    p = jnp.stack([s_ap, p_vert, zero])
    n = jnp.stack([s_an, projection * n_vert, ortho * n_vert])
    return a, p, n


def one_step_similarity_change(loss_fn: LossFn, sim_ap: ArrayLike, sim_an: ArrayLike, *,
                               learning_rate: ArrayLike = 0.1, projection: ArrayLike = 0.0,
                               entanglement: ArrayLike = 0.5, form: str = "cosine"
                               ) -> SimilarityChange:
    r"""How one SGD step on (f_a, f_p, f_n) moves (S_ap, S_an): the official notebook's figure.

    This is the simulation of ``triplet_gradient_simulation.ipynb`` (littleredxh/HardNegative,
    functions ``Triplet_Map_1st`` and ``Triplet_Map_std``), the figure Xuan et al. (ECCV 2020,
    §3) use to explain collapse, computed here by autodiff for any loss:

    1. **Place the triplet.** Unit vectors in :math:`\mathbb R^3`: :math:`f_a = e_1`,
       :math:`f_p = S_{ap} e_1 + \sqrt{1 - S_{ap}^2}\, e_2`,
       :math:`f_n = S_{an} e_1 + \sqrt{1 - S_{an}^2}\,(c\, e_2 + \sqrt{1 - c^2}\, e_3)` with
       :math:`c` = ``projection``. So :math:`S_{pn} = S_{ap}S_{an} + c\sqrt{1-S_{ap}^2}
       \sqrt{1-S_{an}^2}`, the notebook's ``S_pn``: ``projection=1`` puts p and n in one
       plane with a, on the same side; ``projection=0`` makes their components orthogonal to
       a orthogonal to each other.
    2. **One SGD step** of ``learning_rate`` :math:`\eta` on all three vectors,
       :math:`f \leftarrow f - \eta\,\nabla_f \ell`, with the gradient taken through the
       similarities as functions of the *unnormalised* vectors (as the notebook does):
       ``form="cosine"``: :math:`s_{ap} = f_a\cdot f_p`, :math:`s_{an} = f_a\cdot f_n`;
       ``form="squared_euclidean"``: :math:`s_{ap} = -\lVert f_a - f_p\rVert^2`,
       :math:`s_{an} = -\lVert f_a - f_n\rVert^2` (hnm's "larger is closer" convention).
    3. **Re-normalise** the three vectors, take the new cosines minus the old:
       :math:`\Delta S_{ap}, \Delta S_{an}`.
    4. **Entanglement** (the notebook's stand-in for the other triplets sharing the network):
       with :math:`m = p\, S_{ap} S_{an}` (``entanglement`` :math:`p`), both from the
       uncoupled values, :math:`\Delta S_{ap} \mathrel{+}= m\,\Delta S_{an}` and
       :math:`\Delta S_{an} \mathrel{+}= m\,\Delta S_{ap}`.

    Correspondence with the notebook (tested against a float64 transcription of it):
    ``Triplet_Map_1st(projection, entanglement, lr)`` is ``loss_fn = softplus(s_an - s_ap)``
    (NCA with temperature 1; its ``beta`` is :math:`\eta\,\sigma(S_{an} - S_{ap})`), and
    ``Triplet_Map_std`` is ``loss_fn = s_an - s_ap`` with ``form="squared_euclidean"``,
    i.e. :math:`\lVert f_a-f_p\rVert^2 - \lVert f_a-f_n\rVert^2` (its ``beta`` is
    :math:`2\eta`). The two agree exactly for ``projection`` in {0, 1}, the only values the
    notebook uses; for values in between, the notebook's ``fa_norm`` expression is not the norm
    of the stepped anchor (it weights :math:`(1 - c^2)` twice), while this function always uses
    the true vectors. The notebook's grid is ``S_ap = linspace(0, 1, N)`` along columns and
    ``S_an = linspace(1, 0, N)`` along rows; pass any grid you like.

    In the limit :math:`\eta \to 0` with no entanglement, :math:`\Delta S_{an}/\eta \to
    -d_{an}\,\rho_{an}` with :math:`\rho_{an}` the distance rate of
    :func:`embedding_gradients` (the gradient's radial part only rescales the vectors, which
    the re-normalisation undoes at first order). A *hard* triplet (:math:`S_{an} > S_{ap}`)
    with :math:`\Delta S_{an} > 0` is one whose negative is pulled *toward* the anchor: the
    collapse mechanism.

    Args:
      loss_fn: elementwise ``loss_fn(sim_ap, sim_an) -> per-triplet loss`` (shape-[1] calls).
      sim_ap: cosines :math:`S_{ap}` in [-1, 1], any shape.
      sim_an: cosines :math:`S_{an}`, the shape of ``sim_ap``.
      learning_rate: :math:`\eta` (the notebook's ``lr``, 0.1 in its figures).
      projection: :math:`c` in [0, 1] (the notebook uses 0 and 1; its default is 0).
      entanglement: :math:`p` (the notebook's figures use 0.5).
      form: ``"cosine"`` or ``"squared_euclidean"``.

    Returns:
      ``SimilarityChange(delta_ap, delta_an)``, each shaped like ``sim_ap``.

    Raises:
      TypeError: ``loss_fn`` is not callable.
      ValueError: the shapes differ, ``form`` is unknown, or a static ``projection`` is
        outside [0, 1].

    Examples:
      >>> lin = lambda s_ap, s_an: s_an - s_ap
      >>> d = one_step_similarity_change(lin, jnp.array([0.0]), jnp.array([0.0]),
      ...                                learning_rate=0.1, entanglement=0.0)
      >>> [round(float(d.delta_ap[0]), 4), round(float(d.delta_an[0]), 4)]
      [0.197, -0.197]

    References:
      Xuan, Stylianou, Liu, Pless. Hard negative examples are hard, but useful. ECCV 2020,
      §3; official notebook ``triplet_gradient_simulation.ipynb`` (littleredxh/HardNegative).
    """
    _check_loss_fn(loss_fn)
    if form not in FORMS:
        raise ValueError(f"unknown `form`={form!r}; expected one of {FORMS}.")
    if isinstance(projection, (int, float)) and not 0.0 <= projection <= 1.0:
        raise ValueError(f"`projection` must lie in [0, 1]; got {projection!r}.")
    sim_ap, sim_an = _grid_pair(sim_ap, sim_an)
    if not jnp.issubdtype(sim_ap.dtype, jnp.floating):
        raise TypeError(f"`sim_ap` must be floating; got {sim_ap.dtype}.")
    scalar_loss = _scalar_loss(loss_fn)
    dtype = sim_ap.dtype
    lr = jnp.asarray(learning_rate, dtype)
    proj = jnp.asarray(projection, dtype)
    ent = jnp.asarray(entanglement, dtype)

    def sims(a, p, n):
        if form == "cosine":
            return jnp.dot(a, p), jnp.dot(a, n)
        return -jnp.sum((a - p) ** 2), -jnp.sum((a - n) ** 2)

    def one(s_ap, s_an):
        a, p, n = _notebook_triplet(s_ap, s_an, proj)
        grads = jax.grad(lambda a, p, n: scalar_loss(*sims(a, p, n)), argnums=(0, 1, 2))(
            a, p, n)
        a2, p2, n2 = (distances.l2_normalize(v - lr * g) for v, g in zip((a, p, n), grads))
        d_ap = jnp.dot(a2, p2) - s_ap
        d_an = jnp.dot(a2, n2) - s_an
        m = ent * s_ap * s_an
        return d_ap + m * d_an, d_an + m * d_ap

    d_ap, d_an = jax.vmap(one)(sim_ap.ravel(), sim_an.ravel())
    return SimilarityChange(d_ap.reshape(sim_ap.shape), d_an.reshape(sim_an.shape))


# |Delta S_an| at or below this is float32 rounding of a cosine (a few ulps of 1), not a pull:
# at S_an = 1 exactly SCT's step leaves the negative where it is and the re-normalised cosine
# comes back as 1 +- 2e-8, which a strict "> 0" counted as a pull in some runs and not others.
HARD_PULL_ATOL = 1e-6


def hard_pull_share(delta_an: ArrayLike, sim_ap: ArrayLike, sim_an: ArrayLike, *,
                    atol: float = HARD_PULL_ATOL) -> jax.Array:
    r"""Share of hard cells (:math:`S_{an} > S_{ap}`) whose negative is pulled in
    (:math:`\Delta S_{an} >` ``atol``): the summary of one panel of the notebook's figure.

    ``atol`` (default ``HARD_PULL_ATOL`` = 1e-6) keeps float32 rounding out of the count: a
    change of a few ulps of a cosine is not a pull. Measured on the notebook's 20 x 20 grid at
    lr 0.1: every pull of the hinge, soft and NCA losses is above 4e-5; SCT's only candidates
    are cells of the :math:`S_{an} = 1` row at about 2e-8 (rounding).
    Returns 0 when the grid has no hard cell.
    """
    delta_an, sim_ap, sim_an = (jnp.asarray(x) for x in (delta_an, sim_ap, sim_an))
    hard = sim_an > sim_ap
    return jnp.sum(hard & (delta_an > atol)) / jnp.maximum(jnp.sum(hard), 1)
