"""Request bodies read with a hard byte limit, into memory (ciphertexts) or onto disk (keys).

The limit is checked against Content-Length before the first byte is read, and again while
streaming (chunked uploads have no length). Over the limit, up to DRAIN_CAP more bytes are read
and dropped so that an HTTP/1.1 client still sending its body receives the 413 instead of a
broken pipe; beyond that the connection is closed.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.requests import Request

from heinfer_server.errors import ApiError
from heinfer_server.shred import shred

DRAIN_CAP = 64 << 20
BINARY = "application/octet-stream"


def require_binary(request: Request) -> None:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != BINARY:
        raise ApiError("unsupported_media_type",
                       f"send the body as {BINARY} in heinfer wire framing, got {ctype or 'none'}")


def _declared(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiError("malformed_body", "Content-Length is not a number") from None


async def _pump(request: Request, limit: int, what: str, sink) -> int:
    """Feed the body to `sink` chunk by chunk; over the limit, drain (bounded) and raise 413."""
    declared = _declared(request)
    over = declared is not None and declared > limit
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            over = True
        if over:
            if total > limit + DRAIN_CAP:
                break
            continue
        sink(chunk)
    if over:
        size = f"{declared:,} bytes" if declared is not None else f"more than {limit:,} bytes"
        raise ApiError("payload_too_large",
                       f"{what} of {size} exceeds the limit of {limit:,} bytes")
    return total


async def read_limited(request: Request, limit: int, what: str) -> bytearray:
    buf = bytearray()
    await _pump(request, limit, what, buf.extend)
    return buf


async def stream_to_file(request: Request, path: Path, limit: int, what: str) -> int:
    """Write the body to `path` (created 0600) chunk by chunk; never holds it in memory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            return await _pump(request, limit, what, f.write)
    except BaseException:
        shred(path)
        raise
