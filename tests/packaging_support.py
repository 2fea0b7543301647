"""Helpers for the packaging, deployment and documentation tests: subprocesses with their output,
the Docker build context, lock files, other Python interpreters."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pip prints this for the machine's local index mirrors; it says nothing about this project.
_MIRROR_NOISE = re.compile(r"^WARNING: Location '.*' is ignored")
_WARNING = re.compile(r"warn|deprecat", re.IGNORECASE)


def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run with stdout and stderr merged (the order a user sees them)."""
    env = dict(os.environ if env is None else env)
    # a user's shell normally lacks it; with it, setuptools says "byte-compiling is disabled"
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def packaging_warnings(log: str) -> list[str]:
    """Lines of a build log that warn (setuptools, pip), minus the local mirror's notices."""
    return [line for line in log.splitlines()
            if _WARNING.search(line) and not _MIRROR_NOISE.match(line)]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile_copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY in the Dockerfile, in order."""
    out = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *srcs, dst = shlex.split(line)[1:]
            out.append((srcs, dst))
    return out


def source_copy(dest: Path) -> Path:
    """The Docker build context as the image sees it: only what the Dockerfile COPYs, without
    what .dockerignore drops (caches, egg-info). Building from it proves the image can."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for srcs, dst in dockerfile_copies():
        for src in srcs:
            s = ROOT / src
            target = dest / dst if not dst.endswith("/") else dest / dst / s.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if s.is_dir():
                shutil.copytree(s, target, ignore=ignore, dirs_exist_ok=True)
            else:
                shutil.copy2(s, target)
    return dest


def lock_pins(path: Path) -> dict[str, set[str]]:
    """name -> pinned versions (several when markers split them by Python version)."""
    pins: dict[str, set[str]] = {}
    for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", path.read_text(), re.M):
        pins.setdefault(re.sub(r"[-_.]+", "-", m[1]).lower(), set()).add(m[2])
    return pins


def lock_subset(path: Path, names: tuple[str, ...]) -> str:
    """The entries (pin, markers, hashes) of the named packages, as a requirements file."""
    keep, out = False, []
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if m:
            keep = re.sub(r"[-_.]+", "-", m[1]).lower() in names
        elif line and not line.startswith(" "):
            keep = False
        if keep:
            out.append(line)
    return "\n".join(out) + "\n"


def find_python(version: str) -> str | None:
    """An interpreter for `version` ("3.12"): the newest pyenv build, else PATH; each is run to
    check it is that version and can make a virtual environment."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    builds = sorted(pyenv.glob(f"{version}.*/bin/python{version}"),
                    key=lambda p: [int(x) for x in re.findall(r"\d+", p.parts[-3])], reverse=True)
    candidates = [str(p) for p in builds]
    on_path = shutil.which(f"python{version}")
    if on_path:
        candidates.append(on_path)
    for exe in candidates:
        try:
            proc = subprocess.run(
                [exe, "-c", "import sys, venv, ssl; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0 and proc.stdout.strip() == version:
            return exe
    return None
