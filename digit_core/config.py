"""Configuration dataclasses for every DiGIT model (the presets are in ``presets.py``).

A model directory is ``config.json`` (``DiGITConfig.to_dict()``) beside ``model.safetensors``.
Everything a flow needs to know about token layouts lives here, so the PyTorch pipeline, the
ONNX exporter and the onnxruntime runtime all read the same numbers.

This module imports no torch: the runtime reads these configs too.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A configuration that cannot describe a working model."""


@dataclass
class EncoderConfig:
    """A frozen encoder whose patch features K-Means clusters.

    ``kind="dinov2"`` is timm's DINOv2 with the official DiGIT settings; ``kind="vit"`` is our
    small ViT for small images. ``feature_block`` is the 0-based block whose output is taken
    (9 of 12 for ViT-B: the third-to-last), optionally followed by the final LayerNorm.
    ``kind="cnn"`` is a plain convolutional network: 3x3 convolutions with ``cnn_channels`` and
    ``cnn_strides`` (their product is ``patch_size``), BatchNorm + ReLU after each; its last
    layer's ``width = cnn_channels[-1]`` channels are the features of each grid cell.

    ``objective`` and ``labels`` record how the weights were trained (``labels=False``: no label
    reached the loss, the augmentations or the choice of checkpoint); ``source`` is free text.
    """

    kind: str = "vit"
    image_size: int = 32          # size of the images the pipeline feeds in
    model_size: int = 32          # size inside the model (224 for DINOv2: resized from 256)
    in_chans: int = 3
    patch_size: int = 4
    stem: str = "patch"           # "patch": one linear patch embedding; "conv": 3x3 convolutions down to the patch grid
    width: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    num_registers: int = 0
    layerscale: float | None = None   # LayerScale init value (DINOv2: 1.0); None = no LayerScale
    feature_block: int = -1       # -1 = last block; negative indices count from the end
    final_norm: bool = True       # apply the encoder's final LayerNorm to the features
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    timm_name: str | None = None  # e.g. "vit_base_patch14_reg4_dinov2.lvd142m"
    pos_table_size: int = 0       # DINOv2: side of the checkpoint's position table (37)
    pos_interp_offset: float = 0.1
    cnn_channels: tuple[int, ...] = ()   # kind="cnn": output channels of each 3x3 convolution
    cnn_strides: tuple[int, ...] = ()    # kind="cnn": stride of each (1 or 2)
    objective: str = ""           # how the weights were trained, e.g. "vicreg_dense", "supervised", "dinov2"; "" = not recorded
    labels: bool | None = None    # whether labels were used to train or select the weights; None = not recorded
    source: str = ""              # free-text provenance (steps, run); shown by the app

    @property
    def grid(self) -> int:
        return self.model_size // self.patch_size

    @property
    def block_index(self) -> int:
        return self.feature_block % self.depth


@dataclass
class CodebookConfig:
    """K-Means centroids over encoder features: the discriminative-token vocabulary."""

    size: int = 512
    dim: int = 192


@dataclass
class VQGANConfig:
    """taming/MAGE VQGAN. The token grid side is ``resolution / 2 ** (len(ch_mult) - 1)``.

    ``arch="mage"`` is MAGE's port of MaskGIT's VQGAN (the one DiGIT uses): no attention, no
    quant convs, average-pool downsampling; ``"taming"`` is taming-transformers' VQModel.
    """

    arch: str = "taming"
    resolution: int = 32
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 64
    n_embed: int = 512
    embed_dim: int = 64
    norm_groups: int = 32         # GroupNorm groups (taming: 32)
    dropout: float = 0.0

    @property
    def grid(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)


@dataclass
class GPTConfig:
    """One decoder-only transformer, used for both stages.

    The input is an optional prefix of ``prefix_len`` tokens (stage 2: the discriminative
    tokens) followed by up to ``max_len`` main tokens; each part has its own learned position
    table whose first used row is ``pos_offset`` (fairseq uses 2). ``norm_first`` selects
    pre-LN (GPT-2, official stage 2) or post-LN (official stage 1); ``final_norm`` adds a last
    LayerNorm. Logits cover ``out_vocab`` ids, of which ``[out_offset, out_offset + num_out)``
    are the codes that sampling draws from.
    """

    vocab_size: int = 1024
    out_vocab: int = 512
    out_offset: int = 0
    num_out: int = 512
    n_layer: int = 6
    n_head: int = 8
    d_model: int = 256
    d_ff: int = 1024
    max_len: int = 64
    prefix_len: int = 0
    pos_offset: int = 0
    norm_first: bool = True
    final_norm: bool = True
    embed_scale: float = 1.0
    dropout: float = 0.0
    ln_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def context(self) -> int:
        """Longest sequence (prefix + main) the KV cache must hold."""
        return self.prefix_len + self.max_len


@dataclass
class Stage1Config:
    """Stage 1: ``[first, t_1 .. t_{N-1}]`` predicts ``[t_1 .. t_N]``.

    ``first`` is the class token ``class_offset + c`` when class-conditional, else ``bos_id``.
    Cluster ``c`` is token ``code_offset + c``. ``null_class_id`` is the class token used for
    dropped labels in training and for the unconditional half of classifier-free guidance.
    """

    gpt: GPTConfig = field(default_factory=GPTConfig)
    num_classes: int = 10          # 0 = unconditional
    code_offset: int = 0
    class_offset: int = 512
    bos_id: int = 523
    null_class_id: int | None = 522
    label_dropout: float = 0.1


@dataclass
class Stage2Config:
    """Stage 2: prefix ``[d_1 .. d_N]`` (cluster ``c`` is ``disc_offset + c``), then
    ``[sep, v_1 .. v_{M-1}]`` predicts ``[v_1 .. v_M]`` (VQ code ``v`` is ``vq_offset + v``)."""

    gpt: GPTConfig = field(default_factory=GPTConfig)
    vq_offset: int = 0
    disc_offset: int = 512
    sep_id: int = 1024


@dataclass
class SamplingConfig:
    """Defaults the app and CLIs start from; ``cfg_scale`` is the classifier-free guidance scale."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float | None = None
    stage2_temperature: float = 1.0
    stage2_top_k: int | None = None
    stage2_top_p: float | None = 0.8


RENAMED_SAMPLING = {"cfg": "cfg_scale"}
"""Old names of sampling settings -> their names now. ``DiGITConfig.from_dict`` reads a config's
``sampling`` section under either (bundle formats 3 and 4 wrote ``cfg``); the flows take the old
keyword with a DeprecationWarning."""

TOKENS = ("disc", "vq")
LAYOUTS = ("ours", "fairseq")   # how the token ids are numbered: digit_core.layout, presets.our_layout / fairseq_layout


@dataclass
class DiGITConfig:
    """A whole DiGIT model: tokenizer (encoder + codebook), both stages and the VQGAN.

    ``tokens="vq"`` is the paper's baseline instead (Table 3a): one GPT over the VQGAN's own ids,
    whose codes the VQ decoder renders directly. It has no discriminative tokenizer and no stage
    2 (``encoder``, ``codebook`` and ``stage2`` are None); its stage-1 grid is the VQ grid.
    """

    name: str = "digit"
    image_size: int = 32
    channels: int = 3              # 1 for grey data (returned as 3 equal channels)
    tokens: str = "disc"           # what stage 1 generates: "disc" (DiGIT) or "vq" (VQ-AR baseline)
    layout: str = "ours"           # the token layout that numbers the ids: "ours" or "fairseq" (the official models)
    encoder: EncoderConfig | None = field(default_factory=EncoderConfig)
    codebook: CodebookConfig | None = field(default_factory=CodebookConfig)
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config | None = field(default_factory=Stage2Config)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    class_names: list[str] = field(default_factory=list)

    # -- derived sizes ---------------------------------------------------------------------
    @property
    def is_vq(self) -> bool:
        """A VQ-token model (the baseline): stage 1 generates VQ ids, there is no stage 2."""
        return self.tokens == "vq"

    @property
    def disc_grid(self) -> int:
        """Side of the stage-1 token grid: the encoder's (the VQGAN's for a VQ-token model)."""
        return self.vqgan.grid if self.is_vq else self.encoder.grid

    @property
    def stage1_vocab(self) -> int:
        """How many codes stage 1 draws from: K-Means clusters, or VQ codes for a VQ-token model."""
        return self.stage1.gpt.num_out

    @property
    def vq_grid(self) -> int:
        return self.vqgan.grid

    @property
    def stage1_positions(self) -> int:
        """Positions one stage-1 generation fills (the first token, then N - 1 codes): its KV cache length."""
        return self.disc_grid ** 2

    @property
    def stage2_positions(self) -> int:
        """Positions one stage-2 generation of a DiGIT model fills (N discriminative tokens, the separator, M - 1 VQ
        codes): its KV cache length. The official models' position tables are longer (1024 + the
        prefix); a cache of the whole table would make every decoding step read 2.5-4x more."""
        return self.disc_grid ** 2 + self.vq_grid ** 2

    def validate(self) -> "DiGITConfig":
        """Raise ConfigError naming the first inconsistency between the parts."""
        if self.tokens not in TOKENS:
            raise ConfigError(f"{self.name}: tokens must be one of {TOKENS}, got {self.tokens!r}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"{self.name}: layout must be one of {LAYOUTS}, got {self.layout!r}")
        parts = {"encoder": self.encoder, "codebook": self.codebook, "stage2": self.stage2}
        if self.is_vq:
            extra = [k for k, v in parts.items() if v is not None]
            if extra:
                raise ConfigError(f"{self.name}: a VQ-token model (tokens='vq') has no {', '.join(extra)}: set them to null")
        elif None in parts.values():
            raise ConfigError(f"{self.name}: a DiGIT model needs {', '.join(k for k, v in parts.items() if v is None)}")
        checks = self._vq_checks() if self.is_vq else self._disc_checks()
        for g in (self.stage1.gpt,) + (() if self.is_vq else (self.stage2.gpt,)):
            checks.append((g.d_model % g.n_head == 0, f"gpt d_model {g.d_model} not divisible by n_head {g.n_head}"))
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"{self.name}: {msg}")
        return self

    def _common_checks(self, vocab: int, source: str) -> list[tuple[bool, str]]:
        """Checks of the VQGAN and of stage 1 over ``vocab`` codes (``source`` says whose), shared by both kinds."""
        vq, s1 = self.vqgan, self.stage1
        return [
            (vq.resolution == self.image_size, f"vqgan.resolution {vq.resolution} != image_size {self.image_size}"),
            (self.channels in (1, 3), f"channels must be 1 or 3, got {self.channels}"),
            (vq.resolution % 2 ** (len(vq.ch_mult) - 1) == 0, "vqgan.resolution is not divisible by its downsampling"),
            (s1.gpt.num_out == vocab, f"stage1.gpt.num_out {s1.gpt.num_out} != {source} {vocab}"),
            (s1.gpt.max_len >= self.disc_grid ** 2, f"stage1.gpt.max_len {s1.gpt.max_len} < {self.disc_grid ** 2} tokens"),
            (s1.gpt.prefix_len == 0, "stage1 takes no prefix"),
            (s1.code_offset + vocab <= s1.gpt.vocab_size, "stage1 codes exceed its vocabulary"),
            (s1.gpt.out_offset + s1.gpt.num_out <= s1.gpt.out_vocab, "stage1 output slice exceeds out_vocab"),
            (s1.num_classes == 0 or s1.class_offset + s1.num_classes <= s1.gpt.vocab_size,
             "stage1 class tokens exceed its vocabulary"),
            (s1.null_class_id is None or s1.null_class_id < s1.gpt.vocab_size, "stage1 null class id outside its vocabulary"),
            (0 <= s1.bos_id < s1.gpt.vocab_size, "stage1 bos id outside its vocabulary"),
            (not self.class_names or len(self.class_names) == s1.num_classes,
             f"{len(self.class_names)} class names for {s1.num_classes} classes"),
        ]

    def _vq_checks(self) -> list[tuple[bool, str]]:
        return self._common_checks(self.vqgan.n_embed, "vqgan.n_embed")

    def _disc_checks(self) -> list[tuple[bool, str]]:
        e, cb, vq, s2 = self.encoder, self.codebook, self.vqgan, self.stage2
        return self._common_checks(cb.size, "codebook.size") + [
            (e.image_size == self.image_size, f"encoder.image_size {e.image_size} != image_size {self.image_size}"),
            (e.model_size % e.patch_size == 0, f"encoder.model_size {e.model_size} is not a multiple of patch_size {e.patch_size}"),
            (e.stem in ("patch", "conv"), f"encoder.stem must be 'patch' or 'conv', got {e.stem!r}"),
            (e.stem == "patch" or (e.patch_size & (e.patch_size - 1) == 0 and e.patch_size >= 2),
             f"encoder.stem='conv' needs a power-of-two patch_size >= 2, got {e.patch_size}"),
            (e.kind in ("dinov2", "vit", "cnn"), f"encoder.kind must be 'dinov2', 'vit' or 'cnn', got {e.kind!r}"),
            (e.kind == "cnn" or e.width % e.heads == 0, f"encoder.width {e.width} is not divisible by heads {e.heads}"),
            (-e.depth <= e.feature_block < e.depth, f"encoder.feature_block {e.feature_block} outside depth {e.depth}"),
            (e.kind != "cnn" or (len(e.cnn_channels) == len(e.cnn_strides) > 0 and set(e.cnn_strides) <= {1, 2}
                                 and math.prod(e.cnn_strides) == e.patch_size and e.cnn_channels[-1] == e.width),
             f"encoder.kind='cnn' needs as many cnn_channels as cnn_strides (each 1 or 2), strides multiplying to "
             f"patch_size {e.patch_size} and cnn_channels[-1] == width {e.width}; got {e.cnn_channels} / {e.cnn_strides}"),
            (cb.dim == e.width, f"codebook.dim {cb.dim} != encoder.width {e.width}"),
            # stage 2
            (s2.gpt.prefix_len == self.disc_grid ** 2, f"stage2.gpt.prefix_len {s2.gpt.prefix_len} != {self.disc_grid ** 2}"),
            (s2.gpt.max_len >= self.vq_grid ** 2, f"stage2.gpt.max_len {s2.gpt.max_len} < {self.vq_grid ** 2} tokens"),
            (s2.gpt.num_out == vq.n_embed, f"stage2.gpt.num_out {s2.gpt.num_out} != vqgan.n_embed {vq.n_embed}"),
            (s2.vq_offset + vq.n_embed <= s2.gpt.vocab_size, "stage2 VQ codes exceed its vocabulary"),
            (s2.disc_offset + cb.size <= s2.gpt.vocab_size, "stage2 discriminative codes exceed its vocabulary"),
            (0 <= s2.sep_id < s2.gpt.vocab_size, "stage2 separator id outside its vocabulary"),
        ]

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiGITConfig":
        return _from_dict(cls, _current_sampling_names(d))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "DiGITConfig":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(d).validate()


def _current_sampling_names(d: Any) -> Any:
    """``d`` with the old key names of its ``sampling`` section (``RENAMED_SAMPLING``) replaced by
    the current ones; a section with both names of one setting is a ConfigError."""
    s = d.get("sampling") if isinstance(d, dict) else None
    if not isinstance(s, dict):
        return d
    for old, new in RENAMED_SAMPLING.items():
        if old in s and new in s:
            raise ConfigError(f"SamplingConfig: both {new} and {old} (its old name) are set; keep {new} only")
    return {**d, "sampling": {RENAMED_SAMPLING.get(k, k): v for k, v in s.items()}}


def _from_dict(cls: type, d: Any) -> Any:
    """Build a (nested) dataclass from a dict, rejecting unknown keys by name; which fields are
    nested dataclasses (or tuples) is read from the type hints, so new sections need no table."""
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__}: expected an object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {unknown}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        sub = _dataclass_in(hints[k])
        if sub is not None and v is not None:
            kwargs[k] = _from_dict(sub, v)
        elif isinstance(v, list) and _is_tuple(hints[k]):
            kwargs[k] = tuple(v)
        else:
            kwargs[k] = v
    return cls(**kwargs)


def _members(hint: Any) -> tuple[Any, ...]:
    """``X | None`` -> (X, NoneType); any other hint -> (hint,)."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _dataclass_in(hint: Any) -> type | None:
    return next((h for h in _members(hint) if dataclasses.is_dataclass(h)), None)


def _is_tuple(hint: Any) -> bool:
    return any(h is tuple or typing.get_origin(h) is tuple for h in _members(hint))
