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

from mtl_utils.experiments.cli import config_from_args, main, parse_args, write_report
from mtl_utils.experiments.config import (
    ARCHITECTURES,
    NO_STRATEGY,
    SINGLE_TASK,
    ExperimentConfig,
    Run,
    grid,
)
from mtl_utils.experiments.data import (
    alternate_tasks,
    drop_labels,
    experiment_tasks,
    load_data,
)
from mtl_utils.experiments.plots import plot_delta_m
from mtl_utils.experiments.results import (
    add_delta_m,
    format_summary,
    load_results,
    paired_differences,
    summarise,
)
from mtl_utils.experiments.runner import build_model, make_strategy, run_experiments

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
    "paired_differences",
    "format_summary",
    "plot_delta_m",
    "parse_args",
    "config_from_args",
    "write_report",
    "main",
]
