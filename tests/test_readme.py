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
