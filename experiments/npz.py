"""SCT on a user's own images: an .npz with `images` [N, H, W(, C)] uint8 and `labels` [N].

  hnm train --config=experiments/npz.py --workdir=/tmp/mine --config.data.path=/data/mine.npz

Classes are split class-disjointly: sorted class ids, first half train, second half test
(`--config.data.train_classes=0.5`). A folder of class sub-folders of images works the same
with `--config.data.source=folder --config.data.path=/data/folder --config.data.image_size=64`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(variant=""):
    c = common.base_config()
    c.data.update(source="npz", path="", classes_per_batch=8, samples_per_class=4,
                  train_classes=0.5)
    c.model.update(backbone="cnn", embedding_dim=64)
    c.optim.update(name="adam", learning_rate=1e-3)
    c.train.update(num_epochs=20, log_every=20, eval_every_epochs=5, ckpt_every=200)
    if variant:
        raise ValueError(f"unknown config variant {variant!r}; expected ''.")
    return c
