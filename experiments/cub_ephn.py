"""easy-positive / hardest-negative soft triplet (EPHN) on CUB-200-2011, 64-d: the official recipe.

  hnm train --config=experiments/cub_ephn.py --workdir=/tmp/cub_ephn
  hnm train --config=experiments/cub_ephn.py:smoke --workdir=/tmp/cub_ephn_smoke

Expected R@1 after the full schedule (official README, mean of 5 runs): collapse (34.7).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(variant=""):
    return common.official_config("cub", "ephn", variant)
