"""SCT on the embedded many-class glyph set (synthetic: characters rendered from matplotlib's
bundled fonts, class-disjoint split; see hnm/data/glyphs.py).

  hnm train --config=experiments/glyphs.py --workdir=/tmp/hnm_glyphs
  hnm train --config=experiments/glyphs.py --workdir=/tmp/g --config.objective.name=ephn

No download. The raw-pixel R@1 of the test split (hnm.data.glyphs docstring) is the floor any trained
model must beat.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(variant=""):
    c = common.base_config()
    c.data.update(source="glyphs", classes_per_batch=32, samples_per_class=4)
    c.model.update(backbone="cnn", embedding_dim=64)
    c.optim.update(name="adam", learning_rate=1e-3)
    c.train.update(num_epochs=10, log_every=20, eval_every_epochs=5, ckpt_every=200)
    if variant == "smoke":
        c.data.update(classes_per_batch=8, max_examples=400)
        c.train.update(num_epochs=1, log_every=1, eval_every_epochs=1, ckpt_every=4)
    elif variant:
        raise ValueError(f"unknown config variant {variant!r}; expected '' or 'smoke'.")
    return c
