"""Streaming / blocked mining (hnm.streaming) against the dense path, loss and gradient.

The dense references are the miners of :mod:`hnm.miners` and the dense hinge sums of
:mod:`hnm.losses` on the full similarity matrix (the objectives' previous implementation),
in float64 so that "equal" means to 1e-6 and not to float32 rounding. Blocks of 5 and 16
rows over a batch of 37 against itself and against a memory with empty slots cover full
blocks, a remainder block, a memory segment and several positive chunks (``slots=1``);
anchor blocks of 8 cover the anchor-blocked single-tile path with a padded last block.

Plain pytest functions (``pytest.mark.slow`` does not reach absl-parameterized methods):
the default run keeps one small case of each equality (a few seconds); ``-m slow`` runs
the whole product.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hnm import distances, losses, memory as memory_lib, miners, objectives, streaming

B, D, M = 37, 6, 20
SIM = {"cosine": lambda a, b: a @ b.T, "euclidean": distances.negative_euclidean,
       "squared_euclidean": distances.negative_squared_euclidean}
RULES = {"hardest": miners.mine_hardest,
         "easy_hard": miners.mine_easy_positive_hard_negative,
         "easy_semihard": miners.mine_easy_positive_semihard_negative}


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


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


# ---------------------------------------------------------------------------------------------
# Per-anchor rules.


def _check_per_anchor(with_memory, block, distance, rules=tuple(RULES)):
    emb, labels, mem = _problem(1, with_memory)
    e = distances.l2_normalize(emb)
    dense_ref = distances.reference_set(e, labels, None, mem, normalize_memory=True)
    mining = (e @ dense_ref.embeddings.T if distance == "cosine"
              else distances.negative_squared_euclidean(e, dense_ref.embeddings))
    for rule in rules:
        t = jax.jit(RULES[rule])(mining, labels, dense_ref.labels)
        got = jax.jit(lambda e_, rule=rule: streaming.mine_per_anchor(
            e_, labels, streaming.Reference(e_, labels, 0, mem, normalize_memory=True), rule,
            distance=distance, block_size=block, anchor_block=8))(e)
        v = np.asarray(t.valid)
        assert v.sum() > 10
        np.testing.assert_array_equal(got.valid, v, err_msg=rule)
        np.testing.assert_array_equal(np.asarray(got.positive)[v], np.asarray(t.positive)[v],
                                      err_msg=rule)
        np.testing.assert_array_equal(np.asarray(got.negative)[v], np.asarray(t.negative)[v],
                                      err_msg=rule)


def test_per_anchor_rules_equal_dense_miners_fast():
    _check_per_anchor(True, 5, "cosine", ("easy_semihard",))


@pytest.mark.slow
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("block", [None, 5])
@pytest.mark.parametrize("with_memory", [False, True])
def test_per_anchor_rules_equal_dense_miners(with_memory, block, distance):
    _check_per_anchor(with_memory, block, distance)


def test_ties_go_to_the_first_column_across_blocks():
    # Rows 1 and 4 are the same vector (in different blocks of 3): equal similarities.
    emb = jnp.asarray([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8],
                       [0.8, 0.6]])
    labels = jnp.asarray([0, 1, 0, 2, 1, 0], jnp.int32)
    t = miners.mine_easy_positive_hard_negative(emb @ emb.T, labels)
    for block in (2, None):  # streamed in blocks of 2, and one tile (gathered positives)
        got = jax.jit(lambda e, block=block: streaming.mine_per_anchor(
            e, labels, streaming.Reference(e, labels, 0), "easy_hard", block_size=block))(emb)
        assert got.negative.tolist() == t.negative.tolist()
        assert got.negative[0].item() == 1  # 1 and 4 tie: the first
        assert got.positive.tolist() == t.positive.tolist()


# ---------------------------------------------------------------------------------------------
# Hinge sums (semihard, batch_all).

# (reference rows per tile, positive slots, anchors per block of the single-tile path)
HINGE_BLOCKS = ((None, None, None), (None, 1, 8), (5, 1, 8), (16, 3, None))


def _check_hinge_sums(name, with_memory, distance, blocks=HINGE_BLOCKS):
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

    (want, want_aux), want_g = jax.jit(jax.value_and_grad(dense, has_aux=True))(emb)
    assert float(want) > 0.0
    for block, slots, anchor_block in blocks:
        def stream(x):
            x = distances.l2_normalize(x)
            r = streaming.Reference(x, labels, 0, mem, normalize_memory=True)
            out = stream_fn(x, labels, r, margin=0.2, distance=distance, block_size=block,
                            slots=slots, anchor_block=anchor_block)
            return out.loss_sum, (out.num_active, out.num_hard)
        msg = f"block={block} slots={slots} anchor_block={anchor_block}"
        (got, got_aux), got_g = jax.jit(jax.value_and_grad(stream, has_aux=True))(emb)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=msg)
        np.testing.assert_allclose(got_g, want_g, rtol=1e-6, atol=1e-9, err_msg=msg)
        assert [int(a) for a in got_aux] == [int(a) for a in want_aux], msg


def test_hinge_sums_equal_dense_loss_and_gradient_fast(monkeypatch):
    # Anchor blocks of 8 (padded last block), the gradient through the coefficient tile
    # (semihard's large-D path); the slow product below covers the rest.
    monkeypatch.setattr(streaming, "DENSE_GRAD_DIM", 1)
    _check_hinge_sums("semihard", False, "euclidean", blocks=((None, 1, 8),))


@pytest.mark.slow
@pytest.mark.parametrize("distance", ["euclidean", "cosine", "squared_euclidean"])
@pytest.mark.parametrize("with_memory", [False, True])
@pytest.mark.parametrize("name", ["semihard", "batch_all"])
def test_hinge_sums_equal_dense_loss_and_gradient(name, with_memory, distance):
    _check_hinge_sums(name, with_memory, distance)


@pytest.mark.slow
@pytest.mark.parametrize("distance", ["euclidean", "cosine", "squared_euclidean"])
def test_semihard_coefficient_tile_gradient_equals_dense(distance, monkeypatch):
    # semihard's gradient through the coefficient tile (its path from DENSE_GRAD_DIM on),
    # on the single-tile paths (one block of anchors, blocks of 8).
    monkeypatch.setattr(streaming, "DENSE_GRAD_DIM", 1)
    _check_hinge_sums("semihard", False, distance, blocks=HINGE_BLOCKS[:2])


# ---------------------------------------------------------------------------------------------
# The objectives' block_size option.


def _check_block_size(name):
    emb, labels, mem = _problem(3, True)

    def run(block):
        fn = objectives.get(name, block_size=block)
        (loss, aux), grad = jax.jit(jax.value_and_grad(
            lambda x: fn(x, labels, memory=mem), has_aux=True))(emb)
        return (loss, grad), aux
    (l0, g0), aux0 = run(0)
    (l1, g1), aux1 = run(4)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    np.testing.assert_allclose(g1, g0, rtol=1e-6, atol=1e-9)
    for k in aux0:
        np.testing.assert_allclose(aux1[k], aux0[k], rtol=1e-6, err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ephn", "epshn", "sct", "batch_hard", "semihard",
                                  "batch_all"])
def test_objective_block_size_does_not_change_loss_aux_or_gradient(name):
    _check_block_size(name)


def test_block_size_is_checked():
    with pytest.raises(ValueError, match="block_size"):
        objectives.get("ephn", block_size=-1)
    with pytest.raises(ValueError, match="block_size"):
        streaming.auto_block(4, 8, 0)


def test_auto_block_streams_only_large_reference_sets():
    assert streaming.auto_block(1024, 1024) == 1024
    assert streaming.auto_block(1024, 262144) == 1024
    assert streaming.auto_block(256, 4096) == 4096
    assert streaming.auto_block(4, 100, 7) == 7
