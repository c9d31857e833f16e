"""The training system: pmapped step = single-device step, end to end, resume, faults."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

from hnm import checkpoint, metrics, models, objectives, rundir, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import digits  # noqa: E402  (experiments/digits.py)


def _mlp_state(dim=8, image_shape=(4, 4, 1), lr=0.1):
    model = models.create(dict(backbone="mlp", embedding_dim=dim))
    tx = train.make_optimizer(dict(name="sgd", learning_rate=lr, momentum=0.9),
                              train.make_schedule(dict(learning_rate=lr), 10))
    return train.create_train_state(model, tx, jax.random.key(0), image_shape)


def _pk_batch(num_classes=16, k=2, image_shape=(4, 4, 1), seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), k).astype(np.int32)  # class-major
    images = rng.integers(0, 256, size=(num_classes * k, *image_shape), dtype=np.uint8)
    return {"images": images, "labels": labels}


@pytest.mark.slow  # tests/test_parallel.py checks the same per objective in the default run
class PmapStepTest(absltest.TestCase):
    """One pmapped step on 8 devices equals one step of 1 device on the concatenated batch."""

    def test_pmap_equals_single_device(self):
        for name in ("sct", "batch_hard", "multi_similarity"):
            with self.subTest(name):
                fn = objectives.get(name, axis_name=train.AXIS)
                batch = _pk_batch()
                key = jax.random.key(1)
                results = {}
                for n_dev in (1, 8):
                    state = _mlp_state()
                    step = train.make_train_step(fn, jax.devices()[:n_dev])
                    new_state, m = step(state, train.shard(batch, n_dev), key)
                    results[n_dev] = (new_state, m)
                (s1, m1), (s8, m8) = results[1], results[8]
                np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(m8["l2_grads"], m1["l2_grads"], rtol=1e-4)
                self.assertGreater(float(m1["l2_grads"]), 0.0)  # the step did learn something
                for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
                self.assertEqual(int(s8.step), 1)

    def test_batch_layout_shards_whole_classes(self):
        batch = train.shard(_pk_batch(num_classes=16, k=2), 8)
        self.assertEqual(batch["labels"].shape, (8, 4))
        for d in range(8):  # each device holds 2 whole classes (a positive for every anchor)
            _, counts = np.unique(batch["labels"][d], return_counts=True)
            np.testing.assert_array_equal(counts, [2, 2])


class _ArraySet:
    """An eval set of feature vectors standing in for images (padded batches + mask)."""

    def __init__(self, x, y):
        self.x, self.y, self.num_examples = x, y, len(y)

    def batches(self, batch_size):
        for i in range(0, len(self.y), batch_size):
            x, y = self.x[i:i + batch_size], self.y[i:i + batch_size]
            pad = batch_size - len(y)
            yield {"images": np.pad(x, ((0, pad), (0, 0))), "labels": np.pad(y, (0, pad)),
                   "mask": np.arange(batch_size) < len(y)}


class EvaluateTest(absltest.TestCase):

    def test_query_gallery_and_leave_one_out_with_padding(self):
        rng = np.random.default_rng(0)
        q, g = rng.normal(size=(37, 5)).astype(np.float32), rng.normal(size=(50, 5))
        ql, gl = rng.integers(0, 6, 37), rng.integers(0, 6, 50)
        embed = jax.pmap(lambda state, x: x, in_axes=(None, 0), devices=jax.devices()[:2])
        cfg = dict(batch_size=16, recall_ks=(1, 4), nmi=False)
        out = train.evaluate(None, {"query": _ArraySet(q, ql),
                                    "gallery": _ArraySet(g.astype(np.float32), gl)},
                             cfg, embed, 2)
        ref = metrics.retrieval_metrics(q, ql, g.astype(np.float32), gl, ks=(1, 4))
        for k, v in ref.items():
            self.assertAlmostEqual(out[k], v, places=6)
        out = train.evaluate(None, {"test": _ArraySet(q, ql)}, cfg, embed, 2)
        ref = metrics.retrieval_metrics(q, ql, ks=(1, 4))
        for k, v in ref.items():
            self.assertAlmostEqual(out[k], v, places=6)
        self.assertIn("diag/effective_rank", out)


def _smoke_config(**train_overrides):
    c = digits.get_config("smoke")
    c.train.update(**train_overrides)
    return c


def _final_params(config, workdir):
    from hnm import data
    ds = data.build(config.data, seed=config.seed, num_devices=1)
    model = models.create(train.model_config(config))
    tx = train.make_optimizer(config.optim, train.make_schedule(config.optim, 1))
    state = train.create_train_state(model, tx, jax.random.key(0), ds.image_shape)
    mgr = checkpoint.open_manager(workdir)
    state, meta = checkpoint.restore_or_init(mgr, state)
    mgr.close()
    return state, meta


@pytest.mark.slow
class EndToEndTest(absltest.TestCase):

    def test_digits_smoke_trains_evaluates_and_resumes(self):
        wd = self.create_tempdir().full_path
        cfg = _smoke_config()
        out = train.train_and_evaluate(cfg, wd, progress=False)
        self.assertGreater(out["recall@1"], 0.9)  # 5 unseen classes: chance is ~0.2
        self.assertGreaterEqual(out["recall@8"], out["recall@1"])
        self.assertGreater(out["map@r"], 0.3)
        self.assertGreater(out["nmi"], 0.3)
        for f in ("eval.json", "metrics.jsonl", "config.json", "training_curves.png"):
            self.assertTrue(os.path.exists(os.path.join(wd, f)), f)
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        train_rows = [r for r in rows if "loss" in r]
        self.assertNotEmpty(train_rows)
        for key in ("loss", "num_valid", "frac_hard", "mean_sim_ap", "mean_sim_an",
                    "l2_grads", "l2_params", "learning_rate", "steps_per_s", "images_per_s",
                    "diag/effective_rank", "diag/separation_violation_max"):
            self.assertIn(key, train_rows[-1])
        self.assertEqual(train_rows[-1]["num_valid"], 80.0)  # every anchor of 5 x 16 counts
        steps = out["step"]
        # Second run: resumes from the final checkpoint, trains no more steps, same result,
        # says so, and does not duplicate a row of metrics.jsonl.
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            before = f.read()
        import contextlib
        import io
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            out2 = train.train_and_evaluate(cfg, wd, progress=False)
        self.assertIn(f"complete at step {steps}; re-evaluating", err.getvalue())
        self.assertEqual(out2["step"], steps)
        self.assertAlmostEqual(out2["recall@1"], out["recall@1"], places=6)
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            self.assertEqual(f.read(), before)
        # A longer schedule resumes and continues from there.
        cfg.train.num_epochs = 3
        out3 = train.train_and_evaluate(cfg, wd, progress=False)
        self.assertGreater(out3["step"], steps)

    def test_train_step_compiles_once_per_run(self):
        traces = []
        build = train.build_objective

        def counting_build(config, axis_name=train.AXIS):
            fn = build(config, axis_name)

            def objective(emb, labels, key=None):
                traces.append(emb.shape)  # runs at trace time only
                return fn(emb, labels, key)
            return objective

        train.build_objective = counting_build
        try:
            out = train.train_and_evaluate(_smoke_config(num_epochs=2, eval_every_epochs=1),
                                           self.create_tempdir().full_path, progress=False)
        finally:
            train.build_objective = build
        self.assertGreater(out["step"], 10)
        self.assertLen(traces, 1)

    def test_bfloat16_training_matches_float32(self):
        """bf16 backbone compute (params, loss and mining in float32) trains as well as f32."""
        results = {}
        for dtype in ("float32", "bfloat16"):
            cfg = _smoke_config(num_epochs=3, eval_every_epochs=100)
            cfg.model.dtype = dtype
            results[dtype] = train.train_and_evaluate(
                cfg, self.create_tempdir().full_path, progress=False)
        f32, bf16 = results["float32"], results["bfloat16"]
        self.assertNotEqual(f32["map@r"], bf16["map@r"])  # bf16 really changed the numbers
        self.assertGreater(bf16["recall@1"], 0.8)
        self.assertLess(abs(bf16["recall@1"] - f32["recall@1"]), 0.03)  # stated tolerance
        self.assertLess(abs(bf16["map@r"] - f32["map@r"]), 0.05)

    def test_config_errors_are_one_line_before_compiling(self):
        wd = self.create_tempdir().full_path
        cfg = _smoke_config()
        cfg.objective.name = "no_such_loss"
        with self.assertRaisesRegex(ValueError, "no_such_loss"):
            train.train_and_evaluate(cfg, wd, progress=False)
        cfg = _smoke_config()
        cfg.objective.margn = 0.3
        with self.assertRaisesRegex(ValueError, "margn"):
            train.train_and_evaluate(cfg, wd, progress=False)
        cfg = _smoke_config(num_devices=2)  # 5 classes per batch cannot split over 2 devices
        with self.assertRaisesRegex(ValueError, "classes_per_batch|devices"):
            train.train_and_evaluate(cfg, wd, progress=False)

    def test_embedding_dim_mismatch_with_checkpoint(self):
        wd = self.create_tempdir().full_path
        cfg = _smoke_config(num_epochs=1)
        train.train_and_evaluate(cfg, wd, progress=False)
        cfg.model.embedding_dim = 7
        with self.assertRaisesRegex(ValueError, "does not match the checkpoint"):
            train.train_and_evaluate(cfg, wd, progress=False)

    def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(self):
        wd = self.create_tempdir().full_path
        cfg = _smoke_config(num_epochs=2, log_every=1, ckpt_every=1)
        cfg.objective = dict(name="batch_hard", normalize=False, distance="euclidean")
        cfg.optim.update(name="sgd", learning_rate=1e38)  # diverges within a few steps
        with self.assertRaisesRegex(train.NonFiniteLossError,
                                    r"diverged: non-finite .* between steps \d+ and \d+"):
            train.train_and_evaluate(cfg, wd, progress=False)
        state, _ = _final_params(cfg, wd)
        for leaf in jax.tree.leaves(state.params):
            self.assertTrue(np.isfinite(np.asarray(leaf)).all())
        self.assertFalse(os.path.exists(os.path.join(wd, "eval.json")))

    def test_poisoned_batch_with_finite_loss_and_nan_gradient_stops_before_evaluating(self):
        """A batch whose gradient is NaN while its loss is finite: the run stops at that step
        ("diverged", the step range, the last good checkpoint), never evaluates the bad
        state, and the kept checkpoint is finite."""
        wd = self.create_tempdir().full_path
        cfg = _smoke_config(num_epochs=4, log_every=3, ckpt_every=2, eval_every_epochs=1)
        build = train.build_objective

        @jax.custom_vjp
        def poison(x, bad):
            return x

        def fwd(x, bad):
            return x, bad

        def bwd(bad, g):
            return jnp.where(bad, jnp.nan, 1.0) * g, None

        poison.defvjp(fwd, bwd)

        def poisoned_build(config, axis_name=train.AXIS):
            fn = build(config, axis_name)

            def objective(emb, labels, key=None, **kw):
                # Poison every batch whose first class is 3 (the sampler's class order is
                # seeded: the same steps every run).
                return fn(poison(emb, labels[0] == 3), labels, key, **kw)
            return objective

        evaluated = []
        evaluate = train.evaluate
        train.build_objective = poisoned_build
        train.evaluate = lambda *a, **k: evaluated.append(1) or evaluate(*a, **k)
        try:
            with self.assertRaises(train.NonFiniteLossError) as ctx:
                train.train_and_evaluate(cfg, wd, progress=False)
        finally:
            train.build_objective, train.evaluate = build, evaluate
        msg = str(ctx.exception)
        self.assertIn("diverged: non-finite l2_grads", msg)  # the loss itself stayed finite
        self.assertNotIn("non-finite loss", msg)
        import re
        first, last = map(int, re.search(r"between steps (\d+) and (\d+)", msg).groups())
        self.assertLess(first, last)
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        for row in rows:  # nothing logged at or after the bad step is a train row with NaN
            for v in row.values():
                self.assertTrue(np.isfinite(v), row)
        kept = checkpoint.steps_on_disk(wd)
        self.assertTrue(kept and max(kept) < last, (kept, msg))
        self.assertIn(f"(step {max(kept)}) is kept", msg)
        state, _ = _final_params(cfg, wd)
        for leaf in jax.tree.leaves(state.params):
            self.assertTrue(np.isfinite(np.asarray(leaf)).all())
        # Evaluations ran only on good states: each periodic one at a step < the bad one.
        evals = [r["step"] for r in rows if "eval/recall@1" in r]
        self.assertLen(evaluated, len(evals))
        self.assertTrue(all(s < last for s in evals))


def _tiny_states(n=3):
    """``n`` distinct small train states (steps 1..n)."""
    state = _mlp_state()
    out = []
    for i in range(1, n + 1):
        state = state.replace(step=jnp.asarray(i, jnp.int32), params=jax.tree.map(
            lambda x: x + 1.0, state.params))
        out.append(state)
    return out


def _flip(path):
    b = bytearray(open(path, "rb").read())
    b[len(b) // 2] ^= 0x10
    open(path, "wb").write(b)


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _data_file(workdir, step):
    d = os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR, str(step), "state")
    files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs
             if os.sep + "d" + os.sep in os.path.join(r, f)]
    return max(files, key=os.path.getsize)  # the array data, not an index


class VerifiedCheckpointTest(absltest.TestCase):
    """Each saved step records checksums; a restore verifies them and falls back."""

    def _save_three(self, wd):
        states = _tiny_states(3)
        mgr = checkpoint.open_manager(wd)
        for st in states:
            checkpoint.save(mgr, int(st.step), st, {"sampler": [0], "model": {}}, workdir=wd)
        mgr.close()
        return states

    def _restore(self, wd, **kw):
        said = []
        mgr, state, meta = checkpoint.restore_verified(wd, _mlp_state(), say=said.append, **kw)
        mgr.close()
        return state, said

    def test_intact_checkpoint_restores_the_newest_step_silently(self):
        wd = self.create_tempdir().full_path
        states = self._save_three(wd)
        self.assertEqual(sorted(os.listdir(os.path.join(wd, checkpoint.MANIFEST_SUBDIR))),
                         ["1.json", "2.json", "3.json"])
        state, said = self._restore(wd)
        self.assertEqual(said, [])
        self.assertEqual(int(state.step), 3)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(states[2].params)):
            np.testing.assert_array_equal(a, b)

    def test_flipped_truncated_or_deleted_file_falls_back_to_the_previous_step(self):
        for damage, word in ((_flip, "changed"), (_truncate, "bytes"), (os.remove, "missing")):
            with self.subTest(damage.__name__):
                wd = self.create_tempdir().full_path
                states = self._save_three(wd)
                damage(_data_file(wd, 3))
                state, said = self._restore(wd)
                self.assertEqual(int(state.step), 2)
                for a, b in zip(jax.tree.leaves(state.params),
                                jax.tree.leaves(states[1].params)):
                    np.testing.assert_array_equal(a, b)
                self.assertIn("checkpoint step 3 fails verification", said[0])
                self.assertIn(word, said[0])
                self.assertIn("using checkpoint step 2", said[-1])
                # Training moves the bad step aside so the run can write step 3 again.
                self.assertEqual(checkpoint.steps_on_disk(wd), [1, 2])
                self.assertLen(os.listdir(os.path.join(wd, checkpoint.CORRUPT_SUBDIR)), 1)

    def test_eval_mode_leaves_the_damaged_step_in_place(self):
        wd = self.create_tempdir().full_path
        self._save_three(wd)
        _flip(_data_file(wd, 3))
        state, said = self._restore(wd, move_failing=False, require=True)
        self.assertEqual(int(state.step), 2)
        self.assertEqual(checkpoint.steps_on_disk(wd), [1, 2, 3])

    def test_no_step_verifies_stops_and_moves_nothing(self):
        wd = self.create_tempdir().full_path
        self._save_three(wd)
        for step in (1, 2, 3):
            _flip(_data_file(wd, step))
        with self.assertRaisesRegex(checkpoint.CheckpointError,
                                    "no checkpoint in .* verifies .*step 3.*step 1"):
            self._restore(wd)
        self.assertEqual(checkpoint.steps_on_disk(wd), [1, 2, 3])

    def test_step_without_manifest_is_unverified_and_skipped(self):
        wd = self.create_tempdir().full_path
        self._save_three(wd)
        os.remove(os.path.join(wd, checkpoint.MANIFEST_SUBDIR, "3.json"))
        state, said = self._restore(wd)
        self.assertEqual(int(state.step), 2)
        self.assertIn("no checksum manifest", said[0])

    def test_checkpoints_from_before_manifests_restore_with_a_warning(self):
        wd = self.create_tempdir().full_path
        self._save_three(wd)
        import shutil
        shutil.rmtree(os.path.join(wd, checkpoint.MANIFEST_SUBDIR))
        state, said = self._restore(wd)
        self.assertEqual(int(state.step), 3)
        self.assertIn("restored unverified", said[0])

    def test_old_manifests_are_pruned_with_their_steps(self):
        wd = self.create_tempdir().full_path
        mgr = checkpoint.open_manager(wd, max_to_keep=2)
        for st in _tiny_states(4):
            checkpoint.save(mgr, int(st.step), st, {"sampler": [0], "model": {}}, workdir=wd)
        mgr.close()
        self.assertEqual(checkpoint.steps_on_disk(wd), [3, 4])
        self.assertEqual(sorted(os.listdir(os.path.join(wd, checkpoint.MANIFEST_SUBDIR))),
                         ["3.json", "4.json"])


class RunLockTest(absltest.TestCase):

    def test_second_holder_fails_naming_the_first(self):
        wd = self.create_tempdir().full_path
        with rundir.RunLock(wd):
            with self.assertRaisesRegex(rundir.RunLockedError,
                                        f"in use by PID {os.getpid()} on host "):
                with rundir.RunLock(wd):
                    pass
        with rundir.RunLock(wd) as lock:  # released: free again, and not a takeover
            self.assertIsNone(lock.took_over_message())

    def test_lock_of_a_killed_process_is_taken_over(self):
        wd = self.create_tempdir().full_path
        code = ("import os, signal, sys; from hnm import rundir; "
                "l = rundir.RunLock(sys.argv[1]).__enter__(); print(os.getpid(), flush=True); "
                "os.kill(os.getpid(), signal.SIGKILL)")
        proc = subprocess.run([sys.executable, "-c", code, wd], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        self.assertEqual(proc.returncode, -signal.SIGKILL, proc.stderr)
        dead = int(proc.stdout.split()[0])
        with rundir.RunLock(wd) as lock:
            self.assertIn(f"PID {dead}", lock.took_over_message())
            self.assertIn("no longer running", lock.took_over_message())
            with open(os.path.join(wd, rundir.LOCK_NAME)) as f:
                self.assertEqual(json.load(f)["pid"], os.getpid())

    def test_train_refuses_a_held_work_directory_before_building_anything(self):
        wd = self.create_tempdir().full_path
        with rundir.RunLock(wd):
            t0 = time.time()
            with self.assertRaisesRegex(rundir.RunLockedError, "in use by PID"):
                train.train_and_evaluate(_smoke_config(), wd, progress=False)
            self.assertLess(time.time() - t0, 20)
        self.assertFalse(os.path.exists(os.path.join(wd, "config.json")))


class MetricsHistoryTest(absltest.TestCase):

    def test_trim_drops_rows_after_the_restored_step(self):
        path = os.path.join(self.create_tempdir().full_path, "metrics.jsonl")
        rows = [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5},
                {"step": 4, "eval/recall@1": 0.9}, {"step": 6, "loss": 0.2},
                {"step": 8, "loss": 0.1}]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
            f.write('{"step": 10, "lo')  # a row cut short by SIGKILL
        self.assertEqual(train._trim_jsonl(path, 4), 3)
        with open(path) as f:
            self.assertEqual([json.loads(x) for x in f], rows[:3])
        self.assertEqual(train._trim_jsonl(path, 4, drop_evals_at_step=True), 1)
        with open(path) as f:
            self.assertEqual([json.loads(x) for x in f], rows[:2])

    def test_config_changes_name_each_key(self):
        self.assertEqual(train.config_changes(
            {"seed": 0, "optim": {"learning_rate": 1e-3, "name": "adam"}},
            {"seed": 1, "optim": {"learning_rate": 1e-3, "name": "sgd"}, "x": {"y": 2}}),
            {"optim.name": ["adam", "sgd"], "seed": [0, 1], "x.y": [None, 2]})



def _run_cli(workdir, *extra, epochs=8, wait=True):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "hnm.cli", "train",
           f"--config={os.path.join(ROOT, 'experiments', 'digits.py')}:smoke",
           f"--workdir={workdir}", f"--config.train.num_epochs={epochs}",
           "--config.train.ckpt_every=3", "--config.train.eval_every_epochs=100",
           "--config.train.log_every=5", *extra]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=300)
        return proc.returncode, out
    return proc


def _wait_for_checkpoint(workdir, proc, min_step=3, timeout=120):
    ckpt = os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR)
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
        if steps and max(steps) >= min_step:
            return
        if proc.poll() is not None:
            raise AssertionError("run ended before its first checkpoint: "
                                 + proc.stdout.read()[-2000:])
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
class KillAndResumeTest(absltest.TestCase):
    """SIGKILL mid-run + resume gives bit-identical parameters; SIGTERM saves and exits."""

    def test_sigkill_resume_is_bit_identical_and_sigterm_saves(self):
        ref_dir, kill_dir, term_dir = (self.create_tempdir().full_path for _ in range(3))
        rc, out = _run_cli(ref_dir)
        self.assertEqual(rc, 0, out[-3000:])
        self.assertIn("| recall@1 |", out)
        # `hnm eval` re-reads config.json and evaluates the newest checkpoint: same numbers.
        with open(os.path.join(ref_dir, "eval.json")) as f:
            trained = json.load(f)
        os.remove(os.path.join(ref_dir, "eval.json"))
        ev = subprocess.run([sys.executable, "-m", "hnm.cli", "eval", f"--workdir={ref_dir}"],
                            env=dict(os.environ, XLA_FLAGS=""), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
        self.assertEqual(ev.returncode, 0, ev.stderr[-3000:])
        with open(os.path.join(ref_dir, "eval.json")) as f:
            evaluated = json.load(f)
        self.assertEqual(evaluated["step"], trained["step"])
        self.assertAlmostEqual(evaluated["recall@1"], trained["recall@1"], places=6)
        self.assertIn(f"{trained['recall@1']:.4f}", ev.stdout)  # eval.json's units
        proc = _run_cli(kill_dir, wait=False)
        _wait_for_checkpoint(kill_dir, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rc, out = _run_cli(kill_dir)
        self.assertEqual(rc, 0, out[-3000:])
        cfg = _smoke_config(num_epochs=8)
        ref, _ = _final_params(cfg, ref_dir)
        res, _ = _final_params(cfg, kill_dir)
        self.assertEqual(int(ref.step), int(res.step))
        for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(res.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

        # A long run (thousands of steps) cannot finish before the signal arrives.
        proc = _run_cli(term_dir, epochs=1000, wait=False)
        _wait_for_checkpoint(term_dir, proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        self.assertEqual(proc.returncode, 0, out[-3000:])
        self.assertIn("preempted: checkpoint saved at step", out)
        step = int(out.split("checkpoint saved at step")[1].split(";")[0])
        state, _ = _final_params(cfg, term_dir)
        self.assertEqual(int(state.step), step)
        self.assertLess(step, 1000 * 11)


if __name__ == "__main__":
    absltest.main()
