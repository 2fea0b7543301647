"""Limits that keep one client (or one stolen key) from exhausting the service.

- request rate per API key: `limits` moving windows (HEINFER_RATE_LIMIT, e.g.
  "50/second;1000/minute"), 429 `rate_limited` with Retry-After;
- wrong API keys per client address (HEINFER_BAD_KEY_LIMIT): past the budget every keyed
  request from that address answers 429 `too_many_bad_keys` *before* its key is looked at, so
  a guesser learns nothing more until the window moves (a valid key from the same address waits
  too: letting it through would tell the guesser which keys are valid);
- key and plan uploads one API key is sending at once (HEINFER_MAX_UPLOADS_PER_KEY), 429
  `too_many_uploads`: stalled uploads of one key cannot hold all connections or disk;
- a free-space floor in the data directory (HEINFER_MIN_FREE_DISK_BYTES): a new upload that
  would leave less answers 507 `insufficient_storage`; reads and predicts on existing sessions
  go on.

State is in memory in the one API process (uvicorn runs one; see server/main.py), so the
windows start empty after a restart.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from heinfer_server.errors import ApiError
from heinfer_server.settings import Settings


class Limiter:
    def __init__(self, settings: Settings, metrics=None):
        self._window = MovingWindowRateLimiter(MemoryStorage())
        self._rate = parse_many(settings.rate_limit)
        self._bad = parse_many(settings.bad_key_limit)
        self._max_uploads = settings.max_uploads_per_key
        self._floor = settings.min_free_disk_bytes
        self._uploads: dict[str, int] = {}
        self._metrics = metrics

    def _refuse(self, code: str, detail: str, retry_after: int) -> ApiError:
        if self._metrics is not None:
            self._metrics.limit_rejections.labels(code).inc()
        return ApiError(code, detail, headers={"Retry-After": str(retry_after)})

    def _retry_after(self, items: list[RateLimitItem], *ids: str) -> int:
        resets = [self._window.get_window_stats(i, *ids).reset_time for i in items
                  if not self._window.test(i, *ids)]
        return max(1, math.ceil(max(resets, default=time.time()) - time.time()))

    # -- per API key ------------------------------------------------------------------------------
    def check_rate(self, principal_id: str) -> None:
        for item in self._rate:
            if not self._window.hit(item, "rate", principal_id):
                raise self._refuse("rate_limited", f"more than {item} requests for this API "
                                   "key; slow down", self._retry_after(self._rate, "rate",
                                                                       principal_id))

    @asynccontextmanager
    async def upload(self, principal_id: str) -> AsyncIterator[None]:
        """Hold one of the key's upload slots while its body is read."""
        n = self._uploads.get(principal_id, 0)
        if n >= self._max_uploads:
            raise self._refuse("too_many_uploads", f"this API key is already sending {n} key or "
                               "plan uploads (HEINFER_MAX_UPLOADS_PER_KEY); wait for one to "
                               "finish", 1)
        self._uploads[principal_id] = n + 1
        try:
            yield
        finally:
            left = self._uploads[principal_id] - 1
            if left:
                self._uploads[principal_id] = left
            else:
                del self._uploads[principal_id]

    # -- per client address -----------------------------------------------------------------------
    def check_address(self, address: str) -> None:
        """Before a key is checked: refuse while this address is over its wrong-key budget."""
        if not all(self._window.test(i, "badkey", address) for i in self._bad):
            raise self._refuse("too_many_bad_keys", "too many wrong API keys from this address; "
                               "wait before trying again",
                               self._retry_after(self._bad, "badkey", address))

    def record_bad_key(self, address: str) -> None:
        for item in self._bad:
            self._window.hit(item, "badkey", address)

    # -- disk -------------------------------------------------------------------------------------
    def check_disk(self, path: Path, incoming: int = 0) -> None:
        """Refuse a new upload of `incoming` bytes that would cross the free-space floor."""
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
        if free - incoming < self._floor:
            raise self._refuse("insufficient_storage", "the server is short of disk space for "
                               "new uploads; existing sessions still work", 60)
