"""Verified orbax checkpoints: one ``CheckpointManager`` under ``workdir/checkpoints``.

A checkpoint holds two items: ``state`` (the host copy of the Flax ``TrainState`` as NumPy
arrays, saved with ``StandardSave`` and restored into the structure of a freshly initialised
state) and ``meta`` (JSON: the data sampler's position and the model configuration, so a
resumed run continues with exactly the batches an uninterrupted run would have seen, and a run
whose model no longer matches its checkpoint fails in one line instead of deep inside orbax).

Orbax writes to a temporary directory and renames it when complete, so a run killed at any
moment (SIGKILL) leaves only complete steps behind. That guards against interruption, not
against damage afterwards (a flipped bit restores silently). So :func:`save` waits for orbax
to finish and records the size and SHA-256 of every file of the step in
``workdir/checksums/<step>.json`` (written atomically, outside orbax's directory), and
:func:`restore_verified` checks them before restoring: a step that fails (a changed, truncated
or missing file, no manifest, or an orbax error while reading it) is reported in one line and
the newest step that verifies is used instead — in training the failing steps are moved to
``workdir/corrupt/`` so the run can write those step numbers again. If no step verifies, the
run stops (:class:`CheckpointError`) and nothing is moved. Checkpoints written before
manifests existed (no manifest for any step) are restored unverified, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"
MANIFEST_SUBDIR = "checksums"
CORRUPT_SUBDIR = "corrupt"


class CheckpointError(ValueError):
    """No checkpoint of the run can be used (missing, or none verifies)."""


def open_manager(workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
                 create: bool = True) -> ocp.CheckpointManager:
    """The run's checkpoint manager, keeping the newest ``max_to_keep`` complete steps."""
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=create,
        cleanup_tmp_directories=create)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


# ----------------------------------------------------------------------------- manifests


def steps_on_disk(workdir: str) -> list[int]:
    """Complete (renamed) step directories, oldest first."""
    d = os.path.join(workdir, CHECKPOINT_SUBDIR)
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d)
                  if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def _manifest_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, MANIFEST_SUBDIR, f"{int(step)}.json")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(step_dir):
        out.extend(os.path.relpath(os.path.join(root, f), step_dir) for f in files)
    return sorted(out)


def write_manifest(workdir: str, step: int) -> str:
    """Records size and SHA-256 of every file of the (finished) ``step``; returns the path."""
    step_dir = os.path.join(workdir, CHECKPOINT_SUBDIR, str(int(step)))
    files = {}
    for rel in _files(step_dir):
        p = os.path.join(step_dir, rel)
        files[rel] = {"size": os.path.getsize(p), "sha256": _sha256(p)}
    path = _manifest_path(workdir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"step": int(step), "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def verify(workdir: str, step: int) -> str | None:
    """None when every file of ``step`` matches its manifest, else what is wrong (one line)."""
    path = _manifest_path(workdir, step)
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return "no checksum manifest (the run stopped before recording it)"
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable checksum manifest {path}: {e}"
    step_dir = os.path.join(workdir, CHECKPOINT_SUBDIR, str(int(step)))
    if not files:
        return "empty checksum manifest"
    for rel, want in files.items():
        p = os.path.join(step_dir, rel)
        if not os.path.isfile(p):
            return f"{rel} is missing"
        size = os.path.getsize(p)
        if size != want["size"]:
            return f"{rel} has {size} bytes, {want['size']} were written"
        if _sha256(p) != want["sha256"]:
            return f"{rel} has changed since it was written (checksum mismatch)"
    return None


def _prune_manifests(workdir: str) -> None:
    d = os.path.join(workdir, MANIFEST_SUBDIR)
    if not os.path.isdir(d):
        return
    live = set(steps_on_disk(workdir))
    for n in os.listdir(d):
        stem = n.split(".")[0]
        if stem.isdigit() and int(stem) not in live:
            try:
                os.remove(os.path.join(d, n))
            except FileNotFoundError:
                pass


# ----------------------------------------------------------------------------- save / restore


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         meta: Mapping[str, Any], *, force: bool = False, workdir: str | None = None) -> bool:
    """Saves ``state`` and the JSON-able ``meta`` at ``step`` and records its checksums.

    The save waits for orbax to finish so the manifest is written right after the step is
    complete (a SIGKILL in between leaves a step without manifest, which a restore treats as
    unverified and skips).
    """
    # Host NumPy copies: pmap's out_axes=None state is a host-local array on each process,
    # which orbax refuses in a multi-process job; NumPy leaves are written once, by the
    # primary process, and read back by all (the state is identical everywhere).
    state = jax.device_get(state)
    saved = manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(dict(meta))),
        force=force)
    manager.wait_until_finished()
    if workdir is None:
        workdir = os.path.dirname(str(manager.directory))
    if saved and jax.process_index() == 0:
        write_manifest(workdir, step)
        _prune_manifests(workdir)
    return saved


def restore_meta(manager: ocp.CheckpointManager, step: int | None = None) -> dict | None:
    """The ``meta`` item of ``step`` (default: the newest complete one), or None if none."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    out = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])


def restore_or_init(manager: ocp.CheckpointManager, init_state: Any,
                    step: int | None = None) -> tuple[Any, dict | None]:
    """Restores the newest complete checkpoint into the structure of ``init_state``, unverified
    (see :func:`restore_verified`).

    Returns ``(state, meta)``; when the directory holds no checkpoint, ``(init_state, None)``.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return init_state, None
    target = jax.device_get(init_state)  # NumPy leaves, as saved
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"


def quarantine(workdir: str, step: int) -> str:
    """Moves a failing step (and its manifest) to ``workdir/corrupt/``; returns where."""
    dest_dir = os.path.join(workdir, CORRUPT_SUBDIR)
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, f"{int(step)}.{time.strftime('%Y%m%dT%H%M%S')}")
    shutil.move(os.path.join(workdir, CHECKPOINT_SUBDIR, str(int(step))), dest)
    manifest = _manifest_path(workdir, step)
    if os.path.exists(manifest):
        shutil.move(manifest, os.path.join(dest, "hnm_manifest.json"))
    return dest


def restore_verified(workdir: str, init_state: Any, *, max_to_keep: int = 3,
                     check_meta: Callable[[dict], None] | None = None,
                     move_failing: bool = True, say: Callable[[str], None] = print,
                     require: bool = False) -> tuple[ocp.CheckpointManager, Any, dict | None]:
    """The newest checkpoint of ``workdir`` that verifies, restored into ``init_state``'s
    structure; returns ``(manager, state, meta)`` (``(manager, init_state, None)`` when the
    run has no checkpoint yet, unless ``require``).

    ``check_meta(meta)`` runs before the state is read (the model check); its errors propagate.
    ``move_failing`` (training) moves the failing steps newer than the one used to
    ``workdir/corrupt/`` (only when a good one exists); ``hnm eval`` leaves them in place.

    Raises:
      CheckpointError: ``require`` and no checkpoint, or checkpoints exist and none verifies.
    """
    steps = steps_on_disk(workdir)
    ckpt_dir = os.path.join(workdir, CHECKPOINT_SUBDIR)
    if not steps:
        if require:
            raise CheckpointError(f"no checkpoint in {ckpt_dir}: train first "
                                  f"(hnm train --workdir={workdir} ...)")
        return open_manager(workdir, max_to_keep=max_to_keep, create=move_failing), \
            init_state, None
    legacy = not any(os.path.exists(_manifest_path(workdir, s)) for s in steps)
    manager = open_manager(workdir, max_to_keep=max_to_keep, create=move_failing)
    failed: list[tuple[int, str]] = []
    try:
        for step in reversed(steps):
            problem = None if legacy else verify(workdir, step)
            if problem is None:
                try:
                    meta = restore_meta(manager, step)
                except Exception as e:  # noqa: BLE001 (any orbax read error: fall back)
                    problem = f"meta unreadable ({_one_line(e)})"
            if problem is None:
                if check_meta is not None:
                    check_meta(meta)
                try:
                    state, meta = restore_or_init(manager, init_state, step)
                except Exception as e:  # noqa: BLE001
                    problem = f"state unreadable ({_one_line(e)})"
            if problem is not None:
                say(f"checkpoint step {step} fails verification: {problem}")
                failed.append((step, problem))
                continue
            if legacy:
                say(f"checkpoint step {step} has no checksums (written before hnm recorded "
                    "them); restored unverified")
            if failed:
                moved = ""
                if move_failing:
                    manager.close()
                    for s, _ in failed:
                        quarantine(workdir, s)
                    manager = open_manager(workdir, max_to_keep=max_to_keep)
                    moved = f"; moved step(s) {', '.join(str(s) for s, _ in failed)} to " \
                            f"{os.path.join(workdir, CORRUPT_SUBDIR)}"
                say(f"using checkpoint step {step}, the newest that verifies{moved}")
            return manager, state, meta
    except BaseException:
        manager.close()
        raise
    manager.close()
    raise CheckpointError(
        f"no checkpoint in {ckpt_dir} verifies (" + "; ".join(
            f"step {s}: {p}" for s, p in failed) + "); nothing was moved: restore the files "
        "or start again in a new --workdir")
