r"""Device layout: the one place that knows how the train state, batches and keys meet devices.

The step body (:func:`train_step`) is one pure function that knows only an axis name. Anchors
are the device's local rows; the objective mines over the ``all_gather`` of every device's
embeddings and normalises over the global batch, so its loss is this device's share of the
global loss and the ``psum`` of the gradients is exactly the gradient of one device that sees
the whole batch. A :class:`Layout` wraps that body for one of two backends
(``config.train.backend``):

``"pmap"`` (default)
    ``jax.pmap(..., in_axes=(None, 0, None), out_axes=(None, None))``: the state is one host
    copy (flax's imagenet example without replicate/unreplicate), batches are host arrays
    reshaped to ``[devices, B / devices, ...]``.
``"mesh"``
    ``jax.jit(jax.shard_map(...))`` over a 1-D ``jax.sharding.Mesh`` of every device of the
    job (axis :data:`AXIS`, ``AxisType.Auto``): the state is replicated with
    ``NamedSharding(mesh, P())``, a batch is one global array sharded on its first axis, built
    from each process's rows with ``jax.make_array_from_process_local_data``.

Both donate the state (``donate_argnums=0``): an accelerator never holds two copies of it, and
a caller must use the returned state only. Both compile once per run: :meth:`Layout.place_state`
puts a fresh or restored state exactly where the step leaves its output, so the second call
hits the first call's compilation.

Varying axes (``shard_map`` with ``check_vma=True``, the default): the replicated parameters
are *invariant* over the axis while the loss of a device's rows *varies*. Differentiating an
invariant input of a varying function makes JAX insert the ``psum`` itself (the transpose of
the implicit ``pvary``); a further explicit ``psum`` would then multiply the gradients by the
number of devices. :func:`train_step` therefore casts the parameters to *varying* first
(:func:`hnm.distances.vary_like`), takes this device's gradient, and sums it explicitly: one code path that is
correct under ``pmap`` (which tracks no varying axes) and under ``shard_map`` alike. Collective
results returned as replicated outputs (the memory's ``all_gather``) are gathered
``to="invarying"``, so they may leave ``shard_map`` with ``out_specs=P()``.

Keys: the key given to objectives is the same on every device (objectives that sample, such as
``distance_weighted``, fold the *global* row index into it so that a device draws what one
device holding the whole batch would draw). Per-device randomness, where some future code
needs it, is derived where it is used with :func:`device_key`.

Parametric objectives (``obj.init`` / ``obj.apply``, issue 12): their parameters live in
``state.objective_params``, replicated like the model's, differentiated and summed the same
way, and updated by the same optimiser call as the model (``optax.multi_transform`` over
``{"model": ..., "objective": ...}``, see :func:`hnm.train.make_optimizer`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from hnm import distances, memory as memory_lib

AXIS = "batch"
BACKENDS = ("pmap", "mesh")


# ----------------------------------------------------------------------------- varying axes


def _all_gather_replicated(x: jax.Array, axis_name: str) -> jax.Array:
    """The tiled ``all_gather`` of ``x``, typed invariant under ``shard_map`` (its value is
    the same on every device, so it may leave as a replicated output)."""
    if distances.varying_axes(x):
        return jax.lax.all_gather(x, axis_name, tiled=True, to="invarying")
    return jax.lax.all_gather(x, axis_name, tiled=True)


def device_key(key: jax.Array, axis_name: str = AXIS) -> jax.Array:
    """A key that differs per device: ``fold_in(key, axis_index)``. For randomness that must
    differ across devices (none of hnm's objectives needs it: they take the shared key)."""
    return jax.random.fold_in(key, jax.lax.axis_index(axis_name))


# ----------------------------------------------------------------------------- the pure step


def is_parametric(objective: Any) -> bool:
    """True for an objective object with parameters (``init`` and ``apply``)."""
    return hasattr(objective, "init") and hasattr(objective, "apply")


def model_variables(state, params=None) -> dict:
    """The model's Flax variables of ``state`` (``params`` replacing its parameters)."""
    params = state.params if params is None else params
    return {"params": params, "batch_stats": state.batch_stats} if state.batch_stats else {
        "params": params}


def trainable(state) -> Any:
    """What the optimiser updates: the model's parameters, plus the objective's when it has
    any (``{"model": ..., "objective": ...}``, the tree ``multi_transform`` labels)."""
    if getattr(state, "objective_params", None) is None:
        return state.params
    return {"model": state.params, "objective": state.objective_params}


def train_step(state, batch: Mapping[str, jax.Array], key: jax.Array, *,
               objective_fn: Callable | Any, axis_name: str = AXIS,
               memory_start_step: int = 0) -> tuple[Any, dict]:
    """One optimisation step on this device's slice of the global batch.

    ``objective_fn`` is either a plain objective built with ``objectives.get(name,
    axis_name=axis_name, ...)`` (called ``(emb, labels, key, memory=...)``), or a parametric
    objective (``apply(params, emb, labels, key, axis_name=..., memory=...)``, its parameters
    in ``state.objective_params``). Either returns this device's share of the global loss
    (local sum / global count), so the ``psum`` of this device's gradients is exactly the
    gradient of one device seeing the whole batch. BatchNorm statistics are averaged across
    devices so the state stays identical everywhere.

    ``key`` is passed unchanged to the objective: it must be (and is, from :class:`Layout`)
    the same on every device.

    With a cross-batch memory in the state, the objective also mines against it (masked empty
    before ``memory_start_step``, a traced test: one compilation for both phases), and the
    global batch's stopped embeddings are then enqueued, identically on every device.

    Returns the new state and a dict of scalar metrics, identical on every device
    (``memory_fill``: the fraction of memory slots the objective used, when on).
    """
    use_memory = state.memory is not None  # static: the state's structure
    parametric = getattr(state, "objective_params", None) is not None
    kwargs = {}
    if use_memory:
        kwargs["memory"] = memory_lib.masked(state.memory, state.step >= memory_start_step)

    def loss_fn(train_params):
        model_params = train_params["model"] if parametric else train_params
        emb, updates = state.apply_fn(model_variables(state, model_params), batch["images"],
                                      train=True, mutable=["batch_stats"])
        emb = emb.astype(jnp.float32)
        if parametric:
            loss, aux = objective_fn.apply(train_params["objective"], emb, batch["labels"],
                                           key, axis_name=axis_name, **kwargs)
        else:
            loss, aux = objective_fn(emb, batch["labels"], key, **kwargs)
        return loss, (aux, updates, emb)

    # This device's gradient (see the module docstring), summed over devices below.
    params = distances.vary_like(trainable(state), batch["labels"])
    (_, (aux, updates, emb)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = jax.lax.psum(grads, axis_name)
    batch_stats = updates.get("batch_stats", state.batch_stats)
    if batch_stats:
        batch_stats = jax.lax.pmean(batch_stats, axis_name)
    new_state = _apply_gradients(state, grads, batch_stats)
    step_metrics = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
    if use_memory:
        emb = _all_gather_replicated(jax.lax.stop_gradient(emb), axis_name)
        labels = _all_gather_replicated(batch["labels"], axis_name)
        new_state = new_state.replace(memory=memory_lib.enqueue(state.memory, emb, labels))
        step_metrics["memory_fill"] = memory_lib.fill_fraction(kwargs["memory"])
    step_metrics["l2_grads"] = optax.global_norm(grads["model"] if parametric else grads)
    step_metrics["l2_params"] = optax.global_norm(new_state.params)
    if parametric:
        step_metrics["l2_objective_grads"] = optax.global_norm(grads["objective"])
    return new_state, step_metrics


def _apply_gradients(state, grads, batch_stats):
    """``TrainState.apply_gradients`` over :func:`trainable` (model and objective)."""
    current = trainable(state)
    updates, opt_state = state.tx.update(grads, state.opt_state, current)
    new = optax.apply_updates(current, updates)
    if getattr(state, "objective_params", None) is None:
        fields = dict(params=new)
    else:
        fields = dict(params=new["model"], objective_params=new["objective"])
    return state.replace(step=state.step + 1, opt_state=opt_state, batch_stats=batch_stats,
                         **fields)


def embed_step(state, images: jax.Array) -> jax.Array:
    """Embeddings of a batch in inference mode (running BatchNorm statistics), float32."""
    return state.apply_fn(model_variables(state), images, train=False).astype(jnp.float32)


# ----------------------------------------------------------------------------- layouts


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown `train.backend`={backend!r}; expected one of {BACKENDS}.")
    return backend


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one run uses its devices.

    Attributes:
      backend: ``"pmap"`` or ``"mesh"``.
      local_devices: this process's devices that run the step.
      devices: pmap's ``devices`` argument (None: every device of the job).
      mesh: the 1-D mesh (``"mesh"`` only).
    """
    backend: str
    local_devices: tuple
    devices: tuple | None = None
    mesh: Any = None

    @property
    def num_local_devices(self) -> int:
        return len(self.local_devices)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    # -- state

    def place_state(self, state):
        """Puts a host, fresh or restored state where the step leaves its output (so the
        second step reuses the first step's compilation: one compile per run)."""
        if self.backend == "pmap":
            devices = None if self.devices is None else list(self.devices)
            # pmap needs a mapped argument; the state rides along unmapped.
            return jax.pmap(lambda s, _: s, axis_name=AXIS, in_axes=(None, 0), out_axes=None,
                            devices=devices)(state, np.zeros(self.num_local_devices))
        rep = self.replicated
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(rep, np.asarray(x)), state)

    # -- batches

    def shard_batch(self, batch: Mapping[str, np.ndarray]) -> dict:
        """This process's host rows ``[B_local, ...]`` as the step's batch argument.

        pmap: ``[devices, B_local / devices, ...]`` host arrays (whole classes per slice).
        mesh: one global array ``[B_global, ...]`` sharded over the mesh, rows in process
        order, then device order (the order pmap's ``all_gather`` sees).
        """
        if self.backend == "pmap":
            return shard(batch, self.num_local_devices)
        sharding = NamedSharding(self.mesh, P(AXIS))
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
                for k, v in batch.items()}

    def place_key(self, key: jax.Array) -> jax.Array:
        """The step's key, the same on every device (replicated)."""
        if self.backend == "pmap":
            return key
        data = jax.make_array_from_process_local_data(
            self.replicated, np.asarray(jax.random.key_data(key)))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))

    # -- steps

    def make_train_step(self, objective_fn, *, memory_start_step: int = 0) -> Callable:
        """``step(state, batch, key) -> (new_state, metrics)``; ``batch`` from
        :meth:`shard_batch`, ``key`` a host key (the same on every process). The state
        argument is donated."""
        body = functools.partial(train_step, objective_fn=objective_fn, axis_name=AXIS,
                                 memory_start_step=memory_start_step)
        if self.backend == "pmap":
            devices = None if self.devices is None else list(self.devices)
            return jax.pmap(body, axis_name=AXIS, in_axes=(None, 0, None),
                            out_axes=(None, None), devices=devices, donate_argnums=(0,))
        mapped = jax.jit(jax.shard_map(body, mesh=self.mesh, in_specs=(P(), P(AXIS), P()),
                                       out_specs=(P(), P())),
                         donate_argnums=(0,))

        def step(state, batch, key):
            return mapped(state, batch, self.place_key(key))
        return step

    def make_embed_step(self) -> Callable:
        """``embed(state, images) -> embeddings`` (float32, on the devices) for
        ``images`` from :meth:`shard_batch`: ``[devices, b, D]`` (pmap) or a global
        ``[B, D]`` sharded like the batch (mesh)."""
        if self.backend == "pmap":
            devices = None if self.devices is None else list(self.devices)
            return jax.pmap(embed_step, axis_name=AXIS, in_axes=(None, 0), devices=devices)
        return jax.jit(jax.shard_map(embed_step, mesh=self.mesh, in_specs=(P(), P(AXIS)),
                                     out_specs=P(AXIS)))


def make_layout(backend: str = "pmap", num_devices: int = 0) -> Layout:
    """The :class:`Layout` for ``backend`` on ``num_devices`` local devices (0: all).

    A multi-process job uses every device of every process (the step's collectives must span
    the job; naming local devices would silently keep them local).

    Raises:
      ValueError: unknown backend, or ``num_devices`` out of range (or not 0 in a
        multi-process job).
    """
    _check_backend(backend)
    local = jax.local_devices()
    n = int(num_devices or len(local))
    if not 1 <= n <= len(local):
        raise ValueError(f"`train.num_devices`={n} but this host has {len(local)} devices.")
    if n < len(local) and jax.process_count() > 1:
        raise ValueError("`train.num_devices` must be 0 (all) in a multi-process job; got "
                         f"{n} of {len(local)} local devices.")
    subset = None if n == len(local) else tuple(local[:n])
    if backend == "pmap":
        return Layout("pmap", tuple(local[:n]), devices=subset)
    # Every device of the job, process-major (jax.devices() is ordered by process), so the
    # global batch is the processes' rows in order: the layout pmap's all_gather sees.
    devices = list(subset) if subset is not None else sorted(
        jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,),
                             axis_types=(jax.sharding.AxisType.Auto,))
    return Layout("mesh", tuple(local[:n]), mesh=mesh)


def layout_from_config(config) -> Layout:
    """:func:`make_layout` for ``config.train.backend`` (default ``"pmap"``) and
    ``config.train.num_devices`` (default 0: all)."""
    return make_layout(str(config.train.get("backend", "pmap")),
                       int(config.train.get("num_devices", 0) or 0))


def shard(batch: Mapping[str, np.ndarray], num_devices: int) -> dict:
    """Reshapes host arrays [B, ...] to [devices, B / devices, ...] (whole classes per slice)."""
    return {k: np.asarray(v).reshape(num_devices, -1, *np.shape(v)[1:])
            for k, v in batch.items()}


def rows(emb: jax.Array) -> jax.Array:
    """Embeddings from :meth:`Layout.make_embed_step` as ``[rows, D]`` (pmap's
    ``[devices, b, D]`` flattened; a mesh array is already so)."""
    return emb.reshape(-1, emb.shape[-1])
