"""training.evaluate: the evaluation CLI end to end on a tiny random bundle and a separable synthetic folder."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digit_core.presets import tiny
from digit_core.export import export_bundle
from digit_core.pipeline import DiGIT
from digit_core.runtime import BundleError
from training.data import as_uint8
from training.evaltools import EvalConfig, frechet_distance, from_uint8, held_out_spec
from training.evaluate import main
from training.files import atomic_save

torch.set_num_threads(1)

SIZES = ["--per_class=2", "--fid_n=12", "--completions=4", "--table1_n=8", "--probe_train=48", "--probe_test=12",
         "--batch_size=8", "--threads=1", "--classifier_epochs=40", "--device=cpu"]


def separable_folder(root: Path, per_class: int = 20, classes: int = 3, seed: int = 0) -> Path:
    """16x16 PNGs whose class is a fixed pattern (horizontal stripes, vertical stripes, checks) under noise."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[:16, :16]
    patterns = [(r // 2) % 2, (c // 2) % 2, ((r // 4) + (c // 4)) % 2]
    for k in range(classes):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(per_class):
            img = 0.25 + 0.5 * patterns[k % 3] + rng.uniform(-0.15, 0.15, (16, 16))
            Image.fromarray(np.repeat((img * 255).round().astype(np.uint8)[..., None], 3, 2)).save(
                root / f"class{k}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    m = DiGIT(tiny(3))
    with torch.no_grad():   # spread the centroids so tokenize uses many clusters
        m.codebook.set_centroids(torch.randn(16, 32))
    return export_bundle(m, tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return separable_folder(tmp_path_factory.mktemp("data") / "images")


def _run(bundle: Path, data: Path, out: Path, clf: Path, *more: str) -> dict:
    main([f"--bundle={bundle}", f"--data={data}", f"--out={out}", f"--classifier={clf}", *SIZES, *more])
    return json.loads((out / "metrics.json").read_text())


def test_end_to_end_and_rerun(bundle: Path, folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="digit.evaluate")
    clf = tmp_path / "clf" / "classifier.safetensors"
    m = _run(bundle, folder, tmp_path / "a", clf)

    c = m["classifier"]
    assert not c["reused"] and clf.is_file() and not list(clf.parent.glob(".*.tmp"))
    assert c["test_images"] == 12 and c["test_accuracy"] >= 0.9          # the classes are separable
    s = m["samples"]
    assert s["n"] == 6 and 0 <= s["accuracy"] <= 1 and set(s["per_class"]) == {"class0", "class1", "class2"}
    assert s["accuracy"] == pytest.approx(np.mean(list(s["per_class"].values())))   # 2 samples in each class
    lo, hi = s["accuracy_ci"]
    assert 0 <= lo <= s["accuracy"] <= hi <= 1 and set(s["per_class_ci"]) == set(s["per_class"])
    f = m["frechet"]
    assert f["n"] == 12 and f["samples_ci"][0] <= f["samples"] + 1e-9 <= f["samples_ci"][1] + 1e-9
    assert k_ci_ok(m["completion"])
    assert "unguided" not in m   # tiny's default is already unguided: nothing to add
    assert all(math.isfinite(f[k]) and f[k] >= 0 for k in ("samples", "train_floor", "noisy_test_20db"))
    # the settings the samples and completions were drawn with, as the runtime resolved them
    defaults = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_scale": 1.0, "stage2_temperature": 1.0,
                "stage2_top_k": 0, "stage2_top_p": 0.8}                     # tiny's config.sampling
    assert m["sampling"] == defaults
    k = m["completion"]
    assert k["n"] == 4 and k["keep_rows"] == 2 and k["conditioning"] == "null class (unconditional)"
    assert k["sampling"] == defaults                                        # null class: never guided
    assert 0 <= k["agreement"] <= 1
    r = m["reconstruction"]
    assert r["n"] == 12 and 0 < r["psnr_db"] < 100
    p = m["linear_probe"]
    assert (p["train"], p["test"]) == (48, 12) and 0 <= p["encoder"] <= 1 and p["pixels"] >= 0.9
    t = m["table1"]["ours"]
    assert t["num_images"] == 8 and t["snr_db"] == [30, 25, 20, 15, 10, 5, 1, 0.01]
    assert all(len(t[key]) == 8 for key in ("disc_change", "vq_change", "disc_cos_sim", "vq_cos_sim"))
    assert t["disc_change"][-1] > t["disc_change"][0] and t["disc_cos_sim"][-1] < t["disc_cos_sim"][0]
    assert set(m["timings_s"]) == {"data", "classifier", "samples", "frechet", "completion", "reconstruction",
                                   "linear_probe", "table1", "total"}
    md = (tmp_path / "a" / "summary.md").read_text()
    assert "| classifier test accuracy" in md and "≥ 90.0%" in md and "0.114" in md   # a target and a paper figure
    assert "top_k=0" in md and "cfg_scale=1.0" in md
    # Markdown reads a line starting with ">" as a block quote: no line of the card's text may start so
    assert not [line for line in md.splitlines() if line.lstrip().startswith(">")]

    # a rerun reuses the classifier file and, everything being seeded, gives the same figures
    mtime = clf.stat().st_mtime_ns
    caplog.clear()
    again = _run(bundle, folder, tmp_path / "b", clf)
    assert again["classifier"]["reused"] and clf.stat().st_mtime_ns == mtime
    assert any("reusing classifier" in rec.getMessage() for rec in caplog.records)
    for part in ("samples", "frechet", "completion", "reconstruction", "linear_probe", "table1"):
        assert again[part] == m[part], part
    assert again["classifier"]["test_accuracy"] == c["test_accuracy"]


def k_ci_ok(k: dict) -> bool:
    lo, hi = k["agreement_ci"]
    return 0 <= lo <= k["agreement"] <= hi <= 1


def test_a_guided_bundle_is_also_measured_without_guidance(folder: Path, tmp_path: Path) -> None:
    cfg = tiny(3)
    cfg.sampling.cfg_scale = 2.0
    torch.manual_seed(0)
    bundle = export_bundle(DiGIT(cfg), tmp_path / "guided")
    m = _run(bundle, folder, tmp_path / "out", tmp_path / "clf.safetensors")
    u = m["unguided"]
    assert m["sampling"]["cfg_scale"] == 2.0 and u["sampling"]["cfg_scale"] == 1.0 and u["n"] == m["samples"]["n"]
    assert 0 <= u["accuracy_ci"][0] <= u["accuracy"] <= u["accuracy_ci"][1] <= 1 and u["target"] == 0.75
    assert math.isfinite(u["frechet"]) and "samples_unguided" in m["timings_s"]
    assert "without guidance (cfg_scale 1)" in (tmp_path / "out" / "summary.md").read_text()


def test_a_vq_ar_bundle_is_measured_the_same_way(bundle: Path, folder: Path, tmp_path: Path) -> None:
    """The VQ-AR baseline: the same figures, its probe on the VQ latents, no discriminative side of Table 1."""
    from digit_core.presets import tiny_vq
    torch.manual_seed(0)
    vq = DiGIT(tiny_vq(3))
    m = _run(export_bundle(vq, tmp_path / "vq"), folder, tmp_path / "out", tmp_path / "clf.safetensors")
    assert m["tokens"] == "vq" and 0 <= m["samples"]["accuracy"] <= 1 and 0 <= m["completion"]["agreement"] <= 1
    assert m["table1"]["ours"]["disc_change"] is None and len(m["table1"]["ours"]["vq_change"]) == 8
    assert 0 <= m["linear_probe"]["encoder"] <= 1
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "— /" in text and "VQ-token model" in text


def test_bad_inputs(bundle: Path, folder: Path, tmp_path: Path) -> None:
    clf = tmp_path / "clf.safetensors"
    with pytest.raises(FileNotFoundError, match="no bundle folder"):
        _run(tmp_path / "nope", folder, tmp_path / "o", clf)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        _run(tmp_path / "empty", folder, tmp_path / "o", clf)
    two = separable_folder(tmp_path / "two", per_class=6, classes=2)
    with pytest.raises(ValueError, match="has 3 classes but .* has 2"):
        _run(bundle, two, tmp_path / "o", clf)
    with pytest.raises(ValueError, match="sizes must be positive"):
        _run(bundle, folder, tmp_path / "o", clf, "--completions=0")
    assert not clf.exists() and not (tmp_path / "o").exists()      # nothing trained or written before the checks


def test_a_cached_classifier_must_fit(bundle: Path, folder: Path, tmp_path: Path) -> None:
    clf = tmp_path / "clf.safetensors"      # one for 32x32 grey images
    atomic_save({"w": torch.zeros(1)}, clf, {"arch": {"channels": 1, "image_size": 32, "num_classes": 3, "width": 32,
                                                      "dim": 256}, "classes": ["class0", "class1", "class2"]})
    with pytest.raises(ValueError, match="delete it or set classifier"):
        _run(bundle, folder, tmp_path / "o", clf)


def test_frechet_distance() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a + 3.0) == pytest.approx(6 * 9.0, rel=1e-8)       # same covariance: |shift|^2
    b = rng.standard_normal((300, 6)) * 2.0
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)
    scipy_linalg = pytest.importorskip("scipy.linalg")   # the textbook formula, with a general sqrtm
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * scipy_linalg.sqrtm(sa @ sb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="feature rows"):
        frechet_distance(a[:1], b)


def test_splits_and_image_conversion() -> None:
    assert held_out_spec(EvalConfig(data="fmnist")) == "fmnist:test"
    assert held_out_spec(EvalConfig(data="fmnist@/d")) == "fmnist:test@/d"
    assert held_out_spec(EvalConfig(data="/imgs")) == ""
    assert held_out_spec(EvalConfig(data="/imgs", test_data="/t")) == "/t"
    x = torch.randint(0, 256, (2, 1, 8, 8)).float() / 255
    u8 = as_uint8(x)
    assert u8.shape == (2, 8, 8, 3) and u8.dtype == np.uint8 and (u8[..., 0] == u8[..., 2]).all()
    assert torch.allclose(from_uint8(u8, 1), x, atol=1e-6)   # grey survives the bundle's 3 equal channels
