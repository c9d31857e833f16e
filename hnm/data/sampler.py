r"""The P x K sampler: seeded, class-balanced training batches with an exact resume position.

A training batch holds :math:`P` classes with :math:`K` images each (``classes_per_batch``,
``samples_per_class``), laid out class-major: rows ``[j K, (j + 1) K)`` are the :math:`K` images
of the batch's j-th class. Reshaped to ``[devices, P K / devices, ...]`` every device's slice
then holds :math:`P / \text{devices}` whole classes, so every anchor has positives on its own
device (``STYLE.md`` §6).

The sampler is pure NumPy and seeded: the batches are a function of
``(seed, epoch, batch_in_epoch)`` only, and the :class:`SamplerState` that goes into the
checkpoint is those two integers, so a resumed run sees exactly the batches (and, through
:func:`epoch_rng`, the random crops and flips) of an uninterrupted one.

Only NumPy is imported here: no images, no files.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class SamplerState(NamedTuple):
    """Where the P x K sampler stands: the next batch is ``batch_in_epoch`` of ``epoch``.

    Two integers (NumPy int64 scalars), saved with the checkpoint; ``SamplerState(*ints)``
    rebuilds it.
    """
    epoch: np.int64
    batch_in_epoch: np.int64


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


def epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    """The generator of ``stream`` in ``epoch``: stream 0 plans batches, 1 + b augments batch b.

    Only ``(seed, epoch, stream)`` enter: this is what makes resuming exact.
    """
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
    rng = epoch_rng(seed, epoch, 0)
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


def check_sampler(labels: np.ndarray, classes_per_batch: int, samples_per_class: int,
                  pad_classes: bool, num_shards: int = 1) -> None:
    """Raises a one-line ValueError when the labels cannot fill a P x K batch.

    The message names the flag to change and its largest valid value: P at most the number
    of classes with at least K examples (every class with ``pad_classes``), rounded down to a
    multiple of ``num_shards`` (devices x processes: each device slice holds whole classes);
    K at most the largest class.

    Args:
      labels: the training labels, shape [N].
      classes_per_batch: P.
      samples_per_class: K.
      pad_classes: whether classes smaller than K are completed by resampling.
      num_shards: devices over all processes; P must be a multiple of it.

    Raises:
      ValueError: if K exceeds every class (without ``pad_classes``) or fewer than P classes
        are usable.
    """
    counts = np.bincount(np.unique(np.asarray(labels), return_inverse=True)[1])
    P, K = classes_per_batch, samples_per_class
    largest = int(counts.max(initial=0))
    if not pad_classes and largest < K:
        fix = (f"set --config.data.samples_per_class={largest} or less, or " if largest >= 2
               else "set ")
        raise ValueError(f"data.samples_per_class={K} exceeds the largest training class "
                         f"({largest} examples): {fix}--config.data.pad_classes=True to "
                         "complete small classes by resampling.")
    eligible = len(counts) if pad_classes else int((counts >= K).sum())
    if eligible < P:
        best = eligible // num_shards * num_shards
        have = "exist" if pad_classes else f"have >= {K} examples (data.samples_per_class)"
        msg = f"data.classes_per_batch={P} but only {eligible} training classes {have}"
        on = f" on {num_shards} devices" if num_shards > 1 else ""
        if best:
            msg += (f"; the largest valid value{on} is {best}: set "
                    f"--config.data.classes_per_batch={best}")
        else:
            msg += (f", fewer than the {num_shards} devices (each device needs a whole "
                    "class): use fewer devices")
        if not pad_classes and len(counts) > eligible:
            msg += (f" (or lower --config.data.samples_per_class or set "
                    f"--config.data.pad_classes=True to use all {len(counts)} classes)")
        raise ValueError(msg + ".")
