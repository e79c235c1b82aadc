"""Command line: ``python -m mtl_utils.experiments --help``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mtl_utils.experiments.config import SINGLE_TASK, ExperimentConfig, grid
from mtl_utils.experiments.plots import plot_delta_m
from mtl_utils.experiments.results import _markdown, format_summary, summarise
from mtl_utils.experiments.runner import run_experiments


def _parse_missing(items: Sequence[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(
                f"--missing {item!r}: expected TASK=FRACTION, e.g. depth=0.5"
            )
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mtl_utils.experiments",
        description=(
            "Train architectures x weighting strategies x seeds on the scenes "
            "benchmark (or NYUv2), write results.json/.csv, summary.csv/.md and "
            "delta_m.png. Run the same command again to resume."
        ),
    )
    p.add_argument("--output", required=True, help="results folder")
    p.add_argument(
        "--config",
        default=None,
        metavar="PLAN.json",
        help="a plan file (book/experiments/*.json): its setting and runs replace "
        "the options below; trained in stages by --workers processes",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="processes for --config runs"
    )
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--predictions",
        nargs="?",
        const=6,
        default=None,
        type=int,
        metavar="N",
        help="with --config: retrain the networks the chapters show (seed 0) and "
        "save their predictions of the first N test images (default 6) to "
        "predictions.npz in --output",
    )
    p.add_argument(
        "--architectures", nargs="+", default=["single_task", "hard_sharing"]
    )
    p.add_argument("--strategies", nargs="+", default=["equal"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--learning-rates", nargs="+", type=float, default=[1e-3])
    p.add_argument(
        "--tune-equal",
        nargs="*",
        type=float,
        default=[],
        metavar="LR",
        help="extra learning rates for equal weighting ('tuned EW', chosen on val)",
    )
    p.add_argument("--tasks", nargs="+", default=["segmentation", "depth", "normal"])
    p.add_argument("--nyuv2", default=None, metavar="PATH", help="NYUv2 (MTAN layout)")
    p.add_argument("--num-train", type=int, default=512)
    p.add_argument("--num-val", type=int, default=128)
    p.add_argument("--num-test", type=int, default=256)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument(
        "--encoder", default="vgg16", choices=["vgg11", "vgg13", "vgg16", "vgg19"]
    )
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--decoder", default="unet", choices=["unet", "plain"])
    p.add_argument(
        "--no-batch-norm", action="store_true", help="VGG and decoders without BN"
    )
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--schedule", default="joint", choices=["joint", "alternating"])
    p.add_argument(
        "--missing",
        nargs="*",
        default=[],
        metavar="TASK=FRACTION",
        help="remove labels of a fraction of training samples, e.g. depth=0.5",
    )
    p.add_argument("--restart", action="store_true", help="discard earlier results")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--epoch-log", action="store_true", help="one line per epoch")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments (see ``python -m mtl_utils.experiments -h``)."""
    return _parser().parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The :class:`ExperimentConfig` of parsed command-line arguments."""
    runs = list(
        grid(args.architectures, args.strategies, args.seeds, args.learning_rates)
    )
    if args.tune_equal:
        extra = [lr for lr in args.tune_equal if lr not in args.learning_rates]
        arches = [a for a in args.architectures if a != SINGLE_TASK]
        runs += [r for r in grid(arches, ["equal"], args.seeds, extra)]
    return ExperimentConfig(
        runs=runs,
        tasks=args.tasks,
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        image_size=args.image_size,
        data_seed=args.data_seed,
        nyuv2=args.nyuv2,
        encoder=args.encoder,
        width=args.width,
        decoder=args.decoder,
        batch_norm=not args.no_batch_norm,
        epochs=args.epochs,
        batch_size=args.batch_size,
        schedule=args.schedule,
        missing=_parse_missing(args.missing),
        baseline_learning_rate=args.learning_rates[0],
    )


def write_report(results, output_dir: str | os.PathLike, title: str | None = None):
    """Write ``summary.csv``, ``summary.md`` and ``delta_m.png`` of ``results``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(output_dir)
    summary = summarise(results)
    summary.to_csv(out / "summary.csv")
    (out / "summary.md").write_text(_markdown(format_summary(summary).reset_index()))
    if results["delta_m"].notna().any():
        fig = plot_delta_m(
            results, summarise(results, metrics=["delta_m"]), title=title
        )
        fig.savefig(out / "delta_m.png", dpi=120)
        plt.close(fig)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m mtl_utils.experiments --help``."""
    args = parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.config is not None:
        return _main_plan(args)
    config = config_from_args(args)
    verbose = 0 if args.quiet else (2 if args.epoch_log else 1)
    results = run_experiments(
        config,
        args.output,
        restart=args.restart,
        verbose=verbose,
        log=lambda line: print(line, flush=True),
    )
    summary = write_report(results, args.output)
    if verbose:
        print(format_summary(summary).to_string())
        print(f"wrote {Path(args.output).resolve()}")
    return 0


def _main_plan(args: argparse.Namespace) -> int:
    from mtl_utils.experiments.plan import load_plan, run_plan, save_predictions, work

    plan = load_plan(args.config)
    kernels = plan.setting.get("kernels")
    if kernels is not None:  # read by TensorFlow when it is imported
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if kernels == "onednn" else "0"
    if args.worker is not None:
        work(args.config, args.output, args.worker)
        return 0
    log = (lambda line: None) if args.quiet else (lambda s: print(s, flush=True))
    if args.predictions is not None:
        save_predictions(args.config, args.output, count=args.predictions, log=log)
        return 0
    run_plan(args.config, args.output, workers=args.workers, log=log)
    log(f"wrote {Path(args.output).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
