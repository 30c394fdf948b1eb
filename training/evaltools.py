"""The evaluation toolkit every judge shares (``training.evaluate``, ``training.sampling_sweep``, the
analyses, the SSL probe curves): the held-out splits, the Fashion-MNIST classifier that recognises
samples and gives the features of the Fréchet distance, the distance itself, and the linear probe."""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from digit_core.metrics import bootstrap_ci
from digit_core.pipeline import images_to_input
from training.config import RunConfig
from training.data import load_data, test_split
from training.files import atomic_save, load_strict, load_tensors

log = logging.getLogger("digit.evaluate")


@dataclass
class EvalConfig(RunConfig):
    stage: ClassVar[str] = "evaluate"
    data: str = "fmnist"
    bundle: str = "exported/fmnist"
    out: str = ""                  # default reports/<bundle folder name>-eval
    test_data: str = ""            # held-out split; default fmnist:test for fmnist, else a fifth of data
    batch_size: int = 100          # images per bundle call
    threads: int = 0               # onnxruntime threads; 0 = its default (all cores)
    per_class: int = 1000
    fid_n: int = 10000
    completions: int = 1000
    table1_n: int = 2000
    probe_train: int = 10000
    probe_test: int = 2000
    classifier: str = ""           # default runs/eval/<data>-classifier.safetensors
    classifier_epochs: int = 6     # its test accuracy is in every report (reports/fmnist-eval/summary.md)
    unguided: bool = True          # also sample with guidance off (cfg_scale 1), as the paper's DiGIT figures are
    n_boot: int = 200              # bootstrap resamples for every interval
    quick: bool = False


# -- data ----------------------------------------------------------------------------------------------
@dataclass
class Labelled:
    """Images float ``[N, C, S, S]`` in [0, 1] (the bundle's channels) and their labels ``[N]``."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def from_uint8(images: np.ndarray, channels: int) -> torch.Tensor:
    """A bundle's uint8 ``[N, S, S, 3]`` -> float ``[N, channels, S, S]`` (grey: the equal channels' mean)."""
    return images_to_input(torch.from_numpy(images), channels)


def held_out_spec(cfg: EvalConfig) -> str:
    """The held-out split: ``test_data``, else Fashion-MNIST's test files, else none (hold out a share)."""
    return cfg.test_data or test_split(cfg.data) or ""


def load_splits(cfg: EvalConfig, num_classes: int) -> tuple[Labelled, Labelled, list[str]]:
    """Train and test images at the bundle's size and channels, each in a seeded random order
    (so every prefix is a random sample), and the class names; the data must have the bundle's
    ``num_classes`` (0: an unconditional bundle, any)."""
    run = dataclasses.replace(cfg, model=str(Path(cfg.bundle) / "config.json"))
    data = load_data(run, cfg.data, train=False)[0]
    if num_classes and num_classes != len(data.classes):
        raise ValueError(f"the bundle {cfg.bundle} has {num_classes} classes but {cfg.data} has {len(data.classes)} "
                         f"({', '.join(data.classes[:12])}): evaluate a bundle on the data it was trained on")
    gen = torch.Generator().manual_seed(cfg.seed)
    if held_out_spec(cfg):
        test = load_data(run, held_out_spec(cfg), train=False)[0]
        if list(test.classes) != list(data.classes):
            raise ValueError(f"{held_out_spec(cfg)} has classes {test.classes}, {cfg.data} has {data.classes}")
        parts = [(data, torch.randperm(len(data), generator=gen)), (test, torch.randperm(len(test), generator=gen))]
    else:
        if len(data) < 10:
            raise ValueError(f"{cfg.data} has {len(data)} images: too few to hold out a test share (set test_data)")
        perm = torch.randperm(len(data), generator=gen)
        parts = [(data, perm[len(data) // 5:]), (data, perm[: len(data) // 5])]
    train, test = (Labelled(torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]))
                   for items in ([ds[int(i)] for i in idx] for ds, idx in parts))
    return train, test, list(data.classes)


# -- the classifier ------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """Three conv-BN-ReLU-pool blocks and a 256-d penultimate layer (the Fréchet feature space)."""

    def __init__(self, channels: int, num_classes: int, width: int = 32, dim: int = 256) -> None:
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                    nn.MaxPool2d(2)]

        self.body = nn.Sequential(*block(channels, width), *block(width, 2 * width), *block(2 * width, 4 * width),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(4 * width * 16, dim, bias=False),
                                  nn.BatchNorm1d(dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.contiguous(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(model: Classifier, train: Labelled, epochs: int, seed: int, device: torch.device,
                     bf16: bool, batch: int = 128) -> None:
    """AdamW with a one-cycle schedule, label smoothing 0.1, random horizontal flips.

    Channels-last bf16 autocast: 3.4k images/s on one CPU thread (32x32 grey), vs 1.1k in plain fp32."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)                      # dropout
    batch = min(batch, len(train))
    per_epoch = len(train) // batch
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * per_epoch, pct_start=0.15)
    model.train()
    for _ in tqdm(range(epochs), desc="classifier", unit="epoch", dynamic_ncols=True):
        perm = torch.randperm(len(train), generator=gen)
        for i in range(per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            x, y = train.x[idx], train.y[idx]
            x = torch.where((torch.rand(len(idx), generator=gen) < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x.to(device))
            loss = F.cross_entropy(logits.float(), y.to(device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def classify(model: Classifier, x: torch.Tensor, device: torch.device,
             batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features ``[N, 256]`` (float64) and predicted classes ``[N]``, in fp32."""
    feats, preds = [], []
    for i in range(0, len(x), batch):
        f = model.features(x[i:i + batch].to(device))
        feats.append(f.double().cpu())
        preds.append(model.head(f).argmax(1).cpu())
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def classifier_path(cfg: EvalConfig) -> Path:
    if cfg.classifier:
        return Path(cfg.classifier)
    return Path("runs/eval") / f"{re.sub(r'[^A-Za-z0-9._]+', '-', cfg.data).strip('-')}-classifier.safetensors"


def get_classifier(cfg: EvalConfig, train: Labelled, test: Labelled, classes: list[str],
                   device: torch.device) -> tuple[Classifier, dict[str, Any]]:
    """The cached classifier when its file exists (it must fit these images and classes), else
    one trained now and saved atomically; returns it and its report."""
    path = classifier_path(cfg)
    arch = {"channels": int(train.x.shape[1]), "image_size": int(train.x.shape[-1]), "num_classes": len(classes),
            "width": 32, "dim": 256}
    model = Classifier(arch["channels"], arch["num_classes"], arch["width"], arch["dim"])
    model = model.to(device=device, memory_format=torch.channels_last)
    if path.is_file():
        tensors, meta = load_tensors(path)
        if meta.get("arch") != arch or meta.get("classes") != classes:
            raise ValueError(f"{path} is a classifier for {meta.get('arch')} with classes {meta.get('classes')}; "
                             f"this evaluation needs {arch} with classes {classes}: delete it or set classifier=PATH")
        load_strict(model, tensors, path)
        model.eval()
        log.info(f"reusing classifier {path} (trained on {meta['data']}, "
                 f"test accuracy then {meta['test_accuracy']:.4f})")
        reused = True
    else:
        log.info(f"training the classifier on {len(train)} images ({cfg.classifier_epochs} epochs)")
        train_classifier(model, train, cfg.classifier_epochs, cfg.seed, device, cfg.bf16)
        meta = {"arch": arch, "classes": classes, "data": cfg.data, "epochs": cfg.classifier_epochs,
                "train_images": len(train), "seed": cfg.seed,
                "test_accuracy": float((classify(model, test.x, device)[1] == test.y.numpy()).mean())}
        atomic_save(model.state_dict(), path, meta)
        log.info(f"wrote {path} (test accuracy {meta['test_accuracy']:.4f})")
        reused = False
    return model, {"path": str(path), "reused": reused, "trained_on": meta["data"], "epochs": meta["epochs"]}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to feature rows ``a [N, d]`` and ``b [M, d]``:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.

    ``tr (S_a S_b)^(1/2)`` is the trace of the root of the symmetric PSD ``S_a^(1/2) S_b S_a^(1/2)``
    (similar to ``S_a S_b``, so the same eigenvalues), taken by symmetric eigendecompositions: real
    by construction, where a general ``sqrtm`` of the non-symmetric product returns complex round-off.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two sets of >= 2 feature rows of one width, got {a.shape} and {b.shape}")
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(sa)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root @ sb @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    fd = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2.0 * tr_covmean
    return float(max(fd, 0.0))


def mean_interval(hits: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """The mean of per-item ``hits`` and its bootstrap 95% (percentile) interval: ``(estimate, low, high)``."""
    return bootstrap_ci(lambda i: hits[i].mean(), len(hits), n_boot=n_boot, seed=seed)


def frechet_interval(feats: np.ndarray, ref: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """The Fréchet distance of ``feats`` to the fixed ``ref`` and its bootstrap 95% interval, resampling the
    samples (normal: resampling inflates a Fréchet distance, not its spread): ``(estimate, low, high)``."""
    return bootstrap_ci(lambda i: frechet_distance(feats[i], ref), len(feats), n_boot=n_boot, seed=seed,
                        method="normal")


def linear_probe(x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor, featurize,
                 epochs: int = 100, wd: float = 1e-4) -> float:
    """Test accuracy of a multinomial logistic regression on standardised features (full-batch L-BFGS)."""
    with torch.no_grad():
        f_tr, f_te = featurize(x_tr).float(), featurize(x_te).float()
        mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
        f_tr, f_te = (f_tr - mu) / sd, (f_te - mu) / sd
    n_cls = int(max(y_tr.max(), y_te.max())) + 1
    lin = nn.Linear(f_tr.shape[1], n_cls)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(f_tr), y_tr) + wd * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (lin(f_te).argmax(1) == y_te).float().mean().item()
