"""Checks on uploaded key material: public evaluation keys in, any secret key refused.

SEAL's serialization header (magic, header size, version, compression, total size) has no
object type: a SecretKey saved to bytes looks like any other SEAL object. A client that wraps
its secret key in a RELIN_KEYS section, or uploads a whole TenSEAL context saved with its secret
key, must still be refused. The rules, applied to every section of an EVAL_KEYS body:

1. the wire framing has no place for a secret key: a section typed SECRET_KEY is refused
   (`heinfer.wire`, before any file is touched);
2. each section must be one SEAL object whose header size field equals the section length;
   otherwise, if the bytes parse as a TenSEAL context (protobuf `TenSEALContextProto`), it is
   refused as `secret_key_refused` when its private part holds a secret key and as
   `malformed_keys` when not (contexts are not accepted either way); anything else is
   `malformed_keys`;
3. exact structure (`seal_format`): each section is parsed field by field and checked exactly
   against the plan (parms_id of the key level, NTT form, size 2, ring degree, primes, scale
   1.0, data count, every word reduced) before SEAL sees it; a field that does not match is
   `malformed_keys` or `params_mismatch`. Every stored polynomial, every RNS component, is then
   tested for being short (coefficient form and inverse NTT): a short one is
   `secret_key_refused`, whatever the object carrying it. A section that does not parse as its
   type but parses as a SecretKey (a Plaintext over all primes) with short data is
   `secret_key_refused` too;
4. the backend (`Backend.with_eval_keys`, so this server never imports a SEAL binding itself)
   still probes sections no larger than a SecretKey: if SEAL loads one as a SecretKey it is
   refused; then each section must load as its declared type under the model's parameters
   (else `params_mismatch`), relinearization keys must hold the key for power 2 and Galois keys
   the element of every rotation step the plan uses (else `missing_keys`).

A refused upload is overwritten and deleted at once (`shred`); nothing of it is kept or logged.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

SEAL_MAGIC = 0xA15E
SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr, reserved, size


def seal_header_ok(head: bytes, length: int) -> bool:
    """True if `head` (the first 16 bytes of a section of `length` bytes) is a SEAL 4.x header
    announcing exactly `length` bytes."""
    if len(head) < SEAL_HEADER.size:
        return False
    magic, hsize, major, _minor, compr, reserved, size = SEAL_HEADER.unpack_from(head)
    return (magic == SEAL_MAGIC and hsize == SEAL_HEADER.size and major == 4 and compr <= 2
            and reserved == 0 and size == length)


# -- TenSEAL contexts (protobuf) -------------------------------------------------------------
def _varint(f: BinaryIO) -> int | None:
    shift, value = 0, 0
    for _ in range(10):
        b = f.read(1)
        if not b:
            return None
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
        shift += 7
    return None


def _fields(f: BinaryIO, end: int, allowed: dict[int, int]) -> dict[int, tuple[int, int]] | None:
    """Walk protobuf fields until `end`; return {field: (offset, length or value)} or None when
    the bytes are not a message with exactly these (field -> wire type) pairs."""
    out: dict[int, tuple[int, int]] = {}
    while f.tell() < end:
        tag = _varint(f)
        if tag is None or tag >> 3 not in allowed or allowed[tag >> 3] != (tag & 7):
            return None
        field, wtype = tag >> 3, tag & 7
        if wtype == 0:
            v = _varint(f)
            if v is None:
                return None
            out[field] = (f.tell(), v)
        elif wtype == 2:
            n = _varint(f)
            if n is None or f.tell() + n > end:
                return None
            out[field] = (f.tell(), n)
            f.seek(n, 1)
        elif wtype == 1:
            f.seek(8, 1)
        else:
            return None
    return out if f.tell() == end else None


def tenseal_context_secret(f: BinaryIO, start: int, length: int) -> bool | None:
    """If bytes [start, start+length) of `f` are a serialized TenSEAL context, return whether it
    holds a secret key; None if they are not a TenSEAL context. Reads only field headers and the
    SEAL magic of the parameters field, so it costs nothing on large inputs."""
    end = start + length
    f.seek(start)
    top = _fields(f, end, {1: 2, 2: 2, 3: 2, 4: 0})
    if not top or 1 not in top:
        return None
    off, n = top[1]  # encryption_parameters: a SEAL object
    f.seek(off)
    head = f.read(SEAL_HEADER.size)
    if n < SEAL_HEADER.size or not seal_header_ok(head, n):
        return None
    if 3 not in top:
        return False
    off, n = top[3]  # TenSEALPrivateProto {bytes secret_key = 1; bool ...= 2; bool ...= 3}
    f.seek(off)
    private = _fields(f, off + n, {1: 2, 2: 0, 3: 0})
    return bool(private and 1 in private and private[1][1] > 0)
