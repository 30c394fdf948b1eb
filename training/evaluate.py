"""Evaluate an exported bundle on a labelled dataset: the figures of its model card.

    python -m training.evaluate --bundle=exported/fmnist --data=fmnist --out=reports/fmnist-eval \\
        [--per_class=1000 --fid_n=10000 --completions=1000 --table1_n=2000 --probe_train=10000 \\
         --seed=0 --classifier=PATH --quick=true]
    python -m training.evaluate --config training/fmnist.yaml --bundle=exported/fmnist

Writes ``<out>/metrics.json`` and ``<out>/summary.md`` (tables for the model card, each figure
beside its target or reference), and logs the wall time of each part:

1. a small CNN trained here on the train split with the labels (cached at
   ``runs/eval/<data>-classifier.safetensors`` or ``classifier``, so reruns reuse it): its test accuracy;
2. ``per_class`` class-conditional samples per class with the bundle's default sampling
   settings: the share the classifier recognises as the requested class, overall and per class;
3. Fréchet distance in the classifier's penultimate features, ``fid_n`` samples vs ``fid_n``
   test images, beside the floor (train vs test images) and test images noised at 20 dB SNR;
4. half-image completion of ``completions`` test images (the top half of the token rows kept):
   the share whose predicted class matches the classifier's prediction on the original;
5. VQGAN reconstruction PSNR on test images;
6. linear probe of the tokenizer's mean-pooled features vs raw pixels (``training.evaltools.linear_probe``);
7. the paper's Table 1 (``digit_core.metrics.stability``) on ``table1_n`` test images.

Images come from ``training.data.load_data`` at the bundle's size and channels (Fashion-MNIST
padded to 32x32), both splits held in memory; ``test_data`` names the held-out split (default
``fmnist:test`` for fmnist, else a seeded fifth of ``data`` is held out). Everything is seeded:
a rerun gives the same figures.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # run as a file, training/ would shadow the standard library
    raise SystemExit("run the stages as modules from the repository root: python -m training.evaluate --help")

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from digit_core.metrics import PAPER_TABLE1, add_noise, stability
from digit_core.runtime import Bundle, load_bundle
from training.config import parse_config
from training.data import as_uint8
from training.evaltools import (EvalConfig, Labelled, classify, frechet_distance, frechet_interval, from_uint8,
                                get_classifier, held_out_spec, linear_probe, load_splits, mean_interval)

log = logging.getLogger("digit.evaluate")

TARGETS = {"classifier_accuracy": 0.92, "sample_accuracy": 0.90, "unguided_accuracy": 0.75, "completion_agreement": 0.85}
NOISY_REFERENCE_DB = 20.0
QUICK = {"per_class": 20, "fid_n": 500, "completions": 50, "table1_n": 100, "probe_train": 1000, "probe_test": 500}
"""``--quick=true`` caps the sizes at these (a smoke run in a few minutes on CPU)."""


# -- measurements ----------------------------------------------------------------------------------------

def generate(bundle: Bundle, n: int, batch: int, seed: int,
             **knobs: float | int | None) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """``n`` samples at the bundle's default settings (``knobs`` override some, e.g. ``cfg_scale=1``),
    classes interleaved (``i % C``, so any prefix is balanced); batch ``b`` has seed ``seed + b``.
    Returns uint8 images, their classes (None for an unconditional model) and the settings used."""
    C = bundle.config.stage1.num_classes
    classes = np.arange(n) % C if C else None
    out, settings = [], {}
    for b, i in enumerate(tqdm(range(0, n, batch), desc="samples", unit="batch", dynamic_ncols=True)):
        kw = {"class_ids": classes[i:i + batch]} if C else {"n": min(batch, n - i)}
        g = bundle.generate(**kw, seed=seed + b, **knobs)
        out.append(g.images)
        settings = g.settings.to_dict()
    return np.concatenate(out), classes, settings


def interval(values: np.ndarray, cfg: EvalConfig) -> list[float] | None:
    """The bootstrap 95% interval of the mean of ``values`` (per-sample hits); None for < 2 values."""
    return list(mean_interval(values, cfg.n_boot, cfg.seed)[1:]) if len(values) >= 2 else None


def fd_interval(feats: np.ndarray, ref: np.ndarray, cfg: EvalConfig) -> list[float]:
    """The bootstrap 95% interval of the Fréchet distance of ``feats`` to the fixed ``ref``."""
    return list(frechet_interval(feats, ref, cfg.n_boot, cfg.seed)[1:])


def completion_mode(bundle: Bundle) -> str:
    """What a completion is conditioned on: never the label when the model can do without it."""
    s1 = bundle.config.stage1
    if s1.num_classes == 0:
        return "unconditional model"
    return "null class (unconditional)" if s1.null_class_id is not None else "true class (the model has no null class)"


def complete_all(bundle: Bundle, test: Labelled, n: int, seed: int,
                 batch: int) -> tuple[np.ndarray, str, int, dict[str, Any]]:
    """One completion of each of the first ``n`` test images from its top half of token rows at
    the bundle's default settings (no guidance when the null class conditions them: there is no
    class to guide towards), in batches of ``batch`` (batch ``b`` seeded ``seed + b``). Returns
    the completions, what conditioned them, the rows kept and the sampling settings used."""
    keep = bundle.config.disc_grid // 2
    mode = completion_mode(bundle)
    out, settings = [], {}
    for b, i in enumerate(tqdm(range(0, n, batch), desc="completions", unit="batch", dynamic_ncols=True)):
        labels = test.y[i:min(n, i + batch)].tolist() if mode.startswith("true class") else None
        g = bundle.complete_many(as_uint8(test.x[i:min(n, i + batch)]), keep, class_ids=labels, seed=seed + b)
        out.append(g.images)
        settings = g.settings.to_dict()
    return np.concatenate(out), mode, keep, settings


def reconstruction_psnr(bundle: Bundle, x: torch.Tensor, batch: int) -> np.ndarray:
    """Per-image PSNR (dB, on [0, 1], over the bundle's channels) of VQ encode -> decode, the
    decoder's uint8 output against the uint8-quantised input; as the vqgan stage reports it."""
    out = []
    for i in range(0, len(x), batch):
        clean = x[i:i + batch]
        ids, _ = bundle.vq_encode(as_uint8(clean))
        rec = from_uint8(bundle.decode_vq(ids), clean.shape[1])
        out.append(10 * torch.log10(1 / (rec - clean).pow(2).flatten(1).mean(1).clamp_min(1e-10)))
    return torch.cat(out).numpy()


def encoder_features(bundle: Bundle, batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [N, C, S, S] -> [N, d]``: the features stage 1's tokens are read from, mean-pooled over
    the patches: the encoder's, or the VQGAN encoder's latents for a VQ-token model."""
    def features(x: np.ndarray) -> np.ndarray:
        return bundle.vq_encode(x)[1] if bundle.config.is_vq else bundle.tokenize(x)[2]
    return lambda x: torch.cat([torch.from_numpy(features(as_uint8(x[i:i + batch]))).mean((1, 2))
                                for i in range(0, len(x), batch)])


# -- the report --------------------------------------------------------------------------------------------
def check(cfg: EvalConfig) -> EvalConfig:
    """``quick`` applied, sizes validated."""
    if cfg.quick:
        cfg = dataclasses.replace(cfg, **{k: min(getattr(cfg, k), v) for k, v in QUICK.items()})
    small = {k: getattr(cfg, k) for k in (*QUICK, "batch_size", "classifier_epochs") if getattr(cfg, k) < 1}
    if small or cfg.fid_n < 2:
        raise ValueError(f"sizes must be positive (fid_n at least 2), got {small or {'fid_n': cfg.fid_n}}")
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = check(parse_config(EvalConfig, argv))
    out = Path(cfg.out or f"reports/{Path(cfg.bundle).name}-eval")
    timings: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(part: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        timings[part] = round(time.perf_counter() - t, 2)
        log.info(f"{part}: {timings[part]:.1f} s")

    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)      # linear_probe initialises its layers from the global generator
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if not Path(cfg.bundle).is_dir():
        raise FileNotFoundError(f"no bundle folder at {cfg.bundle}: export one with "
                                f"`python -m digit_core.export --model MODEL_DIR --out {cfg.bundle}`")
    bundle = load_bundle(cfg.bundle, device=cfg.device, threads=cfg.threads or None)
    mc, C = bundle.config, bundle.config.stage1.num_classes
    with timed("data"):
        train, test, classes = load_splits(cfg, C)
    if C and mc.class_names and mc.class_names != classes:
        log.warning(f"the bundle's class names {mc.class_names} differ from the data's {classes}; "
                    "classes are matched by index")
    log.info(f"{cfg.bundle} on {cfg.data}: {len(train)} train and {len(test)} test images "
             f"({mc.image_size}x{mc.image_size}, {mc.channels} channel(s)), {len(classes)} classes")
    report: dict[str, Any] = {"bundle": cfg.bundle, "model": mc.name, "tokens": mc.tokens, "data": cfg.data,
                              "test_data": held_out_spec(cfg) or f"a seeded fifth of {cfg.data}",
                              "config": dataclasses.asdict(cfg)}

    with timed("classifier"):
        clf, report["classifier"] = get_classifier(cfg, train, test, classes, device)
        test_feats, test_pred = classify(clf, test.x, device)
        report["classifier"] |= {"test_images": len(test), "test_accuracy": float((test_pred == test.y.numpy()).mean()),
                                 "target": TARGETS["classifier_accuracy"]}

    n_fd = min(cfg.fid_n, len(train), len(test))
    n_rec = cfg.per_class * C
    with timed("samples"):
        samples, sample_classes, report["sampling"] = generate(bundle, max(n_rec, n_fd), cfg.batch_size, cfg.seed)
        sample_feats, sample_pred = classify(clf, from_uint8(samples, mc.channels), device)
    if C:
        hit = sample_pred[:n_rec] == sample_classes[:n_rec]
        report["samples"] = {"n": n_rec, "accuracy": float(hit.mean()), "accuracy_ci": interval(hit, cfg),
                             "target": TARGETS["sample_accuracy"],
                             "per_class": {name: float(hit[sample_classes[:n_rec] == c].mean())
                                           for c, name in enumerate(classes)},
                             "per_class_ci": {name: interval(hit[sample_classes[:n_rec] == c], cfg)
                                              for c, name in enumerate(classes)}}
    else:
        report["samples"] = {"n": 0, "accuracy": None, "note": "unconditional model: no requested class"}

    with timed("frechet"):
        ref = test_feats[:n_fd]
        noisy = add_noise(test.x[:n_fd].numpy(), NOISY_REFERENCE_DB, np.random.default_rng(cfg.seed))
        report["frechet"] = {"n": n_fd, "features": "classifier penultimate layer (256-d)",
                             "samples": frechet_distance(sample_feats[:n_fd], ref),
                             "samples_ci": fd_interval(sample_feats[:n_fd], ref, cfg),
                             "train_floor": frechet_distance(classify(clf, train.x[:n_fd], device)[0], ref),
                             f"noisy_test_{NOISY_REFERENCE_DB:g}db": frechet_distance(
                                 classify(clf, torch.from_numpy(noisy).float(), device)[0], ref)}

    guided = C and report["sampling"].get("cfg_scale", 1.0) != 1.0
    if cfg.unguided and guided:   # the paper reports DiGIT without guidance: the same count, cfg_scale 1
        with timed("samples_unguided"):
            u_imgs, u_classes, u_settings = generate(bundle, max(n_rec, n_fd), cfg.batch_size, cfg.seed, cfg_scale=1.0)
            u_feats, u_pred = classify(clf, from_uint8(u_imgs, mc.channels), device)
            u_hit = u_pred[:n_rec] == u_classes[:n_rec]
            report["unguided"] = {"sampling": u_settings, "n": n_rec, "accuracy": float(u_hit.mean()),
                                  "accuracy_ci": interval(u_hit, cfg), "target": TARGETS["unguided_accuracy"],
                                  "frechet": frechet_distance(u_feats[:n_fd], ref),
                                  "frechet_ci": fd_interval(u_feats[:n_fd], ref, cfg)}

    with timed("completion"):
        n_comp = min(cfg.completions, len(test))
        comps, mode, keep, comp_sampling = complete_all(bundle, test, n_comp, cfg.seed, cfg.batch_size)
        same = classify(clf, from_uint8(comps, mc.channels), device)[1] == test_pred[:n_comp]
        report["completion"] = {"n": n_comp, "keep_rows": keep, "grid": mc.disc_grid, "conditioning": mode,
                                "sampling": comp_sampling, "agreement": float(same.mean()),
                                "agreement_ci": interval(same, cfg),
                                "target": TARGETS["completion_agreement"]}

    with timed("reconstruction"):
        psnr = reconstruction_psnr(bundle, test.x, cfg.batch_size)
        report["reconstruction"] = {"n": len(test), "psnr_db": float(psnr.mean()),
                                    "how": f"mean over images of per-image PSNR on [0, 1], {mc.channels} channel(s)"}

    with timed("linear_probe"):
        n_tr, n_te = min(cfg.probe_train, len(train)), min(cfg.probe_test, len(test))
        sets = (train.x[:n_tr], train.y[:n_tr], test.x[:n_te], test.y[:n_te])
        report["linear_probe"] = {"train": n_tr, "test": n_te,
                                  "encoder": linear_probe(*sets, encoder_features(bundle, cfg.batch_size)),
                                  "pixels": linear_probe(*sets, lambda x: x.flatten(1))}

    with timed("table1"):
        n_t1 = min(cfg.table1_n, len(test))
        report["table1"] = {"ours": stability(bundle, as_uint8(test.x[:n_t1]), seed=cfg.seed, batch=cfg.batch_size),
                            "paper": {k: list(v) for k, v in PAPER_TABLE1.items()}}

    timings["total"] = round(time.perf_counter() - t_start, 2)
    report["timings_s"] = timings
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "summary.md").write_text(summary(report))
    log.info(f"wrote {out / 'metrics.json'} and {out / 'summary.md'} ({timings['total']:.0f} s)")


def summary(r: dict[str, Any]) -> str:
    """The report as markdown tables for the model card."""
    def pct(v: float) -> str:
        return f"{100 * v:.1f}%"

    def vs(v: float, target: float) -> str:
        return f"≥ {pct(target)} ({'met' if v >= target else 'missed'})"

    def ci(d: dict[str, Any], key: str, fmt=pct) -> str:
        """``value [low, high]`` when the report has the interval (older reports do not)."""
        lo_hi = d.get(f"{key}_ci")
        return fmt(d[key]) + (f" [{fmt(lo_hi[0])}, {fmt(lo_hi[1])}]" if lo_hi else "")

    c, s, f, k = r["classifier"], r["samples"], r["frechet"], r["completion"]
    noisy_key = next(key for key in f if key.startswith("noisy_test_"))
    lines = [f"# Evaluation of `{r['bundle']}` ({r['model']}) on {r['data']}", "",
             f"Test images: {r['test_data']}. Intervals: bootstrap 95% over the samples / images. Classifier: a small CNN trained on the train split with the labels "
             f"({c['epochs']} epochs, `{c['path']}`). Sampling: the bundle's defaults "
             f"({', '.join(f'{a}={b}' for a, b in r['sampling'].items())}).", "",
             "| measure | ours | target / reference |", "|---|---|---|",
             f"| classifier test accuracy ({c['test_images']} test images) | {pct(c['test_accuracy'])} "
             f"| {vs(c['test_accuracy'], c['target'])} |"]
    if s["accuracy"] is not None:
        lines.append(f"| samples recognised as their class ({s['n']} samples) | {ci(s, 'accuracy')} "
                     f"| {vs(s['accuracy'], s['target'])} |")
    met = "met" if f["samples"] < f[noisy_key] else "missed"
    lines += [f"| Fréchet distance, classifier features ({f['n']} samples vs {f['n']} test images) "
              f"| {ci(f, 'samples', lambda v: f'{v:.3g}')} "
              f"| < {f[noisy_key]:.3g}, test images at {NOISY_REFERENCE_DB:g} dB SNR ({met}); "
              f"floor {f['train_floor']:.3g} (train vs test images) |",
              f"| half-image completion keeps the class ({k['n']} test images, top {k['keep_rows']} of {k['grid']} "
              f"token rows, {k['conditioning']}) | {ci(k, 'agreement')} | {vs(k['agreement'], k['target'])} |",
              f"| VQGAN reconstruction PSNR ({r['reconstruction']['n']} test images; "
              f"{r['reconstruction']['how']}) | {r['reconstruction']['psnr_db']:.2f} dB | |",
              f"| linear probe, tokenizer features mean-pooled ({r['linear_probe']['train']} train / "
              f"{r['linear_probe']['test']} test images) | {pct(r['linear_probe']['encoder'])} "
              f"| raw pixels {pct(r['linear_probe']['pixels'])} |"]
    u = r.get("unguided")
    if u:
        met = "met" if u["frechet"] < f[noisy_key] else "missed"
        lines += [f"| without guidance (cfg_scale 1): samples recognised as their class ({u['n']} samples) "
                  f"| {ci(u, 'accuracy')} | {vs(u['accuracy'], u['target'])} |",
                  f"| without guidance: Fréchet distance ({f['n']} samples) | {ci(u, 'frechet', lambda v: f'{v:.3g}')} "
                  f"| < {f[noisy_key]:.3g} ({met}) |"]
    if s["accuracy"] is not None:
        lines += ["", "Samples recognised as their class, per class:", "", "| class | accuracy |", "|---|---|"]
        cis = s.get("per_class_ci", {})
        lines += [f"| {name} | {pct(v)}" + (f" [{pct(cis[name][0])}, {pct(cis[name][1])}]" if cis.get(name) else "")
                  + " |" for name, v in s["per_class"].items()]
    t, p = r["table1"]["ours"], r["table1"]["paper"]
    keys = ("disc_change", "vq_change", "disc_cos_sim", "vq_cos_sim")
    lines += ["", f"Table 1: token change rate and feature cosine similarity under Gaussian noise, "
                  f"{t['num_images']} test images, ours / paper (ImageNet, DINOv2 vs VQGAN tokens):", "",
              "| SNR (dB) | disc. tokens changed | VQ tokens changed | disc. feature cos-sim | VQ latent cos-sim |",
              "|---|---|---|---|---|"]
    lines += [f"| {snr:g} | " + " | ".join(("—" if t[key] is None else f"{t[key][i]:.3f}") + f" / {p[key][i]:.3f}"
                                         for key in keys) + " |"
              for i, snr in enumerate(t["snr_db"])]
    if r.get("tokens") == "vq":
        lines += ["", "A VQ-token model (the VQ-AR baseline): no discriminative tokens (—); its linear probe reads "
                      "the VQGAN encoder's latents."]
    lines += ["", "Wall time (s): " + ", ".join(f"{a} {b:.0f}" if b >= 1 else f"{a} {b:.2f}"
                                                 for a, b in r["timings_s"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main()
