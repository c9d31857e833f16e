"""The ``hnm`` command: ``hnm train`` and ``hnm eval``.

  hnm train --config=experiments/digits.py --workdir=/tmp/digits
  hnm train --config=experiments/cub_sct.py:smoke --workdir=/tmp/smoke --config.seed=1
  hnm eval --workdir=/tmp/digits

Only parses flags, joins a multi-process job when asked, logs the devices and calls
:func:`hnm.train.train_and_evaluate` (TensorFlow, used for input pipelines alone, is kept off
the GPUs by :mod:`hnm.data`). ``hnm eval`` re-reads the run's saved
``config.json`` and evaluates its newest checkpoint.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally `path:variant`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots.")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "Disable the progress bars.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 of a multi-process job (jax.distributed). With --distributed=auto "
    "JAX detects it on TPU pods, SLURM and Open MPI instead.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with cluster auto-detection.")
_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 120,
    "Seconds before a multi-process job gives up on a missing or dead peer (initialisation "
    "and heartbeat), so the survivors exit with an error instead of hanging.")

USAGE = ("usage: hnm {train,eval} --workdir=DIR [--config=experiments/NAME.py[:variant]]\n"
         "       hnm {embed,search,export} ... (see hnm COMMAND --help)")
# Commands that use a trained model (#10): argparse functions raising ValueError on user
# errors, dispatched before absl parses its flags.
TOOLS = {"embed": "hnm.inference:embed_command", "search": "hnm.search:search_command",
         "export": "hnm.export:export_command"}


def run_tool(name: str, args) -> str | None:
    """Runs ``hnm NAME ARGS``; a user error comes back as its one ``hnm: error:`` line."""
    import importlib
    module, fn = TOOLS[name].split(":")
    _quiet_tensorflow()
    try:
        getattr(importlib.import_module(module), fn)(list(args))
    except ValueError as e:
        return f"hnm: error: {e}"
    return None


def _quiet_tensorflow() -> None:
    # TensorFlow is imported later, lazily, by the tfds pipelines (which also hide GPUs from
    # it, see hnm.data); keep its C++ start-up chatter off the terminal.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def format_table(results: dict) -> str:
    """A Markdown table of the headline evaluation numbers."""
    keys = [k for k in results if k.startswith("recall@")] + [
        k for k in ("map@r", "r_precision", "nmi") if k in results]
    head = "| " + " | ".join(keys) + " |"
    rule = "|" + "|".join("---" for _ in keys) + "|"
    row = "| " + " | ".join(f"{100 * results[k]:.2f}" for k in keys) + " |"
    return "\n".join([head, rule, row])


def _load_run_config(workdir: str):
    import ml_collections
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise app.UsageError(f"{path} not found: is {workdir!r} the work directory of a run?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def initialize_distributed() -> None:
    """Joins a multi-process job when asked to (flags, or auto-detection with --distributed).

    Each process then feeds its own devices with its own slice of the global batch; pmap's
    collectives (the objectives' all_gather mining, the gradient psum) span every device of
    every process.
    """
    explicit = _COORDINATOR.value or (_NUM_PROCESSES.value or 1) > 1
    if not (explicit or _DISTRIBUTED.value):
        return
    import jax

    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value, initialization_timeout=_TIMEOUT.value,
        heartbeat_timeout_seconds=_TIMEOUT.value)


def main(argv=None) -> None:
    args = sys.argv if argv is None else argv
    if len(args) > 1 and args[1] in TOOLS:
        sys.exit(run_tool(args[1], args[2:]))
    app.run(_main, argv=argv)


def _main(argv) -> None:
    command = argv[1] if len(argv) > 1 else None
    if command not in ("train", "eval") or len(argv) > 2:
        raise app.UsageError(USAGE)
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required. " + USAGE)
    _quiet_tensorflow()
    # Orbax and absl log every checkpoint step at INFO; keep the terminal for the progress
    # bar and the result table unless the user asks for more with --verbosity.
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    initialize_distributed()
    import jax

    from hnm import train

    print(f"hnm {command}: {jax.local_device_count()} local {jax.default_backend()} device(s),"
          f" process {jax.process_index() + 1} of {jax.process_count()}", file=sys.stderr)
    progress = False if _NO_PROGRESS.value else None
    if command == "train":
        if _CONFIG.value is None:
            raise app.UsageError("--config is required for `hnm train`. " + USAGE)
        try:
            results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                               progress=progress)
        except ValueError as e:  # config errors: one clear line, no traceback
            sys.exit(f"hnm: error: {e}")
    else:
        config = _CONFIG.value or _load_run_config(_WORKDIR.value)
        results = train.evaluate_checkpoint(config, _WORKDIR.value, progress=progress)
        if jax.process_index() == 0 and "preempted_at_step" not in results:
            from hnm import inference  # embedding map, worst queries, per-class R@1 (#10)
            for path in inference.eval_pictures(_WORKDIR.value):
                print(f"wrote {path}", file=sys.stderr)
    if "preempted_at_step" in results:
        print(f"preempted: checkpoint saved at step {results['preempted_at_step']}")
        return
    if jax.process_index() == 0:
        from hnm import inference
        print(inference.results_table(results))  # with baseline rows; eval.json's units
        print(f"(written to {os.path.join(_WORKDIR.value, 'eval.json')})")


if __name__ == "__main__":
    main()
