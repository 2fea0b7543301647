#!/usr/bin/env bash
# What the browser client (/app) and its test need: Debian's chromium (the test drives it with
# playwright-core; no browser download) and the locked npm packages in web/ (node-seal 7.0.0,
# esbuild, playwright-core: web/package-lock.json). Idempotent; `make test` runs it when the
# lock changes. The built page itself is committed (server/static/app): serving needs no Node.js.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if [ ! -x /usr/bin/chromium ]; then
    echo "[setup] installing Debian package chromium (browser tests)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if ! command -v npm >/dev/null; then
    echo "[setup] installing Debian packages nodejs and npm (browser client build and tests)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
echo "[setup] npm ci in web/ (node-seal, esbuild, playwright-core as locked)"
(cd web && npm ci --no-audit --no-fund --loglevel=error)
