"""Packaging as a user meets it: the sdist and the wheel build with no warning and pass
`twine check`; the wheel, installed non-editable into a fresh virtual environment with the locked
dependencies, runs a compile, the service demo (`make demo`'s path) and the quick tests on every
supported Python (3.11, 3.12, 3.13). One wheel is built per session and shared.

Other Pythons come from pyenv (this project's machines have 3.12 and 3.13 there) or PATH; where
one is missing the test is skipped with the reason, except under CI (CI=true) where it fails.
"""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import heinfer
from tests.packaging_support import (
    ROOT,
    find_python,
    lock_pins,
    lock_subset,
    packaging_warnings,
    pyproject,
    run,
    source_copy,
)

SUPPORTED = ("3.11", "3.12", "3.13")
# Fast, dependency-light tests that exercise real CKKS (kernels, wire format, parameters).
QUICK_TESTS = ("test_wire.py", "test_params.py", "test_kernels.py", "test_backend.py")
TEST_TOOLS = ("pytest", "iniconfig", "pluggy", "packaging", "pygments")


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path
    log: str


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """sdist + wheel built by `python -m build` from exactly the files the Dockerfile copies."""
    src = source_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    proc = run([sys.executable, "-m", "build", "--outdir", str(out), str(src)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    (wheel,) = out.glob("heinfer-*.whl")
    (sdist,) = out.glob("heinfer-*.tar.gz")
    return Dist(wheel, sdist, proc.stdout)


def test_build_prints_no_packaging_warning(dist: Dist, tmp_path: Path) -> None:
    assert packaging_warnings(dist.log) == []
    # and the issue's own command, `pip wheel .`
    proc = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "w"),
                str(source_copy(tmp_path / "src"))], timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert packaging_warnings(proc.stdout) == []


def test_packaging_warnings_are_detected() -> None:
    # the filter must not be blind: the original warnings are caught, mirror noise is not
    log = ("  /tmp/x/setuptools/config/_apply_pyprojecttoml.py:82: BuildBackendWarning: "
           "`project.license` as a TOML table is deprecated\n"
           "WARNING: Location 'file:///opt/pypi-more/simple/x/' is ignored: it is neither a file "
           "nor a directory.\n"
           "!!\n"
           "  /tmp/x/setuptools/command/build_py.py:215: BuildBackendWarning: Package "
           "'heinfer_models.zoo' is absent from the `packages` configuration.\n")
    assert len(packaging_warnings(log)) == 2


def test_twine_check_and_metadata(dist: Dist) -> None:
    proc = run([sys.executable, "-m", "twine", "check", "--strict", str(dist.wheel),
                str(dist.sdist)], timeout=120)
    assert proc.returncode == 0 and "PASSED" in proc.stdout, proc.stdout

    with zipfile.ZipFile(dist.wheel) as whl:
        names = set(whl.namelist())
        info = f"heinfer-{heinfer.__version__}.dist-info"
        meta = email.message_from_bytes(whl.read(f"{info}/METADATA"))
    assert dist.wheel.name == f"heinfer-{heinfer.__version__}-py3-none-any.whl"
    assert meta["License-Expression"] == "Apache-2.0"
    assert f"{info}/licenses/LICENSE" in names
    assert meta["Requires-Python"] == ">=3.11"
    classifiers = meta.get_all("Classifier")
    for v in SUPPORTED:
        assert f"Programming Language :: Python :: {v}" in classifiers
    # every shipped zoo file is in the wheel (the models are data, not Python packages)
    zoo = ROOT / "models" / "zoo"
    shipped = {f"heinfer_models/zoo/{p.relative_to(zoo).as_posix()}" for p in zoo.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_wheel_holds_every_tracked_module(dist: Dist) -> None:
    """The explicit package list misses nothing: every .py file git tracks in a package folder is
    in the wheel under its import name (a new subpackage must be added to pyproject.toml)."""
    tool = pyproject()["tool"]["setuptools"]
    folders = {"heinfer": "heinfer", **tool["package-dir"]}  # import name -> folder
    tracked = subprocess.run(["git", "ls-files", "--", *folders.values()], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    expected = set()
    for name, folder in folders.items():
        for path in tracked:
            if path.startswith(folder + "/") and path.endswith(".py"):
                expected.add(name + path[len(folder):])
    with zipfile.ZipFile(dist.wheel) as whl:
        names = set(whl.namelist())
    assert expected and expected <= names, sorted(expected - names)


def test_version_comes_from_one_place() -> None:
    project = pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "heinfer.__version__"}
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{heinfer.__version__}]" in changelog, "CHANGELOG.md lacks the current version"


def test_locks_pin_every_declared_dependency() -> None:
    """requirements/*.txt cover pyproject's dependencies with pins that satisfy them, and the
    server lock is the dev lock's versions (`make lock` regenerates both)."""
    from packaging.requirements import Requirement

    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    dev, server = lock_pins(ROOT / "requirements" / "dev.txt"), lock_pins(
        ROOT / "requirements" / "server.txt")
    for lock, reqs in ((server, project["dependencies"] + extras["server"]),
                       (dev, project["dependencies"] + extras["server"] + extras["dev"])):
        for spec in reqs:
            req = Requirement(spec)
            name = re.sub(r"[-_.]+", "-", req.name).lower()
            assert name in lock, f"{name} is not in the lock: run `make lock`"
            assert all(req.specifier.contains(v) for v in lock[name]), (name, lock[name])
    for name, versions in server.items():
        assert versions == dev[name], (name, versions, dev[name])
    # tests' own tools, installed into the fresh environments below, are locked too
    assert set(TEST_TOOLS) <= set(dev)


@pytest.mark.slow
@pytest.mark.parametrize("version", SUPPORTED)
def test_fresh_install_runs_demo_compile_and_quick_tests(version: str, dist: Dist,
                                                         tmp_path: Path) -> None:
    python = find_python(version)
    if python is None:
        reason = (f"Python {version} not found (looked in pyenv and PATH): the fresh-install "
                  f"check for {version} did NOT run")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)

    venv = tmp_path / "venv"
    assert run([python, "-m", "venv", str(venv)]).returncode == 0
    py = str(venv / "bin" / "python")
    # exactly the Dockerfile's install: locked dependencies with hashes, then the wheel alone
    for args in (["--require-hashes", "-r", str(ROOT / "requirements" / "server.txt")],
                 ["--no-deps", str(dist.wheel)]):
        proc = run([py, "-m", "pip", "install", "-q", *args], timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:]
    assert run([py, "-m", "pip", "check"]).returncode == 0

    work = tmp_path / "work"  # outside the repository: nothing imports from the source tree
    work.mkdir()
    where = run([py, "-c", "import heinfer, heinfer_server, heinfer_models, sys; print("
                 "sys.version_info[:2], heinfer.__file__, heinfer_server.__file__)"], cwd=work)
    assert where.returncode == 0, where.stdout
    assert f"({version.replace('.', ', ')})" in where.stdout
    assert str(ROOT) not in where.stdout and str(venv) in where.stdout, where.stdout

    bin_ = venv / "bin"
    compiled = run([str(bin_ / "heinfer-compile"), "fmnist-cryptonets", "--out",
                    "plans/fmnist-cryptonets"], cwd=work, timeout=300)
    assert compiled.returncode == 0, compiled.stdout[-4000:]
    assert (work / "plans" / "fmnist-cryptonets.plan.json").is_file()

    demo = run([py, "-m", "heinfer_client.demo_service", "--images", "2", "--workers", "1"],
               cwd=work, timeout=300)
    assert demo.returncode == 0, demo.stdout[-4000:]
    assert "agreement with the plaintext model 100.0%" in demo.stdout, demo.stdout[-4000:]
    assert "[server] stopped" in demo.stdout

    # the quick tests, against the installed wheel (a copy of the tests, run outside the repo)
    tools = tmp_path / "test-tools.txt"
    tools.write_text(lock_subset(ROOT / "requirements" / "dev.txt", TEST_TOOLS))
    proc = run([py, "-m", "pip", "install", "-q", "--require-hashes", "-r", str(tools)],
               timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    tests = work / "tests"
    tests.mkdir()
    for name in ("__init__.py", "conftest.py", *QUICK_TESTS):
        shutil.copy(ROOT / "tests" / name, tests / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEINFER_")}
    quick = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=work, env=env,
                timeout=600)
    assert quick.returncode == 0, quick.stdout[-4000:]
    assert re.search(r"\d+ passed", quick.stdout) and " failed" not in quick.stdout
    shutil.rmtree(venv, ignore_errors=True)  # kept only when the test fails


def test_find_python_checks_the_version() -> None:
    # the running interpreter is found for its own version, never for another one
    me = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = find_python(me)
    assert found is not None
    out = subprocess.run([found, "-c", "import sys; print(sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sys.version_info[:2])
    assert find_python("3.99") is None
