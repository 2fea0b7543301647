#!/usr/bin/env bash
# Installs everything heinfer needs on a fresh Debian/Ubuntu machine: the Fashion-MNIST Debian
# package (test data), a virtual environment, the locked dependencies (server and dev extras)
# and the project. Idempotent; `make setup` runs it when pyproject.toml or the lock changes.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "[setup] installing Debian package dataset-fashion-mnist"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "[setup] heinfer needs Python >= 3.11 (found $("$PYTHON" --version))" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PYTHON" -m venv .venv
fi
# pip's "Location ... is ignored" lines come from local index mirrors, not from this project
pipq() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }  # pipefail keeps pip's status
pipq .venv/bin/python -m pip install -q --upgrade pip
# Dependencies exactly as locked (versions and hashes, requirements/dev.txt: docs/RELEASING.md),
# then the project itself on top with no dependency resolution of its own.
echo "[setup] installing the locked dependencies (requirements/dev.txt)"
pipq .venv/bin/python -m pip install -q --require-hashes -r requirements/dev.txt
echo "[setup] installing heinfer (editable)"
# setuptools' "Editable installation" notice is information (mapped folders such as server/ are
# imported through a finder, not the working directory), not a packaging problem: silenced.
PYTHONWARNINGS="ignore:Editable installation" pipq .venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/python -c "import heinfer, tenseal, heinfer_models" # fail loudly if the install broke
if ! .venv/bin/python -m pip check >/dev/null; then  # a dependency added without `make lock`
    .venv/bin/python -m pip check >&2 || true
    echo "[setup] requirements/dev.txt lacks a dependency of pyproject.toml: run \`make lock\`" >&2
    exit 1
fi
# The packaging tests install the wheel into fresh venvs of every supported Python; 3.12 and 3.13
# come from pyenv (on the project's machines) or PATH. Nothing to install here: only say so.
for v in 3.12 3.13; do
    if ! ls "${PYENV_ROOT:-$HOME/.pyenv}"/versions/$v.*/bin/python$v >/dev/null 2>&1 \
            && ! command -v "python$v" >/dev/null; then
        echo "[setup] note: no Python $v (pyenv or PATH): tests/test_packaging.py skips it" \
             "(and fails under CI)" >&2
    fi
done
