"""Tests of hnm.models: shapes, a NumPy reference, BatchNorm modes, bfloat16, parameter counts
(torchvision's published numbers), and Keras ResNet50 weight conversion."""
import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hnm import models

B = 2
D = 16
IMAGE_SHAPES = {"mlp": (8, 8, 1), "cnn": (32, 32, 3), "resnet18": (32, 32, 3),
                "resnet50": (32, 32, 3)}
FEATURES = {"resnet18": 512, "resnet50": 2048}

# torchvision.models.resnet{18,50}: 11,689,512 and 25,557,032 parameters including the
# 1000-way fc layer (512*1000+1000 = 513,000 and 2048*1000+1000 = 2,049,000). BN running
# statistics are buffers there and live in `batch_stats` here, so neither count has them.
TORCHVISION_RESNET18_NO_FC = 11_689_512 - 513_000
TORCHVISION_RESNET50_NO_FC = 25_557_032 - 2_049_000


def _images(shape, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(B, *shape)).astype(dtype)


def _cfg(backbone, **kw):
    return dict(backbone=backbone, embedding_dim=D, **kw)


@functools.lru_cache(maxsize=None)
def _model_and_variables(backbone, items=()):
    """One jitted init per distinct config for the whole file (compilation dominates)."""
    model = models.create(_cfg(backbone, **dict(items)))
    x = jnp.zeros((B, *IMAGE_SHAPES[backbone]), jnp.uint8)
    variables = jax.jit(lambda x: model.init({"params": jax.random.key(0)}, x))(x)
    return model, variables


def _np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


class ConfigTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("unknown_backbone", dict(backbone="vit"), "`backbone`", ValueError),
        ("unknown_key", dict(backbone="mlp", embeding_dim=3), "embeding_dim", ValueError),
        ("zero_dim", dict(backbone="mlp", embedding_dim=0), "`embedding_dim`", ValueError),
        ("float_dim", dict(backbone="mlp", embedding_dim=2.5), "`embedding_dim`", ValueError),
        ("bool_dim", dict(backbone="mlp", embedding_dim=True), "`embedding_dim`", ValueError),
        ("dtype", dict(backbone="cnn", dtype="float16"), "`dtype`", ValueError),
        ("keras_r18", dict(backbone="resnet18", keras_compatible=True), "`keras_compatible`",
         ValueError),
        ("hidden_resnet", dict(backbone="resnet50", hidden=(3,)), "`hidden`", ValueError),
        ("hidden_zero", dict(backbone="cnn", hidden=(8, 0)), "`hidden`", ValueError),
        ("hidden_scalar", dict(backbone="mlp", hidden=8), "`hidden`", ValueError),
        ("std_zero", dict(backbone="mlp", pixel_std=(0.0,)), "`pixel_std`", ValueError),
        ("normalize_str", dict(backbone="mlp", normalize="yes"), "`normalize`", ValueError),
        ("not_mapping", ["mlp"], "`model_cfg`", TypeError),
    )
    def test_bad_config_raises_naming_key(self, cfg, key, error):
        with self.assertRaisesRegex(error, key):
            models.create(cfg)

    def test_defaults_and_configdict(self):
        import ml_collections
        model = models.create(ml_collections.ConfigDict(dict(backbone="resnet50")))
        self.assertEqual(model.embedding_dim, 64)
        self.assertFalse(model.normalize)
        self.assertEqual(model.pixel_mean, models.IMAGENET_MEAN)
        self.assertEqual(model.pixel_std, models.IMAGENET_STD)
        self.assertFalse(model.backbone.keras_compatible)
        keras = models.create(dict(backbone="resnet50", keras_compatible=True))
        # caffe preprocessing, x - mean_255, written on the [0, 1] scale.
        np.testing.assert_allclose(np.array(keras.pixel_mean) * 255, [123.68, 116.779, 103.939])
        np.testing.assert_allclose(np.array(keras.pixel_std) * 255, 1.0)
        self.assertEqual(models.create(dict(backbone="cnn")).backbone.hidden, (32, 64, 128))

    def test_bad_images_raise_naming_argument(self):
        model, variables = _model_and_variables("mlp")
        with self.assertRaisesRegex(ValueError, "`images`"):
            model.apply(variables, jnp.zeros((B, 8, 8), jnp.uint8))
        with self.assertRaisesRegex(TypeError, "`images`"):
            model.apply(variables, jnp.zeros((B, 8, 8, 1), jnp.bool_))
        rgb = models.create(_cfg("mlp", pixel_mean=(0.1, 0.2, 0.3)))
        with self.assertRaisesRegex(ValueError, "`pixel_mean`"):
            rgb.init({"params": jax.random.key(0)}, jnp.zeros((B, 8, 8, 2), jnp.uint8))


class ShapeTest(parameterized.TestCase):

    @parameterized.parameters("mlp", "cnn")
    def test_output_shapes_and_dtypes(self, backbone):
        self._check_shapes(backbone)

    @pytest.mark.slow  # compiling a ResNet-18 forward pass on CPU takes ~15 s
    def test_output_shapes_and_dtypes_resnet18(self):
        self._check_shapes("resnet18")

    def _check_shapes(self, backbone):
        model, variables = _model_and_variables(backbone)
        x = _images(IMAGE_SHAPES[backbone])
        emb = model.apply(variables, x, train=False)
        emb_train, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
        for e in (emb, emb_train):
            self.assertEqual(e.shape, (B, D))
            self.assertEqual(e.dtype, jnp.float32)
            self.assertTrue(np.all(np.isfinite(e)))
        self.assertTrue(all(p.dtype == jnp.float32
                            for p in jax.tree_util.tree_leaves(variables["params"])))
        bn = backbone != "mlp"
        self.assertEqual(models.has_batch_stats(variables), bn)
        self.assertEqual(models.has_batch_stats(state), bn)
        if backbone in FEATURES:
            self.assertEqual(variables["params"]["projection"]["kernel"].shape,
                             (FEATURES[backbone], D))
        # Different images give different embeddings (the backbone is not constant).
        self.assertGreater(np.abs(emb[0] - emb[1]).max(), 1e-4)

    @parameterized.parameters("float32", "bfloat16")
    def test_resnet50_shapes_abstractly(self, dtype):
        # eval_shape traces the whole network without compiling it.
        model = models.create(_cfg("resnet50", dtype=dtype))
        x = jax.ShapeDtypeStruct((B, 32, 32, 3), jnp.uint8)
        variables = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x), x)
        emb, state = jax.eval_shape(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
        self.assertEqual((emb.shape, emb.dtype), ((B, D), jnp.float32))
        self.assertEqual(variables["params"]["projection"]["kernel"].shape, (2048, D))
        leaves = jax.tree_util.tree_leaves(variables) + jax.tree_util.tree_leaves(state)
        self.assertTrue(all(v.dtype == jnp.float32 for v in leaves))


class MLPReferenceTest(parameterized.TestCase):
    """The whole embedder against a NumPy forward pass written from the definition."""

    def _reference(self, params, x, mean, std):
        h = ((x.astype(np.float64) / 255.0 - mean) / std).reshape(len(x), -1)
        h = np.maximum(h @ params["backbone"]["dense0"]["kernel"]
                       + params["backbone"]["dense0"]["bias"], 0.0)
        return h @ params["projection"]["kernel"] + params["projection"]["bias"]

    def test_matches_numpy_and_preprocessing(self):
        items = (("hidden", (24,)), ("pixel_mean", (0.2,)), ("pixel_std", (0.3,)))
        model, variables = _model_and_variables("mlp", items)
        x = _images(IMAGE_SHAPES["mlp"])
        ref = self._reference(_np(variables["params"]), x, 0.2, 0.3)
        emb = model.apply(variables, x)
        np.testing.assert_allclose(emb, ref, rtol=1e-4, atol=1e-4)
        # A float image in the same 0..255 range is the same image.
        np.testing.assert_allclose(model.apply(variables, x.astype(np.float32)), emb,
                                   rtol=1e-6, atol=1e-6)
        unit = models.create(_cfg("mlp", normalize=True, **dict(items)))
        emb_unit = unit.apply(variables, x)
        np.testing.assert_allclose(np.linalg.norm(emb_unit, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(
            emb_unit, ref / np.linalg.norm(ref, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)
        # Guard: without normalize the rows are not unit (so the check above means something).
        self.assertGreater(np.abs(np.linalg.norm(emb, axis=1) - 1.0).max(), 1e-2)

    def test_no_batchnorm_model_takes_the_batch_stats_path(self):
        model, variables = _model_and_variables("mlp")
        x = _images(IMAGE_SHAPES["mlp"])
        emb, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
        self.assertEqual(dict(state), {})
        self.assertFalse(models.has_batch_stats(variables))
        # The trainer's uniform form: an explicit empty collection is accepted and kept.
        emb2, state2 = model.apply({"params": variables["params"], "batch_stats": {}}, x,
                                   train=True, mutable=["batch_stats"])
        self.assertFalse(models.has_batch_stats(state2))
        np.testing.assert_array_equal(emb, emb2)
        np.testing.assert_array_equal(emb, model.apply(variables, x, train=False))


class BatchNormTest(parameterized.TestCase):

    def test_train_updates_running_stats_by_momentum(self):
        model, variables = _model_and_variables("cnn")
        x = _images(IMAGE_SHAPES["cnn"], seed=1)
        (_, state) = model.apply(
            variables, x, train=True, mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda mdl, _: mdl.name == "conv0")
        conv0 = np.asarray(state["intermediates"]["backbone"]["conv0"]["__call__"][0],
                           np.float64)
        new = _np(state["batch_stats"]["backbone"])
        old = _np(variables["batch_stats"]["backbone"])
        m = 0.9   # torchvision's momentum 0.1 (the weight of the new batch statistic)
        # Flax: ra = m * ra + (1 - m) * batch statistic (biased variance over B, H, W).
        np.testing.assert_allclose(new["bn0"]["mean"],
                                   m * old["bn0"]["mean"] + (1 - m) * conv0.mean((0, 1, 2)),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(new["bn0"]["var"],
                                   m * old["bn0"]["var"] + (1 - m) * conv0.var((0, 1, 2)),
                                   rtol=1e-4, atol=1e-5)
        for layer in old:
            with self.subTest(layer):
                self.assertFalse(np.allclose(new[layer]["mean"], old[layer]["mean"]))
                self.assertFalse(np.allclose(new[layer]["var"], old[layer]["var"]))

    def test_eval_uses_running_stats_and_leaves_them(self):
        model, variables = _model_and_variables("cnn")
        x = _images(IMAGE_SHAPES["cnn"], seed=2)
        emb, state = model.apply(variables, x, train=False, mutable=["batch_stats"])
        jax.tree_util.tree_map(np.testing.assert_array_equal, _np(state["batch_stats"]),
                               _np(variables["batch_stats"]))
        # Running statistics make a sample's embedding independent of its batch mates ...
        alone = model.apply(variables, x[:1], train=False)
        np.testing.assert_allclose(alone[0], emb[0], rtol=1e-5, atol=1e-5)
        # ... batch statistics do not.
        emb_train, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        self.assertGreater(np.abs(emb_train - emb).max(), 1e-3)

    def test_freeze_bn(self):
        model, variables = _model_and_variables("cnn")
        frozen = models.create(_cfg("cnn", freeze_bn=True))
        x = _images(IMAGE_SHAPES["cnn"], seed=3)
        emb, state = frozen.apply(variables, x, train=True, mutable=["batch_stats"])
        jax.tree_util.tree_map(np.testing.assert_array_equal, _np(state["batch_stats"]),
                               _np(variables["batch_stats"]))
        np.testing.assert_allclose(emb, model.apply(variables, x, train=False), rtol=1e-6)


class DtypeTest(parameterized.TestCase):

    @parameterized.parameters(True, False)
    def test_bfloat16_compute_float32_params_and_output(self, train):
        model, variables = _model_and_variables("cnn")
        bf16 = models.create(_cfg("cnn", dtype="bfloat16"))
        x = _images(IMAGE_SHAPES["cnn"], seed=4)
        # A trained-looking state: run one train step so running stats are not 0/1.
        _, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
        variables = {"params": variables["params"], **state}
        ref, _ = model.apply(variables, x, train=train, mutable=["batch_stats"])
        emb, new_state = bf16.apply(variables, x, train=train,
                                    mutable=["batch_stats", "intermediates"],
                                    capture_intermediates=lambda m, _: m.name == "conv1")
        self.assertEqual(emb.dtype, jnp.float32)
        # Pooling happens in float32 too (a bfloat16 mean over H x W loses digits).
        self.assertEqual(bf16.apply(variables, x, method="features").dtype, jnp.float32)
        self.assertEqual(new_state["intermediates"]["backbone"]["conv1"]["__call__"][0].dtype,
                         jnp.bfloat16)
        self.assertTrue(all(v.dtype == jnp.float32
                            for v in jax.tree_util.tree_leaves(new_state["batch_stats"])))
        err = np.abs(np.asarray(emb) - np.asarray(ref)).max() / np.abs(ref).max()
        self.assertLess(err, 5e-2)
        self.assertGreater(err, 0.0)   # it really ran in bfloat16


class ParamCountTest(parameterized.TestCase):

    def _counts(self, backbone, **kw):
        model = models.create(_cfg(backbone, **kw))
        x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.uint8)
        v = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x), x)
        return (models.count_params(v["params"]["backbone"]),
                models.count_params(v["batch_stats"]), models.count_params(v["params"]))

    @parameterized.named_parameters(
        # BN channels: 64 + 4 * (64 + 128 + 256 + 512) + (128 + 256 + 512) = 4,800.
        ("resnet18", "resnet18", TORCHVISION_RESNET18_NO_FC, 2 * 4_800, 512),
        # BN channels = conv output channels: 64 + 6 * sum(w * n) + 4 * sum(w) = 26,560.
        ("resnet50", "resnet50", TORCHVISION_RESNET50_NO_FC, 2 * 26_560, 2048),
    )
    def test_matches_torchvision(self, backbone, expected, num_stats, features):
        params, stats, total = self._counts(backbone)
        self.assertEqual(params, expected)
        self.assertEqual(stats, num_stats)   # running mean + var per BN channel
        self.assertEqual(total - params, features * D + D)   # the projection head

    def test_keras_compatible_adds_one_bias_per_conv_channel(self):
        # keras.applications.ResNet50(include_top=False): 23,587,712 params, of which
        # 53,120 non-trainable (moving statistics); the 26,560 extra are the conv biases.
        params, stats, _ = self._counts("resnet50", keras_compatible=True)
        self.assertEqual(params, TORCHVISION_RESNET50_NO_FC + 26_560)
        self.assertEqual(params + stats, 23_587_712)


@pytest.mark.slow  # TensorFlow/Keras import + a ResNet-50 forward in both frameworks
class KerasConversionTest(absltest.TestCase):

    def test_pooled_features_equal_keras(self):
        import keras  # TensorFlow: only this test pays for it.
        size = 64
        keras_model = keras.applications.ResNet50(
            include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg")
        # Random, non-default BN statistics and conv biases, so a swapped or skipped layer
        # (blocks of a stage share shapes) changes the output.
        rng = np.random.default_rng(0)
        for layer in keras_model.layers:
            if layer.name.endswith("_bn"):
                c = layer.get_weights()[0].shape
                layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c),
                                   rng.normal(0, 0.1, c), rng.uniform(0.5, 2.0, c)])
            elif layer.name.endswith("_conv"):
                kernel, bias = layer.get_weights()
                layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape)])
        # Tiny variances in the last BN make its eps (1.001e-5, not 1e-5) visible at 1e-4.
        last_bn = keras_model.get_layer("conv5_block3_3_bn")
        gamma, beta, mean, _ = last_bn.get_weights()
        last_bn.set_weights([gamma, beta, mean, rng.uniform(0.0, 1e-7, mean.shape)])
        self.assertEqual(sum(int(np.prod(w.shape)) for w in keras_model.trainable_weights),
                         TORCHVISION_RESNET50_NO_FC + 26_560)

        model = models.create(dict(backbone="resnet50", keras_compatible=True, embedding_dim=D))
        x_abs = jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8)
        shapes = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x), x_abs)
        variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)

        # 1. The backbone alone, on Keras' own (BGR, preprocessed) input.
        x = rng.normal(0.0, 1.0, size=(B, size, size, 3)).astype(np.float32)
        ref = np.asarray(keras_model(x, training=False))
        bgr = models.load_keras_resnet50(variables, keras_model, bgr_to_rgb=False)
        feats = model.backbone.apply({"params": bgr["params"]["backbone"],
                                      "batch_stats": bgr["batch_stats"]["backbone"]}, x)
        feats = np.asarray(feats).mean(axis=(1, 2))
        self.assertGreater(np.abs(ref).max(), 1e-2)   # not a degenerate all-zero output
        np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

        # 2. The whole embedder on RGB uint8 images against preprocess_input + Keras.
        images = _images((size, size, 3), seed=5)
        ref = np.asarray(keras_model(
            keras.applications.resnet50.preprocess_input(images.astype(np.float32)),
            training=False))
        rgb = models.load_keras_resnet50(variables, keras_model)   # bgr_to_rgb=True
        feats = np.asarray(model.apply(rgb, images, method="features"))
        np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        # The input variables were not modified in place.
        self.assertFalse(np.any(variables["params"]["backbone"]["conv1"]["bias"]))

        torch_style = models.create(dict(backbone="resnet50"))
        shapes = jax.eval_shape(
            lambda x: torch_style.init({"params": jax.random.key(0)}, x), x_abs)
        with self.assertRaisesRegex(ValueError, "keras_compatible"):
            models.load_keras_resnet50(shapes, keras_model)


if __name__ == "__main__":
    absltest.main()
