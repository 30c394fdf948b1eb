"""K-Means codebook over encoder features: the discriminative tokenizer.

``fit_kmeans`` fits the centroids with faiss (as the official release did); ``Codebook`` holds
them and maps features to their nearest centroid by squared Euclidean distance,
``||x||^2 - 2 x.C + ||C||^2``, the formula the official code uses.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file


def tracing() -> bool:
    """True while exporting: value checks would be baked into the graph or break it."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def sq_distances(x: torch.Tensor, codes: torch.Tensor, codes_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Squared distances ``[M, K]`` of each row of ``x [M, d]`` to each row of ``codes [K, d]``:
    one matmul, ``||x||^2 - 2 x.C + ||C||^2``."""
    sq = codes.pow(2).sum(1) if codes_sq is None else codes_sq
    return x.pow(2).sum(1, keepdim=True) - 2 * x @ codes.t() + sq


def nearest(x: torch.Tensor, codes: torch.Tensor, codes_sq: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest row of ``codes [K, d]`` for each row of ``x [M, d]``: ``(ids [M], squared distance [M])``;
    ties go to the lowest index. Shared by the K-Means tokenizer and the VQGAN quantizer."""
    dist, ids = sq_distances(x, codes, codes_sq).min(1)
    return ids, dist.clamp_min(0.0)  # rounding can push exact matches below zero


def _tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))


def _check_features(x: np.ndarray, name: str = "features") -> np.ndarray:
    """Validate a 2-D float array of finite values; return it as contiguous float32."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [M, d], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain {int((~np.isfinite(x)).sum())} NaN/inf values")
    return x


def fit_kmeans(features: np.ndarray, k: int, *, niter: int = 20, seed: int = 0,
               max_points_per_centroid: int = 256, gpu: bool | None = None,
               verbose: bool = False) -> np.ndarray:
    """Fit ``k`` centroids to ``features [M, d]``; returns float32 ``[k, d]``.

    Defaults follow the official fit (faiss, 20 iterations, at most 256 sampled points per
    centroid). ``gpu=None`` uses a GPU when faiss sees one.
    """
    import faiss  # imported here: only fitting needs it, assignment is plain torch

    x = _check_features(features)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if x.shape[0] < k:
        raise ValueError(f"need at least k={k} points to fit {k} centroids, got {x.shape[0]}")
    if gpu is None:
        gpu = faiss.get_num_gpus() > 0
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, gpu=bool(gpu), verbose=verbose,
                      max_points_per_centroid=max_points_per_centroid)
    km.train(x)
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1]).copy()


class Codebook(nn.Module):
    """``K`` centroids of dimension ``d``; ``assign`` gives each feature its nearest one.

    Built from ``[K, d]`` centroids (``fit_kmeans`` output, the official ``km_8k.npy``; zeros
    when a state dict will fill it). Buffers: ``centroids [K, d]`` and ``centroid_sq [K]``
    (``||C||^2``, precomputed once).
    """

    def __init__(self, centroids: np.ndarray | torch.Tensor, chunk_rows: int = 8192):
        super().__init__()
        if centroids.ndim != 2:
            raise ValueError(f"centroids must be 2-D [K, d], got shape {tuple(centroids.shape)}")
        self.size, self.dim = centroids.shape
        # Rows per distance matmul: bounds the [rows, K] matrix (8192 x 8192 floats = 256 MB).
        self.chunk_rows = chunk_rows
        self.register_buffer("centroids", torch.zeros(self.size, self.dim))
        self.register_buffer("centroid_sq", torch.zeros(self.size))
        self.set_centroids(centroids)

    @torch.no_grad()
    def set_centroids(self, centroids: np.ndarray | torch.Tensor) -> "Codebook":
        """Copy ``[K, d]`` centroids in (e.g. a refit) and recompute ``centroid_sq``."""
        c = _tensor(centroids)
        if tuple(c.shape) != (self.size, self.dim):
            raise ValueError(f"centroids must be [{self.size}, {self.dim}], got {list(c.shape)}")
        if not c.is_floating_point() or not torch.isfinite(c).all():
            raise ValueError("centroids must be finite floating-point values")
        self.centroids.copy_(c.float())
        self.centroid_sq.copy_(self.centroids.pow(2).sum(1))
        return self

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_official(cls, centroids_dK: np.ndarray | torch.Tensor,
                      centroid_norm: np.ndarray | torch.Tensor | None = None, **kw) -> "Codebook":
        """From the official checkpoint's ``centroids`` ``[d, K]`` (stored transposed) and
        optional ``centroid_norm`` ``[1, K]``, which is checked against the centroids: a
        mismatch means the layout was misread."""
        c = _tensor(centroids_dK)
        if c.ndim != 2:
            raise ValueError(f"official centroids must be 2-D [d, K], got shape {list(c.shape)}")
        book = cls(c.t().contiguous(), **kw)
        if centroid_norm is not None:
            norm = _tensor(centroid_norm)
            if tuple(norm.shape) != (1, book.size):
                raise ValueError(f"centroid_norm must be [1, {book.size}], got {list(norm.shape)}")
            if not torch.allclose(norm[0].float(), book.centroid_sq, rtol=1e-3, atol=1e-3):
                raise ValueError("centroid_norm does not match the squared norms of centroids [d, K]; "
                                 "are the centroids transposed?")
        return book

    @classmethod
    def from_npy(cls, path: str | Path, **kw) -> "Codebook":
        """From a ``.npy`` file of ``[K, d]`` centroids (the official ``km_8k.npy`` layout)."""
        return cls(np.load(path), **kw)

    def save(self, path: str | Path) -> None:
        save_file({"centroids": self.centroids.contiguous()}, str(path))

    @classmethod
    def load(cls, path: str | Path, **kw) -> "Codebook":
        tensors = load_file(str(path))
        if "centroids" not in tensors:
            raise ValueError(f"{path}: no 'centroids' tensor (found {sorted(tensors)})")
        return cls(tensors["centroids"], **kw)

    # -- assignment ------------------------------------------------------------------------
    def assign(self, features: torch.Tensor, chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``features [..., d]`` -> ``(ids int64 [...], squared distance float32 [...])``.

        Rows go through in chunks of ``chunk_rows`` to bound memory; the chunking depends only
        on the shape, and below one chunk it is a single matmul, so a fixed-shape export sees
        no loop.
        """
        if not torch.is_tensor(features) or not features.is_floating_point():
            raise ValueError("features must be a floating-point torch.Tensor")
        if features.ndim < 1 or features.shape[-1] != self.dim:
            raise ValueError(f"features must be [..., {self.dim}], got {list(features.shape)}")
        lead = features.shape[:-1]
        x = features.reshape(-1, self.dim).to(self.centroids.dtype)
        if not tracing() and not torch.isfinite(x).all():
            raise ValueError("features contain NaN/inf values")
        step = chunk_rows or self.chunk_rows
        if x.shape[0] <= step:
            ids, dist = nearest(x, self.centroids, self.centroid_sq)
        else:
            parts = [nearest(x[i:i + step], self.centroids, self.centroid_sq) for i in range(0, x.shape[0], step)]
            ids, dist = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return ids.reshape(lead), dist.reshape(lead)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Token ids only."""
        return self.assign(features)[0]

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"


def usage_stats(ids: np.ndarray, k: int) -> dict:
    """How evenly ``ids`` use ``k`` codes: ``counts [k]``, ``used``, ``usage = used / k`` and
    ``perplexity = exp(entropy)`` (k when uniform, 1 when one code takes everything)."""
    ids = np.asarray(ids).ravel()
    if ids.size == 0:
        raise ValueError("ids is empty")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= k:
        raise ValueError(f"ids must lie in [0, {k}), got [{ids.min()}, {ids.max()}]")
    counts = np.bincount(ids, minlength=k)
    p = counts[counts > 0] / ids.size
    used = int((counts > 0).sum())
    return {"counts": counts, "used": used, "usage": used / k,
            "perplexity": float(math.exp(-(p * np.log(p)).sum()))}
