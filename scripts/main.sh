#!/usr/bin/env bash
# The main job: set up .venv, then `medbridge demo`: MedBridge vs a linear probe on the real NIH sample
# (../shared/data/nih-cxr14-sample, or pass --data DIR) with the bundled DINOv2-S + MiniLM backbone,
# patient-disjoint split; prints the comparison and writes a run folder under runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/medbridge demo "$@"
