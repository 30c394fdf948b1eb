"""Where a run keeps each stage's product, ``<root>/<stage>/<name>.safetensors``: named once here
for the stage that writes it and for the stages, ``publish`` and the analyses that read it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Artifact:
    """A stage's product: ``<stage>/<name>.safetensors`` under a run's root."""

    stage: str    # the stage's folder under the root (its ``Trainer.run_dir``)
    name: str     # the file's stem (what ``Trainer.save_artifact`` takes): the model part it holds

    @property
    def file(self) -> str:
        return f"{self.name}.safetensors"

    @property
    def path(self) -> str:
        """Relative to the run's root, as ``RunConfig.input`` takes its default."""
        return f"{self.stage}/{self.file}"


@dataclass(frozen=True)
class RunLayout:
    """Every stage's product under a run's root (``LAYOUT``)."""

    encoder: Artifact = Artifact("ssl", "encoder")
    codebook: Artifact = Artifact("kmeans", "codebook")
    vqgan: Artifact = Artifact("vqgan", "vqgan")
    stage1: Artifact = Artifact("stage1", "stage1")
    stage1_vq: Artifact = Artifact("stage1_vq", "stage1")   # stage1 --tokens=vq: the tokenizer ablation's baseline
    stage2: Artifact = Artifact("stage2", "stage2")
    features: str = "features"     # the features stage's folder of shards, which kmeans reads
    model: str = "model"           # the model directory assemble writes
    model_vq: str = "model_vq"     # assemble --tokens=vq: the VQ-AR baseline's

    @property
    def parts(self) -> tuple[Artifact, ...]:
        """What a model is assembled from, in the order the stages run."""
        return self.encoder, self.codebook, self.vqgan, self.stage1, self.stage2


LAYOUT = RunLayout()
