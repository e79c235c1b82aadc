"""Experiment configuration: runs, the shared setting, and grids of runs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

#: Architectures :func:`build_model` knows.
ARCHITECTURES = ("single_task", "hard_sharing", "mtan")
SINGLE_TASK = "single_task"
#: Strategy label of single-task runs (one network per task needs no weighting).
NO_STRATEGY = "none"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
_ID_COLUMNS = ("architecture", "strategy", "seed", "learning_rate")
LR_SCHEDULES = ("constant", "cosine", "warmup_cosine")
#: CPU kernel sets, as ``TF_ENABLE_ONEDNN_OPTS`` chooses them.
KERNELS = ("onednn", "eigen")
#: Strategy names of :func:`mtl_utils.weighting.get` (kept here so that checking
#: a run does not import Keras; a test holds them equal).
STRATEGIES = (
    "aligned_mtl", "cagrad", "dwa", "equal", "gradnorm", "imtl", "imtl_hybrid",
    "imtl_l", "mgda", "mgda_ub", "nash_mtl", "pcgrad", "rlw", "uncertainty",
)  # fmt: skip
#: Seeds NumPy (and so ``keras.utils.set_random_seed``) accepts.
SEED_RANGE = (0, 2**32 - 1)
#: The VGG encoder pools five times by 2: image sides are multiples of this.
IMAGE_STRIDE = 32


def _check_seed(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer; received {value!r}")
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise ValueError(
            f"{name} is {value}; expected an integer in {low}..{high} (2**32 - 1), "
            "as numpy.random.seed accepts"
        )
    return int(value)


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
        if not single and self.strategy not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {self.strategy!r} for run {self.architecture!r}; "
                f"expected one of {STRATEGIES} (names of mtl_utils.weighting.get)"
            )
        seed = _check_seed("seed", self.seed)
        if not (
            isinstance(self.learning_rate, (int, float))
            and math.isfinite(self.learning_rate)
            and self.learning_rate > 0
        ):
            raise ValueError(
                f"learning_rate must be a finite number > 0; received "
                f"{self.learning_rate!r}"
            )
        object.__setattr__(self, "seed", seed)
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
    layout:
        Object layout of the rendered scenes (:data:`mtl_utils.data.scenes.LAYOUTS`).
    lr_schedule:
        ``"constant"`` (Adam at the run's learning rate) or ``"cosine"`` (the
        learning rate falls from the run's value to 0 over all updates along a
        half cosine, so the networks end at rest and seeds scatter less), or
        ``"warmup_cosine"`` (the same after a linear rise from 0 over the first
        epoch, so that early steps at a high rate do not send seeds apart).
    threads:
        TensorFlow intra- and inter-op threads of the process (``None``: its
        default). One thread makes every run bit-reproducible on a CPU and lets
        several runs train side by side (``workers`` of :func:`run_plan`).
    kernels:
        ``"onednn"`` or ``"eigen"``: the CPU kernels the results were made with
        (``TF_ENABLE_ONEDNN_OPTS``, read when TensorFlow is imported); ``None``
        does not check.
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
    layout: str = "default"
    lr_schedule: str = "constant"
    threads: int | None = None
    kernels: str | None = None

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
        _check_seed("data_seed", self.data_seed)
        size = self.image_size
        if self.nyuv2 is None and (
            isinstance(size, bool)
            or not isinstance(size, (int, np.integer))
            or size < IMAGE_STRIDE
            or size % IMAGE_STRIDE
        ):
            raise ValueError(
                f"image_size is {size!r}; expected a positive multiple of "
                f"{IMAGE_STRIDE} (the VGG encoder pools five times by 2), e.g. 64"
            )
        for name, value in (("epochs", self.epochs), ("batch_size", self.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; received {value!r}")
        if self.schedule not in ("joint", "alternating"):
            raise ValueError(
                f"schedule={self.schedule!r}; expected 'joint' or 'alternating'"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule={self.lr_schedule!r}; expected one of {LR_SCHEDULES}"
            )
        if self.kernels not in (None, *KERNELS):
            raise ValueError(
                f"kernels={self.kernels!r}; expected None or one of {KERNELS}"
            )
        if self.threads is not None and (
            isinstance(self.threads, bool)
            or not isinstance(self.threads, int)
            or self.threads < 1
        ):
            raise ValueError(
                f"threads must be None or an integer >= 1; received {self.threads!r}"
            )
        from mtl_utils.data.scenes import LAYOUTS

        if self.layout not in LAYOUTS:
            raise ValueError(
                f"unknown layout {self.layout!r}; expected one of {sorted(LAYOUTS)}"
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

    def updates(self, num_tasks: int = 1, num_images: int | None = None) -> int:
        """Optimizer updates of one network over all epochs.

        An epoch is ``ceil(num_images / batch_size)`` batches (the last one may
        be short), times ``num_tasks`` with the alternating schedule, where
        each batch carries one task. ``num_images`` defaults to ``num_train``.
        """
        num_images = self.num_train if num_images is None else num_images
        if num_images is None:
            raise ValueError(
                "num_train is None (all NYUv2 images): pass num_images, the "
                "number of training images, to count the updates"
            )
        if (
            isinstance(num_tasks, bool)
            or not isinstance(num_tasks, int)
            or num_tasks < 1
        ):
            raise ValueError(
                f"num_tasks must be an integer >= 1; received {num_tasks!r}"
            )
        per_epoch = math.ceil(num_images / self.batch_size)
        if self.schedule == "alternating":
            per_epoch *= num_tasks
        return per_epoch * self.epochs

    def setting(self) -> dict[str, Any]:
        """Everything but ``runs``, as JSON-compatible values.

        Runs recorded in a results file are reused only if the file's setting
        equals this one.
        """
        out = dataclasses.asdict(self)
        out.pop("runs")
        out["tasks"] = list(self.tasks)
        return out
