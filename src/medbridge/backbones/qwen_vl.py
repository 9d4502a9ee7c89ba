"""Qwen2-VL / Qwen2.5-VL vision transformer (``model.visual``) behind the block-by-block interface.

The library runs its ViT on one packed sequence of all images' patches ([sum of patches, width]) with
``cu_seqlens`` marking where each image (or, in Qwen2.5-VL's windowed blocks, each 112-px window) starts, 2D
rotary positions (cos, sin per token) and, in Qwen2.5-VL, patches reordered window by window. Here every image
has the tower's fixed square input size, so the packed sequence is kept as a batch [B, L, width]:

- ``embed`` cuts pixels into patches exactly as ``Qwen2VLImageProcessor`` orders them (2x2 merge groups
  contiguous, the frame repeated over the temporal patch) and runs ``patch_embed``; the tokens it returns (and
  every block returns) are in raster order, row by row, like every other tower's patch tokens (so spatial
  consumers such as heat maps need no Qwen-specific code).
- each block reorders the patches into the library's order (merge groups; for Qwen2.5-VL the library's own window
  order), calls the library block on the packed batch with the library's rotary positions and ``cu_seqlens`` =
  one segment per image (full-attention blocks) or the library's window segments, and puts the patches back in
  raster order. Positions and windows come from the library under transformers 4.x (``rot_pos_emb``,
  ``get_window_index``) and 5.x (``rotary_pos_emb``, ``vision_utils``): see ``rotary_cos_sin``, ``window_index``.

Query tokens (MedBridge) are appended after each image's patches, inside that image's segment:

- positions: a query carries the identity rotation (cos 1, sin 0), i.e. no position of its own;
- full-attention blocks (all of Qwen2-VL's; Qwen2.5-VL's ``fullatt_block_indexes``): patches and queries of an
  image form one segment, everyone attends to everyone (the library's call with longer segments);
- windowed blocks (the others in Qwen2.5-VL): queries attend to all patches of their image and to each other;
  patches keep their window and also see the queries (joint mode). This needs a mask, passed to the library
  block's attention through transformers' ``AttentionInterface`` (PyTorch SDPA with a boolean mask; without
  queries the library's plain SDPA runs, so Q = 0 is the library's forward exactly).

``finalize`` is the library's patch merger (2x2 patches -> one token of the language model's width) averaged
over the image; ``finalize_tokens`` merges each token as a 2x2 group of four copies of itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import PreprocessConfig, VisionTower
from .hf import no_init_weights
from .loading import BackboneError

MASKED_SDPA = "medbridge_masked_sdpa"
MASK_KWARG = "medbridge_attention_mask"
DEFAULT_QWEN_IMAGE_SIZE = 448


def masked_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, with the boolean mask given as ``medbridge_attention_mask`` when present."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = kwargs.pop(MASK_KWARG, None)
    return sdpa_attention_forward(module, query, key, value, mask if mask is not None else attention_mask, **kwargs)


def use_masked_sdpa(vision_config) -> None:
    """Make a vision config's attention the masked SDPA above (registered with transformers on first use)."""
    from transformers import AttentionInterface

    AttentionInterface.register(MASKED_SDPA, masked_sdpa_attention)
    vision_config._attn_implementation = MASKED_SDPA


def qwen_visual_model(config) -> nn.Module:
    """An empty ``Qwen2VisionTransformerPretrainedModel`` / ``Qwen2_5_VisionTransformerPretrainedModel``."""
    if config.model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as cls,
        )
    else:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as cls
    vcfg = config.vision_config
    vcfg._attn_implementation = "sdpa"
    with no_init_weights():
        return cls._from_config(vcfg, dtype=torch.float32).eval()


def qwen_image_size(vision_config, processor: dict) -> int:
    """Square input side: 448 px (256 merged tokens) within the processor's pixel limits, a multiple of 28."""
    unit = vision_config.patch_size * vision_config.spatial_merge_size
    size = processor.get("size") or {}
    min_pixels = processor.get("min_pixels") or size.get("shortest_edge")
    max_pixels = processor.get("max_pixels") or size.get("longest_edge")
    side = DEFAULT_QWEN_IMAGE_SIZE
    if max_pixels:
        side = min(side, math.isqrt(int(max_pixels)))
    side = max(unit, side // unit * unit)
    if min_pixels and side * side < min_pixels:
        side = math.ceil(math.sqrt(min_pixels) / unit) * unit
    return side


# ------------------------------------------------ the library's positions and windows (transformers 4.x and 5.x)
def rotary_cos_sin(visual: nn.Module, grid_thw: Tensor) -> tuple[Tensor, Tensor]:
    """The library's 2D rotary (cos, sin) per patch, processor order, for images of ``grid_thw``: 4.x has the angles
    from ``visual.rot_pos_emb``; 5.x computes (cos, sin) with ``visual.rotary_pos_emb`` from ``vision_utils``'
    position ids."""
    if hasattr(visual, "rot_pos_emb"):  # transformers 4.x
        angles = visual.rot_pos_emb(grid_thw)
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()
    from transformers.vision_utils import get_vision_position_ids

    position_ids = get_vision_position_ids(grid_thw, visual.spatial_merge_size)
    return visual.rotary_pos_emb(visual.patch_embed.proj.weight, position_ids)


def window_index(visual: nn.Module, grid_thw: Tensor) -> tuple[Tensor, Tensor] | None:
    """Qwen2.5-VL's window order of the merge groups and the window boundaries (``cu_window_seqlens``, repeats
    removed) for images of ``grid_thw``; None for a tower without windowed blocks (Qwen2-VL)."""
    if not hasattr(visual, "fullatt_block_indexes"):
        return None
    if hasattr(visual, "get_window_index"):  # transformers 4.x
        index, cu_window = visual.get_window_index(grid_thw)
    else:
        from transformers.vision_utils import get_vision_window_index

        index, cu_window = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size,
                                                   visual.patch_size)
    return index, torch.unique_consecutive(torch.as_tensor(cu_window, dtype=torch.int32))


def merged_output(output) -> Tensor:
    """The patch merger's tokens from the visual model's forward (4.x: a tensor; 5.x: ``pooler_output``)."""
    return output if isinstance(output, Tensor) else output.pooler_output


class _Layout(nn.Module):
    """Positions and window segments of one image at the tower's input size (buffers: they follow ``.to``)."""

    def __init__(self, visual: nn.Module, grid: int) -> None:
        super().__init__()
        grid_thw = torch.tensor([[1, grid, grid]])
        self.num_patches = grid * grid
        cos, sin = rotary_cos_sin(visual, grid_thw)  # processor order
        windows = window_index(visual, grid_thw)
        m = visual.spatial_merge_size
        unit = m * m
        # raster index of each token in the processor's order (2x2 merge groups contiguous), as cos/sin have it
        processor = torch.arange(self.num_patches).view(grid // m, m, grid // m, m).permute(0, 2, 1, 3).flatten()
        library = processor
        if windows is not None:
            index, cu_window = windows
            cos, sin = (t.reshape(-1, unit, t.shape[-1])[index].reshape(self.num_patches, -1) for t in (cos, sin))
            library = processor.view(-1, unit)[index].flatten()
            ids = torch.bucketize(torch.arange(self.num_patches), cu_window[1:].long(), right=True)
            self.register_buffer("cu_window", cu_window, persistent=False)
            self.register_buffer("window_ids", ids, persistent=False)
        else:
            self.cu_window = self.window_ids = None
        self.register_buffer("processor_order", processor, persistent=False)  # raster index per processor token
        self.register_buffer("from_processor", torch.argsort(processor), persistent=False)
        self.register_buffer("library_order", library, persistent=False)  # raster index per library token
        self.register_buffer("from_library", torch.argsort(library), persistent=False)
        self.register_buffer("cos", cos.detach(), persistent=False)
        self.register_buffer("sin", sin.detach(), persistent=False)

    def positions(self, batch: int, num_queries: int) -> tuple[Tensor, Tensor]:
        cos, sin = self.cos, self.sin
        if num_queries:  # queries: identity rotation
            cos = torch.cat([cos, cos.new_ones(num_queries, cos.shape[1])])
            sin = torch.cat([sin, sin.new_zeros(num_queries, sin.shape[1])])
        return cos.repeat(batch, 1), sin.repeat(batch, 1)

    def window_mask(self, num_queries: int) -> Tensor:
        """[1, 1, L, L] boolean (library order): patches see their window and the queries; queries see all."""
        n = self.num_patches
        allowed = torch.ones(n + num_queries, n + num_queries, dtype=torch.bool, device=self.cos.device)
        allowed[:n, :n] = self.window_ids[:, None] == self.window_ids[None, :]
        return allowed[None, None]


class QwenVisionBlock(nn.Module):
    """One library vision block as ``[B, L, width] -> [B, L, width]`` (L = patches in raster order + queries)."""

    def __init__(self, block: nn.Module, layout: _Layout, full_attention: bool) -> None:
        super().__init__()
        self.block = block
        self.full_attention = full_attention
        object.__setattr__(self, "_layout", layout)  # owned (and moved) by the tower, not by each block

    def forward(self, tokens: Tensor) -> Tensor:
        lay = self._layout
        b, length, d = tokens.shape
        n = lay.num_patches
        q = length - n
        if q < 0:
            raise ValueError(f"Qwen vision block expects {n} patch tokens per image (+ queries), got {length}")
        dev = tokens.device
        kwargs = {}
        if self.full_attention or lay.window_ids is None:
            cu = torch.arange(b + 1, device=dev) * length
        elif q == 0:  # the library's window segments, image after image
            starts = (lay.cu_window[:-1][None, :] + n * torch.arange(b, device=dev)[:, None]).flatten()
            cu = torch.cat([starts, starts.new_tensor([b * n])])
        else:
            cu = torch.arange(b + 1, device=dev) * length
            kwargs[MASK_KWARG] = lay.window_mask(q)
        x = torch.cat([tokens[:, :n][:, lay.library_order], tokens[:, n:]], dim=1)
        out = self.block(x.reshape(b * length, d), cu_seqlens=cu.to(torch.int32),
                         position_embeddings=lay.positions(b, q), **kwargs).reshape(b, length, d)
        return torch.cat([out[:, :n][:, lay.from_library], out[:, n:]], dim=1)


class QwenVisionTower(VisionTower):
    """``model.visual`` of Qwen2-VL / Qwen2.5-VL at a fixed square input size (see the module docstring)."""

    def __init__(self, visual: nn.Module, image_size: int, preprocess: PreprocessConfig) -> None:
        super().__init__()
        cfg = visual.config
        self.visual = visual
        self.patch = cfg.patch_size
        self.merge = cfg.spatial_merge_size
        self.temporal = cfg.temporal_patch_size
        if image_size % (self.patch * self.merge):
            raise BackboneError(f"Qwen vision input size {image_size} must be a multiple of "
                                f"{self.patch * self.merge} (patch {self.patch} x merge {self.merge})")
        self.grid = image_size // self.patch
        self.layout = _Layout(visual, self.grid)
        self.width = visual.blocks[0].norm1.weight.shape[0]
        self.depth = len(visual.blocks)
        self.num_prefix_tokens = 0
        self.embed_dim = visual.merger.mlp[-1].out_features
        self.preprocess = preprocess
        full = set(getattr(visual, "fullatt_block_indexes", None) or range(self.depth))
        self._blocks = nn.ModuleList(QwenVisionBlock(blk, self.layout, i in full)
                                     for i, blk in enumerate(visual.blocks))

    def patchify(self, pixels: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B * patches, 3 * temporal * patch * patch] in the image processor's order."""
        b, c, h, w = pixels.shape
        size = self.grid * self.patch
        if (h, w) != (size, size):
            raise ValueError(f"Qwen vision tower expects {size}x{size} inputs, got {h}x{w}")
        g, m, p, t = self.grid, self.merge, self.patch, self.temporal
        x = pixels.unsqueeze(1).expand(b, t, c, h, w)
        x = x.reshape(b, t, c, g // m, m, p, g // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(b * g * g, c * t * p * p)

    def grid_thw(self, batch: int) -> Tensor:
        return torch.tensor([[1, self.grid, self.grid]] * batch)

    def embed(self, pixels: Tensor) -> Tensor:
        """Patch embeddings [B, patches, width] in raster order (row by row)."""
        b = pixels.shape[0]
        x = self.visual.patch_embed(self.patchify(pixels)).reshape(b, self.layout.num_patches, self.width)
        return x[:, self.layout.from_processor]

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self._blocks

    def finalize_tokens(self, tokens: Tensor) -> Tensor:
        b, length, d = tokens.shape
        merged = self.visual.merger(tokens.repeat_interleave(self.merge ** 2, dim=1).reshape(-1, d))
        return merged.reshape(b, length, self.embed_dim)

    def finalize(self, tokens: Tensor) -> Tensor:
        b, n, d = tokens.shape
        grouped = tokens[:, self.layout.processor_order]  # 2x2 merge groups contiguous, as the merger expects
        return self.visual.merger(grouped.reshape(b * n, d)).reshape(b, -1, self.embed_dim).mean(1)

    def reference_forward(self, pixels: Tensor) -> Tensor:
        b = pixels.shape[0]
        out = merged_output(self.visual(self.patchify(pixels), grid_thw=self.grid_thw(b)))
        return out.reshape(b, -1, self.embed_dim).mean(1)
