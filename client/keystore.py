"""The client's secret keys, on its own disk, readable by its owner only.

    ROOT/                                   0700  ($HEINFER_HOME or ~/.heinfer)
      keys/SERVER/MODEL/PLAN_HASH/          0700  SERVER = host_port-<hash of the URL>
        secret.key                          0600  SEAL SecretKey (never sent anywhere)
        meta.json                           0600  url, model, plan hash, params, rotation steps
        sessions.json                       0600  {API key fingerprint: session id}

Keys are per server, model and plan hash: a model recompiled to a new plan gets new keys (the
rotation steps and parameters may differ), and the plan hash the keys were made for is pinned
in every request. Files are written to a temporary name with 0600 and renamed, so a crash never
leaves a half-written or briefly world-readable key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit

from heinfer_client.errors import KeystoreError


def default_root() -> Path:
    return Path(os.environ.get("HEINFER_HOME") or Path.home() / ".heinfer")


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def server_id(url: str) -> str:
    parts = urlsplit(url.rstrip("/"))
    host = re.sub(r"[^A-Za-z0-9.-]", "_", parts.hostname or "local")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{host}_{port}-{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:8]}"


def fingerprint(api_key: str | None) -> str:
    """Identifies an API key in local files without storing it."""
    return hashlib.sha256((api_key or "").encode()).hexdigest()[:16]


class KeyEntry:
    """One key directory: secret key + metadata + remembered sessions."""

    def __init__(self, directory: Path):
        self.dir = directory

    @property
    def secret_path(self) -> Path:
        return self.dir / "secret.key"

    def exists(self) -> bool:
        return self.secret_path.exists()

    def read_secret(self) -> bytes:
        st = self.secret_path.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.warn(f"{self.secret_path} was readable by others; permissions reset to "
                          "0600", stacklevel=2)
            os.chmod(self.secret_path, 0o600)
        return self.secret_path.read_bytes()

    def write(self, secret: bytes, meta: dict) -> None:
        _private_dir(self.dir)
        _write_private(self.dir / "meta.json", json.dumps(meta, indent=1).encode())
        _write_private(self.secret_path, secret)

    def meta(self) -> dict:
        try:
            return json.loads((self.dir / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def session_for(self, api_key: str | None) -> str | None:
        try:
            return json.loads((self.dir / "sessions.json").read_text()).get(fingerprint(api_key))
        except (OSError, json.JSONDecodeError):
            return None

    def remember_session(self, api_key: str | None, session_id: str | None) -> None:
        path = self.dir / "sessions.json"
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            doc = {}
        if session_id is None:
            doc.pop(fingerprint(api_key), None)
        else:
            doc[fingerprint(api_key)] = session_id
        _write_private(path, json.dumps(doc).encode())


class Keystore:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    def entry(self, url: str, model: str, plan_hash: str) -> KeyEntry:
        if not re.match(r"^[A-Za-z0-9._-]+$", model) or not re.match(r"^[0-9a-f]+$", plan_hash):
            raise KeystoreError(f"refusing odd model name or plan hash: {model!r} {plan_hash!r}")
        try:
            d = _private_dir(self.root)
            for part in ("keys", server_id(url), model, plan_hash):  # each level 0700
                d = _private_dir(d / part)
            return KeyEntry(d)
        except OSError as e:
            raise KeystoreError(f"cannot use key store {self.root}: {e}") from e

    def new_meta(self, url: str, model: str, spec) -> dict:
        return {"url": url, "model": model, "plan_hash": spec.plan_hash,
                "params": spec.params.model_dump(), "rotation_steps": spec.rotation_steps,
                "created_at": time.time()}
