"""The tokenizer sweep (training.thesis) and its report (training.analyses.thesis) end to end on tiny data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_training import REPO, make_folder


def run(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_sweep_trains_measures_and_reports_two_tokenizers(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "images")
    recipe = {"root": str(tmp_path / "runs"), "model": "tiny", "data": str(folder), "workers": 0, "batch_size": 8,
              "features": {"fraction": 0.5}, "kmeans": {"niter": 5},
              "stage1": {"steps": 2, "val_data": str(folder), "eval_every": 2, "eval_batches": 1},
              "stage2": {"steps": 2, "val_data": str(folder), "eval_every": 2, "eval_batches": 1}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    run("training.vqgan", f"--root={tmp_path / 'vq'}", f"--data={folder}", "--model=tiny", "--batch_size=8",
        "--workers=0", "--steps=2", "--eval_images=8")
    sweep = ["--config", str(tmp_path / "tiny.yaml"), "--model=tiny", f"--vqgan={tmp_path / 'vq/vqgan/vqgan.safetensors'}"]
    run("training.thesis", "prepare", "vq", "vit-untrained", *sweep)
    enc = tmp_path / "runs/vit-untrained/ssl/encoder.safetensors"
    from training.files import load_tensors
    assert load_tensors(enc)[1]["objective"] == "untrained" and (tmp_path / "runs/vit-untrained/kmeans/codebook.safetensors").is_file()
    run("training.thesis", "train", "vq", "vit-untrained", *sweep)
    # stage 2's cache was put together from stage 1's disc tokens and the VQ run's codes: equal to
    # the cache stage 2 makes itself
    composed, meta = load_tensors(tmp_path / "runs/vit-untrained/stage2/tokens.safetensors")
    assert "composed_from" in meta
    kmeans = tmp_path / "runs/vit-untrained/kmeans/codebook.safetensors"
    run("training.stage2", "--config", str(tmp_path / "tiny.yaml"), f"--root={tmp_path / 'fresh'}", "--model=tiny",
        f"--encoder={enc}", f"--codebook={kmeans}", f"--vqgan={tmp_path / 'vq/vqgan/vqgan.safetensors'}", "--steps=1")
    fresh, fmeta = load_tensors(tmp_path / "fresh/stage2/tokens.safetensors")
    assert fmeta["key"] == meta["key"] and all(torch.equal(fresh[k], composed[k]) for k in ("label", "disc", "vq"))
    for name in ("vq", "vit-untrained"):
        assert (tmp_path / f"runs/{name}/bundle/manifest.json").is_file()
    assert not (tmp_path / "runs/vq/stage2").exists()   # VQ codes need no stage 2
    # a second training seed: its own run, the seed-0 run's tokenizer
    run("training.thesis", "train", "vit-untrained", "--train_seed=1", "--stages=stage1", *sweep)
    c = json.loads((tmp_path / "runs/vit-untrained-seed1/stage1/train_config.json").read_text())
    assert c["seed"] == 1 and c["encoder"] == str(enc) and not (tmp_path / "runs/vit-untrained-seed1/ssl").exists()
    # seed 0's token cache had the same key, so the stage used it instead of writing its own
    assert (tmp_path / "runs/vit-untrained-seed1/stage1/tokens.safetensors").samefile(
        tmp_path / "runs/vit-untrained/stage1/tokens.safetensors")
    run("training.thesis", "records", "vq", "vit-untrained", *sweep, f"--out={tmp_path / 'records'}")
    assert (tmp_path / "records/vit-untrained/stage2/metrics.jsonl").is_file()
    assert (tmp_path / "records/vq/stage1_vq/train_config.json").is_file()

    sizes = ["--seeds=0,1", "--n_per_class=2", "--n_complete=4", "--n_table1=4", "--n_probe_train=12",
             "--n_probe_test=6", "--batch=4", "--threads=1"]
    run("training.analyses.thesis", "measure", "vq", "vit-untrained", f"--root={tmp_path / 'runs'}",
        f"--records={tmp_path / 'records'}", f"--data={folder}", f"--classifier={tmp_path / 'clf.safetensors'}", *sizes)
    m = json.loads((tmp_path / "records/vit-untrained/measure.json").read_text())
    st = m["stability"]
    assert len(st["clipped"]["change"]) == len(st["unclipped"]["change"]) == len(st["snr_db"]) == 8
    # clipping to [0, 1] removes noise: the tokenizer saw a higher SNR than asked at 0.01 dB
    assert st["clipped"]["snr_measured"][-1] > st["snr_db"][-1]
    assert abs(st["unclipped"]["snr_measured"][0] - 30.0) < 1.0
    g = m["generation"]
    assert g["unguided"]["cfg_scale"] == 1.0 and g["guided"]["cfg_scale"] == 3.0 and g["unguided"]["n"] == 2 * 3 * 2
    assert [s["seed"] for s in g["guided"]["per_seed"]] == [0, 1]
    for key in ("accuracy", "fd"):
        est, lo, hi = g["guided"][key]
        assert lo <= est <= hi
    assert m["completion"]["12.5"]["keep_rows"] == 1 and m["completion"]["50.0"]["keep_rows"] == 2
    assert m["modelling"]["stage1_val_loss"] > 0 and m["modelling"]["tokens_per_image"] == 16
    assert len(m["information"]["stage1_layers"]) == 3    # tiny's 2 layers + the embedding
    assert m["ceiling"]["n"] == 8 and 0 <= m["ceiling"]["agreement"][0] <= 1   # all 8 held-out images
    vq = json.loads((tmp_path / "records/vq/measure.json").read_text())
    assert vq["tokens"] == "vq" and vq["encoder"] is None and vq["modelling"]["stage2_val_loss"] is None
    # --only_ceiling measures the ceiling again, into the record, and keeps the rest of it
    (tmp_path / "records/vq/measure.json").write_text(json.dumps({k: v for k, v in vq.items() if k != "ceiling"}))
    run("training.analyses.thesis", "measure", "vq", "--only_ceiling", f"--root={tmp_path / 'runs'}",
        f"--records={tmp_path / 'records'}", f"--data={folder}", f"--classifier={tmp_path / 'clf.safetensors'}", *sizes)
    again = json.loads((tmp_path / "records/vq/measure.json").read_text())
    assert again["ceiling"] == vq["ceiling"] and again["generation"] == vq["generation"]

    run("training.analyses.thesis", "report", f"--records={tmp_path / 'records'}", f"--out={tmp_path / 'report'}",
        "--no_png")
    md = (tmp_path / "report/thesis.md").read_text()
    assert "| vq |" in md and "| vit-untrained |" in md and "Not measured yet: ssl, supervised" in md
    data = json.loads((tmp_path / "report/thesis.json").read_text())
    assert [r["name"] for r in data["tokenizers"]] == ["vq", "vit-untrained"]


def test_sweep_cli_refuses_unknown_tokenizers_and_stages(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "training.thesis", "train", "vq", "--stages=stage3"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "unknown stages ['stage3']" in r.stderr
    r = subprocess.run([sys.executable, "-m", "training.thesis", "train", "nope"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "invalid choice: 'nope'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "training.thesis", "train", "conv-vit-untrained",
                        f"--root={tmp_path}"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "no tokenizer yet" in r.stderr


@pytest.mark.parametrize("name", ["thesis", "tokenizer_choice"])
def test_an_analysis_run_as_a_file_says_how_to_run_it(name: str) -> None:
    r = subprocess.run([sys.executable, f"training/analyses/{name}.py", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == (f"run the analyses as modules from the repository root: "
                                                      f"python -m training.analyses.{name} --help")
