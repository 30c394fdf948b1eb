"""The thesis report: every run's ``measure.json`` (``training.analyses.thesis measure``) in one
table, a figure of stability against generation with the paper's points, rank correlations and
findings written from the numbers: ``<out>/thesis.{json,md,html,png}``."""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from digit_core.metrics import PAPER_TABLE1, SNR_LEVELS_DB
from training.analyses.common import Section, fmt, table, write_readme, write_section
from training.thesis import TOKENIZERS

TEN_DB = SNR_LEVELS_DB.index(10.0)
PAPER_POINTS = {"VQ tokens": (PAPER_TABLE1["vq_change"][TEN_DB], 24.38),
                "discriminative tokens": (PAPER_TABLE1["disc_change"][TEN_DB], 9.66)}
"""(tokens changed at 10 dB, Table 1; FID, Table 3a: ImageNet 256, unconditional, 219M GPT, 200 epochs)."""


def budget(folder: Path) -> dict[str, Any]:
    """Each stage's budget from the run's records (``<records>/<run>/<stage>/train_config.json``)."""
    out = {}
    for c in sorted(folder.glob("stage*/train_config.json")):
        d = json.loads(c.read_text())
        out[c.parent.name] = {k: d.get(k) for k in ("steps", "batch_size", "lr", "ema", "seed", "data", "val_data")}
    return out


def load_all(records: Path) -> list[dict[str, Any]]:
    order = list(TOKENIZERS)
    rows = [json.loads(p.read_text()) | {"budget": budget(p.parent)} for p in sorted(records.glob("*/measure.json"))]
    return sorted(rows, key=lambda r: (order.index(r["name"]) if r["name"] in order else len(order),
                                       r.get("train_seed", 0)))


def run_name(r: dict[str, Any]) -> str:
    return r.get("run", r["name"])


def figure(rows: list[dict[str, Any]]) -> go.Figure:
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        "ours: class accuracy, unguided", "ours: Fréchet distance, unguided", "paper (ImageNet): FID, Table 3a"))
    palette = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
    for i, r in enumerate(rows):
        x = r["stability"]["clipped"]["change"][TEN_DB]
        for col, key, scale in ((1, "accuracy", 100), (2, "fd", 1)):
            est, lo, hi = (v * scale for v in r["generation"]["unguided"][key])
            fig.add_trace(go.Scatter(x=[x], y=[est], mode="markers+text", text=[run_name(r)], textposition="top center",
                                     marker={"color": palette[i % len(palette)], "size": 9},
                                     error_y={"type": "data", "symmetric": False, "array": [hi - est],
                                              "arrayminus": [est - lo]}, name=run_name(r), showlegend=col == 1,
                                     legendgroup=run_name(r)), 1, col)
    for label, (x, fid) in PAPER_POINTS.items():
        fig.add_trace(go.Scatter(x=[x], y=[fid], mode="markers+text", text=[label], textposition="middle right",
                                 marker={"symbol": "diamond", "size": 10, "color": "black"}, showlegend=False), 1, 3)
    for col in (1, 2, 3):
        fig.update_xaxes(title_text="tokens changed at 10 dB (Table 1)", range=[0, 1.2 if col == 3 else 1],
                         row=1, col=col)
    fig.update_yaxes(title_text="recognised as the class asked (%)", row=1, col=1)
    fig.update_yaxes(title_text="Fréchet distance (classifier features)", row=1, col=2)
    fig.update_yaxes(title_text="FID", range=[0, 30], row=1, col=3)
    fig.update_layout(height=480, title="Stability (x) against generation (y), equal budgets; bars: bootstrap 95%",
                      plot_bgcolor="white")
    fig.update_xaxes(gridcolor="#eee")
    fig.update_yaxes(gridcolor="#eee")
    return fig


def rank_corr(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (no ties expected); None for fewer than 3 points."""
    if len(a) < 3:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def permutation_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided exact permutation p-value of Spearman's rho (every ordering of ``b``; fine up to ~8 points)."""
    rho = rank_corr(a, b)
    if rho is None:
        return None
    perms = [rank_corr(a, list(p)) for p in itertools.permutations(b)]
    return float(np.mean([abs(r) >= abs(rho) - 1e-12 for r in perms]))


AXES = {"changed at 10 dB": lambda r: r["stability"]["clipped"]["change"][TEN_DB],
        "bag-of-tokens probe": lambda r: r["information"]["bag_of_tokens"],
        "stage-1 nats/image": lambda r: r["modelling"]["nats_per_image"]}
OUTCOMES = {"unguided accuracy": lambda r: r["generation"]["unguided"]["accuracy"][0],
            "unguided FD": lambda r: r["generation"]["unguided"]["fd"][0],
            "completion 12.5%": lambda r: r["completion"]["12.5"]["agreement"][0]}


def correlations(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Spearman's rank correlation of each property of the tokens with each generation figure."""
    return {a: {o: rank_corr([fa(r) for r in rows], [fo(r) for r in rows]) for o, fo in OUTCOMES.items()}
            for a, fa in AXES.items()}


def overlap(a: list[float], b: list[float]) -> bool:
    return a[1] <= b[2] and b[1] <= a[2]


def findings(runs: list[dict[str, Any]]) -> list[str]:
    """Computed on each tokenizer's first training seed; other seeds give the training spread."""
    rows = [r for r in runs if r.get("train_seed", 0) == 0]
    out, chg = [], AXES["changed at 10 dB"]
    acc = lambda r: r["generation"]["unguided"]["accuracy"]
    vq = next((r for r in rows if r["tokens"] == "vq"), None)
    disc = [r for r in rows if r["tokens"] != "vq"]
    if vq and disc:
        steadier = [r["name"] for r in disc if chg(r) < chg(vq)]
        out.append(f"Table 1's claim, discriminative tokens change less under noise than VQ codes: holds for "
                   f"{len(steadier)} of {len(disc)} discriminative tokenizers ({', '.join(steadier) or 'none'}; "
                   "VQ codes "
                   f"{chg(vq):.3f} changed at 10 dB).")
        best = max(disc, key=lambda r: acc(r)[0])
        verdict = ("within the intervals of" if overlap(acc(best), acc(vq)) else
                   "above" if acc(best)[0] > acc(vq)[0] else "below")
        out.append(f"Table 3a's claim, a GPT on discriminative tokens generates better than on VQ codes at the same "
                   f"budget: the best discriminative run ({best['name']}, {100 * acc(best)[0]:.1f}% recognised "
                   "unguided) "
                   f"is {verdict} the VQ run ({100 * acc(vq)[0]:.1f}%)"
                   + (", unlike the paper." if verdict != "above" else ", as in the paper."))
    if vq and disc and all("ceiling" in r for r in rows):
        top = lambda r: r["ceiling"]["agreement"]
        out.append("The stage-2 ceiling (real test images rendered from their own tokens, kept in their class): "
                   + "; ".join(f"{r['name']} {100 * top(r)[0]:.1f}%" for r in disc)
                   + f"; VQ codes (the VQGAN's reconstructions) {100 * top(vq)[0]:.1f}%. A discriminative run's "
                   "samples are bounded by its ceiling, a VQ run's only by the reconstructions.")
    if vq and disc:
        raw = lambda r: r["stability"]["unclipped"]["change"][TEN_DB]
        flipped = [r["name"] for r in disc if (chg(r) < chg(vq)) != (raw(r) < raw(vq))]
        snr = vq["stability"]["clipped"]["snr_measured"][TEN_DB]
        out.append("Clipping matters: the 10 dB images, clipped to [0, 1] and rounded, had a measured SNR of "
                   f"{snr:.1f} dB (clipping removes part of the noise), and without clipping "
                   + (f"the order against VQ codes flips for {', '.join(flipped)}"
                                                           if flipped else "the order against VQ codes is the same")
                   + " (" + "; ".join(f"{r['name']} {raw(r):.3f}" for r in disc) + f"; VQ codes {raw(vq):.3f}).")
        short = lambda r: r["completion"]["12.5"]["agreement"]
        best = max(disc, key=lambda r: short(r)[0])
        verdict = ("within the intervals of" if overlap(short(best), short(vq)) else
                   "above" if short(best)[0] > short(vq)[0] else "below")
        out.append(f"Figure 4b's claim, completions from a short prefix stay on track with discriminative tokens and "
                   "drift with VQ codes: from 12.5% of the rows (the same real pixels kept for both), "
                   f"{best['name']} keeps "
                   f"the class in {100 * short(best)[0]:.1f}%, {verdict} VQ codes' {100 * short(vq)[0]:.1f}%"
                   + (", as in the paper." if verdict == "above" else ", unlike the paper."))
    rho = correlations(rows)["changed at 10 dB"]["unguided accuracy"]
    if rho is not None:
        holds = rho < -0.5
        out.append(f"The link itself (more stable tokens, better samples): across {len(rows)} tokenizers the rank "
                   f"correlation of tokens changed at 10 dB with unguided class accuracy is {rho:+.2f}; "
                   + ("the thesis's direction" if holds else "not the thesis's direction")
                   + f" (exact permutation p = {permutation_p([chg(r) for r in rows], [acc(r)[0] for r in rows]):.2f}"
                   f" with {len(rows)} points).")
    untrained = [r for r in disc if r.get("encoder", {}).get("objective") == "untrained"]
    trained = [r for r in disc if r not in untrained]
    if untrained and trained:
        u, t = min(untrained, key=chg), max(trained, key=lambda r: acc(r)[0])
        out.append(f"Stability alone is cheap: the untrained {u['name']} is "
                   + ("more" if chg(u) < chg(t) else "less")
                   + f" stable than {t['name']} ({chg(u):.3f} vs {chg(t):.3f} "
                   f"changed at 10 dB) and generates {100 * acc(u)[0]:.1f}% vs {100 * acc(t)[0]:.1f}% recognised.")
    for name in dict.fromkeys(r["name"] for r in runs):
        same = [r for r in runs if r["name"] == name]
        if len(same) > 1:
            accs = ", ".join(f"{100 * acc(r)[0]:.1f}%" for r in same)
            fds = ", ".join(f"{r['generation']['unguided']['fd'][0]:.2f}" for r in same)
            out.append(f"Training seeds of {name} ({', '.join(str(r.get('train_seed', 0)) for r in same)}): "
                       f"unguided accuracy {accs}; Fréchet distance {fds}.")
    return out


def markdown(rows: list[dict[str, Any]], missing: list[str]) -> str:
    pct = lambda v: f"{100 * v[0]:.1f} [{100 * v[1]:.1f}, {100 * v[2]:.1f}]"
    fd = lambda v: f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"
    head = ["tokenizer", "changed 10 dB (clipped / unclipped)", "measured SNR at 10 dB", "bag-of-tokens probe",
            "stage-1 loss nats/token (/image)", "unguided acc %", "unguided FD", "guided acc %", "guided FD",
            "completion 50% %", "completion 12.5% %", "stage-2 ceiling %"]
    body = []
    for r in rows:
        st, m, g, c = r["stability"], r["modelling"], r["generation"], r["completion"]
        body.append([run_name(r), f"{st['clipped']['change'][TEN_DB]:.3f} / {st['unclipped']['change'][TEN_DB]:.3f}",
                     f"{st['clipped']['snr_measured'][TEN_DB]:.2f} dB", fmt(r["information"]["bag_of_tokens"]),
                     f"{fmt(m['stage1_val_loss'])} ({fmt(m['nats_per_image'], 1)})",
                     pct(g["unguided"]["accuracy"]), fd(g["unguided"]["fd"]), pct(g["guided"]["accuracy"]),
                     fd(g["guided"]["fd"]), pct(c["50.0"]["agreement"]), pct(c["12.5"]["agreement"]),
                     pct(r["ceiling"]["agreement"]) if "ceiling" in r else "–"])
    layers = [[run_name(r), fmt(r["information"]["pixels"]), fmt(r["information"]["features"]),
               " / ".join(fmt(v) for v in r["information"]["stage1_layers"])] for r in rows]
    seeds = [[run_name(r), k, " / ".join(f"{100 * s['accuracy']:.1f}" for s in r["generation"][k]["per_seed"]),
              " / ".join(f"{s['fd']:.2f}" for s in r["generation"][k]["per_seed"])]
             for r in rows for k in ("unguided", "guided")]
    g = rows[0]["guidance"] if rows else None
    first = lambda r: r.get("budget", {}).get("stage1") or r.get("budget", {}).get("stage1_vq") or {}
    s1b = first(rows[0]) if rows else {}
    s2b = next((r["budget"]["stage2"] for r in rows if "stage2" in r.get("budget", {})), {})
    same = (len({(first(r).get("steps"), first(r).get("batch_size")) for r in rows}) == 1
            and len({(r["budget"]["stage2"]["steps"], r["budget"]["stage2"]["batch_size"])
                     for r in rows if "stage2" in r.get("budget", {})}) <= 1)
    proto = (f"**Protocol.** Every run: stage 1 {s1b.get('steps')} steps x {s1b.get('batch_size')} rows"
             + (f", stage 2 {s2b.get('steps')} x {s2b.get('batch_size')}" if s2b else "")
             + f" on `{s1b.get('data')}` (held-out losses on `{s1b.get('val_data')}`)"
             + ("; the same budget for every run." if same else "; **budgets differ between runs** (see the JSON).")
             + f" Measured on the test split: {rows[0]['generation']['unguided']['n'] if rows else 0} samples per "
             f"setting (all seeds), {rows[0]['completion'].get('50.0', {}).get('n', 0) if rows else 0} completions per "
             "prefix, Table 1 on the first "
             f"{rows[0]['stability']['n'] if rows else 0:,} test images. Nothing was chosen from these figures.")
    paper = table(["ImageNet (paper)", "tokens changed at 10 dB (Table 1)", "FID (Table 3a)"],
                  [[k, f"{x:.3f}", f"{y:.2f}"] for k, (x, y) in PAPER_POINTS.items()])
    firsts = [r for r in rows if r.get("train_seed", 0) == 0]
    text = [proto, "", table(head, body), "",
            f"Intervals: bootstrap 95% over the samples of all {len(rows[0]['seeds']) if rows else 0} sampling seeds "
            f"pooled; guided = cfg_scale {g}; every model samples with "
            f"{json.dumps(rows[0]['settings'] if rows else {})}. "
            "Stage-2 ceiling: test images rendered from their own tokens by stage 2 and the VQ decoder "
            "(`Flows.render`; for VQ codes the VQGAN's reconstruction), the share still in the original's class: "
            "no generation from these tokens can do better.", "",
            "**Per sampling seed** (accuracy % / Fréchet distance):", "",
            table(["tokenizer", "sampling", "accuracy by seed", "FD by seed"], seeds), "",
            "**Information** (linear probes on test images; stage-1 layers 0..L, first token the null class):", "",
            table(["tokenizer", "pixels", "pooled features", "stage-1 layers"], layers), "",
            "**Rank correlations** (Spearman, one run per tokenizer; accuracy and completion: higher is better, "
            "FD: lower is better):", "",
            table(["", *OUTCOMES], [[a, *(fmt(v, 2) for v in row.values())]
                                    for a, row in correlations(firsts).items()]),
            "",
            "**The paper's points** (the figure's right panel):", "", paper, "",
            "**Findings**", ""] + [f"- {f}" for f in findings(rows)]
    if missing:
        text += ["", f"Not measured yet: {', '.join(missing)} (`python -m training.thesis` trains them)."]
    return "\n".join(text)


def report(o: argparse.Namespace) -> None:
    rows = load_all(Path(o.records))
    if not rows:
        raise SystemExit(f"no {o.records}/*/measure.json: run `measure` first")
    missing = [n for n in TOKENIZERS if n not in {r["name"] for r in rows}]
    data = {"tokenizers": rows, "missing": missing, "paper_points": PAPER_POINTS}
    section = Section("thesis", "The thesis: token stability against generation, across tokenizers", data,
                      figure(rows), markdown(rows, missing))
    out = Path(o.out)
    for p in write_section(out, section, png=not o.no_png):
        print(f"wrote {p}")
    readme = out / "README.md"
    if readme.is_file():   # the analyses' joined report: keep its header, add this section in its place
        title, _, rest = readme.read_text().partition("\n")
        print(f"wrote {write_readme(out, title.removeprefix('# DiGIT analyses: '), rest.split(chr(10) + '## ', 1)[0])}")


