"""The `heinfer` command line against a real server, the PNG reader, TLS, and the deployment
files (Dockerfile CMD = the command these tests run; compose file parse-checked)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from heinfer_client import Client
from heinfer_client.cli import main
from heinfer_client.images import load_inputs, read_png
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


def _png(path: Path, img: np.ndarray, filt: int | None = None) -> None:
    """A minimal PNG writer using each row filter (None: cycle through all five)."""
    h, w = img.shape[:2]
    ch = 1 if img.ndim == 2 else img.shape[2]
    rows = img.reshape(h, w * ch).astype(np.int32)
    raw = bytearray()
    prev = np.zeros(w * ch, dtype=np.int32)
    for y in range(h):
        f = (y % 5) if filt is None else filt
        cur = rows[y]
        left = np.concatenate([np.zeros(ch, dtype=np.int32), cur[:-ch]])
        upleft = np.concatenate([np.zeros(ch, dtype=np.int32), prev[:-ch]])
        if f == 0:
            enc = cur
        elif f == 1:
            enc = cur - left
        elif f == 2:
            enc = cur - prev
        elif f == 3:
            enc = cur - (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
            enc = cur - pred
        raw += bytes([f]) + bytes((enc & 0xFF).astype(np.uint8))
        prev = cur
    color = {1: 0, 2: 4, 3: 2, 4: 6}[ch]

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8,
                                                                         color, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))


def test_png_reader_all_filters_and_pillow(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(9, 7), dtype=np.uint8)
    for f in (None, 0, 1, 2, 3, 4):
        _png(tmp_path / "g.png", grey, f)
        np.testing.assert_array_equal(read_png(tmp_path / "g.png"), grey)
    from PIL import Image

    Image.fromarray(grey).save(tmp_path / "pil.png")
    np.testing.assert_array_equal(read_png(tmp_path / "pil.png"), grey)
    rgb = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    want = np.asarray(Image.fromarray(rgb).convert("L"), dtype=int)
    assert np.abs(read_png(tmp_path / "rgb.png").astype(int) - want).max() <= 1
    _png(tmp_path / "rgba.png", np.dstack([rgb, np.full((5, 4), 255, np.uint8)]))
    assert np.abs(read_png(tmp_path / "rgba.png").astype(int) - want).max() <= 1
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a PNG"):
        read_png(tmp_path / "bad.png")
    np.save(tmp_path / "b.npy", np.zeros((3, 1, 6, 6)))
    assert len(load_inputs(tmp_path / "b.npy", [1, 6, 6])) == 3
    np.save(tmp_path / "w.npy", np.zeros((5, 5)))
    with pytest.raises(ValueError, match="neither"):
        load_inputs(tmp_path / "w.npy", [1, 6, 6])


def test_predict_png_and_npy_files(srv, tmp_path, capsys):
    rng = np.random.default_rng(4)
    imgs = [rng.integers(0, 256, size=(6, 6), dtype=np.uint8) for _ in range(2)]
    for i, img in enumerate(imgs):
        _png(tmp_path / f"img{i}.png", img)
    batch = rng.normal(size=(3, 1, 6, 6))
    np.save(tmp_path / "batch.npy", batch)
    files = [str(tmp_path / "img0.png"), str(tmp_path / "img1.png"), str(tmp_path / "batch.npy")]
    code, out, _ = run(capsys, "predict", "tiny", *files, "--json", *base(srv, tmp_path))
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


def test_first_start_generates_keys_and_prints_them_once(tmp_path):
    env = {k: v for k, v in server_env().items() if k not in ("HEINFER_ADMIN_KEY",
                                                               "HEINFER_API_KEYS")}
    env["HEINFER_GENERATE_KEYS"] = "true"
    srv = LocalServer(tmp_path / "data", env=env)
    with srv:
        printed = re.findall(r"generated (admin|client) API key .*: (\S+)", srv.log())
        assert Client(srv.url).health()["status"] == "ready"
    keys = dict(printed)
    assert set(keys) == {"admin", "client"}
    with LocalServer(tmp_path / "data", env=env, port=srv.port) as again:
        assert "generated" not in again.log().split("Started server process")[-1]
        assert Client(again.url, keys["client"]).models() == []
        assert keys["client"] not in (tmp_path / "data" / "heinfer.db").read_bytes().decode(
            "latin-1")


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
    with pytest.raises(RuntimeError, match="start-up failed.*missing.plan.json"):
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
