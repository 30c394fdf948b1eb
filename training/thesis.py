"""The tokenizer sweep behind the thesis report: one DiGIT (or VQ-AR) per tokenizer, equal budgets.

The paper's "unified perspective" says that the more stable a latent space, the better a plain
next-token model generates from it. To test the link itself, every tokenizer below gets the same
stage 1 (and, where its tokens are not VQ codes, the same stage 2) from ``training/thesis.yaml``,
on the same data; ``python -m training.analyses.thesis`` then measures each and writes the report.

    python -m training.thesis prepare ssl conv-vit-untrained     # tokenizer files (+ K-Means)
    python -m training.thesis train ssl --stages=stage1          # one lane of the sweep
    python -m training.thesis train ssl --stages=stage2,bundle   # the other
    python -m training.thesis records ssl --out=weights/thesis   # configs + metrics, for git

Each tokenizer's run is ``<root>/<name>`` (root from the recipe, ``--root`` overrides). Every
stage resumes or skips finished work when rerun (the stages' own rule), so after a kill rerun
the same command. ``prepare`` runs before the lanes of one tokenizer start (both read its files).
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # run as a file, training/ would shadow the standard library
    raise SystemExit("run the stages as modules from the repository root: python -m training.thesis --help")

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from digit_core.encoders import Encoder
from digit_core.presets import preset
from training.files import atomic_path, atomic_save, load_tensors
from training.layout import LAYOUT

RECIPE = "training/thesis.yaml"
VQGAN = "exported/fmnist/vqgan.safetensors"   # one VQGAN for every tokenizer: its codes are stage 2's target


@dataclass(frozen=True)
class Tokenizer:
    """One row of the sweep: where its encoder comes from (``encoder``) and the preset it runs in."""

    label: str
    model: str                  # the preset of the encoder's architecture (the GPT sizes are the same in all)
    encoder: str                # "vq" (VQGAN codes), "untrained", a bundle folder, or a weights folder
    seed: int = 0               # the untrained encoder's initialisation

    @property
    def is_vq(self) -> bool:
        return self.encoder == "vq"


TOKENIZERS = {
    "vq": Tokenizer("VQGAN codes (reconstructive; no stage 2)", "fmnist-cnn", "vq"),
    "ssl": Tokenizer("self-supervised CNN (the bundled model's)", "fmnist-cnn", "exported/fmnist"),
    "supervised": Tokenizer("label-trained patch ViT", "fmnist", "weights/fmnist-supervised"),
    "conv-vit-untrained": Tokenizer("untrained conv-stem ViT", "fmnist-conv", "untrained"),
    "vit-untrained": Tokenizer("untrained patch ViT", "fmnist", "untrained"),
    "cnn-untrained": Tokenizer("untrained CNN (the self-supervised CNN's control)", "fmnist-cnn", "untrained"),
}
STAGES = ("stage1", "stage2", "bundle")
RECORDS = ("train_config.json", "metrics.jsonl")


def stage(module: str, *args: str) -> None:
    """``python -m training.<module> <args>``, in its own process (each stage frees its memory)."""
    cmd = [sys.executable, "-m", f"training.{module}", *args]
    print("==", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


@dataclass(frozen=True)
class Sweep:
    """Where the runs go and what they share: the recipe, the VQGAN, per-run overrides (tests, other data)."""

    root: Path
    recipe: str = RECIPE
    vqgan: str = VQGAN
    model: str = ""                        # one preset for every tokenizer (e.g. a tiny one); "" = each its own
    sources: dict[str, str] | None = None  # tokenizer -> another bundle or weights folder for its encoder
    train_seed: int = 0                    # the GPTs' seed (init, data order); the tokenizer is seed 0's run's

    def tokenizer(self, name: str) -> Tokenizer:
        t = TOKENIZERS[name]
        src = (self.sources or {}).get(name, t.encoder)
        return Tokenizer(t.label, self.model or t.model, src, t.seed)

    def run_dir(self, name: str, train_seed: int | None = None) -> Path:
        """``<root>/<name>``, or ``<root>/<name>-seed<k>`` for another training seed."""
        k = self.train_seed if train_seed is None else train_seed
        return self.root / (name if k == 0 else f"{name}-seed{k}")

    def args(self, name: str) -> list[str]:
        """What every stage of this tokenizer's run is called with."""
        out = ["--config", self.recipe, f"--root={self.run_dir(name)}", f"--model={self.tokenizer(name).model}"]
        if self.train_seed:
            out.append(f"--seed={self.train_seed}")
            if not self.tokenizer(name).is_vq:   # the tokenizer is shared with the seed-0 run
                first = self.run_dir(name, 0)
                out += [f"--encoder={first / LAYOUT.encoder.path}", f"--codebook={first / LAYOUT.codebook.path}"]
        return out


def copy(src: Path, dst: Path) -> None:
    """``src`` to ``dst`` atomically (``files.atomic_path``): a kill leaves no half a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def prepare(sw: Sweep, name: str) -> None:
    """The tokenizer's ``ssl/encoder.safetensors`` and ``kmeans/codebook.safetensors`` under its run."""
    t, run = sw.tokenizer(name), sw.run_dir(name, 0)
    if t.is_vq or (run / LAYOUT.codebook.path).is_file():
        return
    if t.encoder == "untrained":
        cfg = preset(t.model)
        with torch.random.fork_rng():
            torch.manual_seed(t.seed)
            encoder = Encoder(cfg.encoder)
        kind = "CNN" if cfg.encoder.kind == "cnn" else f"{cfg.encoder.stem}-stem ViT"
        atomic_save(encoder.state_dict(), run / LAYOUT.encoder.path,
                    {"model": cfg.to_dict(), "objective": "untrained", "labels": False,
                     "source": f"{kind} untrained (random initialisation, seed {t.seed})"})
        seed0 = dataclasses.replace(sw, train_seed=0)
        stage("features", *seed0.args(name))
        stage("kmeans", *seed0.args(name))
    elif (Path(t.encoder) / "manifest.json").is_file():
        from training.unbundle import unbundle
        unbundle(t.encoder, run)
    else:   # a weights folder as training.publish writes it; the codebook last, as prepare checks it
        for a in (LAYOUT.encoder, LAYOUT.codebook):
            copy(Path(t.encoder) / a.name / a.file, run / a.path)


def train(sw: Sweep, name: str, stages: list[str]) -> None:
    """The stages of one tokenizer in order: stage 1, stage 2 (not for VQ codes), the bundle."""
    t, run, args = sw.tokenizer(name), sw.run_dir(name), sw.args(name)
    if not t.is_vq and not (sw.run_dir(name, 0) / LAYOUT.codebook.path).is_file():
        raise SystemExit(f"{sw.run_dir(name, 0)}: no tokenizer yet; run `python -m training.thesis prepare {name}` first")
    vq = ["--tokens=vq"] if t.is_vq else []
    if sw.train_seed:
        reuse_token_caches(sw.run_dir(name, 0), run)
    for s in stages:
        if s == "stage1":
            stage("stage1", *args, *vq, f"--vqgan={sw.vqgan}")
        elif s == "stage2" and not t.is_vq:
            compose_stage2_cache(run, sw.run_dir("vq", 0), run)
            stage("stage2", *args, f"--vqgan={sw.vqgan}")
        elif s == "bundle":
            stage("assemble", *args, *vq, f"--vqgan={sw.vqgan}", f"--name=thesis-{name}")
            model = run / (LAYOUT.model_vq if t.is_vq else LAYOUT.model)
            subprocess.run([sys.executable, "-m", "digit_core.export", "--model", str(model),
                            "--out", str(run / "bundle"), "--weights", "float16"], check=True)


def reuse_token_caches(first: Path, run: Path) -> None:
    """Hard-link seed 0's token caches into another seed's run: same data and tokenizer files, so
    the same cache key, and the stage uses them instead of tokenizing again (minutes per stage)."""
    for folder in (LAYOUT.stage1.stage, LAYOUT.stage1_vq.stage, LAYOUT.stage2.stage):
        for f in ("tokens.safetensors", "val_tokens.safetensors"):
            src, dst = first / folder / f, run / folder / f
            if src.is_file() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, dst)


def compose_stage2_cache(first: Path, vq_run: Path, run: Path) -> None:
    """Stage 2's token caches from two that already hold its rows: the disc tokens of this
    tokenizer's stage-1 cache and the VQ codes of the VQ run's, tokenized from the same images in
    the same order (the VQGAN encoder is the slow part: minutes per stage 2 saved). The key is the
    one stage 2 computes from the same pieces, so a stage 2 whose data, tokenizer or VQGAN
    differs still rebuilds its own. Rows align only if both caches were made with one batch size
    (the mirror images are interleaved batch by batch): checked, with the labels row by row."""
    sizes = {json.loads(c.read_text()).get("batch_size") for c in (first / LAYOUT.stage1.stage / "train_config.json",
             vq_run / LAYOUT.stage1_vq.stage / "train_config.json") if c.is_file()}
    if len(sizes) != 1:
        return
    for f in ("tokens.safetensors", "val_tokens.safetensors"):
        disc, vq, dst = first / LAYOUT.stage1.stage / f, vq_run / LAYOUT.stage1_vq.stage / f, run / LAYOUT.stage2.stage / f
        if dst.exists() or not (disc.is_file() and vq.is_file()):
            continue
        (a, ma), (b, mb) = load_tensors(disc), load_tensors(vq)
        ka, kb = ma["key"], mb["key"]
        if ka["data"] != kb["data"] or ka["flip"] != kb["flip"] or not torch.equal(a["label"], b["label"]):
            continue
        key = {"data": ka["data"], "tokenizers": {"disc": ka["tokenizers"]["disc"], "vq": kb["tokenizers"]["vq"]},
               "flip": ka["flip"]}
        atomic_save({"label": a["label"], "disc": a["disc"], "vq": b["vq"]}, dst, {"key": key, "composed_from": [str(disc), str(vq)]})
        print(f"== {dst}: composed from {disc} and {vq}", flush=True)


def records(run: Path, out: Path) -> None:
    """Copy each stage's ``train_config.json`` and ``metrics.jsonl`` to ``<out>/<run name>/<stage>/``."""
    for folder in sorted(p for p in run.iterdir() if p.is_dir()):
        for f in (folder / r for r in RECORDS):
            if f.is_file():
                copy(f, out / run.name / folder.name / f.name)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("prepare", "train", "records"))
    ap.add_argument("tokenizers", nargs="+", choices=sorted(TOKENIZERS))
    ap.add_argument("--config", default=RECIPE, help="the recipe (budgets, splits)")
    ap.add_argument("--root", default="", help="default the recipe's root")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"train: some of {','.join(STAGES)}")
    ap.add_argument("--out", default="weights/thesis", help="records: where the copies go")
    ap.add_argument("--vqgan", default=VQGAN, help="the VQGAN every run shares")
    ap.add_argument("--model", default="", help="one preset for every tokenizer instead of each its own")
    ap.add_argument("--source", action="append", default=[], metavar="NAME=PATH",
                    help="another bundle or weights folder for a tokenizer's encoder")
    ap.add_argument("--train_seed", type=int, default=0,
                    help="another seed of the GPTs, run in <root>/<name>-seed<k> on seed 0's tokenizer")
    a = ap.parse_args(argv)
    from training.config import RunConfig, parse_config
    sources = dict(s.split("=", 1) for s in a.source)
    if bad := sorted(set(sources) - set(TOKENIZERS)):
        raise SystemExit(f"--source names unknown tokenizers {bad}")
    root = Path(a.root or parse_config(RunConfig, ["--config", a.config]).root)
    sw = Sweep(root, a.config, a.vqgan, a.model, sources, a.train_seed)
    stages = [s for s in a.stages.split(",") if s]
    if bad := [s for s in stages if s not in STAGES]:
        raise SystemExit(f"unknown stages {bad}; choose from {', '.join(STAGES)}")
    for name in a.tokenizers:
        if a.command == "prepare":
            prepare(sw, name)
        elif a.command == "train":
            train(sw, name, stages)
        else:
            records(sw.run_dir(name), Path(a.out))


if __name__ == "__main__":
    main()
