"""Tests of hnm.data.config: keys, defaults, ConfigDict sentinels, one-line errors that name
the key (with a "did you mean" for a misspelt one)."""
import ml_collections
from absl.testing import absltest, parameterized

from hnm import data


class ConfigTest(parameterized.TestCase):

    def test_config_dict_sentinels_mean_unset(self):
        cfg = ml_collections.ConfigDict(dict(
            source="digits", name="", path="", classes_per_batch=5, samples_per_class=16,
            image_size=0, train_resize=0, augment=False, pad_classes=True, data_dir=""))
        ds = data.build(cfg, seed=0, num_devices=1)
        self.assertEqual(ds.image_shape, (8, 8, 1))
        batch, _ = ds.train_batch(ds.init_sampler_state())
        self.assertEqual(batch["images"].shape, (80, 8, 8, 1))

    @parameterized.named_parameters(
        ("unknown_source", {"source": "mnist"}, 1, "source"),
        ("unknown_key", {"source": "digits", "clases_per_batch": 4}, 1, "clases_per_batch"),
        ("p_not_divisible", {"source": "digits", "classes_per_batch": 3}, 2,
         r"multiple of the 2 devices .*--config.data.classes_per_batch=2 or 4\.$"),
        ("k_is_one", {"source": "digits", "samples_per_class": 1}, 1, "samples_per_class"),
        ("k_too_large", {"source": "digits", "samples_per_class": 500}, 1,
         r"data.samples_per_class=500 .*--config.data.samples_per_class=18\d or less"),
        ("too_few_classes", {"source": "digits", "classes_per_batch": 6}, 1,
         r"only 5 training classes .*--config.data.classes_per_batch=5"),
        ("too_few_classes_2_devices", {"source": "digits", "classes_per_batch": 6}, 2,
         r"on 2 devices is 4: set --config.data.classes_per_batch=4"),
        ("npz_no_path", {"source": "npz"}, 1, "path"),
        ("resize_smaller", {"source": "folder", "path": "/x", "image_size": 64,
                            "train_resize": 32}, 1, "train_resize"),
        ("tfds_access", {"source": "tfds", "name": "cars196", "tfds_access": "x"}, 1,
         "tfds_access"))
    def test_errors(self, cfg, num_devices, match):
        with self.assertRaisesRegex(ValueError, match):
            data.build(cfg, seed=0, num_devices=num_devices)

    def test_misspelt_key_suggests_and_lists_the_keys(self):
        with self.assertRaises(ValueError) as cm:
            data.resolve_config({"source": "digits", "clases_per_batch": 4, "zzz": 1})
        msg = str(cm.exception)
        self.assertNotIn("\n", msg)
        self.assertIn("data.clases_per_batch (did you mean data.classes_per_batch?)", msg)
        self.assertIn("data.zzz", msg)
        self.assertNotIn("data.zzz (did you mean", msg)  # nothing close: no guess
        self.assertIn("valid keys: " + ", ".join(sorted(data.KEYS)), msg)

    @parameterized.parameters(
        {"source": "glyphs"}, {"source": "inshop", "path": "/x"},
        {"source": "tfds", "name": "stanford_online_products"},
        {"source": "tfds", "name": "cars196", "resplit": False})
    def test_train_classes_where_it_would_be_ignored(self, **cfg):
        with self.assertRaisesRegex(ValueError, r"data.train_classes=0.3 does not apply"):
            data.build({**cfg, "train_classes": 0.3}, seed=0, num_devices=1)

    def test_misspelt_source_suggests(self):
        with self.assertRaisesRegex(ValueError, r"data.source='digit' \(did you mean 'digits'"):
            data.resolve_config({"source": "digit"})

    def test_defaults_and_every_default_is_a_key(self):
        self.assertLessEqual(set(data.DEFAULTS), set(data.KEYS))
        self.assertEqual(data.SOURCES, tuple(data.LOADERS))
        cfg = data.resolve_config({"source": "tfds", "name": "cars196"})
        self.assertIs(cfg["download"], False)  # downloads only when asked for
        self.assertEqual((cfg["image_size"], cfg["train_resize"], cfg["eval_resize"]),
                         (256, 281, 256))  # the official recipe
        self.assertTrue(cfg["augment"] and cfg["prefetch"])
        cfg = data.resolve_config({"source": "digits"})
        self.assertEqual((cfg.get("image_size"), cfg["augment"], cfg["prefetch"]),
                         (None, False, False))

    @parameterized.named_parameters(
        ("download", {"download": "yes"}, "data.download"),
        ("train_classes", {"train_classes": 1.5}, "data.train_classes"),
        ("channels", {"channels": 2}, "data.channels"),
        ("num_workers", {"num_workers": 0}, "data.num_workers"),
        ("max_examples", {"max_examples": -1}, "data.max_examples"))
    def test_bad_values_name_the_key(self, extra, key):
        with self.assertRaisesRegex(ValueError, key):
            data.resolve_config({"source": "digits", **extra})


if __name__ == "__main__":
    absltest.main()
