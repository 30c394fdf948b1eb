"""training/: datasets, config, resume, DDP and the whole chain on a tiny synthetic image folder."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digit_core.config import ConfigError
from digit_core.data import FMNIST_DIR, FashionMNIST, ImageFolder
from training.config import parse_config
from training.files import atomic_path, atomic_save, atomic_write_text, load_strict, load_tensors

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model=tiny", "--batch_size=8", "--workers=0"]


def make_folder(root: Path, n: int = 40, classes: int = 3, seed: int = 0) -> Path:
    """``n`` random PNGs (16x16 and a few non-square ones) in ``classes`` class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16 + i % 4, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images"))


# -- files ----------------------------------------------------------------------------------------------
def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "run" / "a.safetensors"
    atomic_save({"x": torch.zeros(2)}, path, {"v": 1})
    with pytest.raises(RuntimeError, match="killed mid-write"), atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".") and tmp.suffix == ".tmp"
        tmp.write_bytes(b"half a file")
        raise RuntimeError("killed mid-write")
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert load_tensors(path)[1] == {"v": 1}
    atomic_write_text(path.with_name("b.json"), "new")     # a success renames the temp file into place
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, "b.json"]
    assert path.with_name("b.json").read_text() == "new"


def test_a_state_dict_that_does_not_fit_is_refused_by_name() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = {"0.weight": torch.zeros(3, 4), "0.bias": torch.zeros(3), "2.weight": torch.zeros(1, 3)}
    with pytest.raises(ConfigError, match=r"w.safetensors does not fit this Sequential: missing \['1.bias', "
                                          r"'1.weight'\], unexpected \['2.weight'\], .*0.weight: \(3, 4\) vs \(3, 2\)"):
        load_strict(model, state, "w.safetensors")
    assert torch.count_nonzero(model[0].bias) == 3                 # nothing was loaded
    load_strict(model, {k: torch.zeros_like(v) for k, v in model.state_dict().items()}, "w.safetensors")
    assert not any(torch.count_nonzero(v) for v in model.state_dict().values())


# -- data -----------------------------------------------------------------------------------------------
def test_image_folder_shapes_and_determinism(folder: Path) -> None:
    ds = ImageFolder(folder, 16, channels=3)
    assert ds.classes == ["class0", "class1", "class2"] and len(ds) == 40
    x, _ = ds[(5, 123)]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, ds[(5, 123)][0])                      # the seed fixes the augmentation
    assert torch.allclose(x * 255, (x * 255).round(), atol=1e-3)  # uint8 steps, as the pipeline sees
    grey = ImageFolder(folder, 16, channels=1, train=False)[5][0]
    assert grey.shape == (1, 16, 16)


def test_corrupt_images_are_skipped_and_counted(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", n=6, classes=2)
    good = (root / "class0" / "0.png").read_bytes()
    (root / "class0" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "class1" / "text.png").write_text("not an image")
    ds = ImageFolder(root, 16)
    bad = [i for i, (p, _) in enumerate(ds.samples) if Path(p).name in ("truncated.png", "text.png")]
    assert len(bad) == 2
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        shapes = [ds[i][0].shape for i in range(len(ds))]
    assert all(s == (3, 16, 16) for s in shapes)
    assert ds.skipped == 2


def test_empty_or_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope", 16)
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolder(tmp_path, 16)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path, 16)


@pytest.mark.skipif(not Path(FMNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_is_padded_to_32() -> None:
    ds = FashionMNIST(split="test")
    x, y = ds[0]
    assert len(ds) == 10000 and x.shape == (1, 32, 32) and 0 <= y < 10
    assert x[:, :2].abs().sum() == 0 and x[:, :, -2:].abs().sum() == 0     # black padding
    assert torch.equal(ds[(0, 1)][0], x)                                # no augmentation on test data
    aug = FashionMNIST(split="test", train=True)
    flips = {bool(torch.equal(aug[(0, s)][0], x.flip(-1))) for s in range(8)}
    assert flips == {True, False}                                        # flipped half the time


# -- config -------------------------------------------------------------------------------------------------
def test_config_file_sections_and_overrides(tmp_path: Path) -> None:
    from training.stage1 import Stage1TrainConfig
    f = tmp_path / "c.yaml"
    f.write_text("root: /tmp/x\nmodel: tiny\nstage1: {steps: 7, lr: 0.001}\nstage2: {steps: 9}\n")
    cfg = parse_config(Stage1TrainConfig, ["--config", str(f), "--lr=0.002", "--flip=false"])
    assert (cfg.root, cfg.steps, cfg.lr, cfg.flip) == ("/tmp/x", 7, 0.002, False)
    with pytest.raises(ConfigError, match="no field"):
        parse_config(Stage1TrainConfig, ["--stepz=3"])
    f.write_text("stage1: {stepz: 7}\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_config(Stage1TrainConfig, ["--config", str(f)])


# -- resume --------------------------------------------------------------------------------------------------
def _vqgan(root: Path, folder: Path, steps: int) -> None:
    from training import vqgan
    vqgan.main([f"--root={root}", f"--data={folder}", *TINY, f"--steps={steps}", "--ckpt_every=3",
                "--adv_start=2", "--reset_every=2", "--eval_every=100", "--eval_images=8", "--ema=0.9"])


def test_a_recipe_can_extend_a_base_recipe(tmp_path: Path) -> None:
    from training.ssl import SSLConfig
    from training.stage1 import Stage1TrainConfig
    (tmp_path / "base.yaml").write_text("root: runs/a\nmodel: fmnist\nssl: {steps: 5, lr: 0.1}\nstage1: {steps: 7}\n")
    (tmp_path / "v.yaml").write_text("base: base.yaml\nroot: runs/b\nssl: {steps: 9}\n")
    c = parse_config(SSLConfig, ["--config", str(tmp_path / "v.yaml")])
    assert (c.root, c.model, c.steps, c.lr) == ("runs/b", "fmnist", 9, 0.1)   # a section merges key by key
    assert parse_config(Stage1TrainConfig, ["--config", str(tmp_path / "v.yaml")]).steps == 7
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="its own base"):
        parse_config(SSLConfig, ["--config", str(tmp_path / "loop.yaml")])
    with pytest.raises(ConfigError, match="does not exist"):
        (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
        parse_config(SSLConfig, ["--config", str(tmp_path / "orphan.yaml")])
    # the shipped variant resolves against fmnist.yaml
    ssl = parse_config(SSLConfig, ["--config", str(REPO / "training/fmnist_contrastive.yaml")])
    assert (ssl.objective, ssl.model, ssl.val_data, ssl.root) == ("contrastive", "fmnist-conv", "fmnist:test", "runs/fmnist-ssl")
    ssl = parse_config(SSLConfig, ["--config", str(REPO / "training/fmnist.yaml")])   # the default: no labels
    assert (ssl.objective, ssl.model, ssl.data, ssl.val_data) == ("vicreg_dense", "fmnist-cnn", "fmnist:fit", "fmnist:val")


def test_help_lists_every_option_and_exits_cleanly() -> None:
    r = subprocess.run([sys.executable, "-m", "training.stage1", "--help"], check=False, cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Stage 1" in r.stdout and "--tokens=disc" in r.stdout and "--steps=" in r.stdout
    assert "# disc | vq" in r.stdout   # the field's comment travels with it


def test_resume_continues_bitwise(tmp_path: Path, folder: Path) -> None:
    """Killed after step 3 (simulated by steps=3), rerun to 6 == one run of 6 steps, bit for bit."""
    _vqgan(tmp_path / "a", folder, 6)
    _vqgan(tmp_path / "b", folder, 3)
    assert load_tensors(tmp_path / "b/vqgan/checkpoint.safetensors")[1]["step"] == 3
    _vqgan(tmp_path / "b", folder, 6)
    (a, ma), (b, mb) = (load_tensors(tmp_path / r / "vqgan/checkpoint.safetensors") for r in "ab")
    assert ma["step"] == mb["step"] == 6
    assert a.keys() == b.keys() and any(k.startswith("optim.disc.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))
    assert "resumed from" in (tmp_path / "b/vqgan/train.log").read_text()


# -- DDP -------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_cpu(tmp_path: Path, folder: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "training.vqgan", f"--root={tmp_path}", f"--data={folder}", *TINY, "--steps=3",
           "--adv_start=1", "--reset_every=2", "--eval_every=100", "--eval_images=8"]
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    log = (tmp_path / "vqgan/train.log").read_text()
    assert "rank 0/2" in log and "all 2 replicas hold identical weights" in log
    assert (tmp_path / "vqgan/vqgan.safetensors").exists()


# -- self-supervised objectives ---------------------------------------------------------------------------
def test_info_nce_rewards_matching_views() -> None:
    from training.ssl_objectives import info_nce
    z = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    matched = info_nce(torch.cat([z, z]), 0.1)            # each view's positive is itself: easy
    shuffled = info_nce(torch.cat([z, z.roll(1, 0)]), 0.1)   # positives are other images
    assert matched < 0.1 < shuffled
    # 2B - 1 candidates per row, all equally similar: the loss is log(2B - 1)
    assert abs(info_nce(torch.cat([z[:1].expand(8, -1)] * 2), 0.1).item() - np.log(15)) < 1e-4


def test_contrastive_ssl_trains_a_conv_stem_encoder(tmp_path: Path, folder: Path) -> None:
    from digit_core.encoders import Encoder
    from digit_core.presets import tiny
    from training import ssl
    cfg = tiny(3)
    cfg.encoder.stem = "conv"
    cfg.save(tmp_path / "conv.json")
    args = [f"--root={tmp_path}", f"--data={folder}", *TINY, f"--model={tmp_path / 'conv.json'}", "--objective=contrastive",
            "--steps=3", "--log_every=1", "--probe_train=24", "--probe_test=8"]
    ssl.main(args)
    logs = [json.loads(line) for line in (tmp_path / "ssl/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "view_match" in r]
    assert len(steps) == 3 and all(np.isfinite(r["loss"]) and 0 <= r["view_match"] <= 1 for r in steps)
    tensors, meta = load_tensors(tmp_path / "ssl/encoder.safetensors")
    assert "objective=contrastive" in meta["source"] and meta["model"]["encoder"]["stem"] == "conv"
    enc = Encoder(cfg.encoder)
    enc.load_state_dict(tensors)   # strict: the conv stem's weights, nothing else
    assert enc.features(torch.rand(2, 3, 16, 16)).shape == (2, 4, 4, 32)


def test_every_trained_parameter_gets_a_gradient() -> None:
    """DDP fails on parameters that take no gradient: each objective's model holds only its own."""
    from digit_core.encoders import Encoder
    from digit_core.presets import tiny
    from training.ssl import OBJECTIVES, SSLConfig, SSLModel
    from training.ssl_objectives import info_nce, random_masks
    e = tiny(3).encoder
    for objective in (o for o in OBJECTIVES if o != "vicreg_dense"):   # on a CNN: tests/test_ssl_cnn.py
        cfg = SSLConfig(objective=objective, out_dim=32, head_hidden=16, head_bottleneck=8)
        model = SSLModel(Encoder(e), cfg, num_classes=3).train()
        x = torch.rand(4, 3, 16, 16)
        if objective == "supervised":
            loss = model(x, None, None).logsumexp(1).mean()
        elif objective == "contrastive":
            loss = info_nce(model(torch.cat([x, x.flip(3)]), None, None), 0.2)
        else:   # as ssl.main calls it: masks only with iBOT, local crops only with DINO
            masks = random_masks(4, e.grid ** 2, 1.0, (0.5, 0.5), x.device) if "ibot" in objective else None
            cls, patch = model(x, masks, torch.rand(4, 3, 8, 8) if "dino" in objective else None)
            loss = (cls.logsumexp(-1).mean() if "dino" in objective else 0) + patch.logsumexp(-1).mean()
        loss.backward()
        idle = [n for n, p in model.named_parameters() if p.grad is None]
        assert not idle, (objective, idle)


# -- the whole chain ---------------------------------------------------------------------------------------------
def test_chain_to_a_loadable_model(tmp_path: Path, folder: Path) -> None:
    from digit_core.pipeline import DiGIT
    from training import assemble, features, kmeans, ssl, stage1, stage2, vqgan
    base = [f"--root={tmp_path}", f"--data={folder}", *TINY]
    ssl.main(base + ["--steps=3", "--local_crops=2", "--local_size=8", "--probe_train=24", "--probe_test=8"])
    features.main(base + ["--fraction=0.5"])
    kmeans.main(base + ["--niter=5"])
    vqgan.main(base + ["--steps=3", "--eval_images=8"])
    stage1.main(base + ["--steps=3", f"--val_data={folder}", "--eval_every=3", "--eval_batches=1"])
    stage2.main(base + ["--steps=3"])
    assemble.main(base)

    probe = [json.loads(line) for line in (tmp_path / "ssl/metrics.jsonl").read_text().splitlines() if "probe" in line]
    assert "probe_pixels" in probe[0] and probe[-1]["step"] == 3
    tokens = load_tensors(tmp_path / "stage1/tokens.safetensors")[0]
    assert tokens["disc"].shape == (80, 16)          # 40 images and their mirror images, 4x4 tokens
    model = DiGIT.load(tmp_path / "model")
    assert model.config.class_names == ["class0", "class1", "class2"]
    imgs = model.sample([0, 2], seed=0, cfg_scale=1.5)
    assert imgs.shape == (2, 16, 16, 3) and imgs.dtype == np.uint8
    # the cached tokens are the tokens the assembled model gives the same images
    ds = ImageFolder(folder, 16, train=False)
    u8 = (torch.stack([ds[i][0] for i in range(4)]) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(model.tokenize(u8)[0].reshape(4, -1), tokens["disc"][[0, 1, 2, 3]].long().numpy())


def test_fmnist_script_runs_every_stage_to_a_bundle_and_assets(tmp_path: Path, folder: Path) -> None:
    """training/fmnist.sh end to end, with a tiny recipe in place of fmnist.yaml (same script)."""
    import yaml
    recipe = {"root": str(tmp_path / "run"), "model": "tiny", "data": str(folder), "workers": 0, "batch_size": 8,
              "ssl": {"steps": 2, "local_crops": 2, "local_size": 8, "probe_train": 24, "probe_test": 8},
              "features": {"fraction": 0.5}, "kmeans": {"niter": 5}, "vqgan": {"steps": 2, "eval_images": 8},
              "stage1": {"steps": 2}, "stage2": {"steps": 2}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    env = os.environ | {"CONFIG": str(tmp_path / "tiny.yaml"), "BUNDLE": str(tmp_path / "bundle"),
                        "ASSETS": str(tmp_path / "assets"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "training/fmnist.sh", "--seed=1"], check=False, cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [l for l in r.stdout.splitlines() if l.startswith("== ")][:7] == [
        f"== {s}" for s in ("ssl", "features", "kmeans", "vqgan", "stage1", "stage2", "assemble")]
    assert json.loads((tmp_path / "run/ssl/train_config.json").read_text())["seed"] == 1   # overrides reach the stages
    from digit_core.runtime import load_bundle
    bundle = load_bundle(tmp_path / "bundle", device="cpu", threads=1)
    assert bundle.sample([0, 1], seed=0).shape == (2, 16, 16, 3)
    assert len(list((tmp_path / "assets/examples/bundle").glob("*.png"))) > 0
    assert (tmp_path / "assets/clusters/bundle/sizes.json").is_file()
    # the VQ-AR baseline beside it: the same stage-1 recipe on the VQGAN's ids, sharing its VQ graphs
    env |= {"BASE": str(tmp_path / "bundle"), "BUNDLE": str(tmp_path / "bundle-vq")}
    r = subprocess.run(["bash", "training/fmnist_vq.sh", "--seed=1"], check=False, cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    vq = load_bundle(tmp_path / "bundle-vq", device="cpu", threads=1)
    assert vq.config.is_vq and vq.manifest["graphs"]["vq_decoder"] == "../bundle/vq_decoder.onnx"
    from digit_core.weights import round_weights_to_half
    from training.assemble import vq_model
    ref = round_weights_to_half(vq_model(tmp_path / "run/stage1_vq/stage1.safetensors",
                                         tmp_path / "bundle/vqgan.safetensors"))
    a, b = vq.generate([0, 1, 2], seed=2), ref.generate([0, 1, 2], seed=2)
    assert np.array_equal(a.vq_tokens, b.vq_tokens) and np.abs(a.images.astype(int) - b.images).max() <= 1


@pytest.mark.parametrize("stage", ["ssl", "features", "kmeans", "vqgan", "stage1", "stage2", "assemble", "evaluate",
                                   "sampling_sweep", "publish", "eval_imagenet", "thesis", "unbundle"])
def test_a_stage_run_as_a_file_says_how_to_run_it(stage: str) -> None:
    """``python training/X.py`` puts training/ first on the path, where ssl.py would shadow the
    standard library's ssl (a circular-import traceback inside torch): each stage says instead
    how to run it, before importing anything."""
    r = subprocess.run([sys.executable, f"training/{stage}.py", "--help"], check=False, cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == (f"run the stages as modules from the repository root: "
                                                      f"python -m training.{stage} --help")
