"""Self-supervised pre-training of the small tokenizer encoders (a ViT or a CNN).

Objectives (``--objective``):

* ``vicreg_dense`` (the Fashion-MNIST default, on the CNN of preset ``fmnist-cnn``): VICReg
  (invariance + variance + covariance, Bardes et al. 2022) between two augmented views, twice:
  on the projected feature maps mean-pooled per image, and on the projected features *at the
  same places of the image* in both views (``same_places``: each view's crop-and-flip map is
  inverted to find where the original image's grid cells fell). The second term is what the
  tokenizer needs, since K-Means clusters per-patch features, not images. No teacher, no EMA.
* ``dino_ibot`` (the paper's §4.5 choice): two losses share one projection head (DINO's MLP +
  prototypes): DINO self-distillation on the class token across crops, and iBOT's masked-patch
  loss, where the student sees some patches of a global crop replaced by a mask token and
  predicts the teacher's prototype distribution there. The teacher is the EMA of the student
  (momentum ``teacher_momentum`` -> 1, cosine). ``dino`` and ``ibot`` run one loss alone. ViT only.
* ``contrastive``: SimCLR - two augmented views per image, InfoNCE on projections of the
  mean-pooled tokenizer features, the rest of the batch as negatives.
* ``supervised``: the labelled fallback - the same encoder trained with the labels
  (cross-entropy, label smoothing 0.1, on the mean-pooled features of the tokenizer's feature
  block). It is not self-supervised, and the encoder file says so (``objective`` and
  ``labels`` reach the model config, the model card and the app).

Augmentations for 32x32 images run batched on the device: random resized crops (global at full
size, local ones smaller with interpolated position embeddings), flips, brightness/contrast
jitter, optional Gaussian noise. No objective but ``supervised`` reads a label. A linear probe
(logistic regression on mean-pooled patch features of the teacher/EMA or the encoder, against
raw pixels) is recorded every ``probe_every`` steps and at the end, on ``val_data``: a learning
curve in metrics.jsonl, for the record only (the encoder kept is the last step's, whatever the
probe says). The curves of every attempt are in ``weights/fmnist*/…/metrics.jsonl`` and the
READMEs there.

On CPU, the ViT swaps timm's fused attention for the plain one (a faster backward at these
sizes) and the CNN trains in channels-last fp32 (bf16 convolutions are slower on this CPU).

    python -m training.ssl --config training/fmnist.yaml      # CNN + vicreg_dense, the bundled encoder
    python -m training.ssl --config training/fmnist_supervised.yaml     # the labelled ViT
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # run as a file, training/ would shadow the standard library
    raise SystemExit("run the stages as modules from the repository root: python -m training.ssl --help")

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from digit_core.encoders import Encoder
from digit_core.pipeline import to_channels
from training.config import TrainConfig, at_least, fraction, one_of, parse_config
from training.data import load_data
from training.evaltools import linear_probe
from training.layout import LAYOUT
from training.ssl_objectives import Centers, crops, distill, info_nce, random_masks, same_places, vicreg
from training.trainer import Trainer

OBJECTIVES = ("dino_ibot", "dino", "ibot", "contrastive", "vicreg_dense", "supervised")


@dataclass
class SSLConfig(TrainConfig):
    stage: ClassVar[str] = "ssl"
    rules: ClassVar[dict] = {"objective": one_of(*OBJECTIVES), "noise": at_least(0), "dense_weight": at_least(0),
                             "jitter": fraction(upper_open=True)}
    lr: float = 5e-4
    schedule: str = "cosine"
    warmup: int = 500
    weight_decay: float = 0.04
    beta2: float = 0.999
    grad_clip: float = 3.0
    objective: str = "dino_ibot"   # dino_ibot | dino | ibot | contrastive | vicreg_dense | supervised (labels: the fallback)
    temperature: float = 0.2       # contrastive: InfoNCE temperature
    vicreg_weights: tuple[float, float, float] = (25.0, 25.0, 1.0)   # vicreg_dense: invariance, variance, covariance
    dense_weight: float = 1.0      # vicreg_dense: weight of the per-location term beside the pooled one
    noise: float = 0.0             # std of Gaussian pixel noise added to each view
    ibot_weight: float = 1.0
    out_dim: int = 1024            # prototypes
    head_hidden: int = 512
    head_bottleneck: int = 128
    teacher_momentum: float = 0.996
    teacher_temp: float = 0.04
    student_temp: float = 0.1
    center_momentum: float = 0.9
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_crops: int = 4
    local_size: int = 16           # must be a multiple of the patch size
    local_scale: tuple[float, float] = (0.1, 0.4)
    jitter: float = 0.4            # brightness/contrast factors in [1 - j, 1 + j]
    mask_prob: float = 0.5         # share of global crops that get iBOT masks
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    val_data: str = ""             # probe test images, e.g. "fmnist:test"; else held-out train images
    probe_every: int = 0           # steps; 0 = only at the end
    probe_train: int = 10000
    probe_test: int = 2000


class SSLModel(nn.Module):
    """Our Encoder + mask token + projection head; the teacher is an EMA copy of all of it."""

    def __init__(self, encoder: Encoder, cfg: SSLConfig, num_classes: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        d = encoder.cfg.width
        # only the parameters the objective trains: DDP rejects parameters without gradients
        self.objective = cfg.objective
        self.classifier = nn.Linear(d, num_classes) if cfg.objective == "supervised" else None
        if cfg.objective == "contrastive":   # SimCLR's projection MLP; no prototypes, no mask token
            self.mlp = nn.Sequential(nn.Linear(d, cfg.head_hidden), nn.GELU(), nn.Linear(cfg.head_hidden, cfg.head_bottleneck))
        elif cfg.objective == "vicreg_dense":   # VICReg's expander, applied at every grid cell (1x1 convolutions)
            self.mlp = nn.Sequential(nn.Conv2d(d, cfg.head_hidden, 1), nn.BatchNorm2d(cfg.head_hidden), nn.ReLU(),
                                     nn.Conv2d(cfg.head_hidden, cfg.head_hidden, 1))
        elif self.classifier is None:
            self.mask_token = nn.Parameter(torch.zeros(d)) if "ibot" in cfg.objective else None
            self.mlp = nn.Sequential(nn.Linear(d, cfg.head_hidden), nn.GELU(), nn.Linear(cfg.head_hidden, cfg.head_hidden),
                                     nn.GELU(), nn.Linear(cfg.head_hidden, cfg.head_bottleneck))
            self.prototypes = nn.Parameter(torch.randn(cfg.out_dim, cfg.head_bottleneck) * 0.02)
        e = encoder.cfg
        self.register_buffer("mean", torch.tensor(e.mean[: e.in_chans]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(e.std[: e.in_chans]).view(1, -1, 1, 1))

    @property
    def vit(self) -> VisionTransformer:
        """The timm ViT inside our Encoder (a property: a second registration would save it twice)."""
        return next(m for m in self.encoder.modules() if isinstance(m, VisionTransformer))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """DINO head: MLP, then cosine similarity to the prototypes (its weight-normalised last layer)."""
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).t()

    def backbone(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cls [B, d], patches [B, n*n, d])`` after the final norm; masked patches take the mask token.
        Position embeddings are resampled for crops smaller than the model's size."""
        vit = self.vit
        x = vit.patch_embed.proj((x - self.mean) / self.std)
        B, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        n_pre = vit.num_prefix_tokens
        pos = vit.pos_embed[:, 0 if vit.no_embed_class else n_pre:]
        g = math.isqrt(pos.shape[1])
        if (h, w) != (g, g):
            pos = F.interpolate(pos.reshape(1, g, g, d).permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                                align_corners=False).permute(0, 2, 3, 1).reshape(1, h * w, d)
        prefix = [t.expand(B, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if vit.no_embed_class:
            x = torch.cat(prefix + [x + pos], 1)
        else:
            x = torch.cat(prefix + [x], 1) + torch.cat([vit.pos_embed[:, :n_pre], pos], 1)
        x = vit.norm(vit.blocks(vit.norm_pre(x)))
        cls = x[:, 0] if vit.cls_token is not None else x[:, n_pre:].mean(1)
        return cls, x[:, n_pre:]

    def forward(self, globals_: torch.Tensor, masks: torch.Tensor | None, locals_: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """Head outputs of the class tokens (global crops, then local ones) and of the global patches;
        for the supervised objective, class logits of the mean-pooled tokenizer features; for the
        contrastive one, unit-norm projections of them."""
        if self.classifier is not None:
            return self.classifier(self.encoder.features(globals_).mean((1, 2)))
        if self.objective == "contrastive":
            return F.normalize(self.mlp(self.encoder.features(globals_).mean((1, 2))).float(), dim=-1)
        if self.objective == "vicreg_dense":   # projected feature maps [B, k, n, n]
            return self.mlp(self.encoder.features(globals_).permute(0, 3, 1, 2))
        cls, patches = self.backbone(globals_, masks)
        if locals_ is not None:
            cls = torch.cat([cls, self.backbone(locals_)[0]])
        return self.head(cls), self.head(patches)


def contrastive_step(tr: Trainer, model: nn.Module, x: torch.Tensor, cfg: SSLConfig) -> None:
    """One SimCLR step: two augmented views of each image, InfoNCE on the projections of their
    mean-pooled tokenizer features (so the features K-Means clusters are the trained ones)."""
    model.train()
    views = crops(x, 2, tr.modules["model"].encoder.cfg.image_size, cfg.global_scale, cfg.jitter, cfg.noise)[0]
    with tr.autocast():
        z = model(views, None, None)
    loss = info_nce(z, cfg.temperature)
    gnorm = tr.step_optim(loss, ema_decay=cfg.teacher_momentum)
    with torch.no_grad():   # top-1 retrieval of the other view: a liveness signal that needs no labels
        n = x.shape[0]
        sim = (z[:n] @ z[n:].t()).float()
        acc = (sim.argmax(1) == torch.arange(n, device=z.device)).float().mean().item()
    tr.log(samples=n, loss=loss.item(), grad_norm=gnorm, view_match=acc)


def vicreg_dense_step(tr: Trainer, model: nn.Module, x: torch.Tensor, cfg: SSLConfig) -> None:
    """One VICReg step on two views, at two levels: the projected feature maps mean-pooled per
    image, and the projected features at the same places of the image in both views (cells
    outside either view dropped). The second term is what makes each *patch* feature, which
    K-Means clusters, invariant to the crop, flip and jitter of its image."""
    model.train()
    e = tr.modules["model"].encoder.cfg
    views, theta = crops(x, 2, e.image_size, cfg.global_scale, cfg.jitter, cfg.noise)
    views = views.contiguous(memory_format=torch.channels_last)   # 1.25x faster CPU convolutions here
    with tr.autocast():
        z = model(views, None, None)
    n = x.shape[0]
    pooled, _ = vicreg(z[:n].mean((2, 3)), z[n:].mean((2, 3)), cfg.vicreg_weights)
    cells, inside = same_places(z.float(), theta, e.grid)
    both = inside[:n] & inside[n:]
    dense, dm = vicreg(cells[:n][both], cells[n:][both], cfg.vicreg_weights)
    loss = pooled + cfg.dense_weight * dense
    gnorm = tr.step_optim(loss)
    tr.log(samples=n, loss=loss.item(), grad_norm=gnorm, pooled=pooled.item(), dense=dense.item(),
           dense_invariance=dm["invariance"], dense_variance=dm["variance"], shared_cells=both.float().mean().item())


def supervised_step(tr: Trainer, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SSLConfig) -> None:
    """One step of the labelled fallback: cross-entropy on the mean-pooled tokenizer features of
    one augmented crop, so the features K-Means clusters are the ones the labels shaped."""
    model.train()
    crop = crops(x, 1, tr.modules["model"].encoder.cfg.image_size, cfg.global_scale, cfg.jitter, cfg.noise)[0]
    y = y.to(x.device)
    with tr.autocast():
        logits = model(crop, None, None)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
    gnorm = tr.step_optim(loss, ema_decay=cfg.teacher_momentum)
    tr.log(samples=x.shape[0], loss=loss.item(), grad_norm=gnorm,
           accuracy=(logits.argmax(1) == y).float().mean().item())


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SSLConfig, argv)
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    tr = Trainer(cfg)
    data, mcfg = load_data(cfg, cfg.data, train=True)
    e = mcfg.encoder
    if e.kind not in ("vit", "cnn"):
        raise ValueError(f"ssl trains our small encoders (encoder.kind='vit' or 'cnn'), not {e.kind!r}")
    if e.kind == "cnn" and cfg.objective not in ("contrastive", "vicreg_dense", "supervised"):
        raise ValueError(f"objective {cfg.objective!r} needs a ViT (class token, mask token); a CNN encoder "
                         "trains with contrastive, vicreg_dense or supervised")
    if cfg.local_crops and cfg.local_size % e.patch_size:
        raise ValueError(f"local_size {cfg.local_size} is not a multiple of the patch size {e.patch_size}")
    supervised, contrastive = cfg.objective == "supervised", cfg.objective in ("contrastive", "vicreg_dense")
    if supervised and not mcfg.stage1.num_classes:
        raise ValueError("objective=supervised needs labelled data (class subfolders or fmnist)")
    encoder = Encoder(e)
    if tr.device.type == "cpu" and e.kind == "vit":
        # timm's fused attention (SDPA) has a slow CPU backward at these sizes: the plain
        # softmax(QK^T)V path trains this ViT 1.6x faster in bf16 (238 vs 148 img/s, one core)
        for block in encoder.vit.blocks:
            block.attn.fused_attn = False
    # VICReg has no teacher; its encoder is the trained one itself (an EMA would also pair
    # averaged weights with the BatchNorm statistics of the current ones)
    ssl_model = SSLModel(encoder, cfg, mcfg.stage1.num_classes)
    if e.kind == "cnn":
        ssl_model = ssl_model.to(memory_format=torch.channels_last)
    model = tr.add("model", ssl_model,
                   ema=0.0 if cfg.objective == "vicreg_dense" else cfg.teacher_momentum)
    centers = tr.add("centers", Centers(cfg.out_dim), train=False)
    tr.info(f"ssl: encoder {sum(p.numel() for p in tr.modules['model'].encoder.parameters()) / 1e6:.2f}M parameters, "
            f"objective {cfg.objective}" + ("" if supervised or contrastive else f", 2 global + {cfg.local_crops} local crops"))
    tr.resume()
    probe_sets = probe_data(cfg, data)
    if tr.step == 0 and tr.d.main:
        tr.record(probe_pixels=linear_probe(*probe_sets, lambda x: x.flatten(1)), **probe(tr, probe_sets))
    use_dino, use_ibot = cfg.objective in ("dino_ibot", "dino"), cfg.objective in ("dino_ibot", "ibot")

    batches = tr.batches(data)
    for step in tr.loop():
        x, y = next(batches)
        x = to_channels(x, e.in_chans)
        B = x.shape[0]
        if supervised or contrastive:
            if supervised:
                supervised_step(tr, model, x, y, cfg)
            elif cfg.objective == "vicreg_dense":
                vicreg_dense_step(tr, model, x, cfg)
            else:
                contrastive_step(tr, model, x, cfg)
            if cfg.probe_every and (step + 1) % cfg.probe_every == 0 and step + 1 < cfg.steps and tr.d.main:
                with tr.untimed():
                    tr.record(step=step + 1, **probe(tr, probe_sets))
            continue
        g = crops(x, 2, e.image_size, cfg.global_scale, cfg.jitter, cfg.noise)[0]
        loc = crops(x, cfg.local_crops, cfg.local_size, cfg.local_scale, cfg.jitter)[0] if cfg.local_crops and use_dino else None
        masks = random_masks(2 * B, e.grid ** 2, cfg.mask_prob, cfg.mask_ratio, x.device) if use_ibot else None
        teacher = tr.emas["model"].module
        model.train()
        with tr.autocast():
            with torch.no_grad():
                t_cls, t_patch = teacher(g, None, None)
            s_cls, s_patch = model(g, masks, loc)
            loss = torch.zeros((), device=x.device)
            if use_dino:  # every student crop against the teacher's other global crop
                t2 = t_cls.view(2, B, -1)
                s = s_cls.view(-1, B, s_cls.shape[-1])
                terms = [distill(t2[i], s[v], centers.cls, cfg.teacher_temp, cfg.student_temp).mean()
                         for i in range(2) for v in range(len(s)) if v != i]
                dino = sum(terms) / len(terms)
                loss = loss + dino
            if use_ibot and masks.any():
                per_patch = distill(t_patch, s_patch, centers.patch, cfg.teacher_temp, cfg.student_temp)
                ibot = (per_patch * masks).sum() / masks.sum()
                loss = loss + cfg.ibot_weight * ibot
        t = min(1.0, step / max(1, cfg.steps - 1))
        momentum = 1 - (1 - cfg.teacher_momentum) * (math.cos(math.pi * t) + 1) / 2
        gnorm = tr.step_optim(loss, ema_decay=momentum)
        centers.update("cls", t_cls, cfg.center_momentum)
        centers.update("patch", t_patch, cfg.center_momentum)
        metrics = {"loss": loss.item(), "grad_norm": gnorm, "momentum": momentum}
        if use_dino:
            metrics["dino"] = dino.item()
        if use_ibot and masks.any():
            metrics["ibot"] = ibot.item()
        tr.log(samples=B, **metrics)
        if cfg.probe_every and (step + 1) % cfg.probe_every == 0 and step + 1 < cfg.steps and tr.d.main:
            with tr.untimed():
                tr.record(step=step + 1, **probe(tr, probe_sets))

    if tr.d.main:
        tr.record(step=tr.step, **probe(tr, probe_sets))
    arch = "CNN" if e.kind == "cnn" else "ViT"
    e.objective, e.labels = cfg.objective, supervised
    e.source = (f"{arch} trained here with the labels (objective=supervised, {tr.step} steps; not self-supervised)"
                if supervised else f"{arch} trained here self-supervised (objective={cfg.objective}, {tr.step} steps, no labels)")
    tr.save_artifact(LAYOUT.encoder.name, tr.eval_module("model").encoder.state_dict(),
                     {"model": mcfg.to_dict(), "source": e.source, "objective": e.objective, "labels": e.labels})
    tr.finish()


def probe_data(cfg: SSLConfig, data) -> tuple[torch.Tensor, ...]:
    """(train images, labels, test images, labels) for the linear probe, without augmentation."""
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.val_data:
        test = load_data(cfg, cfg.val_data, train=False)[0]
        tr_idx = torch.randperm(len(data), generator=gen)[: cfg.probe_train]
        te_idx = torch.randperm(len(test), generator=gen)[: cfg.probe_test]
    else:   # held-out training images
        test = data
        perm = torch.randperm(len(data), generator=gen)
        te_idx, tr_idx = perm[: min(cfg.probe_test, len(data) // 4)], perm[min(cfg.probe_test, len(data) // 4):][: cfg.probe_train]
    take = lambda ds, idx: (torch.stack([ds[int(i)][0] for i in idx]), torch.tensor([ds[int(i)][1] for i in idx]))
    return (*take(data, tr_idx), *take(test, te_idx))


@torch.no_grad()
def probe(tr: Trainer, sets: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Linear-probe accuracy of the teacher's mean-pooled feature-block patch features."""
    enc = tr.eval_module("model").encoder
    e = enc.cfg
    feats = lambda x: torch.cat([enc.features(to_channels(x[i:i + 256].to(tr.device), e.in_chans)).mean((1, 2)).float().cpu()
                                 for i in range(0, len(x), 256)])
    acc = linear_probe(*sets, feats)
    tr.info(f"step {tr.step}: linear probe {acc:.4f}")
    return {"probe": acc}


if __name__ == "__main__":
    main()
