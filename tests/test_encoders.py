"""Encoders: the official DINOv2 settings (block, LayerNorm, resize, position resampling, weight
layouts) checked against independent computations, and the small ViT."""
import dataclasses
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from digit_core.config import EncoderConfig
from digit_core.presets import fmnist_small, tiny
from digit_core.encoders import Encoder, load_dinov2_weights, resample_pos_embed_official

# DINOv2-reg4 architecture at a tiny width: 256 -> 224, patch 14, 16x16 grid, block -3 + norm.
DINO_TINY = EncoderConfig(kind="dinov2", image_size=256, model_size=224, patch_size=14, width=32, depth=4, heads=2,
                          num_registers=4, layerscale=1.0, feature_block=-3, final_norm=True, pos_table_size=37)
MEAN, STD = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


# -- independent references -----------------------------------------------------------------------
def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel (PyTorch's bicubic uses a = -0.75)."""
    x = np.abs(x)
    return np.where(x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


def _bicubic_numpy(img: np.ndarray, out: int, scale: float) -> np.ndarray:
    """Bicubic resize ``[S, S, d] -> [out, out, d]``: align_corners=False coordinates
    ``src = (dst + 0.5) / scale - 0.5``, border indices clamped, no antialias."""
    S = img.shape[0]
    W = np.zeros((out, S))
    for o in range(out):
        src = (o + 0.5) / scale - 0.5
        f = np.floor(src)
        for tap in range(-1, 3):
            W[o, int(np.clip(f + tap, 0, S - 1))] += _cubic(src - (f + tap))
    return np.einsum("oi,pj,ijd->opd", W, W, img.astype(np.float64))


def _official_state(cfg: EncoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under facebookresearch's DINOv2-reg key names, with a 37x37 (+ CLS) table."""
    g = torch.Generator().manual_seed(seed)
    d, r = cfg.width, lambda *s: torch.randn(*s, generator=g) * 0.1
    st = {"cls_token": r(1, 1, d), "register_tokens": r(1, 4, d), "mask_token": r(1, d),
          "pos_embed": r(1, 1 + 37 * 37, d), "patch_embed.proj.weight": r(d, 3, 14, 14),
          "patch_embed.proj.bias": r(d), "norm.weight": 1 + r(d), "norm.bias": r(d)}
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        st.update({b + "norm1.weight": 1 + r(d), b + "norm1.bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
                   b + "attn.qkv.bias": r(3 * d), b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
                   b + "ls1.gamma": 1 + r(d), b + "norm2.weight": 1 + r(d), b + "norm2.bias": r(d),
                   b + "mlp.fc1.weight": r(4 * d, d), b + "mlp.fc1.bias": r(4 * d), b + "mlp.fc2.weight": r(d, 4 * d),
                   b + "mlp.fc2.bias": r(d), b + "ls2.gamma": 1 + r(d)})
    return st


def _timm_by_hand(st: dict[str, torch.Tensor], resample: bool = True) -> dict[str, torch.Tensor]:
    """The official -> timm conversion written out, the table resampled with the numpy bicubic."""
    d = st["cls_token"].shape[-1]
    out = {k: v for k, v in st.items() if k not in ("mask_token", "register_tokens", "cls_token", "pos_embed")}
    out["reg_token"] = st["register_tokens"]
    out["cls_token"] = st["cls_token"] + st["pos_embed"][:, :1]
    patch = st["pos_embed"][0, 1:]
    if resample:
        patch = torch.from_numpy(_bicubic_numpy(patch.reshape(37, 37, d).numpy(), 16, 16.1 / 37)).float()
    out["pos_embed"] = patch.reshape(1, -1, d).contiguous()
    return out


def _reference_features(st: dict[str, torch.Tensor], cfg: EncoderConfig, x: torch.Tensor,
                        final_norm: bool = True) -> torch.Tensor:
    """DINOv2-reg forward written from the official definition, up to ``cfg.block_index``."""
    d, h = cfg.width, cfg.heads
    x = F.interpolate((x - MEAN) / STD, scale_factor=224 / 256, mode="bicubic", align_corners=False)
    x = F.conv2d(x, st["patch_embed.proj.weight"], st["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    pos = st["pos_embed"]
    patch_pos = F.interpolate(pos[:, 1:].reshape(1, 37, 37, d).permute(0, 3, 1, 2), scale_factor=(16.1 / 37, 16.1 / 37),
                              mode="bicubic", antialias=False).permute(0, 2, 3, 1).reshape(1, 256, d)
    x = torch.cat([st["cls_token"].expand(len(x), -1, -1), x], 1) + torch.cat([pos[:, :1], patch_pos], 1)
    x = torch.cat([x[:, :1], st["register_tokens"].expand(len(x), -1, -1), x[:, 1:]], 1)
    ln = lambda t, p: F.layer_norm(t, (d,), st[p + ".weight"], st[p + ".bias"], eps=1e-6)
    for i in range(cfg.block_index + 1):
        b = f"blocks.{i}."
        qkv = F.linear(ln(x, b + "norm1"), st[b + "attn.qkv.weight"], st[b + "attn.qkv.bias"])
        q, k, v = qkv.view(len(x), -1, 3, h, d // h).permute(2, 0, 3, 1, 4)
        a = (torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, -1) @ v).transpose(1, 2).reshape(len(x), -1, d)
        x = x + st[b + "ls1.gamma"] * F.linear(a, st[b + "attn.proj.weight"], st[b + "attn.proj.bias"])
        y = F.gelu(F.linear(ln(x, b + "norm2"), st[b + "mlp.fc1.weight"], st[b + "mlp.fc1.bias"]))
        x = x + st[b + "ls2.gamma"] * F.linear(y, st[b + "mlp.fc2.weight"], st[b + "mlp.fc2.bias"])
    x = ln(x, "norm") if final_norm else x
    return x[:, 5:].reshape(len(x), 16, 16, d)


# -- position table ---------------------------------------------------------------------------------
def test_official_resampling_matches_an_independent_bicubic() -> None:
    table = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = _bicubic_numpy(table[0, 1:].reshape(37, 37, 8).numpy(), 16, 16.1 / 37).reshape(256, 8)
    # in float64 the method (coordinates, kernel, offset, borders) must agree to rounding
    assert np.abs(resample_pos_embed_official(table, 16, 0.1).numpy() - ref).max() < 1e-12
    table = table.float()
    for t in (table, table[0, 1:], table[:, 1:]):   # with CLS, patch part, timm's [1, S*S, d]
        out = resample_pos_embed_official(t, 16, 0.1)
        assert out.dtype == torch.float32 and out.shape == (256, 8)
        assert np.abs(out.numpy() - ref).max() < 1e-5   # torch's float32 coefficients are ~2e-5 off
    # the torch.hub/HF default (antialias, offset 0) and a plain size=16 resize both differ measurably
    grid = table[0, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    for antialias in (True, False):
        other = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=antialias)
        assert np.abs(other.permute(0, 2, 3, 1).reshape(256, 8).numpy() - ref).max() > 1e-2
    # a table already at the grid is kept as is (the official code skips resampling)
    assert torch.equal(resample_pos_embed_official(table[:, : 1 + 256], 16), table[0, 1:257])
    with pytest.raises(ValueError, match="1000 rows"):
        resample_pos_embed_official(table[:, :1000], 16)


# -- shapes and the feature rule --------------------------------------------------------------------
@pytest.mark.parametrize("cfg, shape", [(tiny().encoder, (2, 4, 4, 32)), (fmnist_small().encoder, (2, 8, 8, 192)),
                                        (DINO_TINY, (2, 16, 16, 32))])
def test_feature_shapes(cfg: EncoderConfig, shape: tuple) -> None:
    enc = Encoder(cfg)
    assert not enc.training
    with torch.no_grad():
        x = torch.rand(2, cfg.in_chans, cfg.image_size, cfg.image_size)
        assert enc.features(x).shape == shape
        prefix = 1 + cfg.num_registers
        assert enc.tokens(x).shape == (2, prefix + cfg.grid ** 2, cfg.width)


def test_in_model_resize_is_the_official_interpolate() -> None:
    enc = Encoder(DINO_TINY)
    x = torch.randn(2, 3, 256, 256)
    ref = F.interpolate(x, scale_factor=224 / 256, mode="bicubic", align_corners=False)
    assert (enc.resize @ x @ enc.resize.t() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("final_norm", [True, False])
def test_features_are_block_minus_3_with_the_final_norm(final_norm: bool) -> None:
    cfg = dataclasses.replace(DINO_TINY, final_norm=final_norm)
    st = _official_state(cfg)
    enc = Encoder(cfg)
    load_dinov2_weights(enc, st)
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        assert (enc.features(x) - _reference_features(st, cfg, x, final_norm)).abs().max() < 1e-4


def test_later_blocks_do_not_influence_the_features() -> None:
    enc = Encoder(DINO_TINY)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        before = enc.features(x)
        enc.vit.blocks[-1].mlp.fc2.weight.add_(1.0)
        assert torch.equal(before, enc.features(x))
        enc.vit.blocks[DINO_TINY.block_index].mlp.fc2.weight.add_(1.0)
        assert not torch.equal(before, enc.features(x))


# -- weight layouts ---------------------------------------------------------------------------------
def test_official_pth_and_timm_safetensors_load_like_a_hand_conversion(tmp_path) -> None:
    st = _official_state(DINO_TINY)
    x = torch.rand(2, 3, 256, 256)
    by_hand = Encoder(DINO_TINY)
    by_hand.vit.load_state_dict(_timm_by_hand(st))
    torch.save(st, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    save_file(_timm_by_hand(st, resample=False), tmp_path / "model.safetensors")   # timm/HF: 37x37, CLS folded
    with torch.no_grad():
        ref = by_hand.features(x)
        for source in (tmp_path / "dinov2_vits14_reg4_pretrain.pth", tmp_path / "model.safetensors", st):
            enc = Encoder(DINO_TINY)
            load_dinov2_weights(enc, source)
            assert (enc.features(x) - ref).abs().max() < 1e-5, source
    assert "mask_token" in st and st["pos_embed"].shape == (1, 1370, 32)   # the caller's dict is untouched


def test_timm_preset_builds_the_same_model() -> None:
    named = Encoder(dataclasses.replace(DINO_TINY, timm_name="vit_base_patch14_reg4_dinov2.lvd142m"))
    plain = Encoder(DINO_TINY)
    assert {k: v.shape for k, v in named.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    named.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(named.features(x), plain.features(x), atol=1e-6)


def test_missing_unexpected_and_misshapen_keys_are_named() -> None:
    st = _official_state(DINO_TINY)
    enc = Encoder(DINO_TINY)
    with pytest.raises(ValueError, match=r"missing \['blocks.3.ls2.gamma'\]"):
        load_dinov2_weights(enc, {k: v for k, v in st.items() if k != "blocks.3.ls2.gamma"})
    with pytest.raises(ValueError, match=r"unexpected \['blocks.9.extra'\]"):
        load_dinov2_weights(enc, {**st, "blocks.9.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing .*pos_embed"):
        load_dinov2_weights(enc, {k: v for k, v in st.items() if k != "pos_embed"})
    with pytest.raises(ValueError, match="reg_token"):
        load_dinov2_weights(enc, {**st, "register_tokens": torch.zeros(1, 2, 32)})
    with pytest.raises(FileNotFoundError):
        load_dinov2_weights(enc, "/nonexistent/dinov2.pth")
    with pytest.raises(ValueError, match="kind='dinov2'"):
        load_dinov2_weights(Encoder(tiny().encoder), st)


# -- inputs and export ------------------------------------------------------------------------------
@pytest.mark.parametrize("x, match", [
    (torch.rand(1, 1, 16, 16), r"\[N, 3, 16, 16\].*got shape \(1, 1, 16, 16\)"),
    (torch.rand(1, 3, 8, 8), r"got shape \(1, 3, 8, 8\)"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "float .*got dtype torch.uint8"),
    (torch.rand(3, 16, 16), r"got shape \(3, 16, 16\)"),
    (np.zeros((1, 3, 16, 16), np.float32), "got ndarray"),
])
def test_bad_inputs(x: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Encoder(tiny().encoder).features(x)


def test_dinov2_input_size_error_mentions_the_resize() -> None:
    with pytest.raises(ValueError, match=r"\[N, 3, 256, 256\].*resized to 224.*got shape \(1, 3, 224, 224\)"):
        Encoder(DINO_TINY).features(torch.rand(1, 3, 224, 224))


class _Features(torch.nn.Module):
    def __init__(self, enc: Encoder) -> None:
        super().__init__()
        self.enc = enc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.enc.features(x)
        # a consumer of f.shape, like Codebook.assign: the batch dim must stay symbolic in the trace
        return f.reshape(-1, f.shape[-1]).reshape(f.shape)


def test_onnx_export_stores_the_table_and_matches() -> None:
    onnx, ort = pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")
    enc = Encoder(DINO_TINY)
    load_dinov2_weights(enc, _official_state(DINO_TINY))
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Features(enc), (torch.rand(2, 3, 256, 256),), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["f"], dynamic_axes={"x": {0: "N"}, "f": {0: "N"}})
    ops = {n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node}
    assert "Resize" not in ops   # neither the position table nor the 256 -> 224 resize is an ORT Resize
    x = torch.rand(3, 3, 256, 256)
    out = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(out - enc.features(x).numpy()).max() < 1e-4
