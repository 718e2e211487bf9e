"""A plain round's updates as rows read in column blocks (fednode.round_updates): the same
figures from memory and from the unlinked spill file, the same aggregate as the strategies'
whole-model path, and a memory peak of a block, not of every update at once."""

from __future__ import annotations

import math
import os
import stat
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fednode import bounds, central_dp, robustness, round_updates, rounds
from fednode.round_updates import RoundUpdates
from fednode.strategies import get_strategy
from fednode.strategies.base import ClientUpdate

SHAPES = {"w": (7, 30), "b": (7,), "v": (150,)}
D = 7 * 30 + 7 + 150
AGG = {"weighting": "examples", "max_examples": 0, "max_weight_share": 0.3, "max_update_norm": 6}


def _model(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def _round(n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    rng = np.random.default_rng(seed)
    base = _model(rng)
    ups = {f"p{i:03d}": {k: base[k] + _model(rng, 0.3)[k] for k in base} for i in range(n)}
    ups["p000"] = {k: base[k] - 8 * (ups["p000"][k] - base[k]) for k in base}  # flipped, big
    ups["p001"] = dict(base)  # a free rider
    return base, ups


@pytest.fixture(params=["ram", "disk"])
def where(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    # small blocks, so that a model of 367 values is read in several
    monkeypatch.setattr(round_updates, "MIN_WIDTH", 50)
    monkeypatch.setattr(round_updates, "BLOCK_BYTES", 50 * 8 * 12)
    return str(request.param)


def _rows(base: dict, ups: dict, where: str, tmp_path: Path) -> RoundUpdates:
    rows = RoundUpdates(
        base, len(ups) + 2, ram_bytes=0 if where == "disk" else 2**30, spill_dir=tmp_path / "r"
    )
    for p in sorted(ups, reverse=True):  # arrival order is not the peers' order
        rows.add(p, ups[p])
    assert rows.on_disk == (where == "disk")
    return rows


def test_rows_give_back_each_update_and_its_norm(where: str, tmp_path: Path) -> None:
    base, ups = _round(12)
    rows = _rows(base, ups, where, tmp_path)
    assert rows.blocks_n > 1
    for p, w in ups.items():
        got = rows.weights_of(p)
        assert all(np.array_equal(got[k], w[k]) for k in base)
        delta = np.concatenate([(w[k] - base[k]).astype(np.float64).ravel() for k in base])
        assert rows.norm(p) == pytest.approx(float(np.linalg.norm(delta)), rel=1e-12)
    blocks = list(rows.blocks(["p005", "p002"]))
    assert [a for a, _ in blocks] == list(range(0, D, rows.width))
    whole = np.concatenate([b for _, b in blocks], axis=1)
    for i, p in enumerate(["p005", "p002"]):
        want = np.concatenate([(ups[p][k] - base[k]).ravel() for k in base])
        assert np.array_equal(whole[i], want.astype(np.float64))


def test_spill_file_is_unlinked_and_private(tmp_path: Path) -> None:
    base, ups = _round(4)
    rows = _rows(base, ups, "disk", tmp_path)
    folder = tmp_path / "r"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert list(folder.iterdir()) == []  # nothing a crash could leave behind
    assert rows._fd is not None
    fd_mode = stat.S_IMODE(os.fstat(rows._fd).st_mode)
    assert fd_mode == 0o600 and os.fstat(rows._fd).st_size > 0
    rows.close()
    assert rows._fd is None


def test_a_round_takes_no_more_than_its_capacity_and_one_update_each(tmp_path: Path) -> None:
    base, ups = _round(2)
    rows = RoundUpdates(base, 2)
    rows.add("p000", ups["p000"])
    with pytest.raises(ValueError, match="already has an update"):
        rows.add("p000", ups["p000"])
    rows.add("p001", ups["p001"])
    with pytest.raises(ValueError, match="at most 2 updates"):
        rows.add("p002", ups["p001"])


def test_non_finite_update_has_infinite_norm_and_is_judged_by_that(
    where: str, tmp_path: Path
) -> None:
    base, ups = _round(8)
    ups["p007"]["v"][3] = np.nan
    rows = _rows(base, ups, where, tmp_path)
    assert rows.norm("p007") == math.inf
    scores = robustness.score(rows.delta_rows(sorted(ups)), robustness.Thresholds())
    assert scores is not None
    assert scores["p007"].reasons == ("non-finite values",) and scores["p007"].excluded


def test_detection_over_rows_equals_detection_over_tensors(where: str, tmp_path: Path) -> None:
    base, ups = _round(15, seed=3)
    rows = _rows(base, ups, where, tmp_path)
    deltas = {p: [w[k] - base[k] for k in base] for p, w in ups.items()}
    want = robustness.score(deltas, robustness.Thresholds())
    got = robustness.score(rows.delta_rows(sorted(ups)), robustness.Thresholds())
    assert want is not None and got is not None
    assert {p for p, s in got.items() if s.excluded} >= {"p000", "p001"}
    for p in ups:
        assert got[p].reasons == want[p].reasons and got[p].excluded == want[p].excluded
        for f in ("norm", "norm_ratio", "cosine", "distance", "z"):
            assert getattr(got[p], f) == pytest.approx(getattr(want[p], f), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedadam"])
def test_block_mean_equals_the_strategys_aggregate(name: str, where: str, tmp_path: Path) -> None:
    """The mean family's step from rows (weighted_delta, then from_mean) is the strategy's
    own aggregate of the bounded (clipped, share-weighted) updates."""
    base, ups = _round(10, seed=5)
    rows = _rows(base, ups, where, tmp_path)
    examples = {p: 10 + 7 * i for i, p in enumerate(sorted(ups))}
    examples["p009"] = 1000  # more than its share allows
    claims = dict(examples)
    figures = rounds.bound_plan(examples, {p: rows.norm(p) for p in ups}, claims, AGG)
    assert any(f["scale"] < 1 for f in figures.values())  # the flipped one is clipped
    assert max(f["share"] for f in figures.values()) == pytest.approx(0.3)  # and capped
    strategy = get_strategy(name)
    step = rows.weighted_delta({p: f["share"] * f["scale"] for p, f in figures.items()})
    got, _ = strategy.from_mean(base, rows.model(step), {})
    updates = [ClientUpdate(p, ups[p], examples[p], 0.1) for p in sorted(ups)]
    bounded, _ = rounds.bound_updates(updates, base, claims, AGG)
    want, _ = strategy.aggregate(base, bounded, {})
    for k in base:
        assert got[k].dtype == np.float32
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def _big_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> RoundUpdates:
    """200 updates of 20,000 values on disk, read in blocks of 1 MiB (as float64)."""
    monkeypatch.setattr(round_updates, "BLOCK_BYTES", 2**20)
    monkeypatch.setattr(round_updates, "MIN_WIDTH", 64)
    rng = np.random.default_rng(seed)
    base = {"w": rng.normal(size=20_000).astype(np.float32)}
    rows = RoundUpdates(base, 200, ram_bytes=0, spill_dir=tmp_path / "r")
    for i in range(200):
        rows.add(f"p{i:03d}", {"w": base["w"] + rng.normal(size=20_000).astype(np.float32)})
    return rows


def test_judging_and_the_mean_hold_a_block_not_every_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n = 200 updates of d = 20,000 values on disk (16 MB as float32, 32 MB as float64),
    read in blocks of 1 MiB (float64): detection's passes and the weighted mean allocate
    less than 5 MiB at their peak, where stacking the updates in float64, as detection did,
    took 32 MB."""
    rows = _big_round(tmp_path, monkeypatch, seed=0)
    peers = sorted(rows.peers)
    tracemalloc.start()
    try:
        scores = robustness.score(rows.delta_rows(peers), robustness.Thresholds())
        rows.weighted_delta({p: 1.0 / len(peers) for p in peers})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scores is not None and len(scores) == 200
    assert peak < 5 * 2**20, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multikrum", "bulyan"])
def test_robust_strategies_by_columns_equal_their_whole_model_aggregate(
    name: str, where: str, tmp_path: Path
) -> None:
    """Median, trimmed mean, Krum, multi-Krum and Bulyan given the model in column blocks of
    the rows (read as their arithmetic stacks them) give their aggregate of whole models."""
    base, ups = _round(12, seed=7)
    rows = _rows(base, ups, where, tmp_path)
    examples = {p: 20 + i for i, p in enumerate(sorted(ups))}
    figures = rounds.bound_plan(examples, {p: rows.norm(p) for p in ups}, dict(examples), AGG)
    strategy = get_strategy({"strategy": name, "num_malicious": 2, "beta": 0.2})
    assert strategy.by_columns
    cols, blocks = rows.by_columns({p: f["scale"] for p, f in figures.items()})
    assert len(cols) == rows.blocks_n > 1
    updates = [
        ClientUpdate(p, blocks[p], examples[p], 0.1, figures[p]["share"])  # type: ignore[arg-type]
        for p in sorted(ups)
    ]
    new, _ = strategy.aggregate(cols, updates, {})
    got = rows.from_columns(new)
    whole = [ClientUpdate(p, ups[p], examples[p], 0.1) for p in sorted(ups)]
    bounded, _ = rounds.bound_updates(whole, base, dict(examples), AGG)
    want, _ = strategy.aggregate(base, bounded, {})
    for k in base:
        assert got[k].shape == base[k].shape and got[k].dtype == np.float32
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)


def test_median_by_columns_holds_a_block_of_each_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinate-wise median of 200 updates of 20,000 values on disk allocates a block
    of each (1 MiB in float64) at a time: under 4 MiB at its peak, against the 16 MB of the
    updates as whole models."""
    rows = _big_round(tmp_path, monkeypatch, seed=1)
    cols, blocks = rows.by_columns({p: 1.0 for p in rows.peers})
    updates = [ClientUpdate(p, blocks[p], 1, 0.1) for p in rows.peers]  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        new, _ = get_strategy("median").aggregate(cols, updates, {})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    got = rows.from_columns(new)["w"]
    stack = np.stack([rows.weights_of(p)["w"] for p in rows.peers])
    np.testing.assert_array_equal(got, np.median(stack, axis=0).astype(np.float32))
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_central_dp_sum_from_rows_equals_the_whole_model_noisy_mean(
    where: str, tmp_path: Path
) -> None:
    """The session's central-DP path (each delta clipped by its scale, summed from the rows a
    block at a time, then noisy_mean_of_sum) is central_dp.noisy_mean of the whole models."""
    base, ups = _round(9, seed=11)
    rows = _rows(base, ups, where, tmp_path)
    clip = 2.0
    peers = sorted(ups)
    total = rows.weighted_delta({p: bounds.clip_scale(rows.norm(p), clip) for p in peers})
    got = central_dp.noisy_mean_of_sum(
        base, rows.split(total), len(peers), clip, 0.0, np.random.default_rng(0)
    )
    want, norms = central_dp.noisy_mean(
        base, [ups[p] for p in peers], clip, 0.0, np.random.default_rng(0)
    )
    assert norms == pytest.approx([rows.norm(p) for p in peers], rel=1e-6)
    for k in base:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
