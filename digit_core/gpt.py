"""One decoder-only transformer for both DiGIT stages, with a static KV cache.

Stage 1 reads ``[first, t_1 ..]``; stage 2 reads a prefix of discriminative tokens followed
by ``[sep, v_1 ..]``. The only difference is a second position table for the prefix, so both
are one class. The switches that let the official fairseq checkpoints load exactly (post-LN
without a final LayerNorm for stage 1, embedding scale sqrt(d), position offset 2, untied
output projection) are config fields, not subclasses.

The KV cache is one preallocated tensor ``[n_layer, 2, B, n_head, T, head_dim]``, ``T`` at most
``context`` (the flows size it to the positions a generation fills, not the position table).
``forward(idx, start, cache)`` writes the keys/values of positions ``start .. start+S-1`` in
place and attends over the whole cache with a position mask, so shapes never change between
steps: decoding one token costs one token's compute and the ONNX graph is static.

``step(idx, start, past)`` is the functional twin for ONNX export: it reads each layer's cached
keys and values as separate tensors (so onnxruntime multiplies the caller's memory in place, with
no copy of the cache) and returns the last position's logits and only this chunk's keys and
values, which the caller writes into its cache: nothing per step is proportional to the cache but
the attention's one read of it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig


class PastKV(NamedTuple):
    """One layer's cache in the functional step: read keys ``k`` and values ``v``
    ``[B, H, T, hd]``, append this chunk's ``[2, B, H, S, hd]`` keys/values to ``new``."""

    k: torch.Tensor
    v: torch.Tensor
    new: list[torch.Tensor]


class SelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        # Fused q/k/v projection: one matmul; the converter concatenates fairseq's q, k, v.
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor | PastKV | None,
                pos: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if isinstance(kv, PastKV):
            # Functional (export): attend over [old cache | this chunk] side by side, so the graph
            # only reads the cache; writing it once at the end is the caller's job.
            kv.new.append(torch.stack((k, v)))
            keys, values = (kv.k.to(q.dtype), k), (kv.v.to(q.dtype), v)
        elif kv is not None:
            # kv: [2, B, H, T, hd]; write this chunk, then attend over the whole cache.
            kv.index_copy_(3, pos, torch.stack((k, v)).to(kv.dtype))
            keys, values = (kv[0].to(q.dtype),), (kv[1].to(q.dtype),)
        else:
            keys, values = (k,), (v,)
        # Plain softmax(QK^T)V: on CPU it trains ~2x faster than SDPA's backward in bf16,
        # and it exports to ONNX as ordinary MatMul/Softmax.
        scores = [q @ t.transpose(-2, -1) for t in keys]
        att = (scores[0] if len(scores) == 1 else torch.cat(scores, -1)) * (1.0 / math.sqrt(self.head_dim))
        att = att.masked_fill(~mask, float("-inf"))
        att = self.drop(torch.softmax(att.float(), dim=-1).to(q.dtype))
        parts = att.split([t.shape[-2] for t in values], -1)
        y = parts[0] @ values[0]
        for a, t in zip(parts[1:], values[1:]):
            y = y + a @ t
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, S, D)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor | PastKV | None,
                pos: torch.Tensor) -> torch.Tensor:
        if self.norm_first:  # pre-LN (GPT-2; official stage 2)
            x = x + self.attn(self.ln1(x), mask, kv, pos)
            return x + self.mlp(self.ln2(x))
        # post-LN (fairseq default; official stage 1)
        x = self.ln1(x + self.attn(x, mask, kv, pos))
        return self.ln2(x + self.mlp(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_main = nn.Parameter(torch.zeros(cfg.max_len + cfg.pos_offset, cfg.d_model))
        self.pos_prefix = nn.Parameter(torch.zeros(cfg.prefix_len + cfg.pos_offset, cfg.d_model)) if cfg.prefix_len else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps) if cfg.final_norm else None
        self.head = nn.Linear(cfg.d_model, cfg.out_vocab, bias=False)
        self.apply(self._init)
        for n, p in self.named_parameters():
            if n.startswith("pos_"):
                nn.init.normal_(p, std=0.02)
            elif n.endswith("fc2.weight") or n.endswith("attn.proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))  # GPT-2 residual scaling

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int, length: int | None = None, dtype: torch.dtype | None = None,
                  device: torch.device | None = None) -> torch.Tensor:
        """Preallocate the KV cache for ``batch`` sequences of up to ``length`` tokens (default: ``cfg.context``)."""
        c = self.cfg
        T = c.context if length is None else length
        if not 0 < T <= c.context:
            raise ValueError(f"cache length must be in 1..{c.context} (the context), got {T}")
        p = self.head.weight
        return torch.zeros(c.n_layer, 2, batch, c.n_head, T, c.head_dim,
                           dtype=dtype or p.dtype, device=device or p.device)

    def position_table(self) -> torch.Tensor:
        """Rows for absolute positions ``0 .. context-1``: the prefix table, then the main one."""
        o = self.cfg.pos_offset
        main = self.pos_main[o:]
        return main if self.pos_prefix is None else torch.cat((self.pos_prefix[o:], main))

    def forward(self, idx: torch.Tensor, start: int | torch.Tensor = 0, cache: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, S, out_vocab]`` for tokens ``idx [B, S]`` at positions ``start .. start+S-1``.

        Without a cache the sequence attends causally to itself (training, full forward); with
        one it also attends to the cached positions before ``start`` and fills in its own.
        """
        B, S = idx.shape
        ctx = self.cfg.context if cache is None else cache.shape[-2]
        if isinstance(start, int) and start + S > ctx:
            what = "context" if cache is None else "KV cache length"
            raise ValueError(f"sequence of {S} tokens at position {start} exceeds the {what} of {ctx}")
        pos = self._positions(idx, start)
        if cache is None:
            mask = pos[:, None] >= pos[None, :]
        else:
            mask = torch.arange(ctx, device=idx.device)[None, :] <= pos[:, None]
        return self.head(self._trunk(idx, pos, mask, [None] * len(self.blocks) if cache is None else cache))

    def step(self, idx: torch.Tensor, start: torch.Tensor, past: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Functional decoding step (what ONNX export traces). ``past``: ``2 * n_layer`` tensors
        ``[B, H, T, hd]``, each layer's cached keys then values (positions before ``start`` are read,
        the rest masked). Returns ``(logits [B, out_vocab]`` of the last position, ``kv [n_layer, 2,
        B, H, S, hd]``: the keys and values of positions ``start .. start+S-1``, for the caller to
        write into its cache``)``; ``past`` is not written."""
        S = idx.shape[1]
        ctx = past[0].shape[2]
        pos = self._positions(idx, start)
        # cached positions before start, then causal within the chunk
        mask = torch.cat(((torch.arange(ctx, device=idx.device)[None, :] < pos[:1, None]).expand(S, ctx),
                          pos[None, :] <= pos[:, None]), -1)
        new: list[torch.Tensor] = []
        x = self._trunk(idx, pos, mask, [PastKV(past[2 * i], past[2 * i + 1], new) for i in range(len(self.blocks))])
        return self.head(x[:, -1]), torch.stack(new).to(past[0].dtype)

    def hidden_states(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream ``[B, S, d_model]`` after the embeddings and after each block, for a
        causal forward of ``idx`` from position 0: ``n_layer + 1`` tensors (a per-layer linear probe,
        paper Fig. 3b). No final norm: a probe standardises its features anyway."""
        pos = self._positions(idx, 0)
        states: list[torch.Tensor] = []
        self._trunk(idx, pos, pos[:, None] >= pos[None, :], [None] * len(self.blocks), states)
        return states

    def _positions(self, idx: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        start_t = torch.as_tensor(start, dtype=torch.long, device=idx.device).reshape(())
        return start_t + torch.arange(idx.shape[1], device=idx.device)

    def _trunk(self, idx: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
               kvs: torch.Tensor | list[torch.Tensor | PastKV | None],
               states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Embeddings, blocks and final norm: hidden states ``[B, S, d_model]`` before the head;
        ``states`` (when given) collects the stream after the embeddings and after each block."""
        x = self.drop(self.tok_emb(idx) * self.cfg.embed_scale + self.position_table()[pos])
        for block, kv in zip(self.blocks, kvs):
            if states is not None:
                states.append(x)
            x = block(x, mask, kv, pos)
        if states is not None:
            states.append(x)
        return x if self.ln_f is None else self.ln_f(x)
