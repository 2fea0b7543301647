"""A worker's cache of loaded session keys, bounded in bytes overall and per tenant.

Counting entries let one tenant cycling many sessions evict everyone else's keys (issue 12:
12 sessions of one key doubled every tenant's evaluation time). Here a tenant's own entries are
evicted first once it holds more than `tenant_bytes`, and when the whole cache is over
`max_bytes` the least recently used entry *of the tenant holding the most bytes* goes: a busy
tenant can only push out its own keys, or those of a tenant holding even more.

An entry larger than `tenant_bytes` is not kept (it would evict a tenant's whole share for one
session): such a session reloads its keys at every request.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class KeyCache:
    def __init__(self, max_bytes: int, tenant_bytes: int):
        self.max_bytes = max_bytes
        self.tenant_bytes = min(tenant_bytes, max_bytes)
        self._entries: OrderedDict[str, tuple[str, int, Any]] = OrderedDict()
        self._tenants: dict[str, int] = {}
        self.total = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Any | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        self._entries.move_to_end(key)
        return hit[2]

    def tenant_usage(self, tenant: str) -> int:
        return self._tenants.get(tenant, 0)

    def put(self, key: str, tenant: str, nbytes: int, value: Any) -> bool:
        """Insert (or refresh) an entry; False when it is too large to keep."""
        self.pop(key)
        nbytes = max(1, nbytes)
        if nbytes > self.tenant_bytes:
            return False
        self._entries[key] = (tenant, nbytes, value)
        self._tenants[tenant] = self._tenants.get(tenant, 0) + nbytes
        self.total += nbytes
        while self._tenants[tenant] > self.tenant_bytes:
            self._evict_oldest_of(tenant)
        while self.total > self.max_bytes:
            self._evict_oldest_of(max(self._tenants, key=self._tenants.__getitem__))
        return True

    def pop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        tenant, nbytes, _ = entry
        self.total -= nbytes
        self._tenants[tenant] -= nbytes
        if not self._tenants[tenant]:
            del self._tenants[tenant]

    def clear(self) -> None:
        self._entries.clear()
        self._tenants.clear()
        self.total = 0

    def forget_prefix(self, prefix: str) -> None:
        for k in [k for k in self._entries if k.startswith(prefix)]:
            self.pop(k)

    def _evict_oldest_of(self, tenant: str) -> None:
        key = next(k for k, (t, _, _) in self._entries.items() if t == tenant)
        self.pop(key)
