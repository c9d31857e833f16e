"""The README's two commands exist, and CI runs exactly the README's test command."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_install_run_and_test_commands():
    run, test = _readme_commands()[:2]
    assert "pip install -r requirements.txt -e ." in run
    assert "hnm train --config=experiments/digits.py" in run
    assert "pytest" in test and ".[test]" in test


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
