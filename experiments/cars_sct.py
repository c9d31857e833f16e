"""Selectively Contrastive Triplet loss (SCT) on Cars196, 64-d: the official recipe.

  hnm train --config=experiments/cars_sct.py --workdir=/tmp/cars_sct
  hnm train --config=experiments/cars_sct.py:smoke --workdir=/tmp/cars_sct_smoke

Expected R@1 after the full schedule (official README, mean of 5 runs): 73.35.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(variant=""):
    return common.official_config("cars", "sct", variant)
