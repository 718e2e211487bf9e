"""Write the example's parquet files, offline: a synthetic "buildings" table from
scikit-learn's make_regression (a numeric target, energy_kwh), with a `split` column that
marks each participant's held-out rows ("test") and its training rows ("train").

    python make_data.py --out data --participants 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

FEATURES = ["floor_area", "occupants", "outdoor_temp", "insulation", "window_ratio", "age"]
LABEL = "energy_kwh"
TEST_FRACTION = 0.2


def buildings(n: int, seed: int = 0) -> pd.DataFrame:
    """n rows: the features, then the target scaled to a mean of 40 and an sd of 10."""
    from sklearn.datasets import make_regression

    x, y = make_regression(
        n_samples=n, n_features=len(FEATURES), n_informative=4, noise=10.0, random_state=seed
    )
    frame = pd.DataFrame(x.round(3), columns=FEATURES)
    frame[LABEL] = (40 + 10 * (y - y.mean()) / y.std()).round(2)
    return frame


def write_participants(out: Path, participants: int, rows: int = 300, seed: int = 0) -> list[Path]:
    """participant-K.parquet for each participant: an IID share of one table, its last
    TEST_FRACTION of rows marked test in the split column."""
    out.mkdir(parents=True, exist_ok=True)
    frame = buildings(rows * participants, seed)
    paths = []
    for k, part in enumerate(np.array_split(np.arange(len(frame)), participants)):
        mine = frame.iloc[part].reset_index(drop=True)
        n_test = int(len(mine) * TEST_FRACTION)
        mine["split"] = ["train"] * (len(mine) - n_test) + ["test"] * n_test
        path = out / f"participant-{k}.parquet"
        mine.to_parquet(path, engine="pyarrow", index=False)
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
