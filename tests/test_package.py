"""Import hygiene: the pure core pays for JAX only; the console entry point exists."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def test_every_objective_is_registered_and_buildable():
    import hnm
    assert hnm.objectives.names() == sorted(
        ["batch_all", "batch_hard", "contrastive", "distance_weighted", "ephn", "epshn",
         "multi_similarity", "sct", "semihard", "supcon",
         "circle", "lifted_structure", "generalized_lifted_structure", "n_pairs", "ntxent",
         "tuplet_margin", "fast_ap", "smooth_ap", "histogram",
         "proxy_nca", "proxy_anchor", "norm_softmax", "arcface", "cosface",
         "sub_center_arcface", "soft_triple", "margin"])
    for name in hnm.objectives.names():
        obj = hnm.objectives.get(name)
        if hnm.objectives.is_parametric(name):
            assert callable(obj.init) and callable(obj.apply)
        else:
            assert callable(obj)


def test_console_script_prints_usage():
    out = subprocess.run([sys.executable, "-m", "hnm.cli"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode != 0
    assert "usage: hnm {train,eval}" in out.stderr + out.stdout
