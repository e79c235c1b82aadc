"""Forward time of the from-scratch MultiHeadAttention over Keras' layer.

Both layers hold the same weights (copied with ``load_from_keras``), are wrapped
in ``tf.function`` (``jit_compile=False``), warmed up, and then timed in
alternation in one run; the script prints the median of the repeats for each and
their ratio (goal: at most 1.2). It asserts nothing about time.

Run: ``python benchmarks/attention_speed.py [--repeats 50]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mtl_utils.attention import MultiHeadAttention  # noqa: E402


def _time(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    np.asarray(out[0] if isinstance(out, tuple) else out)  # wait for the result
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    key_dim = args.d_model // args.num_heads
    rng = np.random.default_rng(0)
    x = tf.constant(
        rng.normal(size=(args.batch_size, args.seq_len, args.d_model)), tf.float32
    )
    mask = tf.constant(rng.random((args.batch_size, args.seq_len, args.seq_len)) > 0.2)
    reference = keras.layers.MultiHeadAttention(args.num_heads, key_dim)
    reference(x, x)
    ours = MultiHeadAttention.from_keras(reference)

    cases = {
        "self-attention": {},
        "self-attention + mask": {"attention_mask": mask},
        "self-attention + scores": {"return_attention_scores": True},
    }
    print(
        f"batch {args.batch_size}, seq {args.seq_len}, d_model {args.d_model}, "
        f"{args.num_heads} heads (key_dim {key_dim}); tf.function, jit_compile=False; "
        f"median of {args.repeats} alternating repeats after {args.warmup} warm-up"
    )
    print(
        f"{'case':26s} {'ours (ms)':>10s} {'keras (ms)':>11s} {'ratio':>7s} "
        f"{'max |diff|':>11s}"
    )
    for case, kwargs in cases.items():
        fns = {
            "ours": tf.function(
                lambda a, kw=kwargs: ours(a, a, **kw), jit_compile=False
            ),
            "keras": tf.function(
                lambda a, kw=kwargs: reference(a, a, **kw), jit_compile=False
            ),
        }
        ours_out, keras_out = fns["ours"](x), fns["keras"](x)
        if kwargs.get("return_attention_scores"):
            ours_out, keras_out = ours_out[0], keras_out[0]
        max_diff = float(np.max(np.abs(np.asarray(ours_out) - np.asarray(keras_out))))
        for _ in range(args.warmup):
            for fn in fns.values():
                _time(fn, x)
        times = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                times[name].append(_time(fn, x))
        ours_ms = 1e3 * statistics.median(times["ours"])
        keras_ms = 1e3 * statistics.median(times["keras"])
        print(
            f"{case:26s} {ours_ms:10.3f} {keras_ms:11.3f} {ours_ms / keras_ms:7.3f} "
            f"{max_diff:11.2e}"
        )


if __name__ == "__main__":
    main()
