"""The ``config.data`` keys: their meaning, defaults and checks (:func:`resolve_config`).

Every key is listed in :data:`KEYS`; an unknown key is an error with a "did you mean". From
the command line each is ``--config.data.KEY=VALUE`` (the config must define the key).
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping

import numpy as np

from hnm.data.sources import parse_train_classes

SOURCES = ("digits", "glyphs", "npz", "folder", "tfds", "inshop")
FILE_SOURCES = ("folder", "tfds", "inshop")  # decoded photos: 256 px, crop + flip, prefetch
OWN_SPLIT_SOURCES = ("glyphs", "inshop")     # train_classes does not apply (nor to SOP)
DEFAULT_IMAGE_SIZE = 256             # the official recipe's crop
TRAIN_RESIZE_FACTOR = 1.1            # official: Resize(int(256 * 1.1)) = 281 before the crop
DEFAULT_CACHE_MAX_BYTES = 8 * 2**30

KEYS = {
    "source": f"where the images come from: one of {SOURCES}",
    "name": "the tfds builder (source 'tfds')",
    "path": "the .npz file, image folder or In-Shop root (sources 'npz', 'folder', 'inshop')",
    "classes_per_batch": "P, classes in a training batch (a multiple of the devices)",
    "samples_per_class": "K >= 2, images of each class in a training batch",
    "image_size": "side of the square crop; unset: native size (256 for file and tfds sources)",
    "train_resize": "shorter side before the random training crop (default 1.1 x image_size)",
    "eval_resize": "shorter side before the evaluation centre crop (default image_size)",
    "augment": "random crop + horizontal flip in training (default: on for photos)",
    "pad_classes": "complete classes smaller than K by resampling them",
    "train_classes": ("training classes of a class split (digits, npz, folder, CUB, Cars): "
                      "a fraction in (0, 1) or a count (136, also 136.0)"),
    "data_dir": "tfds data directory (default: tfds' own, ~/tensorflow_datasets)",
    "download": "let tfds download and prepare a missing data set (default False)",
    "max_examples": "use at most this many examples per split (smoke tests)",
    "cache_dir": "where the rendered glyphs are cached (default ~/.cache/hnm)",
    "label_key": "label feature of another tfds builder",
    "resplit": "merge a tfds builder's splits and re-split them by class",
    "tfds_access": "'auto', 'data_source' (random access) or 'cache' (encoded in memory)",
    "cache_max_bytes": "limit of the encoded tfds images held in memory",
    "channels": "1 (grayscale) or 3 (RGB) for decoded images",
    "num_workers": "threads decoding a batch",
    "prefetch": "decode the next batch while a step trains (default: on for photos)",
}
# ConfigDicts hold "" / 0 where None ("not set") is meant: a field cannot switch types.
_UNSET_IF_FALSY = ("name", "path", "image_size", "train_resize", "eval_resize", "data_dir",
                   "max_examples", "cache_dir", "label_key")
DEFAULTS = {"classes_per_batch": 8, "samples_per_class": 2, "augment": None,
            "pad_classes": False, "train_classes": 0.5, "tfds_access": "auto",
            "download": False, "cache_max_bytes": DEFAULT_CACHE_MAX_BYTES, "channels": 3,
            "num_workers": 8, "prefetch": None}


def _positive_int(cfg: Mapping[str, Any], key: str, minimum: int = 1) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"data.{key} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def check_train_classes_unused(cfg: Mapping[str, Any], why: str) -> None:
    """A ``train_classes`` other than the default where it would be ignored is an error."""
    if cfg["train_classes"] != DEFAULTS["train_classes"]:
        raise ValueError(f"data.train_classes={cfg['train_classes']} does not apply: {why} "
                         "(train_classes splits digits, npz, folder and re-split tfds sets).")


def _unknown_keys_message(unknown: list[str]) -> str:
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, KEYS, n=1)
        parts.append(f"data.{key}" + (f" (did you mean data.{close[0]}?)" if close else ""))
    return (f"unknown data config key{'s' if len(unknown) > 1 else ''} {', '.join(parts)}; "
            f"valid keys: {', '.join(sorted(KEYS))}.")


def resolve_config(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``data_cfg`` as a plain dict with defaults filled in, checked before anything loads.

    ``""`` and ``0`` mean "not set" for the optional keys (``name``, ``path``, ``image_size``,
    ``train_resize``, ``eval_resize``, ``data_dir``, ``max_examples``, ``cache_dir``,
    ``label_key``), since a ``ConfigDict`` field cannot switch between None and a value.

    Raises:
      ValueError: one line naming the key, on an unknown key (with a "did you mean" and the
        valid keys) or source, or an invalid value.

    Examples:
      >>> resolve_config({"source": "digits"})["classes_per_batch"]
      8
      >>> resolve_config({"source": "digits", "clases_per_batch": 4})
      Traceback (most recent call last):
      ...
      ValueError: unknown data config key ...(did you mean data.classes_per_batch?)...
    """
    cfg = dict(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else data_cfg)
    unknown = sorted(set(cfg) - set(KEYS))
    if unknown:
        raise ValueError(_unknown_keys_message(unknown))
    for key in _UNSET_IF_FALSY:
        if key in cfg and not isinstance(cfg[key], bool) and cfg[key] in ("", 0):
            cfg[key] = None
    source = cfg.get("source")
    if source not in SOURCES:
        close = difflib.get_close_matches(str(source), SOURCES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown data.source={source!r}{hint}; expected one of {SOURCES}.")
    for key, value in DEFAULTS.items():
        if cfg.get(key) is None:
            cfg[key] = value
    _positive_int(cfg, "classes_per_batch")
    # K = 1 gives batches without positives: every triplet would be invalid, the loss 0.
    _positive_int(cfg, "samples_per_class", 2)
    parse_train_classes(cfg["train_classes"], "data.train_classes")
    if source in OWN_SPLIT_SOURCES:
        check_train_classes_unused(cfg, f"source {source!r} has its own class-disjoint split")
    if not isinstance(cfg["download"], (bool, np.bool_)):
        raise ValueError(f"data.download must be True or False; got {cfg['download']!r}.")
    if source in FILE_SOURCES and cfg.get("image_size") is None:
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
                raise ValueError(f"data.{key}={cfg[key]} must be >= data.image_size={size} "
                                 "(the crop is taken from the resized image).")
    if cfg["augment"] is None:  # the recipe's crop + flip for photos; off for digits/glyphs
        cfg["augment"] = source in FILE_SOURCES
    if cfg["channels"] not in (1, 3):
        raise ValueError(f"data.channels must be 1 or 3; got {cfg['channels']!r}.")
    if cfg["tfds_access"] not in ("auto", "cache", "data_source"):
        raise ValueError(f"data.tfds_access must be 'auto', 'cache' or 'data_source'; got "
                         f"{cfg['tfds_access']!r}.")
    if cfg.get("max_examples") is not None:
        _positive_int(cfg, "max_examples")
    _positive_int(cfg, "num_workers")
    if cfg["prefetch"] is None:  # look-ahead pays off only when batches are decoded
        cfg["prefetch"] = source in FILE_SOURCES
    return cfg
