"""Shared pieces of the experiment configs (ml_collections), one function per concern.

Config files import this module by path (they are loaded by file name, not as a package):

    import os, sys; sys.path.insert(0, os.path.dirname(__file__)); import common

Group keys match the keyword names of the functions they feed (``objectives.get``,
``models.create``, ``data.build``, ``train.make_optimizer``) so nothing is translated.
"""
import ml_collections

# The official HardNegative recipe (littleredxh/HardNegative README and _code/, see
# shared/SCIENCE.md §1): ResNet-50, 2 images per class, SGD momentum 0, no weight decay,
# x0.1 at 50% (and 75% for SOP/In-Shop), crop 256 after resize 281 + flip.
OFFICIAL = {
    # dataset: (tfds source/name, dim, batch, epochs, decay_at, lr by method, R@1 by method)
    "cub": dict(source="tfds", name="caltech_birds2011", dim=64, batch=128, epochs=80,
                decay_at=(0.5,), lr=dict(sct=0.009, epshn=0.002, ephn=0.002),
                r1=dict(sct=57.71, epshn=56.72, ephn="collapse (34.7)"), ks=(1, 2, 4, 8)),
    "cars": dict(source="tfds", name="cars196", dim=64, batch=128, epochs=80,
                 decay_at=(0.5,), lr=dict(sct=0.02, epshn=0.004, ephn=0.004),
                 r1=dict(sct=73.35, epshn=67.92, ephn="collapse (21.8)"), ks=(1, 2, 4, 8)),
    "sop": dict(source="tfds", name="stanford_online_products", dim=512, batch=512,
                epochs=200 * 5, decay_at=(0.5, 0.75), lr=dict(sct=0.03, epshn=0.01, ephn=0.01),
                r1=dict(sct=81.90, epshn=81.06, ephn=81.0), ks=(1, 10, 100, 1000)),
    "inshop": dict(source="inshop", name="", dim=512, batch=512, epochs=200 * 5,
                   decay_at=(0.5, 0.75), lr=dict(sct=0.1, epshn=0.3, ephn=0.3),
                   r1=dict(sct=90.93, epshn=90.55, ephn=89.9), ks=(1, 10, 20, 30, 40)),
}

# Objective per method, with only what the official recipe sets on purpose (its temperature,
# 0.1); every other option is the objective's default (hnm.objectives.options) and can be set
# with --config.objective.OPTION=VALUE. `--config.objective.name=NAME` switches objective and
# drops the options NAME does not take (hnm.config).
METHODS = {
    "sct": dict(name="sct", temperature=0.1),
    "ephn": dict(name="ephn", temperature=0.1),
    "epshn": dict(name="epshn", temperature=0.1),
}


def base_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        source="digits", name="", path="", classes_per_batch=5, samples_per_class=16,
        image_size=0, train_resize=0, augment=False, pad_classes=True, train_classes=0.5,
        data_dir="", download=False))
    c.model = ml_collections.ConfigDict(dict(
        backbone="mlp", embedding_dim=64, normalize=False, dtype="float32"))
    # The objective by name only: its options are the objective's own defaults (hnm.config
    # completes the group, so `--config.objective.OPTION=VALUE` works for any of them).
    # param_lr_mult: learning-rate multiplier of an objective's own parameters (proxies),
    # read by the trainer and never passed to objectives.get.
    c.objective = ml_collections.ConfigDict(dict(name="sct", param_lr_mult=1.0))
    # The cross-batch memory (hnm.memory): size 0 = off; mined from step start_step on.
    c.memory = ml_collections.ConfigDict(dict(size=0, start_step=0))
    c.optim = ml_collections.ConfigDict(dict(
        name="adam", learning_rate=1e-3, momentum=0.0, weight_decay=0.0, schedule="step",
        decay_at=(), decay_factor=0.1, warmup_steps=0))
    c.train = ml_collections.ConfigDict(dict(
        num_epochs=30, log_every=10, eval_every_epochs=10, ckpt_every=100, keep=3,
        num_devices=0, diag_margin=0.2, backend="pmap"))
    c.eval = ml_collections.ConfigDict(dict(recall_ks=(1, 2, 4, 8), batch_size=256, nmi=True))
    return c


def official_config(dataset: str, method: str, variant: str = ""):
    """The official recipe of ``method`` on ``dataset``; ``:smoke`` runs on mocked/tiny data."""
    r = OFFICIAL[dataset]
    c = base_config()
    c.data.update(source=r["source"], name=r["name"], classes_per_batch=r["batch"] // 2,
                  samples_per_class=2, image_size=256, train_resize=281, augment=True)
    c.model.update(backbone="resnet50", embedding_dim=r["dim"], keras_compatible=True,
                   pretrained="keras_imagenet")
    c.objective = ml_collections.ConfigDict(dict(METHODS[method]))
    c.optim.update(name="sgd", learning_rate=r["lr"][method], momentum=0.0,
                   decay_at=r["decay_at"], decay_factor=0.1)
    c.train.update(num_epochs=r["epochs"], log_every=50, eval_every_epochs=10
                   if dataset in ("cub", "cars") else 100, ckpt_every=1000)
    # NMI's k-means over ~11k (SOP) or ~4k (In-Shop) classes takes minutes on a CPU host.
    c.eval.update(recall_ks=r["ks"], batch_size=256, nmi=dataset in ("cub", "cars"))
    if variant == "smoke":  # seconds on CPU: tiny images and batches, used by tests on mock data
        c.data.update(classes_per_batch=8, samples_per_class=2, image_size=32,
                      train_resize=36, max_examples=64)
        c.model.update(backbone="cnn", embedding_dim=16, keras_compatible=False, pretrained="")
        c.train.update(num_epochs=1, log_every=1, eval_every_epochs=1, ckpt_every=2)
        c.eval.update(recall_ks=(1, 2), batch_size=32)
    elif variant:
        raise ValueError(f"unknown config variant {variant!r}; expected '' or 'smoke'.")
    return c
