"""Token stability under pixel noise (the paper's Table 1), in numpy only.

    noisy = add_noise(images, snr_db=20, rng=np.random.default_rng(0))
    rate = token_change_rate(model.tokenize(images)[0], model.tokenize(noisy)[0])
    table = stability(model, images)              # the whole of Table 1 for a batch of uint8 images

The noise follows the paper: Gaussian, with its variance set per image from the image's mean
pixel power on the [0, 1] scale, ``SNR_dB = 10 log10(P_signal / P_noise)``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from .flows import Flows

SNR_LEVELS_DB = (30.0, 25.0, 20.0, 15.0, 10.0, 5.0, 1.0, 0.01)
"""The SNRs of the paper's Table 1."""

PAPER_TABLE1 = {
    "vq_change": (0.187, 0.317, 0.487, 0.663, 0.805, 0.901, 0.948, 0.956),
    "disc_change": (0.114, 0.178, 0.260, 0.355, 0.457, 0.570, 0.687, 0.721),
    "vq_cos_sim": (0.972, 0.949, 0.910, 0.853, 0.777, 0.682, 0.594, 0.571),
    "disc_cos_sim": (0.975, 0.960, 0.940, 0.916, 0.888, 0.855, 0.816, 0.803),
}
"""Table 1 of the paper (ImageNet, VQGAN vs DINOv2 tokens), one value per ``SNR_LEVELS_DB``."""


def noise_std(images: np.ndarray, snr_db: float) -> np.ndarray:
    """Per-image noise standard deviation ``[N]`` for float images ``[N, ...]`` in [0, 1]."""
    x = np.asarray(images, dtype=np.float64)
    power = (x.reshape(len(x), -1) ** 2).mean(1)
    return np.sqrt(power / 10.0 ** (float(snr_db) / 10.0))


def add_noise(images: np.ndarray, snr_db: float, rng: np.random.Generator, clip: bool = True) -> np.ndarray:
    """Gaussian noise at ``snr_db`` on a batch ``[N, ...]`` of images.

    uint8 images (0..255) are scaled to [0, 1] for the power, and come back as uint8 (clipped
    and rounded, so they can be tokenized). Float images must be in [0, 1] and come back as
    float64, clipped to [0, 1] unless ``clip=False`` (then the added noise has exactly the
    requested power in expectation).
    """
    images = np.asarray(images)
    if images.ndim < 2 or len(images) == 0:
        raise ValueError(f"add_noise takes a non-empty batch [N, ...], got shape {images.shape}")
    if not np.isfinite(snr_db):
        raise ValueError(f"snr_db must be a finite number, got {snr_db}")
    is_u8 = images.dtype == np.uint8
    x = images.astype(np.float64) / 255.0 if is_u8 else images.astype(np.float64)
    std = noise_std(x, snr_db).reshape((-1,) + (1,) * (x.ndim - 1))
    y = x + rng.standard_normal(x.shape) * std
    if is_u8:
        return np.clip(np.round(y * 255.0), 0, 255).astype(np.uint8)
    return np.clip(y, 0.0, 1.0) if clip else y


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """Measured per-image SNR in dB of ``noisy`` against ``clean`` (both on the same scale)."""
    a = np.asarray(clean, dtype=np.float64).reshape(len(clean), -1)
    d = np.asarray(noisy, dtype=np.float64).reshape(len(noisy), -1) - a
    return 10.0 * np.log10((a ** 2).mean(1) / np.maximum((d ** 2).mean(1), 1e-300))


def token_change_rate(before: np.ndarray, after: np.ndarray, per_image: bool = False) -> float | np.ndarray:
    """Fraction of token positions whose id differs: one number, or ``[N]`` with ``per_image``."""
    a, b = np.asarray(before), np.asarray(after)
    if a.shape != b.shape:
        raise ValueError(f"token grids differ in shape: {a.shape} vs {b.shape}")
    changed = (a != b).reshape(len(a), -1) if a.ndim > 1 else (a != b)[None]
    return changed.mean(1) if per_image else float(changed.mean())


def cosine_similarity(a: np.ndarray, b: np.ndarray, per_position: bool = False, eps: float = 1e-12) -> float | np.ndarray:
    """Cosine similarity of feature vectors along the last axis, averaged over all positions
    (or returned per position with ``per_position``)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"features differ in shape: {a.shape} vs {b.shape}")
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), eps)
    return cos if per_position else float(cos.mean())


def as_seen(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` as a model with ``channels`` sees them: a grey model gets one grey
    channel (its mean of R, G and B), so noise added afterwards has the SNR asked for; noise
    drawn independently per channel would be averaged down to a third of its power (+4.8 dB)."""
    return np.round(images.mean(-1, keepdims=True)).astype(np.uint8) if channels == 1 else images


Encode = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""``f(uint8 images [N, H, W, C]) -> (token ids [N, ...], continuous features [N, ..., d])``."""


def disc_encode(flows: Flows) -> Encode:
    """``flows``'s discriminative tokenizer as an ``Encode``: ``(cluster ids, encoder features)``."""
    def encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, _, feats = flows.tokenize(x)
        return ids, feats
    return encode


def token_stability(encode: Encode, images: np.ndarray, channels: int, snr_levels: tuple[float, ...] = SNR_LEVELS_DB,
                    seed: int = 0, batch: int = 256, clip: bool = True) -> dict[str, list[float]]:
    """One tokenizer's row of Table 1 on uint8 ``images [N, H, W, 3]``: at each SNR the share of
    token positions that change under noise (``change``) and the cosine similarity of the
    features, clean vs noisy (``cos_sim``).

    Each level draws its noise from its own generator ``(seed, level index)`` image after image,
    so two tokenizers measured with one seed see exactly the same noisy images, and the figures
    do not depend on ``batch`` (which only bounds memory). A grey model (``channels == 1``) gets
    its images as the grey it sees, and the noise on that one channel.

    ``snr_measured`` is the mean SNR of the images the tokenizer saw: clipping to [0, 1] (and
    rounding to uint8) removes part of the noise, so it is above the level asked for at low SNR.
    ``clip=False`` hands ``encode`` float64 images in [0, 1] plus unclipped noise instead of
    uint8 (an ``encode`` that takes floats: the noise then has exactly the power asked for).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"stability takes a non-empty uint8 batch [N, H, W, 3], got {images.dtype} {images.shape}")
    rngs = [np.random.default_rng([seed, j]) for j in range(len(snr_levels))]
    change, cos, measured = (np.zeros(len(snr_levels)) for _ in range(3))
    for i in range(0, len(images), batch):
        clean = as_seen(images[i:i + batch], channels)
        clean = clean if clip else clean / 255.0
        ids, feats = encode(clean)
        for j, snr in enumerate(snr_levels):
            noisy = add_noise(clean, snr, rngs[j], clip=False) if not clip else add_noise(clean, snr, rngs[j])
            nids, nfeats = encode(noisy)
            # sums of per-image means: every image has as many positions, so /N is the overall mean
            change[j] += token_change_rate(ids, nids, per_image=True).sum()
            c = cosine_similarity(feats, nfeats, per_position=True)
            cos[j] += c.reshape(len(c), -1).mean(1).sum()
            measured[j] += snr_db(clean.astype(np.float64), noisy.astype(np.float64)).sum()
    n = len(images)
    return {"change": (change / n).tolist(), "cos_sim": (cos / n).tolist(), "snr_measured": (measured / n).tolist()}


def stability(flows: Flows, images: np.ndarray, snr_levels: tuple[float, ...] = SNR_LEVELS_DB, seed: int = 0,
              batch: int = 256) -> dict[str, list[float] | int]:
    """The paper's Table 1 on uint8 ``images [N, H, W, 3]``: ``token_stability`` of the
    discriminative tokens (encoder features) and of the VQ tokens (VQ encoder latents before
    quantisation), on the same noisy images. A VQ-token model has no discriminative side (None)."""
    c = flows.config.channels
    v = token_stability(flows.vq_encode, images, c, snr_levels, seed, batch)
    d = None if flows.config.is_vq else token_stability(disc_encode(flows), images, c, snr_levels, seed, batch)
    return {"snr_db": [float(s) for s in snr_levels], "disc_change": d and d["change"], "vq_change": v["change"],
            "disc_cos_sim": d and d["cos_sim"], "vq_cos_sim": v["cos_sim"], "num_images": len(images)}


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95, method: str = "percentile") -> tuple[float, float, float]:
    """``(estimate, low, high)``: ``statistic(indices)`` on all ``n`` items, and its bootstrap
    interval over ``n_boot`` resamples of the ``n`` indices with replacement.

    ``statistic`` takes an index array so that paired data (samples and their labels, two
    feature sets) are resampled together, e.g. ``lambda i: (pred[i] == label[i]).mean()``.
    ``method="percentile"`` is the resamples' quantiles (right for means); ``"normal"`` is the
    estimate +- z * the resamples' standard deviation, for statistics that resampling biases: a
    resample's Fréchet distance is larger (duplicates shrink its spread), so the percentile
    interval can miss the estimate altogether, while the spread is still the rerun-to-rerun one.
    """
    if method not in ("percentile", "normal"):
        raise ValueError(f"method must be 'percentile' or 'normal', got {method!r}")
    if n < 2:
        raise ValueError(f"bootstrap needs at least 2 items, got {n}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    boots = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_boot)])
    alpha = (1 - level) / 2
    est = float(statistic(np.arange(n)))
    if method == "normal":
        from statistics import NormalDist
        half = NormalDist().inv_cdf(1 - alpha) * float(boots.std(ddof=1))
        return est, est - half, est + half
    low, high = np.quantile(boots, [alpha, 1 - alpha])
    return est, float(low), float(high)
