"""Calibration data for any model input, each source checked against the model's input shape.

- an npz file with `x` (N, C, H, W) and optionally `y` (N,) labels (`--calib-npz`);
- a folder of images (`--calib-images`, read with Pillow): resized to H x W, grey for C=1 and
  RGB for C=3, scaled to [0, 1] then normalised by `mean`/`std` if given (per channel); images
  in sub-folders are labelled by the sorted sub-folder names (torchvision's ImageFolder
  convention), images directly in the folder are unlabelled;
- Fashion-MNIST (`--calib-fmnist N`): 1x28x28 grey images, padded for 1xHxW inputs with H, W >=
  28, refused for anything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from heinfer.errors import ModelFormatError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
Calibration = tuple[np.ndarray | None, np.ndarray | None]


def check_shape(x: Any, input_shape: tuple[int, ...], source: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == len(input_shape):
        x = x[None]
    if x.ndim != len(input_shape) + 1 or x.shape[1:] != tuple(input_shape) or not len(x):
        raise ModelFormatError(f"calibration data ({source}) has shape {x.shape}; the model "
                               f"takes inputs of shape {tuple(input_shape)}, so calibration "
                               f"needs (N, {', '.join(map(str, input_shape))})")
    if not np.all(np.isfinite(x)):
        raise ModelFormatError(f"calibration data ({source}) holds NaN or infinite values")
    return x


def _labels(y: Any, n: int, source: str) -> np.ndarray | None:
    if y is None:
        return None
    y = np.asarray(y)
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise ModelFormatError(f"calibration labels ({source}) have shape {y.shape} and type "
                               f"{y.dtype}; expected {n} integer labels")
    return y


def as_calibration(data: Any, input_shape: tuple[int, ...]) -> Calibration:
    """None, images, or (images, labels): numpy or torch tensors."""
    if data is None:
        return None, None
    x, y = (data if isinstance(data, tuple) else (data, None))
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else x
    y = y.detach().cpu().numpy() if hasattr(y, "detach") else y
    x = check_shape(x, input_shape, "calibration argument")
    return x, _labels(y, len(x), "calibration argument")


def from_npz(path: str | Path, input_shape: tuple[int, ...]) -> Calibration:
    try:
        with np.load(path) as data:
            if "x" not in data:
                raise ModelFormatError(f"{path}: no array 'x' (found {sorted(data.files)}); "
                                       "save with np.savez(path, x=images, y=labels)")
            x, y = data["x"], data["y"] if "y" in data else None
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"cannot read calibration file {path}: {e}") from e
    x = check_shape(x, input_shape, str(path))
    return x, _labels(y, len(x), str(path))


def from_images(folder: str | Path, input_shape: tuple[int, ...], limit: int | None = None,
                mean: list[float] | None = None, std: list[float] | None = None) -> Calibration:
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFormatError(f"calibration images: {folder} is not a folder")
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise ModelFormatError(f"calibration images need a model taking (1 or 3, H, W) inputs; "
                               f"this one takes {tuple(input_shape)}: use --calib-npz")
    c, h, w = input_shape
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(p, None) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    files += [(p, i) for i, cls in enumerate(classes)
              for p in sorted((folder / cls).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if limit:
        files = files[:limit]
    if not files:
        raise ModelFormatError(f"calibration images: no image files ({sorted(IMAGE_SUFFIXES)}) "
                               f"in {folder} or its sub-folders")
    if len({label is None for _, label in files}) > 1:
        raise ModelFormatError(f"calibration images: {folder} mixes images in the folder and in "
                               "class sub-folders; use one or the other")
    images = []
    for p, _ in files:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                a = np.asarray(im, dtype=np.float64) / 255.0
        except (OSError, UnidentifiedImageError) as e:
            raise ModelFormatError(f"calibration image {p} cannot be read: {e}") from e
        images.append(a[None] if c == 1 else a.transpose(2, 0, 1))
    x = np.stack(images)
    for name, v in (("mean", mean), ("std", std)):
        if v is not None and len(v) not in (1, c):
            raise ModelFormatError(f"--image-{name} has {len(v)} values; the model has {c} "
                                   "channels")
    if mean is not None:
        x = x - np.asarray(mean, dtype=np.float64).reshape(-1, 1, 1)
    if std is not None:
        x = x / np.asarray(std, dtype=np.float64).reshape(-1, 1, 1)
    y = None if files[0][1] is None else np.array([label for _, label in files])
    return check_shape(x, input_shape, str(folder)), y


def from_fmnist(n: int, input_shape: tuple[int, ...]) -> Calibration:
    from heinfer_models import fashion_mnist

    shape = tuple(input_shape)
    if len(shape) != 3 or shape[0] != 1 or shape[1] < 28 or shape[2] < 28:
        raise ModelFormatError(f"--calib-fmnist gives 1x28x28 grey images (padded for 1xHxW "
                               f"with H, W >= 28); this model takes {shape}: use --calib-npz "
                               "or --calib-images")
    images, labels = fashion_mnist.load("train")
    return fashion_mnist.normalize(images[:n], shape), labels[:n]
