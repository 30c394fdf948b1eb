"""Copy each finished stage's final weights out of a run, as float16, for committing.

A later stage can then be retrained, or the bundle re-exported, on another machine without
redoing the earlier stages: every copy keeps its metadata (the resolved model config, the
encoder's ``source``) and sits beside the run's own records (resolved config, metrics, log).
Float16 halves the bytes; the training scripts load the files into float32 modules, and
``digit_core.export --weights float16`` stores exactly these values.

    python -m training.publish --root runs/fmnist --out weights/fmnist [--stages ssl,kmeans,stage1,stage2]
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # run as a file, training/ would shadow the standard library
    raise SystemExit("run the stages as modules from the repository root: python -m training.publish --help")

import argparse
import shutil
from pathlib import Path

from training.files import atomic_save, load_tensors, require
from training.layout import LAYOUT

ARTIFACTS = {a.stage: a for a in LAYOUT.parts}   # stage -> its artifact; the copy goes to <out>/<name>/<file>
RECORDS = ("train_config.json", "metrics.jsonl", "train.log")


def publish(root: Path, out: Path, stage: str) -> Path:
    """``<root>/<stage>/<file>`` -> ``<out>/<name>/<file>`` in float16, with the run's records."""
    a = ARTIFACTS[stage]
    tensors, meta = load_tensors(require(root / a.path, stage))
    dst = out / a.name / a.file
    atomic_save({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, dst, meta)
    for rec in RECORDS:
        if (root / stage / rec).is_file():
            shutil.copyfile(root / stage / rec, dst.parent / rec)
    return dst


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="the experiment directory, e.g. runs/fmnist")
    p.add_argument("--out", required=True, help="where the float16 copies go, e.g. weights/fmnist")
    p.add_argument("--stages", default=",".join(ARTIFACTS), help=f"comma-separated, from {', '.join(ARTIFACTS)}")
    a = p.parse_args(argv)
    stages = [s for s in a.stages.split(",") if s]
    unknown = sorted(set(stages) - set(ARTIFACTS))
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; choose from {', '.join(ARTIFACTS)}")
    for s in stages:
        dst = publish(Path(a.root), Path(a.out), s)
        print(f"{s}: wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
