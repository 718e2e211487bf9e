"""Datasets, feature transforms and partitioning.

Everything here is a pure function of its inputs and a seed, so that every node that runs
the same spec computes the same split and the same shard without talking to anyone: the
embedded digits data is identical on every machine, and a participant's own file never
leaves it.
"""

from __future__ import annotations

import csv
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protocol.errors import DataError
from protocol.plugins import Registry

FEATURES = ("scale16", "standardize", "none")
PARTITIONS = ("iid", "stratified", "sequential", "dirichlet", "label_skew", "group")
DIGITS_TEST_SIZE = 0.2


@dataclass
class Dataset:
    x: np.ndarray  # float32, [n, features]
    y: np.ndarray  # int64, [n]

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

    kind: str  # "digits" | "npz" | "csv"
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
class DataSource:
    form: str  # how its values are written, for error messages: "npz:/path/file.npz"
    # (the whole value, the argument after "name:") -> a ref; DataError if malformed
    parse: Callable[[str, str], DatasetRef]
    # a participant's training data: (ref, features, partition, seed, alpha, labels_per_part)
    train: Callable[[DatasetRef, str, str, int, float, int], Dataset]
    # the coordinator's evaluation data: (the spec's data.dataset value, features, seed)
    evaluate: Callable[[str, str, int], Dataset]


SOURCES: Registry[DataSource] = Registry(
    "data source", "use digits:K/N or a local npz:/path or csv:/path file"
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


def _validate(x: Any, y: Any, source: str) -> Dataset:
    x = np.asarray(x)
    y = np.asarray(y)
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
    xf = x.astype(np.float32)
    if not np.isfinite(xf).all():
        bad = int(np.size(xf) - np.count_nonzero(np.isfinite(xf)))
        raise DataError(f"{source}: x has {bad} missing or non-finite values")
    # Float labels are accepted when every value is a whole number (CSV text, 3.0 == 3).
    integral = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all()
    )
    if not integral:
        raise DataError(f"{source}: labels must be whole numbers, got dtype {y.dtype}")
    yi = y.astype(np.int64)
    if (yi < 0).any():
        raise DataError(f"{source}: labels must be >= 0 (class indices), found {yi.min()}")
    return Dataset(np.ascontiguousarray(xf), yi)


def _load_npz(path: Path) -> Dataset:
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
            x, y = f["x"], f["y"]
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable npz file ({e})") from None
    return _validate(x, y, str(path))


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _load_csv(path: Path) -> Dataset:
    try:
        with path.open(newline="") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable csv file ({e})") from None
    if rows and not all(_is_number(c) for c in rows[0]):
        rows = rows[1:]  # a header row
    if not rows:
        raise DataError(f"{path}: no data rows")
    width = len(rows[0])
    if width < 2:
        raise DataError(f"{path}: need at least one feature column and a label column")
    try:
        arr = np.array([[float(c) for c in r] for r in rows if len(r) == width], dtype=np.float64)
    except ValueError as e:
        raise DataError(f"{path}: non-numeric value ({e})") from None
    if arr.shape[0] != len(rows):
        bad = next(i for i, r in enumerate(rows) if len(r) != width)
        raise DataError(f"{path}: data row {bad + 1} has a different number of columns")
    return _validate(arr[:, :-1], arr[:, -1], str(path))


_FILE_LOADERS: dict[str, Callable[[Path], Dataset]] = {"npz": _load_npz, "csv": _load_csv}


def load_file(ref: DatasetRef) -> Dataset:
    loader = _FILE_LOADERS.get(ref.kind)
    if loader is None or ref.path is None:
        raise DataError(f"dataset {ref} is not a file")
    return loader(ref.path)


def _featurize_own(ds: Dataset, features: str) -> Dataset:
    x, _ = apply_features(ds.x, None, features)
    return Dataset(x, ds.y)


def load_partition(
    ref: DatasetRef | str,
    *,
    features: str,
    partition: str,
    seed: int,
    alpha: float = 0.5,
    labels_per_part: int = 2,
) -> Dataset:
    """The local training data of one participant.

    For digits:K/N, shard K of the training split. Features use the statistics of the
    whole training split, not of the shard: the embedded data is identical on every node,
    so every node computes the same statistics and the same shards, and the model sees the
    same input scale everywhere. A local file is the participant's own data, used whole;
    `partition`, `alpha` and `labels_per_part` do not apply to it, and "standardize" uses
    the file's own statistics.
    """
    if isinstance(ref, str):
        ref = parse_dataset_spec(ref)
    source = SOURCES.get(ref.kind)
    return source.train(ref, features, partition, seed, alpha, labels_per_part)


def _digits_train(
    ref: DatasetRef, features: str, partition: str, seed: int, alpha: float, labels_per_part: int
) -> Dataset:
    x_train, y_train, _, _ = digits_split(seed)
    x_train, _ = apply_features(x_train, None, features)
    parts = partition_indices(
        partition,
        y_train,
        ref.num_shards,
        seed=seed,
        alpha=alpha,
        labels_per_part=labels_per_part,
    )
    idx = parts[ref.shard]
    return Dataset(np.ascontiguousarray(x_train[idx]), y_train[idx].copy())


def load_eval(dataset: str, *, features: str, seed: int) -> Dataset:
    """The coordinator's evaluation data: the digits test split, or a local file."""
    name = dataset.partition(":")[0] if isinstance(dataset, str) else dataset
    if name not in SOURCES:
        parse_dataset_spec(dataset)  # its error lists every source
    return SOURCES.get(name).evaluate(dataset, features, seed)


def _digits_eval(dataset: str, features: str, seed: int) -> Dataset:
    if dataset != "digits":
        raise DataError(
            f"evaluation dataset {dataset!r}: use plain 'digits' (the embedded test split), "
            "not a shard",
        )
    x_train, _, x_test, y_test = digits_split(seed)
    _, x_test_f = apply_features(x_train, x_test, features)
    assert x_test_f is not None
    return Dataset(x_test_f, y_test)


def _file_train(
    ref: DatasetRef, features: str, partition: str, seed: int, alpha: float, labels_per_part: int
) -> Dataset:
    # A participant's own file is used whole: partition, alpha and labels_per_part do not apply.
    return _featurize_own(load_file(ref), features)


def _file_eval(dataset: str, features: str, seed: int) -> Dataset:
    return _featurize_own(load_file(parse_dataset_spec(dataset)), features)


SOURCES.register(
    "digits",
    DataSource("digits:K/N (shard K of N, 0 <= K < N)", _parse_digits, _digits_train, _digits_eval),
)
SOURCES.register(
    "npz", DataSource("npz:/path/file.npz", _file_parser("npz"), _file_train, _file_eval)
)
SOURCES.register(
    "csv", DataSource("csv:/path/file.csv", _file_parser("csv"), _file_train, _file_eval)
)
