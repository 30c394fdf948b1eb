"""Convert the official DiGIT ImageNet release to our model directory, without fairseq.

Inputs (see docs/official-release.md): the fairseq stage-1 and stage-2 checkpoints, which
also embed the frozen DINOv2-reg4 weights (``pretrained_encoder.*``), the K-Means centroids
(``centroids`` [d, K] + ``centroid_norm`` [1, K]) and, in stage 2, MAGE's VQGAN (``vqgan.*``).
Separate files (``km_8k.npy``, ``dinov2_vitb14_reg4_pretrain.pth``, ``vqgan_jax_strongaug.ckpt``)
may replace the embedded copies. Output: ``DiGIT.save`` (config.json + model.safetensors).

    python -m digit_core.convert --size base --class-conditional --download --out models/digit-base-imagenet-cls
    python -m digit_core.convert --stage1 s1.pt --stage2 s2.pt --out models/digit-base-imagenet

Checkpoints are read with ``torch.load(weights_only=True)`` and an allow-list of the few
harmless globals fairseq pickles; anything else is refused unless ``--trust-pickle`` is given.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoints import ConvertError, load_checkpoint
from .codebook import Codebook
from .config import DiGITConfig, GPTConfig
from .encoders import load_dinov2_weights
from .pipeline import DiGIT
from .presets import FAIRSEQ_SPECIALS, imagenet_base, imagenet_large

HUB_REPO = "DAMO-NLP-SG/DiGIT"
STAGE1_RUNS = {  # (size, class-conditional) -> default run; the *_400epoch runs can be chosen with --stage1-run
    ("base", False): "base_8k_stage1", ("base", True): "base_8k_stage1_cls",
    ("large", False): "large_16k_stage1", ("large", True): "large_16k_stage1_cls",
}
STAGE2_RUNS = {"base": "base_8k_stage2_400epoch", "large": "large_16k_stage2"}
EXTRA_RUNS = ("base_8k_stage1_400epoch", "base_8k_stage1_cls_400epoch")
# Where the centroids may be, first found wins: the hub's listing (dataset/...), then the layout
# its README describes (data/...). Optional: the checkpoints embed the same centroids.
KM_FILES = {size: tuple(f"{top}/ILSVRC2012/dinov2_{size}_short_224_l3/km_{k}.npy" for top in ("dataset", "data"))
            for size, k in (("base", "8k"), ("large", "16k"))}
SIZE_BY_CODES = {8192: "base", 16000: "large"}
IMAGENET_CLASSES = 1000


def run_path(run: str) -> str:
    """Path of a run's checkpoint inside the hub repository."""
    return f"outputs/{run}/checkpoints/checkpoint_last.pt"


# fairseq's stage-2 decoder (the official TransformerDecoder2pos) keeps fairseq's own
# `embed_positions` for `</s>` + VQ tokens (the only table incremental decoding uses) and adds
# `embed_positions_1` for the prefix of discriminative tokens. Both start at row 2.
FAIRSEQ_MAIN_POS = "decoder.embed_positions.weight"
FAIRSEQ_PREFIX_POS = "decoder.embed_positions_1.weight"
FAIRSEQ_TOP = {  # fairseq name -> ours (no layer index)
    "decoder.embed_tokens.weight": "tok_emb.weight",
    FAIRSEQ_MAIN_POS: "pos_main",
    FAIRSEQ_PREFIX_POS: "pos_prefix",
    "decoder.layer_norm.weight": "ln_f.weight",
    "decoder.layer_norm.bias": "ln_f.bias",
    "decoder.output_projection.weight": "head.weight",
}
FAIRSEQ_LAYER = {  # per-layer module names; q/k/v are fused separately
    "self_attn.out_proj": "attn.proj", "self_attn_layer_norm": "ln1", "final_layer_norm": "ln2", "fc1": "fc1", "fc2": "fc2",
}
FAIRSEQ_IGNORED = {"decoder.version"}  # fairseq's bookkeeping buffer
_LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass
class FairseqCheckpoint:
    """A fairseq checkpoint's weights and its model options (``cfg['model']`` or legacy ``args``)."""

    path: str
    state: dict[str, torch.Tensor]
    options: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path, trust_pickle: bool = False) -> "FairseqCheckpoint":
        ckpt = load_checkpoint(path, trust_pickle)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise ConvertError(f"{path}: not a fairseq checkpoint (no 'model' state dict)")
        opts = (ckpt.get("cfg") or {}).get("model") or ckpt.get("args") or {}
        opts = vars(opts) if isinstance(opts, argparse.Namespace) else dict(opts)
        state = {k: v for k, v in ckpt["model"].items() if torch.is_tensor(v)}
        return cls(str(path), state, opts)

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix.`` with the prefix removed."""
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.state.items() if k.startswith(prefix + ".")}

    @property
    def stage(self) -> int:
        return 2 if FAIRSEQ_PREFIX_POS in self.state or self.options.get("_name") == "st2vtlm" else 1


# -- architecture ------------------------------------------------------------------------------
def infer_gpt(ckpt: FairseqCheckpoint) -> dict[str, Any]:
    """GPT sizes and layout read from tensor shapes (heads from the options, which shapes cannot tell)."""
    s = ckpt.state
    for k in ("decoder.embed_tokens.weight", "decoder.output_projection.weight", "decoder.layers.0.fc1.weight"):
        if k not in s:
            raise ConvertError(f"{ckpt.path}: no {k}; not a DiGIT fairseq decoder checkpoint")
    layers = {int(m.group(1)) for k in s if (m := _LAYER_KEY.match(k))}
    d_ff, d_model = s["decoder.layers.0.fc1.weight"].shape
    heads = ckpt.options.get("decoder_attention_heads")
    return dict(
        n_layer=len(layers), d_model=d_model, d_ff=d_ff, n_head=heads,
        vocab_size=s["decoder.embed_tokens.weight"].shape[0], out_vocab=s["decoder.output_projection.weight"].shape[0],
        norm_first=bool(ckpt.options.get("decoder_normalize_before", ckpt.stage == 2)),
        final_norm="decoder.layer_norm.weight" in s,
    )


def official_config(stage1: FairseqCheckpoint) -> DiGITConfig:
    """The preset (base or large, conditional or not) that a stage-1 checkpoint belongs to."""
    g = infer_gpt(stage1)
    K = g["out_vocab"] - FAIRSEQ_SPECIALS
    C = g["vocab_size"] - g["out_vocab"]
    if K not in SIZE_BY_CODES or C not in (0, IMAGENET_CLASSES):
        raise ConvertError(f"{stage1.path}: {K} codes and {C} class rows match no official model "
                           f"(codes {sorted(SIZE_BY_CODES)}, classes 0 or {IMAGENET_CLASSES})")
    return (imagenet_base if SIZE_BY_CODES[K] == "base" else imagenet_large)(class_conditional=C > 0)


def check_stage(ckpt: FairseqCheckpoint, stage: int) -> None:
    """Fail clearly when a stage-2 file is given as stage 1 or the reverse, and on unknown parts."""
    if ckpt.stage != stage:
        raise ConvertError(f"{ckpt.path} is a stage-{ckpt.stage} checkpoint "
                           f"(model {ckpt.options.get('_name', '?')!r}), passed as stage {stage}")
    # A part we do not know of: better to stop than to drop it silently.
    known = ("decoder.", "pretrained_encoder.", "centroids", "centroid_norm") + (("vqgan.",) if stage == 2 else ())
    unknown = sorted(k for k in ckpt.state if not k.startswith(known))
    if unknown:
        raise ConvertError(f"{ckpt.path}: unexpected tensors {unknown[:20]}{' ...' if len(unknown) > 20 else ''}")


def check_checkpoint(ckpt: FairseqCheckpoint, stage: int, expected: GPTConfig) -> None:
    """Fail clearly when the sizes or options of a stage's decoder differ from ``expected``."""
    check_stage(ckpt, stage)
    found = infer_gpt(ckpt)
    if found["n_head"] is None:
        print(f"note: {ckpt.path} gives no decoder_attention_heads; assuming {expected.n_head}", file=sys.stderr)
        found["n_head"] = expected.n_head
    diffs = [f"{k}: checkpoint {v} vs ours {getattr(expected, k)}" for k, v in found.items() if v != getattr(expected, k)]
    # Options our GPT hard-codes; checked only when the checkpoint records them.
    fixed = dict(activation_fn="gelu", decoder_learned_pos=True, no_scale_embedding=False,
                 share_decoder_input_output_embed=False, layernorm_embedding=False)
    diffs += [f"{k}: checkpoint {ckpt.options[k]!r} vs ours {v!r}" for k, v in fixed.items()
              if k in ckpt.options and ckpt.options[k] != v]
    if diffs:
        raise ConvertError(f"{ckpt.path}: stage-{stage} architecture differs from the config: " + "; ".join(diffs)
                           + " (wrong file, or a preset in digit_core/presets.py to correct; --config takes another)")


# -- key mapping -------------------------------------------------------------------------------
def fairseq_keys(cfg: GPTConfig) -> set[str]:
    """Every decoder tensor name a fairseq checkpoint for ``cfg`` holds."""
    keys = {k for k, ours in FAIRSEQ_TOP.items()
            if (cfg.final_norm or not ours.startswith("ln_f")) and (cfg.prefix_len or ours != "pos_prefix")}
    for i in range(cfg.n_layer):
        mods = [f"self_attn.{p}_proj" for p in "qkv"] + list(FAIRSEQ_LAYER)
        keys |= {f"decoder.layers.{i}.{m}.{wb}" for m in mods for wb in ("weight", "bias")}
    return keys


def convert_gpt_state(ckpt: FairseqCheckpoint, gpt: nn.Module) -> dict[str, torch.Tensor]:
    """fairseq decoder tensors -> our GPT's state dict (q, k, v fused; position tables cut to size)."""
    cfg: GPTConfig = gpt.cfg
    decoder = {k: v for k, v in ckpt.state.items() if k.startswith("decoder.") and k not in FAIRSEQ_IGNORED}
    want = fairseq_keys(cfg)
    missing, unexpected = sorted(want - set(decoder)), sorted(set(decoder) - want)
    if missing or unexpected:
        raise ConvertError(f"{ckpt.path}: decoder keys do not match stage-{ckpt.stage}: "
                           f"missing {missing}, unexpected {unexpected}")
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for k, v in decoder.items():
        v = v.float()
        if (m := _LAYER_KEY.match(k)) is None:
            out[FAIRSEQ_TOP[k]] = v
            continue
        i, mod, wb = int(m.group(1)), m.group(2), m.group(3)
        if mod.startswith("self_attn.") and mod[-6:] in ("q_proj", "k_proj", "v_proj"):
            qkv[(i, wb)][mod[-6]] = v
        else:
            out[f"blocks.{i}.{FAIRSEQ_LAYER[mod]}.{wb}"] = v
    for (i, wb), parts in qkv.items():
        # fairseq scales q by head_dim^-0.5 after q_proj (bias included), as our attention does,
        # so the weights concatenate unchanged.
        out[f"blocks.{i}.attn.qkv.{wb}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    # fairseq's tables hold max_positions + 2 rows (1026); ours hold what the config uses.
    for name in ("pos_main", "pos_prefix"):
        if name in out:
            rows = getattr(gpt, name).shape[0]
            if out[name].shape[0] < rows:
                raise ConvertError(f"{ckpt.path}: position table {name} has {out[name].shape[0]} rows, need {rows}")
            out[name] = out[name][:rows]
    _check_shapes(gpt, out, f"{ckpt.path} (stage {ckpt.stage})")
    return out


def _check_shapes(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ConvertError(f"{source}: missing {missing}, unexpected {unexpected}, shape mismatches {shapes}")


# -- the other parts ---------------------------------------------------------------------------
def load_vqgan_state(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A taming VQModel checkpoint (MAGE's ``vqgan_jax_strongaug.ckpt``), possibly under ``state_dict``.
    taming training checkpoints also carry the GAN/perceptual losses under ``loss.``: dropped."""
    ckpt = load_checkpoint(path, trust_pickle)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ConvertError(f"{path}: not a VQGAN state dict")
    return {k: v for k, v in state.items() if torch.is_tensor(v) and not k.startswith("loss.")}


def _centroids(ckpt: FairseqCheckpoint) -> Codebook | None:
    if "centroids" not in ckpt.state:
        return None
    return Codebook.from_official(ckpt.state["centroids"].float(), ckpt.state.get("centroid_norm"))


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names (WordNet lemmas, e.g. 'tench, Tinca tinca'), shipped with timm."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def convert(stage1: str | Path, stage2: str | Path, *, km: str | Path | None = None, dinov2: str | Path | None = None,
            vqgan: str | Path | None = None, config: DiGITConfig | None = None, trust_pickle: bool = False) -> DiGIT:
    """Build our DiGIT from the official files. ``config`` defaults to the preset the stage-1
    checkpoint belongs to; the checkpoints must match it. Explicit files replace the copies
    embedded in the checkpoints."""
    ck1 = FairseqCheckpoint.load(stage1, trust_pickle)
    ck2 = FairseqCheckpoint.load(stage2, trust_pickle)
    check_stage(ck1, 1)
    check_stage(ck2, 2)
    cfg = config or official_config(ck1)
    if cfg.stage1.num_classes == IMAGENET_CLASSES and not cfg.class_names:
        cfg = dataclasses.replace(cfg, class_names=imagenet_class_names())
    check_checkpoint(ck1, 1, cfg.stage1.gpt)
    check_checkpoint(ck2, 2, cfg.stage2.gpt)
    model = DiGIT(cfg)
    model.stage1.load_state_dict(convert_gpt_state(ck1, model.stage1))
    model.stage2.load_state_dict(convert_gpt_state(ck2, model.stage2))

    # Codebook: the km file first (full precision even if a checkpoint was saved in fp16); both
    # stages were trained on the same tokens, so every copy must agree.
    books = {str(km): Codebook.from_npy(km)} if km is not None else {}
    books |= {f"{c.path} centroids": b for c in (ck1, ck2) if (b := _centroids(c)) is not None}
    if not books:
        raise ConvertError("no centroids: the checkpoints embed none, pass --km km_8k.npy / km_16k.npy")
    (ref_name, ref), *others = books.items()
    for name, book in others:
        if book.centroids.shape != ref.centroids.shape or not torch.allclose(book.centroids, ref.centroids, 1e-3, 1e-4):
            raise ConvertError(f"{name} differ from {ref_name}: the files come from different tokenizers")
    model.codebook.set_centroids(ref.centroids)

    # DINOv2: the explicit official .pth, else the copy in stage 1 (same official key layout).
    enc = dinov2 if dinov2 is not None else ck1.part("pretrained_encoder")
    if not enc:
        raise ConvertError(f"{ck1.path} embeds no pretrained_encoder.* weights: pass --dinov2 dinov2_vit*14_reg4_pretrain.pth")
    load_dinov2_weights(model.encoder, enc)

    vq = load_vqgan_state(vqgan, trust_pickle) if vqgan is not None else ck2.part("vqgan")
    if not vq:
        raise ConvertError(f"{ck2.path} embeds no vqgan.* weights: pass --vqgan vqgan_jax_strongaug.ckpt")
    vq = {k: v.float() for k, v in vq.items()}
    _check_shapes(model.vqgan, vq, f"VQGAN from {vqgan or ck2.path}")
    model.vqgan.load_state_dict(vq)
    return model.eval()


# -- files -------------------------------------------------------------------------------------
def resolve_files(size: str, class_conditional: bool, *, source: str | Path | None = None,
                  stage1_run: str | None = None, stage2_run: str | None = None) -> dict[str, Path | None]:
    """Paths of the stage-1/stage-2 checkpoints and the centroids (``None`` when absent), from
    ``source`` (a local directory laid out like the hub repo) or the hub (resumable, cached;
    ``HF_HUB_OFFLINE=1`` uses the cache only)."""
    rel = {"stage1": (run_path(stage1_run or STAGE1_RUNS[(size, class_conditional)]),),
           "stage2": (run_path(stage2_run or STAGE2_RUNS[size]),), "km": KM_FILES[size]}
    if source is None:
        source = download(sorted(p for paths in rel.values() for p in paths))
    root = Path(source)
    paths = {k: next((root / r for r in rels if (root / r).is_file()), None) for k, rels in rel.items()}
    missing = [rel[k][0] for k in ("stage1", "stage2") if paths[k] is None]
    if missing:
        raise FileNotFoundError(f"{root}: missing {missing} (expected the layout of hf.co/{HUB_REPO}: "
                                f"{rel['stage1'][0]}, {rel['stage2'][0]} and optionally {' or '.join(rel['km'])})")
    return paths


def download(files: list[str]) -> str:
    """The local snapshot of ``files`` from the hub (huggingface_hub's cache); when the hub cannot
    be reached and the cache lacks them, a ConvertError that says what to do instead."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(HUB_REPO, allow_patterns=files)
    except OSError as err:   # huggingface_hub's LocalEntryNotFoundError, OfflineModeIsEnabled, HTTP errors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConvertError(
            f"could not download the checkpoints from hf.co/{HUB_REPO} ({first[:300]}). Without network: pass "
            f"--source DIR, a local copy laid out like the hub repository ({', '.join(files)}), or set "
            "HF_HUB_OFFLINE=1 with a huggingface_hub cache that already holds them (HF_HOME).") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="model directory to write (config.json + model.safetensors)")
    p.add_argument("--stage1", help="stage-1 fairseq checkpoint (checkpoint_last.pt)")
    p.add_argument("--stage2", help="stage-2 fairseq checkpoint")
    p.add_argument("--km", help="km_8k.npy / km_16k.npy [K, d] (default: the centroids embedded in the checkpoints)")
    p.add_argument("--dinov2", help="official dinov2_vit*14_reg4_pretrain.pth (default: the copy in stage 1)")
    p.add_argument("--vqgan", help="MAGE vqgan_jax_strongaug.ckpt (default: the copy in stage 2)")
    p.add_argument("--download", action="store_true", help=f"fetch the checkpoints from hf.co/{HUB_REPO}")
    p.add_argument("--source", help="a local directory laid out like the hub repo, instead of downloading")
    p.add_argument("--size", choices=["base", "large"], default="base", help="with --download/--source")
    p.add_argument("--class-conditional", action="store_true", help="with --download/--source")
    p.add_argument("--stage1-run", choices=sorted(set(STAGE1_RUNS.values()) | set(EXTRA_RUNS)))
    p.add_argument("--stage2-run", choices=sorted(STAGE2_RUNS.values()))
    p.add_argument("--config", help="config.json of the target model, for fairseq-layout models other than the "
                                    "official presets (default: the preset matching the stage-1 checkpoint)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle without restrictions (can execute arbitrary code; only for trusted files)")
    p.add_argument("--export", help="also write the ONNX bundle here, e.g. exported/digit-base-imagenet")
    a = p.parse_args(argv)
    if not (a.stage1 and a.stage2 or a.download or a.source):
        p.error("give --stage1 and --stage2, or --download / --source")
    try:
        stage1, stage2, km = a.stage1, a.stage2, a.km
        if a.download or a.source:
            files = resolve_files(a.size, a.class_conditional, source=a.source, stage1_run=a.stage1_run,
                                  stage2_run=a.stage2_run)
            stage1, stage2, km = stage1 or files["stage1"], stage2 or files["stage2"], km or files["km"]
        config = DiGITConfig.load(a.config) if a.config else None
        model = convert(stage1, stage2, km=km, dinov2=a.dinov2, vqgan=a.vqgan, config=config, trust_pickle=a.trust_pickle)
    except (ValueError, OSError) as err:  # ours, the loaders' and huggingface_hub's (offline, missing files)
        sys.exit(f"error: {err}")
    model.save(a.out)
    c = model.config
    print(f"wrote {a.out}: {c.name}, K={c.codebook.size}, classes={c.stage1.num_classes}, "
          f"stage1 {model.stage1.num_params() / 1e6:.1f}M, stage2 {model.stage2.num_params() / 1e6:.1f}M params")
    if a.export:
        from .export import export_bundle  # imported here: only exporting needs onnx

        export_bundle(model, a.export)
        print(f"wrote the bundle {a.export}")


if __name__ == "__main__":
    main()
