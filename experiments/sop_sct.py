"""Selectively Contrastive Triplet loss (SCT) on Stanford Online Products, 512-d: the official recipe.

  hnm train --config=experiments/sop_sct.py --workdir=/tmp/sop_sct
  hnm train --config=experiments/sop_sct.py:smoke --workdir=/tmp/sop_sct_smoke

Expected R@1 after the full schedule (official README, mean of 5 runs): 81.9.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(variant=""):
    return common.official_config("sop", "sct", variant)
