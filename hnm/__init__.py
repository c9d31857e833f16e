"""hnm: hard negative mining for deep metric learning in JAX.

The pure core is importable without TensorFlow, tfds or orbax:

  >>> import hnm
  >>> objective = hnm.objectives.get("sct")
  >>> loss, aux = objective(embeddings, labels)   # doctest: +SKIP

Training (``hnm.train``), data (``hnm.data``), checkpoints (``hnm.checkpoint``) and the
command line (``hnm.cli``) are imported explicitly by those who need them.
"""
from hnm import distances

__version__ = "0.1.0"
