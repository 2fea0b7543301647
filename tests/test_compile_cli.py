"""`heinfer compile` as a new user runs it: an ONNX file named netB.onnx gives a plan the real
server accepts (or a clear refusal naming --name), the calibration hint is the exact command,
and progress is plain lines when piped."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from heinfer.names import is_model_name, to_model_name
from heinfer.progress import Phase, Progress
from heinfer_client import Client
from heinfer_client.local import LocalServer, heinfer_command
from tests.conftest import small_params
from tests.test_server_support import ALICE, server_env

pytest.importorskip("onnx")


def compile_cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HEINFER_CACHE": str(tmp_path / "cache"),  # never calibrated
           "HEINFER_PROGRESS_INTERVAL": "0"}
    return subprocess.run([*heinfer_command(), "compile", *argv], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_names():
    assert to_model_name("netB") == "netb" and is_model_name("netb")
    assert to_model_name("My Net (v2)") == "my-net-v2-"
    assert to_model_name("__x") == "x" and to_model_name("!!!") == ""
    assert len(to_model_name("a" * 100)) == 64 and not is_model_name("Net")


def test_compile_netB_onnx_then_serve_it(tmp_path):
    from tests.test_onnx_import import _cnn_onnx

    _cnn_onnx(tmp_path / "netB.onnx", np.random.default_rng(0))
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(1).normal(size=(32, 1, 8, 8)))
    # a --name the server would refuse fails at once, before any work, naming the flag
    out = compile_cli(tmp_path, "netB.onnx", "--calib-npz", "cal.npz", "--out", "x",
                      "--name", "Net B")
    assert out.returncode == 2 and "--name 'Net B': a model name must match" in out.stderr
    assert not (tmp_path / "x.plan.json").exists()
    out = compile_cli(tmp_path, "netB.onnx", "--calib-npz", "cal.npz", "--out", "plans/netB")
    assert out.returncode == 0, out.stderr
    assert "plan named 'netb' (model name 'netB'" in out.stderr and "--name" in out.stderr
    # piped progress: start and end lines, no carriage returns
    assert "\r" not in out.stderr and re.search(r"planning netb: done in \d", out.stderr)
    # the calibration hint is the exact command for these parameters
    hint = re.search(r"run `python -m heinfer_packing\.calibrate (.*?)`", out.stdout)
    assert hint, out.stdout
    from heinfer.plan import Plan
    from heinfer_packing.calibrate import parse_params

    plan = Plan.load(tmp_path / "plans" / "netB.plan.json")
    assert plan.name == "netb"
    assert parse_params(hint.group(1).split()) == plan.params
    # the real server serves the compiled plan under that name
    with LocalServer(tmp_path / "data", env=server_env(),
                     args=["--plan", str(tmp_path / "plans" / "netB.plan.json")]) as srv:
        assert [m["name"] for m in Client(srv.url, ALICE).models()] == ["netb"]
    # a plan made before (named netB) stops `heinfer serve` at once with what to do
    old = json.loads((tmp_path / "plans" / "netB.plan.json").read_text())
    (tmp_path / "plans" / "old.plan.json").write_text(json.dumps({**old, "name": "netB"}))
    (tmp_path / "plans" / "old.plan.npz").write_bytes(
        (tmp_path / "plans" / "netB.plan.npz").read_bytes())
    out = subprocess.run([*heinfer_command(), "serve", "--data-dir", str(tmp_path / "d2"),
                          "--plan", str(tmp_path / "plans" / "old.plan.json")],
                         env={**os.environ, **server_env()}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "is named 'netB', which cannot be served" in out.stderr
    assert "now names it 'netb'" in out.stderr and "--name" in out.stderr


def test_progress_lines_when_piped(tmp_path, monkeypatch):
    monkeypatch.setenv("HEINFER_PROGRESS_INTERVAL", "0")
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        with Progress(3, "work", unit="img", file=f) as bar:
            for _ in range(3):
                bar.update()
        with Progress(2_000_000, "upload", unit="B", file=f) as up:
            up.update(1_000_000)
            up.update(1_000_000)
        with Phase("keys", file=f):
            pass
        with Progress(5, "quiet", file=f, disable=True) as q:
            q.update(5)
    lines = log.read_text().splitlines()
    assert lines[0] == "work: started, 3 img to do"
    assert lines[1].startswith("work: 1 img of 3 img (33%)") and "left" in lines[1]
    assert lines[3].startswith("work: done, 3 img in ")
    assert lines[4] == "upload: started, 2.0 MB to do" and "1.0 MB of 2.0 MB (50%)" in lines[5]
    assert lines[-2:] == ["keys ...", lines[-1]] and lines[-1].startswith("keys: done in ")
    assert not any("quiet" in line for line in lines)
    # on a terminal: a tqdm bar redrawn in place
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as tty, Progress(4, "bar", unit="img", file=tty) as bar:
        bar.update(4)
    drawn = ""
    while True:  # everything written before the slave closed (EIO at the end on Linux)
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        drawn += chunk.decode()
    os.close(master)
    assert "\r" in drawn and "bar: 100%" in drawn and "4/4" in drawn
    monkeypatch.setenv("HEINFER_PROGRESS", "0")
    with open(log, "w") as f, Progress(1, "off", file=f) as bar:
        bar.update()
    assert log.read_text() == ""


def test_calibration_reports_levels(capsys):
    from heinfer_packing.calibrate import calibrate

    params = small_params(2)
    data = calibrate(params, repeat=1, progress=True)
    err = capsys.readouterr().err
    assert f"calibrating {params.describe()}: started, 3 levels to do" in err
    assert "calibrating" in err and ": done, 3 levels in" in err
    assert set(data["ms"]["rotate"]) == {"0", "1", "2"}
