"""Sampling: temperature, top-k, top-p and classifier-free guidance, in numpy.

Sampling lives outside the networks (and outside the ONNX graphs) so the PyTorch pipeline and
the onnxruntime runtime draw tokens with the very same code: given equal logits they pick
equal tokens. Every row of a batch has its own generator seeded by ``(seed, row)``, so sample
``i`` does not depend on how many other samples are drawn beside it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampler:
    """How to turn one step's logits into tokens."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    def __call__(self, logits: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
        """Draw one token per row of ``logits [B, V]``; temperature 0 is greedy."""
        if logits.ndim != 2 or logits.shape[0] != len(rngs):
            raise ValueError(f"expected logits [B, V] with B={len(rngs)}, got {logits.shape}")
        if self.temperature == 0:
            return logits.argmax(-1)
        probs = softmax(filter_logits(logits.astype(np.float64) / self.temperature, self.top_k, self.top_p))
        u = np.array([r.random() for r in rngs])
        cdf = np.cumsum(probs, axis=-1)
        # Inverse-CDF draw; clip guards the last bin against cumsum rounding below 1.
        ids = (cdf < (u * cdf[:, -1])[:, None]).sum(-1)
        return np.minimum(ids, logits.shape[1] - 1)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def filter_logits(logits: np.ndarray, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """Set to -inf every logit outside the top-k set and outside the top-p nucleus.

    top-k keeps exactly ``k`` tokens (ties broken towards the lower id); top-p keeps the
    smallest set of most likely tokens whose probability reaches ``p`` (at least one).
    """
    out = logits.copy()
    order = np.argsort(-logits, axis=-1, kind="stable")   # descending, lower id first on ties
    rows = np.arange(logits.shape[0])[:, None]
    if top_k is not None and top_k < logits.shape[-1]:
        out[rows, order[:, top_k:]] = -np.inf
    if top_p is not None and top_p < 1.0:
        sorted_p = softmax(out[rows, order])
        before = np.cumsum(sorted_p, axis=-1) - sorted_p   # mass strictly above each token
        drop = before >= top_p
        drop[:, 0] = False
        out[rows, order] = np.where(drop, -np.inf, out[rows, order])
    return out


def guide(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``; scale 1 is plain conditional."""
    return uncond + scale * (cond - uncond)


def row_generators(seed: int, batch: int) -> list[np.random.Generator]:
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return [np.random.default_rng([int(seed), i]) for i in range(batch)]
