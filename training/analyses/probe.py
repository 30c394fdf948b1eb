"""Figure 3b: linear-probe accuracy of every stage-1 layer, for one or more codebook sizes.

Each real image's own discriminative tokens go through stage 1 teacher-forced, as in training:
``[first, t_1 .. t_{N-1}]``. The hidden states of each layer (0 = the embeddings) are averaged
over positions, as iGPT and the paper do, and a logistic regression is fit on training images
and scored on test images.

Labels must not leak in: in a class-conditional model every position attends to the class
token, so with the true class first the probe would read the label back (near 100% at every
layer, meaning nothing). The first token is therefore the null class - the token the model was
trained on for dropped labels, and the unconditional half of classifier-free guidance - or
``bos`` for an unconditional model; a conditional model without a null class is refused.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch

from digit_core import layout
from digit_core.config import DiGITConfig
from digit_core.pipeline import DiGIT
from training.analyses.common import Context, Section, batched, fmt, probe_accuracy, table
from training.files import load_strict, load_tensors, require
from training.layout import LAYOUT

PAPER = {"best_top1": 71.7, "model": "219M, 16 layers, K=8192 (Table 2)",
         "shape": "rises quickly after the first block, peaks in the middle layers and dips a little in the last "
                  "few; a larger K is higher at every layer (K=1024 < 4096 < 8192)"}
"""Figure 3b is a plot without numbers; its text and Table 2 give these."""


def label_free_first(cfg: DiGITConfig) -> tuple[int, str]:
    """The stage-1 first token that carries no label: ``(id, what it is)``."""
    s1 = cfg.stage1
    if s1.num_classes == 0:
        return s1.bos_id, "bos (unconditional model)"
    if s1.null_class_id is None:
        raise ValueError(f"{cfg.name}: class-conditional stage 1 without a null class; every position attends to "
                         f"the class token, so its hidden states would hand the probe the label")
    return s1.null_class_id, "null class (the label-dropout token)"


@torch.inference_mode()
def layer_features(model: DiGIT, images: np.ndarray, batch: int) -> list[np.ndarray]:
    """Position-averaged hidden states ``[N, d_model]`` of each stage-1 layer (``n_layer + 1``)."""
    s1 = model.config.stage1
    first = label_free_first(model.config)[0]

    def one(x: np.ndarray) -> list[np.ndarray]:
        codes = torch.from_numpy(model.tokenize(x)[0].reshape(len(x), -1)).to(model.device)
        idx = layout.stage1_input(s1, torch.full_like(codes[:, :1], first), codes[:, :-1])
        return [h.float().mean(1).cpu().numpy() for h in model.stage1.hidden_states(idx)]

    parts = batched(one, images, batch)
    return [np.concatenate([p[layer] for p in parts]) for layer in range(len(parts[0]))]


def encoder_kind(cfg: DiGITConfig) -> str:
    """A short name of how the encoder was trained: its recorded ``objective`` (e.g. "supervised",
    "vicreg_dense"), else its free-text source."""
    e = cfg.encoder
    return e.objective or e.source or "encoder of unknown training"


def probe_model(root: Path, device: torch.device) -> DiGIT:
    """A run's tokenizer and stage 1: its assembled ``<root>/model``, else - a probe needs no stage 2
    or VQGAN - its stage-1 artifact with the encoder and codebook its ``train_config.json`` names
    (so a run for another K needs only the kmeans and stage1 stages)."""
    if (root / LAYOUT.model).is_dir():
        return DiGIT.load(root / LAYOUT.model, device)
    s1 = root / LAYOUT.stage1.stage
    tensors, meta = load_tensors(require(s1 / LAYOUT.stage1.file, "stage1"))
    c = json.loads(require(s1 / "train_config.json", "stage1").read_text())
    model = DiGIT(DiGITConfig.from_dict(meta["model"]))
    load_strict(model.stage1, tensors, s1 / LAYOUT.stage1.file)
    encoder_path = Path(c["encoder"] or root / LAYOUT.encoder.path)
    encoder, encoder_meta = load_tensors(require(encoder_path, "ssl"))
    load_strict(model.encoder, encoder, encoder_path)
    model.config.encoder.source = encoder_meta.get("source", model.config.encoder.source)
    book = load_tensors(require(Path(c["codebook"] or root / LAYOUT.codebook.path), "kmeans"))[0]
    model.codebook.set_centroids(book["centroids"])
    return model.to(device)


def run(ctx: Context) -> Section:
    o = ctx.opts
    (x_tr, y_tr), (x_te, y_te) = ctx.images("train", o.n_probe_train), ctx.images("test", o.n_probe_test)
    models = [(o.path(o.model, LAYOUT.model), ctx.model)] + [(Path(r), probe_model(Path(r), ctx.device)) for r in o.probe_roots]
    rows = []
    for path, model in models:
        f_tr, f_te = layer_features(model, x_tr, o.batch), layer_features(model, x_te, o.batch)
        acc = [probe_accuracy((a, y_tr), (b, y_te)) for a, b in zip(f_tr, f_te)]
        rows.append({"model": str(path), "label": f"K={model.config.codebook.size}", "encoder": encoder_kind(model.config),
                     "codebook_size": model.config.codebook.size, "n_layer": model.config.stage1.gpt.n_layer,
                     "first_token": label_free_first(model.config)[1], "accuracy": acc,
                     "best_layer": int(np.argmax(acc))})
    ours = rows[0]["encoder"]   # the model's encoder first, then the other encoders' runs; each by K
    rows.sort(key=lambda r: (r["encoder"] != ours, r["codebook_size"]))
    if len({r["encoder"] for r in rows}) > 1:   # runs over other encoders: the paper's Acc@LP of Table 4a
        for r in rows:
            r["label"] += f", {r['encoder']}"
    data = {"models": rows, "probe_images": {"train": len(x_tr), "test": len(x_te)}, "paper": PAPER}
    fig = go.Figure()
    for r in rows:
        fig.add_scatter(x=list(range(len(r["accuracy"]))), y=r["accuracy"], mode="lines+markers", name=r["label"])
    fig.update_layout(title={"text": "Linear probe on each stage-1 layer (0 = embeddings)", "font": {"size": 14}},
                      height=420, xaxis={"title": "layer", "dtick": 1}, yaxis={"title": "test accuracy"},
                      plot_bgcolor="white", margin={"l": 10, "r": 10, "t": 40, "b": 10})
    fig.update_yaxes(gridcolor="#eee")
    return Section("probe", "Linear probe per stage-1 layer (Figure 3b)", data, fig, markdown(data))


def findings(d: dict) -> list[str]:
    out, off = [], []
    for r in d["models"]:
        acc, b, L = r["accuracy"], r["best_layer"], r["n_layer"]
        middle = 0.25 * L <= b <= 0.75 * L
        where = ("in the middle layers, as in the paper" if middle else
                 "at the last layer, unlike the paper's middle-layer peak" if b == L else
                 "early, unlike the paper's middle-layer peak" if b < 0.25 * L else
                 "in the upper layers, later than the paper's middle-layer peak")
        out.append(f"{r['label']}: best layer {b} of {L} ({acc[b]:.3f}), {where}; the blocks add "
                   f"{(acc[b] - acc[0]) * 100:+.1f} points over the embeddings ({acc[0]:.3f}), the last layer "
                   f"has {acc[-1]:.3f}.")
        if not middle:
            off.append(L)
    flat = [r for r in d["models"] if max(r["accuracy"]) - r["accuracy"][0] < 0.02]
    if flat:
        out.append(f"For {', '.join(r['label'] for r in flat)} the position-averaged embeddings (layer 0: a bag of "
                   f"tokens) already probe within 2 points of the best layer: the tokens themselves carry the class, "
                   f"so the blocks have little to add"
                   + (" - these tokens come from an encoder trained with the labels." if any(
                       r.get("encoder") == "supervised" for r in flat) else "."))
    if off:
        out.append(f"Likely reason: {'/'.join(map(str, sorted(set(off))))}-layer GPTs trained at our budget; the "
                   f"paper's middle-layer peak is that of 16-24-layer models trained for 200+ epochs, whose last "
                   f"layers specialise in predicting the next token.")
    main = [r for r in d["models"] if r.get("encoder") == d["models"][0].get("encoder")]
    if len(main) > 1:
        best = [max(r["accuracy"]) for r in main]
        rising = all(a < b for a, b in itertools.pairwise(best))
        out.append("Across codebook sizes the best accuracy " + ", ".join(
            f"{r['label']} {a:.3f}" for r, a in zip(main, best))
            + (" rises with K, as in the paper." if rising else " does not rise steadily with K, unlike the paper."))
    for r in d["models"]:
        same_k = [m for m in main if m["codebook_size"] == r["codebook_size"]]
        if r not in main and same_k:
            a, b = max(r["accuracy"]), max(same_k[0]["accuracy"])
            out.append(f"At K={r['codebook_size']}, stage 1 over the {r['encoder']} encoder's tokens probes {a:.3f} at "
                       f"best vs {b:.3f} over the {same_k[0]['encoder']} encoder's (the paper's Acc@LP, Table 4a: "
                       f"iBOT 61.1 > MoCo 59.2 > MAE 31.4).")
    return out


def markdown(d: dict) -> str:
    L = max(len(r["accuracy"]) for r in d["models"])
    rows = [[r["label"], *[fmt(a) for a in r["accuracy"]], *["–"] * (L - len(r["accuracy"]))] for r in d["models"]]
    return (f"Logistic regression on position-averaged hidden states ({d['probe_images']['train']} training / "
            f"{d['probe_images']['test']} test images), stage 1 teacher-forced on each image's own tokens with "
            f"the first token the {d['models'][0]['first_token']} - never the true class, which every position "
            f"attends to and would leak the label.\n\n"
            + table(["model", *[f"layer {i}" for i in range(L)]], rows)
            + f"\n\nPaper (ImageNet, {d['paper']['model']}): {d['paper']['shape']}; best {d['paper']['best_top1']}% "
              f"top-1.\n\n" + "\n".join(f"- {s}" for s in findings(d)))
