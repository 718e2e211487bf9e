"""Hostile safetensors headers are refused from the header alone, before any allocation."""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fednode import weights as W
from protocol.errors import ValidationError

EXPECT = {"0.weight": (4, 3), "0.bias": (4,)}


def craft(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    """Safetensors bytes with any header: 8-byte little-endian length, JSON, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    return n.to_bytes(8, "little") + raw + data


def peak_of(fn: Callable[[], object]) -> tuple[int, float, ValidationError]:
    """The peak bytes Python allocated while ``fn`` ran, the seconds it took and the
    ValidationError it must raise."""
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(ValidationError) as info:
            fn()
        took = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, took, info.value


def test_a_small_buffer_claiming_a_huge_tensor_is_refused_without_allocating() -> None:
    header = {"0.weight": {"dtype": "F32", "shape": [65536, 65536], "data_offsets": [0, 16]}}
    blob = craft(header, b"\0" * 16)
    assert len(blob) < 120
    peak, took, err = peak_of(lambda: W.from_bytes(blob))
    assert "'0.weight'" in err.message and "[65536, 65536]" in err.message
    assert peak < 256 * 1024 and took < 1.0
    # also when the offsets agree with the shape but lie beyond the buffer
    honest = {"0.weight": {"dtype": "F32", "shape": [65536, 65536], "data_offsets": [0, 2**34]}}
    peak, _, err = peak_of(lambda: W.from_bytes(craft(honest, b"\0" * 16)))
    assert "'0.weight'" in err.message and "beyond" in err.message
    assert peak < 256 * 1024


def test_a_valid_file_of_the_wrong_dtype_or_shape_is_refused_before_loading() -> None:
    """A real 8 MB float64 tensor where float32 is expected: the old code loaded all of it
    and then compared; the header says enough."""
    big = W.to_bytes({"0.weight": np.zeros((1024, 1024), np.float64), "0.bias": np.zeros(4)})
    expect = {"0.weight": (1024, 1024), "0.bias": (4,)}
    peak, _, err = peak_of(lambda: W.from_bytes(big, expect=expect))
    assert peak < 1024 * 1024, peak  # well under the 8 MB the tensor holds
    assert "'0.weight'" in err.message and "F64" in err.message
    wrong = W.to_bytes(
        {"0.weight": np.zeros((1024, 1024), np.float32), "0.bias": np.zeros(4, np.float32)}
    )
    peak, _, err = peak_of(
        lambda: W.from_bytes(wrong, expect={"0.weight": (1024, 1023), "0.bias": (4,)})
    )
    assert peak < 1024 * 1024, peak  # the old code loaded the 4 MB first, then compared
    assert "'0.weight'" in err.message and "shape" in err.message


def _t(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    ("blob", "words"),
    [
        # offsets beyond the buffer (shape and offsets agree)
        (craft({"0.weight": _t("F32", [4, 3], 0, 48)}, b"\0" * 20), ["'0.weight'", "beyond"]),
        # offsets that disagree with the shape
        (craft({"0.weight": _t("F32", [4, 3], 0, 40)}, b"\0" * 48), ["'0.weight'", "48"]),
        # end before begin
        (craft({"0.weight": _t("F32", [0], 8, 4)}, b"\0" * 8), ["'0.weight'"]),
        # two tensors sharing bytes
        (
            craft(
                {"0.weight": _t("F32", [4, 3], 0, 48), "0.bias": _t("F32", [4], 32, 48)}, b"\0" * 48
            ),
            ["'0.weight'", "'0.bias'", "overlap"],
        ),
        # an unknown dtype
        (craft({"0.weight": _t("F33", [4, 3], 0, 48)}, b"\0" * 48), ["'0.weight'", "F33"]),
        # a shape that is not a list of non-negative integers
        (craft({"0.weight": _t("F32", [4, -3], 0, 48)}, b"\0" * 48), ["'0.weight'", "shape"]),
        (craft({"0.weight": _t("F32", [4.0, 3], 0, 48)}, b"\0" * 48), ["'0.weight'", "shape"]),
        (
            craft({"0.weight": _t("F32", [1] * 9 + [12], 0, 48)}, b"\0" * 48),
            ["'0.weight'", "shape"],
        ),
        # fields missing or extra
        (craft({"0.weight": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), ["'0.weight'"]),
        (craft({"0.weight": dict(_t("F32", [1], 0, 4), x=1)}, b"\0" * 4), ["'0.weight'"]),
        # the header length beyond the buffer, and beyond the 1 MiB bound
        (craft({}, length=1000), ["1,000"]),
        (craft({}, length=2**64 - 1), ["header"]),
        (craft(b"{" + b" " * (2**20 + 10) + b"}"), ["1,048,576"]),
        # not JSON, not an object, bad metadata, the same name twice
        (craft(b"{nope"), ["not JSON"]),
        (craft(b"\xff\xfe"), ["not JSON"]),
        (craft([1, 2]), ["not a JSON object"]),
        (craft({"__metadata__": {"a": 1}}), ["__metadata__"]),
        (
            craft(
                b'{"0.bias":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                b'"0.bias":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
                b"\0" * 4,
            ),
            ["'0.bias'", "twice"],
        ),
    ],
    ids=[
        "offsets-beyond-buffer",
        "offsets-disagree-with-shape",
        "end-before-begin",
        "overlap",
        "unknown-dtype",
        "negative-dim",
        "float-dim",
        "too-many-dims",
        "missing-field",
        "extra-field",
        "length-beyond-buffer",
        "length-2^64-1",
        "header-over-1MiB",
        "not-json",
        "not-utf8",
        "not-an-object",
        "bad-metadata",
        "duplicate-name",
    ],
)
def test_hostile_headers_are_validation_errors(blob: bytes, words: list[str]) -> None:
    with pytest.raises(ValidationError) as info:
        W.from_bytes(blob)
    assert "not safetensors" in info.value.message
    for word in words:
        assert word in info.value.message, (word, info.value.message)
    with pytest.raises(ValidationError):
        W.header_shapes(blob)


def test_expect_names_the_tensor_from_the_header() -> None:
    good = W.to_bytes({"0.weight": np.ones((4, 3), np.float32), "0.bias": np.ones(4, np.float32)})
    assert W.header_shapes(good) == {"0.bias": (4,), "0.weight": (4, 3)}
    assert list(W.from_bytes(good, expect=EXPECT)) == ["0.weight", "0.bias"]
    with pytest.raises(ValidationError, match=r"'2\.weight' is missing"):
        W.from_bytes(good, expect=dict(EXPECT, **{"2.weight": (1,)}))
    with pytest.raises(ValidationError, match=r"'0\.bias' is not part of the model"):
        W.from_bytes(good, expect={"0.weight": (4, 3)})


def test_header_facts() -> None:
    w = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "e": np.zeros(0, np.float32)}
    blob = W.to_bytes(w)
    h = W.read_header(blob)
    assert h.tensors["a"].shape == (2, 3) and h.tensors["a"].dtype == "F32"
    assert h.tensors["a"].end - h.tensors["a"].begin == 24
    assert h.tensors["e"].shape == (0,) and h.tensors["e"].begin == h.tensors["e"].end
    assert W.ORDER_KEY in h.metadata
    assert h.data_start == 8 + int.from_bytes(blob[:8], "little")
    # a memoryview works as well as bytes, and nothing is copied for the header read
    assert W.header_shapes(memoryview(blob)) == {"a": (2, 3), "e": (0,)}
    back = W.from_bytes(blob)
    assert np.array_equal(back["a"], w["a"]) and back["e"].shape == (0,)
