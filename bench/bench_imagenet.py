"""The paper's ImageNet model at its real size on this CPU: PyTorch eager vs onnxruntime fp32 vs int8.

    python -m bench.bench_imagenet [--out reports/imagenet-cpu] [--threads 2] [--steps 32] [--quick]

Builds the ``imagenet-base`` preset (DINOv2-B/14-reg4 tokenizer, two 16-layer d=1024 GPTs, MAGE's
VQGAN) with random weights -- speed does not depend on the values -- exports it to a temporary
float32 bundle and an int8 bundle (``digit_core.export --weights int8``) and measures, in one run:

* the tokenizer (256x256 uint8 in, the 256->224 resize included): images/s at batch 1 and 8;
* stage-1 and stage-2 decoding with the static KV cache: tokens/s at batch 1 and 8, each after
  one prefill up to the middle of the grid (a realistic cache length), ``--steps`` tokens per
  measurement, beside the batch-1 floor of each weight format: weight bytes per token over the
  copy bandwidth measured in the same run;
* end to end, one image (256 + 256 tokens, CFG off as in the paper), each backend in a fresh
  process: seconds per image and that process's peak resident memory.

``imagenet-large`` is measured too when its estimated peak memory (base's, scaled by parameter
count) fits in the memory available; otherwise the reason is printed and recorded. Writes
``bench.md`` (one table per part) and ``bench.json`` to ``--out``, with the load average before
and after (the machine may be shared). ``--quick`` runs the tiny preset in seconds (the test).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import torch

from bench.bench_decode import copy_bandwidth
from bench.bench_runtime import best_times, decode_parts, graph_weight_bytes
from digit_core.presets import preset
from digit_core.encoders import Encoder
from digit_core.export import export_bundle
from digit_core.flows import Flows
from digit_core.gpt import GPT
from digit_core.pipeline import DiGIT
from digit_core.runtime import load_bundle
from digit_core.vqgan import VQGAN

BACKENDS = ("eager", "onnxruntime fp32", "onnxruntime int8")
BATCHES = (1, 8)
GiB = 1 << 30


def peak_rss() -> int:
    """This process's peak resident memory in bytes: the kernel's high-water mark of its own
    address space (``VmHWM``). Not ``getrusage``'s ``ru_maxrss``, which a child started with
    fork + exec inherits from its parent, so every end-to-end child would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def machine() -> dict[str, Any]:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_GiB": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__}


def random_model(name: str) -> DiGIT:
    """The preset with random weights; centroids spread like features so tokens vary."""
    torch.manual_seed(0)
    model = DiGIT(preset(name))
    with torch.no_grad():
        model.codebook.set_centroids(torch.randn(model.codebook.size, model.codebook.dim))
    return model


def num_params(model: DiGIT) -> dict[str, int]:
    return _count({"encoder": model.encoder, "stage1": model.stage1, "stage2": model.stage2, "vqgan": model.vqgan})


def preset_params(name: str) -> dict[str, int]:
    """``num_params`` of a preset, its parts built on the meta device (no memory for the weights)."""
    c = preset(name)
    with torch.device("meta"):
        return _count({"encoder": Encoder(c.encoder), "stage1": GPT(c.stage1.gpt), "stage2": GPT(c.stage2.gpt),
                       "vqgan": VQGAN(c.vqgan)})


def _count(parts: dict[str, torch.nn.Module]) -> dict[str, int]:
    return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}


# -- end to end, in a fresh process per backend -----------------------------------------------------
def end_to_end_child(kind: str, path: str, threads: int) -> dict[str, Any]:
    """Load a model directory (eager) or a bundle, generate one image (class 0, seed 0, CFG off):
    seconds per part and the process's peak resident memory."""
    torch.set_num_threads(threads)
    t = time.perf_counter()
    m: Flows = DiGIT.load(path) if kind == "eager" else load_bundle(path, device="cpu", threads=threads)
    load = time.perf_counter() - t
    t = time.perf_counter()
    g = m.generate([0], seed=0, cfg_scale=None)
    total = time.perf_counter() - t
    return {"load_s": load, **{f"{k}_s": v for k, v in g.timings.items()}, "total_s": total, "peak_rss": peak_rss()}


def end_to_end(kind: str, path: Path, threads: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.bench_imagenet", "--child", kind, str(path), "--threads", str(threads)],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    if out.returncode != 0:
        raise RuntimeError(f"end-to-end run for {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- one preset -----------------------------------------------------------------------------------------
def measure(name: str, work: Path, threads: int, steps: int, bandwidth: float, res: dict[str, Any],
            save: Callable[[], None]) -> None:
    """Every figure of the tables for preset ``name``, filled into ``res`` part by part (``save``
    after each, so an interrupted run keeps what it measured); bundles and the model directory go
    in ``work``."""
    model = random_model(name)
    c = model.config
    res.update(preset=name, params=num_params(model))
    t = time.perf_counter()
    paths = {"onnxruntime fp32": export_bundle(model, work / f"{name}-fp32"),
             "onnxruntime int8": export_bundle(model, work / f"{name}-int8", weights="int8")}
    res["export_s"] = time.perf_counter() - t
    model.save(work / f"{name}-model")
    paths["eager"] = work / f"{name}-model"
    print(f"{name}: exported in {res['export_s']:.0f} s; peak RSS so far {peak_rss() / GiB:.1f} GiB", flush=True)
    backends: dict[str, Flows] = {"eager": model, **{k: load_bundle(paths[k], device="cpu", threads=threads)
                                                     for k in BACKENDS[1:]}}
    fns = [backends[k] for k in BACKENDS]
    res["bundle_MB"] = {k: sum(f.stat().st_size for f in paths[k].iterdir()) / 1e6 for k in BACKENDS[1:]}

    rows = []
    for b in BATCHES:
        imgs = np.random.default_rng(b).integers(0, 256, (b, c.image_size, c.image_size, 3), dtype=np.uint8)
        times = best_times([lambda m=m: m.tokenize(imgs) for m in fns], repeats=1)
        rows.append({"batch": b, **{k: b / s for k, s in zip(BACKENDS, times)}})
        print(f"{name}: tokenizer batch {b}: " + ", ".join(f"{k} {b / s:.2f} img/s" for k, s in zip(BACKENDS, times)), flush=True)
    res["tokenizer_images_per_s"] = rows
    save()

    floors = {1: {}, 2: {}}
    rows = []
    for stage in (1, 2):
        g = (c.stage1 if stage == 1 else c.stage2).gpt
        wbytes = {"fp32": graph_weight_bytes(paths["onnxruntime fp32"] / f"stage{stage}.onnx"),
                  "int8": graph_weight_bytes(paths["onnxruntime int8"] / f"stage{stage}.onnx")}
        floors[stage] = {k: bandwidth / v for k, v in wbytes.items()}
        grid = (c.disc_grid if stage == 1 else c.vq_grid) ** 2
        done = min(grid // 2, grid - 1 - steps)   # the prefill fills the cache up to the middle of the grid
        T = c.stage1_positions if stage == 1 else c.stage2_positions
        cache_bytes = g.n_layer * 2 * g.n_head * T * g.head_dim * 4   # per row: each step reads all of it
        for b in BATCHES:
            parts = [decode_parts(m, stage, b, done=done, steps=steps) for m in fns]
            prefill_s = []
            for prefill, _ in parts:
                t = time.perf_counter()
                prefill()
                prefill_s.append(time.perf_counter() - t)
            times = best_times([d for _, d in parts], repeats=1)
            del parts   # free the KV caches before the next batch
            row = {"stage": stage, "batch": b, "prefill_tokens": done + (1 if stage == 1 else c.disc_grid ** 2 + 1),
                   "steps": steps, "tokens_per_s": {k: b * steps / s for k, s in zip(BACKENDS, times)},
                   "prefill_s": dict(zip(BACKENDS, prefill_s)), "weight_bytes": wbytes, "cache_bytes_per_row": cache_bytes}
            if b == 1:
                row["floor_tokens_per_s"] = floors[stage]
            rows.append(row)
            print(f"{name}: stage {stage} batch {b}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in row["tokens_per_s"].items())
                  + (f"; floor fp32 {floors[stage]['fp32']:.1f}, int8 {floors[stage]['int8']:.1f}" if b == 1 else ""), flush=True)
    res["decoding"] = rows
    save()
    del backends, fns
    e2e = res["end_to_end"] = {}
    for k in BACKENDS:
        e2e[k] = end_to_end("eager" if k == "eager" else "bundle", paths[k], threads)
        print(f"{name}: end to end {k}: {e2e[k]['total_s']:.1f} s/image, peak RSS {e2e[k]['peak_rss'] / GiB:.2f} GiB", flush=True)
        save()
    res["bench_peak_rss"] = peak_rss()


# -- report ---------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    h, load = report["machine"], report["load_average"]
    lines = [f"# {', '.join(r['preset'] for r in report['results'])} on CPU: PyTorch eager vs onnxruntime fp32 vs int8",
             "",
             f"{h['cpu']}, {h['cores']} cores, {h['memory_GiB']} GiB; {report['threads']} threads per backend; "
             f"torch {h['torch']}, onnxruntime {h['onnxruntime']}. Random weights (speed does not depend on them). "
             f"Copy bandwidth {report['bandwidth_GBps']:.1f} GB/s (read + write of a {report['bandwidth_MB']} MB numpy copy, best of 5). "
             f"Load average (1, 5, 15 min) before {load['before']}, after {load.get('after', '(not recorded)')}"
             + (": **measured on a shared, loaded machine**, so absolute figures are low and ratios noisy."
                if max(load['before'][0], load.get('after', [0])[0]) > 0.5 * h['cores'] else "."),
             "", f"Command: `{report['command']}`. Tokenizer and decoding figures are the best of 2 timed runs (backends "
             "alternating); prefill and end-to-end figures are single runs.", ""]
    if not report.get("complete", True):
        lines += ["**The run stopped before the end**: only the parts below were measured.", ""]
    for r in report["results"]:
        lines += _preset_markdown(r)
    for name, why in report.get("skipped", {}).items():
        lines += [f"**{name} not measured**: {why}", ""]
    return "\n".join(lines)


def _preset_markdown(r: dict[str, Any]) -> list[str]:
    """The tables of one preset, for the parts it has."""
    p = r["params"]
    lines = [f"## {r['preset']}", "",
             f"Parameters: encoder {p['encoder'] / 1e6:.0f}M, stage 1 {p['stage1'] / 1e6:.0f}M, stage 2 {p['stage2'] / 1e6:.0f}M, "
             f"VQGAN {p['vqgan'] / 1e6:.0f}M."
             + (f" Bundles: fp32 {r['bundle_MB']['onnxruntime fp32']:,.0f} MB, int8 {r['bundle_MB']['onnxruntime int8']:,.0f} MB. "
                f"Export of both: {r['export_s']:.0f} s." if "bundle_MB" in r else ""), ""]
    if "tokenizer_images_per_s" in r:
        lines += ["Tokenizer (uint8 256x256 -> 224 -> DINOv2 -> nearest centroid), images/s:", "",
                  "| batch | eager | onnxruntime fp32 | onnxruntime int8 | fp32 / eager | int8 / eager |", "|---:|---:|---:|---:|---:|---:|"]
        for t in r["tokenizer_images_per_s"]:
            e, f, i = (t[k] for k in BACKENDS)
            lines.append(f"| {t['batch']} | {e:.2f} | {f:.2f} | {i:.2f} | {f / e:.2f}x | {i / e:.2f}x |")
        lines.append("")
    if "decoding" in r:
        d0 = r["decoding"][0]
        lines += [f"Decoding with the static KV cache, tokens/s (summed over the batch): {d0['steps']} steps per "
                  "measurement after one prefill up to the middle of the grid (stage 1: class token + half the grid; stage 2: "
                  "the discriminative tokens + separator + half the grid). Floor: batch-1 rate if each step only streamed its weights "
                  "once at the copy bandwidth (fp32 for eager and onnxruntime fp32, int8 for int8); "
                  "time / floor is how many times slower than that the measurement is.", "",
                  "| stage | batch | eager | onnxruntime fp32 | onnxruntime int8 | fp32 / eager | int8 / eager | floor fp32 | floor int8 | time / floor: eager, fp32, int8 |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for d in r["decoding"]:
            e, f, i = (d["tokens_per_s"][k] for k in BACKENDS)
            fl = d.get("floor_tokens_per_s")
            tail = (f"{fl['fp32']:.1f} | {fl['int8']:.1f} | {fl['fp32'] / e:.2f}, {fl['fp32'] / f:.2f}, {fl['int8'] / i:.2f}"
                    if fl else " | | ")
            lines.append(f"| {d['stage']} | {d['batch']} | {e:.1f} | {f:.1f} | {i:.1f} | {f / e:.2f}x | {i / e:.2f}x | {tail} |")
        lines += ["", "Each step also reads the whole static KV cache (every position one generation fills, not just those filled so far): "
                  + "; ".join(f"stage {d['stage']} {d['cache_bytes_per_row'] / 1e6:,.0f} MB per row, "
                              f"{d['cache_bytes_per_row'] / d['weight_bytes']['fp32']:.0%} of its fp32 weights"
                              for d in r["decoding"] if d["batch"] == 1) + ".", "",
                  "Prefill, seconds: " + "; ".join(f"stage {d['stage']} batch {d['batch']} ({d['prefill_tokens']} tokens): "
                                                   + ", ".join(f"{k} {v:.2f}" for k, v in d["prefill_s"].items())
                                                   for d in r["decoding"]) + ".", ""]
    if r.get("end_to_end"):
        lines += ["End to end, one image (class 0, all tokens of both stages, CFG off), each backend in a fresh process:", "",
                  "| backend | load s | stage 1 s | stage 2 s | VQ decode s | s / image | peak RSS GiB |", "|---|---:|---:|---:|---:|---:|---:|"]
        for k, x in r["end_to_end"].items():
            lines.append(f"| {k} | {x['load_s']:.1f} | {x['stage1_s']:.1f} | {x['stage2_s']:.1f} | {x['decode_s']:.1f} | "
                         f"{x['total_s']:.1f} | {x['peak_rss'] / GiB:.2f} |")
        lines.append("")
    if "bench_peak_rss" in r:
        lines += [f"Peak RSS of the benchmark process (export + three backends loaded): {r['bench_peak_rss'] / GiB:.1f} GiB.", ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports/imagenet-cpu", help="directory for bench.md and bench.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32, help="decoding steps per measurement")
    ap.add_argument("--quick", action="store_true", help="the tiny preset and 4 steps: a smoke run in seconds")
    ap.add_argument("--markdown-from", metavar="JSON", help="only rewrite --out/bench.md from a bench.json (e.g. of a stopped run)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.markdown_from:
        md = markdown(json.loads(Path(a.markdown_from).read_text()))
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "bench.md").write_text(md)
        print(md)
        return
    if a.child:
        print(json.dumps(end_to_end_child(a.child[0], a.child[1], a.threads)))
        return
    if a.threads < 1 or a.steps < 1:
        ap.error("--threads and --steps must be positive")
    torch.set_num_threads(a.threads)
    before = [round(x, 2) for x in os.getloadavg()]
    presets = ["tiny"] if a.quick else ["imagenet-base", "imagenet-large"]
    steps = min(a.steps, 4) if a.quick else a.steps
    bw_bytes = (32 if a.quick else 256) << 20
    bandwidth = copy_bandwidth(bw_bytes)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, load average {before}", flush=True)
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python -m bench.bench_imagenet " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "threads": a.threads, "bandwidth_GBps": bandwidth / 1e9, "bandwidth_MB": bw_bytes >> 20,
              "load_average": {"before": before}, "complete": False, "results": results, "skipped": skipped}

    def save() -> None:
        (out / "bench.json").write_text(json.dumps(report, indent=2))
        (out / "bench.md").write_text(markdown(report))

    with tempfile.TemporaryDirectory(prefix="bench-imagenet-") as tmp:
        for name in presets:
            if results:   # a later preset: does base's peak, scaled by parameters, fit?
                prev = results[-1]
                scale = sum(preset_params(name).values()) / sum(prev["params"].values())
                need = scale * max(prev["bench_peak_rss"], *(x["peak_rss"] for x in prev["end_to_end"].values()))
                free = available_memory()
                if need > free:
                    skipped[name] = (f"{prev['preset']} peaked at {prev['bench_peak_rss'] / GiB:.1f} GiB; scaled by parameter "
                                     f"count ({scale:.1f}x) that is ~{need / GiB:.0f} GiB, more than the {free / GiB:.1f} GiB "
                                     "available on this machine now")
                    print(f"skipping {name}: {skipped[name]}", flush=True)
                    continue
            results.append({})
            measure(name, Path(tmp), a.threads, steps, bandwidth, results[-1], save)
            save()
    report["load_average"]["after"] = [round(x, 2) for x in os.getloadavg()]
    report["complete"] = True
    save()
    print(markdown(report))


if __name__ == "__main__":
    main()
