"""A model spec's tensors, parameter count and training memory, by arithmetic alone.

Why this exists: the coordinator chooses the model, and a participant must know what a
spec costs *before* it spends anything on it. Building a torch model to learn its shapes
allocates every weight (``hidden = [65536, 65536]`` is 17 GB), so everything here is
computed from the spec's numbers: no torch, no numpy, no I/O. fednode/training.py builds
the same networks (an ``nn.Sequential`` of ``Linear`` and ``ReLU``), and the tests check
that these shapes are exactly the ones torch's ``state_dict()`` gives.

The model part of a spec is ``{"kind", "inputs", "hidden", "classes"}``, kind one of KINDS
(fednode.session.model_spec). An mlp is ``Linear, ReLU, Linear, ReLU, ..., Linear``, so its
linear layers sit at even Sequential indices: ``0.weight``, ``0.bias``, ``2.weight``, ...
A logreg is one ``Linear(inputs, classes)`` and ignores ``hidden``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

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
# Each layer's activations for one batch, counted in float32 values per example and unit:
# a hidden layer keeps the Linear output, the ReLU output and a gradient of each (4); the
# output layer keeps the logits, the log-softmax and their gradients (3, one fewer: no ReLU).
HIDDEN_ACTIVATION_COPIES = 4
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


# A model kind, by name -> its hidden widths from the model spec. Every kind is a stack of
# dense layers (Linear, ReLU, ..., Linear), so its widths are all that shapes, parameters and
# training memory need; fednode.training registers the torch builder under the same name
# (fednode.training.register_model registers both).
HiddenWidths = Callable[[Mapping[str, Any]], list[int]]
KINDS: Registry[HiddenWidths] = Registry("model kind", "set model.kind to a registered kind")
KINDS.register("mlp", _mlp_hidden)
KINDS.register("logreg", lambda model: [])  # one Linear(inputs, classes); hidden is ignored


def layer_widths(model: Mapping[str, Any]) -> list[int]:
    """The widths from input to output: ``[inputs, *hidden, classes]`` (logreg: no hidden)."""
    if not isinstance(model, Mapping):
        raise ValidationError(f"a model spec must be a table, got {type(model).__name__}")
    hidden_widths = KINDS.get(model.get("kind"))
    for key in ("inputs", "classes"):
        if key not in model:
            raise ValidationError(f"model spec lacks field {key!r}", hint="set model." + key)
    inputs = _size(model, "inputs", model["inputs"])
    classes = _size(model, "classes", model["classes"])
    return [inputs, *hidden_widths(model), classes]


def shapes(model: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, in torch's state_dict order (weight then bias, layer by layer).

    ``nn.Linear(a, b)`` holds ``weight`` of shape (b, a) and ``bias`` of shape (b,); the ReLU
    between two Linears takes a Sequential index but holds no tensor.
    """
    widths = layer_widths(model)
    out: dict[str, tuple[int, ...]] = {}
    for layer, (a, b) in enumerate(itertools.pairwise(widths)):
        index = 2 * layer  # Linear, ReLU, Linear, ReLU, ..., Linear
        out[f"{index}.weight"] = (b, a)
        out[f"{index}.bias"] = (b,)
    return out


def param_count(model: Mapping[str, Any]) -> int:
    """Every weight and bias of the model: sum over layers of (a + 1) * b."""
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


def activation_bytes(model: Mapping[str, Any], batch: int) -> int:
    """Activations of one batch, forward and backward: the input batch (gathered into its own
    tensor), HIDDEN_ACTIVATION_COPIES values per hidden unit and OUTPUT_ACTIVATION_COPIES per
    class, each per example, in float32."""
    widths = layer_widths(model)
    per_example = (
        widths[0]
        + HIDDEN_ACTIVATION_COPIES * sum(widths[1:-1])
        + OUTPUT_ACTIVATION_COPIES * widths[-1]
    )
    return F32 * max(1, batch) * per_example


def data_bytes(model: Mapping[str, Any], n_examples: int) -> int:
    """The local data as training holds it: float32 features and int64 labels."""
    return max(0, n_examples) * (F32 * layer_widths(model)[0] + LABEL_BYTES)


def training_memory(
    model: Mapping[str, Any],
    training: Mapping[str, Any],
    n_examples: int,
    *,
    secure: bool = False,
) -> int:
    """An estimate of the bytes one round of local training needs, beyond the process itself.

    With P = param_count(model), B = min(batch_size, n_examples), N = n_examples and the
    widths w_0 = inputs, w_1..w_k = hidden, w_k+1 = classes::

        4 * P * (1 weights + 1 gradients + S optimizer slots + T step temporaries
                 + 1 load copy + 4 node copies)
      + 48 * P                                   (only with secure aggregation)
      + 4 * B * (w_0 + 4 * (w_1 + ... + w_k) + 3 * w_k+1)         (one batch's activations)
      + N * (4 * w_0 + 8)                         (the data: float32 features, int64 labels)

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
