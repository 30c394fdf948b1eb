"""Choose a bundle's default sampling settings on the validation split.

    python -m training.sampling_sweep --bundle=exported/fmnist --data=fmnist:fit --test_data=fmnist:val \\
        --cfg_scales=[1,1.5,2.5,3.5] --top_ks=[0,100] --per_class=100 --out=reports/fmnist-eval/sampling_sweep.json

Every (guidance scale, top-k) pair of the grid draws ``per_class`` class-conditional samples
per class through the runtime (the other knobs at the bundle's defaults; scale 1 and top-k 0
are "off"), judged by ``training.evaluate``'s classifier trained on ``data`` (here the training
part of the train split) against ``test_data`` (the validation part): the share recognised as
their class and the Fréchet distance to the validation images, each with a bootstrap 95%
interval. The test split is not read.

The rule that picks the default: the lowest Fréchet distance among the settings whose class
accuracy reaches ``min_accuracy``; when none does, the highest class accuracy. Guidance trades
diversity for fidelity, so the most guided setting is rarely the best by both measures.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # run as a file, training/ would shadow the standard library
    raise SystemExit("run the stages as modules from the repository root: python -m training.sampling_sweep --help")

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from digit_core.metrics import bootstrap_ci
from digit_core.runtime import load_bundle
from training.config import parse_config
from training.evaltools import EvalConfig, classify, frechet_distance, from_uint8, get_classifier, load_splits
from training.files import atomic_write_text


@dataclass
class SweepConfig(EvalConfig):
    stage: ClassVar[str] = "sampling_sweep"
    data: str = "fmnist:fit"
    test_data: str = "fmnist:val"
    per_class: int = 100
    cfg_scales: tuple[float, ...] = (1.0, 1.5, 2.5, 3.5)   # guidance scales; 1 = off
    top_ks: tuple[int, ...] = (0, 100)                    # 0 = off
    min_accuracy: float = 0.90
    n_boot: int = 200


def choose(rows: list[dict[str, Any]], min_accuracy: float) -> dict[str, Any]:
    """The lowest-FD row among those reaching ``min_accuracy``, else the most accurate one."""
    ok = [r for r in rows if r["class_accuracy"] >= min_accuracy]
    return min(ok, key=lambda r: r["fd"]) if ok else max(rows, key=lambda r: r["class_accuracy"])


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SweepConfig, argv)
    t0 = time.perf_counter()
    bundle = load_bundle(cfg.bundle, device="cpu", threads=cfg.threads or None)
    C = bundle.config.stage1.num_classes
    if not C:
        raise SystemExit(f"{cfg.bundle} is unconditional: there is no guidance or class accuracy to sweep")
    train, val, classes = load_splits(cfg, C)
    device = torch.device("cpu")
    clf, info = get_classifier(cfg, train, val, classes, device)
    ch = bundle.config.channels
    val_feats = classify(clf, val.x, device)[0]
    classes_of = np.arange(cfg.per_class * C) % C
    rows = []
    for scale in cfg.cfg_scales:
        for k in cfg.top_ks:
            t = time.perf_counter()
            imgs, settings = [], {}
            for b, i in enumerate(range(0, len(classes_of), cfg.batch_size)):
                g = bundle.generate(classes_of[i:i + cfg.batch_size].tolist(), seed=cfg.seed + b, cfg_scale=scale,
                                    top_k=k)
                imgs.append(g.images)
                settings = g.settings.to_dict()
            feats, pred = classify(clf, from_uint8(np.concatenate(imgs), ch), device)
            hit = pred == classes_of
            acc = bootstrap_ci(lambda i: hit[i].mean(), len(hit), n_boot=cfg.n_boot, seed=cfg.seed)
            fd = bootstrap_ci(lambda i: frechet_distance(feats[i], val_feats), len(feats), n_boot=cfg.n_boot,
                              seed=cfg.seed, method="normal")   # resampling inflates an FD, not its spread
            rows.append({"cfg_scale": scale, "top_k": k, "settings": settings, "class_accuracy": acc[0],
                         "class_accuracy_ci": acc[1:], "fd": fd[0], "fd_ci": fd[1:],
                         "seconds": round(time.perf_counter() - t, 1)})
            print(f"cfg_scale {scale:g} top-k {k}: class accuracy {acc[0]:.3f} [{acc[1]:.3f}, {acc[2]:.3f}], "
                  f"FD {fd[0]:.2f} [{fd[1]:.2f}, {fd[2]:.2f}] ({rows[-1]['seconds']:.0f} s)", flush=True)
    best = choose(rows, cfg.min_accuracy)
    out = {"bundle": cfg.bundle, "judge": {"data": cfg.data, "test_data": cfg.test_data, **info},
           "per_class": cfg.per_class, "samples_per_setting": len(classes_of), "seed": cfg.seed,
           "rule": f"lowest FD among settings with class accuracy >= {cfg.min_accuracy}, else the most accurate",
           "rows": rows, "chosen": {"cfg_scale": best["cfg_scale"], "top_k": best["top_k"]},
           "seconds": round(time.perf_counter() - t0, 1)}
    path = Path(cfg.out or Path("reports") / f"{Path(cfg.bundle).name}-eval" / "sampling_sweep.json")
    atomic_write_text(path, json.dumps(out, indent=2))
    print(f"chosen: cfg_scale {best['cfg_scale']:g}, top-k {best['top_k']}; wrote {path}")


if __name__ == "__main__":
    main()
