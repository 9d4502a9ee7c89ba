#!/usr/bin/env bash
# What a new user does with pip: build the wheel of this checkout, install "medbridge[all]" from it into a clean venv
# (torch 2.14.1 first, as scripts/setup.sh), `pip check`, ask pip's resolver whether the wheel also installs next to
# the lowest allowed transformers/timm/open_clip and next to transformers 4.57 and 5.x, then run `medbridge demo --data <NIH folder>` from outside the
# checkout with an empty medbridge cache and check that the run folder's files are group/world-readable (umask 022).
#   bash scripts/wheel_check.sh [NIH_FOLDER]           # reduced demo: 2 folds, 1 epoch, no seed ensemble, 200 boots
#   FULL=1 bash scripts/wheel_check.sh [NIH_FOLDER]    # the real demo (its preset's defaults)
# Needs the package index (pip); $WHEEL_CHECK_DIR (default /tmp/medbridge-wheel) holds the venv, wheel and run.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=$(cd "${1:-../shared/data/nih-cxr14-sample}" && pwd)
DIR=${WHEEL_CHECK_DIR:-/tmp/medbridge-wheel}
PY=${PYTHON:-python3}
DEMO_ARGS=(--cv 2 --epochs 1 --n-boot 200 --set train.ensemble=1)
[ "${FULL:-0}" = 1 ] && DEMO_ARGS=()
step() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }
rm -rf "$DIR" && mkdir -p "$DIR"
step "build the wheel"
"$PY" -m pip wheel -q --no-deps -w "$DIR/dist" .
rm -rf build  # the in-tree build's leftovers
WHEEL=$(ls "$DIR"/dist/medbridge-*.whl)
step "clean venv: torch first, then medbridge[all] from $(basename "$WHEEL")"
"$PY" -m venv "$DIR/venv"
PIP=("$DIR/venv/bin/python" -m pip)
"${PIP[@]}" install -q "torch==2.14.1" "torchvision==0.29.1"
"${PIP[@]}" install -q "$WHEEL[all]"
step "pip check"
"${PIP[@]}" check
step "resolver: the wheel next to the lowest allowed transformers/timm/open_clip, the newest 4.x and a 5.x"
"${PIP[@]}" install -q --dry-run "$WHEEL" "transformers==4.52.4" "timm==1.0.17" "open_clip_torch==3.0.0"
"${PIP[@]}" install -q --dry-run "$WHEEL[all]" "transformers==4.57.6"
"${PIP[@]}" install -q --dry-run "$WHEEL[all]" "transformers==5.23.0"
echo "resolver: ok"
step "medbridge --version / --help (outside the checkout)"
cd "$DIR"
"$DIR/venv/bin/medbridge" --version
/usr/bin/time -f "medbridge --help: %e s wall" "$DIR/venv/bin/medbridge" --help >/dev/null
step "medbridge demo --data $DATA ${DEMO_ARGS[*]}"
umask 022
start=$(date +%s)
MEDBRIDGE_CACHE="$DIR/cache" "$DIR/venv/bin/medbridge" demo --data "$DATA" --out "$DIR/demo" --quiet "${DEMO_ARGS[@]}"
echo "demo: $(( $(date +%s) - start )) s"
step "run folder readable by group and others"
unreadable=$(find "$DIR/demo" -type f ! -perm -044 | head -5)
[ -z "$unreadable" ] || { echo "not group/world-readable: $unreadable" >&2; exit 1; }
echo "all $(find "$DIR/demo" -type f | wc -l) files of $DIR/demo are group/world-readable"
echo "wheel check: ok"
