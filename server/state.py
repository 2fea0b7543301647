"""What one running server holds: settings, store, worker pool, metrics and the API keys.

API keys are checked against SHA-256 hashes kept in memory (loaded at start from SQLite, where
configured keys are upserted and generated keys live). A key's principal (`c_…` for clients,
`a_…` for admins) is derived from its hash, so sessions stay with a key across restarts.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from heinfer import wire
from heinfer_server import store as st
from heinfer_server.errors import ApiError
from heinfer_server.limits import Limiter
from heinfer_server.metrics import Metrics
from heinfer_server.pool import EvalPool
from heinfer_server.settings import Settings

log = logging.getLogger("heinfer.server")


@dataclass(frozen=True)
class Principal:
    id: str
    name: str
    role: str  # "admin" | "client"


@dataclass
class ServerState:
    settings: Settings
    store: st.Store
    pool: EvalPool
    metrics: Metrics
    keys: dict[str, Principal] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    preload_done: bool = False
    startup_error: str | None = None
    touched: dict[str, float] = field(default_factory=dict)
    limiter: Limiter = field(init=False)

    def __post_init__(self) -> None:
        self.limiter = Limiter(self.settings, self.metrics)

    def touch_session(self, session_id: str) -> None:
        """Record use for idle expiry, writing SQLite at most every tenth of the idle time
        (and every 5 s at most): a commit per predict cost the API process a few ms of the CPU
        the HE workers need; expiry may come up to that much early."""
        now = time.time()
        every = min(5.0, self.settings.session_idle_ttl_s / 10)
        if now - self.touched.get(session_id, 0.0) >= every:
            st.touch_session(self.store, session_id=session_id)
            self.touched[session_id] = now
            if len(self.touched) > 10_000:  # forget the oldest half, not a leak
                for sid in sorted(self.touched, key=self.touched.get)[:5_000]:
                    del self.touched[sid]

    def authenticate(self, token: str) -> Principal | None:
        return self.keys.get(st.key_hash(token))

    # -- limits derived from a model's parameters ---------------------------------------------
    @staticmethod
    def ciphertext_limit(model: st.ModelRow) -> int:
        p = model.spec["params"]
        return wire.ciphertext_bytes_bound(p["poly_modulus_degree"], len(p["coeff_mod_bits"]) - 1)

    def predict_body_limit(self, model: st.ModelRow) -> int:
        return wire.frame_size_bound(model.n_inputs, self.ciphertext_limit(model))

    # -- sessions -------------------------------------------------------------------------------
    def owned_session(self, principal: Principal, session_id: str) -> st.SessionRow:
        """The caller's live session, or the problem that says why not. Another key's session
        is reported exactly like a missing one (404), so ids cannot be probed."""
        row = st.get_session(self.store, session_id=session_id) if _valid_sid(session_id) else None
        if row is None or row.owner != principal.id:
            raise ApiError("unknown_session", f"no session {session_id!r} for this API key")
        if row.state == "expired":
            raise ApiError("session_expired", f"session {session_id} expired after "
                           f"{self.settings.session_idle_ttl_s:g} s idle or was closed by a "
                           "model change; create a new one")
        if time.time() - row.last_used > self.settings.session_idle_ttl_s:
            self.expire(row)
            raise ApiError("session_expired", f"session {session_id} was idle for more than "
                           f"{self.settings.session_idle_ttl_s:g} s; create a new one")
        return row

    def plan_files(self, model: st.ModelRow) -> Path:
        """The model's plan file, or a 500 if the server lost it (the path is logged, never
        shown: it is the server's business, and the client cannot fix it)."""
        path = self.store.path(model.plan_path)
        if not (path.is_file() and path.with_name(path.name[:-5] + ".npz").is_file()):
            log.error("plan files missing", extra={"model": model.name, "path": str(path)})
            raise ApiError("plan_files_missing", f"the plan files of model {model.name!r} are "
                           "missing on the server; an operator must restore them or re-add the "
                           "model")
        return path

    def session_keys(self, row: st.SessionRow) -> Path:
        """The session's key directory, or why not: deleted meanwhile (404/410) or lost by the
        server (500)."""
        key_dir = self.store.path(row.key_dir)
        if (key_dir / "relin.seal").is_file():
            return key_dir
        now = st.get_session(self.store, session_id=row.id)
        if now is None:
            raise ApiError("unknown_session", f"session {row.id} was deleted meanwhile")
        if now.state != "active":
            raise ApiError("session_expired", f"session {row.id} expired meanwhile")
        log.error("session keys missing", extra={"session": row.id, "path": str(key_dir)})
        raise ApiError("session_keys_missing", f"the keys of session {row.id} are missing on "
                       "the server; create a new session")

    def expire(self, row: st.SessionRow) -> None:
        if st.expire_session(self.store, session_id=row.id) is not None:
            st.remove_tree(self.store.path(row.key_dir))
            log.info("session expired", extra={"session": row.id, "model": row.model})

    def sweep(self) -> int:
        """Expire idle sessions and drop week-old tombstones."""
        now = time.time()
        idle = st.idle_sessions(self.store, idle_before=now - self.settings.session_idle_ttl_s)
        for row in idle:
            self.expire(row)
        st.purge_tombstones(self.store, ended_before=now - 7 * 86400)
        self.metrics.sessions.set(st.count_active_sessions(self.store))
        return len(idle)


def _valid_sid(sid: str) -> bool:
    return sid.startswith("s_") and 8 <= len(sid) <= 64 and all(
        c.isalnum() or c in "-_" for c in sid)


def new_session_id() -> str:
    return "s_" + secrets.token_urlsafe(24)


def load_keys(settings: Settings, store: st.Store) -> dict[str, Principal]:
    """Upsert configured keys, forget removed ones, generate first-start keys if asked."""
    keep: set[str] = set()
    if settings.admin_key is not None:
        row = st.upsert_api_key(store, key=settings.admin_key.get_secret_value(), name="admin",
                                role="admin", source="config")
        keep.add(row.key_hash)
    for name, key in settings.configured_api_keys():
        keep.add(st.upsert_api_key(store, key=key, name=name, role="client",
                                   source="config").key_hash)
    st.remove_config_keys_except(store, keep_hashes=keep)
    rows = st.list_api_keys(store)
    if settings.generate_keys:
        made: dict[str, str] = {}
        for role in ("admin", "client"):
            if not any(r.role == role for r in rows):
                made[role] = secrets.token_urlsafe(32)
                st.upsert_api_key(store, key=made[role], name=f"generated-{role}", role=role,
                                  source="generated")
        if made:
            # never in a log line or in the database: an owner-only file the client reads
            path = write_generated_keys(settings, made)
            print(f"heinfer: generated {' and '.join(made)} API key(s), written to {path} "
                  f"(mode 0600). It is a client config file: `export HEINFER_CONFIG={path}` "
                  "(or copy it to ~/.config/heinfer/config.toml), then `heinfer models list`",
                  file=sys.stderr, flush=True)
            log.warning("generated API keys written to a file",
                        extra={"path": str(path), "roles": list(made)})
        rows = st.list_api_keys(store)
    return {r.key_hash: Principal(r.principal, r.name, r.role) for r in rows}


GENERATED_KEYS_FILE = "generated-keys.toml"


def write_generated_keys(settings: Settings, made: dict[str, str]) -> Path:
    """DATA_DIR/generated-keys.toml, 0600, in the client's config format (url, api_key,
    admin_key: heinfer_client.config), keeping a key written there at an earlier start."""
    path = settings.data_dir.resolve() / GENERATED_KEYS_FILE
    old: dict = {}
    if path.exists():
        try:
            old = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
            old = {}
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    values = {"url": f"{settings.scheme}://{host}:{settings.port}",
              "api_key": made.get("client", old.get("api_key")),
              "admin_key": made.get("admin", old.get("admin_key"))}
    text = ("# heinfer: API keys generated by `heinfer serve` at first start. Keep it private.\n"
            "# Client config: export HEINFER_CONFIG=<this file>, or copy it to\n"
            "# ~/.config/heinfer/config.toml (set url if clients reach the server elsewhere).\n"
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items() if v))
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
