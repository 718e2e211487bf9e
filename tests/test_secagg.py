"""Secure aggregation math: exact sums under dropouts, thresholds, attribution, encoding.

The round is driven in memory by ``run_round``; which stages may fail is predicted by an
oracle written from the protocol's rules (graph, holders, thresholds), not from the code.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from protocol.errors import StateError, ValidationError
from protocol.secagg import (
    DEFAULT_BITS,
    DEFAULT_CLIP,
    DEFAULT_FRAC_BITS,
    MAX_WEIGHT,
    Client,
    InconsistentShares,
    Params,
    SecAggError,
    Server,
    add_mod,
    decode_average,
    decode_weighted,
    encode_update,
    encode_weighted,
    frac_bits_for,
    neighbours,
    pack,
    packed_size,
    params_from_spec,
    params_from_wire,
    params_to_wire,
    sub_mod,
    unpack,
)

SEED = bytes(range(32))


def names(n: int) -> list[str]:
    return [f"p{i:02d}" for i in range(n)]


@dataclass
class Drops:
    after_advertise: set[str] = field(default_factory=set)  # in U1, never send shares
    after_shares: set[str] = field(default_factory=set)  # in U2, never send a masked input
    after_masked: set[str] = field(default_factory=set)  # in U3, never answer unmasking


@dataclass
class Outcome:
    result: np.ndarray | None
    error: Exception | None
    u3: list[str]
    aborted: set[str]
    stage: str = "ok"  # the server call that refused


def run_round(
    inputs: dict[str, np.ndarray],
    p: Params,
    drops: Drops | None = None,
    tamper_relay=None,
    tamper_unmask=None,
) -> Outcome:
    """One round in memory; a client that refuses (SecAggError) drops out, as in a real node."""
    drops = drops or Drops()
    dim = len(next(iter(inputs.values())))
    server = Server(p, dim)
    clients = {u: Client(u, p) for u in inputs}
    aborted: set[str] = set()
    u3: list[str] = []
    stage = "advertise"
    try:
        for u, c in clients.items():
            server.on_advertise(u, c.advertise())
        roster = server.roster()
        for u, c in clients.items():
            if u not in drops.after_advertise:
                server.on_shares(u, c.share_keys(roster))
        stage = "relay"
        relayed = server.relay()
        if tamper_relay:
            tamper_relay(relayed)
        for u, cts in relayed.items():
            if u in drops.after_shares:
                continue
            try:
                y = clients[u].masked_input(cts, inputs[u])
            except SecAggError:
                aborted.add(u)
                continue
            server.on_masked(u, y)
        stage = "unmask_request"
        u3, dropped = server.unmask_request()
        for u in u3:
            if u in drops.after_masked:
                continue
            shares = clients[u].unmask(u3, dropped)
            if tamper_unmask:
                tamper_unmask(u, shares)
            server.on_unmask(u, shares)
        stage = "result"
        return Outcome(server.result(), None, u3, aborted)
    except SecAggError as exc:
        return Outcome(None, exc, u3, aborted, stage)


def needed(m: int, threshold: float) -> int:
    return m if m <= 1 else min(m, max(2, math.ceil(round(threshold * m, 9))))


def oracle(ids: list[str], p: Params, drops: Drops) -> tuple[str, set[str]]:
    """('ok', U3) or (the stage that must refuse, U3), from the protocol's rules alone."""
    g = {u: set(v) for u, v in neighbours(ids, p).items()}
    t = {u: needed(len(g[u]) + 1, p.threshold) for u in ids}
    u2 = set(ids) - drops.after_advertise
    if len(u2) < 2:
        return "relay", set()
    aborting = {u for u in u2 if len(g[u] & u2) + 1 < t[u]}
    u3 = u2 - drops.after_shares - aborting
    if any(len((g[v] | {v}) & u3) < t[v] for v in u2):
        return "unmask_request", u3
    u4 = u3 - drops.after_masked
    if any(len((g[v] | {v}) & u4) < t[v] for v in u2):
        return "result", u3
    return "ok", u3


def exact_sum(inputs: dict[str, np.ndarray], who, bits: int) -> np.ndarray:
    """The sum in Python integers, reduced once at the end."""
    total = [0] * len(next(iter(inputs.values())))
    for u in who:
        total = [a + int(b) for a, b in zip(total, inputs[u], strict=True)]
    return np.array([v % (1 << bits) for v in total], dtype=np.uint64)


# ---------------------------------------------------------------------------------------------
# the property: exact sums of the survivors under any dropouts


@st.composite
def scenarios(draw):
    n = draw(st.integers(2, 8))
    ids = names(n)
    bits = draw(st.sampled_from([32, 62]))
    k = draw(st.sampled_from([0, 2, 4]))
    thr = draw(st.sampled_from([0.5, 0.6, 1.0]))
    p = Params(bits=bits, neighbours=k, graph_seed=draw(st.binary(min_size=32, max_size=32)),
               threshold=thr, round_tag=b"s1/r7")  # fmt: skip
    d = draw(st.integers(1, 50))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    inputs = {u: rng.integers(0, 1 << bits, size=d, dtype=np.uint64) for u in ids}
    subset = st.sets(st.sampled_from(ids), max_size=n // 3)
    drops = Drops(draw(subset), draw(subset), draw(subset))
    return ids, p, inputs, drops


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_sum_of_survivors_is_exact_under_dropouts(case):
    ids, p, inputs, drops = case
    expected_stage, expected_u3 = oracle(ids, p, drops)
    event(f"expected: {expected_stage}")
    out = run_round(inputs, p, drops)
    event(f"a client refused to mask: {bool(out.aborted)}")
    if expected_stage == "ok":
        assert out.error is None, out.error
        assert set(out.u3) == expected_u3
        np.testing.assert_array_equal(out.result, exact_sum(inputs, out.u3, p.bits))
    else:
        assert isinstance(out.error, SecAggError), expected_stage
        assert not isinstance(out.error, InconsistentShares)
        assert out.stage == expected_stage
        assert out.result is None


@pytest.mark.parametrize("k", [0, 4])
def test_dropouts_at_every_stage_still_sum_the_survivors(k):
    ids = names(10)
    p = Params(neighbours=k, graph_seed=SEED, threshold=0.5, round_tag=b"t")
    rng = np.random.default_rng(1)
    inputs = {u: rng.integers(0, 1 << p.bits, size=30, dtype=np.uint64) for u in ids}
    drops = Drops({"p03"}, {"p05"}, {"p07"})
    assert oracle(ids, p, drops)[0] == "ok"
    out = run_round(inputs, p, drops)
    assert out.error is None
    assert set(out.u3) == set(ids) - {"p03", "p05"}
    np.testing.assert_array_equal(out.result, exact_sum(inputs, out.u3, p.bits))


# ---------------------------------------------------------------------------------------------
# thresholds and misbehaviour


def test_too_few_survivors_at_unmasking_aborts_without_result():
    ids = names(5)
    p = Params(threshold=0.6, round_tag=b"t")  # 5 holders each: 3 needed
    inputs = {u: np.arange(4, dtype=np.uint64) for u in ids}
    out = run_round(inputs, p, Drops(after_shares={"p00", "p01", "p02"}))
    assert isinstance(out.error, SecAggError)
    assert out.error.code == "SECAGG_ABORT"
    assert out.result is None
    assert out.stage == "unmask_request"
    assert "unmask" in out.error.message


def test_too_few_answers_to_unmasking_aborts_without_result():
    ids = names(5)
    p = Params(threshold=0.6, round_tag=b"t")
    inputs = {u: np.arange(4, dtype=np.uint64) for u in ids}
    out = run_round(inputs, p, Drops(after_masked={"p00", "p01", "p02"}))
    assert type(out.error) is SecAggError
    assert out.stage == "result"
    assert out.result is None


def _flip(share: bytes) -> bytes:
    return share[:-1] + bytes([share[-1] ^ 0x5A])


@pytest.mark.parametrize("kind", ["b", "s"])
def test_a_corrupted_unmasking_share_names_its_sender(kind):
    ids = names(7)
    p = Params(threshold=0.5, round_tag=b"t")  # 7 holders, 4 needed; 6 or 7 answer
    inputs = {u: np.arange(4, dtype=np.uint64) for u in ids}
    drops = Drops(after_shares={"p06"}) if kind == "s" else Drops()
    target = "p06" if kind == "s" else "p01"

    def tamper(u, shares):
        if u == "p03":
            shares[kind][target] = _flip(shares[kind][target])

    out = run_round(inputs, p, drops, tamper_unmask=tamper)
    assert isinstance(out.error, InconsistentShares)
    assert out.error.code == "SECAGG_INCONSISTENT"
    assert out.error.culprits == ["p03"]
    assert out.result is None


def test_two_corrupted_shares_are_both_named():
    ids = names(7)
    p = Params(threshold=0.4, round_tag=b"t")  # 7 holders, 3 needed: 2 errors correctable

    def tamper(u, shares):
        if u in ("p02", "p05"):
            shares["b"]["p00"] = _flip(shares["b"]["p00"])

    inputs = {u: np.arange(4, dtype=np.uint64) for u in ids}
    out = run_round(inputs, p, tamper_unmask=tamper)
    assert isinstance(out.error, InconsistentShares)
    assert out.error.culprits == ["p02", "p05"]


def test_a_corrupted_share_with_one_spare_is_still_attributed_for_s_sk():
    ids = names(6)
    p = Params(threshold=0.6, round_tag=b"t")  # 6 holders, 4 needed; p05 dropped: 5 answer
    inputs = {u: np.arange(4, dtype=np.uint64) for u in ids}

    def tamper(u, shares):
        if u == "p02":
            shares["s"]["p05"] = _flip(shares["s"]["p05"])

    out = run_round(inputs, p, Drops(after_shares={"p05"}), tamper_unmask=tamper)
    assert isinstance(out.error, InconsistentShares)
    assert out.error.culprits == ["p02"]


def test_a_corrupted_s_share_at_exactly_the_threshold_is_detected_not_attributed():
    ids = names(5)
    p = Params(threshold=0.6, round_tag=b"t")  # 3 needed; p04 dropped, exactly 3 answer

    def tamper(u, shares):
        if u == "p02":
            shares["s"]["p04"] = _flip(shares["s"]["p04"])

    inputs = {u: np.arange(4, dtype=np.uint64) for u in ids}
    drops = Drops(after_shares={"p04"}, after_masked={"p03"})
    out = run_round(inputs, p, drops, tamper_unmask=tamper)
    assert isinstance(out.error, InconsistentShares)
    assert out.error.culprits == []
    assert out.error.suspects == ["p00", "p01", "p02"]


def test_a_tampered_ciphertext_names_its_sender():
    ids = names(4)
    p = Params(round_tag=b"t")
    inputs = {u: np.arange(4, dtype=np.uint64) for u in ids}

    def tamper(relayed):
        ct = relayed["p00"]["p02"]
        relayed["p00"]["p02"] = ct[:-1] + bytes([ct[-1] ^ 1])

    with pytest.raises(InconsistentShares) as info:
        c = {u: Client(u, p) for u in ids}
        s = Server(p, 4)
        for u in ids:
            s.on_advertise(u, c[u].advertise())
        roster = s.roster()
        for u in ids:
            s.on_shares(u, c[u].share_keys(roster))
        relayed = s.relay()
        tamper(relayed)
        c["p00"].masked_input(relayed["p00"], inputs["p00"])
    assert info.value.culprits == ["p02"]


def test_ciphertexts_are_bound_to_the_round_tag():
    ids = names(3)
    c1 = {u: Client(u, Params(round_tag=b"round-1")) for u in ids}
    roster = {u: c.advertise() for u, c in c1.items()}
    cts = {u: c.share_keys(roster) for u, c in c1.items()}
    # the receiver believes it is in round 2: same keys, other tag
    other = c1["p00"]
    other.p = Params(round_tag=b"round-2")
    with pytest.raises(InconsistentShares):
        other.masked_input({"p01": cts["p01"]["p00"]}, np.zeros(3, dtype=np.uint64))


def test_clients_refuse_to_reveal_both_shares_of_one_participant():
    ids = names(4)
    p = Params(round_tag=b"t")
    c = {u: Client(u, p) for u in ids}
    s = Server(p, 2)
    for u in ids:
        s.on_advertise(u, c[u].advertise())
    roster = s.roster()
    for u in ids:
        s.on_shares(u, c[u].share_keys(roster))
    relayed = s.relay()
    for u in ids:
        c[u].masked_input(relayed[u], np.zeros(2, dtype=np.uint64))
    with pytest.raises(SecAggError, match="both"):
        c["p00"].unmask(["p00", "p01", "p02"], ["p01"])
    with pytest.raises(SecAggError, match="survivor"):
        c["p00"].unmask(["p01", "p02"], ["p00"])
    c["p00"].unmask(ids, [])  # refusals reveal nothing; a valid request is answered once
    with pytest.raises(StateError):
        c["p00"].unmask(["p00", "p01"], ["p02", "p03"])


def test_a_roster_that_replaces_my_keys_is_refused():
    a, b = Client("a", Params()), Client("b", Params())
    roster = {"a": b.advertise(), "b": b.advertise()}
    with pytest.raises(SecAggError, match="own keys"):
        a.share_keys(roster)


def test_server_refuses_malformed_messages():
    p = Params(round_tag=b"t")
    s = Server(p, 3)
    with pytest.raises(ValidationError):
        s.on_advertise("a", {"c_pk": b"x" * 31, "s_pk": b"x" * 32})
    with pytest.raises(ValidationError, match="low-order"):
        s.on_advertise("a", {"c_pk": bytes(32), "s_pk": bytes(32)})
    c = {u: Client(u, p) for u in "abc"}
    for u in "abc":
        s.on_advertise(u, c[u].advertise())
    roster = s.roster()
    with pytest.raises(ValidationError):
        s.on_shares("z", {})
    cts = c["a"].share_keys(roster)
    with pytest.raises(ValidationError):
        s.on_shares("a", {"b": cts["b"]})  # missing the ciphertext to c
    s.on_shares("a", cts)
    s.on_shares("b", c["b"].share_keys(roster))
    relayed = s.relay()
    y = c["a"].masked_input(relayed["a"], np.zeros(3, dtype=np.uint64))
    with pytest.raises(ValidationError):
        s.on_masked("c", y)  # c sent no shares
    with pytest.raises(ValidationError):
        s.on_masked("a", y[:2])
    with pytest.raises(ValidationError):
        s.on_masked("a", np.full(3, 1 << 63, dtype=np.uint64))


def test_too_few_advertisers_is_refused():
    s = Server(Params(), 3)
    s.on_advertise("a", Client("a", Params()).advertise())
    with pytest.raises(SecAggError, match="advertise"):
        s.roster()


def test_params_are_validated_by_field():
    for bad, field_name in [
        (Params(bits=31), "bits"),
        (Params(bits=65), "bits"),
        (Params(threshold=0.0), "threshold"),
        (Params(neighbours=3, graph_seed=SEED), "neighbours"),
        (Params(neighbours=4), "graph_seed"),
        (Params(bits=32, frac_bits=30), "frac_bits"),
        (Params(clip=float("nan")), "clip"),
        (Params(max_weight=0), "max_weight"),
        (Params(max_weight=2**30 + 1), "max_weight"),
        (Params(max_weight=True), "max_weight"),
    ]:
        with pytest.raises(ValidationError, match=field_name):
            bad.validate()
    Params().validate()


# ---------------------------------------------------------------------------------------------
# fixed point


def test_encode_decode_roundtrip_within_one_unit():
    p = Params(bits=62, frac_bits=24, clip=100.0)
    rng = np.random.default_rng(0)
    x = rng.uniform(-100, 100, size=1000)
    total = encode_weighted(x, 1, p)
    assert total.dtype == np.uint64 and total.size == 1001
    assert int(total.max()) < 1 << 62
    w, s = decode_weighted(total, p)
    assert w == 1.0
    assert np.max(np.abs(s - x)) <= 2.0**-24


def test_weighted_average_of_three_matches_numpy():
    p = Params(bits=62, frac_bits=frac_bits_for(62, 10.0, 1000, 3), clip=10.0, round_tag=b"t")
    rng = np.random.default_rng(3)
    xs = [rng.normal(0, 2, size=200) for _ in range(3)]
    weights = [17, 400, 1000]
    inputs = {
        f"p{i}": encode_weighted(x, w, p) for i, (x, w) in enumerate(zip(xs, weights, strict=True))
    }
    out = run_round(inputs, p)
    assert out.error is None
    w, s = decode_weighted(out.result, p)
    assert w == sum(weights)
    np.testing.assert_allclose(s / w, np.average(np.stack(xs), axis=0, weights=weights),
                               rtol=0, atol=2.0**-p.frac_bits)  # fmt: skip


def test_clipping_and_negative_values():
    p = Params(bits=32, frac_bits=12, clip=2.0, max_weight=2**20)
    w, s = decode_weighted(encode_weighted(np.array([-5.0, -1.5, 0.0, 1.25, 9.0]), 3, p), p)
    assert w == 3.0
    np.testing.assert_array_equal(s, [-6.0, -4.5, 0.0, 3.75, 6.0])
    with pytest.raises(ValidationError):
        encode_weighted(np.array([np.nan]), 1, p)
    with pytest.raises(SecAggError):
        encode_weighted(np.zeros(2), 1 << 20, p)  # 2**20 * 2 * 2**12 does not fit 31 bits


def test_frac_bits_for_leaves_headroom():
    f = frac_bits_for(62, 100.0, 1000, 100)
    assert 100 * 1000 * math.ceil(100 * 2.0**f) < 1 << 61
    assert 100 * 1000 * math.ceil(100 * 2.0 ** (f + 1)) >= 1 << 61
    with pytest.raises(SecAggError):
        frac_bits_for(32, 100.0, 60000, 1000)


def test_the_defaults_leave_12_fraction_bits_for_100_participants_in_5_bytes():
    assert (DEFAULT_BITS, DEFAULT_CLIP, MAX_WEIGHT) == (40, 8.0, 2**16)
    assert DEFAULT_FRAC_BITS == frac_bits_for(DEFAULT_BITS, DEFAULT_CLIP, MAX_WEIGHT, 100) >= 12
    p = Params()
    assert (p.bits, p.frac_bits, p.clip, p.max_weight) == (40, 13, 8.0, 2**16)
    assert packed_size(10, p) == 50


def _defaults_for(n: int) -> Params:
    agg = {"bits": 40, "clip": 8.0, "threshold": 0.6, "neighbours": 0, "max_weight": 2**16}
    return params_from_spec(agg, n, b"t", b"")


def test_n_max_weight_deltas_of_plus_minus_clip_sum_without_overflow_at_40_bits():
    """The worst case of the defaults: n participants of max_weight, every update at +-clip.

    The sum of n * max_weight * clip * 2**frac_bits must stay below 2**39 (two's complement
    in 40 bits): it decodes to exactly +-clip, and the weight to exactly n * max_weight.
    """
    n = 100
    p = _defaults_for(n)
    assert p.bits == 40 and p.frac_bits == DEFAULT_FRAC_BITS
    base = np.array([0.5, -0.5, 1.0, -3.0, 0.0, 7.0], dtype=np.float32)
    # +clip, -clip, beyond both (clipped), and deltas that sit exactly on the bound
    x = base + np.array([p.clip, -p.clip, 3 * p.clip, -1e6, p.clip, -p.clip])
    total = np.zeros(base.size + 1, dtype=np.uint64)
    for _ in range(n):
        enc, clipped = encode_update(x, base, p.max_weight, p)
        assert clipped == 2  # the two beyond +-clip, not the two on it
        total = add_mod(total, enc, p)
    weight, weighted = decode_weighted(total, p)
    assert weight == n * p.max_weight
    signs = np.array([1, -1, 1, -1, 1, -1], dtype=np.float64)
    np.testing.assert_array_equal(weighted, signs * p.clip * n * p.max_weight)  # no wrap-around
    _, avg = decode_average(total, base, p)
    np.testing.assert_array_equal(avg, base + signs * p.clip)
    # one more participant's headroom is gone by design: the bound is for n, not n + 1
    assert n * p.max_weight * math.ceil(p.clip * 2.0**p.frac_bits) < 1 << 39
    assert 2 * n * p.max_weight * math.ceil(p.clip * 2.0**p.frac_bits) >= 1 << 39


def test_encoded_updates_decode_to_fedavg_within_the_fixed_point_bound():
    """g + sum n (w - g) / sum n is FedAvg of the models, within 2**-(f+1), any weights."""
    rng = np.random.default_rng(7)
    n = 30
    p = _defaults_for(n)
    g = rng.normal(0, 3, size=500).astype(np.float32)
    g[:2] = [50.0, -50.0]  # the model may lie outside [-clip, clip]: only w - g is clipped
    models = [(g + rng.normal(0, 0.3, size=g.size)).astype(np.float32) for _ in range(n)]
    counts = [int(c) for c in rng.integers(1, 2**18, size=n)]  # some above max_weight: clamped
    w_used = [min(c, p.max_weight) for c in counts]
    total = np.zeros(g.size + 1, dtype=np.uint64)
    for m, c in zip(models, w_used, strict=True):
        enc, clipped = encode_update(m, g, c, p)
        assert clipped == 0
        total = add_mod(total, enc, p)
    weight, avg = decode_average(total, g, p)
    assert weight == sum(w_used)
    plain = np.average(np.stack(models).astype(np.float64), axis=0, weights=w_used)
    assert np.max(np.abs(avg - plain)) <= 2.0 ** -(p.frac_bits + 1) + 1e-12


def test_encode_update_counts_clipped_coordinates_and_checks_the_base():
    p = Params(bits=40, frac_bits=13, clip=1.0)
    base = np.zeros(4)
    enc, clipped = encode_update(np.array([0.5, 1.5, -2.0, 1.0]), base, 3, p)
    assert clipped == 2
    _, avg = decode_average(enc, base + 10, p)
    np.testing.assert_array_equal(avg, [10.5, 11.0, 9.0, 11.0])
    with pytest.raises(ValidationError, match="the round's model has 3"):
        encode_update(np.zeros(4), np.zeros(3), 1, p)
    with pytest.raises(ValidationError, match="NaN"):
        encode_update(np.zeros(2), np.array([0.0, np.inf]), 1, p)
    with pytest.raises(ValidationError, match="the round's model has 5"):
        decode_average(enc, np.zeros(5), p)
    with pytest.raises(SecAggError, match="no weight"):
        decode_average(encode_update(np.zeros(4), base, 0, p)[0], base, p)


def test_add_sub_mod():
    p = Params(bits=32)
    a = np.array([(1 << 32) - 1, 5], dtype=np.uint64)
    b = np.array([2, 7], dtype=np.uint64)
    np.testing.assert_array_equal(add_mod(a, b, p), [1, 12])
    np.testing.assert_array_equal(sub_mod(b, a, p), [3, 2])
    np.testing.assert_array_equal(sub_mod(b[::-1], b, p), [5, (1 << 32) - 5])


# ---------------------------------------------------------------------------------------------
# wire packing and the round's parameters


@pytest.mark.parametrize(("bits", "width"), [(32, 4), (40, 5), (48, 6), (62, 8), (64, 8)])
def test_pack_roundtrip_in_ceil_bits_over_8_bytes(bits: int, width: int) -> None:
    p = Params(bits=bits, frac_bits=8)
    rng = np.random.default_rng(bits)
    y = rng.integers(0, 1 << bits, size=1001, dtype=np.uint64, endpoint=False)
    y[:3] = [0, 1, (1 << bits) - 1]  # both ends of the range
    data = pack(y, p)
    assert isinstance(data, bytes) and len(data) == packed_size(1001, p) == 1001 * width
    assert data[:width] == bytes(width)  # little-endian, no padding: value 0 then value 1
    assert data[width : 2 * width] == b"\x01" + bytes(width - 1)
    back = unpack(data, 1001, p)
    assert back.dtype == np.uint64 and back.shape == (1001,)
    np.testing.assert_array_equal(back, y)
    np.testing.assert_array_equal(unpack(bytearray(data), 1001, p), y)
    np.testing.assert_array_equal(unpack(pack(y[::2], p), 501, p), y[::2])  # not contiguous
    assert unpack(pack(y[:0], p), 0, p).size == 0


def test_unpack_refuses_wrong_lengths_and_out_of_range_values() -> None:
    p = Params(bits=48, frac_bits=8)
    y = np.arange(10, dtype=np.uint64)
    data = pack(y, p)
    for bad in (data[:-1], data + b"\x00", b"", data * 2):
        with pytest.raises(ValidationError, match=r"expected 60 \(10 values of 6 bytes"):
            unpack(bad, 10, p)
    with pytest.raises(ValidationError, match="must be bytes"):
        unpack(y, 10, p)  # type: ignore[arg-type]
    p62 = Params(bits=62)
    over = np.array([1 << 62], dtype=np.uint64).astype("<u8").tobytes()  # fits 8 bytes only
    with pytest.raises(ValidationError, match=r">= 2\*\*62"):
        unpack(over, 1, p62)
    with pytest.raises(ValidationError, match=r">= 2\*\*62"):
        pack(np.array([1 << 62], dtype=np.uint64), p62)
    with pytest.raises(ValidationError, match=r">= 2\*\*48"):
        pack(np.array([5, 1 << 48], dtype=np.uint64), p)
    with pytest.raises(ValidationError, match="uint64"):
        pack(np.zeros(3, dtype=np.int64), p)  # type: ignore[arg-type]


def test_a_masked_vector_survives_the_wire_form_and_the_sum_is_exact() -> None:
    p = Params(bits=40, frac_bits=frac_bits_for(40, 1.0, 1000, 4), clip=1.0, round_tag=b"t")
    rng = np.random.default_rng(11)
    xs = {u: encode_weighted(rng.uniform(-1, 1, 300), 1000, p) for u in names(4)}
    server = Server(p, 301)
    clients = {u: Client(u, p) for u in xs}
    for u, c in clients.items():
        server.on_advertise(u, c.advertise())
    roster = server.roster()
    for u, c in clients.items():
        server.on_shares(u, c.share_keys(roster))
    for u, cts in server.relay().items():
        data = pack(clients[u].masked_input(cts, xs[u]), p)
        assert len(data) == 301 * 5 == clients[u].stats["masked_input_out"]
        server.on_masked(u, unpack(data, 301, p))
    assert server.stats["in"]["masked"] == 4 * 301 * 5
    assert all(pp["in"] >= 301 * 5 for pp in server.stats["per_participant"].values())
    u3, dropped = server.unmask_request()
    for u in u3:
        server.on_unmask(u, clients[u].unmask(u3, dropped))
    np.testing.assert_array_equal(server.result(), exact_sum(xs, u3, 40))


def test_the_weight_bound_travels_with_the_round_and_is_enforced() -> None:
    agg = {"bits": 48, "clip": 100.0, "threshold": 0.6, "neighbours": 8, "max_weight": 2**17}
    p = params_from_spec(agg, 100, b"tag", SEED)
    assert p.max_weight == 2**17 and p.frac_bits == frac_bits_for(48, 100.0, 2**17, 100)
    assert p.frac_bits >= 16  # the point of a smaller max_weight: 48 bits leave 16 for n = 100
    assert params_from_spec({**agg, "max_weight": 2**20}, 100, b"tag", SEED).frac_bits < 16
    wire = params_to_wire(p)
    assert wire["max_weight"] == 2**17 and params_from_wire(wire) == p
    no_bound = {k: v for k, v in wire.items() if k != "max_weight"}
    with pytest.raises(ValidationError, match="missing or has malformed"):
        params_from_wire(no_bound)
    for bad in (0, 2**31, "131072", 1.5, True):
        with pytest.raises(ValidationError, match="max_weight"):
            params_from_wire({**wire, "max_weight": bad})
    encode_weighted(np.zeros(3), 2**17, p)
    with pytest.raises(ValidationError, match="max_weight 131072"):
        encode_weighted(np.zeros(3), 2**17 + 1, p)


# ---------------------------------------------------------------------------------------------
# masks and graph


def test_one_masked_vector_looks_uniform():
    ids = names(3)
    p = Params(bits=62, round_tag=b"t")
    c = {u: Client(u, p) for u in ids}
    roster = {u: x.advertise() for u, x in c.items()}
    cts = {u: x.share_keys(roster) for u, x in c.items()}
    zeros = np.zeros(20000, dtype=np.uint64)
    y = c["p00"].masked_input({u: cts[u]["p00"] for u in ("p01", "p02")}, zeros)
    assert int(y.max()) < 1 << 62
    assert np.mean(y != 0) > 0.999
    counts = np.bincount((y >> np.uint64(58)).astype(np.int64), minlength=16)
    assert counts.size == 16
    assert chisquare(counts).pvalue > 0.001
    low = np.bincount((y & np.uint64(15)).astype(np.int64), minlength=16)
    assert chisquare(low).pvalue > 0.001


def test_k_regular_graph():
    ids = names(20)
    p = Params(neighbours=6, graph_seed=SEED)
    g = neighbours(ids, p)
    assert sorted(g) == ids
    for u, vs in g.items():
        assert len(vs) == 6 and u not in vs and len(set(vs)) == 6
        for v in vs:
            assert u in g[v]
    assert neighbours(list(reversed(ids)), p) == g
    other = neighbours(ids, Params(neighbours=6, graph_seed=bytes(32)))
    assert other != g
    assert all(len(vs) == 6 for vs in other.values())


def test_graph_is_complete_when_k_is_0_or_large():
    ids = names(5)
    for p in (
        Params(),
        Params(neighbours=4, graph_seed=SEED),
        Params(neighbours=8, graph_seed=SEED),
    ):
        g = neighbours(ids, p)
        assert all(sorted([*g[u], u]) == ids for u in ids)


# ---------------------------------------------------------------------------------------------
# speed (not asserted)


def test_performance_smoke_d_1e5_n_10():
    ids = names(10)
    p = Params(round_tag=b"perf")
    rng = np.random.default_rng(5)
    inputs = {u: rng.integers(0, 1 << p.bits, size=10**5, dtype=np.uint64) for u in ids}
    start = time.perf_counter()
    out = run_round(inputs, p, Drops(after_shares={"p09"}))
    elapsed = time.perf_counter() - start
    assert out.error is None
    expected = np.zeros(10**5, dtype=np.uint64)
    for u in out.u3:
        expected += inputs[u]
    np.testing.assert_array_equal(out.result, expected & p.modulus_mask)
    print(f"d=1e5 n=10 complete graph, one dropout: {elapsed:.2f} s")


def test_rng_is_injectable_and_deterministic():
    def make(seed: int):
        r = np.random.default_rng(seed)
        return lambda n: r.bytes(n)

    a1, a2 = Client("a", Params(), rng=make(1)), Client("a", Params(), rng=make(1))
    assert a1.advertise() == a2.advertise()
    assert Client("a", Params()).advertise() != Client("a", Params(), rng=os.urandom).advertise()
