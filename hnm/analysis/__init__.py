r"""Triplet gradient geometry, d_iso bounds and collapse diagnostics (pure JAX; no
matplotlib, no TF).

Three questions from the hard-negative literature, answered for any loss and any embeddings:

* **Where does a loss push a triplet?** Every triplet loss of hnm is elementwise in
  :math:`(S_{ap}, S_{an})`. :func:`loss_gradient_field` draws its gradient over that plane
  (hnm's picture); :func:`triplet_on_sphere` and :func:`embedding_gradients` follow it back to
  three unit embeddings and give the first-order distance rates;
  :func:`one_step_similarity_change` is the official notebook's finite-step simulation
  (Xuan et al. 2020, ``triplet_gradient_simulation.ipynb``), with re-normalisation and
  entanglement.
* **How far is the network from triplet separation?** :func:`diso_bounds` brackets the batch
  :math:`d_{iso}(f, \mathcal F_{TS})` of Xu et al. under the sup-distortion definition
  (assumed: the paper's exact text is not available offline): an exact LP lower bound in
  closed form and the distortion of a checked triplet-separated configuration in
  :math:`\mathbb R^{dim}`. :func:`collapse_boundary` predicts, from the sphere's capacity,
  where collapse should set in.
* **Has a network collapsed?** :func:`collapse_diagnostics` measures the spread of a batch;
  :func:`is_collapsed_relative` decides collapse relative to the spread at initialisation
  and the loss relative to :func:`loss_collapse_value`; :func:`training_diagnostics` is what
  the trainer logs.

Losses are passed in as ``loss_fn(sim_ap, sim_an) -> per-triplet loss`` (e.g.
``hnm.losses.triplet_margin_loss``); this package never imports them.

References:
  Xuan, Stylianou, Liu, Pless. Hard negative examples are hard, but useful. ECCV 2020
  (arXiv 2007.12749).
  Xu, Hsieh, Vundurthy, Cohen, Choset, Li. Mathematical justification of hard negative
  mining via isometric approximation theorem. arXiv 2210.11173 (ICLR 2024).
  Roy, Vetterli. The effective rank: a measure of effective dimensionality. EUSIPCO 2007.
"""
from hnm.analysis._collapse import (COLLAPSE_KINDS, DEFAULT_DISTANCE_THRESHOLD,
                                    DEFAULT_LOSS_RATIO_TOL, DEFAULT_SPREAD_RATIO, LOG_2,
                                    RANK_RTOL, TRAINING_DISO_STEPS, collapse_diagnostics,
                                    is_collapsed, is_collapsed_relative, loss_collapse_value,
                                    loss_relative_to_collapse, spread_ratio,
                                    training_diagnostics)
from hnm.analysis._diso import (PLANE_MIN_DIAMETER, collapse_boundary, diso_bounds,
                                diso_lower_bound, packing_diameter, separation_violations,
                                sphere_capacity)
from hnm.analysis._fields import (FORMS, HARD_PULL_ATOL, REALISABLE_TOL, EmbeddingGradients, LossFn,
                                  LossGradients, SimilarityChange, SphereTriplet,
                                  embedding_gradients, hard_pull_share, loss_gradient_field,
                                  one_step_similarity_change, triplet_on_sphere)

__all__ = [
    "COLLAPSE_KINDS", "DEFAULT_DISTANCE_THRESHOLD", "DEFAULT_LOSS_RATIO_TOL",
    "DEFAULT_SPREAD_RATIO", "FORMS", "HARD_PULL_ATOL", "LOG_2", "PLANE_MIN_DIAMETER", "RANK_RTOL",
    "REALISABLE_TOL", "TRAINING_DISO_STEPS", "EmbeddingGradients", "LossFn", "LossGradients",
    "SimilarityChange", "SphereTriplet", "collapse_boundary", "collapse_diagnostics",
    "diso_bounds", "diso_lower_bound", "embedding_gradients", "hard_pull_share", "is_collapsed",
    "is_collapsed_relative", "loss_collapse_value", "loss_gradient_field",
    "loss_relative_to_collapse", "one_step_similarity_change", "packing_diameter",
    "separation_violations", "sphere_capacity", "spread_ratio", "training_diagnostics",
    "triplet_on_sphere",
]
