"""The `hnm` command as a user meets it: help, config overrides, and every user error as ONE
line `hnm: error: ...` with a non-zero exit and no work directory left behind."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from hnm import cli, objectives
from hnm import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "experiments", "digits.py")
EXPERIMENTS = sorted(
    os.path.join(ROOT, "experiments", f) for f in os.listdir(os.path.join(ROOT, "experiments"))
    if f.endswith(".py") and f != "common.py" and "\ndef get_config(" in open(
        os.path.join(ROOT, "experiments", f)).read())


def _run(capsys, *argv):
    code = cli.run(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("hnm: error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    return errors[0]


# ----------------------------------------------------------------------------- help


def test_help_lists_commands_flags_an_example_and_how_to_see_keys(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    for word in ("train", "eval", "config", "--workdir", "--config.KEY=VALUE",
                 "hnm config", "hnm train --config=experiments/digits.py"):
        assert word in out, word


def test_train_help_exits_zero_with_flags_and_example(capsys):
    with pytest.raises(SystemExit) as e:  # argparse prints help and exits itself
        cli.train_main(["--help"])
    assert e.value.code == 0
    code, out, _ = _run(capsys, "train", "--help")
    assert code == 0
    for word in ("--workdir", "--config", "--coordinator_address", "--num_processes",
                 "--process_id", "--distributed", "--distributed_timeout", "--no_progress",
                 "examples:", "hnm config"):
        assert word in out, word


def test_no_arguments_prints_usage_and_fails(capsys):
    code, _, err = _run(capsys)
    assert code == 2
    assert "usage: hnm {train,eval,config" in err


def test_subcommand_table_contract():
    # Every listed command resolves to a callable taking argv (the inference helper adds
    # embed/search/export the same way); commands whose module is absent are hidden.
    for name, (module, fn, summary) in cli.available_commands().items():
        import importlib
        assert getattr(importlib.import_module(module), fn).__code__.co_argcount == 1, name
        assert summary
    assert {"train", "eval", "config"} <= set(cli.available_commands())


# ----------------------------------------------------------------------------- config


def test_config_prints_every_key_of_the_chosen_objective(capsys):
    code, out, _ = _run(capsys, "config", DIGITS, "--config.objective.name=ephn",
                        "--config.objective.temperature=0.05")
    assert code == 0
    keys = {k.strip(): v.strip() for k, v in (line.split(" = ", 1) for line in
                                                  out.splitlines())}
    assert set(keys) >= {"objective." + o for o in objectives.options("ephn")}
    assert keys["objective.name"] == "'ephn'"
    assert keys["objective.temperature"] == "0.05"
    assert "hard_weight" not in out  # an SCT-only option does not follow the switch
    flat = config_lib.flat_items(config_lib.resolve(
        config_lib.load(DIGITS), [("objective.name", "ephn"),
                                  ("objective.temperature", "0.05")]))
    assert flat["objective.temperature"] == 0.05


def test_config_json_round_trips(capsys):
    code, out, _ = _run(capsys, "config", DIGITS + ":smoke", "--json")
    assert code == 0
    assert json.loads(out)["train"]["num_epochs"] == 2


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
@pytest.mark.parametrize("name", objectives.names())
def test_every_objective_and_option_resolves_on_every_config(path, name):
    base = config_lib.load(path)
    cfg = config_lib.resolve(base, [("objective.name", name)])
    assert cfg.objective.name == name
    opts = {k: v for k, v in cfg.objective.items() if k != "name"}
    assert set(opts) == set(objectives.options(name)) | set(config_lib.TRAINER_OBJECTIVE_KEYS)
    for option, default in objectives.options(name).items():
        # Set each option to a valid value different from its default where one is obvious.
        if isinstance(default, bool):
            value, want = str(not default).lower(), not default
        elif isinstance(default, float):
            value, want = repr(default * 2 + 0.25), default * 2 + 0.25
        else:
            continue
        out = config_lib.resolve(base, [("objective.name", name), (f"objective.{option}",
                                                                   value)])
        assert out.objective[option] == want, (option, value)


def test_overrides_coerce_types():
    npz = config_lib.load(os.path.join(ROOT, "experiments", "npz.py"))
    cfg = config_lib.resolve(npz, [("data.train_classes", "3"), ("eval.recall_ks", "1,2"),
                                   ("eval.nmi", "false"), ("train.num_epochs", "3"),
                                   ("optim.learning_rate", "3e-4"),
                                   ("optim.decay_at", "(0.5, 0.75)")])
    assert cfg.data.train_classes == 3 and isinstance(cfg.data.train_classes, int)
    assert tuple(cfg.eval.recall_ks) == (1, 2)
    assert cfg.eval.nmi is False
    assert cfg.train.num_epochs == 3
    assert cfg.optim.learning_rate == 3e-4
    assert tuple(cfg.optim.decay_at) == (0.5, 0.75)
    cfg = config_lib.resolve(config_lib.load(os.path.join(ROOT, "experiments", "npz.py")),
                             [("data.train_classes", "0.25")])
    assert cfg.data.train_classes == 0.25
    with pytest.raises(AttributeError):  # resolved configs are locked
        cfg.new_key = 1


def test_switching_objective_keeps_shared_options_and_drops_the_others():
    notes = []
    base = config_lib.load(os.path.join(ROOT, "experiments", "cub_sct.py"))
    cfg = config_lib.resolve(base, [("objective.name", "batch_hard")], notes=notes)
    assert "temperature" not in cfg.objective
    assert cfg.objective.margin == objectives.options("batch_hard")["margin"]
    assert notes and "temperature" in notes[0]
    cfg = config_lib.resolve(base, [("objective.name", "ephn")])
    assert cfg.objective.temperature == 0.1


# ----------------------------------------------------------------------------- user errors

ERRORS = [
    # (argv after `hnm`, a fragment of the one-line message)
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.optim.learnig_rate=1"],
     "did you mean `optim.learning_rate`"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.objective.margin=0.1"],
     "takes no option `margin`"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.objective.name=ephm"],
     "did you mean `ephn`"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.train.num_epochs=abc"],
     "must be an integer; got 'abc'"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.eval.nmi=maybe"],
     "must be true or false"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.train"],
     "needs a value"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.train=3"],
     "is a group"),
    (["train", "--config=experiments/nope.py", "--workdir={wd}"], "not found"),
    (["train", f"--config={DIGITS}:nope", "--workdir={wd}"], "unknown config variant"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.optim.learning_rate=0"],
     "`optim.learning_rate` must be > 0"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.optim.learning_rate=-1e-3"],
     "`optim.learning_rate` must be > 0"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.optim.learning_rate=nan"],
     "must be finite"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.objective.name=batch_hard",
      "--config.objective.margin=-0.1"], "`objective.margin` must be >= 0"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.objective.temperature=0"],
     "`objective.temperature` must be > 0"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.objective.name=supcon",
      "--config.objective.temperature=-1"], "`objective.temperature` must be > 0"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.train.num_epochs=0"],
     "`train.num_epochs` must be > 0"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.train.log_every=0"],
     "`train.log_every` must be an integer >= 1"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.eval.recall_ks=0,1"],
     "`eval.recall_ks` must be integers >= 1"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--config.optim.decay_at=0.5,2"],
     "`optim.decay_at` holds fractions"),
    (["train", f"--config={DIGITS}"], "the following arguments are required: --workdir"),
    (["train", "--workdir={wd}"], "the following arguments are required: --config"),
    (["train", f"--config={DIGITS}", "--workdir={wd}", "--bogus"], "unrecognized arguments"),
    (["trian"], "did you mean `train`"),
    (["eval", "--workdir={wd}"], "does not exist"),
    (["config", DIGITS, "--config.model.embeding_dim=3"], "did you mean `model.embedding_dim`"),
]


@pytest.mark.parametrize("argv,fragment", ERRORS, ids=[e[1][:40] for e in ERRORS])
def test_user_errors_are_one_line_and_leave_no_work_directory(tmp_path, capsys, argv,
                                                               fragment):
    wd = str(tmp_path / "run")
    t0 = time.time()
    code, _, err = _run(capsys, *[a.replace("{wd}", wd) for a in argv])
    assert code != 0
    line = _one_error_line(err)
    assert fragment in line, line
    assert not os.path.exists(wd)
    assert time.time() - t0 < 30


def test_workdir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = _run(capsys, "train", f"--config={DIGITS}", f"--workdir={f}")
    assert code == 1
    assert "is a file, not a directory" in _one_error_line(err)
    code, _, err = _run(capsys, "train", f"--config={DIGITS}", f"--workdir={f}/sub")
    assert code == 1
    assert "is a file" in _one_error_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_workdir_that_is_not_writable(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, _, err = _run(capsys, "train", f"--config={DIGITS}", f"--workdir={ro / 'run'}")
    assert code == 1
    assert "not writable" in _one_error_line(err)


def test_eval_without_checkpoint_or_config(tmp_path, capsys):
    wd = tmp_path / "run"
    wd.mkdir()
    code, _, err = _run(capsys, "eval", f"--workdir={wd}")
    assert code == 2
    assert "config.json not found" in _one_error_line(err)
    code, _, err = _run(capsys, "eval", f"--workdir={wd}", f"--config={DIGITS}:smoke")
    assert code == 1
    assert "no checkpoint in" in _one_error_line(err)


def test_data_error_is_one_line_and_removes_the_new_work_directory(tmp_path, capsys):
    wd = str(tmp_path / "run")
    code, _, err = _run(capsys, "train", f"--config={os.path.join(ROOT, 'experiments', 'npz.py')}",
                        f"--workdir={wd}", f"--config.data.path={tmp_path / 'missing.npz'}")
    assert code == 1
    assert "missing.npz" in _one_error_line(err)
    assert not os.path.exists(wd)


def test_error_in_a_fresh_process_is_one_line_within_seconds(tmp_path):
    wd = tmp_path / "run"
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "hnm.cli", "train", f"--config={DIGITS}",
                          f"--workdir={wd}", "--config.objective.margn=1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
    assert out.stderr.startswith("hnm: error: objective 'sct' takes no option `margn`")
    assert time.time() - t0 < 60
    assert not wd.exists()


def test_split_overrides_accepts_both_spellings():
    ov, rest = config_lib.split_overrides(["--config.a.b=1", "--workdir=x", "--config.c", "2"])
    assert ov == [("a.b", "1"), ("c", "2")] and rest == ["--workdir=x"]
    with pytest.raises(config_lib.ConfigError, match="needs a value"):
        config_lib.split_overrides(["--config.c", "--workdir=x"])


def test_coerce_rejects_what_it_cannot_read():
    assert config_lib.coerce("k", "1e3", 5) == 1000
    assert config_lib.coerce("k", "7", 0.5) == 7.0 and isinstance(
        config_lib.coerce("k", "7", 0.5), float)
    assert config_lib.coerce("k", "'abc'", "x") == "abc"
    assert config_lib.coerce("k", "[1, 2]", (1,)) == (1, 2)
    with pytest.raises(config_lib.ConfigError, match="integer"):
        config_lib.coerce("k", "1.5", 5)
    with pytest.raises(config_lib.ConfigError, match="number"):
        config_lib.coerce("k", "a", 0.5)
    assert np.isinf(config_lib.coerce("k", "inf", 0.5))  # validate() rejects it later


# ----------------------------------------------------------------------------- every objective


@pytest.mark.slow
@pytest.mark.parametrize("name", objectives.names())
def test_objective_switch_trains_on_the_digits_config(tmp_path, capsys, name):
    """`--config.objective.name=NAME` on the digits config trains every objective: the loss
    falls, R@1 on the unseen digits stays above 0.9 (no collapse), and the run records only
    that objective's options."""
    wd = str(tmp_path / "run")
    code, out, err = _run(capsys, "train", f"--config={DIGITS}:digits", f"--workdir={wd}",
                          f"--config.objective.name={name}", "--config.train.num_epochs=3",
                          "--config.eval.baselines=false",
                          "--config.train.num_devices=1", "--config.train.log_every=3",
                          "--config.train.eval_every_epochs=100", "--config.eval.nmi=false",
                          "--no_progress")
    assert code == 0, err[-3000:]
    assert "| recall@1 |" in out
    with open(os.path.join(wd, "eval.json")) as f:
        results = json.load(f)
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]
    with open(os.path.join(wd, "config.json")) as f:
        saved = json.load(f)["objective"]
    assert saved["name"] == name
    assert set(saved) - {"name"} == set(objectives.options(name)) | set(
        config_lib.TRAINER_OBJECTIVE_KEYS)
    # avg_nonzero averages over the active triplets only, and those get fewer and harder as
    # training goes: the mean over all triplets (loss x frac_active) is what falls.
    if objectives.options(name).get("reduction") == "avg_nonzero":
        progress = [r["loss"] * r["frac_active"] for r in rows]
    else:
        progress = [r["loss"] for r in rows]
    first, last = np.mean(progress[:2]), np.mean(progress[-2:])
    assert last < first, (name, progress)
    assert all(r["num_valid"] > 0 for r in rows)
    # The untrained MLP already retrieves the unseen digits at R@1 0.961 (MAP@R 0.583), so R@1
    # cannot show learning here (the falling loss does); it shows the run did not collapse.
    assert results["recall@1"] > 0.9, (name, results["recall@1"])
    assert "step" in err  # plain progress lines without a terminal


@pytest.mark.slow
def test_huge_learning_rate_says_diverged_before_any_evaluation(tmp_path, capsys):
    wd = str(tmp_path / "run")
    code, out, err = _run(capsys, "train", f"--config={DIGITS}:smoke", f"--workdir={wd}",
                          "--config.optim.name=sgd", "--config.optim.learning_rate=1e30",
                          "--config.train.log_every=1", "--config.train.ckpt_every=1",
                          "--no_progress")
    assert code == 1
    line = _one_error_line(err)
    assert line.startswith("hnm: error: diverged: non-finite "), line
    # SGD at 1e30 overflows the parameters at the first step: nothing good to keep.
    assert "non-finite l2_params between steps 0 and 1" in line, line
    assert line.endswith("no checkpoint was written"), line
    assert "eval at step" not in err
    assert not os.path.exists(os.path.join(wd, "eval.json"))
