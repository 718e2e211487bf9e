"""Image folders (images:DIR): one subfolder per class, PNG or JPEG files, read with Pillow.

The subfolder's name is the label value (mapped through data.classes like a table's labels).
Each image's size is read from its header and refused above MAX_PIXELS before it is decoded
(a decompression bomb costs nothing), decoded to the schema's channels (1: grey "L", 3:
"RGB"; a palette or an alpha channel is converted, a colour image where the schema wants grey
or a grey one where it wants colour is refused), and resized only if data.resize says so;
otherwise an image of another size is refused naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fednode.schema import MODES, Raw, Schema
from protocol.errors import DataError, SchemaMismatch

SUFFIXES = (".png", ".jpg", ".jpeg")
FORMATS = ("PNG", "JPEG")
# The largest image decoded, in pixels (width x height): far above any model input, far
# below what would exhaust memory.
MAX_PIXELS = 4096 * 4096
# Pillow's own modes by the channels they hold once converted (alpha dropped, palette
# expanded); a mode not listed is converted to RGB.
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def read_image_folder(folder: Path, schema: Schema) -> Raw:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (images: names a folder of class folders)")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [
        (c.name, f)
        for c in classes
        for f in sorted(c.iterdir())
        if f.is_file() and f.suffix.lower() in SUFFIXES and not f.name.startswith(".")
    ]
    if not files:
        raise DataError(
            f"{folder}: no PNG or JPEG images in class subfolders",
            hint="put each class's images in a subfolder named after the class",
        )
    shape = schema.input_shape
    pixels = []
    for _, path in files:
        arr = _decode(path, schema, shape)
        if not shape:  # the first image sets the shape every other must have
            shape = (arr.shape[0], arr.shape[1], arr.shape[2])
            schema = schema.with_shape(shape)
        pixels.append(arr)
    labels = np.array([name for name, _ in files], dtype=object)
    return Raw(schema.normalise(np.stack(pixels)), labels, str(folder))


def _decode(path: Path, schema: Schema, shape: tuple[int, ...]) -> np.ndarray:
    """One image as uint8 [channels, height, width]."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format not in FORMATS:
                    raise DataError(f"{path}: a {img.format} image; PNG or JPEG are read")
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise DataError(
                        f"{path}: {w}x{h} pixels, more than the {MAX_PIXELS:,} decoded here"
                    )
                channels = 1 if img.mode in GREY_MODES else 3
                want = shape[0] if shape else channels
                if channels != want:
                    raise SchemaMismatch(
                        f"{path}: a {'grey' if channels == 1 else 'colour'} image (mode "
                        f"{img.mode}); the schema wants {want} channel(s) ({MODES[want]})"
                        + (f", data.input_shape = {list(shape)}" if shape else ", like the first"),
                    )
                img = img.convert(MODES[want])
                if shape and (w, h) != (shape[2], shape[1]):
                    if not schema.resize:
                        raise SchemaMismatch(
                            f"{path}: {w}x{h} pixels (width x height); the schema wants "
                            f"{shape[2]}x{shape[1]} (data.input_shape = {list(shape)})",
                            hint="resize the images, or set data.resize = true",
                        )
                    img = img.resize((shape[2], shape[1]), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
    except DataError:  # SchemaMismatch too: already names the file
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: refused as a decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    return arr[None, :, :] if arr.ndim == 2 else np.transpose(arr, (2, 0, 1))
