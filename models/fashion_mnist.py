"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (no download at run time)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DATA_DIR = Path(os.environ.get("HEINFER_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Normalisation used by every model in the zoo (pixel/255 - MEAN) / STD.
MEAN, STD = 0.2860, 0.3530


def _read_idx(path: Path) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: install the Debian package dataset-fashion-mnist "
            "(`make setup` does) or set HEINFER_FMNIST_DIR"
        )
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 28, 28), labels uint8 (N,)) for split 'train' or 't10k'/'test'."""
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}[split]
    images = _read_idx(DATA_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    return images, labels


def normalize(images: np.ndarray, input_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """uint8 (N, 28, 28) -> float64 (N, 1, 28, 28), the models' input convention; with a
    model's `input_shape` (e.g. (1, 32, 32)) the images are padded to it (`fit_to`)."""
    x = (images.astype(np.float64) / 255.0 - MEAN) / STD
    x = x[:, None, :, :]
    return x if input_shape is None or tuple(input_shape) == x.shape[1:] else fit_to(
        x, tuple(input_shape))


def fit_to(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """Normalised (N, 1, 28, 28) images zero-padded (black border, as if the 28x28 picture were
    pasted in the middle of a larger one) to a model's (1, H, W) input, e.g. 1x32x32."""
    _, h, w = input_shape
    top, left = (h - x.shape[2]) // 2, (w - x.shape[3]) // 2
    if top < 0 or left < 0:
        raise ValueError(f"cannot fit {x.shape[2:]} images into {input_shape}")
    pads = ((0, 0), (0, 0), (top, h - x.shape[2] - top), (left, w - x.shape[3] - left))
    return np.pad(x, pads, constant_values=(0.0 - MEAN) / STD)
