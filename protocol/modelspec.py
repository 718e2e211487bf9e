"""A model spec's tensors, parameter count and training memory, by arithmetic alone.

Why this exists: the coordinator chooses the model, and a participant must know what a
spec costs *before* it spends anything on it. Building a torch model to learn its shapes
allocates every weight (``hidden = [65536, 65536]`` is 17 GB), so everything here is
computed from the spec's numbers: no torch, no numpy, no I/O. fednode/training.py builds
the same networks (an ``nn.Sequential`` of the resolved layers), and the tests check that
these shapes are exactly the ones torch's ``state_dict()`` gives.

The model part of a spec is ``MODEL_KEYS`` (fednode.session.model_spec), kind one of KINDS.
Every kind is a list of layers (protocol.layers): kind "layers" declares them
(``input_shape``, ``layers``); an mlp is ``Linear, ReLU, Linear, ReLU, ..., Linear``, so its
linear layers sit at even Sequential indices: ``0.weight``, ``0.bias``, ``2.weight``, ...
A logreg is one ``Linear(inputs, classes)`` and ignores ``hidden``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from protocol import fingerprint, layers
from protocol.errors import ValidationError
from protocol.plugins import Registry

F32 = 4  # bytes per weight, gradient, optimizer slot and activation (float32)
LABEL_BYTES = 8  # int64 class labels, as torch's cross-entropy wants them
# Copies of the model, besides the torch parameters, that a participant holds while it
# trains a round: the global model as numpy arrays, the trained model as numpy arrays, the
# safetensors bytes fetched and the safetensors bytes sent.
NODE_COPIES = 4
# Secure aggregation works on flat vectors of 8-byte values: the update and the round's model
# as float64, the fixed-point encoding, the masked vector and the masks summed into it, and the
# packed bytes sent: about six of them per parameter.
SECURE_BYTES_PER_PARAM = 6 * 8
# Each layer's activations for one batch, counted in float32 values per example: every
# layer keeps its output and that output's gradient (2 per output value), the last layer
# one more (the loss's log-softmax or sigmoid); some keep more (Layer.extra_activations: a
# dropout mask, max-pool indices, a convolution's unfolded input). For an mlp this is 4 per
# hidden unit (the Linear and the ReLU, each with its gradient) and 3 per class.
LAYER_ACTIVATION_COPIES = 2
OUTPUT_ACTIVATION_COPIES = 3
# A participant's default memory limit (fednode run --max-memory) is this fraction of the
# machine's RAM: the node shares the machine with its operator's other work, and
# training_memory is a floor that allocator slack and temporaries exceed.
DEFAULT_MEMORY_FRACTION = 0.5


def _size(model: Mapping[str, Any], key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValidationError(
            f"model.{key} = {value!r} is not a positive integer",
            hint="model sizes (inputs, hidden widths, classes) must be integers >= 1",
        )
    return value


def _mlp_hidden(model: Mapping[str, Any]) -> list[int]:
    raw = model.get("hidden", [])
    if not isinstance(raw, list | tuple):
        raise ValidationError(f"model.hidden = {raw!r} is not a list of widths")
    return [_size(model, f"hidden[{i}]", h) for i, h in enumerate(raw)]


# A dense kind's hidden widths from its model spec: a dense kind is Linear, ReLU, ...,
# Linear from ``inputs`` to ``classes`` outputs (fednode.training.register_model).
HiddenWidths = Callable[[Mapping[str, Any]], list[int]]
# A model kind, by name -> its resolved layers (protocol.layers.Layer: torch arguments,
# shapes, tensors) from the model spec. Shapes, parameters and training memory are read
# from these; fednode.training builds an nn.Sequential of the same layers.
KindLayers = Callable[[Mapping[str, Any]], list[layers.Layer]]
KINDS: Registry[KindLayers] = Registry("model kind", "set model.kind to a registered kind")


def dense_kind(hidden: HiddenWidths) -> KindLayers:
    """A dense kind's layers: ``[inputs, *hidden(model), classes]`` as Linear, ReLU, ...,
    Linear (protocol.layers.dense)."""

    def plan(model: Mapping[str, Any]) -> list[layers.Layer]:
        for key in ("inputs", "classes"):
            if key not in model:
                raise ValidationError(f"model spec lacks field {key!r}", hint="set model." + key)
        inputs = _size(model, "inputs", model["inputs"])
        classes = _size(model, "classes", model["classes"])
        return layers.dense(inputs, [*hidden(model), classes])

    return plan


KINDS.register("mlp", dense_kind(_mlp_hidden))
KINDS.register("logreg", dense_kind(lambda model: []))  # one Linear; hidden is ignored
KINDS.register(
    "layers", lambda model: layers.resolve(model.get("input_shape"), model.get("layers"))
)


def _no_layers(model: Mapping[str, Any]) -> list[layers.Layer]:
    raise ValidationError(
        'model.kind = "python" declares no layers: its tensors are model.fingerprint\'s',
        hint="read its shapes with protocol.modelspec.shapes, not model_layers",
    )


# Code each node's operator installed (fednode/factories.py); priced by its fingerprint
# (protocol.fingerprint): shapes, input_shape, output_width and activation_values below.
KINDS.register(fingerprint.PYTHON_KIND, _no_layers)


def is_python(model: Mapping[str, Any]) -> bool:
    return isinstance(model, Mapping) and model.get("kind") == fingerprint.PYTHON_KIND


# What a model spec holds (fednode.session.model_spec): the kind and what the kinds read.
# For kind "layers", ``inputs`` is prod(input_shape) and ``classes`` follows from the task
# and the last layer (protocol.spec fills both in).
MODEL_KEYS = (
    "kind",
    "task",
    "inputs",
    "hidden",
    "classes",
    "input_shape",
    "layers",
    "factory",
    "args",
    "fingerprint",
)
# What the model learns: its loss, its metrics, the labels it takes (fednode.training).
#   classification: cross-entropy over >= 2 outputs, integer labels 0..outputs-1; accuracy
#   binary: BCE with logits on 1 output, labels 0 or 1; accuracy and ROC AUC
#   regression: mean squared error on >= 1 outputs, float targets; MAE and R²
TASKS = ("classification", "binary", "regression")


def model_layers(model: Mapping[str, Any]) -> list[layers.Layer]:
    """The model's layers in order, resolved and checked (ValidationError otherwise)."""
    if not isinstance(model, Mapping):
        raise ValidationError(f"a model spec must be a table, got {type(model).__name__}")
    return KINDS.get(model.get("kind"))(model)


def input_shape(model: Mapping[str, Any]) -> tuple[int, ...]:
    """One example's shape as the model takes it (a dense kind: ``(inputs,)``)."""
    if is_python(model):
        return tuple(model["input_shape"])
    return model_layers(model)[0].in_shape


def output_width(model: Mapping[str, Any]) -> int:
    """The values the model outputs per example (its last layer's). A python model outputs
    model.classes values for classification and one for binary and regression (its factory
    is checked to do so when a node builds it: fednode.factories)."""
    if is_python(model):
        task = model.get("task", "classification")
        return int(model["classes"]) if task == "classification" else 1
    return math.prod(model_layers(model)[-1].out_shape)


def check_task(model: Mapping[str, Any]) -> str:
    """The model's task, after checking its output fits it: one flat vector per example, of
    >= 2 values (classification), exactly 1 (binary) or >= 1 (regression)."""
    task = model.get("task", "classification")
    if task not in TASKS:
        raise ValidationError(
            f"model.task = {task!r} is not accepted", hint="one of " + ", ".join(TASKS)
        )
    if is_python(model):  # its outputs follow from the task (output_width)
        return str(task)
    last = model_layers(model)[-1]
    out = last.out_shape
    if len(out) != 1:
        raise ValidationError(
            f"model.layers[{last.index}] ({last.type}) outputs shape {list(out)}, but a model "
            "must output one flat vector per example",
            hint='end the model with { type = "flatten" } and a linear layer',
        )
    need = {
        "classification": (2, "at least 2"),
        "binary": (1, "exactly 1"),
        "regression": (1, "at least 1"),
    }
    lo, words = need[task]
    if out[0] < lo or (task == "binary" and out[0] != 1):
        where = (
            f"model.layers[{last.index}] ({last.type})"
            if model.get("kind") == "layers"
            else f"model.kind = {model.get('kind')!r} with model.classes = {out[0]}"
        )
        raise ValidationError(
            f"{where} outputs {out[0]} values, but task {task!r} needs {words}",
            hint=f"give the last layer {words} outputs (e.g. out_features), or change model.task",
        )
    return str(task)


def layer_widths(model: Mapping[str, Any]) -> list[int]:
    """The input width, then each linear layer's output width: ``[inputs, *hidden, classes]``
    for a dense kind (logreg: no hidden)."""
    plan = model_layers(model)
    return [math.prod(plan[0].in_shape)] + [
        layer.out_shape[-1] for layer in plan if layer.type == "linear"
    ]


def shapes(model: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, as the weights travel: torch's state_dict of the model's
    ``nn.Sequential`` (``"<layer index>.<tensor>"``, layer by layer, in torch's order) less
    the buffers that never travel (protocol.layers.UNSENT_BUFFERS).

    ``nn.Linear(a, b)`` holds ``weight`` of shape (b, a) and ``bias`` of shape (b,); a ReLU
    takes a Sequential index but holds no tensor. A python model's are its fingerprint's.
    """
    if is_python(model):
        return fingerprint.shapes(fingerprint.parse(model.get("fingerprint")))
    return {
        f"{layer.index}.{name}": shape
        for layer in model_layers(model)
        for name, shape in layer.tensors.items()
    }


def param_count(model: Mapping[str, Any]) -> int:
    """Every value of every tensor that travels: weights, biases and normalisation
    statistics (a dense kind: sum over its linear layers of (a + 1) * b)."""
    return sum(math.prod(s) for s in shapes(model).values())


def optimizer_slots(training: Mapping[str, Any]) -> int:
    """Copies of the parameters the optimizer keeps: SGD with momentum 1 (the velocity),
    plain SGD 0, Adam 2 (first and second moments)."""
    optimizer = training.get("optimizer", "sgd")
    if optimizer == "adam":
        return 2
    if optimizer == "sgd":
        return 1 if float(training.get("momentum", 0.0)) > 0 else 0
    raise ValidationError(
        f"unknown optimizer {optimizer!r}; accepted: sgd, adam", hint="set training.optimizer"
    )


def step_temporaries(training: Mapping[str, Any]) -> int:
    """Parameter-sized temporaries of one optimizer step (torch's CPU implementations):
    Adam's denominator (sqrt of the second moment, then divided: 2), and the decayed gradient
    ``grad + weight_decay * param`` (1) when weight_decay > 0."""
    adam = 2 if training.get("optimizer", "sgd") == "adam" else 0
    return adam + (1 if float(training.get("weight_decay", 0.0)) > 0 else 0)


def copies_per_param(training: Mapping[str, Any]) -> int:
    """How many float32 copies of the parameters a round holds at its peak: the torch
    weights, their gradients, the optimizer's slots, its step temporaries, the copy that
    loading the global model into torch makes, and the NODE_COPIES."""
    return 1 + 1 + optimizer_slots(training) + step_temporaries(training) + 1 + NODE_COPIES


def bytes_per_param(training: Mapping[str, Any], *, secure: bool = False) -> int:
    """Bytes each parameter costs during a round, whatever the batch and the data:
    4 * copies_per_param, plus SECURE_BYTES_PER_PARAM with secure aggregation."""
    per = F32 * copies_per_param(training)
    return per + (SECURE_BYTES_PER_PARAM if secure else 0)


def activation_values(model: Mapping[str, Any]) -> int:
    """float32 values one example keeps for the backward pass: its input (gathered into the
    batch's own tensor), LAYER_ACTIVATION_COPIES per output value of each layer
    (OUTPUT_ACTIVATION_COPIES for the last) and each layer's extra_activations. A python
    model's code cannot be read by arithmetic: its floor is the input and the output."""
    if is_python(model):
        return math.prod(input_shape(model)) + OUTPUT_ACTIVATION_COPIES * output_width(model)
    plan = model_layers(model)
    return math.prod(plan[0].in_shape) + sum(
        (OUTPUT_ACTIVATION_COPIES if layer is plan[-1] else LAYER_ACTIVATION_COPIES)
        * math.prod(layer.out_shape)
        + layer.extra_activations
        for layer in plan
    )


def activation_bytes(model: Mapping[str, Any], batch: int) -> int:
    """Activations of one batch, forward and backward: activation_values per example."""
    return F32 * max(1, batch) * activation_values(model)


def data_bytes(model: Mapping[str, Any], n_examples: int) -> int:
    """The local data as training holds it: float32 features and int64 labels (float32
    regression targets take less)."""
    return max(0, n_examples) * (F32 * math.prod(input_shape(model)) + LABEL_BYTES)


def training_memory(
    model: Mapping[str, Any],
    training: Mapping[str, Any],
    n_examples: int,
    *,
    secure: bool = False,
) -> int:
    """An estimate of the bytes one round of local training needs, beyond the process itself.

    With P = param_count(model), B = min(batch_size, n_examples), N = n_examples, A =
    activation_values(model) and w_0 = prod(input_shape) (a dense kind: inputs)::

        4 * P * (1 weights + 1 gradients + S optimizer slots + T step temporaries
                 + 1 load copy + 4 node copies)
      + 48 * P                                   (only with secure aggregation)
      + 4 * B * A                                             (one batch's activations)
      + N * (4 * w_0 + 8)                         (the data: float32 features, int64 labels)

    For a dense kind with hidden widths w_1..w_k and w_k+1 = classes, A = w_0 + 4 * (w_1 +
    ... + w_k) + 3 * w_k+1.

    S is 0 for plain SGD, 1 for SGD with momentum, 2 for Adam; T is 2 for Adam plus 1 with
    weight_decay; the load copy is the one torch makes of the global model; the 4 node copies
    are the global model and the trained model as arrays and the model bytes received and
    sent. Measured on torch 2.13 (CPU), local training alone grows the process by less than
    this (tests/test_modelspec.py checks it); allocator slack comes on top, which is why a
    participant's default memory limit is only a fraction of the machine's RAM.
    """
    batch_size = training.get("batch_size", 1)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValidationError(f"training.batch_size = {batch_size!r} is not an integer >= 1")
    n = max(0, int(n_examples))
    batch = min(batch_size, n) if n else batch_size
    return (
        param_count(model) * bytes_per_param(training, secure=secure)
        + activation_bytes(model, batch)
        + data_bytes(model, n)
    )


def default_max_memory(total_ram: int) -> int:
    """The default memory limit of a participant whose machine has ``total_ram`` bytes."""
    return max(1, int(total_ram * DEFAULT_MEMORY_FRACTION))


# What a parameter costs at most outside secure aggregation: Adam with weight decay.
MAX_PLAIN_BYTES_PER_PARAM = F32 * (1 + 1 + 2 + 3 + 1 + NODE_COPIES)  # 48


def default_max_params(max_memory: int) -> int:
    """The default parameter limit for a memory budget: the parameters that fit it at the
    most a parameter costs outside secure aggregation (MAX_PLAIN_BYTES_PER_PARAM)."""
    return max(1, max_memory // MAX_PLAIN_BYTES_PER_PARAM)


def format_size(n: float) -> str:
    """Bytes for people, in the binary units --max-memory reads: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def describe(model: Mapping[str, Any], training: Mapping[str, Any]) -> dict[str, Any]:
    """What ``fedctl model describe`` prints: each layer (index, type, output shape,
    parameters) and the totals: parameters, their float32 bytes, and the training memory of
    one round at the spec's batch size without the local data (``data_bytes_per_example``
    more per example held). A python model lists its fingerprint's tensors instead of
    layers."""
    n = param_count(model)
    if is_python(model):
        return {
            "kind": model.get("kind"),
            "task": model.get("task", "classification"),
            "input_shape": list(input_shape(model)),
            "factory": model.get("factory"),
            "args": model.get("args", {}),
            "layers": [],
            "tensors": [
                {"name": name, "dtype": dtype, "shape": list(shape), "params": math.prod(shape)}
                for name, (dtype, shape) in fingerprint.parse(model.get("fingerprint")).items()
            ],
            "params": n,
            "bytes": F32 * n,
            "batch_size": training.get("batch_size", 1),
            "training_memory": training_memory(model, training, 0),
            "data_bytes_per_example": data_bytes(model, 1),
        }
    plan = model_layers(model)
    return {
        "kind": model.get("kind"),
        "task": model.get("task", "classification"),
        "input_shape": list(plan[0].in_shape),
        "layers": [
            {
                "index": layer.index,
                "type": layer.type,
                "output_shape": list(layer.out_shape),
                "params": layer.params,
            }
            for layer in plan
        ],
        "params": n,
        "bytes": F32 * n,
        "batch_size": training.get("batch_size", 1),
        "training_memory": training_memory(model, training, 0),
        "data_bytes_per_example": data_bytes(model, 1),
    }
