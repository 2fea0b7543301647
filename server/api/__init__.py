"""The HTTP API: versioned routes under /v1 (see docs/SERVICE.md)."""
