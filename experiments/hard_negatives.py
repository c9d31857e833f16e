"""Hard negatives, hard but useful (Xuan et al., ECCV 2020) at laptop scale.

Trains the official SCT code's objectives (``ephn``, ``epshn``, ``sct``), the hinge recipes
(``batch_hard``, ``semihard``), ``multi_similarity`` and, with ``--objectives all``, the
newer families too (proxies: ``proxy_anchor``, ``proxy_nca``, ``norm_softmax``, ``arcface``;
pairs / lists: ``circle``, ``ntxent``, ``lifted_structure``; ranking: ``smooth_ap``; the margin
loss with learnable beta: ``margin``), every one with its default options and one budget
(the same epochs, seeds, batch, model and optimiser; parametric objectives train their
parameters at the model's learning rate, ``param_lr_mult=1``), on the embedded data sets.
Reports R@1, MAP@R, whether the run collapsed, and ``frac_hard`` over training (or
``frac_hard_ephn`` for the pair and proxy objectives, which mine no triplets), as mean +- std
over seeds.

  python experiments/hard_negatives.py --out runs/hard_negatives          # glyphs, 3 seeds
  python experiments/hard_negatives.py --out runs/hn_all --objectives all --epochs 2 --seeds 1
  python experiments/hard_negatives.py --out runs/hn_digits --dataset digits

Writes ``OUT/table.md``, ``OUT/table.json``, ``OUT/frac_hard.png`` and ``OUT/recall.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import collapse_sweep  # noqa: E402
import digits as digits_config  # noqa: E402
import glyphs as glyphs_config  # noqa: E402

OBJECTIVES = ("ephn", "epshn", "sct", "batch_hard", "semihard", "multi_similarity")
# The other families (issue 12), compared with --objectives all.
NEW_OBJECTIVES = ("proxy_anchor", "proxy_nca", "norm_softmax", "arcface", "margin", "circle",
                  "ntxent", "lifted_structure", "smooth_ap")
FRAC_HARD_KEYS = ("frac_hard", "frac_hard_ephn")  # triplet objectives / the others
CONFIGS = {"glyphs": glyphs_config, "digits": digits_config}


def run_config(dataset: str, objective: str, seed: int, epochs: int, dim: int, tiny: bool):
    c = CONFIGS[dataset].get_config()
    c.seed = seed
    c.objective = dict(name=objective)
    c.model.update(embedding_dim=dim)
    c.train.update(num_epochs=epochs, eval_every_epochs=max(1, epochs // 4), log_every=10,
                   ckpt_every=10 ** 6, num_devices=1)
    if tiny:
        c.data.update(max_examples=600 if dataset == "glyphs" else 0)
        c.train.update(log_every=2, eval_every_epochs=1)
    return c


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for obj in dict.fromkeys(r["objective"] for r in rows):
        sub = [r for r in rows if r["objective"] == obj]
        s = {"objective": obj, "seeds": len(sub),
             "collapsed": f"{sum(r['collapsed'] for r in sub)}/{len(sub)}"}
        for k in ("r@1", "map@r", "final_frac_hard", "separation_violation_max"):
            v = np.array([r[k] for r in sub], float)
            # One seed has no spread: the value alone, never a misleading "± 0.000".
            s[k] = f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v[0]:.3f}"
        out.append(s)
    return out


def _curves(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(runs: dict[str, list[list[dict]]], path: str, key: str, ylabel: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10").colors
    for i, (obj, seeds) in enumerate(runs.items()):
        keys = [next((k for k in FRAC_HARD_KEYS if any(k in r for r in rows)), key)
                if key == "frac_hard" else key for rows in seeds]
        xs = [np.array([r["step"] for r in rows if k in r]) for rows, k in zip(seeds, keys)]
        ys = [np.array([r[k] for r in rows if k in r]) for rows, k in zip(seeds, keys)]
        n = min(len(x) for x in xs)
        if n == 0:
            continue
        y = np.stack([v[:n] for v in ys])
        # Ten colours, then the same ten dashed: every line is told apart in the legend.
        style = dict(color=colors[i % 10], linestyle="-" if i < 10 else "--")
        ax.plot(xs[0][:n], y.mean(0), label=obj, **style)
        ax.fill_between(xs[0][:n], y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.2,
                        color=style["color"])
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    num_seeds = max(len(seeds) for seeds in runs.values())
    spread = "mean ± std over seeds" if num_seeds > 1 else "one seed"
    ax.set_title(f"{ylabel}\nduring training ({spread})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(runs) > 8 else None, ncol=2 if len(runs) > 8 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/hard_negatives")
    p.add_argument("--dataset", choices=sorted(CONFIGS), default="glyphs")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--objectives", default=",".join(OBJECTIVES),
                   help="comma-separated names, or 'all' (the six and NEW_OBJECTIVES)")
    p.add_argument("--tiny", action="store_true", help="a few seconds per run (tests)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    objectives = (list(OBJECTIVES + NEW_OBJECTIVES) if args.objectives == "all"
                  else args.objectives.split(","))
    rows, curves, t0 = [], {}, time.time()
    for obj in objectives:
        for seed in range(args.seeds):
            wd = os.path.join(args.out, f"{args.dataset}_{obj}_s{seed}")
            cfg = run_config(args.dataset, obj, seed, args.epochs, args.dim, args.tiny)
            row = {"objective": obj, "seed": seed, **collapse_sweep.run_cell(cfg, wd)}
            rows.append(row)
            curves.setdefault(obj, []).append(_curves(wd))
            print(f"{obj:>16s} seed {seed}: R@1={row['r@1']:.3f} MAP@R={row['map@r']:.3f} "
                  f"collapsed={row['collapsed']} ({time.time() - t0:.0f}s)", flush=True)
    table = summarise(rows)
    keys = ["objective", "seeds", "r@1", "map@r", "collapsed", "final_frac_hard",
            "separation_violation_max"]
    md = collapse_sweep.markdown_table(table, keys)
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump({"runs": rows, "summary": table}, f, indent=2)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md + "\n")
    plot_curves(curves, os.path.join(args.out, "frac_hard.png"), "frac_hard",
                "frac_hard (or frac_hard_ephn)")
    plot_curves(curves, os.path.join(args.out, "recall.png"), "eval/recall@1", "test R@1")
    print(md)
    return table


if __name__ == "__main__":
    main()
