"""Step-matched, multi-seed collapse phase diagram (Xu et al., arXiv 2210.11173; issue 9).

Every cell of classes per batch P x embedding dimension d (K samples per class) trains the
same small network on the glyph training classes for the *same number of optimiser steps*,
with several seeds vectorised by ``jax.vmap``, and reports per cell:

* ``collapse_fraction``: the share of seeds that collapsed by the *relative* test
  (``hnm.analysis.is_collapsed_relative``: mean pairwise distance of the test embeddings
  below 1/4 of its value at initialisation AND the final training loss within 10 % of its
  collapse value); ``spread_collapse_fraction``: the spread condition alone (the official
  code's objectives drop anchors whose cosines reach 1, so a collapsed ``ephn`` network has
  a loss near 0, not log 2, and fails the loss condition); ``abs_collapse_fraction``: the
  old absolute test (mean distance < 0.1), for comparison;
* ``r@1`` (mean over seeds, leave-one-out on the class-disjoint glyph test split);
* ``diso_lower`` / ``diso_upper`` at the end (``hnm.analysis.diso_bounds`` on one fixed
  P x K test batch, margin 0.2, configurations in R^d), mean over seeds;
* ``predicted``: ``hnm.analysis.collapse_boundary(P, d, 0.2)`` (sphere capacity).

  python experiments/collapse_sweep.py --out docs/collapse_sweep             # full grid
  python experiments/collapse_sweep.py --out /tmp/c --variant tiny           # tests
  python experiments/collapse_sweep.py --out /tmp/c --objectives sct --dims 2 8

Objectives: ``batch_hard`` (hinge, margin = the diagnostic margin 0.2), ``ephn`` and ``sct``
(official defaults; margin-free, the 0.2 is only the diagnostic's). Network: hnm's MLP
embedder (one hidden layer of 128) on 32 x 32 glyphs, Adam 1e-3, 300 steps, 3 seeds.

Writes ``OUT/table.md``, ``OUT/table.json`` and ``OUT/phase_diagram.png``; finished cells
are appended to ``OUT/cells.jsonl`` as they finish, and a rerun with the same ``--out``
skips them (resume). To draw the table of a partial run: rerun with the subset of the grid
that finished (``--objectives`` / ``--ps`` / ``--dims``).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

DIAG_MARGIN = 0.2
GRIDS = {
    # classes per batch, dims, K, the extra K = 4 row's P (or None), steps, seeds, objectives
    "tiny": dict(ps=(4, 16), dims=(2, 8), k=2, k4_p=None, steps=30, seeds=2,
                 objectives=("batch_hard",), test_images=600, diso_steps=50),
    "default": dict(ps=(4, 8, 16, 32, 64), dims=(2, 3, 4, 8, 16, 32), k=2, k4_p=16,
                    steps=300, seeds=3, objectives=("batch_hard", "sct", "ephn"),
                    test_images=2000, diso_steps=300),
}
COLLAPSE_KIND = {"batch_hard": "hinge", "ephn": "soft", "sct": "sct"}
OBJECTIVE_OPTS = {"batch_hard": dict(margin=DIAG_MARGIN), "ephn": {}, "sct": {}}


def _glyphs():
    try:
        from hnm.data import glyphs  # where the data helper may move it
    except ImportError:
        from hnm import glyphs
    return glyphs


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
def _objective(name: str):
    from hnm import objectives
    return objectives.get(name, **OBJECTIVE_OPTS[name])


def load_data(test_images: int):
    import numpy as np
    glyphs = _glyphs()
    x_tr, y_tr = glyphs.load_glyphs("train")
    x_te, y_te = glyphs.load_glyphs("test")
    return (np.asarray(x_tr, np.float32), np.asarray(y_tr), np.asarray(x_te[:test_images],
            np.float32), np.asarray(y_te[:test_images]), np.asarray(x_te, np.float32),
            np.asarray(y_te))


def class_table(labels):
    """[C, max_count] row indices per class (padded with the class's first row) and counts."""
    import numpy as np
    classes = np.unique(labels)
    rows = [np.flatnonzero(labels == c) for c in classes]
    width = max(len(r) for r in rows)
    table = np.stack([np.pad(r, (0, width - len(r)), mode="edge") for r in rows])
    return table.astype(np.int32), np.array([len(r) for r in rows], np.int32)


def sample_pk(key, table, counts, p: int, k: int):
    """P distinct classes, K distinct samples of each: ([P*K] row indices, [P*K] labels)."""
    import jax
    import jax.numpy as jnp
    k_cls, k_row = jax.random.split(key)
    classes = jax.random.choice(k_cls, table.shape[0], (p,), replace=False)
    u = jax.random.uniform(k_row, (p, table.shape[1]))
    u = jnp.where(jnp.arange(table.shape[1])[None] < counts[classes][:, None], u, 2.0)
    pick = jnp.argsort(u, axis=1)[:, :k]
    rows = table[classes[:, None], pick]
    return rows.reshape(-1), jnp.repeat(classes, k)


@functools.lru_cache(maxsize=None)
def _model(dim: int):
    from hnm import models
    return models.create({"backbone": "mlp", "embedding_dim": dim})


def train_cell(objective: str, p: int, k: int, dim: int, steps: int, seeds: int, data,
               learning_rate: float = 1e-3):
    """Trains ``seeds`` networks at once (vmap); returns (initial params, final params,
    per-step training losses [seeds, steps])."""
    import jax
    import jax.numpy as jnp
    import optax

    x_tr, y_tr = data
    table, counts = (jnp.asarray(a) for a in class_table(y_tr))
    images = jnp.asarray(x_tr)
    model = _model(dim)
    objective_fn = _objective(objective)
    opt = optax.adam(learning_rate)

    def one_seed(key):
        k_init, k_data = jax.random.split(key)
        params = model.init(k_init, images[:1])
        state = opt.init(params)

        def step(carry, step_key):
            params, state = carry
            rows, labels = sample_pk(step_key, table, counts, p, k)

            def loss_fn(params):
                loss, _ = objective_fn(model.apply(params, images[rows]), labels)
                return loss

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (final, _), losses = jax.lax.scan(step, (params, state),
                                          jax.random.split(k_data, steps))
        return params, final, losses

    keys = jax.random.split(jax.random.PRNGKey(1000 * p + 10 * k + dim), seeds)
    return jax.jit(jax.vmap(one_seed))(keys)


def evaluate_cell(objective, p, k, dim, params0, params1, losses, test, diso_steps):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from hnm import analysis

    glyphs = _glyphs()
    x_te, y_te, x_all, y_all = test
    model = _model(dim)
    embed = jax.jit(jax.vmap(model.apply, in_axes=(0, None)))
    diag_fn = jax.jit(functools.partial(analysis.collapse_diagnostics, margin=DIAG_MARGIN,
                                        block_size=1024))
    emb0, emb1 = np.asarray(embed(params0, x_te)), np.asarray(embed(params1, x_te))
    table, counts = class_table(y_all)
    rows, labels = sample_pk(jax.random.PRNGKey(7), jnp.asarray(table), jnp.asarray(counts),
                             p, k)
    batch = jnp.asarray(x_all)[rows]
    emb_b = embed(params1, batch)
    kind = COLLAPSE_KIND[objective]
    collapse_value = analysis.loss_collapse_value(kind, margin=DIAG_MARGIN)
    out = dict(collapsed=[], abs_collapsed=[], r1=[], lower=[], upper=[], spread=[],
               loss_ratio=[])
    bounds = jax.jit(functools.partial(analysis.diso_bounds, margin=DIAG_MARGIN,
                                       num_steps=diso_steps))
    for s in range(emb1.shape[0]):
        d0 = {k_: float(v) for k_, v in diag_fn(emb0[s], y_te).items()}
        d1 = {k_: float(v) for k_, v in diag_fn(emb1[s], y_te).items()}
        final_loss = float(np.mean(np.asarray(losses[s, -20:])))
        ratio = final_loss / collapse_value
        out["collapsed"].append(bool(analysis.is_collapsed_relative(d1, d0, loss_ratio=ratio)))
        out["abs_collapsed"].append(bool(analysis.is_collapsed(d1)))
        out["r1"].append(glyphs.recall_at_1(emb1[s], y_te))
        b = bounds(emb_b[s], labels)
        out["lower"].append(float(b["lower"]))
        out["upper"].append(float(b["upper"]))
        out["spread"].append(float(analysis.spread_ratio(d1, d0)))
        out["loss_ratio"].append(ratio)
    return out


def _cell_key(obj, p, k, d):
    return f"{obj}/P{p}/K{k}/d{d}"


def run(args_ps, args_dims, k, k4_p, steps, seeds, objectives_, test_images, diso_steps,
        log=print, cells_path=None):
    """Runs every cell not yet in ``cells_path`` (a JSON-lines file, one row per finished
    cell, appended as cells finish so that an interrupted sweep resumes); returns all rows."""
    import numpy as np
    from hnm import analysis

    done = {}
    if cells_path and os.path.exists(cells_path):
        with open(cells_path) as fh:
            for line in fh:
                if line.strip():
                    r = json.loads(line)
                    if r["steps"] == steps and r["seeds"] == seeds:
                        done[_cell_key(r["objective"], r["classes_per_batch"],
                                       r["samples_per_class"], r["embedding_dim"])] = r
    cells = []
    for o in objectives_:  # objective by objective, each with its K = 4 row
        cells += [(o, p, k, d) for p in args_ps for d in args_dims]
        cells += [(o, k4_p, 4, d) for d in args_dims] if k4_p is not None else []
    todo = [c for c in cells if _cell_key(*c) not in done]
    data = load_data(test_images) if todo else None
    rows, t0 = [], time.time()
    for i, (obj, p, kk, d) in enumerate(cells):
        if _cell_key(obj, p, kk, d) in done:
            rows.append(done[_cell_key(obj, p, kk, d)])
            continue
        x_tr, y_tr, x_te, y_te, x_all, y_all = data
        params0, params1, losses = train_cell(obj, p, kk, d, steps, seeds, (x_tr, y_tr))
        ev = evaluate_cell(obj, p, kk, d, params0, params1, losses,
                           (x_te, y_te, x_all, y_all), diso_steps)
        pred = analysis.collapse_boundary(p, d, DIAG_MARGIN)
        row = dict(objective=obj, classes_per_batch=p, samples_per_class=kk,
                   embedding_dim=d, steps=steps, seeds=seeds,
                   collapse_fraction=float(np.mean(ev["collapsed"])),
                   spread_collapse_fraction=float(np.mean(np.array(ev["spread"]) <
                                                          analysis.DEFAULT_SPREAD_RATIO)),
                   abs_collapse_fraction=float(np.mean(ev["abs_collapsed"])),
                   **{"r@1": float(np.mean(ev["r1"])), "r@1_std": float(np.std(ev["r1"]))},
                   diso_lower=float(np.mean(ev["lower"])),
                   diso_upper=float(np.mean(ev["upper"])),
                   spread_ratio=float(np.mean(ev["spread"])),
                   loss_ratio=float(np.mean(ev["loss_ratio"])),
                   per_seed=dict(collapsed=ev["collapsed"], r1=ev["r1"],
                                 spread_ratio=ev["spread"], loss_ratio=ev["loss_ratio"],
                                 diso_lower=ev["lower"], diso_upper=ev["upper"]),
                   capacity=int(pred["capacity"]),
                   predicted=bool(pred["collapse_predicted"]))
        rows.append(row)
        if cells_path:
            with open(cells_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        log(f"[{i + 1}/{len(cells)}] {obj:10s} P={p:3d} K={kk} d={d:3d}  "
            f"collapse={row['collapse_fraction']:.2f} (abs {row['abs_collapse_fraction']:.2f})"
            f"  R@1={row['r@1']:.3f}  d_iso in [{row['diso_lower']:.3f}, "
            f"{row['diso_upper']:.3f}]  spread={row['spread_ratio']:.2f} "
            f"loss/collapse={row['loss_ratio']:.2f}  predicted={row['predicted']}  "
            f"({time.time() - t0:.0f}s)", flush=True)
    return rows


TABLE_KEYS = ["objective", "classes_per_batch", "samples_per_class", "embedding_dim",
              "collapse_fraction", "spread_collapse_fraction", "abs_collapse_fraction", "r@1", "r@1_std", "diso_lower",
              "diso_upper", "spread_ratio", "loss_ratio", "capacity", "predicted"]


def markdown_table(rows: list[dict], keys: list[str] = TABLE_KEYS) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/collapse")
    p.add_argument("--variant", choices=sorted(GRIDS), default="default")
    p.add_argument("--objectives", nargs="*", default=None)
    p.add_argument("--ps", nargs="*", type=int, default=None, help="classes per batch")
    p.add_argument("--dims", nargs="*", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--no_k4", action="store_true", help="skip the K = 4 row")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing: table and picture of every cell in OUT/cells.jsonl")
    args = p.parse_args(argv)
    g = dict(GRIDS[args.variant])
    for name in ("objectives", "ps", "dims", "steps", "seeds"):
        if getattr(args, name) is not None:
            g[name] = tuple(getattr(args, name)) if name in ("objectives", "ps", "dims") \
                else getattr(args, name)
    if args.no_k4:
        g["k4_p"] = None
    from hnm import plots

    os.makedirs(args.out, exist_ok=True)
    if args.report_only:
        with open(os.path.join(args.out, "cells.jsonl")) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        g = dict(g, steps=rows[0]["steps"], seeds=rows[0]["seeds"],
                 objectives=tuple(dict.fromkeys(r["objective"] for r in rows)))
        return _write(args.out, g, rows, plots)
    rows = run(g["ps"], g["dims"], g["k"], g["k4_p"], g["steps"], g["seeds"],
               g["objectives"], g["test_images"], g["diso_steps"],
               cells_path=os.path.join(args.out, "cells.jsonl"))
    return _write(args.out, g, rows, plots)


def _write(out, g, rows, plots):
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump(dict(config={k: list(v) if isinstance(v, tuple) else v
                               for k, v in g.items()}, rows=rows), f, indent=2)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(markdown_table(rows) + "\n")
    plots.plot_collapse_phase_diagram(rows, os.path.join(out, "phase_diagram.png"),
                                      steps=g["steps"], seeds=g["seeds"])
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
