"""What the stages hand each other: trained parts loaded strictly, and token caches keyed by what produced them."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from digit_core import layout
from digit_core.config import DiGITConfig
from digit_core.pipeline import to_channels
from training.data import load_data
from training.dist import barrier
from training.files import (
    as_json,
    atomic_save,
    data_identity,
    differences,
    file_digest,
    load_strict,
    load_tensors,
    read_meta,
    require,
)
from training.trainer import Trainer


# -- trained parts and token caches (the stages hand these to each other) -----------------------------
def load_encoder(cfg: DiGITConfig, path: str | Path) -> nn.Module:
    """Our Encoder with the weights the ssl stage wrote (frozen, eval)."""
    from digit_core.encoders import Encoder
    enc = Encoder(cfg.encoder)
    load_strict(enc, load_tensors(require(Path(path), "ssl"))[0], path)
    return enc.eval().requires_grad_(False)


def load_codebook(path: str | Path) -> nn.Module:
    from digit_core.codebook import Codebook
    return Codebook.load(require(Path(path), "kmeans"))


def load_vqgan(cfg: DiGITConfig, path: str | Path) -> nn.Module:
    from digit_core.vqgan import VQGAN
    vq = VQGAN(cfg.vqgan)
    load_strict(vq, load_tensors(require(Path(path), "vqgan"))[0], path)
    return vq.eval().requires_grad_(False)


class TokenDataset(Dataset):
    """Rows of equal-length tensors (a token cache); keys may carry a sampler seed, ignored."""

    def __init__(self, tensors: dict[str, torch.Tensor], keys: tuple[str, ...]) -> None:
        self.tensors = [tensors[k] for k in keys]

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, key: int | tuple[int, int]) -> list[torch.Tensor]:
        i = key[0] if isinstance(key, tuple) else key
        return [t[i].long() for t in self.tensors]


@dataclass
class Tokenizer:
    """A frozen tokenizer: ``fn(images [B, C, H, W] in [0, 1]) -> ids [B, ...]`` and what
    identifies it (its files' sha256 and its config), which keys the token caches."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    identity: dict[str, Any]


@torch.no_grad()
def token_cache(tr: Trainer, dataset: Dataset, name: str, tokenizers: dict[str, Tokenizer], flip: bool) -> dict[str, torch.Tensor]:
    """Tokenize ``dataset`` once (and its mirror images when ``flip``) into ``<run>/<name>.safetensors``.

    Each rank tokenizes a strided shard and writes it; rank 0 merges. Rows: ``label`` plus one
    per key of ``tokenizers``. Runs in fp32, as the exported tokenizer does, so the training
    tokens are the app's tokens. The cache (and each shard) records its key - the data's
    identity, the tokenizers' and ``flip`` - and is rebuilt when this run's key differs.
    """
    key = as_json({"data": data_identity(dataset), "tokenizers": {k: t.identity for k, t in tokenizers.items()},
                   "flip": flip})
    path = tr.run_dir / f"{name}.safetensors"
    if path.exists():
        old = read_meta(path).get("key")
        if old == key:
            return load_tensors(path)[0]
        tr.info(f"{path} was made from other data or tokenizers "
                f"({'; '.join(differences(old, key)) if old else 'it records none'}): rebuilding it")
    r, w = tr.d.rank, tr.d.world
    shard = tr.run_dir / f"{name}.rank{r}-of-{w}.safetensors"
    if not shard.exists() or read_meta(shard).get("key") != key:
        loader = DataLoader(torch.utils.data.Subset(dataset, range(r, len(dataset), w)), tr.cfg.batch_size,
                            num_workers=tr.cfg.workers)
        out: dict[str, list[torch.Tensor]] = {k: [] for k in ("label", *tokenizers)}
        for x, y in tqdm(loader, desc=f"tokenize {name}", disable=not tr.d.main, dynamic_ncols=True):
            x = x.to(tr.device)
            for v in ((x, x.flip(-1)) if flip else (x,)):
                out["label"].append(y)
                for k, t in tokenizers.items():
                    ids = t.fn(v).flatten(1).cpu()
                    out[k].append(ids.to(torch.int16 if ids.max() < 2 ** 15 else torch.int32))
        atomic_save({k: torch.cat(v) for k, v in out.items()}, shard, {"key": key})
    barrier()
    if tr.d.main:
        parts = [tr.run_dir / f"{name}.rank{i}-of-{w}.safetensors" for i in range(w)]
        loaded = [load_tensors(p)[0] for p in parts]
        atomic_save({k: torch.cat([t[k] for t in loaded]) for k in loaded[0]}, path, {"key": key})
        for p in parts:
            p.unlink()
        skipped = getattr(dataset, "skipped", 0)
        tr.info(f"tokenized {len(dataset)} images{' and their mirror images' if flip else ''} into {path}"
                + (f"; skipped {skipped} unreadable files" if skipped else ""))
    barrier()
    return load_tensors(path)[0]


def disc_tokenizer(tr: Trainer, mcfg: DiGITConfig, encoder_path: str | Path, codebook_path: str | Path) -> Tokenizer:
    """The frozen encoder + codebook's cluster ids; records both files in the run's provenance."""
    encoder = load_encoder(mcfg, encoder_path).to(tr.device)
    codebook = load_codebook(codebook_path).to(tr.device)
    files = {"encoder": file_digest(encoder_path), "codebook": file_digest(codebook_path)}
    tr.depends(**files)
    return Tokenizer(lambda x: codebook.assign(encoder.features(to_channels(x, mcfg.encoder.in_chans)))[0],
                     files | {"encoder_config": dataclasses.asdict(mcfg.encoder)})


def vq_tokenizer(tr: Trainer, mcfg: DiGITConfig, path: str | Path) -> Tokenizer:
    """The frozen VQGAN encoder's ids; records its file in the run's provenance."""
    vqgan = load_vqgan(mcfg, path).to(tr.device)
    files = {"vqgan": file_digest(path)}
    tr.depends(**files)
    return Tokenizer(lambda x: vqgan.encode(to_channels(x, mcfg.vqgan.in_channels)),
                     files | {"vqgan_config": dataclasses.asdict(mcfg.vqgan)})


def token_datasets(tr: Trainer, cfg: Any, data: Dataset, tokenizers: dict[str, Tokenizer],
                   keys: tuple[str, ...]) -> tuple[TokenDataset, TokenDataset | None]:
    """The training token cache (mirrors included when ``cfg.flip``) and, when ``cfg.val_data``
    names a split, the held-out one."""
    train = TokenDataset(token_cache(tr, data, "tokens", tokenizers, cfg.flip), keys)
    if not cfg.val_data:
        return train, None
    val = load_data(cfg, cfg.val_data, train=False)[0]
    return train, TokenDataset(token_cache(tr, val, "val_tokens", tokenizers, False), keys)


def code_loss(logits: torch.Tensor, targets: torch.Tensor, g: Any, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the code slice ``[out_offset, out_offset + num_out)`` of the logits."""
    z = logits[..., layout.code_slice(g)].float()
    return torch.nn.functional.cross_entropy(z.flatten(0, -2), targets.flatten(), label_smoothing=smoothing)
