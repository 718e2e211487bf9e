"""The data schema every node shares (the spec's `[data]`), and the checks of data against it.

A source reader (fednode/tables.py, idx.py, images.py) returns `Raw` data: numeric features
and the label values as the file stores them. `Schema` turns the labels into targets the
model trains on (class indices through `classes`, or float32 numbers for regression) and
checks the features against the model; any difference is a SchemaMismatch that names the
column, class, file or shape and what the schema wants, so a participant never trains on
data that means something else than on its peers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.errors import SchemaMismatch
from protocol.spec import class_text

# The channels of data.input_shape, as Pillow names the modes they are decoded to.
MODES = {1: "L", 3: "RGB"}
# The column of a table that says which rows are held out ("test") and which train ("train");
# never a feature.
SPLIT_COLUMN = "split"


@dataclass(frozen=True)
class Schema:
    """What the data must be. The defaults read a file as before there was a schema: the
    last column is the label, every other column a feature, labels are class indices."""

    label: str = ""  # tables: the label column; "" = the last column
    columns: tuple[str, ...] = ()  # tables: feature columns in order; () = all the others
    classes: tuple[str, ...] = ()  # label values in class order, as class_text; () = indices
    input_shape: tuple[int, ...] = ()  # images: (channels, height, width); () = as stored
    resize: bool = False  # images: resize to input_shape instead of refusing another size
    scale: float = 1.0  # images: pixel values times this, then (v - mean) / std per channel
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    test_fraction: float = 0.2  # the seeded local held-out split, when the source has none
    task: str = "classification"  # "regression": labels are float32 numbers
    inputs: int | None = None  # model.inputs: the feature count the model takes
    num_classes: int | None = None  # model.classes: class indices must be below it
    # Before any session's schema is known (a participant's registration): labels are taken
    # as found (any values, for counting) and a table's non-numeric columns are left out.
    probe: bool = False

    @classmethod
    def from_spec(cls, s: dict[str, Any]) -> Schema:
        """The schema of a validated spec (protocol.spec.validate)."""
        d, m = s["data"], s["model"]
        inputs = m.get("inputs")
        classes = m.get("classes")
        shape = tuple(d.get("input_shape", ()))
        model_shape = tuple(m.get("input_shape", ()))
        if not shape and len(model_shape) == 3 and model_shape[0] in MODES:
            shape = model_shape  # a model of images: the data is decoded to its shape
        return cls(
            label=d.get("label", ""),
            columns=tuple(d.get("columns", ())),
            classes=tuple(class_text(c) for c in d.get("classes", ())),
            input_shape=shape,
            resize=bool(d.get("resize", False)),
            scale=float(d.get("scale", 1.0)),
            mean=tuple(d.get("mean", ())),
            std=tuple(d.get("std", ())),
            test_fraction=float(d.get("test_fraction", 0.2)),
            task=str(m.get("task", "classification")),
            inputs=inputs if isinstance(inputs, int) else None,
            num_classes=classes if isinstance(classes, int) else None,
        )

    def channels(self) -> int | None:
        return self.input_shape[0] if self.input_shape else None

    def targets(self, labels: np.ndarray, source: str) -> np.ndarray:
        """The labels as the model's targets: int64 class indices, or float32 for
        regression. A value the schema does not know is a SchemaMismatch naming it."""
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise SchemaMismatch(f"{source}: labels must be 1-D, got shape {labels.shape}")
        if self.probe:
            return labels  # counted as found; nothing trains on a probe
        if self.task == "regression":
            return _numeric_labels(labels, source)
        if self.classes:
            return _through_classes(labels, self.classes, source)
        return _class_indices(labels, self.num_classes, source)

    def check_features(self, x: np.ndarray, source: str, names: tuple[str, ...] = ()) -> None:
        """The feature count against the model's inputs (model.inputs)."""
        if self.probe or self.inputs is None or x.shape[1] == self.inputs:
            return
        named = f" ({', '.join(names[:20])}{', …' if len(names) > 20 else ''})" if names else ""
        raise SchemaMismatch(
            f"{source}: the data has {x.shape[1]} features{named} but the model takes "
            f"model.inputs = {self.inputs}",
            hint="list the feature columns in data.columns, or fix model.inputs",
        )

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """Images [n, channels, height, width] as the model's flat float32 inputs:
        value × scale, then (value − mean) / std per channel (one value: every channel)."""
        x = pixels.astype(np.float32) * np.float32(self.scale)
        c = x.shape[1]
        for key, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (0, 1, c):
                raise SchemaMismatch(
                    f"data.{key} has {len(values)} values but the images have {c} channel(s)",
                    hint="give one value per channel, or one for all",
                )
        if self.mean:
            x -= np.asarray(self.mean * (c if len(self.mean) == 1 else 1), np.float32)[
                None, :, None, None
            ]
        if self.std:
            x /= np.asarray(self.std * (c if len(self.std) == 1 else 1), np.float32)[
                None, :, None, None
            ]
        return np.ascontiguousarray(x.reshape(x.shape[0], -1))

    def with_shape(self, shape: tuple[int, ...]) -> Schema:
        return dataclasses.replace(self, input_shape=shape)


# The schema of a participant's registration, before it knows any session: every row counts.
PROBE = Schema(probe=True, test_fraction=0.0)


@dataclass
class Raw:
    """Data as a source read it: features numeric, labels as stored."""

    x: np.ndarray  # [n, features], float32
    labels: np.ndarray  # [n], the values as stored (text, integers or numbers)
    source: str  # the file or folder, for messages
    test: np.ndarray | None = None  # [n] bool: rows the source itself holds out (t10k, split)
    names: tuple[str, ...] = ()  # the feature columns, for messages


def _examples(values: np.ndarray, bad: np.ndarray, k: int = 5) -> str:
    shown = sorted({class_text(v) for v in values[bad].tolist()})
    return ", ".join(repr(v) for v in shown[:k]) + (", …" if len(shown) > k else "")


def _through_classes(labels: np.ndarray, classes: tuple[str, ...], source: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    texts = [class_text(v) for v in labels.tolist()]
    out = np.fromiter((index.get(t, -1) for t in texts), dtype=np.int64, count=len(texts))
    unknown = out < 0
    if unknown.any():
        raise SchemaMismatch(
            f"{source}: label value(s) {_examples(labels, unknown)} are not in data.classes "
            f"({len(classes)} classes: {', '.join(repr(c) for c in classes[:10])}"
            f"{', …' if len(classes) > 10 else ''}); {int(unknown.sum())} row(s)",
            hint="every node must share data.classes; relabel these rows or drop them",
        )
    return out


def _class_indices(labels: np.ndarray, num_classes: int | None, source: str) -> np.ndarray:
    """Labels that are class indices already (data.classes = []): whole numbers 0..K-1."""
    if labels.dtype.kind in "biu":
        values = labels.astype(np.int64)
    else:
        try:
            f = labels.astype(np.float64)
        except (TypeError, ValueError):
            raise SchemaMismatch(
                f"{source}: labels such as {_examples(labels, np.ones(len(labels), bool), 3)} "
                "are not class indices, and data.classes is empty",
                hint="list the label values in data.classes (their order gives the classes)",
            ) from None
        whole = np.isfinite(f) & (f == np.round(f))
        if not whole.all():
            raise SchemaMismatch(
                f"{source}: labels must be whole numbers (class indices), found "
                f"{_examples(labels, ~whole)}",
                hint="list the label values in data.classes, or use model.task = regression",
            )
        values = f.astype(np.int64)
    high = num_classes if num_classes is not None else np.iinfo(np.int64).max
    bad = (values < 0) | (values >= high)
    if bad.any():
        raise SchemaMismatch(
            f"{source}: label(s) {_examples(values, bad)} are not class indices 0.."
            f"{'' if num_classes is None else num_classes - 1}"
            + ("" if num_classes is None else f" (model.classes = {num_classes})"),
            hint="list the label values in data.classes, or fix model.classes",
        )
    return values


def _numeric_labels(labels: np.ndarray, source: str) -> np.ndarray:
    try:
        y = labels.astype(np.float32)
    except (TypeError, ValueError):
        raise SchemaMismatch(
            f"{source}: regression labels must be numbers, found text such as "
            f"{_examples(labels, np.ones(len(labels), bool), 3)}"
        ) from None
    if not np.isfinite(y).all():
        raise SchemaMismatch(
            f"{source}: {int((~np.isfinite(y)).sum())} regression label(s) are missing or "
            "not finite"
        )
    return y
