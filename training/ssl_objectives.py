"""The pieces of the SSL objectives of ``training.ssl``: batched augmented views (random resized crops,
flips, jitter, noise) with the maps that place them in the image, the same-places pairing of two
views' feature grids, VICReg, DINO/iBOT centres, masks and self-distillation, and InfoNCE."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Centers(nn.Module):
    """DINO/iBOT output centres (EMA of the teacher's outputs); buffers, so checkpoints carry them."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.register_buffer("cls", torch.zeros(k))
        self.register_buffer("patch", torch.zeros(k))

    @torch.no_grad()
    def update(self, name: str, out: torch.Tensor, m: float) -> None:
        mean = out.float().flatten(0, -2).mean(0)
        if dist.is_initialized():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        getattr(self, name).mul_(m).add_(mean, alpha=1 - m)


def crops(x: torch.Tensor, n: int, size: int, scale: tuple[float, float], jitter: float,
          noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random resized crops (area fraction in ``scale``, aspect 3/4..4/3) of each image,
    flipped half the time, with brightness/contrast jitter and Gaussian noise of std ``noise``:
    ``[n * B, C, size, size]``, and their affine maps ``theta [n * B, 2, 3]`` (view coordinates
    -> image coordinates, both in [-1, 1], as ``F.affine_grid`` takes them)."""
    x = x.repeat(n, 1, 1, 1)
    N = x.shape[0]
    u = lambda lo, hi: torch.empty(N, device=x.device).uniform_(lo, hi)
    area, ratio = u(*scale), torch.exp(u(math.log(3 / 4), math.log(4 / 3)))
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    flip = torch.where(torch.rand(N, device=x.device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(N, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = w * flip, h
    theta[:, 0, 2], theta[:, 1, 2] = (1 - w) * u(-1, 1), (1 - h) * u(-1, 1)
    grid = F.affine_grid(theta, [N, x.shape[1], size, size], align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    b, c = u(1 - jitter, 1 + jitter).view(-1, 1, 1, 1), u(1 - jitter, 1 + jitter).view(-1, 1, 1, 1)
    mean = y.mean((1, 2, 3), keepdim=True)
    y = (y - mean) * c + mean * b
    if noise:
        y = y + noise * torch.randn_like(y)
    return y.clamp(0, 1), theta


def same_places(z: torch.Tensor, theta: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature maps ``z [B, k, h, w]`` of views, sampled at the centres of the original image's
    ``grid x grid`` cells: ``[B, grid*grid, k]``, and ``[B, grid*grid]`` True where a centre lies
    inside the view. Each view's affine map is inverted (it is diagonal: scale, flip, shift), so
    row ``i`` of two views of one image is the same place of that image."""
    c = (torch.arange(grid, device=z.device, dtype=z.dtype) * 2 + 1) / grid - 1
    py, px = torch.meshgrid(c, c, indexing="ij")
    p = torch.stack([px, py], -1).view(1, -1, 2)                        # (x, y), as grid_sample reads them
    scale = torch.stack([theta[:, 0, 0], theta[:, 1, 1]], -1)[:, None]   # [B, 1, 2]
    u = (p - theta[:, None, :, 2]) / scale                              # image -> view coordinates
    inside = (u.abs() <= 1).all(-1)
    out = F.grid_sample(z, u[:, :, None], mode="bilinear", padding_mode="border", align_corners=False)   # [B, k, grid*grid, 1]
    return out[..., 0].transpose(1, 2), inside


def vicreg(a: torch.Tensor, b: torch.Tensor, weights: tuple[float, float, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """VICReg (Bardes et al. 2022) between paired rows ``a, b [N, k]``: mean squared distance
    (invariance) + hinge on each dimension's std below 1 (variance) + squared off-diagonal
    covariances / k (covariance), each branch regularised on its own."""
    a, b = a.float(), b.float()
    inv = F.mse_loss(a, b)
    var = cov = 0.0
    for z in (a, b):
        z = z - z.mean(0)
        var = var + F.relu(1 - torch.sqrt(z.var(0) + 1e-4)).mean() / 2
        c = (z.t() @ z) / max(1, len(z) - 1)
        cov = cov + (c.pow(2).sum() - c.diagonal().pow(2).sum()) / z.shape[1]
    w_inv, w_var, w_cov = weights
    loss = w_inv * inv + w_var * var + w_cov * cov
    return loss, {"invariance": inv.item(), "variance": float(var.detach()), "covariance": float(cov.detach())}


def random_masks(n: int, tokens: int, prob: float, ratio: tuple[float, float], device: torch.device) -> torch.Tensor:
    """iBOT masks ``[n, tokens]``: with probability ``prob`` a random ``ratio`` share of the patches."""
    r = torch.empty(n, 1, device=device).uniform_(*ratio) * (torch.rand(n, 1, device=device) < prob)
    return torch.rand(n, tokens, device=device) < r


def distill(teacher: torch.Tensor, student: torch.Tensor, center: torch.Tensor, t_temp: float, s_temp: float) -> torch.Tensor:
    """Cross-entropy ``-sum softmax((t - c) / tt) * log_softmax(s / ts)`` per row."""
    t = torch.softmax((teacher.float() - center) / t_temp, -1)
    return -(t * torch.log_softmax(student.float() / s_temp, -1)).sum(-1)




def info_nce(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over ``z = [view 1; view 2]`` (unit rows, ``[2B, k]``): each row's positive
    is the other view of its image, the other ``2B - 2`` rows are its negatives. Negatives are
    this rank's batch only (no all-gather), as in SimCLR's per-device variant."""
    n = z.shape[0] // 2
    sim = (z @ z.t()) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)
