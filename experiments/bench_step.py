"""Times whole training steps: the objective's share, compilation, and the input pipeline.

  python experiments/bench_step.py            # ResNet-50, the recipes' B and D (~10 min, CPU)
  python experiments/bench_step.py --quick    # cnn backbone, B = 64 (under a minute)

1. Objective overhead. The pmapped :func:`hnm.train.make_train_step` of a ResNet-50 at the
   official recipes' shapes (D = 64 at B = 128, D = 512 at B = 512; P x K with K = 2) is timed
   for every objective of ``OBJECTIVES`` and for a trivial loss ``c * mean(emb ** 2)`` on the
   same embeddings (it back-propagates through the whole backbone and does nothing else).
   The overhead of an objective is ``(step - trivial step) / step``; target < 5 %. Steps are
   timed warm, in interleaved rounds (one step of every objective per round) so that load
   from other jobs hits all of them alike, and the median is reported. Two noise-free
   estimates come with it: the objective's own forward + backward timed alone on the
   embeddings (many repetitions, milliseconds) divided by the step, and XLA's FLOP count of
   the compiled step (``cost_analysis``) against the trivial step's.
   On CPU the images are shrunk (default 32 px at B = 128, 16 px at B = 512): the objective's
   cost does not depend on the image size and the backbone's shrinks with it, so the
   overhead measured here is an upper bound of the overhead at the recipe's 256 px on the
   same device. With a GPU the defaults are the real 256 px (224 px at B = 512).
2. Compilation. Compile time = first call - warm call. Every objective is wrapped by a
   counter incremented at trace time; the timed steps use a new P x K label pattern on
   every call, and the count must stay 1. A real ``train.train_and_evaluate`` run (digits,
   smoke) is also counted, since the trainer's first steps must not recompile either.
   The script exits with status 1 when any count exceeds 1.
3. Input pipeline. ``Dataset.train_batch`` batches/s against steps/s of the matching model:
   the digits default (mlp, experiments/digits.py); the CUB recipe (experiments/cub_sct.py:
   256 px crops of 281 px resizes, flips) on ``tfds.testing.mock_data`` images, whose tiny
   random images make decoding nearly free, and on a folder of synthetic 500 x 375 JPEGs
   (CUB's typical size) through the ``folder`` source. The 256 px step is a ResNet-50 step
   measured at B = 4 and scaled linearly to the recipe's B = 128 (on CPU; measured directly
   when part 1 already runs 256 px at B = 128). A ratio pipeline / step > 1 means the
   pipeline keeps up with the step. Both run on the same cores here; on a training host the
   pipeline's threads compete with the step only on CPU.

The machine may be shared: ``os.getloadavg()`` is printed with every table, and only ratios
measured in the same run should be compared.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(EXPERIMENTS))
sys.path.insert(0, EXPERIMENTS)

import jax  # noqa: E402  (after the path tweak)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402  (experiments/common.py)
from hnm import data, models, objectives, parallel, train  # noqa: E402

K = 2
OBJECTIVES = ("sct", "ephn", "batch_hard", "semihard", "multi_similarity")
TRIVIAL = "trivial"
TARGET = 5.0  # % of the step
TRIVIAL_SCALE = 1e-3  # keeps the trivial loss from moving the parameters much


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def _objective_opts(name: str) -> dict:
    """The official options for sct / ephn (common.METHODS), the defaults otherwise."""
    opts = dict(common.METHODS.get(name, {}))
    opts.pop("name", None)
    return opts


class Counted:
    """Wraps an objective; ``traces`` counts how often JAX traced it (Python runs it)."""

    def __init__(self, fn):
        self.fn, self.traces = fn, 0

    def __call__(self, emb, labels, key):
        self.traces += 1
        return self.fn(emb, labels, key)


def _trivial_objective(aux_keys):
    """``c * mean(emb^2)``: gradients flow through the backbone, no mining, no matmul."""
    def trivial(emb, labels, key):
        del labels, key
        loss = TRIVIAL_SCALE * jnp.mean(jnp.square(emb))
        aux = {k: jnp.zeros((), jnp.float32) for k in aux_keys}
        aux["loss"] = jax.lax.stop_gradient(loss)
        return loss, aux
    return trivial


def _aux_keys(b: int, d: int) -> list[str]:
    emb = jax.ShapeDtypeStruct((b, d), jnp.float32)
    labels = jax.ShapeDtypeStruct((b,), jnp.int32)
    _, aux = jax.eval_shape(objectives.get("sct"), emb, labels, jax.random.key(0))
    return sorted(aux)


def _build_objective(name: str, aux_keys) -> Counted:
    if name == TRIVIAL:
        return Counted(_trivial_objective(aux_keys))
    return Counted(objectives.get(name, axis_name=train.AXIS, **_objective_opts(name)))


def _labels(b: int, rng: np.random.Generator) -> np.ndarray:
    """A fresh P x K pattern: P distinct class ids, class-major, as the sampler lays them."""
    classes = rng.choice(10_000, size=b // K, replace=False)
    return np.repeat(classes, K).astype(np.int32)


def _state(backbone: str, dim: int, image_shape, dtype: str = "float32"):
    model = models.create(dict(backbone=backbone, embedding_dim=dim, dtype=dtype))
    optim = dict(name="sgd", learning_rate=1e-3)
    tx = train.make_optimizer(optim, train.make_schedule(optim, 1000))
    return train.create_train_state(model, tx, jax.random.key(0), tuple(image_shape))


def _flops(step, *args) -> float:
    """XLA's FLOP estimate of the compiled step (cached: no second compilation)."""
    try:
        cost = step.lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", float("nan")))
    except Exception:  # pylint: disable=broad-except  (not every backend reports it)
        return float("nan")


def _call(step, state, batch, key):
    state, m = step(state, batch, key)
    jax.block_until_ready((state, m))
    return state


def _time_isolated(fn: Counted, b: int, d: int, n_dev: int, budget_s: float) -> float:
    """Median ms of the objective's forward + backward alone on [B, D] embeddings (pmapped,
    so its collectives are those of the step)."""
    def vg(emb, labels, key):
        return jax.value_and_grad(lambda e: fn.fn(e, labels, key)[0])(emb)
    p = jax.pmap(vg, axis_name=train.AXIS, in_axes=(0, 0, None))
    rng = np.random.default_rng(1)
    emb = jnp.asarray(rng.normal(size=(n_dev, b // n_dev, d)), jnp.float32)
    labels = jnp.asarray(_labels(b, rng).reshape(n_dev, -1))
    key = jax.random.key(0)
    jax.block_until_ready(p(emb, labels, key))
    times, start = [], time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        jax.block_until_ready(p(emb, labels, key))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def overhead_table(backbone: str, b: int, d: int, size: int, n_dev: int, repeats: int,
                   dtype: str, iso_budget_s: float) -> tuple[list[dict], dict]:
    """Part 1 and the label-pattern half of part 2 for one (B, D, image size)."""
    names = (TRIVIAL, *OBJECTIVES)
    aux_keys = _aux_keys(b, d)
    # A host copy, placed afresh for each objective: the step donates (deletes) its input.
    state0 = jax.device_get(_state(backbone, d, (size, size, 3), dtype))
    place = parallel.make_layout("pmap").place_state
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8) for _ in range(2)]
    calls = 0

    def batch():
        nonlocal calls
        calls += 1
        return train.shard({"images": images[calls % 2], "labels": _labels(b, rng)}, n_dev)

    fns = {n: _build_objective(n, aux_keys) for n in names}
    steps = {n: train.make_train_step(fns[n]) for n in names}
    states, first, flops, times = {}, {}, {}, {n: [] for n in names}
    for n in names:
        bt, key = batch(), jax.random.key(calls)
        t0 = time.perf_counter()
        states[n] = _call(steps[n], place(state0), bt, key)
        first[n] = time.perf_counter() - t0
        flops[n] = _flops(steps[n], place(state0), bt, key)
    for r in range(repeats):  # interleaved: load from other jobs hits every objective alike,
        for n in names[r % len(names):] + names[:r % len(names)]:  # in a rotating order
            bt, key = batch(), jax.random.key(calls)
            t0 = time.perf_counter()
            states[n] = _call(steps[n], states[n], bt, key)
            times[n].append(time.perf_counter() - t0)
    base = statistics.median(times[TRIVIAL])
    iso_base = _time_isolated(fns[TRIVIAL], b, d, n_dev, iso_budget_s)
    rows = []
    for n in names:
        ms = 1e3 * statistics.median(times[n])
        iso = _time_isolated(fns[n], b, d, n_dev, iso_budget_s) if n != TRIVIAL else iso_base
        rows.append(dict(
            name=n, step_ms=ms, diff_pct=100 * (ms - 1e3 * base) / ms,
            iso_ms=iso, iso_pct=100 * max(iso - iso_base, 0.0) / ms,
            flop_pct=100 * (flops[n] - flops[TRIVIAL]) / flops[n],
            compile_s=first[n] - statistics.median(times[n]), traces=fns[n].traces))
    spread = 100 * (max(times[TRIVIAL]) - min(times[TRIVIAL])) / base
    return rows, dict(spread_pct=spread, calls=calls, repeats=repeats)


def print_overhead(rows, info, backbone, b, d, size, dtype):
    print(f"\n### Objective overhead: {backbone} {size}x{size} px ({dtype}), B = {b} "
          f"(P = {b // K}, K = {K}), D = {d}\n")
    print("| objective | step ms | (step - trivial) / step | objective alone ms | "
          "alone / step | FLOPs over trivial | compile s | traces |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['step_ms']:.1f} | {r['diff_pct']:+.1f} % | "
              f"{r['iso_ms']:.2f} | {r['iso_pct']:.3f} % | {r['flop_pct']:+.3f} % | "
              f"{r['compile_s']:.1f} | {r['traces']} |")
    worst = max(r["iso_pct"] for r in rows if r["name"] != TRIVIAL)
    worst_diff = max(r["diff_pct"] for r in rows if r["name"] != TRIVIAL)
    print(f"\nmedian of {info['repeats']} warm steps each, interleaved; run-to-run spread of "
          f"the trivial step (max - min) / median = {info['spread_pct']:.1f} %. "
          "'objective alone' = the objective's forward + backward on the embeddings; "
          f"'alone / step' = (that - the trivial loss's) / step. {_load()}.")
    verdict = "MET" if worst < TARGET and worst_diff < TARGET + info["spread_pct"] else "NOT MET"
    print(f"target overhead < {TARGET:.0f} %: {verdict} (worst: alone / step {worst:.3f} %, "
          f"(step - trivial) / step {worst_diff:+.1f} % with {info['spread_pct']:.1f} % noise)")


# ----------------------------------------------------------------------------- part 2


def trainer_traces() -> tuple[int, float]:
    """Traces of the objective in a real ``train_and_evaluate`` (digits smoke config)."""
    import digits  # experiments/digits.py
    cfg = digits.get_config("smoke")
    counted = []
    original = train.build_objective

    def build_counted(config, axis_name=train.AXIS):
        counted.append(Counted(original(config, axis_name)))
        return counted[-1]
    train.build_objective = build_counted
    try:
        with tempfile.TemporaryDirectory() as workdir:
            t0 = time.perf_counter()
            train.train_and_evaluate(cfg, workdir, progress=False)
            seconds = time.perf_counter() - t0
    finally:
        train.build_objective = original
    return sum(c.traces for c in counted), seconds


# ----------------------------------------------------------------------------- part 3


def _batches_per_s(ds, n: int) -> float:
    state = ds.init_sampler_state()
    _, state = ds.train_batch(state)  # warm: thread pools, the first epoch plan
    t0 = time.perf_counter()
    for _ in range(n):
        _, state = ds.train_batch(state)
    return n / (time.perf_counter() - t0)


def _steps_per_s(config, ds, n_dev: int, n: int) -> float:
    """Warm steps/s of ``config``'s model and objective on ``ds``'s batches (median)."""
    model = models.create(train.model_config(config))
    tx = train.make_optimizer(config.optim, train.make_schedule(config.optim, 1000))
    state = parallel.make_layout("pmap").place_state(
        train.create_train_state(model, tx, jax.random.key(0), ds.image_shape))
    step = train.make_train_step(train.build_objective(config))
    sampler = ds.init_sampler_state()
    batches = []
    for _ in range(3):
        bt, sampler = ds.train_batch(sampler)
        batches.append(train.shard(bt, n_dev))
    state = _call(step, state, batches[0], jax.random.key(0))
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        state = _call(step, state, batches[i % 3], jax.random.key(i))
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def _backbone_step_s(backbone: str, size: int, b: int, n_dev: int, dtype: str,
                     repeats: int) -> float:
    """Median seconds of a trivial-loss step (the backbone's cost) at ``size`` px, B = b."""
    b = max(b, K * n_dev)
    state = parallel.make_layout("pmap").place_state(
        _state(backbone, 64, (size, size, 3), dtype))
    step = train.make_train_step(_trivial_objective(["loss"]))
    rng = np.random.default_rng(0)
    bt = train.shard({"images": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
                      "labels": _labels(b, rng)}, n_dev)
    state = _call(step, state, bt, jax.random.key(0))
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        state = _call(step, state, bt, jax.random.key(i))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _write_jpeg_folder(root: str, num_classes: int, per_class: int, hw=(375, 500)) -> None:
    """Synthetic CUB-sized JPEGs: smooth random colour fields plus noise (natural-image-like
    file sizes, ~30-60 kB, rather than incompressible noise)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(num_classes):
        os.makedirs(os.path.join(root, f"class_{c:03d}"))
        for j in range(per_class):
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(small).resize(hw[::-1], Image.BICUBIC), np.int16)
            img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, f"class_{c:03d}", f"{j}.jpg"),
                                      quality=90)


def pipeline_table(args, n_dev: int, part1_256_s: float | None) -> None:
    import cub_sct  # experiments/cub_sct.py
    import digits
    quick = args.quick
    rows = []

    # Digits: the embedded default, mlp.
    cfg = digits.get_config()
    ds = data.build(cfg.data, seed=0, num_devices=n_dev)
    rows.append(("digits default (8x8, mlp)", ds.batch_size, _batches_per_s(ds, 50 if quick
                                                                             else 200),
                 _steps_per_s(cfg, ds, n_dev, 10 if quick else 30), "measured"))

    # CUB recipe at 256 px: the step of the recipe's backbone.
    cub = cub_sct.get_config()
    if quick:
        cub.data.update(classes_per_batch=8)  # B = 16: seconds
    b256 = cub.data.classes_per_batch * cub.data.samples_per_class
    if part1_256_s is not None and b256 == args.batch_small:
        step_s, how = part1_256_s, "measured (part 1)"
    else:
        probe_b = 4
        step_s = _backbone_step_s(args.backbone, 256, probe_b, n_dev, args.dtype,
                                  2 if quick else 3) * b256 / max(probe_b, K * n_dev)
        how = f"{args.backbone} measured at B = {max(probe_b, K * n_dev)}, x B / that"
    cub_dict = dict(cub.data)
    import tensorflow_datasets as tfds  # lazy: TensorFlow takes seconds to import
    with tfds.testing.mock_data(num_examples=256):
        ds = data.build(cub_dict, seed=0, num_devices=n_dev)
        h, w = ds.eval_sets()["test"].images.get(0).shape[:2]  # the mock's raw image size
        rows.append((f"CUB recipe, tfds mock images (e.g. {h}x{w})",
                     ds.batch_size, _batches_per_s(ds, 3 if quick else 10), 1.0 / step_s, how))
    with tempfile.TemporaryDirectory() as root:
        n_cls = 2 * cub.data.classes_per_batch + 8  # folder: half the classes train
        _write_jpeg_folder(root, n_cls, 2)
        folder = dict(cub_dict, source="folder", name="", path=root)
        ds = data.build(folder, seed=0, num_devices=n_dev)
        rows.append(("CUB recipe, folder of 500x375 JPEGs", ds.batch_size,
                     _batches_per_s(ds, 3 if quick else 10), 1.0 / step_s, how))

    print("\n### Input pipeline vs step (batches/s; ratio > 1: the pipeline keeps up)\n")
    print("| data | B | pipeline batches/s | pipeline images/s | step/s | "
          "pipeline / step | step timing |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, b, pipe, step, how in rows:
        print(f"| {name} | {b} | {pipe:.2f} | {pipe * b:.0f} | {step:.4g} | "
              f"{pipe / step:.3g} | {how} |")
    print(f"\n256 px: train_resize {cub.data.train_resize}, random crop + flip, "
          f"num_workers {data.resolve_config(cub_dict)['num_workers']} threads on "
          f"{os.cpu_count()} CPUs, one batch of look-ahead. {_load()}.")


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    gpu = jax.default_backend() != "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="cnn backbone, B = 64 only, fewer repeats (a smoke check)")
    parser.add_argument("--backbone", default=None,
                        help="default resnet50 (cnn with --quick)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="px at the small batch (CPU 32, GPU 256)")
    parser.add_argument("--image_size_large", type=int, default=None,
                        help="px at B = 512 (CPU 16, GPU 224)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (3; GPU 10)")
    parser.add_argument("--dtype", default="float32", choices=sorted(models.DTYPES))
    args = parser.parse_args(argv)
    args.backbone = args.backbone or ("cnn" if args.quick else "resnet50")
    args.image_size = args.image_size or (32 if args.quick or not gpu else 256)
    args.image_size_large = args.image_size_large or (224 if gpu else 16)
    args.repeats = args.repeats or (10 if gpu else 3)
    args.batch_small = 64 if args.quick else 128
    n_dev = jax.local_device_count()
    if (args.batch_small // K) % n_dev:
        raise ValueError(f"P = {args.batch_small // K} is not divisible by {n_dev} devices.")

    print(f"# bench_step: backend {jax.default_backend()}, {n_dev} device(s) "
          f"({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, jax {jax.__version__}")
    print(f"{_load()} at start")
    if not gpu and not args.quick:
        print(f"CPU: images shrunk to {args.image_size} px at B = {args.batch_small} and "
              f"{args.image_size_large} px at B = 512 to fit the time budget; the objective's "
              "cost does not depend on the image size, so the overheads below are upper "
              "bounds of those at 256 px on this device.")
    t_start = time.perf_counter()
    configs = [(args.batch_small, 64, args.image_size)]
    if not args.quick:
        configs.append((512, 512, args.image_size_large))
    all_traces = []
    part1_256_s = None
    for b, d, size in configs:
        rows, info = overhead_table(args.backbone, b, d, size, n_dev, args.repeats,
                                    args.dtype, 0.3 if args.quick else 1.0)
        print_overhead(rows, info, args.backbone, b, d, size, args.dtype)
        all_traces += [(f"{r['name']} B={b}", r["traces"]) for r in rows]
        if size == 256 and b == args.batch_small:
            part1_256_s = rows[0]["step_ms"] / 1e3

    print("\n### Compilation\n")
    print(f"Objectives at B = {', '.join(str(c[0]) for c in configs)}: traced "
          f"{max(t for _, t in all_traces)} time(s) at most over {1 + args.repeats} steps "
          "each with a new P x K label pattern every step (compile s in the tables above = "
          "first call - warm call).")
    trainer_n, trainer_s = trainer_traces()
    all_traces.append(("train.train_and_evaluate (digits smoke)", trainer_n))
    print(f"train.train_and_evaluate(digits smoke) traced the objective {trainer_n} time(s) "
          f"({trainer_s:.1f} s run, several steps).")
    bad = [(n, t) for n, t in all_traces if t > 1]
    print("compile once: " + ("OK" if not bad else "FAILED: " + ", ".join(
        f"{n} traced {t}x" for n, t in bad)))

    pipeline_table(args, n_dev, part1_256_s)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; {_load()} at end")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
