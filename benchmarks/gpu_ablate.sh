#!/usr/bin/env bash
# Device-side helper for a lent GPU machine (see docs/ablations.md): run studies of a study file and pack the
# summary into $OUT. Expects the NIH sample, wheels and bundled weights unpacked under /tmp/b.
# usage: bash benchmarks/gpu_ablate.sh STUDY_FILE STUDIES
set -e
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MEDBRIDGE_CACHE=/tmp/b/medbridge_cache
python3 -m medbridge ablate --study "$1" --data /tmp/b/nih-cxr14-sample --out /tmp/abl --only "$2" --quiet \
  --set train.workers=12 --set train.cache_dir=/tmp/fc 2>&1 | grep -v -i warn | tail -40
python3 -m medbridge ablate --study "$1" --data /tmp/b/nih-cxr14-sample --out /tmp/abl --no-train --quiet > /dev/null 2>&1 || true
(cd /tmp/abl && tar czf "$OUT/ablations.tgz" $(ls *.md *.csv *.png 2>/dev/null)) || true
cd /tmp/abl && tar czf "$OUT/runs_metrics.tgz" $(ls -d */*/metrics.json */*/config.yaml 2>/dev/null) || true
