"""The ``hnm`` command.

  hnm train --config=experiments/digits.py --workdir=runs/digits
  hnm train --config=experiments/digits.py --workdir=runs/d --config.objective.name=ephn
  hnm eval --workdir=runs/digits
  hnm config experiments/digits.py:smoke --config.objective.name=batch_hard

Subcommands come from :data:`COMMANDS`, a table of ``name -> (module, function, summary)``; a
subcommand whose module is not installed is left out. The contract for a subcommand: a
function ``main(argv: list[str]) -> int | None`` taking the arguments after the subcommand's
name. It may raise :class:`UsageError` (exit 2), ``ValueError`` or ``OSError`` (exit 1): the
dispatcher prints each as ONE line ``hnm: error: ...`` on stderr. :func:`make_parser` gives an
argparse parser that reports its errors that way and :func:`add_job_flags` the flags of a
(multi-process) job; ``hnm.config.split_overrides`` separates ``--config.KEY=VALUE``.

Exit codes: 0 done (also after SIGTERM saved a checkpoint: a preempted job that is resumed by
rerunning it), 1 a run error (data, work directory, checkpoint, divergence, disk full), 2 a
usage or config error, 130 Ctrl-C (SIGINT; the first one saves a checkpoint, a second aborts).

TensorFlow (input pipelines only) is kept off the GPUs by :mod:`hnm.data`; absl/orbax logging
is held at WARNING unless ``--verbosity`` asks for more.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import json
import os
import sys
from typing import Callable, Sequence

# name -> (module, function(argv) -> exit code, one-line summary). `embed`, `search` and
# `export` live in the inference modules; each raises ValueError on a user error.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("hnm.cli", "train_main", "train a config in a work directory, then evaluate"),
    "eval": ("hnm.cli", "eval_main", "evaluate the newest verified checkpoint of a run"),
    "config": ("hnm.cli", "config_main", "print a resolved config: every key you can set"),
    "embed": ("hnm.inference", "embed_command", "embed images with a trained run"),
    "search": ("hnm.search", "search_command", "search a saved index of embeddings"),
    "export": ("hnm.export", "export_command", "export a trained embedder (jax.export)"),
}

EXAMPLES = """\
examples:
  hnm train --config=experiments/digits.py --workdir=runs/digits
  hnm train --config=experiments/digits.py --workdir=runs/d --config.objective.name=ephn \\
      --config.objective.temperature=0.05 --config.train.num_epochs=20
  hnm eval --workdir=runs/digits
  hnm config experiments/digits.py     # every --config.KEY of a config, with its value
"""


_CONTEXT: dict = {}  # the work directory of the running subcommand, for error lines


class UsageError(ValueError):
    """A bad command line: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def make_parser(prog: str, description: str, epilog: str = EXAMPLES) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description, epilog=epilog, allow_abbrev=False,
                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_bool(parser, name: str, help: str) -> None:
    # absl style: --name, --name=false and --noname all work.
    parser.add_argument(f"--{name}", nargs="?", const=True, default=False, type=_bool,
                        metavar="true|false", help=help)
    parser.add_argument(f"--no{name}", dest=name, action="store_false", help=argparse.SUPPRESS)


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every device-using subcommand takes (multi-process jobs, output)."""
    _add_bool(parser, "no_progress", "no progress bar: plain progress lines on stderr instead "
              "(the default when stderr is not a terminal)")
    parser.add_argument("--coordinator_address", metavar="HOST:PORT",
                        help="process 0 of a multi-process job (jax.distributed); with "
                        "--distributed JAX detects it on TPU pods, SLURM and Open MPI")
    parser.add_argument("--num_processes", type=int, metavar="N", help="processes in the job")
    parser.add_argument("--process_id", type=int, metavar="I",
                        help="this process's index in the job")
    _add_bool(parser, "distributed",
              "call jax.distributed.initialize() with cluster auto-detection")
    parser.add_argument("--distributed_timeout", type=int, default=120, metavar="S",
                        help="seconds before a job gives up on a missing or dead peer "
                        "(start-up and heartbeat) and exits with an error (default 120)")
    parser.add_argument("--verbosity", type=int, default=None, metavar="V",
                        help="absl log level: 0 INFO, -1 WARNING, -2 ERROR (default: "
                        "none; hnm prints its own one-line errors)")


# ----------------------------------------------------------------------------- shared steps


def _quiet_logs(verbosity: int | None) -> None:
    # TensorFlow is imported later, lazily, by the tfds pipelines; keep its C++ start-up
    # chatter off the terminal. Orbax and absl log every checkpoint step at INFO.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import flags, logging

    # absl warns "logging before flag parsing" otherwise; the flags are ours, not absl's.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    # Orbax logs each checkpoint at INFO and a failed write (a full disk) as ERROR lines with
    # tracebacks; hnm reports failures itself in one line, so by default only FATAL passes.
    logging.set_verbosity(logging.FATAL if verbosity is None else verbosity)


def initialize_distributed(args) -> None:
    """Joins a multi-process job when asked to (flags, or auto-detection with --distributed).

    Each process then feeds its own devices with its own slice of the global batch; pmap's
    collectives (the objectives' all_gather mining, the gradient psum) span every device of
    every process.
    """
    explicit = args.coordinator_address or (args.num_processes or 1) > 1
    if not (explicit or args.distributed):
        return
    if explicit and (args.num_processes is None or args.process_id is None
                     or not args.coordinator_address):
        raise UsageError("a multi-process job needs --coordinator_address, --num_processes "
                         "and --process_id (or --distributed to detect them)")
    if args.process_id is not None and args.num_processes is not None and not (
            0 <= args.process_id < args.num_processes):
        raise UsageError(f"--process_id={args.process_id} must be in [0, "
                         f"{args.num_processes})")
    import jax

    _exit_instead_of_abort()
    try:
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address, num_processes=args.num_processes,
            process_id=args.process_id, initialization_timeout=args.distributed_timeout,
            heartbeat_timeout_seconds=args.distributed_timeout)
    except Exception as e:  # noqa: BLE001  (XlaRuntimeError and friends)
        text = " ".join(str(e).split())
        if "DEADLINE_EXCEEDED" in text or "timed out" in text.lower():
            raise RuntimeError(
                f"the job's processes did not all arrive within {args.distributed_timeout} s "
                f"(--distributed_timeout); coordinator {args.coordinator_address}") from None
        raise RuntimeError(f"could not join the job: {text[:300]}") from None


_ABORT_HANDLER = None  # kept alive: libc holds a pointer to it


def _exit_instead_of_abort() -> None:
    """In a multi-process job, XLA's coordination client calls abort() when a peer dies or
    stops sending heartbeats (after its own error lines, e.g. "another task died"). Turn that
    SIGABRT into one hnm line and exit code 1, instead of "Fatal Python error: Aborted" and a
    core dump. The handler only writes and calls os._exit: nothing that needs the main thread.
    """
    global _ABORT_HANDLER
    import ctypes
    import signal as signal_lib

    message = (b"hnm: error: the multi-process job failed: a process died, never arrived or "
               b"sent no heartbeat within --distributed_timeout seconds; rerun the job to "
               b"resume from the newest complete checkpoint\n")

    @ctypes.CFUNCTYPE(None, ctypes.c_int)
    def handler(signum):
        os.write(2, message)
        os._exit(1)

    try:
        libc = ctypes.CDLL(None)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.signal(signal_lib.SIGABRT, ctypes.cast(handler, ctypes.c_void_p))
        _ABORT_HANDLER = handler
    except (OSError, AttributeError):  # no libc signal(): keep the default
        pass


def _print_devices(command: str) -> None:
    import jax

    print(f"hnm {command}: {jax.local_device_count()} local {jax.default_backend()} device(s),"
          f" process {jax.process_index() + 1} of {jax.process_count()}", file=sys.stderr)


def _resolve(spec: str, overrides) -> "object":
    from hnm import config as config_lib

    notes: list[str] = []
    cfg = config_lib.resolve(config_lib.load(spec), overrides, notes=notes)
    for n in notes:
        print(f"hnm: note: {n}", file=sys.stderr)
    return cfg


def _run_config(workdir: str, overrides):
    """The saved config of the run in ``workdir`` with ``overrides`` applied."""
    from hnm import config as config_lib

    path = os.path.join(workdir, "config.json")
    if not os.path.isdir(workdir):
        raise UsageError(f"work directory {workdir!r} does not exist")
    if not os.path.exists(path):
        raise UsageError(f"{path} not found: is {workdir!r} the work directory of a run? "
                         "(or pass --config)")
    with open(path) as f:
        try:
            saved = json.load(f)
        except ValueError as e:
            raise UsageError(f"{path} is not valid JSON ({e})") from None
    return config_lib.resolve(config_lib.from_json_dict(saved), overrides)


def jax_process_index() -> int:
    import jax
    return jax.process_index()


def _report(results: dict, workdir: str) -> int:
    import jax

    if "preempted_at_step" in results:
        sig = results.get("signal", "SIGTERM")
        word = "interrupted" if sig == "SIGINT" else "preempted"
        print(f"{word}: checkpoint saved at step {results['preempted_at_step']}; rerun the "
              "same command to resume")
        # The checkpoint is complete. Skip the interpreter's shutdown: it resets the signal
        # handlers to the default, and a second Ctrl-C landing there would kill the process
        # by SIGINT (exit -2) instead of exiting 130.
        _CONTEXT["hard_exit"] = True
        return 130 if sig == "SIGINT" else 0
    if jax.process_index() == 0:
        from hnm import inference
        print(inference.results_table(results))  # with baseline rows; eval.json's units
        print(f"(written to {os.path.join(workdir, 'eval.json')})")
    return 0


# ----------------------------------------------------------------------------- subcommands


def train_main(argv: Sequence[str]) -> int:
    from hnm import config as config_lib

    parser = make_parser(
        "hnm train", "Train a config in a work directory (resuming its newest verified "
        "checkpoint), then evaluate it.\n\nAny key of the config can be set with "
        "--config.KEY=VALUE (e.g. --config.objective.name=ephn, "
        "--config.optim.learning_rate=3e-4);\n`hnm config CONFIG` prints every key.")
    parser.add_argument("--config", required=True, metavar="FILE[:VARIANT]",
                        help="experiment config, e.g. experiments/digits.py or "
                        "experiments/cub_sct.py:smoke")
    parser.add_argument("--workdir", required=True, metavar="DIR",
                        help="checkpoints, metrics.jsonl, eval.json and plots go here")
    add_job_flags(parser)
    overrides, rest = config_lib.split_overrides(argv)
    args = parser.parse_args(rest)
    cfg = _resolve(args.config, overrides)
    from hnm import rundir

    rundir.check_workdir(args.workdir)
    _CONTEXT["workdir"] = os.path.abspath(args.workdir)
    existed = os.path.exists(args.workdir)
    _quiet_logs(args.verbosity)
    initialize_distributed(args)
    from hnm import train

    _print_devices("train")
    try:
        results = train.train_and_evaluate(cfg, args.workdir,
                                           progress=False if args.no_progress else None)
    except rundir.RunLockedError:
        raise  # the directory is another run's: never clean it up
    except BaseException:
        if not existed:  # a run that failed before writing anything leaves no empty folder
            rundir.remove_if_empty(args.workdir)
        raise
    return _report(results, args.workdir)


def eval_main(argv: Sequence[str]) -> int:
    from hnm import config as config_lib

    parser = make_parser(
        "hnm eval", "Evaluate the newest checkpoint of a run that verifies against its "
        "checksums (writes eval.json).\nThe run's config.json is used unless --config is "
        "given; --config.KEY=VALUE overrides either (e.g. --config.eval.batch_size=64).")
    parser.add_argument("--workdir", required=True, metavar="DIR", help="the run to evaluate")
    parser.add_argument("--config", default=None, metavar="FILE[:VARIANT]",
                        help="use this config instead of the run's config.json")
    add_job_flags(parser)
    overrides, rest = config_lib.split_overrides(argv)
    args = parser.parse_args(rest)
    cfg = _resolve(args.config, overrides) if args.config else _run_config(args.workdir,
                                                                           overrides)
    _quiet_logs(args.verbosity)
    initialize_distributed(args)
    from hnm import train

    _print_devices("eval")
    results = train.evaluate_checkpoint(cfg, args.workdir,
                                        progress=False if args.no_progress else None)
    if jax_process_index() == 0:
        from hnm import inference  # embedding map, worst queries, per-class R@1

        for path in inference.eval_pictures(args.workdir):
            print(f"wrote {path}", file=sys.stderr)
    return _report(results, args.workdir)


def config_main(argv: Sequence[str]) -> int:
    from hnm import config as config_lib

    parser = make_parser(
        "hnm config", "Print the config FILE[:VARIANT] after --config.KEY=VALUE overrides: "
        "one `key = value` line per key that\n`hnm train --config.KEY=VALUE` accepts (the "
        "objective's options included, at their defaults).",
        epilog="examples:\n  hnm config experiments/digits.py\n"
        "  hnm config experiments/cub_sct.py:smoke --config.objective.name=batch_hard\n"
        "  hnm config experiments/digits.py --json\n")
    parser.add_argument("config", metavar="FILE[:VARIANT]")
    parser.add_argument("--json", action="store_true", help="print JSON instead")
    overrides, rest = config_lib.split_overrides(argv)
    args = parser.parse_args(rest)
    cfg = _resolve(args.config, overrides)
    print(cfg.to_json(indent=2) if args.json else config_lib.format_flat(cfg))
    return 0


# ----------------------------------------------------------------------------- dispatch


def available_commands() -> dict[str, tuple[str, str, str]]:
    out = {}
    for name, (module, fn, summary) in COMMANDS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            out[name] = (module, fn, summary)
    return out


def usage() -> str:
    cmds = available_commands()
    width = max(len(n) for n in cmds)
    lines = ["usage: hnm {" + ",".join(cmds) + "} [flags]", "",
             "Hard negative mining for deep metric learning (JAX/Flax).", "", "commands:"]
    lines += [f"  {n:<{width}}  {s}" for n, (_, _, s) in cmds.items()]
    lines += ["", "main flags: --config=FILE[:VARIANT] --workdir=DIR --config.KEY=VALUE "
              "--no_progress", "multi-process: --coordinator_address --num_processes "
              "--process_id --distributed --distributed_timeout", "",
              "`hnm COMMAND --help` for a command's flags; `hnm config FILE` lists a config's "
              "keys.", "", EXAMPLES.rstrip()]
    return "\n".join(lines)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:600] + " ..."


def _disk_full(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or \
        "No space left on device" in str(e)


def _fail(message: str, code: int) -> int:
    # One write of the whole line, newline included (print writes the newline separately):
    # a background thread's output can come before or after it, never glued to it.
    sys.stderr.write(f"hnm: error: {message}\n")
    sys.stderr.flush()
    return code


def run(argv: Sequence[str]) -> int:
    """Runs ``hnm ARGV`` (without the program name) and returns the exit code."""
    argv = list(argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmds = available_commands()
    name = argv[0]
    if name not in cmds:
        import difflib

        close = difflib.get_close_matches(name, list(cmds), n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        return _fail(f"unknown command {name!r}{hint} (commands: {', '.join(cmds)}; see "
                     "`hnm --help`)", 2)
    module, fn, _ = cmds[name]
    try:
        # `python -m hnm.cli` runs this file as __main__: use it, not a second copy.
        mod = sys.modules[__name__] if module == "hnm.cli" else importlib.import_module(module)
        main: Callable = getattr(mod, fn)
        code = main(argv[1:])
        return int(code or 0)
    except SystemExit as e:  # argparse's --help (0), or a subcommand's own exit
        return e.code if isinstance(e.code, int) else _fail(str(e.code), 1)
    except KeyboardInterrupt:
        return _fail("interrupted (Ctrl-C); the newest complete checkpoint is kept", 130)
    except UsageError as e:
        return _fail(_one_line(e), 2)
    except Exception as e:  # noqa: BLE001 (classified below; bugs keep their traceback)
        from hnm import config as config_lib

        if _disk_full(e):
            where = getattr(e, "filename", None) or _CONTEXT.get("workdir") or \
                "the work directory"
            # Orbax's background threads fail noisily at interpreter exit after a failed
            # write ("Event loop is closed" tracebacks): leave without tearing down.
            _CONTEXT["hard_exit"] = True
            return _fail(f"disk full at {where} (No space left on device); free space and "
                         "rerun to resume from the newest complete checkpoint", 1)
        if isinstance(e, config_lib.ConfigError):
            return _fail(_one_line(e), 2)
        if isinstance(e, (ValueError, OSError, RuntimeError, FloatingPointError)):
            if isinstance(e, OSError) and e.filename and e.strerror:
                return _fail(f"{e.strerror}: {e.filename}", 1)
            return _fail(_one_line(e), 1)
        raise


def main(argv: Sequence[str] | None = None) -> None:
    """The console entry point: ``sys.exit(run(sys.argv[1:]))``."""
    code = run(sys.argv[1:] if argv is None else argv)
    if _CONTEXT.get("hard_exit"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
