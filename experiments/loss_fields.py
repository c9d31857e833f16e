"""Draws the triplet-loss geometry of Xuan et al. (ECCV 2020, §3) for hnm's losses.

  python experiments/loss_fields.py --out /tmp/loss_fields

Writes two PNGs into ``--out``:

* ``gradient_fields.png``: the descent direction (-dL/dS_ap, -dL/dS_an) of ephn (soft
  triplet), batch_hard (hinge), semihard (hinge on the semi-hard band) and sct over the
  (S_ap, S_an) square, hard region S_an > S_ap shaded.
* ``distance_rates.png``: d||f_a - f_n||/d(eta) for the same losses, the triplet placed on the
  unit sphere (coplanar, negative on the positive's side). Red cells: one gradient step pulls
  the negative toward the anchor, the collapse mechanism; SCT's hard region is blue.

Expected: the hinge and soft panels turn red in the upper-left of the hard region (a hard
negative much closer than the positive); SCT is blue wherever its hard branch is active.
Runs in a few seconds on CPU.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hnm import plots  # noqa: E402  (after the path tweak, so the script runs from a checkout)


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--margin", type=float, default=0.2)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--hard_weight", type=float, default=1.0)
    parser.add_argument("--grid", type=int, default=17, help="arrows per axis")
    parser.add_argument("--rate_grid", type=int, default=81, help="rate cells per axis")
    args = parser.parse_args(argv)
    panels = plots.standard_loss_panels(margin=args.margin, temperature=args.temperature,
                                        hard_weight=args.hard_weight)
    os.makedirs(args.out, exist_ok=True)
    fields = os.path.join(args.out, "gradient_fields.png")
    rates = os.path.join(args.out, "distance_rates.png")
    plots.plot_gradient_fields(panels, fields, grid=args.grid)
    plots.plot_distance_rates(panels, rates, grid=args.rate_grid)
    return [fields, rates]


if __name__ == "__main__":
    for written in main():
        print(written)
