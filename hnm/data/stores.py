"""Image stores: random access to the images of a split by row, in memory or encoded.

A store has ``len(store)``, ``store.get(i) -> uint8 [H, W, C]`` and ``store.decodes`` (True
when ``get`` decodes bytes, which is worth a thread pool: PIL releases the GIL).

- :class:`ArrayImages`: one uint8 array in memory (digits, glyphs, npz).
- :class:`EncodedImages`: encoded bytes fetched by a ``read(i)`` callable and decoded on demand
  (folder and In-Shop files, tfds records); only the callable's state lives in memory.
- :class:`SubsetImages`: the rows of another store (a class split of a merged source).

:func:`parallel_map` fetches and pre-processes a batch of rows in a shared thread pool.
"""
from __future__ import annotations

import concurrent.futures
from typing import Callable, Sequence

import numpy as np

from hnm.data.preprocess import decode_image


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

    def read(self, i: int) -> bytes:
        """The encoded bytes of row ``i``."""
        return self._read(int(i))

    def get(self, i: int) -> np.ndarray:
        return decode_image(self.read(i), self.channels)


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


def file_images(paths: Sequence[str], channels: int) -> EncodedImages:
    """An :class:`EncodedImages` over image files (read when a batch needs them)."""
    paths = list(paths)
    return EncodedImages(lambda i: _read_file(paths[i]), len(paths), channels)


def merge_stores(stores: Sequence[EncodedImages], labels: Sequence[np.ndarray]
                 ) -> tuple[EncodedImages, np.ndarray]:
    """Concatenates encoded stores (e.g. tfds train + test before a class re-split)."""
    which = np.concatenate([np.full(len(s), k) for k, s in enumerate(stores)])
    local = np.concatenate([np.arange(len(s)) for s in stores])
    merged = EncodedImages(lambda i: stores[which[i]].read(local[i]), len(which),
                           stores[0].channels)
    return merged, np.concatenate(labels).astype(np.int32)


_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def parallel_map(fn: Callable[[int], np.ndarray], idx: np.ndarray, workers: int) -> np.ndarray:
    """``np.stack([fn(i) for i in idx])``, in a thread pool when decoding (PIL frees the GIL).

    The pool of each size is made once and shared; results keep the order of ``idx``.
    """
    if workers <= 1 or len(idx) <= 1:
        return np.stack([fn(i) for i in idx])
    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS[workers] = concurrent.futures.ThreadPoolExecutor(workers)
    return np.stack(list(pool.map(fn, idx)))
