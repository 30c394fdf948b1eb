"""Stage-1 decoding speed in PyTorch eager: static KV cache vs recomputing the prefix.

    python -m bench.bench_decode [--threads 2] [--tokens 64]

Prints one markdown table: tokens/s for batch 1 and 16, for the bundled model's stage-1 size
and for a 26M-parameter GPT, beside the batch-1 memory-bandwidth floor (the rate at which the
weights alone can be streamed from memory once per token: weight bytes / measured copy
bandwidth). Ratios are measured in the same run, so they hold on any machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from digit_core.presets import fmnist_small
from digit_core.gpt import GPT


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s moved by a large memcpy (read + write), best of ``repeats``."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * nbytes / best


def weight_bytes(gpt: GPT) -> int:
    """Bytes of the weights a decoding step reads in full (embedding tables only give one row)."""
    return sum(p.numel() * p.element_size() for n, p in gpt.named_parameters() if not n.startswith(("tok_emb", "pos_")))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@torch.inference_mode()
def decode_rate(model: GPT, batch: int, tokens: int, cached: bool) -> float:
    """Tokens/s (summed over the batch) generating ``tokens`` tokens after one start token."""
    cfg = model.cfg
    seq = torch.randint(0, cfg.vocab_size, (batch, tokens + 1))
    def run() -> None:
        cache = model.new_cache(batch, tokens) if cached else None
        for t in range(tokens):
            if cached:
                model(seq[:, t:t + 1], t, cache)
            else:
                model(seq[:, : t + 1])          # recompute the whole prefix every step
    run()                                        # warm-up
    return batch * tokens / min(_timed(run) for _ in range(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per sequence (8x8 grid = 64)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bundled = fmnist_small().stage1.gpt
    mid = dataclasses.replace(bundled, n_layer=8, d_model=512, n_head=8, d_ff=2048)
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s, threads: {args.threads}, tokens/sequence: {args.tokens}\n")
    print("| model | params | batch | recompute tok/s | KV cache tok/s | cache speed-up | floor tok/s (b=1) | cache / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cfg in (("bundled stage 1", bundled), ("26M GPT", mid)):
        model = GPT(cfg).eval()
        n = model.num_params()
        floor = bw / weight_bytes(model)   # the weights streamed once per decoding step
        for batch in (1, 16):
            slow = decode_rate(model, batch, args.tokens, cached=False)
            fast = decode_rate(model, batch, args.tokens, cached=True)
            f = f"{floor:,.0f}" if batch == 1 else "-"
            r = f"{fast / floor:.2f}" if batch == 1 else "-"
            print(f"| {name} | {n / 1e6:.1f}M | {batch} | {slow:,.0f} | {fast:,.0f} | {fast / slow:.2f}x | {f} | {r} |")


if __name__ == "__main__":
    main()
