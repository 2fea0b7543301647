"""Start-up recovery: nothing under the data directory is deleted at start.

* Uploads a crash interrupted (`tmp/`, and predict bodies in the RAM spill folder) were never
  acknowledged: they are overwritten with zeros, then removed (`shred`).
* Key directories of sessions whose row says `expired` finish the deletion their row recorded.
* Any other file or directory under `models/` or `sessions/` that no row points to is *moved* to
  `quarantine/<UTC time>/<same relative path>`, with a log line and the metric
  `heinfer_quarantined_total{kind}`. The server never deletes the quarantine: an operator does.
* A lost database (missing, 0 bytes, or unreadable) next to plan or key files refuses to start
  (`DataDirError`, `heinfer serve` exits 2) unless `HEINFER_ORPHANS` says what to do:
  `adopt` rebuilds the rows from the files (plans are re-read and their hash checked; sessions
  from the `session.json` written next to their keys; an unreadable database file is moved to
  the quarantine first), `discard` moves everything to the quarantine and starts empty.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from heinfer_server import store as st
from heinfer_server.shred import ram_spill_dir, shred_tree

log = logging.getLogger("heinfer.server")

SIDECAR = "session.json"  # written next to a session's keys: what adoption needs of its row
DB_FILES = ("heinfer.db", "heinfer.db-wal", "heinfer.db-shm")


class DataDirError(Exception):
    """The data directory cannot be served as it is; the message says what to do."""


@dataclass
class Recovery:
    lost_database: str | None = None  # None, "missing", "empty" or "unreadable"
    tmp_removed: int = 0
    expired_removed: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)  # kind -> count
    adopted_models: list[str] = field(default_factory=list)
    adopted_sessions: int = 0
    quarantine_dir: str | None = None
    stamp: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                       + f"-{os.getpid()}")

    def summary(self) -> dict:
        return {"lost_database": self.lost_database, "tmp_removed": self.tmp_removed,
                "expired_removed": self.expired_removed, "quarantined": self.quarantined,
                "adopted_models": self.adopted_models, "adopted_sessions": self.adopted_sessions,
                "quarantine_dir": self.quarantine_dir}


def database_state(data_dir: Path) -> str | None:
    """None when heinfer.db is a readable SQLite database, else why not."""
    db = Path(data_dir) / "heinfer.db"
    if not db.exists():
        return "missing"
    if db.stat().st_size == 0:
        return "empty"
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            ok = conn.execute("PRAGMA quick_check").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return "unreadable"
    return None if ok and ok[0] == "ok" else "unreadable"


def holdings(data_dir: Path) -> tuple[int, int]:
    """(plan files, session directories) under the data directory."""
    d = Path(data_dir)
    plans = len(list((d / "models").glob("*/*.plan.json"))) if (d / "models").is_dir() else 0
    sessions = (sum(1 for p in (d / "sessions").iterdir() if p.is_dir())
                if (d / "sessions").is_dir() else 0)
    return plans, sessions


def preflight(data_dir: Path, orphans: str) -> str | None:
    """Raise DataDirError if the server must not start on this directory; return the kind of
    lost database (to adopt or discard) or None."""
    state = database_state(data_dir)
    if state is None:
        return None
    plans, sessions = holdings(data_dir)
    if state != "unreadable" and plans == sessions == 0:
        return None  # a first start (or nothing left to lose)
    if orphans in ("adopt", "discard"):
        return state
    db = Path(data_dir).resolve() / "heinfer.db"
    raise DataDirError(
        f"the database {db} is {state} but the data directory holds {plans} plan file(s) and "
        f"{sessions} session key director(y/ies); refusing to start so that nothing is lost. "
        "Restore the database from a backup, or start once with --adopt-orphans "
        "(HEINFER_ORPHANS=adopt: rebuild models and sessions from the files) or "
        "--discard-orphans (HEINFER_ORPHANS=discard: move them to quarantine/ and start empty)")


class _Quarantine:
    def __init__(self, data_dir: Path, report: Recovery):
        self.data_dir = data_dir
        self.report = report
        self.root = data_dir / "quarantine" / report.stamp

    def move(self, path: Path, kind: str, why: str) -> None:
        rel = path.relative_to(self.data_dir)
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)  # same file system: a rename, nothing copied or lost
        self.report.quarantined[kind] = self.report.quarantined.get(kind, 0) + 1
        self.report.quarantine_dir = str(self.root.relative_to(self.data_dir))
        log.warning("quarantined", extra={"kind": kind, "path": str(rel), "reason": why,
                                          "to": str(dest.relative_to(self.data_dir))})


def set_aside_database(data_dir: Path, report: Recovery) -> None:
    """Before adopt/discard: an unreadable database (and a WAL that belongs to a database no
    longer there, which SQLite would replay into a new one) go to the quarantine."""
    q = _Quarantine(data_dir, report)
    for name in DB_FILES:
        p = data_dir / name
        if p.exists():
            q.move(p, "database", f"database {report.lost_database}")


def recover(store: st.Store, report: Recovery, *, adopt: bool, allow_insecure: bool) -> Recovery:
    """Drop interrupted uploads, finish recorded deletions, adopt (if asked) or quarantine
    every file no row points to."""
    data_dir = store.data_dir
    # interrupted uploads may be refused ones (a secret key): overwritten, then deleted
    spill = ram_spill_dir(data_dir)
    for p in [*store.tmp.iterdir(), *(spill.iterdir() if spill else ())]:
        shred_tree(p)
        report.tmp_removed += 1
    if adopt:
        _adopt(store, report, allow_insecure)
    with store.tx() as c:
        rows = c.execute("SELECT key_dir, state FROM sessions").fetchall()
        live_plans = {r[0] for r in c.execute("SELECT plan_path FROM models")}
    live_dirs = {k for k, s in rows if s == "active"}
    expired = {k for k, s in rows if s == "expired"}
    q = _Quarantine(data_dir, report)
    for d in sorted((data_dir / "sessions").iterdir()):
        rel = str(d.relative_to(data_dir))
        if rel in live_dirs:
            continue
        if rel in expired and d.is_dir():  # its row recorded the deletion before a crash
            st.remove_tree(d)
            report.expired_removed += 1
        else:
            q.move(d, "session", "no session row")
    live_files = live_plans | {p.removesuffix(".json") + ".npz" for p in live_plans}
    for model_dir in sorted((data_dir / "models").iterdir()):
        if not model_dir.is_dir():
            q.move(model_dir, "other", "not a model directory")
            continue
        for f in sorted(model_dir.iterdir()):
            if str(f.relative_to(data_dir)) not in live_files:
                q.move(f, "plan" if ".plan." in f.name else "other", "no model row")
        if not any(model_dir.iterdir()):
            model_dir.rmdir()  # empty: nothing to keep
    return report


def _adopt(store: st.Store, report: Recovery, allow_insecure: bool) -> None:
    """Rebuild model rows from plan files (newest valid plan per name) and session rows from
    their sidecars; what cannot be adopted is left for the quarantine pass."""
    from heinfer_server.workers import inspect_plan

    data_dir = store.data_dir
    adopted: dict[str, str] = {}  # model name -> plan hash
    for model_dir in sorted((data_dir / "models").iterdir()):
        if not model_dir.is_dir():
            continue
        candidates = sorted(model_dir.glob("*.plan.json"), key=lambda p: p.stat().st_mtime,
                            reverse=True)
        for plan_json in candidates:
            try:
                info = inspect_plan(str(plan_json), allow_insecure)
            except Exception as e:  # any unreadable plan stays for the quarantine
                log.warning("plan not adopted", extra={"path": str(plan_json.relative_to(
                    data_dir)), "reason": f"{type(e).__name__}: {e}"})
                continue
            if plan_json.name != f"{info.plan_hash}.plan.json":
                continue
            spec = json.loads(info.spec_json)
            spec["name"] = model_dir.name
            st.put_model(store, name=model_dir.name, plan_hash=info.plan_hash,
                         plan_path=str(plan_json.relative_to(data_dir)),
                         spec_json=json.dumps(spec), n_inputs=info.n_inputs,
                         preprocessing_json=info.preprocessing_json)
            adopted[model_dir.name] = info.plan_hash
            report.adopted_models.append(model_dir.name)
            break
    for d in sorted((data_dir / "sessions").iterdir()):
        try:
            meta = json.loads((d / SIDECAR).read_text())
            ok = (meta["id"] == d.name and adopted.get(meta["model"]) == meta["plan_hash"]
                  and (d / "relin.seal").is_file())
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            continue
        st.adopt_session(store, session_id=d.name, owner=str(meta["owner"]),
                         model=meta["model"], plan_hash=meta["plan_hash"],
                         key_dir=str(d.relative_to(data_dir)), key_bytes=int(meta["key_bytes"]),
                         created_at=float(meta.get("created_at", time.time())))
        report.adopted_sessions += 1
    log.warning("adopted files of a lost database",
                extra={"models": report.adopted_models, "sessions": report.adopted_sessions})


def write_sidecar(key_dir: Path, row_fields: dict) -> None:
    """Written in the staged key directory before it is moved into place."""
    (key_dir / SIDECAR).write_text(json.dumps(row_fields))
