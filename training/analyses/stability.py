"""Table 1 with a control: how often tokens change under pixel noise, and what tells a trained
tokenizer from an untrained one.

Stability alone cannot show that the encoder's training mattered: K-Means over a random-init
ViT's features also gives tokens that noise rarely flips (4x4-pixel patches average the noise
away). So beside our discriminative and VQ tokens we measure a control (the same ViT at random
initialisation + K-Means of the same K, sharing our VQGAN) and, for every tokenizer, a linear
probe on its tokens (bag-of-tokens histograms) and on its continuous features (mean-pooled).
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from digit_core.codebook import fit_kmeans, usage_stats
from digit_core.config import EncoderConfig
from digit_core.metrics import PAPER_TABLE1, Encode, disc_encode, stability
from digit_core.pipeline import DiGIT
from digit_core.viz import stability_figure
from training.analyses.common import Context, Section, batched, fmt, images_text, probe_accuracy, table
from training.files import load_strict

SAME = 0.05
"""Token-change rates within this of each other count as "about as stable"."""
MARGIN = 0.02
"""A probe lead above this (2 points of accuracy) counts as separating two tokenizers."""


def kmeans_model(model: DiGIT, fit_images: np.ndarray, seed: int, batch: int, encoder: EncoderConfig | None = None,
                 encoder_state: dict[str, torch.Tensor] | None = None) -> DiGIT:
    """``model`` with another encoder - ``encoder``/``encoder_state``, by default ``model``'s
    architecture at (seeded) random initialisation, the control - and a K-Means codebook of the
    same K fit on that encoder's features of ``fit_images``. The VQGAN and both GPTs stay
    ``model``'s, so the VQ side is exactly ours."""
    cfg = copy.deepcopy(model.config)
    if encoder is not None:
        cfg.encoder = dataclasses.replace(encoder, image_size=cfg.image_size)
    with torch.random.fork_rng():   # a seeded init that leaves the global generator as it was
        torch.manual_seed(seed)
        other = DiGIT(cfg.validate())
    other.load_state_dict({k: v for k, v in model.own_state_dict().items()
                           if not k.startswith(("encoder.", "codebook."))}, strict=False)
    if encoder_state is not None:
        load_strict(other.encoder, encoder_state, "the encoder state")
    other.to(model.device)
    feats = np.concatenate(batched(lambda x: other.tokenize(x)[2], fit_images, batch))
    other.codebook.set_centroids(fit_kmeans(feats.reshape(-1, feats.shape[-1]), model.config.codebook.size, seed=seed))
    return other


def representations(encode: Encode, images: np.ndarray, batch: int, K: int) -> dict[str, np.ndarray]:
    """Per image: ``tokens`` (normalised histogram of its token ids ``[N, K]``), ``features``
    (mean-pooled continuous features ``[N, d]``) and the raw ``ids``."""
    def one(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, feats = encode(x)
        return ids.reshape(len(x), -1), feats.reshape(len(x), -1, feats.shape[-1]).mean(1)
    parts = batched(one, images, batch)
    ids = np.concatenate([p[0] for p in parts])
    hist = np.stack([np.bincount(r, minlength=K) for r in ids]).astype(np.float32) / ids.shape[1]
    return {"ids": ids, "tokens": hist, "features": np.concatenate([p[1] for p in parts])}


def probe_and_usage(encode: Encode, K: int, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                    batch: int) -> tuple[dict[str, float], dict[str, float]]:
    """Linear-probe accuracy on a tokenizer's tokens (bag of tokens) and on its mean-pooled
    features, trained on ``train`` images and scored on ``test``; and its code usage on ``test``."""
    tr, te = (representations(encode, x, batch, K) for x in (train[0], test[0]))
    probe = {k: probe_accuracy((tr[k], train[1]), (te[k], test[1])) for k in ("tokens", "features")}
    u = usage_stats(te["ids"], K)
    return probe, {"codes": K, "used": u["used"], "perplexity": u["perplexity"]}


def run(ctx: Context) -> Section:
    o, model = ctx.opts, ctx.model
    images = ctx.images("test", o.n_stability)[0]
    control = kmeans_model(model, ctx.images("train", o.n_control_fit)[0], o.seed, o.batch)
    ours, ctrl = (stability(f, images, seed=o.seed, batch=o.batch) for f in (model, control))

    # The linear probe, trained on training images and scored on test images, per tokenizer.
    train, test = ctx.images("train", o.n_probe_train), ctx.images("test", o.n_probe_test)
    K, V = model.config.codebook.size, model.config.vqgan.n_embed
    tokenizers = {"ours": (disc_encode(model), K), "control": (disc_encode(control), K), "vq": (model.vq_encode, V)}
    probe: dict[str, dict[str, float]] = {}
    usage: dict[str, dict[str, float]] = {}
    for name, (encode, k) in tokenizers.items():
        probe[name], usage[name] = probe_and_usage(encode, k, train, test, o.batch)
    (x_tr, y_tr), (x_te, y_te) = train, test
    flat = lambda x: x[..., : model.config.channels].reshape(len(x), -1).astype(np.float32) / 255.0
    probe["pixels"] = {"features": probe_accuracy((flat(x_tr), y_tr), (flat(x_te), y_te))}

    data = {"snr_db": list(ours["snr_db"]), "num_images": ours["num_images"], "ours": ours,
            "control": {k: ctrl[k] for k in ("disc_change", "disc_cos_sim")},
            # same VQGAN, same noise: the control's VQ curve must equal ours (a check on the set-up)
            "control_vq_matches": bool(np.allclose(ctrl["vq_change"], ours["vq_change"])),
            "paper": PAPER_TABLE1, "probe": probe, "code_usage": usage,
            "probe_images": {"train": len(x_tr), "test": len(x_te)},
            "control_fit_images": o.n_control_fit, "encoder_source": ctx.encoder_source,
            "images": images_text(ctx)}
    fig = stability_figure(data["snr_db"], ours["vq_change"], ours["disc_change"], height=450)
    fig.add_scatter(x=[str(s) for s in data["snr_db"]], y=list(ctrl["disc_change"]), mode="lines+markers",
                    name="Disc. tokens, random-init encoder (control)", line={"color": "#2ca02c", "dash": "dash"})
    return Section("stability", "Stability of the latent space (Table 1) with a random-init control", data, fig,
                   markdown(data))


def value_at(data: dict, series: list[float], snr: float) -> float:
    """The value of ``series`` at the SNR nearest to ``snr``."""
    return series[int(np.argmin(np.abs(np.asarray(data["snr_db"]) - snr)))]


def findings(d: dict) -> list[str]:
    """Plain sentences from the numbers: where we agree with the paper, where not, and why."""
    ours, ctrl, paper, probe, use = d["ours"], d["control"], d["paper"], d["probe"], d["code_usage"]
    disc, vq, c = (np.asarray(x) for x in (ours["disc_change"], ours["vq_change"], ctrl["disc_change"]))
    n, wins = len(disc), int((disc < vq).sum())
    at10 = lambda s: value_at(d, list(s), 10.0)
    out = []
    order = ("as in the paper, whose discriminative tokens change less at every SNR" if wins == n else
             "unlike the paper, whose discriminative tokens change less at every SNR")
    out.append(f"Our discriminative tokens change less than our VQ tokens at {wins} of {n} noise levels "
               f"(10 dB: {at10(disc):.3f} vs {at10(vq):.3f}; paper {at10(paper['disc_change']):.3f} vs "
               f"{at10(paper['vq_change']):.3f}), {order}.")
    if wins < n:
        out.append(f"Likely reason: token change depends on how finely a codebook cuts its space - our "
                   f"discriminative tokens use {use['ours']['used']} of {use['ours']['codes']} codes on these "
                   f"images (perplexity {use['ours']['perplexity']:.0f}), the VQ tokens {use['vq']['used']} of "
                   f"{use['vq']['codes']} (perplexity {use['vq']['perplexity']:.0f}) - and on the data: "
                   f"{d['images']}, not 256x256 ImageNet photos.")
    gap = float(np.mean(c - disc))
    verdict = ("about as stable as" if abs(gap) <= SAME else "less stable than" if gap > 0 else "more stable than")
    out.append(f"The random-init control (same ViT untrained + K-Means, K={use['control']['codes']}) is {verdict} "
               f"the trained encoder (10 dB: {at10(c):.3f} vs {at10(disc):.3f}; mean difference {gap:+.3f} "
               f"over the {n} levels; it uses {use['control']['used']} codes, perplexity "
               f"{use['control']['perplexity']:.0f})"
               + (", so stability alone does not show that the encoder's training mattered." if gap <= SAME else
                  ", so here training did make the tokens more stable."))
    dt, df = probe["ours"]["tokens"] - probe["control"]["tokens"], probe["ours"]["features"] - probe["control"]["features"]
    sep = "separates them" if min(dt, df) > MARGIN else "does not clearly separate them"
    out.append(f"The linear probe {sep}: trained tokens {probe['ours']['tokens']:.3f} vs control tokens "
               f"{probe['control']['tokens']:.3f} ({dt * 100:+.1f} points), trained features "
               f"{probe['ours']['features']:.3f} vs control features {probe['control']['features']:.3f} "
               f"({df * 100:+.1f} points); VQ tokens {probe['vq']['tokens']:.3f}, raw pixels "
               f"{probe['pixels']['features']:.3f}. Our encoder: {d['encoder_source']}"
               + (" - trained with the labels, so part of its probe lead is supervision, not self-supervision."
                  if "label" in d["encoder_source"] else "."))
    cd, cv = np.asarray(ours["disc_cos_sim"]), np.asarray(ours["vq_cos_sim"])
    out.append(f"Feature cosine similarity to the clean image stays higher for the discriminative features at "
               f"{int((cd > cv).sum())} of {n} levels (10 dB: {at10(cd):.3f} vs {at10(cv):.3f}; paper "
               f"{at10(paper['disc_cos_sim']):.3f} vs {at10(paper['vq_cos_sim']):.3f}).")
    if not d["control_vq_matches"]:
        out.append("Warning: the control's VQ curve differs from ours although both share the VQGAN and the noise.")
    return out


def markdown(d: dict) -> str:
    ours, ctrl, paper = d["ours"], d["control"], d["paper"]
    rows = [[f"{s:g}", fmt(ours["disc_change"][i]), fmt(ctrl["disc_change"][i]), fmt(ours["vq_change"][i]),
             fmt(paper["disc_change"][i]), fmt(paper["vq_change"][i]), fmt(ours["disc_cos_sim"][i]),
             fmt(ours["vq_cos_sim"][i]), fmt(paper["disc_cos_sim"][i]), fmt(paper["vq_cos_sim"][i])]
            for i, s in enumerate(d["snr_db"])]
    change = table(["SNR dB", "disc change (ours)", "disc change (control)", "VQ change (ours)", "disc (paper)",
                    "VQ (paper)", "disc cos (ours)", "VQ cos (ours)", "disc cos (paper)", "VQ cos (paper)"], rows)
    p = d["probe"]
    probe = table(["tokenizer", "bag-of-tokens probe", "mean-pooled features probe"],
                  [["trained encoder + K-Means (ours)", fmt(p["ours"]["tokens"]), fmt(p["ours"]["features"])],
                   ["random-init encoder + K-Means (control)", fmt(p["control"]["tokens"]), fmt(p["control"]["features"])],
                   ["VQGAN (ours)", fmt(p["vq"]["tokens"]), fmt(p["vq"]["features"])],
                   ["raw pixels", "–", fmt(p["pixels"]["features"])]])
    return (f"{d['num_images']} test images, Gaussian pixel noise per image at each SNR (paper: ImageNet, "
            f"DINOv2 K=8192 vs VQGAN). Token change: share of positions whose token differs from the clean "
            f"image's (lower = more stable); cos: cosine similarity of the continuous features.\n\n{change}\n\n"
            f"Linear probe (logistic regression, {d['probe_images']['train']} training / "
            f"{d['probe_images']['test']} test images) on each tokenizer's output:\n\n{probe}\n\n"
            + "\n".join(f"- {s}" for s in findings(d)))
