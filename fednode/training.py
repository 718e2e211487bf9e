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
which wraps `train` (local_dp: fednode.dpsgd.train_private). Model kinds are found by name in
MODELS (register_model); every kind is an ``nn.Sequential`` of the layers protocol.modelspec
resolves from the spec (kind "layers" declares them, protocol/layers.py).

The model's task (protocol.modelspec.TASKS) chooses the loss and the metrics: classification
is cross-entropy (accuracy), binary is BCE with logits on one output (accuracy, ROC AUC),
regression is mean squared error on float targets (MAE, R²). ``Dataset.x`` stays flat,
[n, prod(input_shape)], and is reshaped here to [n, *input_shape]; ``Dataset.y`` is int64
class labels, or float32 targets for regression.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fednode import factories
from fednode.data import Dataset
from fednode.weights import Weights
from protocol import modelspec
from protocol.errors import DataError, FednodeError, ValidationError
from protocol.fingerprint import PYTHON_KIND
from protocol.layers import UNSENT_BUFFERS, Layer, torch_class
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


# A model builder: the resolved layers of a model spec (protocol.modelspec.model_layers) ->
# an nn.Sequential, so that state_dict names are stable ("0.weight", "2.bias", ...) and match
# protocol.modelspec.shapes, which prices a spec before any of this is built.
Builder = Callable[[list[Layer]], nn.Module]
MODELS: Registry[Builder] = Registry("model kind", "set model.kind to a registered kind")


def register_model(name: str, hidden: modelspec.HiddenWidths, build: Builder) -> None:
    """A new dense model kind: its hidden widths from a model spec (protocol.modelspec.KINDS,
    which prices and validates specs) and its torch builder, under one name."""
    modelspec.KINDS.register(name, modelspec.dense_kind(hidden))
    MODELS.register(name, build)


def sequential(plan: list[Layer]) -> nn.Module:
    """One torch.nn module per resolved layer, in order. The class is looked up only among
    protocol.layers.TYPES (a name the spec gave is checked against it, never imported)."""
    return nn.Sequential(*(getattr(nn, torch_class(layer.type))(**layer.kwargs) for layer in plan))


# The built-in kinds' layers are registered by protocol.modelspec itself (specs name them).
for _kind in ("mlp", "logreg", "layers"):
    MODELS.register(_kind, sequential)


def _from_factory(plan: list[Layer]) -> nn.Module:
    raise ValidationError("a python model is built by fednode.factories, not from layers")


# kind "python" has no layers: _model_from_spec builds it with fednode.factories
MODELS.register(PYTHON_KIND, _from_factory)


def build_model(kind: str, inputs: int, hidden: list[int], classes: int) -> nn.Module:
    """The registered model ``kind`` with these sizes (a kind without hidden layers, such as
    logreg, ignores ``hidden``)."""
    build = MODELS.get(kind)
    if inputs < 1 or classes < 1 or any(h < 1 for h in hidden):
        raise ValidationError(
            f"model sizes must be positive: inputs={inputs}, hidden={hidden}, classes={classes}"
        )
    plan = modelspec.model_layers(
        {"kind": kind, "inputs": inputs, "hidden": list(hidden), "classes": classes}
    )
    return build(plan)


# Where training and evaluation run (fednode run --device). Weights always leave as float32
# numpy arrays on the CPU (get_weights), so the wire format does not depend on it.
DEVICE = torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """``auto`` (the first GPU torch sees: CUDA, then Apple's MPS, else the CPU), ``cpu``,
    ``cuda``, ``cuda:N`` or ``mps``; ValidationError for anything else or a device this
    machine does not have."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name != "cpu" and name != "mps" and not re.fullmatch(r"cuda(:\d{1,2})?", name):
        raise ValidationError(
            f"--device {name!r} is not a device", hint="use auto, cpu, cuda, cuda:N or mps"
        )
    dev = torch.device(name)
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
    ):
        raise ValidationError(
            f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)",
            hint="use --device auto or cpu",
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValidationError("--device mps: torch sees no MPS device", hint="use auto or cpu")
    return dev


def use_device(name: str) -> torch.device:
    """Make ``name`` the device of every later training and evaluation in this process."""
    global DEVICE
    DEVICE = resolve_device(name)
    return DEVICE


def _model_from_spec(model_spec: dict[str, Any]) -> nn.Module:
    if modelspec.is_python(model_spec):  # the operator's allowed code, checked by fingerprint
        return factories.build(model_spec)
    build = MODELS.get(model_spec.get("kind"))
    return build(modelspec.model_layers(model_spec))


def _travelling(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict less the buffers that stay on the node (BatchNorm's int64
    num_batches_tracked: protocol.layers.UNSENT_BUFFERS)."""
    return {
        k: v for k, v in model.state_dict().items() if k.rpartition(".")[2] not in UNSENT_BUFFERS
    }


def get_weights(model: nn.Module) -> Weights:
    return {
        k: v.detach().cpu().numpy().astype(np.float32, copy=True)
        for k, v in _travelling(model).items()
    }


def set_weights(model: nn.Module, weights: Weights) -> None:
    own = _travelling(model)
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
    # strict=False for the unsent buffers only: every other key was checked above
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


def init_weights(model_spec: dict[str, Any], seed: int) -> Weights:
    """The initial global model: the same seed gives the same weights on every machine."""
    torch.manual_seed(seed)
    return get_weights(_model_from_spec(model_spec))


# The [training] keys of a spec that TrainConfig takes as they are
_SPEC_KEYS = ("local_epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay")


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

    @classmethod
    def of_spec(cls, training: Mapping[str, Any], **overrides: Any) -> TrainConfig:
        """The settings of a validated spec's ``[training]`` section; ``overrides`` (a
        round's seed, FedProx's proximal_mu, a shadow model's epochs) replace any of them."""
        base = {k: training[k] for k in _SPEC_KEYS}
        return cls(**{**base, **overrides})

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
    # what a privacy mechanism spent on this training (fednode.dpsgd: the update's dp_*
    # figures); None = trained without one
    privacy: dict[str, Any] | None = None


def _tensors(model_spec: dict[str, Any], data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The data as the model takes it: x reshaped to [n, *input_shape], y as the task's loss
    wants it (int64 classes; float32 0/1 for binary; float32 [n, outputs] for regression)."""
    if len(data) == 0:
        raise DataError("the dataset is empty")
    shape = modelspec.input_shape(model_spec)
    width = math.prod(shape)
    x = np.ascontiguousarray(data.x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != width:
        raise DataError(
            f"data has {x.shape[1] if x.ndim == 2 else '?'} features per example but the "
            f"model takes {width} inputs"
            + (f" (input_shape {list(shape)})" if len(shape) > 1 else ""),
            hint="set model.inputs (or model.input_shape) to the data's feature count",
        )
    task = model_spec.get("task", "classification")
    outputs = modelspec.output_width(model_spec)
    xt = torch.from_numpy(x).reshape(x.shape[0], *shape)
    if task == "regression":
        y = np.asarray(data.y, dtype=np.float32).reshape(len(data), -1)
        if y.shape[1] != outputs or not np.isfinite(y).all():
            raise DataError(
                f"regression targets must be {outputs} finite number(s) per example; the data "
                f"has {y.shape[1]} per example"
                + ("" if np.isfinite(y).all() else ", some not finite"),
                hint="give the model's last layer one output per target column",
            )
        return xt, torch.from_numpy(y)
    if np.issubdtype(np.asarray(data.y).dtype, np.floating) and not np.all(np.mod(data.y, 1) == 0):
        raise DataError(
            f"{task} labels must be whole class numbers; the data has fractional labels",
            hint='use model.task = "regression" for numeric targets',
        )
    y = np.asarray(data.y, dtype=np.int64)
    classes = 2 if task == "binary" else outputs
    if y.min() < 0 or y.max() >= classes:
        raise DataError(
            f"labels range over {int(y.min())}..{int(y.max())} but the model has "
            f"{classes} classes (0..{classes - 1})",
            hint="set model.classes to cover every label"
            if task == "classification"
            else "binary labels are 0 or 1",
        )
    yt = torch.from_numpy(y)
    return xt, yt.to(torch.float32) if task == "binary" else yt


def _loss_fn(
    task: str, reduction: str = "mean"
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The task's loss on the model's output and _tensors' targets."""
    if task == "binary":
        bce = nn.BCEWithLogitsLoss(reduction=reduction)
        return lambda out, y: bce(out.reshape(-1), y)
    if task == "regression":
        mse = nn.MSELoss(reduction=reduction)
        # summed over outputs too: "sum" then divided by the examples is a per-example loss
        return lambda out, y: mse(out, y) if reduction == "mean" else mse(out, y) / y.shape[1]
    return nn.CrossEntropyLoss(reduction=reduction)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


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
    model.to(DEVICE)
    x, y = x.to(DEVICE), y.to(DEVICE)
    model.train()
    opt = _optimizer(model, cfg)
    loss_fn = _loss_fn(model_spec.get("task", "classification"))
    # BatchNorm cannot normalise one example in training mode (its variance is undefined):
    # a last batch of one example is skipped when the model has it
    skip_single = _has_batchnorm(model) and x.shape[0] > 1
    gen = torch.Generator().manual_seed(int(cfg.seed))
    anchor = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else None
    n = x.shape[0]
    steps = 0
    epoch_loss = 0.0
    for epoch in range(cfg.local_epochs):
        perm = torch.randperm(n, generator=gen).to(DEVICE)  # the CPU generator: same order
        total = 0.0
        for i in range(0, n, cfg.batch_size):
            _check_stop(
                deadline, stop, started=began, epoch=epoch, epochs=cfg.local_epochs, steps=steps
            )
            idx = perm[i : i + cfg.batch_size]
            if skip_single and len(idx) == 1:
                continue
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


def evaluate_metrics(
    model_spec: dict[str, Any], weights: Weights, data: Dataset, batch_size: int = 1024
) -> dict[str, float]:
    """The task's metrics on `data`, by name, with the mean loss (``loss``):
    classification ``accuracy``; binary ``accuracy`` and ``roc_auc`` (left out when the data
    hold one class only: it is undefined); regression ``mae`` and ``r2``."""
    from sklearn import metrics  # only evaluation needs it; keeps the node's import light

    if batch_size < 1:
        raise ValidationError(f"batch_size must be >= 1, got {batch_size}")
    task = model_spec.get("task", "classification")
    x, y = _tensors(model_spec, data)
    model = _model_from_spec(model_spec)
    set_weights(model, weights)
    model.to(DEVICE)
    x = x.to(DEVICE)
    model.eval()
    loss_fn = _loss_fn(task, reduction="sum")
    total_loss = 0.0
    outs = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            out = model(x[i : i + batch_size]).cpu()  # metrics on the CPU, with y
            total_loss += float(loss_fn(out, y[i : i + batch_size]))
            outs.append(out)
    out = torch.cat(outs)
    n = x.shape[0]
    figures = {"loss": total_loss / n}
    if task == "classification":
        figures["accuracy"] = int((out.argmax(dim=1) == y).sum()) / n
    elif task == "binary":
        score = out.reshape(-1)
        figures["accuracy"] = int(((score > 0).float() == y).sum()) / n
        if 0 < float(y.sum()) < n:
            figures["roc_auc"] = float(metrics.roc_auc_score(y.numpy(), score.numpy()))
    else:
        figures["mae"] = float(metrics.mean_absolute_error(y.numpy(), out.numpy()))
        figures["r2"] = float(metrics.r2_score(y.numpy(), out.numpy()))
    return figures


def evaluate(
    model_spec: dict[str, Any], weights: Weights, data: Dataset, batch_size: int = 1024
) -> tuple[float, float]:
    """(score, mean loss) on `data`: the score is accuracy in 0..1 for classification and
    binary, R² for regression (higher is better in every task, as the session's rollback
    margin and best-model choice assume). evaluate_metrics gives every metric by name."""
    figures = evaluate_metrics(model_spec, weights, data, batch_size)
    return figures.get("accuracy", figures.get("r2", 0.0)), figures["loss"]


def predict(
    model_spec: dict[str, Any], weights: Weights, data: Dataset, batch_size: int = 1024
) -> np.ndarray:
    """The model's raw outputs (logits) on ``data``, float64 [n, outputs], in eval mode: what
    a membership-inference audit (fednode.audit) turns into prediction vectors."""
    if batch_size < 1:
        raise ValidationError(f"batch_size must be >= 1, got {batch_size}")
    x, _ = _tensors(model_spec, data)
    model = _model_from_spec(model_spec)
    set_weights(model, weights)
    model.to(DEVICE)
    model.eval()
    with torch.no_grad():
        outs = [
            model(x[i : i + batch_size].to(DEVICE)).cpu() for i in range(0, x.shape[0], batch_size)
        ]
    return torch.cat(outs).to(torch.float64).numpy()


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
