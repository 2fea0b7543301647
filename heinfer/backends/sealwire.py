"""SEAL's serialization header, read *before* any bytes reach SEAL, and the backend/version tag
that a model spec carries.

Both backends wrap Microsoft SEAL, but different versions: TenSEAL 0.3.18 bundles SEAL 4.3 and
Pyfhel 3.5.0 bundles SEAL 4.1. SEAL refuses to load anything written by another major.minor
version (its `IsCompatibleVersion`), for the outer object and for every nested one (a
ciphertext's DynArray, each key inside a KSwitchKeys, ...). heinfer does not translate between
versions (see docs/BACKENDS.md, "Interoperability"): the spec names the backend and its SEAL
version (`ModelSpec.backend`, e.g. "tenseal/seal-4.3"), clients use that backend, and every
entry point that takes bytes checks the 16-byte header first and refuses a mismatch with a
`SerializationError` that says what to do, so foreign data never reaches SEAL's parser.

SEALHeader (little-endian, 16 bytes): magic 0xA15E (u16), header size 0x10 (u8), major (u8),
minor (u8), compression mode (u8: 0 none, 1 zlib, 2 zstd), reserved (u16), total size (u64,
header included).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from heinfer.errors import ParamsMismatchError, SerializationError

SEAL_MAGIC = 0xA15E
SEAL_HEADER_SIZE = 0x10
COMPR_MODES = {0: "none", 1: "zlib", 2: "zstd"}
_HEADER = struct.Struct("<HBBBBHQ")


@dataclass(frozen=True)
class SealHeader:
    version: tuple[int, int]
    compr_mode: str
    size: int


def read_seal_header(data: bytes, what: str = "data") -> SealHeader:
    """Parse and sanity-check SEAL's header; raises SerializationError on anything odd."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SerializationError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) < SEAL_HEADER_SIZE:
        raise SerializationError(f"{what}: {len(data)} bytes is too short for a SEAL object")
    magic, hsize, major, minor, compr, _reserved, size = _HEADER.unpack_from(data, 0)
    if magic != SEAL_MAGIC or hsize != SEAL_HEADER_SIZE:
        raise SerializationError(f"{what}: not a SEAL object (no SEAL header)")
    if compr not in COMPR_MODES:
        raise SerializationError(f"{what}: unknown SEAL compression mode {compr}")
    if size != len(data):
        raise SerializationError(f"{what}: the SEAL header announces {size} bytes, got "
                                 f"{len(data)} (truncated or padded)")
    return SealHeader((major, minor), COMPR_MODES[compr], size)


def check_seal_bytes(data: bytes, version: tuple[int, int], backend: str,
                     what: str = "data") -> SealHeader:
    """Refuse bytes written by another SEAL major.minor than `version`, before parsing them."""
    header = read_seal_header(data, what)
    if header.version != tuple(version):
        got = f"{header.version[0]}.{header.version[1]}"
        have = f"{version[0]}.{version[1]}"
        raise SerializationError(
            f"{what} was written by SEAL {got}, but this {backend} backend runs SEAL {have}; "
            f"SEAL refuses data from another major.minor version. The client must use the "
            f"backend named in the model spec ({wire_format(backend, version)!r})."
        )
    return header


def wire_format(backend: str, version: tuple[int, int]) -> str:
    """The tag a spec carries: backend name and SEAL version, e.g. 'tenseal/seal-4.3'."""
    return f"{backend}/seal-{version[0]}.{version[1]}"


def parse_wire_format(tag: str) -> tuple[str, tuple[int, int]] | None:
    """'pyfhel/seal-4.1' -> ('pyfhel', (4, 1)); None for tags without a SEAL version (legacy)."""
    name, sep, rest = tag.partition("/seal-")
    major, dot, minor = rest.partition(".")
    if not sep or not dot or not (major.isdigit() and minor.isdigit()):
        return None
    return name, (int(major), int(minor))


def check_spec_backend(spec_backend: str, backend_name: str, version: tuple[int, int]) -> None:
    """Client side: refuse to make keys or ciphertexts a server cannot load."""
    parsed = parse_wire_format(spec_backend)
    if parsed is None:
        return  # legacy spec without a version: the server's header check still guards
    want_name, want_version = parsed
    if want_version != tuple(version):
        raise ParamsMismatchError(
            f"the model spec needs backend {spec_backend!r} (SEAL "
            f"{want_version[0]}.{want_version[1]}), but this client uses "
            f"{wire_format(backend_name, version)!r}; SEAL data does not cross major.minor "
            f"versions. Use make_backend(spec.params, {want_name!r})."
        )
