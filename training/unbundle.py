"""A bundle's tokenizer back as stage artifacts, so later stages can run on it.

A bundle stores each weight once (``exported/fmnist`` holds the only copy of its encoder and
codebook), so a stage that needs the tokenizer in PyTorch (stage 1, stage 2, assemble) reads it
out of ``tokenizer.onnx``: ``<root>/ssl/encoder.safetensors`` and ``<root>/kmeans/codebook.safetensors``,
with the bundle's config and provenance as their metadata, as the ssl and kmeans stages write them.

Export folds each BatchNorm of a CNN encoder into the convolution before it, so the recovered
encoder holds the folded weights and identity BatchNorms (mean 0, variance 1 - eps, scale 1,
shift = the folded bias): the same function in eval mode, which is the only mode a frozen
tokenizer runs in. The recovered pair is checked against the bundle's own tokenizer graph
before anything is written. ViT encoders are not folded; their export keeps no state-dict names
either, so only CNN encoders (``encoder.kind == "cnn"``) are supported.

    python -m training.unbundle --bundle exported/fmnist --root runs/thesis/ssl
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # run as a file, training/ would shadow the standard library
    raise SystemExit("run the stages as modules from the repository root: python -m training.unbundle --help")

import argparse
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from digit_core.codebook import Codebook
from digit_core.config import DiGITConfig
from digit_core.contract import read_config, read_manifest, read_verified
from digit_core.encoders import Encoder
from digit_core.runtime import load_bundle
from training.files import atomic_save
from training.layout import LAYOUT


def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer as float32, under the name the graph's nodes use (``x.fp16`` + its Cast -> ``x``)."""
    out = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:   # export stores big float16 initializers with a Cast in front
        if node.op_type == "Cast" and node.input[0] in out:
            out[node.output[0]] = out[node.input[0]]
    return {k: v.astype(np.float32) for k, v in out.items()}


def tokenizer_state(bundle: str | Path) -> tuple[DiGITConfig, dict[str, torch.Tensor], torch.Tensor]:
    """``(config, encoder state dict, centroids [K, d])`` recovered from ``<bundle>/tokenizer.onnx``."""
    bundle = Path(bundle)
    man = read_manifest(bundle)   # every file read below is checked against its sha256 first
    cfg = read_config(bundle, man)
    if cfg.is_vq or cfg.encoder is None:
        raise ValueError(f"{bundle} is a VQ-token model: it has no discriminative tokenizer to recover")
    if cfg.encoder.kind != "cnn":
        raise ValueError(f"{bundle}: only a CNN encoder can be recovered from its graph, not kind={cfg.encoder.kind!r}")
    proto = onnx.load_from_string(read_verified(bundle, man, "tokenizer.onnx"))
    inits = _initializers(proto)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    encoder = Encoder(cfg.encoder)
    layers = [(i, m) for i, m in enumerate(encoder.cnn) if isinstance(m, torch.nn.Conv2d)]
    if len(convs) != len(layers):
        raise ValueError(f"{bundle}/tokenizer.onnx has {len(convs)} convolutions, the config's CNN {len(layers)}")
    state = encoder.state_dict()
    for node, (i, conv) in zip(convs, layers):
        w, b = (torch.from_numpy(inits[name]) for name in node.input[1:3])
        if w.shape != conv.weight.shape:
            raise ValueError(f"convolution {i}: graph weight {tuple(w.shape)} vs config {tuple(conv.weight.shape)}")
        bn = encoder.cnn[i + 1]
        state[f"cnn.{i}.weight"] = w
        state[f"cnn.{i + 1}.weight"] = torch.ones_like(b)
        state[f"cnn.{i + 1}.bias"] = b
        state[f"cnn.{i + 1}.running_mean"] = torch.zeros_like(b)
        state[f"cnn.{i + 1}.running_var"] = torch.full_like(b, 1 - bn.eps)
    # the nearest-centroid step: x @ C^T, the one [d, K] matrix a MatMul multiplies the features by
    K, d = cfg.codebook.size, cfg.encoder.width
    mats = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    mats = [m for m in mats if m.shape == (d, K)]
    if len(mats) != 1:
        raise ValueError(f"{bundle}/tokenizer.onnx: expected one [{d}, {K}] centroid matrix, found {len(mats)}")
    return cfg, state, torch.from_numpy(np.ascontiguousarray(mats[0].T))


def check_against_bundle(bundle: str | Path, cfg: DiGITConfig, state: dict[str, torch.Tensor],
                         centroids: torch.Tensor, n: int = 64, seed: int = 0) -> float:
    """The share of token ids on ``n`` seeded random images where the recovered pair agrees with
    the bundle's graph; raises below 99.9% (float32 vs onnxruntime rounding may flip a near tie)."""
    rt = load_bundle(bundle)
    s = cfg.image_size
    images = np.random.default_rng(seed).integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    expected = rt.tokenize(images)[0]
    encoder = Encoder(cfg.encoder)
    encoder.load_state_dict(state)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = x.mean(1, keepdim=True) if cfg.encoder.in_chans == 1 else x
    with torch.no_grad():
        got = Codebook(centroids).assign(encoder.eval().features(x))[0].numpy()
    agree = float((got == expected).mean())
    if agree < 0.999:
        raise RuntimeError(f"the recovered tokenizer agrees with {bundle}/tokenizer.onnx on only {agree:.2%} of tokens")
    return agree


def unbundle(bundle: str | Path, root: str | Path) -> tuple[Path, Path]:
    """Write ``<root>/ssl/encoder.safetensors`` and ``<root>/kmeans/codebook.safetensors`` from ``bundle``."""
    cfg, state, centroids = tokenizer_state(bundle)
    agree = check_against_bundle(bundle, cfg, state, centroids)
    e = cfg.encoder
    meta = {"model": cfg.to_dict(), "objective": e.objective, "labels": e.labels,
            "source": f"{e.source} (recovered from {Path(bundle)}/tokenizer.onnx, BatchNorm folded)".strip(),
            "recovered_from": str(bundle), "agreement": agree}
    root = Path(root)
    enc_path, cb_path = root / LAYOUT.encoder.path, root / LAYOUT.codebook.path
    atomic_save(state, enc_path, meta)
    atomic_save({"centroids": centroids}, cb_path, {"recovered_from": str(bundle)})
    return enc_path, cb_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="an exported bundle with a CNN encoder")
    ap.add_argument("--root", required=True, help="the run root to write ssl/ and kmeans/ into")
    a = ap.parse_args(argv)
    for p in unbundle(a.bundle, a.root):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
