"""Fault injection on the digits smoke config through the real command line: SIGKILLs at random
points across checkpoint writes, damaged checkpoints, two runs started together, a full file
system. Wherever recovery is possible the final eval.json must equal the uninterrupted run's.

Counts (one pass): 6 SIGKILLs, 3 corruptions (flip, truncate, delete), 1 concurrent start,
1 full disk (tmpfs, root only), 2 Ctrl-C (one, then two in a row) = 13 faults, each recovered
to the reference eval.json (the full disk after moving the run to a disk with room).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hnm import checkpoint

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "digits.py") + ":smoke"
EPOCHS = 6  # 12 steps per epoch on 1 device: 72 steps, a checkpoint every 3


def _cmd(workdir, epochs=EPOCHS):
    return [sys.executable, "-m", "hnm.cli", "train", f"--config={CONFIG}",
            f"--workdir={workdir}", f"--config.train.num_epochs={epochs}",
            "--config.train.ckpt_every=3", "--config.train.log_every=3",
            "--config.train.eval_every_epochs=100", "--no_progress"]


def _env():
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                PYTHONUNBUFFERED="1")


def _run(workdir, epochs=EPOCHS):
    p = subprocess.run(_cmd(workdir, epochs), env=_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def _start(workdir, epochs=EPOCHS):
    return subprocess.Popen(_cmd(workdir, epochs), env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _eval(workdir):
    with open(os.path.join(workdir, "eval.json")) as f:
        return json.load(f)


def _assert_same_eval(a, b):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def _assert_no_duplicate_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == sorted(set(train_steps)), train_steps
    assert train_steps == list(range(3, EPOCHS * 12 + 1, 3)), train_steps
    eval_steps = [r["step"] for r in rows if "eval/recall@1" in r]
    assert eval_steps == [EPOCHS * 12], eval_steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("ref") / "run")
    code, out, err = _run(wd)
    assert code == 0, err[-3000:]
    _assert_no_duplicate_rows(wd)
    return _eval(wd)


def _wait_for_step(workdir, proc, above, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = checkpoint.steps_on_disk(workdir)
        if steps and max(steps) > above:
            return max(steps)
        if proc.poll() is not None:
            return None
        time.sleep(0.02)
    raise AssertionError("no new checkpoint appeared")


def test_kills_at_random_points_across_checkpoint_writes(reference, tmp_path):
    wd = str(tmp_path / "run")
    rng = np.random.default_rng(0)
    kills, last = 0, 0
    while kills < 6:
        proc = _start(wd)
        step = _wait_for_step(wd, proc, last)
        t0 = time.time()
        if step is not None:
            step = _wait_for_step(wd, proc, step)
        if step is None:  # finished before the kill: the schedule was too late
            break
        # A random moment within one checkpoint interval (as measured just now, so that a
        # fast machine does not finish the run before the sixth kill): during the next
        # step's write, its manifest, a log row, or the steps between.
        time.sleep(float(rng.uniform(0.0, time.time() - t0)))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        kills += 1
        last = max(checkpoint.steps_on_disk(wd) or [0])
    assert kills == 6
    code, out, err = _run(wd)
    assert code == 0, err[-3000:]
    _assert_same_eval(_eval(wd), reference)
    _assert_no_duplicate_rows(wd)
    with open(os.path.join(wd, "runs.jsonl")) as f:
        assert len(f.readlines()) >= 7  # every start recorded


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_newest_checkpoint_falls_back_and_recovers(reference, tmp_path, damage):
    wd = str(tmp_path / "run")
    code, _, err = _run(wd, epochs=3)  # a partial run: checkpoints up to step 36
    assert code == 0, err[-3000:]
    newest = max(checkpoint.steps_on_disk(wd))
    d = os.path.join(wd, checkpoint.CHECKPOINT_SUBDIR, str(newest), "state")
    data = max((os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs),
               key=os.path.getsize)
    if damage == "flip":
        b = bytearray(open(data, "rb").read())
        b[len(b) // 3] ^= 0x01
        open(data, "wb").write(b)
    elif damage == "truncate":
        os.truncate(data, os.path.getsize(data) - 1)
    else:
        os.remove(data)
    code, _, err = _run(wd)
    assert code == 0, err[-3000:]
    assert f"checkpoint step {newest} fails verification" in err, err
    m = re.search(r"using checkpoint step (\d+), the newest that verifies", err)
    assert m and int(m.group(1)) < newest, err
    _assert_same_eval(_eval(wd), reference)
    assert os.listdir(os.path.join(wd, checkpoint.CORRUPT_SUBDIR))


def test_two_runs_started_together(reference, tmp_path):
    wd = str(tmp_path / "run")
    procs = [_start(wd), _start(wd)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], (codes, [o[1][-2000:] for o in outs])
    loser = next(o for p, o in zip(procs, outs) if p.returncode == 1)
    winner = next(p for p in procs if p.returncode == 0)
    errors = [line for line in loser[1].splitlines() if line.startswith("hnm: error:")]
    assert len(errors) == 1 and "Traceback" not in loser[1], loser[1]
    assert f"is in use by PID {winner.pid} on host" in errors[0]
    _assert_same_eval(_eval(wd), reference)
    _assert_no_duplicate_rows(wd)


_ORBAX_NOISE = ("Traceback (most recent call last):", "    self._check_closed()",
                "    raise RuntimeError('Event loop is closed')",
                "RuntimeError: Event loop is closed")


def _without_orbax_thread_noise(err: str) -> str:
    """``err`` less the lines of the asyncio "Event loop is closed" tracebacks that orbax's
    threads print (two threads can interleave them line by line)."""
    return "\n".join(line for line in err.splitlines() if line not in _ORBAX_NOISE and not (
        line.startswith('  File "') and "asyncio/base_events.py" in line))


def test_full_file_system_is_one_line_and_resumes_elsewhere(reference, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    # About one checkpoint fits: the run fills the disk at a later save or log row.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        wd = str(mnt / "run")
        code, _, err = _run(wd)
        assert code == 1, err[-3000:]
        lines = [line for line in err.splitlines() if not line.startswith("hnm: step")]
        errors = [line for line in lines if line.startswith("hnm: error:")]
        assert errors == [f"hnm: error: disk full at {wd} (No space left on device); free "
                          "space and rerun to resume from the newest complete checkpoint"], err
        # Orbax's background writer threads sometimes print their own "Event loop is closed"
        # tracebacks while the failed save unwinds (seen in 1 of 3 runs); hnm cannot silence
        # those, but no traceback of hnm's own may appear.
        assert "Traceback" not in _without_orbax_thread_noise(err), err
        # Move the run to a disk with room: it resumes from what was complete.
        moved = str(tmp_path / "moved")
        shutil.copytree(wd, moved)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    code, _, err = _run(moved)
    assert code == 0, err[-3000:]
    _assert_same_eval(_eval(moved), reference)


def test_ctrl_c_saves_and_resumes_and_a_second_ctrl_c_aborts(reference, tmp_path):
    wd = str(tmp_path / "run")
    proc = _start(wd)
    assert _wait_for_step(wd, proc, 0) is not None
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    step = int(re.search(r"interrupted: checkpoint saved at step (\d+);", out).group(1))
    assert max(checkpoint.steps_on_disk(wd)) == step
    # Twice in a row: the second one aborts at once, the checkpoints stay usable.
    proc = _start(wd)
    assert _wait_for_step(wd, proc, step) is not None
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # two signals at once are one pending signal to Python
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    # The second signal aborts wherever it lands (while saving, or after the first one's
    # checkpoint was written, during shutdown).
    assert "second interrupt: aborting now" in err or "interrupted: checkpoint saved" in out
    code, _, err = _run(wd)
    assert code == 0, err[-3000:]
    _assert_same_eval(_eval(wd), reference)
    _assert_no_duplicate_rows(wd)
