"""bench.device_check: the GPU machine's script, dry-run on the CPU (tiny preset), and its imports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_passes_every_part(tmp_path: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "bench.device_check", "--dry-run", "--out", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    rep = json.loads((tmp_path / "device_check.json").read_text())
    assert rep["device"] == "cpu" and rep["preset"] == "tiny"
    tests = {t["test"]: t for t in rep["parts"]["tests"]["tests"]}
    must_pass = ("test_pipeline_on_device_samples_the_cpu_tokens", "test_tokenize_and_complete_on_device_match_the_cpu",
                 "test_every_training_stage_runs_a_few_bf16_steps", "test_torchrun_one_process_resumes")
    assert all(tests[t]["outcome"] == "passed" for t in must_pass), tests
    for name in ("test_onnxruntime_bundle_on_device_matches_pytorch", "test_faiss_kmeans_on_device_finds_planted_clusters"):
        assert tests[name]["outcome"] == "passed" or "not installed" in tests[name]["message"], tests[name]
    rows = rep["parts"]["decoding"]["rows"]
    assert [(x["stage"], x["batch"]) for x in rows] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    assert all(x["eager_tokens_per_s"] > 0 and x["graph_tokens_per_s"] is None and x["floor"]["tokens_per_s"] > 0 for x in rows)
    gen = rep["parts"]["generation"]
    assert gen["images_8"]["total_s"] > 0 and gen["images_8_cfg_sized_s"] > 0
    md = (tmp_path / "device_check.md").read_text()
    assert "## CUDA-marked tests" in md and "## Decoding with the static KV cache" in md and "LlamaGen" in md


def test_imports_without_onnxruntime_or_faiss() -> None:
    """The GPU machine may lack both: the module imports and reports them absent."""
    code = ("import sys; sys.modules['onnxruntime'] = None; sys.modules['faiss'] = None\n"
            "import bench.device_check as d; e = d.environment(); print(e['onnxruntime'], e['faiss'])")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["None", "None"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_refuses_to_run_without_a_gpu_unless_dry(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "bench.device_check", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--dry-run" in r.stderr
