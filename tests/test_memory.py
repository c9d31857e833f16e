"""Cross-batch memory: the ring buffer, masked labels, objectives with memory, the trainer.

References are NumPy: a row-by-row ring buffer, and float64 anchor-by-anchor loops over
``batch + memory`` candidates written from the papers' definitions (Hermans' batch-hard, the
official SCT code's easy-positive / hard-negative rules), not from hnm's code.
"""
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized

from hnm import distances, memory, objectives, parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASKED = distances.MASKED_LABEL


# ------------------------------------------------------------------------------- references

def _ring_reference(size, dim, batches):
    """Writes rows one at a time at ``ptr``, advancing ``ptr`` by one modulo ``size``."""
    emb = np.zeros((size, dim), np.float32)
    lab = np.full(size, np.iinfo(np.int32).min, np.int64)
    ptr = 0
    for rows, labels in batches:
        for r, y in zip(rows, labels):
            emb[ptr], lab[ptr] = r, y
            ptr = (ptr + 1) % size
    return emb, lab, ptr


def _normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _candidates(emb, labels, mem_emb, mem_labels):
    """Anchors = the batch rows; candidates = batch rows, then the non-empty memory rows."""
    x = np.asarray(emb, np.float64)
    keep = np.asarray(mem_labels) != np.iinfo(np.int32).min
    cand = np.concatenate([x, np.asarray(mem_emb, np.float64)[keep]])
    cand_labels = np.concatenate([labels, np.asarray(mem_labels)[keep]])
    return x, cand, cand_labels


def ref_batch_hard(emb, labels, mem_emb, mem_labels, margin=0.2):
    """Hermans: hinge of the farthest positive and the closest negative, mean over anchors
    having both (Euclidean distance between L2-normalised rows)."""
    x, cand, cl = _candidates(emb, labels, mem_emb, mem_labels)
    x, cand = _normalize(x), _normalize(cand)
    losses = []
    for a in range(len(x)):
        d = np.linalg.norm(cand - x[a], axis=1)
        pos = [j for j in range(len(cand)) if cl[j] == labels[a] and j != a]
        neg = [j for j in range(len(cand)) if cl[j] != labels[a]]
        if pos and neg:
            losses.append(max(0.0, max(d[pos]) - min(d[neg]) + margin))
    return np.mean(losses), len(losses)


def ref_sct(emb, labels, mem_emb, mem_labels, temperature=0.1, threshold=0.8):
    """Official SCT (current release): easy positive (most similar, cosine <= 0.9999), hardest
    negative; valid when both cosines lie in (-1, 1); hard if s_an > s_ap or s_an > 0.8 (loss
    s_an), easy if s_an < s_ap and s_an < 0.8 (softplus((s_an - s_ap) / T)); joint mean."""
    x, cand, cl = _candidates(emb, labels, mem_emb, mem_labels)
    s = _normalize(x) @ _normalize(cand).T
    total, count = 0.0, 0
    for a in range(len(x)):
        pos = [j for j in range(len(cand)) if cl[j] == labels[a] and j != a
               and s[a, j] <= 0.9999]
        neg = [j for j in range(len(cand)) if cl[j] != labels[a]]
        if not pos or not neg:
            continue
        s_ap, s_an = max(s[a, pos]), max(s[a, neg])
        if not (-1 < s_ap < 1 and -1 < s_an < 1):
            continue
        if s_an > s_ap or s_an > threshold:
            total, count = total + s_an, count + 1
        elif s_an < s_ap and s_an < threshold:
            z = (s_an - s_ap) / temperature
            total, count = total + np.log1p(np.exp(-abs(z))) + max(z, 0.0), count + 1
    return total / max(count, 1), count


def _problem(seed, b=12, d=6, num_classes=4, mem_size=10, mem_fill=7):
    """A batch and a partly filled memory (the last slots empty) sharing the classes, plus
    a memory-only class so that memory rows can be the only positives of nobody."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(b, d)).astype(np.float32)
    labels = (np.arange(b) % num_classes).astype(np.int32)
    mem_emb = np.zeros((mem_size, d), np.float32)
    mem_emb[:mem_fill] = rng.normal(size=(mem_fill, d))
    mem_emb[mem_fill:] = rng.normal(size=(mem_size - mem_fill, d))  # garbage in empty slots
    mem_labels = np.full(mem_size, MASKED, np.int32)
    mem_labels[:mem_fill] = rng.integers(0, num_classes + 1, size=mem_fill)
    mem = memory.Memory(jnp.asarray(mem_emb), jnp.asarray(mem_labels),
                        jnp.asarray(mem_fill % mem_size, jnp.int32))
    return jnp.asarray(emb), jnp.asarray(labels), mem


# ------------------------------------------------------------------------------- tests

class MaskedLabelTest(absltest.TestCase):

    def test_masked_reference_rows_are_neither_positive_nor_negative(self):
        labels = np.array([0, 1, 0, MASKED], np.int32)
        ref = np.array([0, 1, 0, MASKED, 1, MASKED, 0], np.int32)
        pos, neg = distances.label_masks(jnp.asarray(labels), jnp.asarray(ref), query_offset=0)
        for i in range(len(labels)):
            for j in range(len(ref)):
                usable = ref[j] != MASKED
                self.assertEqual(bool(pos[i, j]), usable and labels[i] == ref[j] and i != j)
                self.assertEqual(bool(neg[i, j]), usable and labels[i] != ref[j])
        self.assertEqual(MASKED, np.iinfo(np.int32).min)

    def test_narrow_label_dtypes_are_unaffected(self):
        labels = jnp.array([0, 1, 1], jnp.int8)
        pos, neg = distances.label_masks(labels)
        np.testing.assert_array_equal(pos, [[0, 0, 0], [0, 0, 1], [0, 1, 0]])
        np.testing.assert_array_equal(neg, [[0, 1, 1], [1, 0, 0], [1, 0, 0]])


class RingBufferTest(absltest.TestCase):

    def test_enqueue_matches_numpy_ring_buffer_with_wraparound(self):
        size, dim = 8, 3
        rng = np.random.default_rng(0)
        enq = jax.jit(memory.enqueue)
        mem = memory.init(size, dim)
        batches = []
        # 3 + 5 fills exactly; the rest wrap; 11 > size overwrites within one batch.
        for b in (3, 5, 3, 11, 5, 3, 3):
            rows = rng.normal(size=(b, dim)).astype(np.float32)
            labels = rng.integers(0, 50, size=b).astype(np.int32)
            batches.append((rows, labels))
            mem = enq(mem, rows, labels)
            want_emb, want_lab, want_ptr = _ring_reference(size, dim, batches)
            np.testing.assert_array_equal(mem.embeddings, want_emb)
            np.testing.assert_array_equal(mem.labels, want_lab)
            self.assertEqual(int(mem.ptr), want_ptr)
        self.assertEqual((mem.embeddings.dtype, mem.labels.dtype, mem.ptr.dtype),
                         (jnp.float32, jnp.int32, jnp.int32))

    def test_init_masked_fill_and_errors(self):
        mem = memory.init(4, 2)
        np.testing.assert_array_equal(mem.labels, np.full(4, MASKED))
        self.assertEqual(float(memory.fill_fraction(mem)), 0.0)
        mem = memory.enqueue(mem, jnp.ones((3, 2)), jnp.arange(3))
        self.assertAlmostEqual(float(memory.fill_fraction(mem)), 0.75)
        masked = jax.jit(memory.masked)
        np.testing.assert_array_equal(masked(mem, False).labels, np.full(4, MASKED))
        np.testing.assert_array_equal(masked(mem, True).labels, mem.labels)
        np.testing.assert_array_equal(masked(mem, False).embeddings, mem.embeddings)
        with self.assertRaisesRegex(ValueError, "size"):
            memory.init(0, 2)
        with self.assertRaisesRegex(ValueError, "memory"):
            memory.enqueue(mem, jnp.ones((3, 5)), jnp.arange(3))
        with self.assertRaisesRegex(ValueError, "memory"):
            objectives.get("sct")(jnp.ones((4, 5)), jnp.arange(4), memory=mem)
        with self.assertRaisesRegex(ValueError, r"\['memory'\]"):
            objectives.get("sct", memory=mem)  # call-time, never a bound option

    def test_bad_memory_inputs_name_the_argument(self):
        for size, error in ((0, ValueError), (-3, ValueError), (2.5, TypeError),
                            (True, TypeError), ("8", TypeError)):
            with self.subTest(size=size):
                with self.assertRaisesRegex(error, r"`size`.*" + re.escape(repr(size))):
                    memory.init(size, 2)
        with self.assertRaisesRegex(ValueError, "`dim`"):
            memory.init(4, 0)
        self.assertEqual(memory.init(np.int64(4), np.int32(2)).embeddings.shape, (4, 2))
        mem = memory.init(4, 2)
        emb = jnp.ones((2, 2))
        with self.assertRaisesRegex(ValueError, r"`labels` holds -2147483648.*MASKED_LABEL"):
            memory.enqueue(mem, emb, np.array([1, MASKED]))
        with self.assertRaisesRegex(ValueError, r"`labels` holds 4294967296"):
            memory.enqueue(mem, emb, np.array([0, 2 ** 32], np.int64))
        with self.assertRaisesRegex(ValueError, r"`embeddings` is empty along B"):
            memory.enqueue(mem, jnp.ones((0, 2)), jnp.zeros(0, jnp.int32))
        with self.assertRaisesRegex(TypeError, r"`memory.ptr` must be an integer scalar"):
            memory.enqueue(memory.Memory(mem.embeddings, mem.labels, jnp.zeros(2)), emb,
                           jnp.arange(2))
        with self.assertRaisesRegex(ValueError, r"`memory.embeddings` is empty along M"):
            objectives.get("sct")(emb, jnp.arange(2),
                                  memory=memory.Memory(jnp.zeros((0, 2)),
                                                       jnp.zeros(0, jnp.int32), mem.ptr))
        # Traced labels are not checked (a jitted step still compiles and runs).
        out = jax.jit(memory.enqueue)(mem, emb, jnp.array([3, 4]))
        np.testing.assert_array_equal(out.labels, [3, 4, MASKED, MASKED])

    def test_enqueue_passes_no_gradient(self):
        mem = memory.init(4, 2)
        g = jax.grad(lambda x: jnp.sum(memory.enqueue(mem, x, jnp.arange(3)).embeddings))(
            jnp.ones((3, 2)))
        np.testing.assert_array_equal(g, np.zeros((3, 2)))


ALL = tuple(n for n in objectives.names() if not objectives.is_parametric(n))
# One objective per family in the default run; the others run the same check in the slow run.
DEFAULT = ("sct", "batch_all", "multi_similarity", "smooth_ap")


class EmptyMemoryIsANoOpTest(parameterized.TestCase):
    """An empty memory and a warm-up-masked full one give the plain objective: loss, aux,
    gradient."""

    @parameterized.parameters(*(n for n in ALL if n in DEFAULT))
    def test_empty_and_masked_memory_equal_plain_batch(self, name):
        self._check(name)

    @parameterized.parameters(*(n for n in ALL if n not in DEFAULT))
    @pytest.mark.slow
    def test_empty_and_masked_memory_equal_plain_batch_others(self, name):
        self._check(name)

    def _check(self, name):
        emb, labels, mem = _problem(1)
        fn = objectives.get(name)
        key = jax.random.key(3)

        @jax.jit
        def with_memory(e, m):
            return jax.value_and_grad(lambda e: fn(e, labels, key, memory=m), has_aux=True)(e)

        (loss, aux), grad = jax.jit(jax.value_and_grad(
            lambda e: fn(e, labels, key), has_aux=True))(emb)
        full = memory.Memory(mem.embeddings, jnp.where(mem.labels == MASKED, 0, mem.labels),
                             mem.ptr)
        for what, m in (("empty", memory.init(*mem.embeddings.shape)),
                        ("warm-up", memory.masked(full, jnp.asarray(False)))):
            with self.subTest(what):
                (l2, a2), g2 = with_memory(emb, m)
                np.testing.assert_allclose(l2, loss, rtol=1e-6, atol=1e-7)
                np.testing.assert_allclose(g2, grad, rtol=1e-5, atol=1e-7)
                self.assertEqual(set(a2), set(aux))
                for k in aux:
                    np.testing.assert_allclose(a2[k], aux[k], rtol=1e-6, atol=1e-7, err_msg=k)
        # The same memory, active, changes the objective (so the test above can fail).
        (l3, _), _ = with_memory(emb, full)
        self.assertNotEqual(float(l3), float(loss))


class FilledMemoryTest(absltest.TestCase):

    def test_batch_hard_and_sct_match_numpy_over_batch_plus_memory(self):
        for seed in (2, 5):
            emb, labels, mem = _problem(seed)
            args = (np.asarray(emb), np.asarray(labels), mem.embeddings, mem.labels)
            for name, ref in (("batch_hard", ref_batch_hard), ("sct", ref_sct)):
                with self.subTest(f"{name}/{seed}"):
                    want, count = ref(*args)
                    loss, aux = objectives.get(name)(emb, labels, memory=mem)
                    self.assertGreater(count, 0)
                    self.assertEqual(int(aux["num_valid"]) if name == "batch_hard"
                                     else int(aux["num_easy"] + aux["num_hard"]), count)
                    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
                    plain, _ = ref(*args[:2], args[2][:0], args[3][:0])
                    self.assertGreater(abs(plain - want), 1e-4)  # memory mattered

    @pytest.mark.slow  # RingBufferTest.test_enqueue_passes_no_gradient checks it cheaply
    def test_no_gradient_flows_into_memory_rows(self):
        emb, labels, mem = _problem(4)
        for name in ("batch_hard", "supcon"):
            g_mem = jax.grad(lambda m_emb: objectives.get(name)(
                emb, labels, jax.random.key(0), memory=mem._replace(embeddings=m_emb))[0])(
                    mem.embeddings)
            np.testing.assert_array_equal(g_mem, np.zeros_like(g_mem))
            g_emb = jax.grad(lambda e: objectives.get(name)(e, labels, memory=mem)[0])(emb)
            self.assertGreater(float(jnp.abs(g_emb).max()), 0.0)


class MultiDeviceTest(parameterized.TestCase):

    def test_enqueue_is_the_same_on_every_device(self):
        n_dev, local, size, dim = 8, 3, 20, 2
        rng = np.random.default_rng(7)
        rows = rng.normal(size=(n_dev * local, dim)).astype(np.float32)
        labels = rng.integers(0, 9, size=n_dev * local).astype(np.int32)
        start = memory.enqueue(memory.init(size, dim), rows[:7], labels[:7])  # ptr = 7
        out = jax.pmap(lambda m, e, y: memory.enqueue(m, e, y, axis_name="b"), axis_name="b",
                       in_axes=(None, 0, 0))(start, rows.reshape(n_dev, local, dim),
                                            labels.reshape(n_dev, local))
        want = memory.enqueue(start, rows, labels)
        for d in range(n_dev):
            np.testing.assert_array_equal(out.embeddings[d], want.embeddings)
            np.testing.assert_array_equal(out.labels[d], want.labels)
            self.assertEqual(int(out.ptr[d]), int(want.ptr))
        self.assertEqual(int(want.ptr), (7 + n_dev * local) % size)

    @parameterized.parameters("sct", "distance_weighted")
    @pytest.mark.slow  # tests/test_parallel.py checks both with memory through the train step
    def test_objective_with_memory_sums_to_single_device(self, name):
        n_dev, local = 8, 3
        emb, labels, mem = _problem(9, b=n_dev * local)
        key = jax.random.key(5)
        single = objectives.get(name)
        (loss, aux), grad = jax.value_and_grad(
            lambda e: single(e, labels, key, memory=mem), has_aux=True)(emb)
        sharded = objectives.get(name, axis_name="b")

        def step(e, y, m):
            return jax.value_and_grad(lambda e: sharded(e, y, key, memory=m), has_aux=True)(e)
        (l_dev, a_dev), g_dev = jax.pmap(step, axis_name="b", in_axes=(0, 0, None))(
            emb.reshape(n_dev, local, -1), labels.reshape(n_dev, local), mem)
        self.assertGreater(int(aux["num_valid"]), 0)
        np.testing.assert_allclose(l_dev.sum(), loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g_dev.reshape(emb.shape), grad, rtol=1e-4, atol=1e-6)
        for k, v in aux.items():
            np.testing.assert_allclose(a_dev[k], np.full(n_dev, v), rtol=1e-5, atol=1e-6,
                                       err_msg=k)


# ------------------------------------------------------------------------------- trainer

def _memory_config(num_epochs, ckpt_every=1000):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import digits  # pylint: disable=import-outside-toplevel
    c = digits.get_config("smoke")
    c.memory.update(size=160, start_step=2)
    c.train.update(num_epochs=num_epochs, log_every=1, ckpt_every=ckpt_every, keep=2,
                   eval_every_epochs=100)
    c.eval.nmi = False
    return c


def _restore(config, workdir, step=None):
    from hnm import checkpoint, data, models, train  # pylint: disable=import-outside-toplevel
    ds = data.build(config.data, seed=config.seed, num_devices=1)
    model = models.create(train.model_config(config))
    tx = train.make_optimizer(config.optim, train.make_schedule(config.optim, 1))
    state = train.create_train_state(model, tx, jax.random.key(0), ds.image_shape,
                                     memory_size=train.memory_options(config)[0])
    mgr = checkpoint.open_manager(workdir)
    state, meta = checkpoint.restore_or_init(mgr, state, step)
    mgr.close()
    return ds, state, meta


class TrainerTest(absltest.TestCase):

    @pytest.mark.slow  # tests/test_parallel.py checks one step with memory per family
    def test_pmapped_steps_with_memory_equal_single_device(self):
        from hnm import models, train  # pylint: disable=import-outside-toplevel
        rng = np.random.default_rng(0)
        batches = [{"images": rng.integers(0, 256, size=(32, 4, 4, 1), dtype=np.uint8),
                    "labels": np.repeat(np.arange(16), 2).astype(np.int32) + 16 * i}
                   for i in range(2)]
        batches[1]["labels"] %= 24  # the second batch shares classes with the memory
        model = models.create(dict(backbone="mlp", embedding_dim=8))
        tx = train.make_optimizer(dict(name="sgd", learning_rate=0.1),
                                  train.make_schedule(dict(learning_rate=0.1), 10))
        fn = objectives.get("batch_hard", axis_name=parallel.AXIS)
        results = {}
        for n_dev in (1, 8):
            state = train.create_train_state(model, tx, jax.random.key(0), (4, 4, 1),
                                             memory_size=48)
            layout = parallel.make_layout("pmap", n_dev)
            step = layout.make_train_step(fn)
            state = layout.place_state(state)
            for b in batches:
                state, m = step(state, layout.shard_batch(b), jax.random.key(1))
            results[n_dev] = state, m
        (s1, m1), (s8, m8) = results[1], results[8]
        self.assertAlmostEqual(float(m1["memory_fill"]), 32 / 48, places=6)
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(s8.memory.labels, s1.memory.labels)
        np.testing.assert_array_equal(s1.memory.labels[(32 + np.arange(32)) % 48],
                                      batches[1]["labels"])
        np.testing.assert_allclose(s8.memory.embeddings, s1.memory.embeddings, rtol=1e-5,
                                   atol=1e-6)
        for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    @pytest.mark.slow  # two short training runs
    def test_memory_is_filled_checkpointed_and_restored(self):
        from hnm import train  # pylint: disable=import-outside-toplevel
        wd, wd_resumed = self.create_tempdir().full_path, self.create_tempdir().full_path
        cfg = _memory_config(num_epochs=2, ckpt_every=1)  # keeps the last two steps
        out = train.train_and_evaluate(cfg, wd, progress=False)
        steps, batch = out["step"], 80
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            fill = [r["memory_fill"] for r in map(json.loads, f) if "memory_fill" in r]
        self.assertLen(fill, steps)
        # Masked for steps 0 and 1 (warm-up), then two batches fill the 160 slots.
        np.testing.assert_allclose(fill[:4], [0.0, 0.0, 1.0, 1.0])
        self.assertEqual(fill, sorted(fill))

        # The final memory holds the last batch, embedded by the previous step's parameters.
        ds, state, _ = _restore(cfg, wd)
        _, prev, meta = _restore(cfg, wd, steps - 1)
        sampler = type(ds.init_sampler_state())(*meta["sampler"])
        last, _ = ds.train_batch(sampler)
        emb, _ = prev.apply_fn(parallel.model_variables(prev), last["images"], train=True,
                               mutable=["batch_stats"])
        slots = (np.arange(batch) + (steps - 1) * batch) % 160
        self.assertEqual(int(state.memory.ptr), steps * batch % 160)
        np.testing.assert_array_equal(state.memory.labels[slots], last["labels"])
        np.testing.assert_allclose(state.memory.embeddings[slots], emb, rtol=1e-5, atol=1e-6)
        self.assertFalse(np.all(np.asarray(state.memory.labels) == MASKED))

        # Stopping after one epoch and resuming gives the uninterrupted run bit for bit (the
        # memory, active since step 2, came back from the checkpoint).
        train.train_and_evaluate(_memory_config(num_epochs=1), wd_resumed, progress=False)
        _, mid, _ = _restore(cfg, wd_resumed)
        self.assertGreater(float(memory.fill_fraction(mid.memory)), 0.0)
        train.train_and_evaluate(_memory_config(num_epochs=2), wd_resumed, progress=False)
        _, resumed, _ = _restore(cfg, wd_resumed)
        self.assertEqual(int(resumed.step), steps)
        for a, b in zip(jax.tree.leaves((state.params, state.memory)),
                        jax.tree.leaves((resumed.params, resumed.memory))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


if __name__ == "__main__":
    absltest.main()
