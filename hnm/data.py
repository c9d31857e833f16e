r"""Data: class-disjoint retrieval splits and P x K class-balanced training batches.

A training batch holds :math:`P` classes with :math:`K` images each (``classes_per_batch``,
``samples_per_class``), laid out class-major: rows ``[j K, (j + 1) K)`` are the :math:`K` images
of the batch's j-th class. Reshaped to ``[devices, P K / devices, ...]`` every device's slice
then holds :math:`P / \text{devices}` whole classes, so every anchor has positives on its own
device (``STYLE.md`` §6). The sampler is pure NumPy and seeded: the batches are a function of
``(seed, epoch, batch_in_epoch)`` only, and the :class:`SamplerState` that goes into the
checkpoint is those two integers, so a resumed run sees exactly the batches (and the random
crops and flips) of an uninterrupted one.

Evaluation is zero-shot retrieval on classes never seen in training (``SCIENCE.md`` §1):
a ``"test"`` set evaluated leave-one-out (CUB, Cars, SOP, digits, glyphs, npz, folder), or
``"query"`` + ``"gallery"`` sets (In-Shop).

Sources (``data_cfg.source``):

- ``"digits"``: scikit-learn's ``load_digits`` (1,797 8x8 images, 10 classes, values
  0..16 scaled to 0..255), digits 0-4 train, 5-9 test. No download, no TensorFlow.
- ``"glyphs"``: ``hnm.glyphs.load_glyphs`` (synthetic many-class glyphs, its own
  class-disjoint train/test).
- ``"npz"``: a file with ``images`` uint8 [N, H, W] or [N, H, W, C] and ``labels`` [N].
- ``"folder"``: ``path/<class name>/<image files>``; classes sorted by name.
- ``"tfds"``: ``caltech_birds2011``, ``cars196`` (train and test splits merged and re-split
  by class: the first 100 / 98 classes train, the rest test), ``stanford_online_products``
  (its own class-disjoint split). Other builders work with ``label_key`` and ``resplit``.
- ``"inshop"``: DeepFashion In-Shop from a manual download: ``path/list_eval_partition.txt``
  and the images it names under ``path``.

For npz and folder the class split is the sorted list of classes, the first
``train_classes`` (a fraction, default 0.5, or a count) for training and the rest for test.

How images are fetched by index (the sampler needs labels up front, images on demand):

- digits, glyphs, npz: the whole uint8 array lives in memory.
- folder, inshop: only the file paths live in memory; each batch decodes its files with
  PIL in a thread pool (``num_workers``) while the previous step trains (one batch of
  look-ahead, ``prefetch``). Fine for local disks; a network file system will be slow.
- tfds: images are read *encoded* (``tfds.decode.SkipDecoding`` on the image feature and
  ``PartialDecoding`` so segmentation masks and boxes are never read) and decoded with PIL
  only when a batch needs them. With ``tfds_access="data_source"`` the images are read by
  index from ``tfds.data_source`` (random access; needs the data prepared with
  ``download_and_prepare_kwargs={"file_format": "array_record"}``), holding only labels in
  memory. With ``"cache"`` one sequential pass keeps every encoded image in memory (CUB about
  1.1 GB, Cars about 1.9 GB, SOP about 3 GB of JPEG bytes; ``cache_max_bytes``, default
  8 GiB, stops with a clear error beyond that). ``"auto"`` (the default) uses the data source
  when the prepared files allow random access and the cache otherwise. Both ways read every
  record once at start-up to learn the labels (the labels are stored inside the records).

Pre-processing follows the official SCT recipe (torchvision ``Resize(int)`` semantics: the
shorter side is scaled): train: resize the shorter side to ``train_resize`` (281), random
crop ``image_size`` x ``image_size`` (256) and a random horizontal flip (``augment``); eval:
resize the shorter side to ``eval_resize`` (default ``image_size``), centre crop
``image_size``. With ``image_size=None`` (the default for the in-memory sources) images keep
their native size and ``augment`` is only the flip (plus a crop if ``train_resize`` is given).
Augmentation randomness is drawn per row of the *global* batch from ``(seed, epoch, batch)``,
so it does not depend on how many processes share the batch.

References:
  Xuan, Stylianou, Liu, Pless. Hard negative examples are hard, but useful. ECCV 2020.
  (official code: github.com/littleredxh/HardNegative)
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import threading
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

SOURCES = ("digits", "glyphs", "npz", "folder", "tfds", "inshop")
# Label feature of the tfds builders hnm knows, and whether their splits must be re-split by
# class (CUB and Cars ship a per-image classification split over all classes).
TFDS_LABEL_KEYS = {"caltech_birds2011": "label", "cars196": "label",
                   "stanford_online_products": "class_id"}
TFDS_RESPLIT = {"caltech_birds2011": True, "cars196": True, "stanford_online_products": False}
DEFAULT_IMAGE_SIZE = 256             # the official recipe's crop
TRAIN_RESIZE_FACTOR = 1.1            # official: Resize(int(256 * 1.1)) = 281 before the crop
DEFAULT_CACHE_MAX_BYTES = 8 * 2**30
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
INSHOP_PARTITION_FILE = "list_eval_partition.txt"
PAD_LABEL = -1                       # label of the padding rows of an evaluation batch

_KNOWN_KEYS = frozenset({
    "source", "name", "path", "classes_per_batch", "samples_per_class", "image_size",
    "train_resize", "eval_resize", "augment", "pad_classes", "train_classes", "data_dir",
    "max_examples", "cache_dir", "label_key", "resplit", "tfds_access", "download",
    "cache_max_bytes", "channels", "num_workers", "prefetch"})
_UNSET_IF_FALSY = ("name", "path", "image_size", "train_resize", "eval_resize", "data_dir",
                   "max_examples", "cache_dir", "label_key")
_DEFAULTS = {"classes_per_batch": 8, "samples_per_class": 2, "augment": None,
             "pad_classes": False, "train_classes": 0.5, "tfds_access": "auto",
             "download": True, "cache_max_bytes": DEFAULT_CACHE_MAX_BYTES, "channels": 3,
             "num_workers": 8, "prefetch": None}


class SamplerState(NamedTuple):
    """Where the P x K sampler stands: the next batch is ``batch_in_epoch`` of ``epoch``.

    Two integers (NumPy int64 scalars), saved with the checkpoint; ``SamplerState(*ints)``
    rebuilds it.
    """
    epoch: np.int64
    batch_in_epoch: np.int64


# ----------------------------------------------------------------------------- class splits


def split_classes(labels: np.ndarray, train_classes: float | int = 0.5
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Class-disjoint split: the first classes (in sorted order) train, the rest test.

    Args:
      labels: integer labels, shape [N].
      train_classes: a fraction of the classes in (0, 1) (rounded to the nearest count) or
        a count of classes (an int >= 1).

    Returns:
      ``(train_idx, test_idx)``: int64 indices into ``labels``, each ascending; together
      they cover every row once and share no class.

    Raises:
      ValueError: if either side would get no class.

    Examples:
      >>> split_classes(np.array([3, 1, 2, 1, 4]), 0.5)
      (array([1, 2, 3]), array([0, 4]))
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if isinstance(train_classes, (float, np.floating)):
        if not 0.0 < train_classes < 1.0:
            raise ValueError(f"`train_classes` must be a fraction in (0, 1) (a float) or a "
                             f"count (an int); got {train_classes}.")
        n_train = int(np.floor(train_classes * len(classes) + 0.5))
    else:
        n_train = int(train_classes)
    if not 0 < n_train < len(classes):
        raise ValueError(f"`train_classes`={train_classes} leaves {n_train} of {len(classes)} "
                         "classes for training; both train and test need at least one class.")
    train_mask = np.isin(labels, classes[:n_train])
    return np.flatnonzero(train_mask), np.flatnonzero(~train_mask)


# ----------------------------------------------------------------------------- P x K sampler


def max_batches(chunk_counts: np.ndarray, classes_per_batch: int) -> int:
    r"""The most batches of P distinct classes that per-class chunk counts allow.

    .. math:: B^* = \max \{B : \textstyle\sum_c \min(n_c, B) \ge P B\}

    In B batches a class can give at most one chunk per batch, so at most
    :math:`\min(n_c, B)` chunks; the bound is attained (a flow argument), and
    :func:`epoch_plan` attains it.

    Args:
      chunk_counts: chunks of K examples each class holds, shape [C].
      classes_per_batch: P.

    Returns:
      :math:`B^*` (0 when fewer than P classes have a chunk).
    """
    counts = np.asarray(chunk_counts, np.int64)
    lo, hi = 0, int(counts.sum()) // classes_per_batch
    while lo < hi:  # the condition holds for every B <= B*: sum min(n, B) / B is non-increasing
        mid = (lo + hi + 1) // 2
        if np.minimum(counts, mid).sum() >= classes_per_batch * mid:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    # Only (seed, epoch, stream) enter: this is what makes resuming exact.
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, epoch, stream]))


def epoch_plan(class_examples: Sequence[np.ndarray], classes_per_batch: int,
               samples_per_class: int, *, seed: int, epoch: int,
               pad_classes: bool = False) -> np.ndarray:
    r"""The example indices of every batch of one epoch, shape [B, P, K].

    Each class's examples are shuffled and cut into chunks of K. Without ``pad_classes``
    the last ``n_c mod K`` examples of the shuffle (different ones each epoch) are left out
    and classes smaller than K give no chunk; with it the last partial chunk is completed by
    drawing other examples of the class (with replacement only when the class has fewer than
    K examples), so every example appears at least once per epoch. Batches then draw P
    distinct classes, one chunk each, weighted by the chunks a class has left, except that a
    class is forced in when skipping it would make :math:`B^*` (:func:`max_batches`) batches
    impossible. Chunks that do not fit into :math:`B^*` full batches (fewer than P when
    classes are balanced) wait for a later epoch. Within a batch the classes are in random
    order, so device slices get random classes.

    Args:
      class_examples: per class, the indices of its examples (each [n_c]).
      classes_per_batch: P.
      samples_per_class: K.
      seed: an integer seed (any sign).
      epoch: the epoch; plans of different epochs are independent.
      pad_classes: complete partial chunks by resampling within the class.

    Returns:
      int64 array [B, P, K]; ``plan[b, j]`` are the K examples of the j-th class of batch b.
    """
    P, K = classes_per_batch, samples_per_class
    rng = _epoch_rng(seed, epoch, 0)
    chunks = []
    for examples in class_examples:
        perm = rng.permutation(np.asarray(examples, np.int64))
        n, rem = len(perm), len(perm) % K
        if pad_classes and rem:
            full = perm[:n - rem]
            extra = (rng.choice(full, K - rem, replace=False) if len(full) >= K - rem
                     else rng.choice(perm, K - rem, replace=True))
            perm = np.concatenate([perm, extra])
        elif rem:
            perm = perm[:n - rem]
        chunks.append(perm.reshape(-1, K))
    counts = np.array([len(c) for c in chunks], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    table = np.concatenate(chunks) if chunks else np.zeros((0, K), np.int64)
    num_b = max_batches(counts, P)
    plan = np.empty((num_b, P, K), np.int64)
    used = np.zeros_like(counts)
    for b in range(num_b):
        left = num_b - b
        big = counts >= left
        # Slack of the feasibility condition sum min(n, R) >= P R: a batch that takes fewer
        # than (#big - slack) big classes leaves the remaining R - 1 batches infeasible.
        slack = int(np.minimum(counts, left).sum()) - P * left
        n_forced = max(0, int(big.sum()) - slack)
        forced = rng.choice(np.flatnonzero(big), n_forced, replace=False)
        # Weighted sampling without replacement (exponential keys / weight, smallest first).
        keys = rng.exponential(size=len(counts)) / np.maximum(counts, 1)
        keys[counts == 0] = np.inf
        keys[forced] = -1.0
        chosen = rng.permutation(np.argpartition(keys, P - 1)[:P])
        plan[b] = table[offsets[chosen] + used[chosen]]
        used[chosen] += 1
        counts[chosen] -= 1
    return plan


class PKSampler:
    """Seeded P x K sampler over training labels; pure NumPy and stateless between calls.

    ``steps_per_epoch`` is :math:`B^*` of :func:`max_batches` for the per-class chunk counts
    (``floor(n_c / K)``, or ``ceil(n_c / K)`` with ``pad_classes``): the number of full
    batches of P distinct classes that one pass over the training set allows. It does not
    depend on the seed or the epoch.

    With ``process_count > 1`` every process computes the same global plan and takes its
    contiguous block of ``P / process_count`` classes (``P K / process_count`` rows).
    """

    def __init__(self, labels: np.ndarray, classes_per_batch: int, samples_per_class: int, *,
                 seed: int, pad_classes: bool = False, process_index: int = 0,
                 process_count: int = 1):
        labels = np.asarray(labels)
        self.classes, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(self.classes)))[:-1]
        self.class_examples = np.split(order, bounds)
        self.P, self.K, self.seed, self.pad_classes = (classes_per_batch, samples_per_class,
                                                       int(seed), bool(pad_classes))
        self.process_index, self.process_count = process_index, process_count
        n = np.array([len(e) for e in self.class_examples])
        self.chunk_counts = -(-n // self.K) if self.pad_classes else n // self.K
        self.steps_per_epoch = max_batches(self.chunk_counts, self.P)
        self._plan: tuple[int, np.ndarray] | None = None

    def plan(self, epoch: int) -> np.ndarray:
        """The global plan [B, P, K] of ``epoch`` (the latest one is cached)."""
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, epoch_plan(self.class_examples, self.P, self.K, seed=self.seed,
                                            epoch=epoch, pad_classes=self.pad_classes))
        return self._plan[1]

    def batch_indices(self, state: SamplerState) -> tuple[np.ndarray, SamplerState]:
        """This process's example indices [P K / process_count] and the next state."""
        epoch, b = int(state.epoch), int(state.batch_in_epoch)
        if not 0 <= b < self.steps_per_epoch or epoch < 0:
            raise ValueError(f"`state`={tuple(int(x) for x in state)} is outside the sampler "
                             f"(epoch >= 0, 0 <= batch_in_epoch < {self.steps_per_epoch}).")
        per_process = self.P // self.process_count
        rows = self.plan(epoch)[b, self.process_index * per_process:
                                (self.process_index + 1) * per_process]
        b += 1
        if b == self.steps_per_epoch:
            epoch, b = epoch + 1, 0
        return rows.reshape(-1), SamplerState(np.int64(epoch), np.int64(b))


# ----------------------------------------------------------------------------- pre-processing


def _pil_mode(channels: int) -> str:
    return {1: "L", 3: "RGB"}[channels]


def decode_image(data: bytes, channels: int = 3) -> np.ndarray:
    """Decodes encoded image bytes (JPEG, PNG, ...) with PIL to uint8 [H, W, channels]."""
    from PIL import Image  # lazy: only the file and tfds sources decode
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert(_pil_mode(channels)))
    return arr[..., None] if arr.ndim == 2 else arr


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize so the shorter side is ``size`` (torchvision ``Resize(int)``).

    Args:
      image: uint8 [H, W, C] with C in {1, 3}.
      size: the new shorter side; the longer one is ``int(size * long / short)``.

    Returns:
      uint8 [H', W', C]; ``image`` itself when its shorter side already is ``size``.
    """
    h, w, c = image.shape
    if min(h, w) == size:
        return image
    from PIL import Image
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    out = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR))
    return out[..., None] if out.ndim == 2 else out


def center_crop(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The central ``hw`` window of ``image`` [H, W, C] (top-left rounding down)."""
    h, w = image.shape[:2]
    top, left = (h - hw[0]) // 2, (w - hw[1]) // 2
    return image[top:top + hw[0], left:left + hw[1]]


def crop_and_flip(image: np.ndarray, hw: tuple[int, int], u: np.ndarray) -> np.ndarray:
    """Crop at a position given by ``u[0], u[1]`` in [0, 1); mirror when ``u[2] < 0.5``.

    The random numbers come in as an argument so the caller controls (and tests) them.
    """
    h, w = image.shape[:2]
    top, left = int(u[0] * (h - hw[0] + 1)), int(u[1] * (w - hw[1] + 1))
    out = image[top:top + hw[0], left:left + hw[1]]
    return out[:, ::-1] if u[2] < 0.5 else out


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Per-image pre-processing: ``image_size=None`` keeps the native size.

    Attributes:
      image_size: output side S (square S x S output), or None for the native size.
      train_resize: training resize of the shorter side before the random crop, or None.
      eval_resize: evaluation resize of the shorter side before the centre crop.
      augment: random crop (when resized larger than the output) and horizontal flip.
    """
    image_size: int | None
    train_resize: int | None
    eval_resize: int | None
    augment: bool

    def _out_hw(self, image: np.ndarray) -> tuple[int, int]:
        return ((self.image_size, self.image_size) if self.image_size
                else tuple(image.shape[:2]))

    def eval(self, image: np.ndarray) -> np.ndarray:
        """Deterministic: resize the shorter side to ``eval_resize``, centre crop."""
        hw = self._out_hw(image)
        if self.eval_resize:
            image = resize_shorter(image, self.eval_resize)
        return center_crop(image, hw)

    def train(self, image: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Resize to ``train_resize``, crop at ``u[:2]``, flip by ``u[2]``; or :meth:`eval`."""
        if not self.augment:
            return self.eval(image)
        hw = self._out_hw(image)
        if self.train_resize:
            image = resize_shorter(image, self.train_resize)
        return crop_and_flip(image, hw, u)


# ----------------------------------------------------------------------------- image stores


class ArrayImages:
    """Images held in memory as one uint8 array [N, H, W, C]."""
    decodes = False

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def get(self, i: int) -> np.ndarray:
        return self.images[i]


class EncodedImages:
    """Images fetched as encoded bytes by ``read(i)`` and decoded with PIL on demand."""
    decodes = True

    def __init__(self, read: Callable[[int], bytes], size: int, channels: int = 3):
        self._read, self._size, self.channels = read, size, channels

    def __len__(self) -> int:
        return self._size

    def get(self, i: int) -> np.ndarray:
        return decode_image(self._read(int(i)), self.channels)


class SubsetImages:
    """The rows ``indices`` of another store (a class split of a merged source)."""

    def __init__(self, store, indices: np.ndarray):
        self.store, self.indices = store, np.asarray(indices)
        self.decodes = store.decodes

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, i: int) -> np.ndarray:
        return self.store.get(self.indices[i])


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _file_images(paths: Sequence[str], channels: int) -> EncodedImages:
    paths = list(paths)
    return EncodedImages(lambda i: _read_file(paths[i]), len(paths), channels)


# ----------------------------------------------------------------------------- eval sets


@dataclasses.dataclass
class EvalSet:
    """One evaluation split: labels in memory, images fetched and pre-processed per batch.

    Attributes:
      labels: int32 [N].
      images: a store with ``get(i) -> uint8 [H, W, C]``.
      preprocess: deterministic per-image function.
    """
    labels: np.ndarray
    images: Any
    preprocess: Callable[[np.ndarray], np.ndarray]
    image_shape: tuple[int, int, int]
    num_workers: int = 1

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches in order: ``images`` uint8 [batch_size, H, W, C], ``labels`` int32, ``mask``.

        The last batch is padded to ``batch_size`` with zero images, label ``PAD_LABEL`` and
        ``mask`` False, so every batch has one shape (one compilation); real rows have
        ``mask`` True.

        Raises:
          ValueError: if ``batch_size`` < 1.
        """
        if int(batch_size) < 1:
            raise ValueError(f"`batch_size` must be >= 1; got {batch_size}.")
        n = self.num_examples
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n))
            images = _map(lambda i: self.preprocess(self.images.get(i)), idx,
                          self.num_workers if self.images.decodes else 1)
            out = np.zeros((batch_size, *self.image_shape), np.uint8)
            out[:len(idx)] = images
            labels = np.full((batch_size,), PAD_LABEL, np.int32)
            labels[:len(idx)] = self.labels[idx]
            mask = np.arange(batch_size) < len(idx)
            yield {"images": out, "labels": labels, "mask": mask}


_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def _map(fn: Callable[[int], np.ndarray], idx: np.ndarray, workers: int) -> np.ndarray:
    """``np.stack([fn(i) for i in idx])``, in a thread pool when decoding (PIL frees the GIL)."""
    if workers <= 1 or len(idx) <= 1:
        return np.stack([fn(i) for i in idx])
    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS[workers] = concurrent.futures.ThreadPoolExecutor(workers)
    return np.stack(list(pool.map(fn, idx)))


# ----------------------------------------------------------------------------- the data set


class Dataset:
    """Training batches from a :class:`PKSampler` plus the evaluation sets.

    Attributes:
      image_shape: (H, W, C) of every batch.
      num_train_classes, num_train_examples: of the training split (before dropping classes
        smaller than K).
      steps_per_epoch: batches per epoch (see :class:`PKSampler`).
      batch_size: rows this process gets per step, ``P K / process_count``.
    """

    def __init__(self, train_images, train_labels: np.ndarray, eval_sets: dict[str, EvalSet],
                 sampler: PKSampler, preprocess: Preprocess, image_shape: tuple[int, int, int],
                 *, seed: int, num_workers: int = 1, prefetch: bool = False):
        self._images, self.train_labels = train_images, np.asarray(train_labels, np.int32)
        self._eval_sets, self.sampler, self.preprocess = eval_sets, sampler, preprocess
        self.image_shape, self.seed = tuple(image_shape), int(seed)
        self.num_train_classes = len(sampler.classes)
        self.num_train_examples = len(self.train_labels)
        self.steps_per_epoch = sampler.steps_per_epoch
        self.batch_size = sampler.P * sampler.K // sampler.process_count
        self._workers = num_workers if train_images.decodes else 1
        self._prefetch = prefetch
        self._pending: tuple[tuple[int, int], concurrent.futures.Future] | None = None
        self._prefetcher = (concurrent.futures.ThreadPoolExecutor(1) if prefetch else None)

    def init_sampler_state(self) -> SamplerState:
        """The state of a fresh run: epoch 0, batch 0."""
        return SamplerState(np.int64(0), np.int64(0))

    def _make_batch(self, state: SamplerState) -> dict[str, np.ndarray]:
        idx, _ = self.sampler.batch_indices(state)
        s = self.sampler
        # One uniform triple per row of the *global* batch (crop y, crop x, flip), sliced like
        # the rows: augmentation does not depend on the number of processes.
        u = _epoch_rng(self.seed, int(state.epoch), 1 + int(state.batch_in_epoch)).random(
            (s.P * s.K, 3))
        u = u.reshape(s.process_count, -1, 3)[s.process_index]
        images = _map(lambda j: self.preprocess.train(self._images.get(idx[j]), u[j]),
                      np.arange(len(idx)), self._workers)
        return {"images": images, "labels": self.train_labels[idx]}

    def train_batch(self, state: SamplerState) -> tuple[dict[str, np.ndarray], SamplerState]:
        """The batch at ``state`` and the state after it.

        Returns:
          ``({"images": uint8 [B, H, W, C], "labels": int32 [B]}, next_state)`` with
          ``B = batch_size``; rows class-major (K consecutive rows per class).
        """
        key = (int(state.epoch), int(state.batch_in_epoch))
        if self._pending is not None and self._pending[0] == key:
            batch = self._pending[1].result()
        else:
            batch = self._make_batch(state)
        _, new_state = self.sampler.batch_indices(state)
        if self._prefetcher is not None:  # one batch of look-ahead while the step trains
            self._pending = ((int(new_state.epoch), int(new_state.batch_in_epoch)),
                             self._prefetcher.submit(self._make_batch, new_state))
        return batch, new_state

    def eval_sets(self) -> dict[str, EvalSet]:
        """``{"test": ...}`` (leave-one-out) or ``{"query": ..., "gallery": ...}`` (In-Shop)."""
        return dict(self._eval_sets)


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass
class _Loaded:
    train_images: Any
    train_labels: np.ndarray
    eval_images: dict[str, tuple[Any, np.ndarray]]
    channels: int
    native_hw: tuple[int, int] | None   # set for in-memory arrays of one size


def _as_nhwc(images: np.ndarray, name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"`{name}` must be uint8 [N, H, W] or [N, H, W, C] with C in (1, 3); "
                         f"got shape {images.shape}.")
    if images.dtype != np.uint8:
        raise ValueError(f"`{name}` must have dtype uint8; got {images.dtype}.")
    return images


def _cap(n: int, cfg: Mapping[str, Any]) -> int:
    m = cfg.get("max_examples")
    return n if m is None else min(n, int(m))


def _array_split(images: np.ndarray, labels: np.ndarray, cfg) -> _Loaded:
    n = _cap(len(labels), cfg)
    images, labels = images[:n], np.asarray(labels[:n]).astype(np.int32)
    train_idx, test_idx = split_classes(labels, cfg["train_classes"])
    return _Loaded(ArrayImages(images[train_idx]), labels[train_idx],
                   {"test": (ArrayImages(images[test_idx]), labels[test_idx])},
                   images.shape[-1], tuple(images.shape[1:3]))


def _load_digits(cfg) -> _Loaded:
    from sklearn.datasets import load_digits  # lazy: scikit-learn is slow to import
    digits = load_digits()
    # Values are 0..16 (counts of a 4x4 block); scale to the 0..255 of every other source.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return _array_split(images, digits.target, cfg)


def _load_glyphs(cfg) -> _Loaded:
    from hnm import glyphs  # lazy: another module, only for this source
    out = {}
    for split in ("train", "test"):
        images, labels = glyphs.load_glyphs(split, cache_dir=cfg.get("cache_dir"))
        images = _as_nhwc(images, f"glyphs {split} images")
        n = _cap(len(labels), cfg)
        out[split] = (ArrayImages(images[:n]), np.asarray(labels[:n], np.int32))
    train_images, train_labels = out.pop("train")
    first = train_images.images
    return _Loaded(train_images, train_labels, out, first.shape[-1], tuple(first.shape[1:3]))


def _load_npz(cfg) -> _Loaded:
    path = _require(cfg, "path", "the .npz file")
    if not os.path.isfile(path):
        raise ValueError(f"`path`={path!r} is not a file.")
    with np.load(path) as f:
        missing = {"images", "labels"} - set(f.files)
        if missing:
            raise ValueError(f"`path`={path!r} lacks the arrays {sorted(missing)}; it has "
                             f"{f.files}.")
        images, labels = f["images"], f["labels"]
    images = _as_nhwc(images, "images (npz)")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype,
                                                                            np.integer):
        raise ValueError(f"`labels` (npz) must be integers [N] with N = {len(images)} images; "
                         f"got shape {labels.shape} and dtype {labels.dtype}.")
    return _array_split(images, labels, cfg)


def _load_folder(cfg) -> _Loaded:
    root = _require(cfg, "path", "the image folder")
    if not os.path.isdir(root):
        raise ValueError(f"`path`={root!r} is not a directory.")
    class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for label, name in enumerate(class_names):
        for file in sorted(os.listdir(os.path.join(root, name))):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(root, name, file))
                labels.append(label)
    if not paths:
        raise ValueError(f"`path`={root!r} holds no class sub-folders with images "
                         f"({', '.join(IMAGE_EXTENSIONS)}).")
    n = _cap(len(paths), cfg)
    paths, labels = np.array(paths[:n]), np.array(labels[:n], np.int32)
    train_idx, test_idx = split_classes(labels, cfg["train_classes"])
    ch = cfg["channels"]
    return _Loaded(_file_images(paths[train_idx], ch), labels[train_idx],
                   {"test": (_file_images(paths[test_idx], ch), labels[test_idx])}, ch, None)


def _load_inshop(cfg) -> _Loaded:
    root = _require(cfg, "path", "the In-Shop root")
    part = os.path.join(root, INSHOP_PARTITION_FILE)
    if not os.path.isfile(part):
        raise ValueError(f"`path`={root!r} lacks {INSHOP_PARTITION_FILE} (DeepFashion In-Shop "
                         "must be downloaded by hand; see the module docstring).")
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
        sel = [r for r in rows if r[2] == split][:_cap(len(rows), cfg)]
        paths = [os.path.join(root, r[0]) for r in sel]
        out[split] = (_file_images(paths, ch), np.array([label_of[r[1]] for r in sel],
                                                         np.int32))
    train_images, train_labels = out.pop("train")
    return _Loaded(train_images, train_labels, out, ch, None)


def _import_tfds():
    """tensorflow_datasets, imported lazily (importing TensorFlow costs seconds).

    TensorFlow only reads files here; hiding accelerators from it on first import keeps it
    from reserving GPU memory that JAX needs.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices; nothing to change
        pass
    return tfds


def tfds_decoders(label_key: str):
    """Reads only the image (still encoded) and the label: boxes and masks are never parsed."""
    tfds = _import_tfds()
    return tfds.decode.PartialDecoding({"image": True, label_key: True},
                                       decoders={"image": tfds.decode.SkipDecoding()})


def _tfds_split(name: str, split: str, cfg, label_key: str) -> tuple[EncodedImages, np.ndarray]:
    """One tfds split as (encoded image store, labels) by data source or in-memory cache."""
    tfds = _import_tfds()
    access, ch = cfg["tfds_access"], cfg["channels"]
    kw = dict(split=split, data_dir=cfg.get("data_dir"), download=cfg["download"],
              decoders=tfds_decoders(label_key))
    if access in ("auto", "data_source"):
        try:
            source = tfds.data_source(name, **kw)
        except (NotImplementedError, ValueError) as e:
            if access == "data_source":
                raise ValueError(
                    f"tfds `name`={name!r} has no random-access files; prepare it with "
                    "download_and_prepare_kwargs={'file_format': 'array_record'} or set "
                    f"`tfds_access`='cache' ({e})") from e
        else:
            n = _cap(len(source), cfg)
            labels = np.array([int(source[i][label_key]) for i in range(n)], np.int32)
            lock = threading.Lock()

            def read(i: int) -> bytes:
                # Reads are serialised (the reader's thread safety is not documented); the
                # decoding, which costs far more, still runs in parallel.
                with lock:
                    return source[i]["image"]
            return EncodedImages(read, n, ch), labels
    ds = tfds.load(name, **kw)
    if cfg.get("max_examples") is not None:
        ds = ds.take(int(cfg["max_examples"]))
    blobs, labels, total = [], [], 0
    for ex in tfds.as_numpy(ds):
        blobs.append(ex["image"])
        labels.append(int(ex[label_key]))
        total += len(ex["image"])
        if total > cfg["cache_max_bytes"]:
            raise ValueError(
                f"tfds {name}[{split}] needs more than `cache_max_bytes`="
                f"{cfg['cache_max_bytes']} of encoded images in memory; raise it or use "
                "`tfds_access`='data_source' on array_record files.")
    return EncodedImages(blobs.__getitem__, len(blobs), ch), np.array(labels, np.int32)


def _load_tfds(cfg) -> _Loaded:
    name = _require(cfg, "name", "the tfds builder")
    label_key = cfg.get("label_key") or TFDS_LABEL_KEYS.get(name)
    if label_key is None:
        raise ValueError(f"tfds `name`={name!r} is not one of {sorted(TFDS_LABEL_KEYS)}; give "
                         "`label_key` (and `resplit`) for another builder.")
    resplit = cfg.get("resplit")
    resplit = TFDS_RESPLIT.get(name, False) if resplit is None else bool(resplit)
    train_images, train_labels = _tfds_split(name, "train", cfg, label_key)
    test_images, test_labels = _tfds_split(name, "test", cfg, label_key)
    ch = cfg["channels"]
    if not resplit:
        return _Loaded(train_images, train_labels, {"test": (test_images, test_labels)}, ch,
                       None)
    merged, labels = merge_stores([train_images, test_images], [train_labels, test_labels])
    train_idx, test_idx = split_classes(labels, cfg["train_classes"])
    return _Loaded(SubsetImages(merged, train_idx), labels[train_idx],
                   {"test": (SubsetImages(merged, test_idx), labels[test_idx])}, ch, None)


def merge_stores(stores: Sequence[EncodedImages], labels: Sequence[np.ndarray]
                 ) -> tuple[EncodedImages, np.ndarray]:
    """Concatenates encoded stores (e.g. tfds train + test before a class re-split)."""
    which = np.concatenate([np.full(len(s), k) for k, s in enumerate(stores)])
    local = np.concatenate([np.arange(len(s)) for s in stores])
    merged = EncodedImages(lambda i: stores[which[i]]._read(int(local[i])), len(which),
                           stores[0].channels)
    return merged, np.concatenate(labels).astype(np.int32)


_LOADERS = {"digits": _load_digits, "glyphs": _load_glyphs, "npz": _load_npz,
            "folder": _load_folder, "tfds": _load_tfds, "inshop": _load_inshop}


# ----------------------------------------------------------------------------- build


def _require(cfg: Mapping[str, Any], key: str, what: str) -> Any:
    if cfg.get(key) in (None, ""):
        raise ValueError(f"data source {cfg['source']!r} needs `{key}` ({what}).")
    return cfg[key]


def _positive_int(cfg: Mapping[str, Any], key: str, minimum: int = 1) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{key}` must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def resolve_config(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``data_cfg`` as a plain dict with defaults filled in, checked before anything loads.

    ``""`` and ``0`` mean "not set" for the optional keys (``name``, ``path``, ``image_size``,
    ``train_resize``, ``eval_resize``, ``data_dir``, ``max_examples``, ``cache_dir``,
    ``label_key``), since a ``ConfigDict`` field cannot switch between None and a value.

    Raises:
      ValueError: naming the key, on an unknown key or source or an invalid value.
    """
    cfg = dict(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else data_cfg)
    unknown = sorted(set(cfg) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown data config keys {unknown}; known: {sorted(_KNOWN_KEYS)}.")
    for key in _UNSET_IF_FALSY:  # ConfigDicts hold "" / 0 where None is meant ("not set")
        if key in cfg and not isinstance(cfg[key], bool) and cfg[key] in ("", 0):
            cfg[key] = None
    source = cfg.get("source")
    if source not in SOURCES:
        raise ValueError(f"unknown data `source`={source!r}; expected one of {SOURCES}.")
    for key, value in _DEFAULTS.items():
        if cfg.get(key) is None:
            cfg[key] = value
    _positive_int(cfg, "classes_per_batch")
    # K = 1 gives batches without positives: every triplet would be invalid, the loss 0.
    _positive_int(cfg, "samples_per_class", 2)
    if source in ("folder", "tfds", "inshop") and cfg.get("image_size") is None:
        cfg["image_size"] = DEFAULT_IMAGE_SIZE
    size = cfg.get("image_size")
    if size is not None:
        _positive_int(cfg, "image_size")
        if cfg.get("train_resize") is None:
            cfg["train_resize"] = int(size * TRAIN_RESIZE_FACTOR)
        if cfg.get("eval_resize") is None:
            cfg["eval_resize"] = size
    for key in ("train_resize", "eval_resize"):
        if cfg.get(key) is not None:
            _positive_int(cfg, key)
            if size is not None and cfg[key] < size:
                raise ValueError(f"`{key}`={cfg[key]} must be >= `image_size`={size} (the crop "
                                 "is taken from the resized image).")
    if cfg["augment"] is None:  # the recipe's crop + flip for photos; off for digits/glyphs
        cfg["augment"] = source in ("folder", "tfds", "inshop")
    if cfg["channels"] not in (1, 3):
        raise ValueError(f"`channels` must be 1 or 3; got {cfg['channels']!r}.")
    if cfg["tfds_access"] not in ("auto", "cache", "data_source"):
        raise ValueError(f"`tfds_access` must be 'auto', 'cache' or 'data_source'; got "
                         f"{cfg['tfds_access']!r}.")
    if cfg.get("max_examples") is not None:
        _positive_int(cfg, "max_examples")
    if cfg["prefetch"] is None:  # look-ahead pays off only when batches are decoded
        cfg["prefetch"] = source in ("folder", "tfds", "inshop")
    return cfg


def check_sampler(labels: np.ndarray, classes_per_batch: int, samples_per_class: int,
                  pad_classes: bool) -> None:
    """Raises a one-line ValueError when the labels cannot fill a P x K batch."""
    counts = np.bincount(np.unique(np.asarray(labels), return_inverse=True)[1])
    P, K = classes_per_batch, samples_per_class
    if not pad_classes and counts.max(initial=0) < K:
        raise ValueError(f"`samples_per_class`={K} exceeds the largest training class "
                         f"({counts.max(initial=0)} examples); lower it or set `pad_classes`.")
    eligible = len(counts) if pad_classes else int((counts >= K).sum())
    if eligible < P:
        raise ValueError(f"`classes_per_batch`={P} but only {eligible} training classes "
                         f"{'exist' if pad_classes else f'have >= {K} examples'}.")


def build(data_cfg: Mapping[str, Any], *, seed: int, num_devices: int, process_index: int = 0,
          process_count: int = 1) -> Dataset:
    """Builds the training sampler and evaluation sets of ``data_cfg``.

    Args:
      data_cfg: a dict or ``ConfigDict``; keys in the module docstring and ``resolve_config``.
      seed: the run's seed; batches depend on ``(seed, epoch, batch_in_epoch)`` only.
      num_devices: devices of this process; each gets ``P / (num_devices * process_count)``
        whole classes.
      process_index, process_count: this process's block of the global batch.

    Returns:
      A :class:`Dataset`.

    Raises:
      ValueError: on an unknown source or key, P not divisible by the number of devices,
        K larger than every class (without ``pad_classes``), fewer than P usable classes.

    Examples:
      >>> ds = build({"source": "digits", "classes_per_batch": 4, "samples_per_class": 2},
      ...            seed=0, num_devices=2)
      >>> batch, state = ds.train_batch(ds.init_sampler_state())
      >>> batch["images"].shape, batch["labels"].shape, ds.image_shape
      ((8, 8, 8, 1), (8,), (8, 8, 1))
    """
    cfg = resolve_config(data_cfg)
    P, K = cfg["classes_per_batch"], cfg["samples_per_class"]
    for name, value in (("num_devices", num_devices), ("process_count", process_count)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"`process_index`={process_index} must lie in [0, {process_count}).")
    if P % (num_devices * process_count):
        raise ValueError(f"`classes_per_batch`={P} must be divisible by the {num_devices} x "
                         f"{process_count} devices (each device slice holds whole classes).")
    loaded = _LOADERS[cfg["source"]](cfg)
    check_sampler(loaded.train_labels, P, K, cfg["pad_classes"])
    sampler = PKSampler(loaded.train_labels, P, K, seed=seed, pad_classes=cfg["pad_classes"],
                        process_index=process_index, process_count=process_count)
    size = cfg.get("image_size")
    prep = Preprocess(size, cfg.get("train_resize"), cfg.get("eval_resize"),
                      bool(cfg["augment"]))
    hw = (size, size) if size else loaded.native_hw
    if hw is None:  # pragma: no cover - file sources always get a default image_size
        raise ValueError("`image_size` is required for this source.")
    image_shape = (*hw, loaded.channels)
    workers = _positive_int(cfg, "num_workers")
    eval_sets = {name: EvalSet(np.asarray(labels, np.int32), store, prep.eval, image_shape,
                               workers)
                 for name, (store, labels) in loaded.eval_images.items()}
    return Dataset(loaded.train_images, loaded.train_labels, eval_sets, sampler, prep,
                   image_shape, seed=seed, num_workers=workers, prefetch=bool(cfg["prefetch"]))
