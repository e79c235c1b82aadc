"""Inference latency of one hard-sharing model vs T single-task models.

For T = 3 dense tasks (segmentation, depth, normal) of the scenes benchmark the
script builds one multi-head model (:func:`mtl_utils.models.build_multitask`, one
VGG-16 encoder and three heads) and the three single-task models
(:func:`mtl_utils.models.build_single_task`), and times, in alternating rounds in
one run, one multi-head forward pass against the three single-task forward passes
run one after another (each with ``predict_on_batch``). It prints the median
latencies, their ratio (goal: >= 1.7, i.e. the multi-head model is at least 1.7x
faster; the median over rounds of the ratio of a round's two measurements, which
other jobs on a shared machine disturb less than the ratio of medians), and the
parameters and FLOPs of each. It asserts nothing about time.

Run: ``python benchmarks/multihead_latency.py [--widths 0.125 0.25] [--rounds 15]``
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from mtl_utils.cost import count_params, flops_per_image, measure_latency  # noqa: E402
from mtl_utils.models import build_multitask, build_single_task  # noqa: E402
from mtl_utils.tasks import scene_tasks  # noqa: E402


def _compare(width: float, args: argparse.Namespace) -> None:
    tasks = scene_tasks(["segmentation", "depth", "normal"])
    shape = (args.size, args.size, 3)
    common = {"input_shape": shape, "config": args.config, "width": width}
    multi = build_multitask(tasks, **common)
    singles = [build_single_task(t, **common) for t in tasks]
    x = np.random.default_rng(0).random((args.batch_size, *shape), dtype=np.float32)

    multi_times, single_times = [], []
    measure_latency(multi, x, repeats=1, warmup=args.warmup)
    measure_latency(singles, x, repeats=1, warmup=args.warmup)
    for _ in range(args.rounds):  # alternate, so both see the same machine load
        multi_times.append(measure_latency(multi, x, args.repeats, warmup=0))
        single_times.append(measure_latency(singles, x, args.repeats, warmup=0))
    t_multi = statistics.median(multi_times)
    t_single = statistics.median(single_times)
    # ratio of each round's adjacent measurements: robust to load from other jobs
    ratio = statistics.median(
        s / m for s, m in zip(single_times, multi_times, strict=True)
    )

    p_single = sum(count_params(m) for m in singles)
    f_single = sum(flops_per_image(m) for m in singles)
    print(
        f"\n{args.config}, width {width}, {args.size}x{args.size}, batch "
        f"{args.batch_size}, T = {len(tasks)} dense tasks; median of {args.rounds} "
        f"rounds x {args.repeats} repeats"
    )
    print(f"{'model':28s} {'params':>10s} {'MFLOPs/img':>11s} {'latency (ms)':>13s}")
    print(
        f"{'multi-head (1 encoder)':28s} {count_params(multi):>10,d} "
        f"{flops_per_image(multi) / 1e6:>11.1f} {1e3 * t_multi:>13.1f}"
    )
    for t, m in zip(tasks, singles, strict=True):
        print(
            f"{'  single ' + t.name:28s} {count_params(m):>10,d} "
            f"{flops_per_image(m) / 1e6:>11.1f} {'':>13s}"
        )
    print(
        f"{'3 single-task, in sequence':28s} {p_single:>10,d} "
        f"{f_single / 1e6:>11.1f} {1e3 * t_single:>13.1f}"
    )
    print(
        f"speed-up of the multi-head model: {ratio:.2f}x (median over rounds of "
        f"single / multi; goal >= 1.7); "
        f"FLOP ratio {f_single / flops_per_image(multi):.2f}x, parameter ratio "
        f"{p_single / count_params(multi):.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.125, 0.25])
    parser.add_argument("--config", default="vgg16")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    # predict_on_batch traces one function per model; TF warns about "retracing"
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    for width in args.widths:
        _compare(width, args)


if __name__ == "__main__":
    main()
