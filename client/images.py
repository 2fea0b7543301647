"""Reading inputs for the CLI: PNG images (stdlib only: zlib + the PNG filters) and .npy arrays.

A small decoder rather than a Pillow dependency: the client stays light, and model inputs are
small greyscale images. Supported: 8-bit, non-interlaced, greyscale / grey+alpha / RGB / RGBA
(colour is converted to grey with ITU-R BT.601 luma weights). Anything else says so.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


def read_png(path: str | Path) -> np.ndarray:
    """PNG -> uint8 array (H, W), greyscale."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path}: not a PNG file")
    pos, idat, header = 8, [], None
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if ctype == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif ctype == b"IDAT":
            idat.append(chunk)
        elif ctype == b"IEND":
            break
    if header is None:
        raise ValueError(f"{path}: PNG without IHDR")
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or color not in CHANNELS or interlace:
        raise ValueError(f"{path}: only 8-bit non-interlaced grey/RGB(A) PNGs are supported "
                         f"(bit depth {depth}, colour type {color}, interlace {interlace})")
    ch = CHANNELS[color]
    raw = zlib.decompress(b"".join(idat))
    stride = width * ch
    if len(raw) != height * (stride + 1):
        raise ValueError(f"{path}: PNG data size does not match {width}x{height}")
    out = np.zeros((height, stride), dtype=np.int32)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        if ftype == 0:
            cur = line
        elif ftype == 2:
            cur = (line + prev) & 0xFF
        elif ftype in (1, 3, 4):
            cur = np.zeros(stride, dtype=np.int32)
            for x in range(stride):
                a = cur[x - ch] if x >= ch else 0
                b = prev[x]
                if ftype == 1:
                    pred = a
                elif ftype == 3:
                    pred = (a + b) // 2
                else:
                    c = prev[x - ch] if x >= ch else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[x] = (line[x] + pred) & 0xFF
        else:
            raise ValueError(f"{path}: unknown PNG filter {ftype}")
        out[y] = cur
        prev = cur
    img = out.reshape(height, width, ch).astype(np.float64)
    if ch >= 3:
        grey = 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]
    else:
        grey = img[..., 0]
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def load_inputs(path: str | Path, input_shape: list[int]) -> list[np.ndarray]:
    """One file -> a list of inputs: a PNG is one image; a .npy holds one input or a batch
    (leading dimension) of inputs of the model's input shape (or that shape without its
    size-1 dimensions)."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        return [read_png(path)]
    if path.suffix.lower() == ".npy":
        arr = np.load(path, allow_pickle=False)
        size = int(np.prod(input_shape))
        if arr.size == size:
            return [arr]
        if arr.ndim >= 2 and int(np.prod(arr.shape[1:])) == size:
            return list(arr)
        raise ValueError(f"{path}: array of shape {arr.shape} holds neither one input nor a "
                         f"batch of inputs of shape {tuple(input_shape)}")
    raise ValueError(f"{path}: expected a .png or .npy file")
