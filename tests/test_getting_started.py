"""docs/GETTING_STARTED.md runs as written: its `bash` blocks, in order, in one shell, from
`git clone` (of this repository's committed HEAD) through `make demo`, installing PyTorch, training
and exporting a model, compiling, serving and predicting with the CLI and the SDK.

The only changes to the page's environment: HEINFER_REPO names this repository, the server takes a
free port (HEINFER_PORT, HEINFER_URL), and the key store and config directory are temporary, so
that nothing of the machine's own heinfer setup is read or written."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from heinfer_client.local import free_port
from tests.packaging_support import ROOT, packaging_warnings

DOC = ROOT / "docs" / "GETTING_STARTED.md"


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", markdown, re.M | re.S)


def test_the_page_has_the_whole_path() -> None:
    script = "\n".join(bash_blocks(DOC.read_text()))
    for step in ("git clone", "make demo", ". .venv/bin/activate", "pip install torch==",
                 "python train_mine.py", "heinfer compile", "heinfer serve", "heinfer predict",
                 "from heinfer_client import Client", "kill $SERVER_PID"):
        assert step in script, step
    # a plain `python` block would not be run by the test: Python goes through `python - <<EOF`
    assert "```python" not in DOC.read_text()


@pytest.mark.slow
def test_getting_started_runs_as_written(tmp_path: Path) -> None:
    if subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "docs",
                       "Makefile", "scripts", "requirements", "pyproject.toml"],
                      capture_output=True, text=True).stdout.strip():
        print("note: uncommitted changes are not in the clone this test runs")
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HEINFER_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(HEINFER_REPO=str(ROOT), HEINFER_PORT=str(port),
               HEINFER_URL=f"http://127.0.0.1:{port}", HEINFER_HOME=str(tmp_path / "keystore"),
               XDG_CONFIG_HOME=str(tmp_path / "config"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as in a user's shell
    script = "set -euo pipefail\n" + "\n".join(bash_blocks(DOC.read_text()))
    proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=1500)
    finally:  # the page's server runs in the background: never leave it behind
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out[-6000:]

    # make demo: a fresh install that prints no packaging warning, then the demo's results
    demo = out[out.index("bash scripts/setup.sh"):out.index("[server] stopped")]
    assert packaging_warnings(demo) == [], packaging_warnings(demo)
    assert "agreement with the plaintext model 100.0%" in demo
    accuracy = float(re.search(r"plaintext accuracy ([\d.]+)%", out)[1])
    assert accuracy > 70, out[-6000:]
    assert "wrote plans/fmnist-mine.plan.json" in out
    predicted = re.findall(r"^(test-\d\.png)\s+(\d+)\s+p=", out, re.M)
    assert [name for name, _ in predicted] == ["test-0.png", "test-1.png", "test-2.png"], out
    sdk = re.findall(r"^(test-\d\.png): encrypted says (\d+), PyTorch says (\d+), largest logit "
                     r"difference [\d.]+ \(([\d.]+)% of the largest logit\)$", out, re.M)
    assert len(sdk) == 3, out[-6000:]
    for (name, enc, torch_label, diff), (cli_name, cli_label) in zip(sdk, predicted,
                                                                     strict=True):
        assert enc == torch_label == cli_label and name == cli_name, (name, enc, torch_label)
        assert float(diff) < 1.0, (name, diff)  # percent: CKKS noise, not a wrong model
    assert not re.search(r"Traceback", out), out[-6000:]
    shutil.rmtree(tmp_path / "heinfer" / ".venv", ignore_errors=True)  # 1.5 GB with torch
