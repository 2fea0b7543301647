"""Client-side steps named by what they do: pack + encrypt an input, decrypt + decode an output."""

from __future__ import annotations

import numpy as np

from heinfer.backends.base import Backend, Ciphertext
from heinfer.errors import LayoutError
from heinfer.plan import ModelSpec


def encode_encrypt(be: Backend, spec: ModelSpec, x: np.ndarray) -> list[Ciphertext]:
    x = np.asarray(x, dtype=np.float64)
    if list(x.shape) != list(spec.input_shape):
        raise LayoutError(f"model {spec.name} takes input of shape {tuple(spec.input_shape)}, "
                          f"got {x.shape}")
    return [be.encrypt(v) for v in spec.input_layout_obj().pack(x)]


def encode_encrypt_bytes(be, spec: ModelSpec, x: np.ndarray) -> list[bytes]:
    """Seeded ciphertexts as bytes: what goes on the wire."""
    x = np.asarray(x, dtype=np.float64)
    if list(x.shape) != list(spec.input_shape):
        raise LayoutError(f"model {spec.name} takes input of shape {tuple(spec.input_shape)}, "
                          f"got {x.shape}")
    return [be.encrypt_to_bytes(v) for v in spec.input_layout_obj().pack(x)]


def decrypt_decode(be: Backend, spec: ModelSpec, cts: list[Ciphertext]) -> np.ndarray:
    return spec.decode([be.decrypt(ct) for ct in cts])
