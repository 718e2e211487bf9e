"""The layer types a spec may declare (``model.kind = "layers"``), by arithmetic alone.

Each type is the torch.nn class of that name in lower case (``conv2d`` is ``nn.Conv2d``); the
keys of its table are that class's keyword arguments. This module holds, once per type, the
arguments a spec may set (type, range, default), the input sizes torch would otherwise be
told (``in_features``, ``in_channels``, ``num_features``, ``normalized_shape``,
``num_channels``: inferred from the shape that reaches the layer), the shape the layer
outputs and the tensors it holds, with torch's formulas (conv and pool output sizes with
stride, padding, dilation and ceil_mode). fednode/training.py builds ``getattr(nn, TORCH[t])
(**layer.kwargs)`` for each resolved layer, and tests/test_layers.py checks every type's
shapes and tensor names against torch's own.

Shapes are per example, without the batch dimension: ``[1, 28, 28]`` is one grey 28x28 image.
Every number is bounded (MAX_LAYERS, the ranges below), so that pricing a spec is a few
integer operations whatever it says.

BatchNorm's ``num_batches_tracked`` (an int64 counter) is not one of a layer's tensors here
and never travels: weights cross the wire as float32, and a counter averaged or clipped with
the weights would be meaningless. torch reads it only when ``momentum`` is None (a cumulative
average), which the table does not accept, so training loses nothing by keeping it local.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol import text
from protocol.errors import ValidationError

MAX_LAYERS = 64
MAX_DIM = 65_536  # any one dimension of a shape a layer takes or gives
MAX_INPUT_VALUES = 1_000_000  # prod(input_shape): the values of one example
MAX_INPUT_RANK = 3  # [features], [channels, length] or [channels, height, width]
MAX_CHANNELS = 4096
MAX_KERNEL = 64
# Tensors of torch's state_dict that are not weights: kept on the node, never sent (above).
UNSENT_BUFFERS = ("num_batches_tracked",)


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Arg:
    """One keyword argument a spec may give a layer.

    kind: ``int``, ``float``, ``bool``, ``choice``, ``size`` (an int, or a list of ``n``
    ints, one per spatial dimension), ``padding`` (a size, or "same" / "valid"), ``shape``
    (an int or a list of ints: LayerNorm's normalized_shape). ``default`` None means torch's
    own default, which depends on another argument (a pool's stride is its kernel_size)."""

    kind: str
    default: Any = REQUIRED
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    n: int = 1  # spatial dimensions of a size or padding


@dataclass(frozen=True)
class Layer:
    """One declared layer, checked and resolved."""

    index: int
    type: str
    kwargs: dict[str, Any]  # every argument torch's class is given, the inferred ones too
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    tensors: dict[str, tuple[int, ...]]  # "weight", "bias", "running_mean", ... in torch order
    # float32 values kept per example for backward beyond the output and its gradient
    # (a dropout mask, a max-pool's int64 indices, a convolution's unfolded input)
    extra_activations: int = 0

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.tensors.values())


class _Ctx:
    """A layer being resolved: where it is (for messages) and what reaches it."""

    def __init__(self, index: int, type_: str, in_shape: tuple[int, ...]) -> None:
        self.index, self.type, self.in_shape = index, type_, in_shape

    @property
    def where(self) -> str:
        return f"model.layers[{self.index}] ({self.type})"

    def fail(self, message: str, hint: str) -> ValidationError:
        return ValidationError(f"{self.where}: {message}", hint=hint)

    def misfit(self, what: str, fix: str) -> ValidationError:
        return self.fail(f"{what} does not fit its input of shape {list(self.in_shape)}", hint=fix)


def _show(v: Any) -> str:
    return list(v).__repr__() if isinstance(v, tuple) else text.shown(v)


def _check_arg(ctx: _Ctx, key: str, a: Arg, value: Any) -> Any:
    def bad(expected: str) -> ValidationError:
        return ctx.fail(
            f"{key} = {_show(value)} is not accepted: expected {expected}",
            hint=f"fix {key} of {ctx.where}, or leave it out for its default "
            f"({_show(a.default) if a.default is not None else 'torch default'})"
            if a.default is not REQUIRED
            else f"{key} is required: set it in {ctx.where}",
        )

    def integer(v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise bad(_int_range(a))
        if (a.lo is not None and v < a.lo) or (a.hi is not None and v > a.hi):
            raise bad(_int_range(a))
        return v

    if a.kind == "int":
        return integer(value)
    if a.kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
        if not ok or (a.lo is not None and value < a.lo) or (a.hi is not None and value > a.hi):
            raise bad(f"a number in [{a.lo:g}, {a.hi:g}]")
        return float(value)
    if a.kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if a.kind == "choice":
        if value not in a.choices:
            raise bad("one of " + ", ".join(a.choices))
        return value
    if a.kind in ("size", "padding"):
        if a.kind == "padding" and value in ("same", "valid"):
            return value
        also = ' or "same" / "valid"' if a.kind == "padding" else ""
        many = f"{_int_range(a)}, or a list of {a.n} of them{also}"
        if isinstance(value, list):
            if len(value) != a.n:
                raise bad(many)
            return tuple(integer(v) for v in value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(many)
        return (integer(value),) * a.n
    if a.kind == "shape":
        if isinstance(value, int) and not isinstance(value, bool):
            return (integer(value),)
        if isinstance(value, list) and 1 <= len(value) <= MAX_INPUT_RANK:
            return tuple(integer(v) for v in value)
        raise bad(f"an integer or a list of 1 to {MAX_INPUT_RANK} of them")
    raise AssertionError(a.kind)


def _int_range(a: Arg) -> str:
    return f"an integer in [{a.lo:g}, {a.hi:g}]"


# --- the output sizes torch computes -----------------------------------------------------


def conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    """torch's Conv output length: floor((L + 2p - d(k-1) - 1) / s) + 1."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def pool_out(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape: conv_out rounded up with ceil_mode, but a last window
    that would start in the right padding is dropped."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _rank(ctx: _Ctx, ranks: tuple[int, ...], names: str) -> None:
    if len(ctx.in_shape) not in ranks:
        raise ctx.fail(
            f"takes an input of shape {names}, but its input has shape {list(ctx.in_shape)}",
            hint="set model.input_shape accordingly (e.g. [1, 28, 28] for grey 28x28 images), "
            "or reshape with a flatten layer before it",
        )


def _inferred(ctx: _Ctx, given: Mapping[str, Any], key: str, value: Any) -> None:
    if key in given and _as_tuple(given[key]) != _as_tuple(value):
        raise ctx.fail(
            f"{key} = {_show(given[key])} but its input gives {_show(value)}",
            hint=f"leave {key} out (it is inferred from the shape before the layer) or set it "
            f"to {_show(value)}",
        )


def _as_tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list | tuple) else (v,)


Resolved = tuple[dict[str, Any], tuple[int, ...], dict[str, tuple[int, ...]], int]


def _linear(ctx: _Ctx, a: dict[str, Any], given: Mapping[str, Any]) -> Resolved:
    n_in = ctx.in_shape[-1]
    _inferred(ctx, given, "in_features", n_in)
    out = a["out_features"]
    tensors = {"weight": (out, n_in)} | ({"bias": (out,)} if a["bias"] else {})
    return {"in_features": n_in, **a}, (*ctx.in_shape[:-1], out), tensors, 0


def _conv(n: int) -> Callable[[_Ctx, dict[str, Any], Mapping[str, Any]], Resolved]:
    def resolve(ctx: _Ctx, a: dict[str, Any], given: Mapping[str, Any]) -> Resolved:
        _rank(ctx, (n + 1,), "[channels, length]" if n == 1 else "[channels, height, width]")
        c_in, spatial = ctx.in_shape[0], ctx.in_shape[1:]
        _inferred(ctx, given, "in_channels", c_in)
        c_out, k, s, d, g = (
            a["out_channels"],
            a["kernel_size"],
            a["stride"],
            a["dilation"],
            a["groups"],
        )
        if c_in % g or c_out % g:
            raise ctx.misfit(
                f"groups = {g}",
                f"groups must divide in_channels ({c_in}) and out_channels ({c_out})",
            )
        pad = a["padding"]
        if pad == "same" and any(v != 1 for v in s):
            raise ctx.fail(
                'padding = "same" needs stride 1', hint="set stride = 1 or a numeric padding"
            )
        if pad == "same":
            out = tuple(spatial)
        else:
            p = (0,) * n if pad == "valid" else pad
            out = tuple(conv_out(*t) for t in zip(spatial, k, s, p, d, strict=True))
            if min(out) < 1:
                reach = [di * (ki - 1) + 1 for ki, di in zip(k, d, strict=True)]
                raise ctx.misfit(
                    f"kernel_size = {list(k)} (dilation {list(d)}: spans {reach}) with "
                    f"padding {list(p)}",
                    f"the padded input {[x + 2 * q for x, q in zip(spatial, p, strict=True)]} "
                    "must be at least the kernel's span: use a smaller kernel_size or dilation, "
                    "more padding, or a larger input",
                )
        tensors = {"weight": (c_out, c_in // g, *k)} | ({"bias": (c_out,)} if a["bias"] else {})
        # CPU convolution unfolds its input: (in_channels/groups * kernel) values per output
        # position, kept for the backward pass
        unfold = (c_in // g) * math.prod(k) * math.prod(out)
        return {"in_channels": c_in, **a}, (c_out, *out), tensors, unfold

    return resolve


def _pool(
    n: int, *, dilation: bool
) -> Callable[[_Ctx, dict[str, Any], Mapping[str, Any]], Resolved]:
    def resolve(ctx: _Ctx, a: dict[str, Any], given: Mapping[str, Any]) -> Resolved:
        _rank(ctx, (n + 1,), "[channels, length]" if n == 1 else "[channels, height, width]")
        k = a["kernel_size"]
        s = k if a["stride"] is None else a["stride"]
        p = a["padding"]
        d = a.get("dilation", (1,) * n)
        if any(pi > ki // 2 for pi, ki in zip(p, k, strict=True)):
            raise ctx.fail(
                f"padding = {list(p)} is more than half of kernel_size = {list(k)}",
                hint=f"use padding <= {[ki // 2 for ki in k]}",
            )
        spatial = ctx.in_shape[1:]
        out = tuple(
            pool_out(x, ki, si, pi, di, a["ceil_mode"])
            for x, ki, si, pi, di in zip(spatial, k, s, p, d, strict=True)
        )
        if min(out) < 1:
            raise ctx.misfit(
                f"kernel_size = {list(k)}",
                f"use kernel_size <= {[x + 2 * q for x, q in zip(spatial, p, strict=True)]} "
                "(the padded input), or pool earlier",
            )
        kwargs = {**a, "stride": s}
        # max pooling keeps the int64 index of each maximum: two float32's worth per output
        extra = 2 * ctx.in_shape[0] * math.prod(out) if dilation else 0
        return kwargs, (ctx.in_shape[0], *out), {}, extra

    return resolve


def _adaptive(ctx: _Ctx, a: dict[str, Any], given: Mapping[str, Any]) -> Resolved:
    _rank(ctx, (3,), "[channels, height, width]")
    return a, (ctx.in_shape[0], *a["output_size"]), {}, 0


def _flatten(ctx: _Ctx, a: dict[str, Any], given: Mapping[str, Any]) -> Resolved:
    rank = len(ctx.in_shape) + 1  # torch counts the batch dimension: 0
    s = a["start_dim"] % rank if a["start_dim"] < 0 else a["start_dim"]
    e = a["end_dim"] % rank if a["end_dim"] < 0 else a["end_dim"]
    if not 1 <= s <= e < rank:
        raise ctx.misfit(
            f"start_dim = {a['start_dim']}, end_dim = {a['end_dim']}",
            f"the dimensions of an input of shape {list(ctx.in_shape)} are 1..{rank - 1} "
            "(0 is the batch, which is never flattened); need 1 <= start_dim <= end_dim",
        )
    shape = ctx.in_shape
    return a, (*shape[: s - 1], math.prod(shape[s - 1 : e]), *shape[e:]), {}, 0


def _elementwise(extra: int = 0) -> Callable[[_Ctx, dict[str, Any], Mapping[str, Any]], Resolved]:
    def resolve(ctx: _Ctx, a: dict[str, Any], given: Mapping[str, Any]) -> Resolved:
        return a, ctx.in_shape, {}, extra * math.prod(ctx.in_shape)

    return resolve


def _layernorm(ctx: _Ctx, a: dict[str, Any], given: Mapping[str, Any]) -> Resolved:
    ns = ctx.in_shape[-1:] if a["normalized_shape"] is None else a["normalized_shape"]
    if tuple(ctx.in_shape[len(ctx.in_shape) - len(ns) :]) != ns or len(ns) > len(ctx.in_shape):
        raise ctx.misfit(
            f"normalized_shape = {list(ns)}",
            "normalized_shape must be the last dimensions of the input: "
            + " or ".join(str(list(ctx.in_shape[i:])) for i in range(len(ctx.in_shape)))
            + " (leave it out for the last one)",
        )
    affine = a["elementwise_affine"]
    tensors = ({"weight": ns} if affine else {}) | ({"bias": ns} if affine and a["bias"] else {})
    return {**a, "normalized_shape": ns}, ctx.in_shape, tensors, 0


def _groupnorm(ctx: _Ctx, a: dict[str, Any], given: Mapping[str, Any]) -> Resolved:
    c = ctx.in_shape[0]
    _inferred(ctx, given, "num_channels", c)
    if c % a["num_groups"]:
        fits = [g for g in range(1, c + 1) if c % g == 0]
        raise ctx.misfit(
            f"num_groups = {a['num_groups']}",
            f"num_groups must divide the {c} channels: one of {fits[:16]}",
        )
    tensors = {"weight": (c,), "bias": (c,)} if a["affine"] else {}
    return {"num_channels": c, **a}, ctx.in_shape, tensors, 0


def _batchnorm(ranks: tuple[int, ...], names: str) -> Callable[..., Resolved]:
    def resolve(ctx: _Ctx, a: dict[str, Any], given: Mapping[str, Any]) -> Resolved:
        _rank(ctx, ranks, names)
        c = ctx.in_shape[0]
        _inferred(ctx, given, "num_features", c)
        tensors: dict[str, tuple[int, ...]] = {}
        if a["affine"]:
            tensors |= {"weight": (c,), "bias": (c,)}
        if a["track_running_stats"]:
            tensors |= {"running_mean": (c,), "running_var": (c,)}  # num_batches_tracked: unsent
        return {"num_features": c, **a}, ctx.in_shape, tensors, 0

    return resolve


@dataclass(frozen=True)
class LayerType:
    torch_name: str  # the torch.nn class fednode.training builds
    args: dict[str, Arg]
    resolve: Callable[[_Ctx, dict[str, Any], Mapping[str, Any]], Resolved]
    inferred: tuple[str, ...] = field(default=())  # input sizes: may be given if they agree


def _conv_args(n: int) -> dict[str, Arg]:
    return {
        "out_channels": Arg("int", REQUIRED, 1, MAX_CHANNELS),
        "kernel_size": Arg("size", REQUIRED, 1, MAX_KERNEL, n=n),
        "stride": Arg("size", 1, 1, MAX_KERNEL, n=n),
        "padding": Arg("padding", 0, 0, MAX_KERNEL, n=n),
        "dilation": Arg("size", 1, 1, MAX_KERNEL, n=n),
        "groups": Arg("int", 1, 1, MAX_CHANNELS),
        "bias": Arg("bool", True),
    }


def _pool_args(n: int, *, dilation: bool) -> dict[str, Arg]:
    args = {
        "kernel_size": Arg("size", REQUIRED, 1, MAX_KERNEL, n=n),
        "stride": Arg("size", None, 1, MAX_KERNEL, n=n),  # None: kernel_size, as torch
        "padding": Arg("size", 0, 0, MAX_KERNEL // 2, n=n),
    }
    if dilation:
        args["dilation"] = Arg("size", 1, 1, MAX_KERNEL, n=n)
    args["ceil_mode"] = Arg("bool", False)
    if not dilation:
        args["count_include_pad"] = Arg("bool", True)
    return args


_EPS = Arg("float", 1e-5, 1e-12, 1.0)
_BN_ARGS = {
    "eps": _EPS,
    "momentum": Arg("float", 0.1, 0.0, 1.0),
    "affine": Arg("bool", True),
    "track_running_stats": Arg("bool", True),
}

# Every layer type a spec may name, by its torch class name in lower case. Not accepted on
# purpose: ``inplace`` (an in-place activation can overwrite a value autograd saved, and
# fail only at the first backward), a pool's ``return_indices`` (a tuple output breaks the
# Sequential), BatchNorm's ``momentum = None`` (see num_batches_tracked above).
TYPES: dict[str, LayerType] = {
    "linear": LayerType(
        "Linear",
        {"out_features": Arg("int", REQUIRED, 1, MAX_DIM), "bias": Arg("bool", True)},
        _linear,
        ("in_features",),
    ),
    "conv1d": LayerType("Conv1d", _conv_args(1), _conv(1), ("in_channels",)),
    "conv2d": LayerType("Conv2d", _conv_args(2), _conv(2), ("in_channels",)),
    "maxpool1d": LayerType("MaxPool1d", _pool_args(1, dilation=True), _pool(1, dilation=True)),
    "maxpool2d": LayerType("MaxPool2d", _pool_args(2, dilation=True), _pool(2, dilation=True)),
    "avgpool2d": LayerType("AvgPool2d", _pool_args(2, dilation=False), _pool(2, dilation=False)),
    "adaptiveavgpool2d": LayerType(
        "AdaptiveAvgPool2d", {"output_size": Arg("size", REQUIRED, 1, MAX_CHANNELS, n=2)}, _adaptive
    ),
    "flatten": LayerType(
        "Flatten",
        {"start_dim": Arg("int", 1, -4, 3), "end_dim": Arg("int", -1, -4, 3)},
        _flatten,
    ),
    "relu": LayerType("ReLU", {}, _elementwise()),
    "leakyrelu": LayerType(
        "LeakyReLU", {"negative_slope": Arg("float", 0.01, 0.0, 1.0)}, _elementwise()
    ),
    "gelu": LayerType(
        "GELU", {"approximate": Arg("choice", "none", choices=("none", "tanh"))}, _elementwise()
    ),
    "tanh": LayerType("Tanh", {}, _elementwise()),
    "sigmoid": LayerType("Sigmoid", {}, _elementwise()),
    # dropout keeps its mask (one float per value) for the backward pass
    "dropout": LayerType("Dropout", {"p": Arg("float", 0.5, 0.0, 1.0)}, _elementwise(1)),
    "layernorm": LayerType(
        "LayerNorm",
        {
            "normalized_shape": Arg("shape", None, 1, MAX_DIM),
            "eps": _EPS,
            "elementwise_affine": Arg("bool", True),
            "bias": Arg("bool", True),
        },
        _layernorm,
    ),
    "groupnorm": LayerType(
        "GroupNorm",
        {
            "num_groups": Arg("int", REQUIRED, 1, MAX_CHANNELS),
            "eps": _EPS,
            "affine": Arg("bool", True),
        },
        _groupnorm,
        ("num_channels",),
    ),
    "batchnorm1d": LayerType(
        "BatchNorm1d",
        _BN_ARGS,
        _batchnorm((1, 2), "[features] or [channels, length]"),
        ("num_features",),
    ),
    "batchnorm2d": LayerType(
        "BatchNorm2d", _BN_ARGS, _batchnorm((3,), "[channels, height, width]"), ("num_features",)
    ),
}


def check_input_shape(value: Any) -> tuple[int, ...]:
    """model.input_shape: 1 to MAX_INPUT_RANK dimensions, each 1..MAX_DIM, at most
    MAX_INPUT_VALUES values in all."""
    ok = (
        isinstance(value, list | tuple)
        and 1 <= len(value) <= MAX_INPUT_RANK
        and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_DIM for v in value)
    )
    if not ok:
        raise ValidationError(
            f"model.input_shape = {text.shown(value)} is not accepted: expected a list of 1 to "
            f"{MAX_INPUT_RANK} integers in [1, {MAX_DIM}]",
            hint="[features] for a table, [channels, length] for a sequence, "
            "[channels, height, width] for an image",
        )
    if math.prod(value) > MAX_INPUT_VALUES:
        raise ValidationError(
            f"model.input_shape = {list(value)} has {math.prod(value):,} values per example; "
            f"at most {MAX_INPUT_VALUES:,}",
            hint="downscale the input",
        )
    return tuple(value)


def resolve(input_shape: Any, declared: Any) -> list[Layer]:
    """Check a declared layer list against its input shape and resolve every layer: its
    torch arguments (inferred sizes included), output shape and tensors. Raises
    ValidationError naming the layer's index, its type and the key."""
    shape = check_input_shape(input_shape)
    if not isinstance(declared, list | tuple) or not declared:
        raise ValidationError(
            f"model.layers = {text.shown(declared)} is not a non-empty list of layer tables",
            hint='e.g. layers = [{ type = "flatten" }, { type = "linear", out_features = 10 }]',
        )
    if len(declared) > MAX_LAYERS:
        raise ValidationError(
            f"model.layers has {len(declared)} layers; at most {MAX_LAYERS}",
            hint="use fewer layers",
        )
    out: list[Layer] = []
    for index, raw in enumerate(declared):
        layer = _resolve_one(index, raw, shape)
        out.append(layer)
        shape = layer.out_shape
    return out


def _resolve_one(index: int, raw: Any, shape: tuple[int, ...]) -> Layer:
    if not isinstance(raw, Mapping):
        raise ValidationError(
            f"model.layers[{index}] = {text.shown(raw)} is not a table",
            hint='each layer is a table such as { type = "relu" }',
        )
    name = raw.get("type")
    if not isinstance(name, str) or name not in TYPES:
        raise ValidationError(
            f"model.layers[{index}]: type = {text.shown(name)} is not a known layer type",
            hint="accepted types: " + ", ".join(TYPES),
        )
    lt = TYPES[name]
    ctx = _Ctx(index, name, shape)
    given = {k: v for k, v in raw.items() if k != "type"}
    for key in given:
        if key not in lt.args and key not in lt.inferred:
            accepted = ", ".join([*lt.args, *(f"{k} (inferred)" for k in lt.inferred)]) or "none"
            raise ctx.fail(
                f"unknown key {text.shown(key)}",
                hint=f"{name} accepts: {accepted}",
            )
    args: dict[str, Any] = {}
    for key, a in lt.args.items():
        if key in given:
            args[key] = _check_arg(ctx, key, a, given[key])
        elif a.default is REQUIRED:
            raise ctx.fail(
                f"lacks {key}", hint=f"set {key} ({_int_range(a) if a.lo is not None else a.kind})"
            )
        elif a.kind in ("size", "padding") and isinstance(a.default, int):
            args[key] = (a.default,) * a.n
        else:
            args[key] = a.default
    kwargs, out_shape, tensors, extra = lt.resolve(ctx, args, given)
    if max(out_shape) > MAX_DIM * MAX_CHANNELS:
        raise ctx.fail(
            f"its output shape {list(out_shape)} is too large",
            hint="use fewer channels or features, or pool earlier",
        )
    return Layer(index, name, kwargs, shape, tuple(out_shape), tensors, extra)


def torch_class(layer_type: str) -> str:
    """The torch.nn class name of a layer type (only names in TYPES: never one a peer wrote)."""
    return TYPES[layer_type].torch_name


def dense(inputs: int, widths: Sequence[int]) -> list[Layer]:
    """An mlp's layers: Linear, ReLU, ..., Linear (``widths = [*hidden, outputs]``), so its
    linear layers sit at even Sequential indices (``0.weight``, ``2.weight``, ...). Sizes are
    the spec's (checked by its own fields), not bounded by this module's argument ranges."""
    out: list[Layer] = []
    shape: tuple[int, ...] = (inputs,)
    for i, w in enumerate(widths):
        for name, args in (("linear", {"out_features": w, "bias": True}), ("relu", {})):
            if name == "relu" and i == len(widths) - 1:
                break
            ctx = _Ctx(len(out), name, shape)
            kwargs, out_shape, tensors, extra = TYPES[name].resolve(ctx, args, {})
            out.append(Layer(len(out), name, kwargs, shape, out_shape, tensors, extra))
            shape = out_shape
    return out
