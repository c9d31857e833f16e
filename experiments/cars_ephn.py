"""easy-positive / hardest-negative soft triplet (EPHN) on Cars196, 64-d: the official recipe.

  hnm train --config=experiments/cars_ephn.py --workdir=/tmp/cars_ephn
  hnm train --config=experiments/cars_ephn.py:smoke --workdir=/tmp/cars_ephn_smoke

Expected R@1 after the full schedule (official README, mean of 5 runs): collapse (21.8).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(variant=""):
    return common.official_config("cars", "ephn", variant)
