"""Tests of hnm.data.dataset: ``build`` and the Dataset API (layout, eval batches, exact
resume with augmentation, processes, prefetch), on in-memory and on-disk sources.

Everything is offline; TensorFlow is imported only by tests/test_data_tfds.py (which also
checks, in a fresh process, that the local sources never import it).
"""
import data_fixtures
import numpy as np
from absl.testing import absltest, parameterized

from hnm import data


class BuildTest(parameterized.TestCase):
    """The Dataset API on in-memory and on-disk sources."""

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

    def test_eval_batches_padded_with_mask(self):
        path, labels = data_fixtures.write_npz(self, n_classes=4, per_class=5)
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

    def test_resume_and_processes_with_augmentation(self):
        path, _ = data_fixtures.write_npz(self, n_classes=8, per_class=6, hw=(9, 9))
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


if __name__ == "__main__":
    absltest.main()
