"""The datasets a stage trains on, and the model config that goes with them (classes from the data)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from digit_core.config import ConfigError, DiGITConfig
from digit_core.presets import fairseq_layout, our_layout, preset
from digit_core.pipeline import output_to_images
from training.config import RunConfig


def model_config(cfg: RunConfig, class_names: list[str]) -> DiGITConfig:
    """The DiGIT config of ``cfg.model`` (preset name or config.json path) with the data's classes.

    When the class count differs from the preset's (or ``conditional`` is off: 0 classes), or
    ``codebook_size`` sets another K, the token layout is rebuilt with ``our_layout``, since the
    ids of classes and specials depend on both.
    """
    m = DiGITConfig.load(cfg.model) if cfg.model.endswith(".json") else preset(cfg.model)
    names = list(class_names) if cfg.conditional else []
    if m.is_vq:   # a VQ-AR baseline's vocabulary is the VQGAN's; training builds it from a DiGIT preset
        if len(names) != m.stage1.num_classes:
            raise ConfigError(f"{m.name} generates {m.stage1.num_classes} classes, the data has {len(names)}")
        m.class_names = names
        return m.validate()
    K = cfg.codebook_size or m.codebook.size
    if len(names) != m.stage1.num_classes or K != m.codebook.size:
        keep = ("n_layer", "n_head", "d_model", "d_ff")
        gpt1, gpt2 = ({k: getattr(g, k) for k in keep} for g in (m.stage1.gpt, m.stage2.gpt))
        if m.layout == "fairseq":   # the official layout (ImageNet presets)
            gpt1["max_len"], gpt2["max_len"] = m.stage1.gpt.max_len, m.stage2.gpt.max_len
            m = fairseq_layout(m.name, m.encoder, K, m.vqgan, len(names), gpt1, gpt2, sampling=m.sampling)
        else:
            more = ("pos_offset", "norm_first", "final_norm", "embed_scale", "dropout", "ln_eps")
            gpt1 |= {k: getattr(m.stage1.gpt, k) for k in more}
            gpt2 |= {k: getattr(m.stage2.gpt, k) for k in more}
            m = our_layout(m.name, m.image_size, m.channels, m.encoder, K, m.vqgan, len(names), gpt1, gpt2,
                           sampling=m.sampling)
    m.class_names = names
    return m.validate()


def load_data(cfg: RunConfig, spec: str, train: bool = True) -> tuple[Dataset, DiGITConfig]:
    """The dataset ``spec`` at the model's image size and channels, and the model config with its classes."""
    from digit_core.data import build_dataset
    if not spec:
        raise ConfigError(f"{cfg.stage} needs data: --data=DIR (an image folder) or --data=fmnist")
    base = DiGITConfig.load(cfg.model) if cfg.model.endswith(".json") else preset(cfg.model)
    data = build_dataset(spec, base.image_size, base.channels, train=train)
    return data, model_config(cfg, data.classes)


def test_split(spec: str) -> str | None:
    """The held-out counterpart of a data spec: Fashion-MNIST's test files (same root); an image
    folder has none."""
    if not spec.startswith("fmnist"):
        return None
    root = spec.partition("@")[2]
    return "fmnist:test" + (f"@{root}" if root else "")


def as_uint8(x: torch.Tensor) -> np.ndarray:
    """Float ``[N, C, S, S]`` in [0, 1] (a dataset batch) -> the uint8 ``[N, S, S, 3]`` a bundle takes."""
    return output_to_images(x).numpy()
