"""Encoders: the official DINOv2 settings (block, LayerNorm, position resampling) and the small ViT."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from digit_core.config import EncoderConfig, fmnist_small, tiny
from digit_core.encoders import Encoder, load_dinov2_weights, resample_pos_embed_official

DINO_TINY = EncoderConfig(kind="dinov2", image_size=256, model_size=224, patch_size=14, width=32, depth=4, heads=2,
                          num_registers=4, layerscale=1.0, feature_block=-3, final_norm=True, pos_table_size=37)


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


def _bicubic_numpy(img: np.ndarray, out: int, scale: float) -> np.ndarray:
    """Independent bicubic resize [S, S, d] -> [out, out, d]: align_corners=False, clamped borders."""
    S = img.shape[0]
    def weights(n_out: int) -> np.ndarray:
        W = np.zeros((n_out, S))
        for o in range(n_out):
            src = (o + 0.5) / scale - 0.5
            f = np.floor(src)
            for tap in range(-1, 3):
                W[o, int(np.clip(f + tap, 0, S - 1))] += _cubic(src - (f + tap))
        return W
    Wy = weights(out)
    return np.einsum("oi,pj,ijd->opd", Wy, Wy, img)


def test_official_resampling_matches_an_independent_bicubic() -> None:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(1, 1 + 37 * 37, 8)).astype(np.float32)
    ours = resample_pos_embed_official(torch.from_numpy(table), 16, 0.1).numpy()
    ref = _bicubic_numpy(table[0, 1:].reshape(37, 37, 8).astype(np.float64), 16, 16.1 / 37).reshape(256, 8)
    assert np.abs(ours - ref).max() < 1e-5
    # the torch.hub / HF default (antialias, no offset) is measurably different
    hub = F.interpolate(torch.from_numpy(table[0, 1:]).reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(16, 16),
                        mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(256, 8).numpy()
    assert np.abs(hub - ref).max() > 1e-2


@pytest.mark.parametrize("cfg, shape", [(tiny().encoder, (2, 4, 4, 32)), (fmnist_small().encoder, (2, 8, 8, 192)),
                                        (DINO_TINY, (2, 16, 16, 32))])
def test_feature_shapes(cfg: EncoderConfig, shape: tuple) -> None:
    enc = Encoder(cfg)
    with torch.no_grad():
        assert enc.features(torch.rand(2, cfg.in_chans, cfg.image_size, cfg.image_size)).shape == shape


def _official_state(cfg: EncoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under facebookresearch's DINOv2-reg key names, with a 37x37 table."""
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


def _reference_features(st: dict[str, torch.Tensor], cfg: EncoderConfig, x: torch.Tensor) -> torch.Tensor:
    """DINOv2-reg forward written from the official definition, up to block -3 + final norm."""
    d, h = cfg.width, cfg.heads
    x = (x - torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)) / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    x = F.interpolate(x, scale_factor=224 / 256, mode="bicubic", align_corners=False)
    x = F.conv2d(x, st["patch_embed.proj.weight"], st["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    pos = st["pos_embed"]
    patch_pos = F.interpolate(pos[:, 1:].reshape(1, 37, 37, d).permute(0, 3, 1, 2), scale_factor=(16.1 / 37, 16.1 / 37),
                              mode="bicubic", antialias=False).permute(0, 2, 3, 1).reshape(1, 256, d)
    x = torch.cat([st["cls_token"].expand(len(x), -1, -1), x], 1) + torch.cat([pos[:, :1], patch_pos], 1)
    x = torch.cat([x[:, :1], st["register_tokens"].expand(len(x), -1, -1), x[:, 1:]], 1)
    ln = lambda t, p: F.layer_norm(t, (d,), st[p + ".weight"], st[p + ".bias"], eps=1e-6)
    for i in range(cfg.block_index + 1):
        b = f"blocks.{i}."
        y = ln(x, b + "norm1")
        q, k, v = F.linear(y, st[b + "attn.qkv.weight"], st[b + "attn.qkv.bias"]).view(len(x), -1, 3, h, d // h).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, -1) @ v
        x = x + st[b + "ls1.gamma"] * F.linear(a.transpose(1, 2).reshape(len(x), -1, d), st[b + "attn.proj.weight"], st[b + "attn.proj.bias"])
        y = F.linear(F.gelu(F.linear(ln(x, b + "norm2"), st[b + "mlp.fc1.weight"], st[b + "mlp.fc1.bias"])),
                     st[b + "mlp.fc2.weight"], st[b + "mlp.fc2.bias"])
        x = x + st[b + "ls2.gamma"] * y
    return ln(x, "norm")[:, 5:].reshape(len(x), 16, 16, d)


def test_official_checkpoint_gives_the_official_features(tmp_path) -> None:
    st = _official_state(DINO_TINY)
    torch.save(st, tmp_path / "dinov2_reg4.pth")
    enc = Encoder(DINO_TINY)
    load_dinov2_weights(enc, tmp_path / "dinov2_reg4.pth")
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        assert (enc.features(x) - _reference_features(st, DINO_TINY, x)).abs().max() < 1e-4


def test_later_blocks_do_not_influence_the_features() -> None:
    enc = Encoder(DINO_TINY)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        before = enc.features(x)
        enc.vit.blocks[-1].mlp.fc2.weight.add_(1.0)
        assert torch.equal(before, enc.features(x))
        enc.vit.blocks[DINO_TINY.block_index].mlp.fc2.weight.add_(1.0)
        assert not torch.equal(before, enc.features(x))


def test_missing_and_unexpected_keys_are_named() -> None:
    st = _official_state(DINO_TINY)
    enc = Encoder(DINO_TINY)
    with pytest.raises(ValueError, match="blocks.3.ls2.gamma"):
        load_dinov2_weights(enc, {k: v for k, v in st.items() if k != "blocks.3.ls2.gamma"})
    with pytest.raises(ValueError, match="blocks.9.extra"):
        load_dinov2_weights(enc, {**st, "blocks.9.extra": torch.zeros(1)})
    with pytest.raises(FileNotFoundError):
        load_dinov2_weights(enc, "/nonexistent/dinov2.pth")


@pytest.mark.parametrize("x, match", [
    (torch.rand(1, 1, 16, 16), "expects images"),
    (torch.rand(1, 3, 8, 8), "expects images"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "float"),
    (torch.rand(3, 16, 16), "expects images"),
])
def test_bad_inputs(x: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Encoder(tiny().encoder).features(x)
