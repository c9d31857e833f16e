"""Collapse sweep: classes per batch x embedding dimension (Xu et al., arXiv 2210.11173).

The isometric-approximation paper predicts that triplet training with hard negative mining
collapses (every embedding on one point, the loss stuck at its collapse value) more easily
when the batch holds many classes and the embedding dimension is small. This script trains
the same objective on the embedded many-class glyph set for every cell of a grid and reports,
per cell, whether it collapsed (``hnm.analysis.is_collapsed`` on the test-set diagnostics),
the final R@1 and the triplet-separation violation (the batch estimate of d_iso).

  python experiments/collapse_sweep.py --out runs/collapse            # ~15 min on 2 cores
  python experiments/collapse_sweep.py --out runs/collapse --variant full
  python experiments/collapse_sweep.py --out runs/collapse --objective sct

Writes ``OUT/table.md``, ``OUT/table.json`` and ``OUT/phase_diagram.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import glyphs as glyphs_config  # noqa: E402  (experiments/glyphs.py)

GRIDS = {
    # (classes_per_batch values, embedding_dim values, epochs)
    "tiny": ((4, 8), (2, 16), 1),
    "default": ((8, 32, 64), (2, 8, 32, 128), 4),
    "full": ((8, 16, 32, 64, 96), (2, 4, 8, 16, 32, 64, 128, 512), 20),
}


def cell_config(objective: str, classes_per_batch: int, dim: int, epochs: int, seed: int,
                variant: str):
    c = glyphs_config.get_config()
    c.seed = seed
    c.data.update(classes_per_batch=classes_per_batch, samples_per_class=2)
    c.model.update(embedding_dim=dim)
    c.objective = dict(name=objective)
    c.train.update(num_epochs=epochs, eval_every_epochs=10 ** 6, log_every=25,
                   ckpt_every=10 ** 6, num_devices=1)
    c.eval.update(recall_ks=(1, 2, 4, 8))
    if variant == "tiny":  # a few seconds per cell inside the test suite
        c.data.update(max_examples=600)
        c.train.update(log_every=2)
    return c


def run_cell(config, workdir: str) -> dict:
    from hnm import analysis, train

    out = train.train_and_evaluate(config, workdir, progress=False)
    diag = {k[len("diag/"):]: v for k, v in out.items() if k.startswith("diag/")}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    last = [r for r in rows if "loss" in r][-1]
    return {
        "r@1": out["recall@1"],
        "map@r": out["map@r"],
        "collapsed": bool(analysis.is_collapsed(diag)),
        "separation_violation_max": diag["separation_violation_max"],
        "separation_violation_mean": diag["separation_violation_mean"],
        "effective_rank": diag["effective_rank"],
        "mean_distance": diag["mean_distance"],
        "final_loss": last["loss"],
        "final_frac_hard": last.get("frac_hard", last.get("frac_hard_ephn", float("nan"))),
    }


def phase_title(objective: str) -> str:
    return (f"{objective} on glyphs: test R@1 per cell\n"
            "(hatched: collapsed, mean pairwise distance < 0.1)")


def markdown_table(rows: list[dict], keys: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/collapse")
    p.add_argument("--variant", choices=sorted(GRIDS), default="default")
    p.add_argument("--objective", default="ephn")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from hnm import plots

    os.makedirs(args.out, exist_ok=True)
    ps, dims, epochs = GRIDS[args.variant]
    rows, t0 = [], time.time()
    cells = [(P, d) for P in ps for d in dims]
    for i, (P, d) in enumerate(cells):
        wd = os.path.join(args.out, f"{args.objective}_P{P}_d{d}_s{args.seed}")
        cfg = cell_config(args.objective, P, d, epochs, args.seed, args.variant)
        row = {"objective": args.objective, "classes_per_batch": P, "embedding_dim": d,
               **run_cell(cfg, wd)}
        rows.append(row)
        print(f"[{i + 1}/{len(cells)}] P={P:3d} d={d:4d}  R@1={row['r@1']:.3f}  "
              f"collapsed={row['collapsed']}  viol_max={row['separation_violation_max']:.3f}"
              f"  ({time.time() - t0:.0f}s)", flush=True)
    keys = ["classes_per_batch", "embedding_dim", "r@1", "map@r", "collapsed",
            "separation_violation_max", "separation_violation_mean", "effective_rank",
            "final_loss", "final_frac_hard"]
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(markdown_table(rows, keys) + "\n")
    plots.plot_phase_diagram(rows, os.path.join(args.out, "phase_diagram.png"),
                             x="embedding_dim", y="classes_per_batch", value="r@1",
                             collapsed_key="collapsed", title=phase_title(args.objective))
    print(markdown_table(rows, keys))
    return rows


if __name__ == "__main__":
    main()
