"""Thin orbax helpers: one ``CheckpointManager`` under ``workdir/checkpoints``, always resumed.

A checkpoint holds two items: ``state`` (the host copy of the Flax ``TrainState`` as NumPy
arrays, saved with ``StandardSave`` and restored into the structure of a freshly initialised
state) and
``meta`` (JSON: the data sampler's position and the model configuration, so a resumed run
continues with exactly the batches an uninterrupted run would have seen, and a run whose model
no longer matches its checkpoint fails in one line instead of deep inside orbax).

Orbax writes to a temporary directory and renames it when complete, so a run killed at any
moment (SIGKILL) leaves only complete checkpoints behind; ``latest_step`` sees only those.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"


def open_manager(workdir: str, *, max_to_keep: int = 3,
                 async_save: bool = True) -> ocp.CheckpointManager:
    """The run's checkpoint manager, keeping the newest ``max_to_keep`` complete steps."""
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         meta: Mapping[str, Any], *, force: bool = False) -> bool:
    """Saves ``state`` and the JSON-able ``meta`` at ``step`` (asynchronously if enabled)."""
    # Host NumPy copies: pmap's out_axes=None state is a host-local array on each process,
    # which orbax refuses in a multi-process job; NumPy leaves are written once, by the
    # primary process, and read back by all (the state is identical everywhere).
    state = jax.device_get(state)
    return manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(dict(meta))),
        force=force)


def restore_meta(manager: ocp.CheckpointManager, step: int | None = None) -> dict | None:
    """The ``meta`` item of ``step`` (default: the newest complete one), or None if none."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    out = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])


def restore_or_init(manager: ocp.CheckpointManager, init_state: Any,
                    step: int | None = None) -> tuple[Any, dict | None]:
    """Restores the newest complete checkpoint into the structure of ``init_state``.

    Returns ``(state, meta)``; when the directory holds no checkpoint, ``(init_state, None)``.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return init_state, None
    target = jax.device_get(init_state)  # NumPy leaves, as saved
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])
