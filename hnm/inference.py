"""Use a trained run: load its newest checkpoint and embed new images; baselines; ``hnm embed``.

  >>> run = hnm.inference.load("runs/digits")                    # doctest: +SKIP
  >>> emb = run.embed(images, batch_size=256)   # float32 [N, D]  # doctest: +SKIP

:func:`load` reads the run's ``config.json``, builds the model from ``config.model`` and the
image shape from ``config.data`` (:func:`image_shape`: no training data is loaded), and
restores the newest complete checkpoint exactly as ``hnm eval`` does
(:func:`hnm.train.create_train_state` + :func:`hnm.checkpoint.restore_or_init`).
:meth:`Run.embed` applies that run's *evaluation* pre-processing
(:meth:`hnm.data.Preprocess.eval`: resize the shorter side, centre crop; nothing for the
embedded sets, whose images have one native size), splits the batches over all local
devices with the pmapped :func:`hnm.parallel.embed_step`, pads the last batch and drops the
padding: the rows are those ``hnm eval`` scores, in input order.

:func:`baselines` scores the untrained network (the run's initial parameters) and raw pixels
(flattened, cosine) on the same evaluation split, the floor a trained model must beat; the
trainer stores them in ``eval.json`` under ``"baselines"`` and :func:`results_table` prints
them as extra rows of the result table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import zipfile
from typing import Any, Mapping, Sequence

import numpy as np

CONFIG_FILE = "config.json"
# The headline columns of the result table, in this order when present.
TABLE_KEYS = ("map@r", "r_precision", "nmi")
BASELINE_NAMES = ("untrained", "raw_pixels")
PATHS_SUFFIX = ".paths.txt"


# ----------------------------------------------------------------------------- image shape


def _npz_member_shape(path: str, name: str) -> tuple[int, ...]:
    """Shape of array ``name`` of an ``.npz`` from its header alone (no data read)."""
    with zipfile.ZipFile(path) as z:
        member = name + ".npy"
        if member not in z.namelist():
            raise ValueError(f"{path!r} has no `{name}` array.")
        with z.open(member) as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, _ = read(f)  # the header only, not the data
    return tuple(shape)


def image_shape(data_cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(H, W, C)`` the run's model sees, from its data config alone (nothing is loaded).

    Sources with ``image_size`` S give ``(S, S, channels)``; the embedded sets have their
    native size (digits 8 x 8 x 1, glyphs 32 x 32 x 1); an ``.npz`` source without
    ``image_size`` is read for its array header only.

    Raises:
      ValueError: an invalid data config, or an ``.npz`` source whose file is gone.
    """
    from hnm import data

    cfg = data.resolve_config(data_cfg)
    source, size = cfg["source"], cfg.get("image_size")
    if source == "digits":
        hw, channels = (8, 8), 1
    elif source == "glyphs":
        from hnm.data import glyphs
        hw, channels = (glyphs.IMAGE_SIZE, glyphs.IMAGE_SIZE), 1
    elif source == "npz":
        path = cfg.get("path") or ""
        if not os.path.isfile(path):
            raise ValueError(f"the run's data `path`={path!r} (npz) is gone; its image shape "
                             "is needed to build the model.")
        shape = _npz_member_shape(path, "images")
        hw, channels = tuple(shape[1:3]), (shape[3] if len(shape) == 4 else 1)
    else:
        hw, channels = None, int(cfg["channels"])
    if size:
        hw = (int(size), int(size))
    return (int(hw[0]), int(hw[1]), int(channels))


# ----------------------------------------------------------------------------- the run


def load_config(workdir: str):
    """The run's saved ``config.json`` as a ``ConfigDict``."""
    import ml_collections

    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: is {workdir!r} the work directory of a run?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


@dataclasses.dataclass
class Run:
    """A restored run: ``config``, ``step``, the state, and :meth:`embed`.

    Attributes:
      config: the run's ``ConfigDict`` (from ``config.json``).
      step: the training step of the restored checkpoint.
      workdir: the run's directory.
      image_shape: ``(H, W, C)`` the model sees after pre-processing.
      preprocess: the run's :class:`hnm.data.Preprocess` (its ``eval`` is applied).
      state: the restored ``TrainState`` (parameters, BatchNorm statistics).
    """
    config: Any
    step: int
    workdir: str
    image_shape: tuple[int, int, int]
    preprocess: Any
    state: Any
    _embed_fn: Any = None

    @property
    def embedding_dim(self) -> int:
        return int(self.config.model.get("embedding_dim", 64))

    @property
    def native_size(self) -> bool:
        """True when the run has no ``image_size``: inputs must have its exact H x W."""
        return not self.preprocess.image_size

    def _prepare(self, image: np.ndarray, where: str) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        h, w, c = self.image_shape
        if image.ndim != 3 or image.dtype != np.uint8:
            raise ValueError(f"{where}: expected a uint8 image [H, W] or [H, W, C]; got shape "
                             f"{image.shape} and dtype {image.dtype}.")
        if image.shape[-1] != c:
            raise ValueError(f"{where}: the run takes {c}-channel images; got "
                             f"{image.shape[-1]} channels (shape {image.shape}).")
        if self.native_size:
            if image.shape[:2] != (h, w):
                raise ValueError(f"{where}: the run takes {h} x {w} x {c} images (its data "
                                 f"has no `image_size` to resize to); got {image.shape}.")
            return image
        return self.preprocess.eval(image)

    def embed(self, images: np.ndarray | Sequence[np.ndarray], batch_size: int | None = None,
              *, progress: bool | None = None) -> np.ndarray:
        """Embeddings float32 [N, D] of ``images``, in input order.

        Args:
          images: uint8 [N, H, W] or [N, H, W, C], or a sequence of uint8 images (sizes may
            differ when the run resizes, i.e. has an ``image_size``).
          batch_size: images per step over all local devices (rounded up to a multiple of
            the device count); default: the run's ``eval.batch_size``.
          progress: show a progress bar; default: when stderr is a terminal.

        Raises:
          ValueError: images the run cannot take (dtype, channels, or size for a run without
            ``image_size``); the message says what was expected.
        """
        if isinstance(images, np.ndarray):
            if images.ndim not in (3, 4) or images.dtype != np.uint8:
                h, w, c = self.image_shape
                raise ValueError(f"`images` must be uint8 [N, H, W] or [N, H, W, C] (the run "
                                 f"takes {h} x {w} x {c}); got shape {images.shape} and dtype "
                                 f"{images.dtype}.")
            if images.ndim == 3:
                images = images[..., None]
        n = len(images)
        from hnm import parallel

        layout = parallel.make_layout("pmap", 0)
        n_dev = layout.num_local_devices
        bs = int(batch_size or self.config.eval.get("batch_size", 256))
        if bs < 1:
            raise ValueError(f"`batch_size` must be >= 1; got {batch_size}.")
        bs = -(-bs // n_dev) * n_dev
        if self._embed_fn is None:
            self._embed_fn = layout.make_embed_step()
            self.state = layout.place_state(self.state)
        out = np.zeros((n, self.embedding_dim), np.float32)
        starts = range(0, n, bs)
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from tqdm.auto import tqdm  # lazy: only for interactive use

            starts = tqdm(starts, total=len(starts), desc="embed", leave=False)
        for start in starts:
            stop = min(start + bs, n)
            batch = np.zeros((bs, *self.image_shape), np.uint8)  # padded last batch
            for i in range(start, stop):
                batch[i - start] = self._prepare(images[i], f"image {i}")
            emb = self._embed_fn(self.state, batch.reshape(n_dev, -1, *self.image_shape))
            out[start:stop] = np.asarray(emb).reshape(bs, -1)[:stop - start]
        return out


def restore_state(config, workdir: str, shape: tuple[int, int, int], *, step: int | None = None
                  ) -> Any:
    """The run's state at ``step`` (default: the newest that verifies), built as ``hnm eval``
    builds it, checksums checked (:func:`hnm.checkpoint.restore_verified`). No training data
    is read: an objective's class parameters are sized by the checkpoint's ``num_classes``."""
    import jax

    from hnm import checkpoint, models, parallel, train

    ckpt_dir = os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR)
    steps = checkpoint.steps_on_disk(workdir) if os.path.isdir(ckpt_dir) else []
    if not steps:
        raise ValueError(f"no checkpoint in {ckpt_dir}: has {workdir!r} been trained?")
    if step is not None and step not in steps:
        raise ValueError(f"no checkpoint of step {step} in {ckpt_dir}; it has {steps}.")
    model = models.create(train.model_config(config))
    objective = train.build_objective(config)
    parametric = parallel.is_parametric(objective)
    num_classes = 0
    if parametric:
        manager = checkpoint.open_manager(workdir, create=False)
        try:
            num_classes = int((checkpoint.restore_meta(manager, step) or {}).get(
                "num_classes", 0))
        finally:
            manager.close()
    tx = train.make_optimizer(config.optim, train.make_schedule(config.optim, 1),
                              param_lr_mult=train.param_lr_mult(config) if parametric else None)
    state = train.create_train_state(model, tx, jax.random.key(config.seed), shape,
                                     memory_size=train.memory_options(config)[0],
                                     objective=objective, num_classes=num_classes)
    if step is None:
        manager, state, _ = checkpoint.restore_verified(
            workdir, state, say=lambda m: print(f"hnm: {m}", file=sys.stderr),
            move_failing=False, require=True,
            check_meta=lambda m: train.check_checkpoint_model(m, config, workdir))
        manager.close()
        return state
    problem = checkpoint.verify(workdir, step)
    if problem is not None:
        raise ValueError(f"checkpoint step {step} fails verification: {problem}")
    manager = checkpoint.open_manager(workdir, create=False)
    try:
        train.check_checkpoint_model(checkpoint.restore_meta(manager, step), config, workdir)
        state, _ = checkpoint.restore_or_init(manager, state, step)
    finally:
        manager.close()
    return state


def load(workdir: str, *, step: int | None = None) -> Run:
    """Loads run ``workdir``: its ``config.json`` and newest (or ``step``) checkpoint.

    Returns:
      A :class:`Run`; ``run.embed(images)`` embeds with the run's evaluation pre-processing.

    Raises:
      ValueError: no ``config.json``, no (complete) checkpoint, or a checkpoint of another
        model; one line naming what is missing.
    """
    from hnm import data

    config = load_config(workdir)
    shape = image_shape(config.data)
    cfg = data.resolve_config(config.data)
    prep = data.Preprocess(cfg.get("image_size"), cfg.get("train_resize"),
                           cfg.get("eval_resize"), bool(cfg["augment"]))
    state = restore_state(config, workdir, shape, step=step)
    return Run(config=config, step=int(np.asarray(state.step)), workdir=workdir,
               image_shape=shape, preprocess=prep, state=state)


# ----------------------------------------------------------------------------- inputs


def read_images(path: str, channels: int) -> tuple[Any, list[str] | None]:
    """Images of ``path``: an ``.npz`` with ``images`` (uint8 [N, H, W(, C)]) or a folder of
    image files (recursively, sorted paths; decoded to ``channels``).

    Returns:
      ``(images, paths)``: an array (npz; ``paths`` None) or a list of arrays (folder).
    """
    from hnm import data

    if os.path.isdir(path):
        paths = sorted(os.path.join(root, f) for root, _, files in os.walk(path)
                       for f in files if f.lower().endswith(data.IMAGE_EXTENSIONS))
        if not paths:
            raise ValueError(f"--input={path!r} holds no images "
                             f"({', '.join(data.IMAGE_EXTENSIONS)}).")
        images = []
        for p in paths:
            try:
                with open(p, "rb") as f:
                    images.append(data.decode_image(f.read(), channels))
            except Exception as e:  # PIL raises many types on a broken file
                raise ValueError(f"cannot decode image {p!r}: {e}") from None
        return images, paths
    if not os.path.isfile(path):
        raise ValueError(f"--input={path!r} not found (expected an .npz with `images` or a "
                         "folder of images).")
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"--input={path!r} is not a readable .npz ({e}).") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"--input={path!r} must be an .npz with an `images` array.")
    with f:
        if "images" not in f.files:
            raise ValueError(f"--input={path!r} has no `images` array (it has {f.files}).")
        images = f["images"]
    return images, None


def write_index(path: str, embeddings: np.ndarray, labels: np.ndarray | None = None,
                ids: Sequence[str] | None = None, similarity: str = "cosine") -> str:
    from hnm import search

    index = search.Index(similarity=similarity)
    index.add(embeddings, labels, ids)
    return index.save(path)


def embed_command(argv: Sequence[str]) -> None:
    """``hnm embed --workdir=W --input=X --output=Y.npy [--batch_size=B] [--plots]``.

    Writes float32 [N, D] to ``Y.npy`` in input order; for a folder input also
    ``Y.paths.txt`` (one path per line, the row order). ``--index=I.npz`` also writes a
    :class:`hnm.search.Index` (with the npz's ``labels`` and the paths as ids) for
    ``hnm search``. ``--plots`` writes the pictures of :func:`write_pictures` for the
    embedded images into ``W`` (needs ``labels`` in the npz, or class sub-folders).

    Raises:
      ValueError: user errors (missing files, shapes or channels the run cannot take, no
        checkpoint), one line each.
    """
    import argparse

    from hnm import search

    parser = argparse.ArgumentParser(prog="hnm embed")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--index", default=None)
    parser.add_argument("--plots", action="store_true")
    parser.add_argument("--no_progress", action="store_true")
    args = search._parse(parser, argv)
    if not args.output.endswith(".npy"):
        raise ValueError(f"--output={args.output!r} must end in .npy.")
    run = load(args.workdir)
    images, paths = read_images(args.input, run.image_shape[-1])
    emb = run.embed(images, args.batch_size, progress=False if args.no_progress else None)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    np.save(args.output, emb)
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings (step {run.step}) to "
          f"{args.output}")
    labels = _input_labels(args.input, paths, len(emb))
    if paths is not None:
        paths_file = args.output[:-len(".npy")] + PATHS_SUFFIX
        with open(paths_file, "w") as f:
            f.write("\n".join(paths) + "\n")
        print(f"wrote the {len(paths)} image paths (row order) to {paths_file}")
    if args.index:
        written = write_index(args.index, emb, labels, paths)
        print(f"wrote the index to {written}")
    if args.plots:
        if labels is None:
            raise ValueError("--plots needs labels: an npz `labels` array or class "
                             "sub-folders in --input.")
        shown = images if isinstance(images, np.ndarray) else None
        if shown is None:  # a folder: show what the model saw
            shown = np.stack([run._prepare(im, p) for im, p in zip(images, paths)])
        for p in write_pictures(args.workdir, emb, labels, shown):
            print(f"wrote {p}")


def _input_labels(path: str, paths: list[str] | None, n: int) -> np.ndarray | None:
    """``labels`` of an npz input, or class ids of a folder's first-level sub-folders."""
    if paths is None:
        with np.load(path, allow_pickle=False) as f:
            if "labels" not in f.files:
                return None
            labels = np.asarray(f["labels"])
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"`labels` of --input must be integers [{n}]; got shape "
                             f"{labels.shape} and dtype {labels.dtype}.")
        return labels
    rel = [os.path.relpath(p, path).split(os.sep) for p in paths]
    if not all(len(r) > 1 for r in rel):
        return None
    names = sorted({r[0] for r in rel})
    return np.array([names.index(r[0]) for r in rel], np.int64)


# ----------------------------------------------------------------------------- baselines


def _score(eval_embs: Mapping[str, tuple[np.ndarray, np.ndarray]], eval_cfg) -> dict:
    """The retrieval (and clustering) metrics of ``evaluate`` on given embeddings."""
    import jax

    from hnm import evaluate

    return evaluate.score(eval_embs, eval_cfg, jax.local_devices())


def _eval_pixels(eval_set) -> tuple[np.ndarray, np.ndarray]:
    """Pre-processed evaluation images [N, H*W*C] float32 and labels (padding dropped)."""
    rows, labels = [], []
    for batch in eval_set.batches(256):
        mask = np.asarray(batch["mask"], bool)
        rows.append(batch["images"][mask].reshape(mask.sum(), -1).astype(np.float32))
        labels.append(batch["labels"][mask])
    return np.concatenate(rows), np.concatenate(labels)


def baselines(eval_sets: Mapping[str, Any], config) -> dict[str, dict]:
    """Scores of the untrained network and of raw pixels on ``eval_sets`` (the run's split).

    * ``untrained``: the run's initial parameters (``config.seed``, as
      :func:`hnm.train.train_and_evaluate` draws them; ``model.pretrained`` weights are not
      loaded), embedded and scored exactly as the trained model is;
    * ``raw_pixels``: the evaluation-pre-processed images flattened to H*W*C numbers and
      ranked by cosine similarity (the floor quoted in ``hnm.data.glyphs``).

    Returns:
      ``{"untrained": metrics, "raw_pixels": metrics}``, each with the keys of
      ``evaluate``'s retrieval and clustering metrics.
    """
    import jax

    from hnm import data, models, train

    first = next(iter(eval_sets.values()))
    shape = tuple(first.image_shape)
    model = models.create(train.model_config(config))
    init_key, _ = jax.random.split(jax.random.key(config.seed))  # train_and_evaluate's
    tx = train.make_optimizer(config.optim, train.make_schedule(config.optim, 1))
    state = train.create_train_state(model, tx, init_key, shape)
    # The evaluation rows are pre-processed already: embed them at their native size.
    run = Run(config=config, step=0, workdir="", image_shape=shape,
              preprocess=data.Preprocess(None, None, None, False), state=state)
    untrained, pixels = {}, {}
    for name, s in eval_sets.items():
        x, labels = _eval_pixels(s)
        pixels[name] = (x, labels)
        untrained[name] = (run.embed(x.astype(np.uint8).reshape(-1, *shape), progress=False),
                           labels)
    return {"untrained": _score(untrained, config.eval),
            "raw_pixels": _score(pixels, config.eval)}


def final_baselines(config, eval_sets: Mapping[str, Any]) -> dict:
    """``{"baselines": ...}`` when ``config.eval.baselines`` is set, else ``{}`` (the trainer's
    hook: ``final.update(inference.final_baselines(config, ds.eval_sets()))``)."""
    if not config.eval.get("baselines", False):
        return {}
    return {"baselines": baselines(eval_sets, config)}


def read_baselines(workdir: str) -> dict:
    """The ``baselines`` of ``workdir/eval.json`` (``{}`` when absent)."""
    path = os.path.join(workdir, "eval.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f).get("baselines", {}) or {}


def results_table(results: Mapping[str, Any]) -> str:
    """A Markdown table: the run's row, then the baselines' rows when ``results`` holds them.

    Values are printed as stored in ``eval.json`` (fractions in [0, 1], 4 decimals), so the
    table and the file agree in units.
    """
    keys = [k for k in results if k.startswith("recall@")] + [
        k for k in TABLE_KEYS if k in results]
    step = results.get("step")
    rows = [(f"trained (step {step})" if step is not None else "trained", results)]
    for name in BASELINE_NAMES:
        if name in results.get("baselines", {}):
            rows.append((name.replace("_", " "), results["baselines"][name]))
    head = "| model | " + " | ".join(keys) + " |"
    rule = "|---|" + "|".join("---" for _ in keys) + "|"
    body = ["| " + label + " | " + " | ".join(
        f"{float(r[k]):.4f}" if k in r else "-" for k in keys) + " |" for label, r in rows]
    return "\n".join([head, rule, *body])


# ----------------------------------------------------------------------------- pictures


def _eval_arrays(eval_sets: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Pre-processed uint8 images and labels of the leave-one-out (or query) set."""
    s = eval_sets.get("test") or eval_sets.get("query")
    images, labels = [], []
    for batch in s.batches(256):
        mask = np.asarray(batch["mask"], bool)
        images.append(batch["images"][mask])
        labels.append(batch["labels"][mask])
    return np.concatenate(images), np.concatenate(labels)


def write_pictures(workdir: str, embeddings: np.ndarray, labels: np.ndarray,
                   images: np.ndarray | None = None, *, k: int = 5, num_queries: int = 8,
                   tsne_max_points: int = 2000, seed: int = 0) -> list[str]:
    """The embedding pictures of a set (leave-one-out) into ``workdir``; returns the paths.

    * ``embedding_map.png``: 2-D PCA and t-SNE (scikit-learn) maps coloured by class;
    * ``worst_queries.png``: the ``num_queries`` queries whose top-``k`` holds the fewest
      same-class neighbours, each with its top-``k`` images (wrong ones framed in red);
      needs ``images``;
    * ``per_class_recall.png``: the histogram of per-class Recall@1.
    """
    from hnm import plots, search

    embeddings = np.asarray(embeddings, np.float32)
    labels = np.asarray(labels)
    k = int(min(k, len(embeddings) - 1))
    scores, idx = search.knn(embeddings, None, k, exclude_self=True)
    out = [os.path.join(workdir, name) for name in
           ("embedding_map.png", "worst_queries.png", "per_class_recall.png")]
    plots.plot_embedding_map(embeddings, labels, out[0], tsne_max_points=tsne_max_points,
                             seed=seed)
    if images is not None:
        plots.plot_worst_queries(images, labels, idx, scores, out[1], num_queries=num_queries)
    else:
        out.pop(1)
    plots.plot_per_class_recall(labels, labels[idx[:, 0]] == labels, out[-1])
    return [str(p) for p in out]


def eval_pictures(workdir: str, *, run: Run | None = None, eval_sets=None) -> list[str]:
    """``hnm eval``'s pictures: embeds the run's evaluation set and calls
    :func:`write_pictures` (the hook: one call after ``evaluate_checkpoint``)."""
    from hnm import data

    run = load(workdir) if run is None else run
    if eval_sets is None:
        ds = data.build(run.config.data, seed=run.config.seed, num_devices=1)
        eval_sets = ds.eval_sets()
    images, labels = _eval_arrays(eval_sets)
    emb = run.embed(images, progress=False)
    return write_pictures(workdir, emb, labels, images)

