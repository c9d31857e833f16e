"""hnm.export: the jax.export embedder (symbolic batch) and the SavedModel equal run.embed."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from absl.testing import absltest

from hnm import export, inference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_inference import _test_set, make_run  # noqa: E402


class ExportTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tempfile.mkdtemp(prefix="hnm_export_")
        cls.config = make_run(os.path.join(cls.dir, "run"))
        cls.restored = inference.load(os.path.join(cls.dir, "run"))
        cls.images = _test_set(cls.config)[0][:13]

    def test_jax_export_equals_run_embed_for_any_batch(self):
        out = os.path.join(self.dir, "jax")
        export.export_command([f"--workdir={self.dir}/run", f"--output={out}"])
        with open(os.path.join(out, export.CONTRACT_FILE)) as f:
            contract = json.load(f)
        self.assertEqual(contract["input_shape"], [None, 8, 8, 1])
        self.assertEqual((contract["input_dtype"], contract["channels"]), ("uint8", 1))
        self.assertEqual(contract["output_shape"], [None, 32])
        self.assertEqual(contract["normalisation_inside"]["pixel_mean"], [0.5])
        self.assertIsNone(contract["preprocessing"])  # digits: native 8 x 8, no resize
        self.assertEqual(contract["step"], 7)
        embed = export.load_exported(out)
        want = self.restored.embed(self.images)
        for n in (1, 5, 13):  # one serialised function, any batch size
            got = np.asarray(embed(self.images[:n]))
            self.assertEqual(got.dtype, np.float32)
            np.testing.assert_allclose(got, want[:n], rtol=0, atol=1e-6)

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "config.json"):
            export.export_command([f"--workdir={self.dir}", f"--output={self.dir}/x"])
        with self.assertRaisesRegex(ValueError, "invalid choice"):
            export.export_command([f"--workdir={self.dir}/run", f"--output={self.dir}/x",
                                   "--format=onnx"])
        with self.assertRaisesRegex(ValueError, "not found"):
            export.load_exported(self.dir)

    @pytest.mark.slow
    def test_two_line_loader_needs_only_jax(self):
        out = os.path.join(self.dir, "jax2")
        export.export_jax(self.restored, out)
        np.save(os.path.join(self.dir, "x.npy"), self.images)
        code = (
            "import sys, numpy as np\n"
            "from jax import export\n"
            f"embed = export.deserialize(open({out!r} + '/embedder.jax', 'rb').read()).call\n"
            f"np.save({self.dir!r} + '/y.npy', np.asarray(embed(np.load({self.dir!r} + "
            "'/x.npy'))))\n"
            "assert not any(m.split('.')[0] in ('hnm', 'flax', 'orbax', 'tensorflow') "
            "for m in sys.modules), 'imported more than jax'\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=300, cwd=tempfile.gettempdir(),
                           env=dict(os.environ, PYTHONPATH=""))
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        np.testing.assert_allclose(np.load(os.path.join(self.dir, "y.npy")),
                                   self.restored.embed(self.images), rtol=0, atol=1e-6)

    @pytest.mark.slow
    def test_saved_model_equals_run_embed(self):
        try:
            import tensorflow as tf
        except ImportError:
            self.skipTest("TensorFlow is not installed")
        out = os.path.join(self.dir, "saved_model")
        export.export_command([f"--workdir={self.dir}/run", f"--output={out}",
                               "--format=saved_model"])
        loaded = tf.saved_model.load(out)
        serve = loaded.signatures["serving_default"]
        want = self.restored.embed(self.images)
        for n in (1, 13):
            got = serve(images=tf.constant(self.images[:n]))["embeddings"].numpy()
            np.testing.assert_allclose(got, want[:n], rtol=0, atol=1e-6)
        with open(os.path.join(out, export.CONTRACT_FILE)) as f:
            self.assertEqual(json.load(f)["format"], "saved_model")


if __name__ == "__main__":
    absltest.main()
