"""What each chapter's GPU setting costs on a Colab T4, estimated from FLOP counts.

The problem-size cells quote these numbers. No GPU was at hand to time the GPU
settings (``benchmarks/gpu_check.sh`` does that on the day one is), so the GPU
part is an estimate with a stated basis, and the parts that stay on Colab's CPU
(rendering the scenes) are measured here:

- training FLOPs per image = 2 x the multiply-adds of a forward and a backward pass
  (:func:`mtl_utils.cost.training_step_macs`; the backward pass does twice the
  forward's); exact per-task-gradient methods (MGDA, PCGrad) multiply that by
  :func:`mtl_utils.cost.exact_gradient_cost_ratio`;
- an NVIDIA T4 (Colab's free GPU) peaks at 8.1 TFLOPS in float32 and 65 TFLOPS in
  float16 on its tensor cores (NVIDIA's T4 datasheet); training is assumed to reach
  ``UTILISATION`` of the peak, and every training step to cost at least
  ``STEP_OVERHEAD`` seconds of launch and Python overhead, which is what bounds the
  small networks of chapters 2 to 4;
- rendering runs on the CPU on Colab too (its free runtime has 2 CPU cores, like the
  machine these chapters are measured on): scenes per second are measured here at
  the GPU settings' image sizes.

Prints one line per trained network and a total per chapter. Run:
``python benchmarks/gpu_estimates.py`` (about a minute on a 2-core CPU).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from mtl_utils.cost import (  # noqa: E402
    exact_gradient_cost_ratio,
    macs_per_image,
    training_step_macs,
)
from mtl_utils.data.nyuv2 import MTAN_NYUV2  # noqa: E402
from mtl_utils.data.scenes import render_scenes  # noqa: E402
from mtl_utils.models import build_mtan, build_multitask  # noqa: E402
from mtl_utils.tasks import Task, default_metrics, scene_tasks  # noqa: E402

T4_PEAK = {"float32": 8.1e12, "mixed_float16": 65e12}  # FLOP/s, NVIDIA datasheet
UTILISATION = 0.3  # assumed share of the peak that Keras training reaches
STEP_OVERHEAD = 0.010  # assumed seconds per training step, however small the model


def training_flops(model, exact_gradients: bool = False) -> float:
    """FLOPs per image of one training step (2 x multiply-adds)."""
    step = training_step_macs(model)
    macs = sum(part["forward"] + part["backward"] for part in step.values())
    ratio = exact_gradient_cost_ratio(step, len(model.output)) if exact_gradients else 1
    return 2.0 * macs * ratio


def gpu_seconds(flops_per_image, images, steps, precision="float32"):
    """(seconds at the T4's peak, estimated seconds) for one training run."""
    peak = flops_per_image * images / T4_PEAK[precision]
    return peak, max(peak / UTILISATION, steps * STEP_OVERHEAD)


def render_seconds(n, size, sample=200):
    """Seconds to render n scenes of size x size, from a timed sample."""
    start = time.perf_counter()
    render_scenes(sample, size=size, seed=0)
    return (time.perf_counter() - start) / sample * n


def scenes_gigabytes(n, size):
    """RAM of render_scenes(n, size): image, normal (3 x float32), depth (float32)
    and segmentation (int32) per pixel; tf.data's from_tensor_slices copies it."""
    return n * size * size * (3 + 3 + 1 + 1) * 4 / 1e9


def report(chapter, runs, renders=()):
    """runs: (label, flops per image, images, steps, precision); renders: the
    (number, size) of the scenes rendered on the CPU."""
    total = 0.0
    print(f"\n{chapter}")
    for n, size in renders:
        seconds = render_seconds(n, size)
        total += seconds
        print(
            f"  render {n:,} scenes at {size}x{size}: {seconds:.0f} s on the CPU "
            f"(measured here), {scenes_gigabytes(n, size):.1f} GB of RAM"
        )
    for label, flops, images, steps, precision in runs:
        peak, estimate = gpu_seconds(flops, images, steps, precision)
        total += estimate
        print(
            f"  {label}: {flops / 1e9:.2f} GFLOP/image x {images:,} images = "
            f"{flops * images / 1e12:,.0f} TFLOP, {steps:,} steps ({precision}): "
            f"{peak:.0f} s at peak, about {estimate:.0f} s"
        )
    print(f"  these parts together: {total / 60:.1f} min")


def main():
    tasks = scene_tasks()
    print(
        f"basis: T4 peak {T4_PEAK['float32'] / 1e12:.1f} TFLOPS float32, "
        f"{T4_PEAK['mixed_float16'] / 1e12:.0f} float16; {UTILISATION:.0%} of peak; "
        f"at least {STEP_OVERHEAD * 1e3:.0f} ms per step"
    )
    report("01: no training", [], [(4_000, 128)])

    net = build_multitask(tasks, (64, 64, 3))
    steps = -(-4096 // 64) * 20
    report(
        "02: MultiTaskModel.fit demo, 64x64, 4096 scenes, 20 epochs, batch 64",
        [
            ("equal weighting", training_flops(net), 4096 * 20, steps, "float32"),
            (
                "MGDA (exact gradients)",
                training_flops(net, True),
                4096 * 20,
                steps,
                "float32",
            ),
        ],
        [(4096, 64)],
    )

    pair = scene_tasks(["segmentation", "depth"])
    mtan = build_mtan(pair, (64, 64, 3), width=0.125)
    report(
        "03: pair classifiers (20,000 sequences, 20 epochs, 2 models) and MTAN",
        [
            # the pair classifiers' FLOPs are negligible: their steps bound them
            (
                "2 pair classifiers",
                0.0,
                2 * 20_000 * 20,
                2 * -(-20_000 // 64) * 20,
                "float32",
            ),
            (
                "MTAN encoder-attention variant, 64x64, 40 epochs, batch 16",
                training_flops(mtan),
                4000 * 40,
                -(-4000 // 16) * 40,
                "float32",
            ),
        ],
        [(4000, 64)],
    )

    bn = build_multitask(tasks, (64, 64, 3), width=0.125, batch_norm=True)
    report(
        "04: training-step throughput, 3 x 100 steps of batch 128",
        [("hard sharing, BN", training_flops(bn), 300 * 128, 300, "float32")],
        [(4096, 64)],
    )

    three = scene_tasks(["segmentation", "depth", "normal"])
    vgg11 = build_multitask(
        three, (128, 128, 3), config="vgg11", width=1.0, batch_norm=False
    )
    steps = -(-5_000 // 32) * 10
    nyu_tasks = [
        Task("segmentation", "segmentation", 13, default_metrics("segmentation")),
        *three[1:],
    ]
    # The recipe's network at the paper's size; equal weighting: one forward and
    # one backward pass (twice the forward's multiply-adds) per image.
    segnet_mtan = MTAN_NYUV2.build_model(nyu_tasks)
    nyu_train = 795 - 95  # the last 95 training images validate
    report(
        "07: VGG-11 at width 1, 128x128, 5,000 scenes, 10 epochs, on one and on "
        "a mirrored device",
        [
            ("one device", training_flops(vgg11), 50_000, steps, "float32"),
            ("MirroredStrategy", training_flops(vgg11), 50_000, steps, "float32"),
        ],
        [(5_000, 128)],
    )
    report(
        "07, only with NYUV2_ROOT: the MTAN_NYUV2 recipe, SegNet-MTAN at width 1, "
        "288x384, 700 training images, 200 epochs, batch 2, equal weighting",
        [
            (
                "equal weighting, mixed precision",
                2.0 * 3 * macs_per_image(segnet_mtan),
                nyu_train * 200,
                -(-nyu_train // 2) * 200,
                "mixed_float16",
            )
        ],
    )


if __name__ == "__main__":
    main()
