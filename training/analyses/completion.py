"""Figure 4b: complete real test images from the top 12.5-75% of their token rows, with the
discriminative tokenizer (DiGIT: its tokens' prefix, stage 1 continues, stage 2 renders) and
with the VQ tokenizer (the ablation's VQ-only model continuing a prefix of VQ tokens).

Both continue unconditionally (the null class, no guidance), as ``Flows.complete`` does without
a class, so the prefix is all they know, at their models' default sampling settings. Quality:
the share of completions that the classifier puts in the class it gives the original, and the
Fréchet distance between the classifier's features of the completions and of the originals.
"""
from __future__ import annotations

import numpy as np
from plotly.subplots import make_subplots

from digit_core.flows import Flows, keep_rows_for
from training.analyses.common import CLOSE, Context, Section, fmt, images_text, table, tile

PAPER = ("FID falls for both tokenizers as the prefix grows; from 75% down to 12.5% of the image the VQGAN "
         "tokenizer's completions stop following the prompt while the discriminative tokenizer's FID stays low "
         "(ImageNet 256x256, 219M models; the figure gives no numbers)")
MODELS = {"digit": "discriminative tokens (DiGIT)", "vq": "VQ tokens"}


def complete_all(flows: Flows, images: np.ndarray, keep_rows: int, seed: int, batch: int) -> np.ndarray:
    """One completion of each image from its top ``keep_rows`` token rows, without a class (the
    null class), at the model's default sampling settings; batch ``b`` uses seed ``seed + b``."""
    s1 = flows.config.stage1
    if s1.num_classes and s1.null_class_id is None:
        raise ValueError(f"{flows.config.name} has no null class: its completions would have to be told the label")
    return np.concatenate([flows.complete_many(images[i: i + batch], keep_rows, seed=seed + b).images
                           for b, i in enumerate(range(0, len(images), batch))])


def run(ctx: Context) -> Section:
    o, judge = ctx.opts, ctx.judge
    flows = {"digit": ctx.model, "vq": ctx.vq_model}
    grids = {k: f.config.disc_grid for k, f in flows.items()}
    if len(set(grids.values())) != 1:
        raise ValueError(f"the two models' token grids differ ({grids}): prefixes would not be comparable")
    grid = grids["digit"]
    originals = ctx.images("test", o.n_complete)[0]
    f_orig, c_orig = judge.measure(originals)
    keep = [keep_rows_for(p, grid) for p in o.prefixes]
    results = {k: {"agreement": [], "fd": []} for k in flows}
    shown: dict[str, list[np.ndarray]] = {k: [] for k in flows}
    for rows in keep:
        for k, f in flows.items():
            done = complete_all(f, originals, rows, o.seed, o.batch)
            feats, pred = judge.measure(done)
            results[k]["agreement"].append(float((pred == c_orig).mean()))
            results[k]["fd"].append(float(judge.frechet(feats, f_orig)))
            shown[k].append(done[:6])
    data = {"prefix_percent": list(o.prefixes), "keep_rows": keep, "grid": grid,
            "kept_fraction": [r / grid for r in keep], "n_images": len(originals), "judge": judge.name,
            "images": images_text(ctx),
            **results, "paper": PAPER}

    x = [f"{p:g}% ({r}/{grid} rows)" for p, r in zip(o.prefixes, keep)]
    fig = make_subplots(1, 2, subplot_titles=("FD to the originals, classifier features ↓",
                                              "Classified like the original ↑"))
    for k, color in (("digit", "#1f77b4"), ("vq", "#d62728")):
        for col, metric in ((1, "fd"), (2, "agreement")):
            fig.add_scatter(x=x, y=results[k][metric], name=MODELS[k], mode="lines+markers", line=dict(color=color),
                            showlegend=col == 1, row=1, col=col)
    fig.update_layout(height=450, plot_bgcolor="white", margin=dict(l=10, r=10, t=60, b=10),
                      legend=dict(orientation="h", y=-0.25))
    fig.update_annotations(font_size=14)
    fig.update_xaxes(title="prefix kept")
    fig.update_yaxes(gridcolor="#eee")
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    # a row per shown image: the original, then DiGIT's completions, then the VQ model's, by prefix
    strip = np.concatenate([originals[:6, None], np.stack(shown["digit"], 1), np.stack(shown["vq"], 1)], 1)
    pictures = {"completion_examples": tile(strip.reshape(-1, *strip.shape[2:]), strip.shape[1])}
    return Section("completion", "Completion vs prefix length (Figure 4b)", data, fig, markdown(data), pictures)


def findings(d: dict) -> list[str]:
    lo, hi = int(np.argmin(d["prefix_percent"])), int(np.argmax(d["prefix_percent"]))
    p_lo, p_hi = d["prefix_percent"][lo], d["prefix_percent"][hi]
    rise = {k: d[k]["fd"][lo] / d[k]["fd"][hi] - 1 if d[k]["fd"][hi] > 0 else 0.0 for k in MODELS}
    change = {k: d[k]["agreement"][lo] - d[k]["agreement"][hi] for k in MODELS}   # negative: fewer agree
    agree = rise["vq"] - rise["digit"] > CLOSE
    verdict = ("VQ tokens degrade more with a short prefix, as in the paper." if agree else
               "discriminative tokens degrade more with a short prefix, unlike the paper." if
               rise["digit"] - rise["vq"] > CLOSE else
               f"neither degrades by more than {CLOSE:.0%}, unlike the paper, where VQ tokens degrade far more." if
               max(rise.values()) <= CLOSE else
               f"both degrade about equally (within {CLOSE:.0%}), unlike the paper, where VQ tokens degrade far more.")
    out = [f"From {p_hi:g}% down to {p_lo:g}% of the rows kept, FD changes by {rise['digit'] * 100:+.0f}% with "
           f"discriminative tokens ({d['digit']['fd'][hi]:.3f} -> {d['digit']['fd'][lo]:.3f}) and by "
           f"{rise['vq'] * 100:+.0f}% with VQ tokens ({d['vq']['fd'][hi]:.3f} -> {d['vq']['fd'][lo]:.3f}): {verdict}",
           f"Classified like the original at {p_lo:g}%: discriminative {d['digit']['agreement'][lo]:.3f}, VQ "
           f"{d['vq']['agreement'][lo]:.3f} (at {p_hi:g}%: {d['digit']['agreement'][hi]:.3f} vs "
           f"{d['vq']['agreement'][hi]:.3f}; a change of {change['digit']:+.3f} vs {change['vq']:+.3f})."]
    if not agree:
        why = ["the two models differ in overall quality (see the ablation), which shifts whole curves"]
        if d["vq"]["agreement"][lo] >= 0.5:
            why.insert(0, f"in {d['images']} the top {d['keep_rows'][lo]} of {d['grid']} token rows already narrow "
                          f"the image down (the VQ model's completions keep the class {d['vq']['agreement'][lo]:.0%} "
                          f"of the time there), unlike a {p_lo:g}% strip of an ImageNet photo")
        out.append("Likely reason: " + "; and ".join(why) + ".")
    return out


def markdown(d: dict) -> str:
    rows = [[f"{p:g}%", f"{r}/{d['grid']}", fmt(d['digit']['fd'][i]), fmt(d['vq']['fd'][i]),
             fmt(d['digit']['agreement'][i]), fmt(d['vq']['agreement'][i])]
            for i, (p, r) in enumerate(zip(d["prefix_percent"], d["keep_rows"]))]
    return (f"{d['n_images']} test images, each completed once per prefix length (whole token rows: the nearest "
            f"to the asked share). FD: Fréchet distance to the originals in the features of the {d['judge']}.\n\n"
            + table(["prefix", "rows kept", "FD disc ↓", "FD VQ ↓", "same class disc ↑", "same class VQ ↑"], rows)
            + f"\n\nPaper (Figure 4b): {d['paper']}.\n\n" + "\n".join(f"- {x}" for x in findings(d))
            + "\n\nExamples (a row per image: original, DiGIT at each prefix, VQ model at each prefix): "
              "![completions](completion_examples.png)")
