"""Training-step time of every weighting strategy relative to equal weighting.

Builds the chapter-level hard-sharing model (:func:`mtl_utils.models.build_multitask`,
VGG-16 encoder at width 0.125 with batch norm, four scene tasks: segmentation,
depth, normal, count) once per strategy with the same initial weights, compiles it
with :class:`mtl_utils.training.MultiTaskModel` and that strategy, and times
``train_on_batch`` on one fixed random batch (64x64, batch 32). Strategies are
timed in alternating rounds in one run so all see the same machine load; the ratio
printed is the median over rounds of (strategy time / equal-weighting time of the
same round), for wall-clock time and for the process's CPU time (all threads;
less disturbed by other jobs on a shared machine). It asserts nothing about time.

Goals: loss-based <= 1.03x; last-layer or representation-gradient methods
(GradNorm, MGDA-UB) <= 1.10x (issue 3). Full per-task-gradient methods (PCGrad,
MGDA, CAGrad, IMTL, Nash-MTL, Aligned-MTL; issue 14): at or below the multiply-add
floor below (``/ floor`` <= 1.00 with both kernel sets), and no slower relative
to equal weighting than the same method in LibMTL on the same architecture
(column ``LibMTL``: PCGrad 2.90x, MGDA 3.29x, CAGrad 3.00x, measured with PyTorch
2.13 CPU on 2 threads on a quiet machine; 5-6x under load). The last group
recomputes the per-task gradients only every second step (``update_every=2``) and
reuses the coefficients in between.

``--decoder unet`` (the default of ``build_multitask``) hands the heads six
encoder tensors (five skips and ``block5_pool``), ``--decoder plain`` one; either
way MultiTaskModel back-propagates through each head once and vectorises only the
encoder's backward pass over the tasks.

**The multiply-add floor.** An exact per-task-gradient method needs one backward
pass through the shared encoder per task: T - 1 more than equal weighting. The
script counts multiply-adds (:func:`mtl_utils.cost.training_step_macs`; a
backward pass costs twice its forward pass, less the input gradient of the first
layer, which nobody needs) and prints ``1 + (T - 1) * encoder backward / equal-weighting
step``: the ratio an exact method would have on a machine whose time is its
multiply-adds. Measured ratios can be lower, because the equal-weighting step
leaves cores idle (element-wise ops, resizes, small convolutions) that the extra,
independent per-task passes fill.

**Kernels.** TensorFlow's default x86 build runs convolutions with oneDNN; the
Makefile (and every chapter) sets ``TF_ENABLE_ONEDNN_OPTS=0`` for reproducible
notebook outputs, which uses Eigen kernels instead. ``--kernels both`` (the
default) times each setting in its own process, one after the other.

Run: ``python benchmarks/weighting_speed.py [--decoder unet plain] [--rounds 5]
[--kernels both|onednn|eigen]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def _without_kernels(argv: list[str]) -> tuple[str, list[str]]:
    """The ``--kernels`` value (default ``both``) and the other arguments."""
    kernels, rest, skip = "both", [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--kernels" and i + 1 < len(argv):
            kernels, skip = argv[i + 1], True
        elif arg.startswith("--kernels="):
            kernels = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return kernels, rest


# TensorFlow reads the oneDNN switch once, when it loads: set it before importing.
_KERNELS, _OTHER_ARGS = _without_kernels(sys.argv[1:])
if _KERNELS in ("onednn", "eigen"):
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if _KERNELS == "onednn" else "0"
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from mtl_utils import weighting as W  # noqa: E402
from mtl_utils.cost import exact_gradient_cost_ratio, training_step_macs  # noqa: E402
from mtl_utils.tasks import scene_tasks  # noqa: E402

GROUPS = {
    "loss-based (goal <= 1.03x)": {
        "equal": W.EqualWeighting,
        "static": lambda: W.StaticWeighting([1.0, 2.0, 0.5, 1.0]),
        "uncertainty": W.UncertaintyWeighting,
        "dwa": W.DynamicWeightAverage,
        "rlw": lambda: W.RandomLossWeighting(seed=0),
    },
    "last-layer / representation (goal <= 1.10x)": {
        "gradnorm": W.GradNorm,
        "mgda_ub": lambda: W.MGDA(upper_bound=True),
    },
    "full per-task gradients (goal: <= floor, <= LibMTL)": {
        "pcgrad": lambda: W.PCGrad(seed=0),
        "mgda": W.MGDA,
        "cagrad": W.CAGrad,
        "imtl": W.IMTL,
        "nash_mtl": W.NashMTL,
        "aligned_mtl": W.AlignedMTL,
    },
    "the same, recomputed every 2nd step (update_every=2)": {
        "pcgrad/2": lambda: W.PCGrad(seed=0, update_every=2),
        "mgda/2": lambda: W.MGDA(update_every=2),
        "cagrad/2": lambda: W.CAGrad(update_every=2),
        "nash_mtl/2": lambda: W.NashMTL(update_every=2),
    },
}

# LibMTL's step time over its equal-weighting step, same architecture (issue 14).
LIBMTL = {"pcgrad": 2.90, "mgda": 3.29, "cagrad": 3.00}
EXACT = "full per-task"


def _batch(tasks, batch_size: int, size: int):
    rng = np.random.default_rng(0)
    x = rng.random((batch_size, size, size, 3), dtype=np.float32)
    normals = rng.normal(size=(batch_size, size, size, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    y = {}
    for t in tasks:
        if t.kind == "segmentation":
            y[t.name] = rng.integers(-1, t.channels, (batch_size, size, size), np.int32)
        elif t.kind == "depth":
            y[t.name] = rng.uniform(0, 10, (batch_size, size, size, 1)).astype(
                "float32"
            )
        elif t.kind == "normal":
            y[t.name] = normals.astype("float32")
        else:
            y[t.name] = rng.integers(-1, t.channels, (batch_size,), np.int32)
    return x, y


def _build(tasks, args, decoder: str):
    try:
        from mtl_utils.models import build_multitask
    except ImportError:  # before the models module existed
        return _tiny_model(tasks, args.size)
    return build_multitask(
        tasks,
        (args.size, args.size, 3),
        "vgg16",
        width=0.125,
        batch_norm=True,
        decoder=decoder,
    )


def _tiny_model(tasks, size: int):
    from mtl_utils.training import MultiTaskModel

    inputs = keras.Input((size, size, 3))
    h = inputs
    for filters in (8, 16, 32, 64):
        h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(h)
        h = keras.layers.MaxPooling2D()(h)
    z = h
    outputs = {}
    for t in tasks:
        if t.kind == "classification":
            pooled = keras.layers.GlobalAveragePooling2D()(z)
            outputs[t.name] = keras.layers.Dense(t.channels)(pooled)
        else:
            a = keras.layers.UpSampling2D(16)(z)
            a = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(a)
            outputs[t.name] = keras.layers.Conv2D(t.channels, 1)(a)
    return MultiTaskModel(inputs, outputs, representation=z)


def run(args: argparse.Namespace, decoder: str) -> None:
    tasks = scene_tasks()
    x, y = _batch(tasks, args.batch_size, args.size)
    models = {}
    for group in GROUPS.values():
        for name, make in group.items():
            if args.strategies and name not in args.strategies and name != "equal":
                continue
            keras.utils.set_random_seed(0)
            model = _build(tasks, args, decoder)
            model.compile(keras.optimizers.Adam(1e-4), losses=tasks, weighting=make())
            start = time.perf_counter()
            for _ in range(args.warmup):
                model.train_on_batch(x, y)
            models[name] = model
            print(f"  built + traced {name:12s} {time.perf_counter() - start:6.1f} s")
    info = models["equal"]._mtl.info
    boundary = len(info["boundary"])
    shared = sum(int(np.prod(v.shape)) for v in info["shared_vars"])
    wall = {name: [] for name in models}
    cpu = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                model.train_on_batch(x, y)
            wall[name].append((time.perf_counter() - start) / args.steps)
            cpu[name].append((time.process_time() - start_cpu) / args.steps)
    step = training_step_macs(models["equal"], (args.size, args.size, 3))
    floor = exact_gradient_cost_ratio(step, len(tasks))
    kernels = "Eigen" if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0" else "oneDNN"
    print(
        f"\n{kernels} kernels; "
        f"build_multitask(vgg16, width 0.125, batch norm, decoder={decoder!r}); "
        f"{args.size}x{args.size}, batch {args.batch_size}, 4 tasks; {shared} shared "
        f"parameters, {boundary} boundary tensor(s); median of {args.rounds} "
        f"rounds x {args.steps} steps"
    )
    head = f"{'strategy':14s} {'wall ms':>8s} {'vs equal':>9s}"
    print(f"{head} {'CPU ms':>8s} {'vs equal':>9s} {'/ floor':>8s} {'LibMTL':>7s}")
    for title, group in GROUPS.items():
        print(f"-- {title}")
        for name in group:
            if name not in wall:
                continue
            cells, ratios = [], []
            for times in (wall, cpu):
                pairs = zip(times[name], times["equal"], strict=True)
                ratios.append(statistics.median(t / b for t, b in pairs))
                ms = 1000 * statistics.median(times[name])
                cells.append(f"{ms:8.1f} {ratios[-1]:8.2f}x")
            if title.startswith(EXACT):  # the wall-clock ratio over the floor
                cells.append(f"{ratios[0] / floor:8.2f}")
                if name in LIBMTL:
                    cells.append(f"{LIBMTL[name]:6.2f}x")
            print(f"{name:14s} {' '.join(cells)}")
    print(
        f"multiply-add floor of exact per-task gradients: {floor:.2f}x "
        "(T encoder backward passes instead of one)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--decoder", nargs="+", default=["unet", "plain"])
    parser.add_argument("--strategies", nargs="*", default=None)
    parser.add_argument(
        "--kernels", choices=["both", "onednn", "eigen"], default="both"
    )
    args = parser.parse_args()
    if args.kernels == "both":  # one process per setting (see above)
        for kernels in ("onednn", "eigen"):
            command = [sys.executable, __file__, *_OTHER_ARGS, "--kernels", kernels]
            subprocess.run(command, check=True)
        return
    for decoder in args.decoder:
        run(args, decoder)


if __name__ == "__main__":
    main()
