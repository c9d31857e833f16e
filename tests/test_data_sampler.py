"""Tests of hnm.data.sampler: the P x K plan, its batch count, exact resume, process blocks,
and the errors (with the largest valid value) when labels cannot fill a batch."""
import numpy as np
from absl.testing import absltest, parameterized

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


class CheckSamplerTest(parameterized.TestCase):
    """Labels that cannot fill a P x K batch: one line with the flag and its largest valid
    value, and that value really is valid and the largest."""

    @parameterized.named_parameters(
        # (class sizes, P, K, pad_classes, devices, largest valid P)
        ("p_too_large", [5, 5, 5, 5, 5], 8, 2, False, 1, 5),
        ("p_multiple_of_devices", [5, 5, 5, 5, 5], 8, 2, False, 2, 4),
        ("k_leaves_out_small_classes", [2, 2, 6, 6, 6], 4, 3, False, 1, 3),
        ("padded_counts_every_class", [1, 1, 1, 9], 6, 2, True, 2, 4))
    def test_largest_classes_per_batch(self, counts, P, K, pad, shards, best):
        labels = _labels(counts)
        with self.assertRaises(ValueError) as cm:
            data.check_sampler(labels, P, K, pad, num_shards=shards)
        msg = str(cm.exception)
        self.assertNotIn("\n", msg)
        self.assertIn(f"data.classes_per_batch={P}", msg)
        self.assertIn(f"--config.data.classes_per_batch={best}", msg)
        data.check_sampler(labels, best, K, pad, num_shards=shards)  # the advice works ...
        self.assertGreater(data.PKSampler(labels, best, K, seed=0, pad_classes=pad)
                           .steps_per_epoch, 0)
        with self.assertRaises(ValueError):  # ... and is the largest multiple that does
            data.check_sampler(labels, best + shards, K, pad, num_shards=shards)
        # Classes left out by K: the message says how to use them all.
        self.assertEqual("pad_classes=True" in msg, not pad and min(counts) < K)

    def test_fewer_classes_than_devices(self):
        with self.assertRaisesRegex(ValueError, "fewer than the 4 devices"):
            data.check_sampler(_labels([5, 5, 5]), 4, 2, False, num_shards=4)

    def test_largest_samples_per_class(self):
        labels = _labels([3, 7, 4])
        with self.assertRaises(ValueError) as cm:
            data.check_sampler(labels, 1, 9, False)
        msg = str(cm.exception)
        self.assertIn("data.samples_per_class=9", msg)
        self.assertIn("--config.data.samples_per_class=7", msg)
        self.assertIn("--config.data.pad_classes=True", msg)
        data.check_sampler(labels, 1, 7, False)
        data.check_sampler(labels, 3, 9, True)  # padding completes every class
        with self.assertRaises(ValueError):
            data.check_sampler(labels, 1, 8, False)


if __name__ == "__main__":
    absltest.main()
