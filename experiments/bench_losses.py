"""Times every objective's jitted forward + backward against the bare similarity matmul.

  python experiments/bench_losses.py            # B in {128, ..., 2048}, D in {64, 512}
  python experiments/bench_losses.py --quick    # a few sizes, seconds (smoke run)

For each (B, D) on P x K labels (K = 4) it times ``jax.value_and_grad`` with respect to the
embeddings of every objective in ``hnm.objectives.names()`` and, in the same run, of the
"1x" baseline ``sum((e @ e.T) * g)`` (one similarity matmul, forward and backward). It prints
a Markdown table: best-of-N milliseconds (each objective timed in alternation with the matmul,
so that a shared machine's load hits both alike), the ratio to that matmul, and the
compiled executable's temporary memory (``memory_analysis().temp_size_in_bytes``). When
``torch`` and
``pytorch_metric_learning`` import, a side-by-side column times PML's ``TripletMarginLoss``
with a ``BatchHardMiner`` (next to ``batch_hard``), without a miner (all triplets, next to
``batch_all``) and with a semi-hard ``TripletMarginMiner`` (next to ``semihard``) at
``torch.set_num_threads(2)``; PML's all-triplet paths build a B^3 mask, so they are skipped
above ``--pml_max_b``.
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

from hnm import objectives  # noqa: E402

K = 4
MARGIN = 0.2
PML_PEERS = {"batch_hard": "batch_hard", "batch_all": "all", "semihard": "semihard"}


def _race(*calls, min_reps: int = 5, budget_s: float = 1.5) -> list[float]:
    """Best wall milliseconds of each zero-argument call, timed in alternation.

    The machine is shared: alternating the calls exposes them to the same background load,
    and the minimum is the least disturbed run, so the ratios are fair.
    """
    for call in calls:
        jax.block_until_ready(call())  # warm-up (and compile, if any)
    best = [float("inf")] * len(calls)
    start, reps = time.perf_counter(), 0
    while reps < min_reps or (time.perf_counter() - start < budget_s and reps < 50):
        for i, call in enumerate(calls):
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            best[i] = min(best[i], time.perf_counter() - t0)
        reps += 1
    return [1e3 * b for b in best]


def _compiled(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # pylint: disable=broad-except
        temp = float("nan")  # not every backend reports it
    return compiled, temp


def _problem(b: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    emb = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
    labels = jnp.asarray(np.repeat(np.arange(b // K), K), jnp.int32)
    return emb, labels


def _baseline(b: int, emb: jax.Array):
    g = jnp.asarray(np.random.default_rng(1).normal(size=(b, b)), jnp.float32)

    def matmul(e):
        return jnp.sum((e @ e.T) * g)
    return _compiled(jax.value_and_grad(matmul), emb)


def _objective(name: str, emb: jax.Array, labels: jax.Array):
    fn = objectives.get(name)
    key = jax.random.key(0)  # for the sampling objectives (distance_weighted)

    def loss(e, y):
        return fn(e, y, key)[0]
    return _compiled(jax.value_and_grad(loss), emb, labels)


def _pml():
    # pylint: disable=import-outside-toplevel
    try:
        import torch
        from pytorch_metric_learning import losses as pml_losses
        from pytorch_metric_learning import miners as pml_miners
    except ImportError:
        return None
    torch.set_num_threads(2)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few small sizes only")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--dims", type=int, nargs="*", default=None)
    parser.add_argument("--objectives", nargs="*", default=None)
    parser.add_argument("--pml_max_b", type=int, default=1024,
                        help="largest B for PML's all-triplet / semi-hard paths (B^3 memory)")
    parser.add_argument("--no_pml", action="store_true")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([128, 512] if args.quick else [128, 256, 512, 1024, 2048])
    dims = args.dims or ([64] if args.quick else [64, 512])
    names = args.objectives or objectives.names()
    pml = None if args.no_pml else _pml()
    pml_missing = "off (--no_pml)" if args.no_pml else "not installed"

    print(f"jax {jax.__version__} on {jax.devices()[0].platform} "
          f"({os.cpu_count()} cores); P x K labels with K = {K}; forward + backward wrt "
          "embeddings; best-of-N ms, each objective timed in alternation with the matmul "
          "(its ratio); PML timed on its own.\n")
    print("| objective | B | D | ms | x matmul | temp MiB | PML ms | hnm speed-up vs PML |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for d in dims:
        for b in sizes:
            emb, labels = _problem(b, d)
            base_fn, base_mem = _baseline(b, emb)
            base_ms, = _race(lambda: base_fn(emb))
            print(f"| matmul (1x) | {b} | {d} | {base_ms:.2f} | 1.00 | {base_mem:.1f} | | |",
                  flush=True)
            for name in names:
                fn, mem = _objective(name, emb, labels)
                base_ms, ms = _race(lambda: base_fn(emb), lambda: fn(emb, labels))
                ratio = ms / base_ms
                pml_ms, speedup = "", ""
                kind = PML_PEERS.get(name)
                if kind is not None and pml is None:
                    pml_ms = pml_missing
                elif kind is not None and kind != "batch_hard" and b > args.pml_max_b:
                    pml_ms = "skipped (B^3 mask)"
                elif kind is not None:
                    # Timed on its own: PML's big allocations would disturb the JAX race.
                    t, = _race(pml(kind, np.asarray(emb), np.asarray(labels)), min_reps=3)
                    pml_ms, speedup = f"{t:.2f}", f"{t / ms:.1f}x"
                print(f"| {name} | {b} | {d} | {ms:.2f} | {ratio:.2f} | {mem:.1f} | "
                      f"{pml_ms} | {speedup} |", flush=True)


if __name__ == "__main__":
    main()
