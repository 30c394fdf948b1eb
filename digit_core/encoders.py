"""Frozen self-supervised encoders: patch features that K-Means turns into discriminative tokens.

The ViT kinds are one implementation, timm's ``VisionTransformer``:

* ``kind="dinov2"`` reproduces the official DiGIT tokenizer: DINOv2 with 4 registers, input
  resized 256 -> 224 inside the model (bicubic, no antialias), the 37x37 position table
  resampled the official way (bicubic, no antialias, offset 0.1) once at load time, features of
  the third-to-last block with the final LayerNorm applied, CLS and registers dropped.
* ``kind="vit"`` is our small ViT for small images (the bundled Fashion-MNIST model), with a
  linear patch embedding or (``stem="conv"``) a small convolutional stem.

timm's layout differs from facebookresearch's: registers are ``reg_token`` (not
``register_tokens``), and with ``no_embed_class=True`` the position table covers the patches
only, the CLS position being folded into ``cls_token``. Token order is the same in both:
``[CLS, 4 registers, patches]``, registers carrying no position.

``kind="cnn"`` is a plain CNN (``cnn_encoder``): on 2 CPU cores it learns patch features that
beat raw pixels far sooner than a ViT does (the records in weights/fmnist*/encoder show it).

Attention uses timm's default path (fused ``scaled_dot_product_attention`` when available),
which the TorchScript ONNX exporter handles at opset >= 14; SSL training on CPU switches to the
plain path, whose backward is faster there (training/ssl.py).
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from .config import EncoderConfig

StateDict = dict[str, torch.Tensor]


def bicubic_resize_matrix(n_in: int, scale: float) -> torch.Tensor:
    """``[n_out, n_in]`` weights of ``F.interpolate(mode="bicubic", scale_factor=scale,
    align_corners=False)`` along one axis, read off torch's own float32 kernel by resizing an
    identity (float32 on purpose: its coefficients differ from exact ones by ~2e-5, and the
    official features were computed with it).

    Bicubic resizing is separable, so ``W @ x @ W.T`` is that interpolate for square images, to
    ~1e-6. We resize this way because onnxruntime's cubic ``Resize`` differs from torch by ~1e-4
    on N(0, 1) inputs, while two MatMuls match it to ~1e-6.
    """
    eye = torch.eye(n_in).view(n_in, 1, 1, n_in)
    w = F.interpolate(eye, scale_factor=(1.0, scale), mode="bicubic", align_corners=False)
    return w[:, 0, 0, :].t().contiguous()


class Encoder(nn.Module):
    """``features(images [N, C, S, S] in [0, 1]) -> [N, n, n, d]`` from block ``cfg.block_index``.

    The timm model is ``self.vit`` (state dict keys ``vit.*``). The module starts in eval mode;
    freezing it is the caller's business (the small ViT is trained by SSL).
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.kind not in ("dinov2", "vit", "cnn"):
            raise ValueError(f"unknown encoder kind {cfg.kind!r}; choose 'dinov2', 'vit' or 'cnn'")
        if len(cfg.mean) < cfg.in_chans or len(cfg.std) < cfg.in_chans:
            raise ValueError(f"encoder mean/std have {len(cfg.mean)}/{len(cfg.std)} values for {cfg.in_chans} channels")
        self.cfg = cfg
        c = cfg.in_chans
        self.register_buffer("mean", torch.tensor(cfg.mean[:c]).view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std[:c]).view(1, c, 1, 1), persistent=False)
        self.register_buffer("resize", self._resize_matrix(cfg), persistent=False)
        if cfg.kind == "cnn":
            self.cnn = cnn_encoder(cfg.in_chans, cfg.cnn_channels, cfg.cnn_strides)
            self.eval()
            return
        args = dict(
            img_size=cfg.model_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.width,
            depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, reg_tokens=cfg.num_registers,
            init_values=cfg.layerscale, num_classes=0, global_pool="",
            # timm's DINOv2 presets: positions cover the patches only (the CLS position lives in
            # cls_token), so the table is exactly the official resampled patch grid.
            no_embed_class=cfg.kind == "dinov2",
        )
        # The config is the source of truth; a timm name only adds timm's preset metadata.
        vit = timm.create_model(cfg.timm_name, pretrained=False, **args) if cfg.timm_name else VisionTransformer(**args)
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"timm model {cfg.timm_name!r} is a {type(vit).__name__}, not a VisionTransformer")
        if cfg.stem == "conv":
            vit.patch_embed.proj = conv_stem(cfg.in_chans, cfg.width, cfg.patch_size)
        self.vit = vit
        self.eval()

    @staticmethod
    def _resize_matrix(cfg: EncoderConfig) -> torch.Tensor | None:
        if cfg.model_size == cfg.image_size:
            return None
        resize = bicubic_resize_matrix(cfg.image_size, cfg.model_size / cfg.image_size)
        if resize.shape[0] != cfg.model_size:
            raise ValueError(f"resizing {cfg.image_size} by {cfg.model_size}/{cfg.image_size} gives "
                             f"{resize.shape[0]} pixels, not model_size {cfg.model_size}")
        return resize

    def _check(self, images: torch.Tensor) -> None:
        c, s, m = self.cfg.in_chans, self.cfg.image_size, self.cfg.model_size
        want = f"float images [N, {c}, {s}, {s}] in [0, 1]" + (f" (resized to {m} inside the model)" if m != s else "")
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"encoder expects {want}, got {type(images).__name__}")
        if images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s):
            raise ValueError(f"encoder expects {want}, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"encoder expects {want}, got dtype {images.dtype}")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Checked images in [0, 1] -> the model's normalised input, resized to ``model_size``."""
        self._check(images)
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        if self.resize is not None:
            # The official code normalises, then resizes 256 -> 224 with bicubic F.interpolate.
            x = self.resize @ x @ self.resize.t()
        return x

    def tokens(self, images: torch.Tensor, upto_block: int | None = None) -> torch.Tensor:
        """All tokens ``[N, 1 + R + n*n, d]`` (CLS, registers, patches) output by block
        ``upto_block`` (negative counts from the end; default the last), before the final norm.
        ViT kinds only."""
        if self.cfg.kind == "cnn":
            raise ValueError("a kind='cnn' encoder has no token sequence; use features()")
        x = self.normalize(images)
        v = self.vit
        x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))   # timm's forward_features order
        last = self.cfg.depth - 1 if upto_block is None else upto_block % self.cfg.depth
        for block in v.blocks[: last + 1]:   # later blocks cannot change the features: skip them
            x = block(x)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features ``[N, n, n, d]``: block ``cfg.block_index``, then the final LayerNorm
        when ``cfg.final_norm``; CLS and register tokens dropped. For ``kind="cnn"``: the last
        layer's feature map, channels last."""
        if self.cfg.kind == "cnn":
            return self.cnn(self.normalize(images)).permute(0, 2, 3, 1)
        x = self.tokens(images, self.cfg.block_index)
        if self.cfg.final_norm:
            x = self.vit.norm(x)
        n = self.cfg.grid
        # reshape with x.shape[0], not unflatten: the ONNX tracer would bake the batch size into
        # unflatten's output shape, breaking consumers of features.shape (Codebook.assign)
        return x[:, self.vit.num_prefix_tokens:].reshape(x.shape[0], n, n, x.shape[-1])


def cnn_encoder(in_chans: int, channels: tuple[int, ...], strides: tuple[int, ...]) -> nn.Sequential:
    """3x3 convolutions, each followed by BatchNorm and ReLU (BatchNorm folds into the convolution
    at export; in eval mode it is a fixed affine map, so tokens do not depend on the batch)."""
    layers: list[nn.Module] = []
    for a, b, s in zip((in_chans, *channels), channels, strides):
        layers += [nn.Conv2d(a, b, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
    return nn.Sequential(*layers)


def conv_stem(in_chans: int, width: int, patch_size: int) -> nn.Sequential:
    """A convolutional patch embedding (Xiao et al. 2021, "Early convolutions help transformers
    see better"): 3x3 stride-2 convolutions, channels doubling up to ``width / 2``, until the
    ``patch_size`` grid, then a 1x1 projection to ``width``. It replaces timm's patchify conv in
    place (``patch_embed.proj``), so every other part of the ViT is unchanged. Trained from
    scratch on small data it converges far faster than a linear patchify, whose 4x4 patches
    start with no notion of neighbouring pixels.
    """
    n = patch_size.bit_length() - 1   # stride-2 convolutions
    chans = [in_chans] + [max(8, width >> (n - i)) for i in range(n)]
    layers: list[nn.Module] = []
    for a, b in zip(chans, chans[1:]):
        layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GELU()]
    return nn.Sequential(*layers, nn.Conv2d(chans[-1], width, 1))


def resample_pos_embed_official(table: torch.Tensor, grid: int, offset: float = 0.1) -> torch.Tensor:
    """DINOv2's own ``interpolate_pos_encoding``: the patch positions of ``table`` -> ``[grid*grid, d]``.

    ``table`` is the official ``[1, 1 + S*S, d]`` (CLS first, dropped here: the CLS position is
    kept as is by the caller) or a patch table ``[1, S*S, d]`` / ``[S*S, d]``. Bicubic without
    antialias, with ``scale_factor=(grid + offset) / S``: the sampling coordinates use that
    scale, not ``grid / S``. This is what the released centroids saw; the torch.hub/HF defaults
    (antialias, offset 0) give a measurably different table.
    """
    t = table.reshape(-1, table.shape[-1])
    rows, d = t.shape
    S = int(round(rows ** 0.5))
    if S * S != rows:
        t, S = t[1:], int(round((rows - 1) ** 0.5))
    if S * S != t.shape[0]:
        raise ValueError(f"position table of {rows} rows is neither S*S nor 1 + S*S")
    if S == grid:
        return t   # the official code skips resampling when the grid already fits
    scale = (grid + offset) / S
    # float32 at least, like the official code (half-precision tables); float64 stays exact
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    out = F.interpolate(t.reshape(1, S, S, d).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                        mode="bicubic", align_corners=False, antialias=False)
    if out.shape[-2:] != (grid, grid):
        raise ValueError(f"resampling {S}x{S} with offset {offset} gives {tuple(out.shape[-2:])}, not {grid}x{grid}")
    return out.permute(0, 2, 3, 1).reshape(grid * grid, d).to(table.dtype)


def _official_to_timm(state: StateDict) -> StateDict:
    """facebookresearch DINOv2-reg names -> timm names (``pos_embed`` still the full official table)."""
    out = {k: v for k, v in state.items() if k not in ("mask_token", "register_tokens")}   # mask: iBOT training only
    if "register_tokens" in state:
        out["reg_token"] = state["register_tokens"]
    if "cls_token" in state and "pos_embed" in state:
        out["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]   # timm folds the CLS position in
    return out


def load_dinov2_weights(encoder: Encoder, source: str | Path | StateDict) -> None:
    """Load DINOv2 weights into a ``kind="dinov2"`` encoder.

    ``source``: the official facebookresearch ``.pth``, a timm/Hugging Face ``.safetensors`` or
    ``.bin`` file, or an already-loaded state dict in either layout (e.g. the fairseq
    checkpoint's ``pretrained_encoder.*`` with the prefix stripped). Any position table whose
    size differs from the model's grid (the checkpoints' 37x37) is resampled the official way.
    Raises ValueError naming missing/unexpected keys and shape mismatches.
    """
    cfg = encoder.cfg
    if cfg.kind != "dinov2":
        raise ValueError(f"load_dinov2_weights needs a kind='dinov2' encoder, got kind={cfg.kind!r}")
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
    # timm's layout has reg_token; the official one register_tokens (+ mask_token).
    if "register_tokens" in state or "mask_token" in state:
        state = _official_to_timm(state)
    want = encoder.vit.pos_embed.shape
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != want and pos.ndim == 3 and pos.shape[-1] == want[-1]:
        state["pos_embed"] = resample_pos_embed_official(pos, cfg.grid, cfg.pos_interp_offset)[None]
    own = encoder.vit.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{name} does not fit the encoder {cfg.timm_name or cfg.kind}: missing {missing}, "
                         f"unexpected {unexpected}, shape mismatches (checkpoint vs model) {shapes}")
    encoder.vit.load_state_dict(state)


def load_dinov2_from_hub(encoder: Encoder) -> None:
    """Online only: download the official ``.pth`` that timm's preset names (cached by torch.hub)
    and load it through ``load_dinov2_weights``. timm's own ``pretrained=True`` would resample
    the 37x37 table its way (antialias, no offset) before we could see it."""
    name = encoder.cfg.timm_name
    pcfg = timm.models.get_pretrained_cfg(name) if name else None
    if pcfg is None or not pcfg.url:
        raise ValueError(f"no download URL for encoder timm_name {name!r}")
    load_dinov2_weights(encoder, torch.hub.load_state_dict_from_url(pcfg.url, map_location="cpu", weights_only=True))
