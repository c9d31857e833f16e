"""CI runs exactly the README's test command; every `hnm` command the README shows runs (a
tiny epoch count), and its Python example computes what it says."""
import json
import os
import re

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    test = _readme_commands()[1]
    pytest_cmd = test.split("&&")[-1].strip()
    install_cmd = test.split("&&")[-2].strip()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert pytest_cmd in ci, (pytest_cmd, ci)
    assert install_cmd.replace("pip install", "python -m pip install -q") in ci, ci


def test_readme_python_example_runs_and_its_two_paths_agree():
    text = open(os.path.join(ROOT, "README.md")).read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1).replace("print(", "(")
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 (our own README)
    # The named objective and the hand-composed miner -> loss path compute the same joint
    # SCT loss here: random embeddings give no duplicates and no cosine at exactly +-1.
    objective_loss = float(ns["sct"](ns["emb"], ns["labels"])[0])
    hand = ns["losses"].masked_mean(ns["losses"].sct_loss(*ns["miners"].gather_sims(
        ns["sim"], ns["t"])), ns["t"].valid)
    assert abs(objective_loss - float(hand)) < 1e-5, (objective_loss, float(hand))
    assert objective_loss > 0
    assert ns["grads"].shape == ns["emb"].shape


def _hnm_commands():
    """Every `hnm ...` command of the README's bash blocks, in order (the multi-process
    examples, with placeholders for the hosts, are tested by tests/test_multiprocess.py)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.split("#")[0].strip()
                if part.startswith("hnm ") and "--coordinator_address" not in part and \
                        "--distributed" not in part:
                    out.append(part)
    return out


TINY = ["--config.train.num_epochs=1", "--config.train.num_devices=1",
        "--config.train.eval_every_epochs=100", "--no_progress"]


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path, monkeypatch, capsys):
    import shlex

    import tensorflow_datasets as tfds

    from hnm import cli

    commands = _hnm_commands()
    assert commands[0] == "hnm train --config=experiments/digits.py --workdir=runs/digits"
    assert any(c.startswith("hnm eval") for c in commands)
    assert any(c.startswith("hnm config") for c in commands)
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(ROOT, "experiments"), "experiments")
    rng = np.random.default_rng(0)  # mine.npz: 24 classes of noisy 8x8 prototypes
    protos = rng.integers(0, 256, size=(24, 1, 8, 8))
    images = np.clip(protos + rng.normal(0, 30, (24, 6, 8, 8)), 0, 255).astype(np.uint8)
    np.savez("mine.npz", images=images.reshape(-1, 8, 8), labels=np.repeat(np.arange(24), 6))
    ran = []
    for command in commands:
        # Absolute work directories (/tmp/smoke) move under this test's folder.
        argv = [f"--workdir={os.path.basename(a.split('=', 1)[1])}"
                if a.startswith("--workdir=/") else a for a in shlex.split(command)[1:]]
        if argv[0] == "train":
            needs_download = "cub_sct.py" in command and ":smoke" not in command
            if needs_download:  # the full recipe downloads CUB and ImageNet weights: the
                # same arguments must resolve to the recipe's config
                code = cli.run(["config"] + [a.split("=", 1)[1] for a in argv[1:]
                                             if a.startswith("--config=")])
                assert code == 0, command
                ran.append((command, "resolved"))
                continue
            wd = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
            if "cub_sct.py:smoke" in command:
                with tfds.testing.mock_data(num_examples=64):
                    code = cli.run(argv + TINY)
            else:
                code = cli.run(argv + TINY)
            out = capsys.readouterr()
            assert code == 0, (command, out.err[-3000:])
            assert "| recall@1 |" in out.out, command
            with open(os.path.join(wd, "eval.json")) as f:
                results = json.load(f)
            # Above the untrained network (0.28 on the glyphs of the default config, 1 epoch
            # here), above chance elsewhere (glyphs ~70 classes, mine.npz 12, mock 1/64).
            floor = {"digits": 0.45, "glyphs": 0.3, "mine": 0.3}.get(
                os.path.basename(wd.rstrip("/")), 0.0)
            assert results["recall@1"] > floor, (command, results["recall@1"])
            assert results["step"] >= 1
            ran.append((command, results["recall@1"]))
        elif argv[0] == "eval":
            wd = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
            with open(os.path.join(wd, "eval.json")) as f:
                trained = json.load(f)
            code = cli.run(argv + ["--config.train.num_devices=1", "--no_progress"])
            out = capsys.readouterr()
            assert code == 0, (command, out.err[-3000:])
            with open(os.path.join(wd, "eval.json")) as f:
                evaluated = json.load(f)
            assert evaluated["step"] == trained["step"]
            assert abs(evaluated["recall@1"] - trained["recall@1"]) < 1e-6
            ran.append((command, evaluated["recall@1"]))
        elif argv[0] == "config":
            code = cli.run(argv)
            out = capsys.readouterr()
            assert code == 0, (command, out.err)
            assert "objective.margin" in out.out  # the switched objective's options
            ran.append((command, "printed"))
        else:
            raise AssertionError(f"README command not covered by this test: {command}")
    assert len(ran) == len(commands)
