"""Dump the frozen encoder's patch features of a sample of the training images, for K-Means.

As the official fit: the feature block's output (with the final LayerNorm when the config
says so) for every patch of ``fraction`` (10%) of the training images, centre-cropped. A second,
disjoint sample (``heldout_fraction``) is dumped for the codebook's usage report. Each rank
writes its own shard, ``<root>/features/{fit,heldout}.rank<r>-of-<w>.npy``; the kmeans stage
reads them all. A finished shard is skipped when the stage is rerun, unless its record
(``<shard>.json``: data, encoder, sample settings) differs from this run's: then it is rebuilt.

    python -m training.features --config training/fmnist.yaml [--fraction=0.1]
    torchrun --nproc_per_node=8 -m training.features --config ... --model=imagenet-base
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # run as a file, training/ would shadow the standard library
    raise SystemExit("run the stages as modules from the repository root: python -m training.features --help")

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from digit_core.pipeline import to_channels
from training.config import RunConfig, parse_config
from training.data import load_data
from training.files import as_json, atomic_path, data_identity, differences, file_digest
from training.layout import LAYOUT
from training.tokens import load_encoder
from training.trainer import Trainer


@dataclass
class FeaturesConfig(RunConfig):
    stage: ClassVar[str] = "features"
    encoder: str = ""              # default <root>/ssl/encoder.safetensors
    fraction: float = 0.1          # of the training images, for the fit
    heldout_fraction: float = 0.01
    patches_per_image: int = 0     # 0 = all; fewer bounds the dump at ImageNet scale
    dtype: str = "float16"         # float16 halves the dump; K-Means runs in float32 either way


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(FeaturesConfig, argv)
    tr = Trainer(cfg)
    data, mcfg = load_data(cfg, cfg.data, train=False)
    encoder_path = cfg.input(cfg.encoder, LAYOUT.encoder.path)
    encoder = load_encoder(mcfg, encoder_path).to(tr.device)
    order = np.random.default_rng(cfg.seed).permutation(len(data))
    n_fit = max(1, math.ceil(cfg.fraction * len(data)))
    n_held = max(1, math.ceil(cfg.heldout_fraction * len(data)))
    samples = {"fit": order[:n_fit], "heldout": order[n_fit: n_fit + n_held]}
    patch_rng = torch.Generator().manual_seed(cfg.seed + tr.d.rank)
    # What a shard is made from; a shard whose record differs (other data, encoder or sample) is rebuilt.
    key = as_json({"data": data_identity(data), "encoder": file_digest(encoder_path),
                   "encoder_config": dataclasses.asdict(mcfg.encoder), "seed": cfg.seed, "fraction": cfg.fraction,
                   "heldout_fraction": cfg.heldout_fraction, "patches_per_image": cfg.patches_per_image,
                   "dtype": cfg.dtype})
    for name, idx in samples.items():
        path = tr.run_dir / f"{name}.rank{tr.d.rank}-of-{tr.d.world}.npy"
        record = path.with_suffix(".json")
        if path.exists():
            old = json.loads(record.read_text()) if record.is_file() else None
            if old == key:
                tr.info(f"{path} exists, skipping")
                continue
            tr.info(f"{path} was made from other data, encoder or settings "
                    f"({'; '.join(differences(old, key)) if old else 'it records none'}): rebuilding it")
            record.unlink(missing_ok=True)
        idx = idx[tr.d.rank:: tr.d.world]
        loader = DataLoader(Subset(data, idx.tolist()), cfg.batch_size, num_workers=cfg.workers)
        n = mcfg.disc_grid ** 2
        per = cfg.patches_per_image or n
        with atomic_path(path) as tmp:   # a kill mid-dump leaves no shard that looks finished
            out = np.lib.format.open_memmap(tmp, "w+", np.dtype(cfg.dtype), (len(idx) * per, mcfg.encoder.width))
            row = 0
            for x, _ in tqdm(loader, desc=f"features {name}", disable=not tr.d.main, dynamic_ncols=True):
                f = encoder.features(to_channels(x.to(tr.device), mcfg.encoder.in_chans)).flatten(1, 2)   # [B, n, d]
                if per < n:
                    keep = torch.rand(f.shape[:2], generator=patch_rng).argsort(1)[:, :per].to(f.device)
                    f = f.gather(1, keep[..., None].expand(-1, -1, f.shape[-1]))
                f = f.reshape(-1, f.shape[-1]).float().cpu().numpy()
                out[row: row + len(f)] = f
                row += len(f)
            out.flush()
            del out
        record.write_text(json.dumps(key, indent=2))
        tr.info(f"wrote {path}: {len(idx)} images x {per} patches")
    skipped = getattr(data, "skipped", 0)
    if skipped:
        tr.info(f"skipped {skipped} unreadable images")
    tr.finish()


if __name__ == "__main__":
    main()
