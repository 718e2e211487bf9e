"""Write MNIST-format IDX files for the example, offline: scikit-learn's handwritten digits
(8x8, values 0..16) drawn as 28x28 grey images, one folder per participant.

Each folder holds what a participant's `--dataset idx:DIR` reads: `train-images-idx3-ubyte`,
`train-labels-idx1-ubyte` and the `t10k-` pair (its held-out test split), uncompressed.
Real MNIST files go in such a folder unchanged (README.md).

    python make_data.py --out data --participants 3
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 28  # MNIST's image side
BOX = 20  # MNIST centres each digit in a 20x20 box inside the 28x28 image
IMAGES, LABELS = "images-idx3-ubyte", "labels-idx1-ubyte"


def digits_28(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels): the digits as uint8 28x28
    images, a stratified 20 % held out (the t10k part)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    big = np.zeros((len(pixels), SIZE, SIZE), dtype=np.uint8)
    pad = (SIZE - BOX) // 2
    for i, img in enumerate(pixels):
        box = Image.fromarray(img).resize((BOX, BOX), Image.Resampling.BILINEAR)
        big[i, pad : pad + BOX, pad : pad + BOX] = np.asarray(box)
    labels = bunch.target.astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        big, labels, test_size=0.2, stratify=labels, random_state=seed
    )
    return x_train, y_train, x_test, y_test


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x00 0x00 0x08 ndim, each dimension big-endian."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_pair(folder: Path, prefix: str, x: np.ndarray, y: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{prefix}-{IMAGES}").write_bytes(idx_bytes(x))
    (folder / f"{prefix}-{LABELS}").write_bytes(idx_bytes(y))


def write_participants(out: Path, participants: int, seed: int = 0) -> list[Path]:
    """One folder per participant (participant-0, ...): an IID shard of the training images
    and one of the test images as its t10k pair. Returns the folders."""
    x_train, y_train, x_test, y_test = digits_28(seed)
    rng = np.random.default_rng(seed)
    train_parts = np.array_split(rng.permutation(len(y_train)), participants)
    test_parts = np.array_split(rng.permutation(len(y_test)), participants)
    folders = []
    for k, (tr, te) in enumerate(zip(train_parts, test_parts, strict=True)):
        folder = out / f"participant-{k}"
        write_pair(folder, "train", x_train[tr], y_train[tr])
        write_pair(folder, "t10k", x_test[te], y_test[te])
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
