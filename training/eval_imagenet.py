"""ImageNet 256x256 evaluation of a converted DiGIT model: 50 samples per class, FID and IS.

    python -m training.eval_imagenet --model models/digit-base-imagenet-cls --out runs/eval-base-cls \\
        --val-dir data/imagenet-val-png --ref-npz VIRTUAL_imagenet256_labeled.npz
    # several GPUs: one process per GPU, then one more call (no --shard-id) to score
    CUDA_VISIBLE_DEVICES=i python -m training.eval_imagenet ... --num-shards 8 --shard-id i --no-metrics

Samples are PNGs under ``<out>/samples``, written batch by batch (atomically); a rerun skips
every batch whose PNGs exist, so a killed run resumes. Batch ``b`` samples with seed
``seed + b`` (each row has its own generator), so the images do not depend on the sharding.

Two references, because papers differ:
- ``--val-dir``: the 50,000 ImageNet validation images resized to 256 and centre-cropped, as
  PNGs (``--make-val`` writes them from an ImageFolder ``val/``). This is the official DiGIT
  protocol (torch-fidelity ``calculate_metrics(samples, val, fid, isc)``), so compare with the
  paper's numbers on this one.
- ``--ref-npz``: ADM's reference batch (``VIRTUAL_imagenet256_labeled.npz``), the protocol of
  LlamaGen/VAR. torch-fidelity cannot read that file; we take its precomputed ``mu``/``sigma``
  (TensorFlow Inception pool features) and compare them with the statistics of our samples'
  2048-d features from torch-fidelity's ``inception-v3-compat``, the PyTorch port of that same
  TF network. Not comparable with the paper's numbers.

torch-fidelity is optional (``pip install torch-fidelity``); only the metrics need it. Its first
use downloads the Inception weights, so run it once where there is network.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # run as a file, training/ would shadow the standard library
    raise SystemExit("run the stages as modules from the repository root: python -m training.eval_imagenet --help")

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from digit_core.pipeline import DiGIT
from training.files import atomic_path

# Paper, ImageNet 256x256, no guidance: (codebook size, class-conditional) -> (FID, IS)
PAPER = {(8192, True): ("219M class-cond", 4.79, 142.87), (16000, True): ("732M class-cond", 3.39, 205.96),
         (8192, False): ("219M uncond", 9.13, 73.85), (16000, False): ("732M uncond", 4.59, 141.29)}


def _fidelity():
    try:
        import torch_fidelity
    except ImportError:
        sys.exit("the metrics need torch-fidelity: pip install torch-fidelity (samples are kept; rerun to score)")
    return torch_fidelity


def png_path(out: Path, i: int, per_class: int) -> Path:
    """Sample ``i``: class ``i // per_class`` (unconditional models: just a group), index in the class."""
    return out / f"{i // per_class:04d}_{i % per_class:03d}.png"


def sample_all(model: DiGIT, out: Path, per_class: int, batch: int, seed: int, top_k: int | None,
               top_p: float | None, temperature: float | None, shard: int, num_shards: int) -> None:
    """Write ``per_class`` images per class (or ``1000 * per_class`` unconditional ones) as PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    C = model.config.stage1.num_classes
    total = (C or 1000) * per_class
    batches = [b for b in range(-(-total // batch)) if b % num_shards == shard]
    todo = [b for b in batches
            if not all(png_path(out, i, per_class).exists() for i in range(b * batch, min(total, (b + 1) * batch)))]
    print(f"shard {shard}/{num_shards}: {len(batches) - len(todo)} of {len(batches)} batches already written")
    for b in tqdm(todo, desc="sampling", unit="batch"):
        idx = np.arange(b * batch, min(total, (b + 1) * batch))
        kw = {"class_ids": idx // per_class} if C else {"n": len(idx)}
        imgs = model.sample(**kw, seed=seed + b, top_k=top_k, top_p=top_p, temperature=temperature)
        for img, i in zip(imgs, idx):
            path = png_path(out, int(i), per_class)
            with atomic_path(path) as tmp:   # not *.png: a killed write is never scored
                Image.fromarray(img).save(tmp, format="PNG")


def make_val(src: Path, dst: Path) -> None:
    """ImageFolder ``src`` (``val/<wnid>/*.JPEG``) -> resize 256 + centre crop 256 PNGs, as the official script."""
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    dst.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(tqdm(files, desc="val", unit="img")):
        out = dst / f"{i:05d}.png"
        if out.exists():
            continue
        im = Image.open(f).convert("RGB")
        s = 256 / min(im.size)   # torchvision Resize(256) on PIL: shorter side to 256, PIL bilinear
        im = im.resize((max(256, int(im.width * s)), max(256, int(im.height * s))), Image.BILINEAR)
        l, t = (im.width - 256) // 2, (im.height - 256) // 2
        im.crop((l, t, l + 256, t + 256)).save(out)


def fid_against_npz(samples: Path, npz: Path, cuda: bool, batch: int = 200) -> float:
    """FID of the PNGs in ``samples`` against an ADM reference batch's ``mu``/``sigma``."""
    _fidelity()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    ref = np.load(npz)
    if "mu" not in ref or "sigma" not in ref:
        raise SystemExit(f"{npz}: no mu/sigma arrays (found {list(ref.keys())}); expected ADM's reference batch")
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).eval()
    net = net.cuda() if cuda else net
    files = sorted(samples.glob("*.png"))
    feats = []
    with torch.no_grad():
        for i in tqdm(range(0, len(files), batch), desc="inception", unit="batch"):
            x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[i:i + batch]])
            x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()   # uint8 NCHW, as torch-fidelity feeds it
            feats.append(net(x.cuda() if cuda else x)[0].double().cpu())
    ours = fid_features_to_statistics(torch.cat(feats))
    theirs = {"mu": ref["mu"].astype(np.float64), "sigma": ref["sigma"].astype(np.float64)}
    return float(fid_statistics_to_metric(theirs, ours, verbose=False)["frechet_inception_distance"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="converted model directory (python -m digit_core.convert)")
    p.add_argument("--out", type=Path, required=True, help="run directory: samples/ and metrics.txt")
    p.add_argument("--per-class", type=int, default=50, help="samples per class (uncond: 1000 x this in all)")
    p.add_argument("--batch", type=int, default=125)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, help="default: the model's (paper: 200 base uncond, 300 base cond, 400 large)")
    p.add_argument("--top-p", type=float, help="stage 1 top-p (default: off, as the paper)")
    p.add_argument("--temperature", type=float, help="default: the model's (1.0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--shard-id", type=int, default=0)
    p.add_argument("--val-dir", type=Path, help="ImageNet-val 256x256 PNGs (official protocol)")
    p.add_argument("--make-val", type=Path, help="write --val-dir from this ImageFolder val/ directory first")
    p.add_argument("--ref-npz", type=Path, help="ADM reference batch .npz (LlamaGen/VAR protocol)")
    p.add_argument("--no-metrics", action="store_true", help="only sample (e.g. one shard of several)")
    a = p.parse_args(argv)

    model = DiGIT.load(a.model, device=a.device)
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = model.config
    samples = a.out / "samples"
    top_k = a.top_k if a.top_k is not None else cfg.sampling.top_k
    sample_all(model, samples, a.per_class, a.batch, a.seed, top_k, a.top_p, a.temperature, a.shard_id, a.num_shards)
    if a.no_metrics:
        return
    expected = (cfg.stage1.num_classes or 1000) * a.per_class
    found = len(list(samples.glob("*.png")))
    if found < expected:
        sys.exit(f"{found} of {expected} samples written: run the other shards first")

    tf = _fidelity()
    cuda = a.device.startswith("cuda")
    if a.make_val:
        a.val_dir = a.val_dir or a.out / "imagenet-val"
        make_val(a.make_val, a.val_dir)
    lines = []
    m = tf.calculate_metrics(input1=str(samples), input2=str(a.val_dir) if a.val_dir else None,
                             cuda=cuda, isc=True, fid=a.val_dir is not None, verbose=False)
    name, p_fid, p_is = PAPER.get((cfg.codebook.size, cfg.stage1.num_classes > 0), (cfg.name, float("nan"), float("nan")))
    lines.append(f"{'':32s} {'ours':>10s} {'paper (' + name + ')':>28s}")
    lines.append(f"{'IS':32s} {m['inception_score_mean']:10.2f} {p_is:28.2f}")
    if a.val_dir:
        lines.append(f"{'FID vs ImageNet val (official)':32s} {m['frechet_inception_distance']:10.2f} {p_fid:28.2f}")
    if a.ref_npz:
        lines.append(f"{'FID vs ADM ref batch':32s} {fid_against_npz(samples, a.ref_npz, cuda):10.2f} {'(not reported)':>28s}")
    text = "\n".join(lines + [f"samples: {found}, top_k {top_k}, top_p {a.top_p}, seed {a.seed}"])
    print(text)
    (a.out / "metrics.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
