"""VQGAN: convolutional encoder, nearest-code quantizer, convolutional decoder.

Two layouts share this code, and both keep the parameter names of taming-transformers'
``VQModel`` so their checkpoints load with ``strict=True``:

- ``"taming"``: taming's VQGAN (attention at ``attn_resolutions`` and in the middle, stride-2
  conv downsampling, 1x1 ``quant_conv`` / ``post_quant_conv`` around the quantizer).
- ``"mage"``: the VQGAN that MAGE and the official DiGIT use (``vqgan_jax_strongaug.ckpt``), a
  port of MaskGIT's JAX VQGAN into taming's module names. It has no attention at all (its YAML
  lists ``attn_resolutions: [16]`` but its code ignores it), no quant convs, bias-free
  residual convs, average-pool downsampling, a 1x1 encoder output conv, ``num_res_blocks``
  (not +1) blocks per decoder level, and MaskGIT's shortcut quirk (below).

Images are float in [0, 1], ``[N, C, H, W]``; code grids are int64 ``[N, m, m]``, raster order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .codebook import nearest, tracing
from .config import VQGANConfig


@dataclass(frozen=True)
class Arch:
    """What differs between the taming and MAGE layouts."""

    attention: bool            # attention blocks at attn_resolutions and in the middle
    conv_bias: bool            # bias on residual convs, shortcuts and encoder.conv_in
    shortcut_on_output: bool   # the 1x1 shortcut maps the residual branch's output, not the input
    conv_downsample: bool      # pad (0,1,0,1) + stride-2 conv; else 2x2 average pooling
    encoder_out_kernel: int    # kernel of encoder.conv_out
    quant_convs: bool          # 1x1 quant_conv / post_quant_conv around the quantizer
    decoder_extra_block: bool  # num_res_blocks + 1 residual blocks per decoder level


ARCHS = {
    "taming": Arch(True, True, False, True, 3, True, True),
    "mage": Arch(False, False, True, False, 1, False, False),
}

BETA = 0.25  # commitment weight, as taming


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus a 1x1 shortcut when the width changes."""

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float, arch: Arch):
        super().__init__()
        bias = arch.conv_bias
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        # MaskGIT (and so MAGE) applies the shortcut to the branch output h, dropping x: a quirk
        # of the JAX code that its checkpoints were trained with, so we keep it.
        self.on_output = arch.shortcut_on_output
        self.nin_shortcut = (nn.Conv2d(c_out if self.on_output else c_in, c_out, 1, bias=bias)
                             if c_in != c_out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is None:
            return x + h
        return self.nin_shortcut(h if self.on_output else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels, 1x1 convs for q, k, v and the output."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).flatten(2).transpose(1, 2)            # [b, hw, c]
        k = self.k(h).flatten(2)                            # [b, c, hw]
        v = self.v(h).flatten(2).transpose(1, 2)            # [b, hw, c]
        w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=-1)
        h = torch.bmm(w, v).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # torch convs cannot pad asymmetrically


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attn: bool, ch: int, groups: int) -> nn.Module:
    """One resolution: ``block.{j}`` with ``attn.{j}`` after each. Identity stands in for
    absent attention and resampling; it has no parameters, so the state-dict names stay
    taming's, and forward needs no branches."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(AttnBlock(ch, groups) if attn else nn.Identity() for _ in blocks)
    return level


def _mid(ch: int, cfg: VQGANConfig, arch: Arch) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(ch, ch, cfg.norm_groups, cfg.dropout, arch)
    mid.attn_1 = AttnBlock(ch, cfg.norm_groups) if arch.attention else nn.Identity()
    mid.block_2 = ResnetBlock(ch, ch, cfg.norm_groups, cfg.dropout, arch)
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for block, attn in zip(level.block, level.attn):
        h = attn(block(h))
    return h


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class VQGANEncoder(nn.Module):
    """Image ``[N, C, R, R]`` -> latent ``[N, z_channels, m, m]``."""

    def __init__(self, cfg: VQGANConfig, arch: Arch):
        super().__init__()
        g, res, block_in = cfg.norm_groups, cfg.resolution, cfg.ch
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, bias=arch.conv_bias)
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, cfg.ch * mult, g, cfg.dropout, arch))
                block_in = cfg.ch * mult
            level = _level(blocks, arch.attention and res in cfg.attn_resolutions, block_in, g)
            last = i == len(cfg.ch_mult) - 1
            level.downsample = nn.Identity() if last else Downsample(block_in, arch.conv_downsample)
            res //= 2
            self.down.append(level)
        self.mid = _mid(block_in, cfg, arch)
        self.norm_out = _norm(block_in, g)
        k = arch.encoder_out_kernel
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, k, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.downsample(_run_level(level, h))
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANDecoder(nn.Module):
    """Latent ``[N, z_channels, m, m]`` -> image ``[N, out_channels, R, R]`` (unclamped)."""

    def __init__(self, cfg: VQGANConfig, arch: Arch):
        super().__init__()
        g, res = cfg.norm_groups, cfg.grid
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, cfg, arch)
        levels: list[nn.Module] = []
        for i in reversed(range(len(cfg.ch_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + int(arch.decoder_extra_block)):
                blocks.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[i], g, cfg.dropout, arch))
                block_in = cfg.ch * cfg.ch_mult[i]
            level = _level(blocks, arch.attention and res in cfg.attn_resolutions, block_in, g)
            level.upsample = Upsample(block_in) if i != 0 else nn.Identity()
            res *= 2
            levels.insert(0, level)  # up.{i} is level i, as in taming
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = level.upsample(_run_level(level, h))
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest code by squared Euclidean distance; straight-through gradients."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # as taming

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """``[M, d]`` -> int64 ``[M]``; one matmul, ties go to the lowest index (argmin)."""
        return nearest(z, self.embedding.weight)[0]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z [N, d, h, w]`` -> ``(zq, ids [N, h, w], loss)``; zq carries z's gradient."""
        n, d, h, w = z.shape
        ids = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(n, h, w)
        zq = self.embed(ids)
        # Codebook term pulls codes to the encoder, commitment term (beta) the reverse. taming's
        # default "legacy" mode swaps beta onto the codebook term; we use the VQ-VAE weighting.
        loss = F.mse_loss(zq, z.detach()) + BETA * F.mse_loss(z, zq.detach())
        return z + (zq - z).detach(), ids, loss

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """int ``[N, h, w]`` -> codes ``[N, d, h, w]``."""
        return self.embedding(ids).permute(0, 3, 1, 2)


class VQGAN(nn.Module):
    """Parameter names equal taming's ``VQModel``: ``encoder.*``, ``decoder.*``, ``quant_conv``,
    ``post_quant_conv`` (taming layout only) and ``quantize.embedding.weight``.

    ``arch`` overrides ``cfg.arch`` ("taming" or "mage").
    """

    def __init__(self, cfg: VQGANConfig, arch: str | None = None):
        super().__init__()
        arch = arch or cfg.arch
        if arch not in ARCHS:
            raise ValueError(f"unknown VQGAN arch {arch!r}; choose from {sorted(ARCHS)}")
        _check_config(cfg, ARCHS[arch])
        self.cfg, self.arch = cfg, arch
        a = ARCHS[arch]
        self.encoder = VQGANEncoder(cfg, a)
        self.decoder = VQGANDecoder(cfg, a)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1) if a.quant_convs else nn.Identity()
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1) if a.quant_convs else nn.Identity()

    # -- latents -------------------------------------------------------------------------------
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> pre-quantization latent ``[N, embed_dim, m, m]``."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    def quantize_latent(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latent -> ``(zq with straight-through gradient, ids [N, m, m], vq loss)``."""
        return self.quantize(z)

    def codes_to_latent(self, ids: torch.Tensor) -> torch.Tensor:
        """Code grid ``[N, m, m]`` -> quantized latent ``[N, embed_dim, m, m]``."""
        self._check_ids(ids)
        return self.quantize.embed(ids.long())

    def decode_latent(self, zq: torch.Tensor) -> torch.Tensor:
        """Quantized latent -> images, unclamped (what the training losses see)."""
        return self.decoder(self.post_quant_conv(zq))

    # -- tokens --------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] ``[N, C, R, R]`` -> int64 code grid ``[N, m, m]``."""
        z = self.encode_latent(images)
        n, d, h, w = z.shape
        return self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(n, h, w)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Code grid ``[N, m, m]`` -> images ``[N, out_channels, R, R]`` clamped to [0, 1]."""
        return self.decode_latent(self.codes_to_latent(ids)).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training step: ``(unclamped reconstruction, ids, vq loss)``."""
        zq, ids, loss = self.quantize_latent(self.encode_latent(images))
        return self.decode_latent(zq), ids, loss

    # -- validation ----------------------------------------------------------------------------
    def _check_images(self, x: torch.Tensor) -> None:
        c, r = self.cfg.in_channels, self.cfg.resolution
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] != r or x.shape[3] != r:
            raise ValueError(f"images must be [N, {c}, {r}, {r}], got {list(x.shape)}")
        dtype = self.quantize.embedding.weight.dtype
        if x.dtype != dtype:
            raise ValueError(f"images must be {dtype} in [0, 1] (the model's dtype), got {x.dtype}")

    def _check_ids(self, ids: torch.Tensor) -> None:
        m, n = self.cfg.grid, self.cfg.n_embed
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be int64 or int32, got {ids.dtype}")
        if ids.dim() != 3 or ids.shape[1] != m or ids.shape[2] != m:
            raise ValueError(f"ids must be [N, {m}, {m}], got {list(ids.shape)}")
        if not tracing() and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise ValueError(f"ids must lie in [0, {n}), got [{int(ids.min())}, {int(ids.max())}]")


def _check_config(cfg: VQGANConfig, arch: Arch) -> None:
    """Fail at construction, naming the field, instead of deep inside a conv."""
    if not cfg.ch_mult or cfg.resolution % 2 ** (len(cfg.ch_mult) - 1):
        raise ValueError(f"vqgan.resolution {cfg.resolution} is not divisible by the downsampling of "
                         f"ch_mult {tuple(cfg.ch_mult)}")
    bad = sorted({w for w in [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult] if w % cfg.norm_groups})
    if bad:
        raise ValueError(f"vqgan.norm_groups {cfg.norm_groups} does not divide widths {bad}")
    if not arch.quant_convs and cfg.z_channels != cfg.embed_dim:
        raise ValueError(f"the mage VQGAN has no quant convs: z_channels {cfg.z_channels} "
                         f"must equal embed_dim {cfg.embed_dim}")
