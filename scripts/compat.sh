#!/usr/bin/env bash
# The fast test tier against the lowest and the newest allowed transformers / timm / open_clip (pyproject.toml's
# ranges), each in a throwaway venv: torch 2.14.1 first (as scripts/setup.sh), then medbridge[dev] from this checkout
# (not editable: the installed package is what the tests import) with the three libraries pinned, `pip check`,
# then pytest -m "not slow". No constraints file: pip resolves the rest as a user's pip would.
#   bash scripts/compat.sh                 # lowest and newest
#   bash scripts/compat.sh lowest          # one of them; extra pytest args after --, e.g. -- -x tests/test_backbones.py
#   bash scripts/compat.sh newest-4        # the newest transformers 4.x (= newest while pyproject caps it at < 5)
# Venvs and logs: $COMPAT_DIR (default /tmp/medbridge-compat). Exit status: non-zero if any set failed.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${COMPAT_DIR:-/tmp/medbridge-compat}
PY=${PYTHON:-python3}
declare -A PINS=(
    [lowest]="transformers==4.52.4 timm==1.0.17 open_clip_torch==3.0.0"
    [newest]="transformers timm open_clip_torch"  # with --upgrade: the newest each range allows (pyproject.toml)
    [newest-4]="transformers<5 timm open_clip_torch"  # the newest 4.x, once pyproject allows 5.x
)
sets=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do sets+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#sets[@]} -eq 0 ] && sets=(lowest newest)
mkdir -p "$DIR"
# A snapshot of this checkout (tracked and untracked, not ignored files): later edits do not mix into a run, and
# the build's leftovers (build/, *.egg-info) stay out of the checkout.
SRC=$DIR/checkout
rm -rf "$SRC" && mkdir -p "$SRC"
git ls-files -co --exclude-standard | tar cf - -T - | tar xf - -C "$SRC"
[ -d ../shared ] && ln -sfn "$(cd ../shared && pwd)" "$DIR/shared"  # the tests' real samples (../shared/data)
status=0
for name in "${sets[@]}"; do
    [ -n "${PINS[$name]+x}" ] || { echo "compat.sh: unknown set $name (lowest, newest, newest-4)" >&2; exit 2; }
    venv=$DIR/$name log=$DIR/$name.log start=$(date +%s)
    rm -rf "$venv"
    {
        "$PY" -m venv "$venv" \
        && "$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" \
        && "$venv/bin/python" -m pip install -q --upgrade "$SRC[dev]" ${PINS[$name]} \
        && "$venv/bin/python" -m pip check \
        && "$venv/bin/python" -c "import transformers, timm, open_clip; print('versions: transformers', \
transformers.__version__, 'timm', timm.__version__, 'open_clip', open_clip.__version__)" \
        && (cd "$SRC" && "$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider "$@")
    } >"$log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=1
    versions=$(grep -m1 "^versions:" "$log" || echo "versions: (install failed)")
    echo "$name: rc=$rc ${versions#versions: }; $(tail -n 1 "$log"); $(( $(date +%s) - start )) s (log: $log)"
done
exit $status
