"""Dataset assembly: :func:`build` turns ``config.data`` into a :class:`Dataset`.

A :class:`Dataset` draws training batches from a :class:`~hnm.data.sampler.PKSampler`, fetches
their images from the source's store and pre-processes them
(:class:`~hnm.data.preprocess.Preprocess`), with the random crops and flips drawn per row of
the *global* batch from ``(seed, epoch, batch)``, so they do not depend on how many processes
share the batch and a resumed run repeats them exactly. Evaluation sets (:class:`EvalSet`) yield
padded, masked batches of one shape.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from hnm.data import sources, tfds_source
from hnm.data.config import resolve_config
from hnm.data.preprocess import Preprocess
from hnm.data.sampler import PKSampler, SamplerState, check_sampler, epoch_rng
from hnm.data.stores import parallel_map

PAD_LABEL = -1                       # label of the padding rows of an evaluation batch

LOADERS = {"digits": sources.load_digits, "glyphs": sources.load_glyphs,
           "npz": sources.load_npz, "folder": sources.load_folder,
           "tfds": tfds_source.load_tfds, "inshop": sources.load_inshop}


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
            images = parallel_map(lambda i: self.preprocess(self.images.get(i)), idx,
                          self.num_workers if self.images.decodes else 1)
            out = np.zeros((batch_size, *self.image_shape), np.uint8)
            out[:len(idx)] = images
            labels = np.full((batch_size,), PAD_LABEL, np.int32)
            labels[:len(idx)] = self.labels[idx]
            mask = np.arange(batch_size) < len(idx)
            yield {"images": out, "labels": labels, "mask": mask}


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
        u = epoch_rng(self.seed, int(state.epoch), 1 + int(state.batch_in_epoch)).random(
            (s.P * s.K, 3))
        u = u.reshape(s.process_count, -1, 3)[s.process_index]
        images = parallel_map(lambda j: self.preprocess.train(self._images.get(idx[j]), u[j]),
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


def build(data_cfg: Mapping[str, Any], *, seed: int, num_devices: int, process_index: int = 0,
          process_count: int = 1) -> Dataset:
    """Builds the training sampler and evaluation sets of ``data_cfg``.

    Args:
      data_cfg: a dict or ``ConfigDict``; keys in :data:`hnm.data.config.KEYS`.
      seed: the run's seed; batches depend on ``(seed, epoch, batch_in_epoch)`` only.
      num_devices: devices of this process; each gets ``P / (num_devices * process_count)``
        whole classes.
      process_index, process_count: this process's block of the global batch.

    Returns:
      A :class:`Dataset`.

    Raises:
      DataNotFoundError: (a ValueError) when the data is not there: a missing file or
        folder, a tfds data set that is not prepared (and ``download`` is off).
      ValueError: one line naming the key, on an unknown source or key, P not a multiple
        of the devices, K larger than every class (without ``pad_classes``), fewer than P
        usable classes (the message gives the largest valid P).

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
    shards = num_devices * process_count
    if P % shards:
        lower, upper = P // shards * shards, (P // shards + 1) * shards
        fix = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(f"data.classes_per_batch={P} must be a multiple of the {shards} "
                         f"devices ({num_devices} x {process_count} processes; each device "
                         f"slice holds whole classes): set --config.data.classes_per_batch="
                         f"{fix}.")
    loaded = LOADERS[cfg["source"]](cfg)
    check_sampler(loaded.train_labels, P, K, cfg["pad_classes"], num_shards=shards)
    sampler = PKSampler(loaded.train_labels, P, K, seed=seed, pad_classes=cfg["pad_classes"],
                        process_index=process_index, process_count=process_count)
    size = cfg.get("image_size")
    prep = Preprocess(size, cfg.get("train_resize"), cfg.get("eval_resize"),
                      bool(cfg["augment"]))
    hw = (size, size) if size else loaded.native_hw
    if hw is None:  # pragma: no cover - file sources always get a default image_size
        raise ValueError("data.image_size is required for this source.")
    image_shape = (*hw, loaded.channels)
    workers = cfg["num_workers"]
    eval_sets = {name: EvalSet(np.asarray(labels, np.int32), store, prep.eval, image_shape,
                               workers)
                 for name, (store, labels) in loaded.eval_images.items()}
    return Dataset(loaded.train_images, loaded.train_labels, eval_sets, sampler, prep,
                   image_shape, seed=seed, num_workers=workers, prefetch=bool(cfg["prefetch"]))
