"""Selectively Contrastive Triplet loss (SCT) on CUB-200-2011, 64-d: the official recipe.

  hnm train --config=experiments/cub_sct.py --workdir=/tmp/cub_sct
  hnm train --config=experiments/cub_sct.py:smoke --workdir=/tmp/cub_sct_smoke

Expected R@1 after the full schedule (official README, mean of 5 runs): 57.71.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(variant=""):
    return common.official_config("cub", "sct", variant)
