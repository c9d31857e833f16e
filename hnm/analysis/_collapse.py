r"""Collapse and triplet-separation diagnostics of a batch of embeddings, and the
relative (trajectory-based) collapse test.

References:
  Xu, Hsieh, Vundurthy, Cohen, Choset, Li. Mathematical justification of hard negative
  mining via isometric approximation theorem. arXiv 2210.11173 (ICLR 2024).
  Roy, Vetterli. The effective rank: a measure of effective dimensionality. EUSIPCO 2007.
  Xuan et al., ECCV 2020 (``hn_ratio``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from hnm import _checks
from hnm import distances

LOG_2 = math.log(2.0)
# Singular values below this fraction of ||X||_F are float32 rounding of the centring.
RANK_RTOL = 1e-5
DEFAULT_DISTANCE_THRESHOLD = 0.1
COLLAPSE_KINDS = ("hinge", "soft", "sct")

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
      every anchor iff the batch is *triplet-separated* with margin :math:`\alpha`. These
      are *not* :math:`d_{iso}`: under the sup-distortion reading of Xu et al.'s distance the
      exact value of the batch problem relaxed to arbitrary dissimilarities lies in
      :math:`[v/2, v]` (:func:`hnm.analysis.diso_bounds` computes it and an upper bound that
      accounts for the dimension). The max also grows with the batch size for one embedding
      law, so values logged at different batch sizes are not comparable. ``_mean`` equals the
      batch-hard hinge loss (mean over valid anchors) on these distances.
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
    r"""Absolute collapse test: is the batch's spread below a fixed scale?

    **What it measures**: whether the mean pairwise distance of the (normalised) embeddings is
    below an absolute threshold. It says nothing about training: an *untrained* network can
    pass it (hnm's untrained CNN on the glyph test set has mean distance 0.069 at d = 2,
    0.12-0.15 at d = 8..128), so it is not a collapse test for a training run. Use
    :func:`is_collapsed_relative`, which compares with the spread at initialisation.

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


DEFAULT_SPREAD_RATIO = 0.25
DEFAULT_LOSS_RATIO_TOL = 0.1


def spread_ratio(diag: dict[str, ArrayLike], initial_diag: dict[str, ArrayLike],
                 key: str = "mean_distance") -> jax.Array:
    r"""The spread now relative to the spread at initialisation,
    :math:`\rho = \bar D / \bar D_0` (mean pairwise distance of the normalised embeddings of
    the same images, before and after training). 1 when both are 0.

    Raises:
      ValueError: ``key`` missing from either dict.
    """
    for name, d in (("diag", diag), ("initial_diag", initial_diag)):
        if key not in d:
            raise ValueError(f"`{name}` lacks {key!r}; pass collapse_diagnostics(...) output.")
    now, then = jnp.asarray(diag[key]), jnp.asarray(initial_diag[key])
    return jnp.where(then > 0, now / jnp.where(then > 0, then, 1.0),
                     jnp.where(now > 0, jnp.inf, 1.0))


def is_collapsed_relative(diag: dict[str, ArrayLike], initial_diag: dict[str, ArrayLike], *,
                          loss_ratio: ArrayLike | None = None,
                          max_spread_ratio: float = DEFAULT_SPREAD_RATIO,
                          loss_ratio_tol: float = DEFAULT_LOSS_RATIO_TOL) -> jax.Array:
    r"""Collapse decided from the trajectory, relative to where training started.

    .. math::
        \text{collapsed} \iff \frac{\bar D}{\bar D_0} < \rho_{max}
        \ \wedge\ \Big|\frac{\ell}{\ell_{collapse}} - 1\Big| \le \epsilon

    :math:`\bar D` is ``mean_distance`` of :func:`collapse_diagnostics` on a fixed set of
    images (e.g. the test set) at the end, :math:`\bar D_0` the same at initialisation;
    :math:`\ell/\ell_{collapse}` is :func:`loss_relative_to_collapse` of the final training
    loss (the loss test is skipped when ``loss_ratio`` is None). Both must hold: the
    embeddings shrank to under :math:`\rho_{max}` (default 1/4) of their initial spread
    **and** the loss sits at its collapse value (default within 10 %).

    An untrained network is never collapsed by this test: ``diag = initial_diag`` gives
    :math:`\rho = 1 \ge \rho_{max}` (for any :math:`\rho_{max} \le 1`), also when the initial
    spread is already tiny (0/0 counts as 1).

    Args:
      diag: diagnostics at the end (needs ``mean_distance``).
      initial_diag: diagnostics of the same images at initialisation.
      loss_ratio: final loss / collapse value, or None.
      max_spread_ratio: :math:`\rho_{max}` in (0, 1].
      loss_ratio_tol: :math:`\epsilon`.

    Returns:
      A bool array.

    Raises:
      ValueError: a needed key is missing, or ``max_spread_ratio`` is outside (0, 1].

    Examples:
      >>> d0 = {"mean_distance": 0.07}
      >>> bool(is_collapsed_relative(d0, d0))            # untrained: never collapsed
      False
      >>> bool(is_collapsed_relative({"mean_distance": 0.01}, d0, loss_ratio=0.98))
      True
    """
    if not 0.0 < float(max_spread_ratio) <= 1.0:
        raise ValueError(f"`max_spread_ratio` must lie in (0, 1]; got {max_spread_ratio!r}.")
    collapsed = spread_ratio(diag, initial_diag) < max_spread_ratio
    if loss_ratio is not None:
        collapsed &= jnp.abs(jnp.asarray(loss_ratio) - 1.0) <= loss_ratio_tol
    return collapsed


TRAINING_DISO_STEPS = 30


def training_diagnostics(embeddings: ArrayLike, labels: ArrayLike, margin: ArrayLike = 0.2, *,
                         diso_steps: int = TRAINING_DISO_STEPS) -> dict[str, jax.Array]:
    r""":func:`collapse_diagnostics` of a training batch plus the d_iso bounds, in one jit-able
    function with static shapes (what the trainer logs as ``diag/...`` every log step).

    Adds ``diso_lower`` and ``diso_upper`` (:func:`hnm.analysis.diso_bounds` with
    ``num_steps=diso_steps``, default 30: a cheap upper bound, still the distortion of a
    checked triplet-separated configuration) and ``diso_feasible``.
    Costs O(B^2 D) memory per optimisation step; meant for training batches (B up to a few
    hundred), not for the evaluation set.
    """
    from hnm.analysis import _diso  # _diso depends on nothing here; imported lazily

    out = collapse_diagnostics(embeddings, labels, margin)
    b = _diso.diso_bounds(embeddings, labels, margin, num_steps=diso_steps)
    out.update(diso_lower=b["lower"], diso_upper=b["upper"],
               diso_feasible=b["feasible"].astype(jnp.float32))
    return out
