r"""Data: class-disjoint retrieval splits and P x K class-balanced training batches.

``hnm.data.build(config.data, seed=..., num_devices=...)`` returns a :class:`Dataset`: training
batches of P classes x K images (``classes_per_batch``, ``samples_per_class``) laid out so
that each device's slice holds whole classes, and the evaluation sets. Evaluation is zero-shot
retrieval on classes never seen in training (``SCIENCE.md`` §1): a ``"test"`` set evaluated
leave-one-out (CUB, Cars, SOP, digits, glyphs, npz, folder), or ``"query"`` + ``"gallery"``
sets (In-Shop).

One module per concern; imports flow one way (each imports only those above it):

- :mod:`hnm.data.sampler`: the seeded P x K sampler and its checkpointed
  :class:`SamplerState` (exact resume). NumPy only.
- :mod:`hnm.data.preprocess`: decode, resize the shorter side, crop, flip (the SCT recipe).
- :mod:`hnm.data.stores`: random access to images by row, in memory or encoded.
- :mod:`hnm.data.sources`: digits, glyphs, npz, folder, In-Shop, and class splits
  (``train_classes``: a fraction in (0, 1) or a count, also as a whole float like 136.0).
- :mod:`hnm.data.config`: the ``config.data`` keys (:data:`KEYS`), defaults, checks.
- :mod:`hnm.data.tfds_source`: CUB, Cars, SOP from tfds; offline unless ``download=True``,
  failing at once with :class:`DataNotFoundError` when a set is not prepared.
- :mod:`hnm.data.dataset`: :func:`build`, :class:`Dataset`, :class:`EvalSet`.
- :mod:`hnm.data.glyphs`: the renderer of the embedded 143-class glyph set (a leaf, NumPy and
  matplotlib's fonts; imported by the ``"glyphs"`` source only when it is built).

Nothing here imports TensorFlow or tfds until a tfds source is built; scikit-learn and PIL
are imported only by the sources that use them.

Errors in ``config.data`` are one-line ``ValueError``\ s that name the key (``data.KEY``) and,
where a value is too large, the flag to change and its largest valid value; data that is not
there raises :class:`DataNotFoundError` (a ``ValueError``).

References:
  Xuan, Stylianou, Liu, Pless. Hard negative examples are hard, but useful. ECCV 2020.
  (official code: github.com/littleredxh/HardNegative)
"""
from hnm.data.config import (DEFAULT_CACHE_MAX_BYTES, DEFAULT_IMAGE_SIZE, DEFAULTS, KEYS,
                             SOURCES, TRAIN_RESIZE_FACTOR, resolve_config)
from hnm.data.dataset import LOADERS, PAD_LABEL, Dataset, EvalSet, build
from hnm.data.preprocess import (Preprocess, center_crop, crop_and_flip, decode_image,
                                 resize_shorter)
from hnm.data.sampler import (PKSampler, SamplerState, check_sampler, epoch_plan, epoch_rng,
                              max_batches)
from hnm.data.sources import (IMAGE_EXTENSIONS, INSHOP_PARTITION_FILE, DataNotFoundError,
                              parse_train_classes, split_classes)
from hnm.data.stores import ArrayImages, EncodedImages, SubsetImages, merge_stores
from hnm.data.tfds_source import TFDS_LABEL_KEYS, TFDS_RESPLIT, tfds_decoders

__all__ = [
    "ArrayImages", "DEFAULTS", "DEFAULT_CACHE_MAX_BYTES", "DEFAULT_IMAGE_SIZE", "DataNotFoundError",
    "Dataset", "EncodedImages", "EvalSet", "IMAGE_EXTENSIONS", "INSHOP_PARTITION_FILE", "KEYS",
    "LOADERS", "PAD_LABEL", "PKSampler", "Preprocess", "SOURCES", "SamplerState", "SubsetImages",
    "TFDS_LABEL_KEYS", "TFDS_RESPLIT", "TRAIN_RESIZE_FACTOR", "build", "center_crop",
    "check_sampler", "crop_and_flip", "decode_image", "epoch_plan", "epoch_rng", "max_batches",
    "merge_stores", "parse_train_classes", "resize_shorter", "resolve_config", "split_classes",
    "tfds_decoders"]
