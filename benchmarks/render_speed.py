"""Renderer throughput at 64x64 on one core: scenes per second.

Prints, side by side in one run: sampling only, rendering only (scenes given) and
``render_scenes`` end to end (sampling + rendering), each the median of 5 repeats.
Goal (issue 2): rendering >= 2,000 scenes/s on one core.

Run: .venv/bin/python benchmarks/render_speed.py [--size 64] [--n 2048]
"""

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from mtl_utils.data.scenes import render_batch, render_scenes, sample_scenes  # noqa: E402


def median_rate(fn, n: int, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n", type=int, default=2048)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    scenes = sample_scenes(args.n, seed=0)
    render_batch(scenes[:64], args.size)  # warm-up
    rates = {
        "sample only": median_rate(lambda: sample_scenes(args.n, seed=0), args.n),
        "render only": median_rate(lambda: render_batch(scenes, args.size), args.n),
        "render_scenes (end to end)": median_rate(
            lambda: render_scenes(args.n, size=args.size, seed=0), args.n
        ),
    }
    print(f"{args.n} scenes at {args.size}x{args.size}, one core")
    for name, rate in rates.items():
        print(f"  {name:28s} {rate:8.0f} scenes/s")
    print(f"  render only / goal 2000      {rates['render only'] / 2000:8.2f}x")


if __name__ == "__main__":
    main()
