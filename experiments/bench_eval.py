"""Times hnm's exact blocked retrieval metrics against faiss-cpu's exact IndexFlatIP search.

  python experiments/bench_eval.py            # N = 60,000, D = 512 (SOP's test size)
  python experiments/bench_eval.py --quick    # N = 3,000: a smoke test in seconds

Data: N random embeddings with about 5 per class (a class centre plus noise, normalised, so
the metrics are not trivially zero), evaluated leave-one-out with cosine similarity:
Recall@{1,2,4,8} + MAP@R + R-precision by ``hnm.metrics.retrieval_metrics``. When ``faiss``
imports (``pip install faiss-cpu==1.15.1``), the same run times ``IndexFlatIP.search`` for
k + 1 neighbours (it returns the query itself; hnm excludes it inside the search) with
k = max(max(ks), max R), and checks that both give the same Recall@K.

It then times the public search alone, ``hnm.search.knn`` (top-k, self excluded) beside
``IndexFlatIP.search``, and checks that ``hnm.search.Index`` gives the same Recall@1 with the
exact and the faiss backends (target: within 1e-4).

Prints the warm times (compilation reported separately), their ratio (target: hnm within
1.0x of faiss, issue 13) and the peak extra host memory of hnm's evaluation (target
< 1 GiB), measured as the rise of the process's resident-set high-water mark
(``/proc/self/clear_refs`` resets it first; ``ru_maxrss`` where that is unavailable), next
to the compiled block function's own scratch memory from XLA's ``memory_analysis``.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402  (after the path tweak, so the checkout's hnm is used)

from hnm import metrics, search  # noqa: E402

KS = (1, 2, 4, 8)
MIB = 1 << 20


def _proc_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Extra peak resident memory (bytes) of the code run inside the ``with`` block."""

    def __enter__(self):
        self.exact = _reset_peak()
        self.base = (_proc_kib("VmRSS") if self.exact
                     else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return self

    def __exit__(self, *exc):
        peak = (_proc_kib("VmHWM") if self.exact
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        self.extra = max(0, peak - self.base) * 1024


def make_data(n: int, dim: int, per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) // per_class).astype(np.int32)
    centers = rng.standard_normal((labels.max() + 1, dim), dtype=np.float32)
    emb = centers[labels]
    emb += 2.5 * rng.standard_normal((n, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, labels


def faiss_recalls(emb, labels, k, ks):
    """Exact IndexFlatIP search (k + 1, minus the query itself) -> (seconds, Recall@K)."""
    import faiss  # optional
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    start = time.perf_counter()
    _, idx = index.search(emb, k + 1)
    seconds = time.perf_counter() - start
    n = emb.shape[0]
    not_self = idx != np.arange(n)[:, None]
    # Keep the first k non-self neighbours of each row (self is usually first, not always).
    order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]
    nbrs = np.take_along_axis(idx, order, axis=1)
    rel = labels[nbrs] == labels[:, None]
    counts = np.bincount(labels)
    has_pos = counts[labels] > 1
    recalls = {f"recall@{kk}": float(rel[has_pos, :kk].any(1).mean()) for kk in ks}
    return seconds, recalls


def block_scratch_bytes(n, dim, k, block_size):
    """XLA's scratch-memory estimate of one compiled block (same shapes the run uses)."""
    bq, bg = search.block_shape(n, n, block_size)
    rows = max(-(-n // bq) * bq, -(-n // bg) * bg)
    emb = jax.ShapeDtypeStruct((rows, dim), np.float32)
    ints = jax.ShapeDtypeStruct((rows,), np.int32)
    compiled = metrics._query_block_metrics.lower(
        emb, ints, ints, emb, ints, jax.ShapeDtypeStruct((rows,), bool),
        jax.ShapeDtypeStruct((), np.int32), query_block=bq, gallery_block=bg,
        num_gallery_blocks=-(-n // bg), k=k, ks=KS, kind="cosine",
        exclude_self=True).compile()
    analysis = compiled.memory_analysis()
    return (bq, bg), (None if analysis is None else analysis.temp_size_in_bytes)


def knn_vs_faiss(emb, labels, k):
    """``hnm.search.knn`` (exact, blocked, all devices) next to faiss ``IndexFlatIP`` on the
    same leave-one-out top-k search; both through ``hnm.search.Index`` for Recall@1."""
    import faiss  # optional
    emb_dev = jax.device_put(emb)
    start = time.perf_counter()
    search.knn(emb_dev, None, k, exclude_self=True)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    _, idx = search.knn(emb_dev, None, k, exclude_self=True)
    warm = time.perf_counter() - start
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    start = time.perf_counter()
    index.search(emb, k + 1)
    seconds = time.perf_counter() - start
    fast = search.Index(backend="faiss")
    fast.add(emb, labels)
    nbrs = fast.search(emb, 1, exclude_self=True).labels[:, 0]
    has_pos = np.bincount(labels)[labels] > 1
    r1_exact = float((labels[idx[:, 0]] == labels)[has_pos].mean())
    r1_faiss = float((nbrs == labels)[has_pos].mean())
    print(f"knn   : {warm:8.2f} s warm ({cold:.2f} s with compilation) hnm.search.knn(k={k}, "
          f"exclude_self) on {len(jax.local_devices())} device(s)")
    print(f"faiss : {seconds:8.2f} s IndexFlatIP.search(k={k + 1})")
    print(f"ratio : knn / faiss = {warm / seconds:.2f} (target <= 1.0); Recall@1 exact "
          f"{r1_exact:.4f} vs Index(backend='faiss') {r1_faiss:.4f} "
          f"(|diff| = {abs(r1_exact - r1_faiss):.1e}, target <= 1e-4)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 3,000 smoke test")
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-faiss", action="store_true")
    args = parser.parse_args(argv)
    n = 3_000 if args.quick else args.n

    emb, labels = make_data(n, args.dim, args.per_class, args.seed)
    k = max(max(KS), int(np.bincount(labels).max()) - 1)
    print(f"N={n} D={args.dim} ~{args.per_class}/class, leave-one-out, k={k}, "
          f"backend={jax.default_backend()} ({jax.device_count()} device(s), "
          f"{os.cpu_count()} CPUs)")

    emb_dev = jax.device_put(emb)
    run = lambda: metrics.retrieval_metrics(emb_dev, labels, ks=KS,  # noqa: E731
                                            block_size=args.block_size)
    with PeakMemory() as mem:
        start = time.perf_counter()
        first = run()
        cold = time.perf_counter() - start
    start = time.perf_counter()
    result = run()
    warm = time.perf_counter() - start
    assert result == first, (result, first)
    (bq, bg), scratch = block_scratch_bytes(n, args.dim, k, args.block_size)
    print(f"hnm   : {warm:8.2f} s warm ({cold:.2f} s with compilation), blocks {bq} x {bg}")
    print("        " + "  ".join(f"{name}={value:.4f}" for name, value in result.items()))
    print(f"        peak extra host memory {mem.extra / MIB:.0f} MiB "
          f"({'VmHWM' if mem.exact else 'ru_maxrss'}; target < 1024 MiB); "
          f"compiled block scratch {scratch / MIB if scratch is not None else float('nan'):.0f}"
          f" MiB; embeddings {emb.nbytes / MIB:.0f} MiB")

    if args.no_faiss:
        return
    try:
        import faiss
    except ImportError:
        print("faiss : not importable (pip install faiss-cpu==1.15.1 to compare)")
        return
    seconds, recalls = faiss_recalls(emb, labels, k, KS)
    print(f"faiss : {seconds:8.2f} s IndexFlatIP.search(k={k + 1}), "
          f"{faiss.omp_get_max_threads()} OpenMP threads, faiss {faiss.__version__}")
    print("        " + "  ".join(f"{name}={value:.4f}" for name, value in recalls.items()))
    diff = max(abs(recalls[name] - result[name]) for name in recalls)
    print(f"ratio : hnm / faiss = {warm / seconds:.2f} (target <= 1.0); "
          f"max |Recall@K difference| = {diff:.2e}")
    knn_vs_faiss(emb, labels, k)


if __name__ == "__main__":
    main()
