"""bench.bench_imagenet --quick: the ImageNet benchmark's code path on the tiny preset."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("eager", "onnxruntime fp32", "onnxruntime int8")


def test_quick_run_writes_every_table(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "bench.bench_imagenet", "--quick", "--threads", "1", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "bench.json").read_text())
    assert rep["complete"] and rep["bandwidth_GBps"] > 0 and len(rep["load_average"]["after"]) == 3
    (res,) = rep["results"]
    assert res["preset"] == "tiny" and res["params"]["stage1"] > 0
    assert [t["batch"] for t in res["tokenizer_images_per_s"]] == [1, 8]
    assert all(t[k] > 0 for t in res["tokenizer_images_per_s"] for k in BACKENDS)
    assert [(d["stage"], d["batch"]) for d in res["decoding"]] == [(1, 1), (1, 8), (2, 1), (2, 8)]
    for d in res["decoding"]:
        assert all(d["tokens_per_s"][k] > 0 and d["prefill_s"][k] > 0 for k in BACKENDS)
        assert d["weight_bytes"]["int8"] < 0.5 * d["weight_bytes"]["fp32"]   # int8 matrices, float16 elsewhere
        assert ("floor_tokens_per_s" in d) == (d["batch"] == 1)
    for k in BACKENDS:
        e = res["end_to_end"][k]
        assert e["total_s"] >= e["stage1_s"] > 0 and e["peak_rss"] > 50e6
    md = (tmp_path / "bench.md").read_text()
    assert "| batch | eager | onnxruntime fp32 | onnxruntime int8 |" in md and "time / floor" in md and "peak RSS" in md


def test_a_child_reports_its_own_peak_memory_not_its_parents() -> None:
    """End-to-end figures come from fresh child processes; ``ru_maxrss`` would give them the
    parent's peak (Linux carries it over fork + exec), so a small child must report a small peak."""
    import numpy as np
    from bench.bench_imagenet import peak_rss
    held = np.ones(1 << 30, np.uint8)   # 1 GiB resident in this process (the child imports torch: ~0.4 GiB)
    child = subprocess.run([sys.executable, "-c", "from bench.bench_imagenet import peak_rss; print(peak_rss())"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    assert peak_rss() > held.nbytes > int(child.stdout.split()[-1])
