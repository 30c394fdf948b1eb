"""The VQ-AR baseline as a bundle (stage 1 over VQ ids, no tokenizer, no stage 2), graphs shared
between sibling bundles, and the VQGAN stored once as a file both ONNX and training read."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from digit_core.config import ConfigError, DiGITConfig
from digit_core.contract import BundleError, graph_specs
from digit_core.export import export_bundle
from digit_core.pipeline import DiGIT
from digit_core.presets import tiny, tiny_vq
from digit_core.runtime import load_bundle
from digit_core.weights import round_weights_to_half

@pytest.fixture(scope="module")
def models() -> tuple[DiGIT, DiGIT]:
    torch.manual_seed(0)
    digit = DiGIT(tiny(3))
    with torch.no_grad():
        digit.codebook.set_centroids(torch.randn(16, 32))
    vq = DiGIT(tiny_vq(3))
    vq.vqgan.load_state_dict(digit.vqgan.state_dict())   # one VQGAN, as the two real bundles share
    return digit, vq


@pytest.fixture(scope="module")
def bundles(models: tuple[DiGIT, DiGIT], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("exported")
    digit, vq = models
    export_bundle(digit, root / "digit", weights="float16")
    export_bundle(vq, root / "vq", weights="float16", share_with=root / "digit")
    return root


def test_vq_config_has_no_tokenizer_and_no_stage2(models: tuple[DiGIT, DiGIT]) -> None:
    digit, vq = models
    c = vq.config
    assert c.is_vq and c.encoder is None and c.codebook is None and c.stage2 is None
    assert c.disc_grid == c.vq_grid and c.stage1_vocab == c.vqgan.n_embed
    assert list(graph_specs(c)) == ["vq_encoder", "vq_decoder", "stage1"]
    assert not hasattr(vq, "stage2") and not hasattr(vq, "encoder")
    assert DiGITConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c   # null sections survive the round trip
    with pytest.raises(ConfigError, match="has no encoder"):
        dataclasses.replace(c, encoder=digit.config.encoder).validate()
    with pytest.raises(ConfigError, match="needs stage2"):
        dataclasses.replace(digit.config, stage2=None).validate()
    with pytest.raises(ConfigError, match="tokens must be one of"):
        dataclasses.replace(c, tokens="pixels").validate()


def test_vq_bundle_shares_the_sibling_graphs_and_stores_only_its_stage1(bundles: Path) -> None:
    assert sorted(f.name for f in (bundles / "vq").iterdir()) == ["config.json", "manifest.json", "stage1.onnx"]
    man = json.loads((bundles / "vq/manifest.json").read_text())
    assert man["tokens"] == "vq" and man["format_version"] == 5
    assert man["graphs"] == {"vq_encoder": "../digit/vq_encoder.onnx", "vq_decoder": "../digit/vq_decoder.onnx",
                             "stage1": "stage1.onnx"}
    assert "../digit/vqgan.safetensors" in man["files"]   # the shared graphs' external data comes along
    theirs = json.loads((bundles / "digit/manifest.json").read_text())["files"]
    assert man["files"]["../digit/vq_decoder.onnx"] == theirs["vq_decoder.onnx"]


def test_vq_bundle_generates_as_the_rounded_pytorch_model(models: tuple[DiGIT, DiGIT], bundles: Path) -> None:
    b, ref = load_bundle(bundles / "vq", device="cpu", threads=1), round_weights_to_half(models[1])
    a, e = (m.generate([0, 1, 2], seed=4, cfg_scale=2.0, top_k=8) for m in (b, ref))
    assert np.array_equal(a.disc_tokens, e.disc_tokens)
    assert np.array_equal(a.vq_tokens, a.disc_tokens.reshape(a.vq_tokens.shape))   # no stage 2: the codes are VQ ids
    assert np.abs(a.images.astype(int) - e.images).max() <= 1
    img = a.images[0]
    done = b.complete_detailed(img, keep_rows=2, n=2, seed=1)
    kept = b.vq_tokenize(img[None])[:, :2]
    assert np.array_equal(done.vq_tokens[:, :2], np.repeat(kept, 2, 0))   # the prefix is the image's VQ ids
    ref_done = ref.complete_detailed(img, keep_rows=2, n=2, seed=1)
    assert np.array_equal(done.vq_tokens, ref_done.vq_tokens)
    with pytest.raises(ValueError, match="VQ-token model"):
        b.tokenize(img[None])


def test_digit_bundle_keeps_the_vqgan_once_and_training_reads_that_file(models: tuple[DiGIT, DiGIT], bundles: Path) -> None:
    from training.tokens import load_vqgan
    d = bundles / "digit"
    weights = (d / "vqgan.safetensors").stat().st_size
    graphs = (d / "vq_encoder.onnx").stat().st_size + (d / "vq_decoder.onnx").stat().st_size
    assert graphs < 0.5 * weights    # the graphs point into the file (tensors under 1,024 values stay inline)
    vqgan = load_vqgan(models[0].config, d / "vqgan.safetensors")
    rounded = round_weights_to_half(models[0]).vqgan.state_dict()
    assert all(torch.equal(v, rounded[k]) for k, v in vqgan.state_dict().items())
    b, ref = load_bundle(d, device="cpu", threads=1), round_weights_to_half(models[0])
    ids = np.random.default_rng(0).integers(0, 32, (2, 4, 4))
    assert np.abs(b.decode_vq(ids).astype(int) - ref.decode_vq(ids)).max() <= 1


def test_shared_files_are_verified_and_a_lone_copy_says_what_is_missing(bundles: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(bundles, tmp_path / "exported"))
    data = bytearray((root / "digit/vqgan.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (root / "digit/vqgan.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="vqgan.safetensors is corrupt"):
        load_bundle(root / "vq", device="cpu")
    alone = Path(shutil.copytree(bundles / "vq", tmp_path / "alone" / "vq"))
    with pytest.raises(BundleError, match="missing file ../digit/vq_[a-z]+.onnx .a file of a sibling bundle"):
        load_bundle(alone, device="cpu")


@pytest.mark.parametrize("name", ["../digit/../digit/vq_encoder.onnx", "../../exported/digit/vq_encoder.onnx",
                                  "../digit", "../."])
def test_only_plain_sibling_paths_may_leave_a_bundle(bundles: Path, tmp_path: Path, name: str) -> None:
    root = Path(shutil.copytree(bundles, tmp_path / "exported"))
    man = json.loads((root / "vq/manifest.json").read_text())
    man["files"][name] = man["files"].pop("../digit/vq_encoder.onnx")
    man["graphs"]["vq_encoder"] = name
    (root / "vq/manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match="leaves the bundle"):
        load_bundle(root / "vq", device="cpu")


def test_share_with_must_be_a_sibling_bundle(models: tuple[DiGIT, DiGIT], bundles: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="another bundle in the folder"):
        export_bundle(models[1], tmp_path / "vq", weights="float16", share_with=bundles / "digit")
    with pytest.raises(BundleError, match="not a bundle"):
        export_bundle(models[1], bundles / "vq2", weights="float16", share_with=bundles / "nothing")


def test_render_of_a_vq_token_model_is_the_vq_decoder(models: tuple[DiGIT, DiGIT]) -> None:
    vq = models[1]
    ids = np.random.default_rng(0).integers(0, vq.config.stage1_vocab, (2, vq.config.vq_grid, vq.config.vq_grid))
    assert np.array_equal(vq.render(ids, seed=3), vq.decode_vq(ids))
