"""Everything the Gradio demo does that is not UI: find and open bundles, example images,
cluster statistics, the stability measurements, and running a flow as a stream of events.

No torch: bundles run on ``digit_core.runtime`` (onnxruntime + numpy). Each ``Model`` caches
only things that are the same for every user (its examples, their cluster counts, the
stability curve); nothing per request is kept here.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import EncoderConfig
from .flows import keep_rows_for  # noqa: F401  (the Complete tab's and the analyses' rows policy, from here too)
from .images import load_image
from .ood import DISTANCES_FILE, MAX_DISTANCES_BYTES, DistanceReference, tokenizer_sha256
from .metrics import add_noise, as_seen, cosine_similarity, stability, token_change_rate
from .sampling import check_number, check_seed

PROJECT = Path(__file__).resolve().parents[1]
EXPORTED = PROJECT / "exported"     # from the project, not the working directory: `python /x/app.py` works anywhere
ASSETS = PROJECT / "assets"
DEFAULT_MODEL = EXPORTED / "fmnist"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
MAX_EXAMPLES = 32              # training.assets writes 3 test images per class: 30 for Fashion-MNIST
GENERATED_EXAMPLES = 8

log = logging.getLogger("digit_core.demo")


class ModelMissing(FileNotFoundError):
    """No bundle at the given path; the message says how to get one."""


def missing_message(path: str | Path) -> str:
    return (f"No model bundle at '{path}' (a bundle is a folder with manifest.json and ONNX graphs). "
            "Get one: train and export the bundled Fashion-MNIST model with `bash training/fmnist.sh` "
            "(writes exported/fmnist), or export a saved model with "
            "`python -m digit_core.export --model MODEL_DIR --out exported/NAME`; "
            "then run `python app.py --model exported/NAME`.")


def shown(path: Path) -> str:
    """A path as the app shows it: relative to the project, else only its last two parts (clients
    are not told where the server keeps its files)."""
    path = Path(path).resolve()
    return str(path.relative_to(PROJECT)) if path.is_relative_to(PROJECT) else str(Path(*path.parts[-2:]))


def list_bundles(root: str | Path = EXPORTED) -> list[str]:
    """Bundle folders (those with a manifest.json) directly under ``root``."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.iterdir() if (p / "manifest.json").is_file())


@dataclass
class Model:
    """An opened bundle and the per-model data the demo derives from it (computed once)."""

    path: Path
    flows: Any                      # digit_core.runtime.Bundle (or any Flows)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def config(self):
        return self.flows.config

    @property
    def class_names(self) -> list[str]:
        c = self.config
        return list(c.class_names) or [f"class {i}" for i in range(c.stage1.num_classes)]

    @property
    def has_guidance(self) -> bool:
        """Whether classifier-free guidance applies: a class-conditional model with a null class."""
        return self.config.stage1.num_classes > 0 and self.config.stage1.null_class_id is not None

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per model (for things equal for every user)."""
        with self._lock:
            if key not in self._cache:
                self._cache[key] = make()
            return self._cache[key]

    # -- example images ------------------------------------------------------------------------
    def examples(self) -> tuple[list[tuple[str, np.ndarray]], str]:
        """``[(name, uint8 image)]`` and where they came from: the bundle's or assets' example
        images, else samples of the model itself (seed 0), so every bundle has some."""
        return self.once("examples", self._load_examples)

    def _example_files(self) -> tuple[list[Path], Path | None]:
        for folder in (self.path / "examples", ASSETS / "examples" / self.path.name, ASSETS / "examples"):
            if folder.is_dir():
                files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_EXAMPLES]
                if files:
                    return files, folder
        return [], None

    def example_names(self) -> list[str]:
        """The examples' names, without decoding or generating them."""
        files, _ = self._example_files()
        if files:
            return [p.stem for p in files]
        C = self.config.stage1.num_classes
        return [f"sample {i}: {self.class_names[i % C]}" if C else f"sample {i}" for i in range(GENERATED_EXAMPLES)]

    def _load_examples(self) -> tuple[list[tuple[str, np.ndarray]], str]:
        files, folder = self._example_files()
        if files:
            imgs = [load_image(p, self.config.image_size) for p in files]
            return list(zip(self.example_names(), imgs)), f"{len(files)} example images from {shown(folder)}"
        C, k = self.config.stage1.num_classes, GENERATED_EXAMPLES
        imgs = self.flows.sample(class_ids=[i % C for i in range(k)], seed=0) if C else self.flows.sample(n=k, seed=0)
        return (list(zip(self.example_names(), imgs)),
                f"{k} images this model generated (seed 0), as the bundle and assets/ ship no example images")

    def example(self, name: str) -> np.ndarray:
        for n, img in self.examples()[0]:
            if n == name:
                return img
        raise ValueError(f"no example named {name!r}")

    # -- clusters --------------------------------------------------------------------------------
    def cluster_sizes(self) -> tuple[np.ndarray, str]:
        """Patches per cluster ``[K]`` and a sentence saying where the counts come from."""
        return self.once("sizes", self._cluster_sizes)

    def cluster_dir(self) -> Path | None:
        """This model's cluster folder (``sizes.json``, ``<k>.png``, as ``training.assets`` writes
        them): the bundle's ``clusters/``, else ``assets/clusters/<bundle name>``. One folder for
        both, so the counts and the galleries describe the same sample; cluster ids mean nothing
        across models, so there is no shared fallback."""
        for folder in (self.path / "clusters", ASSETS / "clusters" / self.path.name):
            if folder.is_dir():
                return folder
        return None

    def _cluster_sizes(self) -> tuple[np.ndarray, str]:
        K = self.config.codebook.size
        folder = self.cluster_dir()
        f = folder / "sizes.json" if folder else None
        if f and f.is_file():
            d = json.loads(f.read_text())
            sizes = np.asarray(d["sizes"], dtype=np.int64)
            if sizes.shape == (K,):
                return sizes, (f"cluster sizes: patch counts over {d['images']:,} images of the {d['split']} "
                               f"split ({d['fraction']:.0%} sample), from {shown(f)}")
        imgs = np.stack([img for _, img in self.examples()[0]])
        ids = self.flows.tokenize(imgs)[0]
        return (np.bincount(ids.ravel(), minlength=K),
                f"cluster sizes: counted over the tokens of the {len(imgs)} example images "
                "(the bundle ships no training-set statistics)")

    def cluster_gallery(self, k: int) -> Path | None:
        """A picture of the training patches nearest cluster ``k``'s centroid, if the cluster folder
        has one (a cluster no sampled training patch fell in has none)."""
        folder = self.cluster_dir()
        p = folder / f"{int(k)}.png" if folder else None
        return p if p and p.is_file() else None

    def distance_reference(self) -> DistanceReference | None:
        """How far the training images lie from this model's codebook (``distances.json`` in
        the cluster folder, from ``training.assets``), or None: no file, an unreadable one, or
        one measured with another tokenizer (then the app shows no out-of-distribution notice)."""
        return self.once("distances", self._distance_reference)

    def _distance_reference(self) -> DistanceReference | None:
        folder = self.cluster_dir()
        f = folder / DISTANCES_FILE if folder else None
        if f is None or not f.is_file():
            return None
        try:
            if f.stat().st_size > MAX_DISTANCES_BYTES:
                raise ValueError(f"larger than {MAX_DISTANCES_BYTES} bytes")
            ref = DistanceReference.parse(json.loads(f.read_bytes().decode("utf-8")), shown(f))
        except (OSError, ValueError, TypeError, KeyError, RecursionError) as err:
            log.warning("%s ignored (no out-of-distribution notice): %s", f, err)
            return None
        own = tokenizer_sha256(self.flows)
        if own is not None and ref.tokenizer_sha256 != own:
            log.warning("%s ignored (no out-of-distribution notice): measured with another tokenizer than "
                        "this bundle's; rebuild it with `python -m training.assets --bundle %s --data DATA "
                        "--only distances`", f, self.path)
            return None
        return ref

    def model_card(self) -> str | None:
        f = self.path / "MODEL_CARD.md"
        return f.read_text() if f.is_file() else None

    # -- stability ---------------------------------------------------------------------------------
    def stability_curve(self) -> dict[str, list[float]]:
        """Change rates of both tokenizers (and feature cos-sim) at the paper's SNRs, over the examples."""
        return self.once("curve", self._stability_curve)

    def _stability_curve(self) -> dict[str, list[float] | int]:
        return stability(self.flows, np.stack([img for _, img in self.examples()[0]]), seed=0)


GREY_NOTE = "This model reads grey images: the picture shows the grey image it sees."


def seen_image(model: Model, image: np.ndarray) -> tuple[np.ndarray, bool]:
    """``image`` (uint8 ``[S, S, 3]``) as the model sees it (a grey model: its grey version, as RGB)
    and whether that differs from it (a colour image given to a grey model)."""
    if model.config.channels != 1:
        return image, False
    seen = model.flows.check_images(as_seen(image[None], 1))[0]
    return seen, not np.array_equal(seen, image)


def stability_one(model: Model, image: np.ndarray, snr_db: float, seed: int) -> dict[str, Any]:
    """Noise one image at ``snr_db``; which discriminative / VQ tokens changed, and how many."""
    image = as_seen(image[None], model.config.channels)
    noisy = model.flows.check_images(add_noise(image, snr_db, np.random.default_rng(seed)))   # back to RGB
    both = np.concatenate([model.flows.check_images(image), noisy])
    vq = model.flows.vq_tokenize(both)
    out = {"noisy": noisy[0], "vq_changed": vq[0] != vq[1], "vq_change_rate": token_change_rate(vq[:1], vq[1:]),
           "disc_changed": None, "disc_change_rate": None, "disc_cos_sim": None}
    if not model.config.is_vq:   # a VQ-token model has no discriminative tokens
        ids, _, feats = model.flows.tokenize(both)
        out |= {"disc_changed": ids[0] != ids[1], "disc_change_rate": token_change_rate(ids[:1], ids[1:]),
                "disc_cos_sim": cosine_similarity(feats[0], feats[1])}
    return out


def stage1_tokens(config: Any) -> str:
    """What a model's stage 1 generates, in words (its token grids' titles)."""
    return "VQ tokens" if config.is_vq else "discriminative tokens"


def model_line(config: Any) -> str:
    """The model in one line: its tokens and stages (the header, and a comparison's caption)."""
    c = config
    if c.is_vq:
        return (f"{c.vq_grid}×{c.vq_grid} VQ tokens ({c.vqgan.n_embed} codes) generated directly by stage 1 and "
                "decoded by the VQGAN: the VQ-AR baseline (no discriminative tokens, no stage 2)")
    return (f"{c.disc_grid}×{c.disc_grid} discriminative tokens ({c.codebook.size} clusters) → {c.vq_grid}×{c.vq_grid} "
            f"VQ tokens ({c.vqgan.n_embed} codes)")


# -- what a request asks for -------------------------------------------------------------------------
RANDOM = "random"
UNCONDITIONAL = "(unconditional)"
NULL_CLASS = "(no class: null token)"


def encoder_line(e: EncoderConfig) -> str:
    """How the tokenizer's encoder was trained, from the structured fields (``objective``,
    ``labels``), for the app's header: the paper's claim is about encoders trained without labels."""
    arch = {"cnn": "CNN", "vit": "ViT", "dinov2": "DINOv2"}.get(e.kind, e.kind)
    if e.labels is None:
        how = f"trained with objective {e.objective}" if e.objective else "training not recorded"
    elif e.labels:
        how = f"trained **with the labels** ({e.objective or 'objective not recorded'}): not self-supervised"
    else:
        how = f"trained self-supervised ({e.objective or 'objective not recorded'}), **no labels**"
    return f"Encoder: {arch}, {how}" + (f". {e.source}" if e.source else "")


def class_choices(model: Model) -> list[str]:
    return [RANDOM, *model.class_names] if model.config.stage1.num_classes else [UNCONDITIONAL]


def completion_class_choices(model: Model) -> list[str]:
    """What a completion can be conditioned on: the null class first (label-dropout models), then the classes."""
    if not model.config.stage1.num_classes:
        return [UNCONDITIONAL]
    return ([NULL_CLASS] if model.has_guidance else []) + model.class_names


def integer(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an int in ``lo..hi`` (integral floats count, as JSON clients send them); a
    ValueError naming ``name`` otherwise (NaN, inf, 2.5, strings, bools, out of range)."""
    return int(check_number(name, value, lambda v: lo <= v <= hi, f"an integer in {lo}..{hi}", integer=True))


def number(name: str, value: Any, lo: float, hi: float) -> float:
    """``value`` as a finite float in ``[lo, hi]``; a ValueError naming ``name`` otherwise."""
    return float(check_number(name, value, lambda v: lo <= v <= hi, f"a number in [{lo:g}, {hi:g}]"))


def resolve_classes(model: Model, choice: str | None, n: int, seed: int) -> list[int] | None:
    """The class id of each of ``n`` samples: a named class, ``random`` (drawn from ``seed``), or
    None for an unconditional model."""
    C = model.config.stage1.num_classes
    if C == 0:
        if choice not in (None, "", RANDOM, UNCONDITIONAL):
            raise ValueError(f"this model is unconditional: class must be {UNCONDITIONAL!r}, got {choice!r:.80}")
        return None
    if choice in (None, "", RANDOM):
        return np.random.default_rng([check_seed(seed), 7919]).integers(0, C, size=n).tolist()
    names = model.class_names
    if choice not in names:
        raise ValueError(f"unknown class {choice!r:.80}; this model has: {', '.join(names)} (or '{RANDOM}')")
    return [names.index(choice)] * n


def completion_class(model: Model, choice: str | None) -> int | None:
    """The class a completion is conditioned on: a class id, or None (the null class / unconditional)."""
    if choice in (None, "", NULL_CLASS, UNCONDITIONAL):
        return None
    if choice not in model.class_names:
        raise ValueError(f"unknown class {choice!r:.80}; this model has: {', '.join(model.class_names)}"
                         + (f" (or {NULL_CLASS!r})" if model.has_guidance else ""))
    return model.class_names.index(choice)


def sampling_args(temperature: Any = None, top_k: Any = None, top_p: Any = None,
                  cfg_scale: Any = None) -> dict[str, Any]:
    """The sampling keywords of a request, passed on as they came: None (omitted) takes the
    bundle's default, an explicit value is used (top-k 0, top-p 1, CFG 1 = off), and the library
    validates each, naming it. ``cfg_scale`` None is left out (completions take no guidance
    keyword from the user)."""
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    return kw | ({} if cfg_scale is None else {"cfg_scale": cfg_scale})


def choose_image(model: Model, upload: str | None, example: str | None) -> np.ndarray:
    """The image a request is about: its upload or its example (the UI sends only the one the
    user chose last); both or neither is an error."""
    if upload and example:
        raise ValueError("pass either an image or an example name, not both")
    if upload:
        return load_image(upload, model.config.image_size)
    if example:
        return model.example(example)
    raise ValueError("Upload an image or pick an example first.")


def timing_text(timings: dict[str, float], batch: int, n: int, m: int, kept: int = 0, stage2: bool = True) -> str:
    """Seconds and tokens/s per stage; ``kept`` stage-1 tokens per image were given, not generated,
    so they are not counted in stage 1's rate. ``stage2`` False: a VQ-token model, which has none."""
    t1, t2, t3 = timings.get("stage1", 0.0), timings.get("stage2", 0.0), timings.get("decode", 0.0)
    two = f"stage 2: {t2:.2f} s ({batch * m * m / max(t2, 1e-9):,.0f} tokens/s) · " if stage2 else "no stage 2 · "
    return (f"stage 1: {t1:.2f} s ({batch * (n * n - kept) / max(t1, 1e-9):,.0f} tokens/s) · {two}"
            f"VQ decode: {t3:.3f} s · total {t1 + t2 + t3:.2f} s for {batch} image(s)")


def pad_grid(codes: np.ndarray, n: int) -> np.ndarray:
    """The first tokens of a stage-1 run ``[B, t]`` as float grids ``[B, n, n]``, NaN where not generated yet."""
    grid = np.full((codes.shape[0], n * n), np.nan)
    grid[:, : codes.shape[1]] = codes
    return grid.reshape(-1, n, n)


def cell_at(index: Any, grid: int, side: int) -> tuple[int, int]:
    """The token cell ``(row, col)`` under a click at pixel ``index = [x, y]`` of a ``side``-pixel
    square picture of a ``grid`` x ``grid`` token grid; a ValueError for anything outside it."""
    if not isinstance(index, (list, tuple)) or len(index) < 2:
        raise ValueError(f"a click position must be [x, y], got {index!r:.40}")
    x, y = (integer(name, v, 0, side - 1) for name, v in zip(("x", "y"), index[:2]))
    return y * grid // side, x * grid // side
