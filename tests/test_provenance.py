"""A rerun never silently reuses stale products (issue #19.13): token caches, feature shards and
checkpoints record what made them; a checkpoint made from other data or inputs is refused with
what changed and how to start over (--fresh), a cache is rebuilt."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digit_core.encoders import Encoder
from digit_core.presets import tiny
from training import features, stage1, vqgan
from training.checkpoint import CHECKPOINT
from training.files import StaleRunError, atomic_save, load_tensors, read_meta

TINY = ["--model=tiny", "--batch_size=8", "--workers=0"]


def _folder(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        (root / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"class{i % 3}" / f"{i}.png")
    return root


def _encoder(root: Path, seed: int) -> None:
    torch.manual_seed(seed)
    atomic_save(Encoder(tiny(3).encoder).state_dict(), root / "ssl/encoder.safetensors")


def _parts(root: Path) -> None:
    """A frozen encoder and codebook as the ssl and kmeans stages leave them."""
    _encoder(root, 0)
    atomic_save({"centroids": torch.randn(16, 32, generator=torch.Generator().manual_seed(1))},
                root / "kmeans/codebook.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("data")
    return _folder(base / "a", 24, 0), _folder(base / "b", 30, 1)


def _stage1(root: Path, folder: Path, *more: str) -> None:
    stage1.main([f"--root={root}", f"--data={folder}", *TINY, "--steps=2", "--ckpt_every=1", "--log_every=1", *more])


def _config(root: Path) -> dict:
    return json.loads((root / "stage1/train_config.json").read_text())


def test_rerun_on_other_data_is_refused_and_the_record_stays_true(tmp_path: Path, data: tuple[Path, Path]) -> None:
    a, b = data
    _parts(tmp_path)
    _stage1(tmp_path, a)
    assert _config(tmp_path)["data"] == str(a)
    ckpt = tmp_path / "stage1" / CHECKPOINT
    with pytest.raises(StaleRunError, match=r"cannot resume .*checkpoint.safetensors.*data=.*a'.*this run has .*b'.*"
                                            r"data.rows: 48 -> 60.*--fresh"):
        _stage1(tmp_path, b, "--steps=4")
    assert _config(tmp_path)["data"] == str(a)            # train_config.json still says what the checkpoint saw
    assert read_meta(ckpt)["step"] == 2
    # the token cache was rebuilt for b (a cache is derived data), and --fresh trains on it from step 0
    assert len(load_tensors(tmp_path / "stage1/tokens.safetensors")[0]["disc"]) == 60
    _stage1(tmp_path, b, "--steps=3", "--fresh")
    assert _config(tmp_path)["data"] == str(b) and read_meta(ckpt)["step"] == 3
    log = (tmp_path / "stage1/train.log").read_text()
    assert "--fresh: starting stage1 over" in log and "rebuilding it" in log
    rows = [json.loads(line) for line in (tmp_path / "stage1/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # the old run's metrics are gone
    # same data and inputs: a rerun resumes, and may change settings such as steps
    _stage1(tmp_path, b, "--steps=4")
    assert read_meta(ckpt)["step"] == 4 and "resumed from" in (tmp_path / "stage1/train.log").read_text()


def test_a_retrained_encoder_rebuilds_the_cache_and_refuses_the_checkpoint(tmp_path: Path, data: tuple[Path, Path]) -> None:
    a, _ = data
    _parts(tmp_path)
    _stage1(tmp_path, a)
    before = load_tensors(tmp_path / "stage1/tokens.safetensors")[0]["disc"]
    _encoder(tmp_path, 7)                                 # the ssl stage was rerun: same path, other weights
    with pytest.raises(StaleRunError, match=r'inputs.encoder: "[0-9a-f]+.* -> "[0-9a-f]+'):
        _stage1(tmp_path, a, "--steps=4")
    after = load_tensors(tmp_path / "stage1/tokens.safetensors")[0]["disc"]
    assert before.shape == after.shape and not torch.equal(before, after)
    meta = read_meta(tmp_path / "stage1/tokens.safetensors")
    assert meta["key"]["tokenizers"]["disc"]["encoder"] != read_meta(tmp_path / "stage1" / CHECKPOINT)["provenance"]["inputs"]["encoder"]


def test_a_checkpoint_from_before_provenance_is_refused_unless_asked(tmp_path: Path, data: tuple[Path, Path]) -> None:
    """A run started by the previous code: its checkpoint and token cache record nothing."""
    a, _ = data
    _parts(tmp_path)
    _stage1(tmp_path, a)
    for name in (CHECKPOINT, "tokens.safetensors"):   # strip the records, as the old code wrote them
        tensors, meta = load_tensors(tmp_path / "stage1" / name)
        atomic_save(tensors, tmp_path / "stage1" / name, {k: v for k, v in meta.items() if k not in ("provenance", "key")})
    with pytest.raises(StaleRunError, match="records no provenance.*--fresh.*--resume_unverified"):
        _stage1(tmp_path, a, "--steps=3")
    _stage1(tmp_path, a, "--steps=3", "--resume_unverified")
    meta = read_meta(tmp_path / "stage1" / CHECKPOINT)
    assert meta["step"] == 3 and meta["provenance"]["inputs"]["encoder"]
    log = (tmp_path / "stage1/train.log").read_text()
    assert "without a provenance record" in log and "it records none): rebuilding it" in log


def test_vqgan_rerun_on_other_images_is_refused(tmp_path: Path, data: tuple[Path, Path]) -> None:
    a, b = data
    args = [f"--root={tmp_path}", *TINY, "--steps=2", "--ckpt_every=1", "--eval_images=8", "--adv_weight=0"]
    vqgan.main(args + [f"--data={a}"])
    with pytest.raises(StaleRunError, match=r"data.fingerprint"):
        vqgan.main(args + [f"--data={b}", "--steps=3"])
    assert json.loads((tmp_path / "vqgan/train_config.json").read_text())["data"] == str(a)


def test_feature_shards_from_other_data_are_rebuilt(tmp_path: Path, data: tuple[Path, Path]) -> None:
    a, b = data
    _parts(tmp_path)
    args = [f"--root={tmp_path}", *TINY, "--fraction=0.5"]
    features.main(args + [f"--data={a}"])
    shard = tmp_path / "features/fit.rank0-of-1.npy"
    assert np.load(shard).shape == (12 * 16, 32)
    features.main(args + [f"--data={a}"])                   # same record: skipped
    assert "exists, skipping" in (tmp_path / "features/train.log").read_text()
    features.main(args + [f"--data={b}"])
    assert np.load(shard).shape == (15 * 16, 32)
    assert "data.rows: 24 -> 30" in (tmp_path / "features/train.log").read_text()
