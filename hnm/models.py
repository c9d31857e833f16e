r"""Flax (linen) embedders: image -> backbone -> global average pool -> linear -> embedding.

:func:`create` builds an :class:`Embedder` from a config mapping; the trainer uses it as

.. code-block:: python

    model = hnm.models.create(dict(backbone="resnet50", embedding_dim=64))
    variables = model.init({"params": key}, images, train=False)        # images [B, H, W, C]
    emb, state = model.apply(variables, images, train=True, mutable=["batch_stats"])
    emb = model.apply(variables, images, train=False)                  # [B, D] float32

The embedding is

.. math:: f(x) = W\,\mathrm{GAP}\big(g\big((x / 255 - \mu) / \sigma\big)\big) + b

with ``g`` the backbone, :math:`\mu, \sigma` the per-channel ``pixel_mean``/``pixel_std`` and
``W`` a ``[F, embedding_dim]`` projection, as the official SCT code replaces ResNet-50's
classifier by a d-dim linear layer. Images hold pixel values in [0, 255], as uint8 or as a
float array in that same range (``tf.image.resize`` of uint8 returns such floats); the
model always divides by 255. ``normalize=True`` adds :math:`f / \lVert f \rVert`; the
objectives normalise themselves, so it is off by default.

Backbones (``backbone`` key):

* ``"mlp"``: flatten -> ``hidden`` Dense+ReLU layers (for 8x8 digits). No BatchNorm.
* ``"cnn"``: ``hidden`` blocks of 3x3 conv + BatchNorm + ReLU, 2x2 max-pool between blocks
  (for 32x32 glyphs).
* ``"resnet18"`` / ``"resnet50"``: torchvision's layout (BasicBlock / Bottleneck, 7x7
  stride-2 stem and 3x3 max-pool, ``conv1``/``bn1``/``layer{s}_{b}``/``downsample_*``
  names, no conv bias, BN eps 1e-5, stride on the 3x3 conv of a Bottleneck, "ResNet v1.5").
  With ``keras_compatible=True`` ResNet-50 instead matches
  ``keras.applications.ResNet50`` exactly (conv biases, BN eps 1.001e-5, stride on the
  first 1x1 conv, "v1"), so :func:`load_keras_resnet50` can copy its ImageNet weights.

BatchNorm keeps running statistics in the ``batch_stats`` collection and uses them when
``train=False`` (or always, with ``freeze_bn=True``). A model without BatchNorm (``mlp``)
has no such collection: ``apply(..., mutable=["batch_stats"])`` then returns an empty dict;
:func:`has_batch_stats` lets the trainer treat both cases alike.

``dtype="bfloat16"`` runs the backbone in bfloat16; parameters, running statistics, the
pooled features, the projection and the returned embedding stay float32.

References:
  Xuan, Stylianou, Liu, Pless. Hard negative examples are hard, but useful. ECCV 2020
  (arXiv 2007.12749); official code github.com/littleredxh/HardNegative.
  He, Zhang, Ren, Sun. Deep residual learning for image recognition. CVPR 2016.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hnm.distances import l2_normalize

BACKBONES = ("mlp", "cnn", "resnet18", "resnet50")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# torchvision's ImageNet statistics, RGB, for images scaled to [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# keras.applications.resnet50.preprocess_input ("caffe" mode): BGR minus these means, in the
# 0..255 range, no std. Written here in RGB order and on the [0, 1] scale, so that
# (x / 255 - mean) / std == x - mean_255; load_keras_resnet50 folds the BGR flip into conv1.
CAFFE_MEAN = (123.68 / 255.0, 116.779 / 255.0, 103.939 / 255.0)
CAFFE_STD = (1.0 / 255.0,) * 3
# Small backbones see images scaled to [-1, 1].
SMALL_MEAN = (0.5,)
SMALL_STD = (0.5,)

TORCH_BN_EPS = 1e-5
KERAS_BN_EPS = 1.001e-5
# Flax momentum is the weight of the old value: torchvision's momentum 0.1 is 0.9 here.
BN_MOMENTUM = 0.9

RESNET_STAGES = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}
RESNET_WIDTHS = (64, 128, 256, 512)

DEFAULT_CONFIG = dict(
    backbone="mlp",
    embedding_dim=64,
    normalize=False,
    dtype="float32",
    hidden=None,            # mlp: (128,); cnn: (32, 64, 128)
    pixel_mean=None,        # ImageNet (resnets), caffe (keras_compatible), 0.5 (mlp/cnn)
    pixel_std=None,
    freeze_bn=False,
    keras_compatible=False,
)
DEFAULT_HIDDEN = {"mlp": (128,), "cnn": (32, 64, 128)}

Dtype = Any
ModuleDef = Callable[..., nn.Module]


# --------------------------------------------------------------------------- small backbones

class MLP(nn.Module):
    """Flatten -> (Dense -> ReLU) per entry of ``hidden``. Returns [B, hidden[-1]]."""
    hidden: Sequence[int] = (128,)
    dtype: Dtype = jnp.float32
    freeze_bn: bool = False   # accepted for a uniform interface; there is no BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"dense{i}")(x))
        return x


class CNN(nn.Module):
    """(3x3 conv -> BatchNorm -> ReLU) per entry of ``hidden``, 2x2 max-pool in between.

    Returns the last feature map [B, H', W', hidden[-1]].
    """
    hidden: Sequence[int] = (32, 64, 128)
    dtype: Dtype = jnp.float32
    freeze_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = functools.partial(nn.BatchNorm, use_running_average=not train or self.freeze_bn,
                                 momentum=BN_MOMENTUM, epsilon=TORCH_BN_EPS, dtype=self.dtype)
        for i, width in enumerate(self.hidden):
            if i > 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            # No bias: the BatchNorm that follows subtracts it again.
            x = nn.Conv(width, (3, 3), use_bias=False, dtype=self.dtype, name=f"conv{i}")(x)
            x = nn.relu(norm(name=f"bn{i}")(x))
        return x


# --------------------------------------------------------------------------- ResNets

class BasicBlock(nn.Module):
    """ResNet-18/34 block: 3x3 conv (stride) -> BN -> ReLU -> 3x3 conv -> BN, + shortcut."""
    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.features, (3, 3), self.strides, padding=1, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), 1, padding=1, name="conv2")(y)
        y = self.norm(name="bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = self.conv(self.features, (1, 1), self.strides, padding=0,
                          name="downsample_conv")(x)
            x = self.norm(name="downsample_bn")(x)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """ResNet-50 block: 1x1 -> 3x3 -> 1x1 (4x wider), each with BN, + shortcut.

    ``stride_on_1x1=False`` puts the stride on the 3x3 conv (torchvision, "v1.5");
    ``True`` on the first 1x1 conv (the original paper and Keras, "v1").
    """
    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    stride_on_1x1: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s1, s3 = (self.strides, 1) if self.stride_on_1x1 else (1, self.strides)
        y = self.conv(self.features, (1, 1), s1, padding=0, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), s3, padding=1, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(4 * self.features, (1, 1), 1, padding=0, name="conv3")(y)
        y = self.norm(name="bn3")(y)
        if self.strides != 1 or x.shape[-1] != 4 * self.features:
            x = self.conv(4 * self.features, (1, 1), self.strides, padding=0,
                          name="downsample_conv")(x)
            x = self.norm(name="downsample_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet without its classifier; returns the last feature map [B, H/32, W/32, F].

    Layout and names follow torchvision (``conv1``, ``bn1``, ``layer{s}_{b}``), so
    pretrained weights map one to one. ``keras_compatible`` matches
    ``keras.applications.ResNet50`` instead (conv biases, BN eps 1.001e-5, stride on the
    first 1x1 conv of a Bottleneck); see :func:`load_keras_resnet50`.
    """
    stage_sizes: Sequence[int]
    bottleneck: bool
    dtype: Dtype = jnp.float32
    freeze_bn: bool = False
    keras_compatible: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=self.keras_compatible, dtype=self.dtype)
        norm = functools.partial(
            nn.BatchNorm, use_running_average=not train or self.freeze_bn,
            momentum=BN_MOMENTUM,
            epsilon=KERAS_BN_EPS if self.keras_compatible else TORCH_BN_EPS, dtype=self.dtype)
        # Explicit (3, 3) padding: Flax "SAME" would pad (2, 3) on even sizes, unlike
        # torchvision and Keras' ZeroPadding2D(3).
        x = conv(64, (7, 7), 2, padding=((3, 3), (3, 3)), name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        # -inf padding (Flax) equals Keras' zero padding here: the input is post-ReLU.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for s, num_blocks in enumerate(self.stage_sizes):
            for b in range(num_blocks):
                strides = 2 if s > 0 and b == 0 else 1
                name = f"layer{s + 1}_{b}"
                if self.bottleneck:
                    x = Bottleneck(RESNET_WIDTHS[s], strides, conv, norm,
                                   stride_on_1x1=self.keras_compatible, name=name)(x)
                else:
                    x = BasicBlock(RESNET_WIDTHS[s], strides, conv, norm, name=name)(x)
        return x


# --------------------------------------------------------------------------- the embedder

class Embedder(nn.Module):
    r"""Pixels -> backbone -> global average pool -> Dense(embedding_dim) [-> L2 norm].

    .. math:: f(x) = W\,\mathrm{GAP}\big(g((x / 255 - \mu) / \sigma)\big) + b

    Attributes:
      backbone: a module mapping [B, H, W, C] to [B, F] or [B, H', W', F]; its variables
        live under ``"backbone"``.
      embedding_dim: D, the output width (``projection`` Dense layer, float32).
      normalize: return :math:`f / \lVert f \rVert` (unit rows) instead of f.
      pixel_mean: per-channel mean :math:`\mu` on the [0, 1] scale (length 1 or C).
      pixel_std: per-channel std :math:`\sigma` on the [0, 1] scale (length 1 or C).
      dtype: compute dtype of the backbone input.
    """
    backbone: nn.Module
    embedding_dim: int = 64
    normalize: bool = False
    pixel_mean: Sequence[float] = SMALL_MEAN
    pixel_std: Sequence[float] = SMALL_STD
    dtype: Dtype = jnp.float32

    def preprocess(self, images: jax.Array) -> jax.Array:
        """[B, H, W, C] pixel values in [0, 255] (uint8 or float) -> normalised float."""
        images = jnp.asarray(images)
        if images.ndim != 4:
            raise ValueError("`images` must be a 4-D array [B, H, W, C]; got shape "
                             f"{images.shape} and dtype {images.dtype}.")
        if not (jnp.issubdtype(images.dtype, jnp.integer)
                or jnp.issubdtype(images.dtype, jnp.floating)):
            raise TypeError(f"`images` must be integer or floating; got {images.dtype}.")
        channels = images.shape[-1]
        for name, stat in (("pixel_mean", self.pixel_mean), ("pixel_std", self.pixel_std)):
            if len(stat) not in (1, channels):
                raise ValueError(f"`{name}` has {len(stat)} entries but `images` has "
                                 f"{channels} channels; give 1 or {channels}.")
        mean = jnp.asarray(self.pixel_mean, jnp.float32)
        std = jnp.asarray(self.pixel_std, jnp.float32)
        x = images.astype(jnp.float32) / 255.0
        return ((x - mean) / std).astype(self.dtype)

    def features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Pooled backbone features [B, F], float32 (before the projection)."""
        x = self.backbone(self.preprocess(images), train=train)
        x = x.astype(jnp.float32)
        if x.ndim == 4:
            x = jnp.mean(x, axis=(1, 2))
        return x

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Embeddings [B, embedding_dim], float32."""
        emb = nn.Dense(self.embedding_dim, dtype=jnp.float32, name="projection")(
            self.features(images, train=train))
        return l2_normalize(emb) if self.normalize else emb


# --------------------------------------------------------------------------- config

def _as_dict(model_cfg: Any) -> dict[str, Any]:
    if hasattr(model_cfg, "to_dict"):       # ml_collections.ConfigDict
        model_cfg = model_cfg.to_dict()
    if not isinstance(model_cfg, Mapping):
        raise TypeError(f"`model_cfg` must be a mapping; got {type(model_cfg).__name__}.")
    unknown = sorted(set(model_cfg) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"Unknown model config key(s) {unknown}; known keys are "
                         f"{sorted(DEFAULT_CONFIG)}.")
    return {**DEFAULT_CONFIG, **model_cfg}


def _positive_ints(value: Any, key: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"model config `{key}` must be a sequence of positive ints; "
                         f"got {value!r}.") from None
    if not out or any(v <= 0 for v in out) or any(int(v) != v for v in value):
        raise ValueError(f"model config `{key}` must be a non-empty sequence of positive "
                         f"ints; got {value!r}.")
    return out


def _stats(value: Any, default: Sequence[float], key: str) -> tuple[float, ...]:
    if value is None:
        return tuple(default)
    try:
        out = tuple(float(v) for v in np.atleast_1d(np.asarray(value, dtype=np.float64)))
    except (TypeError, ValueError):
        raise ValueError(f"model config `{key}` must be numbers; got {value!r}.") from None
    if not out or not all(np.isfinite(out)):
        raise ValueError(f"model config `{key}` must hold finite numbers; got {value!r}.")
    if key == "pixel_std" and any(v <= 0 for v in out):
        raise ValueError(f"model config `pixel_std` must be positive; got {value!r}.")
    return out


def create(model_cfg: Mapping[str, Any]) -> Embedder:
    """Builds an :class:`Embedder` from a config mapping (a dict or ``ConfigDict``).

    Args:
      model_cfg: keys (all optional, defaults in ``DEFAULT_CONFIG``):
        ``backbone`` (one of ``BACKBONES``), ``embedding_dim`` (int > 0, 64),
        ``normalize`` (bool, False), ``dtype`` ("float32" | "bfloat16": backbone compute),
        ``hidden`` (widths for mlp/cnn), ``pixel_mean``/``pixel_std`` (per channel, [0, 1]
        scale; ImageNet for resnets, caffe for ``keras_compatible``, 0.5/0.5 for mlp/cnn),
        ``freeze_bn`` (bool: BatchNorm always uses running statistics),
        ``keras_compatible`` (bool, resnet50 only: Keras ResNet50 layout, see
        :func:`load_keras_resnet50`).

    Returns:
      An unbound :class:`Embedder`.

    Raises:
      ValueError: an unknown key or a bad value; the message names the key.
      TypeError: ``model_cfg`` is not a mapping.

    Examples:
      >>> model = create(dict(backbone="mlp", embedding_dim=8, hidden=(16,)))
      >>> images = jnp.zeros((2, 8, 8, 1), jnp.uint8)
      >>> variables = model.init({"params": jax.random.key(0)}, images)
      >>> model.apply(variables, images).shape
      (2, 8)
    """
    cfg = _as_dict(model_cfg)
    name = cfg["backbone"]
    if name not in BACKBONES:
        raise ValueError(f"model config `backbone` must be one of {BACKBONES}; got {name!r}.")
    dim = cfg["embedding_dim"]
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise ValueError(f"model config `embedding_dim` must be a positive int; got {dim!r}.")
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"model config `dtype` must be one of {tuple(DTYPES)}; "
                         f"got {cfg['dtype']!r}.")
    dtype = DTYPES[cfg["dtype"]]
    for key in ("normalize", "freeze_bn", "keras_compatible"):
        if not isinstance(cfg[key], (bool, np.bool_)):
            raise ValueError(f"model config `{key}` must be a bool; got {cfg[key]!r}.")
    keras = bool(cfg["keras_compatible"])
    if keras and name != "resnet50":
        raise ValueError("model config `keras_compatible` applies to backbone 'resnet50' "
                         f"only; got backbone {name!r}.")
    if cfg["hidden"] is not None and name not in DEFAULT_HIDDEN:
        raise ValueError(f"model config `hidden` applies to 'mlp' and 'cnn' only; got "
                         f"backbone {name!r}.")

    if name in DEFAULT_HIDDEN:
        hidden = DEFAULT_HIDDEN[name] if cfg["hidden"] is None else _positive_ints(
            cfg["hidden"], "hidden")
        cls = MLP if name == "mlp" else CNN
        backbone = cls(hidden=hidden, dtype=dtype, freeze_bn=bool(cfg["freeze_bn"]))
        mean, std = SMALL_MEAN, SMALL_STD
    else:
        backbone = ResNet(RESNET_STAGES[name], bottleneck=name == "resnet50", dtype=dtype,
                          freeze_bn=bool(cfg["freeze_bn"]), keras_compatible=keras)
        mean, std = (CAFFE_MEAN, CAFFE_STD) if keras else (IMAGENET_MEAN, IMAGENET_STD)
    return Embedder(backbone=backbone, embedding_dim=int(dim), normalize=bool(cfg["normalize"]),
                    pixel_mean=_stats(cfg["pixel_mean"], mean, "pixel_mean"),
                    pixel_std=_stats(cfg["pixel_std"], std, "pixel_std"), dtype=dtype)


def has_batch_stats(variables: Mapping[str, Any]) -> bool:
    """Whether ``variables`` hold a non-empty ``batch_stats`` collection (BatchNorm).

    ``apply(..., mutable=["batch_stats"])`` returns ``{}`` for a model without BatchNorm,
    so a trainer can write ``state.get("batch_stats", {})`` and test with this helper.

    Examples:
      >>> has_batch_stats({"params": {}}), has_batch_stats({"batch_stats": {"bn": {}}})
      (False, True)
    """
    return bool(variables.get("batch_stats"))


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays (or ``ShapeDtypeStruct``s)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


# --------------------------------------------------------------------------- Keras weights

def _keras_name(flax_path: tuple[str, ...]) -> str:
    """('layer2_0', 'conv1') -> 'conv3_block1_1'; ('conv1',) -> 'conv1'."""
    if len(flax_path) == 1:
        return {"conv1": "conv1", "bn1": "conv1"}[flax_path[0]]
    block, layer = flax_path
    stage, index = block[len("layer"):].split("_")
    part = "0" if layer.startswith("downsample") else layer[-1]
    return f"conv{int(stage) + 1}_block{int(index) + 1}_{part}"


def _keras_weights(layer: Any) -> dict[str, np.ndarray]:
    # Keras 3 variable names are the bare names ("kernel", "gamma", "moving_mean").
    return {w.name.split("/")[-1].split(":")[0]: np.asarray(w) for w in layer.weights}


def load_keras_resnet50(variables: Mapping[str, Any], keras_model: Any = None, *,
                        bgr_to_rgb: bool = True) -> dict[str, Any]:
    r"""Copies ``keras.applications.ResNet50`` weights into a Keras-compatible Flax ResNet-50.

    Conv kernels/biases and BatchNorm gamma, beta, moving mean and variance are copied layer
    by layer (``conv{s}_block{b}_{k}_conv`` -> ``layer{s-1}_{b-1}/conv{k}``, ``_0_`` ->
    ``downsample_*``). The projection head is left as initialised.

    Keras' ImageNet weights expect BGR input minus the caffe means (0..255 scale).
    With ``bgr_to_rgb=True`` the input-channel axis of ``conv1``'s kernel is reversed, so
    the Flax model takes RGB; together with the default ``pixel_mean``/``pixel_std`` of
    ``create(dict(backbone="resnet50", keras_compatible=True))`` (``CAFFE_MEAN``/
    ``CAFFE_STD``) the embedder on RGB uint8 images then sees exactly what
    ``keras.applications.resnet50.preprocess_input`` gives Keras.

    Args:
      variables: ``{"params", "batch_stats"}`` of an :class:`Embedder` with a
        ``keras_compatible`` ResNet-50 backbone (or of that backbone alone).
      keras_model: a built Keras ResNet50 (any input size, ``include_top=False``); None
        builds ``keras.applications.ResNet50(include_top=False, weights="imagenet")``,
        which downloads the weights (imports TensorFlow/Keras, lazily).
      bgr_to_rgb: reverse conv1's input channels (see above). False keeps Keras' BGR.

    Returns:
      New variables (the input is not modified).

    Raises:
      ValueError: the Flax model is not a ``keras_compatible`` ResNet-50 (no conv biases),
        or a layer is missing or has another shape; the message names the layer.
    """
    if keras_model is None:
        import keras  # lazy: the library never imports TensorFlow/Keras at module level
        keras_model = keras.applications.ResNet50(include_top=False, weights="imagenet")
    variables = jax.tree_util.tree_map(np.asarray, dict(variables))
    params, stats = variables.get("params", {}), variables.get("batch_stats", {})
    if "backbone" in params:
        params, stats = params["backbone"], stats.get("backbone", {})
    if "conv1" not in params or "bias" not in params["conv1"]:
        raise ValueError("`variables` must belong to a ResNet-50 built with "
                         "keras_compatible=True (conv layers with bias); got params with "
                         f"top-level keys {sorted(params)}.")

    def copy(dst: dict[str, Any], key: str, value: np.ndarray, where: str) -> None:
        if dst[key].shape != value.shape:
            raise ValueError(f"Keras layer {where!r} weight {key!r} has shape {value.shape} "
                             f"but the Flax variable has {dst[key].shape}.")
        dst[key] = value.astype(dst[key].dtype)

    copied = set()
    for path in [(k,) for k in ("conv1", "bn1")] + [
            (b, l) for b in params if b.startswith("layer") for l in params[b]]:
        base = _keras_name(path)
        dst_params = functools.reduce(dict.__getitem__, path, params)
        if path[-1].endswith(("conv", "conv1", "conv2", "conv3")):
            where = base + "_conv"
            w = _keras_weights(keras_model.get_layer(where))
            kernel = w["kernel"]
            if path == ("conv1",) and bgr_to_rgb:
                kernel = kernel[:, :, ::-1, :]
            copy(dst_params, "kernel", kernel, where)
            copy(dst_params, "bias", w["bias"], where)
        else:
            where = base + "_bn"
            w = _keras_weights(keras_model.get_layer(where))
            dst_stats = functools.reduce(dict.__getitem__, path, stats)
            copy(dst_params, "scale", w["gamma"], where)
            copy(dst_params, "bias", w["beta"], where)
            copy(dst_stats, "mean", w["moving_mean"], where)
            copy(dst_stats, "var", w["moving_variance"], where)
        copied.add(where)
    # Every conv/BN of Keras' backbone must have found a home (53 convs + 53 BNs).
    keras_layers = {l.name for l in keras_model.layers if l.name.endswith(("_conv", "_bn"))}
    if keras_layers - copied:
        raise ValueError(f"Keras layers without a Flax counterpart: "
                         f"{sorted(keras_layers - copied)[:5]}...")
    return jax.tree_util.tree_map(jnp.asarray, variables)
