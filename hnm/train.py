"""Training and evaluation: a Flax ``TrainState`` stepped with ``jax.pmap`` across devices.

The step (:func:`train_step`) is a pure function that knows only an axis name: anchors are the
device's local rows, the objective mines over the ``all_gather`` of every device's embeddings
and normalises over the global batch, and the gradients are ``psum``-ed. Wrapped as
``pmap(..., in_axes=(None, 0, None), out_axes=(None, None))`` the state stays one host copy
(flax's imagenet example without replicate/unreplicate), so porting to ``jax.shard_map`` is a
change to :func:`make_train_step` alone.

:func:`train_and_evaluate` reads top to bottom: validate the config, build data, model,
optimiser and objective, restore the newest checkpoint, loop (log, checkpoint, evaluate),
write ``metrics.jsonl``, ``eval.json`` and PNG curves into the work directory.

Cross-batch memory (XBM): ``config.objective.memory_size > 0`` keeps a ring buffer of the
last ``memory_size`` (global-batch) embeddings in ``TrainState.memory`` (checkpointed with the
rest of the state); from step ``config.objective.memory_start_step`` on, the objective mines
against it too (:mod:`hnm.memory`).
"""
from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from hnm import analysis, checkpoint, metrics, models, objectives
from hnm import memory as memory_lib

AXIS = "batch"
DIAG_BLOCK = 1024  # anchors per block of the evaluation set's collapse diagnostics
# Keys of config.objective read by the trainer, never passed to objectives.get.
MEMORY_KEYS = ("memory_size", "memory_start_step")
# Panels of workdir/training_curves.png: the loss, the official code's hn_ratio, the collapse
# diagnostics of the logged batch, and test R@1 at each evaluation.
CURVE_KEYS = ("loss", "frac_hard", "diag/mean_distance", "diag/separation_violation_max",
              "diag/diso_lower", "diag/diso_upper", "eval/recall@1", "eval/map@r")


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` plus BatchNorm statistics (may be empty) and
    the cross-batch memory (a :class:`hnm.memory.Memory`, or None when off)."""
    batch_stats: Any = None
    memory: Any = None


class NonFiniteLossError(FloatingPointError):
    """Raised when a logged loss is NaN or inf; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- optimisation


def make_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Learning-rate schedule: constant with step decays (the official recipe), or cosine.

    ``decay_at`` are fractions of training (0.5 -> x ``decay_factor`` half-way, as the official
    CUB/Cars recipe; (0.5, 0.75) for SOP/In-Shop); ``warmup_steps`` adds a linear warm-up.
    """
    lr = float(optim.get("learning_rate", 1e-3))
    warmup = int(optim.get("warmup_steps", 0))
    if optim.get("schedule", "step") == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
    else:
        boundaries = {int(f * total_steps): float(optim.get("decay_factor", 0.1))
                      for f in optim.get("decay_at", ())}
        main = optax.piecewise_constant_schedule(lr, boundaries)
    if warmup:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), main], [warmup])
    return main


def make_optimizer(optim: Mapping[str, Any], schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD (with or without momentum), Adam or AdamW on ``schedule``."""
    name = optim.get("name", "sgd")
    wd = float(optim.get("weight_decay", 0.0))
    if name == "sgd":
        momentum = float(optim.get("momentum", 0.0)) or None
        tx = optax.sgd(schedule, momentum=momentum)
        return optax.chain(optax.add_decayed_weights(wd), tx) if wd else tx
    if name == "adam":
        return optax.adam(schedule)
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=wd)
    raise ValueError(f"unknown `optim.name`={name!r}; expected 'sgd', 'adam' or 'adamw'.")


def create_train_state(model, tx: optax.GradientTransformation, key: jax.Array,
                       image_shape: tuple[int, ...], *, memory_size: int = 0) -> TrainState:
    """Initialises parameters (and BatchNorm statistics) on a dummy batch of ``image_shape``,
    and an empty cross-batch memory of ``memory_size`` rows when ``memory_size > 0``."""
    dummy = jnp.zeros((2, *image_shape), jnp.uint8)
    variables = jax.jit(functools.partial(model.init, train=False))({"params": key}, dummy)
    memory = None
    if memory_size:
        emb = jax.eval_shape(functools.partial(model.apply, train=False), variables, dummy)
        memory = memory_lib.init(int(memory_size), int(emb.shape[-1]))
    state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                              batch_stats=variables.get("batch_stats", {}), memory=memory)
    # An int32 array step, not Python's weakly typed 0: the step's second call must hit the
    # first call's compilation (one compile per run).
    return state.replace(step=jnp.zeros((), jnp.int32))


def _variables(state: TrainState, params=None) -> dict:
    params = state.params if params is None else params
    return {"params": params, "batch_stats": state.batch_stats} if state.batch_stats else {
        "params": params}


# ----------------------------------------------------------------------------- the pure step


def train_step(state: TrainState, batch: Mapping[str, jax.Array], key: jax.Array, *,
               objective_fn: Callable, axis_name: str = AXIS,
               memory_start_step: int = 0) -> tuple[TrainState, dict]:
    """One optimisation step on this device's slice of the global batch.

    ``objective_fn`` was built with ``objectives.get(name, axis_name=axis_name, ...)``: it
    returns this device's share of the global loss (local sum / global count), so the
    ``psum`` of the gradients is exactly the gradient of one device seeing the whole batch.
    BatchNorm statistics are averaged across devices so the state stays identical everywhere.

    With a cross-batch memory in the state, the objective also mines against it (masked empty
    before ``memory_start_step``, a traced test: one compilation for both phases), and the
    global batch's stopped embeddings are then enqueued, identically on every device.

    Returns the new state and a dict of scalar metrics, identical on every device
    (``memory_fill``: the fraction of memory slots the objective used, when on).
    """
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    use_memory = state.memory is not None  # static: the state's structure
    if use_memory:
        memory = memory_lib.masked(state.memory, state.step >= memory_start_step)
        objective_fn = functools.partial(objective_fn, memory=memory)

    def loss_fn(params):
        emb, updates = state.apply_fn(_variables(state, params), batch["images"], train=True,
                                      mutable=["batch_stats"])
        emb = emb.astype(jnp.float32)
        loss, aux = objective_fn(emb, batch["labels"], key)
        return loss, (aux, updates, emb)

    (_, (aux, updates, emb)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.psum(grads, axis_name)
    batch_stats = updates.get("batch_stats", state.batch_stats)
    if batch_stats:
        batch_stats = jax.lax.pmean(batch_stats, axis_name)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    step_metrics = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
    if use_memory:
        new_state = new_state.replace(memory=memory_lib.enqueue(
            state.memory, jax.lax.stop_gradient(emb), batch["labels"], axis_name=axis_name))
        step_metrics["memory_fill"] = memory_lib.fill_fraction(memory)
    step_metrics["l2_grads"] = optax.global_norm(grads)
    step_metrics["l2_params"] = optax.global_norm(new_state.params)
    return new_state, step_metrics


def make_train_step(objective_fn: Callable, devices=None, *,
                    memory_start_step: int = 0) -> Callable:
    """The pmapped step: state and key replicated as one host copy, batch split on axis 0."""
    return jax.pmap(functools.partial(train_step, objective_fn=objective_fn, axis_name=AXIS,
                                      memory_start_step=memory_start_step),
                    axis_name=AXIS, in_axes=(None, 0, None), out_axes=(None, None),
                    devices=devices)


def embed_step(state: TrainState, images: jax.Array) -> jax.Array:
    """Embeddings of a batch in inference mode (running BatchNorm statistics), float32."""
    return state.apply_fn(_variables(state), images, train=False).astype(jnp.float32)


def place_state(state: TrainState, devices=None) -> TrainState:
    """Puts a host or freshly initialised state where the pmapped step leaves its output.

    The step returns the state with the sharding of its ``out_axes=None`` outputs; feeding it
    the initial state in that same form means the second step reuses the first step's
    compilation (one compile per run, a test checks it).
    """
    n_local = jax.local_device_count() if devices is None else len(devices)
    return jax.pmap(lambda s, _: s, axis_name=AXIS, in_axes=(None, 0), out_axes=None,
                    devices=devices)(state, np.zeros(n_local))  # pmap needs a mapped arg


def make_embed_step(devices=None) -> Callable:
    return jax.pmap(embed_step, axis_name=AXIS, in_axes=(None, 0), devices=devices)


def select_devices(config) -> tuple[list | None, int]:
    """``(devices for pmap, local device count)`` for ``train.num_devices`` (0: all).

    ``None`` means "every device of the job": in a multi-process job pmap's collectives must
    span all processes' devices, and naming local devices would silently keep them local.
    """
    local = jax.local_devices()
    n = int(config.train.get("num_devices", 0) or len(local))
    if not 1 <= n <= len(local):
        raise ValueError(f"`train.num_devices`={n} but this host has {len(local)} devices.")
    if n == len(local):
        return None, n
    if jax.process_count() > 1:
        raise ValueError("`train.num_devices` must be 0 (all) in a multi-process job; got "
                         f"{n} of {len(local)} local devices.")
    return local[:n], n


def shard(batch: Mapping[str, np.ndarray], num_devices: int) -> dict:
    """Reshapes host arrays [B, ...] to [devices, B / devices, ...] (whole classes per slice)."""
    return {k: np.asarray(v).reshape(num_devices, -1, *np.shape(v)[1:])
            for k, v in batch.items()}


# ----------------------------------------------------------------------------- evaluation


def embed_dataset(state: TrainState, eval_set, batch_size: int, embed_fn: Callable,
                  num_devices: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Embeds every example of ``eval_set``; padded rows (``mask`` False) are dropped."""
    embs, labels = [], []
    batches = eval_set.batches(batch_size)
    if progress:
        batches = _progress(batches, total=-(-eval_set.num_examples // batch_size),
                            desc="embed")
    for batch in batches:
        emb = embed_fn(state, shard({"images": batch["images"]}, num_devices)["images"])
        emb = np.asarray(emb).reshape(-1, emb.shape[-1])
        mask = np.asarray(batch["mask"], bool)
        embs.append(emb[mask])
        labels.append(np.asarray(batch["labels"])[mask])
    return np.concatenate(embs), np.concatenate(labels)


def evaluate(state: TrainState, eval_sets: Mapping[str, Any], eval_cfg: Mapping[str, Any],
             embed_fn: Callable, num_devices: int, progress: bool = False) -> dict:
    """Recall@K, MAP@R, R-precision (and NMI) of the evaluation sets.

    One set named ``test``: leave-one-out retrieval over it (CUB, Cars, SOP). Sets ``query``
    and ``gallery``: query against gallery (In-Shop).
    """
    bs = int(eval_cfg.get("batch_size", 256))
    bs = -(-bs // num_devices) * num_devices
    ks = tuple(eval_cfg.get("recall_ks", (1, 2, 4, 8)))
    emb = {name: embed_dataset(state, s, bs, embed_fn, num_devices, progress)
           for name, s in eval_sets.items()}
    # The blocked search deals its query blocks over the devices that embedded them.
    devices = jax.local_devices()[:num_devices]
    if "query" in emb:
        (q, ql), (g, gl) = emb["query"], emb["gallery"]
        out = metrics.retrieval_metrics(q, ql, g, gl, ks=ks, devices=devices)
    else:
        q, ql = emb["test"]
        out = metrics.retrieval_metrics(q, ql, ks=ks, devices=devices)
    if eval_cfg.get("nmi", True):
        out["nmi"] = float(metrics.nmi(q, ql, jax.random.key(0)))
    # Blocked anchors: O(DIAG_BLOCK N) memory, not an N x N matrix (SOP's test set is 60k).
    diag = analysis.collapse_diagnostics(jnp.asarray(q), jnp.asarray(ql),
                                         block_size=DIAG_BLOCK)
    out.update({f"diag/{k}": float(v) for k, v in diag.items()})
    return out


# ----------------------------------------------------------------------------- helpers


def _progress(it: Iterable, total: int, desc: str):
    from tqdm.auto import tqdm  # lazy: only for interactive runs
    return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True)


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the next step and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _append_jsonl(path: str | None, row: Mapping[str, Any]) -> None:
    if path is None:  # not the main process of a multi-process job
        return
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _host_metrics(m: Mapping[str, Any]) -> dict:
    return {k: float(np.asarray(v)) for k, v in m.items()}


def _model_signature(config) -> dict:
    """What a checkpoint must agree with: the model config (embedding dim, backbone, ...)."""
    return json.loads(json.dumps(config.model.to_dict() if hasattr(config.model, "to_dict")
                                 else dict(config.model)))


def _check_checkpoint_model(meta: Mapping[str, Any] | None, config, workdir: str) -> None:
    """One clear line when the checkpoint was written for another model (e.g. another dim)."""
    if meta is not None and meta.get("model") != _model_signature(config):
        raise ValueError(f"the model config {_model_signature(config)} does not match the "
                         f"checkpoint in {workdir} ({meta.get('model')}); use a new --workdir.")


def _write_eval_json(workdir: str, results: Mapping[str, Any]) -> None:
    if jax.process_index() == 0:  # one writer in a multi-process job
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(results, f, indent=2)


def model_config(config) -> dict:
    """``config.model`` minus ``pretrained`` (handled by :func:`load_pretrained`)."""
    cfg = dict(config.model)
    cfg.pop("pretrained", None)
    return cfg


def load_pretrained(state: TrainState, config) -> TrainState:
    """Copies ImageNet weights into a fresh state when ``model.pretrained`` asks for them.

    ``"keras_imagenet"``: ``keras.applications.ResNet50`` weights (downloaded by Keras on the
    user's machine) into the Keras-compatible Flax ResNet-50.
    """
    which = config.model.get("pretrained", "")
    if not which:
        return state
    if which != "keras_imagenet":
        raise ValueError(f"unknown `model.pretrained`={which!r}; expected '' or "
                         "'keras_imagenet'.")
    variables = models.load_keras_resnet50(
        {"params": state.params, "batch_stats": state.batch_stats})
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                         opt_state=state.tx.init(variables["params"]))


def memory_options(config) -> tuple[int, int]:
    """``(memory_size, memory_start_step)`` of ``config.objective`` (0, 0 when absent).

    Raises:
      ValueError: either is negative or not an integer.
    """
    opts = dict(config.objective)
    out = []
    for name in MEMORY_KEYS:
        value = opts.get(name, 0) or 0
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"`objective.{name}` must be an integer >= 0; got {value!r}.")
        out.append(int(value))
    return out[0], out[1]


def _objective_options(config) -> tuple[str, dict]:
    """``(name, options)`` for ``objectives.get``: the trainer's memory keys removed."""
    opts = dict(config.objective)
    for k in MEMORY_KEYS:
        opts.pop(k, None)
    return opts.pop("name"), opts


def check_config(config) -> None:
    """Fails in one line, before anything compiles, on an unknown objective or option."""
    memory_options(config)
    name, opts = _objective_options(config)
    objectives.get(name, **opts)
    models.create(model_config(config))


def build_objective(config, axis_name: str | None = AXIS) -> Callable:
    name, opts = _objective_options(config)
    return objectives.get(name, axis_name=axis_name, **opts)


# ----------------------------------------------------------------------------- the run


def train_and_evaluate(config, workdir: str, *, progress: bool | None = None) -> dict:
    """Trains ``config`` in ``workdir`` (resuming its newest checkpoint) and evaluates.

    Returns the final evaluation metrics, also written to ``workdir/eval.json``.
    """
    from hnm import data  # leaf; may import TensorFlow lazily for tfds sources

    os.makedirs(workdir, exist_ok=True)
    progress = _isatty() if progress is None else progress
    check_config(config)
    devices, n_dev = select_devices(config)
    is_main = jax.process_index() == 0  # writes metrics, eval.json and plots
    ds = data.build(config.data, seed=config.seed, num_devices=n_dev,
                    process_index=jax.process_index(), process_count=jax.process_count())
    total_steps = int(config.train.num_epochs * ds.steps_per_epoch)
    schedule = make_schedule(config.optim, total_steps)
    model = models.create(model_config(config))
    key = jax.random.key(config.seed)
    init_key, step_key = jax.random.split(key)
    memory_size, memory_start = memory_options(config)
    state = create_train_state(model, make_optimizer(config.optim, schedule), init_key,
                               ds.image_shape, memory_size=memory_size)
    manager = checkpoint.open_manager(workdir, max_to_keep=config.train.get("keep", 3))
    if manager.latest_step() is None:  # fresh run: start from pretrained weights if asked
        state = load_pretrained(state, config)
    _check_checkpoint_model(checkpoint.restore_meta(manager), config, workdir)
    state, meta = checkpoint.restore_or_init(manager, state)
    state = place_state(state, devices)
    sampler = ds.init_sampler_state() if meta is None else type(ds.init_sampler_state())(
        *meta["sampler"])
    step = int(state.step)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))

    p_train = make_train_step(build_objective(config), devices,
                              memory_start_step=memory_start)
    p_embed = make_embed_step(devices)
    p_diag = jax.jit(functools.partial(analysis.training_diagnostics,
                                       margin=float(config.train.get("diag_margin", 0.2))))
    log_every, ckpt_every = int(config.train.log_every), int(config.train.ckpt_every)
    eval_every = max(1, int(config.train.eval_every_epochs * ds.steps_per_epoch))
    metrics_path = os.path.join(workdir, "metrics.jsonl") if is_main else None

    def check_finite(m, step):
        # A diverged state is never logged as good nor checkpointed: the last good one stays.
        if not (np.isfinite(float(m["loss"])) and np.isfinite(float(m["l2_params"]))):
            manager.wait_until_finished()
            raise NonFiniteLossError(
                f"non-finite loss {float(m['loss'])} (or parameters) between steps "
                f"{last_good} and {step}; the last good checkpoint (step "
                f"{manager.latest_step()}) is kept.")

    def save(step, m, force=False):
        check_finite(m, step)
        checkpoint.save(manager, step, state, {"sampler": [int(x) for x in sampler],
                                               "model": _model_signature(config)}, force=force)

    last_good, t0, t_steps = step, time.perf_counter(), step
    bar = _progress(range(step, total_steps), total_steps - step, "train") if progress else None
    with _Preemption() as preempt:
        while step < total_steps:
            batch, sampler = ds.train_batch(sampler)
            batch = shard(batch, n_dev)
            state, m = p_train(state, batch, jax.random.fold_in(step_key, step))
            step += 1
            if bar is not None:
                bar.update(1)
            if step % log_every == 0 or step == total_steps:
                m = _host_metrics(m)
                check_finite(m, step)
                last_good = step
                dt = time.perf_counter() - t0
                # Diagnostics on this batch in inference mode: one extra forward pass per
                # log step, kept out of the jitted train step (its hot path).
                emb = p_embed(state, batch["images"])
                diag = p_diag(emb.reshape(-1, emb.shape[-1]), batch["labels"].reshape(-1))
                m.update({f"diag/{k}": float(v) for k, v in diag.items()})
                m.update(step=step, epoch=step / ds.steps_per_epoch,
                         learning_rate=float(schedule(step - 1)),
                         steps_per_s=(step - t_steps) / dt,
                         images_per_s=(step - t_steps) * batch["labels"].size / dt)
                _append_jsonl(metrics_path, m)
                if bar is not None:
                    bar.set_postfix(loss=f"{m['loss']:.4f}", hard=f"{m['frac_hard']:.2f}")
                t0, t_steps = time.perf_counter(), step
            if step % ckpt_every == 0 or preempt.requested:
                save(step, m)
            if preempt.requested:
                manager.wait_until_finished()
                return {"preempted_at_step": step}
            if step % eval_every == 0 and step < total_steps:
                periodic = evaluate(state, ds.eval_sets(), config.eval, p_embed, n_dev)
                _append_jsonl(metrics_path, {"step": step, **{f"eval/{k}": v
                                                              for k, v in periodic.items()}})
    if bar is not None:
        bar.close()
    if manager.latest_step() != step:
        save(step, m, force=True)
    manager.wait_until_finished()
    final = evaluate(state, ds.eval_sets(), config.eval, p_embed, n_dev, progress)
    final["step"] = step
    _append_jsonl(metrics_path, {"step": step, **{f"eval/{k}": v for k, v in final.items()}})
    _write_eval_json(workdir, final)
    if is_main:
        write_plots(workdir)
    manager.close()
    return final


def evaluate_checkpoint(config, workdir: str, *, progress: bool | None = None) -> dict:
    """Evaluates the newest checkpoint of ``workdir``; writes and returns ``eval.json``."""
    from hnm import data

    progress = _isatty() if progress is None else progress
    devices, n_dev = select_devices(config)
    ds = data.build(config.data, seed=config.seed, num_devices=n_dev,
                    process_index=jax.process_index(), process_count=jax.process_count())
    model = models.create(model_config(config))
    tx = make_optimizer(config.optim, make_schedule(config.optim, 1))
    state = create_train_state(model, tx, jax.random.key(config.seed), ds.image_shape,
                               memory_size=memory_options(config)[0])
    manager = checkpoint.open_manager(workdir)
    if manager.latest_step() is None:
        raise ValueError(f"no complete checkpoint in {workdir}/{checkpoint.CHECKPOINT_SUBDIR}.")
    _check_checkpoint_model(checkpoint.restore_meta(manager), config, workdir)
    state, _ = checkpoint.restore_or_init(manager, state)
    results = evaluate(state, ds.eval_sets(), config.eval, make_embed_step(devices), n_dev,
                       progress)
    results["step"] = int(state.step)
    _write_eval_json(workdir, results)
    manager.close()
    return results


def write_plots(workdir: str) -> None:
    """Training curves and R@1 over time from ``metrics.jsonl`` as PNGs in ``workdir``."""
    from hnm import plots  # lazy: matplotlib only when plotting

    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    plots.plot_training_curves(rows, os.path.join(workdir, "training_curves.png"),
                               keys=CURVE_KEYS, title=f"training of {workdir}")


def _isatty() -> bool:
    import sys
    return sys.stderr.isatty()
