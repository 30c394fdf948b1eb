"""The token layout: how each stage's sequence is built from codes, classes and special ids.

    stage 1  [first, t_1 + co .. t_{N-1} + co]  predicts  [t_1 .. t_N]
             first = class_offset + c (class-conditional), null_class_id (a dropped label, and the
             unguided half of classifier-free guidance) or bos_id (unconditional); co = code_offset
    stage 2  [d_1 + do .. d_N + do, sep, v_1 + vo .. v_{M-1} + vo]  predicts  [v_1 .. v_M]
             do = disc_offset, vo = vq_offset (the N discriminative tokens are a prefix)
    logits   the codes are the slice [out_offset, out_offset + num_out) of each stage's output

The numbers come from the config (``Stage1Config``, ``Stage2Config``, ``GPTConfig``); which of
the two layouts filled them in (ours, or the official fairseq one with 5 specials first) is the
config's ``layout`` field, set by ``presets.our_layout`` / ``presets.fairseq_layout``. Every user
of a layout (the flows, the training stages, the probe, the loss) builds its sequences here.

The functions take numpy arrays (the flows, the runtime) or torch tensors (training) alike:
concatenation uses the array's own library, and torch is imported only when given tensors.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .config import GPTConfig, Stage1Config, Stage2Config


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=1)
    import torch
    return torch.cat(parts, 1)


def _full(like: Any, rows: int, value: int) -> Any:
    """A ``[rows, 1]`` column of ``value`` of ``like``'s kind, dtype and device."""
    if isinstance(like, np.ndarray):
        return np.full((rows, 1), value, dtype=like.dtype)
    return like.new_full((rows, 1), value)


def code_slice(g: GPTConfig) -> slice:
    """The logits of the codes a stage draws from (the rest are classes and specials)."""
    return slice(g.out_offset, g.out_offset + g.num_out)


def class_tokens(s1: Stage1Config, classes: Any) -> Any:
    """Class ids ``[B]`` as stage 1's first tokens."""
    return s1.class_offset + classes


def first_tokens(s1: Stage1Config, classes: Any | None, rows: int, *, null: bool = False) -> np.ndarray:
    """Stage 1's first token of each of ``rows`` sequences, int64 ``[rows, 1]``: the class tokens
    of ``classes``; with ``null`` the null class (no label); with neither, ``bos`` (an
    unconditional model)."""
    if null:
        if s1.null_class_id is None:
            raise ValueError("this model has no null class (it was trained without label dropout)")
        return np.full((rows, 1), s1.null_class_id, dtype=np.int64)
    if classes is None:
        return np.full((rows, 1), s1.bos_id, dtype=np.int64)
    return np.asarray(class_tokens(s1, np.asarray(classes)), dtype=np.int64).reshape(rows, 1)


def stage1_input(s1: Stage1Config, first: Any, codes: Any) -> Any:
    """``[first, codes + code_offset]``: ``first [B, 1]`` token ids, ``codes [B, T]`` code ids (a
    training row's ``t_1 .. t_{N-1}``, or a completion's kept prefix)."""
    return _cat([first, codes + s1.code_offset])


def stage1_codes(s1: Stage1Config, codes: Any) -> Any:
    """Code ids as stage-1 token ids (one decoding step's input)."""
    return codes + s1.code_offset


def stage2_prefix(s2: Stage2Config, disc: Any) -> Any:
    """``[d_1 + disc_offset .. d_N + disc_offset, sep]``: what stage 2 reads before its first VQ code."""
    return _cat([disc + s2.disc_offset, _full(disc, disc.shape[0], s2.sep_id)])


def stage2_input(s2: Stage2Config, disc: Any, vq: Any) -> Any:
    """The whole teacher-forced stage-2 row: the prefix, then ``v_1 .. v_{M-1}``; its last ``M``
    positions predict ``v_1 .. v_M``."""
    return _cat([stage2_prefix(s2, disc), vq[:, :-1] + s2.vq_offset])


def stage2_codes(s2: Stage2Config, vq: Any) -> Any:
    """VQ code ids as stage-2 token ids (one decoding step's input)."""
    return vq + s2.vq_offset
