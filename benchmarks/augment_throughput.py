"""Is the augmentation pipeline fast enough to keep the chapter-level model busy?

Prints, side by side in one run, samples per second of:

- the input pipeline of :func:`mtl_utils.data.pipeline.make_dataset` with
  ``augment=mtl_utils.augment.augment`` (per-sample parallel ``map`` with AUTOTUNE,
  then batch and prefetch), with rotation on and off;
- the same pipeline with a serial ``map`` and no prefetch, and with no augmentation;
- training steps of the chapter-level model (``build_multitask`` on 64x64 images,
  width 0.125, batch norm; masked losses from ``loss_for``) fed from memory, so
  that the input pipeline costs nothing;

and the ratio pipeline / training (goal: >= 5x, so that augmenting on the fly never
starves training). Both are measured separately on the same cores; during real
training they share them. Each rate is the median of ``--repeats`` timed epochs
after a warm-up epoch.

Run: .venv/bin/python benchmarks/augment_throughput.py [--n 512] [--batch-size 32]
"""

import argparse
import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402


def median_rate(run, n: int, repeats: int) -> float:
    run()  # warm-up: tracing, thread pools, AUTOTUNE
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return n / float(np.median(times))


def drain(ds) -> None:
    for _ in ds:
        pass


def serial_pipeline(arrays, names, batch_size, fn, seed=0):
    """make_dataset's pipeline with a serial map and no prefetch."""
    import tensorflow as tf

    example = {"image": arrays["image"], **{k: arrays[k] for k in names}}
    ds = tf.data.Dataset.from_tensor_slices(example)
    ds = ds.shuffle(len(arrays["image"]), seed=seed)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip(ds, seeds.batch(2)).map(fn)
    return ds.batch(batch_size).map(lambda ex: (ex["image"], {k: ex[k] for k in names}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="samples per epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=16)
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    # fit() warns that its default shuffle=True does not apply to a tf.data input
    warnings.filterwarnings("ignore", message=".*shuffle=True.*")

    from mtl_utils.augment import augment, make_augment
    from mtl_utils.data.pipeline import make_dataset
    from mtl_utils.data.scenes import render_scenes
    from mtl_utils.losses import loss_for
    from mtl_utils.models import build_multitask
    from mtl_utils.tasks import scene_tasks

    tasks = scene_tasks()
    names = [t.name for t in tasks]
    arrays = render_scenes(args.n, size=64, seed=0)
    bs = args.batch_size

    def pipeline(fn):
        ds = make_dataset(arrays, tasks, bs, shuffle=True, augment=fn, seed=0)
        return lambda: drain(ds)

    rotate = make_augment(max_angle=np.radians(10))
    serial = serial_pipeline(arrays, names, bs, lambda ex, s: augment(ex, s))
    rates = {
        "pipeline, no augmentation": median_rate(pipeline(None), args.n, args.repeats),
        "pipeline + augment (AUTOTUNE, prefetch)": median_rate(
            pipeline(augment), args.n, args.repeats
        ),
        "pipeline + augment + rotation": median_rate(
            pipeline(rotate), args.n, args.repeats
        ),
        "pipeline + augment, serial map": median_rate(
            lambda: drain(serial), args.n, args.repeats
        ),
    }

    keras.utils.set_random_seed(0)
    model = build_multitask(
        tasks, input_shape=(64, 64, 3), width=0.125, batch_norm=True
    )
    model.compile("adam", losses={t.name: loss_for(t) for t in tasks})
    batch = next(iter(make_dataset(arrays, tasks, bs, drop_remainder=True)))
    steps = args.train_steps
    train_ds = tf.data.Dataset.from_tensors(batch).repeat(steps)

    def train():
        model.fit(train_ds, epochs=1, verbose=0)

    rates["training steps (data in memory)"] = median_rate(
        train, steps * bs, args.repeats
    )

    print(
        f"{args.n} scenes at 64x64, batch {bs}, "
        f"{os.cpu_count()} CPU cores, TensorFlow {tf.__version__}"
    )
    for name, rate in rates.items():
        print(f"  {name:42s} {rate:9.0f} samples/s")
    train_rate = rates["training steps (data in memory)"]
    for name in (
        "pipeline + augment (AUTOTUNE, prefetch)",
        "pipeline + augment + rotation",
        "pipeline + augment, serial map",
    ):
        print(f"  {name} / training {rates[name] / train_rate:12.1f}x  (goal >= 5x)")


if __name__ == "__main__":
    main()
