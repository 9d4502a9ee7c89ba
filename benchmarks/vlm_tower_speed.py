"""Parameters and CPU forward time of the full-size VLM vision towers (random weights, published sizes).

    python benchmarks/vlm_tower_speed.py [--only medgemma-4b,qwen2.5-vl-7b] [--threads 2]

For each registered VLM family, builds the vision model and projector at the published checkpoint's sizes
(hyper-parameters copied from each repo's config.json; no language model, random weights: speed does not depend
on the values), wraps them with medbridge's tower and prints the vision + projector parameter count and the
wall and CPU seconds (all threads of the process) for one view at the tower's input size (embed -> all blocks
-> finalize, batch 1, after a warm-up through the first block), side by side with the bundled DINOv2-S at 224 px.
On a shared machine the CPU seconds are the steadier number.
"""

from __future__ import annotations

import argparse
import time

import torch

CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, image_size=336, patch_size=14, projection_dim=768)


def _so400m(size: int) -> dict:
    return dict(model_type="siglip_vision_model", hidden_size=1152, num_hidden_layers=27, num_attention_heads=16,
                intermediate_size=4304, image_size=size, patch_size=14, vision_use_head=False)


def published_configs() -> dict:
    """name -> transformers config with the published vision/projector sizes (the language model is not built)."""
    import transformers as tf

    internvit = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     image_size=[448, 448], patch_size=[14, 14], use_mean_pooling=False)
    return {
        "llava-1.5-7b": tf.LlavaConfig(vision_config=CLIP_L_336,
                                       text_config=dict(model_type="llama", hidden_size=4096)),
        "qwen2-vl-7b": tf.Qwen2VLConfig(vision_config=dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4,
                                                           hidden_size=3584, patch_size=14)),
        "qwen2.5-vl-7b": tf.Qwen2_5_VLConfig(vision_config=dict(
            hidden_size=1280, depth=32, num_heads=16, intermediate_size=3420, out_hidden_size=3584, patch_size=14,
            window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
        "medgemma-4b": tf.Gemma3Config(vision_config=_so400m(896), mm_tokens_per_image=256,
                                       text_config=dict(model_type="gemma3_text", hidden_size=2560)),
        "paligemma-3b-224": tf.PaliGemmaConfig(vision_config=dict(_so400m(224), projection_dim=2048),
                                               text_config=dict(model_type="gemma", hidden_size=2048),
                                               projection_dim=2048),
        "internvl3-1b": tf.InternVLConfig(vision_config=internvit, downsample_ratio=0.5,
                                          text_config=dict(model_type="qwen2", hidden_size=896)),
    }


def build_tower(config):
    from transformers import AutoModel

    from medbridge.backbones.vlm import _projector, tower_from_parts

    torch.manual_seed(0)
    if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        from medbridge.backbones.qwen_vl import qwen_visual_model

        visual = qwen_visual_model(config)
        for p in visual.parameters():  # qwen_visual_model leaves weights to the checkpoint: give them values
            torch.nn.init.normal_(p, std=0.02)
        return tower_from_parts(config, visual, None)
    vision = AutoModel.from_config(config.vision_config).eval()
    projector = _projector(config.model_type, config)
    for p in projector.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return tower_from_parts(config, vision, projector)


def seconds_per_view(tower) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process over all threads) for one view."""
    size = tower.preprocess.image_size
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        tower.blocks[0](tower.embed(x))  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        tower.finalize(tower.run_blocks(tower.embed(x)))
        return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated names (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from medbridge import create_backbone

    ref = create_backbone("dinov2-small").vision
    w_ref, c_ref = seconds_per_view(ref)
    print(f"{'tower':<18} {'vision+projector':>16} {'input':>6} {'tokens':>7} {'wall s/view':>11} "
          f"{'CPU s/view':>10} {'CPU x DINOv2-S':>14}")
    n_ref = sum(p.numel() for p in ref.parameters())
    print(f"{'dinov2-small':<18} {n_ref / 1e9:>15.3f}B {224:>6} {257:>7} {w_ref:>11.2f} {c_ref:>10.2f} {1:>14.1f}")
    only = {s for s in args.only.split(",") if s}
    for name, config in published_configs().items():
        if only and name not in only:
            continue
        tower = build_tower(config)
        n = sum(p.numel() for p in tower.parameters())
        size = tower.preprocess.image_size
        with torch.no_grad():
            tokens = tower.embed(torch.zeros(1, 3, size, size)).shape[1]
        wall, cpu = seconds_per_view(tower)
        print(f"{name:<18} {n / 1e9:>15.3f}B {size:>6} {tokens:>7} {wall:>11.2f} {cpu:>10.2f} {cpu / c_ref:>14.1f}",
              flush=True)
        del tower


if __name__ == "__main__":
    main()
