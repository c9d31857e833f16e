"""Tests of hnm.data: the P x K sampler, class splits, sources, pre-processing, eval batches.

Everything is offline. TensorFlow is imported only by ``TfdsTest`` (tfds mock data).
"""
import os
import subprocess
import sys
import tempfile
import types
from unittest import mock

import numpy as np
from absl.testing import absltest, parameterized
from PIL import Image

import hnm
from hnm import data


def _labels(counts):
    """Labels with class c (value 10 * c + 3, i.e. not 0..C-1) repeated counts[c] times."""
    return np.repeat(10 * np.arange(len(counts)) + 3, counts)


def _greedy_batches(chunk_counts, P):
    """Independent reference for the number of batches: repeatedly take the P largest counts.

    (Taking the classes with the most chunks left is the classical optimal schedule for
    packing groups of P distinct items.)
    """
    counts = sorted(chunk_counts, reverse=True)
    b = 0
    while len(counts) >= P and counts[P - 1] > 0:
        counts = sorted([c - 1 for c in counts[:P]] + counts[P:], reverse=True)
        b += 1
    return b


def _write_png(path, array):
    Image.fromarray(array).save(path)


class SplitTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("cub", 200, 0.5, 100), ("cars", 196, 0.5, 98), ("digits", 10, 0.5, 5),
        ("count", 7, 3, 3), ("fraction", 9, 0.25, 2))
    def test_first_classes_train(self, num_classes, train_classes, expected):
        rng = np.random.default_rng(num_classes)
        labels = rng.permutation(np.repeat(np.arange(1, num_classes + 1) * 7, 3))
        train_idx, test_idx = data.split_classes(labels, train_classes)
        sorted_classes = sorted(set(labels.tolist()))
        want_train = set(sorted_classes[:expected])
        self.assertEqual(set(labels[train_idx].tolist()), want_train)
        self.assertEqual(set(labels[test_idx].tolist()), set(sorted_classes) - want_train)
        # Every row exactly once, indices ascending.
        self.assertEqual(sorted(train_idx.tolist() + test_idx.tolist()), list(range(len(labels))))
        self.assertTrue(np.all(np.diff(train_idx) > 0) and np.all(np.diff(test_idx) > 0))

    @parameterized.parameters(0.0, 1.0, 1.5, 0, 5)
    def test_degenerate_split_raises(self, train_classes):
        with self.assertRaisesRegex(ValueError, "train_classes"):
            data.split_classes(np.arange(5), train_classes)

    def test_merge_then_resplit_by_class(self):
        # CUB/Cars: the tfds train and test splits both hold every class; merging and
        # re-splitting must give class-disjoint sides with every image kept once.
        a = data.EncodedImages(lambda i: b"a%d" % i, 4)
        b = data.EncodedImages(lambda i: b"b%d" % i, 3)
        merged, labels = data.merge_stores([a, b], [np.array([1, 4, 2, 3]), np.array([4, 1, 2])])
        np.testing.assert_array_equal(labels, [1, 4, 2, 3, 4, 1, 2])
        self.assertEqual([merged.read(i) for i in range(7)],
                         [b"a0", b"a1", b"a2", b"a3", b"b0", b"b1", b"b2"])
        train_idx, test_idx = data.split_classes(labels, 0.5)
        np.testing.assert_array_equal(train_idx, [0, 2, 5, 6])   # classes 1 and 2
        np.testing.assert_array_equal(test_idx, [1, 3, 4])       # classes 3 and 4


class SamplerTest(parameterized.TestCase):

    def test_max_batches_closed_form(self):
        self.assertEqual(data.max_batches([4] * 10, 4), 10)         # 40 chunks / 4
        self.assertEqual(data.max_batches([100, 1, 1, 1], 2), 3)    # the big class pairs up
        self.assertEqual(data.max_batches([5, 5, 0], 3), 0)          # only 2 classes have any
        self.assertEqual(data.max_batches([3, 3, 3], 3), 3)

    def test_max_batches_matches_greedy(self):
        rng = np.random.default_rng(0)
        for _ in range(200):
            counts = rng.integers(0, 8, size=rng.integers(1, 12))
            P = int(rng.integers(1, len(counts) + 1))
            with self.subTest(counts=counts.tolist(), P=P):
                self.assertEqual(data.max_batches(counts, P), _greedy_batches(counts.tolist(), P))

    @parameterized.named_parameters(
        ("balanced", [6] * 8, 4, 2, False), ("unbalanced", [2, 9, 3, 5, 7, 2, 4, 11], 4, 2, False),
        ("k3_leftovers", [7, 8, 3, 10, 5, 4], 2, 3, False),
        ("padded", [1, 2, 7, 5, 3, 2, 9, 4], 4, 3, True),
        ("sop_like", [2, 3, 2, 4, 2, 6, 2, 2, 3, 5, 2, 12], 8, 2, False))
    def test_plan_properties(self, counts, P, K, pad):
        labels = _labels(counts)
        for seed in (0, 1, 7):
            s = data.PKSampler(labels, P, K, seed=seed, pad_classes=pad)
            chunk = [-(-n // K) if pad else n // K for n in counts]
            steps = _greedy_batches(chunk, P)
            with self.subTest(seed=seed):
                self.assertEqual(s.steps_per_epoch, steps)
                self.assertGreater(steps, 0)
                for epoch in (0, 3):
                    plan = s.plan(epoch)
                    self.assertEqual(plan.shape, (steps, P, K))
                    plan_labels = labels[plan]
                    # Each class block is K rows of one class; P distinct classes per batch.
                    self.assertTrue(np.all(plan_labels == plan_labels[:, :, :1]))
                    for b in range(steps):
                        self.assertLen(set(plan_labels[b, :, 0].tolist()), P)
                    used = np.bincount(plan.reshape(-1), minlength=len(labels))
                    unused_chunks = sum(chunk) - steps * P
                    if pad:
                        # Only the chunks that do not fit into full batches are missing.
                        self.assertLessEqual((used == 0).sum(), unused_chunks * K)
                        if all(n >= K for n in counts):
                            for b in range(steps):
                                for j in range(P):
                                    self.assertLen(set(plan[b, j].tolist()), K)
                    else:
                        # No example twice in an epoch; all but the unavoidable left out.
                        self.assertLessEqual(used.max(), 1)
                        self.assertEqual(used.sum(), steps * P * K)
                        leftovers = sum(n % K for n in counts)
                        self.assertEqual((used == 0).sum(), leftovers + unused_chunks * K)
                        for c, n in enumerate(counts):  # a class loses < K (leftover) + unused
                            self.assertLessEqual(used[labels == 10 * c + 3].sum(), n)

    def test_full_coverage_when_balanced(self):
        # 8 classes x 6 images, K = 2, P = 4: 24 chunks = 6 full batches, nothing left over.
        labels = _labels([6] * 8)
        for seed in range(5):
            plan = data.PKSampler(labels, 4, 2, seed=seed).plan(0)
            np.testing.assert_array_equal(np.sort(plan.reshape(-1)), np.arange(48))

    def test_padding_covers_every_example(self):
        # Chunks ceil(n / 3) = 2 per class, 12 chunks = 4 full batches of 3: all used.
        labels = _labels([4, 5, 6, 4, 5, 6])
        for seed in range(5):
            plan = data.PKSampler(labels, 3, 3, seed=seed, pad_classes=True).plan(2)
            used = np.bincount(plan.reshape(-1), minlength=len(labels))
            self.assertEqual(used.min(), 1)
            self.assertEqual(used.sum(), 4 * 3 * 3)
            # A partial chunk is completed with *other* examples of its class: no repeat.
            for block in plan.reshape(-1, 3):
                self.assertLen(set(block.tolist()), 3)

    def test_deterministic_seeds_and_epochs_differ(self):
        labels = _labels([5, 7, 6, 9, 4, 8])
        a = data.PKSampler(labels, 2, 2, seed=3).plan(0)
        np.testing.assert_array_equal(a, data.PKSampler(labels, 2, 2, seed=3).plan(0))
        self.assertFalse(np.array_equal(a, data.PKSampler(labels, 2, 2, seed=4).plan(0)))
        self.assertFalse(np.array_equal(a, data.PKSampler(labels, 2, 2, seed=3).plan(1)))
        # Negative seeds are fine and differ from positive ones.
        self.assertFalse(np.array_equal(a, data.PKSampler(labels, 2, 2, seed=-3).plan(0)))

    def test_resume_mid_epoch(self):
        labels = _labels([5, 7, 6, 9, 4, 8, 3, 6])
        s = data.PKSampler(labels, 4, 2, seed=11)
        state = data.SamplerState(np.int64(0), np.int64(0))
        run = []
        for _ in range(3 * s.steps_per_epoch):
            idx, state = s.batch_indices(state)
            run.append((idx, state))
        self.assertEqual(tuple(map(int, state)), (3, 0))
        saved = tuple(int(x) for x in run[s.steps_per_epoch + 1][1])  # mid-epoch 1
        fresh = data.PKSampler(labels, 4, 2, seed=11)  # a new process: nothing cached
        state = data.SamplerState(*saved)
        for idx_ref, state_ref in run[s.steps_per_epoch + 2:]:
            idx, state = fresh.batch_indices(state)
            np.testing.assert_array_equal(idx, idx_ref)
            self.assertEqual(tuple(map(int, state)), tuple(map(int, state_ref)))

    def test_bad_state_raises(self):
        s = data.PKSampler(_labels([4, 4, 4]), 2, 2, seed=0)
        with self.assertRaisesRegex(ValueError, "state"):
            s.batch_indices(data.SamplerState(0, s.steps_per_epoch))

    def test_process_blocks_tile_the_global_batch(self):
        labels = _labels([6, 5, 8, 7, 4, 9, 6, 6])
        full = data.PKSampler(labels, 4, 2, seed=5)
        parts = [data.PKSampler(labels, 4, 2, seed=5, process_index=i, process_count=2)
                 for i in range(2)]
        state = data.SamplerState(np.int64(1), np.int64(2))
        got = np.concatenate([p.batch_indices(state)[0] for p in parts])
        np.testing.assert_array_equal(got, full.batch_indices(state)[0])


class BuildTest(parameterized.TestCase):
    """Sources, layout, errors and the Dataset API on in-memory and on-disk sources."""

    def _tmpdir(self):
        # absltest's create_tempdir needs parsed absl flags, which pytest does not give.
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        return tmp.name

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.digits = data.build({"source": "digits", "classes_per_batch": 4,
                                 "samples_per_class": 3}, seed=0, num_devices=4)

    def test_digits_split_and_values(self):
        from sklearn.datasets import load_digits
        ref = load_digits()
        ds = self.digits
        self.assertEqual(ds.image_shape, (8, 8, 1))
        self.assertEqual(ds.num_train_classes, 5)
        self.assertEqual(ds.num_train_examples, int((ref.target < 5).sum()))
        test = ds.eval_sets()["test"]
        self.assertEqual(sorted(ds.eval_sets()), ["test"])
        self.assertEqual(set(test.labels.tolist()), {5, 6, 7, 8, 9})
        self.assertEqual(test.num_examples, int((ref.target >= 5).sum()))
        # The first test image is the first digit >= 5 of the original order, scaled 0..255.
        first = ref.images[np.flatnonzero(ref.target >= 5)[0]]
        batch = next(test.batches(4))
        np.testing.assert_array_equal(batch["images"][0, ..., 0],
                                      np.round(first * 255 / 16).astype(np.uint8))
        self.assertEqual(batch["images"].max(), 255)

    def test_config_dict_sentinels_mean_unset(self):
        import ml_collections
        cfg = ml_collections.ConfigDict(dict(
            source="digits", name="", path="", classes_per_batch=5, samples_per_class=16,
            image_size=0, train_resize=0, augment=False, pad_classes=True, data_dir=""))
        ds = data.build(cfg, seed=0, num_devices=1)
        self.assertEqual(ds.image_shape, (8, 8, 1))
        batch, _ = ds.train_batch(ds.init_sampler_state())
        self.assertEqual(batch["images"].shape, (80, 8, 8, 1))

    def test_device_slices_hold_whole_classes(self):
        ds, state = self.digits, self.digits.init_sampler_state()
        for _ in range(5):
            batch, state = ds.train_batch(state)
            self.assertEqual(batch["images"].shape, (12, 8, 8, 1))
            self.assertEqual(batch["images"].dtype, np.uint8)
            self.assertEqual(batch["labels"].dtype, np.int32)
            per_device = batch["labels"].reshape(4, -1)      # the trainer's shard()
            for row in per_device:                           # 1 class x 3 per device
                self.assertLen(set(row.tolist()), 1)
            self.assertLen(set(batch["labels"].tolist()), 4)
            self.assertTrue(set(batch["labels"].tolist()) <= {0, 1, 2, 3, 4})

    @parameterized.named_parameters(
        ("unknown_source", {"source": "mnist"}, 1, "source"),
        ("unknown_key", {"source": "digits", "clases_per_batch": 4}, 1, "clases_per_batch"),
        ("p_not_divisible", {"source": "digits", "classes_per_batch": 3}, 2, "multiple"),
        ("k_is_one", {"source": "digits", "samples_per_class": 1}, 1, "samples_per_class"),
        ("k_too_large", {"source": "digits", "samples_per_class": 500}, 1, "samples_per_class"),
        ("too_few_classes", {"source": "digits", "classes_per_batch": 6}, 1, "classes_per_batch"),
        ("npz_no_path", {"source": "npz"}, 1, "path"),
        ("resize_smaller", {"source": "folder", "path": "/x", "image_size": 64,
                            "train_resize": 32}, 1, "train_resize"),
        ("tfds_access", {"source": "tfds", "name": "cars196", "tfds_access": "x"}, 1,
         "tfds_access"))
    def test_errors(self, cfg, num_devices, match):
        with self.assertRaisesRegex(ValueError, match):
            data.build(cfg, seed=0, num_devices=num_devices)

    def _npz(self, n_classes=6, per_class=5, hw=(6, 5)):
        """An npz whose every image is filled with its label (so rows can be checked)."""
        labels = np.repeat(np.arange(n_classes) * 3 + 1, per_class)
        images = np.broadcast_to(labels[:, None, None], (len(labels), *hw)).astype(np.uint8)
        path = os.path.join(self._tmpdir(), "toy.npz")
        np.savez(path, images=images, labels=labels)
        return path, labels

    def test_npz_rows_and_split(self):
        path, labels = self._npz()
        ds = data.build({"source": "npz", "path": path, "classes_per_batch": 2,
                         "samples_per_class": 2, "train_classes": 0.5}, seed=1, num_devices=2)
        self.assertEqual(ds.image_shape, (6, 5, 1))
        self.assertEqual(ds.num_train_classes, 3)
        state = ds.init_sampler_state()
        for _ in range(2 * ds.steps_per_epoch):
            batch, state = ds.train_batch(state)
            # The pixels carry the label: images were fetched for the right rows.
            np.testing.assert_array_equal(batch["images"][:, 0, 0, 0], batch["labels"])
            self.assertTrue(set(batch["labels"].tolist()) <= {1, 4, 7})
        self.assertEqual(set(ds.eval_sets()["test"].labels.tolist()), {10, 13, 16})

    def test_npz_bad_arrays(self):
        path = os.path.join(self._tmpdir(), "bad.npz")
        np.savez(path, images=np.zeros((4, 3, 3), np.float32), labels=np.arange(4))
        with self.assertRaisesRegex(ValueError, "uint8"):
            data.build({"source": "npz", "path": path}, seed=0, num_devices=1)
        np.savez(path, pictures=np.zeros((4, 3, 3), np.uint8), labels=np.arange(4))
        with self.assertRaisesRegex(ValueError, "images"):
            data.build({"source": "npz", "path": path}, seed=0, num_devices=1)

    def test_eval_batches_padded_with_mask(self):
        path, labels = self._npz(n_classes=4, per_class=5)
        ds = data.build({"source": "npz", "path": path, "classes_per_batch": 2,
                         "samples_per_class": 2}, seed=0, num_devices=1)
        test = ds.eval_sets()["test"]  # classes 7, 10: 10 rows
        self.assertEqual(test.num_examples, 10)
        batches = list(test.batches(4))
        self.assertLen(batches, 3)
        for b in batches:
            self.assertEqual(b["images"].shape, (4, 6, 5, 1))
            self.assertEqual(b["mask"].dtype, bool)
        np.testing.assert_array_equal(batches[-1]["mask"], [True, True, False, False])
        np.testing.assert_array_equal(batches[-1]["labels"][2:], [data.PAD_LABEL] * 2)
        self.assertEqual(batches[-1]["images"][2:].max(), 0)
        real = np.concatenate([b["labels"][b["mask"]] for b in batches])
        np.testing.assert_array_equal(real, labels[labels >= 7])
        pixels = np.concatenate([b["images"][b["mask"], 0, 0, 0] for b in batches])
        np.testing.assert_array_equal(pixels, real)
        with self.assertRaisesRegex(ValueError, "batch_size"):
            next(test.batches(0))

    def _folder(self):
        """4 classes x 3 solid-colour RGB images of different (non-square) sizes."""
        root = self._tmpdir()
        colours = {"ant": (200, 10, 10), "bee": (10, 200, 10), "cat": (10, 10, 200),
                   "dog": (90, 90, 90)}
        for k, (name, colour) in enumerate(colours.items()):
            os.makedirs(os.path.join(root, name))
            for j in range(3):
                h, w = 20 + 3 * j, 26 - 2 * k
                _write_png(os.path.join(root, name, f"{j}.png"),
                           np.full((h, w, 3), colour, np.uint8))
        with open(os.path.join(root, "ant", "notes.txt"), "w") as f:
            f.write("not an image")
        return root, colours

    def test_folder_source_and_prefetch(self):
        root, colours = self._folder()
        cfg = {"source": "folder", "path": root, "image_size": 16, "classes_per_batch": 2,
               "samples_per_class": 2, "num_workers": 2}
        eager = data.build({**cfg, "prefetch": False}, seed=2, num_devices=2)
        ahead = data.build({**cfg, "prefetch": True}, seed=2, num_devices=2)
        self.assertEqual(eager.image_shape, (16, 16, 3))
        self.assertEqual(eager.num_train_examples, 6)    # ant, bee; the .txt is skipped
        self.assertEqual(eager.train_batch(eager.init_sampler_state())[0]["images"].shape,
                         (4, 16, 16, 3))
        palette = np.array(list(colours.values()))
        s1 = s2 = eager.init_sampler_state()
        for _ in range(4):
            b1, s1 = eager.train_batch(s1)
            b2, s2 = ahead.train_batch(s2)
            np.testing.assert_array_equal(b1["images"], b2["images"])
            # Solid colours survive resize and crop: the colour identifies the class.
            np.testing.assert_array_equal(b1["images"][:, 5, 7], palette[b1["labels"]])
        test = eager.eval_sets()["test"]
        batch = next(test.batches(8))
        np.testing.assert_array_equal(batch["labels"][:6], [2, 2, 2, 3, 3, 3])
        np.testing.assert_array_equal(batch["images"][:6, 8, 8], palette[[2, 2, 2, 3, 3, 3]])

    def test_inshop_fake_tree(self):
        root = self._tmpdir()
        rows = []
        for item in range(6):
            split = "train" if item < 3 else None
            for view in range(3):
                name = f"img/WOMEN/Dresses/id_{item:08d}/{view:02d}_front.jpg"
                os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
                Image.fromarray(np.full((12, 10, 3), 40 * item, np.uint8)).save(
                    os.path.join(root, name), quality=100)
                rows.append((name, f"id_{item:08d}",
                             split or ("query" if view == 0 else "gallery")))
        with open(os.path.join(root, data.INSHOP_PARTITION_FILE), "w") as f:
            f.write(f"{len(rows)}\nimage_name item_id evaluation_status\n")
            f.writelines(f"{a}   {b}  {c}\n" for a, b, c in rows)
        ds = data.build({"source": "inshop", "path": root, "image_size": 8,
                         "classes_per_batch": 2, "samples_per_class": 3}, seed=0,
                        num_devices=1)
        self.assertEqual((ds.num_train_classes, ds.num_train_examples), (3, 9))
        sets = ds.eval_sets()
        self.assertEqual(sorted(sets), ["gallery", "query"])
        np.testing.assert_array_equal(sets["query"].labels, [3, 4, 5])
        np.testing.assert_array_equal(sets["gallery"].labels, [3, 3, 4, 4, 5, 5])
        batch = next(sets["query"].batches(4))
        self.assertEqual(batch["images"].shape, (4, 8, 8, 3))
        np.testing.assert_allclose(batch["images"][:3, 4, 4, 0], [120, 160, 200], atol=3)
        train, _ = ds.train_batch(ds.init_sampler_state())
        np.testing.assert_allclose(train["images"][:, 4, 4, 0], 40 * train["labels"], atol=3)
        with self.assertRaisesRegex(ValueError, "list_eval_partition"):
            data.build({"source": "inshop", "path": self._tmpdir()},
                       seed=0, num_devices=1)

    def test_resume_and_processes_with_augmentation(self):
        path, _ = self._npz(n_classes=8, per_class=6, hw=(9, 9))
        # Gradient images so crops and flips change pixels.
        with np.load(path) as f:
            labels = f["labels"]
        grad = (np.arange(81).reshape(9, 9) + labels[:, None, None] * 0).astype(np.uint8)
        np.savez(path, images=grad, labels=labels)
        cfg = {"source": "npz", "path": path, "classes_per_batch": 4, "samples_per_class": 2,
               "image_size": 6, "train_resize": 9, "augment": True}
        ds = data.build(cfg, seed=9, num_devices=2)
        state, run = ds.init_sampler_state(), []
        for _ in range(ds.steps_per_epoch + 3):
            batch, state = ds.train_batch(state)
            run.append((batch, state))
        # Augmentation really varies: not every crop is the same.
        crops = np.concatenate([b["images"][:, 0, 0, 0] for b, _ in run])
        self.assertGreater(len(np.unique(crops)), 3)
        # A fresh Dataset resumed from a checkpointed state reproduces the rest exactly.
        resumed = data.build(cfg, seed=9, num_devices=2)
        state = data.SamplerState(*[int(x) for x in run[1][1]])
        for ref_batch, ref_state in run[2:]:
            batch, state = resumed.train_batch(state)
            np.testing.assert_array_equal(batch["images"], ref_batch["images"])
            np.testing.assert_array_equal(batch["labels"], ref_batch["labels"])
        # Two processes: each gets its contiguous half of the same global batch.
        halves = [data.build(cfg, seed=9, num_devices=1, process_index=i, process_count=2)
                  for i in range(2)]
        start = data.SamplerState(np.int64(0), np.int64(1))
        got = [h.train_batch(start)[0] for h in halves]
        for key in ("images", "labels"):
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]),
                                          run[1][0][key])
        # A different seed gives different batches.
        other = data.build(cfg, seed=10, num_devices=2).train_batch(start)[0]
        self.assertFalse(np.array_equal(other["labels"], run[1][0]["labels"]))

    def test_glyphs_source_is_routed(self):
        calls = []

        def load_glyphs(split, cache_dir=None):
            calls.append((split, cache_dir))
            labels = np.repeat(np.arange(4) + (0 if split == "train" else 10), 3)
            images = np.broadcast_to(labels[:, None, None, None], (12, 32, 32, 1))
            return images.astype(np.uint8), labels.astype(np.int32)

        fake = types.ModuleType("hnm.data.glyphs")
        fake.load_glyphs = load_glyphs
        with mock.patch.dict(sys.modules, {"hnm.data.glyphs": fake}), \
                mock.patch.object(data, "glyphs", fake, create=True):
            ds = data.build({"source": "glyphs", "cache_dir": "/c", "classes_per_batch": 2,
                             "samples_per_class": 3}, seed=0, num_devices=2)
        self.assertEqual(sorted(calls), [("test", "/c"), ("train", "/c")])
        self.assertEqual((ds.image_shape, ds.num_train_classes), ((32, 32, 1), 4))
        batch, _ = ds.train_batch(ds.init_sampler_state())
        np.testing.assert_array_equal(batch["images"][:, 9, 9, 0], batch["labels"])
        self.assertEqual(set(ds.eval_sets()["test"].labels.tolist()), {10, 11, 12, 13})

    def test_digits_never_imports_tensorflow(self):
        code = ("import sys; from hnm import data; ds = data.build({'source': 'digits', "
                "'classes_per_batch': 4}, "
                "seed=0, num_devices=1); ds.train_batch(ds.init_sampler_state()); "
                "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])


class PreprocessTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.image = np.arange(300 * 400 * 3, dtype=np.int64).reshape(300, 400, 3) % 251
        self.image = self.image.astype(np.uint8)

    def test_resize_shorter_side(self):
        self.assertEqual(data.resize_shorter(self.image, 281).shape, (281, 374, 3))
        self.assertEqual(data.resize_shorter(self.image.transpose(1, 0, 2), 256).shape,
                         (341, 256, 3))
        self.assertIs(data.resize_shorter(self.image, 300), self.image)
        gray = self.image[..., :1]
        self.assertEqual(data.resize_shorter(gray, 30).shape, (30, 40, 1))

    def test_crop_and_flip_positions(self):
        img = self.image
        np.testing.assert_array_equal(data.crop_and_flip(img, (5, 7), np.array([0, 0, 0.9])),
                                      img[:5, :7])
        np.testing.assert_array_equal(
            data.crop_and_flip(img, (5, 7), np.array([0.9999, 0.9999, 0.1])),
            img[-5:, -7:][:, ::-1])
        np.testing.assert_array_equal(data.center_crop(img[:6, :8], (2, 4)), img[2:4, 2:6])

    def test_recipe_shapes_and_deterministic_eval(self):
        prep = data.Preprocess(256, 281, 256, augment=True)
        rng = np.random.default_rng(0)
        outs = [prep.train(self.image, rng.random(3)) for _ in range(6)]
        for out in outs:
            self.assertEqual(out.shape, (256, 256, 3))
        self.assertGreater(len({o.tobytes() for o in outs}), 1)
        ev1, ev2 = prep.eval(self.image), prep.eval(self.image.copy())
        self.assertEqual(ev1.shape, (256, 256, 3))
        np.testing.assert_array_equal(ev1, ev2)
        # Eval = resize the shorter side to 256 (-> 256 x 341), then the central 256 columns.
        np.testing.assert_array_equal(ev1, data.resize_shorter(self.image, 256)[:, 42:298])
        # augment=False: training pre-processing is the evaluation one.
        plain = data.Preprocess(256, 281, 256, augment=False)
        np.testing.assert_array_equal(plain.train(self.image, np.array([0.3, 0.7, 0.1])), ev1)


class TfdsTest(parameterized.TestCase):
    """tfds sources under ``tfds.testing.mock_data`` (imports TensorFlow: keep it small).

    The mock returns the same random examples for every split and random labels, so this
    checks plumbing (keys, decoding, shapes, access modes); the class re-split is tested on
    labels in ``SplitTest``.
    """

    @parameterized.named_parameters(
        ("cub_data_source", "caltech_birds2011", "auto", 200),
        ("cars_cache", "cars196", "cache", 196),
        ("sop", "stanford_online_products", "auto", None))
    def test_mock(self, name, access, num_classes):
        import tensorflow_datasets as tfds
        cfg = {"source": "tfds", "name": name, "image_size": 24, "classes_per_batch": 2,
               "samples_per_class": 2, "tfds_access": access, "pad_classes": True,
               "num_workers": 2}
        with tfds.testing.mock_data(num_examples=12):
            ds = data.build(cfg, seed=0, num_devices=2)
            batch, state = ds.train_batch(ds.init_sampler_state())
            test = ds.eval_sets()["test"]
            ev = next(test.batches(16))
        self.assertEqual(ds.image_shape, (24, 24, 3))
        self.assertEqual(batch["images"].shape, (4, 24, 24, 3))
        self.assertEqual(batch["images"].dtype, np.uint8)
        self.assertEqual(tuple(map(int, state)), (0, 1) if ds.steps_per_epoch > 1 else (1, 0))
        self.assertEqual(ev["images"].shape, (16, 24, 24, 3))
        self.assertEqual(int(ev["mask"].sum()), test.num_examples)
        train_classes = set(ds.train_labels.tolist())
        if num_classes is not None:
            # Mock: both splits are the same 12 examples; the re-split keeps each copy once
            # and puts every class on one side only.
            self.assertEqual(ds.num_train_examples + test.num_examples, 24)
            self.assertFalse(train_classes & set(test.labels.tolist()))
        else:
            self.assertEqual((ds.num_train_examples, test.num_examples), (12, 12))
        self.assertTrue(set(batch["labels"].tolist()) <= train_classes)


if __name__ == "__main__":
    absltest.main()
