"""easy-positive / semi-hard-negative soft triplet (EPSHN) on In-Shop (DeepFashion), 512-d: the official recipe.

  hnm train --config=experiments/inshop_epshn.py --workdir=/tmp/inshop_epshn
  hnm train --config=experiments/inshop_epshn.py:smoke --workdir=/tmp/inshop_epshn_smoke

Needs the DeepFashion In-Shop files downloaded by hand: add --config.data.path=/path/to/inshop
(the folder with list_eval_partition.txt and img/).
Expected R@1 after the full schedule (official README, mean of 5 runs): 90.55.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(variant=""):
    return common.official_config("inshop", "epshn", variant)
