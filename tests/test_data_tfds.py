"""Tests of hnm.data.tfds_source, offline: tfds' own mock data where data "exists", an empty
data_dir where it does not (fails at once, one line, no network, no TensorFlow)."""
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from unittest import mock

import numpy as np
import pytest
from absl.testing import absltest, parameterized

from hnm import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TfdsTest(parameterized.TestCase):
    """tfds sources under ``tfds.testing.mock_data`` (imports TensorFlow: keep it small).

    The mock returns the same random examples for every split and random labels, so this
    checks plumbing (keys, decoding, shapes, access modes); the class re-split is tested on
    labels in ``SplitTest``.
    """

    @parameterized.named_parameters(
        ("cub_data_source", "caltech_birds2011", "auto", 200),
        ("cars_cache", "cars196", "cache", 196),
        ("sop", "stanford_online_products", "auto", None))
    def test_mock(self, name, access, num_classes):
        import tensorflow_datasets as tfds
        cfg = {"source": "tfds", "name": name, "image_size": 24, "classes_per_batch": 2,
               "samples_per_class": 2, "tfds_access": access, "pad_classes": True,
               "num_workers": 2}
        with tfds.testing.mock_data(num_examples=12):
            ds = data.build(cfg, seed=0, num_devices=2)
            batch, state = ds.train_batch(ds.init_sampler_state())
            test = ds.eval_sets()["test"]
            ev = next(test.batches(16))
        self.assertEqual(ds.image_shape, (24, 24, 3))
        self.assertEqual(batch["images"].shape, (4, 24, 24, 3))
        self.assertEqual(batch["images"].dtype, np.uint8)
        self.assertEqual(tuple(map(int, state)), (0, 1) if ds.steps_per_epoch > 1 else (1, 0))
        self.assertEqual(ev["images"].shape, (16, 24, 24, 3))
        self.assertEqual(int(ev["mask"].sum()), test.num_examples)
        train_classes = set(ds.train_labels.tolist())
        if num_classes is not None:
            # Mock: both splits are the same 12 examples; the re-split keeps each copy once
            # and puts every class on one side only.
            self.assertEqual(ds.num_train_examples + test.num_examples, 24)
            self.assertFalse(train_classes & set(test.labels.tolist()))
        else:
            self.assertEqual((ds.num_train_examples, test.num_examples), (12, 12))
        self.assertTrue(set(batch["labels"].tolist()) <= train_classes)


    def test_download_only_when_asked(self):
        import tensorflow_datasets as tfds

        from hnm.data import tfds_source
        cfg = {"source": "tfds", "name": "caltech_birds2011", "image_size": 16,
               "classes_per_batch": 2, "samples_per_class": 2, "pad_classes": True}
        for extra, download in (({}, False), ({"download": True}, True)):
            with self.subTest(download=download), tfds.testing.mock_data(num_examples=8), \
                    mock.patch.object(tfds, "load", wraps=tfds.load) as load, \
                    mock.patch.object(tfds, "data_source", wraps=tfds.data_source) as source, \
                    mock.patch.object(tfds_source, "check_prepared",
                                      wraps=tfds_source.check_prepared) as check:
                data.build({**cfg, **extra}, seed=0, num_devices=1)
                calls = load.call_args_list + source.call_args_list
                self.assertNotEmpty(calls)
                self.assertEqual({c.kwargs["download"] for c in calls}, {download})
                self.assertEqual(check.called, not download)


class OfflineTest(absltest.TestCase):
    """A tfds set that is not prepared: one line naming it, where tfds looked and how to
    prepare it, within seconds, without the network (and without importing TensorFlow)."""

    def test_not_prepared_fails_fast_in_one_line_without_tensorflow(self):
        with tempfile.TemporaryDirectory() as empty:
            code = textwrap.dedent(f"""
                import socket, sys, time
                def no_network(*args, **kwargs):
                    raise AssertionError("network touched: %r" % (args,))
                socket.socket.connect = socket.create_connection = no_network
                socket.getaddrinfo = no_network
                from hnm import data
                # The local sources never import TensorFlow either (one process for both).
                ds = data.build({{"source": "digits", "classes_per_batch": 4}}, seed=0,
                                num_devices=1)
                ds.train_batch(ds.init_sampler_state())
                start = time.perf_counter()
                try:
                    data.build({{"source": "tfds", "name": "caltech_birds2011",
                                "data_dir": {empty!r}}}, seed=0, num_devices=1)
                except data.DataNotFoundError as e:
                    print(time.perf_counter() - start)
                    print("tensorflow" in sys.modules)
                    print(e)
                """)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 cwd=ROOT, timeout=60)
            self.assertEqual(out.returncode, 0, out.stderr[-3000:])
            self.assertEqual(out.stderr.strip(), "")  # no tfds warnings around the one line
            seconds, tf_imported, *message = out.stdout.splitlines()
            self.assertLess(float(seconds), 10.0)
            self.assertEqual(tf_imported, "False")
            self.assertLen(message, 1)
            msg = message[0]
            for part in ("'caltech_birds2011'", f"not prepared in {empty}/caltech_birds2011",
                         f"`tfds build caltech_birds2011 --data_dir={empty}`",
                         "--config.data.download=True", "--config.data.data_dir="):
                self.assertIn(part, msg)
            self.assertEqual(os.listdir(empty), [])  # nothing written where it looked

    def test_smoke_variant_never_downloads(self):
        sys.path.insert(0, os.path.join(ROOT, "experiments"))
        try:
            import cub_sct
        finally:
            sys.path.pop(0)
        cfg = cub_sct.get_config("smoke")
        self.assertFalse(cfg.data.download)
        with tempfile.TemporaryDirectory() as empty:
            cfg.data.data_dir = empty
            start = time.perf_counter()
            with self.assertRaisesRegex(data.DataNotFoundError, "caltech_birds2011"):
                data.build(cfg.data, seed=0, num_devices=1)
            self.assertLess(time.perf_counter() - start, 10.0)

    def test_unknown_builder_is_one_line(self):
        with self.assertRaises(ValueError) as cm:
            data.build({"source": "tfds", "name": "no_such_set_xyz", "label_key": "label"},
                       seed=0, num_devices=1)
        self.assertIn("data.name='no_such_set_xyz'", str(cm.exception))
        self.assertNotIn("\n", str(cm.exception))

    def test_failed_download_is_one_line(self):
        import tensorflow_datasets as tfds
        failure = ConnectionError("Failed to connect to storage.googleapis.com\nretry 1 of 10")
        with tempfile.TemporaryDirectory() as empty, mock.patch.object(
                tfds.core.DatasetBuilder, "download_and_prepare", side_effect=failure) as dl:
            with self.assertRaises(data.DataNotFoundError) as cm:
                data.build({"source": "tfds", "name": "cars196", "download": True,
                            "data_dir": empty}, seed=0, num_devices=1)
        dl.assert_called_once_with()  # TFRecord files unless random access is asked for
        msg = str(cm.exception)
        self.assertNotIn("\n", msg)
        for part in ("downloading tfds data set 'cars196'", empty,
                     "ConnectionError: Failed to connect to storage.googleapis.com",
                     "`tfds build cars196"):
            self.assertIn(part, msg)

    @pytest.mark.slow  # a CLI subprocess: imports JAX and the trainer (about 10 s)
    def test_cli_prints_one_error_line(self):
        with tempfile.TemporaryDirectory() as tmp:
            empty, workdir = os.path.join(tmp, "tfds"), os.path.join(tmp, "run")
            os.makedirs(empty)
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "hnm.cli", "train",
                 "--config=experiments/cub_sct.py:smoke", f"--workdir={workdir}",
                 f"--config.data.data_dir={empty}"],
                capture_output=True, text=True, cwd=ROOT, timeout=120)
            elapsed = time.perf_counter() - start
        self.assertNotEqual(out.returncode, 0)
        self.assertNotIn("Traceback", out.stderr)
        lines = [line for line in out.stderr.strip().splitlines()
                 if not line.startswith("hnm train:")]  # the banner naming the devices
        self.assertLen(lines, 1, out.stderr)
        last = lines[0]
        self.assertTrue(last.startswith("hnm: error: tfds data set 'caltech_birds2011' is not "
                                        f"prepared in {empty}"), last)
        self.assertLess(elapsed, 60.0)


if __name__ == "__main__":
    absltest.main()
