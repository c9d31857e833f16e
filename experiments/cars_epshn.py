"""easy-positive / semi-hard-negative soft triplet (EPSHN) on Cars196, 64-d: the official recipe.

  hnm train --config=experiments/cars_epshn.py --workdir=/tmp/cars_epshn
  hnm train --config=experiments/cars_epshn.py:smoke --workdir=/tmp/cars_epshn_smoke

Expected R@1 after the full schedule (official README, mean of 5 runs): 67.92.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(variant=""):
    return common.official_config("cars", "epshn", variant)
