"""Fit the K-Means codebook on the dumped features (faiss; every GPU when there are any).

Reads ``<root>/features/fit.rank*-of-*.npy``, fits K centroids (K from the model config or
``--codebook_size``), writes ``<root>/kmeans/codebook.safetensors`` (``centroids [K, d]``), and
reports how the held-out features use the codes: used codes, perplexity, mean squared distance.
One process: faiss parallelises over the GPUs itself.

    python -m training.kmeans --config training/fmnist.yaml [--niter=20]
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # run as a file, training/ would shadow the standard library
    raise SystemExit("run the stages as modules from the repository root: python -m training.kmeans --help")

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from digit_core.codebook import Codebook, fit_kmeans, usage_stats
from training.config import RunConfig, parse_config
from training.data import model_config
from training.files import atomic_save
from training.layout import LAYOUT
from training.trainer import Trainer


@dataclass
class KMeansConfig(RunConfig):
    stage: ClassVar[str] = "kmeans"
    features: str = ""             # default <root>/features
    niter: int = 20                # as the official fit
    max_points_per_centroid: int = 256   # faiss's default sample, as the official fit


def read_shards(folder: Path, name: str) -> np.ndarray:
    paths = sorted(folder.glob(f"{name}.rank*-of-*.npy"))
    worlds = {p.name.rsplit("-of-", 1)[1] for p in paths}
    if not paths:
        raise FileNotFoundError(f"no {name}.rank*-of-*.npy in {folder}: run the features stage first")
    if len(worlds) != 1 or len(paths) != int(next(iter(worlds)).split(".")[0]):
        raise ValueError(f"{folder}: incomplete or mixed feature shards {[p.name for p in paths]}")
    return np.concatenate([np.load(p, mmap_mode="r") for p in paths]).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(KMeansConfig, argv)
    tr = Trainer(cfg)
    K = model_config(cfg, []).codebook.size
    folder = cfg.input(cfg.features, LAYOUT.features)
    fit = read_shards(folder, "fit")
    tr.info(f"fitting K={K} on {fit.shape[0]} features of dim {fit.shape[1]} "
            f"(faiss samples at most {cfg.max_points_per_centroid * K})")
    centroids = fit_kmeans(fit, K, niter=cfg.niter, seed=cfg.seed, max_points_per_centroid=cfg.max_points_per_centroid,
                           verbose=tr.d.main)
    book = Codebook(centroids)
    path = tr.run_dir / LAYOUT.codebook.file
    atomic_save({"centroids": book.centroids}, path)
    for name, x in (("fit", fit[: 200_000]), ("heldout", read_shards(folder, "heldout"))):
        ids, dist = book.assign(torch.from_numpy(x))
        s = usage_stats(ids.numpy(), K)
        tr.record(**{f"{name}_used": s["used"], f"{name}_perplexity": s["perplexity"],
                     f"{name}_mean_sq_dist": float(dist.mean())})
        tr.info(f"{name}: {s['used']}/{K} codes used, perplexity {s['perplexity']:.1f}, "
                f"mean squared distance {float(dist.mean()):.4g}")
    tr.info(f"wrote {path}")
    tr.finish()


if __name__ == "__main__":
    main()
