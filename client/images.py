"""Reading inputs for the CLI and the SDK: images (Pillow) and .npy arrays, checked against the
model's input shape. Nothing is guessed (docs/CLIENT.md, "Input contract"):

- An image is read with Pillow (PNG, JPEG, and whatever else Pillow reads; EXIF rotation
  applied) as uint8 pixels. Its size must be the model's; it is never resized.
- A 1-channel model takes greyscale images. A colour image whose channels are all equal (grey
  saved as RGB) is taken as grey: nothing is lost. Any other colour image is refused unless
  `convert="grey"` (CLI `--grey`, ITU-R 601 luma, Pillow's "L"). A 3-channel model takes colour
  images; a greyscale one only with `convert="rgb"` (CLI `--rgb`, grey copied to R, G and B).
- Transparency is refused (there is no right background to flatten onto); an alpha channel
  that is fully opaque is dropped. 16-bit greyscale is scaled to 8 bits; 32-bit integer and
  float images are refused (save them as .npy).
- A .npy array holds one input: uint8 pixels, or floats already normalized (`normalized=True`,
  CLI `--normalized`; checked by `Model.preprocess`). It holds a batch (leading dimension)
  only when `batch=True` (CLI `--batch`): a (3, 28, 28) array for a (1, 28, 28) model is an
  error naming the channel counts, never three images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from heinfer_client.errors import InputError

Convert = Literal["grey", "rgb"] | None


def image_geometry(input_shape: list[int] | tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, height, width) of a model taking images: (C, H, W) or (H, W)."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3 and shape[0] in (1, 3):
        return shape  # type: ignore[return-value]
    if len(shape) == 2:
        return (1, *shape)
    raise InputError(f"the model takes input of shape {shape}, not an image: give a .npy array")


def _pixels(img, path: Path, channels: int, convert: Convert) -> np.ndarray:
    """A Pillow image -> uint8 (H, W) or (H, W, 3), following the rules above."""
    from PIL import Image

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr16 = np.asarray(img, dtype=np.uint16)
        img = Image.fromarray(np.rint(arr16 / 257.0).astype(np.uint8), "L")
    elif mode in ("I", "F"):
        raise InputError(f"{path}: {'32-bit integer' if mode == 'I' else 'floating-point'} "
                         "image: save 8-bit pixels, or the array as .npy")
    if "transparency" in img.info or img.mode == "PA":
        img = img.convert("RGBA" if img.mode in ("P", "PA", "RGB") else "LA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min() < 255:
            raise InputError(f"{path}: has transparent pixels: flatten it onto the background "
                             "the model expects, then save it without alpha")
        img = img.convert("RGB" if img.mode.startswith("RGB") else "L")
    if img.mode in ("1", "L"):
        grey = np.asarray(img.convert("L"), dtype=np.uint8)
        if channels == 1:
            return grey
        if convert != "rgb":
            raise InputError(f"{path}: greyscale image and the model takes {channels} channels"
                             ": pass --rgb (SDK: convert='rgb') to copy grey into R, G and B")
        return np.repeat(grey[..., None], 3, axis=2)
    try:
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as e:
        raise InputError(f"{path}: cannot convert image mode {mode} to pixels: {e}") from e
    if channels == 3:
        return rgb
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0].copy()  # grey stored as colour: exact
    if convert != "grey":
        raise InputError(f"{path}: colour image (mode {mode}) and the model takes 1 channel: "
                         "pass --grey (SDK: convert='grey') to convert it with ITU-R 601 luma, "
                         "or convert it yourself")
    return np.asarray(img.convert("RGB").convert("L"), dtype=np.uint8)


def read_image(path: str | Path, input_shape: list[int] | tuple[int, ...],
               convert: Convert = None) -> np.ndarray:
    """An image file -> uint8 pixels shaped like the model's input, e.g. (1, 28, 28)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    channels, height, width = image_geometry(input_shape)
    try:
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) > 1:
                raise InputError(f"{path}: holds {img.n_frames} frames; give one image")
            img.load()
            img = ImageOps.exif_transpose(img) or img
            px = _pixels(img, path, channels, convert)
    except UnidentifiedImageError as e:
        raise InputError(f"{path}: not an image Pillow can read (PNG, JPEG, BMP, GIF, TIFF, "
                         "WebP, PNM ...); arrays go in .npy files") from e
    except (OSError, SyntaxError) as e:  # truncated or corrupt data
        raise InputError(f"{path}: cannot read the image: {e}") from e
    if px.shape[:2] != (height, width):
        raise InputError(f"{path}: image is {px.shape[1]}x{px.shape[0]} pixels; the model "
                         f"takes {width}x{height}: resize it first")
    chw = px[None] if px.ndim == 2 else px.transpose(2, 0, 1)
    return np.ascontiguousarray(chw.reshape(tuple(int(d) for d in input_shape)))


def _matches(shape: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """`shape` is `want` up to size-1 dimensions: (28, 28) for (1, 28, 28)."""
    return [d for d in shape if d != 1] == [d for d in want if d != 1]


def read_array(path: str | Path, input_shape: list[int] | tuple[int, ...], *,
               batch: bool = False) -> list[np.ndarray]:
    """A .npy file -> one input, or with `batch` the inputs along its leading dimension."""
    path = Path(path)
    want = tuple(int(d) for d in input_shape)
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npy array ({e})") from e
    if batch:
        if arr.ndim >= 1 and arr.shape[0] >= 1 and _matches(arr.shape[1:], want):
            return list(arr)
        raise InputError(f"{path}: --batch expects shape (N, {', '.join(map(str, want))}), got "
                         f"{arr.shape}")
    if _matches(arr.shape, want):
        return [arr]
    if len(want) == 3 and arr.ndim == 3 and arr.shape[1:] == want[1:]:
        raise InputError(f"{path}: array of shape {arr.shape} has {arr.shape[0]} channels; the "
                         f"model takes {want[0]} (shape {want}). If it is a batch of "
                         f"{arr.shape[0]} inputs, pass --batch")
    if arr.ndim >= 2 and _matches(arr.shape[1:], want):
        raise InputError(f"{path}: array of shape {arr.shape} looks like {arr.shape[0]} inputs "
                         f"of shape {want}: pass --batch to predict each")
    raise InputError(f"{path}: array of shape {arr.shape}; the model takes {want}")


def load_inputs(path: str | Path, input_shape: list[int] | tuple[int, ...], *,
                batch: bool = False, convert: Convert = None) -> list[np.ndarray]:
    """One file -> a list of inputs (an image: one; a .npy: one, or a batch when asked)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return read_array(path, input_shape, batch=batch)
    return [read_image(path, input_shape, convert)]


def to_model_input(x: np.ndarray, input_shape: list[int] | tuple[int, ...],
                   normalization: dict | None, *, normalized: bool = False,
                   model: str = "the model") -> np.ndarray:
    """Pixels or normalized floats -> float64 of the model's input shape (the SDK's contract).

    Integers (uint8, or any integer dtype with values 0..255) are always pixels: scaled to
    [0, 1] and normalized with the mean/std the model publishes. Floats are taken only with
    `normalized=True`, as the exact values the model computes on: a float image in [0, 1] is
    never guessed to be either. Booleans and other dtypes are refused."""
    x = np.asarray(x)
    want = tuple(int(d) for d in input_shape)
    norm = normalization or {}
    how = (f"(x/255 - {norm['mean']})/{norm['std']}" if norm.get("mean") is not None
           else "x/255")
    if np.issubdtype(x.dtype, np.floating) and normalized:
        if not np.isfinite(x).all():
            raise InputError("the input holds NaN or infinite values")
        out = x.astype(np.float64)
    elif np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise InputError(f"pixel values must be 0..255, got {x.min()}..{x.max()} "
                             f"({x.dtype})")
        out = x.astype(np.float64) / 255.0
        if norm.get("mean") is not None:
            out = (out - float(norm["mean"])) / float(norm["std"])
    else:
        seen = (f" with values {float(np.nanmin(x)):.3g}..{float(np.nanmax(x)):.3g}"
                if x.size and np.issubdtype(x.dtype, np.floating) else "")
        raise InputError(
            f"{model} takes uint8 pixels (0..255), or floats already preprocessed as it "
            f"computes ({how}) with normalized=True (CLI: --normalized); got {x.dtype}{seen}. "
            "For pixels scaled to [0, 1] pass (x * 255).round().astype(np.uint8)")
    if out.shape != want:
        if not _matches(out.shape, want):
            extra = ""
            if len(want) == 3 and out.ndim == 3 and out.shape[1:] == want[1:]:
                extra = (f": {out.shape[0]} channels where {model} takes {want[0]} (a batch? "
                         "Session.predict_batch, CLI --batch)")
            elif out.ndim == len(want) + 1 and _matches(out.shape[1:], want):
                extra = ": a batch? use Session.predict_batch (CLI --batch)"
            raise InputError(f"{model} takes input of shape {want}, got {out.shape}{extra}")
        out = out.reshape(want)
    return out
