r"""Pre-processing of one image: decode, resize the shorter side, crop, flip.

Follows the official SCT recipe (torchvision ``Resize(int)`` semantics: the shorter side is
scaled): train: resize the shorter side to ``train_resize`` (281), random crop
``image_size`` x ``image_size`` (256) and a random horizontal flip (``augment``); eval: resize
the shorter side to ``eval_resize`` (default ``image_size``), centre crop ``image_size``. With
``image_size=None`` (the default for the in-memory sources) images keep their native size and
``augment`` is only the flip (plus a crop if ``train_resize`` is given).

The functions are pure NumPy on uint8 [H, W, C] (PIL does the decoding and resizing, imported
lazily); the random numbers of a crop come in as an argument (:meth:`Preprocess.train`), drawn
by the caller from the sampler's seeded generators.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np


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
