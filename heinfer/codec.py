"""Client-side steps named by what they do: pack + encrypt an input, decrypt + decode an output.
Packing and reading go through the spec's packing contract (heinfer.contract), as in any other
client."""

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
    return [be.encrypt(v) for v in spec.pack(x)]


def encode_encrypt_bytes(be, spec: ModelSpec, x: np.ndarray) -> list[bytes]:
    """Seeded ciphertexts as bytes: what goes on the wire."""
    x = np.asarray(x, dtype=np.float64)
    if list(x.shape) != list(spec.input_shape):
        raise LayoutError(f"model {spec.name} takes input of shape {tuple(spec.input_shape)}, "
                          f"got {x.shape}")
    return [be.encrypt_to_bytes(v) for v in spec.pack(x)]


def decrypt_decode(be: Backend, spec: ModelSpec, cts: list[Ciphertext]) -> np.ndarray:
    return spec.decode([be.decrypt(ct) for ct in cts])


def encode_encrypt_batch(be, spec: ModelSpec, xs: np.ndarray) -> list[bytes]:
    """Throughput mode: up to `slots` images, one ciphertext per input element (seeded bytes)."""
    return [be.encrypt_to_bytes(v) for v in spec.pack_batch(xs)]


def decrypt_decode_batch(be: Backend, spec: ModelSpec, cts: list[Ciphertext],
                         batch: int) -> np.ndarray:
    return spec.decode_batch([be.decrypt(ct) for ct in cts], batch)


def finish_output(spec: ModelSpec, decoded: np.ndarray, x: np.ndarray | None) -> np.ndarray:
    """Decoded outputs -> logits. Plain models: unchanged. Conformal models: the client adds
    c0 ||x|| (it knows x), divides and adds the bias."""
    out = spec.output
    if out.kind != "conformal":
        return decoded
    if x is None:
        raise LayoutError(f"model {spec.name} is conformal: decoding needs the input x")
    z, q = decoded[:-1], float(decoded[-1])
    return z / (out.c0 * float(np.linalg.norm(np.asarray(x).reshape(-1))) + q) + np.asarray(
        out.bias)
