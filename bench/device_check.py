"""One prepared check for a GPU machine: the CUDA tests, then imagenet-base decoding on the GPU.

    python -m bench.device_check --out DIR [--steps 32]
    python -m bench.device_check --dry-run --out DIR     # the same script on the CPU, tiny preset

Needs only PyTorch, timm, numpy, safetensors, onnx and pillow, plus pytest for part 1 (without
it that part records why and the others run); onnxruntime and faiss are optional and their checks are skipped, with the reason, when absent. Writes
``DIR/device_check.json`` and ``DIR/device_check.md``. Parts, each recorded on its own (a failing
part records its error and the others still run):

1. **tests**: ``pytest -m cuda tests/test_cuda.py`` -- the pipeline on the GPU samples the CPU's
   tokens for fixed seeds, tokenize/complete match, a few bf16 steps of every training stage, a
   one-process ``torchrun`` run that resumes, the onnxruntime CUDA bundle, faiss K-Means on GPU.
2. **decoding**: ``imagenet-base`` (random weights, bf16) stage-1 and stage-2 decoding at batch 1,
   16, 64 and 256 with the static KV cache, eager and replayed as a CUDA graph, each after a
   prefill to the middle of the grid, beside the floor: the larger of the bytes a step must read
   (weights + the whole static cache) over HBM bandwidth and its FLOPs over the bf16 peak.
3. **generation**: 8 images end to end through the flows (numpy sampling, as the app runs), CFG
   off as in the paper, and the CFG-sized batch (stage 1 at 16 rows), beside LlamaGen's published
   GPT-B figures (A100, 8 images with CFG: 7.80 s eager, 2.39 s with vLLM).

Targets a run under 6 minutes on one H200; ``--dry-run`` (CPU, tiny preset, 4 steps) is what the
test suite runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

import torch

from bench.bench_decode import weight_bytes
from digit_core.presets import preset
from digit_core.gpt import GPT
from digit_core.pipeline import DiGIT

REPO = Path(__file__).resolve().parents[1]
HBM_BYTES_PER_S = 4.8e12     # H200 HBM3e
BF16_FLOPS = 800e12          # H200 dense bf16, a round figure below the 989 TFLOP/s spec
LLAMAGEN = {"model": "LlamaGen GPT-B (111M), A100, 8 images 256x256 with CFG", "eager_s": 7.80, "vllm_s": 2.39}


def environment() -> dict[str, Any]:
    """Versions, the GPU, and which optional packages this machine has."""
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for mod in ("onnxruntime", "faiss", "timm", "onnx"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", "present")
        except ImportError:
            env[mod] = None
    return env


# -- 1. the CUDA-marked tests ------------------------------------------------------------------------------
def run_tests(out: Path, device: str, timeout: int) -> dict[str, Any]:
    """``pytest -m cuda`` on tests/test_cuda.py; every test's outcome and message from its JUnit XML."""
    if importlib.util.find_spec("pytest") is None:
        raise RuntimeError("pytest is not installed, so the CUDA-marked tests cannot run: pip install pytest "
                           "(or its wheel, offline); the other parts run without it")
    xml = out / "junit.xml"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    if device == "cpu":
        env["DIGIT_TEST_DEVICE"] = "cpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}", "tests/test_cuda.py"]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    tests = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                message = (el.get("message") or "").strip()
                if tag != "skipped":
                    message += "\n" + (el.text or "")[-2000:]
        tests.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)), "message": message})
    return {"returncode": r.returncode, "seconds": time.perf_counter() - t, "tests": tests,
            "summary": r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:]}


# -- 2. decoding -------------------------------------------------------------------------------------------
def graphed_step(gpt: GPT, cache: torch.Tensor) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """One-token decoding step of ``gpt`` captured as a CUDA graph over static input buffers
    (token ids, position) and ``cache``; calling it copies the inputs in and replays."""
    B, dev = cache.shape[2], cache.device
    idx = torch.zeros(B, 1, dtype=torch.long, device=dev)
    pos = torch.zeros((), dtype=torch.long, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():   # warm-up off the capture stream, as CUDA graphs need
        for _ in range(2):
            gpt(idx, pos, cache)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        logits = gpt(idx, pos, cache)

    def step(tokens: torch.Tensor, start: int) -> torch.Tensor:
        idx.copy_(tokens)
        pos.fill_(start)
        graph.replay()
        return logits
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_rate(gpt: GPT, batch: int, length: int, prefill: int, steps: int, graphed: bool) -> tuple[float, float]:
    """(tokens/s over ``steps`` one-token steps after a ``prefill``-token prefill, prefill seconds), best of 2,
    with a KV cache of ``length`` positions (the flows')."""
    dev = gpt.head.weight.device
    cache = gpt.new_cache(batch, length)
    seq = torch.randint(0, gpt.cfg.vocab_size, (batch, prefill + steps), device=dev)
    step = graphed_step(gpt, cache) if graphed else (lambda tok, t: gpt(tok, t, cache))
    _sync(dev)
    t = time.perf_counter()
    gpt(seq[:, :prefill], 0, cache)
    _sync(dev)
    prefill_s = time.perf_counter() - t
    best = float("inf")
    for _ in range(3):   # the first pass warms up (allocator, kernels)
        t = time.perf_counter()
        for i in range(prefill, prefill + steps):
            step(seq[:, i:i + 1], i)
        _sync(dev)
        best = min(best, time.perf_counter() - t)
    del cache
    return batch * steps / best, prefill_s


def floor(gpt: GPT, batch: int, length: int) -> dict[str, float]:
    """Fastest possible one-token step: weights + the whole static cache (``length`` positions) read
    once from HBM, or the matmul + attention FLOPs at the bf16 peak, whichever takes longer; as tokens/s."""
    c = gpt.cfg
    w = weight_bytes(gpt)
    cache = c.n_layer * 2 * batch * length * c.d_model * gpt.head.weight.element_size()
    flops = batch * (2 * w / gpt.head.weight.element_size() + 4 * c.n_layer * length * c.d_model)
    t_mem, t_flop = (w + cache) / HBM_BYTES_PER_S, flops / BF16_FLOPS
    return {"tokens_per_s": batch / max(t_mem, t_flop), "bound": "memory" if t_mem >= t_flop else "compute",
            "weight_GB": w / 1e9, "cache_GB": cache / 1e9, "GFLOP": flops / 1e9}


def run_decoding(model: DiGIT, batches: tuple[int, ...], steps: int) -> list[dict[str, Any]]:
    c, cuda = model.config, model.device.type == "cuda"
    rows = []
    for stage, gpt, T in ((1, model.stage1, c.stage1_positions), (2, model.stage2, c.stage2_positions)):
        n_prefix = 1 if stage == 1 else c.disc_grid ** 2 + 1
        grid = (c.disc_grid if stage == 1 else c.vq_grid) ** 2
        prefill = n_prefix + min(grid // 2, grid - 1 - steps)
        for b in batches:
            row: dict[str, Any] = {"stage": stage, "batch": b, "prefill_tokens": prefill, "steps": steps, "floor": floor(gpt, b, T)}
            row["eager_tokens_per_s"], row["prefill_s"] = decode_rate(gpt, b, T, prefill, steps, graphed=False)
            row["graph_tokens_per_s"] = decode_rate(gpt, b, T, prefill, steps, graphed=True)[0] if cuda else None
            rows.append(row)
            graph = "-" if row["graph_tokens_per_s"] is None else f"{row['graph_tokens_per_s']:,.0f}"
            print(f"  stage {stage} batch {b}: eager {row['eager_tokens_per_s']:,.0f} tok/s, graph {graph}, "
                  f"floor {row['floor']['tokens_per_s']:,.0f}", flush=True)
    return rows


# -- 3. generation --------------------------------------------------------------------------------------------
def run_generation(model: DiGIT) -> dict[str, Any]:
    """Seconds for 8 images through the flows (CFG off), and for 16 (stage 1's rows under CFG)."""
    out: dict[str, Any] = {}
    C = max(model.config.stage1.num_classes, 1)
    for n in (8, 16):
        classes = [i % C for i in range(n)] if model.config.stage1.num_classes else None
        model.generate(classes, n=None if classes else n, seed=0)   # warm-up
        _sync(model.device)
        t = time.perf_counter()
        g = model.generate(classes, n=None if classes else n, seed=1)
        _sync(model.device)
        out[f"images_{n}"] = {"total_s": time.perf_counter() - t, **{f"{k}_s": v for k, v in g.timings.items()}}
    a, b = out["images_8"], out["images_16"]
    out["images_8_cfg_sized_s"] = b["stage1_s"] + a["stage2_s"] + a["decode_s"]
    return out


# -- the report --------------------------------------------------------------------------------------------------
def markdown(r: dict[str, Any]) -> str:
    e = r["environment"]
    lines = [f"# Device check: {e['gpu'] or 'CPU (dry run)'}", "",
             f"torch {e['torch']} (CUDA {e['cuda']}), onnxruntime {e['onnxruntime'] or 'absent'}, faiss {e['faiss'] or 'absent'}; "
             f"preset {r['preset']}, {r['dtype']}; total {r['seconds']:.0f} s. Command: `{r['command']}`", ""]
    t = r["parts"]["tests"]
    lines += ["## CUDA-marked tests", ""]
    if "error" in t:
        lines += [f"**failed to run**: {t['error']}", ""]
    else:
        lines += [f"`pytest -m cuda tests/test_cuda.py`: {t['summary']} ({t['seconds']:.0f} s)", "", "| test | outcome | s | note |", "|---|---|---:|---|"]
        for x in t["tests"]:
            note = x["message"].splitlines()[0][:160] if x["message"] else ""
            lines.append(f"| {x['test']} | {x['outcome']} | {x['seconds']:.1f} | {note} |")
        lines.append("")
    d = r["parts"]["decoding"]
    lines += ["## Decoding with the static KV cache", ""]
    if "error" in d:
        lines += [f"**failed**: {d['error']}", ""]
    else:
        lines += [f"tokens/s summed over the batch, {d['rows'][0]['steps']} one-token steps after a prefill to the middle of "
                  "the grid, best of 2. Floor: max((weights + whole static cache) / "
                  f"{HBM_BYTES_PER_S / 1e12:.1f} TB/s, FLOPs / {BF16_FLOPS / 1e12:.0f} TFLOP/s).", "",
                  "| stage | batch | eager | CUDA graph | floor | bound | eager / floor | graph / floor | prefill s |",
                  "|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for x in d["rows"]:
            f = x["floor"]["tokens_per_s"]
            g = x["graph_tokens_per_s"]
            lines.append(f"| {x['stage']} | {x['batch']} | {x['eager_tokens_per_s']:,.0f} | {'-' if g is None else f'{g:,.0f}'} | "
                         f"{f:,.0f} | {x['floor']['bound']} | {x['eager_tokens_per_s'] / f:.2f} | {'-' if g is None else f'{g / f:.2f}'} | "
                         f"{x['prefill_s']:.3f} |")
        lines.append("")
    g = r["parts"]["generation"]
    lines += ["## Generation through the flows (numpy sampling, as the app)", ""]
    if "error" in g:
        lines += [f"**failed**: {g['error']}", ""]
    else:
        a, b = g["images_8"], g["images_16"]
        lines += ["| run | stage 1 s | stage 2 s | VQ decode s | total s |", "|---|---:|---:|---:|---:|",
                  f"| 8 images, CFG off | {a['stage1_s']:.2f} | {a['stage2_s']:.2f} | {a['decode_s']:.2f} | {a['total_s']:.2f} |",
                  f"| 16 images, CFG off | {b['stage1_s']:.2f} | {b['stage2_s']:.2f} | {b['decode_s']:.2f} | {b['total_s']:.2f} |",
                  f"| 8 images, CFG-sized (stage 1 of the 16-image run + the rest of the 8-image run) | | | | {g['images_8_cfg_sized_s']:.2f} |",
                  f"| {LLAMAGEN['model']}, published | | | | {LLAMAGEN['eager_s']:.2f} eager, {LLAMAGEN['vllm_s']:.2f} vLLM |", ""]
    return "\n".join(lines)


def _part(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run one part; a failure is recorded, not raised, so the other parts still run."""
    t = time.perf_counter()
    try:
        res = fn()
        return res if isinstance(res, dict) else {"rows": res}
    except Exception as err:   # noqa: BLE001 -- the report must say what broke and go on
        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:],
                "seconds": time.perf_counter() - t}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for device_check.json and device_check.md")
    ap.add_argument("--dry-run", action="store_true", help="the same script on the CPU with the tiny preset")
    ap.add_argument("--steps", type=int, default=32, help="decoding steps per measurement")
    ap.add_argument("--tests-timeout", type=int, default=240, help="seconds the CUDA-marked tests may take")
    a = ap.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA GPU visible to PyTorch; --dry-run runs the check on the CPU")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if a.dry_run else "cuda"
    name, dtype, batches = ("tiny", torch.float32, (1, 4)) if a.dry_run else ("imagenet-base", torch.bfloat16, (1, 16, 64, 256))
    steps = min(a.steps, 4) if a.dry_run else a.steps
    t0 = time.perf_counter()
    report: dict[str, Any] = {"command": "python -m bench.device_check " + " ".join(argv if argv is not None else sys.argv[1:]),
                              "environment": environment(), "preset": name, "dtype": str(dtype).replace("torch.", ""),
                              "device": device, "parts": {}}
    for line in (f"onnxruntime absent: the bundle-on-{device} test is skipped" if report["environment"]["onnxruntime"] is None else "",
                 f"faiss absent: K-Means on {device} is skipped" if report["environment"]["faiss"] is None else ""):
        if line:
            print(line, flush=True)
    print("tests ...", flush=True)
    report["parts"]["tests"] = _part(lambda: run_tests(out, device, timeout=a.tests_timeout))
    print(f"  {report['parts']['tests'].get('summary', report['parts']['tests'].get('error'))}", flush=True)
    print(f"decoding ({name}, {dtype}) ...", flush=True)
    torch.manual_seed(0)
    model = DiGIT(preset(name))
    with torch.no_grad():
        model.codebook.set_centroids(torch.randn(model.codebook.size, model.codebook.dim))
    model = model.to(device=device, dtype=dtype)
    report["parts"]["decoding"] = _part(lambda: run_decoding(model, batches, steps))
    print("generation ...", flush=True)
    report["parts"]["generation"] = _part(lambda: run_generation(model))
    report["seconds"] = time.perf_counter() - t0
    (out / "device_check.json").write_text(json.dumps(report, indent=2))
    (out / "device_check.md").write_text(markdown(report))
    print(markdown(report))
    failed = [k for k, v in report["parts"].items() if "error" in v] + \
             [x["test"] for x in report["parts"]["tests"].get("tests", []) if x["outcome"] == "failed"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
