"""The self-supervised recipe: CNN encoder, patch-level VICReg, the validation split, fmnist.sh on it."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from digit_core.config import ConfigError, DiGITConfig
from digit_core.presets import preset
from digit_core.encoders import Encoder
from digit_core.export import export_bundle
from digit_core.pipeline import DiGIT
from digit_core.runtime import load_bundle
from training.files import load_tensors
from training.ssl import SSLConfig, SSLModel
from training.ssl_objectives import crops, same_places, vicreg
from test_training import make_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images"))


def test_cnn_encoder_features_grid_and_config_checks() -> None:
    cfg = preset("fmnist-cnn")
    enc = Encoder(cfg.encoder)
    assert enc.features(torch.rand(2, 1, 32, 32)).shape == (2, 8, 8, 128)
    assert not hasattr(enc, "vit") and sum(p.numel() for p in enc.parameters()) < 500_000
    with pytest.raises(ValueError, match="no token sequence"):
        enc.tokens(torch.rand(1, 1, 32, 32))
    bad = preset("fmnist-cnn")
    bad.encoder.cnn_strides = (1, 2, 1, 1, 1, 1)     # grid 16, not the patch_size 4 the config says
    with pytest.raises(ConfigError, match="strides multiplying to patch_size 4"):
        bad.validate()


def test_cnn_encoder_exports_and_tokenizes_like_pytorch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = DiGIT(preset("tiny-cnn"))
    with torch.no_grad():   # BatchNorm with non-trivial statistics, as after training
        for mod in m.encoder.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    imgs = np.random.default_rng(3).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():   # centroids among the features themselves, so patches spread over them
        feats = m.encoder.features(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255).reshape(-1, 32)
        m.codebook.set_centroids(feats[torch.randperm(len(feats))[:16]])
    b = load_bundle(export_bundle(m, tmp_path / "cnn"), device="cpu", threads=1)
    assert b.config.encoder.kind == "cnn"
    (ids, _, feats), (rids, _, rfeats) = b.tokenize(imgs), m.tokenize(imgs)
    assert np.abs(feats - rfeats).max() / np.abs(rfeats).max() < 1e-4 and np.array_equal(ids, rids)
    assert len(np.unique(ids)) > 1   # the check would be vacuous if every patch took one centroid


def test_same_places_reads_the_same_image_point_in_every_view() -> None:
    """A smooth image: each view, sampled where the image's cell centres fell, gives the
    image's own values there (up to bilinear resampling error), whatever the crop or flip."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    img = (0.3 * xx + 0.6 * yy)[None, None].repeat(4, 1, 1, 1)
    torch.manual_seed(0)
    views, theta = crops(img, 2, 32, (0.3, 1.0), jitter=0.0)
    got, inside = same_places(views, theta, 8)
    identity = torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(8, 2, 3)
    want, all_inside = same_places(img.repeat(2, 1, 1, 1), identity, 8)
    assert all_inside.all() and 0.2 < inside.float().mean() < 1.0   # crops drop some cells, keep most
    assert (got - want).abs()[inside].max() < 0.02
    # a wrong inverse (ignoring the flip) would put cells in the mirrored place
    flipped = theta.clone()
    flipped[:, 0, 0] = flipped[:, 0, 0].abs()
    wrong, _ = same_places(views, flipped, 8)
    assert (wrong - want).abs()[inside].max() > 0.1


def test_vicreg_terms() -> None:
    torch.manual_seed(0)
    z = torch.randn(512, 16)
    loss, parts = vicreg(z, z, (25.0, 25.0, 1.0))
    assert parts["invariance"] == 0 and parts["variance"] < 0.05 and parts["covariance"] < 0.1
    collapsed = torch.zeros(512, 16) + torch.randn(1, 16)
    assert vicreg(collapsed, collapsed, (25.0, 25.0, 1.0))[1]["variance"] > 0.95   # hinge at std 0
    shared = torch.randn(512, 1).expand(512, 16)      # every dimension the same: all covariance
    assert vicreg(shared, shared, (25.0, 25.0, 1.0))[1]["covariance"] > 10
    assert vicreg(z, z + 1, (25.0, 25.0, 1.0))[1]["invariance"] == pytest.approx(1.0)


def test_vicreg_dense_model_gives_every_parameter_a_gradient() -> None:
    e = preset("tiny-cnn").encoder
    model = SSLModel(Encoder(e), SSLConfig(objective="vicreg_dense", head_hidden=16)).train()
    x = torch.rand(8, 3, 16, 16)
    views, theta = crops(x, 2, 16, (0.5, 1.0), 0.4, 0.03)
    z = model(views, None, None)
    assert z.shape == (16, 16, 4, 4)
    cells, inside = same_places(z, theta, e.grid)
    both = inside[:8] & inside[8:]
    (vicreg(z[:8].mean((2, 3)), z[8:].mean((2, 3)), (25, 25, 1))[0]
     + vicreg(cells[:8][both], cells[8:][both], (25, 25, 1))[0]).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_vicreg_dense_ssl_trains_a_cnn_encoder_and_records_no_labels(tmp_path: Path, folder: Path) -> None:
    from training import ssl
    ssl.main([f"--root={tmp_path}", f"--data={folder}", "--model=tiny-cnn", "--batch_size=8", "--workers=0",
              "--objective=vicreg_dense", "--steps=3", "--log_every=1", "--head_hidden=16", "--bf16=false",
              "--probe_train=24", "--probe_test=8"])
    rows = [json.loads(line) for line in (tmp_path / "ssl/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "dense" in r]
    assert len(steps) == 3 and all(np.isfinite(r["loss"]) and 0 < r["shared_cells"] <= 1 for r in steps)
    assert [r["step"] for r in rows if "probe" in r] == [0, 3]   # untrained control, then the trained encoder
    tensors, meta = load_tensors(tmp_path / "ssl/encoder.safetensors")
    assert (meta["objective"], meta["labels"]) == ("vicreg_dense", False)
    assert meta["model"]["encoder"]["objective"] == "vicreg_dense" and meta["model"]["encoder"]["labels"] is False
    enc = Encoder(preset("tiny-cnn").encoder)
    enc.load_state_dict(tensors)   # strict: the CNN's weights and BatchNorm statistics, nothing else
    assert enc.features(torch.rand(2, 3, 16, 16)).shape == (2, 4, 4, 32)


def test_ssl_refuses_vit_only_objectives_on_a_cnn(tmp_path: Path, folder: Path) -> None:
    from training import ssl
    with pytest.raises(ValueError, match="needs a ViT"):
        ssl.main([f"--root={tmp_path}", f"--data={folder}", "--model=tiny-cnn", "--batch_size=8", "--workers=0",
                  "--objective=dino_ibot", "--steps=1"])


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fmnist_validation_split_is_carved_from_train() -> None:
    from digit_core.data import FMNIST_VAL, FashionMNIST
    train, fit, val = (FashionMNIST(split=s) for s in ("train", "fit", "val"))
    assert (len(fit), len(val), len(train)) == (len(train) - FMNIST_VAL, FMNIST_VAL, 60000)
    assert np.array_equal(np.concatenate([fit.images, val.images]), train.images)
    assert fit.train and not val.train   # augmentation on the split that trains only
    with pytest.raises(ValueError, match="fit, val, test"):
        FashionMNIST(split="validation")


def test_the_shipped_recipe_runs_end_to_end_on_a_tiny_dataset(tmp_path: Path, folder: Path) -> None:
    """training/fmnist.sh with the shipped self-supervised recipe (training/fmnist.yaml) as the
    base, shrunk to a tiny CNN, a tiny folder and a few steps; the VQGAN reused from a file."""
    from digit_core.vqgan import VQGAN
    from training.files import atomic_save
    torch.manual_seed(0)
    atomic_save(VQGAN(preset("tiny-cnn").vqgan).state_dict(), tmp_path / "vq.safetensors")   # an untrained one will do
    recipe = {"base": str(REPO / "training/fmnist.yaml"), "root": str(tmp_path / "run"), "model": "tiny-cnn",
              "data": str(folder), "workers": 0, "batch_size": 8,
              "ssl": {"steps": 2, "head_hidden": 16, "probe_train": 24, "probe_test": 8, "val_data": ""},
              "features": {"fraction": 0.5}, "kmeans": {"niter": 5},
              "stage1": {"steps": 2, "val_data": ""}, "stage2": {"steps": 2, "val_data": ""}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    env = os.environ | {"CONFIG": str(tmp_path / "tiny.yaml"), "BUNDLE": str(tmp_path / "bundle"),
                        "ASSETS": str(tmp_path / "assets"), "VQGAN": str(tmp_path / "vq.safetensors"),
                        "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "training/fmnist.sh", "--batch_size=8"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    stages = [line for line in r.stdout.splitlines() if line.startswith("== ")]
    assert stages[:7] == [f"== {s}" for s in ("ssl", "features", "kmeans")] + [
        f"== vqgan: reusing {tmp_path / 'vq.safetensors'}"] + [f"== {s}" for s in ("stage1", "stage2", "assemble")]
    assert not (tmp_path / "run/vqgan").exists()      # reused, not retrained
    b = load_bundle(tmp_path / "bundle", device="cpu", threads=1)
    e = b.config.encoder
    assert (e.kind, e.objective, e.labels) == ("cnn", "vicreg_dense", False)
    assert b.sample([0, 1], seed=0).shape == (2, 16, 16, 3)


def test_unbundle_recovers_a_cnn_tokenizer_that_tokenizes_as_the_bundle(tmp_path: Path) -> None:
    """training.unbundle: the folded BatchNorms come back as identity norms around the folded
    weights; the recovered encoder + codebook give the bundle's tokens, and the stages load them."""
    from training.tokens import load_codebook, load_encoder
    from training.unbundle import unbundle
    torch.manual_seed(1)
    m = DiGIT(preset("tiny-cnn"))
    with torch.no_grad():
        for mod in m.encoder.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    imgs = np.random.default_rng(4).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():
        feats = m.encoder.features(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255).reshape(-1, 32)
        m.codebook.set_centroids(feats[torch.randperm(len(feats))[:16]])
    m.config.encoder.objective, m.config.encoder.labels = "vicreg_dense", False
    bundle = export_bundle(m, tmp_path / "cnn")
    enc_path, cb_path = unbundle(bundle, tmp_path / "run")
    meta = load_tensors(enc_path)[1]
    assert meta["objective"] == "vicreg_dense" and meta["labels"] is False and meta["agreement"] == 1.0
    cfg = DiGITConfig.from_dict(meta["model"])
    enc, book = load_encoder(cfg, enc_path), load_codebook(cb_path)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    ids = book.assign(enc.features(x))[0].numpy()
    expected = load_bundle(bundle, device="cpu", threads=1).tokenize(imgs)[0]
    assert np.array_equal(ids, expected) and len(np.unique(ids)) > 1
    with pytest.raises(ValueError, match="only a CNN encoder"):
        unbundle(export_bundle(DiGIT(preset("tiny")), tmp_path / "vit"), tmp_path / "run2")
