"""hnm.inference: load a run, embed = what `hnm eval` scores, baselines, the embed command,
and the pictures (content, not only files)."""
import json
import os
import subprocess
import tempfile
import sys

import jax
import numpy as np
import pytest
from absl.testing import absltest
from PIL import Image

from hnm import checkpoint, data, inference, metrics, models, parallel, plots, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import digits  # noqa: E402  (experiments/digits.py)


def make_run(workdir, config=None, seed=3):
    """A run directory without training: config.json + a step-7 checkpoint of perturbed
    initial parameters (so the embedder differs from the untrained one)."""
    config = digits.get_config("smoke") if config is None else config
    shape = inference.image_shape(config.data)
    model = models.create(train.model_config(config))
    tx = train.make_optimizer(config.optim, train.make_schedule(config.optim, 1))
    state = train.create_train_state(model, tx, jax.random.key(config.seed), shape)
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    state = state.replace(params=jax.tree.unflatten(tree, leaves), step=np.int32(7))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    manager = checkpoint.open_manager(workdir, async_save=False)
    checkpoint.save(manager, 7, state, {"sampler": [0, 0],
                                        "model": train.model_signature(config)})
    manager.wait_until_finished()
    manager.close()
    return config


def _test_set(config):
    ds = data.build(config.data, seed=config.seed, num_devices=1)
    s = ds.eval_sets()["test"]
    return s.images.images, s.labels, ds


class LoadAndEmbedTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tempfile.mkdtemp(prefix="hnm_inference_")
        cls.config = make_run(cls.dir)
        cls.restored = inference.load(cls.dir)

    def test_image_shape_from_the_config_alone(self):
        self.assertEqual(inference.image_shape({"source": "digits"}), (8, 8, 1))
        self.assertEqual(inference.image_shape({"source": "glyphs"}), (32, 32, 1))
        self.assertEqual(inference.image_shape({"source": "folder", "path": "/nowhere",
                                                "image_size": 48}), (48, 48, 3))
        npz = os.path.join(self.dir, "x.npz")
        np.savez(npz, images=np.zeros((3, 5, 7, 3), np.uint8), labels=np.arange(3))
        self.assertEqual(inference.image_shape({"source": "npz", "path": npz}), (5, 7, 3))
        with self.assertRaisesRegex(ValueError, "gone"):
            inference.image_shape({"source": "npz", "path": npz + ".missing"})

    @pytest.mark.slow  # evaluate_checkpoint: data, NMI k-means, diagnostics
    def test_embed_equals_what_hnm_eval_scores(self):
        run = self.restored
        self.assertEqual(run.step, 7)
        self.assertEqual(run.config.model.embedding_dim, 32)
        images, labels, _ = _test_set(self.config)
        emb = run.embed(images, batch_size=60)  # 60 does not divide N: padded last batch
        self.assertEqual((emb.shape, emb.dtype), ((len(images), 32), np.float32))
        results = train.evaluate_checkpoint(self.config, self.dir, progress=False)
        with open(os.path.join(self.dir, "eval.json")) as f:
            scored = json.load(f)
        self.assertEqual(scored["step"], 7)
        got = metrics.retrieval_metrics(emb, labels, ks=tuple(self.config.eval.recall_ks))
        for key in ("recall@1", "recall@8", "map@r"):
            self.assertAlmostEqual(got[key], scored[key], places=6, msg=key)
            self.assertAlmostEqual(got[key], results[key], places=6, msg=key)
        # Batch size and input order: row i is image i, whatever the batching.
        perm = np.random.default_rng(0).permutation(len(images))[:37]
        np.testing.assert_allclose(run.embed(images[perm], batch_size=8), emb[perm],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(run.embed(list(images[:5])), emb[:5], rtol=1e-5,
                                   atol=1e-6)

    def test_inputs_the_run_cannot_take_say_what_was_expected(self):
        run = self.restored
        for images, word in ((np.zeros((2, 9, 8), np.uint8), r"8 x 8 x 1"),
                             (np.zeros((2, 8, 8, 3), np.uint8), "1-channel"),
                             (np.zeros((2, 8, 8), np.float32), "uint8"),
                             (np.zeros((8, 8), np.uint8), r"\[N, H, W\]")):
            with self.subTest(word), self.assertRaisesRegex(ValueError, word):
                run.embed(images)

    def test_missing_run_or_checkpoint(self):
        empty = self.create_tempdir().full_path
        with self.assertRaisesRegex(ValueError, "config.json not found"):
            inference.load(empty)
        with open(os.path.join(empty, "config.json"), "w") as f:
            f.write(self.config.to_json())
        with self.assertRaisesRegex(ValueError, "no checkpoint"):
            inference.load(empty)

    def test_resized_run_preprocesses_like_evaluation(self):
        # A run with image_size: inputs of any size are resized + centre-cropped as in eval.
        cfg = digits.get_config("smoke")
        cfg.data.update(image_size=6, eval_resize=7)
        run_dir = self.create_tempdir().full_path
        make_run(run_dir, cfg)
        run = inference.load(run_dir)
        self.assertEqual(run.image_shape, (6, 6, 1))
        images, _, ds = _test_set(cfg)
        batch = next(ds.eval_sets()["test"].batches(16))
        # The evaluation batch holds pre-processed 6 x 6 images: apply the model directly.
        want = np.asarray(parallel.embed_step(run.state, batch["images"][:16]))
        got = run.embed(images[:16])            # raw 8 x 8: resized to 7, cropped to 6
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class BaselinesAndTableTest(absltest.TestCase):

    @pytest.mark.slow
    def test_baselines_are_the_untrained_net_and_raw_pixels(self):
        config = digits.get_config("smoke")
        _, labels, ds = _test_set(config)
        out = inference.baselines(ds.eval_sets(), config)
        self.assertEqual(sorted(out), ["raw_pixels", "untrained"])
        # Raw pixels: flattened, cosine; an independent brute-force R@1.
        x = ds.eval_sets()["test"].images.images.reshape(len(labels), -1).astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        want = float(np.mean(labels[np.argmax(sim, axis=1)] == labels))
        self.assertAlmostEqual(out["raw_pixels"]["recall@1"], want, places=6)
        self.assertGreater(out["raw_pixels"]["recall@1"], 0.95)  # digits: ~0.99
        # Untrained: the initial parameters train_and_evaluate starts from.
        init_key, _ = jax.random.split(jax.random.key(config.seed))
        model = models.create(train.model_config(config))
        variables = model.init({"params": init_key}, np.zeros((2, 8, 8, 1), np.uint8))
        emb = np.asarray(model.apply(variables, ds.eval_sets()["test"].images.images))
        self.assertAlmostEqual(out["untrained"]["recall@1"],
                               metrics.retrieval_metrics(emb, labels)["recall@1"], places=6)
        self.assertIn("ami", out["untrained"])

    def test_table_rows_and_units_agree_with_eval_json(self):
        results = {"recall@1": 0.91234, "map@r": 0.5, "nmi": 0.7, "step": 10,
                   "baselines": {"untrained": {"recall@1": 0.5, "map@r": 0.1, "nmi": 0.2},
                                 "raw_pixels": {"recall@1": 0.75, "map@r": 0.3,
                                                "nmi": 0.4}}}
        table = inference.results_table(results).splitlines()
        self.assertEqual(table[0], "| model | recall@1 | map@r | nmi |")
        self.assertEqual(table[2], "| trained (step 10) | 0.9123 | 0.5000 | 0.7000 |")
        self.assertEqual(table[3], "| untrained | 0.5000 | 0.1000 | 0.2000 |")
        self.assertEqual(table[4], "| raw pixels | 0.7500 | 0.3000 | 0.4000 |")


class PicturesTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.create_tempdir().full_path
        rng = np.random.default_rng(0)
        self.labels = np.repeat(np.arange(4), 10)
        centres = rng.normal(size=(4, 6)) * 3
        self.emb = (centres[self.labels] + rng.normal(size=(40, 6))).astype(np.float32)
        self.emb[3] = centres[2]  # query 3 (class 0) sits in class 2: the worst query
        self.images = rng.integers(0, 255, (40, 8, 8), dtype=np.uint8)

    def test_embedding_map_colours_each_class(self):
        fig = plots.plot_embedding_map(self.emb, self.labels,
                                       os.path.join(self.dir, "map.png"), dpi=30)
        panels = [ax for ax in fig.axes if ax.get_gid() == plots.PANEL_GID]
        self.assertLen(panels, 2)
        self.assertIn("PCA", panels[0].get_title())
        self.assertIn("t-SNE", panels[1].get_title())
        _, colours = plots.class_colours(self.labels)
        for ax in panels:
            self.assertLen(ax.collections, 4)  # one scatter per class
            for c, coll in enumerate(ax.collections):
                self.assertEqual(coll.get_label(), str(c))
                self.assertLen(coll.get_offsets(), 10)
                np.testing.assert_allclose(coll.get_facecolor()[0], colours[c])
        self.assertEqual(len({tuple(c) for c in colours}), 4)

    def test_worst_queries_gallery_panels_and_red_frames(self):
        from hnm import search
        scores, idx = search.knn(self.emb, None, 5, exclude_self=True)
        path = os.path.join(self.dir, "worst.png")
        fig = plots.plot_worst_queries(self.images, self.labels, idx, scores, path,
                                       num_queries=3, dpi=30)
        self.assertLen(fig.axes, 3 * 6)  # 3 queries x (query + top-5)
        rows = np.array([ax.get_gid() for ax in fig.axes]).reshape(3, 6)
        self.assertEqual(rows[:, 0].tolist(), ["query"] * 3)
        first = fig.axes[0]
        self.assertIn("query 3", first.get_title())  # the planted worst query comes first
        for j in range(5):
            want = "right" if self.labels[idx[3, j]] == 0 else "wrong"
            ax = fig.axes[1 + j]
            self.assertEqual(ax.get_gid(), want)
            colour = ax.spines["top"].get_edgecolor()
            red = plots.WRONG_COLOUR
            self.assertEqual(colour[:3] == tuple(int(red[i:i + 2], 16) / 255
                                                 for i in (1, 3, 5)), want == "wrong")
        np.testing.assert_array_equal(fig.axes[1].images[0].get_array(),
                                      self.images[idx[3, 0]])
        with Image.open(path) as im:  # red pixels exist in the PNG itself
            px = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
        self.assertTrue(np.any((px[:, 0] > 200) & (px[:, 1] < 70) & (px[:, 2] < 70)))

    def test_per_class_recall_histogram(self):
        hit = np.arange(40) % 10 != 0            # class c misses 1 of 10 -> 0.9 each ...
        hit[self.labels == 3] = False            # ... but class 3 misses all
        classes, rec = plots.per_class_recall(self.labels, hit)
        np.testing.assert_allclose(rec, [0.9, 0.9, 0.9, 0.0])
        fig = plots.plot_per_class_recall(self.labels, hit, os.path.join(self.dir, "h.png"),
                                          bins=10, dpi=30)
        ax = fig.axes[0]
        heights = [p.get_height() for p in ax.patches]
        self.assertEqual(heights[0], 1)   # class 3 in [0, 0.1)
        self.assertEqual(heights[9], 3)   # three classes in [0.9, 1.0]
        self.assertEqual(sum(heights), 4)

    @pytest.mark.slow  # t-SNE + three figures: ~5-20 s on 2 cores
    def test_write_pictures_and_curves_with_baselines(self):
        paths = inference.write_pictures(self.dir, self.emb, self.labels, self.images, k=4,
                                         num_queries=2)
        self.assertEqual([os.path.basename(p) for p in paths],
                         ["embedding_map.png", "worst_queries.png", "per_class_recall.png"])
        rows = [{"step": s, "loss": 1.0, "eval/recall@1": 0.90 + 0.01 * s} for s in (1, 2)]
        fig = plots.plot_training_curves_with_baselines(
            rows, os.path.join(self.dir, "c.png"), keys=("loss", "eval/recall@1"),
            baselines={"raw_pixels": {"recall@1": 0.75}, "untrained": {"recall@1": 0.4}},
            dpi=30)
        ax = [a for a in fig.axes if a.get_gid() == plots.PANEL_GID][1]
        levels = sorted(float(line.get_ydata()[0]) for line in ax.lines[1:])
        self.assertEqual(levels, [0.4, 0.75])
        self.assertEqual(ax.get_ylim(), (-0.02, 1.02))  # a one-point change stays small


class EmbedCommandTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tempfile.mkdtemp(prefix="hnm_inference_")
        cls.config = make_run(os.path.join(cls.dir, "run"))
        cls.restored = inference.load(os.path.join(cls.dir, "run"))

    def test_npz_and_folder_inputs(self):
        images, labels, _ = _test_set(self.config)
        npz = os.path.join(self.dir, "in.npz")
        np.savez(npz, images=images[:20, ..., 0], labels=labels[:20])
        out = os.path.join(self.dir, "out", "emb.npy")
        inference.embed_command([f"--workdir={self.dir}/run", f"--input={npz}",
                                 f"--output={out}", f"--index={self.dir}/index.npz",
                                 "--no_progress"])
        emb = np.load(out)
        np.testing.assert_allclose(emb, self.restored.embed(images[:20]), rtol=1e-5, atol=1e-6)
        with np.load(os.path.join(self.dir, "index.npz")) as f:
            np.testing.assert_array_equal(f["labels"], labels[:20])
        # A folder: recursive, sorted paths, written beside the output.
        folder = os.path.join(self.dir, "imgs")
        for i in (3, 1, 2):
            os.makedirs(os.path.join(folder, f"c{i % 2}"), exist_ok=True)
            Image.fromarray(images[i, ..., 0]).save(os.path.join(folder, f"c{i % 2}",
                                                                 f"{i}.png"))
        out2 = os.path.join(self.dir, "f.npy")
        inference.embed_command([f"--workdir={self.dir}/run", f"--input={folder}",
                                 f"--output={out2}", "--no_progress"])
        with open(os.path.join(self.dir, "f.paths.txt")) as f:
            paths = f.read().split()
        self.assertEqual([os.path.relpath(p, folder) for p in paths],
                         ["c0/2.png", "c1/1.png", "c1/3.png"])
        np.testing.assert_allclose(np.load(out2), self.restored.embed(images[[2, 1, 3]]),
                                   rtol=1e-5, atol=1e-6)

    def test_user_errors(self):
        npz = os.path.join(self.dir, "rgb.npz")
        np.savez(npz, images=np.zeros((2, 8, 8, 3), np.uint8))
        base = [f"--workdir={self.dir}/run", f"--output={self.dir}/o.npy"]
        for argv, word in ((base + [f"--input={npz}"], "1-channel"),
                           (base + [f"--input={self.dir}/none.npz"], "not found"),
                           ([f"--workdir={self.dir}/nope", f"--input={npz}",
                             f"--output={self.dir}/o.npy"], "config.json"),
                           (base[:1] + [f"--input={npz}", "--output=x.txt"], ".npy")):
            with self.subTest(word), self.assertRaisesRegex(ValueError, word):
                inference.embed_command(argv)


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "hnm.cli", *args], cwd=cwd,
                          env=dict(os.environ,
                                   XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
class CliTest(absltest.TestCase):
    """The commands end to end through `python -m hnm.cli` (subprocesses: slow)."""

    def test_embed_search_errors_through_the_cli(self):
        tmp = self.create_tempdir().full_path
        config = make_run(os.path.join(tmp, "run"))
        images, labels, _ = _test_set(config)
        np.savez(os.path.join(tmp, "in.npz"), images=images[:30], labels=labels[:30])
        r = _cli("embed", f"--workdir={tmp}/run", f"--input={tmp}/in.npz",
                 f"--output={tmp}/e.npy", f"--index={tmp}/i.npz")
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        np.savez(os.path.join(tmp, "q.npz"), embeddings=np.load(f"{tmp}/e.npy")[:2])
        r = _cli("search", f"--index={tmp}/i.npz", f"--query={tmp}/q.npz", "-k", "3")
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertTrue(r.stdout.splitlines()[0].startswith("0: 0:1.0000"), r.stdout)
        # hnm eval: the table (eval.json's units, baseline rows) and the pictures.
        r = _cli("eval", f"--workdir={tmp}/run")
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        with open(os.path.join(tmp, "run", "eval.json")) as f:
            scored = json.load(f)
        self.assertIn(f"| trained (step 7) | {scored['recall@1']:.4f} |", r.stdout)
        for name in ("embedding_map.png", "worst_queries.png", "per_class_recall.png"):
            self.assertTrue(os.path.getsize(os.path.join(tmp, "run", name)) > 1000, name)
        np.savez(os.path.join(tmp, "bad.npz"), images=np.zeros((2, 5, 5), np.uint8))
        for args, word in ((("embed", f"--workdir={tmp}/run", f"--input={tmp}/bad.npz",
                             f"--output={tmp}/b.npy"), "8 x 8 x 1"),
                           (("embed", f"--workdir={tmp}", f"--input={tmp}/in.npz",
                             f"--output={tmp}/b.npy"), "config.json"),
                           (("search", f"--index={tmp}/none.npz", f"--query={tmp}/q.npz"),
                            "not found")):
            r = _cli(*args)
            with self.subTest(word):
                self.assertNotEqual(r.returncode, 0)
                lines = r.stderr.strip().splitlines()
                self.assertTrue(lines[-1].startswith("hnm: error: "), r.stderr[-2000:])
                self.assertIn(word, lines[-1])
                self.assertNotIn("Traceback", r.stderr)


@pytest.mark.slow
class FirstRunTest(absltest.TestCase):
    """The README's first command: the trained row beats the untrained network and raw
    pixels on the same split, in the table and in eval.json (about a minute of CPU)."""

    def test_default_config_beats_its_baselines(self):
        tmp = self.create_tempdir().full_path
        r = _cli("train", "--config=experiments/digits.py", f"--workdir={tmp}", "--no_progress")
        self.assertEqual(r.returncode, 0, r.stderr[-3000:])
        with open(os.path.join(tmp, "eval.json")) as f:
            out = json.load(f)
        base = out["baselines"]
        self.assertGreater(out["recall@1"], base["raw_pixels"]["recall@1"] + 0.05)
        self.assertGreater(out["recall@1"], base["untrained"]["recall@1"] + 0.05)
        self.assertAlmostEqual(base["raw_pixels"]["recall@1"], 0.752, places=3)  # hnm.glyphs
        table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
        self.assertEqual([row.split(" | ")[0] for row in table[1:]],
                         [f"| trained (step {out['step']})", "| untrained", "| raw pixels"])
        self.assertIn(f" {out['recall@1']:.4f} ", table[1])
        self.assertIn(f" {base['raw_pixels']['recall@1']:.4f} ", table[3])


if __name__ == "__main__":
    absltest.main()
