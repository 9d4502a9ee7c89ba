"""Peak memory of loading a VLM's vision tower alone vs the whole VLM, on a checkpoint whose language model is
much larger than its vision part.

    python benchmarks/vlm_vision_only_loading.py [--model-type llava] [--text-hidden 1024] [--text-layers 12]
                                                  [--vocab 32000] [--shard-size 200MB] [--json]

Saves a tiny-vision / large-language VLM of ``--model-type`` (transformers' own classes, random weights, float32,
sharded safetensors + index) into a temporary folder, then measures in a fresh process each:

- ``vision-only``: ``medbridge.create_backbone("local-dir:...")`` (reads only the vision + projector tensors),
- ``full model``:  ``AutoModelForImageTextToText.from_pretrained(...)`` (what loading the VLM normally costs),

after reading every loaded weight once (as using the model does), as the growth of the process's resident memory
(VmRSS) and of its peak (VmHWM) over the resident memory after imports; prints both next to the checkpoint's
language / vision byte counts, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
import importlib
import torch, transformers, medbridge.backbones.vlm, medbridge.backbones.qwen_vl  # imports are not counted
for m in ("clip", "siglip", "llava", "llava_next", "gemma3", "paligemma", "internvl", "qwen2_vl", "qwen2_5_vl"):
    importlib.import_module(f"transformers.models.{m}.modeling_{m}")
from transformers import AutoModelForImageTextToText
from medbridge.backbones import create_backbone
mode, folder = sys.argv[1], sys.argv[2]
def status(key):  # /proc/self/status, kB
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
if mode == "vision-only":
    model = create_backbone("local-dir:" + folder)
else:
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
with torch.no_grad():  # touch every weight, as using the model does (memory-mapped weights count once read)
    n = sum(p.numel() for p in model.parameters())
    checksum = sum(float(p.sum()) for p in model.parameters())
print(json.dumps({"mode": mode, "parameters": n, "rss_growth_bytes": status("VmRSS") - before,
                  "peak_growth_bytes": status("VmHWM") - before}))
"""


def checkpoint_bytes(folder: Path) -> dict:
    """Bytes of language-model vs vision(+projector) tensors in the saved checkpoint (from the safetensors headers)."""
    from safetensors import safe_open

    from medbridge.backbones.vision_only_loading import checkpoint_weight_map

    sizes = {"language": 0, "vision": 0}
    wmap = checkpoint_weight_map(folder)
    for shard in sorted(set(wmap.values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            for name in list(f.keys()):  # safe_open handles are not iterable
                sl = f.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                part = "vision" if name.startswith(("visual.", "vision_tower.", "multi_modal_projector.",
                                                    "model.visual.", "model.vision_tower.",
                                                    "model.multi_modal_projector.")) else "language"
                sizes[part] += numel * {"F32": 4, "F16": 2, "BF16": 2}[sl.get_dtype()]
    return sizes


def measure(mode: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(model_type: str, text_hidden: int, text_layers: int, vocab: int, shard_size: str) -> dict:
    from medbridge.backbones.tiny_vlm import save_tiny_vlm

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_tiny_vlm(folder, model_type, max_shard_size=shard_size, text_hidden=text_hidden,
                      text_layers=text_layers, vocab=vocab)
        sizes = checkpoint_bytes(folder)
        shards = len(list(folder.glob("*.safetensors")))
        vision, full = measure("vision-only", folder), measure("full", folder)
    return {"model_type": model_type, "shards": shards, "language_bytes": sizes["language"],
            "vision_bytes": sizes["vision"], "vision_only": vision, "full": full,
            "growth_ratio_full_over_vision_only": full["peak_growth_bytes"] / max(1, vision["peak_growth_bytes"])}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", default="llava")
    ap.add_argument("--text-hidden", type=int, default=1024)
    ap.add_argument("--text-layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-size", default="200MB")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    res = run(args.model_type, args.text_hidden, args.text_layers, args.vocab, args.shard_size)
    if args.json:
        print(json.dumps(res))
        return
    mib = 2 ** 20
    print(f"{res['model_type']} checkpoint: {res['shards']} shards, language model "
          f"{res['language_bytes'] / mib:.1f} MiB, vision + projector {res['vision_bytes'] / mib:.2f} MiB")
    print(f"{'load':<12} {'parameters':>12} {'RSS growth':>14} {'peak RSS growth':>16}")
    for key, label in (("vision_only", "vision-only"), ("full", "full model")):
        r = res[key]
        print(f"{label:<12} {r['parameters']:>12,} {r['rss_growth_bytes'] / mib:>10.1f} MiB "
              f"{r['peak_growth_bytes'] / mib:>12.1f} MiB")
    print(f"full / vision-only peak growth: {res['growth_ratio_full_over_vision_only']:.1f}x")


if __name__ == "__main__":
    main()
