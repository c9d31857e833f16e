"""easy-positive / hardest-negative soft triplet (EPHN) on Stanford Online Products, 512-d: the official recipe.

  hnm train --config=experiments/sop_ephn.py --workdir=/tmp/sop_ephn
  hnm train --config=experiments/sop_ephn.py:smoke --workdir=/tmp/sop_ephn_smoke

Expected R@1 after the full schedule (official README, mean of 5 runs): 81.0.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(variant=""):
    return common.official_config("sop", "ephn", variant)
