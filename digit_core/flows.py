"""The three DiGIT flows, written once over abstract backends, in numpy.

    tokenize: image -> encoder features -> nearest centroid -> discriminative tokens
    generate: class -> stage 1 -> discriminative tokens -> stage 2 -> VQ tokens -> VQ decoder
    complete: image -> tokenize -> keep the top rows -> stage 1 continues -> stage 2 -> image

``Flows`` holds the logic; a backend supplies five operations on numpy arrays. The PyTorch
pipeline (``digit_core.pipeline.DiGIT``) and the onnxruntime runtime
(``digit_core.runtime.Bundle``) are two backends of this one class, so they cannot drift
apart, and tests compare them on equal inputs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from abc import ABC, abstractmethod
from typing import Callable

import numpy as np

from .config import DiGITConfig
from .sampling import Sampler, guide, row_generators, softmax

StepFn = Callable[[np.ndarray, int], np.ndarray]
"""``step(tokens [B, S] int64, start) -> logits [B, out_vocab] float32`` of the last position;
the function owns a KV cache holding every earlier position."""
OnToken = Callable[[int, np.ndarray], None]
"""``on_token(step, codes_so_far [B, step + 1])``: called after every stage-1 token."""


@dataclass
class Generation:
    """Everything one generate/complete call produced, for the app to show."""

    images: np.ndarray                 # uint8 [N, H, W, 3]
    disc_tokens: np.ndarray            # int64 [N, n, n] cluster ids
    vq_tokens: np.ndarray              # int64 [N, m, m] VQ code ids
    disc_probs: np.ndarray             # float32 [N, n, n] probability of each chosen token
    timings: dict[str, float] = field(default_factory=dict)   # seconds per stage


class Flows(ABC):
    """The DiGIT flows over a backend's five operations on numpy arrays."""

    config: DiGITConfig

    # -- what a backend provides -----------------------------------------------------------------
    @abstractmethod
    def encode_disc(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 ``[N, H, W, 3]`` -> cluster ids ``[N, n, n]``, squared distances, features ``[N, n, n, d]``."""

    @abstractmethod
    def encode_vq(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``[N, H, W, 3]`` -> VQ code ids ``[N, m, m]`` and the latents they quantize ``[N, m, m, d]``."""

    @abstractmethod
    def decode_vq(self, ids: np.ndarray) -> np.ndarray:
        """VQ code ids ``[N, m, m]`` -> uint8 images ``[N, H, W, 3]``."""

    @abstractmethod
    def open_stage1(self, batch: int) -> StepFn:
        """A stage-1 step function with a fresh KV cache for ``batch`` rows."""

    @abstractmethod
    def open_stage2(self, batch: int) -> StepFn:
        """A stage-2 step function with a fresh KV cache for ``batch`` rows."""

    # -- input checks shared by every backend ---------------------------------------------------
    def check_images(self, images: np.ndarray) -> np.ndarray:
        """Accept uint8 ``[N, H, W, 3]``, ``[N, H, W, 1]`` or ``[N, H, W]``; return ``[N, H, W, 3]``."""
        s = self.config.image_size
        if not isinstance(images, np.ndarray):
            raise TypeError(f"images must be a numpy array, got {type(images).__name__}")
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 in [0, 255], got dtype {images.dtype}")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[1:3] != (s, s) or images.shape[3] not in (1, 3):
            raise ValueError(f"images must be [N, {s}, {s}, 3] (or grey [N, {s}, {s}]), got {images.shape}")
        if images.shape[0] == 0:
            raise ValueError("empty batch: images has no rows")
        return np.ascontiguousarray(images if images.shape[3] == 3 else np.repeat(images, 3, axis=3))

    def check_classes(self, class_ids: list[int] | np.ndarray | None, n: int | None) -> np.ndarray | None:
        """Class ids as int64 [B], or None (unconditional); exactly one of the two must be given
        for a class-conditional model, and only ``n`` for an unconditional one."""
        C = self.config.stage1.num_classes
        if C == 0:
            if class_ids is not None:
                raise ValueError("this model is unconditional: pass n=..., not class_ids")
            if n is None or int(n) != n or n < 1:
                raise ValueError(f"n must be a positive integer, got {n}")
            return None
        if class_ids is None:
            raise ValueError(f"this model is class-conditional: pass class_ids (0..{C - 1})")
        ids = np.asarray(class_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"class_ids must be a non-empty list of integers, got {class_ids!r}")
        bad = ids[(ids < 0) | (ids >= C)]
        if bad.size:
            raise ValueError(f"class ids {bad.tolist()} out of range: this model has classes 0..{C - 1}")
        return ids.astype(np.int64)

    # -- tokenize ---------------------------------------------------------------------------------
    def tokenize(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Discriminative tokens ``[N, n, n]``, squared distances to their centroids ``[N, n, n]``
        and the encoder features ``[N, n, n, d]``."""
        return self.encode_disc(self.check_images(images))

    def vq_tokenize(self, images: np.ndarray) -> np.ndarray:
        """VQGAN tokens ``[N, m, m]`` of images (for contrast with the discriminative ones)."""
        return self.encode_vq(self.check_images(images))[0]

    def vq_encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """VQGAN tokens ``[N, m, m]`` and the encoder latents they quantize ``[N, m, m, d]``
        (the VQ side of the paper's feature cosine similarity, Table 1)."""
        return self.encode_vq(self.check_images(images))

    # -- generate -----------------------------------------------------------------------------------
    def sample(self, class_ids: list[int] | np.ndarray | None = None, *, n: int | None = None, seed: int = 0,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               cfg: float | None = None, on_token: OnToken | None = None) -> np.ndarray:
        """Generate images uint8 ``[N, H, W, 3]``; see ``generate`` for the arguments."""
        return self.generate(class_ids, n=n, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
                             cfg=cfg, on_token=on_token).images

    def generate(self, class_ids: list[int] | np.ndarray | None = None, *, n: int | None = None, seed: int = 0,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 cfg: float | None = None, on_token: OnToken | None = None) -> Generation:
        """Stage 1 from a class (or unconditionally), then stage 2 and the VQ decoder.

        ``temperature`` None takes the model's default; ``top_k``/``top_p``/``cfg`` None mean
        off; ``cfg`` s mixes logits as ``u + s * (c - u)`` (needs a model with label dropout).
        """
        classes = self.check_classes(class_ids, n)
        if cfg is not None and classes is None:
            raise ValueError("classifier-free guidance needs class_ids")
        return self._generate(classes, len(classes) if classes is not None else int(n), None, seed,
                              temperature, top_k, top_p, cfg, on_token)

    def complete(self, image: np.ndarray, keep_rows: int, n: int = 4, *, class_id: int | None = None, seed: int = 0,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 cfg: float | None = None, on_token: OnToken | None = None) -> np.ndarray:
        """``n`` completions uint8 ``[n, H, W, 3]`` of one image from its top ``keep_rows`` token rows."""
        return self.complete_detailed(image, keep_rows, n, class_id=class_id, seed=seed, temperature=temperature,
                                      top_k=top_k, top_p=top_p, cfg=cfg, on_token=on_token).images

    def complete_detailed(self, image: np.ndarray, keep_rows: int, n: int = 4, *, class_id: int | None = None,
                          seed: int = 0, temperature: float | None = None, top_k: int | None = None,
                          top_p: float | None = None, cfg: float | None = None,
                          on_token: OnToken | None = None) -> Generation:
        """Like ``complete``, returning the whole ``Generation``. A class-conditional model is
        conditioned on ``class_id``, or on its null class when None (label-dropout models)."""
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n}")
        image = np.asarray(image)
        if image.ndim == 4:
            if image.shape[0] != 1:
                raise ValueError(f"complete takes one image, got a batch of {image.shape[0]}")
        else:
            image = image[None]
        n = int(n)
        return self.complete_many(np.repeat(image, n, 0), keep_rows, class_ids=None if class_id is None else [class_id] * n,
                                  seed=seed, temperature=temperature, top_k=top_k, top_p=top_p, cfg=cfg, on_token=on_token)

    def complete_many(self, images: np.ndarray, keep_rows: int, *, class_ids: list[int] | np.ndarray | None = None,
                      seed: int = 0, temperature: float | None = None, top_k: int | None = None,
                      top_p: float | None = None, cfg: float | None = None,
                      on_token: OnToken | None = None) -> Generation:
        """One completion of each image ``[N, H, W, 3]`` from its top ``keep_rows`` token rows, as
        one batch (row ``i`` seeded by ``(seed, i)``). A class-conditional model is conditioned on
        ``class_ids``, or on its null class when None (label-dropout models; no guidance then)."""
        grid, s1 = self.config.disc_grid, self.config.stage1
        if int(keep_rows) != keep_rows or not 1 <= keep_rows < grid:
            raise ValueError(f"keep_rows must be an integer in 1..{grid - 1} (the token grid has {grid} rows)")
        ids = self.tokenize(images)[0]
        N = len(ids)
        codes = ids.reshape(N, -1)[:, : int(keep_rows) * grid]
        if s1.num_classes == 0:
            if class_ids is not None:
                raise ValueError("this model is unconditional: it takes no class_ids")
            classes = None
        elif class_ids is not None:
            classes = self.check_classes(class_ids, None)
            if len(classes) != N:
                raise ValueError(f"{len(classes)} class_ids for {N} images")
        elif s1.null_class_id is not None:
            classes, cfg = np.full(N, s1.null_class_id - s1.class_offset, dtype=np.int64), None
        else:
            raise ValueError("this class-conditional model has no null class: pass class_ids")
        return self._generate(classes, N, codes, seed, temperature, top_k, top_p, cfg, on_token)

    def _generate(self, classes: np.ndarray | None, B: int, prefix: np.ndarray | None, seed: int,
                  temperature: float | None, top_k: int | None, top_p: float | None, cfg: float | None,
                  on_token: OnToken | None) -> Generation:
        if cfg is not None and self.config.stage1.null_class_id is None:
            raise ValueError("this model was trained without label dropout, so it has no classifier-free guidance")
        d = self.config.sampling
        sampler = Sampler(d.temperature if temperature is None else temperature, top_k, top_p)
        rngs = row_generators(seed, B)
        t0 = time.perf_counter()
        codes, probs = self._stage1(classes, B, sampler, rngs, cfg, on_token, prefix)
        t1 = time.perf_counter()
        vq = self._stage2(codes, Sampler(d.stage2_temperature, d.stage2_top_k, d.stage2_top_p), rngs)
        t2 = time.perf_counter()
        n, m = self.config.disc_grid, self.config.vq_grid
        images = self.decode_vq(vq.reshape(B, m, m))
        t3 = time.perf_counter()
        return Generation(images, codes.reshape(B, n, n), vq.reshape(B, m, m), probs.reshape(B, n, n),
                          {"stage1": t1 - t0, "stage2": t2 - t1, "decode": t3 - t2})

    # -- the two autoregressive stages ------------------------------------------------------------
    def _first_tokens(self, classes: np.ndarray | None, B: int) -> np.ndarray:
        s1 = self.config.stage1
        if classes is None:
            return np.full((B, 1), s1.bos_id, dtype=np.int64)
        return (s1.class_offset + classes).reshape(B, 1).astype(np.int64)

    def _stage1(self, classes: np.ndarray | None, B: int, sampler: Sampler, rngs: list[np.random.Generator],
                cfg: float | None, on_token: OnToken | None, prefix: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        s1, g = self.config.stage1, self.config.stage1.gpt
        N = self.config.disc_grid ** 2
        first = self._first_tokens(classes, B)
        if cfg is not None:   # one batch of 2B rows: conditional rows, then null-class rows
            first = np.concatenate([first, np.full((B, 1), s1.null_class_id, dtype=np.int64)])
        rows = first.shape[0]
        known = np.zeros((B, 0), dtype=np.int64) if prefix is None else np.asarray(prefix, dtype=np.int64)
        if known.shape[0] != B or known.shape[1] >= N or (known.size and (known.min() < 0 or known.max() >= g.num_out)):
            raise ValueError(f"prefix must be [{B}, r < {N}] cluster ids in 0..{g.num_out - 1}, got {known.shape}")
        step = self.open_stage1(rows)
        codes = np.zeros((B, N), dtype=np.int64)
        probs = np.ones((B, N), dtype=np.float32)
        codes[:, : known.shape[1]] = known
        inp = np.concatenate([first, np.tile(known, (rows // B, 1)) + s1.code_offset], axis=1)
        pos = 0
        for t in range(known.shape[1], N):
            logits = step(inp, pos)[:, g.out_offset: g.out_offset + g.num_out].astype(np.float32)
            pos += inp.shape[1]
            if cfg is not None:
                logits = guide(logits[:B], logits[B:], cfg)
            tok = sampler(logits, rngs)
            codes[:, t] = tok
            probs[:, t] = _chosen_prob(logits, tok, sampler.temperature)
            if on_token is not None:
                on_token(t, codes[:, : t + 1].copy())
            inp = np.tile(tok[:, None] + s1.code_offset, (rows // B, 1))
        return codes, probs

    def _stage2(self, codes: np.ndarray, sampler: Sampler, rngs: list[np.random.Generator]) -> np.ndarray:
        s2, g = self.config.stage2, self.config.stage2.gpt
        B, M = codes.shape[0], self.config.vq_grid ** 2
        step = self.open_stage2(B)
        inp = np.concatenate([codes + s2.disc_offset, np.full((B, 1), s2.sep_id, dtype=np.int64)], axis=1)
        out = np.zeros((B, M), dtype=np.int64)
        pos = 0
        for t in range(M):
            logits = step(inp, pos)[:, g.out_offset: g.out_offset + g.num_out].astype(np.float32)
            pos += inp.shape[1]
            out[:, t] = sampler(logits, rngs)
            inp = (out[:, t: t + 1] + s2.vq_offset)
        return out


def _chosen_prob(logits: np.ndarray, tok: np.ndarray, temperature: float) -> np.ndarray:
    """Probability the (temperature-scaled, unfiltered) model gave to each chosen token."""
    p = softmax(logits.astype(np.float64) / max(temperature, 1e-6))
    return p[np.arange(len(tok)), tok].astype(np.float32)
