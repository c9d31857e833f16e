"""Non-finite input poisons the parametric (proxy) objectives' loss, as every other objective's.

A NaN or inf embedding row makes ``loss`` and ``aux["loss"]`` NaN even where that row is
masked out of the sum (a label outside ``[0, C)``), and with ``axis_name`` on every device,
not only on the one holding the row; a non-finite proxy does too. Finite input stays finite.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hnm import objectives
from hnm.objectives import proxy

B, D, C = 8, 4, 4
LABELS = np.array([0, 1, 2, 3, 0, 1, 2, -1])   # row 7: out of range, counts for nothing
# Default suite: the two cheapest compiles; the others (1-7 s each on 2 busy cores) are slow.
FAST = ("norm_softmax", "proxy_anchor")
NAMES = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
         for n in sorted(proxy.PARAMETRIC)]
NUM_DEVICES = 8


@functools.lru_cache(maxsize=None)
def _jitted(name):
    """One compile per objective, shared by the tests (same shapes)."""
    return jax.jit(objectives.get(name).apply)


def _case(name, bad=None, row=7):
    obj = objectives.get(name)
    rng = np.random.default_rng(0)
    # The layout of ``init`` without running it eagerly (its ops would compile one by one).
    rows = C * {"sub_center_arcface": 3, "soft_triple": 10}.get(name, 1)
    params = ({"beta": jnp.full((C,), 1.2, jnp.float32)} if name == "margin" else
              {"proxies": jnp.asarray(rng.normal(size=(rows, D)), jnp.float32)})
    emb = rng.normal(size=(B, D)).astype(np.float32)
    if bad is not None:
        emb[row, 1] = bad
    return obj, params, jnp.asarray(emb)


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_masked_row_gives_nan_loss(name):
    obj, params, emb = _case(name)
    apply = _jitted(name)   # one compile for the three calls
    loss, aux = apply(params, emb, jnp.asarray(LABELS))
    assert np.isfinite(float(loss)) and np.isfinite(float(aux["loss"]))
    for bad in (np.nan, np.inf):
        _, _, bad_emb = _case(name, bad)
        loss, aux = apply(params, bad_emb, jnp.asarray(LABELS))
        assert np.isnan(float(loss)) and np.isnan(float(aux["loss"])), (name, bad)


@pytest.mark.parametrize("name", ("norm_softmax",
                                  pytest.param("proxy_anchor", marks=pytest.mark.slow)))
def test_non_finite_proxy_gives_nan_loss(name):
    obj, params, emb = _case(name)
    key = "proxies"
    bad = np.array(params[key])
    bad[C - 1, 0] = np.inf
    loss, aux = _jitted(name)({key: jnp.asarray(bad)}, emb, jnp.asarray(LABELS))
    assert np.isnan(float(loss)) and np.isnan(float(aux["loss"]))


@pytest.mark.slow   # one pmap compile per objective
@pytest.mark.parametrize("name", ("norm_softmax", "proxy_anchor", "margin"))
def test_non_finite_row_on_one_device_poisons_every_device(name):
    assert jax.device_count() >= NUM_DEVICES
    obj, params, emb = _case(name, np.nan, row=5)     # device 5's row, a valid label
    pobj = objectives.get(name, axis_name="d")
    labels = jnp.asarray(LABELS).reshape(NUM_DEVICES, 1)
    loss, aux = jax.pmap(lambda e, y: pobj.apply(params, e, y), axis_name="d")(
        emb.reshape(NUM_DEVICES, 1, D), labels)
    assert np.all(np.isnan(np.asarray(loss))), np.asarray(loss)
    assert np.all(np.isnan(np.asarray(aux["loss"])))
    _, _, good = _case(name)
    loss, _ = jax.pmap(lambda e, y: pobj.apply(params, e, y), axis_name="d")(
        good.reshape(NUM_DEVICES, 1, D), labels)
    assert np.all(np.isfinite(np.asarray(loss)))
