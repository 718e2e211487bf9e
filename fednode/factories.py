"""Python models built from code this node's operator installed (spec ``model.kind = "python"``).

A spec names a factory (``"mypkg.nets:resnet8"``) and its keyword arguments; a remote peer
wrote that spec, so the name alone never makes this node import anything. A factory is built
only when this node's own operator allowed it, by ``fednode run --allow-model MODULE:NAME``
or by installing a package that declares it as an entry point of the ``fednode.models``
group (``resnet8 = "mypkg.nets:resnet8"``; reading entry points reads metadata, it imports
nothing). Any other name is refused (ModelNotAllowed) before an import.

What the code builds is compared with the spec's fingerprint (protocol.fingerprint): every
tensor that travels, by name, dtype and shape, so a node whose code differs is refused
(ModelMismatch) naming the tensor, and never trains or aggregates a model the others do not
have. Anything the factory raises becomes a ModelCodeError naming it. Building runs the
operator's code, so callers run it in a worker thread (asyncio.to_thread), as every model
build is.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from protocol import fingerprint, modelspec
from protocol.errors import ModelCodeError, ModelMismatch, ModelNotAllowed, ValidationError
from protocol.fingerprint import Fingerprint
from protocol.layers import UNSENT_BUFFERS

ENTRY_POINT_GROUP = "fednode.models"

# The factories this process may build (fednode run --allow-model and the entry points,
# set once at start by allow()), like fednode.training.DEVICE.
_ALLOWED: frozenset[str] = frozenset()


def entry_point_factories() -> dict[str, str]:
    """Factory -> entry point name, for every ``fednode.models`` entry point of the installed
    distributions (metadata only: nothing is imported)."""
    return {
        ep.value.strip(): ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    }


def allow(factories: Iterable[str]) -> frozenset[str]:
    """Allow these factories (each checked as ``module:name``) and every installed
    ``fednode.models`` entry point in this process; returns what is allowed now."""
    global _ALLOWED
    given = {fingerprint.check_factory(f, "--allow-model") for f in factories}
    _ALLOWED = frozenset(given | set(entry_point_factories()))
    return _ALLOWED


def allowed() -> frozenset[str]:
    return _ALLOWED


def check_allowed(factory: str) -> None:
    """ModelNotAllowed unless this node's operator allowed ``factory``; imports nothing."""
    if factory not in _ALLOWED:
        raise ModelNotAllowed(
            f"model.factory {factory!r} is not allowed on this node: it builds only factories "
            "its operator allowed (fednode run --allow-model, or a fednode.models entry point)",
            hint=f"if you trust this code, install it and pass --allow-model {factory} to "
            "`fednode run`",
        )


def _resolve(factory: str) -> Callable[..., Any]:
    """The callable ``module.path:attr.path`` names (imports the module)."""
    module_name, _, attr_path = factory.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            obj = getattr(obj, attr)
    except Exception as exc:  # ImportError, an error at the module's import, AttributeError
        raise ModelCodeError(
            f"model.factory {factory!r} cannot be loaded on this node: {type(exc).__name__}: {exc}",
            hint="install the package that holds it on this node (on its PYTHONPATH)",
        ) from None
    if not callable(obj):
        raise ModelCodeError(f"model.factory {factory!r} is not callable")
    return obj


def call(factory: str, args: Mapping[str, Any]) -> nn.Module:
    """Import ``factory`` and call it with ``args``; it must return a torch ``nn.Module``.
    Not allow-checked: ``build`` checks first; ``fednode fingerprint`` runs the operator's
    own command line."""
    make = _resolve(factory)
    try:
        model = make(**dict(args))
    except Exception as exc:
        raise ModelCodeError(
            f"model.factory {factory!r} raised {type(exc).__name__}: {exc} "
            f"(model.args = {dict(args)!r})",
            hint="check model.args against the factory's parameters, or fix the factory",
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelCodeError(
            f"model.factory {factory!r} returned {type(model).__name__}, not a torch nn.Module",
            hint="a factory returns the model (an nn.Module)",
        )
    return model


def fingerprint_of(model: nn.Module) -> Fingerprint:
    """Every tensor that travels (the state_dict less protocol.layers.UNSENT_BUFFERS, as
    fednode.training.get_weights sends it), with torch's dtype name and its shape."""
    return {
        name: (str(t.dtype).removeprefix("torch."), tuple(int(d) for d in t.shape))
        for name, t in model.state_dict().items()
        if name.rpartition(".")[2] not in UNSENT_BUFFERS
    }


def _spec_fingerprint(model_spec: Mapping[str, Any]) -> Fingerprint:
    try:
        return fingerprint.parse(model_spec.get("fingerprint"))
    except ValidationError as exc:  # a checked spec never gets here
        raise ModelCodeError(exc.message, hint=exc.hint) from None


def build(model_spec: Mapping[str, Any]) -> nn.Module:
    """The python model of a (checked) model spec, from this node's allowed code, checked
    against the spec's fingerprint (ModelMismatch naming each tensor that differs)."""
    factory = str(model_spec.get("factory", ""))
    check_allowed(factory)  # before any import
    model = call(factory, model_spec.get("args") or {})
    diffs = fingerprint.differences(_spec_fingerprint(model_spec), fingerprint_of(model))
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise ModelMismatch(
            f"model.factory {factory!r} on this node builds another model than the spec's "
            f"fingerprint: {shown}"
        )
    return model


def verify(model_spec: Mapping[str, Any]) -> Fingerprint:
    """Build the model (``build``) and run one batch of zeros through it: its output must be
    the task's (protocol.modelspec.output_width) per example. What a node does once before it
    takes part; returns the fingerprint."""
    model = build(model_spec)
    shape = modelspec.input_shape(model_spec)
    want = modelspec.output_width(model_spec)
    factory = model_spec.get("factory")
    model.eval()  # BatchNorm on its running statistics; dropout off
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *shape))
    except Exception as exc:
        raise ModelMismatch(
            f"model.factory {factory!r} cannot take input of model.input_shape "
            f"{list(shape)}: {type(exc).__name__}: {exc}",
            hint="set model.input_shape to what the model takes per example",
        ) from None
    got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != [2, want]:
        task = model_spec.get("task", "classification")
        raise ModelMismatch(
            f"model.factory {factory!r} outputs {got} for a batch of 2, but model.task "
            f"{task!r} with model.classes = {model_spec.get('classes')} needs [2, {want}]",
            hint="classification: model.classes outputs; binary and regression: 1 output",
        )
    return fingerprint_of(model)
