"""Client configuration: flag > environment > config file > default, keys sent only to the server
they are written for, errors that name the flag, the variable and the file, global options
before the subcommand, and a refused connection reported at once. The CLI runs as a subprocess
against a real `heinfer serve` on loopback."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from heinfer_client import Client, errors
from heinfer_client.config import config_path, read_file, resolve, set_value
from heinfer_client.local import free_port, heinfer_command
from tests.test_server_support import ADMIN, ALICE, running_server, tiny_plan


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("config")
    with running_server(d, [tiny_plan(d / "plans")]) as s:
        yield s


def heinfer(tmp_path: Path, *argv: str, **env: str) -> subprocess.CompletedProcess:
    """`heinfer ARGV` in a fresh process with only the client variables given here."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HEINFER_")}
    base.update({"HEINFER_CONFIG": str(tmp_path / "config.toml"),
                 "HEINFER_HOME": str(tmp_path / "ks"), **env})
    return subprocess.run([*heinfer_command(), *argv], env=base, capture_output=True,
                          text=True, timeout=120)


def test_precedence_flag_env_file(tmp_path, monkeypatch):
    cfg = tmp_path / "config.toml"
    monkeypatch.setenv("HEINFER_CONFIG", str(cfg))
    assert config_path() == cfg and resolve().url == "http://127.0.0.1:8000"
    set_value("url", "http://file.example:1/")
    set_value("api_key", "file-key")
    set_value("api_key", "other-key", server="https://other.example")
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    r = resolve()
    assert (r.url, r.api_key) == ("http://file.example:1", "file-key")
    assert r.describe("url") == str(cfg) and r.describe("api_key") == str(cfg)
    monkeypatch.setenv("HEINFER_API_KEY", "env-key")
    r = resolve()
    assert r.api_key == "env-key" and r.describe("api_key") == "HEINFER_API_KEY"
    r = resolve(api_key="flag-key")
    assert r.api_key == "flag-key" and r.describe("api_key") == "--api-key"
    monkeypatch.delenv("HEINFER_API_KEY")
    # the file's key goes only to the server it is written for
    assert resolve(url="http://elsewhere:2").api_key is None
    assert resolve(url="https://other.example/").api_key == "other-key"
    monkeypatch.setenv("HEINFER_URL", "https://other.example")
    assert resolve().api_key == "other-key" and resolve().describe("url") == "HEINFER_URL"
    # the SDK resolves the same way
    assert Client().api_key == "other-key" and Client().url == "https://other.example"


def test_config_file_errors(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    monkeypatch.setenv("HEINFER_CONFIG", str(cfg))
    cfg.write_text('api_key = "k"\n')
    os.chmod(cfg, 0o644)
    with pytest.raises(errors.ConfigError, match=r"readable by others \(mode 0644\).*chmod 600"):
        resolve()
    assert resolve(api_key="given").api_key == "given"  # the file's key is not used: no error
    set_value("url", "http://a")  # rewriting makes it private
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600 and resolve().api_key == "k"
    cfg.write_text("url = \n")
    with pytest.raises(errors.ConfigError, match="not valid TOML"):
        read_file(cfg)
    cfg.write_text('apikey = "x"\n')
    with pytest.raises(errors.ConfigError, match="apikey.*known keys"):
        read_file(cfg)
    os.chmod(cfg, 0o600)
    cfg.write_text('url = "http://a"\n')
    assert read_file(cfg).url == "http://a"
    assert read_file(tmp_path / "absent.toml").url is None


def test_cli_with_env_and_config_file_and_global_options(srv, tmp_path):
    # no key anywhere: the error names the flag, the variable and the file
    out = heinfer(tmp_path, "models", "list", "--url", srv.url)
    assert out.returncode == 1 and "missing_api_key" in out.stderr
    assert all(s in out.stderr for s in ("--api-key", "HEINFER_API_KEY", "config.toml")), \
        out.stderr
    # the environment
    out = heinfer(tmp_path, "models", "list", "--allow-insecure", HEINFER_URL=srv.url,
                  HEINFER_API_KEY=ALICE)
    assert out.returncode == 0 and out.stdout.startswith("tiny"), out.stderr
    # a wrong key says where it came from
    out = heinfer(tmp_path, "models", "list", HEINFER_URL=srv.url,
                  HEINFER_API_KEY="wrong-key-0123456789abc")
    assert out.returncode == 1 and "invalid_api_key" in out.stderr
    assert "the key came from HEINFER_API_KEY" in out.stderr
    # the config file, written by `heinfer config set`; options before the subcommand
    for name, value in (("url", srv.url), ("api_key", ALICE)):
        assert heinfer(tmp_path, "config", "set", name, value).returncode == 0
    assert stat.S_IMODE((tmp_path / "config.toml").stat().st_mode) == 0o600
    out = heinfer(tmp_path, "--allow-insecure", "models", "show", "tiny")
    assert out.returncode == 0 and "rotations" in out.stdout, out.stderr
    out = heinfer(tmp_path, "config", "show")
    assert out.returncode == 0 and ALICE not in out.stdout
    assert f"{srv.url}   ({tmp_path / 'config.toml'})" in out.stdout, out.stdout
    # admin commands name the admin key's flag and variable
    plan = tiny_plan(tmp_path, name="cfg-model", seed=3)
    out = heinfer(tmp_path, "models", "add", str(plan), "--allow-insecure")
    assert out.returncode == 1 and "admin_required" in out.stderr
    assert "--admin-key" in out.stderr and "HEINFER_ADMIN_KEY" in out.stderr
    out = heinfer(tmp_path, "--admin-key", ADMIN, "models", "add", str(plan))
    assert out.returncode == 0 and "added cfg-model" in out.stdout, out.stderr
    out = heinfer(tmp_path, "models", "remove", "cfg-model", HEINFER_ADMIN_KEY=ADMIN)
    assert out.returncode == 0, out.stderr
    # a flag after the subcommand still wins over the file
    out = heinfer(tmp_path, "models", "list", "--api-key", "wrong-key-0123456789abc")
    assert out.returncode == 1 and "the key came from --api-key" in out.stderr


def test_options_before_serve_and_compile(capsys):
    from heinfer_client.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--url", "http://x", "serve"])
    assert e.value.code == 2 and "--url http://x before `serve`" in capsys.readouterr().err
    assert main(["--no-progress", "compile", "no-such-model"]) == 2  # handed over
    assert "no model 'no-such-model'" in capsys.readouterr().err


def test_refused_connection_fails_fast(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(errors.TransportError, match="connection refused"):
        Client(url, ALICE).models()  # a retried call (SAFE): still not retried
    assert time.monotonic() - t0 < 1.0
    # asked for, it rides through a restart window
    t0 = time.monotonic()
    with pytest.raises(errors.TransportError, match=r"refused.*after [3-9]"):
        Client(url, ALICE, refused_wait=0.6, backoff=0.1).models()
    assert 0.6 <= time.monotonic() - t0 < 3
    out = heinfer(tmp_path, "health", "--url", url)
    assert out.returncode == 3 and "connection refused" in out.stderr
    assert "(URL from --url)" in out.stderr and "HEINFER_URL" in out.stderr
    assert "after 1 attempt" in out.stderr
