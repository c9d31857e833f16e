"""Export a trained embedder: a serialised ``jax.export`` function + a JSON input contract.

  hnm export --workdir=runs/digits --output=runs/digits/export
  hnm export --workdir=runs/digits --output=runs/digits/saved_model --format=saved_model

``DIR/embedder.jax`` is the run's embedder (newest checkpoint, parameters baked in as
constants) as a StableHLO module with a **symbolic batch dimension**: it takes uint8 images
``[B, H, W, C]`` for any B and returns float32 embeddings ``[B, D]``. Loading it needs only
``jax`` — no hnm, flax or orbax:

    from jax import export
    embed = export.deserialize(open("DIR/embedder.jax", "rb").read()).call

``embed(images)`` then equals ``hnm.inference.load(workdir).embed(images)`` (to float
rounding; 1e-6 on CPU, tested) for images already at the model's size. ``DIR/contract.json``
says what the function takes: ``input_shape`` ``[null, H, W, C]``, dtype uint8 in [0, 255],
the pixel normalisation applied inside (``(x / 255 - pixel_mean) / pixel_std``), and the
resize + centre crop the caller applies first (``preprocessing``: shorter side to
``eval_resize``, centre crop to ``image_size``; none for a run at native size), plus the
embedding size, whether rows are unit-norm and the similarity the run was evaluated with.

``--format=saved_model`` (needs TensorFlow) writes a TF SavedModel through ``jax2tf`` with a
``serving_default`` signature ``images: uint8 [None, H, W, C] -> embeddings: float32 [None,
D]`` that TF Serving can load; the same contract goes beside it.

References:
  JAX documentation, "Exporting and serializing staged-out computations" (``jax.export``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

EMBEDDER_FILE = "embedder.jax"
CONTRACT_FILE = "contract.json"
CONTRACT_VERSION = 1
FORMATS = ("jax", "saved_model")


def embed_function(run) -> Any:
    """``images uint8 [B, H, W, C] -> float32 [B, D]`` of a :class:`hnm.inference.Run`,
    inference mode, the restored variables closed over (they become constants)."""
    import jax

    from hnm import parallel

    state = jax.device_get(run.state)
    variables = parallel.model_variables(state)
    apply_fn = state.apply_fn

    def embed(images):
        return apply_fn(variables, images, train=False).astype(jax.numpy.float32)

    return embed


def contract(run, *, fmt: str = "jax", platforms: Sequence[str] = ()) -> dict:
    """The JSON input contract of an exported run (see the module docstring)."""
    import jax

    from hnm import models, train

    model = models.create(train.model_config(run.config))
    h, w, c = run.image_shape
    prep = run.preprocess
    return {
        "contract_version": CONTRACT_VERSION,
        "format": fmt,
        "file": EMBEDDER_FILE if fmt == "jax" else ".",
        "input_shape": [None, h, w, c],
        "input_dtype": "uint8",
        "input_range": [0, 255],
        "image_size": [h, w],
        "channels": c,
        "channel_order": "RGB" if c == 3 else "grey",
        "normalisation_inside": {"formula": "(x / 255 - pixel_mean) / pixel_std",
                                 "pixel_mean": list(model.pixel_mean),
                                 "pixel_std": list(model.pixel_std)},
        "preprocessing": ({"resize_shorter_side_to": prep.eval_resize or None,
                           "center_crop_to": [h, w]} if prep.image_size else None),
        "output_shape": [None, run.embedding_dim],
        "output_dtype": "float32",
        "normalized_output": bool(model.normalize),
        "similarity": "cosine",
        "step": run.step,
        "model": train.model_signature(run.config),
        "platforms": list(platforms),
        "jax_version": jax.__version__,
    }


def export_jax(run, directory: str, *, platforms: Sequence[str] | None = None) -> str:
    """Writes ``embedder.jax`` (+ ``contract.json``) of ``run`` into ``directory``."""
    import jax
    from jax import export

    h, w, c = run.image_shape
    batch = export.symbolic_shape("b")[0]
    spec = jax.ShapeDtypeStruct((batch, h, w, c), np.uint8)
    exported = export.export(jax.jit(embed_function(run)),
                             platforms=tuple(platforms) if platforms else None)(spec)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, EMBEDDER_FILE)
    with open(path, "wb") as f:
        f.write(exported.serialize())
    _write_contract(directory, contract(run, fmt="jax", platforms=exported.platforms))
    return path


def export_saved_model(run, directory: str) -> str:
    """Writes a TF SavedModel of ``run`` (via ``jax2tf``, polymorphic batch) + contract."""
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError as e:
        raise ValueError(f"--format=saved_model needs TensorFlow ({e}); pip install "
                         "tensorflow-cpu, or use the default --format=jax.") from None
    h, w, c = run.image_shape
    tf_fn = jax2tf.convert(embed_function(run), polymorphic_shapes=[f"(b, {h}, {w}, {c})"],
                           with_gradient=False)
    module = tf.Module()
    module.embed = tf.function(
        lambda images: {"embeddings": tf_fn(images)}, autograph=False,
        input_signature=[tf.TensorSpec([None, h, w, c], tf.uint8, name="images")])
    os.makedirs(directory, exist_ok=True)
    tf.saved_model.save(module, directory, signatures={"serving_default": module.embed})
    _write_contract(directory, contract(run, fmt="saved_model", platforms=("cpu",)))
    return directory


def _write_contract(directory: str, content: dict) -> None:
    with open(os.path.join(directory, CONTRACT_FILE), "w") as f:
        json.dump(content, f, indent=2)


def load_exported(directory: str):
    """The exported embedder of ``directory`` as a callable (the two-line loader)."""
    from jax import export

    path = os.path.join(directory, EMBEDDER_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: write it with `hnm export`.")
    with open(path, "rb") as f:
        return export.deserialize(bytearray(f.read())).call


def export_command(argv: Sequence[str]) -> None:
    """``hnm export --workdir=W --output=DIR [--format=jax|saved_model] [--platforms=cpu,cuda]``.

    Raises:
      ValueError: no run or checkpoint in W, an unknown format, TensorFlow missing for
        ``saved_model``.
    """
    import argparse

    from hnm import inference, search

    parser = argparse.ArgumentParser(prog="hnm export")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--format", default="jax", choices=FORMATS)
    parser.add_argument("--platforms", default="",
                        help="comma-separated jax.export platforms (default: this backend)")
    args = search._parse(parser, argv)
    run = inference.load(args.workdir)
    if args.format == "saved_model":
        path = export_saved_model(run, args.output)
    else:
        platforms = [p for p in args.platforms.split(",") if p] or None
        path = export_jax(run, args.output, platforms=platforms)
    print(f"exported step {run.step} of {args.workdir} to {path} "
          f"(contract: {os.path.join(args.output, CONTRACT_FILE)})")
