"""CUDA paths: the PyTorch pipeline, every training stage in bf16, torchrun with resume, the
onnxruntime CUDA provider and faiss on the GPU. Marked ``cuda``; skipped without a GPU.

``bench.device_check`` runs these on a GPU machine (``pytest -m cuda``); its ``--dry-run`` sets
``DIGIT_TEST_DEVICE=cpu`` so the same tests run on the CPU and the script is tested here.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from digit_core.presets import tiny
from digit_core.pipeline import DiGIT
from training.files import atomic_save, load_tensors

DEVICE = os.environ.get("DIGIT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE is None, reason="no CUDA GPU (DIGIT_TEST_DEVICE=cpu runs these tests on the CPU)")]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_tf32():
    """cuDNN convolutions default to TF32 (10-bit mantissa), which would move the tokenizer's and
    the VQGAN's outputs far more than float32 rounding; compare in true float32."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def _models() -> tuple[DiGIT, DiGIT]:
    torch.manual_seed(0)
    cpu = DiGIT(tiny(3))
    with torch.no_grad():
        cpu.codebook.set_centroids(torch.randn(16, 32))
    return cpu, copy.deepcopy(cpu).to(DEVICE)


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def test_pipeline_on_device_samples_the_cpu_tokens() -> None:
    cpu, dev = _models()
    assert dev.device.type == DEVICE
    for seed, scale in ((0, None), (1, 1.5), (2, 3.0)):
        a, b = (m.generate([0, 1, 2, 0], seed=seed, cfg_scale=scale, top_k=8) for m in (cpu, dev))
        assert np.array_equal(a.disc_tokens, b.disc_tokens), (seed, scale)
        assert np.array_equal(a.vq_tokens, b.vq_tokens), (seed, scale)
        assert np.abs(a.images.astype(int) - b.images).max() <= 1


def test_tokenize_and_complete_on_device_match_the_cpu() -> None:
    cpu, dev = _models()
    imgs = _images(6)
    (ids, dist, feats), (rids, rdist, rfeats) = dev.tokenize(imgs), cpu.tokenize(imgs)
    assert np.array_equal(ids, rids)
    assert np.abs(feats - rfeats).max() <= 1e-4 * np.abs(rfeats).max()
    assert np.array_equal(dev.vq_tokenize(imgs), cpu.vq_tokenize(imgs))
    a, b = dev.complete_detailed(imgs[0], keep_rows=2, n=3, seed=4), cpu.complete_detailed(imgs[0], keep_rows=2, n=3, seed=4)
    assert np.array_equal(a.disc_tokens, b.disc_tokens) and np.array_equal(a.vq_tokens, b.vq_tokens)
    assert np.array_equal(a.disc_tokens[:, :2], np.repeat(rids[:1, :2], 3, 0))   # the kept rows are the image's


def test_every_training_stage_runs_a_few_bf16_steps(tmp_path: Path) -> None:
    from tests.test_training import TINY, make_folder
    from training import assemble, features, kmeans, ssl, stage1, stage2, vqgan
    folder = make_folder(tmp_path / "images")
    base = [f"--root={tmp_path}", f"--data={folder}", *TINY, f"--device={DEVICE}", "--bf16=true"]
    ssl.main(base + ["--steps=3", "--local_crops=2", "--local_size=8", "--probe_train=24", "--probe_test=8"])
    features.main(base + ["--fraction=0.5"])
    try:
        import faiss  # noqa: F401  (K-Means needs it)
        kmeans.main(base + ["--niter=5"])
    except ImportError:
        # no faiss on this machine: the later stages still need a codebook, so take K features
        from training.kmeans import read_shards
        fit = read_shards(tmp_path / "features", "fit")
        atomic_save({"centroids": torch.from_numpy(fit[:: len(fit) // 16][:16].copy())}, tmp_path / "kmeans/codebook.safetensors")
    vqgan.main(base + ["--steps=3", "--eval_images=8", "--adv_start=1"])
    stage1.main(base + ["--steps=3", f"--val_data={folder}", "--eval_every=3", "--eval_batches=1"])
    stage2.main(base + ["--steps=3"])
    assemble.main(base)
    for stage in ("ssl", "vqgan", "stage1", "stage2"):
        log = (tmp_path / stage / "train.log").read_text()
        assert f"on {DEVICE}" in log, stage
        losses = [r["loss"] for r in map(json.loads, (tmp_path / stage / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        assert losses and all(np.isfinite(losses)), stage
        assert json.loads((tmp_path / stage / "train_config.json").read_text())["bf16"] is True
    model = DiGIT.load(tmp_path / "model", device=DEVICE)
    assert model.sample([0, 2], seed=0).shape == (2, 16, 16, 3)


def test_torchrun_one_process_resumes(tmp_path: Path) -> None:
    from tests.test_training import TINY, make_folder
    folder = make_folder(tmp_path / "images", n=16)
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(steps: int) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "training.vqgan",
               f"--root={tmp_path}", f"--data={folder}", *TINY, f"--device={DEVICE}", f"--steps={steps}", "--ckpt_every=2",
               "--adv_start=1", "--eval_every=100", "--eval_images=8"]
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]

    run(2)
    assert load_tensors(tmp_path / "vqgan/checkpoint.safetensors")[1]["step"] == 2
    run(4)
    log = (tmp_path / "vqgan/train.log").read_text()
    assert "rank 0/1" in log and "resumed from" in log and f"on {DEVICE}" in log
    assert load_tensors(tmp_path / "vqgan/checkpoint.safetensors")[1]["step"] == 4
    assert (tmp_path / "vqgan/vqgan.safetensors").is_file()


def test_onnxruntime_bundle_on_device_matches_pytorch(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: the bundle path is not checked")
    if DEVICE == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime has no CUDA provider ({ort.get_available_providers()}): install onnxruntime-gpu")
    from digit_core.export import export_bundle
    from digit_core.runtime import load_bundle
    cpu, _ = _models()
    bundle = load_bundle(export_bundle(cpu, tmp_path / "tiny"), device=DEVICE, threads=1)
    assert bundle.device == DEVICE
    a, b = bundle.generate([0, 1, 2], seed=5, cfg_scale=1.5), cpu.generate([0, 1, 2], seed=5, cfg_scale=1.5)
    assert np.array_equal(a.disc_tokens, b.disc_tokens) and np.array_equal(a.vq_tokens, b.vq_tokens)
    assert np.array_equal(bundle.tokenize(_images(4))[0], cpu.tokenize(_images(4))[0])


def test_faiss_kmeans_on_device_finds_planted_clusters() -> None:
    faiss = pytest.importorskip("faiss", reason="faiss is not installed: K-Means on the GPU is not checked")
    if DEVICE == "cuda" and faiss.get_num_gpus() == 0:
        pytest.skip("faiss sees no GPU: install faiss-gpu")
    from digit_core.codebook import fit_kmeans
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (8, 16)).astype(np.float32)
    x = (centres[rng.integers(0, 8, 4000)] + rng.normal(0, 0.1, (4000, 16))).astype(np.float32)
    # twice as many centroids as planted centres: plain K-Means with K = 8 can settle with two
    # centroids on one cluster (seed 0 does, on the CPU), which says nothing about the device
    found = np.asarray(fit_kmeans(x, 16, niter=20, seed=0, gpu=DEVICE == "cuda"))
    nearest = np.linalg.norm(found[:, None] - centres[None], axis=-1).min(0)
    assert nearest.max() < 0.5   # every planted centre has a centroid on it
