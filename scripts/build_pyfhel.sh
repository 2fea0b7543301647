#!/usr/bin/env bash
# Builds the Pyfhel 3.5.0 wheel offline-capable and reproducibly into ./wheels/ (or $WHEEL_DIR).
#
# Why a script: Pyfhel 3.5.0 publishes no wheel, only a source archive, and its bundled SEAL 4.1
# build downloads Microsoft GSL, zlib and zstd from the internet (fails offline). Here SEAL takes
# them from Debian instead (libmsgsl-dev, zlib1g-dev, libzstd-dev): SEAL_BUILD_DEPS=OFF with
# GSL/zlib/zstd kept ON, and `-lzstd -lz` added to the Linux *extra link arguments* (putting them
# in `libraries` links but fails at import with an undefined `deflateInit_`).
#
#   bash scripts/build_pyfhel.sh            # build wheels/pyfhel-3.5.0-*.whl (skips if present)
#   bash scripts/build_pyfhel.sh --install  # ... and install it into .venv as heinfer[pyfhel]
#   bash scripts/build_pyfhel.sh --force    # rebuild even if the wheel exists
#
# Needs: Debian/Ubuntu (apt-get; run as root or with sudo), Python >= 3.10, PyPI reachable for the
# source archive (sha256-checked) and the pinned build tools. About 3 minutes on 2 cores; 8 MB.
# Licence: Pyfhel 3.5.0's LICENSE.txt and metadata say Apache-2.0 (an older README said GPLv3,
# since corrected upstream); see docs/BACKENDS.md. The wheel is built locally, never committed; the `pyfhel` extra is optional.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

PYFHEL_VERSION="3.5.0"
PYFHEL_SHA256="0375b83b5a83026924f59db25c4efa9f27e1e8a66d004658f4d24195986a04b6"
# Build tools pinned to versions contemporary with Pyfhel 3.5.0 (Aug 2025); numpy 2.x builds
# are ABI-compatible with any later numpy 2 at run time.
BUILD_REQS=(setuptools==80.9.0 wheel==0.45.1 Cython==3.1.3 numpy==2.2.6 toml==0.10.2
            packaging==25.0)
WHEEL_DIR="${WHEEL_DIR:-$ROOT/wheels}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"

INSTALL=0
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --install) INSTALL=1 ;;
        --force) FORCE=1 ;;
        -h|--help) sed -n 2,18p "$0"; exit 0 ;;
        *) echo "unknown option $arg (use --install, --force)" >&2; exit 2 ;;
    esac
done

log() { echo "[build_pyfhel] $*"; }
# run pip without the "Location ... is ignored" noise of local index mirrors; keeps pip's status
pipq() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
mkdir -p "$WHEEL_DIR"
WHEEL_DIR="$(cd "$WHEEL_DIR" && pwd)"
PYTAG="$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
WHEEL_GLOB="pyfhel-$PYFHEL_VERSION-$PYTAG-$PYTAG-*.whl"  # one wheel per Python version
existing="$(ls "$WHEEL_DIR"/$WHEEL_GLOB 2>/dev/null | head -1 || true)"

if [ -n "$existing" ] && [ "$FORCE" -eq 0 ]; then
    log "found $existing (use --force to rebuild)"
else
    start=$(date +%s)
    # -- Debian build needs ------------------------------------------------------------------
    DEB_PKGS=(cmake g++ make zlib1g-dev libzstd-dev libmsgsl-dev)
    missing=()
    for p in "${DEB_PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        SUDO=""
        if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
        log "installing Debian packages: ${missing[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi

    WORK="$(mktemp -d "${TMPDIR:-/tmp}/heinfer-pyfhel-build.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
    # -- a private build environment with pinned tools (no build isolation afterwards) ------
    log "build environment in $WORK/env"
    "$PYTHON" -m venv "$WORK/env"
    BPY="$WORK/env/bin/python"
    pipq "$BPY" -m pip install -q --disable-pip-version-check "${BUILD_REQS[@]}"

    # -- source archive, checked -------------------------------------------------------------
    log "downloading the Pyfhel $PYFHEL_VERSION source archive"
    pipq "$BPY" -m pip download -q --disable-pip-version-check --no-deps --no-build-isolation \
        --no-binary Pyfhel "Pyfhel==$PYFHEL_VERSION" -d "$WORK/src"
    archive="$(ls "$WORK"/src/*.tar.gz | head -1)"
    echo "$PYFHEL_SHA256  $archive" | sha256sum -c --quiet -
    tar -xzf "$archive" -C "$WORK/src"
    SRC="$(ls -d "$WORK"/src/*/ | head -1)"

    # -- patch pyproject.toml (CRLF line ends kept), then check the result by parsing it ----
    log "patching $SRC/pyproject.toml"
    "$BPY" - "$SRC/pyproject.toml" <<'EOF'
import sys
import tomllib

path = sys.argv[1]
raw = open(path, "rb").read()
nl = b"\r\n" if b"\r\n" in raw else b"\n"
text = raw.decode()
eol = nl.decode()


def replace_once(text: str, old: str, new: str, count: int = 1) -> str:
    found = text.count(old)
    if found != count:
        sys.exit(f"patch: expected {count} occurrence(s) of {old!r}, found {found}")
    return text.replace(old, new)


# SEAL takes GSL, zlib and zstd from the system instead of downloading them
text = replace_once(text, "[cpplibraries.SEAL.cmake_opts]" + eol,
                    "[cpplibraries.SEAL.cmake_opts]" + eol
                    + "    SEAL_BUILD_DEPS = 'OFF'      # heinfer: GSL/zlib/zstd from Debian" + eol)
# the static SEAL needs zstd and zlib at link time (Afhel and every extension)
text = replace_once(text, '{Linux = ["-Wl,-rpath=$ORIGIN/.", "-fopenmp"]}',
                    '{Linux = ["-Wl,-rpath=$ORIGIN/.", "-fopenmp", "-lzstd", "-lz"]}', count=2)
open(path, "wb").write(text.replace("\r\n", "\n").replace("\n", eol).encode())

cfg = tomllib.loads(text)
opts = cfg["cpplibraries"]["SEAL"]["cmake_opts"]
assert opts["SEAL_BUILD_DEPS"] == "OFF", opts
assert all(opts[k] == "ON" for k in ("SEAL_USE_MSGSL", "SEAL_USE_ZLIB", "SEAL_USE_ZSTD")), opts
for section in (cfg["cpplibraries"]["Afhel"], cfg["extensions"]["config"]):
    linux = [d["Linux"] for d in section["extra_link_args"] if "Linux" in d][0]
    assert linux[-2:] == ["-lzstd", "-lz"], linux
print("patch: SEAL_BUILD_DEPS=OFF, -lzstd -lz on Linux extra_link_args")
EOF

    # -- build -------------------------------------------------------------------------------
    log "building the wheel (SEAL + Afhel + 4 Cython extensions; a few minutes)"
    rm -f "$WHEEL_DIR"/$WHEEL_GLOB
    (cd "$SRC" && "$BPY" -m pip wheel -q --disable-pip-version-check --no-deps \
        --no-build-isolation . -w "$WHEEL_DIR") > "$WORK/build.log" 2>&1 || {
        tail -60 "$WORK/build.log" >&2
        echo "[build_pyfhel] build failed; full log above (last 60 lines)" >&2
        exit 1
    }
    existing="$(ls "$WHEEL_DIR"/$WHEEL_GLOB | head -1)"
    log "built $existing ($(du -h "$existing" | cut -f1)) in $(( $(date +%s) - start )) s"
fi

if [ "$INSTALL" -eq 1 ]; then
    [ -x "$ROOT/.venv/bin/python" ] || { echo "no .venv: run make setup first" >&2; exit 1; }
    log "installing heinfer[pyfhel] (editable) into .venv from $WHEEL_DIR"
    pipq "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check \
        --find-links "$WHEEL_DIR" --only-binary Pyfhel -e "$ROOT[pyfhel]"
    # smoke test: a CKKS round trip (fails loudly on a broken link, e.g. undefined deflateInit_)
    "$ROOT/.venv/bin/python" - <<'EOF'
import numpy as np
from Pyfhel import Pyfhel

he = Pyfhel()
he.contextGen(scheme="CKKS", n=4096, scale=2**30, qi_sizes=[40, 30, 30])
he.keyGen()
x = np.linspace(-1, 1, 2048)
err = np.abs(he.decryptFrac(he.encryptFrac(x))[:2048] - x).max()
assert err < 1e-4, err
print(f"[build_pyfhel] Pyfhel imports and round-trips (max error {err:.1e})")
EOF
fi
