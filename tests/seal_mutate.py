"""Field-level mutations of serialized SEAL 4.x objects, for tests (no tests here).

The layouts are those parsed by `heinfer_server.seal_format` (its docstring); this module
reads and writes them independently, from offsets, so a test can change exactly one field of a
real ciphertext or key set and send it over HTTP.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import zstandard

HEADER = struct.Struct("<HBBBBHQ")
# offsets inside Ciphertext members (after its 16-byte header)
PARMS_ID, NTT, SIZE, DEGREE, PRIMES, SCALE, CORRECTION, DATA = 0, 32, 33, 41, 49, 57, 65, 73
DATA_COUNT = DATA + 16  # u64 after the DynArray's own header
DATA_WORDS = DATA + 24
FIELDS = {"parms_id": (PARMS_ID, "32s"), "ntt": (NTT, "B"), "size": (SIZE, "Q"),
          "degree": (DEGREE, "Q"), "primes": (PRIMES, "Q"), "scale": (SCALE, "d"),
          "correction": (CORRECTION, "Q"), "data_count": (DATA_COUNT, "Q")}


def members(obj: bytes) -> bytearray:
    """The bytes after the outer header, decompressed."""
    magic, _, _, _, compr, _, _ = HEADER.unpack_from(obj)
    assert magic == 0xA15E, "not a SEAL object"
    if compr == 2:
        return bytearray(zstandard.ZstdDecompressor().stream_reader(obj[16:]).read())
    assert compr == 0
    return bytearray(obj[16:])


def pack(body: bytes | bytearray, version: tuple[int, int] = (4, 3), compr: int = 0,
         size: int | None = None) -> bytes:
    """An outer header + members; compr=2 compresses with zstd as SEAL does."""
    data = bytes(body) if compr == 0 else zstandard.ZstdCompressor().compress(bytes(body))
    total = 16 + len(data) if size is None else size
    return HEADER.pack(0xA15E, 16, version[0], version[1], compr, 0, total) + data


def get_field(m: bytes | bytearray, name: str, base: int = 0):
    off, fmt = FIELDS[name]
    return struct.unpack_from("<" + fmt, m, base + off)[0]


def set_field(m: bytearray, name: str, value, base: int = 0) -> bytearray:
    off, fmt = FIELDS[name]
    struct.pack_into("<" + fmt, m, base + off, value)
    return m


def ciphertext(obj: bytes, **fields) -> bytes:
    """A copy of a serialized ciphertext (or public key) with fields replaced, uncompressed."""
    m = members(obj)
    for k, v in fields.items():
        set_field(m, k, v)
    return pack(m, version=HEADER.unpack_from(obj)[2:4])


@dataclass
class Part:
    """One PublicKey inside a RelinKeys/GaloisKeys members: its header offset and where its
    data words start and how many there are."""

    header: int
    base: int  # start of the ciphertext members
    words: int
    count: int


def key_parts(m: bytes | bytearray) -> list[Part]:
    """Every PublicKey of a KSwitchKeys members buffer, in order."""
    pos = 32
    dim1 = struct.unpack_from("<Q", m, pos)[0]
    pos += 8
    parts = []
    for _ in range(dim1):
        dim2 = struct.unpack_from("<Q", m, pos)[0]
        pos += 8
        for _ in range(dim2):
            size = HEADER.unpack_from(m, pos)[6]
            base = pos + 16
            count = get_field(m, "data_count", base)
            parts.append(Part(pos, base, base + DATA_WORDS, count))
            pos += size
    return parts


def secret_key_words(sk: bytes) -> np.ndarray:
    """The NTT-form words of a serialized SecretKey (a Plaintext over all primes)."""
    m = members(sk)
    count = struct.unpack_from("<Q", m, 64)[0]  # parms_id, coeff count, scale, DynArray header
    return np.frombuffer(bytes(m[72 : 72 + 8 * count]), dtype="<u8")


def write_words(m: bytearray, offset: int, words: np.ndarray) -> bytearray:
    m[offset : offset + 8 * len(words)] = words.astype("<u8").tobytes()
    return m
