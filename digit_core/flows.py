"""The three DiGIT flows, written once over abstract backends, in numpy.

    tokenize: image -> encoder features -> nearest centroid -> discriminative tokens
    generate: class -> stage 1 -> discriminative tokens -> stage 2 -> VQ tokens -> VQ decoder
    complete: image -> tokenize -> keep the top rows -> stage 1 continues -> stage 2 -> image

The VQ-AR baseline (``config.tokens == "vq"``) runs the same flows with VQ ids as its stage-1 tokens: the VQ
encoder tokenizes a completion's prefix and stage 2 is skipped.

``Flows`` holds the logic; a backend supplies five operations on numpy arrays. The PyTorch pipeline
(``pipeline.DiGIT``) and the onnxruntime runtime (``runtime.Bundle``) are two backends of this one
class, so they cannot drift apart, and tests compare them on equal inputs.

Sampling settings follow one rule everywhere: a knob left out (or None) takes the model's default
(``config.sampling``); an explicit value is used as given, and "off" is spelled ``top_k=0``, ``top_p=1``,
``cfg_scale=1``. Every generation records the settings it used (``Generation.settings``). Every number is
validated here, before any network runs.
"""
from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import layout
from .config import RENAMED_SAMPLING, DiGITConfig
from .sampling import (Sampler, check_cfg_scale, check_number, check_positive_int, check_seed, check_temperature,
                       check_top_k, check_top_p, guide, row_generators, softmax)

StepFn = Callable[[np.ndarray, int], np.ndarray]
"""``step(tokens [B, S] int64, start) -> logits [B, out_vocab] float32`` of the last position;
the function owns a KV cache holding every earlier position."""
OnToken = Callable[[int, np.ndarray], None]
"""``on_token(step, codes_so_far [B, step + 1])``: called after every stage-1 token."""


@dataclass(frozen=True)
class SamplingSettings:
    """The sampling settings of one generation, every knob resolved: "off" is ``top_k`` 0,
    ``top_p`` 1.0 and ``cfg_scale`` 1.0 (also when guidance does not apply to the call)."""

    temperature: float
    top_k: int
    top_p: float
    cfg_scale: float
    stage2_temperature: float
    stage2_top_k: int
    stage2_top_p: float

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


@dataclass
class Generation:
    """Everything one generate/complete call produced, for the app to show."""

    images: np.ndarray                 # uint8 [N, H, W, 3]
    disc_tokens: np.ndarray            # int64 [N, n, n] stage-1 tokens: cluster ids (VQ ids for a VQ-token model)
    vq_tokens: np.ndarray              # int64 [N, m, m] VQ code ids
    disc_probs: np.ndarray             # float32 [N, n, n] probability of each chosen stage-1 token
    settings: SamplingSettings         # what was used: the call's values, else the model's defaults
    seed: int
    timings: dict[str, float] = field(default_factory=dict)   # seconds per stage


_KNOB_CHECKS: dict[str, tuple[Callable[[object, str], float | int], float | int]] = {
    "temperature": (check_temperature, 1.0), "top_k": (check_top_k, 0), "top_p": (check_top_p, 1.0),
    "cfg_scale": (check_cfg_scale, 1.0), "stage2_temperature": (check_temperature, 1.0),
    "stage2_top_k": (check_top_k, 0), "stage2_top_p": (check_top_p, 1.0)}
"""Each knob's check and its neutral value (what a config's None means: off, or plain temperature 1)."""
KNOBS = tuple(_KNOB_CHECKS)
"""The sampling keyword arguments of ``generate``/``complete_many`` (and of the calls that forward to them)."""


def _current_names(knobs: dict[str, float | int | None]) -> dict[str, float | int | None]:
    """``knobs`` with each old name of a knob (``config.RENAMED_SAMPLING``) replaced by its name now,
    with a DeprecationWarning at the first caller outside this module; both names given is a TypeError."""
    out = dict(knobs)
    for old, new in RENAMED_SAMPLING.items():
        if old not in out:
            continue
        value = out.pop(old)
        if value is not None and out.get(new) is not None:
            raise TypeError(f"{new} and {old} (its old name) both given: pass {new} only")
        level, frame = 1, sys._getframe()
        while frame is not None and frame.f_code.co_filename == __file__:
            level, frame = level + 1, frame.f_back
        warnings.warn(f"the sampling keyword {old}= is deprecated: pass {new}= instead (the same value)",
                      DeprecationWarning, stacklevel=level)
        if value is not None:
            out[new] = value
    return out


def keep_rows_for(percent: float, grid: int) -> int:
    """Whole token rows nearest to ``percent`` (0..100) of a ``grid``-row token grid, at least 1
    and at most ``grid - 1`` (a completion keeps some rows and generates some)."""
    p = float(check_number("keep_percent", percent, lambda v: 0 <= v <= 100, "a finite number in [0, 100]"))
    return int(min(grid - 1, max(1, round(p / 100.0 * grid))))


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
    def check_disc(self, what: str) -> None:
        """Raise for a VQ-token model, which has no discriminative tokenizer and no stage 2."""
        if self.config.is_vq:
            raise ValueError(f"cannot {what}: {self.config.name} is a VQ-token model (the VQ-AR baseline), with no "
                             "discriminative tokenizer and no stage 2; its tokens are vq_tokenize's")

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
            if n is None:
                raise ValueError("this model is unconditional: pass n=... (how many images)")
            check_positive_int(n)
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
        and the encoder features ``[N, n, n, d]``; a VQ-token model's backend refuses (``check_disc``)."""
        return self.encode_disc(self.check_images(images))

    def vq_tokenize(self, images: np.ndarray) -> np.ndarray:
        """VQGAN tokens ``[N, m, m]`` of images (for contrast with the discriminative ones)."""
        return self.encode_vq(self.check_images(images))[0]

    def vq_encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """VQGAN tokens ``[N, m, m]`` and the encoder latents they quantize ``[N, m, m, d]``
        (the VQ side of the paper's feature cosine similarity, Table 1)."""
        return self.encode_vq(self.check_images(images))

    # -- sampling settings --------------------------------------------------------------------------
    def sampling_settings(self, *, no_guidance: str | None = None, **knobs: float | int | None) -> SamplingSettings:
        """Resolve and validate the sampling knobs (``KNOBS``): None takes ``config.sampling``'s
        default, anything else must be a valid explicit value. ``no_guidance`` says why this call
        cannot be guided (then the default guidance is off and an explicit ``cfg_scale`` other than
        1 is an error); None means it can when the model has a null class (label dropout). A knob's
        old name (``cfg``) still works here and in every call that forwards to this one, with a
        DeprecationWarning."""
        knobs = _current_names(knobs)
        unknown = sorted(set(knobs) - set(KNOBS))
        if unknown:
            raise TypeError(f"unknown sampling settings {unknown}; the knobs are {', '.join(KNOBS)}")
        s1 = self.config.stage1
        if no_guidance is None and s1.num_classes == 0:
            no_guidance = "an unconditional model has no classifier-free guidance"
        elif no_guidance is None and s1.null_class_id is None:
            no_guidance = "this model was trained without label dropout, so it has no classifier-free guidance"
        d = self.config.sampling
        out: dict[str, float | int] = {}
        for name, (check, neutral) in _KNOB_CHECKS.items():
            given = knobs.get(name)
            if given is not None:
                out[name] = check(given, name)
                continue
            default = getattr(d, name)   # None in a config is off (the neutral value)
            out[name] = neutral if default is None else check(default, f"the model's default sampling.{name}")
        if no_guidance is not None:
            if knobs.get("cfg_scale") is not None and out["cfg_scale"] != 1.0:
                raise ValueError(f"cfg_scale={out['cfg_scale']:g} asked for, but {no_guidance} "
                                 "(pass cfg_scale=1 or leave it out)")
            out["cfg_scale"] = 1.0
        return SamplingSettings(**out)

    # -- generate -----------------------------------------------------------------------------------
    def sample(self, class_ids: list[int] | np.ndarray | None = None, *, n: int | None = None, seed: int = 0,
               on_token: OnToken | None = None, **sampling: float | int | None) -> np.ndarray:
        """Generate images uint8 ``[N, H, W, 3]``; see ``generate`` for the arguments."""
        return self.generate(class_ids, n=n, seed=seed, on_token=on_token, **sampling).images

    def generate(self, class_ids: list[int] | np.ndarray | None = None, *, n: int | None = None, seed: int = 0,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 cfg_scale: float | None = None, stage2_temperature: float | None = None,
                 stage2_top_k: int | None = None, stage2_top_p: float | None = None,
                 on_token: OnToken | None = None, **old_names: float | int | None) -> Generation:
        """Stage 1 from a class (or ``n`` unconditionally), then stage 2 and the VQ decoder.

        Each sampling knob left out (None) takes the model's default (``config.sampling``); an
        explicit value is used as given: ``top_k`` 0, ``top_p`` 1 and ``cfg_scale`` 1 are off.
        ``cfg_scale`` s mixes logits as ``u + s * (c - u)`` (a model with label dropout, and
        class_ids). ``old_names``: a knob's old name, deprecated (``sampling_settings``).
        """
        classes = self.check_classes(class_ids, n)   # None only for an unconditional model: no guidance
        settings = self.sampling_settings(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                                          stage2_temperature=stage2_temperature, stage2_top_k=stage2_top_k,
                                          stage2_top_p=stage2_top_p, **old_names)
        B = len(classes) if classes is not None else int(n)
        return self._generate(classes, B, None, check_seed(seed), settings, on_token)

    def complete(self, image: np.ndarray, keep_rows: int, n: int = 4, *, class_id: int | None = None, seed: int = 0,
                 on_token: OnToken | None = None, **sampling: float | int | None) -> np.ndarray:
        """``n`` completions uint8 ``[n, H, W, 3]`` of one image from its top ``keep_rows`` token
        rows; the sampling knobs are ``generate``'s."""
        return self.complete_detailed(image, keep_rows, n, class_id=class_id, seed=seed, on_token=on_token,
                                      **sampling).images

    def complete_detailed(self, image: np.ndarray, keep_rows: int, n: int = 4, *, class_id: int | None = None,
                          seed: int = 0, on_token: OnToken | None = None,
                          **sampling: float | int | None) -> Generation:
        """Like ``complete``, returning the whole ``Generation``. A class-conditional model is
        conditioned on ``class_id``, or on its null class when None (label-dropout models)."""
        n = check_positive_int(n)
        if class_id is not None:
            C = self.config.stage1.num_classes
            class_id = int(check_number("class_id", class_id, lambda v: 0 <= v < C,
                                        f"an integer in 0..{C - 1}" if C else "None (this model is unconditional)",
                                        integer=True))
        image = np.asarray(image)
        if image.ndim == 4:
            if image.shape[0] != 1:
                raise ValueError(f"complete takes one image, got a batch of {image.shape[0]}")
        else:
            image = image[None]
        return self.complete_many(np.repeat(image, n, 0), keep_rows, class_ids=None if class_id is None else [class_id] * n,
                                  seed=seed, on_token=on_token, **sampling)

    def complete_many(self, images: np.ndarray, keep_rows: int, *, class_ids: list[int] | np.ndarray | None = None,
                      seed: int = 0, temperature: float | None = None, top_k: int | None = None,
                      top_p: float | None = None, cfg_scale: float | None = None,
                      stage2_temperature: float | None = None, stage2_top_k: int | None = None,
                      stage2_top_p: float | None = None, on_token: OnToken | None = None,
                      **old_names: float | int | None) -> Generation:
        """One completion of each image ``[N, H, W, 3]`` from its top ``keep_rows`` token rows, as
        one batch (row ``i`` seeded by ``(seed, i)``); the sampling knobs are ``generate``'s. A
        class-conditional model is conditioned on ``class_ids``, or on its null class when None
        (label-dropout models; no guidance then: there is no class to guide towards)."""
        grid, s1 = self.config.disc_grid, self.config.stage1
        keep_rows = int(check_number("keep_rows", keep_rows, lambda v: 1 <= v < grid,
                                     f"an integer in 1..{grid - 1} (the token grid has {grid} rows)", integer=True))
        seed = check_seed(seed)
        images = self.check_images(images)
        N = len(images)
        no_guidance = None
        if s1.num_classes == 0:
            if class_ids is not None:
                raise ValueError("this model is unconditional: it takes no class_ids")
            classes = None
        elif class_ids is not None:
            classes = self.check_classes(class_ids, None)
            if len(classes) != N:
                raise ValueError(f"{len(classes)} class_ids for {N} images")
        elif s1.null_class_id is not None:
            classes = None   # the null class: stage 1's first token says "no label"
            no_guidance = "a completion without a class is conditioned on the null class: there is nothing to guide"
        else:
            raise ValueError("this class-conditional model has no null class: pass class_ids")
        settings = self.sampling_settings(
            no_guidance=no_guidance, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
            stage2_temperature=stage2_temperature, stage2_top_k=stage2_top_k, stage2_top_p=stage2_top_p,
            **old_names)
        encode = self.encode_vq if self.config.is_vq else self.encode_disc   # the stage-1 tokens of the images
        codes = encode(images)[0].reshape(N, -1)[:, : keep_rows * grid]
        null = classes is None and s1.num_classes > 0
        return self._generate(classes, N, codes, seed, settings, on_token, null=null)

    def _generate(self, classes: np.ndarray | None, B: int, prefix: np.ndarray | None, seed: int,
                  settings: SamplingSettings, on_token: OnToken | None, null: bool = False) -> Generation:
        st = settings
        cfg_scale = st.cfg_scale if st.cfg_scale != 1.0 else None   # 1 is the plain conditional: skip the null-class rows
        rngs = row_generators(seed, B)
        t0 = time.perf_counter()
        first = layout.first_tokens(self.config.stage1, classes, B, null=null)
        codes, probs = self._stage1(first, Sampler(st.temperature, st.top_k, st.top_p), rngs, cfg_scale, on_token, prefix)
        t1 = time.perf_counter()
        vq = codes if self.config.is_vq else self._stage2(
            codes, Sampler(st.stage2_temperature, st.stage2_top_k, st.stage2_top_p), rngs)
        t2 = time.perf_counter()
        n, m = self.config.disc_grid, self.config.vq_grid
        images = self.decode_vq(vq.reshape(B, m, m))
        t3 = time.perf_counter()
        return Generation(images, codes.reshape(B, n, n), vq.reshape(B, m, m), probs.reshape(B, n, n), settings, seed,
                          {"stage1": t1 - t0, "stage2": t2 - t1, "decode": t3 - t2})

    def render(self, codes: np.ndarray, *, seed: int = 0, **stage2: float | int | None) -> np.ndarray:
        """Images uint8 ``[N, H, W, 3]`` of stage-1 grids ``[N, n, n]`` (e.g. real tokens) through stage 2 (``stage2_*``
        knobs, row ``i`` seeded ``(seed, i)``) and the VQ decoder: what stage 2 makes of real tokens bounds generation."""
        if bad := sorted(k for k in stage2 if not k.startswith("stage2_")):
            raise TypeError(f"render takes only the stage2_* sampling knobs, got {bad}")
        c, n, K, st = np.asarray(codes), self.config.disc_grid, self.config.stage1_vocab, self.sampling_settings(**stage2)
        if c.ndim != 3 or c.shape[1:] != (n, n) or not len(c) or c.min() < 0 or c.max() >= K:
            raise ValueError(f"codes must be [N >= 1, {n}, {n}] ids in 0..{K - 1}, got {c.dtype} {c.shape}")
        flat, sampler = c.astype(np.int64).reshape(len(c), n * n), Sampler(st.stage2_temperature, st.stage2_top_k,
                                                                            st.stage2_top_p)
        vq = flat if self.config.is_vq else self._stage2(flat, sampler, row_generators(seed, len(c)))
        return self.decode_vq(vq.reshape(len(c), self.config.vq_grid, self.config.vq_grid))

    # -- the two autoregressive stages ------------------------------------------------------------
    def _stage1(self, first: np.ndarray, sampler: Sampler, rngs: list[np.random.Generator], cfg_scale: float | None,
                on_token: OnToken | None, prefix: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1 from its first tokens ``[B, 1]`` (and a kept prefix of codes), guided with scale
        ``cfg_scale`` (None: unguided)."""
        s1, g = self.config.stage1, self.config.stage1.gpt
        B, N, codes_of = first.shape[0], self.config.disc_grid ** 2, layout.code_slice(g)
        if cfg_scale is not None:   # one batch of 2B rows: conditional rows, then null-class rows
            first = np.concatenate([first, layout.first_tokens(s1, None, B, null=True)])
        rows = first.shape[0]
        known = np.zeros((B, 0), dtype=np.int64) if prefix is None else np.asarray(prefix, dtype=np.int64)
        if known.shape[0] != B or known.shape[1] >= N or (known.size and (known.min() < 0 or known.max() >= g.num_out)):
            raise ValueError(f"prefix must be [{B}, r < {N}] cluster ids in 0..{g.num_out - 1}, got {known.shape}")
        step = self.open_stage1(rows)
        codes = np.zeros((B, N), dtype=np.int64)
        probs = np.ones((B, N), dtype=np.float32)
        codes[:, : known.shape[1]] = known
        inp = layout.stage1_input(s1, first, np.tile(known, (rows // B, 1)))
        pos = 0
        for t in range(known.shape[1], N):
            logits = step(inp, pos)[:, codes_of].astype(np.float32)
            pos += inp.shape[1]
            if cfg_scale is not None:
                logits = guide(logits[:B], logits[B:], cfg_scale)
            tok = sampler(logits, rngs)
            codes[:, t] = tok
            probs[:, t] = _chosen_prob(logits, tok, sampler.temperature)
            if on_token is not None:
                on_token(t, codes[:, : t + 1].copy())
            inp = np.tile(layout.stage1_codes(s1, tok[:, None]), (rows // B, 1))
        return codes, probs

    def _stage2(self, codes: np.ndarray, sampler: Sampler, rngs: list[np.random.Generator]) -> np.ndarray:
        s2, g = self.config.stage2, self.config.stage2.gpt
        B, M = codes.shape[0], self.config.vq_grid ** 2
        step = self.open_stage2(B)
        inp = layout.stage2_prefix(s2, codes)
        out = np.zeros((B, M), dtype=np.int64)
        pos = 0
        for t in range(M):
            logits = step(inp, pos)[:, layout.code_slice(g)].astype(np.float32)
            pos += inp.shape[1]
            out[:, t] = sampler(logits, rngs)
            inp = layout.stage2_codes(s2, out[:, t: t + 1])
        return out


def _chosen_prob(logits: np.ndarray, tok: np.ndarray, temperature: float) -> np.ndarray:
    """Probability the (temperature-scaled, unfiltered) model gave to each chosen token."""
    p = softmax(logits.astype(np.float64) / max(temperature, 1e-6))
    return p[np.arange(len(tok)), tok].astype(np.float32)
