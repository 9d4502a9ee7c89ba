#!/usr/bin/env bash
# The main job: set up .venv, list the backbones, and run the real-data embedding check with the bundled
# DINOv2-S + MiniLM backbone on the NIH sample (../shared/data/nih-cxr14-sample, or pass --data DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/medbridge list backbones
.venv/bin/medbridge check-backbone "$@"
