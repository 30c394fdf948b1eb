"""What every analysis shares: its inputs (run paths, images, models, the judge) and the report
writer (``<key>.json``, plotly ``<key>.html`` + ``<key>.png``, ``<key>.md``, and ``README.md``
joining every section present, so analyses run at different times add up to one report)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image

from digit_core.pipeline import DiGIT
from digit_core.viz import upscale
from training.data import as_uint8
from training.evaltools import (EvalConfig, Labelled, classify, frechet_distance, from_uint8, get_classifier,
                                linear_probe, load_splits)
from training.files import load_tensors, require
from training.layout import LAYOUT

ORDER = ("stability", "probe", "ablation", "ssl_type", "completion")   # the paper's order
SECTIONS = (*ORDER, "thesis")   # what README.md joins: the analyses, then the sweep (training.analyses.thesis)
CLOSE = 0.05
"""Relative differences of a Fréchet distance below this (5%) count as "about the same"."""


@dataclass
class Options:
    """The command line: where the runs are, which images, how many of each."""

    root: str = "runs/fmnist"
    data: str = "fmnist"                 # training split: probe training images, the control's K-Means fit
    test_data: str = ""                  # default fmnist:test for fmnist, else a seeded fifth of data (as evaluate)
    name: str = ""                       # report name; default the root's folder name
    out: str = ""                        # default reports/<name>
    model: str = ""                      # default <root>/model (the assembled DiGIT)
    encoder: str = ""                    # default <root>/ssl/encoder.safetensors (only its description is read)
    vqgan: str = ""                      # default <root>/vqgan/vqgan.safetensors
    vq_stage1: str = ""                  # default <root>/stage1_vq/stage1.safetensors (the ablation baseline)
    probe_roots: tuple[str, ...] = ()    # more runs (other K) for the per-layer probe; each <r>/model
    encoders: tuple[str, ...] = ()       # more encoders for ssl_type, LABEL=PATH (ssl artifacts)
    classifier: str = ""                 # the judge; default training.evaluate's cache runs/eval/<data>-classifier
    seed: int = 0
    device: str = "auto"
    batch: int = 256
    n_stability: int = 1000              # test images for Table 1
    n_probe_train: int = 5000
    n_probe_test: int = 2000
    n_control_fit: int = 6000            # training images whose features fit the control's K-Means (10%, as ours)
    n_per_class: int = 50                # ablation samples per class
    n_complete: int = 200                # test images completed at each prefix length
    prefixes: tuple[float, ...] = (12.5, 25.0, 50.0, 75.0)
    cfg_scale: float | None = None       # guidance for the ablation samples; default the model's sampling.cfg_scale

    def path(self, value: str, default: str) -> Path:
        return Path(value) if value else Path(self.root) / default

    @property
    def report_dir(self) -> Path:
        return Path(self.out) if self.out else Path("reports") / (self.name or Path(self.root).resolve().name)


@dataclass
class Judge:
    """How the generation analyses score uint8 images ``[N, H, W, 3]``: ``measure`` gives a
    classifier's features ``[N, d]`` and predicted labels ``[N]``; ``frechet`` the Fréchet
    distance between two sets of those features."""

    measure: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    frechet: Callable[[np.ndarray, np.ndarray], float]
    name: str = "classifier"


class Context:
    """Lazily loaded inputs, each loaded once however many analyses use it. Images, their split
    and the classifier are ``training.evaluate``'s, so the analyses and the model card measure
    with one yardstick."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.device = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available()
                                   else "cpu" if opts.device == "auto" else opts.device)

    @cached_property
    def model(self) -> DiGIT:
        return DiGIT.load(require(self.opts.path(self.opts.model, LAYOUT.model), "assemble"), self.device)

    @cached_property
    def vq_model(self) -> DiGIT:
        """The VQ-AR baseline (``training.stage1 --tokens=vq``) on the same VQGAN."""
        from training.assemble import vq_model
        o = self.opts
        return vq_model(o.path(o.vq_stage1, LAYOUT.stage1_vq.path),
                        o.path(o.vqgan, LAYOUT.vqgan.path)).to(self.device)

    @cached_property
    def eval_config(self) -> EvalConfig:
        o = self.opts
        model_dir = require(o.path(o.model, LAYOUT.model), "assemble")   # its config.json gives the image size
        return EvalConfig(data=o.data, test_data=o.test_data, bundle=str(model_dir), classifier=o.classifier,
                          seed=o.seed, device=o.device)

    @cached_property
    def splits(self) -> tuple[Labelled, Labelled, list[str]]:
        """Train and test images (each in a seeded random order) and the class names."""
        return load_splits(self.eval_config, self.model.config.stage1.num_classes)

    def images(self, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` images uint8 ``[n, H, W, 3]`` and labels of ``split`` ("train" or "test")."""
        data = self.splits[0 if split == "train" else 1]
        if n > len(data):
            raise ValueError(f"{self.opts.data}: {len(data)} {split} images, fewer than the {n} asked")
        return as_uint8(data.x[:n]), data.y[:n].numpy()

    @cached_property
    def judge(self) -> Judge:
        """The Fashion-MNIST classifier of ``training.evaluate`` (trained and cached on first use)."""
        train, test, classes = self.splits
        clf, info = get_classifier(self.eval_config, train, test, classes, self.device)
        channels = self.model.config.channels
        return Judge(lambda x: classify(clf, from_uint8(x, channels), self.device), frechet_distance,
                     f"CNN classifier trained on {info['trained_on']}")

    @cached_property
    def encoder_source(self) -> str:
        """How the encoder was trained, as the ssl stage recorded it."""
        path = self.opts.path(self.opts.encoder, LAYOUT.encoder.path)
        return load_tensors(path)[1].get("source", "unknown") if path.is_file() else f"unknown ({path} not found)"


def images_text(ctx: Context) -> str:
    """E.g. "32x32 grey Fashion-MNIST images", for the findings."""
    c, data = ctx.model.config, ctx.opts.data
    name = "Fashion-MNIST" if data.startswith("fmnist") else Path(data).name
    return f"{c.image_size}x{c.image_size} {'grey' if c.channels == 1 else 'colour'} {name} images"


def batched(fn: Callable[[np.ndarray], Any], x: np.ndarray, batch: int) -> list[Any]:
    """``fn`` over ``x`` in batches (bounds memory on 10k-image inputs)."""
    return [fn(x[i: i + batch]) for i in range(0, len(x), batch)]


def probe_accuracy(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
    """Test accuracy of ``training.evaltools.linear_probe`` (logistic regression on standardised
    features) from feature arrays ``(x [N, d], labels [N])``."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    with torch.random.fork_rng():   # the probe's init draws from the global generator: fix it, leave it as it was
        torch.manual_seed(0)
        return linear_probe(t(train[0]).float(), t(train[1]), t(test[0]).float(), t(test[1]), lambda f: f)


def tile(images: np.ndarray, cols: int, size: int = 96) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` as one picture, ``cols`` images a row, each enlarged to at least
    ``size`` pixels (nearest neighbour), 2-pixel grey gaps."""
    images = np.stack([upscale(im, size) for im in images])
    n, h, w, c = images.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), 128, np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        out[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + k * (w + 2): 2 + k * (w + 2) + w] = im
    return out


def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


# -- the report --------------------------------------------------------------------------------------------
@dataclass
class Section:
    """One analysis's results: JSON data, a figure, markdown, and optional extra pictures."""

    key: str                       # file stem, one of ORDER
    title: str
    data: dict[str, Any]
    figure: go.Figure
    markdown: str                  # body: tables, the paper's numbers beside ours, the generated findings
    pictures: dict[str, np.ndarray] = field(default_factory=dict)   # file stem -> uint8 image


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if dataclasses.is_dataclass(v):
        return dataclasses.asdict(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def write_section(out: Path, s: Section, png: bool = True) -> list[Path]:
    """``<key>.json``, ``<key>.html`` (plotly.js from its CDN), ``<key>.png``,
    the extra pictures and ``<key>.md``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{s.key}.json", out / f"{s.key}.html", out / f"{s.key}.md"]
    paths[0].write_text(json.dumps(s.data, indent=2, default=_plain))
    s.figure.write_html(paths[1], include_plotlyjs="cdn")   # a 4.8 MB plotly.min.js per report is not worth committing; the PNG is the offline copy
    links = f"[interactive figure]({s.key}.html) · [data]({s.key}.json)"
    if png:
        # kaleido drives a headless Chromium (/usr/bin/chromium here) to render the PNG
        for attempt in range(3):   # kaleido's page can miss its own scripts on a loaded machine: try again
            try:
                s.figure.write_image(out / f"{s.key}.png", width=1000, height=s.figure.layout.height or 450, scale=1.5)
                break
            except Exception as err:
                if attempt == 2 or not type(err).__module__.startswith("kaleido"):
                    raise
        paths.append(out / f"{s.key}.png")
        links = f"![{s.title}]({s.key}.png)\n\n" + links
    for stem, img in s.pictures.items():
        Image.fromarray(img).save(out / f"{stem}.png")
        paths.append(out / f"{stem}.png")
    paths[2].write_text(f"## {s.title}\n\n{s.markdown.strip()}\n\n{links}\n")
    return paths


def write_readme(out: Path, name: str, header: str) -> Path:
    """``README.md``: a header, then every section file present, in the paper's order."""
    parts = [f"# DiGIT analyses: {name}\n\n{header.strip()}\n"]
    parts += [(out / f"{k}.md").read_text() for k in SECTIONS if (out / f"{k}.md").is_file()]
    path = out / "README.md"
    path.write_text("\n".join(parts))
    return path
