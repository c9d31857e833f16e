r"""Zero-shot retrieval evaluation of a train state: embed the evaluation sets, then search.

:func:`embed_dataset` embeds an evaluation set batch by batch with a
:class:`hnm.parallel.Layout`'s embedding step and keeps the embeddings **on the devices**: the
batches are concatenated and the padded rows dropped by one on-device gather, and the result
goes straight to the blocked exact search (:func:`hnm.metrics.retrieval_metrics`), NMI and the
collapse diagnostics, which all take device arrays. Only labels and masks (host data to begin
with) stay on the host.

In a multi-process job each process embeds only its share of every evaluation batch (the
global batch's rows ``[p B / P, (p + 1) B / P)``, so the concatenation in process order is the
one-process order), and the embeddings are gathered onto every device by an on-device
collective (``mesh``: the jitted concatenation of the global array with a replicated output;
``pmap``: a pmapped ``all_gather`` of each batch over every device of the job): every process
then searches all of them, and all processes compute the same metrics as one process would.

Protocols: one set named ``test`` is leave-one-out retrieval over it (CUB, Cars, SOP); sets
``query`` and ``gallery`` rank query against gallery (In-Shop).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hnm import analysis, metrics, parallel

DIAG_BLOCK = 1024  # anchors per block of the evaluation set's collapse diagnostics


def _as_layout(layout: parallel.Layout | int) -> parallel.Layout:
    """A :class:`~hnm.parallel.Layout`, or an int ``n``: pmap over the first ``n`` local
    devices (the historical ``num_devices`` argument)."""
    if isinstance(layout, parallel.Layout):
        return layout
    return parallel.make_layout("pmap", int(layout))


def _global_batch(layout: parallel.Layout, batch_size: int) -> int:
    """The evaluation batch rounded up to a multiple of the devices it is spread over."""
    n = layout.num_local_devices * jax.process_count()
    return -(-int(batch_size) // n) * n


def embed_dataset(state, eval_set, batch_size: int, embed_fn: Callable | None,
                  layout: parallel.Layout | int, progress: bool = False,
                  counts: dict | None = None) -> tuple[jax.Array, np.ndarray]:
    """Embeds every example of ``eval_set``; padded rows (``mask`` False) are dropped.

    Args:
      state: the train state (passed to ``embed_fn``).
      eval_set: has ``batches(batch_size)`` yielding ``images``, ``labels``, ``mask`` (padded
        to ``batch_size``) and ``num_examples``.
      batch_size: global rows per batch, a multiple of the devices that share it.
      embed_fn: ``layout.make_embed_step()`` (None: made here).
      layout: a :class:`~hnm.parallel.Layout` or a local device count (pmap).
      progress: a terminal progress bar.
      counts: if given, ``counts["here"]`` / ``counts["all"]`` are increased by the rows
        (padding included) this process embedded / the global batches held.

    Returns:
      ``(embeddings, labels)``: a float32 device array [N, D] (every process holds all of
      them, on its first device) and int labels [N] on the host.
    """
    layout = _as_layout(layout)
    embed_fn = layout.make_embed_step() if embed_fn is None else embed_fn
    split = jax.process_count() > 1
    gather = _pmap_gather(layout) if split and layout.backend == "pmap" else None
    pi, pc = jax.process_index(), jax.process_count()
    embs, labels, masks = [], [], []
    batches: Iterable = eval_set.batches(batch_size)
    if progress:
        from tqdm.auto import tqdm  # lazy: only for interactive runs
        batches = tqdm(batches, total=-(-eval_set.num_examples // batch_size), desc="embed",
                       leave=False, dynamic_ncols=True)
    for batch in batches:
        images = np.asarray(batch["images"])
        total = images.shape[0]
        if split:  # this process's contiguous share of the global batch
            images = images.reshape(pc, -1, *images.shape[1:])[pi]
        emb = embed_fn(state, layout.shard_batch({"x": images})["x"])
        if gather is not None:  # every process's rows of this batch, on each local device
            emb = gather(emb).addressable_data(0)
        embs.append(parallel.rows(emb))
        if counts is not None:
            counts["here"] = counts.get("here", 0) + images.shape[0]
            counts["all"] = counts.get("all", 0) + total
        labels.append(np.asarray(batch["labels"]))
        masks.append(np.asarray(batch["mask"], bool))
    keep = np.flatnonzero(np.concatenate(masks))
    return _gather_rows(embs, keep, layout), np.concatenate(labels)[keep]


def _pmap_gather(layout: parallel.Layout) -> Callable:
    """pmap's ``[local devices, b, D]`` embeddings of one batch -> ``[local devices,
    job devices x b, D]``: each device gets the rows of every device of the job, in device
    order (process-major, as the batch was split), with one on-device ``all_gather``."""
    devices = None if layout.devices is None else list(layout.devices)
    return jax.pmap(lambda x: jax.lax.all_gather(x, parallel.AXIS, tiled=True),
                    axis_name=parallel.AXIS, devices=devices)


def _gather_rows(embs: list, keep: np.ndarray, layout: parallel.Layout) -> jax.Array:
    """``concatenate(embs)[keep]`` on the devices: one local array, or (multi-process mesh)
    the gathered global array's local copy."""
    if layout.backend == "mesh" and jax.process_count() > 1:
        replicated = NamedSharding(layout.mesh, P())
        keep = jax.make_array_from_process_local_data(replicated, keep.astype(np.int32))
        full = jax.jit(lambda e, i: jnp.concatenate(e)[i], out_shardings=replicated)(
            embs, keep)
        return full.addressable_data(0)  # every process holds all rows, on its own device
    device = layout.local_devices[0]
    return jax.jit(lambda e, i: jnp.concatenate(e)[i], device=device)(
        [jax.device_put(e, device) for e in embs], keep)


def score(emb: Mapping[str, tuple[Any, Any]], eval_cfg: Mapping[str, Any],
          devices: Sequence[Any] | None = None) -> dict:
    """Recall@K, MAP@R, ... (and NMI / AMI) of given ``{"test": (emb, labels)}`` or
    ``{"query": ..., "gallery": ...}`` embeddings: the metrics of :func:`evaluate`."""
    ks = tuple(eval_cfg.get("recall_ks", (1, 2, 4, 8)))
    if "query" in emb:
        (q, ql), (g, gl) = emb["query"], emb["gallery"]
        out = metrics.retrieval_metrics(q, ql, g, gl, ks=ks, devices=devices)
    else:
        q, ql = emb["test"]
        out = metrics.retrieval_metrics(q, ql, ks=ks, devices=devices)
    if eval_cfg.get("nmi", True):
        out.update(metrics.clustering_metrics(q, ql, jax.random.key(0)))  # nmi, ami
    return out


def evaluate(state, eval_sets: Mapping[str, Any], eval_cfg: Mapping[str, Any],
             embed_fn: Callable | None, layout: parallel.Layout | int,
             progress: bool = False) -> dict:
    """Recall@K, MAP@R, R-precision (and NMI) of the evaluation sets, plus collapse
    diagnostics (``diag/...``) of the test (or query) embeddings.

    Args:
      state: the train state.
      eval_sets: ``{"test": ...}`` or ``{"query": ..., "gallery": ...}``.
      eval_cfg: ``batch_size`` (default 256), ``recall_ks`` (1, 2, 4, 8), ``nmi`` (True).
      embed_fn: the layout's embedding step (None: made here).
      layout: a :class:`~hnm.parallel.Layout` or a local device count (pmap).
      progress: a terminal progress bar while embedding.

    Returns:
      ``{"recall@K": ..., "map@r": ..., "r_precision": ..., "nmi": ..., "diag/...": ...}``
      as Python floats, the same on every process.
    """
    layout = _as_layout(layout)
    embed_fn = layout.make_embed_step() if embed_fn is None else embed_fn
    bs = _global_batch(layout, eval_cfg.get("batch_size", 256))
    counts: dict = {}
    emb = {name: embed_dataset(state, s, bs, embed_fn, layout, progress, counts)
           for name, s in eval_sets.items()}
    if jax.process_count() > 1:  # each process embeds only its share: say so
        print(f"hnm: eval: process {jax.process_index() + 1} of {jax.process_count()} "
              f"embedded {counts['here']} of {counts['all']} rows", file=sys.stderr,
              flush=True)
    # The blocked search deals its query blocks over this process's devices (device-to-device
    # copies of the embeddings; none goes through the host).
    out = score(emb, eval_cfg, list(layout.local_devices))
    q, ql = emb["query"] if "query" in emb else emb["test"]
    # Blocked anchors: O(DIAG_BLOCK N) memory, not an N x N matrix (SOP's test set is 60k).
    diag = analysis.collapse_diagnostics(q, jnp.asarray(ql), block_size=DIAG_BLOCK)
    out.update({f"diag/{k}": float(v) for k, v in diag.items()})
    return out
