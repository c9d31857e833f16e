"""Training: a Flax ``TrainState`` stepped across devices, then evaluated.

The step (:func:`hnm.parallel.train_step`) is a pure function that knows only an axis name;
:mod:`hnm.parallel` wraps it for the ``config.train.backend`` (``"pmap"``, the default, or
``"mesh"``: ``jax.jit`` + ``jax.shard_map``) and owns the device layout (state placement,
batch sharding, keys). Evaluation is :mod:`hnm.evaluate`.

:func:`train_and_evaluate` reads top to bottom: validate the config, build data, model,
optimiser and objective, restore the newest checkpoint, loop (log, checkpoint, evaluate),
write ``metrics.jsonl``, ``eval.json`` and PNG curves into the work directory.

Cross-batch memory (XBM): ``config.memory.size > 0`` keeps a ring buffer of the last
``size`` (global-batch) embeddings in ``TrainState.memory`` (checkpointed with the rest of the
state); from step ``config.memory.start_step`` on, the objective mines against it too
(:mod:`hnm.memory`).

Objectives with parameters (``obj.init`` / ``obj.apply``): their parameters live in
``TrainState.objective_params`` (checkpointed), trained by the same optimiser with the
learning rate times ``config.objective.param_lr_mult`` (``optax.multi_transform``).
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

from hnm import analysis, checkpoint, models, objectives, parallel, rundir
from hnm import memory as memory_lib
from hnm.evaluate import embed_dataset, evaluate  # noqa: F401  (moved; re-exported)
from hnm.parallel import AXIS, shard, train_step  # noqa: F401  (moved; re-exported)

# Keys of config.memory (the cross-batch memory), read by the trainer.
MEMORY_KEYS = ("size", "start_step")
# Former keys of config.objective, now one-line errors naming the new ones.
MOVED_OBJECTIVE_KEYS = {"memory_size": "memory.size", "memory_start_step": "memory.start_step"}
# Keys of config.objective read by the trainer, never passed to objectives.get.
TRAINER_OBJECTIVE_KEYS = ("param_lr_mult",)
# Panels of workdir/training_curves.png: the loss, the official code's hn_ratio, the collapse
# diagnostics of the logged batch, and test R@1 at each evaluation.
CURVE_KEYS = ("loss", "frac_hard", "diag/mean_distance", "diag/separation_violation_max",
              "diag/diso_lower", "diag/diso_upper", "eval/recall@1", "eval/map@r")


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` plus BatchNorm statistics (may be empty), the
    cross-batch memory (a :class:`hnm.memory.Memory`, or None when off) and the objective's
    parameters (a pytree, or None for a parameter-free objective). With objective parameters
    ``opt_state`` is the optimiser state of ``{"model": params, "objective":
    objective_params}`` (:func:`hnm.parallel.trainable`)."""
    batch_stats: Any = None
    memory: Any = None
    objective_params: Any = None


class NonFiniteLossError(FloatingPointError):
    """The run diverged: a non-finite loss, gradient norm or parameter norm at a log,
    checkpoint or evaluation step. Raised before anything evaluates or checkpoints the bad
    state; the last good checkpoint is kept."""


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


def make_optimizer(optim: Mapping[str, Any], schedule: optax.Schedule, *,
                   param_lr_mult: float | None = None) -> optax.GradientTransformation:
    """SGD (with or without momentum), Adam or AdamW on ``schedule``.

    With ``param_lr_mult`` (an objective with parameters): ``optax.multi_transform`` over
    ``{"model": ..., "objective": ...}``, the objective's parameters on ``param_lr_mult`` times
    the schedule (Proxy-Anchor's recipe uses 100), each part with its own optimiser state.
    """
    if param_lr_mult is not None:
        mult = float(param_lr_mult)
        parts = {"model": make_optimizer(optim, schedule),
                 "objective": make_optimizer(optim, lambda count: mult * schedule(count))}
        return optax.multi_transform(parts, lambda tree: {
            part: jax.tree.map(lambda _, p=part: p, sub) for part, sub in tree.items()})
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
                       image_shape: tuple[int, ...], *, memory_size: int = 0,
                       objective: Any = None, num_classes: int = 0) -> TrainState:
    """Initialises parameters (and BatchNorm statistics) on a dummy batch of ``image_shape``,
    an empty cross-batch memory of ``memory_size`` rows when ``memory_size > 0``, and, for an
    objective with parameters, ``objective.init(fold_in(key, 1), num_classes, dim)`` (``tx``
    then from ``make_optimizer(..., param_lr_mult=...)``)."""
    dummy = jnp.zeros((2, *image_shape), jnp.uint8)
    variables = jax.jit(functools.partial(model.init, train=False))({"params": key}, dummy)
    dim = int(jax.eval_shape(functools.partial(model.apply, train=False), variables,
                             dummy).shape[-1])
    memory = memory_lib.init(int(memory_size), dim) if memory_size else None
    objective_params = None
    if parallel.is_parametric(objective):
        if int(num_classes) < 1:
            raise ValueError(f"`num_classes`={num_classes}: an objective with parameters "
                             "needs the number of training classes.")
        objective_params = objective.init(jax.random.fold_in(key, 1), int(num_classes), dim)
    params = variables["params"]
    state = TrainState(step=0, apply_fn=model.apply, params=params, tx=tx,
                       opt_state=tx.init(params if objective_params is None else
                                         {"model": params, "objective": objective_params}),
                       batch_stats=variables.get("batch_stats", {}), memory=memory,
                       objective_params=objective_params)
    # An int32 array step, not Python's weakly typed 0: the step's second call must hit the
    # first call's compilation (one compile per run).
    return state.replace(step=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- helpers


def _progress(it: Iterable, total: int, desc: str):
    from tqdm.auto import tqdm  # lazy: only for interactive runs
    return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True)


class _Preemption:
    """SIGTERM or SIGINT (Ctrl-C) sets a flag: the loop saves a checkpoint at the next step
    and returns. A second signal aborts at once (``os._exit(128 + signum)``); the newest
    complete checkpoint is still there (orbax renames a step only once it is written)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            os.write(2, b"hnm: second interrupt: aborting now (the newest complete "
                        b"checkpoint is kept)\n")
            os._exit(128 + signum)
        self.requested, self.signum = True, signum
        os.write(2, f"hnm: {signal.Signals(signum).name} received: saving a checkpoint at "
                    "the next step, then exiting (again to abort now)\n".encode())

    def __exit__(self, *exc):
        if self.requested:  # stopping: a further signal still aborts at once, never a traceback
            return
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _append_jsonl(path: str | None, row: Mapping[str, Any]) -> None:
    if path is None:  # not the main process of a multi-process job
        return
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _trim_jsonl(path: str | None, step: int, *, drop_evals_at_step: bool = False) -> int:
    """Drops the rows of ``metrics.jsonl`` logged after ``step`` (the restored checkpoint):
    a resumed run logs them again. With ``drop_evals_at_step`` also the evaluation rows *at*
    ``step`` (a finished run is re-evaluated). Rewritten atomically; returns rows dropped."""
    if path is None or not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a row cut short by a kill: drop it
            continue
        s = row.get("step", 0)
        is_eval = any(k.startswith("eval/") for k in row)
        if s > step or (drop_evals_at_step and is_eval and s == step):
            continue
        keep.append(json.dumps(row) + "\n")
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return len(lines) - len(keep)


def _host_metrics(m: Mapping[str, Any]) -> dict:
    return {k: float(np.asarray(v)) for k, v in m.items()}


def _say(message: str) -> None:
    """One line of run status on stderr, from process 0 only."""
    if jax.process_index() == 0:
        import sys
        print(f"hnm: {message}", file=sys.stderr, flush=True)


def _format_eta(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Reporter:
    """Progress: a tqdm bar that stays (``bar=True``, a terminal), or, without a terminal, one
    plain line on stderr every log step and at each evaluation (step, loss, images/s, ETA)."""

    def __init__(self, start: int, total: int, bar: bool, batch: int):
        self.total, self.batch, self.enabled = total, batch, jax.process_index() == 0
        self._first: tuple[float, int] | None = None
        self._bar = None
        if bar and self.enabled:
            from tqdm.auto import tqdm  # lazy: only for interactive runs
            self._bar = tqdm(total=total, initial=start, desc="train", leave=True,
                             dynamic_ncols=True)

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def log(self, step: int, m: Mapping[str, float]) -> None:
        if self._bar is not None:
            # Pair and proxy objectives mine no triplets: they have no `frac_hard`.
            extra = {"hard": f"{m['frac_hard']:.2f}"} if "frac_hard" in m else {}
            self._bar.set_postfix(loss=f"{m['loss']:.4f}", **extra)
        elif self.enabled:
            # Rates over the whole run since the first log step (checkpoints and evaluations
            # included, compilation excluded), so the ETA does not jump between log steps.
            now = time.perf_counter()
            if self._first is None:
                self._first = (now, step)
                ips, eta = m["images_per_s"], (self.total - step) / max(m["steps_per_s"], 1e-9)
            else:
                dt, ds = now - self._first[0], step - self._first[1]
                ips = ds * self.batch / dt if dt > 0 else 0.0
                eta = (self.total - step) * dt / ds if ds else np.inf
            _say(f"step {step}/{self.total} ({100 * step / self.total:.0f}%)  loss "
                 f"{m['loss']:.4f}  {ips:.0f} images/s  ETA {_format_eta(eta)}")

    def evaluation(self, step: int, results: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        keys = [k for k in ("recall@1", "map@r") if k in results]
        line = f"eval at step {step}: " + "  ".join(f"{k} {results[k]:.4f}" for k in keys)
        if self._bar is not None:
            self._bar.write("hnm: " + line)
        else:
            _say(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def model_signature(config) -> dict:
    """What a checkpoint must agree with: the model config (embedding dim, backbone, ...)."""
    return json.loads(json.dumps(config.model.to_dict() if hasattr(config.model, "to_dict")
                                 else dict(config.model)))


def check_checkpoint_model(meta: Mapping[str, Any] | None, config, workdir: str) -> None:
    """One clear line when the checkpoint was written for another model (e.g. another dim)."""
    if meta is not None and meta.get("model") != model_signature(config):
        raise ValueError(f"the model config {model_signature(config)} does not match the "
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
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    return state.replace(opt_state=state.tx.init(parallel.trainable(state)))


def memory_options(config) -> tuple[int, int]:
    """``(config.memory.size, config.memory.start_step)`` (0, 0 when the group is absent).

    Raises:
      ValueError: either is negative or not an integer, or the config still uses the former
        keys ``objective.memory_size`` / ``objective.memory_start_step``.
    """
    for old, new in MOVED_OBJECTIVE_KEYS.items():
        if old in config.objective:
            raise ValueError(f"`objective.{old}` moved to `{new}`; set --config.{new} instead.")
    opts = dict(config.get("memory", None) or {})
    unknown = sorted(set(opts) - set(MEMORY_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in `memory`; valid keys: "
                         f"{list(MEMORY_KEYS)}.")
    out = []
    for name in MEMORY_KEYS:
        value = opts.get(name, 0) or 0
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"`memory.{name}` must be an integer >= 0; got {value!r}.")
        out.append(int(value))
    return out[0], out[1]


def _objective_options(config) -> tuple[str, dict]:
    """``(name, options)`` for ``objectives.get``: the trainer's own keys removed."""
    opts = dict(config.objective)
    for k in (*TRAINER_OBJECTIVE_KEYS, *MOVED_OBJECTIVE_KEYS):
        opts.pop(k, None)
    return opts.pop("name"), opts


def param_lr_mult(config) -> float:
    """``config.objective.param_lr_mult`` (default 1.0): the objective parameters' learning
    rate as a multiple of the model's.

    Raises:
      ValueError: not a number > 0.
    """
    value = config.objective.get("param_lr_mult", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (
            np.isfinite(value) and value > 0):
        raise ValueError(f"`objective.param_lr_mult` must be a number > 0; got {value!r}.")
    return float(value)


def make_train_step(objective_fn: Callable, devices=None, *,
                    memory_start_step: int = 0) -> Callable:
    """The pmap step on the first ``len(devices)`` local devices (all when None); the former
    API, kept for its callers: new code uses :meth:`hnm.parallel.Layout.make_train_step`."""
    layout = parallel.make_layout("pmap", len(devices) if devices else 0)
    return layout.make_train_step(objective_fn, memory_start_step=memory_start_step)


def check_config(config) -> None:
    """Fails in one line, before anything compiles, on an unknown objective or option or an
    out-of-range number (:func:`hnm.config.validate`)."""
    from hnm import config as config_lib

    memory_options(config)
    param_lr_mult(config)
    parallel.layout_from_config(config)
    config_lib.validate(config)
    try:
        models.create(model_config(config))
    except TypeError as e:  # an unknown model option
        raise ValueError(f"model config: {e}") from e


def build_objective(config, axis_name: str | None = AXIS) -> Callable:
    """The configured objective: a plain function, or an object with ``init``/``apply``
    (:func:`hnm.parallel.is_parametric`; its ``apply`` then gets ``axis_name`` per call)."""
    name, opts = _objective_options(config)
    return objectives.get(name, axis_name=axis_name, **opts)


def build_state(config, model, schedule: optax.Schedule, key: jax.Array, ds,
                objective: Any = None) -> TrainState:
    """The fresh train state of ``config``: the model, the optimiser on ``schedule`` (with
    the objective parameters' multiplier when ``objective`` has parameters), the memory.
    ``ds.num_train_classes`` sizes the objective's parameters."""
    parametric = parallel.is_parametric(objective)
    tx = make_optimizer(config.optim, schedule,
                        param_lr_mult=param_lr_mult(config) if parametric else None)
    return create_train_state(model, tx, key, ds.image_shape,
                              memory_size=memory_options(config)[0], objective=objective,
                              num_classes=ds.num_train_classes if parametric else 0)


def class_indexer(ds) -> Callable[[Mapping[str, np.ndarray]], dict]:
    """``batch -> batch`` with labels replaced by their index among the training classes
    (``[0, num_classes)``: the rows of an objective's class parameters)."""
    classes = np.asarray(ds.sampler.classes)

    def index(batch):
        return dict(batch, labels=np.searchsorted(classes, batch["labels"]).astype(np.int32))
    return index


# ----------------------------------------------------------------------------- the run


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict:
    """``{key: [old, new]}`` for every leaf that differs (missing leaves are None)."""
    a, b = _flatten(old), _flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _record_start(workdir: str, config, step: int) -> None:
    """Keeps the run's history: each start appends to ``runs.jsonl`` (time, host, PID, step,
    the keys that changed and the full config); ``config.json`` holds the latest start's
    config, replaced only with a line saying which keys changed."""
    import socket

    new = json.loads(config.to_json())
    path = os.path.join(workdir, "config.json")
    changes = {}
    if os.path.exists(path):
        with open(path) as f:
            changes = config_changes(json.load(f), new)
    if changes:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        _say(f"{'resuming at step ' + str(step) if step else 'starting'} with settings that "
             f"differ from the run's config.json: {shown} (recorded in runs.jsonl)")
    with open(os.path.join(workdir, "runs.jsonl"), "a") as f:
        f.write(json.dumps({"start": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step,
                            "host": socket.gethostname(), "pid": os.getpid(),
                            "changed": changes, "config": new}) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json(indent=2))
    os.replace(tmp, path)


def _check_finite(m: Mapping[str, Any], first: int, step: int, kept: int | None) -> None:
    """Stops a diverged run: loss, gradient norm and parameter norm must be finite."""
    bad = [k for k in ("loss", "l2_grads", "l2_params")
           if k in m and not np.isfinite(float(np.asarray(m[k])))]
    if bad:
        keep = (f"the last good checkpoint (step {kept}) is kept" if kept is not None
                else "no checkpoint was written")
        raise NonFiniteLossError(
            f"diverged: non-finite {', '.join(bad)} between steps {first} and {step} (try a "
            f"smaller --config.optim.learning_rate); {keep}")


def train_and_evaluate(config, workdir: str, *, progress: bool | None = None) -> dict:
    """Trains ``config`` in ``workdir`` (resuming its newest verified checkpoint), evaluates.

    Returns the final evaluation metrics, also written to ``workdir/eval.json``, or
    ``{"preempted_at_step": N, "signal": NAME}`` when SIGTERM/SIGINT stopped it.

    Raises:
      ValueError: a config, data, work-directory or checkpoint problem (one line), before
        anything compiles where it can be known then.
      NonFiniteLossError: the run diverged; the last good checkpoint is kept.
    """
    from hnm import data  # leaf; may import TensorFlow lazily for tfds sources

    rundir.check_workdir(workdir)
    bar = _isatty() if progress is None else progress
    check_config(config)
    layout = parallel.layout_from_config(config)
    is_main = jax.process_index() == 0  # writes metrics, eval.json and plots
    with rundir.RunLock(workdir, enabled=is_main) as lock:
        if lock.took_over_message():
            _say(lock.took_over_message())
        return _train_locked(config, workdir, data, layout, bar)


def _train_locked(config, workdir, data, layout, bar) -> dict:
    n_dev = layout.num_local_devices
    is_main = jax.process_index() == 0
    ds = data.build(config.data, seed=config.seed, num_devices=n_dev,
                    process_index=jax.process_index(), process_count=jax.process_count())
    total_steps = int(config.train.num_epochs * ds.steps_per_epoch)
    if total_steps < 1:
        raise ValueError(f"`train.num_epochs`={config.train.num_epochs} x "
                         f"{ds.steps_per_epoch} steps per epoch is no step; raise "
                         "--config.train.num_epochs")
    schedule = make_schedule(config.optim, total_steps)
    model = models.create(model_config(config))
    key = jax.random.key(config.seed)
    init_key, step_key = jax.random.split(key)
    memory_start = memory_options(config)[1]
    objective = build_objective(config)
    state = build_state(config, model, schedule, init_key, ds, objective)
    # Class parameters are indexed by class: labels become [0, num_classes).
    labels_of = class_indexer(ds) if parallel.is_parametric(objective) else dict
    manager, state, meta = checkpoint.restore_verified(
        workdir, state, max_to_keep=config.train.get("keep", 3), say=_say,
        check_meta=lambda m: check_checkpoint_model(m, config, workdir))
    if meta is None:  # fresh run: start from pretrained weights if asked
        state = load_pretrained(state, config)
    state = layout.place_state(state)
    sampler = ds.init_sampler_state() if meta is None else type(ds.init_sampler_state())(
        *meta["sampler"])
    step = int(state.step)
    metrics_path = os.path.join(workdir, "metrics.jsonl") if is_main else None
    if is_main:
        _record_start(workdir, config, step)
        _trim_jsonl(metrics_path, step, drop_evals_at_step=step >= total_steps)
    if step >= total_steps:
        _say(f"complete at step {step}; re-evaluating")

    p_train = layout.make_train_step(objective, memory_start_step=memory_start)
    p_embed = layout.make_embed_step()
    p_diag = jax.jit(functools.partial(analysis.training_diagnostics,
                                       margin=float(config.train.get("diag_margin", 0.2))))
    log_every, ckpt_every = int(config.train.log_every), int(config.train.ckpt_every)
    eval_every = max(1, int(config.train.eval_every_epochs * ds.steps_per_epoch))
    saved = manager.latest_step()

    def save(step, m, force=False):
        nonlocal saved
        # A diverged state is never checkpointed: the last good one stays.
        _check_finite(m, last_good, step, saved)
        # num_classes sizes an objective's class parameters when the run is loaded without
        # its training data (hnm.inference).
        checkpoint.save(manager, step, state, {"sampler": [int(x) for x in sampler],
                                               "model": model_signature(config),
                                               "num_classes": int(ds.num_train_classes)},
                        force=force, workdir=workdir)
        saved = step

    last_good, t0, t_steps = step, time.perf_counter(), step
    reporter = _Reporter(step, total_steps, bar, ds.batch_size)
    m_dev = None
    try:
        with _Preemption() as preempt:
            while step < total_steps:
                batch, sampler = ds.train_batch(sampler)
                batch = layout.shard_batch(labels_of(batch))
                # The step donates `state`: only the returned state is used from here on.
                state, m_dev = p_train(state, batch, jax.random.fold_in(step_key, step))
                step += 1
                reporter.step()
                if step % log_every == 0 or step == total_steps:
                    m = _host_metrics(m_dev)
                    _check_finite(m, last_good, step, saved)
                    last_good = step
                    dt = time.perf_counter() - t0
                    # Diagnostics on this batch in inference mode: one extra forward pass per
                    # log step, kept out of the jitted train step (its hot path).
                    emb = p_embed(state, batch["images"])
                    diag = p_diag(parallel.rows(emb), batch["labels"].reshape(-1))
                    m.update({f"diag/{k}": float(v) for k, v in diag.items()})
                    m.update(step=step, epoch=step / ds.steps_per_epoch,
                             learning_rate=float(schedule(step - 1)),
                             steps_per_s=(step - t_steps) / dt,
                             images_per_s=(step - t_steps) * ds.batch_size / dt)
                    _append_jsonl(metrics_path, m)
                    reporter.log(step, m)
                    t0, t_steps = time.perf_counter(), step
                if step % ckpt_every == 0 or preempt.requested:
                    save(step, m_dev)
                if preempt.requested:
                    name = signal.Signals(preempt.signum).name
                    return {"preempted_at_step": step, "signal": name}
                if step % eval_every == 0 and step < total_steps:
                    # Never evaluate a bad state: the check costs one transfer per evaluation.
                    _check_finite(m_dev, last_good, step, saved)
                    periodic = evaluate(state, ds.eval_sets(), config.eval, p_embed, layout)
                    _append_jsonl(metrics_path, {"step": step, **{
                        f"eval/{k}": v for k, v in periodic.items()}})
                    reporter.evaluation(step, periodic)
        reporter.close()
        if manager.latest_step() != step:
            save(step, m_dev, force=True)
        final = evaluate(state, ds.eval_sets(), config.eval, p_embed, layout, bar)
        final["step"] = step
        _append_jsonl(metrics_path, {"step": step, **{f"eval/{k}": v for k, v in final.items()}})
        from hnm import inference  # baselines of the same split when config.eval.baselines
        final.update(inference.final_baselines(config, ds.eval_sets()))
        _write_eval_json(workdir, final)
        if is_main:
            write_plots(workdir)
        return final
    finally:
        reporter.close()
        manager.close()


def evaluate_checkpoint(config, workdir: str, *, progress: bool | None = None) -> dict:
    """Evaluates the newest verified checkpoint of ``workdir``; writes and returns
    ``eval.json``. A step that fails verification is reported and the next older one used."""
    from hnm import data

    progress = _isatty() if progress is None else progress
    if not os.path.isdir(workdir):
        raise checkpoint.CheckpointError(f"work directory {workdir!r} does not exist")
    if not checkpoint.steps_on_disk(workdir):  # before building anything
        raise checkpoint.CheckpointError(
            f"no checkpoint in {os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR)}: train "
            f"first (hnm train --workdir={workdir} ...)")
    layout = parallel.layout_from_config(config)
    ds = data.build(config.data, seed=config.seed, num_devices=layout.num_local_devices,
                    process_index=jax.process_index(), process_count=jax.process_count())
    model = models.create(model_config(config))
    state = build_state(config, model, make_schedule(config.optim, 1),
                        jax.random.key(config.seed), ds, build_objective(config))
    manager, state, _ = checkpoint.restore_verified(
        workdir, state, say=_say, move_failing=False, require=True,
        check_meta=lambda m: check_checkpoint_model(m, config, workdir))
    state = layout.place_state(state)
    try:
        results = evaluate(state, ds.eval_sets(), config.eval, None, layout, progress)
        results["step"] = int(state.step)
        from hnm import inference  # baselines of the same split when config.eval.baselines
        results.update(inference.final_baselines(config, ds.eval_sets()))
        _write_eval_json(workdir, results)
    finally:
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
    from hnm import inference  # the baselines of eval.json as lines, fractions on [0, 1]
    plots.plot_training_curves_with_baselines(
        rows, os.path.join(workdir, "training_curves.png"), keys=CURVE_KEYS,
        baselines=inference.read_baselines(workdir), title=f"training of {workdir}")


def _isatty() -> bool:
    import sys
    return sys.stderr.isatty()
