#!/usr/bin/env bash
# Installs everything heinfer needs on a fresh Debian/Ubuntu machine: the Fashion-MNIST Debian
# package (test data), a virtual environment and the project with its server and dev extras.
# Idempotent; `make setup` runs it when pyproject.toml changes.
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
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
echo "[setup] installing heinfer[server,dev] (editable)"
.venv/bin/python -m pip install -q -e ".[server,dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import heinfer, tenseal, heinfer_models" # fail loudly if the install broke
