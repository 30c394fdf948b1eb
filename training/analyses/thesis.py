"""The paper's thesis measured across tokenizers: is a more stable latent space easier to generate from?

Each run of the tokenizer sweep (``training.thesis``: equal stage-1 and stage-2 budgets) is
measured on ``fmnist:test`` (nothing is chosen from these figures) with one sampling rule for
all, ``SETTINGS``:

- stability: the paper's Table 1 (share of the stage-1 tokens that change, feature cosine
  similarity) at each SNR, with the SNR the tokenizer actually saw after clipping to [0, 1] and
  rounding, and again without clipping (float input, noise of exactly the asked power);
- information: a linear probe of the bag of tokens and of the mean-pooled features, and of each
  stage-1 layer's position-averaged hidden state (Figure 3b; first token the null class, so no
  label reaches it), beside raw pixels;
- modelling: stage 1's held-out loss (``fmnist:val``) in nats per token and per image;
- generation, for each of ``seeds``: ``n_per_class`` samples per class unguided (cfg_scale 1, the
  paper's DiGIT figures) and guided (cfg_scale ``guidance``): the share the evaluation's classifier
  recognises as the class asked for, and the Fréchet distance of its features to test images';
  completions from the top 50% and 12.5% of token rows (null class, no guidance), judged with
  the same rule for every model: the kept pixel rows are the real image's in both, so only what
  the model generated decides whether the classifier still sees the original's class.

    python -m training.analyses.thesis measure ssl vq [--root runs/thesis --records weights/thesis]
    python -m training.analyses.thesis report [--records weights/thesis --out reports/fmnist]

``measure`` writes ``<records>/<name>/measure.json`` (committed with the runs' records);
``report`` joins every one present into ``<out>/thesis.{json,md,html,png}``.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # run as a file: the repository root is not on the path
    raise SystemExit("run the analyses as modules from the repository root: python -m training.analyses.thesis --help")

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digit_core import layout
from digit_core.flows import keep_rows_for
from digit_core.metrics import SNR_LEVELS_DB, disc_encode, token_stability
from digit_core.pipeline import DiGIT, to_channels
from digit_core.runtime import load_bundle
from training.analyses.common import probe_accuracy
from training.data import as_uint8
from training.evaltools import (EvalConfig, classify, frechet_distance, frechet_interval, from_uint8, get_classifier,
                                load_splits, mean_interval)
from training.files import atomic_write_text
from training.layout import LAYOUT
from training.analyses.thesis_report import report
from training.thesis import TOKENIZERS, Sweep

SETTINGS = {"temperature": 1.0, "top_k": 100, "top_p": 1.0, "stage2_temperature": 1.0, "stage2_top_k": 0,
            "stage2_top_p": 0.8}
"""Every model samples with these (top-k 100 and stage-2 top-p 0.8, the bundled model's defaults)."""


def ci(hits: np.ndarray) -> list[float]:
    """Mean and bootstrap 95% interval of per-item hits."""
    return list(mean_interval(hits, n_boot=500, seed=0))


def fd_ci(feats: np.ndarray, ref: np.ndarray) -> list[float]:
    """Fréchet distance and its bootstrap 95% interval."""
    return list(frechet_interval(feats, ref, n_boot=100, seed=0))


def val_loss(run: Path, stage: str) -> float | None:
    """The last held-out loss a stage recorded in its ``metrics.jsonl``."""
    path = run / stage / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    losses = [r["val_loss"] for r in rows if "val_loss" in r]
    return losses[-1] if losses else None


def float_encode(model: DiGIT):
    """Stage 1's tokens and their features from float images ``[N, H, W, C]`` (unclipped noise)."""
    def encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = torch.from_numpy(x).float().permute(0, 3, 1, 2).to(model.device)
        with torch.inference_mode():
            if model.config.is_vq:   # the VQGAN may take 3 channels of a grey image, as VQEncoder gives them
                z = model.vqgan.encode_latent(to_channels(t, model.vqgan.cfg.in_channels)).permute(0, 2, 3, 1)
                ids = model.vqgan.quantize.nearest(z.reshape(-1, z.shape[-1])).view(z.shape[:3])
                return ids.cpu().numpy(), z.cpu().numpy()
            feats = model.encoder.features(to_channels(t, model.encoder.cfg.in_chans))
            return model.codebook.assign(feats)[0].cpu().numpy(), feats.cpu().numpy()
    return encode


def layer_probes(model: DiGIT, tokens_of, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                 batch: int) -> list[float]:
    """Linear probe of each stage-1 layer's position-averaged hidden state (first token: the null class)."""
    s1 = model.config.stage1

    @torch.inference_mode()
    def feats(x: np.ndarray) -> list[np.ndarray]:
        out = []
        for i in range(0, len(x), batch):
            codes = torch.from_numpy(tokens_of(x[i:i + batch]).reshape(len(x[i:i + batch]), -1)).long()
            idx = layout.stage1_input(s1, torch.full_like(codes[:, :1], s1.null_class_id), codes[:, :-1])
            out.append([h.float().mean(1).numpy() for h in model.stage1.hidden_states(idx)])
        return [np.concatenate([o[k] for o in out]) for k in range(len(out[0]))]

    a, b = feats(train[0]), feats(test[0])
    return [probe_accuracy((a[k], train[1]), (b[k], test[1])) for k in range(len(a))]


def ceiling(bundle, src: np.ndarray, judge, ref: np.ndarray, tokens_of) -> dict[str, Any]:
    """What stage 2 and the VQ decoder make of real test images' own tokens (``Flows.render``; for VQ codes the
    VQGAN's reconstruction): the share the judge still puts in the original's class, and the Fréchet distance
    to the test images. Generation from these tokens cannot do better than this."""
    stage2 = {k: v for k, v in SETTINGS.items() if k.startswith("stage2_")}
    out = np.concatenate([bundle.render(tokens_of(src[i:i + 500]), seed=i // 500, **stage2)
                          for i in range(0, len(src), 500)])
    f, p = judge(out)
    return {"n": len(src), "agreement": ci(p == judge(src)[1]), "fd": fd_ci(f, ref)}


def measure(name: str, o: argparse.Namespace) -> dict[str, Any]:
    run = Sweep(Path(o.root), train_seed=o.train_seed).run_dir(name)
    t0 = time.perf_counter()
    bundle = load_bundle(run / "bundle", threads=o.threads or None)
    model = DiGIT.load(run / (LAYOUT.model_vq if TOKENIZERS[name].is_vq else LAYOUT.model))
    cfg = bundle.config
    ecfg = EvalConfig(data=o.data, test_data=o.test_data, bundle=str(run / "bundle"), classifier=o.classifier,
                      device="cpu")
    train, test, classes = load_splits(ecfg, cfg.stage1.num_classes)
    clf, info = get_classifier(ecfg, train, test, classes, torch.device("cpu"))
    judge = lambda x: classify(clf, from_uint8(x, cfg.channels), torch.device("cpu"))
    test_u8, test_y = as_uint8(test.x), test.y.numpy()
    ref = np.concatenate([judge(test_u8[i:i + 1000])[0] for i in range(0, len(test_u8), 1000)])
    tokens_of = (lambda x: bundle.vq_encode(x)[0]) if cfg.is_vq else (lambda x: bundle.tokenize(x)[0])
    feats_of = (lambda x: bundle.vq_encode(x)[1]) if cfg.is_vq else (lambda x: bundle.tokenize(x)[2])
    r: dict[str, Any] = {"name": name, "run": run.name, "train_seed": o.train_seed, "label": TOKENIZERS[name].label,
                         "tokens": cfg.tokens,
                         "encoder": None if cfg.is_vq else {k: getattr(cfg.encoder, k)
                                                            for k in ("kind", "objective", "labels", "source")},
                         "settings": SETTINGS, "guidance": o.guidance, "seeds": o.seeds, "classifier": info}
    r["ceiling"] = ceiling(bundle, test_u8[: o.n_ceiling], judge, ref, tokens_of)
    if o.only_ceiling:   # add it to the run's record, keep the rest as measured
        old = json.loads((Path(o.records) / run.name / "measure.json").read_text())
        return old | {k: r[k] for k in ("name", "run", "train_seed", "ceiling")} | {
            "seconds_ceiling": round(time.perf_counter() - t0, 1)}

    # stability (x of the thesis)
    x = test_u8[: o.n_table1]
    encode = (lambda im: bundle.vq_encode(im)) if cfg.is_vq else disc_encode(bundle)
    r["stability"] = {"snr_db": list(SNR_LEVELS_DB), "n": len(x), "clipped": token_stability(encode, x, cfg.channels),
                      "unclipped": token_stability(float_encode(model), x, cfg.channels, clip=False)}

    # information
    tr_u8, tr_y = as_uint8(train.x[: o.n_probe_train]), train.y[: o.n_probe_train].numpy()
    te_u8, te_y = test_u8[: o.n_probe_test], test_y[: o.n_probe_test]
    K = cfg.stage1_vocab
    bag = lambda im: np.stack([np.bincount(t.ravel(), minlength=K) for t in tokens_of(im)]).astype(np.float32)
    pool = lambda im: feats_of(im).mean((1, 2))
    pixels = lambda im: im[..., 0].reshape(len(im), -1).astype(np.float32) / 255
    chunks = lambda f, im: np.concatenate([f(im[i:i + 500]) for i in range(0, len(im), 500)])
    r["information"] = {name_: probe_accuracy((chunks(f, tr_u8), tr_y), (chunks(f, te_u8), te_y))
                        for name_, f in (("bag_of_tokens", bag), ("features", pool), ("pixels", pixels))}
    r["information"]["stage1_layers"] = layer_probes(model, tokens_of, (tr_u8, tr_y), (te_u8, te_y), 250)

    # modelling
    s1 = LAYOUT.stage1_vq.stage if cfg.is_vq else LAYOUT.stage1.stage
    loss = val_loss(run, s1)
    n_tok = cfg.disc_grid ** 2   # the stage-1 grid (the VQ grid for VQ tokens)
    r["modelling"] = {"stage1_val_loss": loss, "nats_per_image": loss and loss * n_tok, "tokens_per_image": n_tok,
                      "stage2_val_loss": None if cfg.is_vq else val_loss(run, LAYOUT.stage2.stage)}

    # generation
    C = cfg.stage1.num_classes
    classes_ = np.repeat(np.arange(C), o.n_per_class)
    gen: dict[str, Any] = {}
    for label, g in (("unguided", 1.0), ("guided", o.guidance)):
        hits, feats, per_seed = [], [], []
        for s in o.seeds:
            imgs = np.concatenate([bundle.generate(class_ids=classes_[i:i + o.batch], seed=1000 * s + i // o.batch,
                                                   cfg_scale=g, **SETTINGS).images
                                   for i in range(0, len(classes_), o.batch)])
            f, p = judge(imgs)
            hits.append(p == classes_)
            feats.append(f)
            per_seed.append({"seed": s, "accuracy": float(hits[-1].mean()), "fd": frechet_distance(f, ref)})
        h, f = np.concatenate(hits), np.concatenate(feats)
        gen[label] = {"cfg_scale": g, "n": len(h), "accuracy": ci(h), "fd": fd_ci(f, ref), "per_seed": per_seed}
    comp = {}
    grid, S = cfg.disc_grid, cfg.image_size
    for pct in o.prefixes:
        keep = keep_rows_for(pct, grid)
        rows_px = keep * S // grid
        hits, per_seed = [], []
        for s in o.seeds:
            src = test_u8[: o.n_complete]
            out = np.concatenate([bundle.complete_many(src[i:i + o.batch], keep, seed=1000 * s + i // o.batch,
                                                       **SETTINGS).images for i in range(0, len(src), o.batch)])
            out[:, :rows_px] = src[:, :rows_px]   # the same kept pixels for every model: judge only what it made
            h = judge(out)[1] == judge(src)[1]
            hits.append(h)
            per_seed.append({"seed": s, "agreement": float(h.mean())})
        comp[str(pct)] = {"keep_rows": keep, "of_rows": grid, "n": int(sum(len(h) for h in hits)),
                          "agreement": ci(np.concatenate(hits)), "per_seed": per_seed}
    r["generation"], r["completion"] = gen, comp
    r["seconds"] = round(time.perf_counter() - t0, 1)
    return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("measure", "report"))
    ap.add_argument("tokenizers", nargs="*", help=f"measure: some of {', '.join(TOKENIZERS)}")
    ap.add_argument("--root", default="runs/thesis")
    ap.add_argument("--records", default="weights/thesis")
    ap.add_argument("--out", default="reports/fmnist")
    ap.add_argument("--data", default="fmnist", help="the training split (probe images; the classifier's)")
    ap.add_argument("--test_data", default="", help="default fmnist:test for fmnist (training.evaluate's rule)")
    ap.add_argument("--classifier", default="", help="default training.evaluate's cache")
    ap.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--n_per_class", type=int, default=100)
    ap.add_argument("--n_complete", type=int, default=300)
    ap.add_argument("--prefixes", type=lambda s: [float(v) for v in s.split(",")], default=[50.0, 12.5])
    ap.add_argument("--n_table1", type=int, default=1000)
    ap.add_argument("--n_probe_train", type=int, default=5000)
    ap.add_argument("--n_probe_test", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--train_seed", type=int, default=0,
                    help="measure <root>/<name>-seed<k> (training.thesis --train_seed)")
    ap.add_argument("--n_ceiling", type=int, default=3000, help="test images rendered from their own tokens")
    ap.add_argument("--only_ceiling", action="store_true", help="measure only the stage-2 ceiling, into the record")
    ap.add_argument("--no_png", action="store_true")
    o = ap.parse_args(argv)
    if o.command == "report":
        return report(o)
    if not o.tokenizers or (bad := sorted(set(o.tokenizers) - set(TOKENIZERS))):
        ap.error(f"measure takes some of {', '.join(TOKENIZERS)}" + (f"; unknown: {bad}" if o.tokenizers else ""))
    for name in o.tokenizers:
        r = measure(name, o)
        path = Path(o.records) / r["run"] / "measure.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(r, indent=2))
        print(f"wrote {path} ({r.get('seconds_ceiling', r['seconds']):.0f} s)")


if __name__ == "__main__":
    main()
