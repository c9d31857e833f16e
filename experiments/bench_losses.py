"""Times every objective's jitted forward + backward against the bare similarity matmul.

  python experiments/bench_losses.py              # the grid of docs/bench_losses_cpu.md
  python experiments/bench_losses.py --quick      # a few small sizes, seconds (smoke run)
  python experiments/bench_losses.py --no_stream  # only the batch grid
  python experiments/bench_losses.py --objectives ephn arcface --sizes 1024  # a selection

Batch grid: for each (B, D), P x K labels (K = 4), ``jax.value_and_grad`` with respect to the
embeddings of every objective in ``hnm.objectives.names()`` (or ``--objectives``): the six
triplet objectives at every B of ``--sizes``, the others at ``--other_sizes`` (default 1024).
A parametric objective (``hnm.objectives.is_parametric``: proxies, class centres, beta) runs
``apply`` with the parameters of its ``init(key, B / K classes, D)``, differentiated with
respect to the embeddings only (the parameters are a constant input). The "1x" *limit* is the faster of
JAX's and torch's bare similarity matmul forward + backward (``sum((e @ e.T) * g)``: three
B x B x D matmuls), each measured twice, at the start and at the end of the row, and the row
uses the minimum of these and of JAX's limit timed in alternation with every objective (so
that a load spike cannot make the limit look slow): a per-anchor objective needs one such matmul (mining, no
gradient) plus O(B D) work, so about 1/3x plus one pass over the B^2 values is its floor.
Milliseconds are best-of-N. When ``torch`` and ``pytorch_metric_learning`` import, PML's
``TripletMarginLoss`` with a ``BatchHardMiner`` (next to ``batch_hard``), without a miner (all
triplets, next to ``batch_all``) and with a semi-hard ``TripletMarginMiner`` (next to
``semihard``) run on the same inputs in the same row (``torch.set_num_threads(2)``), and so
does PML's loss of the same name for the other objectives (:data:`PML_LOSSES`, PML's options
set to hnm's defaults; the parametric ones with ``B / K`` classes, backward with respect to
embeddings and parameters); PML's all-triplet paths build a B^3 mask, so they are skipped
above ``--pml_max_b``.

At the end the script prints ``## Summary`` tables ready to paste into the README and
``docs/bench_losses_cpu.md``: ratios to the limit, cells that miss the targets of issue 13
in bold (:data:`TARGETS`).

Streaming grid: B anchors against a cross-batch memory of M rows (``memory=``), per
objective: the time as a multiple of one B x M x D matmul (the faster of JAX and torch,
forward only, measured before and after the row) and the peak temporary bytes XLA reports
for the compiled forward + backward (``compiled.memory_analysis().temp_size_in_bytes``),
next to what the dense B x M matrix alone would take. Memory labels: past P x K batches, in
which each class of the current batch appears once (4 rows), the rest other classes; so an
anchor has 3 + 4 positives.

The load average of the machine is printed at the start and the end: on a shared machine
only the ratios mean something, and those too only roughly when the load exceeds the cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the path tweak)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hnm import memory as memory_lib  # noqa: E402
from hnm import objectives  # noqa: E402

K = 4
MARGIN = 0.2
PML_PEERS = {"batch_hard": "batch_hard", "batch_all": "all", "semihard": "semihard"}
STREAMED = ("ephn", "epshn", "sct", "batch_hard", "semihard", "batch_all")
PER_ANCHOR = ("ephn", "epshn", "sct", "batch_hard")
# Issue 13's targets, x the limit at (D <= 128, D > 128); streaming: x one B x M x D matmul.
TARGETS = {**{n: (1.0, 0.5) for n in PER_ANCHOR}, "semihard": (2.5, 1.2),
           "batch_all": (1.5, 1.0)}
STREAM_TARGET, STREAM_TEMP_MIB = 1.5, 64.0
# PML's loss with hnm's default options: name -> (class name, kwargs, needs B^3 memory:
# False, True (a B^3 mask: up to --pml_max_b) or "quartic" (B^3 floats, several: up to
# PML_QUARTIC_MAX_B; at B = 1024 PML's SmoothAPLoss was killed for memory)).
# Parametric ones also get num_classes and embedding_size. Angles: PML takes degrees.
PML_LOSSES = {
    "contrastive": ("ContrastiveLoss", dict(pos_margin=0.0, neg_margin=1.0), False),
    "multi_similarity": ("MultiSimilarityLoss", dict(alpha=2.0, beta=50.0, base=0.5), False),
    "supcon": ("SupConLoss", dict(temperature=0.1), False),
    "circle": ("CircleLoss", dict(m=0.4, gamma=80.0), False),
    "lifted_structure": ("LiftedStructureLoss", dict(pos_margin=0.0, neg_margin=1.0),
                         "quartic"),  # 25 s at B = 512, several B^3 tensors
    "generalized_lifted_structure": ("GeneralizedLiftedStructureLoss",
                                     dict(pos_margin=0.0, neg_margin=1.0), False),
    "n_pairs": ("NPairsLoss", {}, False),
    "ntxent": ("NTXentLoss", dict(temperature=0.07), "quartic"),  # 15 s at B = 512
    "tuplet_margin": ("TupletMarginLoss", dict(margin=5.73, scale=64.0),
                      "quartic"),  # 21 s at B = 512
    "fast_ap": ("FastAPLoss", dict(num_bins=10), False),
    "histogram": ("HistogramLoss", dict(n_bins=100), "quartic"),  # pairs x bins, OOM at 1024
    "smooth_ap": ("SmoothAPLoss", dict(temperature=0.01), "quartic"),  # B^3 floats
    "proxy_nca": ("ProxyNCALoss", dict(softmax_scale=1.0), False),
    "proxy_anchor": ("ProxyAnchorLoss", dict(margin=0.1, alpha=32.0), False),
    "norm_softmax": ("NormalizedSoftmaxLoss", dict(temperature=0.05), False),
    "arcface": ("ArcFaceLoss", dict(margin=28.6, scale=64.0), False),
    "cosface": ("CosFaceLoss", dict(margin=0.35, scale=64.0), False),
    "sub_center_arcface": ("SubCenterArcFaceLoss", dict(margin=28.6, scale=64.0,
                                                        sub_centers=3), False),
    "soft_triple": ("SoftTripleLoss", dict(centers_per_class=10, la=20.0, gamma=0.1,
                                           margin=0.01), False),
    "margin": ("MarginLoss", dict(margin=0.2, nu=0.0, beta=1.2, learn_beta=True),
               "quartic"),  # all triplets: OOM (14 GiB) at B = 1024
}
PML_QUARTIC_MAX_B = 256
PML_PARAMETRIC = ("proxy_nca", "proxy_anchor", "norm_softmax", "arcface", "cosface",
                  "sub_center_arcface", "soft_triple")


def _best(call, min_reps: int = 5, budget_s: float = 1.5, max_reps: int = 50) -> float:
    """Best wall milliseconds of a zero-argument call (after one warm-up call); a call slower
    than ``budget_s / 3`` is timed twice only."""
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - t0
    best, reps = float("inf"), 0
    if first > budget_s / 3:
        min_reps = 2
    if first > budget_s:  # slow: the warm-up counts as one of the two
        best, reps = first, 1
    start = time.perf_counter()
    while reps < min_reps or (time.perf_counter() - start < budget_s and reps < max_reps):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 1e3 * best


def _temp_mib(compiled) -> float:
    try:
        return compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # pylint: disable=broad-except
        return float("nan")  # not every backend reports it


def _compiled(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, _temp_mib(compiled)


def _problem(b: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    emb = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
    labels = jnp.asarray(np.repeat(np.arange(b // K), K), jnp.int32)
    return emb, labels


def _memory(b: int, m: int, d: int, seed: int = 1) -> memory_lib.Memory:
    """M past rows in groups of K: the batch's B / K classes once each, then new classes."""
    rng = np.random.default_rng(seed)
    groups = np.arange(m // K)
    groups = np.where(groups < b // K, groups, groups + b)  # other classes than the batch's
    rng.shuffle(groups)
    labels = np.repeat(groups, K)[:m]
    return memory_lib.Memory(jnp.asarray(rng.normal(size=(m, d)), jnp.float32),
                             jnp.asarray(labels, jnp.int32), jnp.zeros((), jnp.int32))


# ---------------------------------------------------------------------------------------------
# Limits.


def _torch():
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    torch.set_num_threads(2)
    return torch


def _limit_calls(emb: jax.Array, torch):
    """Zero-argument calls: JAX's and torch's ``sum((e @ e.T) * g)`` forward + backward."""
    b = emb.shape[0]
    g_np = np.random.default_rng(1).normal(size=(b, b)).astype(np.float32)
    g = jnp.asarray(g_np)
    jax_fn, _ = _compiled(jax.value_and_grad(lambda e: jnp.sum((e @ e.T) * g)), emb)
    calls = {"JAX": lambda: jax_fn(emb)}
    if torch is not None:
        te = torch.tensor(np.asarray(emb), requires_grad=True)
        tg = torch.tensor(g_np)

        def torch_call():
            te.grad = None
            (te @ te.T * tg).sum().backward()
        calls["torch"] = torch_call
    return calls


def _matmul_calls(emb: jax.Array, mem: jax.Array, torch):
    """Zero-argument calls: one B x M x D matmul (forward) in JAX and in torch."""
    jax_fn, _ = _compiled(lambda e, m: e @ m.T, emb, mem)
    calls = {"JAX": lambda: jax_fn(emb, mem)}
    if torch is not None:
        te, tm = torch.tensor(np.asarray(emb)), torch.tensor(np.asarray(mem))

        def torch_call():
            with torch.no_grad():
                te @ tm.T
        calls["torch"] = torch_call
    return calls


def _time_limits(calls, **kw) -> dict[str, float]:
    return {k: _best(c, **kw) for k, c in calls.items()}


def _race(call, limit_calls, seen: dict, min_reps: int = 5, budget_s: float = 1.5,
          max_reps: int = 50) -> float:
    """Best ms of ``call``, timed in alternation with JAX's limit call; the limit's times
    are folded into ``seen["JAX"]`` (a loaded machine hits both alike, and the row's limit
    is the minimum over every measurement)."""
    limit = limit_calls["JAX"]
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - t0
    best, reps = float("inf"), 0
    if first > budget_s / 3:
        min_reps = 2
    if first > budget_s:  # slow: the warm-up counts as one of the two
        best, reps = first, 1
    start = time.perf_counter()
    while reps < min_reps or (time.perf_counter() - start < budget_s and reps < max_reps):
        t0 = time.perf_counter()
        jax.block_until_ready(limit())
        seen["JAX"] = min(seen["JAX"], 1e3 * (time.perf_counter() - t0))
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 1e3 * best


# ---------------------------------------------------------------------------------------------
# Objectives and PML.


def _objective(name: str, emb: jax.Array, labels: jax.Array, mem=None):
    """``(zero-argument call, temp MiB)``: the compiled forward + backward wrt ``emb``."""
    key = jax.random.key(0)  # for the sampling objectives (distance_weighted)
    if objectives.is_parametric(name):
        obj = objectives.get(name)
        params = obj.init(jax.random.key(1), emb.shape[0] // K, emb.shape[1])
        if mem is not None:
            raise ValueError(f"{name}: the streaming grid has no parametric objectives.")

        def loss_p(e, y, p):
            return obj.apply(p, e, y, key)[0]
        fn, temp = _compiled(jax.value_and_grad(loss_p), emb, labels, params)
        return (lambda: fn(emb, labels, params)), temp
    fn = objectives.get(name)

    if mem is None:
        def loss(e, y):
            return fn(e, y, key)[0]
        compiled, temp = _compiled(jax.value_and_grad(loss), emb, labels)
        return (lambda: compiled(emb, labels)), temp

    def loss_mem(e, y, mm):
        return fn(e, y, key, memory=mm)[0]
    compiled, temp = _compiled(jax.value_and_grad(loss_mem), emb, labels, mem)
    return (lambda: compiled(emb, labels, mem)), temp


def _pml(torch):
    # pylint: disable=import-outside-toplevel
    if torch is None:
        return None
    try:
        from pytorch_metric_learning import losses as pml_losses
        from pytorch_metric_learning import miners as pml_miners
    except ImportError:
        return None
    loss_fn = pml_losses.TripletMarginLoss(margin=MARGIN)
    miner = {"batch_hard": pml_miners.BatchHardMiner(),
             "semihard": pml_miners.TripletMarginMiner(margin=MARGIN,
                                                       type_of_triplets="semihard"),
             "all": None}

    def run(kind: str, emb: np.ndarray, labels: np.ndarray):
        """A zero-argument call doing PML's forward + backward on fresh leaf tensors; ``kind``
        a key of :data:`PML_PEERS`' values or of :data:`PML_LOSSES`."""
        e = torch.tensor(emb, requires_grad=True)
        y = torch.tensor(np.asarray(labels, np.int64))  # PML's one-hot scatters need int64
        fn, m = loss_fn, miner.get(kind)
        if kind in PML_LOSSES:
            cls, kw, _ = PML_LOSSES[kind]
            kw = dict(kw)
            if kind in PML_PARAMETRIC:
                kw.update(num_classes=emb.shape[0] // K, embedding_size=emb.shape[1])
            elif kind == "margin":
                kw.update(num_classes=emb.shape[0] // K)
            fn = getattr(pml_losses, cls)(**kw)
            if kind == "multi_similarity":  # hnm's epsilon is the miner's
                m = pml_miners.MultiSimilarityMiner(epsilon=0.1)

        def step():
            e.grad = None
            loss = fn(e, y) if m is None else fn(e, y, m(e, y))
            loss.backward()
        return step
    return run


def _fmt_limits(first: dict, last: dict) -> str:
    return ", ".join(f"{k} {first[k]:.2f}/{last[k]:.2f}" for k in first)


def _pml_kind(name: str):
    """PML's counterpart of objective ``name`` and whether it needs B^3 memory."""
    if name in PML_PEERS:
        return PML_PEERS[name], name != "batch_hard"
    if name in PML_LOSSES:
        return name, PML_LOSSES[name][2]
    return None, False


def batch_grid(sizes, dims, names, pml, pml_max_b, torch, pml_missing, summary,
               other_sizes=(1024,)):
    print("| objective | B | D | ms | x limit | temp MiB | PML ms | hnm speed-up vs PML |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for d in dims:
        for b in sorted(set(sizes) | set(other_sizes)):
            row_names = [n for n in names if (n in STREAMED and b in sizes)
                         or (n not in STREAMED and b in other_sizes)]
            if not row_names:
                continue
            emb, labels = _problem(b, d)
            limit_calls = _limit_calls(emb, torch)
            first = _time_limits(limit_calls)
            seen = dict(first)
            rows = []
            for name in row_names:
                try:
                    call, mem = _objective(name, emb, labels)
                    ms = _race(call, limit_calls, seen)
                    del call
                except Exception as err:  # pylint: disable=broad-except
                    # One objective failing (e.g. out of memory) must not lose the grid.
                    print(f"<!-- {name} B={b} D={d} failed: {type(err).__name__}: "
                          f"{str(err)[:200]} -->", flush=True)
                    continue
                pml_ms, speedup = "", ""
                kind, cubic = _pml_kind(name)
                if kind is not None and pml is None:
                    pml_ms = pml_missing
                elif kind is not None and cubic and b > (
                        PML_QUARTIC_MAX_B if cubic == "quartic" else pml_max_b):
                    pml_ms = "skipped (B^3 mask)"
                elif kind is not None:
                    try:
                        t = _best(pml(kind, np.asarray(emb), np.asarray(labels)), min_reps=3)
                        pml_ms, speedup = f"{t:.2f}", f"{t / ms:.1f}x"
                    except Exception as err:  # pylint: disable=broad-except
                        pml_ms = f"PML error: {type(err).__name__}"
                rows.append((name, ms, mem, pml_ms, speedup))
            last = _time_limits(limit_calls)
            limit = min(min(first.values()), min(last.values()), min(seen.values()))
            print(f"| limit: min matmul fwd+bwd ({_fmt_limits(first, last)}) | {b} | {d} | "
                  f"{limit:.2f} | 1.00 | | | |", flush=True)
            for name, ms, mem, pml_ms, speedup in rows:
                print(f"| {name} | {b} | {d} | {ms:.2f} | {ms / limit:.2f} | {mem:.1f} | "
                      f"{pml_ms} | {speedup} |", flush=True)
                summary.setdefault(name, {})[(b, d)] = (ms / limit, speedup or pml_ms)
            summary.setdefault("_limit", {})[(b, d)] = (limit, "")


def stream_grid(b, dims, mems, names, torch, summary):
    print("\n| objective | B | M | D | ms | x B·M·D matmul | temp MiB | dense B x M f32 MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for d in dims:
        for m in mems:
            emb, labels = _problem(b, d)
            mem = _memory(b, m, d)
            calls = _matmul_calls(emb, mem.embeddings, torch)
            kw = dict(min_reps=2, budget_s=0.5, max_reps=3)
            first = _time_limits(calls, **kw)
            seen = dict(first)
            rows = []
            for name in names:
                call, temp = _objective(name, emb, labels, mem)
                ms = _race(call, calls, seen, **kw)
                rows.append((name, ms, temp))
                del call
            last = _time_limits(calls, **kw)
            limit = min(min(first.values()), min(last.values()), min(seen.values()))
            dense = b * m * 4 / 2**20
            print(f"| limit: one matmul ({_fmt_limits(first, last)}) | {b} | {m} | {d} | "
                  f"{limit:.1f} | 1.00 | | |", flush=True)
            for name, ms, temp in rows:
                print(f"| {name} | {b} | {m} | {d} | {ms:.1f} | {ms / limit:.2f} | "
                      f"{temp:.1f} | {dense:.0f} |", flush=True)
                summary.setdefault(name, {})[("M", m, d)] = (ms / limit, temp)
            summary.setdefault("_stream_limit", {})[(m, d)] = limit


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _misses(name: str, d: int, ratio: float) -> bool:
    if name not in TARGETS:
        return False
    return ratio > TARGETS[name][0 if d <= 128 else 1]


def _cell(ratio: float, miss: bool, extra: str = "") -> str:
    text = f"{ratio:.2f}×"
    text = f"**{text}**" if miss else text
    return f"{text} ({extra})" if extra else text


def _pml_note(note: str) -> str:
    if not note or note.startswith(("off", "not installed")):
        return ""
    if note.endswith("x"):
        return f"{note[:-1]}× vs PML"
    if note.startswith("skipped"):
        return "PML: B³ mask, skipped"
    return note


def print_summary(summary: dict, names, sizes, other_sizes, dims, stream_m, stream_b,
                  loads) -> None:
    """The markdown tables of the README / docs: ratios, misses of :data:`TARGETS` bold."""
    print(f"\n## Summary\n\nLoad: {loads[0]} at the start, {loads[1]} at the end "
          f"({os.cpu_count()} cores). Bold: misses issue 13's target "
          "(per-anchor ≤ 1.0× / 0.5×, semihard ≤ 2.5× / 1.2×, batch_all ≤ 1.5× / 1.0× at "
          f"D = 64 / 512; streaming ≤ {STREAM_TARGET}× one B×M×D matmul and ≤ "
          f"{STREAM_TEMP_MIB:.0f} MiB at M = 262,144, D = 64).\n")
    limits = summary.get("_limit", {})

    def table(cols, rows):
        cols = [c for c in cols if c in limits]  # the sizes that ran
        if not cols or not rows:
            return
        print("| objective | " + " | ".join(f"B={b}, D={d}" for b, d in cols) + " |")
        print("|---|" + "---|" * len(cols))
        print("| limit (1×), ms | " + " | ".join(
            f"{limits[c][0]:.2f}" if c in limits else "" for c in cols) + " |")
        for name in rows:
            cells = []
            for b, d in cols:
                got = summary.get(name, {}).get((b, d))
                cells.append("" if got is None else _cell(got[0], _misses(name, d, got[0]),
                                                          _pml_note(got[1])))
            print(f"| `{name}` | " + " | ".join(cells) + " |")
        print()

    table([(b, d) for d in dims for b in sizes], [n for n in names if n in STREAMED])
    table([(b, d) for d in dims for b in other_sizes], [n for n in names if n not in STREAMED])
    slim = summary.get("_stream_limit", {})
    cols = [(m, d) for d in dims for m in stream_m if (m, d) in slim]
    streamed = [n for n in names if n in STREAMED]
    if not cols or not streamed:
        return
    print(f"| objective (B = {stream_b}) | " + " | ".join(f"M={m}, D={d}" for m, d in cols)
          + " |")
    print("|---|" + "---|" * len(cols))
    print("| one B×M×D matmul (1×), ms | " + " | ".join(f"{slim[c]:.1f}" for c in cols) + " |")
    print("| dense B×M f32 matrix | " + " | ".join(
        f"{stream_b * m * 4 / 2**20:.0f} MiB" for m, _ in cols) + " |")
    for name in streamed:
        cells = []
        for m, d in cols:
            got = summary.get(name, {}).get(("M", m, d))
            if got is None:
                cells.append("")
                continue
            ratio, temp = got
            slow = ratio > STREAM_TARGET
            big = m >= 262144 and d <= 64 and temp > STREAM_TEMP_MIB
            r = f"**{ratio:.2f}×**" if slow else f"{ratio:.2f}×"
            t = f"**{temp:.0f} MiB**" if big else f"{temp:.0f} MiB"
            cells.append(f"{r} / {t}")
        print(f"| `{name}` | " + " | ".join(cells) + " |")
    print()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few small sizes only")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--dims", type=int, nargs="*", default=None)
    parser.add_argument("--objectives", nargs="*", default=None,
                        help="a selection of hnm.objectives.names() (default: all)")
    parser.add_argument("--other_sizes", type=int, nargs="*", default=None,
                        help="B for the objectives other than the six triplet ones "
                             "(default 1024; none: skip them)")
    parser.add_argument("--pml_max_b", type=int, default=1024,
                        help="largest B for PML's all-triplet / semi-hard paths (B^3 memory)")
    parser.add_argument("--no_pml", action="store_true")
    parser.add_argument("--no_batch", action="store_true", help="skip the batch grid")
    parser.add_argument("--no_stream", action="store_true", help="skip the streaming grid")
    parser.add_argument("--stream_b", type=int, default=1024)
    parser.add_argument("--stream_m", type=int, nargs="*", default=None)
    args = parser.parse_args(argv)
    sizes = args.sizes or ([128, 512] if args.quick else [512, 1024, 2048, 4096])
    dims = args.dims or ([64] if args.quick else [64, 512])
    names = args.objectives or objectives.names()
    unknown = sorted(set(names) - set(objectives.names()))
    if unknown:
        parser.error(f"unknown objectives {unknown}; known: {objectives.names()}")
    if args.other_sizes is not None:
        other_sizes = args.other_sizes
    else:
        other_sizes = [128] if args.quick else [1024]
    stream_m = args.stream_m or ([2048] if args.quick else [16384, 65536, 262144])
    stream_b = 256 if args.quick and args.stream_b == 1024 else args.stream_b
    torch = _torch()
    pml = None if args.no_pml else _pml(torch)
    pml_missing = "off (--no_pml)" if args.no_pml else "not installed"

    start_load, t_start = _load(), time.perf_counter()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores), "
          f"torch {getattr(torch, '__version__', 'absent')}; {start_load} at the start.\n")
    print("P x K labels with K = 4; forward + backward wrt the embeddings; best-of-N ms; the "
          "limit is the faster of JAX's and torch's bare matmul fwd+bwd, timed at the start "
          "and the end of the row (ms shown as start/end) and JAX's also in alternation with "
          "every objective; the minimum of all is used.\n")
    summary: dict = {}
    if not args.no_batch:
        batch_grid(sizes, dims, names, pml, args.pml_max_b, torch, pml_missing, summary,
                   other_sizes)
    if not args.no_stream:
        stream_grid(stream_b, dims, stream_m, [n for n in names if n in STREAMED], torch,
                    summary)
    end_load = _load()
    print(f"\n{end_load} at the end ({time.perf_counter() - t_start:.0f} s in all).")
    print_summary(summary, names, sizes, other_sizes, dims, stream_m, stream_b,
                  (start_load, end_load))


if __name__ == "__main__":
    main()
