"""Server configuration: environment variables `HEINFER_*`, overridden by `heinfer serve` flags.

Secrets are `SecretStr` so they never appear in a repr or a log line. A weak or well-known admin
key is refused at startup rather than discovered later: the admin key adds and removes models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_KEY_LENGTH = 16
# Values people paste from examples; refused whatever their length.
WEAK_KEYS = {"changethis", "changeme", "admin", "secret", "password", "test", "heinfer",
             "default", "example", "your-admin-key", "please-change-me"}


def _check_key(value: str, what: str) -> str:
    if len(value) < MIN_KEY_LENGTH or value.lower() in WEAK_KEYS or len(set(value)) < 6:
        raise ValueError(
            f"{what} is too weak: use at least {MIN_KEY_LENGTH} random characters, e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return value


class Settings(BaseSettings):
    """Everything the server reads at startup. See docs/SERVICE.md for the full table."""

    model_config = SettingsConfigDict(env_prefix="HEINFER_", extra="ignore")

    data_dir: Path = Field(default=Path("heinfer-data"),
                           description="SQLite database, plan files and session keys")
    host: str = Field(default="127.0.0.1", description="bind address (0.0.0.0 in containers)")
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256,
                         description="HE worker processes (one request each at a time)")
    max_queue: int = Field(default=8, ge=0,
                           description="requests waiting for a worker beyond the busy ones; "
                                       "more answer 503 with Retry-After")
    max_crashes_per_key: int = Field(
        default=3, ge=1, description="requests of one API key that killed their worker within "
                                     "crash_window_s before its requests are refused (429)")
    crash_window_s: float = Field(default=600.0, gt=0,
                                  description="window for max_crashes_per_key, seconds")
    request_timeout_s: float = Field(default=300.0, gt=0,
                                     description="per-request limit on HE work")
    shutdown_grace_s: float = Field(
        default=5.0, gt=0,
        description="on SIGTERM or Ctrl-C, how long in-flight requests may still finish; in a "
                    "container above request_timeout_s and below the stop grace period")
    setup_timeout_s: float = Field(default=600.0, gt=0,
                                       description="limit on checking a key upload or a plan")
    admin_key: SecretStr | None = Field(default=None, description="bearer key for model admin")
    api_keys: SecretStr | None = Field(
        default=None, description="client keys, comma separated, each `name:key` or `key`")
    api_keys_file: Path | None = Field(default=None,
                                       description="file with one `name:key` per line")
    generate_keys: bool = Field(default=True,
                                description="at first start without configured keys, generate "
                                            "an admin and a client key and print them once")
    max_key_bytes: int = Field(default=1 << 30, ge=1024,
                               description="largest evaluation-key upload")
    max_plan_bytes: int = Field(default=256 << 20, ge=1024, description="largest plan upload")
    max_sessions_per_key: int = Field(default=16, ge=1)
    max_bytes_per_key: int = Field(default=4 << 30, ge=1024,
                                   description="key bytes stored per API key, all sessions")
    # -- upload and abuse limits (docs/SERVICE.md, "Limits"); `limits` rate strings --------
    header_timeout_s: float = Field(default=10.0, gt=0,
                                    description="request line and headers must arrive within "
                                                "this; then the connection is closed")
    max_header_bytes: int = Field(default=64 * 1024, ge=4096,
                                  description="request line and headers, at most (431 beyond)")
    body_idle_timeout_s: float = Field(default=30.0, gt=0,
                                       description="longest pause while a request body arrives; "
                                                   "then 408 and the connection is closed")
    body_timeout_s: float = Field(default=900.0, gt=0,
                                  description="a whole request body must arrive within this")
    max_uploads_per_key: int = Field(default=4, ge=1,
                                     description="key or plan uploads one API key may be "
                                                 "sending at once; more answer 429")
    rate_limit: str = Field(default="50/second;1000/minute",
                            description="requests per API key (429 with Retry-After beyond)")
    bad_key_limit: str = Field(default="30/minute",
                               description="wrong API keys per client address; beyond, every "
                                           "keyed request from it answers 429 for a while")
    min_free_disk_bytes: int = Field(default=1 << 30, ge=0,
                                     description="new uploads answer 507 when they would leave "
                                                 "less free space than this in data_dir")
    metrics_require_key: bool = Field(default=True,
                                      description="/metrics needs an API key (any)")
    docs_require_key: bool = Field(default=False,
                                   description="/docs and /openapi.json need an API key (any)")
    trusted_proxies: str = Field(default="",
                                 description="addresses whose X-Forwarded-For is believed "
                                             "(comma separated, `*` for any); empty: none")
    session_idle_ttl_s: float = Field(default=3600.0, gt=0,
                                      description="a session unused this long expires")
    sweep_interval_s: float = Field(default=30.0, gt=0)
    worker_key_cache_bytes: int = Field(
        default=1 << 30, ge=1 << 20,
        description="loaded session keys kept per worker, in bytes (estimated in memory)")
    worker_key_cache_tenant_bytes: int = Field(
        default=512 << 20, ge=1 << 20,
        description="share of a worker's key cache one API key may hold")
    worker_cache_models: int = Field(default=4, ge=1,
                                     description="compiled plans kept per worker (LRU)")
    allow_insecure_params: bool = Field(default=False,
                                        description="accept plans with insecure test parameters")
    allow_unchecked_plans: bool = Field(
        default=False, description="serve startup plans (HEINFER_PRELOAD_PLANS) that carry no "
        "passed check record (heinfer.check); uploads force per request (?force=true)")
    preload_plans: str = Field(default="",
                               description="plan files (NAME.plan.json) to add at startup, "
                                           "comma separated")
    orphans: Literal["refuse", "adopt", "discard"] = Field(
        default="refuse",
        description="when the database is missing, empty or unreadable but plan or key files "
                    "remain: refuse to start, adopt them (rebuild rows) or discard them (move "
                    "them to quarantine/)")
    mp_start_method: Literal["spawn", "forkserver"] = "spawn"
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    log_level: str = "info"
    log_json: bool = True

    @field_validator("admin_key")
    @classmethod
    def _admin_key_strong(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            _check_key(v.get_secret_value(), "HEINFER_ADMIN_KEY")
        return v

    @model_validator(mode="after")
    def _client_keys_strong(self) -> Settings:
        for name, key in self.configured_api_keys():
            _check_key(key, f"API key {name!r}")
        from limits import parse_many

        for field in ("rate_limit", "bad_key_limit"):
            try:
                parse_many(getattr(self, field))
            except ValueError as e:
                raise ValueError(f"HEINFER_{field.upper()}: {e} (e.g. '50/second;1000/minute')"
                                 ) from None
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("TLS needs both HEINFER_SSL_CERTFILE and HEINFER_SSL_KEYFILE")
        return self

    def configured_api_keys(self) -> list[tuple[str, str]]:
        """(name, key) pairs from HEINFER_API_KEYS and HEINFER_API_KEYS_FILE."""
        entries: list[str] = []
        if self.api_keys is not None:
            entries += self.api_keys.get_secret_value().split(",")
        if self.api_keys_file is not None:
            entries += self.api_keys_file.read_text().splitlines()
        out = []
        for i, raw in enumerate(e.strip() for e in entries):
            if not raw or raw.startswith("#"):
                continue
            name, sep, key = raw.partition(":")
            out.append((name.strip(), key.strip()) if sep else (f"key{i}", name.strip()))
        return out

    def plan_paths(self) -> list[Path]:
        return [Path(p.strip()) for p in self.preload_plans.split(",") if p.strip()]

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile else "http"
