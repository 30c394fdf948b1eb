"""Choose the tokenizer on the validation split: a trained encoder vs its untrained control, at several K.

    python -m training.analyses.tokenizer_choice --encoder runs/fmnist/ssl/encoder.safetensors \\
        --vqgan exported/fmnist/vqgan.safetensors --fit fmnist:fit --val fmnist:val \\
        --ks 256,512,1024 --out weights/fmnist/codebook/choice.json

For each K, K-Means is fit on the patch features of ``n_fit`` images of ``fit`` (the same images
for every encoder), then each tokenizer is scored on ``val`` images only (the test split stays
for the final evaluation):

* bag-of-tokens linear probe (per-image histograms of token ids; trained on ``n_probe_train``
  ``fit`` images, scored on ``n_val`` ``val`` images) and the probe on mean-pooled features;
* Table 1's token change under noise (``digit_core.metrics.token_stability``, same seeded noise
  for every tokenizer), beside the VQGAN's own codes when ``--vqgan`` is given.

The control is the same architecture at a seeded random initialisation: a trained encoder must
beat it, since an untrained network already gives stable tokens (it smooths the noise away).
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # run as a file: the repository root is not on the path
    raise SystemExit("run the analyses as modules from the repository root: python -m training.analyses.tokenizer_choice --help")

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from digit_core.codebook import Codebook, fit_kmeans
from digit_core.config import DiGITConfig
from digit_core.data import build_dataset
from digit_core.encoders import Encoder
from digit_core.metrics import SNR_LEVELS_DB, Encode, token_stability
from digit_core.pipeline import DiscTokenizer, VQEncoder
from digit_core.vqgan import VQGAN
from training.analyses.common import batched
from training.analyses.stability import probe_and_usage
from training.data import as_uint8
from training.files import atomic_write_text, load_strict, load_tensors, require


def images(spec: str, cfg: DiGITConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images of ``spec`` (uint8 ``[n, H, W, 3]``, no augmentation) and their labels."""
    data = build_dataset(spec, cfg.image_size, cfg.channels, train=False)
    if n > len(data):
        raise ValueError(f"{spec}: {len(data)} images, fewer than the {n} asked")
    x = torch.stack([data[i][0] for i in range(n)])
    return as_uint8(x), np.array([data[i][1] for i in range(n)])


def encode_with(module: torch.nn.Module) -> Encode:
    """A tokenizer module (uint8 tensor in) as an ``Encode``: numpy ``(ids, features)``."""
    def encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            out = module(torch.from_numpy(np.ascontiguousarray(x)))
        return out[0].numpy(), out[-1].numpy()
    return encode


def kmeans_tokenizer(cfg: DiGITConfig, K: int, state: dict[str, torch.Tensor] | None, fit: np.ndarray, seed: int,
                     batch: int) -> DiscTokenizer:
    """The encoder of ``cfg`` with ``state`` (None: a seeded random initialisation, the control)
    and a K-Means(K) codebook fit on its features of ``fit``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        enc = Encoder(cfg.encoder)
    if state is not None:
        load_strict(enc, state, "the encoder state")
    enc.eval().requires_grad_(False)
    probe = DiscTokenizer(enc, Codebook(torch.zeros(1, cfg.encoder.width)))
    feats = np.concatenate(batched(lambda x: encode_with(probe)(x)[1], fit, batch))
    return DiscTokenizer(enc, Codebook(torch.from_numpy(fit_kmeans(feats.reshape(-1, feats.shape[-1]), K, seed=seed))))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.analyses.tokenizer_choice", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", required=True, help="an ssl artifact (encoder.safetensors)")
    ap.add_argument("--vqgan", default="", help="VQGAN weights: adds its codes to the stability table")
    ap.add_argument("--fit", default="fmnist:fit", help="images for K-Means and the probe's training set")
    ap.add_argument("--val", default="fmnist:val", help="the validation split every figure is measured on")
    ap.add_argument("--ks", default="256,512,1024", help="comma-separated K values")
    ap.add_argument("--n_fit", type=int, default=5500)
    ap.add_argument("--n_probe_train", type=int, default=10000)
    ap.add_argument("--n_val", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", required=True, help="JSON file to write")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    tensors, meta = load_tensors(require(Path(a.encoder), "ssl"))
    cfg = DiGITConfig.from_dict(meta["model"])
    ks = [int(k) for k in a.ks.split(",") if k]
    fit = images(a.fit, cfg, max(a.n_fit, a.n_probe_train))
    probe_train = (fit[0][: a.n_probe_train], fit[1][: a.n_probe_train])
    val = images(a.val, cfg, a.n_val)
    rows = []
    for K in ks:
        for label, state in (("trained", tensors), ("untrained control", None)):
            encode = encode_with(kmeans_tokenizer(cfg, K, state, fit[0][: a.n_fit], a.seed, a.batch))
            probe, usage = probe_and_usage(encode, K, probe_train, val, a.batch)
            stab = token_stability(encode, val[0], cfg.channels, SNR_LEVELS_DB, a.seed, a.batch)
            rows.append({"K": K, "encoder": label, "probe_tokens": probe["tokens"], "probe_features": probe["features"],
                         "change": stab["change"], "cos_sim": stab["cos_sim"], "usage": usage})
            print(f"K={K} {label}: bag-of-tokens {probe['tokens']:.4f}, features {probe['features']:.4f}, "
                  f"change at 10 dB {stab['change'][SNR_LEVELS_DB.index(10.0)]:.3f}", flush=True)
    out: dict = {"encoder": a.encoder, "source": meta.get("source", ""), "objective": meta.get("objective"),
                 "labels": meta.get("labels"), "fit": a.fit, "val": a.val, "n_fit": a.n_fit,
                 "n_probe_train": a.n_probe_train, "n_val": a.n_val, "seed": a.seed, "snr_db": list(SNR_LEVELS_DB),
                 "rows": rows}
    if a.vqgan:
        vqgan = VQGAN(cfg.vqgan)
        load_strict(vqgan, load_tensors(require(Path(a.vqgan), "vqgan"))[0], a.vqgan)
        encode = encode_with(VQEncoder(vqgan.eval()))
        out["vq_codes"] = token_stability(encode, val[0], cfg.channels, SNR_LEVELS_DB, a.seed, a.batch)
        print(f"VQGAN codes: change at 10 dB {out['vq_codes']['change'][SNR_LEVELS_DB.index(10.0)]:.3f}", flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    path = Path(a.out)
    atomic_write_text(path, json.dumps(out, indent=2))
    print(f"wrote {a.out} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
