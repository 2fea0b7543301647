"""The `heinfer` command line against a real server, the PNG reader, TLS, and the deployment
files (Dockerfile CMD = the command these tests run; compose file parse-checked)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from heinfer_client import Client
from heinfer_client.cli import main
from heinfer_client.local import LocalServer, heinfer_command
from tests.test_server_support import (
    ADMIN,
    ALICE,
    running_server,
    server_env,
    tiny_model,
    tiny_plan,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    with running_server(d, [tiny_plan(d / "plans")]) as s:
        s.plans = d / "plans"
        yield s


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def base(srv, tmp_path) -> list[str]:
    return ["--url", srv.url, "--api-key", ALICE, "--keystore", str(tmp_path / "ks"),
            "--allow-insecure"]


def test_models_list_show_add_remove(srv, tmp_path, capsys):
    code, out, _ = run(capsys, "models", "list", *base(srv, tmp_path))
    assert code == 0 and out.startswith("tiny") and "INSECURE" in out
    code, out, _ = run(capsys, "models", "show", "tiny", *base(srv, tmp_path))
    assert code == 0 and "rotations" in out and "ant" in out
    code, out, _ = run(capsys, "models", "show", "tiny", "--json", *base(srv, tmp_path))
    assert json.loads(out)["spec"]["plan_hash"]
    plan = tiny_plan(tmp_path, name="cli-model", seed=9)
    code, _, err = run(capsys, "models", "add", str(plan), *base(srv, tmp_path))
    assert code == 1 and "admin_required" in err
    code, out, _ = run(capsys, "models", "add", str(plan), "--admin-key", ADMIN,
                       *base(srv, tmp_path))
    assert code == 0 and "added cli-model" in out
    code, out, _ = run(capsys, "models", "remove", "cli-model", "--admin-key", ADMIN,
                       *base(srv, tmp_path))
    assert code == 0 and "removed" in out
    code, _, err = run(capsys, "models", "show", "cli-model", *base(srv, tmp_path))
    assert code == 1 and "unknown_model" in err


def test_keygen_stores_a_private_secret_key(srv, tmp_path, capsys):
    code, out, _ = run(capsys, "keygen", "tiny", "--json", "--upload", *base(srv, tmp_path))
    data = json.loads(out)
    assert code == 0 and not data["reused"] and data["eval_key_bytes"] > 100_000
    assert data["session_id"].startswith("s_")
    assert stat.S_IMODE(Path(data["secret_key"]).stat().st_mode) == 0o600
    code, out, _ = run(capsys, "keygen", "tiny", *base(srv, tmp_path))
    assert code == 0 and out.startswith("reused keys")


def test_predict_png_and_npy_files(srv, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(4)
    imgs = [rng.integers(0, 256, size=(6, 6), dtype=np.uint8) for _ in range(2)]
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(tmp_path / f"img{i}.png")
    batch = rng.normal(size=(3, 1, 6, 6))
    np.save(tmp_path / "batch.npy", batch)
    files = [str(tmp_path / "img0.png"), str(tmp_path / "img1.png"), str(tmp_path / "batch.npy")]
    code, out, _ = run(capsys, "predict", "tiny", *files, "--json", "--batch", "--normalized",
                       *base(srv, tmp_path))
    assert code == 0
    data = json.loads(out)
    preds = data["predictions"]
    assert [p["input"] for p in preds][-1].endswith("batch.npy[2]") and len(preds) == 5
    model = tiny_model()
    inputs = [((img / 255 - 0.5) / 0.25)[None] for img in imgs] + list(batch)
    for p, x in zip(preds, inputs, strict=True):
        assert np.abs(np.array(p["logits"]) - model.forward(x)).max() < 1e-2
        assert p["label_name"] == ["ant", "bee", "cat"][p["label"]]
    code, out, err = run(capsys, "predict", "tiny", files[0], "--no-progress",
                         *base(srv, tmp_path))
    assert code == 0 and re.search(r"img0\.png\s+(ant|bee|cat)\s+p=0\.\d+", out), out
    assert "(reused)" in out  # the session from the first call


def test_cli_errors(srv, tmp_path, capsys):
    code, _, err = run(capsys, "predict", "nope", "x.npy", *base(srv, tmp_path))
    assert code == 1 and "unknown_model" in err
    code, _, err = run(capsys, "health", "--url", "http://127.0.0.1:9")
    assert code == 3 and "cannot reach" in err
    code, out, _ = run(capsys, "models", "list", "--json", "--url", srv.url,
                       "--api-key", "wrong-key-0123456789abc")
    assert code == 1 and json.loads(out)["error"]["code"] == "invalid_api_key"
    code, _, err = run(capsys, "models", "show", "tiny", "--url", srv.url, "--api-key", ALICE,
                       "--keystore", str(tmp_path))
    assert code == 2 and "128-bit" in err  # refuses insecure specs unless asked


def test_dockerfile_runs_the_command_the_tests_run(srv):
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    ours = heinfer_command() + ["serve"]
    assert cmd == [Path(ours[0]).name, *ours[1:]] == ["heinfer", "serve"]
    assert srv.command == ours and srv.args[0] == "--plan"  # the tests' servers run it too
    env = dict(re.findall(r"(HEINFER_\w+)=(\S+)", dockerfile))
    assert env["HEINFER_HOST"] == "0.0.0.0" and env["HEINFER_DATA_DIR"] == "/data"
    health = json.loads(re.search(r"CMD (\[\"heinfer\", \"health\".*\])", dockerfile).group(1))
    url = health[health.index("--url") + 1]
    assert url.startswith("http://127.0.0.1:")
    # the healthcheck command, run here against a live server, succeeds
    out = subprocess.run([*heinfer_command(), *health[1:-1], srv.url], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "ready" in out.stdout


def test_compose_file_parses_and_matches(srv):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = compose["services"]["heinfer"]
    assert svc["command"] == ["heinfer", "serve"]
    assert "heinfer-data:/data" in svc["volumes"] and "heinfer-data" in compose["volumes"]
    assert svc["environment"]["HEINFER_DATA_DIR"] == "/data"
    assert svc["env_file"] == ["heinfer.env"]
    assert svc["healthcheck"]["test"][:3] == ["CMD", "heinfer", "health"]
    assert all(p.startswith("127.0.0.1:") for p in svc["ports"])
    # every HEINFER_* variable it sets is a setting the server knows
    from heinfer_server.settings import Settings

    fields = {f"HEINFER_{name.upper()}" for name in Settings.model_fields}
    assert set(svc["environment"]) <= fields, set(svc["environment"]) - fields
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore and "*.env" in ignore


def test_serve_refuses_a_weak_admin_key(tmp_path):
    out = subprocess.run([*heinfer_command(), "serve", "--data-dir", str(tmp_path)],
                         env={**os.environ, "HEINFER_ADMIN_KEY": "changethis"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "too weak" in out.stderr


def test_first_start_writes_generated_keys_to_a_private_file(tmp_path):
    """Generated keys go to DATA/generated-keys.toml (0600), never to the log; that file is a
    client config: `heinfer` run as a subprocess with only HEINFER_CONFIG set uses it."""
    env = {k: v for k, v in server_env().items() if k not in ("HEINFER_ADMIN_KEY",
                                                               "HEINFER_API_KEYS")}
    env["HEINFER_GENERATE_KEYS"] = "true"
    srv = LocalServer(tmp_path / "data", env=env)
    keyfile = tmp_path / "data" / "generated-keys.toml"
    with srv:
        log = srv.log()
        assert f"written to {keyfile} (mode 0600)" in log and "HEINFER_CONFIG" in log
        assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
        import tomllib

        keys = tomllib.loads(keyfile.read_text())
        assert keys["url"] == srv.url and keys["api_key"] != keys["admin_key"]
        assert keys["api_key"] not in log and keys["admin_key"] not in log
        assert Client(srv.url).health()["status"] == "ready"
        cli_env = {**os.environ, "HEINFER_CONFIG": str(keyfile),
                   "HEINFER_HOME": str(tmp_path / "ks")}
        out = subprocess.run([*heinfer_command(), "models", "list"], env=cli_env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "(no models)" in out.stdout, out.stderr
    with LocalServer(tmp_path / "data", env=env, port=srv.port) as again:
        assert "generated" not in again.log().split("Started server process")[-1]
        assert Client(again.url, keys["api_key"]).models() == []
        assert tomllib.loads(keyfile.read_text()) == keys  # untouched
        db = (tmp_path / "data" / "heinfer.db").read_bytes().decode("latin-1")
        assert keys["api_key"] not in db and keys["admin_key"] not in db


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_with_uvicorn_certificate_options(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=60)
    with LocalServer(tmp_path / "data", env=server_env(), cafile=cert,
                     args=["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]) as srv:
        assert srv.url.startswith("https://")
        with Client(srv.url, ALICE, verify=str(cert)) as c:  # closed: no idle TLS connection
            assert c.models() == []                          # for the shutdown to wait on
        with pytest.raises(Exception):  # noqa: B017 - plain HTTP is not served
            Client(srv.url.replace("https", "http"), ALICE, retries=0).models()


def test_module_entry_points():
    for mod in ("heinfer_server", "heinfer_client.cli"):
        out = subprocess.run([sys.executable, "-m", mod, *(["--help"] if mod ==
                                                           "heinfer_server" else ["--help"])],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "usage" in out.stdout.lower()


def test_failed_start_is_reported_and_leaves_no_process(tmp_path):
    srv = LocalServer(tmp_path / "data", env=server_env(),
                      args=["--plan", str(tmp_path / "missing.plan.json")])
    with pytest.raises(RuntimeError, match="(?s)exited with 2.*missing.plan.json not found"):
        srv.start()
    assert srv.proc.poll() is not None


def test_heinfer_compile_is_the_compiler(tmp_path, capsys):
    """`heinfer compile` (the issue's spelling) runs heinfer-compile: plan, report, errors."""
    from heinfer_client.cli import main

    assert main(["compile", "fmnist-cryptonets", "--out", str(tmp_path / "cn")]) == 0
    out = capsys.readouterr().out
    assert "ring degree 8192" in out and (tmp_path / "cn.plan.json").exists()
    assert "depth" in (tmp_path / "cn.report.txt").read_text()
    assert main(["compile", "no-such-model"]) == 2
    assert "no model 'no-such-model'" in capsys.readouterr().err
