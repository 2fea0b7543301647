"""The embedded store: SQLite for rows, files under the data directory for plans and keys.

    DATA_DIR/
      heinfer.db                     models, sessions, API key hashes (WAL journal)
      models/NAME/HASH.plan.json     plan files copied at `models add` (+ .plan.npz)
      sessions/SID/relin.seal        one validated SEAL object per file (+ galois.seal,
                                     public.seal): workers load them by path
      sessions/SID/session.json      the session's row fields, for adoption (recovery.py)
      tmp/                           uploads in progress; emptied at every start
      quarantine/TIME/...            files found without a row at a start (recovery.py)

Durability (kill -9 included): a file is complete in its final place *before* the row that
points to it commits, and a row is removed before its files; WAL with synchronous=NORMAL
survives a killed process (committed transactions are in the WAL in the OS cache). At start,
files without a row are moved to the quarantine, never deleted (recovery.py). API keys are
stored as SHA-256 hashes only.

Functions are keyword-only (`get_session(store, session_id=...)`), one short transaction each.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash   TEXT PRIMARY KEY,
    principal  TEXT NOT NULL UNIQUE,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ('admin', 'client')),
    source     TEXT NOT NULL CHECK (source IN ('config', 'generated')),
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    name       TEXT PRIMARY KEY,
    plan_hash  TEXT NOT NULL,
    plan_path  TEXT NOT NULL,
    spec_json  TEXT NOT NULL,
    n_inputs   INTEGER NOT NULL,
    added_at   REAL NOT NULL,
    preprocessing_json TEXT NOT NULL DEFAULT 'null'
);
CREATE TABLE IF NOT EXISTS sessions (
    id         TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    model      TEXT NOT NULL,
    plan_hash  TEXT NOT NULL,
    key_dir    TEXT NOT NULL,
    key_bytes  INTEGER NOT NULL,
    created_at REAL NOT NULL,
    last_used  REAL NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('active', 'expired')),
    ended_at   REAL
);
CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions (owner, state);
CREATE INDEX IF NOT EXISTS sessions_by_use ON sessions (state, last_used);
"""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKeyRow:
    key_hash: str
    principal: str
    name: str
    role: str
    source: str


@dataclass(frozen=True)
class ModelRow:
    name: str
    plan_hash: str
    plan_path: str  # relative to the data dir
    spec_json: str
    n_inputs: int
    added_at: float
    preprocessing_json: str = "null"

    @property
    def spec(self) -> dict:
        return json.loads(self.spec_json)

    @property
    def preprocessing(self) -> dict | None:
        return json.loads(self.preprocessing_json)


@dataclass(frozen=True)
class SessionRow:
    id: str
    owner: str
    model: str
    plan_hash: str
    key_dir: str  # relative to the data dir
    key_bytes: int
    created_at: float
    last_used: float
    state: str
    ended_at: float | None


class Store:
    """Where the data directory is; `tx()` yields a connection inside one transaction."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir).resolve()
        self.db_path = self.data_dir / "heinfer.db"
        for sub in ("models", "sessions", "tmp"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # session keys are public material, plans are not
        conn = sqlite3.connect(self.db_path, timeout=30)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)  # commits by itself
        finally:
            conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    def path(self, rel: str) -> Path:
        return self.data_dir / rel

    @property
    def tmp(self) -> Path:
        return self.data_dir / "tmp"


# -- API keys ---------------------------------------------------------------------------------
def upsert_api_key(store: Store, *, key: str, name: str, role: str, source: str) -> ApiKeyRow:
    h = key_hash(key)
    row = ApiKeyRow(h, f"{role[0]}_{h[:16]}", name, role, source)
    with store.tx() as c:
        c.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key_hash) DO "
                  "UPDATE SET name=excluded.name, role=excluded.role, source=excluded.source",
                  (row.key_hash, row.principal, name, role, source, time.time()))
    return row


def remove_config_keys_except(store: Store, *, keep_hashes: set[str]) -> None:
    """Keys removed from the configuration stop working at the next start."""
    with store.tx() as c:
        rows = c.execute("SELECT key_hash FROM api_keys WHERE source='config'").fetchall()
        for (h,) in rows:
            if h not in keep_hashes:
                c.execute("DELETE FROM api_keys WHERE key_hash=?", (h,))


def list_api_keys(store: Store) -> list[ApiKeyRow]:
    with store.tx() as c:
        rows = c.execute("SELECT key_hash, principal, name, role, source FROM api_keys")
        return [ApiKeyRow(*r) for r in rows.fetchall()]


# -- models -----------------------------------------------------------------------------------
def put_model(store: Store, *, name: str, plan_hash: str, plan_path: str, spec_json: str,
              n_inputs: int, preprocessing_json: str = "null"
              ) -> tuple[ModelRow, ModelRow | None]:
    """Insert or replace; returns (new row, replaced row or None)."""
    with store.tx() as c:
        old = c.execute("SELECT * FROM models WHERE name=?", (name,)).fetchone()
        row = ModelRow(name, plan_hash, plan_path, spec_json, n_inputs, time.time(),
                       preprocessing_json)
        c.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?)",
                  (row.name, row.plan_hash, row.plan_path, row.spec_json, row.n_inputs,
                   row.added_at, row.preprocessing_json))
    return row, (ModelRow(*old) if old else None)


def get_model(store: Store, *, name: str) -> ModelRow | None:
    with store.tx() as c:
        r = c.execute("SELECT * FROM models WHERE name=?", (name,)).fetchone()
    return ModelRow(*r) if r else None


def list_models(store: Store) -> list[ModelRow]:
    with store.tx() as c:
        return [ModelRow(*r) for r in c.execute("SELECT * FROM models ORDER BY name")]


def delete_model(store: Store, *, name: str) -> tuple[ModelRow | None, list[SessionRow]]:
    """Remove the model row and its sessions' rows; the caller deletes their files after."""
    with store.tx() as c:
        r = c.execute("SELECT * FROM models WHERE name=?", (name,)).fetchone()
        if r is None:
            return None, []
        sessions = [SessionRow(*s) for s in
                    c.execute("SELECT * FROM sessions WHERE model=?", (name,)).fetchall()]
        c.execute("DELETE FROM sessions WHERE model=?", (name,))
        c.execute("DELETE FROM models WHERE name=?", (name,))
    return ModelRow(*r), sessions


# -- sessions ---------------------------------------------------------------------------------
def owner_usage(store: Store, *, owner: str) -> tuple[int, int]:
    """(active sessions, key bytes stored) of one principal."""
    with store.tx() as c:
        n, b = c.execute("SELECT COUNT(*), COALESCE(SUM(key_bytes), 0) FROM sessions "
                         "WHERE owner=? AND state='active'", (owner,)).fetchone()
    return int(n), int(b)


def create_session(store: Store, *, session_id: str, owner: str, model: str, plan_hash: str,
                   key_dir: str, key_bytes: int, max_sessions: int,
                   max_bytes: int) -> SessionRow | None:
    """Insert an active session unless it would break the owner's quota (then None).
    The quota check and the insert share one IMMEDIATE transaction: concurrent uploads by one
    key cannot both slip under the limit."""
    now = time.time()
    with store.tx() as c:
        n, b = c.execute("SELECT COUNT(*), COALESCE(SUM(key_bytes), 0) FROM sessions "
                         "WHERE owner=? AND state='active'", (owner,)).fetchone()
        if n + 1 > max_sessions or b + key_bytes > max_bytes:
            return None
        row = SessionRow(session_id, owner, model, plan_hash, key_dir, key_bytes, now, now,
                         "active", None)
        c.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (row.id, row.owner, row.model, row.plan_hash, row.key_dir, row.key_bytes,
                   row.created_at, row.last_used, row.state, row.ended_at))
    return row


def adopt_session(store: Store, *, session_id: str, owner: str, model: str, plan_hash: str,
                  key_dir: str, key_bytes: int, created_at: float) -> None:
    """Recreate the row of a session found on disk after a lost database (no quota check:
    the keys were accepted before)."""
    now = time.time()
    with store.tx() as c:
        c.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'active', "
                  "NULL)", (session_id, owner, model, plan_hash, key_dir, key_bytes,
                            created_at, now))


def get_session(store: Store, *, session_id: str) -> SessionRow | None:
    with store.tx() as c:
        r = c.execute("SELECT * FROM sessions WHERE id=?", (session_id,)).fetchone()
    return SessionRow(*r) if r else None


def list_sessions(store: Store, *, owner: str) -> list[SessionRow]:
    with store.tx() as c:
        return [SessionRow(*r) for r in c.execute(
            "SELECT * FROM sessions WHERE owner=? AND state='active' ORDER BY created_at",
            (owner,))]


def touch_session(store: Store, *, session_id: str) -> None:
    with store.tx() as c:
        c.execute("UPDATE sessions SET last_used=? WHERE id=? AND state='active'",
                  (time.time(), session_id))


def expire_session(store: Store, *, session_id: str) -> SessionRow | None:
    """Mark expired (a tombstone so later calls get 410, not 404); the caller deletes files."""
    with store.tx() as c:
        r = c.execute("SELECT * FROM sessions WHERE id=? AND state='active'",
                      (session_id,)).fetchone()
        if r is None:
            return None
        c.execute("UPDATE sessions SET state='expired', ended_at=? WHERE id=?",
                  (time.time(), session_id))
    return SessionRow(*r)


def delete_session(store: Store, *, session_id: str) -> SessionRow | None:
    with store.tx() as c:
        r = c.execute("SELECT * FROM sessions WHERE id=?", (session_id,)).fetchone()
        c.execute("DELETE FROM sessions WHERE id=?", (session_id,))
    return SessionRow(*r) if r else None


def idle_sessions(store: Store, *, idle_before: float) -> list[SessionRow]:
    with store.tx() as c:
        return [SessionRow(*r) for r in c.execute(
            "SELECT * FROM sessions WHERE state='active' AND last_used < ?", (idle_before,))]


def purge_tombstones(store: Store, *, ended_before: float) -> int:
    with store.tx() as c:
        return c.execute("DELETE FROM sessions WHERE state='expired' AND ended_at < ?",
                         (ended_before,)).rowcount


def count_active_sessions(store: Store) -> int:
    with store.tx() as c:
        return int(c.execute("SELECT COUNT(*) FROM sessions WHERE state='active'").fetchone()[0])


# -- files ------------------------------------------------------------------------------------
def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
