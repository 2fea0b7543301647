"""Every command in README.md runs in a test, or says which test covers it and why it is not run
here. The commands are extracted from the page (code blocks and inline `code` that starts like a
command); a command added to the README without a row below fails
`test_every_readme_command_is_run_or_covered`, so the README cannot drift from what is tested."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from heinfer_client.local import free_port
from tests.packaging_support import ROOT

README = ROOT / "README.md"
BIN = Path(sys.executable).parent
LOOKS_LIKE_A_COMMAND = re.compile(
    r"^(make \w+|\. \.venv/bin/activate|\.venv/bin/\S+.*|heinfer(-[a-z]+)?( .*)?|python3? -m .*"
    r"|docker compose .*|pip install .*|export .*)$")

RUN_HERE = "run by tests/test_readme.py"
# (pattern over the whitespace-normalized command, where it is run or why not)
COMMANDS: list[tuple[str, str]] = [
    # the "Using the service" block and the two Python blocks: run below, as written
    (r"heinfer compile fmnist-cryptonets --out plans/fmnist-cryptonets", RUN_HERE),
    (r"heinfer serve --data-dir \./heinfer-data --plan plans/fmnist-cryptonets\.plan\.json",
     RUN_HERE),
    (r"export HEINFER_CONFIG=\$PWD/heinfer-data/generated-keys\.toml", RUN_HERE),
    (r"heinfer predict fmnist-cryptonets shirt\.png boot\.jpg", RUN_HERE),
    (r"python block: from heinfer_client import Client.*", RUN_HERE),
    (r"python block: from heinfer\.backends import make_backend.*", RUN_HERE),
    (r"heinfer-demo", RUN_HERE),
    (r"heinfer compile fmnist-cryptonets --backend pyfhel --out plans/fmnist-web",
     "tests/test_pyfhel_serving.py::test_compile_cli_backend_pyfhel (the browser test serves "
     "the same plan: tests/test_browser.py::test_page_predicts_a_fashion_mnist_image_and_keeps_"
     "its_secret_key)"),
    (r"heinfer config set api_key KEY", RUN_HERE),
    (r"heinfer config show", RUN_HERE),
    # names of the commands above, not commands of their own
    (r"heinfer|heinfer serve|\.venv/bin/heinfer|\.venv/bin/heinfer-compile", RUN_HERE),
    # a fresh clone: tests/test_getting_started.py::test_getting_started_runs_as_written
    (r"make demo|make setup|\. \.venv/bin/activate",
     "tests/test_getting_started.py::test_getting_started_runs_as_written (fresh clone)"),
    (r"make test", "CI: .ci/run is `make test`"),
    (r"heinfer-compile --sanitize \d+",
     "tests/test_model_privacy.py::test_sanitized_plan_served_by_heinfer_serve (a flag named in "
     "prose: sanitized plans compiled and served over HTTP)"),
    (r"heinfer verify PLAN --inputs FILE\.npz",
     "tests/test_check.py::test_verify_records_a_check_for_an_old_plan (the same command on a "
     "saved plan and an npz of inputs)"),
    (r"heinfer compile model\.pt",
     "tests/test_calib_data.py::test_compile_a_saved_torch_module (the same CLI on a saved torch "
     "module)"),
    (r"docker compose( --profile tls)? up -d",
     "tests/test_deploy.py::test_compose_file_is_valid_against_the_compose_schema (no Docker "
     "engine on the project's machines: the compose file is schema-checked, the image's install "
     "is tests/test_packaging.py::test_fresh_install_runs_demo_compile_and_quick_tests)"),
    (r"heinfer-compile alexnet-imagenet-224",
     "tests/test_alexnet.py::test_full_size_topology_is_planned_in_little_memory (plans the same "
     "topology; the CLI run itself takes 36 s and 1.6 GB)"),
    # long runs (minutes to hours): their code is tested with small sizes
    (r"make bench|python -m bench\.alexnet_bench",
     "tests/test_bench_quick.py::test_first_bench_quick_runs_and_is_sane and "
     "tests/test_bench_quick.py::test_alexnet_bench_quick_runs_and_is_sane (the benchmarks' "
     "--quick modes; full runs take hours and need an idle machine)"),
    (r"make train|\.venv/bin/python -m heinfer_models\.train_conformal --blocks 1 2 4 8 "
     r"--epochs 8|\.venv/bin/python -m heinfer_models\.train_alexnet --epochs 8 --threads 1",
     "NOT RUN: the training scripts need the torch extra and 10-60 minutes each; training a "
     "PyTorch model and compiling it is run by "
     "tests/test_getting_started.py::test_getting_started_runs_as_written"),
    (r"\.venv/bin/python -m heinfer_models\.record fmnist-cryptonets --images 500",
     "tests/test_end_to_end.py::test_recorded_accuracy_is_present_and_plausible (the record it "
     "writes; 500 encrypted images take about a minute per 100)"),
]


def readme_commands() -> list[str]:
    text = README.read_text()
    out: list[str] = []
    for lang, body in re.findall(r"^```(\w+)\n(.*?)^```$", text, re.M | re.S):
        if lang == "bash":
            for line in body.splitlines():
                cmd = re.sub(r"\s+#.*$", "", line).strip()
                if cmd and not cmd.startswith("#"):
                    out.append(cmd)
        elif lang == "python":
            out.append("python block: " + " ".join(body.split()))
    prose = re.sub(r"^```.*?^```$", "", text, flags=re.M | re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        cmd = " ".join(span.split())
        if LOOKS_LIKE_A_COMMAND.match(cmd):
            out.append(cmd)
    return list(dict.fromkeys(out))


def python_block(start: str) -> str:
    blocks = re.findall(r"^```python\n(.*?)^```$", README.read_text(), re.M | re.S)
    (block,) = [b for b in blocks if b.startswith(start)]
    return block


def test_every_readme_command_is_run_or_covered() -> None:
    commands = readme_commands()
    assert "make demo" in commands and "make test" in commands
    unclassified = [c for c in commands
                    if not any(re.fullmatch(p, c, re.S) for p, _ in COMMANDS)]
    assert unclassified == [], (
        f"README commands neither run nor covered: {unclassified}; run them in "
        "tests/test_readme.py or add a row to COMMANDS naming the test that covers them")
    for _, where in COMMANDS:  # every test named as coverage exists
        for path, name in re.findall(r"(tests/[\w/]+\.py)::(\w+)", where):
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), (path, name)
    # the quick start stays two commands
    quick = re.search(r"## Quick start.*?```bash\n(.*?)```", README.read_text(), re.S)[1]
    assert [re.sub(r"\s+#.*", "", line) for line in quick.strip().splitlines()] == [
        "make demo", "make test"]


def _run(cmd: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(shlex.split(cmd), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (cmd, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout + proc.stderr


def test_readme_service_commands_and_python_blocks_run(tmp_path: Path) -> None:
    from PIL import Image

    from heinfer_models import fashion_mnist

    images, labels = fashion_mnist.load("test")
    Image.fromarray(images[6]).save(tmp_path / "shirt.png")  # label 4: coat (close enough)
    Image.fromarray(images[0]).save(tmp_path / "boot.jpg", quality=95)  # label 9: ankle boot
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEINFER_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", HEINFER_PORT=str(port),
               HEINFER_URL=f"http://127.0.0.1:{port}", HEINFER_HOME=str(tmp_path / "keystore"),
               XDG_CONFIG_HOME=str(tmp_path / "config"), HEINFER_WORKERS="1")

    block = re.search(r"## Using the service.*?```bash\n(.*?)```", README.read_text(), re.S)[1]
    lines = [re.sub(r"\s+#.*$", "", x).strip() for x in block.splitlines()]
    lines = [x for x in lines if x and not x.startswith("#")]
    compile_, serve, export, predict = lines  # the block's four commands, in order
    _run(compile_, tmp_path, env)
    assert (tmp_path / "plans" / "fmnist-cryptonets.plan.json").is_file()

    server = subprocess.Popen(shlex.split(serve), cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(120):
            if subprocess.run([BIN / "heinfer", "health"], env=env,
                              capture_output=True).returncode == 0:
                break
            assert server.poll() is None, server.stderr.read()
            subprocess.run(["sleep", "0.5"])
        name, value = export.removeprefix("export ").split("=", 1)
        env[name] = value.replace("$PWD", str(tmp_path))
        out = _run(predict, tmp_path, env)
        assert re.search(r"^boot\.jpg\s+Ankle boot\s", out, re.M), out
        assert re.search(r"^shirt\.png\s+\S", out, re.M), out

        # the SDK block, with `image` a uint8 test image (its comment says uint8 pixels)
        sdk = ("import numpy as np\nfrom heinfer_models import fashion_mnist\n"
               "image = fashion_mnist.load('test')[0][0]\n"
               + python_block("from heinfer_client import Client")
               + "\nassert p.label == 9, p\nprint('sdk ok', p.label_name)\n")
        assert "sdk ok Ankle boot" in _run_python(sdk, tmp_path, env)

        # the config commands, against this server's key
        key = re.search(r'^api_key = "(.+)"$',
                        (tmp_path / "heinfer-data" / "generated-keys.toml").read_text(), re.M)[1]
        cfg_env = {k: v for k, v in env.items() if k != "HEINFER_CONFIG"}
        _run(f"heinfer config set api_key {key}", tmp_path, cfg_env)
        shown = _run("heinfer config show", tmp_path, cfg_env)
        assert "api_key" in shown and key not in shown, shown  # shown, never printed in clear
        assert (tmp_path / "config" / "heinfer" / "config.toml").stat().st_mode & 0o777 == 0o600
    finally:
        server.terminate()
        server.wait(timeout=60)


def _run_python(code: str, cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout


def test_readme_library_block_and_demo_run(tmp_path: Path) -> None:
    code = ("from heinfer_models import fashion_mnist\n"
            "image = fashion_mnist.normalize(fashion_mnist.load('test')[0][:1])[0]\n"
            + python_block("from heinfer.backends import make_backend")
            + "\nimport numpy as np\nprint('label', int(np.argmax(logits)))\n")
    assert "label 9" in _run_python(code, tmp_path, dict(os.environ))
    out = _run("heinfer-demo", tmp_path, {**os.environ,
                                          "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert re.search(r"agreement\D+100(\.0)?%", out), out[-3000:]


@pytest.mark.parametrize("cmd", ["make demo", "heinfer-compile alexnet-imagenet-224"])
def test_classification_is_not_blind(cmd: str) -> None:
    # commands that are covered elsewhere match a row that is not RUN_HERE
    rows = [where for p, where in COMMANDS if re.fullmatch(p, cmd)]
    assert len(rows) == 1 and rows[0] != RUN_HERE
