"""Import hygiene: the pure core pays for JAX only; the console entry point exists."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ALL_OBJECTIVES = (
    "batch_all", "batch_hard", "contrastive", "distance_weighted", "ephn", "epshn",
    "multi_similarity", "sct", "semihard", "supcon",
    "circle", "lifted_structure", "generalized_lifted_structure", "n_pairs", "ntxent",
    "tuplet_margin", "fast_ap", "smooth_ap", "histogram",
    "proxy_nca", "proxy_anchor", "norm_softmax", "arcface", "cosface",
    "sub_center_arcface", "soft_triple", "margin")

HEAVY = ("tensorflow", "tensorflow_datasets", "orbax", "matplotlib", "flax", "optax", "torch")


def test_core_imports_without_tensorflow_tfds_orbax_or_matplotlib():
    code = ("import sys, hnm, hnm.analysis, hnm.metrics, hnm.objectives;"
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    loaded = eval(out)  # a list of module names
    assert "jax" in loaded
    for heavy in HEAVY:
        assert heavy not in loaded, f"`import hnm` pulled in {heavy}"


def test_every_objective_is_registered():
    import hnm
    assert hnm.objectives.names() == sorted(ALL_OBJECTIVES)


@pytest.mark.slow  # one compile per objective (27)
def test_every_objective_gives_a_finite_loss_with_a_gradient():
    import jax
    import jax.numpy as jnp

    import hnm
    emb = jax.random.normal(jax.random.key(0), (16, 8))
    labels = jnp.repeat(jnp.arange(8), 2)
    for name in hnm.objectives.names():
        obj = hnm.objectives.get(name)
        if hnm.objectives.is_parametric(name):
            params = obj.init(jax.random.key(2), 8, 8)
            fn = lambda e, l, k, obj=obj, params=params: obj.apply(params, e, l, k)  # noqa: E731
        else:
            fn = obj
        # One compiled program per objective (eager dispatch costs minutes for 27 of them).
        (loss, aux), grad = jax.jit(jax.value_and_grad(
            lambda e, fn=fn: fn(e, labels, jax.random.key(1)), has_aux=True))(emb)
        assert loss.shape == () and bool(jnp.isfinite(loss)), name
        assert int(aux["num_valid"]) > 0, name
        assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0, name


def test_console_script_prints_usage_and_fails_without_a_command():
    out = subprocess.run([sys.executable, "-m", "hnm.cli"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 2
    assert "usage: hnm {train,eval,config" in out.stderr
    setup = open(os.path.join(ROOT, "setup.cfg")).read()
    assert "hnm = hnm.cli:main" in setup


def test_cli_help_does_not_import_jax():
    # `hnm --help` answers at once: no JAX, TensorFlow or orbax behind it.
    code = ("import sys; from hnm import cli; cli.run(['--help']); "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    loaded = eval(out.splitlines()[-1])
    for heavy in HEAVY:
        assert heavy not in loaded, heavy


def test_slow_marks_sit_below_absl_parameterized_decorators():
    """`@pytest.mark.slow` written *above* `@parameterized...` on a method is silently lost
    (absl builds new methods from the inner function), so the test runs in the default suite.
    Below it (or on the class) the mark is copied to every generated method."""
    import glob
    import re

    here = os.path.dirname(os.path.abspath(__file__))
    bad = []
    for path in glob.glob(os.path.join(here, "test_*.py")):
        text = open(path).read()
        for m in re.finditer(r"\n([ \t]+)@pytest\.mark\.\w+[^\n]*\n(?:\1@[^\n]*\n)*?\1@parameterized",
                             text):
            bad.append(f"{os.path.basename(path)}:{text[:m.start()].count(chr(10)) + 2}")
    assert not bad, f"move the mark below @parameterized: {bad}"
