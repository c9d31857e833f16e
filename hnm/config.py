"""Experiment configs from the command line: load, override, validate, lock.

  cfg = config.resolve(config.load("experiments/digits.py:smoke"),
                       [("objective.name", "ephn"), ("optim.learning_rate", "3e-4")])

An experiment file defines ``get_config(variant="")`` returning an
``ml_collections.ConfigDict``; ``path:variant`` passes the variant. :func:`resolve` then applies
``--config.KEY=VALUE`` overrides in this order:

1. ``objective.name`` first. Switching objectives keeps the recipe's objective options that the
   new objective also takes (and the trainer's ``param_lr_mult``) and drops the others, so
   ``--config.objective.name=ephn`` on an SCT recipe does not carry SCT-only options.
2. The objective group is completed with every option of the chosen objective at its default
   (:func:`hnm.objectives.options`, read from the function's signature): a recipe lists only
   what it sets on purpose, yet ``--config.objective.OPTION=VALUE`` works for any option.
3. The other overrides, each coerced to the type of the value it replaces (``true``/``false``
   for booleans, ``1e-3`` for floats, ``1,2,4`` or ``(1, 2, 4)`` for tuples). Counts-or-
   fractions (``data.train_classes``) keep an integer as an integer.
4. Range checks (:func:`validate`): learning rate > 0, epochs > 0, temperature > 0,
   margins >= 0, ... — before anything compiles.

Every problem is a :class:`ConfigError` (a ``ValueError``) with a one-line message: an unknown
key says "did you mean ...", an option the objective does not take lists the valid ones.
``ml_collections.config_flags`` rejects keys a config does not already hold, which is why this
layer exists.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import os
from typing import Any, Iterable, Sequence

import ml_collections

# Keys of config.objective read by the trainer (the learning-rate multiplier of an objective's
# own parameters), never objective options; with their defaults.
TRAINER_OBJECTIVE_DEFAULTS = {"param_lr_mult": 1.0}
TRAINER_OBJECTIVE_KEYS = tuple(TRAINER_OBJECTIVE_DEFAULTS)
# Float-typed keys whose integer values mean something else (a count, not a fraction).
COUNT_OR_FRACTION = ("data.train_classes",)

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class ConfigError(ValueError):
    """A config that cannot be loaded, overridden or used; the message is one line."""


# ----------------------------------------------------------------------------- loading


def load(spec: str) -> ml_collections.ConfigDict:
    """The config of ``path[:variant]`` (``get_config(variant)`` of the file at ``path``)."""
    path, _, variant = spec.partition(":")
    if not path:
        raise ConfigError("--config needs a file, e.g. --config=experiments/digits.py")
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "not found"
        raise ConfigError(f"config file {path!r} {what}")
    name = "hnm_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"config file {path!r} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a broken config file: name the file, not our stack
        raise ConfigError(f"config file {path!r} fails to load: {type(e).__name__}: {e}") from e
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        raise ConfigError(f"config file {path!r} defines no get_config()")
    try:
        cfg = get_config(variant) if variant else get_config()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{spec}: {e}") from e
    if not isinstance(cfg, ml_collections.ConfigDict):
        cfg = ml_collections.ConfigDict(cfg)
    return cfg


def from_json_dict(d: dict) -> ml_collections.ConfigDict:
    """A ConfigDict from a run's ``config.json`` (lists stay lists; types as written)."""
    return ml_collections.ConfigDict(d)


# ----------------------------------------------------------------------------- overrides


def split_overrides(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Splits ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``) from the other arguments.

    Returns ``([(KEY, VALUE), ...], other arguments)``.
    """
    overrides, rest = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--config."):
            key, eq, value = a[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise ConfigError(f"--config.{key} needs a value: --config.{key}=VALUE")
                value = args[i + 1]
                i += 1
            if not key:
                raise ConfigError(f"{a!r}: expected --config.KEY=VALUE")
            overrides.append((key, value))
        else:
            rest.append(a)
        i += 1
    return overrides, rest


def flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key of ``cfg`` as ``group.key`` paths, in order."""
    out = []
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.extend(flat_keys(v, f"{prefix}{k}."))
        else:
            out.append(prefix + k)
    return out


def flat_items(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    return {k: _get(cfg, k) for k in flat_keys(cfg)}


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _did_you_mean(key: str, candidates: Iterable[str]) -> str:
    candidates = list(candidates)
    group, _, leaf = key.rpartition(".")
    same = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == group}
    close = [same[m] for m in difflib.get_close_matches(leaf, list(same), n=1, cutoff=0.6)]
    if not close:  # `--config.margin`: the leaf exists in another group
        close = [c for c in candidates if c.rpartition(".")[2] == leaf][:1]
    if not close:
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.8)
    return f"; did you mean `{close[0]}`?" if close else ""


def _objective_options(name: str) -> dict[str, Any]:
    from hnm import objectives  # jax, but nothing compiled

    return objectives.options(name)


def set_objective(cfg: ml_collections.ConfigDict, name: str,
                  notes: list[str] | None = None) -> None:
    """Switches ``cfg.objective`` to ``name``, keeping only the options ``name`` takes."""
    from hnm import objectives

    if name not in objectives.names():
        raise ConfigError(f"unknown objective {name!r} (--config.objective.name)"
                          f"{_did_you_mean(name, objectives.names())} "
                          f"(objectives: {', '.join(objectives.names())})")
    old = dict(cfg.objective) if "objective" in cfg else {}
    if old.get("name") == name:
        return
    valid = _objective_options(name)
    keep = {k: v for k, v in old.items() if k in TRAINER_OBJECTIVE_KEYS or k in valid}
    dropped = sorted(k for k in old if k != "name" and k not in keep)
    if dropped and notes is not None:
        notes.append(f"objective {name!r} takes no {', '.join(dropped)} (options of "
                     f"{old.get('name')!r}); dropped")
    cfg.objective = ml_collections.ConfigDict(dict(name=name, **keep))


def complete_objective(cfg: ml_collections.ConfigDict) -> None:
    """Adds every option of ``cfg.objective.name`` missing from the group, at its default."""
    if "objective" not in cfg or "name" not in cfg.objective:
        return
    from hnm import objectives

    name = cfg.objective.name
    if name not in objectives.names():
        raise ConfigError(f"unknown objective {name!r} (objective.name)"
                          f"{_did_you_mean(name, objectives.names())} "
                          f"(objectives: {', '.join(objectives.names())})")
    defaults = {**_objective_options(name), **TRAINER_OBJECTIVE_DEFAULTS}
    for k, v in defaults.items():
        if k not in cfg.objective:
            with cfg.objective.ignore_type():
                setattr(cfg.objective, k, v)


def coerce(key: str, raw: str, old: Any) -> Any:
    """``raw`` (a command-line string) as a value of the type of ``old``."""
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    flag = f"--config.{key}"
    if isinstance(old, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{flag} must be true or false; got {raw!r}")
    if isinstance(old, int):
        try:
            return int(text)
        except ValueError:
            pass
        try:
            f = float(text)
        except ValueError:
            f = math.nan
        if math.isfinite(f) and f.is_integer():
            return int(f)
        raise ConfigError(f"{flag} must be an integer; got {raw!r}")
    if isinstance(old, float):
        if key in COUNT_OR_FRACTION:
            try:
                return int(text)
            except ValueError:
                pass
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{flag} must be a number; got {raw!r}") from None
    if isinstance(old, str):
        return text
    if isinstance(old, (tuple, list)):
        if text in ("", "()", "[]"):
            return type(old)()
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = [p.strip() for p in text.split(",") if p.strip()]
        if not isinstance(value, (tuple, list)):
            value = [value]
        if old:  # elements take the type of the recipe's elements
            value = [coerce(key, v, old[0]) if isinstance(v, str)
                     else float(v) if isinstance(old[0], float) and isinstance(v, int)
                     and not isinstance(v, bool) else v for v in value]
        return type(old)(value)
    # None or another type: a Python literal if it parses, else the string.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Sets ``cfg.<key>`` from the string ``raw``; one-line ConfigError on a bad key or value."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(child, ml_collections.ConfigDict):
            raise ConfigError(f"unknown config key `{key}`{_did_you_mean(key, flat_keys(cfg))}"
                              " (`hnm config CONFIG` lists every key)")
        node = child
    leaf = parts[-1]
    if leaf not in node:
        if parts[:-1] == ["objective"] and "name" in node:
            from hnm import objectives

            valid = list(_objective_options(node.name)) + list(TRAINER_OBJECTIVE_KEYS)
            takers = [n for n in objectives.names() if leaf in objectives.options(n)]
            close = _did_you_mean(leaf, valid)[len("; "):]
            hint = (f"; `{leaf}` is an option of {', '.join(takers)} (switch with "
                    "--config.objective.name=...)" if takers else
                    f" ({close})" if close else "")
            raise ConfigError(f"objective {node.name!r} takes no option `{leaf}`{hint}; its "
                              f"options: {', '.join(valid)}")
        raise ConfigError(f"unknown config key `{key}`{_did_you_mean(key, flat_keys(cfg))}"
                          " (`hnm config CONFIG` lists every key)")
    old = node[leaf]
    if isinstance(old, ml_collections.ConfigDict):
        raise ConfigError(f"`{key}` is a group; set one of its keys: "
                          f"{', '.join(key + '.' + k for k in old)}")
    value = coerce(key, raw, old)
    if type(value) is not type(old):  # ConfigDict would cast an int into a float field
        del node[leaf]
    with node.ignore_type():
        setattr(node, leaf, value)


def resolve(cfg: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]] = (), *,
            notes: list[str] | None = None, lock: bool = True) -> ml_collections.ConfigDict:
    """A validated, locked copy of ``cfg`` with ``overrides`` applied (see the module doc)."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # a copy, unlocked
    names = [v for k, v in overrides if k == "objective.name"]
    if names:
        if "objective" not in cfg:
            raise ConfigError("this config has no objective group")
        set_objective(cfg, coerce("objective.name", names[-1], ""), notes)
    complete_objective(cfg)
    for key, raw in overrides:
        if key != "objective.name":
            apply(cfg, key, raw)
    validate(cfg)
    if lock:
        cfg.lock()
    return cfg


# ----------------------------------------------------------------------------- validation


def _number(cfg, key: str):
    try:
        v = _get(cfg, key)
    except (KeyError, AttributeError):
        return None
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"`{key}` must be a number; got {v!r}")
    if not math.isfinite(v):
        raise ConfigError(f"`{key}` must be finite; got {v!r}")
    return v


# (key, test, wording); a key missing from a config is skipped.
_RANGES = (
    ("optim.learning_rate", lambda v: v > 0, "> 0"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.decay_factor", lambda v: v > 0, "> 0"),
    ("optim.warmup_steps", lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
    ("train.num_epochs", lambda v: v > 0, "> 0"),
    ("train.log_every", lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    ("train.ckpt_every", lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    ("train.eval_every_epochs", lambda v: v > 0, "> 0"),
    ("train.keep", lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    ("train.num_devices", lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
    ("data.classes_per_batch", lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    ("data.samples_per_class", lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    ("eval.batch_size", lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    ("model.embedding_dim", lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    ("objective.temperature", lambda v: v > 0, "> 0"),
    ("objective.margin", lambda v: v >= 0, ">= 0"),
    ("objective.pos_margin", lambda v: v >= 0, ">= 0"),
    ("objective.neg_margin", lambda v: v >= 0, ">= 0"),
    ("objective.hard_weight", lambda v: v >= 0, ">= 0"),
    ("objective.param_lr_mult", lambda v: v > 0, "> 0"),
    ("memory.size", lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
    ("memory.start_step", lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
)


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Range checks of the numbers a run needs, then the objective's own checks."""
    for key, ok, wording in _RANGES:
        v = _number(cfg, key)
        if v is not None and not ok(v):
            raise ConfigError(f"`{key}` must be {wording}; got {v!r} (--config.{key})")
    if "optim" in cfg:
        for f in cfg.optim.get("decay_at", ()) or ():
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
                raise ConfigError("`optim.decay_at` holds fractions of training in (0, 1); "
                                  f"got {tuple(cfg.optim.decay_at)!r}")
    if "eval" in cfg:
        for k in cfg.eval.get("recall_ks", ()) or ():
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ConfigError(f"`eval.recall_ks` must be integers >= 1; got "
                                  f"{tuple(cfg.eval.recall_ks)!r}")
    if "objective" in cfg and "name" in cfg.objective:
        from hnm import objectives

        opts = {k: v for k, v in cfg.objective.items()
                if k != "name" and k not in TRAINER_OBJECTIVE_KEYS}
        try:
            objectives.get(cfg.objective.name, **opts)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from e


def format_flat(cfg: ml_collections.ConfigDict) -> str:
    """``key = value`` lines, one per settable key (what ``hnm config`` prints)."""
    items = flat_items(cfg)
    width = max((len(k) for k in items), default=0)
    return "\n".join(f"{k:<{width}} = {v!r}" for k, v in items.items())
