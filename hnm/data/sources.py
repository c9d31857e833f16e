"""The local sources: digits, glyphs, npz, folder, In-Shop; class-disjoint splits.

Every loader takes the resolved data config (:func:`hnm.data.resolve_config`) and returns a
:class:`Loaded`: the training store and labels, and the evaluation splits. The tfds source is
in :mod:`hnm.data.tfds_source`.

- ``"digits"``: scikit-learn's ``load_digits`` (1,797 8x8 images, 10 classes, values
  0..16 scaled to 0..255), digits 0-4 train, 5-9 test. No download, no TensorFlow.
- ``"glyphs"``: :func:`hnm.data.glyphs.load_glyphs` (synthetic many-class glyphs, its own
  class-disjoint train/test).
- ``"npz"``: a file with ``images`` uint8 [N, H, W] or [N, H, W, C] and ``labels`` [N].
- ``"folder"``: ``path/<class name>/<image files>``; classes sorted by name.
- ``"inshop"``: DeepFashion In-Shop from a manual download: ``path/list_eval_partition.txt``
  and the images it names under ``path``; ``"query"`` + ``"gallery"`` evaluation sets.

digits, glyphs and npz hold the whole uint8 array in memory; folder and In-Shop hold only the
file paths and decode a batch's files when it is drawn (:class:`hnm.data.stores.EncodedImages`).

**Class splits** (digits, npz, folder, and the tfds builders that are re-split):
the sorted list of classes, the first ``train_classes`` for training and the rest for test.
``train_classes`` is a fraction of the classes in (0, 1) (default 0.5, rounded to the nearest
count) or a count: an int >= 1, or a float that is a whole number > 1 (``136.0``: from the
command line ``--config.data.train_classes=136`` arrives as a float, because the field's
default 0.5 is one). ``1.0`` is rejected (as a fraction it leaves no test class). Sources
with their own class-disjoint split (glyphs, In-Shop, SOP) reject a ``train_classes`` other
than the default instead of ignoring it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from hnm.data.stores import ArrayImages, file_images

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
INSHOP_PARTITION_FILE = "list_eval_partition.txt"
NPZ_KEYS = ("images", "labels")


class DataNotFoundError(ValueError):
    """The data a config names is not there (a missing file or folder, a tfds data set that
    is not prepared locally). The message is one line saying what, where and how to fix it."""


# ----------------------------------------------------------------------------- class splits


def parse_train_classes(train_classes: Any, key: str = "train_classes"
                        ) -> tuple[str, float | int]:
    """``("fraction", x)`` or ``("count", n)``: what ``train_classes`` means (module docstring).

    Raises:
      ValueError: naming ``key`` and both accepted forms, for anything else.
    """
    value = train_classes
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
        return "count", int(value)
    if isinstance(value, (float, np.floating)):
        if 0.0 < value < 1.0:
            return "fraction", float(value)
        if value > 1.0 and float(value).is_integer():
            return "count", int(value)
    raise ValueError(f"`{key}`={value!r} is neither a fraction of the classes in (0, 1) "
                     "(e.g. 0.5) nor a whole count of classes >= 1 (e.g. 136, also as 136.0).")


def split_classes(labels: np.ndarray, train_classes: float | int = 0.5, *,
                  key: str = "train_classes") -> tuple[np.ndarray, np.ndarray]:
    """Class-disjoint split: the first classes (in sorted order) train, the rest test.

    Args:
      labels: integer labels, shape [N].
      train_classes: a fraction of the classes in (0, 1) (rounded to the nearest count) or
        a count of classes (an int >= 1, or a whole float > 1 such as 136.0).
      key: the name errors give ``train_classes`` (``"data.train_classes"`` from a config).

    Returns:
      ``(train_idx, test_idx)``: int64 indices into ``labels``, each ascending; together
      they cover every row once and share no class.

    Raises:
      ValueError: if ``train_classes`` has neither form, or either side would get no class.

    Examples:
      >>> split_classes(np.array([3, 1, 2, 1, 4]), 0.5)
      (array([1, 2, 3]), array([0, 4]))
      >>> split_classes(np.array([3, 1, 2, 1, 4]), 3.0)  # a count, as the command line gives it
      (array([0, 1, 2, 3]), array([4]))
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    kind, value = parse_train_classes(train_classes, key)
    n_train = int(np.floor(value * len(classes) + 0.5)) if kind == "fraction" else value
    if not 0 < n_train < len(classes):
        raise ValueError(f"`{key}`={train_classes} leaves {n_train} of {len(classes)} "
                         "classes for training; both train and test need at least one class.")
    train_mask = np.isin(labels, classes[:n_train])
    return np.flatnonzero(train_mask), np.flatnonzero(~train_mask)


# ----------------------------------------------------------------------------- loaders


@dataclasses.dataclass
class Loaded:
    """What a loader returns: the training store and labels, and the evaluation splits."""
    train_images: Any
    train_labels: np.ndarray
    eval_images: dict[str, tuple[Any, np.ndarray]]
    channels: int
    native_hw: tuple[int, int] | None   # set for in-memory arrays of one size


def require(cfg: Mapping[str, Any], key: str, what: str) -> Any:
    """``cfg[key]``, or a one-line error saying the source needs it."""
    if cfg.get(key) in (None, ""):
        raise ValueError(f"data source {cfg['source']!r} needs data.{key} ({what}): set "
                         f"--config.data.{key}=...")
    return cfg[key]


def cap(n: int, cfg: Mapping[str, Any]) -> int:
    """``n`` limited to ``data.max_examples`` when that is set."""
    m = cfg.get("max_examples")
    return n if m is None else min(n, int(m))


def as_nhwc(images: np.ndarray, name: str) -> np.ndarray:
    """``images`` as uint8 [N, H, W, C] with C in {1, 3}, or a ValueError naming ``name``."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"`{name}` must be uint8 [N, H, W] or [N, H, W, C] with C in (1, 3); "
                         f"got shape {images.shape}.")
    if images.dtype != np.uint8:
        raise ValueError(f"`{name}` must have dtype uint8; got {images.dtype}.")
    return images


def _array_split(images: np.ndarray, labels: np.ndarray, cfg) -> Loaded:
    n = cap(len(labels), cfg)
    images, labels = images[:n], np.asarray(labels[:n]).astype(np.int32)
    train_idx, test_idx = split_classes(labels, cfg["train_classes"], key="data.train_classes")
    return Loaded(ArrayImages(images[train_idx]), labels[train_idx],
                  {"test": (ArrayImages(images[test_idx]), labels[test_idx])},
                  images.shape[-1], tuple(images.shape[1:3]))


def load_digits(cfg) -> Loaded:
    from sklearn.datasets import load_digits as sk_load_digits  # lazy: slow to import
    digits = sk_load_digits()
    # Values are 0..16 (counts of a 4x4 block); scale to the 0..255 of every other source.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return _array_split(images, digits.target, cfg)


def load_glyphs(cfg) -> Loaded:
    from hnm.data import glyphs  # lazy: renders (or reads the cache) only for this source
    out = {}
    for split in ("train", "test"):
        images, labels = glyphs.load_glyphs(split, cache_dir=cfg.get("cache_dir"))
        images = as_nhwc(images, f"glyphs {split} images")
        n = cap(len(labels), cfg)
        out[split] = (ArrayImages(images[:n]), np.asarray(labels[:n], np.int32))
    train_images, train_labels = out.pop("train")
    first = train_images.images
    return Loaded(train_images, train_labels, out, first.shape[-1], tuple(first.shape[1:3]))


_NPZ_EXPECTED = "an .npz with arrays `images` uint8 [N, H, W(, C)] and `labels` int [N]"


def load_npz(cfg) -> Loaded:
    path = require(cfg, "path", "the .npz file")
    if not os.path.isfile(path):
        raise DataNotFoundError(f"data.path={path!r} is not a file (source 'npz' expects "
                                f"{_NPZ_EXPECTED}).")
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"data.path={path!r} is not readable as {_NPZ_EXPECTED} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})."
                         ) from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"data.path={path!r} holds one array, not {_NPZ_EXPECTED}.")
    with f:
        missing = [k for k in NPZ_KEYS if k not in f.files]
        if missing:
            raise ValueError(f"data.path={path!r} lacks the arrays {missing}: expected "
                             f"{_NPZ_EXPECTED}; it has {f.files}.")
        try:
            images, labels = f["images"], f["labels"]
        except ValueError as e:  # object arrays need pickle, which is never allowed
            raise ValueError(f"data.path={path!r}: {e} (expected {_NPZ_EXPECTED}).") from e
    images = as_nhwc(images, "images (npz)")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype,
                                                                            np.integer):
        raise ValueError(f"`labels` (npz) must be integers [N] with N = {len(images)} images; "
                         f"got shape {labels.shape} and dtype {labels.dtype}.")
    return _array_split(images, labels, cfg)


def load_folder(cfg) -> Loaded:
    root = require(cfg, "path", "the image folder")
    if not os.path.isdir(root):
        raise DataNotFoundError(f"data.path={root!r} is not a directory (source 'folder' "
                                "expects path/<class name>/<image files>).")
    class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for label, name in enumerate(class_names):
        for file in sorted(os.listdir(os.path.join(root, name))):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(root, name, file))
                labels.append(label)
    if not paths:
        raise DataNotFoundError(f"data.path={root!r} holds no class sub-folders with images "
                                f"({', '.join(IMAGE_EXTENSIONS)}).")
    n = cap(len(paths), cfg)
    paths, labels = np.array(paths[:n]), np.array(labels[:n], np.int32)
    train_idx, test_idx = split_classes(labels, cfg["train_classes"], key="data.train_classes")
    ch = cfg["channels"]
    return Loaded(file_images(paths[train_idx], ch), labels[train_idx],
                  {"test": (file_images(paths[test_idx], ch), labels[test_idx])}, ch, None)


def load_inshop(cfg) -> Loaded:
    root = require(cfg, "path", "the In-Shop root")
    part = os.path.join(root, INSHOP_PARTITION_FILE)
    if not os.path.isfile(part):
        raise DataNotFoundError(
            f"data.path={root!r} lacks {INSHOP_PARTITION_FILE} (DeepFashion In-Shop must be "
            "downloaded by hand: set --config.data.path to the folder that holds "
            f"{INSHOP_PARTITION_FILE} and img/).")
    with open(part) as f:
        lines = f.read().splitlines()[2:]  # line 1: the count; line 2: the column names
    rows = [line.split() for line in lines if line.strip()]
    bad = [r for r in rows if len(r) != 3 or r[2] not in ("train", "query", "gallery")]
    if bad:
        raise ValueError(f"{part}: expected 'image_name item_id train|query|gallery' lines; "
                         f"got {' '.join(bad[0])!r}.")
    item_ids = sorted({r[1] for r in rows})
    label_of = {item: i for i, item in enumerate(item_ids)}  # one numbering for all splits
    ch, out = cfg["channels"], {}
    for split in ("train", "query", "gallery"):
        sel = [r for r in rows if r[2] == split][:cap(len(rows), cfg)]
        paths = [os.path.join(root, r[0]) for r in sel]
        out[split] = (file_images(paths, ch), np.array([label_of[r[1]] for r in sel],
                                                        np.int32))
    train_images, train_labels = out.pop("train")
    return Loaded(train_images, train_labels, out, ch, None)
