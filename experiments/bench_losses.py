"""Times every objective's jitted forward + backward against the bare similarity matmul.

  python experiments/bench_losses.py              # the grid of docs/bench_losses_cpu.md
  python experiments/bench_losses.py --quick      # a few small sizes, seconds (smoke run)
  python experiments/bench_losses.py --no_stream  # only the batch grid

Batch grid: for each (B, D), P x K labels (K = 4), ``jax.value_and_grad`` with respect to the
embeddings of every objective in ``hnm.objectives.names()``. The "1x" *limit* is the faster of
JAX's and torch's bare similarity matmul forward + backward (``sum((e @ e.T) * g)``: three
B x B x D matmuls), each measured twice, at the start and at the end of the row, and the row
uses the minimum of these and of JAX's limit timed in alternation with every objective (so
that a load spike cannot make the limit look slow): a per-anchor objective needs one such matmul (mining, no
gradient) plus O(B D) work, so about 1/3x plus one pass over the B^2 values is its floor.
Milliseconds are best-of-N. When ``torch`` and ``pytorch_metric_learning`` import, PML's
``TripletMarginLoss`` with a ``BatchHardMiner`` (next to ``batch_hard``), without a miner (all
triplets, next to ``batch_all``) and with a semi-hard ``TripletMarginMiner`` (next to
``semihard``) run on the same inputs in the same row (``torch.set_num_threads(2)``); PML's
all-triplet paths build a B^3 mask, so they are skipped above ``--pml_max_b``.

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


def _best(call, min_reps: int = 5, budget_s: float = 1.5, max_reps: int = 50) -> float:
    """Best wall milliseconds of a zero-argument call (after one warm-up call)."""
    jax.block_until_ready(call())
    best, start, reps = float("inf"), time.perf_counter(), 0
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
    jax.block_until_ready(call())
    best, start, reps = float("inf"), time.perf_counter(), 0
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
    fn = objectives.get(name)
    key = jax.random.key(0)  # for the sampling objectives (distance_weighted)

    if mem is None:
        def loss(e, y):
            return fn(e, y, key)[0]
        return _compiled(jax.value_and_grad(loss), emb, labels)

    def loss_mem(e, y, mm):
        return fn(e, y, key, memory=mm)[0]
    return _compiled(jax.value_and_grad(loss_mem), emb, labels, mem)


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
        """A zero-argument call doing PML's forward + backward on fresh leaf tensors."""
        e = torch.tensor(emb, requires_grad=True)
        y = torch.tensor(labels)

        def step():
            e.grad = None
            m = miner[kind]
            loss = loss_fn(e, y) if m is None else loss_fn(e, y, m(e, y))
            loss.backward()
        return step
    return run


def _fmt_limits(first: dict, last: dict) -> str:
    return ", ".join(f"{k} {first[k]:.2f}/{last[k]:.2f}" for k in first)


def batch_grid(sizes, dims, names, pml, pml_max_b, torch, pml_missing, summary):
    print("| objective | B | D | ms | x limit | temp MiB | PML ms | hnm speed-up vs PML |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for d in dims:
        for b in sizes:
            emb, labels = _problem(b, d)
            limit_calls = _limit_calls(emb, torch)
            first = _time_limits(limit_calls)
            seen = dict(first)
            rows = []
            for name in names:
                fn, mem = _objective(name, emb, labels)
                ms = _race(lambda fn=fn: fn(emb, labels), limit_calls, seen)
                pml_ms, speedup = "", ""
                kind = PML_PEERS.get(name)
                if kind is not None and pml is None:
                    pml_ms = pml_missing
                elif kind is not None and kind != "batch_hard" and b > pml_max_b:
                    pml_ms = "skipped (B^3 mask)"
                elif kind is not None:
                    t = _best(pml(kind, np.asarray(emb), np.asarray(labels)), min_reps=3)
                    pml_ms, speedup = f"{t:.2f}", f"{t / ms:.1f}x"
                rows.append((name, ms, mem, pml_ms, speedup))
            last = _time_limits(limit_calls)
            limit = min(min(first.values()), min(last.values()), min(seen.values()))
            print(f"| limit: min matmul fwd+bwd ({_fmt_limits(first, last)}) | {b} | {d} | "
                  f"{limit:.2f} | 1.00 | | | |", flush=True)
            for name, ms, mem, pml_ms, speedup in rows:
                print(f"| {name} | {b} | {d} | {ms:.2f} | {ms / limit:.2f} | {mem:.1f} | "
                      f"{pml_ms} | {speedup} |", flush=True)
                summary.setdefault(name, {})[(b, d)] = (ms / limit, speedup)
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
                fn, temp = _objective(name, emb, labels, mem)
                ms = _race(lambda fn=fn: fn(emb, labels, mem), calls, seen, **kw)
                rows.append((name, ms, temp))
                del fn
            last = _time_limits(calls, **kw)
            limit = min(min(first.values()), min(last.values()), min(seen.values()))
            dense = b * m * 4 / 2**20
            print(f"| limit: one matmul ({_fmt_limits(first, last)}) | {b} | {m} | {d} | "
                  f"{limit:.1f} | 1.00 | | |", flush=True)
            for name, ms, temp in rows:
                print(f"| {name} | {b} | {m} | {d} | {ms:.1f} | {ms / limit:.2f} | "
                      f"{temp:.1f} | {dense:.0f} |", flush=True)
                summary.setdefault(name, {})[("M", m, d)] = (ms / limit, f"{temp:.0f} MiB")


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few small sizes only")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--dims", type=int, nargs="*", default=None)
    parser.add_argument("--objectives", nargs="*", default=None)
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
    stream_m = args.stream_m or ([2048] if args.quick else [16384, 65536, 262144])
    stream_b = 256 if args.quick and args.stream_b == 1024 else args.stream_b
    torch = _torch()
    pml = None if args.no_pml else _pml(torch)
    pml_missing = "off (--no_pml)" if args.no_pml else "not installed"

    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores), "
          f"torch {getattr(torch, '__version__', 'absent')}; {_load()} at the start.\n")
    print("P x K labels with K = 4; forward + backward wrt the embeddings; best-of-N ms; the "
          "limit is the faster of JAX's and torch's bare matmul fwd+bwd, timed at the start "
          "and the end of the row (ms shown as start/end) and JAX's also in alternation with "
          "every objective; the minimum of all is used.\n")
    summary: dict = {}
    if not args.no_batch:
        batch_grid(sizes, dims, names, pml, args.pml_max_b, torch, pml_missing, summary)
    if not args.no_stream:
        stream_grid(stream_b, dims, stream_m, [n for n in names if n in STREAMED], torch,
                    summary)
    print(f"\n{_load()} at the end.")


if __name__ == "__main__":
    main()
