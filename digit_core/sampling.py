"""Sampling: temperature, top-k, top-p and classifier-free guidance, in numpy.

Sampling lives outside the networks (and outside the ONNX graphs) so the PyTorch pipeline and
the onnxruntime runtime draw tokens with the very same code: given equal logits they pick
equal tokens. Every row of a batch has its own generator seeded by ``(seed, row)``, so sample
``i`` does not depend on how many other samples are drawn beside it.

The checks below are the one place numeric settings are validated (the flows call them before
any work): a value sent as raw JSON can be NaN, infinite, a bool or a huge integer, and each is
refused with the parameter's name and its allowed range.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np

SEED_LIMIT = 2 ** 63
"""Seeds are in ``[0, 2**63)``: they fit a signed 64-bit integer wherever they are stored (JSON, numpy)."""
MAX_CFG_SCALE = 100.0
"""Guidance scales above this only push the guided logits towards float overflow (inf - inf = NaN)."""


def check_number(name: str, value: object, ok: Callable[[float], bool], allowed: str,
                 integer: bool = False) -> float | int:
    """``value`` as a float (an int when ``integer``; integral floats such as 3.0 count) if it is
    a finite real number for which ``ok`` holds; else a ValueError saying ``{name} must be
    {allowed}, got {value!r}``."""
    bad = ValueError(f"{name} must be {allowed}, got {value!r}")
    if not isinstance(value, numbers.Real) or isinstance(value, bool):   # np.bool_ is not a Real
        raise bad
    if isinstance(value, numbers.Integral):
        v: float | int = int(value)
    else:
        f = float(value)
        if not math.isfinite(f):
            raise bad
        v = int(f) if integer and f.is_integer() else f
    if integer and not isinstance(v, int) or not ok(v):
        raise bad
    return v


def check_temperature(value: object, name: str = "temperature") -> float:
    return float(check_number(name, value, lambda v: v >= 0, "a finite number >= 0 (0 = greedy)"))


def check_top_k(value: object, name: str = "top_k") -> int:
    return int(check_number(name, value, lambda v: v >= 0, "an integer >= 0 (0 = off)", integer=True))


def check_top_p(value: object, name: str = "top_p") -> float:
    return float(check_number(name, value, lambda v: 0 < v <= 1, "a finite number in (0, 1] (1 = off)"))


def check_cfg_scale(value: object, name: str = "cfg_scale") -> float:
    return float(check_number(name, value, lambda v: 0 <= v <= MAX_CFG_SCALE,
                              f"a finite number in [0, {MAX_CFG_SCALE:g}] (1 = off)"))


def check_positive_int(value: object, name: str = "n") -> int:
    return int(check_number(name, value, lambda v: v >= 1, "a positive integer", integer=True))


def check_seed(value: object) -> int:
    return int(check_number("seed", value, lambda v: 0 <= v < SEED_LIMIT, "an integer in [0, 2**63)", integer=True))


@dataclass(frozen=True)
class Sampler:
    """How to turn one step's logits into tokens; ``top_k`` 0 and ``top_p`` 1 are off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        check_top_k(self.top_k)
        check_top_p(self.top_p)

    def __call__(self, logits: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
        """Draw one token per row of ``logits [B, V]``; temperature 0 is greedy."""
        if logits.ndim != 2 or logits.shape[0] != len(rngs):
            raise ValueError(f"expected logits [B, V] with B={len(rngs)}, got {logits.shape}")
        if self.temperature == 0:
            return logits.argmax(-1)
        # Relative to the row maximum before dividing: the largest scaled logit is 0 however small
        # the temperature, so the others can only fall to -inf (probability 0), never give NaN.
        x = logits.astype(np.float64)
        with np.errstate(over="ignore"):
            x = (x - x.max(-1, keepdims=True)) / self.temperature
        probs = softmax(filter_logits(x, self.top_k, self.top_p))
        u = np.array([r.random() for r in rngs])
        cdf = np.cumsum(probs, axis=-1)
        # Inverse-CDF draw; clip guards the last bin against cumsum rounding below 1.
        ids = (cdf < (u * cdf[:, -1])[:, None]).sum(-1)
        return np.minimum(ids, logits.shape[1] - 1)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def filter_logits(logits: np.ndarray, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """Set to -inf every logit outside the top-k set and outside the top-p nucleus (``top_k``
    0 or None and ``top_p`` 1 or None are off).

    top-k keeps exactly ``k`` tokens (ties broken towards the lower id); top-p keeps the
    smallest set of most likely tokens whose probability reaches ``p`` (at least one).
    """
    out = logits.copy()
    order = np.argsort(-logits, axis=-1, kind="stable")   # descending, lower id first on ties
    rows = np.arange(logits.shape[0])[:, None]
    if top_k and top_k < logits.shape[-1]:
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
    scale = check_number("cfg_scale", scale, lambda v: True, "a finite number")
    return uncond + scale * (cond - uncond)


def row_generators(seed: int, batch: int) -> list[np.random.Generator]:
    seed = check_seed(seed)
    return [np.random.default_rng([seed, i]) for i in range(batch)]
