"""`MultiTaskModel`: Keras `fit()` for multi-task models with task balancing.

:class:`MultiTaskModel` is a functional :class:`keras.Model` whose outputs are a
dict ``{task: tensor}``. Its ``compile(optimizer, losses={task: loss},
weighting=strategy)`` and ``fit()`` give the usual Keras progress bars,
callbacks, validation and ``History``, which records per epoch:

* ``loss``: the plain sum of task losses (plus regularisation), comparable across
  strategies and with ``val_loss``;
* ``<task>_loss``: every task's loss, averaged over the labelled elements seen
  in the epoch (unlabelled pixels or samples do not count);
* ``weight_<task>``: the epoch-mean of the weight the strategy gave the task
  (for gradient methods: its coefficient on the task's shared gradient).

Marking the shared part of your own model
-----------------------------------------
Nothing is needed to tell shared from task-specific parameters: a layer that
feeds two or more task outputs is shared, one that feeds a single output belongs
to that task's head (found from the functional graph at ``compile``). Pass the
shared feature tensor, usually the encoder output, as ``representation``::

    inputs = keras.Input((64, 64, 3))
    z = encoder(inputs)                          # shared by every task
    outputs = {"segmentation": seg_head(z), "depth": depth_head(z)}
    model = MultiTaskModel(inputs, outputs, representation=z)

MGDA-UB differentiates the task losses with respect to ``representation``, and
GradNorm's "last shared layer" is the last layer with a kernel before it
(override with ``last_shared_layer=``); both need it. Models without a single
shared tensor (MTAN) leave it ``None``.

How per-task gradients are computed
-----------------------------------
The forward pass runs once. The shared part of the graph hands the heads a few
*boundary* tensors (the representation, plus skip features in a U-Net). One
backward pass through each head gives every task's gradient with respect to the
boundary tensors and to its own head. Methods that need the ``(T, P)`` matrix of
per-task gradients of the ``P`` shared parameters (PCGrad, MGDA, CAGrad, ...)
then run one backward pass per task through the shared layers only, starting
from that task's boundary gradients; methods that only need weights (loss-based
ones, GradNorm, MGDA-UB) back-propagate the weighted boundary gradients through
the shared layers once, as equal weighting does. If a shared layer is called
again inside a head (tied weights), the model falls back to one vectorised
Jacobian of the stacked task losses.

Saving: ``model.save("m.keras")`` and ``keras.models.load_model("m.keras")``
round-trip the architecture (with its representation) and weights; ``compile``
again after loading (losses and the strategy are not saved). The strategy's
state (learnt weights, counters, seed positions) is saved with the weights, also
by ``save_weights``, and restored when the model is compiled with the same
strategy.

Only the TensorFlow backend is supported (``train_step`` uses
``tf.GradientTape``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from mtl_utils import weighting as weighting_module
from mtl_utils.losses import loss_for
from mtl_utils.tasks import Task
from mtl_utils.validation import check_target

__all__ = ["MultiTaskModel", "StopOnNaNLoss", "WeightingCallback"]

# Reductions after which Keras scales a loss by 1 / replicas under tf.distribute.
_SCALED = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


# ------------------------------------------------------------------ graph analysis


def _node_of(tensor):
    history = getattr(tensor, "_keras_history", None)
    if history is None or history.operation is None:
        return None
    return history.operation._inbound_nodes[history.node_index]


def _upstream_nodes(tensors) -> dict[int, object]:
    """All nodes (by id) that ``tensors`` depend on, their own nodes included."""
    found: dict[int, object] = {}
    stack = [n for n in (_node_of(t) for t in tensors) if n is not None]
    while stack:
        node = stack.pop()
        if id(node) in found:
            continue
        found[id(node)] = node
        stack.extend(node.parent_nodes)
    return found


def _raw(variables) -> list:
    """Backend (tf.Variable) handles of Keras variables, as GradientTape sources.

    ``tape.gradient(..., unconnected_gradients=ZERO)`` and ``tape.jacobian`` need
    TF dtypes; Keras variables report theirs as strings.
    """
    return [getattr(v, "value", v) for v in variables]


def _is_input_layer(op) -> bool:
    return isinstance(op, keras.layers.InputLayer)


def _variables_of(ops_) -> list:
    out, seen = [], set()
    for op in ops_:
        for v in getattr(op, "trainable_variables", []):
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
    return out


def _has_kernel(layer) -> bool:
    own = getattr(layer, "_trainable_variables", None)
    if own is None:
        own = layer.trainable_variables
    return any(len(v.shape) >= 2 for v in own)


def _find_last_weighted_layer(tensor):
    """The nearest layer with a kernel (rank >= 2 weight) upstream of ``tensor``."""
    while True:
        history = getattr(tensor, "_keras_history", None)
        if history is None or history.operation is None:
            raise ValueError(
                "found no layer with a kernel upstream of the representation; "
                "pass last_shared_layer= to MultiTaskModel"
            )
        op = history.operation
        if isinstance(op, keras.Model) and getattr(op, "outputs", None) is not None:
            inner = keras.tree.flatten(op.outputs)[history.tensor_index]
            tensor = inner
            continue
        if _has_kernel(op):
            return op
        node = op._inbound_nodes[history.node_index]
        parents = node.arguments.keras_tensors
        if len(parents) != 1:
            raise ValueError(
                f"cannot pick the last shared layer: layer {op.name!r} before the "
                f"representation has {len(parents)} inputs. Pass "
                "last_shared_layer=<layer> to MultiTaskModel"
            )
        tensor = parents[0]


def _batch_mean(fn):
    """A Keras loss function (per-sample values) as a scalar batch-mean loss."""

    def loss(y_true, y_pred):
        return ops.mean(fn(y_true, y_pred))

    loss.__name__ = getattr(fn, "__name__", "loss")
    return loss


# ------------------------------------------------------------------------ callbacks


class StopOnNaNLoss(keras.callbacks.Callback):
    """Stop training on a non-finite input, task loss or gradient, naming it.

    Added automatically by :meth:`MultiTaskModel.fit`. A
    :class:`MultiTaskModel` skips such a step itself (its weights stay finite);
    this callback reads what the step found (the batch's inputs, a task's loss,
    the gradients) and ``<task>_loss`` in the batch logs. On a non-finite value
    it sets ``model.stop_training``, stores the message in
    ``model.nan_loss_message`` and warns (``RuntimeWarning``), or raises
    ``FloatingPointError`` when ``raise_error=True``.
    """

    def __init__(self, task_names: Sequence[str], raise_error: bool = False):
        super().__init__()
        self.task_names = list(task_names)
        self.raise_error = raise_error
        self._epoch = 0
        self._seen = None

    def _new_flags(self) -> np.ndarray | None:
        """What the model's steps found non-finite since the last batch."""
        state = getattr(self.model, "_mtl", None)
        counts = getattr(state, "nonfinite_counts", None)
        if counts is None:
            return None
        counts = np.array(counts.numpy(), np.float64)
        new = counts if self._seen is None else counts - self._seen
        self._seen = counts
        return new

    def on_train_begin(self, logs=None):
        self._seen = None
        self._new_flags()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _what(self, logs) -> tuple[str, str] | None:
        """``(what was not finite, advice)``, or None."""
        flags = self._new_flags()
        n = len(self.task_names)
        if flags is not None and flags[0] > 0:
            return (
                "values in the batch's inputs",
                "make_dataset refuses such images; check the inputs given to fit.",
            )
        bad = []
        for i, name in enumerate(self.task_names):
            value = logs.get(f"{name}_loss")
            found = flags is not None and flags[1 + i] > 0
            if found or (
                value is not None and not math.isfinite(float(np.asarray(value)))
            ):
                bad.append(name)
        if not bad:
            value = logs.get("loss")
            if value is not None and not math.isfinite(float(np.asarray(value))):
                bad = ["<regularisation losses>"]
        if bad:
            return (
                f"loss for task(s) {bad}",
                "Check those targets (missing labels must use MISSING_VALUE), the "
                "learning rate and the loss.",
            )
        if flags is not None and flags[1 + n] > 0:
            return (
                "gradients (with finite inputs and losses)",
                "Lower the learning rate or check the losses' gradients.",
            )
        return None

    def on_train_batch_end(self, batch, logs=None):
        found = self._what(logs or {})
        if found:
            message = (
                f"non-finite {found[0]} at epoch {self._epoch + 1}, batch "
                f"{batch + 1}: the step was skipped (the weights stay finite) and "
                f"training stopped. {found[1]}"
            )
            self.model.stop_training = True
            self.model.nan_loss_message = message
            if self.raise_error:
                raise FloatingPointError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)


class WeightingCallback(keras.callbacks.Callback):
    """Calls the strategy's ``on_epoch_end`` hook (DWA reads the epoch's losses).

    Added automatically by :meth:`MultiTaskModel.fit`.
    """

    def __init__(self, strategy: weighting_module.Weighting):
        super().__init__()
        self.strategy = strategy

    def on_epoch_end(self, epoch, logs=None):
        self.strategy.on_epoch_end(epoch, logs)


# ------------------------------------------------------------ per-task gradients


def _flatten(grads):
    return ops.concatenate([ops.reshape(g, (-1,)) for g in grads], axis=0)


def _unflatten(flat, variables):
    out, start = [], 0
    for v in variables:
        size = int(np.prod(v.shape))
        out.append(ops.reshape(flat[start : start + size], v.shape))
        start += size
    return out


def _flat_jacobian(tape, stacked, variables):
    """``(T, P)`` Jacobian of the ``(T,)`` tensor ``stacked`` (vectorised)."""
    jac = tape.jacobian(
        stacked,
        _raw(variables),
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
        experimental_use_pfor=True,
    )
    n = stacked.shape[0]
    return ops.concatenate([ops.reshape(j, (n, -1)) for j in jac], axis=1)


class _Cut(NamedTuple):
    """Where a gradient step's forward pass was split (see ``_split_forward``).

    ``staged``: the forward pass was split; ``boundary``: the shared part's
    boundary tensors; ``leaves``: the copies of
    them, cut off from the shared part, that the heads read (both empty without
    a split); ``z``: the representation when the shared part returns it
    separately; ``z_index``: its position among the boundary tensors, if any.
    """

    staged: bool
    boundary: list
    leaves: list
    z: object
    z_index: int | None


class _TaskGradients:
    """Per-task gradients of one training step, read from its persistent tape.

    With a boundary split, the constructor runs stage 1: one backward pass
    through each head gives task ``i``'s gradient with respect to the boundary
    tensors (``boundary_grads[i]``, the cotangents stage 2 starts from) and to
    its own head (``head_grads[i]``). Stage 2 goes through the shared layers:
    once per task for the ``(T, P)`` matrix (:meth:`matrix`) or once for a
    weighted sum (:meth:`weighted`); no forward pass is repeated. Without a
    split (a shared layer called again inside a head), the matrix is one
    vectorised Jacobian of the stacked task losses.

    Parameters
    ----------
    tape:
        The persistent ``tf.GradientTape`` the forward pass ran under.
    cut:
        The forward pass's :class:`_Cut`.
    scaled, scaled_vec:
        The ``T`` scalar losses the optimizer differentiates, and their stack
        (computed under ``tape``).
    head_vars:
        Each task's own (head) variables, in task order.
    need_z:
        Also take every task's gradient w.r.t. the representation (``z_grads``).
    """

    def __init__(self, tape, cut, scaled, scaled_vec, head_vars, need_z=False):
        self.tape, self.cut = tape, cut
        self.scaled, self.scaled_vec = scaled, scaled_vec
        self.head_vars = head_vars
        self.staged = cut.staged
        self.boundary_grads, self.head_grads, self.z_grads = [], [], []
        zero = tf.UnconnectedGradients.ZERO
        nb = len(cut.boundary)
        if self.staged:
            for loss, variables in zip(scaled, head_vars, strict=True):
                g = tape.gradient(
                    loss, cut.leaves + _raw(variables), unconnected_gradients=zero
                )
                self.boundary_grads.append(g[:nb])
                self.head_grads.append(g[nb:])
                if need_z and cut.z_index is not None:
                    self.z_grads.append(g[cut.z_index])
                elif need_z:  # z inside the shared part: continue back to it
                    self.z_grads.append(
                        tape.gradient(
                            cut.boundary,
                            cut.z,
                            output_gradients=g[:nb],
                            unconnected_gradients=zero,
                        )
                    )
        elif need_z:
            self.z_grads = [
                tape.gradient(loss, cut.z, unconnected_gradients=zero)
                for loss in scaled
            ]

    def matrix(self, variables):
        """``(T, P)`` per-task gradients of ``variables`` on this replica (scaled).

        Staged: one backward pass through the shared layers per task, each from
        that task's boundary cotangents. A plain loop measured faster on CPU
        than ``tf.vectorized_map`` over tasks.
        """
        if not self.staged:
            return _flat_jacobian(self.tape, self.scaled_vec, variables)
        rows = []
        for cotangents in self.boundary_grads:
            grads = self.tape.gradient(
                self.cut.boundary,
                _raw(variables),
                output_gradients=list(cotangents),
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            rows.append(_flatten(grads))
        return ops.stack(rows)

    def weighted(self, coef, variables):
        """Gradients of ``sum_i coef_i * scaled_i`` w.r.t. ``variables``: one
        backward pass (staged: from the coefficient-weighted boundary
        cotangents)."""
        zero = tf.UnconnectedGradients.ZERO
        if not self.staged:
            return self.tape.gradient(
                self.scaled_vec,
                _raw(variables),
                output_gradients=coef,
                unconnected_gradients=zero,
            )
        n = len(self.scaled)
        # Boundary tensors are float16 under a mixed policy.
        cotangents = [
            sum(
                ops.cast(coef[i], self.boundary_grads[i][k].dtype)
                * self.boundary_grads[i][k]
                for i in range(n)
            )
            for k in range(len(self.cut.boundary))
        ]
        return self.tape.gradient(
            self.cut.boundary,
            _raw(variables),
            output_gradients=cotangents,
            unconnected_gradients=zero,
        )

    def heads(self):
        """Each task's (scaled) gradient of its own head's variables."""
        if self.staged:
            return self.head_grads
        return [
            self.tape.gradient(
                loss,
                _raw(variables),
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            for loss, variables in zip(self.scaled, self.head_vars, strict=True)
        ]


# ---------------------------------------------------------------------------- state


class _State:
    """Plain (untracked) holder of MultiTaskModel's bookkeeping."""

    def __init__(self):
        self.output_names: list[str] = []
        self.outputs: dict = {}
        self.inputs = None
        self.representation = None
        self.last_shared_layer = None
        self.step_model = self.shared_model = self.head_model = None
        self.compiled = False


@keras.saving.register_keras_serializable(package="mtl_utils")
class MultiTaskModel(keras.Model):
    """A functional Keras model with one output per task and task balancing.

    Parameters
    ----------
    inputs:
        Model inputs (as for ``keras.Model(inputs, outputs)``).
    outputs:
        ``{task: tensor}``; the keys are the task names used by the dataset's
        targets and by ``compile(losses=...)``.
    representation:
        Optional shared feature tensor (the encoder output) that every task
        output depends on; see the module docstring. Required by MGDA-UB and
        GradNorm (it locates the last shared layer).
    last_shared_layer:
        GradNorm's layer ``W``; default the last layer with a kernel before
        ``representation``.
    name:
        Model name.

    Examples
    --------
    >>> import keras
    >>> from mtl_utils.weighting import PCGrad
    >>> inputs = keras.Input((16, 16, 3))
    >>> z = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    >>> outputs = {
    ...     "depth": keras.layers.Conv2D(1, 1)(z),
    ...     "segmentation": keras.layers.Conv2D(5, 1)(z),
    ... }
    >>> model = MultiTaskModel(inputs, outputs, representation=z)
    >>> tasks = [Task("depth", "depth", 1), Task("segmentation", "segmentation", 5)]
    >>> model.compile("adam", losses=tasks, weighting=PCGrad())
    >>> model.task_names
    ['depth', 'segmentation']
    """

    def __init__(
        self,
        inputs,
        outputs: Mapping,
        representation=None,
        last_shared_layer: keras.layers.Layer | None = None,
        name: str | None = None,
        **kwargs,
    ):
        if not isinstance(outputs, Mapping) or not outputs:
            raise ValueError(
                "MultiTaskModel needs outputs as a non-empty dict {task_name: tensor}; "
                f"got {type(outputs).__name__}"
            )
        outputs = {str(k): v for k, v in outputs.items()}
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        state = _State()
        state.output_names = list(outputs)
        state.outputs = outputs
        state.inputs = inputs
        if representation is not None:
            if _node_of(representation) is None:
                raise ValueError(
                    "representation must be a symbolic Keras tensor of this model "
                    f"(a layer output), got {type(representation).__name__}"
                )
            for task, out in outputs.items():
                if not any(
                    any(kt is representation for kt in n.arguments.keras_tensors)
                    for n in _upstream_nodes([out]).values()
                ):
                    raise ValueError(
                        f"output {task!r} does not depend on the representation; "
                        "representation must be the shared tensor every task uses"
                    )
        state.representation = representation
        state.last_shared_layer = last_shared_layer
        # Stored without Keras tracking (the model is already built and locked).
        object.__setattr__(self, "_mtl", state)
        self.nan_loss_message = None

    # ------------------------------------------------------------ serialisation
    def get_config(self) -> dict:
        """The functional config plus the representation's layer and index.

        ``model.save("m.keras")`` / ``keras.models.load_model("m.keras")`` round-
        trip the architecture and weights; call ``compile`` again after loading
        (with the same strategy, whose saved state it then restores).
        """
        st = self._mtl
        config = keras.Model(inputs=st.inputs, outputs=st.outputs).get_config()
        config["name"] = self.name
        if st.representation is not None:
            history = st.representation._keras_history
            config["representation"] = [history.operation.name, history.tensor_index]
        if st.last_shared_layer is not None:
            config["last_shared_layer"] = st.last_shared_layer.name
        return config

    def save_own_variables(self, store) -> None:
        """Keras' own variables, then the strategy's state as ``weighting_<i>``.

        The state is :meth:`~mtl_utils.weighting.Weighting.state_variables`
        (GradNorm's weights, DWA's epoch losses, a seed generator's position,
        the strategy's optimizer), so that ``save_weights`` / ``load_weights``
        (and ``model.save``) resume a strategy where it was. The model's own
        optimizer is saved by ``model.save``, not by ``save_weights``, as in Keras.
        """
        super().save_own_variables(store)
        strategy = self.weighting
        if strategy is not None:
            for i, v in enumerate(strategy.state_variables()):
                store[f"weighting_{i}"] = v

    def load_own_variables(self, store) -> None:
        """Inverse of :meth:`save_own_variables`. A model not compiled yet keeps
        the strategy's state and ``compile`` restores it into a strategy with
        variables of the same shapes."""
        keys = list(store.keys())
        saved = [k for k in keys if k.startswith("weighting_")]
        saved.sort(key=lambda k: int(k.split("_")[-1]))
        super().load_own_variables({k: store[k] for k in keys if k not in saved})
        self._mtl.saved_weighting_state = [np.asarray(store[k]) for k in saved]
        if self.weighting is not None:
            self._restore_weighting_state()

    def _restore_weighting_state(self) -> None:
        values = getattr(self._mtl, "saved_weighting_state", None)
        if not values:
            return
        self._mtl.saved_weighting_state = None
        strategy = self.weighting
        state = strategy.state_variables()
        got = [tuple(v.shape) for v in state]
        want = [tuple(a.shape) for a in values]
        if got != want:
            warnings.warn(
                f"the weights file holds a weighting strategy's state with shapes "
                f"{want}, but {strategy!r} has shapes {got}: its state is not "
                "restored (compile with the strategy the weights were saved with "
                "to resume it)",
                stacklevel=3,
            )
            return
        for v, value in zip(state, values, strict=True):
            v.assign(value)

    def get_compile_config(self):
        """None: ``compile`` (losses, strategy) is not saved; call it after loading."""
        return None

    @classmethod
    def from_config(cls, config: dict, custom_objects=None):
        config = dict(config)
        rep = config.pop("representation", None)
        last = config.pop("last_shared_layer", None)
        plain = keras.Model.from_config(config, custom_objects=custom_objects)
        representation = None
        if rep is not None:  # the (last) call of that layer in the rebuilt graph
            node = plain.get_layer(rep[0])._inbound_nodes[-1]
            representation = node.output_tensors[rep[1]]
        return cls(
            plain.input,
            plain.output,
            representation=representation,
            last_shared_layer=plain.get_layer(last) if last else None,
            name=plain.name,
        )

    # ----------------------------------------------------------------- analysis
    @property
    def representation(self):
        """The shared feature tensor given at construction (or None)."""
        return self._mtl.representation

    @property
    def task_names(self) -> list[str]:
        """Tasks with a loss (after ``compile``), else every output."""
        return list(getattr(self._mtl, "task_names", self._mtl.output_names))

    def _partition(self, task_names: Sequence[str]) -> dict:
        """Shared and per-task head variables, and the boundary tensors.

        A node (layer call) upstream of two or more task outputs is shared; a
        variable used by two or more tasks is shared. Boundary tensors are the
        outputs of shared nodes that task-specific nodes (or the losses) read.
        """
        st = self._mtl
        order = {id(v): i for i, v in enumerate(self.trainable_variables)}
        nodes: dict[int, object] = {}
        node_tasks: dict[int, set] = {}
        for t in task_names:
            for i, node in _upstream_nodes([st.outputs[t]]).items():
                nodes[i] = node
                node_tasks.setdefault(i, set()).add(t)
        shared_nodes = {i for i, ts in node_tasks.items() if len(ts) > 1}
        var_tasks: dict[int, set] = {}
        by_id: dict[int, object] = {}
        used_in_head: set[int] = set()
        for i, node in nodes.items():
            for v in getattr(node.operation, "trainable_variables", []):
                var_tasks.setdefault(id(v), set()).update(node_tasks[i])
                by_id[id(v)] = v
                if i not in shared_nodes:
                    used_in_head.add(id(v))

        def ordered(ids):
            return sorted((by_id[k] for k in ids), key=lambda v: order[id(v)])

        shared_ids = {k for k, ts in var_tasks.items() if len(ts) > 1}
        info: dict = {
            "shared_vars": ordered(shared_ids),
            "head_vars": {
                t: ordered(k for k, ts in var_tasks.items() if ts == {t})
                for t in task_names
            },
            # Tied weights (a shared variable also used inside a head) break the
            # two-stage backward pass; the model then uses a Jacobian.
            "boundary_ok": not (shared_ids & used_in_head),
            "last_layer": None,
            "last_layer_vars": [],
            "last_layer_error": (
                "this strategy needs the shared representation; build the model "
                "with MultiTaskModel(inputs, outputs, representation=<encoder "
                "output>)"
            ),
        }
        self._find_boundary(info, nodes, shared_nodes, task_names)
        if st.representation is not None:
            self._find_last_shared_layer(info, shared_nodes, shared_ids, task_names)
        return info

    def _find_boundary(self, info, nodes, shared_nodes, task_names) -> None:
        """Set ``info["boundary"]`` (the shared nodes' outputs that heads read)
        and ``info["raw_inputs"]`` (model inputs read directly by a head)."""
        st = self._mtl
        boundary, seen = [], set()

        def add(tensor):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                boundary.append(tensor)

        raw_inputs = []  # model inputs read directly by a head
        for i, node in nodes.items():
            if i in shared_nodes:
                continue
            for kt in node.arguments.keras_tensors:
                parent = _node_of(kt)
                if parent is None or _is_input_layer(parent.operation):
                    if all(kt is not r for r in raw_inputs):
                        raw_inputs.append(kt)
                    continue
                if id(parent) in shared_nodes:
                    add(kt)
        if raw_inputs and len(keras.tree.flatten(st.inputs)) > 1:
            info["boundary_ok"] = False  # keep the split simple: one model input
        info["raw_inputs"] = raw_inputs
        for t in task_names:  # an output that is itself shared (read by a head)
            if id(_node_of(st.outputs[t])) in shared_nodes:
                add(st.outputs[t])
        info["boundary"] = boundary

    def _find_last_shared_layer(self, info, shared_nodes, shared_ids, task_names):
        """Check the representation is shared; set GradNorm's ``last_layer`` and
        its shared variables (or the reason none was found) in ``info``."""
        st = self._mtl
        rep = st.representation
        if id(_node_of(rep)) not in shared_nodes and len(task_names) > 1:
            raise ValueError(
                "the representation is used by only one of the tasks "
                f"{list(task_names)}; it must be a tensor every task shares"
            )
        layer = st.last_shared_layer
        if layer is None:
            try:
                layer = _find_last_weighted_layer(rep)
            except ValueError as error:  # only GradNorm needs it
                info["last_layer_error"] = str(error)
        if layer is not None:
            info["last_layer"] = layer
            info["last_layer_vars"] = [
                v for v in layer.trainable_variables if id(v) in shared_ids
            ]

    # ------------------------------------------------------------------ compile
    def compile(
        self,
        optimizer="adam",
        losses: Mapping[str, Callable | Task | str] | Sequence[Task] | None = None,
        weighting: weighting_module.Weighting | str | None = None,
        metrics=None,
        loss=None,
        stop_on_nan: bool = True,
        **kwargs,
    ):
        """Configure training.

        Parameters
        ----------
        optimizer:
            As for :meth:`keras.Model.compile`.
        losses:
            ``{task: loss}`` where a loss is a callable ``(y_true, y_pred) ->
            scalar``, a :class:`~mtl_utils.tasks.Task` (its default masked loss,
            :func:`mtl_utils.losses.loss_for`) or a Keras loss name; or a list of
            Tasks. Outputs without a loss are not trained.
        weighting:
            A :class:`mtl_utils.weighting.Weighting` or a short name
            (``"pcgrad"``); default equal weighting.
        metrics:
            Passed to :meth:`keras.Model.compile` (``{task: [metrics]}``).
        stop_on_nan:
            Let ``fit`` stop (with a message naming the task) on a non-finite
            task loss.
        **kwargs:
            Other :meth:`keras.Model.compile` arguments (``run_eagerly``,
            ``jit_compile``, ``steps_per_execution``).
        """
        if keras.backend.backend() != "tensorflow":
            raise ValueError(
                "MultiTaskModel needs the TensorFlow backend (KERAS_BACKEND="
                f"tensorflow); the current backend is {keras.backend.backend()!r}"
            )
        if loss is not None:
            raise ValueError(
                "MultiTaskModel.compile takes losses={task: loss} (plural), not loss="
            )
        loss_fns, kinds = self._loss_functions(losses)
        task_names = [n for n in self._mtl.output_names if n in loss_fns]
        strategy = weighting_module.get(weighting)
        super().compile(optimizer=optimizer, loss=None, metrics=metrics, **kwargs)
        info = self._partition(task_names)
        self._check_strategy_fits(strategy, info)
        strategy.build(task_names, kinds, self.optimizer)
        self._build_step_models(strategy.mode, info, task_names)
        st = self._mtl
        st.task_names = task_names
        st.loss_fns = loss_fns
        st.weighting = strategy
        st.info = info
        st.stop_on_nan = stop_on_nan
        self._build_trackers(task_names, info)
        st.compiled = True
        self._restore_weighting_state()  # loaded before compile
        # Create the optimizer's slots now: left to fit(), TensorFlow creates them
        # while tracing the training step and then traces the step a second time.
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    def _loss_functions(self, losses) -> tuple[dict, dict]:
        """``({task: loss function}, {task: kind})`` from ``compile(losses=...)``."""
        if losses is None:
            raise ValueError(
                "compile needs losses={task: loss}; the model's outputs are "
                f"{self._mtl.output_names}"
            )
        if not isinstance(losses, Mapping):
            items = list(losses)
            if not all(isinstance(t, Task) for t in items):
                raise ValueError(
                    "losses must be a dict {task: loss} or a list of Task objects"
                )
            losses = {t.name: t for t in items}
        known = self._mtl.output_names
        unknown = [k for k in losses if k not in known]
        if unknown:
            raise ValueError(
                f"losses= names unknown task(s) {unknown}; the model's outputs are "
                f"{known}"
            )
        loss_fns, kinds = {}, {}
        for name, spec in losses.items():
            if isinstance(spec, Task):
                if spec.name != name:
                    raise ValueError(
                        f"losses[{name!r}] is Task {spec.name!r}; names must match"
                    )
                loss_fns[name] = loss_for(spec)
                kinds[name] = spec.kind
            elif isinstance(spec, str):
                fn = keras.losses.get(spec)
                if not isinstance(fn, keras.losses.Loss):  # "mse": per-sample values
                    fn = _batch_mean(fn)
                loss_fns[name] = fn
            elif callable(spec):
                loss_fns[name] = spec
                kind = getattr(spec, "kind", None)
                if kind is not None:
                    kinds[name] = kind
            else:
                raise ValueError(
                    f"losses[{name!r}] must be a callable, a Task or a loss name; "
                    f"got {type(spec).__name__}"
                )
        return loss_fns, kinds

    def _check_strategy_fits(self, strategy, info) -> None:
        """Refuse a strategy that needs what the model lacks (a representation, a
        last shared layer with variables, shared variables)."""
        mode = strategy.mode
        if mode in ("representation", "last_shared_layer"):
            if self._mtl.representation is None:
                raise ValueError(
                    f"{strategy!r} uses the shared representation; build the model "
                    "with MultiTaskModel(inputs, outputs, representation=<encoder "
                    "output>)"
                )
        if mode == "last_shared_layer" and info["last_layer"] is None:
            raise ValueError(info["last_layer_error"])
        if mode == "last_shared_layer" and not info["last_layer_vars"]:
            raise ValueError(
                f"the last shared layer {info['last_layer'].name!r} has no trainable "
                "variables before the representation; pass last_shared_layer= to "
                "MultiTaskModel"
            )
        if mode != "losses" and not info["shared_vars"]:
            raise ValueError(
                f"{strategy!r} combines gradients of shared parameters, but no "
                "trainable variable is used by two or more tasks"
            )

    def _build_step_models(self, mode, info, task_names) -> None:
        """The models a gradient step runs: the shared part and the heads split
        at the boundary tensors, or (tied weights) one model that also returns
        the representation."""
        st = self._mtl
        st.step_model = st.shared_model = st.head_model = None
        rep = st.representation
        if mode != "losses" and info["boundary_ok"]:
            # The same layers split at the boundary: shared part and heads.
            boundary = list(info["boundary"])
            extra = []
            if mode == "representation" and all(rep is not b for b in boundary):
                extra = [rep]
            st.shared_model = keras.Model(inputs=st.inputs, outputs=boundary + extra)
            st.head_model = keras.Model(
                inputs=boundary + info["raw_inputs"],
                outputs={t: st.outputs[t] for t in task_names},
            )
        elif mode != "losses":
            extra = {"outputs": {t: st.outputs[t] for t in task_names}}
            if rep is not None:
                extra["representation"] = rep
            st.step_model = keras.Model(inputs=st.inputs, outputs=extra)

    def _build_trackers(self, task_names, info) -> None:
        """Loss and weight trackers, the trained variables and the non-finite
        step counters."""
        st = self._mtl
        st.task_trackers = {t: keras.metrics.Mean(name=f"{t}_loss") for t in task_names}
        st.weight_trackers = {
            t: keras.metrics.Mean(name=f"weight_{t}") for t in task_names
        }
        head_ids = {id(v) for vs in info["head_vars"].values() for v in vs}
        shared_ids = {id(v) for v in info["shared_vars"]}
        st.train_vars = [
            v
            for v in self.trainable_variables
            if id(v) in head_ids or id(v) in shared_ids
        ]
        # Steps found non-finite: inputs, each task's loss, gradients, skipped.
        st.nonfinite_counts = keras.Variable(
            np.zeros((len(task_names) + 3,), "float32"),
            trainable=False,
            name="nonfinite_counts",
            aggregation="only_first_replica",
        )

    @property
    def weighting(self) -> weighting_module.Weighting | None:
        """The strategy given to ``compile``."""
        return getattr(self._mtl, "weighting", None)

    @property
    def metrics(self):
        base = list(super().metrics)
        st = getattr(self, "_mtl", None)
        if st is not None and st.compiled:
            base += list(st.task_trackers.values()) + list(st.weight_trackers.values())
        return base

    # ---------------------------------------------------------------------- fit
    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        **kwargs,
    ):
        """:meth:`keras.Model.fit`, plus the strategy's epoch hook and a NaN check.

        Arrays given directly (not a dataset) are checked first: targets of
        tasks compiled from :class:`~mtl_utils.tasks.Task` objects against their
        kind (labels in range, depth ``>= 0``), and images that look like
        0..255 values warn. A step with a non-finite input, loss or gradient is
        skipped (the weights stay finite) and, with ``stop_on_nan``, stops
        training with a message naming it.
        """
        callbacks = list(callbacks or [])
        st = self._mtl
        if st.compiled:
            self._check_arrays(x, y)
            callbacks.append(WeightingCallback(st.weighting))
            if st.stop_on_nan:
                callbacks.append(StopOnNaNLoss(st.task_names))
        self.nan_loss_message = None
        return super().fit(
            x=x,
            y=y,
            batch_size=batch_size,
            epochs=epochs,
            verbose=verbose,
            callbacks=callbacks,
            **kwargs,
        )

    def _check_arrays(self, x, y) -> None:
        """Check NumPy inputs and targets given to ``fit`` (see :meth:`fit`)."""
        if isinstance(x, np.ndarray) and x.ndim == 4 and x.shape[-1] == 3 and x.size:
            integer = not np.issubdtype(x.dtype, np.floating)
            if integer or (float(x.min()) >= 0.0 and float(x.max()) > 1.5):
                warnings.warn(
                    f"the images given to fit have dtype {x.dtype} and values up to "
                    f"{float(x.max()):.4g}: they look like 0..255 values, while the "
                    "book's models expect float32 in [0, 1] (divide by 255)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if not isinstance(y, Mapping):
            return
        for name, fn in self._mtl.loss_fns.items():
            task = getattr(fn, "task", None)
            if task is not None and isinstance(y.get(name), np.ndarray):
                check_target(task, y[name])

    # -------------------------------------------------------------- step helpers
    def _check_targets(self, y):
        st = self._mtl
        if not isinstance(y, Mapping):
            raise ValueError(
                "targets must be a dict {task: target} with keys "
                f"{st.task_names}; got {type(y).__name__}"
            )
        missing = [t for t in st.task_names if t not in y]
        if missing:
            raise ValueError(
                f"the batch has no target for task(s) {missing}; it has "
                f"{sorted(y)}. Mark unlabelled samples with MISSING_VALUE instead "
                "of leaving the task out"
            )

    def _task_losses(self, y, outputs) -> list:
        st = self._mtl
        out = []
        for t in st.task_names:
            fn = st.loss_fns[t]
            value = ops.cast(fn(y[t], outputs[t]), "float32")
            if isinstance(fn, keras.losses.Loss) and fn.reduction in _SCALED:
                # Keras losses divide themselves by the number of replicas; the
                # replica's share is applied by _replica_shares instead.
                value = value * self._replicas()
            if len(value.shape) != 0:
                raise ValueError(
                    f"the loss of task {t!r} returned shape {tuple(value.shape)}; "
                    "expected a scalar"
                )
            out.append(value)
        return out

    def _labelled_counts(self, x, y) -> list:
        """Labelled elements per task (batch size for losses that cannot tell)."""
        st = self._mtl
        batch = ops.cast(ops.shape(keras.tree.flatten(x)[0])[0], "float32")
        counts = []
        for t in st.task_names:
            fn = st.loss_fns[t]
            counts.append(
                fn.labelled_count(y[t]) if hasattr(fn, "labelled_count") else batch
            )
        return counts

    def _update_loss_trackers(self, x, losses, counts, reg, loss_vec):
        """Per-task losses weighted by labelled counts; ``loss`` is the sum of the
        global-batch task losses ``loss_vec`` (equal on every replica)."""
        st = self._mtl
        batch = ops.cast(ops.shape(keras.tree.flatten(x)[0])[0], "float32")
        for t, value, count in zip(st.task_names, losses, counts, strict=True):
            st.task_trackers[t].update_state(value, sample_weight=count)
        total = ops.sum(loss_vec) + reg
        self._loss_tracker.update_state(total, sample_weight=batch)

    def _replica_shares(self, counts):
        """``(share, global_counts)`` for this replica's ``(T,)`` label counts.

        A task loss is a mean over the labelled elements of the *global* batch:
        ``L = sum_r n_r L_r / sum_r n_r`` over replicas ``r`` with ``n_r`` labelled
        elements. ``share = n_r / sum_r n_r`` turns this replica's loss into its
        term of that sum (``1 / replicas`` when the counts are equal; 1 without
        a distribution strategy).
        """
        local = ops.stack(counts)
        total = self._all_reduce(local)
        return ops.divide_no_nan(local, total), total

    def _regularization(self):
        return ops.sum(ops.stack(self.losses)) if self.losses else ops.zeros(())

    @staticmethod
    def _replicas() -> int:
        return tf.distribute.get_strategy().num_replicas_in_sync

    @staticmethod
    def _all_reduce(x):
        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1:
            return x
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x)

    def _check_finite_step(self, x, losses, grads):
        """True when the batch's inputs, the task losses and ``grads`` are finite.

        A masked loss hides a NaN input going forward (the loss stays finite), but
        not going backward: 0 x NaN = NaN in the weights' gradients. So every
        step checks its inputs, losses and gradients, and records what was not
        finite in ``nonfinite_counts`` (read by :class:`StopOnNaNLoss` to name
        it). Under dynamic loss scaling a non-finite gradient is an overflow the
        optimizer handles, and is not recorded. The flags are summed over
        replicas, so that every replica takes the same decision.
        """

        def bad(tensors):
            checks = [
                ops.all(ops.isfinite(t))
                for t in tensors
                if t is not None and "float" in keras.backend.standardize_dtype(t.dtype)
            ]
            if not checks:
                return ops.zeros((), "float32")
            return 1.0 - ops.cast(ops.all(ops.stack(checks)), "float32")

        flags = [bad(keras.tree.flatten(x))] + [bad([value]) for value in losses]
        flags = self._all_reduce(ops.stack(flags + [bad(grads)]))
        finite = ops.equal(ops.sum(flags), 0.0)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            flags = ops.concatenate([flags[:-1], ops.zeros((1,), "float32")])
        flags = ops.cast(flags > 0, "float32")
        skipped = ops.cast(ops.sum(flags) > 0, "float32")[None]
        self._mtl.nonfinite_counts.assign_add(ops.concatenate([flags, skipped]))
        return finite

    @staticmethod
    def _apply_if_finite(finite, apply, *args) -> None:
        """``apply(*args)``, an optimizer update, only when ``finite`` is true.

        A :class:`keras.optimizers.LossScaleOptimizer` skips non-finite steps
        itself (and lowers its scale), so it is called as is. Under strategies
        that synchronise through ``merge_call`` (``MirroredStrategy``), the
        condition is taken in cross-replica context, as Keras' loss-scale
        optimizer does (a branch that calls ``merge_call`` cannot sit in a
        replica-context ``cond``).
        """
        if isinstance(
            getattr(apply, "__self__", None), keras.optimizers.LossScaleOptimizer
        ):
            apply(*args)
            return
        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            tf.cond(finite, lambda: apply(*args), lambda: None)
            return

        def cross_replica(distribution, finite, *args):
            ok = distribution.experimental_local_results(finite)[0]
            tf.cond(
                ok,
                lambda: distribution.extended.call_for_each_replica(apply, args=args),
                lambda: None,
            )

        tf.distribute.get_replica_context().merge_call(
            cross_replica, args=(finite, *args)
        )

    def _results(self, x, y, outputs, include_weights=True):
        results = self.compute_metrics(x, y, outputs, sample_weight=None)
        if not include_weights:
            names = {m.name for m in self._mtl.weight_trackers.values()}
            results = {k: v for k, v in results.items() if k not in names}
        return results

    # ------------------------------------------------------------------- steps
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        st = self._mtl
        if not st.compiled:
            raise ValueError("call compile(optimizer, losses=...) before fit")
        if sample_weight is not None:
            raise ValueError(
                "MultiTaskModel does not use sample_weight; mark unlabelled samples "
                "in the targets with MISSING_VALUE"
            )
        self._check_targets(y)
        strategy = st.weighting
        if strategy.mode == "losses":
            outputs, losses, weights = self._loss_weighting_step(x, y)
        else:
            outputs, losses, weights = self._gradient_step(x, y)
        for t, i in zip(st.task_names, range(len(st.task_names)), strict=True):
            st.weight_trackers[t].update_state(weights[i])
        return self._results(x, y, outputs)

    def _loss_weighting_step(self, x, y):
        st = self._mtl
        strategy = st.weighting
        svars = strategy.trainable_variables
        replicas = self._replicas()
        counts = self._labelled_counts(x, y)
        share, global_counts = self._replica_shares(counts)
        present = ops.cast(global_counts > 0, "float32")
        with tf.GradientTape(persistent=bool(svars)) as tape:
            outputs = self(x, training=True)
            losses = self._task_losses(y, outputs)
            reg = self._regularization()
            # This replica's estimate of the global-batch losses (its own losses
            # when every replica holds as many labels); the optimizer sums the
            # replicas' gradients of objective, so it is divided by replicas.
            estimate = ops.stack(losses) * share * replicas
            total, weights = strategy.combine_losses(estimate, present)
            objective = (total + reg) / replicas
            scaled = self.optimizer.scale_loss(objective)
        grads = tape.gradient(scaled, st.train_vars)
        strategy_grads = list(tape.gradient(objective, svars)) if svars else []
        finite = self._check_finite_step(x, losses, grads + strategy_grads)
        self._apply_if_finite(finite, self.optimizer.apply, grads, st.train_vars)
        if svars:
            self._apply_if_finite(finite, strategy.apply_gradients, strategy_grads)
        loss_vec = self._all_reduce(ops.stack(losses) * share)
        self._update_loss_trackers(x, losses, counts, reg, loss_vec)
        return outputs, losses, ops.stop_gradient(weights)

    def _gradient_step(self, x, y):
        """One step of a gradient-based strategy: ``(outputs, losses, weights)``.

        1. One forward pass, split at the boundary tensors
           (:meth:`_split_forward`); the task losses, scaled as the optimizer
           differentiates them (:meth:`_scaled_task_losses`).
        2. Per-task gradients from the tape (:class:`_TaskGradients`: one backward
           pass through each head, then the shared layers once per task or once
           for a weighted sum).
        3. The strategy's coefficients and the shared parameters' gradients
           (:meth:`_combine_shared`); each head gets its own task's gradient times
           the task's head coefficient (:meth:`_step_gradients`).
        4. The update, applied only when everything is finite; a skipped step
           also undoes the strategy's state update (:meth:`_snapshot_strategy`).
        """
        st = self._mtl
        counts = self._labelled_counts(x, y)
        share, global_counts = self._replica_shares(counts)
        present = ops.cast(global_counts > 0, "float32")
        with tf.GradientTape(persistent=True) as tape:
            outputs, cut = self._split_forward(tape, x)
            losses = self._task_losses(y, outputs)
            reg = self._regularization()
            scaled, factor = self._scaled_task_losses(losses, share)
            scaled_vec = ops.stack(scaled)
            scaled_reg = reg * factor
        # Strategies see the losses and label counts of the global batch.
        loss_vec = self._all_reduce(ops.stack(losses) * share)
        task_grads = _TaskGradients(
            tape,
            cut,
            scaled,
            scaled_vec,
            [st.info["head_vars"][t] for t in st.task_names],
            need_z=st.weighting.mode == "representation",
        )
        restore = self._snapshot_strategy()
        shared_coef, head_coef, shared_grads = self._combine_shared(
            task_grads, loss_vec, present, factor
        )
        grads = self._step_gradients(task_grads, shared_grads, head_coef, scaled_reg)
        finite = self._check_finite_step(x, losses, grads + [loss_vec])
        restore(finite)
        self._apply_if_finite(finite, self.optimizer.apply, grads, st.train_vars)
        self._update_loss_trackers(x, losses, counts, reg, loss_vec)
        return outputs, losses, shared_coef

    def _split_forward(self, tape, x):
        """The forward pass of a gradient step, run under ``tape``: ``(outputs, cut)``.

        With a boundary split, the shared part runs first and the heads read
        copies of its boundary tensors cut off from it (``tf.stop_gradient``,
        watched by the tape), so that gradients with respect to them are partial
        derivatives through the heads. Without one (tied weights), the whole
        model runs at once and ``cut`` has no boundary tensors.
        """
        st = self._mtl
        info = st.info
        if not info["boundary_ok"]:
            res = st.step_model(x, training=True)
            return res["outputs"], _Cut(False, [], [], res.get("representation"), None)
        nb = len(info["boundary"])
        z_index = next(
            (k for k, b in enumerate(info["boundary"]) if b is st.representation), None
        )
        shared_out = keras.tree.flatten(st.shared_model(x, training=True))
        boundary, z = shared_out[:nb], (shared_out[nb:] or [None])[0]
        leaves = [tf.stop_gradient(b) for b in boundary]
        for leaf in leaves:
            tape.watch(leaf)
        raw = [x] if info["raw_inputs"] else []
        outputs = st.head_model(leaves + raw, training=True)
        return outputs, _Cut(True, boundary, leaves, z, z_index)

    def _scaled_task_losses(self, losses, share):
        """``(scaled, factor)``: the task losses as the optimizer differentiates them.

        Loss-scale handling. ``factor`` is the loss scale (mixed precision; 1
        otherwise) over the number of replicas, and ``share * replicas`` weights
        this replica's losses by its labels, so that the replicas' sum is the
        global-batch loss. Gradients of ``scaled`` are therefore
        ``factor * replicas`` times the true ones, which is divided out where a
        strategy reads them (:meth:`_global_task_matrix`,
        :meth:`_representation_gram`); the shared update is scaled back by
        ``factor`` for the optimizer, which unscales it.
        """
        replicas = self._replicas()
        factor = self.optimizer.scale_loss(ops.convert_to_tensor(1.0)) / replicas
        label_weight = share * replicas
        scaled = [loss * factor * label_weight[i] for i, loss in enumerate(losses)]
        return scaled, factor

    def _global_task_matrix(self, local, true_scale):
        """Replica reduction: the global batch's ``(T, P)`` per-task gradients.

        ``local`` holds this replica's rows of scaled gradients; their sum over
        replicas divided by ``true_scale`` (loss scale) is the gradient matrix of
        the global-batch task losses, the same on every replica.
        """
        return self._all_reduce(local) / true_scale

    def _representation_gram(self, z_grads, true_scale):
        """``(T, T)`` Gram matrix of the task gradients w.r.t. the representation,
        summed over replicas, at true scale (MGDA-UB)."""
        n = len(z_grads)
        # float32 before squaring: scaled float16 gradients would overflow
        zflat = ops.cast(ops.reshape(ops.stack(z_grads), (n, -1)), "float32")
        gram = self._all_reduce(ops.matmul(zflat, ops.transpose(zflat)))
        return gram / ops.square(true_scale)

    def _coefficients(self, gram, loss_vec, flat, present):
        """The strategy's ``(shared, heads)`` coefficients: float32, constants.

        A step with a non-finite gradient is skipped (by the optimizer under
        dynamic loss scaling, which also lowers the scale; else by
        :meth:`_apply_if_finite`). The strategy must skip it too: it gets finite
        stand-ins here (a NaN Gram matrix would crash a linear solve), and its
        state is restored once every gradient is known
        (:meth:`_snapshot_strategy`). All replicas see the same all-reduced
        values, so they agree.
        """
        n = len(self._mtl.task_names)
        finite = ops.logical_and(
            ops.all(ops.isfinite(gram)), ops.all(ops.isfinite(loss_vec))
        )
        combo = self._mtl.weighting.combine_gradients(
            ops.where(finite, gram, ops.eye(n)),
            ops.where(finite, loss_vec, ops.ones_like(loss_vec)),
            None if flat is None else ops.where(finite, flat, 0.0),
            present,
        )
        return (
            ops.stop_gradient(ops.cast(combo.shared, "float32")),
            ops.stop_gradient(ops.cast(combo.heads, "float32")),
        )

    def _combine_shared(self, task_grads, loss_vec, present, factor):
        """``(shared_coef, head_coef, shared_grads)``: the strategy's combination.

        What the strategy looks at depends on its ``mode``: the Gram matrix of
        the representation gradients (MGDA-UB), the per-task gradients of the
        last shared layer (GradNorm), or those of every shared parameter (PCGrad,
        MGDA, CAGrad, ...; with ``update_every > 1`` through
        :meth:`_cached_combination`).
        """
        st = self._mtl
        strategy = st.weighting
        shared_vars = st.info["shared_vars"]
        true_scale = factor * self._replicas()

        def combine(gram, flat):
            return self._coefficients(gram, loss_vec, flat, present)

        if strategy.mode == "representation":
            gram = self._representation_gram(task_grads.z_grads, true_scale)
            shared_coef, head_coef = combine(gram, None)
        elif strategy.mode == "last_shared_layer":
            local = task_grads.matrix(st.info["last_layer_vars"])
            flat = self._global_task_matrix(local, true_scale)
            gram = ops.matmul(flat, ops.transpose(flat))
            shared_coef, head_coef = combine(gram, flat)
        elif strategy.update_every == 1:
            local = task_grads.matrix(shared_vars)
            flat = self._global_task_matrix(local, true_scale)
            return self._combined_from_matrix(flat, combine, factor)
        else:
            return self._cached_combination(task_grads, combine, factor, true_scale)
        return shared_coef, head_coef, task_grads.weighted(shared_coef, shared_vars)

    def _combined_from_matrix(self, flat, combine, factor):
        """``(shared_coef, head_coef, shared_grads)`` from the ``(T, P)`` matrix.

        The shared update is ``shared_coef @ flat`` (true scale) times ``factor``,
        the scale the optimizer expects, split back into the shared variables.
        """
        gram = ops.matmul(flat, ops.transpose(flat))
        shared_coef, head_coef = combine(gram, flat)
        d = ops.matmul(shared_coef[None, :], flat)[0] * factor
        return shared_coef, head_coef, _unflatten(d, self._mtl.info["shared_vars"])

    def _cached_combination(self, task_grads, combine, factor, true_scale):
        """The ``update_every = k > 1`` cache: recompute every k-th step, else reuse.

        On a due step (the optimizer's iteration a multiple of ``k``) this is
        :meth:`_combined_from_matrix`; in between, the last coefficients
        (``strategy.last_combination``) weight one backward pass through the
        shared layers. The replicas' all-reduce stays outside ``tf.cond``
        (tf.distribute needs it), so steps in between reduce zeros. A skipped
        step restores the cache with the rest of the strategy's state.
        """
        st = self._mtl
        strategy = st.weighting
        shared_vars = st.info["shared_vars"]
        last = strategy.last_combination
        every = ops.cast(strategy.update_every, self.optimizer.iterations.dtype)
        due = ops.equal(self.optimizer.iterations % every, 0)
        size = sum(int(np.prod(v.shape)) for v in shared_vars)
        local = tf.cond(
            due,
            lambda: task_grads.matrix(shared_vars),
            lambda: tf.zeros((len(st.task_names), size), "float32"),
        )
        flat = self._global_task_matrix(local, true_scale)

        def recompute():
            shared_coef, head_coef, grads = self._combined_from_matrix(
                flat, combine, factor
            )
            return [shared_coef, head_coef] + grads

        def reuse():
            coef = ops.copy(last)
            return [coef[0], coef[1]] + list(task_grads.weighted(coef[0], shared_vars))

        out = tf.cond(due, recompute, reuse)
        shared_coef, head_coef, shared_grads = out[0], out[1], out[2:]
        last.assign(ops.stack([shared_coef, head_coef]))
        return shared_coef, head_coef, shared_grads

    def _step_gradients(self, task_grads, shared_grads, head_coef, scaled_reg):
        """The optimizer's gradients, in ``train_vars`` order.

        Shared variables get ``shared_grads``; each head gets its own task's
        gradient times the task's head coefficient; the regularisation losses'
        gradients are added to every variable.
        """
        st = self._mtl
        shared_vars = st.info["shared_vars"]
        grads = {id(v): g for v, g in zip(shared_vars, shared_grads, strict=True)}
        head_vars = [st.info["head_vars"][t] for t in st.task_names]
        for i, g_task in enumerate(task_grads.heads()):
            for v, g in zip(head_vars[i], g_task, strict=True):
                grads[id(v)] = head_coef[i] * g
        if self.losses:
            reg_grads = task_grads.tape.gradient(
                scaled_reg,
                _raw(st.train_vars),
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            for v, g in zip(st.train_vars, reg_grads, strict=True):
                grads[id(v)] = grads[id(v)] + g
        return [grads[id(v)] for v in st.train_vars]

    def _snapshot_strategy(self):
        """Copy the strategy's state; ``restore(finite)`` puts it back unless
        ``finite`` (a skipped step must not change GradNorm's weights, the
        ``update_every`` cache, ...)."""
        state = self._mtl.weighting.state_variables()
        saved = [ops.copy(v) for v in state]

        def restore(finite):
            for v, old in zip(state, saved, strict=True):
                v.assign(ops.where(finite, v, old))

        return restore

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ValueError(
                "MultiTaskModel does not use sample_weight; mark unlabelled samples "
                "in the targets with MISSING_VALUE"
            )
        self._check_targets(y)
        outputs = self(x, training=False)
        losses = self._task_losses(y, outputs)
        counts = self._labelled_counts(x, y)
        share, _ = self._replica_shares(counts)
        loss_vec = self._all_reduce(ops.stack(losses) * share)
        self._update_loss_trackers(x, losses, counts, self._regularization(), loss_vec)
        return self._results(x, y, outputs, include_weights=False)

    # --------------------------------------------------------------- inspection
    def task_gradients(self, x, y, shared_only: bool = True):
        """Per-task gradients on one batch, e.g. to measure gradient conflict.

        Parameters
        ----------
        x, y:
            One batch (``y`` a dict of targets).
        shared_only:
            Only the shared parameters (default), else every trainable variable.

        Returns
        -------
        ``(G, losses)``: the ``(T, P)`` matrix of flattened per-task gradients (rows
        in ``task_names`` order) and the ``(T,)`` task losses.
        """
        st = self._mtl
        if not st.compiled:
            raise ValueError("call compile(optimizer, losses=...) first")
        self._check_targets(y)
        variables = st.info["shared_vars"] if shared_only else st.train_vars
        with tf.GradientTape(persistent=True) as tape:
            outputs = self(x, training=False)
            losses = ops.stack(self._task_losses(y, outputs))
        G = _flat_jacobian(tape, losses, variables)
        return G, losses
