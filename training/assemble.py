"""Assemble the trained parts into one DiGIT model directory (config.json + model.safetensors).

The model config comes from the stage-1 artifact (it records the classes and K the chain ran
with); every part is loaded strictly, so a part trained for another config fails here, by name.
``python -m digit_core.export <root>/model`` turns the directory into an app bundle.

    python -m training.assemble --config training/fmnist.yaml [--out=runs/fmnist/model]
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # run as a file, training/ would shadow the standard library
    raise SystemExit("run the stages as modules from the repository root: python -m training.assemble --help")

from dataclasses import dataclass
from typing import ClassVar

from digit_core.config import DiGITConfig
from digit_core.pipeline import DiGIT
from training.config import RunConfig, parse_config
from training.files import load_tensors, require
from training.trainer import Trainer


@dataclass
class AssembleConfig(RunConfig):
    stage: ClassVar[str] = "assemble"
    encoder: str = ""              # default <root>/ssl/encoder.safetensors
    codebook: str = ""             # default <root>/kmeans/codebook.safetensors
    vqgan: str = ""                # default <root>/vqgan/vqgan.safetensors
    stage1: str = ""               # default <root>/stage1/stage1.safetensors
    stage2: str = ""               # default <root>/stage2/stage2.safetensors
    out: str = ""                  # default <root>/model
    name: str = ""                 # model name in config.json; default the preset's


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(AssembleConfig, argv)
    tr = Trainer(cfg)
    parts = {"encoder": cfg.input(cfg.encoder, "ssl/encoder.safetensors"),
             "codebook": cfg.input(cfg.codebook, "kmeans/codebook.safetensors"),
             "vqgan": cfg.input(cfg.vqgan, "vqgan/vqgan.safetensors"),
             "stage1": cfg.input(cfg.stage1, "stage1/stage1.safetensors"),
             "stage2": cfg.input(cfg.stage2, "stage2/stage2.safetensors")}
    loaded = {k: load_tensors(require(p, k if k != "codebook" else "kmeans")) for k, p in parts.items()}
    mcfg = DiGITConfig.from_dict(loaded["stage1"][1]["model"])
    meta = loaded["encoder"][1]   # how the encoder was trained: objective, labels used, free text
    e = mcfg.encoder
    e.source, e.objective, e.labels = meta.get("source", e.source), meta.get("objective", e.objective), meta.get("labels", e.labels)
    if cfg.name:
        mcfg.name = cfg.name
    model = DiGIT(mcfg)
    state = {f"{k}.{n}": t for k, (tensors, _) in loaded.items() if k != "codebook" for n, t in tensors.items()}
    centroids = loaded["codebook"][0]["centroids"]
    state |= {"codebook.centroids": centroids, "codebook.centroid_sq": centroids.float().pow(2).sum(1)}
    model.load_weights(state, source=", ".join(str(p) for p in parts.values()))
    out = cfg.input(cfg.out, "model")
    if tr.d.main:
        model.save(out)
        smoke = model.sample([0, 0]) if mcfg.stage1.num_classes else model.sample(n=2)
        tr.info(f"wrote {out} ({sum(t.numel() for t in state.values()) / 1e6:.2f}M values); "
                f"a test sample gave {smoke.shape}")
    tr.finish()


if __name__ == "__main__":
    main()
