"""Streaming / blocked mining (hnm.streaming) against the dense path, loss and gradient.

The dense references are the miners of :mod:`hnm.miners` and the dense hinge sums of
:mod:`hnm.losses` on the full similarity matrix (the objectives' previous implementation),
in float64 so that "equal" means to 1e-6 and not to float32 rounding. Blocks of 5 and 16
rows over a batch of 37 against itself and against a memory with empty slots cover full
blocks, a remainder block, a memory segment and several positive chunks (``slots=1``).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized

from hnm import distances, losses, memory as memory_lib, miners, objectives, streaming

B, D, M = 37, 6, 20
SIM = {"cosine": lambda a, b: a @ b.T, "euclidean": distances.negative_euclidean,
       "squared_euclidean": distances.negative_squared_euclidean}


def _problem(seed=0, with_memory=False):
    rng = np.random.default_rng(seed)
    emb = jnp.asarray(rng.normal(size=(B, D)))
    labels = jnp.asarray(rng.integers(0, 6, B), jnp.int32)
    mem = None
    if with_memory:
        mem_labels = np.where(rng.random(M) < 0.2, distances.MASKED_LABEL, rng.integers(0, 6, M))
        mem = memory_lib.Memory(jnp.asarray(rng.normal(size=(M, D))),
                                jnp.asarray(mem_labels, jnp.int32), jnp.zeros((), jnp.int32))
    return emb, labels, mem


class StreamingTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.x64 = jax.enable_x64(True)
        self.x64.__enter__()

    def tearDown(self):
        self.x64.__exit__(None, None, None)
        super().tearDown()

    @parameterized.product(with_memory=(False, True), block=(None, 5))
    def test_per_anchor_rules_equal_dense_miners(self, with_memory, block):
        emb, labels, mem = _problem(1, with_memory)
        e = distances.l2_normalize(emb)
        dense_ref = distances.reference_set(e, labels, None, mem, normalize_memory=True)
        ref = streaming.Reference(e, labels, 0, mem, normalize_memory=True)
        rules = {"hardest": miners.mine_hardest,
                 "easy_hard": miners.mine_easy_positive_hard_negative,
                 "easy_semihard": miners.mine_easy_positive_semihard_negative}
        for distance, mining in (("cosine", e @ dense_ref.embeddings.T),
                                 ("euclidean", distances.negative_squared_euclidean(
                                     e, dense_ref.embeddings))):
            for rule, miner in rules.items():
                with self.subTest(distance=distance, rule=rule):
                    t = miner(mining, labels, dense_ref.labels)
                    got = streaming.mine_per_anchor(e, labels, ref, rule, distance=distance,
                                                    block_size=block, anchor_block=8)
                    v = np.asarray(t.valid)
                    self.assertGreater(v.sum(), 10)
                    np.testing.assert_array_equal(got.valid, v)
                    np.testing.assert_array_equal(np.asarray(got.positive)[v],
                                                  np.asarray(t.positive)[v])
                    np.testing.assert_array_equal(np.asarray(got.negative)[v],
                                                  np.asarray(t.negative)[v])

    def test_ties_go_to_the_first_column_across_blocks(self):
        # Rows 1 and 4 are the same vector (in different blocks of 3): equal similarities.
        emb = jnp.asarray([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8],
                           [0.8, 0.6]])
        labels = jnp.asarray([0, 1, 0, 2, 1, 0], jnp.int32)
        ref = streaming.Reference(emb, labels, 0)
        for block in (None, 3, 2):
            got = streaming.mine_per_anchor(emb, labels, ref, "easy_hard", block_size=block)
            t = miners.mine_easy_positive_hard_negative(emb @ emb.T, labels)
            self.assertEqual(got.negative.tolist(), t.negative.tolist())
            self.assertEqual(got.negative[0].item(), 1)  # 1 and 4 tie: the first

    @parameterized.product(name=("semihard", "batch_all"), with_memory=(False, True))
    def test_hinge_sums_equal_dense_loss_and_gradient(self, name, with_memory):
        self._check_hinge_sums(name, with_memory, "euclidean")

    @pytest.mark.slow
    @parameterized.product(name=("semihard", "batch_all"), with_memory=(False, True),
                           distance=("cosine", "squared_euclidean"))
    def test_hinge_sums_equal_dense_other_distances(self, name, with_memory, distance):
        self._check_hinge_sums(name, with_memory, distance)

    def _check_hinge_sums(self, name, with_memory, distance):
        emb, labels, mem = _problem(2, with_memory)
        dense_fn = (losses.semihard_margin_sums if name == "semihard"
                    else losses.all_triplets_margin_sums)
        stream_fn = (streaming.semihard_sums if name == "semihard"
                     else streaming.batch_all_sums)

        def dense(x):
            x = distances.l2_normalize(x)
            r = distances.reference_set(x, labels, None, mem, normalize_memory=True)
            out = dense_fn(SIM[distance](x, r.embeddings), labels, r.labels, margin=0.2)
            return jnp.sum(out.loss_sum), (jnp.sum(out.num_active), jnp.sum(out.num_hard))

        for block, slots in ((None, None), (5, 1), (16, 3)):
            def stream(x):
                x = distances.l2_normalize(x)
                r = streaming.Reference(x, labels, 0, mem, normalize_memory=True)
                out = stream_fn(x, labels, r, margin=0.2, distance=distance,
                                block_size=block, slots=slots)
                return out.loss_sum, (out.num_active, out.num_hard)
            with self.subTest(block=block, slots=slots):
                (want, want_aux), want_g = jax.value_and_grad(dense, has_aux=True)(emb)
                (got, got_aux), got_g = jax.jit(jax.value_and_grad(stream, has_aux=True))(emb)
                self.assertGreater(float(want), 0.0)
                np.testing.assert_allclose(got, want, rtol=1e-6)
                np.testing.assert_allclose(got_g, want_g, rtol=1e-6, atol=1e-9)
                self.assertEqual([int(a) for a in got_aux], [int(a) for a in want_aux])

    @parameterized.parameters("epshn", "batch_all")
    def test_objective_block_size_does_not_change_loss_aux_or_gradient(self, name):
        self._check_block_size(name)

    @pytest.mark.slow
    @parameterized.parameters("ephn", "sct", "batch_hard", "semihard")
    def test_objective_block_size_other_objectives(self, name):
        self._check_block_size(name)

    def _check_block_size(self, name):
        emb, labels, mem = _problem(3, True)

        def run(block):
            fn = objectives.get(name, block_size=block)
            return jax.value_and_grad(lambda x: fn(x, labels, memory=mem)[0])(emb), \
                fn(emb, labels, memory=mem)[1]
        (l0, g0), aux0 = run(0)
        (l1, g1), aux1 = run(4)
        np.testing.assert_allclose(l1, l0, rtol=1e-6)
        np.testing.assert_allclose(g1, g0, rtol=1e-6, atol=1e-9)
        for k in aux0:
            np.testing.assert_allclose(aux1[k], aux0[k], rtol=1e-6, err_msg=k)

    def test_block_size_is_checked(self):
        with self.assertRaisesRegex(ValueError, "block_size"):
            objectives.get("ephn", block_size=-1)
        with self.assertRaisesRegex(ValueError, "block_size"):
            streaming.auto_block(4, 8, 0)

    def test_auto_block_streams_only_large_reference_sets(self):
        self.assertEqual(streaming.auto_block(1024, 1024), 1024)
        self.assertEqual(streaming.auto_block(1024, 262144), 1024)
        self.assertEqual(streaming.auto_block(256, 4096), 4096)
        self.assertEqual(streaming.auto_block(4, 100, 7), 7)


if __name__ == "__main__":
    absltest.main()
