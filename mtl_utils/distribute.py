"""Running ``tf.distribute`` on one machine: logical devices and local workers.

Two things make a laptop (or a CI runner) behave like a small cluster:

* :func:`configure_logical_cpus` splits the CPU into several *logical* devices,
  so that ``tf.distribute.MirroredStrategy`` has more than one replica to mirror
  the model on; :func:`local_devices` does the same with a single GPU (two
  logical GPUs). TensorFlow fixes its devices when it first runs an op, so this
  must be called before any TensorFlow op (right after the imports).
* :func:`launch_local_workers` starts several copies of a training script as
  separate processes on ``127.0.0.1``, each with the ``TF_CONFIG`` that
  ``tf.distribute.MultiWorkerMirroredStrategy`` reads (:func:`tf_config`), the
  same variable a cluster scheduler sets on real machines.
* :func:`run_train_steps` trains a compiled model in a short custom loop around
  its own ``train_step``, for ``MultiWorkerMirroredStrategy``, under which
  Keras 3's ``fit()`` fails.

Only the TensorFlow backend of Keras distributes with ``tf.distribute``.

Examples
--------
>>> import json
>>> config = json.loads(tf_config(["127.0.0.1:20000", "127.0.0.1:20001"], index=1))
>>> config["task"]
{'type': 'worker', 'index': 1}
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "GPU_SPLIT_MEMORY_MB",
    "configure_logical_cpus",
    "free_ports",
    "launch_local_workers",
    "local_devices",
    "run_train_steps",
    "tf_config",
]


#: Memory (MiB) of each of the two logical GPUs that :func:`local_devices` makes
#: of a single physical GPU: two of them (12 GiB) fit the 15 GiB of a Colab T4
#: with room for CUDA's own context.
GPU_SPLIT_MEMORY_MB = 6144


def _check_count(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _split_device(physical, configs: list, kind: str, caller: str) -> list[str]:
    """Give ``physical`` the logical ``configs``; the logical ``kind`` names.

    When TensorFlow has already initialised its devices, the configuration
    cannot change: asking again for as many devices as exist is fine, asking
    for another number raises a RuntimeError that says what to do.
    """
    import tensorflow as tf

    try:
        tf.config.set_logical_device_configuration(physical, configs)
    except RuntimeError:  # devices already initialised
        current = tf.config.list_logical_devices(kind)
        if len(current) != len(configs):
            raise RuntimeError(
                f"TensorFlow already initialised {len(current)} logical {kind} "
                f"device(s); {len(configs)} were requested. Logical devices must "
                "be configured before the first TensorFlow op: restart the "
                f"process (kernel) and call {caller} right after importing keras"
            ) from None
    return [d.name for d in tf.config.list_logical_devices(kind)]


def configure_logical_cpus(num_devices: int = 2) -> list[str]:
    """Split the first physical CPU into ``num_devices`` logical devices.

    ``MirroredStrategy(devices)`` then runs one replica per logical device: the
    replicas share the CPU's cores, so this tests distributed *semantics*, not
    speed. On a machine with GPUs use the GPUs instead (:func:`local_devices`).

    Parameters
    ----------
    num_devices:
        Number of logical CPU devices (>= 1).

    Returns
    -------
    list of str
        The logical CPU device names, e.g. ``["/device:CPU:0", "/device:CPU:1"]``.

    Raises
    ------
    ValueError
        If ``num_devices`` is not a positive integer.
    RuntimeError
        If TensorFlow has already initialised its devices with a different
        number of logical CPUs (restart the process and call this first).
    """
    _check_count(num_devices, "num_devices")
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    configs = [tf.config.LogicalDeviceConfiguration()] * num_devices
    return _split_device(cpu, configs, "CPU", "configure_logical_cpus")


def local_devices(
    num_cpu_devices: int = 2, gpu_memory_limit: int = GPU_SPLIT_MEMORY_MB
) -> list[str]:
    """Devices for a ``MirroredStrategy`` on this machine, at least two.

    * Several GPUs: all of them.
    * One GPU: split into two *logical* GPUs of ``gpu_memory_limit`` MiB each
      (``tf.config.set_logical_device_configuration``), so that a mirrored run
      has two replicas to compare with one device. Like two logical CPUs, they
      share one chip's compute: it tests what distribution computes, not speed.
      TensorFlow needs a memory limit for each logical GPU; together they may
      use no more than the GPU has.
    * No GPU: ``num_cpu_devices`` logical CPUs (:func:`configure_logical_cpus`).

    Call it before any TensorFlow op, for the same reason.

    Parameters
    ----------
    num_cpu_devices:
        Number of logical CPUs when there is no GPU (>= 1).
    gpu_memory_limit:
        MiB of each of the two logical GPUs of a single GPU (>= 1); default
        :data:`GPU_SPLIT_MEMORY_MB`.

    Returns
    -------
    list of str
        Logical device names, e.g. ``["/device:GPU:0", "/device:GPU:1"]``.

    Raises
    ------
    ValueError
        If a count or the memory limit is not a positive integer.
    RuntimeError
        If TensorFlow has already initialised another number of logical
        devices (restart the process and call this first).
    """
    _check_count(num_cpu_devices, "num_cpu_devices")
    _check_count(gpu_memory_limit, "gpu_memory_limit")
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) == 1:
        config = tf.config.LogicalDeviceConfiguration(memory_limit=gpu_memory_limit)
        return _split_device(gpus[0], [config] * 2, "GPU", "local_devices")
    if gpus:
        return [d.name for d in tf.config.list_logical_devices("GPU")]
    return configure_logical_cpus(num_cpu_devices)


def free_ports(num_ports: int, host: str = "127.0.0.1") -> list[int]:
    """``num_ports`` distinct TCP ports that are free on ``host`` right now.

    The operating system picks them (bind to port 0); they stay free unless
    another program takes them before the workers start.
    """
    if isinstance(num_ports, bool) or not isinstance(num_ports, int) or num_ports < 1:
        raise ValueError(f"num_ports must be an int >= 1, got {num_ports!r}")
    sockets, ports = [], []
    try:
        for _ in range(num_ports):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)  # keep open so that the next port differs
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def tf_config(workers: Sequence[str], index: int) -> str:
    """The ``TF_CONFIG`` JSON of worker ``index`` in a cluster of ``workers``.

    ``MultiWorkerMirroredStrategy`` reads it from the environment when it is
    created: every worker gets the same ``cluster`` and its own ``task``.
    Worker 0 is the *chief* (it writes checkpoints and summaries).

    Parameters
    ----------
    workers:
        ``"host:port"`` addresses, one per worker, in the same order on every
        worker.
    index:
        This worker's position in ``workers``.
    """
    workers = [str(w) for w in workers]
    if not workers:
        raise ValueError("workers is empty; expected one 'host:port' per worker")
    for w in workers:
        host, _, port = w.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"worker address {w!r}; expected 'host:port'")
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError(f"index must be an int, got {index!r}")
    if not 0 <= index < len(workers):
        raise ValueError(
            f"index {index} is out of range for {len(workers)} workers; expected "
            f"0 <= index < {len(workers)}"
        )
    config = {
        "cluster": {"worker": workers},
        "task": {"type": "worker", "index": index},
    }
    return json.dumps(config)


def launch_local_workers(
    command: Sequence[str],
    num_workers: int = 2,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 300.0,
) -> list[subprocess.CompletedProcess]:
    """Run ``num_workers`` copies of ``command`` as a cluster on 127.0.0.1.

    Each copy gets ``TF_CONFIG`` (:func:`tf_config` with free local ports) and
    the index in ``MTL_WORKER_INDEX``; all start at once (a
    ``MultiWorkerMirroredStrategy`` waits until every worker has joined) and
    this function waits for all of them.

    Parameters
    ----------
    command:
        The program and its arguments, e.g. ``[sys.executable, "train.py"]``.
    num_workers:
        Number of worker processes (>= 1).
    env:
        Extra environment variables for every worker (added to this process's
        environment).
    cwd:
        Working directory of the workers.
    timeout:
        Seconds to wait for all workers; they are killed after that.

    Returns
    -------
    list of subprocess.CompletedProcess
        One per worker, in index order, with ``stdout`` and ``stderr`` as text.

    Raises
    ------
    RuntimeError
        If a worker exits with a non-zero status or the timeout passes; the
        message holds the end of that worker's stderr.
    """
    command = [str(c) for c in command]
    if not command:
        raise ValueError("command is empty; expected e.g. [sys.executable, 'train.py']")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int):
        raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    workers = [f"127.0.0.1:{p}" for p in free_ports(num_workers)]
    procs, logs = [], []
    for i in range(num_workers):
        worker_env = {**os.environ, **(env or {})}
        worker_env["TF_CONFIG"] = tf_config(workers, i)
        worker_env["MTL_WORKER_INDEX"] = str(i)
        # Files, not pipes: a worker that logs a lot would block on a full pipe.
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        logs.append((out, err))
        procs.append(
            subprocess.Popen(command, env=worker_env, cwd=cwd, stdout=out, stderr=err)
        )
    # Wait for all; if one fails, the others would wait for it forever: stop them.
    deadline = time.monotonic() + timeout
    failure = None
    while any(p.poll() is None for p in procs):
        bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if bad:
            failure = f"worker {bad[0]} exited with status {procs[bad[0]].returncode}"
        elif time.monotonic() > deadline:
            failure = f"the workers did not finish within {timeout} s"
        if failure:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.1)
    results = []
    for proc, (out, err) in zip(procs, logs, strict=True):
        proc.wait()
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read())
            f.close()
        results.append(subprocess.CompletedProcess(command, proc.returncode, *texts))
    if failure is None:
        bad = [i for i, r in enumerate(results) if r.returncode != 0]
        if bad:
            failure = f"worker {bad[0]} exited with status {results[bad[0]].returncode}"
    if failure is not None:
        tails = "\n".join(
            f"--- worker {i} stderr (end) ---\n{r.stderr[-2000:]}"
            for i, r in enumerate(results)
        )
        raise RuntimeError(f"{failure}\n{tails}")
    return results


def run_train_steps(model, dataset, steps: int, strategy=None) -> dict[str, float]:
    """``steps`` training steps of a compiled Keras model, in a custom loop.

    Each step is ``strategy.run(model.train_step, (batch,))`` inside a
    ``tf.function``: the model's own ``train_step`` (for a
    :class:`~mtl_utils.training.MultiTaskModel`, its task balancing) runs on
    every replica, without ``fit()``. Keras 3's ``fit()`` fails under
    ``MultiWorkerMirroredStrategy`` while it builds the model (the issue
    keras-team/keras#20585); this loop is the workaround.

    Parameters
    ----------
    model:
        A compiled Keras model (TensorFlow backend) created in
        ``strategy.scope()``.
    dataset:
        A distributed dataset (``strategy.distribute_datasets_from_function``
        or ``strategy.experimental_distribute_dataset``) of
        ``(inputs, targets)`` batches, or a plain ``tf.data.Dataset`` when
        ``strategy`` is the default one.
    steps:
        Number of steps (batches); the dataset must hold at least that many.
    strategy:
        The ``tf.distribute`` strategy; default ``model.distribute_strategy``.

    Returns
    -------
    dict
        The model's metrics after the last step, as read on this worker
        (``loss``, ``<task>_loss``, ``weight_<task>`` for a MultiTaskModel).
    """
    import tensorflow as tf

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if getattr(model, "optimizer", None) is None:
        raise ValueError("the model is not compiled; call model.compile(...) first")
    strategy = strategy or model.distribute_strategy
    with strategy.scope():
        if not model.optimizer.built:  # variables must exist before tf.function
            model.optimizer.build(model.trainable_variables)
    iterator = iter(dataset)

    @tf.function
    def one_step():
        strategy.run(model.train_step, args=(next(iterator),))

    for _ in range(steps):
        one_step()
    return {m.name: float(m.result()) for m in model.metrics}
