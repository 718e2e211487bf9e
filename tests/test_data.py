from __future__ import annotations

import numpy as np
import pytest

from fednode import data
from fednode.data import (
    Dataset,
    DatasetRef,
    apply_features,
    digits_split,
    load_eval,
    load_partition,
    parse_dataset_spec,
    partition_indices,
)
from protocol.errors import DataError


@pytest.fixture(scope="module")
def split():
    return digits_split(0)


def test_digits_split_sizes_and_types(split):
    x_train, y_train, x_test, y_test = split
    assert x_train.shape == (1437, 64) and x_test.shape == (360, 64)
    assert y_train.shape == (1437,) and y_test.shape == (360,)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert x_train.max() == 16.0 and x_train.min() == 0.0  # raw pixels


def test_digits_split_is_stratified_and_deterministic(split):
    _, y_train, _, y_test = split
    full = np.bincount(np.concatenate([y_train, y_test]), minlength=10)
    # each class's test share is within one example of 20 %
    assert np.all(np.abs(np.bincount(y_test, minlength=10) - 0.2 * full) <= 1)
    again = digits_split(0)
    assert all(np.array_equal(a, b) for a, b in zip(split, again, strict=True))
    assert not np.array_equal(digits_split(1)[1], y_train)


def test_features_use_training_stats(split):
    x_train, _, x_test, _ = split
    s_train, s_test = apply_features(x_train, x_test, "standardize")
    assert np.allclose(s_train.mean(axis=0), 0, atol=1e-5)
    nonconst = x_train.std(axis=0) > 0
    assert np.allclose(s_train.std(axis=0)[nonconst], 1, atol=1e-4)
    assert np.all(np.isfinite(s_train)) and np.all(np.isfinite(s_test))
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1
    assert np.allclose(s_test, (x_test - mean) / std, atol=1e-4)
    # the test split's own mean is not subtracted
    assert not np.allclose(s_test.mean(axis=0), 0, atol=1e-3)
    a, b = apply_features(x_train, x_test, "scale16")
    assert a.max() == 1.0 and np.allclose(b, x_test / 16)
    with pytest.raises(DataError):
        apply_features(x_train, x_test, "minmax")


def test_iid_is_exactly_the_benchmark_recipe(split):
    y = split[1]
    for n_parts in (1, 3, 7):
        parts = partition_indices("iid", y, n_parts, seed=0)
        expected = np.array_split(np.random.default_rng(0).permutation(len(y)), n_parts)
        assert len(parts) == n_parts
        for got, want in zip(parts, expected, strict=True):
            assert np.array_equal(got, want)


@pytest.mark.parametrize("name", ["iid", "sequential", "stratified", "dirichlet", "label_skew"])
@pytest.mark.parametrize("n_parts", [2, 3, 10])
def test_partitions_disjoint_deterministic(split, name, n_parts):
    y = split[1]
    parts = partition_indices(name, y, n_parts, seed=3)
    assert len(parts) == n_parts
    assert all(len(p) > 0 for p in parts)
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)  # disjoint
    assert allidx.min() >= 0 and allidx.max() < len(y)
    if name != "label_skew" or n_parts * 2 >= 10:
        assert len(allidx) == len(y)  # covering
    again = partition_indices(name, y, n_parts, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_sequential_and_stratified(split):
    y = split[1]
    seq = partition_indices("sequential", y, 3, seed=0)
    assert np.array_equal(np.concatenate(seq), np.arange(len(y)))
    strat = partition_indices("stratified", y, 3, seed=0)
    total = np.bincount(y, minlength=10)
    for p in strat:
        counts = np.bincount(y[p], minlength=10)
        assert np.all(np.abs(counts - total / 3) <= 1)
    assert max(map(len, strat)) - min(map(len, strat)) <= 1


def test_dirichlet_skews_with_small_alpha(split):
    y = split[1]

    def spread(alpha: float) -> float:
        parts = partition_indices("dirichlet", y, 5, seed=0, alpha=alpha)
        assert all(len(p) >= 1 for p in parts)
        props = np.array([np.bincount(y[p], minlength=10) / len(p) for p in parts])
        return float(np.abs(props - np.bincount(y) / len(y)).sum())

    assert spread(0.1) > 2 * spread(100.0)
    assert partition_indices("dirichlet", y, 5, seed=0, alpha=0.5)[0].tolist() != (
        partition_indices("dirichlet", y, 5, seed=1, alpha=0.5)[0].tolist()
    )


def test_dirichlet_empty_part_raises():
    y = np.array([0, 0, 1, 1, 2])
    with pytest.raises(DataError, match="empty"):
        data.partition_dirichlet(y, 5, seed=0, alpha=0.01, max_tries=3)
    with pytest.raises(DataError):
        partition_indices("dirichlet", y, 6, seed=0)  # more parts than examples


def test_label_skew(split):
    y = split[1]
    for k in (1, 2, 3):
        parts = partition_indices("label_skew", y, 5, seed=0, labels_per_part=k)
        assert all(len(np.unique(y[p])) == k for p in parts)
    parts = partition_indices("label_skew", y, 5, seed=0, labels_per_part=2)
    assert len(np.unique(np.concatenate([y[p] for p in parts]))) == 10  # 5*2 covers all
    with pytest.raises(DataError):
        partition_indices("label_skew", y, 3, seed=0, labels_per_part=11)


def test_group_and_unknown_partition(split):
    y = split[1]
    with pytest.raises(DataError, match="group"):
        partition_indices("group", y, 3, seed=0)
    with pytest.raises(DataError, match="group"):
        load_partition("digits:0/3", features="scale16", partition="group", seed=0)
    groups = np.repeat(np.arange(6), [3, 3, 3, 3, 3, 3])
    parts = partition_indices("group", np.zeros(18), 3, seed=0, groups=groups)
    assert all(len(np.unique(groups[p])) == 2 for p in parts)
    with pytest.raises(DataError, match="unknown partition"):
        partition_indices("random", y, 3, seed=0)
    assert set(data.PARTITIONS) == {
        "iid",
        "stratified",
        "sequential",
        "dirichlet",
        "label_skew",
        "group",
    }


def test_parse_dataset_spec():
    assert parse_dataset_spec("digits:2/5") == DatasetRef("digits", shard=2, num_shards=5)
    ref = parse_dataset_spec("npz:/tmp/a.npz")
    assert ref.kind == "npz" and str(ref.path) == "/tmp/a.npz"
    assert parse_dataset_spec("csv:rel/b.csv").kind == "csv"
    for bad in [
        "digits",
        "digits:3/3",
        "digits:0/0",
        "digits:-1/3",
        "digits:a/b",
        "npz:",
        "mnist:0/3",
        "",
        "/tmp/a.npz",
        "csv",
    ]:
        with pytest.raises(DataError) as ei:
            parse_dataset_spec(bad)
        assert repr(bad) in ei.value.message and "digits:K/N" in ei.value.message


def test_load_partition_digits(split):
    x_train, y_train, _, _ = split
    shards = [
        load_partition(f"digits:{k}/3", features="scale16", partition="iid", seed=0)
        for k in range(3)
    ]
    assert [len(s) for s in shards] == [479, 479, 479]
    perm = np.random.default_rng(0).permutation(1437)
    first = np.array_split(perm, 3)[0]
    assert np.array_equal(shards[0].x, x_train[first] / 16)
    assert np.array_equal(shards[0].y, y_train[first])
    # standardize uses the whole training split's statistics, not the shard's
    std = load_partition(
        parse_dataset_spec("digits:0/3"), features="standardize", partition="iid", seed=0
    )
    full, _ = apply_features(x_train, None, "standardize")
    assert np.allclose(std.x, full[first])


def test_load_eval_digits(split):
    ev = load_eval("digits", features="scale16", seed=0)
    assert len(ev) == 360 and np.array_equal(ev.y, split[3])
    with pytest.raises(DataError):
        load_eval("digits:0/3", features="scale16", seed=0)


def test_npz_and_csv_loading(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=20)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_partition("npz:" + str(tmp_path / "d.npz"), features="none", partition="iid", seed=0)
    assert np.array_equal(ds.x, x) and np.array_equal(ds.y, y) and ds.y.dtype == np.int64
    st = load_partition(
        "npz:" + str(tmp_path / "d.npz"), features="standardize", partition="iid", seed=0
    )
    assert np.allclose(st.x.mean(axis=0), 0, atol=1e-5)

    lines = ["f1,f2,f3,f4,label"] + [
        ",".join(f"{v:.6f}" for v in row) + f",{lab}" for row, lab in zip(x, y, strict=True)
    ]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    cs = load_eval("csv:" + str(tmp_path / "d.csv"), features="none", seed=0)
    assert np.allclose(cs.x, x, atol=1e-5) and np.array_equal(cs.y, y)
    (tmp_path / "nohdr.csv").write_text("\n".join(lines[1:]))
    assert len(load_eval("csv:" + str(tmp_path / "nohdr.csv"), features="none", seed=0)) == 20


@pytest.mark.parametrize(
    "arrays",
    [
        {"x": np.zeros((5, 2)), "y": np.zeros(4, dtype=int)},  # length mismatch
        {"x": np.zeros(5), "y": np.zeros(5, dtype=int)},  # 1-D x
        {"x": np.zeros((5, 2)), "y": np.full(5, 0.5)},  # fractional labels
        {"x": np.full((5, 2), np.nan), "y": np.zeros(5, dtype=int)},  # NaN
        {"x": np.zeros((5, 2)), "y": -np.ones(5, dtype=int)},  # negative labels
        {"features": np.zeros((5, 2)), "y": np.zeros(5, dtype=int)},  # no x
    ],
)
def test_bad_npz(tmp_path, arrays):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError):
        load_partition("npz:" + str(tmp_path / "bad.npz"), features="none", partition="iid", seed=0)


def test_bad_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    (tmp_path / "bad.csv").write_text("a,b,label\n1,2,0\n1,x,1\n")
    (tmp_path / "ragged.csv").write_text("1,2,0\n1,1\n")
    (tmp_path / "empty.csv").write_text("a,b,label\n")
    np.savez(tmp_path / "obj.npz", x=np.array([object()], dtype=object), y=np.zeros(1))
    for spec in [
        "npz:" + str(tmp_path / "junk.npz"),
        "npz:" + str(tmp_path / "missing.npz"),
        "npz:" + str(tmp_path / "obj.npz"),
        "csv:" + str(tmp_path / "bad.csv"),
        "csv:" + str(tmp_path / "ragged.csv"),
        "csv:" + str(tmp_path / "empty.csv"),
        "csv:" + str(tmp_path / "missing.csv"),
    ]:
        with pytest.raises(DataError):
            load_eval(spec, features="none", seed=0)


def test_quality():
    x = np.array([[0, 1], [0, 1], [np.nan, 2], [3, np.inf]], dtype=np.float32)
    q = Dataset(x, np.array([0, 0, 0, 1])).quality()
    assert q["examples"] == 4 and q["nonfinite_values"] == 2
    assert q["duplicate_rows"] == 1
    assert q["label_counts"] == {0: 3, 1: 1}
    assert q["label_balance"] == pytest.approx(1 / 3)
