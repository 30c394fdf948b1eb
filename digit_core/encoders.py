"""Frozen self-supervised encoders: patch features that K-Means turns into discriminative tokens.

Both kinds are one ViT implementation, timm's ``VisionTransformer``:

* ``kind="dinov2"`` reproduces the official DiGIT tokenizer: DINOv2 with 4 registers, input
  resized 256 -> 224 inside the model (bicubic, no antialias), the 37x37 position table
  resampled the official way (bicubic, no antialias, offset 0.1) and stored, features of the
  third-to-last block with the final LayerNorm applied, CLS and registers dropped.
* ``kind="vit"`` is our small ViT for small images (the bundled Fashion-MNIST model).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from .config import EncoderConfig


class Encoder(nn.Module):
    """``features(images [N, C, S, S] in [0, 1]) -> [N, n, n, d]`` from ``cfg.block_index``."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.kind not in ("dinov2", "vit"):
            raise ValueError(f"unknown encoder kind {cfg.kind!r}; choose 'dinov2' or 'vit'")
        self.cfg = cfg
        self.vit = VisionTransformer(
            img_size=cfg.model_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.width,
            depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, reg_tokens=cfg.num_registers,
            init_values=cfg.layerscale, num_classes=0, global_pool="",
            # DINOv2 as timm holds it: the CLS position is folded into cls_token (see
            # _official_to_timm), so positions cover the patches only.
            no_embed_class=cfg.kind == "dinov2",
        )
        c = cfg.in_chans
        self.register_buffer("mean", torch.tensor(cfg.mean[:c], dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std[:c], dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.eval()

    def _check(self, images: torch.Tensor) -> None:
        c, s = self.cfg.in_chans, self.cfg.image_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"encoder expects images [N, {c}, {s}, {s}], got {getattr(images, 'shape', type(images))}")
        if not images.is_floating_point():
            raise ValueError(f"encoder expects float images in [0, 1], got dtype {images.dtype}")
        if tuple(images.shape[1:]) != (c, s, s):
            raise ValueError(f"encoder expects images [N, {c}, {s}, {s}], got {tuple(images.shape)}")

    def tokens(self, images: torch.Tensor, upto_block: int | None = None) -> torch.Tensor:
        """All tokens ``[N, 1 + R + n*n, d]`` after block ``upto_block`` (default: the last)."""
        self._check(images)
        x = (images - self.mean) / self.std
        if self.cfg.model_size != self.cfg.image_size:
            # The official code resizes the normalised 256 image to 224 this way (no antialias).
            x = F.interpolate(x, scale_factor=self.cfg.model_size / self.cfg.image_size, mode="bicubic",
                              align_corners=False)
        v = self.vit
        x = v.norm_pre(v._pos_embed(v.patch_embed(x)))
        last = self.cfg.depth - 1 if upto_block is None else upto_block % self.cfg.depth
        for block in v.blocks[: last + 1]:   # later blocks cannot change the features: skip them
            x = block(x)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.tokens(images, self.cfg.block_index)
        if self.cfg.final_norm:
            x = self.vit.norm(x)
        x = x[:, self.vit.num_prefix_tokens:]
        n = self.cfg.grid
        return x.reshape(x.shape[0], n, n, self.cfg.width)


def resample_pos_embed_official(table: torch.Tensor, grid: int, offset: float = 0.1) -> torch.Tensor:
    """DINOv2's own ``interpolate_pos_encoding``: patch positions ``[S*S, d]`` (or the whole
    ``[1, 1 + S*S, d]`` table, CLS first) -> ``[grid*grid, d]``.

    Bicubic without antialias, with scale factor ``(grid + offset) / S``: the sampling
    coordinates use that scale, not ``grid / S``, which is what the released centroids saw.
    """
    t = table.reshape(-1, table.shape[-1])
    S = int(round(t.shape[0] ** 0.5))
    if S * S != t.shape[0]:
        t, S = t[1:], int(round((t.shape[0] - 1) ** 0.5))   # drop the CLS position
    if S * S != t.shape[0]:
        raise ValueError(f"position table of {table.shape[-2]} rows is not a square grid (+ CLS)")
    d = t.shape[-1]
    scale = (grid + offset) / S
    out = F.interpolate(t.float().reshape(1, S, S, d).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                        mode="bicubic", antialias=False)
    if out.shape[-2:] != (grid, grid):
        raise ValueError(f"resampling {S}x{S} with offset {offset} gave {tuple(out.shape[-2:])}, not {grid}x{grid}")
    return out.permute(0, 2, 3, 1).reshape(grid * grid, d).to(table.dtype)


def _official_to_timm(state: dict[str, torch.Tensor], grid: int, offset: float) -> dict[str, torch.Tensor]:
    """facebookresearch DINOv2(-reg) names -> timm names; the position table resampled officially."""
    out: dict[str, torch.Tensor] = {}
    pos = state["pos_embed"]
    for k, v in state.items():
        if k == "mask_token":
            continue   # used only by DINOv2's iBOT training
        if k == "pos_embed":
            out[k] = resample_pos_embed_official(v, grid, offset)[None]
        elif k == "cls_token":
            out[k] = v + pos[:, :1]   # official adds the CLS position; timm folds it in
        elif k == "register_tokens":
            out["reg_token"] = v
        else:
            out[re.sub(r"mlp\.w12", "mlp.fc1", re.sub(r"mlp\.w3", "mlp.fc2", k))] = v
    return out


def load_dinov2_weights(encoder: Encoder, source: str | Path | dict[str, torch.Tensor]) -> None:
    """Load DINOv2 weights from the official ``.pth``, a timm ``.safetensors``/``.bin`` file or
    a state dict of either layout. Official tables (37x37 + CLS) are resampled the official
    way; a timm table must already have the model's grid. Mismatches name the keys."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"DINOv2 weights not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        name = str(path)
    else:
        state, name = dict(source), "state dict"
    cfg = encoder.cfg
    if "mask_token" in state or "register_tokens" in state:   # facebookresearch layout
        state = _official_to_timm(state, cfg.grid, cfg.pos_interp_offset)
    elif cfg.kind == "dinov2" and state.get("pos_embed") is not None \
            and state["pos_embed"].shape != encoder.vit.pos_embed.shape:
        # timm/HF copies keep the 37x37 patch table (CLS position folded into cls_token)
        state = {**state, "pos_embed": resample_pos_embed_official(state["pos_embed"], cfg.grid,
                                                                   cfg.pos_interp_offset)[None]}
    own = encoder.vit.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{name} does not fit the encoder {encoder.cfg.timm_name or encoder.cfg.kind}: "
                         f"missing {missing}, unexpected {unexpected}, shape mismatches {shapes}")
    encoder.vit.load_state_dict(state)


def load_dinov2_from_hub(encoder: Encoder) -> None:
    """Online only: fetch timm's copy of the DINOv2 weights (the original 37x37 table) and load
    it the official way; timm's own ``pretrained=True`` would resample it differently."""
    from huggingface_hub import hf_hub_download   # optional, online-only path
    if not encoder.cfg.timm_name:
        raise ValueError("encoder config has no timm_name to download")
    load_dinov2_weights(encoder, hf_hub_download(f"timm/{encoder.cfg.timm_name}", "model.safetensors"))
