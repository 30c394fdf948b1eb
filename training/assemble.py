"""Assemble the trained parts into one DiGIT model directory (config.json + model.safetensors).

The model config comes from the stage-1 artifact (it records the classes and K the chain ran
with); every part is loaded strictly, so a part trained for another config fails here, by name.
``python -m digit_core.export <root>/model`` turns the directory into an app bundle.

``--tokens=vq`` assembles the VQ-AR baseline instead (``training.stage1 --tokens=vq``): its
stage 1 and the VQGAN, into ``<root>/model_vq``.

    python -m training.assemble --config training/fmnist.yaml [--out=runs/fmnist/model]
    python -m training.assemble --config training/fmnist.yaml --tokens=vq --vqgan=exported/fmnist/vqgan.safetensors
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # run as a file, training/ would shadow the standard library
    raise SystemExit("run the stages as modules from the repository root: python -m training.assemble --help")

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


from digit_core.config import ConfigError, DiGITConfig
from digit_core.pipeline import DiGIT
from digit_core.presets import vq_baseline
from training.config import RunConfig, parse_config
from training.files import load_tensors, require
from training.layout import LAYOUT
from training.trainer import Trainer


@dataclass
class AssembleConfig(RunConfig):
    stage: ClassVar[str] = "assemble"
    encoder: str = ""              # default <root>/ssl/encoder.safetensors
    codebook: str = ""             # default <root>/kmeans/codebook.safetensors
    vqgan: str = ""                # default <root>/vqgan/vqgan.safetensors
    stage1: str = ""               # default <root>/stage1/stage1.safetensors (tokens=vq: stage1_vq/)
    stage2: str = ""               # default <root>/stage2/stage2.safetensors
    out: str = ""                  # default <root>/model (tokens=vq: model_vq)
    name: str = ""                 # model name in config.json; default the preset's
    tokens: str = "disc"           # disc: DiGIT; vq: the VQ-AR baseline (stage 1 over VQ ids + VQGAN)

    def __post_init__(self) -> None:
        if self.tokens not in ("disc", "vq"):
            raise ConfigError(f"tokens must be 'disc' or 'vq', got {self.tokens!r}")


def vq_model(stage1: Path, vqgan: Path, name: str = "") -> DiGIT:
    """The VQ-AR baseline from a ``training.stage1 --tokens=vq`` artifact and a VQGAN's weights."""
    tensors, meta = load_tensors(require(Path(stage1), "stage1 --tokens=vq"))
    if meta.get("tokens") != "vq":
        raise ValueError(f"{stage1} is a stage 1 over {meta.get('tokens', 'disc')} tokens, not VQ ids: "
                         f"train the baseline with python -m training.stage1 ... --tokens=vq")
    mcfg = vq_baseline(DiGITConfig.from_dict(meta["model"]))
    if name:
        mcfg.name = name
    model = DiGIT(mcfg)
    state = {f"stage1.{n}": t for n, t in tensors.items()}
    state |= {f"vqgan.{n}": t for n, t in load_tensors(require(Path(vqgan), "vqgan"))[0].items()}
    model.load_weights(state, source=f"{stage1}, {vqgan}")
    return model


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(AssembleConfig, argv)
    tr = Trainer(cfg)
    if cfg.tokens == "vq":
        model = vq_model(cfg.input(cfg.stage1, LAYOUT.stage1_vq.path),
                         cfg.input(cfg.vqgan, LAYOUT.vqgan.path), cfg.name)
        _save(tr, model, cfg.input(cfg.out, LAYOUT.model_vq))
        return
    parts = {"encoder": cfg.input(cfg.encoder, LAYOUT.encoder.path),
             "codebook": cfg.input(cfg.codebook, LAYOUT.codebook.path),
             "vqgan": cfg.input(cfg.vqgan, LAYOUT.vqgan.path),
             "stage1": cfg.input(cfg.stage1, LAYOUT.stage1.path),
             "stage2": cfg.input(cfg.stage2, LAYOUT.stage2.path)}
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
    _save(tr, model, cfg.input(cfg.out, LAYOUT.model))


def _save(tr: Trainer, model: DiGIT, out: Path) -> None:
    if tr.d.main:
        model.save(out)
        smoke = model.sample([0, 0]) if model.config.stage1.num_classes else model.sample(n=2)
        values = sum(t.numel() for t in model.own_state_dict().values()) / 1e6
        tr.info(f"wrote {out} ({values:.2f}M values); a test sample gave {smoke.shape}")
    tr.finish()


if __name__ == "__main__":
    main()
