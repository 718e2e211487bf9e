"""The update codecs (fednode.codecs): round trips, the index encoding, error feedback by
hand, and hostile payloads, each refused with BAD_UPDATE and a message naming the codec."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fednode.codecs import BAD_UPDATE, CodecParams, get_codec, round_seed, sparse
from fednode.codecs.feedback import ErrorFeedback
from fednode.codecs.halfprec import from_bf16, to_bf16
from fednode.codecs.quantize import segment_lengths
from fednode.codecs.randk import coordinates
from fednode.codecs.wire import HEADER_BYTES, keep_count
from protocol import plugins
from protocol.errors import ValidationError

SEED = round_seed("session", 3, "bafymodel")


def model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(0, 0.1, (6, 5)).astype(np.float32),
        "b": rng.normal(0.5, 0.01, 5).astype(np.float32),  # off-centre: affine's case
        "empty": np.zeros((0, 3), np.float32),
    }


def shapes(x: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in x.items()}


def flat(x: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([v.ravel() for v in x.values()])


def refused(codec: str, data: bytes, expect: dict, p: CodecParams, words: str) -> str:
    with pytest.raises(ValidationError) as e:
        get_codec(codec).decode(data, expect, p)
    assert e.value.code == BAD_UPDATE
    assert e.value.message.startswith(f"{codec}: "), e.value.message
    assert words in e.value.message, e.value.message
    return e.value.message


def test_every_protocol_codec_is_registered() -> None:
    for name in plugins.CODECS:
        codec = get_codec(name)
        assert codec.name == name
        assert codec.secure == plugins.CODECS.get(name).secure
        assert codec.on_delta == codec.lossy == (name != plugins.IDENTITY_CODEC)


# --- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(plugins.CODECS))
def test_decode_gives_float32_of_the_expected_shapes(name: str) -> None:
    x = model()
    p = CodecParams(fraction=0.2, bits=4, seed=SEED)
    y = get_codec(name).decode(get_codec(name).encode(x, p, np.random.default_rng(1)), shapes(x), p)
    assert list(y) == list(x)
    for k in x:
        assert y[k].dtype == np.float32 and y[k].shape == x[k].shape


def test_identity_is_exact() -> None:
    x = model()
    y = get_codec("identity").decode(
        get_codec("identity").encode(x, CodecParams()), shapes(x), CodecParams()
    )
    assert all(np.array_equal(x[k], y[k]) for k in x)


def test_fp16_and_bf16_within_their_precision() -> None:
    x = model()
    p = CodecParams()
    for name, rel in (("fp16", 2**-11), ("bf16", 2**-8)):
        data = get_codec(name).encode(x, p)
        assert len(data) == HEADER_BYTES + 2 * 35
        y = get_codec(name).decode(data, shapes(x), p)
        for k in x:
            assert np.all(np.abs(y[k] - x[k]) <= rel * np.abs(x[k]) + 1e-7), name


def test_fp16_clips_to_its_range_instead_of_sending_inf() -> None:
    x = {"w": np.array([1e6, -1e6, 1.0], np.float32)}
    y = get_codec("fp16").decode(
        get_codec("fp16").encode(x, CodecParams()), shapes(x), CodecParams()
    )
    assert y["w"].tolist() == [65504.0, -65504.0, 1.0]


def test_bf16_rounds_to_nearest_even() -> None:
    one = 1.0
    x = np.array(
        [one + 2**-8, one + 3 * 2**-8, one + 2**-8 + 2**-20, -(one + 3 * 2**-8)], np.float32
    )
    # halfway to 1 + 2^-7 goes to the even 1.0; halfway past 1 + 2^-7 to the even 1 + 2^-6;
    # just above halfway goes up
    assert from_bf16(to_bf16(x)).tolist() == [1.0, 1 + 2**-6, 1 + 2**-7, -(1 + 2**-6)]


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("chunk", [0, 7])
def test_quantize_is_within_one_step(bits: int, chunk: int) -> None:
    x = model()
    p = CodecParams(bits=bits, chunk=chunk)
    data = get_codec("quantize").encode(x, p, np.random.default_rng(0))
    d = 35
    scales = 3 if chunk == 0 else math.ceil(d / chunk)
    assert len(data) == HEADER_BYTES + 1 + 4 + 8 * scales + math.ceil(d * bits / 8)
    y = get_codec("quantize").decode(data, shapes(x), p)
    xv, yv = flat(x), flat(y)
    for seg_start, n in zip(
        np.cumsum([0, *segment_lengths([30, 5, 0], d, chunk)])[:-1],
        segment_lengths([30, 5, 0], d, chunk),
        strict=True,
    ):
        seg = xv[seg_start : seg_start + n]
        if n:
            step = (seg.max() - seg.min()) / ((1 << bits) - 1)
            assert np.all(np.abs(yv[seg_start : seg_start + n] - seg) <= step * (1 + 1e-5) + 1e-7)


def test_quantize_is_unbiased_and_rounding_to_nearest_would_not_be() -> None:
    # one segment from 0 to 1 at 2 bits: levels 0, 1/3, 2/3, 1; 0.3 sits between 0 and 1/3
    # (nearest rounding would always give 1/3, 0.033 too high)
    values = np.full(100_002, 0.3, np.float32)
    values[0], values[1] = 0.0, 1.0
    x = {"w": values}
    p = CodecParams(bits=2)
    y = get_codec("quantize").decode(
        get_codec("quantize").encode(x, p, np.random.default_rng(7)), shapes(x), p
    )
    got = y["w"][2:]
    assert set(np.round(got * 3).tolist()) == {0.0, 1.0}  # each 0 or 1/3
    assert abs(float(got.mean()) - 0.3) < 0.002  # 4 sigma of the 100,000-draw mean


def test_topk_keeps_exactly_the_k_largest_magnitudes() -> None:
    x = model(3)
    p = CodecParams(fraction=0.2)
    k = keep_count(35, 0.2)
    assert k == 7
    y = flat(get_codec("topk").decode(get_codec("topk").encode(x, p), shapes(x), p))
    xv = flat(x)
    largest = set(np.argsort(-np.abs(xv))[:k].tolist())
    assert set(np.flatnonzero(y).tolist()) == largest
    assert np.array_equal(y[list(largest)], xv[list(largest)])  # the values are exact


def test_topk_quantize_keeps_the_top_k_within_a_step() -> None:
    x = model(3)
    p = CodecParams(fraction=0.2, bits=8, chunk=0)
    data = get_codec("topk_quantize").encode(x, p, np.random.default_rng(0))
    y = flat(get_codec("topk_quantize").decode(data, shapes(x), p))
    xv = flat(x)
    top = np.sort(np.argsort(-np.abs(xv))[:7])
    assert set(np.flatnonzero(y).tolist()) <= set(top.tolist())
    spread = float(xv[top].max() - xv[top].min())
    assert np.all(np.abs(y[top] - xv[top]) <= spread / 255 * 1.0001)


def test_keep_count_is_robust_to_binary_fractions() -> None:
    assert 0.07 * 100 > 7  # 7.000000000000001
    assert keep_count(100, 0.07) == 7
    assert keep_count(10, 1e-6) == 1 and keep_count(10, 1.0) == 10 and keep_count(0, 0.5) == 0


def test_randk_coordinates_are_the_rounds() -> None:
    a = coordinates(1000, 0.05, SEED)
    assert np.array_equal(a, coordinates(1000, 0.05, SEED))
    assert not np.array_equal(a, coordinates(1000, 0.05, round_seed("session", 4, "bafymodel")))
    assert len(a) == 50 and a.dtype == np.int64
    assert np.all(np.diff(a) > 0) and a[0] >= 0 and a[-1] < 1000
    # pinned: a numpy whose PCG64 or SeedSequence drew otherwise would split a round's
    # participants onto different coordinates
    assert coordinates(20, 0.25, b"fixed").tolist() == [1, 3, 4, 17, 19]
    assert coordinates(5, 1.0, b"fixed").tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="seed"):
        coordinates(10, 0.5, b"")


def test_randk_decode_places_the_values_at_the_coordinates() -> None:
    x = model(5)
    p = CodecParams(fraction=0.2, seed=SEED)
    data = get_codec("randk").encode(x, p)
    assert len(data) == HEADER_BYTES + 4 + 4 * 7
    y = flat(get_codec("randk").decode(data, shapes(x), p))
    at = coordinates(35, 0.2, SEED)
    xv = flat(x)
    assert np.array_equal(y[at], xv[at])
    assert not np.delete(y, at).any()


# --- the index encoding -------------------------------------------------------------------


def test_index_encoding_picks_the_smaller_form() -> None:
    d = 10_000
    few = np.array([0, 5, 300, 9_999])
    data = sparse.encode(few, d)
    assert data[0] == sparse.VARINT and len(data) == 1 + 4 + (1 + 1 + 2 + 2)
    many = np.arange(0, d, 2)
    data = sparse.encode(many, d)
    assert data[0] == sparse.BITMAP and len(data) == 1 + d // 8
    for idx in (few, many, np.array([], np.int64)):
        assert np.array_equal(sparse.decode("topk", sparse.encode(idx, d), d, len(idx)), idx)


def test_varints_by_hand() -> None:
    # 300 = 0b10_0101100: low group 0x2c with the continuation bit, then 0x02
    assert sparse.encode_varints(np.array([0, 127, 128, 300])) == bytes(
        [0x00, 0x7F, 0x80, 0x01, 0xAC, 0x02]
    )


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3000).flatmap(lambda d: st.tuples(st.just(d), st.sets(st.integers(0, d - 1))))
)
def test_index_encoding_round_trips(case: tuple[int, set[int]]) -> None:
    d, chosen = case
    idx = np.array(sorted(chosen), np.int64)
    data = sparse.encode(idx, d)
    varint_len = 1 + 4 + int(sparse.varint_bytes(np.diff(idx, prepend=0)).sum())
    assert len(data) == min(varint_len, 1 + -(-d // 8))
    assert np.array_equal(sparse.decode("topk", data, d, len(idx)), idx)


def test_the_encoder_refuses_indices_it_could_not_encode() -> None:
    with pytest.raises(ValueError, match="increasing"):
        sparse.encode(np.array([5, 3]), 10)
    with pytest.raises(ValueError, match="within"):
        sparse.encode(np.array([10]), 10)


def varint_block(raw: bytes) -> bytes:
    return bytes([sparse.VARINT]) + len(raw).to_bytes(4, "little") + raw


@pytest.mark.parametrize(
    ("block", "k", "words"),
    [
        (varint_block(bytes([10])), 1, "delta 0 (10) is not below 10"),  # index 10 of 10
        (varint_block(bytes([4, 6])), 2, "index 10 out of range"),  # 4, then 4 + 6
        (varint_block(bytes([3, 0])), 2, "repeats"),  # a duplicate: delta 0
        (varint_block(bytes([1, 2])), 3, "holds 2 varints, expected 3"),
        (varint_block(bytes([1, 0x82])), 2, "holds 2 varints, expected 2"),  # unterminated
        (varint_block(bytes([1])) + b"\x00", 1, "1 trailing bytes"),
        (bytes([sparse.VARINT]) + (2**32 - 1).to_bytes(4, "little"), 1, "of at most 1"),
        (bytes([sparse.VARINT]) + (3).to_bytes(4, "little") + b"\x01", 3, "truncated"),
        (bytes([sparse.BITMAP, 0b1000_0001]), 2, "truncated"),  # d = 10 needs 2 bytes
        (bytes([sparse.BITMAP, 0b1000_0001, 0b0000_0100]), 3, "past the model's 10 values"),
        (bytes([sparse.BITMAP, 0b1000_0001, 0b0000_0001]), 2, "sets 3 indices, expected 2"),
        (bytes([sparse.BITMAP, 1, 0, 0]), 1, "1 trailing bytes"),
        (bytes([2, 0, 0]), 1, "unknown index form 2"),
        (varint_block(bytes([1])), 11, "11 indices for a model of 10"),
    ],
)
def test_hostile_index_blocks_are_refused(block: bytes, k: int, words: str) -> None:
    with pytest.raises(ValidationError) as e:
        sparse.decode("topk", block, 10, k)
    assert e.value.code == BAD_UPDATE and e.value.message.startswith("topk: ")
    assert words in e.value.message, e.value.message


def test_varints_of_the_wrong_length_are_refused() -> None:
    # d = 1000: an index takes at most 2 bytes (10 bits)
    for block, k, words in (
        (varint_block(bytes([0x83, 0x00])), 1, "varint 0 is longer than its value needs"),
        (varint_block(bytes([0x80, 0x80, 0x01, 5])), 2, "an index of this model needs at most 2"),
        (varint_block(bytes([1, 2, 3])), 1, "an index block of 3 bytes for 1 indices"),
    ):
        with pytest.raises(ValidationError, match=words) as e:
            sparse.decode("topk", block, 1000, k)
        assert e.value.code == BAD_UPDATE


# --- error feedback, by hand ----------------------------------------------------------------


def test_error_feedback_over_three_rounds_with_topk() -> None:
    expect = {"w": (4,)}
    p = CodecParams(fraction=0.25)  # k = 1 of 4
    ef = ErrorFeedback()
    rounds = [
        # delta,                    sent,                       residual after
        ([1.0, 0.5, -0.25, 0.125], [1.0, 0.0, 0.0, 0.0], [0.0, 0.5, -0.25, 0.125]),
        ([0.25, 0.25, 0.5, 0.0], [0.0, 0.75, 0.0, 0.0], [0.25, 0.0, 0.25, 0.125]),
        ([0.0, 0.5, -1.0, 0.25], [0.0, 0.0, -0.75, 0.0], [0.25, 0.5, 0.0, 0.375]),
    ]
    for delta, want_sent, want_residual in rounds:
        data, sent = ef.step({"w": np.array(delta, np.float32)}, get_codec("topk"), p, expect)
        assert get_codec("topk").decode(data, expect, p)["w"].tolist() == want_sent
        assert sent["w"].tolist() == want_sent
        assert ef.residual is not None and ef.residual["w"].tolist() == want_residual


def test_error_feedback_restore_keeps_a_fitting_residual_and_drops_another() -> None:
    expect = {"w": (4,), "b": (2,)}
    good = {"w": np.ones(4, np.float32), "b": np.zeros(2, np.float32)}
    ef, why = ErrorFeedback.restored(good, expect)
    assert why is None and ef.residual is not None and ef.residual["w"].tolist() == [1.0] * 4
    for bad, words in (
        ({"w": np.ones(5, np.float32), "b": np.zeros(2, np.float32)}, "shape (5,)"),
        ({"w": np.ones(4, np.float32)}, "are not the model's"),
        ({"b": np.zeros(2, np.float32), "w": np.ones(4, np.float32)}, "are not the model's"),
        ({"w": np.full(4, np.nan, np.float32), "b": np.zeros(2, np.float32)}, "NaN"),
    ):
        ef, why = ErrorFeedback.restored(bad, expect)
        assert ef.residual is None and why is not None and words in why, why
    assert ErrorFeedback.restored(None, expect)[1] is None


# --- hostile payloads -----------------------------------------------------------------------

X = {
    "w": np.array([[0.5, -2.0, 0.25], [1.0, 0.0, -0.125]], np.float32),
    "b": np.array([3.0, 0.1], np.float32),
}
EXPECT = shapes(X)  # d = 8


def encoded(name: str, p: CodecParams) -> bytearray:
    return bytearray(get_codec(name).encode(X, p, np.random.default_rng(0)))


def f32(v: float) -> bytes:
    return struct.pack("<f", v)


def test_any_codec_refuses_another_codecs_payload_and_another_layout() -> None:
    p = CodecParams(fraction=0.25, seed=SEED)
    refused("topk", bytes(encoded("fp16", p)), EXPECT, p, "the payload is a fp16 update")
    refused("topk", b"\x63" + bytes(encoded("topk", p))[1:], EXPECT, p, "unknown codec id 99")
    refused("topk", bytes(encoded("topk", p)), {"b": (2,), "w": (2, 3)}, p, "another model layout")
    refused("quantize", b"", EXPECT, p, "truncated")


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_half_precision_refuses_wrong_lengths_and_non_finite_values(name: str) -> None:
    p = CodecParams()
    data = encoded(name, p)
    refused(name, bytes(data[:-1]), EXPECT, p, "expected 16")
    refused(name, bytes(data) + b"\x00\x00", EXPECT, p, "expected 16")
    nan = b"\x00\x7e" if name == "fp16" else b"\xc0\x7f"
    inf = b"\x00\x7c" if name == "fp16" else b"\x80\x7f"
    for bad in (nan, inf):
        data[HEADER_BYTES + 2 : HEADER_BYTES + 4] = bad
        refused(name, bytes(data), EXPECT, p, "value 1 is")


def test_quantize_refuses_bad_tags_counts_scales_and_lengths() -> None:
    p = CodecParams(bits=4, chunk=3)  # 8 values: 3 scales; 4 packed bytes
    data = encoded("quantize", p)
    at = HEADER_BYTES
    lo_at, step_at = at + 5, at + 5 + 12
    assert len(data) == step_at + 12 + 4

    def patched(offset: int, new: bytes) -> bytes:
        out = bytearray(data)
        out[offset : offset + len(new)] = new
        return bytes(out)

    refused("quantize", patched(at, b"\x08"), EXPECT, p, "in 8 bits, the round uses 4")
    refused("quantize", patched(at, b"\x03"), EXPECT, p, "in 3 bits")
    refused("quantize", patched(at + 1, struct.pack("<I", 4)), EXPECT, p, "4 scales, expected 3")
    refused("quantize", patched(at + 1, struct.pack("<I", 2**32 - 1)), EXPECT, p, "expected 3")
    refused("quantize", patched(step_at + 4, f32(math.nan)), EXPECT, p, "scale 1 is NaN")
    refused("quantize", patched(step_at + 8, f32(math.inf)), EXPECT, p, "scale 2 is inf")
    refused("quantize", patched(step_at, f32(-0.5)), EXPECT, p, "scale 0 is -0.5")
    refused("quantize", patched(lo_at, f32(math.nan)), EXPECT, p, "minimum 0 is nan")
    refused("quantize", patched(step_at, f32(3e38)), EXPECT, p, "a scale too large")
    refused("quantize", bytes(data[:-1]), EXPECT, p, "truncated")
    refused("quantize", bytes(data) + b"\x00", EXPECT, p, "1 trailing bytes")
    # the round's chunk decides the count: the same payload under chunk 0 has 3 scales of
    # 2 tensors
    refused("quantize", bytes(data), EXPECT, CodecParams(bits=4, chunk=0), "expected 2")


def test_quantize_refuses_padding_bits() -> None:
    x = {"w": np.array([0.0, 1.0, 0.5], np.float32)}  # 3 values at 2 bits: 1 byte, 2 spare
    p = CodecParams(bits=2)
    data = bytearray(get_codec("quantize").encode(x, p, np.random.default_rng(0)))
    data[-1] |= 0b1100_0000
    refused("quantize", bytes(data), shapes(x), p, "padding bits")


@pytest.mark.parametrize("name", ["topk", "topk_quantize"])
def test_topk_refuses_bad_counts_indices_and_lengths(name: str) -> None:
    p = CodecParams(fraction=0.25, bits=8)  # k = 2 of 8
    data = encoded(name, p)
    k_at = HEADER_BYTES
    assert struct.unpack("<I", data[k_at : k_at + 4])[0] == 2
    block_at = k_at + 4
    assert data[block_at] == sparse.BITMAP  # 2 indices of 8: the bitmap's 2 bytes < 7
    body = bytes(data[block_at + 2 :])

    def with_block(k: int, block: bytes) -> bytes:
        return bytes(data[:k_at]) + struct.pack("<I", k) + block + body

    refused(name, with_block(9, varint_block(bytes([1, 2]))), EXPECT, p, "larger than the model")
    refused(name, with_block(2**32 - 1, b""), EXPECT, p, "larger than the model")
    refused(name, with_block(3, varint_block(bytes([1, 2, 3]))), EXPECT, p, "fraction 0.25 keeps 2")
    refused(name, with_block(2, varint_block(bytes([1, 7]))), EXPECT, p, "index 8 out of range")
    refused(name, with_block(2, varint_block(bytes([1, 0]))), EXPECT, p, "repeats")
    refused(name, with_block(2, varint_block(bytes([5]))), EXPECT, p, "expected 2")
    refused(name, bytes(data[:-1]), EXPECT, p, "truncated")
    refused(name, bytes(data) + b"\x00", EXPECT, p, "trailing bytes")


def test_topk_refuses_non_finite_values() -> None:
    p = CodecParams(fraction=0.25)
    data = encoded("topk", p)
    data[-4:] = f32(math.nan)
    refused("topk", bytes(data), EXPECT, p, "value 1 is nan")
    data[-8:-4] = f32(-math.inf)
    refused("topk", bytes(data), EXPECT, p, "value 0 is -inf")


def test_topk_quantize_refuses_a_bad_scale_and_bits_tag() -> None:
    p = CodecParams(fraction=0.25, bits=8)
    data = encoded("topk_quantize", p)
    q_at = HEADER_BYTES + 4 + 2  # k, the index bitmap
    assert data[q_at] == 8
    bad = bytearray(data)
    bad[q_at] = 2
    refused("topk_quantize", bytes(bad), EXPECT, p, "in 2 bits, the round uses 8")
    bad = bytearray(data)
    scales = struct.unpack("<I", data[q_at + 1 : q_at + 5])[0]
    assert scales == 2  # chunk 0: the kept values of each of the 2 tensors
    step_at = q_at + 5 + 4 * scales
    bad[step_at : step_at + 4] = f32(math.nan)
    refused("topk_quantize", bytes(bad), EXPECT, p, "scale 0 is NaN")


def test_randk_refuses_wrong_lengths_seeds_and_values() -> None:
    p = CodecParams(fraction=0.25, seed=SEED)
    data = encoded("randk", p)
    assert len(data) == HEADER_BYTES + 4 + 8
    refused("randk", bytes(data[:-1]), EXPECT, p, "expected 8")
    refused("randk", bytes(data) + b"\x00" * 4, EXPECT, p, "expected 8")
    other = CodecParams(fraction=0.25, seed=round_seed("session", 4, "bafymodel"))
    refused("randk", bytes(data), EXPECT, other, "another round's coordinates")
    refused("randk", bytes(data), EXPECT, CodecParams(fraction=0.5, seed=SEED), "expected 16")
    data[-4:] = f32(math.nan)
    refused("randk", bytes(data), EXPECT, p, "value 1 is nan")


def test_the_encoder_refuses_non_finite_input() -> None:
    for name in ("fp16", "quantize", "topk", "randk"):
        with pytest.raises(ValidationError, match="tensor 'w'"):
            get_codec(name).encode({"w": np.array([np.nan], np.float32)}, CodecParams(seed=SEED))
