"""A python model's fingerprint, factory name and arguments (spec ``model.kind = "python"``).

Why this exists: with kind "python" the model is code that each node's own operator installed
(fednode/factories.py builds it, and only from a factory that operator allowed), so nothing
in the spec says by arithmetic what the model is. The spec carries its *fingerprint* instead:
every tensor that travels, by name, with its dtype and shape (``"0.weight" = ["float32", [32,
64]]``), as ``fednode fingerprint`` prints it. The fingerprint prices the model before
anything is imported (protocol.modelspec reads its shapes), and every node compares the model
its local code builds with it, so a node whose code differs is refused naming the tensor.

Pure: no torch, no import of the factory, no I/O.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from protocol.errors import ValidationError

PYTHON_KIND = "python"
# "package.module:attribute" (attribute paths allowed: "pkg.nets:Builders.small"); never
# anything a shell or an import hook could read otherwise
FACTORY_RE = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*"
    r"(\.[A-Za-z_][A-Za-z0-9_]*)*$"
)
MAX_FACTORY_CHARS = 200
# model.args: keyword arguments of the factory, TOML scalars or flat lists of them
MAX_ARGS = 32
MAX_ARG_LIST = 64
MAX_ARG_TEXT = 200
ARG_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# model.fingerprint: the tensors of a state_dict as torch names their dtypes
DTYPES = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)
MAX_TENSORS = 10_000
MAX_TENSOR_NAME = 200
MAX_RANK = 8
MAX_DIM = 2**31 - 1

#: tensor name -> (dtype, shape), in the model's state_dict order
Fingerprint = dict[str, tuple[str, tuple[int, ...]]]


def check_factory(value: Any, where: str = "model.factory") -> str:
    """A factory name ``module.path:attribute``; ValidationError otherwise."""
    if not isinstance(value, str) or len(value) > MAX_FACTORY_CHARS or not FACTORY_RE.match(value):
        raise ValidationError(
            f"{where} = {value!r} is not a factory name",
            hint='write it "package.module:function", e.g. "mypkg.nets:resnet8" (at most '
            f"{MAX_FACTORY_CHARS} characters)",
        )
    return value


def _scalar(v: Any) -> bool:
    if isinstance(v, str):
        return len(v) <= MAX_ARG_TEXT
    if isinstance(v, float):
        return math.isfinite(v)
    return isinstance(v, int | bool)


def check_args(value: Any, where: str = "model.args") -> dict[str, Any]:
    """The factory's keyword arguments: at most MAX_ARGS names, each value a bounded scalar
    (integer, finite float, bool, short string) or a flat list of them."""
    if not isinstance(value, Mapping) or len(value) > MAX_ARGS:
        raise ValidationError(
            f"{where} is not a table of at most {MAX_ARGS} keyword arguments",
            hint='e.g. args = { hidden = 32, widths = [16, 32], act = "relu" }',
        )
    out: dict[str, Any] = {}
    for name, v in value.items():
        if not isinstance(name, str) or not ARG_NAME_RE.match(name):
            raise ValidationError(
                f"{where}: {name!r} is not a keyword argument name",
                hint="letters, digits and _, not starting with a digit",
            )
        ok = _scalar(v) or (
            isinstance(v, list | tuple) and len(v) <= MAX_ARG_LIST and all(map(_scalar, v))
        )
        if not ok:
            raise ValidationError(
                f"{where}.{name} = {v!r} is not accepted",
                hint="an integer, a finite number, true/false, a string of at most "
                f"{MAX_ARG_TEXT} characters, or a list of at most {MAX_ARG_LIST} of those",
            )
        out[name] = list(v) if isinstance(v, list | tuple) else v
    return out


def parse(value: Any, where: str = "model.fingerprint") -> Fingerprint:
    """The spec's fingerprint table (name -> [dtype, [dims]]), checked; ValidationError
    naming the entry otherwise."""
    if not isinstance(value, Mapping) or len(value) > MAX_TENSORS:
        raise ValidationError(
            f"{where} is not a table of at most {MAX_TENSORS} tensors",
            hint="print it with `fednode fingerprint FACTORY --args JSON` and paste it: "
            '{ "0.weight" = ["float32", [32, 64]], ... }',
        )
    out: Fingerprint = {}
    for name, entry in value.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_TENSOR_NAME:
            raise ValidationError(
                f"{where}: tensor name {name!r} is not 1..{MAX_TENSOR_NAME} characters"
            )
        ok = (
            isinstance(entry, list | tuple)
            and len(entry) == 2
            and entry[0] in DTYPES
            and isinstance(entry[1], list | tuple)
            and len(entry[1]) <= MAX_RANK
            and all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM
                for d in entry[1]
            )
        )
        if not ok:
            raise ValidationError(
                f"{where}[{name!r}] = {entry!r} is not [dtype, [dims]]",
                hint=f"dtype one of {', '.join(DTYPES)}; at most {MAX_RANK} dimensions, each "
                "an integer >= 0",
            )
        out[name] = (str(entry[0]), tuple(int(d) for d in entry[1]))
    return out


def to_spec(fp: Fingerprint) -> dict[str, list[Any]]:
    """The spec's (TOML, JSON, CBOR) form of a fingerprint: name -> [dtype, [dims]]."""
    return {name: [dtype, list(shape)] for name, (dtype, shape) in fp.items()}


def shapes(fp: Fingerprint) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, as the weights travel (float32 safetensors, whatever the dtype
    the model holds)."""
    return {name: shape for name, (_dtype, shape) in fp.items()}


def values(fp: Fingerprint) -> int:
    """Every value of every tensor: what the limits and the wire price."""
    return sum(math.prod(shape) for _dtype, shape in fp.values())


def _show(entry: tuple[str, tuple[int, ...]]) -> str:
    return f"{entry[0]} {list(entry[1])}"


def differences(expected: Fingerprint, found: Fingerprint) -> list[str]:
    """Each way ``found`` (what local code built) differs from ``expected`` (the spec's), one
    line per tensor, in the expected order then the extra ones; [] when they agree."""
    out = []
    for name, want in expected.items():
        have = found.get(name)
        if have is None:
            out.append(f"tensor {name!r} ({_show(want)}) is missing")
        elif have[1] != want[1]:
            out.append(f"tensor {name!r} has shape {list(have[1])}, expected {list(want[1])}")
        elif have[0] != want[0]:
            out.append(f"tensor {name!r} has dtype {have[0]}, expected {want[0]}")
    out += [
        f"tensor {name!r} ({_show(have)}) is extra"
        for name, have in found.items()
        if name not in expected
    ]
    return out


def to_toml(fp: Fingerprint) -> str:
    """The fingerprint as one TOML line to paste under ``[model]``."""
    inner = ", ".join(
        f'{json.dumps(name)} = ["{dtype}", [{", ".join(map(str, shape))}]]'
        for name, (dtype, shape) in fp.items()
    )
    return f"fingerprint = {{ {inner} }}"
