"""Multi-task experiments: architectures x weighting strategies x seeds, resumable.

The book's comparisons (chapters 5 and 6) and the full-size reruns on a GPU use
this one module:

* :class:`Run` is one training run: an architecture (``"single_task"``,
  ``"hard_sharing"`` or ``"mtan"``), a weighting strategy (a short name of
  :func:`mtl_utils.weighting.get`; ``"none"`` for single-task networks), a seed
  and a learning rate. A single-task run trains one network per task and
  reports all of them in one row: the baseline of Δm.
* :class:`ExperimentConfig` holds the data, model and training setting shared by
  all runs, and the list of runs (:func:`grid` makes the usual product).
* :func:`run_experiments` trains every run not yet finished and returns one row
  per run (every metric on the validation and test sets, Δm, final losses,
  training time). With ``output_dir`` it records each finished run at once in
  ``results.json`` and ``results.csv``, and checkpoints each network after every
  epoch, so that an interrupted experiment started again with the same
  arguments skips the finished runs and resumes the unfinished one from its last
  epoch (weights, optimizer state, strategy state and the data order of later
  epochs are restored exactly: the results equal those of an uninterrupted
  experiment).
* :func:`add_delta_m`, :func:`summarise` (mean ± std over seeds, with the
  learning rate of "tuned" strategies chosen on the validation set),
  :func:`format_summary` and :func:`plot_delta_m` make the table and the figure
  the book shows.
* :func:`drop_labels` (partial labels) and :func:`alternate_tasks` (one task per
  batch, in turn) change what the networks are trained on.

Command line (``python -m mtl_utils.experiments --help``); at CPU size::

    python -m mtl_utils.experiments --output results/ \\
        --architectures single_task hard_sharing \\
        --strategies equal uncertainty dwa rlw gradnorm pcgrad \\
        --seeds 0 1 2 --learning-rates 1e-3 --tune-equal 3e-4 3e-3 \\
        --image-size 32 --num-train 256 --epochs 2

and at full size on a GPU, e.g. ``--image-size 128 --num-train 10000 --width 1
--epochs 100``, or on NYUv2 with ``--nyuv2 PATH`` (the MTAN ``.npy`` layout of
:func:`mtl_utils.data.nyuv2.load_nyuv2`). Interrupt it at any time and run the
same command again to continue.

Training uses only public pieces: :func:`mtl_utils.models.build_multitask`,
:func:`~mtl_utils.models.build_single_task`, :func:`~mtl_utils.models.build_mtan`,
``MultiTaskModel.compile(optimizer, losses=..., weighting=...)`` and ``fit``,
:func:`mtl_utils.metrics.evaluate` and :func:`mtl_utils.metrics.delta_m` (the
"drop" convention of Liu et al. 2021 and Navon et al. 2022: lower is better).

References
----------
Kurin et al., "In Defense of the Unitary Scalarization for Deep Multi-Task
Learning", NeurIPS 2022, and Xin et al., "Do Current Multi-Task Optimization
Methods in Deep Learning Even Help?", NeurIPS 2022: compare strategies over seeds
against equal weighting with a tuned learning rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtl_utils.tasks import Task, default_metrics, scene_tasks

__all__ = [
    "ARCHITECTURES",
    "SINGLE_TASK",
    "NO_STRATEGY",
    "Run",
    "ExperimentConfig",
    "grid",
    "load_data",
    "experiment_tasks",
    "drop_labels",
    "alternate_tasks",
    "build_model",
    "make_strategy",
    "run_experiments",
    "load_results",
    "add_delta_m",
    "summarise",
    "format_summary",
    "plot_delta_m",
    "parse_args",
    "config_from_args",
    "write_report",
    "main",
]

#: Architectures :func:`build_model` knows.
ARCHITECTURES = ("single_task", "hard_sharing", "mtan")
SINGLE_TASK = "single_task"
#: Strategy label of single-task runs (one network per task needs no weighting).
NO_STRATEGY = "none"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
_ID_COLUMNS = ("architecture", "strategy", "seed", "learning_rate")


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of an experiment.

    Parameters
    ----------
    architecture:
        ``"single_task"`` (one network per task), ``"hard_sharing"`` or
        ``"mtan"``.
    strategy:
        Weighting strategy, a short name of :func:`mtl_utils.weighting.get`
        (``"equal"``, ``"uncertainty"``, ``"dwa"``, ``"rlw"``, ``"gradnorm"``,
        ``"pcgrad"``, ``"mgda"``, ``"mgda_ub"``, ``"cagrad"``, ...);
        ``"none"`` for single-task runs.
    seed:
        Seeds the weights, the data order of every epoch and random strategies.
    learning_rate:
        Adam's learning rate.
    """

    architecture: str
    strategy: str
    seed: int
    learning_rate: float

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.architecture!r}; expected one of "
                f"{ARCHITECTURES}"
            )
        single = self.architecture == SINGLE_TASK
        if single and self.strategy != NO_STRATEGY:
            raise ValueError(
                f"a single-task run has no weighting strategy; expected strategy="
                f"{NO_STRATEGY!r}, received {self.strategy!r}"
            )
        if not single and self.strategy == NO_STRATEGY:
            raise ValueError(
                f"architecture {self.architecture!r} needs a weighting strategy "
                "(e.g. 'equal'); received 'none'"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer; received {self.seed!r}")
        if not (
            isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0
        ):
            raise ValueError(
                f"learning_rate must be a number > 0; received {self.learning_rate!r}"
            )
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "learning_rate", float(self.learning_rate))

    @property
    def key(self) -> str:
        """``"hard_sharing/pcgrad/seed=0/lr=0.001"``: the run's name in files."""
        return (
            f"{self.architecture}/{self.strategy}/seed={self.seed}/"
            f"lr={self.learning_rate:g}"
        )


def grid(
    architectures: Iterable[str] = ("single_task", "hard_sharing"),
    strategies: Iterable[str] = ("equal",),
    seeds: Iterable[int] = (0, 1, 2),
    learning_rates: Iterable[float] = (1e-3,),
) -> tuple[Run, ...]:
    """Every combination of architecture, strategy, seed and learning rate.

    Single-task runs take no strategy (``"none"``) and use the first learning
    rate only, so they are the baselines of every multi-task run.

    Examples
    --------
    >>> [r.key for r in grid(["single_task", "hard_sharing"], ["equal"], [0])]
    ['single_task/none/seed=0/lr=0.001', 'hard_sharing/equal/seed=0/lr=0.001']
    """
    learning_rates = [float(lr) for lr in learning_rates]
    if not learning_rates:
        raise ValueError("learning_rates is empty; expected at least one")
    runs: list[Run] = []
    for arch in architectures:
        if arch == SINGLE_TASK:
            runs += [Run(arch, NO_STRATEGY, s, learning_rates[0]) for s in seeds]
            continue
        for strategy in strategies:
            for lr in learning_rates:
                runs += [Run(arch, strategy, s, lr) for s in seeds]
    return tuple(runs)


@dataclasses.dataclass
class ExperimentConfig:
    """The setting shared by all runs of an experiment, and the runs.

    Parameters
    ----------
    runs:
        The runs (see :func:`grid`), in the order of the results file.
    tasks:
        Task names: of :func:`mtl_utils.tasks.scene_tasks`, or of NYUv2
        (``segmentation``, ``depth``, ``normal``) with ``nyuv2``.
    num_train, num_val, num_test:
        Scenes rendered per split (train seed ``data_seed``, validation
        ``data_seed + 1``, test ``data_seed + 2``). With ``nyuv2``: the first
        ``num_train`` training images train, the last ``num_val`` of the
        training split validate, and the first ``num_test`` images of NYUv2's
        ``val`` split test (``None``: all).
    image_size:
        Side of the rendered scenes (a multiple of 32); ignored for NYUv2.
    nyuv2:
        Folder of NYUv2 in the MTAN layout, or ``None`` for the scenes.
    encoder, width, decoder, batch_norm:
        VGG configuration, channel multiplier, decoder (``"unet"`` or
        ``"plain"``) and batch normalisation of every model
        (:mod:`mtl_utils.models`).
    epochs, batch_size:
        Training length and batch size (Adam, learning rate from the run).
    schedule:
        ``"joint"`` (every batch carries every task's labels) or
        ``"alternating"`` (see :func:`alternate_tasks`).
    missing:
        ``{task: fraction}`` of training samples whose label of ``task`` is
        removed (:func:`drop_labels`, seeded by ``data_seed``).
    baseline_learning_rate:
        Learning rate of the single-task runs used as Δm baselines; ``None``
        when all single-task runs share one learning rate.
    init_output_bias:
        Start every depth output at the mean training depth (its bias), as one
        initialises a regression output at the target mean; otherwise a
        short run spends its first updates only moving the output from 0 to the
        depth range.
    """

    runs: Sequence[Run] = ()
    tasks: Sequence[str] = ("segmentation", "depth", "normal")
    num_train: int | None = 512
    num_val: int | None = 128
    num_test: int | None = 256
    image_size: int = 64
    data_seed: int = 0
    nyuv2: str | None = None
    encoder: str = "vgg16"
    width: float = 0.125
    decoder: str = "unet"
    batch_norm: bool = True
    epochs: int = 4
    batch_size: int = 32
    schedule: str = "joint"
    missing: Mapping[str, float] = dataclasses.field(default_factory=dict)
    baseline_learning_rate: float | None = None
    init_output_bias: bool = True

    def __post_init__(self) -> None:
        self.runs = tuple(self.runs)
        self.tasks = tuple(self.tasks)
        self.missing = dict(self.missing)
        for r in self.runs:
            if not isinstance(r, Run):
                raise ValueError(
                    f"runs must be Run objects (see grid()); received {r!r}"
                )
        keys = [r.key for r in self.runs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"runs repeat: {repeated}; expected distinct runs")
        if not self.tasks:
            raise ValueError("tasks is empty; expected at least one task name")
        for name, value in (("epochs", self.epochs), ("batch_size", self.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; received {value!r}")
        if self.schedule not in ("joint", "alternating"):
            raise ValueError(
                f"schedule={self.schedule!r}; expected 'joint' or 'alternating'"
            )
        for task, fraction in self.missing.items():
            if task not in self.tasks:
                raise ValueError(
                    f"missing names task {task!r}, which is not in tasks {self.tasks}"
                )
            if not 0.0 <= float(fraction) <= 1.0:
                raise ValueError(
                    f"missing[{task!r}] = {fraction!r}; expected a fraction in [0, 1]"
                )

    def setting(self) -> dict[str, Any]:
        """Everything but ``runs``, as JSON-compatible values.

        Runs recorded in a results file are reused only if the file's setting
        equals this one.
        """
        out = dataclasses.asdict(self)
        out.pop("runs")
        out["tasks"] = list(self.tasks)
        return out


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def experiment_tasks(config: ExperimentConfig) -> list[Task]:
    """The :class:`~mtl_utils.tasks.Task` objects of ``config.tasks``.

    Scenes: :func:`mtl_utils.tasks.scene_tasks`. NYUv2: 13-class segmentation,
    depth and normals with the book's default metrics.
    """
    if config.nyuv2 is None:
        return scene_tasks(config.tasks)
    from mtl_utils.data.nyuv2 import NYUV2_CLASSES

    known = {
        "segmentation": Task(
            "segmentation",
            "segmentation",
            NYUV2_CLASSES,
            default_metrics("segmentation"),
        ),
        "depth": Task("depth", "depth", 1, default_metrics("depth")),
        "normal": Task("normal", "normal", 3, default_metrics("normal")),
    }
    unknown = [t for t in config.tasks if t not in known]
    if unknown:
        raise ValueError(
            f"NYUv2 has no task(s) {unknown}; expected a subset of {sorted(known)}"
        )
    return [known[t] for t in config.tasks]


def _head(arrays: Mapping[str, np.ndarray], n: int | None, tail: bool = False) -> dict:
    total = len(arrays["image"])
    if n is None:
        n = total
    if n > total:
        raise ValueError(f"asked for {n} samples but the split holds {total}")
    pick = slice(total - n, total) if tail else slice(0, n)
    return {k: v[pick] for k, v in arrays.items()}


def load_data(config: ExperimentConfig) -> dict[str, dict[str, np.ndarray]]:
    """The ``train``, ``val`` and ``test`` arrays of an experiment.

    Returns
    -------
    dict
        ``{"train": arrays, "val": arrays, "test": arrays}``, each as returned by
        :func:`mtl_utils.data.scenes.render_scenes` (``image`` (N, H, W, 3) and one
        target per task), with ``config.missing`` labels removed from ``train``.
    """
    names = [t.name for t in experiment_tasks(config)]
    if config.nyuv2 is None:
        from mtl_utils.data.scenes import render_scenes

        size, seed = config.image_size, config.data_seed
        splits = {
            "train": render_scenes(config.num_train or 0, size=size, seed=seed),
            "val": render_scenes(config.num_val or 0, size=size, seed=seed + 1),
            "test": render_scenes(config.num_test or 0, size=size, seed=seed + 2),
        }
    else:
        from mtl_utils.data.nyuv2 import load_nyuv2

        train = load_nyuv2(config.nyuv2, "train", size=None)
        num_val = config.num_val or 0
        available = len(train["image"]) - num_val
        num_train = available if config.num_train is None else config.num_train
        if num_train > available:
            raise ValueError(
                f"NYUv2 train split has {len(train['image'])} images: too few for "
                f"num_train={num_train} plus num_val={num_val}"
            )
        test = load_nyuv2(config.nyuv2, "val", max_samples=config.num_test, size=None)
        splits = {
            "train": _head(train, num_train),
            "val": _head(train, num_val, tail=True),
            "test": test,
        }
    splits = {
        split: {k: v for k, v in arrays.items() if k == "image" or k in names}
        for split, arrays in splits.items()
    }
    if config.missing:
        splits["train"] = drop_labels(
            splits["train"], config.missing, experiment_tasks(config), config.data_seed
        )
    return splits


def drop_labels(
    arrays: Mapping[str, np.ndarray],
    fractions: Mapping[str, float],
    tasks: Sequence[Task] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Partial labels: remove a task's label from a random fraction of samples.

    The removed targets are set to the task's missing value
    (:data:`mtl_utils.tasks.MISSING_VALUE`: -1 for segmentation and
    classification, 0 for depth and normals), which the losses and metrics of
    :mod:`mtl_utils` skip. The image and the other tasks' labels are kept.

    Parameters
    ----------
    arrays:
        ``image`` (N, H, W, 3) and one target per task, keyed by task name.
    fractions:
        ``{task: fraction}``; ``round(fraction * N)`` samples lose that label,
        chosen independently for every task.
    tasks:
        Tasks giving each name's kind; default :func:`~mtl_utils.tasks.scene_tasks`.
    seed:
        Seed of the choice of samples.

    Returns
    -------
    dict
        A copy of ``arrays`` with the labels removed.

    Examples
    --------
    >>> arrays = {"image": np.zeros((4, 32, 32, 3)), "count": np.arange(4)}
    >>> drop_labels(arrays, {"count": 0.5}, seed=0)["count"]
    array([ 0,  1, -1, -1])
    """
    tasks = {t.name: t for t in (tasks if tasks is not None else scene_tasks())}
    out = {k: np.array(v, copy=True) for k, v in arrays.items()}
    n = len(out["image"]) if "image" in out else None
    rng = np.random.default_rng(seed)
    for name, fraction in fractions.items():
        if name not in out or name not in tasks:
            raise ValueError(
                f"cannot drop labels of {name!r}: the arrays hold {sorted(out)} and "
                f"the known tasks are {sorted(tasks)}"
            )
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(
                f"fraction of {name!r} is {fraction!r}; expected a number in [0, 1]"
            )
        size = len(out[name]) if n is None else n
        drop = rng.permutation(size)[: int(round(float(fraction) * size))]
        out[name][np.sort(drop)] = tasks[name].missing_value
    return out


def alternate_tasks(dataset: Any, tasks: Sequence[Task]) -> Any:
    """Alternating task batches: each batch becomes ``T`` batches of one task.

    Batch ``(image, {task: target})`` is followed by ``T`` copies of itself, the
    ``k``-th keeping only task ``k``'s targets (the others set to the task's
    missing value, so their losses and gradients are zero). One epoch then
    makes ``T`` times as many updates, each driven by one task, and every task
    sees each of its labels once.

    Parameters
    ----------
    dataset:
        A ``tf.data.Dataset`` of ``(image, {task: target})`` batches, e.g. from
        :func:`mtl_utils.data.pipeline.make_dataset`.
    tasks:
        The tasks in the order they take turns.

    Returns
    -------
    tf.data.Dataset
        ``T`` times as many batches, same structure.
    """
    import tensorflow as tf

    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks is empty; expected the tasks that take turns")

    def expand(image, targets):
        missing = [t.name for t in tasks if t.name not in targets]
        if missing:
            raise ValueError(
                f"the dataset has no targets for {missing}; it has {sorted(targets)}"
            )
        turns = None
        for keep in tasks:
            masked = {
                name: y
                if name == keep.name
                else tf.fill(tf.shape(y), tf.cast(_missing_of(tasks, name), y.dtype))
                for name, y in targets.items()
            }
            one = tf.data.Dataset.from_tensors((image, masked))
            turns = one if turns is None else turns.concatenate(one)
        return turns

    turns = dataset.flat_map(expand)
    known = int(dataset.cardinality())
    if known >= 0:  # flat_map forgets the length; Keras wants it for an epoch
        turns = turns.apply(tf.data.experimental.assert_cardinality(known * len(tasks)))
    return turns


def _missing_of(tasks: Sequence[Task], name: str) -> float:
    for t in tasks:
        if t.name == name:
            return t.missing_value
    raise ValueError(f"no task named {name!r} among {[t.name for t in tasks]}")


def _epoch_dataset(train, tasks, config: ExperimentConfig, seed: int, epoch: int):
    """The training batches of one epoch; their order depends on (seed, epoch)."""
    from mtl_utils.data.pipeline import make_dataset

    n = len(train["image"])
    order = np.random.default_rng([seed, epoch, 2718]).permutation(n)
    names = [t.name for t in tasks]
    shuffled = {k: train[k][order] for k in ["image", *names]}
    ds = make_dataset(shuffled, tasks, batch_size=config.batch_size, shuffle=False)
    if config.schedule == "alternating" and len(tasks) > 1:
        ds = alternate_tasks(ds, tasks)
    return ds


# ---------------------------------------------------------------------------
# models and strategies
# ---------------------------------------------------------------------------


def build_model(
    architecture: str,
    tasks: Sequence[Task],
    input_shape: Sequence[int],
    config: ExperimentConfig,
):
    """The :class:`~mtl_utils.training.MultiTaskModel` of an architecture.

    ``"single_task"`` needs exactly one task; the others take all ``tasks``.
    """
    from mtl_utils.models import build_mtan, build_multitask, build_single_task

    common = {
        "input_shape": tuple(input_shape),
        "config": config.encoder,
        "width": config.width,
        "batch_norm": config.batch_norm,
        "decoder": config.decoder,
    }
    if architecture == SINGLE_TASK:
        if len(tasks) != 1:
            raise ValueError(
                f"a single-task network takes one task; received {len(tasks)}"
            )
        return build_single_task(tasks[0], **common)
    if architecture == "hard_sharing":
        return build_multitask(tasks, **common)
    if architecture == "mtan":
        return build_mtan(tasks, **common)
    raise ValueError(
        f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}"
    )


def _init_output_bias(model, tasks: Sequence[Task], train: Mapping) -> None:
    """Set the bias of every depth output to the mean valid training depth."""
    for t in tasks:
        if t.kind != "depth" or t.name not in train:
            continue
        depth = np.asarray(train[t.name], np.float64)
        valid = depth[depth != t.missing_value]
        if valid.size == 0:
            continue
        layer = model.get_layer(t.name)
        weights = layer.get_weights()
        if len(weights) != 2:
            raise ValueError(
                f"output layer {t.name!r} has {len(weights)} weights; expected a "
                "kernel and a bias"
            )
        weights[1] = np.full_like(weights[1], valid.mean())
        layer.set_weights(weights)


def make_strategy(name: str, seed: int = 0):
    """A fresh weighting strategy from its short name; random ones get ``seed``."""
    from mtl_utils import weighting

    if name == NO_STRATEGY:
        return weighting.EqualWeighting()
    if name == "rlw":
        return weighting.RandomLossWeighting(seed=seed)
    if name == "pcgrad":
        return weighting.PCGrad(seed=seed)
    return weighting.get(name)


class _Trainable:
    """A compiled model, its strategy, and its state right after compiling.

    ``reset(weights, run)`` puts it back in that state with new initial weights
    and the run's seed and learning rate, so a model traced once trains many
    runs exactly as freshly built ones would.
    """

    def __init__(self, model, strategy, tasks, learning_rate: float):
        import keras

        model.compile(
            keras.optimizers.Adam(learning_rate), losses=list(tasks), weighting=strategy
        )
        self.model, self.strategy, self.tasks = model, strategy, list(tasks)
        self.strategy_vars = strategy.state_variables()
        self.generators = [
            v
            for v in vars(strategy).values()
            if isinstance(v, keras.random.SeedGenerator)
        ]
        self.strategy_optimizers = [o for o in [strategy.optimizer] if o is not None]
        self.state_vars = list(model.optimizer.variables) + self.strategy_vars
        self.initial = [np.array(v.numpy(), copy=True) for v in self.state_vars]

    def reset(self, weights: list[np.ndarray], run: Run) -> None:
        self.model.set_weights(weights)
        for v, value in zip(self.state_vars, self.initial, strict=True):
            v.assign(value)
        for gen in self.generators:
            gen.state.assign(np.array([run.seed, 0], dtype=gen.state.dtype))
        for opt in [self.model.optimizer, *self.strategy_optimizers]:
            opt.learning_rate = run.learning_rate

    # -- checkpoints ---------------------------------------------------------------
    def save(self, path: Path, epoch: int, logs: list[dict]) -> None:
        arrays = [*self.model.get_weights(), *(v.numpy() for v in self.state_vars)]
        meta = json.dumps({"epoch": epoch, "logs": logs, "count": len(arrays)})
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp, meta=np.array(meta), **{f"a{i:05d}": a for i, a in enumerate(arrays)}
        )
        os.replace(tmp, path)

    def restore(self, path: Path) -> tuple[int, list[dict]]:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            arrays = [f[f"a{i:05d}"] for i in range(meta["count"])]
        num_weights = len(self.model.weights)
        if len(arrays) != num_weights + len(self.state_vars):
            raise ValueError(
                f"checkpoint {path} holds {len(arrays)} arrays; expected "
                f"{num_weights + len(self.state_vars)} for this model and strategy. "
                "Delete it to restart the run"
            )
        self.model.set_weights(arrays[:num_weights])
        for v, value in zip(self.state_vars, arrays[num_weights:], strict=True):
            if tuple(v.shape) != value.shape:
                raise ValueError(
                    f"checkpoint {path}: variable {v.path} has shape {value.shape}; "
                    f"expected {tuple(v.shape)}. Delete it to restart the run"
                )
            v.assign(value)
        # epoch hooks (e.g. DWA's loss history) replayed from the logged losses
        for epoch, logs in enumerate(meta["logs"]):
            self.strategy.on_epoch_end(epoch, logs)
        return int(meta["epoch"]), list(meta["logs"])


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------


class _Runner:
    """Trains runs, reusing one traced model per (architecture, strategy, tasks)."""

    def __init__(self, config, data, tasks, output_dir, verbose, log, callbacks):
        self.config, self.data, self.tasks = config, data, tasks
        self.output_dir = output_dir
        self.verbose, self.log, self.callbacks = verbose, log, list(callbacks or [])
        self.cache: dict[tuple, _Trainable] = {}
        self.input_shape = tuple(data["train"]["image"].shape[1:])

    def _trainable(self, architecture, strategy_name, tasks, run) -> _Trainable:
        import keras

        key = (architecture, strategy_name, tuple(t.name for t in tasks))
        keras.utils.set_random_seed(run.seed)
        fresh = build_model(architecture, tasks, self.input_shape, self.config)
        if self.config.init_output_bias:
            _init_output_bias(fresh, tasks, self.data["train"])
        weights = fresh.get_weights()
        if key not in self.cache:
            self.cache[key] = _Trainable(
                fresh, make_strategy(strategy_name, run.seed), tasks, run.learning_rate
            )
        trainable = self.cache[key]
        trainable.reset(weights, run)
        return trainable

    def evict(self, keep: Iterable[tuple]) -> None:
        keep = set(keep)
        for key in [k for k in self.cache if (k[0], k[1]) not in keep]:
            del self.cache[key]

    def _checkpoint(self, run: Run, part: str) -> Path | None:
        if self.output_dir is None:
            return None
        name = run.key.replace("/", "__") + f"__{part}.npz"
        return self.output_dir / "checkpoints" / name

    def train(self, run: Run, tasks: Sequence[Task], part: str) -> dict:
        """Train one network of ``run`` on ``tasks``; metrics, logs and status."""
        from mtl_utils.metrics import evaluate

        config = self.config
        strategy = NO_STRATEGY if run.architecture == SINGLE_TASK else run.strategy
        trainable = self._trainable(run.architecture, strategy, tasks, run)
        model = trainable.model
        checkpoint = self._checkpoint(run, part)
        start, logs = 0, []
        if checkpoint is not None and checkpoint.exists():
            start, logs = trainable.restore(checkpoint)
            if self.verbose:
                self.log(f"    {part}: resumed after epoch {start} from {checkpoint}")
        diverged = None
        seconds = 0.0
        for epoch in range(start, config.epochs):
            ds = _epoch_dataset(self.data["train"], tasks, config, run.seed, epoch)
            t0 = time.perf_counter()
            history = model.fit(
                ds,
                epochs=epoch + 1,
                initial_epoch=epoch,
                verbose=0,
                callbacks=self.callbacks,
                shuffle=False,
            )
            seconds += time.perf_counter() - t0
            epoch_logs = {k: float(v[-1]) for k, v in history.history.items()}
            logs.append(epoch_logs)
            if self.verbose >= 2:
                losses = ", ".join(
                    f"{t.name} {epoch_logs.get(f'{t.name}_loss', math.nan):.4g}"
                    for t in tasks
                )
                self.log(
                    f"    {part} epoch {epoch + 1}/{config.epochs}: loss "
                    f"{epoch_logs.get('loss', math.nan):.4g} ({losses}), "
                    f"{time.perf_counter() - t0:.1f} s"
                )
            if checkpoint is not None:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                trainable.save(checkpoint, epoch + 1, logs)
            if model.nan_loss_message:
                diverged = model.nan_loss_message
                break
        batch = max(config.batch_size, 64)
        result = {"logs": logs, "seconds": seconds, "diverged": diverged}
        result["model"] = model
        for split in ("val", "test"):
            result[split] = evaluate(
                model, _eval_dataset(self.data[split], tasks, batch), tasks
            )
        return result


def _eval_dataset(arrays, tasks, batch_size):
    from mtl_utils.data.pipeline import make_dataset

    return make_dataset(arrays, tasks, batch_size=batch_size, shuffle=False)


def _row(run: Run, parts: Mapping[str, dict], tasks: Sequence[Task], epochs: int):
    row: dict[str, Any] = {
        "architecture": run.architecture,
        "strategy": run.strategy,
        "seed": run.seed,
        "learning_rate": run.learning_rate,
        "epochs": epochs,
    }
    merged = {"val": {}, "test": {}}
    for part in parts.values():
        for split in merged:
            merged[split].update(part[split])
    for t in tasks:
        for metric in t.metrics:
            row[f"{t.name}/{metric}"] = float(merged["test"][t.name][metric])
    for t in tasks:
        for metric in t.metrics:
            row[f"val/{t.name}/{metric}"] = float(merged["val"][t.name][metric])
    history: dict[str, list[float]] = {}
    for part_name, part in parts.items():
        prefix = "" if part_name == "all" else f"{part_name}/"
        for logs in part["logs"]:
            for k, v in logs.items():
                history.setdefault(prefix + k, []).append(v)
    for t in tasks:
        key = f"{t.name}_loss" if "all" in parts else f"{t.name}/{t.name}_loss"
        values = history.get(key, [])
        row[f"train/{t.name}_loss"] = values[-1] if values else math.nan
    row["seconds"] = float(sum(p["seconds"] for p in parts.values()))
    problems = [p["diverged"] for p in parts.values() if p["diverged"]]
    row["diverged"] = "; ".join(problems)
    row["history"] = history
    return row


def _read_results(path: Path, config: ExperimentConfig) -> dict[str, dict]:
    if not path.exists():
        return {}
    stored = json.loads(path.read_text())
    setting = json.loads(json.dumps(config.setting()))
    if stored.get("setting") != setting:
        old = stored.get("setting", {})
        differ = sorted(
            k for k in set(old) | set(setting) if old.get(k) != setting.get(k)
        )
        raise ValueError(
            f"{path} was written with a different setting (differing: {differ}); "
            "expected the same data, model and training settings to resume. Use "
            "another output folder, or restart=True (--restart) to discard it"
        )
    return {_key_of(row): row for row in stored.get("runs", [])}


def _key_of(row: Mapping[str, Any]) -> str:
    return Run(
        row["architecture"], row["strategy"], int(row["seed"]), row["learning_rate"]
    ).key


def _write_results(output_dir: Path, config: ExperimentConfig, rows: dict) -> None:
    order = [r.key for r in config.runs]
    ordered = [rows[k] for k in order if k in rows]
    ordered += [rows[k] for k in rows if k not in order]
    payload = {"setting": config.setting(), "runs": ordered}
    _atomic_write(output_dir / RESULTS_JSON, json.dumps(payload, indent=1))
    table = _frame(ordered)
    if len(table):
        table = add_delta_m(
            table,
            experiment_tasks(config),
            baseline_learning_rate=config.baseline_learning_rate,
            strict=False,
        )
    _atomic_write(output_dir / RESULTS_CSV, table.to_csv(index=False))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _frame(rows: Sequence[Mapping[str, Any]]):
    import pandas as pd

    return pd.DataFrame([{k: v for k, v in r.items() if k != "history"} for r in rows])


def run_experiments(
    config: ExperimentConfig,
    output_dir: str | os.PathLike | None = None,
    restart: bool = False,
    verbose: int = 1,
    log: Callable[[str], None] = print,
    callbacks: Sequence[Any] | None = None,
    data: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    return_history: bool = False,
    on_run_end: Callable[[Run, dict[str, Any]], None] | None = None,
):
    """Train every run of ``config`` that is not finished; return the results.

    Parameters
    ----------
    config:
        The setting and the runs.
    output_dir:
        Folder for ``results.json`` (the setting and one record per finished
        run, with its per-epoch training logs), ``results.csv`` (one row per
        run, with Δm) and ``checkpoints/`` (the last epoch of unfinished runs).
        Finished runs found there are not trained again. ``None``: keep
        nothing on disk.
    restart:
        Discard the results and checkpoints found in ``output_dir``.
    verbose:
        0 silent, 1 one line per run, 2 also one line per epoch.
    log:
        Where progress lines go.
    callbacks:
        Extra Keras callbacks passed to every ``fit``.
    data:
        The ``train``/``val``/``test`` arrays, when already loaded with
        :func:`load_data` (they must be what ``config`` describes).
    return_history:
        Keep the per-epoch logs in a ``history`` column.
    on_run_end:
        Called as ``on_run_end(run, models)`` after each run is trained, with
        its trained networks ``{"all": model}`` (or ``{task: model}`` for a
        single-task run), e.g. to keep predictions; the networks are reused by
        the next run of the same strategy, so keep copies, not references.

    Returns
    -------
    pandas.DataFrame
        One row per run of ``config`` (in its order): ``architecture``,
        ``strategy``, ``seed``, ``learning_rate``, ``epochs``, test metrics
        ``"<task>/<metric>"``, validation metrics ``"val/<task>/<metric>"``,
        final training losses ``"train/<task>_loss"``, ``seconds`` of training,
        ``diverged`` (empty, or why training stopped) and the Δm columns of
        :func:`add_delta_m`.
    """
    tasks = experiment_tasks(config)
    out = None
    rows: dict[str, dict] = {}
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if restart:
            for f in [out / RESULTS_JSON, out / RESULTS_CSV]:
                f.unlink(missing_ok=True)
            for f in (out / "checkpoints").glob("*.npz"):
                f.unlink()
        rows = _read_results(out / RESULTS_JSON, config)
    pending = [r for r in config.runs if r.key not in rows]
    if verbose and rows:
        done = len(config.runs) - len(pending)
        log(f"{done} of {len(config.runs)} runs already finished in {out}")
    if pending:
        if data is None:
            data = load_data(config)
        runner = _Runner(config, data, tasks, out, verbose, log, callbacks)
        # runs of one (architecture, strategy) reuse one traced model
        groups: dict[tuple, list[Run]] = {}
        for r in pending:
            groups.setdefault((r.architecture, r.strategy), []).append(r)
        index = 0
        for group, runs in groups.items():
            runner.evict([group])
            for run in runs:
                index += 1
                if verbose:
                    log(f"[{index}/{len(pending)}] {run.key}")
                if run.architecture == SINGLE_TASK:
                    parts = {t.name: runner.train(run, [t], t.name) for t in tasks}
                else:
                    parts = {"all": runner.train(run, tasks, "all")}
                if on_run_end is not None:
                    on_run_end(run, {k: p.pop("model") for k, p in parts.items()})
                row = _row(run, parts, tasks, config.epochs)
                rows[run.key] = row
                if out is not None:
                    _write_results(out, config, rows)
                    for part in parts:
                        checkpoint = runner._checkpoint(run, part)
                        checkpoint.unlink(missing_ok=True)
                if verbose:
                    status = f" DIVERGED: {row['diverged']}" if row["diverged"] else ""
                    log(f"    done in {row['seconds']:.1f} s{status}")
        runner.evict([])
    ordered = [rows[r.key] for r in config.runs]
    table = _frame(ordered)
    table = add_delta_m(
        table, tasks, baseline_learning_rate=config.baseline_learning_rate, strict=False
    )
    if return_history:
        table["history"] = [r["history"] for r in ordered]
    return table


def load_results(path: str | os.PathLike):
    """The results of :func:`run_experiments` from ``results.json`` or its folder.

    Returns
    -------
    (pandas.DataFrame, dict)
        The rows (with a ``history`` column of per-epoch logs) and the setting.
    """
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_JSON
    stored = json.loads(path.read_text())
    return pd.DataFrame(stored["runs"]), stored["setting"]


# ---------------------------------------------------------------------------
# delta_m and summaries
# ---------------------------------------------------------------------------


def _metric_columns(results, prefix: str = "") -> dict[str, list[str]]:
    """``{task: [metric, ...]}`` from columns ``"<prefix><task>/<metric>"``."""
    from mtl_utils.metrics import HIGHER_IS_BETTER

    found: dict[str, list[str]] = {}
    for column in results.columns:
        if not column.startswith(prefix):
            continue
        parts = column[len(prefix) :].split("/")
        if len(parts) == 2 and parts[1] in HIGHER_IS_BETTER and parts[0] != "val":
            found.setdefault(parts[0], []).append(parts[1])
    return found


def _nested(row, layout: Mapping[str, list[str]], prefix: str) -> dict:
    return {
        task: {m: float(row[f"{prefix}{task}/{m}"]) for m in metrics}
        for task, metrics in layout.items()
    }


def add_delta_m(
    results,
    tasks: Sequence[Task] | None = None,
    baseline_learning_rate: float | None = None,
    strict: bool = True,
):
    """Add Δm columns: each run against the single-task networks.

    Uses :func:`mtl_utils.metrics.delta_m` ("drop" convention, in %, lower is
    better; every metric of every task counts once):

    * ``delta_m``: test metrics against the single-task metrics averaged over
      seeds, the book's score. Its value for the single-task runs themselves
      averages to 0 over seeds; their spread shows how much seeds alone move
      Δm.
    * ``delta_m_same_seed``: test metrics against the single-task run of the
      same seed (NaN where that seed has none). It adds the baseline's own
      seed noise to every run of the seed.
    * ``val_delta_m``: validation metrics against the seed-averaged
      validation metrics of the single-task runs, used to choose learning
      rates (:func:`summarise`).

    Parameters
    ----------
    results:
        A DataFrame of :func:`run_experiments` rows.
    tasks:
        Tasks whose metrics count (default: every ``"<task>/<metric>"`` column).
    baseline_learning_rate:
        Learning rate of the baseline runs, when single-task runs were trained
        with several.
    strict:
        Raise when there are no single-task runs; else leave Δm NaN.

    Returns
    -------
    pandas.DataFrame
        A copy of ``results`` with the three columns.
    """
    from mtl_utils.metrics import delta_m

    table = results.copy()
    layout = _metric_columns(table)
    if tasks is not None:
        layout = {t.name: list(t.metrics) for t in tasks}
    base = table[table["architecture"] == SINGLE_TASK]
    rates = sorted(set(base["learning_rate"])) if len(base) else []
    if baseline_learning_rate is not None:
        base = base[np.isclose(base["learning_rate"], baseline_learning_rate)]
    elif len(rates) > 1:
        raise ValueError(
            f"single-task runs use learning rates {rates}; pass "
            "baseline_learning_rate to choose the baseline"
        )
    for column in ("delta_m", "delta_m_same_seed", "val_delta_m"):
        table[column] = np.nan
    if not len(base):
        if strict:
            raise ValueError(
                "no single-task runs (architecture 'single_task') to compare with; "
                "expected at least one as the Δm baseline"
            )
        return table
    by_seed = {int(row["seed"]): row for _, row in base.iterrows()}
    mean_base, mean_val = (
        {
            t: {m: float(base[f"{prefix}{t}/{m}"].mean()) for m in ms}
            for t, ms in layout.items()
        }
        for prefix in ("", "val/")
    )
    for i, row in table.iterrows():
        test = _nested(row, layout, "")
        table.loc[i, "delta_m"] = delta_m(test, mean_base)
        table.loc[i, "val_delta_m"] = delta_m(_nested(row, layout, "val/"), mean_val)
        same = by_seed.get(int(row["seed"]))
        if same is not None:
            table.loc[i, "delta_m_same_seed"] = delta_m(test, _nested(same, layout, ""))
    return table


def summarise(
    results,
    metrics: Sequence[str] | None = None,
    tuned: Sequence[str] = ("equal",),
    baseline_learning_rate: float | None = None,
):
    """Mean and standard deviation over seeds of every run group.

    A group is one (architecture, strategy, learning rate). For every strategy
    in ``tuned`` trained with several learning rates, a row
    ``"<strategy> (tuned)"`` repeats the group whose learning rate has the
    lowest mean *validation* Δm (:func:`add_delta_m`), so that the choice never
    sees the test set.

    Parameters
    ----------
    results:
        Rows of :func:`run_experiments` (Δm columns are added when missing).
    metrics:
        Columns to summarise; default ``delta_m`` then every test metric.
    tuned:
        Strategies whose learning rate is tuned on the validation set.
    baseline_learning_rate:
        See :func:`add_delta_m`.

    Returns
    -------
    pandas.DataFrame
        Index ``(architecture, strategy, learning_rate)``; columns a MultiIndex
        ``(quantity, "mean" | "std")`` plus ``("runs", "count")``. The standard
        deviation is the sample one (``ddof=1``), NaN for a single seed.
    """
    import pandas as pd

    table = results
    if "delta_m" not in table.columns:
        table = add_delta_m(table, baseline_learning_rate=baseline_learning_rate)
    if metrics is None:
        metrics = ["delta_m"] + [
            f"{t}/{m}" for t, ms in _metric_columns(table).items() for m in ms
        ]
    missing = [m for m in metrics if m not in table.columns]
    if missing:
        raise ValueError(
            f"results have no column(s) {missing}; columns are {list(table.columns)}"
        )
    keys = ["architecture", "strategy", "learning_rate"]
    arch_order = {a: i for i, a in enumerate(dict.fromkeys(table["architecture"]))}
    strategy_order = {s: i for i, s in enumerate(dict.fromkeys(table["strategy"]))}
    groups = dict(list(table.groupby(keys, sort=False)))
    ordered = sorted(
        groups, key=lambda k: (arch_order[k[0]], strategy_order[k[1]], k[2])
    )
    # strategies in ``tuned``: the learning rate with the best validation Δm
    best_rate = {}
    for arch, strategy in dict.fromkeys((k[0], k[1]) for k in ordered):
        rates = [k[2] for k in ordered if k[:2] == (arch, strategy)]
        if strategy not in tuned or len(rates) < 2:
            continue
        val = {lr: groups[(arch, strategy, lr)]["val_delta_m"].mean() for lr in rates}
        if all(np.isnan(v) for v in val.values()):
            warnings.warn(
                f"cannot tune the learning rate of {strategy!r} ({arch}): no "
                "validation Δm, as there are no single-task runs to compare with",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        best_rate[(arch, strategy)] = min(
            rates, key=lambda lr: np.inf if np.isnan(val[lr]) else val[lr]
        )
    rows = []
    for i, key in enumerate(ordered):
        rows.append((key, key))
        last = i + 1 == len(ordered) or ordered[i + 1][:2] != key[:2]
        if last and key[:2] in best_rate:
            lr = best_rate[key[:2]]
            rows.append(((key[0], f"{key[1]} (tuned)", lr), (key[0], key[1], lr)))
    records = []
    for _, source in rows:
        group = groups[source]
        record = {}
        for m in metrics:
            values = group[m].astype(float)
            record[(m, "mean")] = values.mean()
            record[(m, "std")] = values.std(ddof=1) if len(values) > 1 else np.nan
        record[("runs", "count")] = len(group)
        records.append(record)
    index = pd.MultiIndex.from_tuples([label for label, _ in rows], names=keys)
    summary = pd.DataFrame(records, index=index)
    summary.columns = pd.MultiIndex.from_tuples(summary.columns)
    return summary


def format_summary(summary, digits: int = 3, rename: Mapping[str, str] | None = None):
    """The summary as text: ``"mean ± std"`` per quantity (``"mean"`` for one seed).

    Values are rounded to ``digits`` significant digits.
    """
    import pandas as pd

    quantities = [q for q in dict.fromkeys(summary.columns.get_level_values(0))]
    out = pd.DataFrame(index=summary.index)
    for q in quantities:
        if q == "runs":
            out["runs"] = summary[("runs", "count")].astype(int)
            continue
        mean, std = summary[(q, "mean")], summary[(q, "std")]
        out[(rename or {}).get(q, q)] = [
            _fmt(m, digits) + ("" if pd.isna(s) else f" ± {_fmt(s, digits)}")
            for m, s in zip(mean, std, strict=True)
        ]
    return out


def _fmt(x: float, digits: int) -> str:
    """``x`` with ``digits`` significant digits, without exponent or "-0"."""
    if x is None or not np.isfinite(x):
        return "nan"
    if abs(x) < 1e-9:  # e.g. a mean of relative changes that cancel exactly
        return "0"
    decimals = max(digits - 1 - math.floor(math.log10(abs(x))), 0)
    text = f"{x:.{decimals}f}"
    return "0" if float(text) == 0 else text


def plot_delta_m(results, summary=None, ax=None, title: str | None = None):
    """Δm per run group: mean ± std over seeds (bars) and each seed (dots).

    Parameters
    ----------
    results:
        Rows with the ``delta_m`` column (:func:`add_delta_m`).
    summary:
        :func:`summarise` of ``results`` (computed when ``None``).
    ax:
        Matplotlib axes to draw on (a new figure when ``None``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    if "delta_m" not in results.columns:
        results = add_delta_m(results)
    if summary is None:
        summary = summarise(results, metrics=["delta_m"])
    labels, means, stds, dots = [], [], [], []
    pairs = [(a, s) for a, s, _ in summary.index]
    for (arch, strategy, lr), row in summary.iterrows():
        several = pairs.count((arch, strategy.replace(" (tuned)", ""))) > 1
        name = arch.replace("_", " ")
        label = name if arch == SINGLE_TASK else f"{name}: {strategy}"
        if several or strategy.endswith("(tuned)"):
            label += f" (lr {lr:g})"
        labels.append(label)
        means.append(row[("delta_m", "mean")])
        stds.append(row[("delta_m", "std")])
        base = strategy.replace(" (tuned)", "")
        mine = results[
            (results["architecture"] == arch)
            & (results["strategy"] == base)
            & np.isclose(results["learning_rate"], lr)
        ]
        dots.append(mine["delta_m"].to_numpy(float))
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    else:
        fig = ax.figure
    y = np.arange(len(labels))[::-1]
    colours = ["tab:green" if m <= 0 else "tab:red" for m in means]
    ax.barh(y, means, xerr=np.nan_to_num(stds), color=colours, alpha=0.5, capsize=3)
    for yi, values in zip(y, dots, strict=True):
        ax.plot(values, np.full(len(values), yi), "k.", markersize=5)
    ax.axvline(0.0, color="k", linewidth=0.8)
    ax.set_yticks(y, labels)
    ax.set_xlabel("Δm vs the single-task networks' mean (%, lower is better)")
    ax.set_title(
        title or "Multi-task score per method: mean ± std over seeds, dots = seeds"
    )
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


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


def _markdown(table) -> str:
    """A DataFrame as a Markdown table (without pandas' optional tabulate)."""
    header = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m mtl_utils.experiments --help``."""
    args = parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
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


if __name__ == "__main__":
    sys.exit(main())
