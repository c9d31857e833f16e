"""hnm: hard negative mining for deep metric learning in JAX.

The pure core is importable without TensorFlow, tfds or orbax:

  >>> import hnm
  >>> sorted(hnm.objectives.names())[:3]
  ['batch_all', 'batch_hard', 'contrastive']

Training (``hnm.train``), data (``hnm.data``), checkpoints (``hnm.checkpoint``), plots
(``hnm.plots``) and the command line (``hnm.cli``) are imported explicitly by those who need
them.
"""
from hnm import analysis, distances, losses, metrics, miners, objectives

__version__ = "0.1.0"
__all__ = ["analysis", "distances", "losses", "metrics", "miners", "objectives"]
