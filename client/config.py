"""Where the CLI and the SDK find the server URL and the API keys.

Each setting is taken from the first of these that has it (`heinfer config show` prints the
result and where every value came from):

    1. the flag (`--url`, `--api-key`, `--admin-key`, `--cacert`, `--keystore`) or the
       argument (`Client(url, api_key)`)
    2. the environment: HEINFER_URL, HEINFER_API_KEY, HEINFER_ADMIN_KEY, HEINFER_CACERT,
       HEINFER_HOME (key store)
    3. the config file: $HEINFER_CONFIG, else $XDG_CONFIG_HOME/heinfer/config.toml
       (default ~/.config/heinfer/config.toml)
    4. built in: url http://127.0.0.1:8000, key store ~/.heinfer, no key

The file (TOML) names a default server and may hold keys for other servers:

    url = "http://127.0.0.1:8000"
    api_key = "..."                     # sent only to `url` above
    admin_key = "..."                   # `heinfer models add/remove`

    [servers."https://he.example.com"]
    api_key = "..."
    cacert = "/etc/ssl/he-ca.pem"

A key from the file is sent only to the server it is written for: `--url` pointing elsewhere
does not take the default server's key along. A file holding a key must be private (0600, as
`heinfer config set` and `heinfer serve` write it); otherwise it is refused, like ssh does.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from heinfer_client.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8000"
SECRET_FIELDS = ("api_key", "admin_key")
# (field, flag, environment variable)
SOURCES = {"url": ("--url", "HEINFER_URL"), "api_key": ("--api-key", "HEINFER_API_KEY"),
           "admin_key": ("--admin-key", "HEINFER_ADMIN_KEY"),
           "cacert": ("--cacert", "HEINFER_CACERT"), "keystore": ("--keystore", "HEINFER_HOME")}


class ServerTable(BaseModel):
    model_config = ConfigDict(extra="forbid")
    api_key: str | None = None
    admin_key: str | None = None
    cacert: str | None = None


class ConfigFile(ServerTable):
    url: str | None = None
    keystore: str | None = None
    servers: dict[str, ServerTable] = {}


def config_path() -> Path:
    """$HEINFER_CONFIG, else the XDG location (~/.config/heinfer/config.toml)."""
    if os.environ.get("HEINFER_CONFIG"):
        return Path(os.environ["HEINFER_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "heinfer" / "config.toml"


def read_file(path: Path | None = None) -> ConfigFile:
    """The config file, checked (an absent file is an empty config)."""
    path = path or config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return ConfigFile()
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror}") from e
    try:
        cfg = ConfigFile.model_validate(tomllib.loads(raw.decode("utf-8")))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    except ValidationError as e:
        wrong = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                          for err in e.errors())
        raise ConfigError(f"config file {path}: {wrong} (known keys: url, api_key, admin_key, "
                          "cacert, keystore, [servers.\"URL\"])") from e
    return cfg


def check_private(path: Path) -> None:
    """A key is taken from the file only when no one else can read it (as ssh does)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"config file {path} holds an API key but is readable by others "
                          f"(mode {mode:04o}): run `chmod 600 {path}`")


def _norm(url: str) -> str:
    return url.strip().rstrip("/")


@dataclass
class Resolved:
    """The settings in force, and where each came from ("--url", "HEINFER_URL", a file path,
    "default")."""

    url: str
    api_key: str | None = None
    admin_key: str | None = None
    cacert: str | None = None
    keystore: str | None = None
    source: dict[str, str] = field(default_factory=dict)
    path: Path = field(default_factory=config_path)
    flags: bool = True  # messages name CLI flags (else SDK arguments)
    key_name: str = "api_key"  # the setting the Client sends (admin commands: admin_key)

    def describe(self, name: str) -> str:
        """`--api-key` / `HEINFER_API_KEY` / `~/.config/heinfer/config.toml` for messages."""
        return self.source.get(name, "default")

    def hint(self, name: str) -> str:
        """How to set `name`: the flag (or argument), the variable and the file."""
        flag, env = SOURCES[name]
        if not self.flags:
            flag = f"Client({'url' if name == 'url' else name}=...)"
        return f"pass {flag}, set {env}, or put {name} in {self.path}"

    def explain(self, code: str) -> str | None:
        """What to tell the user about an authentication problem, or None."""
        if code == "missing_api_key":
            return f"no API key was given: {self.hint(self.key_name)}"
        if code == "invalid_api_key":
            return f"the key came from {self.describe(self.key_name)}"
        if code == "admin_required":
            return f"give the admin key: {self.hint('admin_key')}"
        return None

    def as_admin(self) -> Resolved:
        """The same settings sending the admin key (when one is set) instead of the API key."""
        if not self.admin_key:
            return self
        return replace(self, api_key=self.admin_key, key_name="admin_key")


def resolve(*, url: str | None = None, api_key: str | None = None,
            admin_key: str | None = None, cacert: str | None = None,
            keystore: str | None = None, flags: bool = True,
            with_admin: bool = True) -> Resolved:
    """Flag (or argument) > environment > config file > default, per setting. `flags` names
    the first level in messages: "--url" for the CLI, "argument" for the SDK (which has no
    use for the admin key: `with_admin=False`)."""
    given = {"url": url, "api_key": api_key, "admin_key": admin_key, "cacert": cacert,
             "keystore": keystore}
    path = config_path()
    out: dict[str, str | None] = {}
    source: dict[str, str] = {}
    file: ConfigFile | None = None

    def from_file() -> ConfigFile:
        nonlocal file
        if file is None:
            file = read_file(path)
        return file

    def pick(name: str, table: ServerTable | ConfigFile | None) -> None:
        flag, env = SOURCES[name]
        if given[name]:
            out[name], source[name] = given[name], flag if flags else "argument"
        elif os.environ.get(env):
            out[name], source[name] = os.environ[env], env
        elif table is not None and getattr(table, name, None):
            if name in SECRET_FIELDS:
                check_private(path)
            out[name], source[name] = getattr(table, name), str(path)

    pick("url", None)
    if "url" not in out and from_file().url:
        out["url"], source["url"] = from_file().url, str(path)
    resolved_url = _norm(out.get("url") or DEFAULT_URL)
    source.setdefault("url", "default")
    # the file's keys for this server only: the top level belongs to its `url`
    names = ("api_key", "admin_key", "cacert") if with_admin else ("api_key", "cacert")
    needs_file = any(not given[n] and not os.environ.get(SOURCES[n][1])
                     for n in (*names, "keystore"))
    table: ServerTable | ConfigFile | None = None
    if needs_file:
        cfg = from_file()
        servers = {_norm(u): t for u, t in cfg.servers.items()}
        if resolved_url in servers:
            table = servers[resolved_url]
        elif _norm(cfg.url or DEFAULT_URL) == resolved_url:
            table = cfg
    for name in names:
        pick(name, table)
    pick("keystore", from_file() if needs_file else None)
    paths = {n: str(Path(out[n]).expanduser()) if out.get(n) else None
             for n in ("cacert", "keystore")}  # "~/..." in the file or a quoted flag
    return Resolved(resolved_url, out.get("api_key"), out.get("admin_key"), paths["cacert"],
                    paths["keystore"], source, path, flags)


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def write_file(cfg: ConfigFile, path: Path | None = None) -> Path:
    """Write the config file owner-only (0600, directory 0700), atomically."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lines = ["# heinfer client configuration (heinfer config show: what is in force)"]
    for name in ("url", "api_key", "admin_key", "cacert", "keystore"):
        if getattr(cfg, name):
            lines.append(f"{name} = {_toml_str(getattr(cfg, name))}")
    for url, table in cfg.servers.items():
        lines.append(f"\n[servers.{_toml_str(url)}]")
        lines += [f"{n} = {_toml_str(getattr(table, n))}" for n in ServerTable.model_fields
                  if getattr(table, n)]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def set_value(name: str, value: str, *, server: str | None = None,
              path: Path | None = None) -> Path:
    """`heinfer config set NAME VALUE [--server URL]`: one value changed, the rest kept (the
    file is rewritten 0600, which also makes an existing readable file private)."""
    path = path or config_path()
    cfg = read_file(path)
    if server is not None:
        if name not in ServerTable.model_fields:
            raise ConfigError(f"{name} cannot be set per server (only "
                              f"{', '.join(ServerTable.model_fields)})")
        table = cfg.servers.setdefault(_norm(server), ServerTable())
        setattr(table, name, value or None)
    elif name in ConfigFile.model_fields and name != "servers":
        setattr(cfg, name, (_norm(value) if name == "url" else value) or None)
    else:
        raise ConfigError(f"unknown setting {name!r}: one of url, api_key, admin_key, cacert, "
                          "keystore")
    return write_file(cfg, path)
