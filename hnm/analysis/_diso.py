r"""Bounds on the distance d_iso between a batch of embeddings and the triplet-separated maps,
and a capacity predictor of where collapse sets in.

**The definition used here (assumed).** The text of Xu et al. (arXiv 2210.11173, ICLR 2024)
— its exact :math:`d_{iso}`, Corollary 3.4, equation 17 — is not available offline where hnm
was written, so hnm states and uses the *sup-distortion* reading of their Hausdorff-like
distance, restricted to one batch :math:`x_1, \dots, x_B` with labels :math:`y_i`:

.. math::
    d_{iso}(f, \mathcal F_{TS}) = \inf_{g \in \mathcal F_{TS}}\ \max_{i \ne j}
      \big|\, \lVert f_i - f_j\rVert - \lVert g_i - g_j\rVert \,\big| ,

where :math:`\mathcal F_{TS}` is the set of *triplet-separated* configurations
:math:`g_1, \dots, g_B \in \mathbb R^{n}`: for every anchor :math:`a` with a positive and a
negative, :math:`\max_p \lVert g_a - g_p\rVert + \alpha \le \min_n \lVert g_a - g_n\rVert`.
The infimum is not computable in closed form; :func:`diso_bounds` brackets it:

* ``lower`` — the exact value of the problem *relaxed to arbitrary dissimilarities*
  (:math:`e_{ij} = e_{ji} \ge 0` instead of :math:`\lVert g_i - g_j\rVert`; a linear
  programme). Closed form (proved in :func:`diso_lower_bound`).
* ``upper`` — the sup-distortion of an explicit configuration :math:`G \in \mathbb
  R^{B \times n}` found by optimisation and **checked** triplet-separated.

So :math:`\text{lower} \le d_{iso} \le \text{upper}`, and the gap says how much the
ambient dimension :math:`n` (ignored by ``lower``) costs.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from hnm import _checks
from hnm import distances

# Configurations are searched with the margin inflated by this factor (plus an absolute
# epsilon), so that the float32 feasibility check at the true margin passes.
MARGIN_SLACK = 1e-3
MARGIN_EPS = 1e-5
# The search itself aims at a larger margin, so that its end point passes the check.
SEARCH_SLACK = 1e-2
DEFAULT_DISO_STEPS = 300
DEFAULT_DISO_LR = 0.01
# Smooth max of the distortion during the search (its temperature, in distance units).
SMOOTH_MAX_TEMPERATURE = 0.005
PENALTY_WEIGHT = 1.0
# Repair grid: shrink classes toward their means by these factors and scale the means by
# up to the factor that separates them by the margin.
SHRINK_FACTORS = (1.0, 0.9, 0.75, 0.5, 0.25, 0.1, 0.0)
NUM_SCALES = 6
# Capacities above this are reported as this (the cap-area bound explodes with the dimension).
CAPACITY_CAP = 10 ** 12


def _pair_masks(labels: jax.Array):
    same = labels[:, None] == labels[None, :]
    other = ~jnp.eye(labels.shape[0], dtype=bool)
    return same & other, ~same, other


def _dist(x: jax.Array) -> jax.Array:
    """Exact pairwise distances (direct differences: identical rows give exactly 0)."""
    diff = x[:, None, :] - x[None, :, :]
    return distances.safe_sqrt(jnp.sum(diff ** 2, axis=-1))


def _prepare(embeddings: ArrayLike, labels: ArrayLike, normalize: bool):
    embeddings, labels = jnp.asarray(embeddings), jnp.asarray(labels)
    _checks.check_embeddings_and_labels(embeddings, labels)
    if embeddings.shape[0] < 2:
        raise ValueError(f"`embeddings` needs at least 2 rows to have pairs; got shape "
                         f"{embeddings.shape}.")
    return embeddings, labels


def separation_violations(dist: jax.Array, labels: jax.Array, margin: ArrayLike
                          ) -> jax.Array:
    r"""Per-anchor violation :math:`\max_p D_{ap} + \alpha - \min_n D_{an}` of a distance
    matrix ([B, B] -> [B]); :math:`-\infty` for anchors lacking a positive or a negative.
    A configuration is triplet-separated iff every entry is :math:`\le 0`."""
    pos, neg, _ = _pair_masks(labels)
    ok = pos.any(axis=1) & neg.any(axis=1)
    far_pos = jnp.max(jnp.where(pos, dist, -jnp.inf), axis=1)
    near_neg = jnp.min(jnp.where(neg, dist, jnp.inf), axis=1)
    return jnp.where(ok, jnp.where(ok, far_pos, 0.0) + margin - jnp.where(ok, near_neg, 0.0),
                     -jnp.inf)


def _lower_from_dist(dist: jax.Array, labels: jax.Array, margin: jax.Array) -> jax.Array:
    pos, neg, _ = _pair_masks(labels)
    ok = pos.any(axis=1) & neg.any(axis=1)
    far_pos = jnp.where(ok, jnp.max(jnp.where(pos, dist, -jnp.inf), axis=1), 0.0)
    near_neg = jnp.where(ok, jnp.min(jnp.where(neg, dist, jnp.inf), axis=1), 0.0)
    per_anchor = jnp.maximum((far_pos - near_neg + margin) / 2.0, margin - near_neg)
    return jnp.max(jnp.where(ok, jnp.maximum(per_anchor, 0.0), 0.0))


def diso_lower_bound(embeddings: ArrayLike, labels: ArrayLike, margin: ArrayLike = 0.2, *,
                     normalize: bool = True) -> jax.Array:
    r"""Exact value of the batch d_iso problem relaxed to arbitrary dissimilarities.

    The relaxation (a linear programme in :math:`t` and :math:`e_{ij}`, :math:`i < j`):

    .. math::
        t^* = \min t \quad\text{s.t.}\quad |e_{ij} - D_{ij}| \le t,\ \ e_{ij} \ge 0,\ \
        e_{ap} + \alpha \le e_{an}\ \ \forall (a, p, n).

    **Closed form.** With :math:`P_a = \max_p D_{ap}` and :math:`N_a = \min_n D_{an}`, over the
    anchors that have a positive and a negative,

    .. math::
        t^* = \max_a\ \max\Big(\frac{P_a - N_a + \alpha}{2},\ \ \alpha - N_a,\ \ 0\Big).

    *Proof.* Any feasible point has :math:`e_{ap} \ge \max(0, D_{ap} - t)` and
    :math:`e_{an} \le D_{an} + t`, so :math:`\max(0, D_{ap} - t) + \alpha \le D_{an} + t`
    for every triplet, which is :math:`t \ge (D_{ap} - D_{an} + \alpha)/2` and
    :math:`t \ge \alpha - D_{an}`. Conversely, at :math:`t = t^*` the choice
    :math:`e = \max(0, D - t)` on same-class pairs and :math:`e = D + t` on different-class
    pairs is symmetric, non-negative, within :math:`t` of :math:`D` and satisfies every
    triplet constraint (a pair is either same-class or not, so the choices never conflict).
    :math:`\square`

    Consequences: with :math:`v = \max_a [P_a - N_a + \alpha]_+` (``separation_violation_max``
    of :func:`collapse_diagnostics`), :math:`v/2 \le t^* \le v`; a triplet-separated batch
    gives 0; a fully collapsed batch (:math:`D = 0`) gives exactly :math:`\alpha`. Without
    the constraint :math:`e \ge 0` the value would be :math:`v/2`. The relaxation ignores
    that :math:`g` must live in :math:`\mathbb R^n`, so it does not depend on the dimension.

    Args:
      embeddings: [B, D] floating, B >= 2.
      labels: [B] integer labels.
      margin: :math:`\alpha` (distance units of the, by default normalised, embeddings).
      normalize: L2-normalise the embeddings first (as :func:`collapse_diagnostics`).

    Returns:
      A scalar array, :math:`t^*`. O(B^2 D) memory; jit-able with ``normalize`` static.

    Examples:
      >>> round(float(diso_lower_bound(jnp.ones((4, 2)), jnp.array([0, 0, 1, 1]), 0.2)), 6)
      0.2
    """
    x, labels = _prepare(embeddings, labels, False)
    return _lower_jit(x, labels, margin, normalize=normalize)


@functools.partial(jax.jit, static_argnames=("normalize",))
def _lower_jit(x, labels, margin, *, normalize):
    x = distances.l2_normalize(x) if normalize else x
    return _lower_from_dist(_dist(x), labels, jnp.asarray(margin, x.dtype))


# ----------------------------------------------------------------------------- upper bound


def _class_means(g: jax.Array, labels: jax.Array) -> jax.Array:
    same = (labels[:, None] == labels[None, :]).astype(g.dtype)
    return (same @ g) / jnp.sum(same, axis=1, keepdims=True)


def _line_configuration(labels: jax.Array, dim: int, spacing: jax.Array) -> jax.Array:
    """Every class on one point of a line, consecutive classes ``spacing`` apart.

    Always triplet-separated for margin <= spacing (same-class distance 0, others >= spacing).
    """
    lower = (labels[None, :] < labels[:, None]).astype(spacing.dtype)
    count = jnp.sum((labels[:, None] == labels[None, :]).astype(spacing.dtype), axis=1)
    rank = jnp.sum(lower / count[None, :], axis=1)  # number of distinct smaller labels
    rank = jnp.round(rank)
    return jnp.zeros((labels.shape[0], dim), spacing.dtype).at[:, 0].set(rank * spacing)


def _start_configuration(x: jax.Array, dim: int) -> jax.Array:
    """The embeddings in R^dim: themselves, zero-padded, or their top-``dim`` PCA projection
    (the projection only shrinks distances, the least-distortion linear choice in that sense)."""
    d = x.shape[1]
    if dim == d:
        return x
    if dim > d:
        return jnp.pad(x, ((0, 0), (0, dim - d)))
    centred = x - jnp.mean(x, axis=0, keepdims=True)
    _, _, vt = jnp.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:dim].T


def _distortion(dist_f: jax.Array, g: jax.Array, other: jax.Array) -> jax.Array:
    return jnp.max(jnp.where(other, jnp.abs(_dist(g) - dist_f), 0.0))


def _search(dist_f, g0, labels, margin_eff, num_steps, learning_rate, key):
    """Adam on a smooth max of the distortion plus an exact penalty on separation violations."""
    import optax  # a JAX library hnm already depends on; imported here to keep import light

    pos, neg, other = _pair_masks(labels)
    tau = SMOOTH_MAX_TEMPERATURE

    def objective(g):
        dist_g = _dist(g)
        dev = jnp.where(other, jnp.abs(dist_g - dist_f), -jnp.inf)
        smooth_max = tau * jax.nn.logsumexp(dev / tau)
        viol = separation_violations(dist_g, labels, margin_eff)
        penalty = jnp.sum(jax.nn.relu(jnp.where(jnp.isfinite(viol), viol, 0.0)))
        return smooth_max + PENALTY_WEIGHT * penalty

    # Decay to 0: the objective is a max of kinks, a constant step would hover around it.
    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, max(num_steps, 1)))
    # A tiny jitter: at coincident points the distance has gradient 0 and nothing would move.
    g = g0 + 1e-3 * jax.random.normal(key, g0.shape, g0.dtype)
    state = opt.init(g)

    def step(carry, _):
        g, state = carry
        grad = jax.grad(objective)(g)
        updates, state = opt.update(grad, state, g)
        return (optax.apply_updates(g, updates), state), None

    (g, _), _ = jax.lax.scan(step, (g, state), None, length=num_steps)
    return g


def _repair_candidates(g: jax.Array, labels: jax.Array, margin_eff: jax.Array) -> jax.Array:
    """[C, B, dim] variants of ``g``: classes shrunk toward their means by each factor of
    ``SHRINK_FACTORS``, the means scaled (about their centroid) by factors from 1 up to the
    one that puts the two closest class means ``margin_eff`` apart."""
    means = _class_means(g, labels)
    centre = jnp.mean(means, axis=0, keepdims=True)
    dm = _dist(means)
    neg = labels[:, None] != labels[None, :]
    min_mean_dist = jnp.min(jnp.where(neg, dm, jnp.inf))
    need = jnp.where(jnp.isfinite(min_mean_dist) & (min_mean_dist > 0),
                     margin_eff / jnp.maximum(min_mean_dist, 1e-12), 1.0)
    top = jnp.clip(need, 1.0, 1e6) * (1.0 + 10.0 * MARGIN_SLACK)
    scales = jnp.exp(jnp.linspace(0.0, 1.0, NUM_SCALES) * jnp.log(top))
    shrink = jnp.asarray(SHRINK_FACTORS, g.dtype)
    resid = g - means
    cands = (centre[None, None] + scales[None, :, None, None] * (means - centre)[None, None]
             + shrink[:, None, None, None] * resid[None, None])
    return cands.reshape((-1,) + g.shape)


def diso_bounds(embeddings: ArrayLike, labels: ArrayLike, margin: ArrayLike = 0.2, *,
                dim: int | None = None, normalize: bool = True,
                num_steps: int = DEFAULT_DISO_STEPS, learning_rate: float = DEFAULT_DISO_LR,
                key: jax.Array | None = None) -> dict[str, jax.Array]:
    r"""Lower and upper bounds on the batch :math:`d_{iso}(f, \mathcal F_{TS})`.

    **Assumed definition** (the paper's exact text is not available offline; see the module
    docstring): sup-distortion, infimum over triplet-separated configurations
    :math:`g_1..g_B \in \mathbb R^{dim}` with margin :math:`\alpha`:

    .. math::
        d_{iso} = \inf_{g\ \text{triplet-separated}}\ \max_{i\ne j}
            \big|\lVert f_i - f_j\rVert - \lVert g_i - g_j\rVert\big| .

    * ``lower``: :func:`diso_lower_bound` (exact LP value of the relaxation to arbitrary
      dissimilarities; closed form, proved there).
    * ``upper``: the distortion of ``config``, the best of these candidates that passes the
      triplet-separation check at the true margin (float32 arithmetic, no tolerance):
      (i) the embeddings themselves in :math:`\mathbb R^{dim}` (zero-padded, or their top-dim
      PCA projection); (ii) the result of ``num_steps`` Adam steps from (i) (plus a 1e-3
      jitter from ``key``) on :math:`\mathrm{smoothmax}_{i\ne j}|D^f_{ij} - D^g_{ij}|
      + \sum_a [\max_p D^g_{ap} + \alpha' - \min_n D^g_{an}]_+`, with
      :math:`\alpha' = \alpha(1 + 10^{-2}) + 10^{-5}`; (iii) repairs of (i) and (ii): classes
      shrunk toward their means and the means spread apart (a fixed grid); (iv) every class
      on one point of a line, :math:`\alpha'` apart, which is always feasible. So ``upper``
      is always the distortion of a checked triplet-separated configuration, and
      ``lower <= d_iso <= upper``.
    * ``feasible``: the check of ``config`` (True unless something is badly wrong).

    Known cases: a triplet-separated batch gives 0 and 0 (candidate (i) passes the check;
    ``dim`` must be at least the embedding dimension). A fully collapsed batch gives
    ``lower`` :math:`= \alpha` and ``upper`` :math:`\ge` :func:`packing_diameter` (P
    classes, ``dim``): any triplet-separated g holds one point per class pairwise
    :math:`\ge \alpha` apart, and its distortion is its diameter.

    Args:
      embeddings: [B, D] floating, B >= 2.
      labels: [B] integer labels.
      margin: :math:`\alpha`, in distance units of the (normalised) embeddings.
      dim: ambient dimension of the configurations, default D.
      normalize: L2-normalise the embeddings first.
      num_steps: optimisation steps (static); 0 skips the search.
      learning_rate: Adam's step size.
      key: PRNG key of the jitter (default ``PRNGKey(0)``).

    Returns:
      ``dict(lower=[], upper=[], config=[B, dim], feasible=[] bool,
      config_violation=[] (max over anchors of the check; <= 0 when feasible))``.

    Raises:
      ValueError: bad shapes, B < 2, bad ``dim`` or ``num_steps``.

    Examples:
      >>> emb = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
      >>> b = diso_bounds(emb, jnp.array([0, 0, 1, 1]), 0.2)
      >>> float(b["lower"]), float(b["upper"]), bool(b["feasible"])
      (0.0, 0.0, True)

    References:
      Xu, Hsieh, Vundurthy, Cohen, Choset, Li. Mathematical justification of hard negative
      mining via isometric approximation theorem. arXiv 2210.11173 (ICLR 2024).
    """
    embeddings, labels = jnp.asarray(embeddings), jnp.asarray(labels)
    _prepare(embeddings, labels, False)  # checks only
    dim = embeddings.shape[1] if dim is None else dim
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"`dim` must be None or a positive int; got {dim!r}.")
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"`num_steps` must be a non-negative int; got {num_steps!r}.")
    key = jax.random.PRNGKey(0) if key is None else key
    return _bounds(embeddings, labels, margin, learning_rate, key, dim=dim,
                   normalize=normalize, num_steps=num_steps)


@functools.partial(jax.jit, static_argnames=("dim", "normalize", "num_steps"))
def _bounds(embeddings, labels, margin, learning_rate, key, *, dim, normalize, num_steps):
    x = distances.l2_normalize(embeddings) if normalize else embeddings
    margin = jnp.asarray(margin, x.dtype)
    margin_eff = margin * (1.0 + MARGIN_SLACK) + MARGIN_EPS
    dist_f = _dist(x)
    _, _, other = _pair_masks(labels)

    start = _start_configuration(x, dim)
    bases = [start]
    if num_steps > 0:
        bases.append(_search(dist_f, start, labels, margin * (1.0 + SEARCH_SLACK) + MARGIN_EPS,
                             num_steps, learning_rate, key))
    cands = [b[None] for b in bases] + [_repair_candidates(b, labels, margin_eff)
                                        for b in bases]
    cands.append(_line_configuration(labels, dim, margin_eff)[None])
    cands = jnp.concatenate(cands, axis=0)

    def score(g):
        viol = jnp.max(separation_violations(_dist(g), labels, margin))
        return _distortion(dist_f, g, other), viol

    distortion, viol = jax.vmap(score)(cands)
    ok = viol <= 0.0
    best = jnp.argmin(jnp.where(ok, distortion, jnp.inf))
    return dict(
        lower=_lower_from_dist(dist_f, labels, margin),
        upper=distortion[best],
        config=cands[best],
        feasible=ok[best],
        config_violation=viol[best],
    )


# ----------------------------------------------------------------------------- packing limits

# Smallest diameter of n points in the plane with pairwise distances >= 1 (Bateman & Erdős
# 1951 for 7; classical for 3..6: equilateral triangle, square, regular pentagon, regular
# pentagon plus centre).
PLANE_MIN_DIAMETER = {1: 0.0, 2: 1.0, 3: 1.0, 4: math.sqrt(2.0), 5: (1.0 + math.sqrt(5.0)) / 2,
                      6: 2.0 * math.sin(math.radians(72.0)), 7: 2.0}


def packing_diameter(num_classes: int, dim: int, margin: float = 1.0) -> float:
    r"""A lower bound (exact where known) on the diameter of ``num_classes`` points of
    :math:`\mathbb R^{dim}` whose pairwise distances are all :math:`\ge` ``margin``.

    This is the packing limit of the collapsed batch: if all B embeddings coincide, every
    triplet-separated g puts its classes on points at least :math:`\alpha` apart (and may put
    each class on one point), so :math:`d_{iso} = ` the smallest such diameter.

    * :math:`P \le dim + 1`: exactly :math:`\alpha` (a regular simplex).
    * dim = 2, P <= 7: the exact values ``PLANE_MIN_DIAMETER`` (triangle 1, square
      :math:`\sqrt2`, pentagon :math:`\varphi`, pentagon + centre :math:`2\sin 72°`, hexagon +
      centre 2), times :math:`\alpha`.
    * otherwise: Jung's theorem puts a set of diameter :math:`\Delta` inside a ball of radius
      :math:`\Delta\sqrt{dim/(2(dim+1))}`; the P balls of radius :math:`\alpha/2` around the
      points are disjoint and lie in the ball of radius that plus :math:`\alpha/2`, so
      :math:`P(\alpha/2)^{dim} \le (\Delta\sqrt{dim/(2(dim+1))} + \alpha/2)^{dim}`, i.e.
      :math:`\Delta \ge \frac{\alpha}{2}(P^{1/dim} - 1)\big/\sqrt{dim/(2(dim+1))}`
      (and at least :math:`\alpha`).

    Examples:
      >>> round(packing_diameter(4, 2, 0.2), 4)
      0.2828
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"`num_classes` must be a positive int; got {num_classes!r}.")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"`dim` must be a positive int; got {dim!r}.")
    if num_classes == 1:
        return 0.0
    if num_classes <= dim + 1:
        return float(margin)
    if dim == 2 and num_classes in PLANE_MIN_DIAMETER:
        return float(margin) * PLANE_MIN_DIAMETER[num_classes]
    if dim == 1:
        return float(margin) * (num_classes - 1)
    jung = math.sqrt(dim / (2.0 * (dim + 1)))
    return float(margin) * max(1.0, 0.5 * (num_classes ** (1.0 / dim) - 1.0) / jung)


def _cap_fraction(angle: float, dim: int) -> float:
    """Fraction of the unit sphere S^{dim-1} inside a cap of angular radius ``angle``."""
    t = np.linspace(0.0, math.pi, 20001)
    w = np.sin(t) ** (dim - 2)
    total = np.trapezoid(w, t)
    tc = np.linspace(0.0, angle, 20001)
    return float(np.trapezoid(np.sin(tc) ** (dim - 2), tc) / total)


def sphere_capacity(dim: int, margin: float) -> tuple[int, int]:
    r"""``(lower, upper)`` bounds on the largest number of points of the unit sphere
    :math:`S^{dim-1}` with pairwise (chordal) distances :math:`\ge` ``margin``.

    With :math:`\theta = 2\arcsin(\alpha/2)` the angular separation:

    * dim = 1: 2 if :math:`\alpha \le 2`, else 1 (exact).
    * dim = 2: :math:`\lfloor 2\pi/\theta \rfloor = \lfloor \pi / \arcsin(\alpha/2)\rfloor`
      (exact: the points in angular order use up :math:`\ge\theta` each of :math:`2\pi`).
    * dim >= 3, upper: caps of angular radius :math:`\theta/2` around the points are
      disjoint, so :math:`N \le 1/\mathrm{cap}(\theta/2)`, the cap's share of the sphere's
      area. Lower: the cross-polytope (2 dim points, chord :math:`\sqrt 2`), the simplex
      (dim + 1 points, chord :math:`\sqrt{2 + 2/dim}`), points on a great circle
      otherwise (the dim = 2 count). Both are capped at ``CAPACITY_CAP``.
    """
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"`dim` must be a positive int; got {dim!r}.")
    margin = float(margin)
    if not margin > 0.0:
        raise ValueError(f"`margin` must be > 0; got {margin!r}.")
    if margin > 2.0:
        return 1, 1
    if dim == 1:
        return 2, 2
    half = math.asin(margin / 2.0)  # theta / 2
    circle = int(math.floor(math.pi / half + 1e-9))
    if dim == 2:
        return circle, circle
    frac = _cap_fraction(half, dim)
    upper = CAPACITY_CAP if frac * CAPACITY_CAP <= 1.0 else int(math.floor(1.0 / frac + 1e-9))
    lower = circle
    if margin <= math.sqrt(2.0):
        lower = max(lower, 2 * dim)
    if margin <= math.sqrt(2.0 + 2.0 / dim):
        lower = max(lower, dim + 1)
    return lower, max(upper, lower)


def collapse_boundary(classes_per_batch: Any, dim: Any, margin: float = 0.2
                      ) -> dict[str, np.ndarray]:
    r"""Predicted collapse per (classes per batch P, embedding dimension d) cell.

    **The argument.** hnm's networks compare L2-normalised embeddings, so a batch can reach
    zero hinge loss with margin :math:`\alpha` only if its P classes admit a triplet-separated
    configuration *on the unit sphere* :math:`S^{d-1}`. Collapsing each class onto one point
    is the most economical such configuration (same-class distance 0), so one exists iff P
    points fit on :math:`S^{d-1}` pairwise :math:`\ge\alpha` apart: :math:`P \le N(d,\alpha)`,
    the spherical-code capacity (:func:`sphere_capacity`). Above it the hardest triplet of
    every batch keeps a positive floor (the d_iso lower bound stays > 0 for every reachable
    embedding), and following Xu et al. we *predict* that hard-negative training collapses
    there. Below it zero loss is reachable, and no collapse is predicted. The prediction is a
    hypothesis to test, not a theorem: the argument says when the batch loss cannot vanish,
    not that the optimiser then falls to a point.

    For d = 2 the capacity is exact, :math:`\lfloor\pi/\arcsin(\alpha/2)\rfloor` (31 for
    :math:`\alpha` = 0.2, 6 for :math:`\alpha = 1`: a hexagon); for d >= 3 the cap-area bound
    is used, which is far above every P of hnm's sweeps at :math:`\alpha` = 0.2 (d = 3:
    about 400), so only d = 2 cells are predicted to collapse.

    Args:
      classes_per_batch: P, an int or an array of ints.
      dim: d, an int or an array of ints (broadcast against P).
      margin: :math:`\alpha` in distance units of unit vectors (0 < margin <= 2).

    Returns:
      ``dict(capacity=[...] int (the upper bound on N(d, alpha)),
      capacity_lower=[...] int, collapse_predicted=[...] bool (P > capacity),
      separable=[...] bool (P <= capacity_lower))``, each shaped like the broadcast inputs.

    Examples:
      >>> b = collapse_boundary([6, 7], 2, margin=1.0)
      >>> b["capacity"].tolist(), b["collapse_predicted"].tolist()
      ([6, 6], [False, True])
    """
    p, d = np.broadcast_arrays(np.asarray(classes_per_batch), np.asarray(dim))
    if not (np.issubdtype(p.dtype, np.integer) and np.issubdtype(d.dtype, np.integer)):
        raise TypeError("`classes_per_batch` and `dim` must be integers.")
    if (p < 1).any() or (d < 1).any():
        raise ValueError("`classes_per_batch` and `dim` must be >= 1.")
    lo = np.zeros(p.shape, np.int64)
    hi = np.zeros(p.shape, np.int64)
    for idx in np.ndindex(p.shape):
        lo[idx], hi[idx] = sphere_capacity(int(d[idx]), margin)
    return dict(capacity=hi, capacity_lower=lo, collapse_predicted=p > hi, separable=p <= lo)
