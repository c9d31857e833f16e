"""Is d_iso what hard-negative training minimises? (Xu et al., arXiv 2210.11173; issue 9.)

Xu et al. show that the triplet loss with hard negative mining is equivalent to minimising
d_iso(f, F_TS). This script trains with hnm's trainer (glyphs, MLP embedder, P x K = 16 x 2,
d = 8) for ``batch_hard`` (hinge, margin = the diagnostic margin 0.2), ``ephn`` and ``sct``,
reads ``diag/diso_lower``, ``diag/diso_upper`` and the max-form hard-negative hinge
``diag/separation_violation_max`` (max over anchors of [max_p D_ap - min_n D_an + 0.2]_+) of
the logged training batches from ``metrics.jsonl``, and reports the Spearman rank correlation
of each d_iso bound with that loss (and with the mean form and the training loss) over the
run.

  python experiments/diso_equivalence.py --out docs/diso_equivalence
  python experiments/diso_equivalence.py --out /tmp/e --variant tiny     # tests

Caveat written before running: ``diso_lower`` lies in [v/2, v] of the max-form loss v (proved
in ``hnm.analysis.diso_lower_bound``), so its correlation with v is high by construction; the
informative number is the one of ``diso_upper``, which depends on the dimension.
Outcome (docs/diso_equivalence, README): the caveat was wrong for collapsing runs. There v
falls to the margin from above while ``diso_lower`` rises to it from below (both equal the
margin on a collapsed batch), so rho(lower, v) = -0.77 for ``batch_hard`` and -0.58 for
``ephn``; rho(upper, v) is -0.13 and -0.30, and +0.67 for ``sct``.

Writes ``OUT/table.md``, ``OUT/table.json`` and ``OUT/curves.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import glyphs as glyphs_config  # noqa: E402  (experiments/glyphs.py)

DIAG_MARGIN = 0.2
OBJECTIVES = {"batch_hard": dict(name="batch_hard", margin=DIAG_MARGIN), "ephn":
              dict(name="ephn"), "sct": dict(name="sct")}
VARIANTS = {"tiny": dict(epochs=1, log_every=4, max_examples=480),
            "default": dict(epochs=2, log_every=5, max_examples=None)}
PAIRS = (("diag/diso_lower", "diag/separation_violation_max"),
         ("diag/diso_upper", "diag/separation_violation_max"),
         ("diag/diso_upper", "diag/separation_violation_mean"),
         ("diag/diso_upper", "loss"))


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties), NaN for constant input."""
    import numpy as np
    from scipy import stats
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def cell_config(objective: str, variant: str, dim: int, seed: int):
    c = glyphs_config.get_config()
    v = VARIANTS[variant]
    c.seed = seed
    c.data.update(classes_per_batch=16, samples_per_class=2)
    if v["max_examples"]:
        c.data.update(max_examples=v["max_examples"])
    c.model.update(backbone="mlp", embedding_dim=dim)
    c.objective = dict(OBJECTIVES[objective])
    c.optim.update(name="adam", learning_rate=1e-3)
    c.train.update(num_epochs=v["epochs"], eval_every_epochs=10 ** 6, log_every=v["log_every"],
                   ckpt_every=10 ** 6, num_devices=1, diag_margin=DIAG_MARGIN)
    return c


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/diso_equivalence")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    p.add_argument("--objectives", nargs="*", default=list(OBJECTIVES))
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from hnm import plots, train

    os.makedirs(args.out, exist_ok=True)
    rows, curves = [], []
    for obj in args.objectives:
        wd = os.path.join(args.out, f"run_{obj}")
        train.train_and_evaluate(cell_config(obj, args.variant, args.dim, args.seed), wd,
                                 progress=False)
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            logged = [r for r in map(json.loads, filter(str.strip, f))
                      if "diag/diso_upper" in r]
        row = dict(objective=obj, log_points=len(logged),
                   first_upper=logged[0]["diag/diso_upper"],
                   last_upper=logged[-1]["diag/diso_upper"],
                   last_lower=logged[-1]["diag/diso_lower"],
                   last_violation_max=logged[-1]["diag/separation_violation_max"])
        for a, b in PAIRS:
            row[f"rho({a.split('/')[-1]}, {b.split('/')[-1]})"] = spearman(
                [r[a] for r in logged], [r[b] for r in logged])
        rows.append(row)
        curves.append((obj, logged))
        print(row, flush=True)
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump(rows, f, indent=2)
    plots.plot_diso_curves(curves, os.path.join(args.out, "curves.png"))
    print("\n".join(md))
    return rows


if __name__ == "__main__":
    main()
