"""The model presets, by name (``preset("fmnist-cnn")``), and the two token layouts they are built
with: ours (codes from 0, then classes, null class and bos) and the official fairseq one
(5 specials first), as in docs/official-release.md. Torch-free, like ``config``."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from .config import CodebookConfig, ConfigError, DiGITConfig, EncoderConfig, GPTConfig, SamplingConfig, Stage1Config, Stage2Config, VQGANConfig


def our_layout(
    name: str,
    image_size: int,
    channels: int,
    encoder: EncoderConfig,
    codebook_size: int,
    vqgan: VQGANConfig,
    num_classes: int,
    gpt1: dict[str, Any],
    gpt2: dict[str, Any],
    class_names: list[str] | None = None,
    sampling: SamplingConfig | None = None,
) -> DiGITConfig:
    """A model with our own compact token layout (no fairseq specials).

    Stage 1 ids: codes ``[0, K)``, classes ``[K, K+C)``, null class ``K+C``, bos ``K+C+1``.
    Stage 2 ids: VQ codes ``[0, V)``, clusters ``[V, V+K)``, separator ``V+K``.
    """
    K, V, C = codebook_size, vqgan.n_embed, num_classes
    n2, m2 = encoder.grid ** 2, vqgan.grid ** 2
    s1 = Stage1Config(
        gpt=GPTConfig(vocab_size=K + C + 2, out_vocab=K, out_offset=0, num_out=K, max_len=n2, **gpt1),
        num_classes=C, code_offset=0, class_offset=K, bos_id=K + C + 1,
        null_class_id=K + C if C else None, label_dropout=0.1 if C else 0.0,
    )
    s2 = Stage2Config(
        gpt=GPTConfig(vocab_size=V + K + 1, out_vocab=V, out_offset=0, num_out=V, max_len=m2, prefix_len=n2, **gpt2),
        vq_offset=0, disc_offset=V, sep_id=V + K,
    )
    return DiGITConfig(
        name=name, image_size=image_size, channels=channels, encoder=encoder,
        codebook=CodebookConfig(size=K, dim=encoder.width), vqgan=vqgan, stage1=s1, stage2=s2,
        sampling=sampling or SamplingConfig(), class_names=list(class_names or []),
    ).validate()


FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


_TINY_GPT = dict(n_layer=2, n_head=2, d_model=32, d_ff=64)


def tiny(num_classes: int = 3) -> DiGITConfig:
    """A few-thousand-parameter model for tests: 16x16 images, 4x4 token grids."""
    return our_layout(
        "tiny", 16, 3,
        EncoderConfig(kind="vit", image_size=16, model_size=16, patch_size=4, width=32, depth=2, heads=2,
                      feature_block=-1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        codebook_size=16,
        vqgan=VQGANConfig(resolution=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,),
                          z_channels=16, n_embed=32, embed_dim=8, norm_groups=8),
        num_classes=num_classes,
        gpt1=_TINY_GPT,
        gpt2=_TINY_GPT,
        class_names=[f"class {i}" for i in range(num_classes)],
    )


def tiny_vq(num_classes: int = 3) -> DiGITConfig:
    """``tiny``'s VQ-AR baseline, for tests: its stage-1 sizes over its VQGAN's 32 codes (a model
    with ``tiny``'s VQGAN weights is its twin). Not in ``PRESETS``: training builds a baseline
    with ``training.stage1 --tokens=vq`` from a DiGIT preset."""
    t = tiny(num_classes)
    return vq_baseline(our_layout("tiny-vq", 16, 3, t.encoder, t.vqgan.n_embed, t.vqgan, num_classes,
                                  _TINY_GPT, _TINY_GPT, list(t.class_names)))


def tiny_cnn(num_classes: int = 3) -> DiGITConfig:
    """``tiny`` with a CNN encoder (``kind="cnn"``), for tests of the self-supervised recipe."""
    m = tiny(num_classes)
    m.name = "tiny-cnn"
    m.encoder = EncoderConfig(kind="cnn", image_size=16, model_size=16, in_chans=3, patch_size=4, width=32, depth=3,
                              cnn_channels=(16, 32, 32), cnn_strides=(2, 2, 1), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return m.validate()


def fmnist_small() -> DiGITConfig:
    """The bundled Fashion-MNIST model: 32x32 grey images (28 padded), 8x8 token grids."""
    return our_layout(
        "fmnist", 32, 1,
        EncoderConfig(kind="vit", image_size=32, model_size=32, patch_size=4, width=192, depth=6, heads=3,
                      feature_block=-1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        codebook_size=512,
        vqgan=VQGANConfig(resolution=32, ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                          z_channels=64, n_embed=512, embed_dim=64),
        num_classes=10,
        gpt1=dict(n_layer=6, n_head=8, d_model=256, d_ff=1024),
        # stage 2 maps each cluster to the VQ code at the same place, a mostly local job: a
        # narrow MLP keeps the bundle + committed stage weights under the 60 MB the repo allows
        gpt2=dict(n_layer=4, n_head=8, d_model=256, d_ff=512),
        class_names=FMNIST_CLASSES,
        # the label-trained model's defaults (its evaluation: reports/fmnist-supervised-eval)
        sampling=SamplingConfig(temperature=1.0, top_k=100, top_p=None, cfg_scale=2.5),
    )


def fmnist_conv() -> DiGITConfig:
    """``fmnist`` with a convolutional stem in the encoder: the self-supervised variant, since a
    linear-patchify ViT does not learn useful features from scratch within a 2-core CPU budget
    (the curves: weights/fmnist/attempts/ and reports/fmnist/ssl_type.md)."""
    m = fmnist_small()
    m.name, m.encoder.stem = "fmnist-conv", "conv"
    return m.validate()


def fmnist_cnn() -> DiGITConfig:
    """``fmnist`` with a small CNN encoder (0.3M parameters, 8x8 x 128 features): the
    self-supervised default, trained with patch-level VICReg (training/ssl.py)."""
    m = fmnist_small()
    m.name = "fmnist-cnn"
    m.encoder = EncoderConfig(kind="cnn", image_size=32, model_size=32, in_chans=1, patch_size=4,
                              width=128, depth=6, cnn_channels=(32, 64, 64, 96, 128, 128), cnn_strides=(1, 2, 1, 2, 1, 1),
                              mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    m.codebook.dim = 128
    return m.validate()


def vq_baseline(m: DiGITConfig) -> DiGITConfig:
    """The paper's VQ-AR baseline of a model (Table 3a): its stage 1 over the VQGAN's own ids,
    rendered by its VQ decoder, with no tokenizer and no stage 2. ``m``'s stage 1 must already
    draw from the VQGAN's ``n_embed`` codes on the VQ grid (``training.stage1 --tokens=vq``
    builds it so, with the stage-1 sizes of ``m``)."""
    if m.stage1.gpt.num_out != m.vqgan.n_embed or m.stage1.gpt.max_len < m.vq_grid ** 2:
        raise ConfigError(f"{m.name}: stage 1 draws from {m.stage1.gpt.num_out} codes over {m.stage1.gpt.max_len} "
                          f"positions, not the VQGAN's {m.vqgan.n_embed} codes over {m.vq_grid ** 2}")
    return dataclasses.replace(m, tokens="vq", encoder=None, codebook=None, stage2=None).validate()


FAIRSEQ_SPECIALS = 5  # fairseq dictionary: <s>=0, <pad>=1, </s>=2, <unk>=3, <n>=4
FAIRSEQ_EOS = 2
FAIRSEQ_POS_OFFSET = 2  # learned positions start at padding_idx (1) + 1


def fairseq_layout(
    name: str,
    encoder: EncoderConfig,
    codebook_size: int,
    vqgan: VQGANConfig,
    num_classes: int,
    gpt1: dict[str, Any],
    gpt2: dict[str, Any],
    sampling: SamplingConfig | None = None,
    class_names: list[str] | None = None,
) -> DiGITConfig:
    """A model with the official fairseq token layout (see docs/official-release.md).

    Stage 1 ids: 5 specials, codes ``[5, 5+K)``, classes ``[K+5, K+5+C)``; ``</s>`` starts
    the sequence. Stage 2 ids: 5 specials, VQ codes ``[5, 5+V)``, then the stage-1 dictionary
    shifted by ``V+5`` (cluster c -> ``V+5+5+c``); ``</s>`` separates prefix and VQ tokens.
    ``gpt1``/``gpt2`` give the sizes (n_layer, n_head, d_model, d_ff, max_len).
    """
    sp, K, V = FAIRSEQ_SPECIALS, codebook_size, vqgan.n_embed
    dict_len, vq_dict = K + sp, V + sp
    common = dict(pos_offset=FAIRSEQ_POS_OFFSET, dropout=0.0)
    s1 = Stage1Config(
        gpt=GPTConfig(vocab_size=dict_len + num_classes, out_vocab=dict_len, out_offset=sp, num_out=K,
                      norm_first=False, final_norm=False, embed_scale=math.sqrt(gpt1["d_model"]), **common, **gpt1),
        num_classes=num_classes, code_offset=sp, class_offset=dict_len, bos_id=FAIRSEQ_EOS,
        null_class_id=None, label_dropout=0.0,
    )
    s2 = Stage2Config(
        gpt=GPTConfig(vocab_size=vq_dict + dict_len, out_vocab=vq_dict, out_offset=sp, num_out=V,
                      prefix_len=encoder.grid ** 2, norm_first=True, final_norm=True,
                      embed_scale=math.sqrt(gpt2["d_model"]), **common, **gpt2),
        vq_offset=sp, disc_offset=vq_dict + sp, sep_id=FAIRSEQ_EOS,
    )
    return DiGITConfig(
        name=name, image_size=encoder.image_size, channels=3, encoder=encoder, layout="fairseq",
        codebook=CodebookConfig(size=K, dim=encoder.width), vqgan=vqgan, stage1=s1, stage2=s2,
        sampling=sampling or SamplingConfig(), class_names=list(class_names or []),
    ).validate()


def _official(size: str, num_classes: int) -> DiGITConfig:
    """The official DiGIT ImageNet models (fairseq layout; see docs/official-release.md)."""
    base = size == "base"
    width, depth, heads = (768, 12, 12) if base else (1024, 24, 16)
    K = 8192 if base else 16000
    d1, l1 = (1024, 16) if base else (1536, 24)
    enc = EncoderConfig(
        kind="dinov2", image_size=256, model_size=224, in_chans=3, patch_size=14, width=width, depth=depth,
        heads=heads, num_registers=4, layerscale=1.0, feature_block=depth - 3, final_norm=True,
        timm_name=f"vit_{'base' if base else 'large'}_patch14_reg4_dinov2.lvd142m",
        pos_table_size=37, pos_interp_offset=0.1,
    )
    vq = VQGANConfig(arch="mage", resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                     z_channels=256, n_embed=1024, embed_dim=256)
    gpt = dict(n_layer=l1, n_head=16, d_model=d1, d_ff=4 * d1, max_len=1024)
    return fairseq_layout(
        f"digit-{size}-imagenet{'-cls' if num_classes else ''}", enc, K, vq, num_classes, gpt, gpt,
        sampling=SamplingConfig(top_k=(300 if num_classes else 200) if base else 400, stage2_top_p=0.8),
    )


def imagenet_base(class_conditional: bool = True) -> DiGITConfig:
    """219M stage 1 over DINOv2 ViT-B/14-reg4 tokens (K=8192)."""
    return _official("base", 1000 if class_conditional else 0)


def imagenet_large(class_conditional: bool = True) -> DiGITConfig:
    """732M stage 1 over DINOv2 ViT-L/14-reg4 tokens (K=16000)."""
    return _official("large", 1000 if class_conditional else 0)


PRESETS = {"tiny": tiny, "tiny-cnn": tiny_cnn, "fmnist": fmnist_small, "fmnist-conv": fmnist_conv, "fmnist-cnn": fmnist_cnn, "imagenet-base": imagenet_base, "imagenet-large": imagenet_large}


def preset(name: str) -> DiGITConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()
