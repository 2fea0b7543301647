"""Pure ASGI middleware for request bodies: read timeouts and the fate of an unread rest.

uvicorn has no body read timeout, so a client that sends headers and then trickles (or stops)
would hold its connection, memory and temp file forever (slow-loris). Here every receive of a
body still arriving waits at most HEINFER_BODY_IDLE_TIMEOUT_S, and the whole body must arrive
within HEINFER_BODY_TIMEOUT_S of the request's start; otherwise the route's read raises 408
`body_timeout` and the connection is closed after the answer.

When a route answers an error before reading the whole body (413, 401, 415, ...), the rest is
read and dropped if it is small (<= DRAIN_CAP, within the same timeouts), so an HTTP/1.1
client still sending gets the answer rather than a reset; otherwise (a declared 10^15 bytes, a
timeout) the answer goes out at once with `Connection: close` and uvicorn drops the connection.
"""

from __future__ import annotations

import asyncio
import time

from starlette.datastructures import Headers, MutableHeaders

from heinfer_server.bodies import DRAIN_CAP
from heinfer_server.errors import ApiError


class BodyGuard:
    def __init__(self, app, idle_timeout: float, total_timeout: float):
        self.app = app
        self.idle = idle_timeout
        self.total = total_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        raw_length = headers.get("content-length", "")
        declared = int(raw_length) if raw_length.strip().isdigit() else None
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if not chunked and not declared:
            return await self.app(scope, receive, send)
        deadline = time.monotonic() + self.total
        received = 0
        done = timed_out = False

        async def guarded_receive():
            nonlocal received, done, timed_out
            if done:  # after the body: waiting for a disconnect is not bounded here
                return await receive()
            wait = min(self.idle, deadline - time.monotonic())
            try:
                if wait <= 0:
                    raise TimeoutError
                async with asyncio.timeout(wait):  # no task per chunk, unlike wait_for
                    msg = await receive()
            except TimeoutError:
                timed_out = True
                raise ApiError("body_timeout", f"the request body did not arrive in time "
                               f"(at most {self.idle:g} s between parts and {self.total:g} s "
                               "in all)") from None
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                done = not msg.get("more_body", False)
            else:  # http.disconnect
                done = True
            return msg

        async def guarded_send(msg):
            if msg["type"] == "http.response.start" and not done:
                rest = None if declared is None else declared - received
                if msg["status"] >= 400 and not timed_out and (rest is None or rest <= DRAIN_CAP):
                    drained = 0
                    try:
                        while not done and drained <= DRAIN_CAP:
                            drained += len((await guarded_receive()).get("body", b""))
                    except ApiError:
                        pass
                if not done:
                    MutableHeaders(scope=msg)["Connection"] = "close"
            await send(msg)

        await self.app(scope, guarded_receive, guarded_send)
