"""Datasets, feature transforms and partitioning; data sources by name.

Everything here is a pure function of its inputs and a seed, so that every node that runs
the same spec computes the same split and the same shard without talking to anyone: the
embedded digits data is identical on every machine, and a participant's own file never
leaves it. A participant's own data is read by its source (fednode/tables.py, idx.py,
images.py) and checked against the spec's schema (fednode/schema.py) before anything trains.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fednode.schema import PROBE, Raw, Schema
from protocol.errors import DataError, SchemaMismatch
from protocol.plugins import Registry
from protocol.spec import NO_DATASET

FEATURES = ("scale16", "standardize", "none")
PARTITIONS = ("iid", "stratified", "sequential", "dirichlet", "label_skew", "group")
DIGITS_TEST_SIZE = 0.2


@dataclass
class Dataset:
    x: np.ndarray  # float32, [n, features] (images flattened: channels, height, width)
    y: np.ndarray  # int64 class indices [n]; float32 targets when model.task = "regression"

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    def quality(self) -> dict[str, Any]:
        """Facts about the data a participant can report without revealing it."""
        n = len(self)
        nonfinite = int(np.size(self.x) - np.count_nonzero(np.isfinite(self.x)))
        duplicates = n - int(np.unique(self.x, axis=0).shape[0]) if n else 0
        labels, counts = np.unique(self.y, return_counts=True)
        label_counts = {int(lab): int(c) for lab, c in zip(labels, counts, strict=True)}
        balance = float(counts.min() / counts.max()) if counts.size else 0.0
        return {
            "examples": n,
            "features": self.num_features,
            "nonfinite_values": nonfinite,
            "duplicate_rows": duplicates,
            "label_counts": label_counts,
            "num_classes": len(label_counts),
            "label_balance": balance,
        }


@dataclass(frozen=True)
class DatasetRef:
    """A parsed `--dataset` value: a digits shard or a local file."""

    kind: str  # a SOURCES name: "digits" | "npz" | "csv" | "parquet" | "idx" | "images"
    shard: int = 0
    num_shards: int = 1
    path: Path | None = None

    def __str__(self) -> str:
        if self.path is None:  # a shard of a source every node holds (digits)
            return f"{self.kind}:{self.shard}/{self.num_shards}"
        return f"{self.kind}:{self.path}"


# --------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The benchmark split: 20 % stratified test split, raw pixel values (0..16)."""
    from sklearn.model_selection import train_test_split

    x, y = _digits_raw()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, stratify=y, random_state=seed
    )
    return (
        np.array(x_train, dtype=np.float32),
        np.array(y_train, dtype=np.int64),
        np.array(x_test, dtype=np.float32),
        np.array(y_test, dtype=np.int64),
    )


# ------------------------------------------------------------------------- features


def apply_features(
    x_train: np.ndarray, x_test: np.ndarray | None, mode: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Transform both splits with statistics of the training split only (no test leakage)."""
    if mode not in FEATURES:
        raise DataError(f"unknown features mode {mode!r}; accepted: {', '.join(FEATURES)}")
    x_train = np.asarray(x_train, dtype=np.float32)
    x_test = None if x_test is None else np.asarray(x_test, dtype=np.float32)
    if mode == "none":
        return x_train.copy(), None if x_test is None else x_test.copy()
    if mode == "scale16":
        return x_train / np.float32(16.0), None if x_test is None else x_test / np.float32(16.0)
    # Statistics in float64 so that they do not depend on summation order in float32.
    mean = x_train.astype(np.float64).mean(axis=0)
    std = x_train.astype(np.float64).std(axis=0)
    std[std == 0] = 1.0

    def tr(a: np.ndarray) -> np.ndarray:
        return ((a.astype(np.float64) - mean) / std).astype(np.float32)

    return tr(x_train), None if x_test is None else tr(x_test)


# --------------------------------------------------------------------- partitioning


def _check_parts(n: int, parts: int) -> None:
    if not isinstance(parts, int | np.integer) or parts < 1:
        raise DataError(f"number of parts must be a positive integer, got {parts!r}")
    if parts > n:
        raise DataError(f"cannot split {n} examples into {parts} non-empty parts")


def partition_iid(n: int, parts: int, seed: int) -> list[np.ndarray]:
    """Fixed by the benchmark task: default_rng(seed).permutation, then array_split."""
    _check_parts(n, parts)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.asarray(p, dtype=np.int64) for p in np.array_split(perm, parts)]


def partition_sequential(n: int, parts: int) -> list[np.ndarray]:
    _check_parts(n, parts)
    return [np.asarray(p, dtype=np.int64) for p in np.array_split(np.arange(n), parts)]


def partition_stratified(y: np.ndarray, parts: int, seed: int) -> list[np.ndarray]:
    """Every class spread evenly: shuffle within class, order by class, deal round-robin."""
    y = np.asarray(y)
    _check_parts(len(y), parts)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]).astype(
        np.int64
    )
    return [np.sort(order[k::parts]) for k in range(parts)]


def partition_dirichlet(
    y: np.ndarray, parts: int, seed: int, alpha: float = 0.5, max_tries: int = 100
) -> list[np.ndarray]:
    """Per-class proportions drawn from Dirichlet(alpha); small alpha means more skew.

    Draws are repeated (deterministically, from the same generator) until every part has
    at least one example; a part left empty after `max_tries` draws is an error rather than
    a participant that silently trains on nothing.
    """
    y = np.asarray(y)
    _check_parts(len(y), parts)
    if not alpha > 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha!r}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(max_tries):
        buckets: list[list[np.ndarray]] = [[] for _ in range(parts)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            props = rng.dirichlet(np.full(parts, float(alpha)))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                buckets[k].append(chunk)
        out = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
        if all(len(p) > 0 for p in out):
            return out
    raise DataError(
        f"dirichlet partition (alpha={alpha}) left a part empty after {max_tries} draws "
        f"({len(y)} examples, {parts} parts)",
        hint="raise data.alpha, use fewer participants, or another partition",
    )


def partition_label_skew(
    y: np.ndarray, parts: int, seed: int, labels_per_part: int = 2
) -> list[np.ndarray]:
    """Each part sees only `labels_per_part` classes.

    Classes are dealt to parts in a seeded cyclic order, so that with
    parts * labels_per_part >= classes every class is held by someone; a class's examples
    are shared evenly among the parts that hold it. Examples of classes held by nobody are
    left out.
    """
    y = np.asarray(y)
    _check_parts(len(y), parts)
    classes = np.unique(y)
    if not 1 <= labels_per_part <= len(classes):
        raise DataError(
            f"labels_per_part must be between 1 and {len(classes)} (the number of classes), "
            f"got {labels_per_part!r}"
        )
    rng = np.random.default_rng(seed)
    cycle = rng.permutation(classes)
    owners: dict[int, list[int]] = {int(c): [] for c in classes}
    for k in range(parts):
        for j in range(labels_per_part):
            owners[int(cycle[(k * labels_per_part + j) % len(cycle)])].append(k)
    buckets: list[list[np.ndarray]] = [[] for _ in range(parts)]
    for c in classes:
        holders = owners[int(c)]
        if not holders:
            continue
        idx = rng.permutation(np.flatnonzero(y == c))
        for k, chunk in zip(holders, np.array_split(idx, len(holders)), strict=True):
            buckets[k].append(chunk)
    out = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
    for k, p in enumerate(out):
        if len(p) == 0:
            raise DataError(f"label_skew partition left part {k} empty", hint="use fewer parts")
    return out


def partition_group(groups: np.ndarray | None, parts: int, seed: int) -> list[np.ndarray]:
    """Whole groups (e.g. writers, hospitals) go to one part each."""
    if groups is None:
        raise DataError(
            "partition 'group' needs a group label per example, and this dataset has none "
            "(the embedded digits data carries no writer IDs)",
            hint="use iid, stratified, sequential, dirichlet or label_skew for digits",
        )
    groups = np.asarray(groups)
    _check_parts(len(groups), parts)
    uniq = np.random.default_rng(seed).permutation(np.unique(groups))
    if len(uniq) < parts:
        raise DataError(f"{len(uniq)} groups cannot fill {parts} parts")
    return [
        np.sort(np.flatnonzero(np.isin(groups, g))).astype(np.int64)
        for g in np.array_split(uniq, parts)
    ]


def partition_indices(
    name: str,
    y: np.ndarray,
    parts: int,
    *,
    seed: int,
    alpha: float = 0.5,
    labels_per_part: int = 2,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Index arrays (into `y`) of each of `parts` parts, by partition name."""
    n = len(y)
    table: dict[str, Callable[[], list[np.ndarray]]] = {
        "iid": lambda: partition_iid(n, parts, seed),
        "sequential": lambda: partition_sequential(n, parts),
        "stratified": lambda: partition_stratified(y, parts, seed),
        "dirichlet": lambda: partition_dirichlet(y, parts, seed, alpha),
        "label_skew": lambda: partition_label_skew(y, parts, seed, labels_per_part),
        "group": lambda: partition_group(groups, parts, seed),
    }
    if name not in table:
        raise DataError(f"unknown partition {name!r}; accepted: {', '.join(PARTITIONS)}")
    return table[name]()


# ---------------------------------------------------------------------- dataset specs

# A data source is one kind of dataset value, ``name:argument`` (a participant's --dataset,
# the spec's data.dataset); SOURCES finds it by the name before the colon.


@dataclass(frozen=True)
class Cut:
    """How a participant's data is cut and transformed: the session's [data] settings."""

    features: str  # the feature transform: standardize | scale16 | none
    partition: str = "iid"  # digits:K/N only
    seed: int = 0  # the partition's and the local held-out split's seed
    alpha: float = 0.5
    labels_per_part: int = 2
    # False: a local file's rows all train (test is empty), as load_partition gives them
    hold_out: bool = True


@dataclass(frozen=True)
class DataSource:
    form: str  # how its values are written, for error messages: "npz:/path/file.npz"
    # (the whole value, the argument after "name:") -> a ref; DataError if malformed
    parse: Callable[[str, str], DatasetRef]
    # a participant's data, checked against the schema: (ref, cut, schema) -> (train, test)
    local: Callable[[DatasetRef, Cut, Schema], tuple[Dataset, Dataset]]
    # the coordinator's evaluation data: (the spec's data.dataset value, features, seed,
    # schema)
    evaluate: Callable[[str, str, int, Schema], Dataset]


SOURCES: Registry[DataSource] = Registry(
    "data source",
    "use digits:K/N, a local csv:/path, parquet:/path or npz:/path file, or an idx:/dir or "
    "images:/dir folder",
)


def spec_forms() -> str:
    """Every registered way to write a dataset value, for error messages."""
    return ", ".join(source.form for source in map(SOURCES.get, SOURCES))


def parse_dataset_spec(spec: str) -> DatasetRef:
    if not isinstance(spec, str):
        raise DataError(f"dataset spec must be a string, got {spec!r}; accepted: {spec_forms()}")
    name, colon, argument = spec.strip().partition(":")
    if not colon or name not in SOURCES:
        raise DataError(f"dataset {spec!r} is not understood; accepted: {spec_forms()}")
    return SOURCES.get(name).parse(spec, argument)


_SHARD_RE = re.compile(r"^(\d+)/(\d+)$")


def _parse_digits(spec: str, argument: str) -> DatasetRef:
    m = _SHARD_RE.match(argument)
    if not m:
        raise DataError(f"dataset {spec!r} is not understood; accepted: {spec_forms()}")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or k >= n:
        raise DataError(
            f"dataset {spec!r}: shard {k} of {n} does not exist (need 0 <= K < N, N >= 1); "
            f"accepted: {spec_forms()}"
        )
    return DatasetRef("digits", shard=k, num_shards=n)


def _file_parser(kind: str) -> Callable[[str, str], DatasetRef]:
    def parse(spec: str, argument: str) -> DatasetRef:
        if not argument:
            raise DataError(f"dataset {spec!r} names no file; accepted: {spec_forms()}")
        return DatasetRef(kind, path=Path(argument).expanduser())

    return parse


# ------------------------------------------------------------------------ file loading


def _load_npz(path: Path, schema: Schema) -> Raw:
    """Arrays x [n, features] and y [n]; x_test and y_test, when present, are held out."""
    try:
        # allow_pickle=False: an object array in a file must never run code.
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise DataError(
                    f"{path}: npz file lacks array(s) {', '.join(missing)} "
                    f"(has: {', '.join(f.files) or 'nothing'})",
                    hint="save it with numpy.savez(path, x=features, y=labels)",
                )
            parts = [(f["x"], f["y"])]
            if "x_test" in f.files and "y_test" in f.files:
                parts.append((f["x_test"], f["y_test"]))
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable npz file ({e})") from None
    for x, y in parts:
        _check_arrays(x, y, str(path))
    x = np.concatenate([np.asarray(x, dtype=np.float32) for x, _ in parts])
    y = np.concatenate([np.asarray(y) for _, y in parts])
    test = np.zeros(len(y), dtype=bool)
    test[len(parts[0][1]) :] = True
    return Raw(x, y, str(path), test=test if len(parts) > 1 else None)


def _check_arrays(x: Any, y: Any, source: str) -> None:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2:
        raise DataError(f"{source}: x must be 2-D [examples, features], got shape {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{source}: y must be 1-D [examples], got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{source}: x has {x.shape[0]} rows but y has {y.shape[0]} labels")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{source}: no data (x has shape {x.shape})")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{source}: x must be numeric, got dtype {x.dtype}")
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x.astype(np.float32))))
    if bad:
        raise DataError(f"{source}: x has {bad} missing or non-finite values")


def _load_table(kind: str) -> Callable[[Path, Schema], Raw]:
    def load(path: Path, schema: Schema) -> Raw:
        from fednode.tables import read_table  # pandas loads only for a table

        return read_table(path, kind, schema)

    return load


def _load_idx(path: Path, schema: Schema) -> Raw:
    from fednode.idx import read_idx_folder

    return read_idx_folder(path, schema)


def _load_images(path: Path, schema: Schema) -> Raw:
    from fednode.images import read_image_folder  # Pillow loads only for images

    return read_image_folder(path, schema)


_FILE_LOADERS: dict[str, Callable[[Path, Schema], Raw]] = {
    "npz": _load_npz,
    "csv": _load_table("csv"),
    "parquet": _load_table("parquet"),
    "idx": _load_idx,
    "images": _load_images,
}


def read_file(ref: DatasetRef, schema: Schema) -> tuple[Dataset, np.ndarray | None]:
    """A local file or folder as the schema reads it, and the rows its source holds out
    (t10k files, a split column, npz x_test/y_test) or None. SchemaMismatch on any
    difference from the schema."""
    loader = _FILE_LOADERS.get(ref.kind)
    if loader is None or ref.path is None:
        raise DataError(f"dataset {ref} is not a file")
    raw = loader(ref.path, schema)
    schema.check_features(raw.x, raw.source, raw.names)
    y = schema.targets(raw.labels, raw.source)
    return Dataset(np.ascontiguousarray(raw.x, dtype=np.float32), y), raw.test


def load_file(ref: DatasetRef, schema: Schema | None = None) -> Dataset:
    """All of a local file or folder, as the schema (default: Schema()) reads it."""
    return read_file(ref, schema or Schema())[0]


def _take(ds: Dataset, idx: np.ndarray) -> Dataset:
    return Dataset(np.ascontiguousarray(ds.x[idx]), ds.y[idx].copy())


def held_out(n: int, fraction: float, seed: int) -> np.ndarray:
    """The seeded local held-out rows, a bool mask over n rows: floor(n × fraction) of them
    (at least one, and one row left to train, when fraction > 0), chosen by `seed`, the
    same on every run."""
    test = np.zeros(n, dtype=bool)
    if fraction > 0 and n >= 2:
        n_test = min(n - 1, max(1, math.floor(n * fraction)))
        test[np.random.default_rng(seed).permutation(n)[:n_test]] = True
    return test


def _featurize(train: Dataset, test: Dataset, features: str) -> tuple[Dataset, Dataset]:
    """The transform with the training part's statistics only (no test leakage)."""
    x_train, x_test = apply_features(train.x, test.x, features)
    assert x_test is not None
    return Dataset(x_train, train.y), Dataset(x_test, test.y)


def load_split(
    ref: DatasetRef | str,
    *,
    features: str,
    partition: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    labels_per_part: int = 2,
    schema: Schema | None = None,
) -> tuple[Dataset, Dataset]:
    """A participant's local data as (train, test), checked against the session's schema.

    `schema` is `Schema.from_spec(spec)` (default: `Schema()`, the spec's defaults); data
    that differs from it raises SchemaMismatch (a DataError) naming the column, class, file
    or shape. `test` is the held-out part a participant evaluates on: for a local file the
    rows its source holds out (the IDX t10k files, a table's `split` column, an npz's
    x_test/y_test), else a seeded fraction `schema.test_fraction` of the rows (seed `seed`);
    for digits:K/N, shard K of the embedded test split. `features` transforms both parts
    with statistics of the training part (for digits, of the whole training split, the same
    on every node). `partition`, `alpha` and `labels_per_part` cut digits:K/N shards only: a
    local file is the participant's own data, split but not cut. The test part may be empty
    (test_fraction = 0 and no split in the source).
    """
    if isinstance(ref, str):
        ref = parse_dataset_spec(ref)
    cut = Cut(features, partition, seed, alpha, labels_per_part)
    return SOURCES.get(ref.kind).local(ref, cut, schema or Schema())


def load_partition(
    ref: DatasetRef | str,
    *,
    features: str,
    partition: str,
    seed: int,
    alpha: float = 0.5,
    labels_per_part: int = 2,
    schema: Schema | None = None,
) -> Dataset:
    """The local data one participant trains on when nothing is held out: for digits:K/N
    shard K of the training split; a local file whole (its held-out rows included), checked
    against `schema` as load_split checks it. A participant that evaluates uses load_split.
    """
    if isinstance(ref, str):
        ref = parse_dataset_spec(ref)
    cut = Cut(features, partition, seed, alpha, labels_per_part, hold_out=False)
    return SOURCES.get(ref.kind).local(ref, cut, schema or Schema())[0]


def probe(ref: DatasetRef) -> Dataset:
    """A participant's data before it knows any session (its registration's count and data
    report): every row, labels as found (not mapped to classes), a table's last column as
    the label and its numeric columns as features. Nothing trains on it."""
    return load_partition(ref, features="none", partition="iid", seed=0, schema=PROBE)


@dataclass(frozen=True)
class _DigitsCut:
    """The digits splits as a cut transforms them, and every shard's indices: the same for
    all N shards, so computed once per process (fednode swarm hosts N participants in one)."""

    train: Dataset
    test: Dataset
    parts: list[np.ndarray]
    test_parts: list[np.ndarray]


@functools.lru_cache(maxsize=8)
def _digits_cut(cut: Cut, num_shards: int) -> _DigitsCut:
    x_train, y_train, x_test, y_test = digits_split(cut.seed)
    x_train, x_test_f = apply_features(x_train, x_test, cut.features)
    assert x_test_f is not None
    parts = partition_indices(
        cut.partition,
        y_train,
        num_shards,
        seed=cut.seed,
        alpha=cut.alpha,
        labels_per_part=cut.labels_per_part,
    )
    # The local test part: shard K of the test split, cut iid so every shard has some.
    test_parts = partition_iid(len(y_test), min(num_shards, len(y_test)), cut.seed)
    for a in (x_train, y_train, x_test_f, y_test, *parts, *test_parts):
        a.flags.writeable = False  # shared by every shard of this process: read only
    return _DigitsCut(Dataset(x_train, y_train), Dataset(x_test_f, y_test), parts, test_parts)


def _digits_local(ref: DatasetRef, cut: Cut, schema: Schema) -> tuple[Dataset, Dataset]:
    whole = _digits_cut(cut, ref.num_shards)
    schema.check_features(whole.train.x, str(ref))
    if not schema.probe:  # the embedded labels are indices 0..9; the schema must agree
        schema.targets(whole.train.y, str(ref))
    k = ref.shard
    test_idx = whole.test_parts[k] if k < len(whole.test_parts) else np.zeros(0, np.int64)
    return _take(whole.train, whole.parts[k]), _take(whole.test, test_idx)


def load_eval(
    dataset: str, *, features: str, seed: int, schema: Schema | None = None
) -> Dataset | None:
    """The coordinator's evaluation data: the digits test split, a local file or folder (its
    held-out rows when its source has them: t10k files, a split column; else all of it), or
    None for data.dataset = "none" (the coordinator holds no data: nothing to evaluate
    here)."""
    if dataset == NO_DATASET:
        return None
    name = dataset.partition(":")[0] if isinstance(dataset, str) else dataset
    if name not in SOURCES:
        parse_dataset_spec(dataset)  # its error lists every source
    return SOURCES.get(name).evaluate(dataset, features, seed, schema or Schema())


def _digits_eval(dataset: str, features: str, seed: int, schema: Schema) -> Dataset:
    if dataset != "digits":
        raise DataError(
            f"evaluation dataset {dataset!r}: use plain 'digits' (the embedded test split), "
            "not a shard",
        )
    x_train, _, x_test, y_test = digits_split(seed)
    _, x_test_f = apply_features(x_train, x_test, features)
    assert x_test_f is not None
    schema.check_features(x_test_f, dataset)
    return Dataset(x_test_f, y_test)


def _file_local(ref: DatasetRef, cut: Cut, schema: Schema) -> tuple[Dataset, Dataset]:
    # A participant's own file is used whole: partition, alpha and labels_per_part do not apply.
    ds, test = read_file(ref, schema)
    if not cut.hold_out:
        test = np.zeros(len(ds), dtype=bool)
    elif test is None:
        test = held_out(len(ds), schema.test_fraction, cut.seed)
    train = _take(ds, np.flatnonzero(~test))
    if len(train) == 0:
        raise SchemaMismatch(
            f"{ref}: no training rows are left after the held-out split "
            f"({len(ds)} rows, data.test_fraction = {schema.test_fraction:g})",
            hint="lower data.test_fraction, or mark fewer rows test in the split column",
        )
    return _featurize(train, _take(ds, np.flatnonzero(test)), cut.features)


def _file_eval(dataset: str, features: str, seed: int, schema: Schema) -> Dataset:
    ds, test = read_file(parse_dataset_spec(dataset), schema)
    if test is not None and test.any():
        ds = _take(ds, np.flatnonzero(test))
    x, _ = apply_features(ds.x, None, features)  # the file's own statistics
    return Dataset(x, ds.y)


SOURCES.register(
    "digits",
    DataSource("digits:K/N (shard K of N, 0 <= K < N)", _parse_digits, _digits_local, _digits_eval),
)
for _kind, _form in (
    ("npz", "npz:/path/file.npz"),
    ("csv", "csv:/path/file.csv"),
    ("parquet", "parquet:/path/file.parquet"),
    ("idx", "idx:/path/folder (MNIST IDX files)"),
    ("images", "images:/path/folder (a subfolder of PNG/JPEG per class)"),
):
    SOURCES.register(_kind, DataSource(_form, _file_parser(_kind), _file_local, _file_eval))
