"""easy-positive / semi-hard-negative soft triplet (EPSHN) on Stanford Online Products, 512-d: the official recipe.

  hnm train --config=experiments/sop_epshn.py --workdir=/tmp/sop_epshn
  hnm train --config=experiments/sop_epshn.py:smoke --workdir=/tmp/sop_epshn_smoke

Expected R@1 after the full schedule (official README, mean of 5 runs): 81.06.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(variant=""):
    return common.official_config("sop", "epshn", variant)
