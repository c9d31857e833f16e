"""Tests of hnm.data.sources: class splits and the local sources (npz, folder, In-Shop, glyphs
routing), with their one-line errors."""
import os
import sys
import types
from unittest import mock

import data_fixtures
import numpy as np
from absl.testing import absltest, parameterized
from PIL import Image

from hnm import data


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


class SourcesTest(parameterized.TestCase):
    """Each source through ``data.build``: the right rows, labels, shapes and splits."""

    def test_npz_rows_and_split(self):
        path, labels = data_fixtures.write_npz(self)
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
        path = os.path.join(data_fixtures.tmpdir(self), "bad.npz")
        np.savez(path, images=np.zeros((4, 3, 3), np.float32), labels=np.arange(4))
        with self.assertRaisesRegex(ValueError, "uint8"):
            data.build({"source": "npz", "path": path}, seed=0, num_devices=1)
        np.savez(path, pictures=np.zeros((4, 3, 3), np.uint8), labels=np.arange(4))
        with self.assertRaisesRegex(ValueError, "images"):
            data.build({"source": "npz", "path": path}, seed=0, num_devices=1)

    def test_folder_source_and_prefetch(self):
        root, colours = data_fixtures.write_folder(self)
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
        root = data_fixtures.tmpdir(self)
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
            data.build({"source": "inshop", "path": data_fixtures.tmpdir(self)},
                       seed=0, num_devices=1)

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

    def test_missing_paths_are_one_line_data_not_found(self):
        tmp = data_fixtures.tmpdir(self)
        missing = os.path.join(tmp, "nope.npz")
        for cfg, expect in (
                ({"source": "npz", "path": missing}, ["nope.npz", "`images`", "`labels`"]),
                ({"source": "folder", "path": missing}, ["nope.npz", "<class name>"]),
                ({"source": "folder", "path": tmp}, ["no class sub-folders"]),
                ({"source": "inshop", "path": tmp}, [data.INSHOP_PARTITION_FILE])):
            with self.subTest(source=cfg["source"], path=cfg["path"]):
                with self.assertRaises(data.DataNotFoundError) as cm:
                    data.build(cfg, seed=0, num_devices=1)
                msg = str(cm.exception)
                self.assertIsInstance(cm.exception, ValueError)  # the CLI prints ValueErrors
                self.assertNotIn("\n", msg)
                self.assertIn("data.path=", msg)
                for part in expect:
                    self.assertIn(part, msg)

    def test_npz_not_an_archive(self):
        tmp = data_fixtures.tmpdir(self)
        text, single = os.path.join(tmp, "a.npz"), os.path.join(tmp, "b.npy")
        with open(text, "w") as f:
            f.write("images,labels\n")
        np.save(single, np.zeros((4, 3, 3), np.uint8))
        for path, match in ((text, "not readable"), (single, "holds one array")):
            with self.subTest(path=path):
                with self.assertRaises(ValueError) as cm:
                    data.build({"source": "npz", "path": path}, seed=0, num_devices=1)
                msg = str(cm.exception)
                self.assertNotIn("\n", msg)
                for part in (match, path, "`images`", "`labels`"):
                    self.assertIn(part, msg)


class TrainClassesTest(parameterized.TestCase):
    """``train_classes``: a fraction in (0, 1) or a count, also as a whole float (136.0)."""

    @parameterized.named_parameters(
        ("fraction", 0.5, 5), ("fraction_rounds_half_up", 0.25, 3), ("count", 3, 3),
        ("count_as_float", 3.0, 3), ("numpy_count", np.int64(4), 4),
        ("numpy_float_count", np.float32(7.0), 7), ("count_of_one", 1, 1))
    def test_forms(self, train_classes, n_train):
        labels = np.repeat(np.arange(10) * 2 + 5, 3)
        train_idx, test_idx = data.split_classes(labels, train_classes)
        self.assertEqual(sorted(set(labels[train_idx].tolist())),
                         list(range(5, 5 + 2 * n_train, 2)))
        self.assertLen(set(labels[test_idx].tolist()), 10 - n_train)

    @parameterized.parameters(1.0, 1.5, -2, 0, 0.0, True, "3", None, float("nan"))
    def test_bad_forms_name_the_key_and_both_forms(self, value):
        with self.assertRaises(ValueError) as cm:
            data.split_classes(np.arange(10), value, key="data.train_classes")
        msg = str(cm.exception)
        self.assertIn("`data.train_classes`=", msg)
        self.assertIn("fraction of the classes in (0, 1)", msg)
        self.assertIn("whole count of classes >= 1", msg)

    def test_command_line_count_on_a_float_field(self):
        # The config's default 0.5 makes the ConfigDict field a float, so
        # --config.data.train_classes=3 arrives as 3.0: it must mean 3 classes.
        import ml_collections
        path, _ = data_fixtures.write_npz(self, n_classes=6, per_class=4)
        cfg = ml_collections.ConfigDict(dict(source="npz", path=path, train_classes=0.5,
                                             classes_per_batch=2, samples_per_class=2))
        cfg.train_classes = 4
        self.assertIsInstance(cfg.train_classes, float)
        ds = data.build(cfg, seed=0, num_devices=1)
        self.assertEqual(ds.num_train_classes, 4)
        self.assertEqual(set(ds.eval_sets()["test"].labels.tolist()), {13, 16})
        cfg.train_classes = 6  # every class: nothing left to test on
        with self.assertRaisesRegex(ValueError, "leaves 6 of 6 classes"):
            data.build(cfg, seed=0, num_devices=1)


if __name__ == "__main__":
    absltest.main()
