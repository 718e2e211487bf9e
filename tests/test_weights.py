from __future__ import annotations

import numpy as np
import pytest

from fednode import weights as W
from fednode.training import init_weights
from protocol.errors import ValidationError

SPEC = {"kind": "mlp", "inputs": 64, "hidden": [16, 8], "classes": 10}


def sample() -> dict[str, np.ndarray]:
    return init_weights(SPEC, 0)


def test_roundtrip_keeps_values_and_order():
    w = sample()
    back = W.from_bytes(W.to_bytes(w))
    assert list(back) == list(w)
    for k in w:
        assert back[k].dtype == np.float32 and np.array_equal(back[k], w[k])
    # order is kept even where it is not the sorted one
    odd = {
        "z": np.ones(2, np.float32),
        "a": np.zeros(3, np.float32),
        "10.w": np.ones(1, np.float32),
    }
    assert list(W.from_bytes(W.to_bytes(odd))) == ["z", "a", "10.w"]
    assert list(W.from_bytes(W.to_bytes(odd), expect={"a": (3,), "10.w": (1,), "z": (2,)})) == [
        "a",
        "10.w",
        "z",
    ]


def test_bytes_are_deterministic():
    a = W.to_bytes(sample())
    b = W.to_bytes(sample())
    assert a == b
    copy = {k: v.copy() for k, v in sample().items()}
    assert W.to_bytes(copy) == a
    # a non-contiguous view with equal values gives the same bytes
    w = sample()
    w["0.weight"] = np.asfortranarray(w["0.weight"])
    assert W.to_bytes(w) == a
    changed = sample()
    changed["0.bias"][0] += 1
    assert W.to_bytes(changed) != a


@pytest.mark.parametrize(
    "junk", [b"", b"hello", b"\x00" * 16, b"\xff" * 8 + b"{}", b"\x02" + b"\x00" * 7 + b"{["]
)
def test_garbage_is_rejected(junk):
    with pytest.raises(ValidationError, match="not safetensors"):
        W.from_bytes(junk)


def test_truncated_is_rejected():
    b = W.to_bytes(sample())
    with pytest.raises(ValidationError, match="not safetensors"):
        W.from_bytes(b[:-10])


def test_expect_checks_shapes_dtype_finite_and_names():
    w = sample()
    expect = W.shapes(w)
    assert set(W.from_bytes(W.to_bytes(w), expect=expect)) == set(w)

    wrong = dict(w, **{"2.bias": np.zeros(9, np.float32)})
    with pytest.raises(ValidationError, match=r"'2\.bias'"):
        W.from_bytes(W.to_bytes(wrong), expect=expect)

    nan = {k: v.copy() for k, v in w.items()}
    nan["4.weight"][0, 0] = np.nan
    with pytest.raises(ValidationError, match=r"'4\.weight'"):
        W.from_bytes(W.to_bytes(nan), expect=expect)
    inf = {k: v.copy() for k, v in w.items()}
    inf["0.bias"][3] = np.inf
    with pytest.raises(ValidationError, match="non-finite"):
        W.from_bytes(W.to_bytes(inf), expect=expect)

    f64 = dict(w, **{"0.bias": w["0.bias"].astype(np.float64)})
    with pytest.raises(ValidationError, match=r"'0\.bias'"):
        W.from_bytes(W.to_bytes(f64), expect=expect)

    missing = {k: v for k, v in w.items() if k != "2.weight"}
    with pytest.raises(ValidationError, match=r"'2\.weight'"):
        W.from_bytes(W.to_bytes(missing), expect=expect)
    extra = dict(w, bonus=np.zeros(1, np.float32))
    with pytest.raises(ValidationError, match="bonus"):
        W.from_bytes(W.to_bytes(extra), expect=expect)


def test_sizes():
    w = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    assert W.shapes(w) == {"a": (2, 3), "b": (4,)}
    assert W.num_params(w) == 10
    assert W.nbytes(w) == 40
    assert W.num_params(sample()) == 64 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10


def test_flatten_roundtrip_keeps_order_and_values() -> None:
    import numpy as np

    from fednode.weights import flatten, unflatten

    w = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([7.5], np.float32)}
    shapes = {"b": (2, 3), "a": (1,)}
    vec = flatten(w, shapes)
    assert vec.tolist() == [0, 1, 2, 3, 4, 5, 7.5]
    back = unflatten(vec, shapes)
    assert list(back) == ["b", "a"] and (back["b"] == w["b"]).all()
