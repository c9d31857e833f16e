"""Selectively Contrastive Triplet loss (SCT) on In-Shop (DeepFashion), 512-d: the official recipe.

  hnm train --config=experiments/inshop_sct.py --workdir=/tmp/inshop_sct
  hnm train --config=experiments/inshop_sct.py:smoke --workdir=/tmp/inshop_sct_smoke

Needs the DeepFashion In-Shop files downloaded by hand: add --config.data.path=/path/to/inshop
(the folder with list_eval_partition.txt and img/).
Expected R@1 after the full schedule (official README, mean of 5 runs): 90.93.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(variant=""):
    return common.official_config("inshop", "sct", variant)
