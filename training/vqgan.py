"""Train the VQGAN that renders pixels from VQ tokens, for small data.

Loss: L1 + L2 reconstruction, a perceptual term, the VQ codebook/commitment term, and from
``adv_start`` a PatchGAN hinge loss. No downloaded VGG: the perceptual features come from a
fixed randomly initialised conv net (random conv features still measure local structure) or
from the frozen SSL encoder. Codes unused for ``reset_every`` steps are moved onto random
encoder outputs of the current batch (a 0.8M VQ-VAE reached 25.9 dB on Fashion-MNIST with all
512 codes in use that way). Reports PSNR and codebook usage on held-out images.

    python -m training.vqgan --config training/fmnist.yaml [--steps=...]
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # run as a file, training/ would shadow the standard library
    raise SystemExit("run the stages as modules from the repository root: python -m training.vqgan --help")

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from digit_core.codebook import usage_stats
from digit_core.pipeline import to_channels
from digit_core.vqgan import VQGAN
from training.config import TrainConfig, parse_config
from training.data import load_data
from training.files import file_digest
from training.layout import LAYOUT
from training.tokens import load_encoder
from training.trainer import Trainer


@dataclass
class VQGANTrainConfig(TrainConfig):
    stage: ClassVar[str] = "vqgan"
    lr: float = 2e-4
    schedule: str = "cosine"
    beta2: float = 0.95
    weight_decay: float = 0.0
    bf16: bool = False             # on CPU, bf16 convolutions measured slower than fp32 (4 vs 12 img/s); true on GPUs
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    perceptual: str = "random"     # random | encoder | none
    perceptual_weight: float = 0.1
    encoder: str = ""              # for perceptual=encoder; default <root>/ssl/encoder.safetensors
    adv_weight: float = 0.05       # 0 = no discriminator
    adv_start: int = 2000          # the GAN joins once reconstructions are reasonable
    disc_width: int = 32
    reset_every: int = 200         # steps; 0 = never reset dead codes
    val_data: str = ""             # e.g. "fmnist:test"; else the first training images
    eval_every: int = 1000
    eval_images: int = 2000


class RandomFeatures(nn.Module):
    """A fixed random conv net; the distance between its unit-normalised activations at three
    scales (as LPIPS does with VGG's) is the perceptual loss."""

    def __init__(self, channels: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        widths = [channels, 32, 64, 128]
        self.layers = nn.ModuleList(nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1)
                                    for i, (a, b) in enumerate(itertools.pairwise(widths)))
        for conv in self.layers:
            conv.weight.data = torch.randn(conv.weight.shape, generator=g) * math.sqrt(2 / conv.weight[0].numel())
            conv.bias.data.zero_()
        self.requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        loss, x = 0.0, torch.cat([a, b])
        for conv in self.layers:
            x = F.leaky_relu(conv(x), 0.2)
            fa, fb = F.normalize(x.float(), dim=1).chunk(2)
            loss = loss + (fa - fb).pow(2).sum(1).mean()
        return loss


class PatchGAN(nn.Module):
    """Pix2pix-style discriminator: one real/fake logit per overlapping patch."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.GroupNorm(8, 2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 3, 1, 1), nn.GroupNorm(8, 4 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * width, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


class CodeUsage(nn.Module):
    """Code counts since the last reset; a buffer, so checkpoints carry it."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(n, dtype=torch.long))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(VQGANTrainConfig, argv)
    tr = Trainer(cfg)
    data, mcfg = load_data(cfg, cfg.data, train=True)
    val = load_data(cfg, cfg.val_data, train=False)[0] if cfg.val_data else load_data(cfg, cfg.data, train=False)[0]
    vc = mcfg.vqgan
    vqgan = tr.add("vqgan", VQGAN(vc))
    raw = tr.modules["vqgan"]
    disc = tr.add("disc", PatchGAN(vc.out_channels, cfg.disc_width)) if cfg.adv_weight > 0 else None
    usage = tr.add("usage", CodeUsage(vc.n_embed), train=False)
    if cfg.perceptual == "random":
        perc = RandomFeatures(vc.out_channels, cfg.seed).to(tr.device)
    elif cfg.perceptual == "encoder":
        enc_path = cfg.input(cfg.encoder, LAYOUT.encoder.path)
        enc = load_encoder(mcfg, enc_path).to(tr.device)
        tr.depends(perceptual_encoder=file_digest(enc_path))   # a resumed run must use the same one
        perc = lambda a, b: F.mse_loss(*(enc.features(to_channels(v, mcfg.encoder.in_chans)) for v in (a, b)))
    else:
        perc = None
    tr.info(f"VQGAN: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, "
            f"{vc.grid}x{vc.grid} tokens of {vc.n_embed} codes")
    tr.resume()

    batches = tr.batches(data)
    for step in tr.loop():
        x, _ = next(batches)
        x = to_channels(x, vc.in_channels)
        adv = disc is not None and step >= cfg.adv_start
        vqgan.train()
        with tr.autocast():
            recon, ids, vq_loss = vqgan(x)
            rec = cfg.l1_weight * (recon - x).abs().mean() + cfg.l2_weight * (recon - x).pow(2).mean()
            p_loss = perc(recon, x) if perc is not None else torch.zeros((), device=x.device)
            loss = rec + cfg.perceptual_weight * p_loss + vq_loss
            if adv:  # through the unwrapped, frozen discriminator: its DDP reducer stays idle
                d_raw = tr.modules["disc"].requires_grad_(False)
                g_adv = -d_raw(recon).float().mean()
                loss = loss + cfg.adv_weight * g_adv
        tr.step_optim(loss, "vqgan")
        metrics = {"loss": loss.item(), "rec": rec.item(), "perceptual": p_loss.item(), "vq": vq_loss.item()}
        if adv:
            tr.modules["disc"].requires_grad_(True)
            with tr.autocast():
                logits = disc(torch.cat([x, recon.detach()])).float()
                real, fake = logits.chunk(2)
                d_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()   # hinge
            tr.step_optim(d_loss, "disc")
            metrics |= {"g_adv": g_adv.item(), "d_loss": d_loss.item()}
        usage.counts += torch.bincount(ids.flatten(), minlength=vc.n_embed)
        if cfg.reset_every and (step + 1) % cfg.reset_every == 0:
            metrics["reset_codes"] = reset_dead_codes(tr, raw, usage.counts, x)
        tr.log(samples=x.shape[0], **metrics)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            with tr.untimed():
                tr.record(step=step + 1, **evaluate(tr, val, cfg.eval_images))

    tr.save_artifact(LAYOUT.vqgan.name, tr.final_state("vqgan"), {"model": mcfg.to_dict()})
    tr.finish()


@torch.no_grad()
def reset_dead_codes(tr: Trainer, vq: VQGAN, counts: torch.Tensor, x: torch.Tensor) -> int:
    """Move every code unused since the last reset onto a random encoder output of this batch
    (rank 0's, broadcast so replicas stay equal); its Adam moments restart from zero."""
    if dist.is_initialized():
        dist.all_reduce(counts)
    dead = (counts == 0).nonzero().flatten()
    counts.zero_()
    if len(dead) == 0:
        return 0
    z = vq.encode_latent(x.float())
    z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    pick = z[torch.randint(len(z), (len(dead),), device=z.device)]
    weight = vq.quantize.embedding.weight
    weight[dead] = pick + 0.01 * pick.std() * torch.randn_like(pick)
    if dist.is_initialized():
        dist.broadcast(weight, 0)
    state = tr.optims["vqgan"].state.get(weight, {})
    for k in ("exp_avg", "exp_avg_sq"):
        if k in state:
            state[k][dead] = 0
    return len(dead)


@torch.no_grad()
def evaluate(tr: Trainer, data, n: int) -> dict[str, float]:
    """PSNR of encode -> decode (clamped, uint8-quantised as the app shows it) and code usage."""
    vq = tr.eval_module("vqgan")
    vc = vq.cfg
    mse, ids = [], []
    for i in range(0, min(n, len(data)), tr.cfg.batch_size):
        x = torch.stack([data[j][0] for j in range(i, min(i + tr.cfg.batch_size, n, len(data)))]).to(tr.device)
        x = to_channels(x, vc.in_channels)
        codes = vq.encode(x)
        y = (vq.decode(codes) * 255).round() / 255
        mse.append((y - x).pow(2).flatten(1).mean(1))
        ids.append(codes.flatten().cpu())
    mse_all = torch.cat(mse).clamp_min(1e-10)
    s = usage_stats(torch.cat(ids).numpy(), vc.n_embed)
    out = {"val_psnr": float((10 * torch.log10(1 / mse_all)).mean()), "val_codes_used": s["used"],
           "val_code_perplexity": s["perplexity"]}
    tr.info(f"step {tr.step + 1}: PSNR {out['val_psnr']:.2f} dB, {s['used']}/{vc.n_embed} codes used, "
            f"perplexity {s['perplexity']:.1f}")
    return out


if __name__ == "__main__":
    main()
