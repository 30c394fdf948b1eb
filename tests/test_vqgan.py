import dataclasses

import numpy as np
import pytest
import torch

from digit_core.config import VQGANConfig
from digit_core.presets import fmnist_small, imagenet_base, tiny
from digit_core.vqgan import VQGAN


def _model(cfg: VQGANConfig, arch: str = "taming", seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(cfg, arch=arch).eval()


def _images(cfg: VQGANConfig, n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, cfg.in_channels, cfg.resolution, cfg.resolution, generator=g)


@pytest.mark.parametrize("arch", ["taming", "mage"])
@pytest.mark.parametrize("preset", [tiny, fmnist_small])
def test_round_trip_shapes(preset, arch):
    cfg = preset().vqgan
    if arch == "mage":  # MAGE has no quant convs, so the latent width is the code width
        cfg = dataclasses.replace(cfg, z_channels=cfg.embed_dim)
    model = _model(cfg, arch)
    x = _images(cfg)
    with torch.no_grad():
        ids = model.encode(x)
        assert ids.shape == (2, cfg.grid, cfg.grid) and ids.dtype == torch.int64
        assert 0 <= int(ids.min()) and int(ids.max()) < cfg.n_embed
        y = model.decode(ids)
    assert y.shape == (2, cfg.out_channels, cfg.resolution, cfg.resolution)
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0


def test_forward_trains_encoder_and_codebook():
    cfg = tiny().vqgan
    model = _model(cfg).train()
    x = _images(cfg)
    recon, ids, loss = model(x)
    assert recon.shape == x.shape and ids.shape == (2, cfg.grid, cfg.grid)
    assert loss.ndim == 0 and torch.isfinite(loss)
    ((recon - x) ** 2).mean().add(loss).backward()
    # straight-through: the reconstruction loss reaches the encoder past the argmin
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(ids, model.encode(x))


def test_quantizer_matches_brute_force():
    cfg = tiny().vqgan
    model = _model(cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.quantize.embedding.weight.normal_(generator=g)
        z = torch.randn(3, cfg.embed_dim, 5, 5, generator=g)
        zq, ids, _ = model.quantize_latent(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim).double().numpy()
    e = model.quantize.embedding.weight.detach().double().numpy()
    d = ((flat[:, None, :] - e[None]) ** 2).sum(-1)
    ref = d.argmin(1)
    part = np.sort(d, axis=1)
    clear = part[:, 1] - part[:, 0] > 1e-4
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(ids.reshape(-1).numpy()[clear], ref[clear])
    torch.testing.assert_close(zq, torch.from_numpy(e[ids.numpy()]).float().permute(0, 3, 1, 2))


def test_encode_is_nearest_code_of_latent():
    cfg = tiny().vqgan
    model = _model(cfg)
    x = _images(cfg, n=3)
    with torch.no_grad():
        z = model.encode_latent(x)
        ids = model.encode(x)
    flat = z.permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim).double().numpy()
    e = model.quantize.embedding.weight.detach().double().numpy()
    d = ((flat[:, None, :] - e[None]) ** 2).sum(-1)
    part = np.sort(d, axis=1)
    clear = part[:, 1] - part[:, 0] > 1e-6 * max(1.0, float(part[:, 0].max()))
    np.testing.assert_array_equal(ids.reshape(-1).numpy()[clear], d.argmin(1)[clear])


@pytest.mark.parametrize("arch", ["taming", "mage"])
def test_decode_equals_decoding_hand_built_latent(arch):
    cfg = VQGANConfig(resolution=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,),
                      z_channels=8, n_embed=32, embed_dim=8, norm_groups=8)
    model = _model(cfg, arch)
    ids = torch.randint(0, cfg.n_embed, (2, cfg.grid, cfg.grid), generator=torch.Generator().manual_seed(3))
    e = model.quantize.embedding.weight.detach()
    latent = e[ids].permute(0, 3, 1, 2)  # [N, embed_dim, m, m]
    with torch.no_grad():
        torch.testing.assert_close(model.codes_to_latent(ids), latent, rtol=0, atol=0)
        ref = model.decoder(model.post_quant_conv(latent)).clamp(0, 1)
        torch.testing.assert_close(model.decode(ids), ref, rtol=0, atol=0)
        torch.testing.assert_close(model.decode(ids.int()), ref, rtol=0, atol=0)


# -- parameter names -----------------------------------------------------------------------------
def _res(prefix, c_in, c_out, bias):
    keys = {f"{prefix}.{n}.{p}" for n in ("norm1", "norm2") for p in ("weight", "bias")}
    keys |= {f"{prefix}.{n}.{p}" for n in ("conv1", "conv2") for p in (("weight", "bias") if bias else ("weight",))}
    if c_in != c_out:
        keys |= {f"{prefix}.nin_shortcut.{p}" for p in (("weight", "bias") if bias else ("weight",))}
    return keys


def _attn(prefix):
    return {f"{prefix}.{n}.{p}" for n in ("norm", "q", "k", "v", "proj_out") for p in ("weight", "bias")}


def _expected_keys(cfg: VQGANConfig, arch: str) -> set[str]:
    """taming's VQModel names (taming/modules/diffusionmodules/model.py), and MAGE's port."""
    taming = arch == "taming"
    nb, ch, mult, res = cfg.num_res_blocks, cfg.ch, cfg.ch_mult, cfg.resolution
    keys = {"encoder.conv_in.weight", "quantize.embedding.weight", "decoder.conv_in.weight",
            "decoder.conv_in.bias", "decoder.conv_out.weight", "decoder.conv_out.bias",
            "encoder.conv_out.weight", "encoder.conv_out.bias"}
    keys |= {f"{p}.norm_out.{q}" for p in ("encoder", "decoder") for q in ("weight", "bias")}
    if taming:
        keys |= {"encoder.conv_in.bias"} | {f"{c}.{p}" for c in ("quant_conv", "post_quant_conv")
                                            for p in ("weight", "bias")}
    c_in = ch
    for i, m in enumerate(mult):
        for j in range(nb):
            keys |= _res(f"encoder.down.{i}.block.{j}", c_in, ch * m, taming)
            c_in = ch * m
            if taming and res in cfg.attn_resolutions:
                keys |= _attn(f"encoder.down.{i}.attn.{j}")
        if i != len(mult) - 1:
            if taming:
                keys |= {f"encoder.down.{i}.downsample.conv.{p}" for p in ("weight", "bias")}
            res //= 2
    for p in ("encoder", "decoder"):
        keys |= _res(f"{p}.mid.block_1", c_in, c_in, taming) | _res(f"{p}.mid.block_2", c_in, c_in, taming)
        if taming:
            keys |= _attn(f"{p}.mid.attn_1")
    for i in reversed(range(len(mult))):
        for j in range(nb + taming):
            keys |= _res(f"decoder.up.{i}.block.{j}", c_in, ch * mult[i], taming)
            c_in = ch * mult[i]
            if taming and res in cfg.attn_resolutions:
                keys |= _attn(f"decoder.up.{i}.attn.{j}")
        if i != 0:
            keys |= {f"decoder.up.{i}.upsample.conv.{p}" for p in ("weight", "bias")}
            res *= 2
    return keys


# Parameter counts of the reference modules (taming's, and MAGE's taming/ copy that DiGIT
# vendors) built with the MAGE VQGAN config.
REFERENCE_PARAMS = {"taming": 72_141_699, "mage": 54_515_587}


@pytest.mark.parametrize("arch", ["taming", "mage"])
def test_parameter_names_match_reference_at_mage_size(arch):
    cfg = imagenet_base().vqgan
    with torch.device("meta"):
        model = VQGAN(cfg, arch=arch)
    sd = model.state_dict()
    expected = _expected_keys(cfg, arch)
    assert set(sd) == expected, (sorted(set(sd) - expected)[:5], sorted(expected - set(sd))[:5])
    assert sum(v.numel() for v in sd.values()) == REFERENCE_PARAMS[arch]
    assert sd["quantize.embedding.weight"].shape == (1024, 256)
    if arch == "taming":
        assert sd["encoder.conv_out.weight"].shape == (256, 512, 3, 3)
        assert sd["encoder.down.2.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
        assert sd["quant_conv.weight"].shape == (256, 256, 1, 1)
        assert "encoder.down.4.attn.1.q.weight" in sd and "decoder.up.4.attn.2.proj_out.bias" in sd
    else:
        assert sd["encoder.conv_out.weight"].shape == (256, 512, 1, 1)
        assert sd["encoder.down.2.block.0.nin_shortcut.weight"].shape == (256, 256, 1, 1)
        assert "decoder.up.0.block.1.conv2.weight" in sd and "decoder.up.0.block.2.conv2.weight" not in sd


def test_state_dict_loads_strict_into_fresh_model():
    cfg = tiny().vqgan
    a, b = _model(cfg, seed=0), _model(cfg, seed=1)
    b.load_state_dict(a.state_dict(), strict=True)
    x = _images(cfg)
    with torch.no_grad():
        assert torch.equal(a.encode(x), b.encode(x))


# -- validation ----------------------------------------------------------------------------------
def test_bad_inputs_raise_value_error():
    cfg = tiny().vqgan
    model = _model(cfg)
    m = cfg.grid
    bad_images = [torch.rand(3, 16, 16), torch.rand(1, 1, 16, 16), torch.rand(1, 3, 8, 8),
                  torch.rand(1, 3, 16, 8), torch.rand(1, 3, 16, 16).double(),
                  torch.zeros(1, 3, 16, 16, dtype=torch.uint8), np.zeros((1, 3, 16, 16), np.float32)]
    for x in bad_images:
        with pytest.raises(ValueError):
            model.encode(x)
    bad_ids = [torch.zeros(1, m, m + 1, dtype=torch.long), torch.zeros(m, m, dtype=torch.long),
               torch.zeros(1, m, m), torch.full((1, m, m), cfg.n_embed), torch.full((1, m, m), -1)]
    for ids in bad_ids:
        with pytest.raises(ValueError):
            model.decode(ids)
    with pytest.raises(ValueError, match="must lie in"):
        model.decode(torch.full((1, m, m), cfg.n_embed))


def test_bad_configs_raise_value_error():
    base = dict(resolution=16, ch=16, ch_mult=(1, 2), z_channels=8, n_embed=8, embed_dim=8, norm_groups=8)
    with pytest.raises(ValueError, match="arch"):
        VQGAN(VQGANConfig(**base), arch="vit")
    with pytest.raises(ValueError, match="norm_groups"):
        VQGAN(VQGANConfig(**{**base, "norm_groups": 5}))
    with pytest.raises(ValueError, match="divisible"):
        VQGAN(VQGANConfig(**{**base, "resolution": 15}))
    with pytest.raises(ValueError, match="z_channels"):
        VQGAN(VQGANConfig(**{**base, "z_channels": 16}), arch="mage")


def test_onnx_export_matches_eager():
    ort = pytest.importorskip("onnxruntime")
    import io
    import warnings

    cfg = tiny().vqgan
    model = _model(cfg)

    class Decode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids):
            return self.m.decode(ids)

    ids = torch.randint(0, cfg.n_embed, (2, cfg.grid, cfg.grid))
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Decode(), (ids,), f, dynamo=False, opset_version=17)
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model.decode(ids).numpy(), atol=1e-5)
