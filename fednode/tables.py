"""Tables (csv:PATH, parquet:PATH) read with pandas, checked against the schema's columns.

The label column is `data.label` (default: the last column), the features are
`data.columns` in that order (default: every other column in the file's order), and a column
named `split` says which rows are held out ("test") and which train ("train"). A missing or
extra column, or a feature column that is not numeric, is a SchemaMismatch naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fednode.schema import SPLIT_COLUMN, Raw, Schema
from protocol.errors import DataError, SchemaMismatch

SPLIT_VALUES = ("train", "test")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read(path: Path, kind: str) -> pd.DataFrame:
    try:
        if kind == "parquet":
            frame = pd.read_parquet(path, engine="pyarrow")
        else:
            frame = pd.read_csv(path, skip_blank_lines=True)
            # A file without a header row: its first row was read as the column names.
            if len(frame.columns) and all(_is_number(str(c)) for c in frame.columns):
                frame = pd.read_csv(path, header=None, skip_blank_lines=True)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a {kind} file") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: no data rows") from None
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        # pyarrow's ArrowInvalid is a ValueError; a damaged file says what it is
        raise DataError(f"{path}: not a readable {kind} file ({e})") from None
    frame.columns = [str(c) for c in frame.columns]
    return frame


def read_table(path: Path, kind: str, schema: Schema) -> Raw:
    """A table's features and labels, and its split column's held-out rows if it has one."""
    frame = _read(path, kind)
    names = list(frame.columns)
    if len(frame) == 0:
        raise DataError(f"{path}: no data rows")
    label = schema.label or next((c for c in reversed(names) if c != SPLIT_COLUMN), "")
    if label not in names:
        raise SchemaMismatch(
            f"{path}: no label column {label!r} (data.label); the file has columns "
            f"{_listed(names)}",
            hint="name the label column in data.label, or rename the file's column",
        )
    others = [c for c in names if c not in (label, SPLIT_COLUMN)]
    if schema.columns:
        missing = [c for c in schema.columns if c not in names]
        if missing:
            raise SchemaMismatch(
                f"{path}: missing column(s) {_listed(missing)}; the schema wants the feature "
                f"columns {_listed(schema.columns)} (data.columns) and the label {label!r}",
            )
        extra = [c for c in others if c not in schema.columns]
        if extra:
            raise SchemaMismatch(
                f"{path}: extra column(s) {_listed(extra)} not in the schema's feature "
                f"columns {_listed(schema.columns)} (data.columns)",
                hint="drop the column(s), or add them to data.columns on every node",
            )
        features = list(schema.columns)
    elif schema.probe:  # a registration's count: what can be counted as a feature is
        features = [c for c in others if pd.api.types.is_numeric_dtype(frame[c])]
    else:
        features = others
    if not features and not schema.probe:
        raise SchemaMismatch(f"{path}: no feature column besides the label {label!r}")
    for c in features:
        col = frame[c]
        if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
            sample = ", ".join(repr(v) for v in col.dropna().astype(str).unique()[:3])
            raise SchemaMismatch(
                f"{path}: feature column {c!r} is not numeric (values such as {sample})",
                hint="every feature must be a number; leave text columns out of data.columns",
            )
        missing_values = int(col.isna().sum())
        if missing_values:
            raise DataError(f"{path}: column {c!r} has {missing_values} missing value(s)")
    x = frame[features].to_numpy(dtype=np.float32) if features else np.zeros((len(frame), 0))
    if not np.isfinite(x).all():
        raise DataError(f"{path}: {int((~np.isfinite(x)).sum())} feature value(s) are not finite")
    return Raw(
        np.ascontiguousarray(x, dtype=np.float32),
        frame[label].to_numpy(),
        str(path),
        test=_split_rows(frame, path) if SPLIT_COLUMN in names and label != SPLIT_COLUMN else None,
        names=tuple(features),
    )


def _split_rows(frame: pd.DataFrame, path: Path) -> np.ndarray:
    values = frame[SPLIT_COLUMN].astype(str).str.strip().str.lower()
    bad = ~values.isin(SPLIT_VALUES)
    if bad.any():
        shown = ", ".join(repr(v) for v in frame[SPLIT_COLUMN][bad].astype(str).unique()[:3])
        raise DataError(
            f"{path}: column {SPLIT_COLUMN!r} must say train or test, found {shown}",
            hint=f"a column named {SPLIT_COLUMN!r} marks the held-out rows",
        )
    return (values == "test").to_numpy()


def _listed(names: list[str] | tuple[str, ...], most: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return f"[{shown}{', …' if len(names) > most else ''}]"
