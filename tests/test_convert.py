"""Official fairseq checkpoints -> our model: synthetic checkpoints with the official key names
and layout at tiny widths, checked against an independent re-implementation of fairseq's
decoder forward (written from fairseq's TransformerDecoder / TransformerDecoderLayer /
MultiheadAttention / LearnedPositionalEmbedding definitions)."""
from __future__ import annotations

import argparse
import collections
import json
import math
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from digit_core import checkpoints
from digit_core import convert as cv
from digit_core.config import DiGITConfig, EncoderConfig, GPTConfig, VQGANConfig
from digit_core.presets import fairseq_layout
from digit_core.gpt import GPT
from digit_core.pipeline import DiGIT
from digit_core.runtime import Bundle

K, C = 16, 3            # codes, classes
POS_ROWS = 40           # fairseq tables are bigger than our configs need (1026 in the release)


def tiny_official(num_classes: int = C) -> DiGITConfig:
    """The official token layout at tiny sizes: 4x4 token grids on both sides."""
    enc = EncoderConfig(kind="dinov2", image_size=32, model_size=28, patch_size=7, width=32, depth=3, heads=2,
                        num_registers=4, layerscale=1.0, feature_block=0, final_norm=True, pos_table_size=6)
    vq = VQGANConfig(arch="mage", resolution=32, ch=8, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                     z_channels=8, n_embed=32, embed_dim=8, norm_groups=8)
    gpt = dict(n_layer=2, n_head=2, d_model=32, d_ff=64, max_len=16)
    return fairseq_layout("tiny-official", enc, K, vq, num_classes, gpt, gpt,
                          class_names=[f"class {i}" for i in range(num_classes)])


# -- synthetic fairseq checkpoints -------------------------------------------------------------
def fairseq_decoder(g: GPTConfig, stage: int, seed: int = 0, pos_rows: int = POS_ROWS,
                    meta: bool = False) -> dict[str, torch.Tensor]:
    """Random decoder tensors under fairseq's names and shapes (``meta``: shapes only)."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape: int, s: float = 0.2) -> torch.Tensor:
        return torch.empty(shape, device="meta") if meta else torch.randn(*shape, generator=gen) * s

    d, ff = g.d_model, g.d_ff
    sd = {"decoder.embed_tokens.weight": r(g.vocab_size, d, s=0.1), "decoder.embed_positions.weight": r(pos_rows, d),
          "decoder.output_projection.weight": r(g.out_vocab, d), "decoder.version": torch.tensor([3.0])}
    if stage == 2:
        sd["decoder.embed_positions_1.weight"] = r(pos_rows, d)
        sd["decoder.layer_norm.weight"], sd["decoder.layer_norm.bias"] = 1 + r(d), r(d)
    for i in range(g.n_layer):
        p = f"decoder.layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{m}.weight"], sd[p + f"self_attn.{m}.bias"] = r(d, d), r(d)
        for m in ("self_attn_layer_norm", "final_layer_norm"):
            sd[p + f"{m}.weight"], sd[p + f"{m}.bias"] = 1 + r(d), r(d)
        sd[p + "fc1.weight"], sd[p + "fc1.bias"] = r(ff, d), r(ff)
        sd[p + "fc2.weight"], sd[p + "fc2.bias"] = r(d, ff), r(d)
    return sd


def fairseq_options(g: GPTConfig, stage: int, num_classes: int = 0) -> dict:
    return {"_name": "stlm" if stage == 1 else "st2vtlm", "decoder_layers": g.n_layer, "decoder_embed_dim": g.d_model,
            "decoder_ffn_embed_dim": g.d_ff, "decoder_attention_heads": g.n_head, "activation_fn": "gelu",
            "decoder_learned_pos": True, "decoder_normalize_before": stage == 2, "class_conditional": num_classes > 0}


def dinov2_official(e: EncoderConfig, seed: int = 3) -> dict[str, torch.Tensor]:
    """facebookresearch DINOv2-reg layout (block_chunks=0), as embedded under pretrained_encoder.*."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.05  # noqa: E731
    d, ff = e.width, int(e.width * e.mlp_ratio)
    sd = {"cls_token": r(1, 1, d), "pos_embed": r(1, 1 + e.pos_table_size ** 2, d), "register_tokens": r(1, e.num_registers, d),
          "mask_token": r(1, d), "patch_embed.proj.weight": r(d, 3, e.patch_size, e.patch_size), "patch_embed.proj.bias": r(d),
          "norm.weight": 1 + r(d), "norm.bias": r(d)}
    for i in range(e.depth):
        p = f"blocks.{i}."
        sd |= {p + "norm1.weight": 1 + r(d), p + "norm1.bias": r(d), p + "attn.qkv.weight": r(3 * d, d),
               p + "attn.qkv.bias": r(3 * d), p + "attn.proj.weight": r(d, d), p + "attn.proj.bias": r(d),
               p + "ls1.gamma": 1 + r(d), p + "norm2.weight": 1 + r(d), p + "norm2.bias": r(d),
               p + "mlp.fc1.weight": r(ff, d), p + "mlp.fc1.bias": r(ff), p + "mlp.fc2.weight": r(d, ff),
               p + "mlp.fc2.bias": r(d), p + "ls2.gamma": 1 + r(d)}
    return sd


def fixed_centroids(cfg: DiGITConfig) -> torch.Tensor:
    """The [K, d] centroids every synthetic checkpoint embeds."""
    return torch.randn(K, cfg.codebook.dim, generator=torch.Generator().manual_seed(7))


def save_fairseq(path: Path, cfg: DiGITConfig, stage: int, extra: dict | None = None, seed: int = 0) -> dict:
    """A checkpoint as fairseq writes it: cfg dict, legacy argparse args, numpy scalars in the
    trainer state, plus the frozen parts the official models embed."""
    g = cfg.stage1.gpt if stage == 1 else cfg.stage2.gpt
    sd = fairseq_decoder(g, stage, seed)
    centroids = fixed_centroids(cfg)
    sd["centroids"] = centroids.t().contiguous()                  # stored transposed [d, K]
    sd["centroid_norm"] = centroids.pow(2).sum(1)[None]           # [1, K]
    sd |= {f"pretrained_encoder.{k}": v for k, v in dinov2_official(cfg.encoder).items()}
    if stage == 2:
        torch.manual_seed(5)
        sd |= {f"vqgan.{k}": v for k, v in DiGIT(cfg).vqgan.state_dict().items()}
    sd |= extra or {}
    opts = fairseq_options(g, stage, cfg.stage1.num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd, "cfg": {"model": opts, "task": {"_name": f"image_generation_stage{stage}"}},
                "args": argparse.Namespace(**opts), "optimizer_history": [{"num_updates": np.int64(10)}],
                "extra_state": {"metrics": collections.OrderedDict(loss=np.float64(1.5)), "val": np.arange(3)}}, path)
    return sd


# -- an independent fairseq decoder forward ----------------------------------------------------
def fairseq_forward(sd: dict[str, torch.Tensor], tokens: torch.Tensor, n_head: int, prefix_len: int = 0) -> torch.Tensor:
    """fairseq TransformerDecoder over ``tokens``; stage 2 when ``embed_positions_1`` exists.

    Learned positions: LearnedPositionalEmbedding numbers tokens padding_idx + 1 + i = 2 + i;
    stage 2 numbers the prefix with embed_positions_1 and the rest (from </s>) with embed_positions.
    Stage 1 layers are post-LN (normalize_before False), stage 2 pre-LN with decoder.layer_norm.
    """
    sd = {k: v.double() for k, v in sd.items()}
    pre = "decoder.embed_positions_1.weight" in sd
    B, T = tokens.shape
    d = sd["decoder.embed_tokens.weight"].shape[1]
    x = math.sqrt(d) * sd["decoder.embed_tokens.weight"][tokens]
    if pre:
        pos = torch.cat([sd["decoder.embed_positions_1.weight"][2 + torch.arange(prefix_len)],
                         sd["decoder.embed_positions.weight"][2 + torch.arange(T - prefix_len)]])
    else:
        pos = sd["decoder.embed_positions.weight"][2 + torch.arange(T)]
    x = x + pos
    future = torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), 1)
    hd = d // n_head
    L = len({k.split(".")[2] for k in sd if k.startswith("decoder.layers.")})

    def lin(h, name):
        return F.linear(h, sd[name + ".weight"], sd[name + ".bias"])

    def ln(h, name):
        return F.layer_norm(h, (d,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    def self_attn(h, p):
        q = lin(h, p + "self_attn.q_proj") * hd ** -0.5          # fairseq scales q after q_proj
        k, v = lin(h, p + "self_attn.k_proj"), lin(h, p + "self_attn.v_proj")
        split = lambda t: t.view(B, T, n_head, hd).transpose(1, 2)  # noqa: E731
        w = torch.softmax(split(q) @ split(k).transpose(-1, -2) + future, -1)
        return lin((w @ split(v)).transpose(1, 2).reshape(B, T, d), p + "self_attn.out_proj")

    for i in range(L):
        p = f"decoder.layers.{i}."
        ffn = lambda h: lin(F.gelu(lin(h, p + "fc1")), p + "fc2")  # noqa: E731
        if pre:
            x = x + self_attn(ln(x, p + "self_attn_layer_norm"), p)
            x = x + ffn(ln(x, p + "final_layer_norm"))
        else:
            x = ln(x + self_attn(x, p), p + "self_attn_layer_norm")
            x = ln(x + ffn(x), p + "final_layer_norm")
    if "decoder.layer_norm.weight" in sd:
        x = ln(x, "decoder.layer_norm")
    return x @ sd["decoder.output_projection.weight"].t()


def _converted(path: Path, g: GPTConfig, stage: int) -> GPT:
    ck = cv.FairseqCheckpoint.load(path)
    cv.check_checkpoint(ck, stage, g)
    gpt = GPT(g).eval()
    gpt.load_state_dict(cv.convert_gpt_state(ck, gpt))
    return gpt


# -- logits against the reference -------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [C, 0])
def test_stage1_logits_match_fairseq(tmp_path: Path, num_classes: int) -> None:
    cfg = tiny_official(num_classes)
    s1, g = cfg.stage1, cfg.stage1.gpt
    # fairseq layout: 5 specials, code c -> c + 5, class -> len(dict) + class, </s> = 2 first
    assert (s1.code_offset, s1.bos_id, g.out_vocab, g.vocab_size) == (5, 2, K + 5, K + 5 + num_classes)
    assert num_classes == 0 or s1.class_offset == K + 5
    sd = save_fairseq(tmp_path / "s1.pt", cfg, 1)
    gpt = _converted(tmp_path / "s1.pt", g, 1)
    codes = torch.randint(0, K, (3, 16), generator=torch.Generator().manual_seed(1))
    first = s1.class_offset + torch.tensor([0, 2, 1]) if num_classes else torch.full((3,), s1.bos_id)
    tokens = torch.cat([first[:, None], codes[:, :-1] + s1.code_offset], 1)
    ref = fairseq_forward(sd, tokens, g.n_head)
    with torch.no_grad():
        ours = gpt(tokens).double()
        cache = gpt.new_cache(3)   # decoding with the KV cache, as the flows do
        steps = torch.cat([gpt(tokens[:, :4], 0, cache)] + [gpt(tokens[:, t:t + 1], t, cache) for t in range(4, 16)], 1)
    assert (ours - ref).abs().max() < 1e-5
    assert (steps.double() - ref).abs().max() < 1e-5


def test_stage2_logits_match_fairseq(tmp_path: Path) -> None:
    cfg = tiny_official()
    s2, g = cfg.stage2, cfg.stage2.gpt
    V = cfg.vqgan.n_embed
    assert (s2.vq_offset, s2.disc_offset, s2.sep_id, g.out_vocab, g.vocab_size) == (5, V + 10, 2, V + 5, V + 5 + K + 5)
    sd = save_fairseq(tmp_path / "s2.pt", cfg, 2)
    gpt = _converted(tmp_path / "s2.pt", g, 2)
    gen = torch.Generator().manual_seed(2)
    disc, vq = torch.randint(0, K, (2, 16), generator=gen), torch.randint(0, V, (2, 16), generator=gen)
    tokens = torch.cat([disc + s2.disc_offset, torch.full((2, 1), s2.sep_id), vq[:, :-1] + s2.vq_offset], 1)
    ref = fairseq_forward(sd, tokens, g.n_head, prefix_len=16)
    with torch.no_grad():
        ours = gpt(tokens).double()
    assert (ours - ref).abs().max() < 1e-5
    assert torch.equal(gpt.pos_prefix, sd["decoder.embed_positions_1.weight"][:18])  # the prefix table, cut to 16 + 2


# -- loading and errors ------------------------------------------------------------------------
class Payload:
    """A class no allow-list knows: stands for anything a malicious pickle might construct."""


def test_weights_only_and_trust_pickle(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tiny_official()
    save_fairseq(tmp_path / "ok.pt", cfg, 1)
    ck = cv.FairseqCheckpoint.load(tmp_path / "ok.pt")      # Namespace + numpy scalars: allowed
    assert ck.options["decoder_attention_heads"] == 2 and ck.stage == 1
    torch.save({"model": {}, "cfg": {"model": {}}, "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(cv.ConvertError, match=r"Payload.*--trust-pickle"):
        checkpoints.load_checkpoint(tmp_path / "evil.pt")
    assert isinstance(checkpoints.load_checkpoint(tmp_path / "evil.pt", trust_pickle=True)["evil"], Payload)
    assert "arbitrary code" in capsys.readouterr().err


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    cfg = tiny_official()
    sd = save_fairseq(tmp_path / "a.pt", cfg, 1, extra={"decoder.layers.0.self_attn.extra.weight": torch.zeros(1)})
    ck = cv.FairseqCheckpoint.load(tmp_path / "a.pt")
    del ck.state["decoder.layers.1.fc2.bias"]
    with pytest.raises(cv.ConvertError, match=r"missing \['decoder.layers.1.fc2.bias'\].*unexpected "
                                              r"\['decoder.layers.0.self_attn.extra.weight'\]"):
        cv.convert_gpt_state(ck, GPT(cfg.stage1.gpt))
    assert "decoder.version" in sd  # fairseq's buffer is ignored, not reported


def test_wrong_files_are_rejected(tmp_path: Path) -> None:
    cfg = tiny_official()
    save_fairseq(tmp_path / "s1.pt", cfg, 1)
    save_fairseq(tmp_path / "s2.pt", cfg, 2)
    with pytest.raises(cv.ConvertError, match="s2.pt is a stage-2 checkpoint .*passed as stage 1"):
        cv.convert(tmp_path / "s2.pt", tmp_path / "s1.pt", config=cfg)
    deeper = tiny_official()
    deeper.stage1.gpt.n_layer = 3
    with pytest.raises(cv.ConvertError, match="n_layer: checkpoint 2 vs ours 3"):
        cv.convert(tmp_path / "s1.pt", tmp_path / "s2.pt", config=deeper)
    with pytest.raises(cv.ConvertError, match="16 codes and 3 class rows match no official model"):
        cv.convert(tmp_path / "s1.pt", tmp_path / "s2.pt")   # no config: must be an official preset
    c = torch.randn(K, cfg.codebook.dim)  # a stage 2 trained on other centroids than stage 1
    save_fairseq(tmp_path / "s2b.pt", cfg, 2, extra={"centroids": c.t().contiguous(), "centroid_norm": c.pow(2).sum(1)[None]})
    with pytest.raises(cv.ConvertError, match="different tokenizers"):
        cv.convert(tmp_path / "s1.pt", tmp_path / "s2b.pt", config=cfg)


def test_imagenet_class_names() -> None:
    names = cv.imagenet_class_names()
    assert len(names) == 1000 and names[0].startswith("tench") and names[-1].startswith("toilet tissue")


def test_source_layout_end_to_end(tmp_path: Path) -> None:
    """`--source DIR` resolves the hub paths; the written directory opens and samples."""
    cfg = tiny_official()
    hub = tmp_path / "hub"
    save_fairseq(hub / cv.run_path(cv.STAGE1_RUNS[("base", True)]), cfg, 1)
    save_fairseq(hub / cv.run_path(cv.STAGE2_RUNS["base"]), cfg, 2, seed=1)
    km = hub / cv.KM_FILES["base"][0]   # the hub's dataset/... layout
    km.parent.mkdir(parents=True)
    np.save(km, fixed_centroids(cfg).numpy())   # found, checked against the embedded copies
    cfg.save(tmp_path / "layout.json")
    out, bundle = tmp_path / "model", tmp_path / "bundle"
    cv.main(["--source", str(hub), "--size", "base", "--class-conditional", "--config", str(tmp_path / "layout.json"),
             "--out", str(out), "--export", str(bundle)])
    model = DiGIT.load(out)
    assert json.loads((out / "config.json").read_text())["stage1"]["bos_id"] == 2
    imgs = model.sample(class_ids=[0, 2], seed=0, top_k=5)
    assert imgs.shape == (2, 32, 32, 3) and imgs.dtype == np.uint8
    ids = model.tokenize(imgs)[0]
    assert ids.shape == (2, 4, 4) and 0 <= ids.min() and ids.max() < K
    # the frozen parts come from the copies embedded in the checkpoints
    ck1 = cv.FairseqCheckpoint.load(hub / cv.run_path(cv.STAGE1_RUNS[("base", True)]))
    ck2 = cv.FairseqCheckpoint.load(hub / cv.run_path(cv.STAGE2_RUNS["base"]))
    assert torch.equal(model.codebook.centroids, ck1.state["centroids"].t())
    assert torch.equal(model.encoder.vit.blocks[2].attn.qkv.weight, ck1.state["pretrained_encoder.blocks.2.attn.qkv.weight"])
    assert torch.equal(model.vqgan.quantize.embedding.weight, ck2.state["vqgan.quantize.embedding.weight"])
    assert Bundle(bundle).sample(class_ids=[1], seed=0, top_k=5).shape == (1, 32, 32, 3)
    assert cv.resolve_files("base", True, source=hub)["km"] == km
    with pytest.raises(FileNotFoundError, match="base_8k_stage2_400epoch"):
        cv.resolve_files("base", False, source=tmp_path / "model")


def test_explicit_files_replace_embedded_copies(tmp_path: Path) -> None:
    cfg = tiny_official()
    save_fairseq(tmp_path / "s1.pt", cfg, 1)
    save_fairseq(tmp_path / "s2.pt", cfg, 2)
    np.save(tmp_path / "km.npy", fixed_centroids(cfg).numpy())
    dino = dinov2_official(cfg.encoder, seed=11)
    torch.save(dino, tmp_path / "dinov2.pth")
    torch.manual_seed(12)
    vq = DiGIT(cfg).vqgan.state_dict()
    # a taming training checkpoint: weights under state_dict, plus the GAN/perceptual losses
    torch.save({"state_dict": {**vq, "loss.discriminator.main.0.weight": torch.zeros(1)}}, tmp_path / "vqgan.ckpt")
    model = cv.convert(tmp_path / "s1.pt", tmp_path / "s2.pt", km=tmp_path / "km.npy", dinov2=tmp_path / "dinov2.pth",
                       vqgan=tmp_path / "vqgan.ckpt", config=cfg)
    assert torch.equal(model.encoder.vit.blocks[1].mlp.fc2.weight, dino["blocks.1.mlp.fc2.weight"])
    assert torch.equal(model.vqgan.decoder.conv_out.weight, vq["decoder.conv_out.weight"])
    assert torch.equal(model.codebook.centroids, fixed_centroids(cfg))



@pytest.mark.parametrize("size,num_classes,top_k", [("base", 1000, 300), ("base", 0, 200), ("large", 1000, 400)])
def test_release_shapes_fit_the_presets(size: str, num_classes: int, top_k: int) -> None:
    """The release's shapes (per the notes, on the meta device: nothing is allocated) select
    the right preset, pass its checks and map onto it."""
    d, L, codes = (1024, 16, 8192) if size == "base" else (1536, 24, 16000)
    cks = {}
    for stage, (rows, out) in ((1, (codes + 5 + num_classes, codes + 5)), (2, (1029 + codes + 5, 1029))):
        g = GPTConfig(vocab_size=rows, out_vocab=out, n_layer=L, n_head=16, d_model=d, d_ff=4 * d)
        cks[stage] = cv.FairseqCheckpoint(f"{size}-stage{stage}", fairseq_decoder(g, stage, pos_rows=1026, meta=True),
                                          fairseq_options(g, stage, num_classes))
    cfg = cv.official_config(cks[1])
    assert (cfg.codebook.size, cfg.stage1.num_classes, cfg.sampling.top_k, cfg.sampling.stage2_top_p) == \
        (codes, num_classes, top_k, 0.8)
    for stage, g in ((1, cfg.stage1.gpt), (2, cfg.stage2.gpt)):
        cv.check_checkpoint(cks[stage], stage, g)
        with torch.device("meta"):
            gpt = GPT(g)
        state = cv.convert_gpt_state(cks[stage], gpt)
        assert state["pos_main"].shape == (1026, d)
        assert stage == 1 or state["pos_prefix"].shape == (258, d)


# -- files that are not checkpoints, and finding the release ------------------------------------
def _not_checkpoints(tmp_path: Path) -> dict[str, Path]:
    torch.save({"model": {"w": torch.ones(4096)}}, tmp_path / "real.pt")
    raw = (tmp_path / "real.pt").read_bytes()
    files = {"truncated.pt": raw[: len(raw) // 2], "text.pt": b"model weights are elsewhere\n", "empty.pt": b"",
             "image.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as z:
        z.writestr("notes/readme.txt", "not a checkpoint")
    return {n: tmp_path / n for n in (*files, "plain.zip")}


@pytest.mark.parametrize("name, why", [("truncated.pt", "truncated or damaged zip"), ("text.pt", "starts with b'model we'"),
                                       ("empty.pt", "empty"), ("plain.zip", "without <dir>/data.pkl"),
                                       ("image.png", r"starts with b'\\x89PNG")])
def test_files_that_are_not_checkpoints(tmp_path: Path, name: str, why: str, capsys: pytest.CaptureFixture) -> None:
    """Named as such before any unpickling, and never told to lift the pickle protection."""
    path = _not_checkpoints(tmp_path)[name]
    with pytest.raises(cv.ConvertError, match=f"{re.escape(str(path))}: not a PyTorch checkpoint .*{why}") as err:
        checkpoints.load_checkpoint(path)
    assert "--trust-pickle" not in str(err.value)
    with pytest.raises(cv.ConvertError, match="not a PyTorch checkpoint"):   # nor with the protection off
        checkpoints.load_checkpoint(path, trust_pickle=True)
    with pytest.raises(SystemExit) as exit_:
        cv.main(["--stage1", str(path), "--stage2", str(path), "--out", str(tmp_path / "out")])
    assert "not a PyTorch checkpoint" in str(exit_.value.code) and "trust-pickle" not in str(exit_.value.code)


def test_damaged_pickle_inside_a_real_archive(tmp_path: Path) -> None:
    """A torch.save zip whose data.pkl is garbage: damaged, not 'refused' (no --trust-pickle hint)."""
    torch.save({"model": {"w": torch.ones(4)}}, tmp_path / "real.pt")
    with zipfile.ZipFile(tmp_path / "real.pt") as src, zipfile.ZipFile(tmp_path / "bad.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, b"\x80\x02garbage" if info.filename.endswith("data.pkl") else data)
    with pytest.raises(cv.ConvertError, match="bad.pt: a damaged PyTorch checkpoint") as err:
        checkpoints.load_checkpoint(tmp_path / "bad.pt")
    assert "--trust-pickle" not in str(err.value)


def test_both_centroid_layouts_are_found(tmp_path: Path) -> None:
    """The hub lists dataset/ILSVRC2012/...; its README writes data/ILSVRC2012/...: either is found."""
    for size in ("base", "large"):
        hub_path, readme_path = cv.KM_FILES[size]
        assert hub_path.startswith("dataset/ILSVRC2012/dinov2_") and readme_path.startswith("data/ILSVRC2012/dinov2_")
    cfg = tiny_official()
    for layout in cv.KM_FILES["base"]:
        hub = tmp_path / layout.split("/")[0]
        save_fairseq(hub / cv.run_path(cv.STAGE1_RUNS[("base", False)]), cfg, 1)
        save_fairseq(hub / cv.run_path(cv.STAGE2_RUNS["base"]), cfg, 2)
        (hub / layout).parent.mkdir(parents=True)
        np.save(hub / layout, fixed_centroids(cfg).numpy())
        assert cv.resolve_files("base", False, source=hub)["km"] == hub / layout
    with pytest.raises(FileNotFoundError) as err:
        cv.resolve_files("large", True, source=tmp_path / "dataset")
    for expected in (cv.run_path("large_16k_stage1_cls"), cv.run_path("large_16k_stage2"), *cv.KM_FILES["large"]):
        assert expected in str(err.value)


@pytest.mark.parametrize("offline", ["entry", "offline_mode", "connection"])
def test_download_without_network_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: str) -> None:
    """huggingface_hub's offline and connection errors become one message naming --source and
    HF_HUB_OFFLINE (the network is replaced by a stub that fails as the hub client does)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    errors = {"entry": LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub"),
              "offline_mode": OfflineModeIsEnabled("Cannot reach the hub: offline mode is enabled"),
              "connection": ConnectionError("[Errno -2] Name or service not known")}
    asked = []

    def no_network(repo_id: str, allow_patterns: list[str], **kw):
        asked.extend(allow_patterns)
        raise errors[offline]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(SystemExit) as exit_:
        cv.main(["--download", "--size", "base", "--out", str(tmp_path / "out")])
    msg = str(exit_.value.code)
    assert "--source DIR" in msg and "HF_HUB_OFFLINE=1" in msg and cv.HUB_REPO in msg
    assert set(cv.KM_FILES["base"]) <= set(asked) and cv.run_path("base_8k_stage1") in asked
    assert not (tmp_path / "out").exists()
