"""Table 4a at our scale: which kind of encoder induces a good tokenizer.

The paper (§4.5) induces tokenizers with K-Means from encoders trained with different
objectives - patch-level or global ("P"/"G"), reconstructive or discriminative ("R"/"D") - and
finds the discriminative ones generate far better (MAE P+R: FID 45.5; MoCo G+D 20.4; iBOT P+D
16.8; VQGAN 24.4). Here every tokenizer is K-Means with our K, fit on the same training images
(the VQGAN's own quantiser aside), and is measured on what needs no new GPT:

* the encoder's own linear probe on mean-pooled features (the paper's Acc@OL),
* a linear probe on its tokens (bag-of-tokens histograms: how much class the discrete tokens keep),
* Table 1's token change under noise, on the same noisy test images for every tokenizer.

Tokenizers: ours (the model's encoder + codebook); every ``--encoders LABEL=PATH`` (an ssl
artifact, its architecture read from the file); the same architecture at random initialisation
(the control); a reconstructive one - K-Means over the VQGAN encoder's continuous latents, an
autoencoder trained only to reproduce pixels; and the VQGAN's own ids. Generation quality per
encoder would need a stage 1 for each (about an hour on a CPU core); the ablation section
compares generation for our discriminative tokens against the VQ ones.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch

from digit_core.codebook import Codebook, fit_kmeans
from digit_core.config import DiGITConfig
from digit_core.metrics import SNR_LEVELS_DB, Encode, disc_encode, token_stability
from training.analyses.common import Context, Section, batched, fmt, images_text, table
from training.analyses.stability import MARGIN, kmeans_model, probe_and_usage, value_at
from training.files import load_tensors, require

PAPER = [  # Table 4a: SSL type, FID, IS, Acc@LP (probe of the AR model), Acc@OL (probe of the SSL model)
    {"tokenizer": "MAE", "type": "P+R", "fid": 45.51, "is": 18.39, "acc_lp": 31.40, "acc_ol": 75.8},
    {"tokenizer": "MoCo", "type": "G+D", "fid": 20.38, "is": 45.02, "acc_lp": 59.22, "acc_ol": 76.7},
    {"tokenizer": "iBOT", "type": "P+D", "fid": 16.81, "is": 57.88, "acc_lp": 61.10, "acc_ol": 76.0},
    {"tokenizer": "VQGAN", "type": "-", "fid": 24.38, "is": 30.93, "acc_lp": None, "acc_ol": None},
]
AT_DB = 10.0
"""The SNR the summary table quotes (every level is in the JSON and the figure)."""


def latent_encode(model, fit_images: np.ndarray, seed: int, batch: int) -> Encode:
    """The reconstructive tokenizer: K-Means (the model's K) over the VQGAN encoder's latents
    before quantisation, fit on ``fit_images``."""
    lat = np.concatenate(batched(lambda x: model.vq_encode(x)[1], fit_images, batch))
    book = Codebook(fit_kmeans(lat.reshape(-1, lat.shape[-1]), model.config.codebook.size, seed=seed)).to(model.device)

    def encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lat = model.vq_encode(x)[1]
        with torch.inference_mode():
            ids = book.assign(torch.from_numpy(np.ascontiguousarray(lat)).to(model.device))[0]
        return ids.cpu().numpy(), lat
    return encode


def control_label(stem: str, ours: str) -> str:
    """"random-init control", naming the stem when it is not our encoder's."""
    return "random-init control" + ("" if stem == ours else f" ({stem} stem)")


def parse_encoders(specs: tuple[str, ...]) -> list[tuple[str, str]]:
    """``LABEL=PATH`` items -> ``[(label, path)]``."""
    out = []
    for spec in specs:
        label, eq, path = spec.partition("=")
        if not eq or not label or not path:
            raise ValueError(f"--encoders takes LABEL=PATH items (e.g. 'contrastive=runs/x/ssl/encoder.safetensors'), "
                             f"got {spec!r}")
        out.append((label, path))
    return out


def run(ctx: Context) -> Section:
    o, model = ctx.opts, ctx.model
    K, V = model.config.codebook.size, model.config.vqgan.n_embed
    fit = ctx.images("train", o.n_control_fit)[0]
    test = ctx.images("test", o.n_stability)[0]
    train_p, test_p = ctx.images("train", o.n_probe_train), ctx.images("test", o.n_probe_test)

    # (label, how it was trained, encoder stem or None, tokenizer, K)
    rows: list[tuple[str, str, str | None, Encode, int]] = [
        ("ours", ctx.encoder_source, model.config.encoder.stem, disc_encode(model), K)]
    stems = [model.config.encoder.stem]
    for label, path in parse_encoders(o.encoders):
        tensors, meta = load_tensors(require(Path(path), "ssl"))
        enc = DiGITConfig.from_dict(meta["model"]).encoder
        other = kmeans_model(model, fit, o.seed, o.batch, enc, tensors)
        rows.append((label, meta.get("source", "unknown"), enc.stem, disc_encode(other), K))
        if enc.stem not in stems:
            stems.append(enc.stem)
    # one untrained control per architecture: a trained encoder is judged against its own
    for stem in stems:
        enc = dataclasses.replace(model.config.encoder, stem=stem)
        control = kmeans_model(model, fit, o.seed, o.batch, enc)
        rows.append((control_label(stem, model.config.encoder.stem), f"{stem}-stem ViT untrained (seed {o.seed})",
                     stem, disc_encode(control), K))
    rows.append(("VQGAN latents + K-Means", "reconstructive: the VQGAN's encoder, trained to reproduce pixels", None,
                 latent_encode(model, fit, o.seed, o.batch), K))
    rows.append(("VQGAN ids", "the VQGAN's own quantiser", None, model.vq_encode, V))

    snr = SNR_LEVELS_DB
    results = []
    for label, source, stem, encode, k in rows:
        stab = token_stability(encode, test, model.config.channels, snr, o.seed, o.batch)
        probe, usage = probe_and_usage(encode, k, train_p, test_p, o.batch)
        results.append({"tokenizer": label, "source": source, "stem": stem, "probe_features": probe["features"],
                        "probe_tokens": probe["tokens"], "change": stab["change"], "cos_sim": stab["cos_sim"],
                        "usage": usage})
    data = {"snr_db": list(snr), "num_images": len(test), "tokenizers": results, "paper": PAPER,
            "probe_images": {"train": len(train_p[0]), "test": len(test_p[0])}, "fit_images": len(fit),
            "codebook_size": K, "images": images_text(ctx)}
    return section(data)


def section(d: dict) -> Section:
    """The report section from its data (``ssl_type.json``): a figure of token change vs SNR per
    tokenizer, and the markdown."""
    fig = go.Figure()
    for r in d["tokenizers"]:
        fig.add_scatter(x=[str(s) for s in d["snr_db"]], y=r["change"], mode="lines+markers", name=r["tokenizer"])
    fig.update_layout(title=dict(text="Token change under noise per tokenizer (lower = more stable)", font=dict(size=14)),
                      height=420, xaxis=dict(title="SNR (dB)"), yaxis=dict(title="share of tokens changed", range=[0, 1]),
                      plot_bgcolor="white", margin=dict(l=10, r=10, t=40, b=10))
    fig.update_yaxes(gridcolor="#eee")
    return Section("ssl_type", "Which encoder makes the tokenizer (Table 4a)", d, fig, markdown(d))


def findings(d: dict) -> list[str]:
    """Plain sentences from the numbers."""
    rs = {r["tokenizer"]: r for r in d["tokenizers"]}
    at = lambda r: value_at(d, r["change"], AT_DB)
    controls = [r for r in d["tokenizers"] if r["tokenizer"].startswith("random-init control")]
    special = {"VQGAN latents + K-Means", "VQGAN ids"} | {r["tokenizer"] for r in controls}
    trained = [r for r in d["tokenizers"] if r["tokenizer"] not in special]
    recon = rs["VQGAN latents + K-Means"]
    best_tok = max(d["tokenizers"], key=lambda r: r["probe_tokens"])
    stablest = min(d["tokenizers"], key=at)
    out = [f"Most class information in the tokens: {best_tok['tokenizer']} (bag-of-tokens probe "
           f"{best_tok['probe_tokens']:.3f}); most stable at {AT_DB:g} dB: {stablest['tokenizer']} "
           f"({at(stablest):.3f} of tokens change)."]
    for r in trained:
        tok, stab = r["probe_tokens"] - recon["probe_tokens"], at(recon) - at(r)
        verdict = ("keeps more class information and is more stable, as the paper finds for discriminative encoders"
                   if tok > 0 and stab > 0 else
                   "keeps more class information but is less stable" if tok > 0 else
                   "is more stable but keeps less class information" if stab > 0 else
                   "is neither more informative nor more stable, unlike the paper")
        line = (f"{r['tokenizer']} vs the reconstructive tokenizer: token probe {r['probe_tokens']:.3f} vs "
                f"{recon['probe_tokens']:.3f}, change at {AT_DB:g} dB {at(r):.3f} vs {at(recon):.3f}: it {verdict}.")
        ctrl = next((c for c in controls if c["stem"] == r["stem"]), None)
        if ctrl is not None:
            gf, gt = r["probe_features"] - ctrl["probe_features"], r["probe_tokens"] - ctrl["probe_tokens"]
            verdict = ("training made both the features and the tokens more informative" if gf > MARGIN and gt > MARGIN else
                       "training improved the features but not what K-Means keeps of them: its tokens are no better "
                       "than untrained ones" if gf > MARGIN else "training did not make it more informative")
            line += (f" Against the same architecture untrained: features probe {r['probe_features']:.3f} vs "
                     f"{ctrl['probe_features']:.3f} ({gf * 100:+.1f} points), token probe {r['probe_tokens']:.3f} vs "
                     f"{ctrl['probe_tokens']:.3f} ({gt * 100:+.1f}): {verdict}.")
        out.append(line)
    if any("no better than untrained" in line for line in out):
        out.append("Likely reason where the tokens gained nothing: K-Means tokens are per patch, while a global "
                   "objective (contrastive on mean-pooled features) shapes the average of the patches, and our "
                   "patch-level DINO+iBOT run was too short to be trained at all (the paper, §4.5: patch-level "
                   "objectives make the better tokenizers).")
    out.append("Untrained controls are about as stable as trained encoders or more, so stability alone does not "
               "show an encoder's training: the probes against the same architecture untrained do.")
    out.append("Generation per encoder (the paper's FID column) is not measured here: each tokenizer needs its own "
               "stage 1; see the ablation section for discriminative vs VQ tokens, and the per-layer probe section "
               "for stage 1 over other encoders' tokens (Acc@LP) where such runs were given.")
    return out


def markdown(d: dict) -> str:
    rows = [[r["tokenizer"], r["source"], fmt(r["probe_features"]), fmt(r["probe_tokens"]), fmt(value_at(d, r["change"], AT_DB)),
             f"{r['usage']['used']}/{r['usage']['codes']}"] for r in d["tokenizers"]]
    paper = [[p["tokenizer"], p["type"], fmt(p["fid"], 2), fmt(p["acc_lp"], 1), fmt(p["acc_ol"], 1)] for p in d["paper"]]
    return (f"K-Means with K={d['codebook_size']} for every induced tokenizer, fit on the features of "
            f"{d['fit_images']} training images; probes: logistic regression, {d['probe_images']['train']} training / "
            f"{d['probe_images']['test']} test images; token change on {d['num_images']} test images ({d['images']}).\n\n"
            + table(["tokenizer", "encoder", "features probe (Acc@OL)", "bag-of-tokens probe",
                     f"token change at {AT_DB:g} dB", "codes used"], rows)
            + "\n\nPaper (ImageNet, Table 4a):\n\n"
            + table(["tokenizer", "type", "FID", "Acc@LP", "Acc@OL"], paper)
            + "\n\n" + "\n".join(f"- {s}" for s in findings(d)))
