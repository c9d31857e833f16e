"""The embedded default: SCT on scikit-learn's digits, zero-shot (train 0-4, test 5-9).

  hnm train --config=experiments/digits.py --workdir=/tmp/hnm_digits
  hnm train --config=experiments/digits.py --workdir=/tmp/d --config.objective.name=ephn

No download; about 20 seconds on 2 CPU cores. Raw pixels already retrieve these digits at
R@1 ~ 0.99 (leave-one-out over the 5-9 test half), so this run proves the pipeline end to end;
it is not a benchmark: the network sees only digits 0-4, and after 10 epochs it retrieves the
unseen 5-9 at R@1 ~ 0.96, below the raw-pixel 0.99 (it overfits the seen digits).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(variant=""):
    c = common.base_config()
    c.data.update(source="digits", classes_per_batch=5, samples_per_class=16)
    c.model.update(backbone="mlp", embedding_dim=32)
    c.optim.update(name="adam", learning_rate=1e-3)
    c.train.update(num_epochs=10, log_every=10, eval_every_epochs=2, ckpt_every=100)
    if variant == "smoke":  # a few seconds; used by the tests
        c.train.update(num_epochs=2, log_every=2, eval_every_epochs=1, ckpt_every=4,
                       num_devices=1)
    elif variant:
        raise ValueError(f"unknown config variant {variant!r}; expected '' or 'smoke'.")
    return c
