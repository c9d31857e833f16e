"""Draws the triplet-loss geometry of Xuan et al. (ECCV 2020, §3) for hnm's losses.

  python experiments/loss_fields.py --out docs                     # the figures in docs/
  python experiments/loss_fields.py --out /tmp/f --variant tiny     # tests: coarse fields

``--variant tiny`` draws the two field pictures on coarse grids (5 arrows, 6 rate cells per
axis); the notebook figure and its share table keep the notebook's 20 x 20 grid (they are
cheap), so the tiny run's shares equal those in ``docs/similarity_changes.md``.

Writes three PNGs and a table into ``--out``:

* ``gradient_fields.png``: the descent direction (-dL/dS_ap, -dL/dS_an) of ephn (soft
  triplet), batch_hard (hinge), semihard (hinge on the semi-hard band) and sct over the
  (S_ap, S_an) square, hard region S_an > S_ap shaded.
* ``distance_rates.png``: d||f_a - f_n||/d(eta) for the same losses, the triplet placed on the
  unit sphere (coplanar, negative on the positive's side). Red cells: one gradient step pulls
  the negative toward the anchor, the collapse mechanism; SCT's hard region is blue.

* ``similarity_changes.png``: the official notebook's figure (``triplet_gradient_simulation.ipynb``
  of littleredxh/HardNegative): Delta S_ap and Delta S_an after one SGD step on (f_a, f_p, f_n)
  with re-normalisation and entanglement p = 0.5, lr = 0.1, projection 0 and 1, for the
  notebook's two losses (``Triplet_Map_std``, ``Triplet_Map_1st``), the hinge, the soft triplet
  of EPHN and SCT (official code and the paper's rule); ``similarity_changes.md`` / ``.json``:
  the share of hard cells (S_an > S_ap) whose negative is pulled in (Delta S_an > 0), for
  lr in {0.1, 0.01} and entanglement in {0.5, 0}.

Expected: the hinge and soft panels turn red in the upper-left of the hard region (a hard
negative much closer than the positive); SCT is blue wherever its hard branch is active.
Runs in a few seconds on CPU.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hnm import plots  # noqa: E402  (after the path tweak, so the script runs from a checkout)


# Grid sizes per variant; explicit --grid / --rate_grid / --notebook_grid override them.
VARIANTS = {"default": dict(grid=17, rate_grid=81, notebook_grid=20),
            "tiny": dict(grid=5, rate_grid=6, notebook_grid=20)}


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--margin", type=float, default=0.2)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--hard_weight", type=float, default=1.0)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="default",
                        help="grid sizes (tiny: coarse fields, for tests)")
    parser.add_argument("--grid", type=int, default=None, help="arrows per axis")
    parser.add_argument("--rate_grid", type=int, default=None, help="rate cells per axis")
    parser.add_argument("--notebook_grid", type=int, default=None,
                        help="cells per axis of the notebook's figure")
    args = parser.parse_args(argv)
    for name, value in VARIANTS[args.variant].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    panels = plots.standard_loss_panels(margin=args.margin, temperature=args.temperature,
                                        hard_weight=args.hard_weight)
    os.makedirs(args.out, exist_ok=True)
    fields = os.path.join(args.out, "gradient_fields.png")
    rates = os.path.join(args.out, "distance_rates.png")
    plots.plot_gradient_fields(panels, fields, grid=args.grid)
    plots.plot_distance_rates(panels, rates, grid=args.rate_grid)
    changes = os.path.join(args.out, "similarity_changes.png")
    losses, forms = similarity_change_losses(args.margin, args.temperature, args.hard_weight)
    _, shares = plots.plot_similarity_changes(losses, changes, grid=args.notebook_grid,
                                              forms=forms)
    table = share_table(losses, forms, args.notebook_grid)
    with open(os.path.join(args.out, "similarity_changes.json"), "w") as f:
        json.dump(table, f, indent=2)
    with open(os.path.join(args.out, "similarity_changes.md"), "w") as f:
        f.write(share_markdown(table))
    return [fields, rates, changes]


def similarity_change_losses(margin: float, temperature: float, hard_weight: float):
    """The rows of the notebook figure: ``({title: loss_fn}, {title: form})``."""
    import jax

    from hnm import losses as hnm_losses

    def sct(threshold):
        return functools.partial(hnm_losses.sct_loss, temperature=temperature,
                                 hard_weight=hard_weight, hard_threshold=threshold)

    rows = {
        "notebook std: ‖fa−fp‖² − ‖fa−fn‖²": (lambda s_ap, s_an: s_an - s_ap,
                                                 "squared_euclidean"),
        "notebook 1st: NCA, T = 1": (lambda s_ap, s_an: jax.nn.softplus(s_an - s_ap),
                                     "cosine"),
        f"hinge, m = {margin:g}": (lambda s_ap, s_an: jax.nn.relu(s_an - s_ap + margin),
                                   "cosine"),
        f"soft triplet (EPHN), T = {temperature:g}": (
            lambda s_ap, s_an: jax.nn.softplus((s_an - s_ap) / temperature), "cosine"),
        "SCT, official code (hard: S_an > S_ap or > 0.8)": (sct(0.8), "cosine"),
        "SCT, paper rule (hard: S_an > S_ap)": (sct(1.0), "cosine"),
    }
    return {k: v[0] for k, v in rows.items()}, {k: v[1] for k, v in rows.items()}


def share_table(loss_fns, forms, grid: int) -> list[dict]:
    """Hard-pull share per loss, projection, learning rate and entanglement."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hnm import analysis

    s = np.linspace(0.0, 1.0, grid).astype(np.float32)
    s_ap, s_an = (jnp.asarray(a) for a in np.meshgrid(s, s))
    rows = []
    for title, fn in loss_fns.items():
        # One compilation per loss: the step size, entanglement and projection are traced.
        step = jax.jit(functools.partial(analysis.one_step_similarity_change, fn, s_ap, s_an,
                                         form=forms[title]))
        for lr in (0.1, 0.01):
            for ent in (0.5, 0.0):
                row = {"loss": title, "learning_rate": lr, "entanglement": ent}
                for proj in (0.0, 1.0):
                    d = step(learning_rate=lr, projection=proj, entanglement=ent)
                    row[f"projection {proj:g}"] = float(
                        analysis.hard_pull_share(d.delta_an, s_ap, s_an))
                rows.append(row)
    return rows


def share_markdown(rows: list[dict]) -> str:
    keys = ["loss", "learning_rate", "entanglement", "projection 0", "projection 1"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(
            f"{100 * r[k]:.0f} %" if k.startswith("projection") else str(r[k]) for k in keys)
            + " |")
    from hnm import analysis
    return ("Share of hard cells (S_an > S_ap) of the notebook's 20 x 20 grid over [0, 1]^2 "
            "whose negative one SGD step pulls toward the anchor (Delta S_an > "
            f"{analysis.HARD_PULL_ATOL:g}: changes within float32 rounding do not count)."
            "\n\n"
            + "\n".join(lines) + "\n")


if __name__ == "__main__":
    for written in main():
        print(written)
