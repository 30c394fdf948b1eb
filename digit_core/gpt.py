"""One decoder-only transformer for both DiGIT stages, with a static KV cache.

Stage 1 reads ``[first, t_1 ..]``; stage 2 reads a prefix of discriminative tokens followed
by ``[sep, v_1 ..]``. The only difference is a second position table for the prefix, so both
are one class. The switches that let the official fairseq checkpoints load exactly (post-LN
without a final LayerNorm for stage 1, embedding scale sqrt(d), position offset 2, untied
output projection) are config fields, not subclasses.

The KV cache is one preallocated tensor ``[n_layer, 2, B, n_head, context, head_dim]``.
``forward(idx, start, cache)`` writes the keys/values of positions ``start .. start+S-1`` in
place and attends over the whole cache with a position mask, so shapes never change between
steps: decoding one token costs one token's compute and the ONNX graph is static.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig


class SelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        # Fused q/k/v projection: one matmul; the converter concatenates fairseq's q, k, v.
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if kv is not None:
            # kv: [2, B, H, context, hd]; write this chunk, then attend over the whole cache.
            kv.index_copy_(3, pos, torch.stack((k, v)).to(kv.dtype))
            k, v = kv[0].to(q.dtype), kv[1].to(q.dtype)
        # Plain softmax(QK^T)V: on CPU it trains ~2x faster than SDPA's backward in bf16,
        # and it exports to ONNX as ordinary MatMul/Softmax.
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        att = att.masked_fill(~mask, float("-inf"))
        att = self.drop(torch.softmax(att.float(), dim=-1).to(q.dtype))
        y = (att @ v).transpose(1, 2).reshape(B, S, D)
        return self.drop(self.proj(y))


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
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

    def new_cache(self, batch: int, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        """Preallocate the KV cache for ``batch`` sequences of up to ``cfg.context`` tokens."""
        c = self.cfg
        p = self.head.weight
        return torch.zeros(c.n_layer, 2, batch, c.n_head, c.context, c.head_dim,
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
        ctx = self.cfg.context
        if cache is None and isinstance(start, int) and start + S > ctx:
            raise ValueError(f"sequence of {S} tokens at position {start} exceeds the context of {ctx}")
        start_t = torch.as_tensor(start, dtype=torch.long, device=idx.device).reshape(())
        pos = start_t + torch.arange(S, device=idx.device)
        x = self.tok_emb(idx) * self.cfg.embed_scale + self.position_table()[pos]
        x = self.drop(x)
        if cache is None:
            mask = pos[:, None] >= pos[None, :]
        else:
            mask = torch.arange(ctx, device=idx.device)[None, :] <= pos[:, None]
        for i, block in enumerate(self.blocks):
            x = block(x, mask, None if cache is None else cache[i], pos)
        if self.ln_f is not None:
            x = self.ln_f(x)
        return self.head(x)
