"""Test setup: 8 fake CPU devices, before anything imports jax."""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (_FLAG + " " + os.environ.get("XLA_FLAGS", "")).strip()
# Keep TensorFlow (imported by the data/tfds tests only) off any GPU and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# absltest helpers (create_tempdir, ...) read absl flags; pytest never parses them.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
