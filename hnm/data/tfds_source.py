"""The tfds source: CUB-200-2011, Cars196, Stanford Online Products (and other builders).

``caltech_birds2011`` and ``cars196`` ship a per-image train/test split over all classes: the
two are merged and re-split by class (the first 100 / 98 classes train, the rest test).
``stanford_online_products`` has its own class-disjoint split. Other builders work with
``label_key`` and ``resplit``.

**Offline first.** A data set is read only where it is prepared (``data_dir``, default
tfds' own, ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``). When it is not, and
``download`` is not set (the default), :func:`load_tfds` raises :class:`DataNotFoundError` at
once with one line naming the data set, where it looked and how to prepare it (``tfds build
NAME --data_dir=DIR``, ``--config.data.download=True`` or ``--config.data.data_dir=DIR``):
no network is touched and TensorFlow is not even imported. Downloads happen only with
``download=True``, before anything is read; a failed download is one line too. Under
``tfds.testing.mock_data`` the mocked reads are used.

**Reading.** Images are read *encoded* (``tfds.decode.SkipDecoding`` on the image feature and
``PartialDecoding`` so segmentation masks and boxes are never read) and decoded with PIL only
when a batch needs them. With ``tfds_access="data_source"`` the images are read by index from
``tfds.data_source`` (random access; needs the data prepared with
``download_and_prepare_kwargs={"file_format": "array_record"}``), holding only labels in
memory. With ``"cache"`` one sequential pass keeps every encoded image in memory (CUB about
1.1 GB, Cars about 1.9 GB, SOP about 3 GB of JPEG bytes; ``cache_max_bytes``, default 8 GiB,
stops with a clear error beyond that). ``"auto"`` (the default) uses the data source when the
prepared files allow random access and the cache otherwise. Both ways read every record once
at start-up to learn the labels (the labels are stored inside the records).
"""
from __future__ import annotations

import contextlib
import logging
import threading

import numpy as np

from hnm.data.config import check_train_classes_unused
from hnm.data.sources import DataNotFoundError, Loaded, cap, require, split_classes
from hnm.data.stores import EncodedImages, SubsetImages, merge_stores

# Label feature of the tfds builders hnm knows, and whether their splits must be re-split by
# class (CUB and Cars ship a per-image classification split over all classes).
TFDS_LABEL_KEYS = {"caltech_birds2011": "label", "cars196": "label",
                   "stanford_online_products": "class_id"}
TFDS_RESPLIT = {"caltech_birds2011": True, "cars196": True, "stanford_online_products": False}


def import_tfds(tensorflow: bool = True):
    """tensorflow_datasets, imported lazily (importing TensorFlow costs seconds).

    tfds itself imports TensorFlow only when a pipeline needs it, so ``tensorflow=False`` is
    cheap (the not-prepared check). With ``tensorflow=True`` TensorFlow is imported too, and
    accelerators are hidden from it on first import: it only reads files here, and would
    otherwise reserve GPU memory that JAX needs.
    """
    import tensorflow_datasets as tfds
    if tensorflow:
        import tensorflow as tf
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TensorFlow already initialised its devices; nothing to change
            pass
    return tfds


def tfds_decoders(label_key: str):
    """Reads only the image (still encoded) and the label: boxes and masks are never parsed."""
    tfds = import_tfds()
    return tfds.decode.PartialDecoding({"image": True, label_key: True},
                                       decoders={"image": tfds.decode.SkipDecoding()})


def not_prepared_message(name: str, root: str, looked_in: str) -> str:
    """The one line :class:`DataNotFoundError` carries for a tfds set that is not prepared."""
    return (f"tfds data set {name!r} is not prepared in {looked_in} and data.download is off: "
            f"prepare it once with `tfds build {name} --data_dir={root}`, or set "
            "--config.data.download=True to download it now, or "
            "--config.data.data_dir=DIR where it is prepared.")


@contextlib.contextmanager
def _quiet_absl():
    # tfds logs "Variant folder ... has no dataset_info.json" (absl, WARNING) while it looks;
    # the error below says it in one line, so the look itself stays silent.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_prepared(name: str, data_dir: str | None) -> None:
    """Raises :class:`DataNotFoundError` in well under a second if ``name`` is not prepared.

    Neither the network nor TensorFlow is touched. ``builder.is_prepared()`` answers from the
    file system; when it says no, ``tfds.data_source(download=False)`` is asked as well,
    because under ``tfds.testing.mock_data`` that succeeds on fake data with nothing on disk
    (and otherwise fails at once, before reading anything). It is the probe rather than
    ``tfds.load`` because it needs no TensorFlow, which must not start before its GPUs are
    hidden (:func:`import_tfds`).
    """
    tfds = import_tfds(tensorflow=False)
    with _quiet_absl():
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # tfds' own DatasetNotFoundError: not a builder name at all
            raise ValueError(f"data.name={name!r}: {str(e).splitlines()[0]}") from e
        if builder.is_prepared():
            return
        try:
            tfds.data_source(name, split="train", data_dir=data_dir, download=False)
            failure = None
        except Exception as e:  # noqa: BLE001 - any failure here means "not available offline"
            failure = e
    if failure is not None:
        from tensorflow_datasets.core import constants
        root = data_dir or constants.DATA_DIR  # tfds' default ($TFDS_DATA_DIR or ~/...)
        raise DataNotFoundError(not_prepared_message(name, root, builder.data_dir)) from failure


def download_and_prepare(name: str, data_dir: str | None, *, random_access: bool) -> None:
    """Downloads and prepares ``name`` unless it is prepared (only with ``download=True``).

    Raises:
      DataNotFoundError: one line naming the data set and the first line of the failure
        (offline, a dead URL, a manual download the builder needs, ...).
    """
    tfds = import_tfds()  # preparing runs TensorFlow: hide the GPUs from it first
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return
    # array_record files allow random access (tfds_access="data_source"); the default
    # (TFRecord) is read by one sequential pass into the in-memory cache.
    kwargs = {"file_format": "array_record"} if random_access else {}
    try:
        builder.download_and_prepare(**kwargs)
    except Exception as e:  # noqa: BLE001 - one line for the user; the cause stays chained
        from tensorflow_datasets.core import constants
        root = data_dir or constants.DATA_DIR
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataNotFoundError(
            f"downloading tfds data set {name!r} into {root} failed ({type(e).__name__}: "
            f"{first}); prepare it where the network is reachable with `tfds build {name} "
            f"--data_dir={root}`, or set --config.data.data_dir=DIR where it is prepared."
        ) from e


def tfds_split(name: str, split: str, cfg, label_key: str) -> tuple[EncodedImages, np.ndarray]:
    """One tfds split as (encoded image store, labels) by data source or in-memory cache."""
    tfds = import_tfds()
    access, ch = cfg["tfds_access"], cfg["channels"]
    kw = dict(split=split, data_dir=cfg.get("data_dir"), download=bool(cfg["download"]),
              decoders=tfds_decoders(label_key))
    if access in ("auto", "data_source"):
        try:
            source = tfds.data_source(name, **kw)
        except (NotImplementedError, ValueError) as e:
            if access == "data_source":
                raise ValueError(
                    f"tfds data.name={name!r} has no random-access files; prepare it with "
                    "download_and_prepare_kwargs={'file_format': 'array_record'} (`tfds build "
                    f"{name} --file_format=array_record`) or set "
                    f"--config.data.tfds_access=cache ({str(e).splitlines()[0]})") from e
        else:
            n = cap(len(source), cfg)
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
                f"tfds {name}[{split}] needs more than data.cache_max_bytes="
                f"{cfg['cache_max_bytes']} of encoded images in memory; raise it or use "
                "--config.data.tfds_access=data_source on array_record files.")
    return EncodedImages(blobs.__getitem__, len(blobs), ch), np.array(labels, np.int32)


def load_tfds(cfg) -> Loaded:
    name = require(cfg, "name", "the tfds builder")
    label_key = cfg.get("label_key") or TFDS_LABEL_KEYS.get(name)
    if label_key is None:
        raise ValueError(f"tfds data.name={name!r} is not one of {sorted(TFDS_LABEL_KEYS)}; "
                         "give data.label_key (and data.resplit) for another builder.")
    resplit = cfg.get("resplit")
    resplit = TFDS_RESPLIT.get(name, False) if resplit is None else bool(resplit)
    if not resplit:
        check_train_classes_unused(cfg, f"tfds {name!r} is read with its own class-disjoint "
                                        "split (data.resplit is off)")
    if cfg["download"]:
        download_and_prepare(name, cfg.get("data_dir"),
                             random_access=cfg["tfds_access"] == "data_source")
    else:
        check_prepared(name, cfg.get("data_dir"))
    train_images, train_labels = tfds_split(name, "train", cfg, label_key)
    test_images, test_labels = tfds_split(name, "test", cfg, label_key)
    ch = cfg["channels"]
    if not resplit:
        return Loaded(train_images, train_labels, {"test": (test_images, test_labels)}, ch,
                      None)
    merged, labels = merge_stores([train_images, test_images], [train_labels, test_labels])
    train_idx, test_idx = split_classes(labels, cfg["train_classes"], key="data.train_classes")
    return Loaded(SubsetImages(merged, train_idx), labels[train_idx],
                  {"test": (SubsetImages(merged, test_idx), labels[test_idx])}, ch, None)
