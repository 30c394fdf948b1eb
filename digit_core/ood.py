"""The out-of-distribution notice: how far an image's patches lie from the codebook, beside the
training images' distances that ``training.assets`` writes to ``distances.json``. No torch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from . import demo

DISTANCES_FILE = "distances.json"   # in the cluster folder: training.assets' reference distances
MAX_DISTANCES_BYTES = 64 * 1024


def image_distances(dists: np.ndarray) -> np.ndarray:
    """The tokenizer's squared distances ``[N, n, n]`` -> each image's mean ``[N]`` (float64): the
    statistic of both the training reference and the notice."""
    return np.asarray(dists, np.float64).reshape(len(dists), -1).mean(1)


@dataclass(frozen=True)
class DistanceReference:
    """Percentiles of the training images' mean squared distance to their nearest centroids."""

    percentiles: dict[str, float]      # "50", "90", "95", "99", "99.9" -> value, ascending
    max: float
    images: int
    split: str
    tokenizer_sha256: str | None
    source: str

    @property
    def p99(self) -> float:
        return self.percentiles["99"]

    @classmethod
    def parse(cls, d: Any, source: str) -> DistanceReference:
        if not isinstance(d, dict) or not isinstance(d.get("percentiles"), dict):
            raise ValueError("no 'percentiles' object")
        pct = {str(k): float(v) for k, v in d["percentiles"].items()}
        values = [pct[k] for k in sorted(pct, key=float)]
        if "99" not in pct or not all(math.isfinite(v) and v >= 0 for v in values) or values != sorted(values):
            raise ValueError("percentiles must include '99' and be finite, non-negative and ascending")
        images, top = int(d["images"]), float(d.get("max", values[-1]))
        if images < 1 or not math.isfinite(top):
            raise ValueError("'images' must be positive and 'max' finite")
        sha = d.get("tokenizer_sha256")
        return cls({k: pct[k] for k in sorted(pct, key=float)}, top, images, str(d.get("split", "train")),
                   sha if isinstance(sha, str) else None, source)


def tokenizer_sha256(flows: Any) -> str | None:
    """The sha256 its manifest lists for a bundle's tokenizer graph (None for other flows)."""
    m = getattr(flows, "manifest", None)
    try:
        return m["files"][m["graphs"]["tokenizer"]]["sha256"]
    except (TypeError, KeyError):
        return None


def distance_check(model: demo.Model, image: np.ndarray, dists: np.ndarray | None = None) -> dict[str, Any] | None:
    """An image's mean squared distance to its nearest centroids beside the training images'
    (``dists``: the tokenizer's, if already computed), or None when the model has no reference."""
    ref = None if model.config.is_vq else model.distance_reference()   # a VQ-token model has no centroids
    if ref is None:
        return None
    if dists is None:
        dists = model.flows.tokenize(image[None])[1]
    score = float(image_distances(np.asarray(dists).reshape(1, -1))[0])
    above = [k for k, v in ref.percentiles.items() if score > v]
    return {"mean_sq_distance": score, "p99": ref.p99, "beyond_p99": score > ref.p99,
            "above_percentile": above[-1] if above else None, "beyond_max": score > ref.max,
            "reference_images": ref.images, "reference_split": ref.split}


def distance_notice(check: dict[str, Any] | None) -> str:
    """The out-of-distribution notice for ``distance_check``'s answer ("" when there is nothing to say)."""
    if not check or not check["beyond_p99"]:
        return ""
    q = check["above_percentile"]
    extra = ("; farther than every one of them" if check["beyond_max"] else
             f"; beyond their {q}th percentile too" if q not in (None, "99") else "")
    return (f"⚠️ **Out of distribution:** this image's mean squared distance to its nearest centroids, "
            f"{check['mean_sq_distance']:.4g}, is beyond the **99th percentile** of {check['reference_images']:,} "
            f"{check['reference_split']} images ({check['p99']:.4g}){extra}. Its patches are far from every "
            "cluster the model knows: read its tokens, and what the model makes of them, with care.")
