"""Write the example's image folders, offline: scikit-learn's handwritten digits as 16x16
grey PNG files, one subfolder per class (zero, one, ..., nine), one folder per participant.

    python make_data.py --out data --participants 3

A folder of your own photos works the same way: images:DIR reads DIR/<class>/<image>.png
(or .jpg); set data.input_shape, data.resize and data.classes in spec.toml to match.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SIZE = 16


def write_participants(out: Path, participants: int, seed: int = 0) -> list[Path]:
    """participant-K/<class>/<n>.png for each participant: an IID share of the digits."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    order = np.random.default_rng(seed).permutation(len(pixels))
    folders = []
    for k, part in enumerate(np.array_split(order, participants)):
        folder = out / f"participant-{k}"
        for name in CLASSES:
            (folder / name).mkdir(parents=True, exist_ok=True)
        for i in part:
            img = Image.fromarray(pixels[i]).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            img.save(folder / CLASSES[bunch.target[i]] / f"{i:04d}.png")
        folders.append(folder)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data"), help="where to write")
    parser.add_argument("--participants", type=int, default=3, help="folders to write")
    args = parser.parse_args()
    for folder in write_participants(args.out, args.participants):
        print(folder)


if __name__ == "__main__":
    main()
