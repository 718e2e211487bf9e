"""Write the example's CSV files, offline: a synthetic "patients" table from scikit-learn's
make_classification, with a header, named columns and a text label column ("risk": low or
high) that is not the last column. One file per participant.

    python make_data.py --out data --participants 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

FEATURES = ["age", "bmi", "systolic_bp", "cholesterol", "glucose", "heart_rate"]
LABEL = "risk"
CLASSES = ["low", "high"]  # class 0, class 1: the order data.classes gives them
# How each synthetic feature (mean 0, sd about 1) is drawn in the column's own units.
UNITS = {
    "age": (55, 12),
    "bmi": (27, 4),
    "systolic_bp": (130, 15),
    "cholesterol": (5.2, 1.0),
    "glucose": (5.8, 1.2),
    "heart_rate": (72, 10),
}


def patients(n: int, seed: int = 0) -> pd.DataFrame:
    """n rows: the label column first, then the features in their units (rounded)."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=n,
        n_features=len(FEATURES),
        n_informative=4,
        n_redundant=1,
        class_sep=2.0,
        random_state=seed,
    )
    frame = pd.DataFrame(
        {
            name: (x[:, i] * UNITS[name][1] + UNITS[name][0]).round(2)
            for i, name in enumerate(FEATURES)
        }
    )
    frame.insert(0, LABEL, np.asarray(CLASSES)[y])
    return frame


def write_participants(out: Path, participants: int, rows: int = 300, seed: int = 0) -> list[Path]:
    """participant-K.csv for each participant: an IID share of one table."""
    out.mkdir(parents=True, exist_ok=True)
    frame = patients(rows * participants, seed)
    paths = []
    for k, part in enumerate(np.array_split(np.arange(len(frame)), participants)):
        path = out / f"participant-{k}.csv"
        frame.iloc[part].to_csv(path, index=False)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data"), help="where to write")
    parser.add_argument("--participants", type=int, default=3, help="files to write")
    parser.add_argument("--rows", type=int, default=300, help="rows per file")
    args = parser.parse_args()
    for path in write_participants(args.out, args.participants, args.rows):
        print(path)


if __name__ == "__main__":
    main()
