"""The heinfer wire format: one binary framing for every ciphertext and key body.

Client and server exchange SEAL objects (ciphertexts, relinearization and Galois keys). SEAL's
own serialization has no object type and no count, so a body of SEAL blobs is framed here with
its kind, the number of items and the type and length of each, all checked *before* any byte of
a SEAL object is parsed. JSON with base64 would add a third to every body; multipart would hide
sizes until the end of the stream. Versioned: a reader refuses any version it does not know.

Layout (all integers little-endian, no padding)::

    offset  size  field
    0       4     magic  b"HEIW"
    4       2     version (1)
    6       2     kind: 1 = CIPHERTEXTS, 2 = EVAL_KEYS
    8       4     count: number of sections (1 .. MAX_SECTIONS)
    12      4     reserved, must be 0
    16      16*count  section table, one entry per section:
                  u16 type | u16 reserved (0) | u32 reserved (0) | u64 length in bytes
    ...     sum(lengths)  the payloads, in table order, back to back

The total size must be exactly 16 + 16*count + sum(lengths): no trailing bytes.

Section types: 1 CIPHERTEXT, 2 PUBLIC_KEY, 3 RELIN_KEYS, 4 GALOIS_KEYS. Type 15 SECRET_KEY is
reserved so that a secret key is refused *by name*: no reader accepts it, and heinfer never
writes it. A CIPHERTEXTS body holds only CIPHERTEXT sections; an EVAL_KEYS body holds exactly
one RELIN_KEYS, at most one GALOIS_KEYS and at most one PUBLIC_KEY section.

Errors are `WireError` (a `SerializationError`) carrying a stable `code` the server reports:
`malformed_body`, `wrong_kind`, `wrong_count`, `item_too_large`, `secret_key_refused`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import BinaryIO

from heinfer.errors import SerializationError

MAGIC = b"HEIW"
VERSION = 1
HEADER = struct.Struct("<4sHHII")
ENTRY = struct.Struct("<HHIQ")
HEADER_SIZE = HEADER.size  # 16
ENTRY_SIZE = ENTRY.size  # 16
MAX_SECTIONS = 4096


class Kind(IntEnum):
    CIPHERTEXTS = 1
    EVAL_KEYS = 2


class Section(IntEnum):
    CIPHERTEXT = 1
    PUBLIC_KEY = 2
    RELIN_KEYS = 3
    GALOIS_KEYS = 4
    SECRET_KEY = 15  # reserved: always refused


ALLOWED: dict[Kind, set[Section]] = {
    Kind.CIPHERTEXTS: {Section.CIPHERTEXT},
    Kind.EVAL_KEYS: {Section.PUBLIC_KEY, Section.RELIN_KEYS, Section.GALOIS_KEYS},
}


class WireError(SerializationError):
    """A body that does not follow the framing; `code` is the stable reason."""

    def __init__(self, message: str, code: str = "malformed_body"):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # keep `code` when raised in a worker process
        return (type(self), (str(self), self.code))


@dataclass(frozen=True)
class SectionInfo:
    type: Section
    offset: int  # from the start of the body
    length: int


@dataclass(frozen=True)
class Frame:
    """A checked header: where each section's payload lies. Holds no payload bytes."""

    kind: Kind
    sections: tuple[SectionInfo, ...]

    @property
    def count(self) -> int:
        return len(self.sections)

    @property
    def total_size(self) -> int:
        return HEADER_SIZE + ENTRY_SIZE * self.count + sum(s.length for s in self.sections)

    def of_type(self, t: Section) -> list[SectionInfo]:
        return [s for s in self.sections if s.type == t]


def frame_size_bound(count: int, max_item_bytes: int) -> int:
    """Largest valid body holding `count` items of at most `max_item_bytes` each."""
    return HEADER_SIZE + count * (ENTRY_SIZE + max_item_bytes)


# -- writing ----------------------------------------------------------------------------------
def encode(kind: Kind, sections: list[tuple[Section, bytes]]) -> bytes:
    """Frame `sections` (type, payload) as one body of `kind`."""
    kind = Kind(kind)
    if not 1 <= len(sections) <= MAX_SECTIONS:
        raise WireError(f"a body holds 1..{MAX_SECTIONS} sections, got {len(sections)}",
                        "wrong_count")
    parts = [HEADER.pack(MAGIC, VERSION, int(kind), len(sections), 0)]
    for t, payload in sections:
        t = Section(t)
        if t == Section.SECRET_KEY:
            raise WireError("a secret key is never framed for the wire", "secret_key_refused")
        if t not in ALLOWED[kind]:
            raise WireError(f"section {t.name} does not belong in a {kind.name} body",
                            "wrong_kind")
        parts.append(ENTRY.pack(int(t), 0, 0, len(payload)))
    parts.extend(bytes(p) for _, p in sections)
    return b"".join(parts)


def encode_ciphertexts(items: list[bytes]) -> bytes:
    return encode(Kind.CIPHERTEXTS, [(Section.CIPHERTEXT, b) for b in items])


def encode_eval_keys(relin_keys: bytes, galois_keys: bytes = b"",
                     public_key: bytes | None = None) -> bytes:
    """Evaluation keys as sent to the server: public material only, by construction."""
    sections: list[tuple[Section, bytes]] = [(Section.RELIN_KEYS, relin_keys)]
    if galois_keys:
        sections.append((Section.GALOIS_KEYS, galois_keys))
    if public_key:
        sections.append((Section.PUBLIC_KEY, public_key))
    return encode(Kind.EVAL_KEYS, sections)


# -- reading ----------------------------------------------------------------------------------
def _parse_fixed_header(head: bytes) -> tuple[Kind, int]:
    if len(head) < HEADER_SIZE:
        raise WireError(f"body of {len(head)} bytes is shorter than the {HEADER_SIZE}-byte "
                        "header")
    magic, version, kind, count, reserved = HEADER.unpack_from(head, 0)
    if magic != MAGIC:
        raise WireError(f"not a heinfer wire body (magic {magic!r}, expected {MAGIC!r}); "
                        "see heinfer.wire for the framing")
    if version != VERSION:
        raise WireError(f"wire version {version} is not supported (this heinfer reads "
                        f"version {VERSION})")
    if reserved != 0:
        raise WireError("reserved header field is not zero")
    try:
        kind_e = Kind(kind)
    except ValueError:
        raise WireError(f"unknown body kind {kind}", "wrong_kind") from None
    if not 1 <= count <= MAX_SECTIONS:
        raise WireError(f"section count {count} is outside 1..{MAX_SECTIONS}", "wrong_count")
    return kind_e, count


def _check(kind: Kind, entries: list[tuple[int, int]], total_size: int, *,
           expected_kind: Kind | None, expected_count: int | None,
           max_item_bytes: int | dict[Section, int] | None) -> Frame:
    if expected_kind is not None and kind != expected_kind:
        raise WireError(f"expected a {Kind(expected_kind).name} body, got {kind.name}",
                        "wrong_kind")
    if expected_count is not None and len(entries) != expected_count:
        raise WireError(f"expected {expected_count} section(s), got {len(entries)}",
                        "wrong_count")
    offset = HEADER_SIZE + ENTRY_SIZE * len(entries)
    sections = []
    for i, (t, length) in enumerate(entries):
        if t == Section.SECRET_KEY:
            raise WireError(f"section {i} is typed SECRET_KEY: a secret key never leaves the "
                            "client", "secret_key_refused")
        try:
            t_e = Section(t)
        except ValueError:
            raise WireError(f"section {i} has unknown type {t}") from None
        if t_e not in ALLOWED[kind]:
            raise WireError(f"section {i} ({t_e.name}) does not belong in a {kind.name} body",
                            "wrong_kind")
        limit = (max_item_bytes.get(t_e) if isinstance(max_item_bytes, dict)
                 else max_item_bytes)
        if length == 0:
            raise WireError(f"section {i} ({t_e.name}) is empty")
        if limit is not None and length > limit:
            raise WireError(f"section {i} ({t_e.name}) has {length:,} bytes, the limit is "
                            f"{limit:,}", "item_too_large")
        sections.append(SectionInfo(t_e, offset, length))
        offset += length
    if offset != total_size:
        what = "truncated" if offset > total_size else "has trailing bytes"
        raise WireError(f"body {what}: header announces {offset:,} bytes, got {total_size:,}")
    if kind == Kind.EVAL_KEYS:
        for t in (Section.RELIN_KEYS, Section.GALOIS_KEYS, Section.PUBLIC_KEY):
            n = sum(1 for s in sections if s.type == t)
            if n > 1:
                raise WireError(f"{n} {t.name} sections; at most one allowed", "wrong_count")
        if not any(s.type == Section.RELIN_KEYS for s in sections):
            raise WireError("evaluation keys need a RELIN_KEYS section", "wrong_count")
    return Frame(kind, tuple(sections))


def parse_header(body: bytes | bytearray | memoryview, *, expected_kind: Kind | None = None,
                 expected_count: int | None = None,
                 max_item_bytes: int | dict[Section, int] | None = None) -> Frame:
    """Check the framing of an in-memory body (no payload is parsed or copied)."""
    mv = memoryview(body)
    kind, count = _parse_fixed_header(bytes(mv[:HEADER_SIZE]))
    table_end = HEADER_SIZE + ENTRY_SIZE * count
    if len(mv) < table_end:
        raise WireError(f"body truncated inside the section table ({len(mv)} < {table_end})")
    entries = []
    for i in range(count):
        t, r1, r2, length = ENTRY.unpack_from(mv, HEADER_SIZE + ENTRY_SIZE * i)
        if r1 or r2:
            raise WireError(f"reserved fields of section {i} are not zero")
        entries.append((t, length))
    return _check(kind, entries, len(mv), expected_kind=expected_kind,
                  expected_count=expected_count, max_item_bytes=max_item_bytes)


def read_header(f: BinaryIO, total_size: int, *, expected_kind: Kind | None = None,
                expected_count: int | None = None,
                max_item_bytes: int | dict[Section, int] | None = None) -> Frame:
    """Like `parse_header` for a file of `total_size` bytes: reads only the header and table."""
    kind, count = _parse_fixed_header(f.read(HEADER_SIZE))
    table = f.read(ENTRY_SIZE * count)
    if len(table) < ENTRY_SIZE * count:
        raise WireError("body truncated inside the section table")
    entries = []
    for i in range(count):
        t, r1, r2, length = ENTRY.unpack_from(table, ENTRY_SIZE * i)
        if r1 or r2:
            raise WireError(f"reserved fields of section {i} are not zero")
        entries.append((t, length))
    return _check(kind, entries, total_size, expected_kind=expected_kind,
                  expected_count=expected_count, max_item_bytes=max_item_bytes)


def parse_prefix(prefix: bytes | bytearray, *, total_size: int | None = None,
                 expected_kind: Kind | None = None, expected_count: int | None = None,
                 max_item_bytes: int | dict[Section, int] | None = None) -> Frame | None:
    """Check the header and section table from the first bytes of a body still arriving (the
    server refuses a bad body before storing it). None while the table is incomplete.
    `total_size` is the declared length when known; otherwise the size the table announces is
    taken, and the reader must hold the body to it."""
    if len(prefix) < HEADER_SIZE:
        return None
    kind, count = _parse_fixed_header(bytes(prefix[:HEADER_SIZE]))
    if expected_kind is not None and kind != expected_kind:  # before waiting for the table
        raise WireError(f"expected a {Kind(expected_kind).name} body, got {kind.name}",
                        "wrong_kind")
    if expected_count is not None and count != expected_count:
        raise WireError(f"expected {expected_count} section(s), got {count}", "wrong_count")
    table_end = HEADER_SIZE + ENTRY_SIZE * count
    if len(prefix) < table_end:
        return None
    entries = []
    for i in range(count):
        t, r1, r2, length = ENTRY.unpack_from(prefix, HEADER_SIZE + ENTRY_SIZE * i)
        if r1 or r2:
            raise WireError(f"reserved fields of section {i} are not zero")
        entries.append((t, length))
    announced = table_end + sum(length for _, length in entries)
    return _check(kind, entries, announced if total_size is None else total_size,
                  expected_kind=expected_kind, expected_count=expected_count,
                  max_item_bytes=max_item_bytes)


def payloads(body: bytes | bytearray | memoryview, frame: Frame) -> list[bytes]:
    """The sections' payloads of a checked body, in order."""
    mv = memoryview(body)
    return [bytes(mv[s.offset : s.offset + s.length]) for s in frame.sections]


def decode_ciphertexts(body: bytes | bytearray | memoryview, *,
                       expected_count: int | None = None,
                       max_item_bytes: int | None = None) -> list[bytes]:
    frame = parse_header(body, expected_kind=Kind.CIPHERTEXTS, expected_count=expected_count,
                         max_item_bytes=max_item_bytes)
    return payloads(body, frame)


def ciphertext_bytes_bound(poly_modulus_degree: int, data_primes: int) -> int:
    """Upper bound of one serialized CKKS ciphertext (two polynomials, every data prime,
    uncompressed, plus SEAL's header and metadata, plus zstd's worst-case expansion of
    incompressible data, about 1/256): the per-item limit for ciphertext bodies."""
    raw = 2 * poly_modulus_degree * data_primes * 8
    return raw + raw // 128 + 4096
