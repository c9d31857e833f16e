"""Two processes x 2 devices (jax.distributed on localhost, CPU collectives) train exactly like
one process with 4 devices, with either backend (pmap, mesh): same losses at every step, same
final parameters, same evaluation (with either backend each process embeds only its share
of the evaluation set and the search spans all of them)."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl.testing import absltest

from hnm import checkpoint, models, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NPZ_CONFIG = os.path.join(ROOT, "experiments", "npz.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_npz(path: str, num_classes=24, per_class=6, seed=0) -> None:
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(num_classes, 8, 8))
    images = np.clip(protos[:, None] + rng.normal(0, 30, (num_classes, per_class, 8, 8)),
                     0, 255).astype(np.uint8).reshape(-1, 8, 8)
    labels = np.repeat(np.arange(num_classes), per_class)
    np.savez(path, images=images, labels=labels)


def _flags(npz: str, workdir: str) -> list[str]:
    return [f"--config={NPZ_CONFIG}", f"--workdir={workdir}", f"--config.data.path={npz}",
            "--config.data.classes_per_batch=8", "--config.data.samples_per_class=2",
            "--config.model.backbone=mlp", "--config.model.embedding_dim=16",
            "--config.optim.learning_rate=0.01", "--config.train.num_epochs=2",
            "--config.train.log_every=1", "--config.train.ckpt_every=1000",
            "--config.train.eval_every_epochs=1000", "--config.eval.nmi=False", "--no_progress"]


def _launch(flags, devices, extra=()):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "hnm.cli", "train", *flags, *extra],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def _params(workdir):
    model = models.create(dict(backbone="mlp", embedding_dim=16))
    tx = train.make_optimizer(dict(name="adam", learning_rate=0.01),
                              train.make_schedule(dict(learning_rate=0.01), 1))
    state = train.create_train_state(model, tx, jax.random.key(0), (8, 8, 1))
    mgr = checkpoint.open_manager(workdir)
    state, _ = checkpoint.restore_or_init(mgr, state)
    mgr.close()
    return state


def _job(flags, port):
    return [_launch(flags, devices=2, extra=(f"--coordinator_address=127.0.0.1:{port}",
                                             "--num_processes=2", f"--process_id={i}"))
            for i in range(2)]


def _eval(workdir):
    with open(os.path.join(workdir, "eval.json")) as f:
        return json.load(f)


def _assert_half_embedded(outs):
    """Each process says it embedded half of the evaluation rows (its share)."""
    for i, out in enumerate(outs):
        m = re.search(rf"eval: process {i + 1} of 2 embedded (\d+) of (\d+) rows", out)
        assert m, out[-3000:]
        here, total = int(m.group(1)), int(m.group(2))
        assert total > 0 and 2 * here == total, (here, total)


@pytest.mark.slow
class MultiProcessTest(absltest.TestCase):

    def test_two_processes_equal_one_process_with_four_devices(self):
        tmp = self.create_tempdir().full_path
        npz = os.path.join(tmp, "data.npz")
        _write_npz(npz)
        one, two = os.path.join(tmp, "one"), os.path.join(tmp, "two")

        proc = _launch(_flags(npz, one), devices=4)
        out, _ = proc.communicate(timeout=300)
        self.assertEqual(proc.returncode, 0, out[-3000:])

        port = _free_port()
        procs = [_launch(_flags(npz, two), devices=2,
                         extra=(f"--coordinator_address=127.0.0.1:{port}",
                                "--num_processes=2", f"--process_id={i}")) for i in range(2)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        for p, out in zip(procs, outs):
            self.assertEqual(p.returncode, 0, out[-3000:])
        self.assertIn("process 1 of 2", outs[0])
        self.assertIn("| recall@1 |", outs[0])       # only process 0 prints the table
        _assert_half_embedded(outs)

        # The mesh backend (jit + shard_map over the 4 devices of both processes).
        mesh = os.path.join(tmp, "mesh")
        procs = _job(_flags(npz, mesh) + ["--config.train.backend=mesh"], _free_port())
        outs = [p.communicate(timeout=300)[0] for p in procs]
        for p, out in zip(procs, outs):
            self.assertEqual(p.returncode, 0, out[-3000:])
        _assert_half_embedded(outs)

        l1 = _losses(one)
        self.assertGreater(len(l1), 2)
        s1 = _params(one)
        for other in (two, mesh):
            l2 = _losses(other)
            self.assertEqual([s for s, _ in l1], [s for s, _ in l2], other)
            np.testing.assert_allclose([v for _, v in l2], [v for _, v in l1], rtol=1e-5,
                                       atol=1e-6, err_msg=other)
            s2 = _params(other)
            self.assertEqual(int(s1.step), int(s2.step))
            for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
            e1, e2 = _eval(one), _eval(other)
            self.assertEqual(sorted(e1), sorted(e2))
            for k, v in e1.items():
                self.assertAlmostEqual(e2[k], v, delta=1e-5, msg=f"{other}: {k}")

    def test_dead_peer_makes_the_survivor_exit_with_an_error(self):
        tmp = self.create_tempdir().full_path
        npz = os.path.join(tmp, "data.npz")
        _write_npz(npz)
        port = _free_port()
        # Process 1 never starts: process 0 must give up after the timeout, not hang.
        proc = _launch(_flags(npz, os.path.join(tmp, "wd")), devices=2,
                       extra=(f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                              "--process_id=0", "--distributed_timeout=10"))
        out, _ = proc.communicate(timeout=240)
        self.assertNotEqual(proc.returncode, 0)
        self.assertRegex(out.lower(), "deadline|timed out|timeout|unavailable|barrier")

    def test_peer_dying_mid_run_stops_the_job_and_a_rerun_resumes(self):
        tmp = self.create_tempdir().full_path
        npz = os.path.join(tmp, "data.npz")
        _write_npz(npz)
        wd = os.path.join(tmp, "wd")
        long_run = ["--config.train.num_epochs=100000", "--config.train.ckpt_every=10",
                    "--config.train.log_every=10", "--distributed_timeout=10"]

        def job(port, extra):
            return [_launch(_flags(npz, wd) + extra, devices=2,
                            extra=(f"--coordinator_address=127.0.0.1:{port}",
                                   "--num_processes=2", f"--process_id={i}"))
                    for i in range(2)]

        procs = job(_free_port(), long_run)
        ckpt = os.path.join(wd, checkpoint.CHECKPOINT_SUBDIR)
        deadline = time.time() + 180
        while not (os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))):
            self.assertLess(time.time(), deadline, "no checkpoint appeared")
            time.sleep(0.2)
        time.sleep(1.0)
        # One lock for the job, held by process 0: a third `hnm train` on the live job's work
        # directory exits at once naming process 0 (its PID), and takes nothing over.
        with open(os.path.join(wd, "hnm.lock")) as f:
            holder = json.load(f)
        self.assertEqual(holder["pid"], procs[0].pid)
        t0 = time.time()
        intruder = _launch(_flags(npz, wd), devices=1)
        out, _ = intruder.communicate(timeout=120)
        self.assertEqual(intruder.returncode, 1, out[-3000:])
        errors = [line for line in out.splitlines() if line.startswith("hnm: error:")]
        self.assertEqual(len(errors), 1, out)
        self.assertNotIn("Traceback", out)
        self.assertIn(f"is in use by PID {procs[0].pid} on host", errors[0])
        self.assertLess(time.time() - t0, 60)
        self.assertIsNone(procs[0].poll())   # the job goes on
        procs[1].kill()  # SIGKILL one process of the job mid-run
        t0 = time.time()
        out, _ = procs[0].communicate(timeout=120)  # the survivor must not hang
        procs[1].communicate()
        self.assertNotEqual(procs[0].returncode, 0)
        self.assertLess(time.time() - t0, 90)
        self.assertIn("another task died", out)

        mgr = checkpoint.open_manager(wd)
        last = mgr.latest_step()
        mgr.close()
        self.assertIsNotNone(last)
        # Rerunning the job resumes from the newest complete checkpoint (a few steps more).
        epochs = (last + 10) // 4 + 1   # 4 steps per epoch on this data (12 classes, P = 8)
        procs = job(_free_port(), [f"--config.train.num_epochs={epochs}",
                                   "--config.train.ckpt_every=10"])
        for p in procs:
            out, _ = p.communicate(timeout=300)
            self.assertEqual(p.returncode, 0, out[-3000:])
        steps = [s for s, _ in _losses(wd)]
        self.assertIn(last + 1, steps)                  # continued right after the checkpoint
        self.assertNotIn(1, steps)  # did not start over (the first run logged every 10th)
        self.assertGreater(int(_params(wd).step), last)


if __name__ == "__main__":
    absltest.main()
