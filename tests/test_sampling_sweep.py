"""training.sampling_sweep: the grid, the rule that picks the default, on a tiny bundle."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from digit_core.presets import tiny
from digit_core.export import export_bundle
from digit_core.pipeline import DiGIT
from training.sampling_sweep import choose, main
from test_evaluate import separable_folder


def test_the_rule_prefers_low_fd_among_accurate_settings() -> None:
    rows = [{"cfg_scale": 1.0, "top_k": 0, "class_accuracy": 0.70, "fd": 2.0},
            {"cfg_scale": 2.5, "top_k": 0, "class_accuracy": 0.91, "fd": 3.0},
            {"cfg_scale": 3.5, "top_k": 0, "class_accuracy": 0.95, "fd": 5.0}]
    assert choose(rows, 0.90)["cfg_scale"] == 2.5                 # accurate enough, and the closest to the data
    assert choose(rows, 0.99)["cfg_scale"] == 3.5                 # none reaches it: the most accurate


def test_sweep_end_to_end_writes_every_setting(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bundle = export_bundle(DiGIT(tiny(3)), tmp_path / "bundle")
    fit = separable_folder(tmp_path / "fit", per_class=12)
    val = separable_folder(tmp_path / "val", per_class=6, seed=1)
    out = tmp_path / "sweep.json"
    main([f"--bundle={bundle}", f"--data={fit}", f"--test_data={val}", "--per_class=4", "--cfg_scales=[1,2]",
          "--top_ks=[0,4]", "--batch_size=6", "--threads=1", "--classifier_epochs=5", "--n_boot=20",
          f"--classifier={tmp_path / 'clf.safetensors'}", "--device=cpu", f"--out={out}"])
    r = json.loads(out.read_text())
    assert [(row["cfg_scale"], row["top_k"]) for row in r["rows"]] == [(1, 0), (1, 4), (2, 0), (2, 4)]
    for row in r["rows"]:
        assert 0 <= row["class_accuracy_ci"][0] <= row["class_accuracy"] <= row["class_accuracy_ci"][1] <= 1
        assert row["fd_ci"][0] <= row["fd"] + 1e-9 and row["settings"]["cfg_scale"] == row["cfg_scale"]
        assert row["settings"]["top_k"] == row["top_k"]           # the settings the generation recorded
    assert (r["chosen"]["cfg_scale"], r["chosen"]["top_k"]) in {(1, 0), (1, 4), (2, 0), (2, 4)}
    assert r["samples_per_setting"] == 12 and r["judge"]["test_data"] == str(val)
