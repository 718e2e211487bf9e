"""Data sources (csv, parquet, idx, images) and the schema every node shares.

Every file is written by the test into tmp_path; each source must load exactly what was
written, and every difference from the schema must be refused with a message naming the
column, class, file or shape.
"""

from __future__ import annotations

import gzip
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fednode import data, idx, images
from fednode.data import SOURCES, load_eval, load_partition, load_split, parse_dataset_spec
from fednode.schema import Schema
from protocol import spec as specmod
from protocol.errors import DataError, SchemaMismatch

CLASSES = ["setosa", "versicolor", "virginica"]


def schema(**data: Any) -> Schema:
    """The schema of a spec with these [data] fields (model: 4 inputs, 3 classes)."""
    model = data.pop("model", {"inputs": 4, "classes": 3})
    return Schema.from_spec(specmod.validate({"data": data, "model": model}))


def table(n: int = 30, seed: int = 0, classes: list[str] = CLASSES) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, 4)).round(4), columns=["a", "b", "c", "d"])
    frame.insert(1, "species", [classes[i % len(classes)] for i in range(n)])  # not last
    return frame


def test_csv_with_header_string_labels_and_a_named_label_column(tmp_path: Path) -> None:
    frame = table()
    frame.to_csv(tmp_path / "t.csv", index=False)
    s = schema(label="species", classes=CLASSES, columns=["d", "c", "b", "a"], test_fraction=0)
    ds = load_partition(
        f"csv:{tmp_path / 't.csv'}", features="none", partition="iid", seed=0, schema=s
    )
    # features in the schema's order, not the file's; labels through classes
    assert np.allclose(ds.x, frame[["d", "c", "b", "a"]].to_numpy(np.float32))
    assert ds.y.dtype == np.int64
    assert ds.y.tolist() == [CLASSES.index(v) for v in frame["species"]]


def test_classes_compare_as_text_across_formats(tmp_path: Path) -> None:
    """A CSV's "7" and a parquet file's integer 7 are the same class as the spec's 7."""
    frame = pd.DataFrame(
        {"a": [1.0, 2.0, 3.0, 4.0], "b": [0.0] * 4, "c": [1.0] * 4, "d": [2.0] * 4}
    )
    frame["label"] = [7, 3, 7, 5]
    frame.to_parquet(tmp_path / "t.parquet", engine="pyarrow")
    frame.to_csv(tmp_path / "t.csv", index=False)
    s = schema(classes=[3, "5", 7], test_fraction=0)
    for ref in (f"parquet:{tmp_path / 't.parquet'}", f"csv:{tmp_path / 't.csv'}"):
        ds = load_partition(ref, features="none", partition="iid", seed=0, schema=s)
        assert ds.y.tolist() == [2, 0, 2, 1], ref
        assert np.array_equal(ds.x[:, 0], [1, 2, 3, 4])


def test_parquet_loads_what_was_written(tmp_path: Path) -> None:
    frame = table(seed=3)
    frame.to_parquet(tmp_path / "t.parquet", engine="pyarrow")
    s = schema(label="species", classes=CLASSES, test_fraction=0)
    ds = load_partition(
        f"parquet:{tmp_path / 't.parquet'}", features="none", partition="iid", seed=0, schema=s
    )
    assert np.allclose(ds.x, frame[["a", "b", "c", "d"]].to_numpy(np.float32))
    assert ds.y.tolist() == [i % 3 for i in range(30)]


def test_held_out_split_seeded_or_from_a_split_column(tmp_path: Path) -> None:
    frame = table(n=40)
    frame.to_csv(tmp_path / "t.csv", index=False)
    ref = f"csv:{tmp_path / 't.csv'}"
    s = schema(label="species", classes=CLASSES)  # test_fraction 0.2
    train, test = load_split(ref, features="none", seed=5, schema=s)
    assert (len(train), len(test)) == (32, 8)
    again = load_split(ref, features="none", seed=5, schema=s)[1]
    assert np.array_equal(test.x, again.x)  # the same rows on every run of the seed
    other = load_split(ref, features="none", seed=6, schema=s)[1]
    assert not np.array_equal(test.x, other.x)
    # standardize: statistics of the training part only
    st_train, _ = load_split(ref, features="standardize", seed=5, schema=s)
    assert np.allclose(st_train.x.mean(axis=0), 0, atol=1e-5)

    frame["split"] = ["test" if i < 10 else "train" for i in range(40)]
    frame.to_csv(tmp_path / "s.csv", index=False)
    train, test = load_split(f"csv:{tmp_path / 's.csv'}", features="none", seed=5, schema=s)
    assert (len(train), len(test)) == (30, 10)  # the column, not test_fraction
    assert np.allclose(test.x, frame[["a", "b", "c", "d"]].to_numpy(np.float32)[:10])
    # the coordinator evaluates a file on its held-out rows
    ev = load_eval(f"csv:{tmp_path / 's.csv'}", features="none", seed=0, schema=s)
    assert ev is not None and len(ev) == 10
    frame["split"] = "validation"
    frame.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="'split' must say train or test, found 'validation'"):
        load_split(f"csv:{tmp_path / 'bad.csv'}", features="none", schema=s)


def test_regression_labels_are_float32(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0], "y": [0.5, -1.25]})
    frame.to_csv(tmp_path / "r.csv", index=False)
    s = Schema(task="regression", test_fraction=0)
    ds = load_partition(
        f"csv:{tmp_path / 'r.csv'}", features="none", partition="iid", seed=0, schema=s
    )
    assert ds.y.dtype == np.float32 and ds.y.tolist() == [0.5, -1.25]


@pytest.mark.parametrize(
    ("fields", "edit", "message"),
    [
        (
            {"label": "species", "columns": ["a", "b", "c", "e"]},
            None,
            r"missing column\(s\) \['e'\]; the schema wants the feature columns "
            r"\['a', 'b', 'c', 'e'\]",
        ),
        (
            {"label": "species", "columns": ["a", "b", "c"], "model": {"inputs": 3, "classes": 3}},
            None,
            r"extra column\(s\) \['d'\] not in the schema's feature columns",
        ),
        ({"label": "kind"}, None, r"no label column 'kind' \(data.label\)"),
        (
            {"label": "species", "classes": ["setosa", "versicolor", "daisy"]},
            None,
            r"label value\(s\) 'virginica' are not in data.classes \(3 classes: 'setosa', "
            r"'versicolor', 'daisy'\); 10 row\(s\)",
        ),
        (
            {"label": "species", "classes": CLASSES, "model": {"inputs": 5, "classes": 3}},
            None,
            r"the data has 4 features \(a, b, c, d\) but the model takes model.inputs = 5",
        ),
        (
            {"label": "species"},
            None,
            r"labels such as .* are not class indices, and data.classes is empty",
        ),
        (
            {"label": "species", "classes": CLASSES},
            lambda f: f.assign(b=["x"] * len(f)),
            r"feature column 'b' is not numeric \(values such as 'x'\)",
        ),
    ],
)
def test_table_mismatches_are_refused_naming_what_differs(
    tmp_path: Path, fields: dict[str, Any], edit: Any, message: str
) -> None:
    frame = table()
    if edit is not None:
        frame = edit(frame)
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(SchemaMismatch, match=message) as err:
        load_split(f"csv:{tmp_path / 't.csv'}", features="none", schema=schema(**fields))
    assert err.value.code == "SCHEMA_MISMATCH" and str(tmp_path / "t.csv") in err.value.message


# ----------------------------------------------------------------------------------- idx


def idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype("uint8"): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.tobytes()


def write_idx(folder: Path, prefix: str, x: np.ndarray, y: np.ndarray, gz: bool) -> None:
    folder.mkdir(exist_ok=True)
    for name, arr in ((idx.IMAGES, x), (idx.LABELS, y)):
        blob = idx_bytes(arr)
        path = folder / f"{prefix}-{name}{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(blob) if gz else blob)


def mnist_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 6, 5), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_loads_what_was_written_with_and_without_t10k(tmp_path: Path, gz: bool) -> None:
    x, y = mnist_like(12, 0)
    write_idx(tmp_path / "m", "train", x, y, gz)
    s = schema(input_shape=[1, 6, 5], scale=1 / 255, model={"inputs": 30, "classes": 10})
    ref = f"idx:{tmp_path / 'm'}"
    whole = load_partition(ref, features="none", partition="iid", seed=0, schema=s)
    assert np.allclose(whole.x, x.reshape(12, 30) / 255, atol=1e-6)
    assert whole.y.tolist() == y.tolist()
    train, test = load_split(ref, features="none", seed=0, schema=s)  # no t10k: 0.2 seeded
    assert (len(train), len(test)) == (10, 2)

    xt, yt = mnist_like(4, 1)
    write_idx(tmp_path / "m", "t10k", xt, yt, gz)
    train, test = load_split(ref, features="none", seed=0, schema=s)
    assert np.allclose(train.x, x.reshape(12, 30) / 255, atol=1e-6)
    assert (
        np.allclose(test.x, xt.reshape(4, 30) / 255, atol=1e-6) and test.y.tolist() == yt.tolist()
    )
    ev = load_eval(ref, features="none", seed=0, schema=s)  # the coordinator: the t10k files
    assert ev is not None and ev.y.tolist() == yt.tolist()

    with pytest.raises(
        SchemaMismatch,
        match=r"1 channel, 6x5 \(rows x cols\); the schema wants data.input_shape = \[1, 5, 6\]",
    ):
        load_split(
            ref,
            features="none",
            schema=schema(input_shape=[1, 5, 6], model={"inputs": 30, "classes": 10}),
        )
    with pytest.raises(
        SchemaMismatch, match=r"the data has 30 features but the model takes model\.inputs = 64"
    ):
        load_split(ref, features="none", schema=schema(model={"inputs": 64, "classes": 10}))


def _refused_without_allocating(path: Path, message: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=message) as err:
            idx.read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in err.value.message
    assert peak < 4 * 1024 * 1024, f"{peak:,} bytes allocated refusing {path.name}"


def test_hostile_or_damaged_idx_headers_are_refused_without_allocating(tmp_path: Path) -> None:
    # 60000 x 100 x 100 bytes (600 MB, under the cap) claimed by a file of 16 bytes of values
    claims = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 60000, 100, 100)
    (tmp_path / "short").write_bytes(claims + b"\x00" * 16)
    _refused_without_allocating(
        tmp_path / "short", r"the file is 32 bytes but its header .* needs 600,000,016"
    )
    (tmp_path / "short.gz").write_bytes(gzip.compress(claims + b"\x00" * 16))
    _refused_without_allocating(
        tmp_path / "short.gz", "decompresses to 32 bytes but its IDX header"
    )
    huge = bytes([0, 0, 0x0E, 3]) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1)
    (tmp_path / "huge").write_bytes(huge)
    _refused_without_allocating(tmp_path / "huge", "more than the 1,073,741,824 bytes")
    (tmp_path / "stub").write_bytes(b"\x00\x00")
    _refused_without_allocating(
        tmp_path / "stub", "truncated IDX file: 2 of the 4 bytes of its magic number"
    )
    (tmp_path / "dims").write_bytes(bytes([0, 0, 0x08, 3]) + b"\x00\x00\x00\x05")
    _refused_without_allocating(tmp_path / "dims", "of its 3 dimensions")
    (tmp_path / "magic").write_bytes(b"\x89PNG" + b"\x00" * 20)
    _refused_without_allocating(tmp_path / "magic", "not an IDX file: magic number 89504e47")
    (tmp_path / "code").write_bytes(bytes([0, 0, 0x07, 1]) + struct.pack(">I", 1) + b"\x00")
    _refused_without_allocating(tmp_path / "code", "unknown IDX type code 0x07")
    (tmp_path / "zero").write_bytes(bytes([0, 0, 0x08, 2]) + struct.pack(">2I", 0, 5))
    _refused_without_allocating(tmp_path / "zero", r"dimensions \[0, 5\] hold no values")
    (tmp_path / "extra").write_bytes(
        bytes([0, 0, 0x08, 1]) + struct.pack(">I", 2) + b"\x01\x02\x03"
    )
    _refused_without_allocating(tmp_path / "extra", "is 11 bytes but its header")
    (tmp_path / "notgz.gz").write_bytes(b"\x00" * 40)
    _refused_without_allocating(tmp_path / "notgz.gz", "not a readable gzip file")


def test_idx_folder_errors(tmp_path: Path) -> None:
    x, y = mnist_like(3, 0)
    write_idx(tmp_path / "m", "train", x, y[:2], gz=False)
    with pytest.raises(DataError, match="holds 3 images but train-labels-idx1-ubyte 2"):
        load_split(f"idx:{tmp_path / 'm'}", features="none")
    (tmp_path / "m" / f"train-{idx.LABELS}").unlink()
    with pytest.raises(DataError, match="no train-labels-idx1-ubyte"):
        load_split(f"idx:{tmp_path / 'm'}", features="none")
    with pytest.raises(DataError, match="no such folder"):
        load_split(f"idx:{tmp_path / 'nothing'}", features="none")


# -------------------------------------------------------------------------------- images


def image_folder(
    root: Path, sizes: dict[str, list[tuple[int, int, str]]], fmt: str = "PNG"
) -> None:
    rng = np.random.default_rng(0)
    for cls, specs in sizes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k, (w, h, mode) in enumerate(specs):
            shape = (h, w) if mode == "L" else (h, w, 3)
            img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
            img.save(root / cls / f"{k}.{'png' if fmt == 'PNG' else 'jpg'}", fmt)


def test_a_png_folder_loads_what_was_written(tmp_path: Path) -> None:
    image_folder(tmp_path / "imgs", {"cat": [(4, 3, "L")] * 2, "dog": [(4, 3, "L")] * 3})
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("not an image")  # ignored
    s = schema(classes=["dog", "cat"], input_shape=[1, 3, 4], model={"inputs": 12, "classes": 2})
    ds = load_partition(
        f"images:{tmp_path / 'imgs'}", features="none", partition="iid", seed=0, schema=s
    )
    first = np.asarray(Image.open(tmp_path / "imgs" / "cat" / "0.png"), dtype=np.float32)
    assert np.array_equal(ds.x[0], first.reshape(-1))  # folders in name order, then files
    assert ds.y.tolist() == [1, 1, 0, 0, 0]
    # per-channel normalisation: (v × scale − mean) / std
    s2 = schema(
        classes=["dog", "cat"],
        input_shape=[1, 3, 4],
        scale=0.5,
        mean=[10.0],
        std=[2.0],
        model={"inputs": 12, "classes": 2},
    )
    ds2 = load_partition(
        f"images:{tmp_path / 'imgs'}", features="none", partition="iid", seed=0, schema=s2
    )
    assert np.allclose(ds2.x, (ds.x * 0.5 - 10) / 2)


def test_rgb_jpeg_folder_and_its_channels(tmp_path: Path) -> None:
    image_folder(tmp_path / "imgs", {"0": [(5, 5, "RGB")], "1": [(5, 5, "RGB")]}, fmt="JPEG")
    s = schema(input_shape=[3, 5, 5], model={"inputs": 75, "classes": 2})
    ds = load_partition(
        f"images:{tmp_path / 'imgs'}", features="none", partition="iid", seed=0, schema=s
    )
    assert ds.x.shape == (2, 75) and ds.y.tolist() == [0, 1]  # folder names as class indices
    with pytest.raises(
        SchemaMismatch,
        match=r"0\.jpg: a colour image \(mode RGB\); the schema wants 1 channel\(s\) \(L\)",
    ):
        load_split(
            f"images:{tmp_path / 'imgs'}",
            features="none",
            schema=schema(input_shape=[1, 5, 5], model={"inputs": 25, "classes": 2}),
        )


def test_image_size_mismatch_refused_or_resized(tmp_path: Path) -> None:
    image_folder(tmp_path / "imgs", {"cat": [(4, 3, "L"), (6, 5, "L")]})
    ref = f"images:{tmp_path / 'imgs'}"
    fields = {
        "classes": ["cat", "dog"],
        "input_shape": [1, 3, 4],
        "model": {"inputs": 12, "classes": 2},
    }
    with pytest.raises(
        SchemaMismatch, match=r"cat/1\.png: 6x5 pixels \(width x height\); the schema wants 4x3"
    ):
        load_split(ref, features="none", schema=schema(**fields))
    ds = load_partition(
        ref, features="none", partition="iid", seed=0, schema=schema(resize=True, **fields)
    )
    assert ds.x.shape == (2, 12)
    # without input_shape the first image sets it
    with pytest.raises(SchemaMismatch, match=r"1\.png: 6x5 pixels"):
        load_split(
            ref,
            features="none",
            schema=schema(classes=["cat", "dog"], model={"inputs": 12, "classes": 2}),
        )


def test_decompression_bombs_and_non_images_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_folder(tmp_path / "imgs", {"0": [(40, 30, "L")]})
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(DataError, match=r"0\.png: 40x30 pixels, more than the 1,000 decoded here"):
        load_split(f"images:{tmp_path / 'imgs'}", features="none")
    (tmp_path / "imgs" / "0" / "0.png").write_bytes(b"GIF89a not really")
    with pytest.raises(DataError, match=r"0\.png: not a readable image"):
        load_split(f"images:{tmp_path / 'imgs'}", features="none")


# ------------------------------------------------------------------------- the registry


def test_every_file_source_is_a_coordinator_evaluation_source_and_none_means_no_data() -> None:
    assert set(SOURCES.names()) - {"digits"} == set(specmod.EVAL_SOURCES)
    for kind in specmod.EVAL_SOURCES:
        assert parse_dataset_spec(f"{kind}:/x").kind == kind
        assert (
            specmod.validate({"data": {"dataset": f"{kind}:/x"}})["data"]["dataset"] == f"{kind}:/x"
        )
    assert load_eval("none", features="none", seed=0) is None


def test_the_schema_in_the_spec_is_checked() -> None:
    for data_fields, message in [
        ({"classes": ["a", "b"]}, "data.classes lists 2 values but the model has 10 classes"),
        ({"classes": ["a", "a"]}, "'a' appears twice"),
        ({"classes": [3, "3"]}, "'3' appears twice"),
        ({"input_shape": [2, 8, 8]}, "1 or 3 channels"),
        (
            {"input_shape": [3, 8, 8], "mean": [0.5, 0.5]},
            "data.mean has 2 values but data.input_shape has 3",
        ),
        ({"std": [0.0]}, "must be > 0"),
        ({"columns": ["a", 3]}, "data.columns"),
        ({"label": "y", "columns": ["a", "y"]}, "data.label 'y' is also in data.columns"),
    ]:
        with pytest.raises(specmod.SpecError, match=message):
            specmod.validate({"data": data_fields})


def test_digits_are_checked_against_the_schema_too() -> None:
    with pytest.raises(
        SchemaMismatch,
        match=r"digits:0/3: the data has 64 features but the model takes model\.inputs = 10",
    ):
        load_partition(
            "digits:0/3", features="none", partition="iid", seed=0, schema=Schema(inputs=10)
        )
    train, test = load_split("digits:0/3", features="scale16", seed=0)
    assert len(train) == 479 and len(test) == 120
    assert data.probe(parse_dataset_spec("digits:0/3")).x.shape == (479, 64)


def test_a_model_of_images_gives_the_data_its_shape(tmp_path: Path) -> None:
    """data.input_shape = [] takes model.input_shape when that is [channels, height, width]."""
    x, y = mnist_like(5, 0)
    write_idx(tmp_path / "m", "train", x, y, gz=False)
    spec = specmod.validate({"model": {"inputs": 30}})
    spec["model"]["input_shape"] = [1, 5, 6]  # what a "layers" model declares
    s = Schema.from_spec(spec)
    assert s.input_shape == (1, 5, 6)
    with pytest.raises(SchemaMismatch, match=r"the schema wants data.input_shape = \[1, 5, 6\]"):
        load_split(f"idx:{tmp_path / 'm'}", features="none", schema=s)
