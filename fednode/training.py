"""Local training and evaluation with torch, on numpy weights in and out.

Weights cross this module's boundary as `dict[str, np.ndarray]` (float32, torch state_dict
names and order) so that the rest of the node never holds torch objects: strategies,
secure aggregation and the content store work on plain arrays.

Training runs in a worker thread (asyncio.to_thread), and a thread cannot be killed: so
`train` checks a deadline and a stop flag before every batch and gives up with a
TrainingStopped error. It also refuses to return what it cannot send: a non-finite loss or
non-finite weights raise NonFiniteUpdate instead of becoming an update that the coordinator
would refuse at parsing.

Differential privacy (DP-SGD with Opacus) goes in a privacy mechanism (fednode.privacy),
which wraps `train`; only "none" exists in this version. Model kinds are found by name in
MODELS (register_model).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fednode.data import Dataset
from fednode.weights import Weights
from protocol import modelspec
from protocol.errors import DataError, FednodeError, ValidationError
from protocol.plugins import Registry

OPTIMIZERS = ("sgd", "adam")


class TrainingStopped(FednodeError):
    """Local training gave up before its end: its deadline passed (TRAIN_DEADLINE) or its
    stop flag was set (TRAIN_CANCELLED: the task was cancelled, e.g. the connection closed)."""

    code = "TRAIN_DEADLINE"
    hint = (
        "lower training.local_epochs or the model size, raise round_timeout_s, or ask the "
        "participant's operator to raise --max-train-seconds"
    )


class NonFiniteUpdate(FednodeError):
    """Training diverged: the loss or the trained weights are NaN or infinite."""

    code = "NON_FINITE_UPDATE"
    hint = "lower training.lr (or use plain sgd without momentum); check the local data"


# A model builder: the widths from input to output ([inputs, *hidden, classes]) -> an
# nn.Sequential, so that state_dict names are stable ("0.weight", "2.bias", ...) and match
# protocol.modelspec.shapes, which prices a spec before any of this is built.
Builder = Callable[[list[int]], nn.Module]
MODELS: Registry[Builder] = Registry("model kind", "set model.kind to a registered kind")


def register_model(name: str, hidden: modelspec.HiddenWidths, build: Builder) -> None:
    """A new model kind: its hidden widths from a model spec (protocol.modelspec.KINDS, which
    prices and validates specs) and its torch builder, under one name."""
    modelspec.KINDS.register(name, hidden)
    MODELS.register(name, build)


def _mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths[:-1]):  # each hidden layer: Linear then ReLU
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


def _logreg(widths: list[int]) -> nn.Module:
    return nn.Sequential(nn.Linear(widths[0], widths[-1]))


# The built-in kinds' widths are registered by protocol.modelspec itself (specs name them).
MODELS.register("mlp", _mlp)
MODELS.register("logreg", _logreg)


def build_model(kind: str, inputs: int, hidden: list[int], classes: int) -> nn.Module:
    """The registered model ``kind`` with these sizes (a kind without hidden layers, such as
    logreg, ignores ``hidden``)."""
    build = MODELS.get(kind)
    if inputs < 1 or classes < 1 or any(h < 1 for h in hidden):
        raise ValidationError(
            f"model sizes must be positive: inputs={inputs}, hidden={hidden}, classes={classes}"
        )
    widths = modelspec.layer_widths(
        {"kind": kind, "inputs": inputs, "hidden": list(hidden), "classes": classes}
    )
    return build(widths)


def _model_from_spec(model_spec: dict[str, Any]) -> nn.Module:
    build = MODELS.get(model_spec.get("kind"))
    return build(modelspec.layer_widths(model_spec))


def get_weights(model: nn.Module) -> Weights:
    return {
        k: v.detach().cpu().numpy().astype(np.float32, copy=True)
        for k, v in model.state_dict().items()
    }


def set_weights(model: nn.Module, weights: Weights) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    if missing or extra:
        raise ValidationError(
            f"weights do not fit the model: missing {missing or 'none'}, unexpected "
            f"{extra or 'none'}"
        )
    state = {}
    for k, ref in own.items():
        w = np.asarray(weights[k])
        if tuple(w.shape) != tuple(ref.shape):
            raise ValidationError(
                f"tensor {k!r} has shape {tuple(w.shape)}, the model needs {tuple(ref.shape)}"
            )
        state[k] = torch.from_numpy(np.array(w, dtype=np.float32, copy=True))
    model.load_state_dict(state, strict=True)


def init_weights(model_spec: dict[str, Any], seed: int) -> Weights:
    """The initial global model: the same seed gives the same weights on every machine."""
    torch.manual_seed(seed)
    return get_weights(_model_from_spec(model_spec))


@dataclass
class TrainConfig:
    local_epochs: int
    batch_size: int
    lr: float
    optimizer: str  # "sgd" | "adam"
    momentum: float
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        if self.local_epochs < 1:
            raise ValidationError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ValidationError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValidationError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValidationError(
                f"unknown optimizer {self.optimizer!r}; accepted: {', '.join(OPTIMIZERS)}"
            )
        if self.momentum < 0 or self.weight_decay < 0 or self.proximal_mu < 0:
            raise ValidationError("momentum, weight_decay and proximal_mu must be >= 0")


@dataclass
class TrainResult:
    weights: Weights
    num_examples: int
    loss: float  # mean training loss over the last epoch
    duration_s: float
    steps: int


def _tensors(model_spec: dict[str, Any], data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if len(data) == 0:
        raise DataError("the dataset is empty")
    x = np.ascontiguousarray(data.x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != int(model_spec["inputs"]):
        raise DataError(
            f"data has {x.shape[1] if x.ndim == 2 else '?'} features per example but the "
            f"model takes {model_spec['inputs']} inputs",
            hint="set model.inputs to the number of feature columns",
        )
    y = np.asarray(data.y, dtype=np.int64)
    classes = int(model_spec["classes"])
    if y.min() < 0 or y.max() >= classes:
        raise DataError(
            f"labels range over {int(y.min())}..{int(y.max())} but the model has "
            f"{classes} classes (0..{classes - 1})",
            hint="set model.classes to cover every label",
        )
    return torch.from_numpy(x), torch.from_numpy(y)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _check_stop(
    deadline: float | None,
    stop: threading.Event | None,
    *,
    started: float,
    epoch: int,
    epochs: int,
    steps: int,
) -> None:
    """Raise TrainingStopped if the deadline (monotonic) has passed or the flag is set."""
    cancelled = stop is not None and stop.is_set()
    late = deadline is not None and time.monotonic() >= deadline
    if not (cancelled or late):
        return
    ran = time.monotonic() - started
    progress = f"after {epoch} of {epochs} epochs ({steps} steps, {ran:.2f} s)"
    if cancelled:
        raise TrainingStopped(f"local training was cancelled {progress}", code="TRAIN_CANCELLED")
    assert deadline is not None
    raise TrainingStopped(
        f"local training stopped at its deadline {progress}; the limit was "
        f"{max(0.0, deadline - started):.2f} s"
    )


def train(
    model_spec: dict[str, Any],
    weights: Weights,
    data: Dataset,
    cfg: TrainConfig,
    *,
    deadline: float | None = None,
    stop: threading.Event | None = None,
) -> TrainResult:
    """Train from `weights` on local data; deterministic for a given cfg.seed and threads.

    `deadline` (time.monotonic() seconds) and `stop` are checked before every batch, so
    training ends within one batch of either: TrainingStopped (code TRAIN_DEADLINE, or
    TRAIN_CANCELLED for the flag). A non-finite batch loss stops training at once, and
    non-finite trained weights are refused: NonFiniteUpdate (code NON_FINITE_UPDATE).
    """
    cfg.validate()
    start = time.perf_counter()
    began = time.monotonic()
    x, y = _tensors(model_spec, data)
    model = _model_from_spec(model_spec)
    set_weights(model, weights)
    model.train()
    opt = _optimizer(model, cfg)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(int(cfg.seed))
    anchor = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else None
    n = x.shape[0]
    steps = 0
    epoch_loss = 0.0
    for epoch in range(cfg.local_epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, cfg.batch_size):
            _check_stop(
                deadline, stop, started=began, epoch=epoch, epochs=cfg.local_epochs, steps=steps
            )
            idx = perm[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            value = float(loss.detach())
            if not math.isfinite(value):
                # Every later step would only spread the NaN: give up now, and say where.
                raise NonFiniteUpdate(
                    f"the training loss became {value} at epoch {epoch + 1} of "
                    f"{cfg.local_epochs}, step {steps + 1}; no update is sent"
                )
            objective = loss
            if anchor is not None:
                # FedProx: keep the local model near the global one it started from.
                prox = sum(
                    ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
                objective = loss + (cfg.proximal_mu / 2.0) * prox
            objective.backward()
            opt.step()
            steps += 1
            total += value * len(idx)
        epoch_loss = total / n
    trained = get_weights(model)
    for name, v in trained.items():
        if not np.isfinite(v).all():
            raise NonFiniteUpdate(
                f"the trained tensor {name!r} has non-finite values (NaN or inf) after "
                f"{cfg.local_epochs} epochs ({steps} steps); no update is sent"
            )
    return TrainResult(
        weights=trained,
        num_examples=int(n),
        loss=float(epoch_loss),
        duration_s=time.perf_counter() - start,
        steps=steps,
    )


def evaluate(
    model_spec: dict[str, Any], weights: Weights, data: Dataset, batch_size: int = 1024
) -> tuple[float, float]:
    """(accuracy in 0..1, mean cross-entropy loss) on `data`."""
    if batch_size < 1:
        raise ValidationError(f"batch_size must be >= 1, got {batch_size}")
    x, y = _tensors(model_spec, data)
    model = _model_from_spec(model_spec)
    set_weights(model, weights)
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    correct = 0
    total_loss = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            logits = model(x[i : i + batch_size])
            target = y[i : i + batch_size]
            total_loss += float(loss_fn(logits, target))
            correct += int((logits.argmax(dim=1) == target).sum())
    n = x.shape[0]
    return correct / n, total_loss / n


def warm_up() -> None:
    """Pay torch's one-time costs at node start, not in the first round's timings.

    The first optimizer a process creates imports torch._dynamo, which takes seconds.
    """
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1)


def expected_shapes(model_spec: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a model spec, by arithmetic (protocol.modelspec): no torch
    model is built, so asking costs nothing whatever size the spec names."""
    return modelspec.shapes(model_spec)
