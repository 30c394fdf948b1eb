"""onnxruntime (the exported bundle) vs PyTorch eager, for the bundled model's architecture.

    python -m bench.bench_runtime [--threads 2]

Exports a random-weight ``fmnist_small()`` model to a temp bundle and prints one markdown table:
tokenizer (images/s, batch 1 and 32), stage-1 and stage-2 decoding (tokens/s, batch 1 and 16,
beside the batch-1 memory-bandwidth floor: weight bytes per token / measured copy bandwidth),
VQ decoding (images/s) and 8 samples end to end (seconds, with the model's default CFG 1.5).
Both backends run the same Flows code and get the same thread count; every figure is the
best of a few repeats, since the machine may be shared.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch

from bench.bench_decode import copy_bandwidth, weight_bytes
from digit_core.presets import fmnist_small
from digit_core.export import export_bundle
from digit_core.flows import Flows
from digit_core.pipeline import DiGIT
from digit_core.contract import past_names
from digit_core.runtime import load_bundle

REPEATS = 3


def best_times(fns: list[Callable[[], object]], repeats: int = REPEATS, rounds: int = 2) -> list[float]:
    """Best wall time of each function. Each runs in blocks (one untimed call, then ``repeats``
    timed ones) so it does not pay for the threads the other backend leaves spinning (OpenMP's
    and onnxruntime's); blocks alternate for ``rounds``, so a busy moment on a shared machine
    does not hit only one backend."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            fn()
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t)
    return best


def decode_parts(m: Flows, stage: int, batch: int, done: int = 0,
                 steps: int | None = None) -> tuple[Callable[[], None], Callable[[], None]]:
    """Stage ``stage``'s decoding on backend ``m`` in two parts. ``prefill()`` opens a KV cache
    and feeds it, in one chunk, what the flows prefill (stage 1: the class token; stage 2: the
    n*n discriminative tokens + separator) and ``done`` tokens already generated; ``decode()``
    then feeds ``steps`` tokens one at a time (default: the rest of the grid). ``decode`` writes
    the same positions on every call, so one prefill serves many timed calls."""
    c = m.config
    n_prefix = 1 if stage == 1 else c.disc_grid ** 2 + 1
    total = (c.disc_grid if stage == 1 else c.vq_grid) ** 2
    steps = total - 1 - done if steps is None else steps
    if done < 0 or steps < 1 or done + steps > total - 1:
        raise ValueError(f"done={done} + steps={steps} must fit in the {total - 1} decoding steps of stage {stage}")
    vocab = (c.stage1 if stage == 1 else c.stage2).gpt.vocab_size
    start = n_prefix + done
    seq = np.random.default_rng(0).integers(0, vocab, (batch, start + steps))
    state: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {}

    def prefill() -> None:
        state["step"] = m.open_stage1(batch) if stage == 1 else m.open_stage2(batch)
        state["step"](seq[:, :start], 0)

    def decode() -> None:
        step = state["step"]
        for t in range(start, start + steps):
            step(seq[:, t:t + 1], t)
    return prefill, decode


def decode(m: Flows, stage: int, batch: int) -> Callable[[], None]:
    """Prefill, then one token per step for the rest of the grid, as the flows do; returns the
    timed function."""
    prefill, steps = decode_parts(m, stage, batch)

    def run() -> None:
        prefill()
        steps()
    return run


def numpy_feeds(m, stage: int, batch: int) -> Callable[[], None]:
    """The same decode loop feeding numpy arrays to ``session.run`` (the alternative to IO binding)."""
    c = m.config
    g = (c.stage1 if stage == 1 else c.stage2).gpt
    sess = m.sessions[f"stage{stage}"]
    n_prefix = 1 if stage == 1 else c.disc_grid ** 2 + 1
    steps = (c.disc_grid if stage == 1 else c.vq_grid) ** 2 - 1
    seq = np.random.default_rng(0).integers(0, g.vocab_size, (batch, n_prefix + steps))

    def run() -> None:
        T = c.stage1_positions if stage == 1 else c.stage2_positions
        cache = np.zeros((g.n_layer, 2, batch, g.n_head, T, g.head_dim), np.float32)
        past = {k: cache[i // 2, i % 2] for i, k in enumerate(past_names(g.n_layer))}
        _, kv = sess.run(None, {"tokens": seq[:, :n_prefix], "start": np.array(0), **past})
        cache[:, :, :, :, :n_prefix] = kv
        for t in range(n_prefix, n_prefix + steps):
            _, kv = sess.run(None, {"tokens": seq[:, t:t + 1], "start": np.array(t), **past})
            cache[:, :, :, :, t:t + 1] = kv
    return run


def graph_weight_bytes(graph: str | Path) -> int:
    """``weight_bytes`` of an exported stage graph, in the dtypes it stores (float32, float16 or
    int8): every initializer but the tables only gathered from (the embeddings)."""
    proto = onnx.load(str(graph), load_external_data=False)
    g = proto.graph
    cast = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Cast"}   # float16 storage: init -> Cast -> use
    gathered = {cast.get(n.input[0], n.input[0]) for n in g.node if n.op_type == "Gather"}
    return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in g.initializer if t.name not in gathered)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DiGIT(fmnist_small())
    with torch.no_grad():
        model.codebook.set_centroids(torch.randn(model.codebook.size, model.codebook.dim))
    tmp = tempfile.TemporaryDirectory()
    bundle = load_bundle(export_bundle(model, Path(tmp.name) / "fmnist"), device="cpu", threads=args.threads)
    c = model.config
    bw = copy_bandwidth()
    images = {b: np.random.default_rng(0).integers(0, 256, (b, c.image_size, c.image_size, 3), dtype=np.uint8)
              for b in (1, 8, 32)}
    vq = np.random.default_rng(0).integers(0, c.vqgan.n_embed, (8, c.vq_grid, c.vq_grid))
    steps = {1: c.disc_grid ** 2 - 1, 2: c.vq_grid ** 2 - 1}

    rows: list[tuple[str, str, float, float, str]] = []   # what, unit, ort, eager, floor
    for b in (1, 32):
        t_o, t_e = best_times([lambda m=m: m.tokenize(images[b]) for m in (bundle, model)])
        rows.append((f"tokenizer, batch {b}", "images/s", b / t_o, b / t_e, ""))
    for stage, gpt in ((1, model.stage1), (2, model.stage2)):
        floor = bw / weight_bytes(gpt)
        for b in (1, 16):
            t_o, t_e = best_times([decode(m, stage, b) for m in (bundle, model)])
            rows.append((f"stage-{stage} decoding, batch {b}", "tokens/s", b * steps[stage] / t_o,
                         b * steps[stage] / t_e, f"{floor:,.0f}" if b == 1 else ""))
    t_o, t_e = best_times([lambda m=m: m.decode_vq(vq) for m in (bundle, model)])
    rows.append(("VQ decoding, batch 8", "images/s", 8 / t_o, 8 / t_e, ""))
    classes = list(range(8))
    t_o, t_e = best_times([lambda m=m: m.sample(classes, seed=0, cfg_scale=1.5) for m in (bundle, model)], repeats=3)

    print(f"onnxruntime {ort.__version__} (CPUExecutionProvider) vs PyTorch {torch.__version__} eager, "
          f"{args.threads} threads, fmnist_small() random weights; copy bandwidth {bw / 1e9:.1f} GB/s\n")
    print("| what | unit | onnxruntime | eager | ratio | batch-1 bandwidth floor |")
    print("|---|---|---:|---:|---:|---:|")
    for what, unit, o, e, floor in rows:
        print(f"| {what} | {unit} | {o:,.0f} | {e:,.0f} | {o / e:.2f}x | {floor} |")
    print(f"| end-to-end, 8 samples (CFG 1.5) | seconds | {t_o:.3f} | {t_e:.3f} | {t_e / t_o:.2f}x | |")

    # IO binding (what the runtime does) vs numpy feeds, stage-1 decoding on this CPU
    notes = []
    for b in (1, 16):
        t_io, t_np = best_times([decode(bundle, 1, b), numpy_feeds(bundle, 1, b)])
        notes.append(f"batch {b}: IO binding {b * steps[1] / t_io:,.0f} vs numpy feeds {b * steps[1] / t_np:,.0f} tokens/s")
    print("\nstage-1 decoding, " + "; ".join(notes))


if __name__ == "__main__":
    main()
