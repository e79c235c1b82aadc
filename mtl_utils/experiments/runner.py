"""Training runs, resumable: models, strategies, checkpoints, the results file."""

from __future__ import annotations

import functools
import json
import math
import os
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtl_utils.experiments.config import (
    ARCHITECTURES,
    NO_STRATEGY,
    SINGLE_TASK,
    ExperimentConfig,
    Run,
)
from mtl_utils.experiments.data import _epoch_dataset, experiment_tasks, load_data
from mtl_utils.experiments.results import (
    RESULTS_CSV,
    RESULTS_JSON,
    _atomic_write,
    _frame,
    _read_results,
    _record_files,
    _write_results,
    add_delta_m,
    read_run_records,
)
from mtl_utils.tasks import Task


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


def cosine_to_zero(peak: float, steps: int, warmup: int = 0):
    """Learning rate ``peak * (1 + cos(pi * t / steps)) / 2`` at update ``t``.

    A ``keras.optimizers.schedules.LearningRateSchedule`` that falls from
    ``peak`` at the first update to 0 after ``steps`` updates (and stays 0).
    With ``warmup`` it first rises linearly from 0 to ``peak`` over ``warmup``
    updates, then falls along the half cosine over the remaining
    ``steps - warmup`` (as ``keras.optimizers.schedules.CosineDecay`` with
    ``warmup_steps``). Its ``peak`` is a variable, so a traced training step
    follows a new peak set with ``schedule.peak.assign(value)``.
    """
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1; received {steps!r}")
    if not 0 <= int(warmup) < int(steps):
        raise ValueError(
            f"warmup must be in [0, steps) = [0, {steps}); received {warmup!r}"
        )
    return _cosine_class()(peak, steps, warmup)


@functools.cache
def _cosine_class():
    import keras

    @keras.saving.register_keras_serializable(package="mtl_utils")
    class CosineToZero(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, peak: float, steps: int, warmup: int = 0):
            self.peak = keras.Variable(
                float(peak), trainable=False, dtype="float32", name="peak_lr"
            )
            self.steps = int(steps)
            self.warmup = int(warmup)

        def __call__(self, step):
            from keras import ops

            if not self.warmup:
                t = ops.minimum(ops.cast(step, "float32"), float(self.steps))
                return self.peak * 0.5 * (1.0 + ops.cos(math.pi * t / self.steps))
            s = ops.cast(step, "float32")
            w, rest = float(self.warmup), float(self.steps - self.warmup)
            t = ops.minimum(ops.maximum(s - w, 0.0), rest)
            falling = self.peak * 0.5 * (1.0 + ops.cos(math.pi * t / rest))
            return ops.where(s < w, self.peak * s / w, falling)

        def get_config(self):
            return {
                "peak": float(self.peak.numpy()),
                "steps": self.steps,
                "warmup": self.warmup,
            }

    return CosineToZero


def _set_learning_rate(optimizer, value: float) -> None:
    """Set an optimizer's (peak) learning rate, whether constant or cosine."""
    schedule = getattr(optimizer, "_learning_rate", None)
    if isinstance(schedule, _cosine_class()):
        schedule.peak.assign(value)
    else:
        optimizer.learning_rate = value


class _Trainable:
    """A compiled model, its strategy, and its state right after compiling.

    ``reset(weights, run)`` puts it back in that state with new initial weights
    and the run's seed and learning rate, so a model traced once trains many
    runs exactly as freshly built ones would.
    """

    def __init__(
        self,
        model,
        strategy,
        tasks,
        learning_rate: float,
        cosine_steps: int = 0,
        warmup_steps: int = 0,
    ):
        import keras

        rate: Any = learning_rate
        if cosine_steps:
            rate = cosine_to_zero(learning_rate, cosine_steps, warmup_steps)
        model.compile(
            keras.optimizers.Adam(rate), losses=list(tasks), weighting=strategy
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
            _set_learning_rate(opt, run.learning_rate)

    # -- checkpoints ---------------------------------------------------------------
    def save(self, path: Path, epoch: int, logs: list[dict], owner: dict) -> None:
        arrays = [*self.model.get_weights(), *(v.numpy() for v in self.state_vars)]
        meta = json.dumps(
            {"epoch": epoch, "logs": logs, "count": len(arrays), "owner": owner}
        )
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp, meta=np.array(meta), **{f"a{i:05d}": a for i, a in enumerate(arrays)}
        )
        os.replace(tmp, path)

    def restore(self, path: Path, owner: dict) -> tuple[int, list[dict]]:
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                arrays = [f[f"a{i:05d}"] for i in range(meta["count"])]
        except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError) as err:
            raise ValueError(
                f"checkpoint {path} is unreadable ({err}); delete it to restart "
                "this run (or restart=True / --restart)"
            ) from err
        owner = json.loads(json.dumps(owner))
        if meta.get("owner") != owner:
            old = meta.get("owner") or {}
            differ = sorted(k for k in set(old) | set(owner) if old.get(k) != owner[k])
            raise ValueError(
                f"checkpoint {path} belongs to another run or setting (differing: "
                f"{differ}); delete it to restart this run (or restart=True / "
                "--restart)"
            )
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
                fresh,
                make_strategy(strategy_name, run.seed),
                tasks,
                run.learning_rate,
                cosine_steps=self.total_updates(tasks)
                if self.config.lr_schedule in ("cosine", "warmup_cosine")
                else 0,
                warmup_steps=self.total_updates(tasks) // self.config.epochs
                if self.config.lr_schedule == "warmup_cosine"
                else 0,
            )
        trainable = self.cache[key]
        trainable.reset(weights, run)
        return trainable

    def total_updates(self, tasks: Sequence[Task]) -> int:
        """Updates of one network over all epochs (the cosine schedule's length)."""
        return self.config.updates(
            len(tasks), num_images=len(self.data["train"]["image"])
        )

    def evict(self, keep: Iterable[tuple]) -> None:
        keep = set(keep)
        for key in [k for k in self.cache if (k[0], k[1]) not in keep]:
            del self.cache[key]

    def _checkpoint(self, run: Run, part: str) -> Path | None:
        if self.output_dir is None:
            return None
        name = run.key.replace("/", "__") + f"__{part}.npz"
        return self.output_dir / "checkpoints" / name

    def train(
        self, run: Run, tasks: Sequence[Task], part: str, epochs: int | None = None
    ) -> dict:
        """Train one network of ``run`` on ``tasks``; metrics, logs and status.

        ``epochs`` stops after that many of the setting's epochs (the learning
        rate still follows the full schedule), to re-check a run's beginning.
        """
        from mtl_utils.metrics import evaluate

        config = self.config
        strategy = NO_STRATEGY if run.architecture == SINGLE_TASK else run.strategy
        trainable = self._trainable(run.architecture, strategy, tasks, run)
        model = trainable.model
        checkpoint = self._checkpoint(run, part)
        owner = {"setting": config.setting(), "run": run.key, "part": part}
        batch = max(config.batch_size, 64)
        val = _eval_dataset(self.data["val"], tasks, batch)
        start, logs = 0, []
        if checkpoint is not None and checkpoint.exists():
            start, logs = trainable.restore(checkpoint, owner)
            if self.verbose:
                self.log(f"    {part}: resumed after epoch {start} from {checkpoint}")
        diverged = None
        seconds = 0.0
        for epoch in range(start, config.epochs if epochs is None else epochs):
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
            for name, values in evaluate(model, val, tasks).items():
                epoch_logs.update({f"val/{name}/{m}": v for m, v in values.items()})
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
                trainable.save(checkpoint, epoch + 1, logs, owner)
            if model.nan_loss_message:
                diverged = model.nan_loss_message
                break
        result = {"logs": logs, "seconds": seconds, "diverged": diverged}
        result["model"] = model
        result["val"] = evaluate(model, val, tasks, per_class=True)
        test = _eval_dataset(self.data["test"], tasks, batch)
        result["test"] = evaluate(model, test, tasks, per_class=True)
        return result


def _eval_dataset(arrays, tasks, batch_size):
    from mtl_utils.data.pipeline import make_dataset

    return make_dataset(arrays, tasks, batch_size=batch_size, shuffle=False)


def _configure_tensorflow(config: ExperimentConfig) -> None:
    """Apply ``config.kernels`` and ``config.threads`` (or say why it cannot)."""
    import sys

    if config.kernels is not None:
        wanted = "1" if config.kernels == "onednn" else "0"
        current = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
        if current != wanted:
            if "tensorflow" in sys.modules:
                raise ValueError(
                    f"the experiment needs kernels={config.kernels!r} "
                    f"(TF_ENABLE_ONEDNN_OPTS={wanted}), but TensorFlow was imported "
                    f"with TF_ENABLE_ONEDNN_OPTS={current!r}; set it before "
                    "importing TensorFlow, or use the command line, which does"
                )
            os.environ["TF_ENABLE_ONEDNN_OPTS"] = wanted
    if config.threads is None:
        return
    import tensorflow as tf

    threading = tf.config.threading
    now = (
        threading.get_intra_op_parallelism_threads(),
        threading.get_inter_op_parallelism_threads(),
    )
    if now == (config.threads, config.threads):
        return
    try:
        threading.set_intra_op_parallelism_threads(config.threads)
        threading.set_inter_op_parallelism_threads(config.threads)
    except RuntimeError as err:
        raise ValueError(
            f"the experiment needs threads={config.threads}, but TensorFlow has "
            f"already started with (intra, inter) = {now}; run it in a fresh "
            "process (the command line does)"
        ) from err


def _environment() -> dict[str, str]:
    """Versions and CPU settings a run was made with (recorded with its row)."""
    import platform

    import keras
    import tensorflow as tf

    from mtl_utils import __version__

    return {
        "mtl_utils": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", ""),
        "machine": platform.machine(),
    }


def _write_run_record(out: Path, config: ExperimentConfig, row: Mapping) -> None:
    folder = out / "runs"
    folder.mkdir(exist_ok=True)
    name = Run(
        row["architecture"], row["strategy"], row["seed"], row["learning_rate"]
    ).key.replace("/", "__")
    payload = {"setting": config.setting(), "row": dict(row)}
    _atomic_write(folder / f"{name}.json", json.dumps(payload))


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
    for split, prefix in (("test", ""), ("val", "val/")):
        for t in tasks:
            extra = {m: v for m, v in merged[split][t.name].items() if m[:4] == "iou_"}
            row.update({f"{prefix}{t.name}/{m}": float(v) for m, v in extra.items()})
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
    claim: Callable[[Run], bool] | None = None,
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
    claim:
        Several processes sharing ``output_dir``: ``claim(run)`` says whether
        this process trains ``run`` (see :func:`mtl_utils.experiments.plan.run_plan`).
        Each finished run is recorded in ``runs/``; only the runs this process
        found finished or trained are returned, and ``results.json`` is left to
        the process that gathers them.

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
    _configure_tensorflow(config)
    out = None
    rows: dict[str, dict] = {}
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if restart:
            for f in [out / RESULTS_JSON, out / RESULTS_CSV]:
                f.unlink(missing_ok=True)
            for f in [*(out / "checkpoints").glob("*.npz"), *_record_files(out)]:
                f.unlink()
        rows = _read_results(out / RESULTS_JSON, config)
        rows.update(read_run_records(out, config))
    pending = [r for r in config.runs if r.key not in rows]
    environment = _environment()
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
                if claim is not None and not claim(run):
                    continue
                if verbose:
                    log(f"[{index}/{len(pending)}] {run.key}")
                started = time.perf_counter()
                if run.architecture == SINGLE_TASK:
                    parts = {t.name: runner.train(run, [t], t.name) for t in tasks}
                else:
                    parts = {"all": runner.train(run, tasks, "all")}
                if on_run_end is not None:
                    on_run_end(run, {k: p.pop("model") for k, p in parts.items()})
                row = _row(run, parts, tasks, config.epochs)
                row["wall_seconds"] = time.perf_counter() - started
                row["environment"] = environment
                rows[run.key] = row
                if out is not None:
                    _write_run_record(out, config, row)
                    if claim is None:
                        _write_results(out, config, rows)
                    for part in parts:
                        checkpoint = runner._checkpoint(run, part)
                        checkpoint.unlink(missing_ok=True)
                if verbose:
                    status = f" DIVERGED: {row['diverged']}" if row["diverged"] else ""
                    log(f"    done in {row['seconds']:.1f} s{status}")
        runner.evict([])
    ordered = [rows[r.key] for r in config.runs if r.key in rows]
    table = _frame(ordered)
    table = add_delta_m(
        table, tasks, baseline_learning_rate=config.baseline_learning_rate, strict=False
    )
    if return_history:
        table["history"] = [r["history"] for r in ordered]
    return table
