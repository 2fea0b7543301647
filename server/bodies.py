"""Request bodies read with a hard byte limit, into memory (ciphertexts) or onto disk (keys).

Checked in the order a production proxy would, each before the bytes it protects are stored:
1. a declared Content-Length over the limit answers 413 at once (nothing is read; the
   connection is closed after the answer when the rest is too large to drain, see
   server/bodyguard.py), whatever the body then does;
2. the first bytes: a `gate` sees the body's prefix (the 16-byte wire header, then the section
   table) and refuses a wrong kind, count, size or quota before anything is written; the size
   the table announces then binds the rest of the stream;
3. while streaming (chunked uploads have no length): the running total against the limit and
   the quota.
Read timeouts (idle, total) are enforced below the route, in server/bodyguard.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from starlette.requests import Request

from heinfer_server.errors import ApiError
from heinfer_server.shred import shred

DRAIN_CAP = 64 << 20
BINARY = "application/octet-stream"

# prefix -> None (need more bytes), or the total size the body announces (0: none), or raises
Gate = Callable[[bytes], int | None]


def require_binary(request: Request) -> None:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != BINARY:
        raise ApiError("unsupported_media_type",
                       f"send the body as {BINARY} in heinfer wire framing, got {ctype or 'none'}")


def declared_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    if not raw.strip().isdigit():
        raise ApiError("malformed_body", "Content-Length is not a number")
    return int(raw)


def _too_large(what: str, limit: int, size: int | None) -> ApiError:
    shown = f"{size:,} bytes" if size is not None else f"more than {limit:,} bytes"
    return ApiError("payload_too_large", f"{what} of {shown} exceeds the limit of {limit:,} bytes")


async def _pump(request: Request, limit: int, what: str, sink, gate: Gate | None = None,
                quota: tuple[int, Callable[[int], ApiError]] | None = None) -> int:
    """Feed the body to `sink` chunk by chunk, the first bytes only once `gate` accepts them."""
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise _too_large(what, limit, declared)
    if quota is not None and declared is not None and declared > quota[0]:
        raise quota[1](declared)
    total, announced = 0, None
    head: bytearray | None = bytearray() if gate else None
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(what, limit, declared)
        if quota is not None and total > quota[0]:
            raise quota[1](total)
        if head is not None:
            head += chunk
            announced = gate(bytes(head))
            if announced is None:
                continue
            chunk, head = bytes(head), None
        if announced and total > announced:
            raise ApiError("malformed_body", f"{what} is longer than the {announced:,} bytes "
                           "its header announces")
        if chunk:
            sink(chunk)
    if head:  # too short for the gate to decide: the full parse after us says why
        sink(bytes(head))
    return total


async def read_limited(request: Request, limit: int, what: str,
                       gate: Gate | None = None) -> bytearray:
    buf = bytearray()
    await _pump(request, limit, what, buf.extend, gate)
    return buf


async def stream_to_file(request: Request, path: Path, limit: int, what: str,
                         gate: Gate | None = None,
                         quota: tuple[int, Callable[[int], ApiError]] | None = None) -> int:
    """Write the body to `path` (created 0600) chunk by chunk; never holds it in memory. The
    file is created only once the gate has accepted the first bytes."""
    f = None

    def sink(chunk: bytes) -> None:
        nonlocal f
        if f is None:
            f = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        f.write(chunk)

    try:
        size = await _pump(request, limit, what, sink, gate, quota)
        if f is None:
            sink(b"")
        return size
    except BaseException:
        shred(path)
        raise
    finally:
        if f is not None:
            f.close()


def wire_gate(declared: int | None, *, kind, count: int | None = None,
              max_item_bytes: int | None = None, room: int | None = None,
              unframed: Callable[[bytes], bool | None] | None = None) -> Gate:
    """A gate for a heinfer wire body: header and section table checked from the first bytes
    (`heinfer.wire.parse_prefix`), the announced size against the declared one and against
    `room` (the caller's storage quota, 429). `unframed(prefix)` may let a body that is not wire
    framing through (True), refuse it (False) or ask for more bytes (None)."""
    from heinfer import wire

    def gate(prefix: bytes) -> int | None:
        if unframed is not None and len(prefix) >= 4 and prefix[:4] != wire.MAGIC:
            verdict = unframed(prefix)
            if verdict is None:
                return None
            if verdict:
                return 0
        frame = wire.parse_prefix(prefix, total_size=declared, expected_kind=kind,
                                  expected_count=count, max_item_bytes=max_item_bytes)
        if frame is None:
            return None
        if room is not None and frame.total_size > room:
            raise ApiError("quota_exceeded", f"{frame.total_size:,} more key bytes would exceed "
                           "this API key's storage quota")
        return frame.total_size

    return gate


def tenseal_context_prefix(prefix: bytes) -> bool | None:
    """Whether a body starts like a serialized TenSEAL context (protobuf field 1, a SEAL
    object): such a body is read whole so that the refusal can say whether it held a secret
    key. None: too few bytes to tell."""
    if prefix[0] != 0x0A:
        return False
    for i in range(1, min(len(prefix), 11)):
        if prefix[i] < 0x80:  # end of the length varint; the SEAL magic 0xA15E follows
            return None if len(prefix) < i + 3 else prefix[i + 1 : i + 3] == b"\x5e\xa1"
    return None if len(prefix) < 11 else False
