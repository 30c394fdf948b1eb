"""The Generate tab: class-conditional sampling, the stage-1 token grid filling in live."""
from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np

from digit_core import demo, viz

from . import common

DEFAULT_SAMPLES = 4
HOWTO = ("each square is one image's grid of discriminative tokens (one per patch, in reading order), filled in "
         "as stage 1 generates them; a colour is a token id (equal colours = the same cluster), or with "
         "\"probability\" how likely the sampler found each token. Stage 2 then maps each grid to VQ tokens and the "
         "VQGAN decoder renders the images below. A VQ-AR bundle (the paper's baseline) generates VQ tokens directly.")


def title(m: demo.Model | None, state: str = "") -> str:
    """The token grid's title: what this model's stage 1 generates, token by token."""
    what = demo.stage1_tokens(m.config) if m else "discriminative tokens"
    return f"Stage 1: {what}, token by token" + (f" ({state})" if state else "")


def empty_figure(m: demo.Model | None, n_samples: int = DEFAULT_SAMPLES) -> Any:
    """The grid before the first token: drawn on page load so the plot library is ready when the
    first run streams (otherwise the browser loads it with the first figure, late in stage 1)."""
    n, K = (m.config.disc_grid, m.config.stage1_vocab) if m else (8, 512)
    return viz.generation_figure(demo.pad_grid(np.zeros((n_samples, 0)), n), None, K, title=title(m, "waiting"))


def labels_of(m: demo.Model, classes: list[int] | None, B: int) -> list[str]:
    names = [m.class_names[k] for k in classes] if classes else ["unconditional"] * B
    return [f"#{i} · {name}" for i, name in enumerate(names)]


def _done(m: demo.Model, g: Any, classes: list[int] | None, labels: list[str], color_by: str) -> tuple:
    """One model's finished run: grid figure, gallery, timing line, JSON, redraw state."""
    c, B = m.config, len(labels)
    fig = viz.generation_figure(g.disc_tokens, g.disc_probs, c.stage1_vocab, color_by, title=title(m, "done"),
                                labels=labels)
    pics = common.gallery([(img, f"{label} · seed {g.seed}") for img, label in zip(g.images, labels)])
    data = {"model": c.name, "tokens": c.tokens, "class_ids": classes, "seed": g.seed, "settings": g.settings.to_dict(),
            "disc_tokens": g.disc_tokens.tolist(), "vq_tokens": g.vq_tokens.tolist(),
            "disc_probs": np.round(g.disc_probs, 5).tolist(), "timings": g.timings}
    timing = demo.timing_text(g.timings, B, c.disc_grid, c.vq_grid, stage2=not c.is_vq)
    return fig, pics, timing, data, {"codes": g.disc_tokens, "probs": g.disc_probs, "vocab": c.stage1_vocab,
                                     "labels": labels, "title": title(m, "done")}


@common.handled
def sample(class_name: str | None, num_samples: float, temperature: float | None = None, top_k: float | None = None,
           top_p: float | None = None, cfg_scale: float | None = None, seed: float = 0, color_by: str = "id",
           model: str | None = None, compare_model: str | None = None) -> Iterator[tuple]:
    """Generate ``num_samples`` images, and with ``compare_model`` the same request on a second
    bundle; yields (grid, gallery, timings, JSON, state, second grid, second gallery) as stage 1 runs."""
    m = common.model(model)
    m2 = common.second_model(m, compare_model)
    B = demo.integer("num_samples", num_samples, 1, 16)
    if color_by not in ("id", "probability"):
        raise ValueError(f"color_by must be 'id' or 'probability', got {color_by!r:.40}")
    classes = demo.resolve_classes(m, class_name, B, seed)
    kw = demo.sampling_args(temperature, top_k, top_p, cfg_scale)
    labels = labels_of(m, classes, B)
    models = [m] if m2 is None else [m, m2]
    runs = [functools.partial(x.flows.generate, classes, n=None if classes else B, seed=seed, **kw) for x in models]
    # the previous run's images go as this one starts
    yield (empty_figure(m, B), [], "stage 1: starting …", None, None,
           empty_figure(m2, B) if m2 else None, [])

    def on_token(i: int, codes: np.ndarray) -> tuple:
        c = models[i].config
        fig = viz.generation_figure(demo.pad_grid(codes, c.disc_grid), None, c.stage1_vocab, title=title(models[i]),
                                    labels=labels)
        return (fig, gr.skip(), f"stage 1: token {codes.shape[1]} of {c.disc_grid ** 2} …") if i == 0 else (fig,)

    def merge(done: dict[int, tuple]) -> tuple:   # both runs: one JSON, a timing line each
        fig, pics, timing, data, last = done[0]
        if m2 is None:
            return fig, pics, timing, data, last, None, []
        fig2, pics2, timing2, data2, _ = done[1]
        return fig, pics, f"{timing}\n\n{m2.config.name}: {timing2}", data | {"compare": data2}, last, fig2, pics2

    yield from common.side_by_side(runs, 5, on_token, lambda i, g: _done(models[i], g, classes, labels, color_by),
                                   merge)


def recolor(color_by: str, last: dict | None):
    """Redraw the finished grid coloured another way (no new sampling)."""
    if not last or color_by not in ("id", "probability"):
        return gr.skip()
    return viz.generation_figure(last["codes"], last["probs"], last["vocab"], color_by, title=last["title"],
                                 labels=last["labels"])


@dataclass
class View:
    cls: gr.Dropdown
    temperature: gr.Slider
    top_k: gr.Slider
    top_p: gr.Slider
    cfg_scale: gr.Slider
    plot: gr.Plot


def defaults(m: demo.Model | None) -> dict[str, float]:
    """The sliders' starting values: the bundle's own sampling defaults (config ``sampling``), in
    the sliders' terms (top-k 0, top-p 1, CFG 1 = off)."""
    s = m.config.sampling if m else None
    return dict(temperature=s.temperature if s else 1.0, top_k=(s.top_k or 0) if s else 0,
                top_p=(s.top_p or 1.0) if s else 1.0, cfg_scale=(s.cfg_scale or 1.0) if s and m.has_guidance else 1.0)


def on_model(v: View, m: demo.Model | None) -> dict:
    if m is None:
        return {}
    d = defaults(m)
    return {v.cls: gr.update(choices=demo.class_choices(m), value=demo.class_choices(m)[0]),
            v.temperature: d["temperature"], v.top_k: gr.update(maximum=m.config.stage1_vocab, value=d["top_k"]),
            v.top_p: d["top_p"], v.cfg_scale: gr.update(interactive=m.has_guidance, value=d["cfg_scale"]),
            v.plot: empty_figure(m)}


def build(m: demo.Model | None, model_dd: gr.Dropdown) -> View:
    d = defaults(m)
    classes = demo.class_choices(m) if m else [demo.RANDOM]
    K = m.config.stage1_vocab if m else 512
    common.howto(HOWTO)
    with gr.Row():
        with gr.Column(scale=1):
            cls = gr.Dropdown(classes, value=classes[0], label="Class")
            n = gr.Slider(1, 16, DEFAULT_SAMPLES, step=1, label="Number of samples")
            temp = gr.Slider(0.1, 2.0, d["temperature"], step=0.05, label="Temperature (starts at the model's default)")
            topk = gr.Slider(0, K, d["top_k"], step=1, label="Top-k (0 = off)")
            topp = gr.Slider(0.05, 1.0, d["top_p"], step=0.05, label="Top-p (1 = off)")
            cfg_scale = gr.Slider(1.0, 8.0, d["cfg_scale"], step=0.25, label="Classifier-free guidance (1 = off)",
                                  interactive=bool(m and m.has_guidance))
            seed = gr.Number(0, label="Seed", precision=0, minimum=0)
            color = gr.Radio(["id", "probability"], value="id", label="Colour tokens by")
            compare = common.compare_dropdown()
            btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
        with gr.Column(scale=2):
            with gr.Row():
                with gr.Column():
                    plot = gr.Plot(empty_figure(m), label="Stage-1 tokens (live)", elem_id="generate-plot")
                    pics = gr.Gallery(label="Samples", columns=4, height=380, format="png", object_fit="contain",
                                      buttons=["download", "fullscreen"], elem_classes="pixelated",
                                      elem_id="generate-gallery")
                with gr.Column(visible=False) as second:
                    plot2 = gr.Plot(None, label="Compared bundle: stage-1 tokens (live)", elem_id="generate-plot-2")
                    pics2 = gr.Gallery(label="Compared bundle: samples", columns=4, height=380, format="png",
                                       object_fit="contain", buttons=["download", "fullscreen"],
                                       elem_classes="pixelated", elem_id="generate-gallery-2")
            caption = gr.Markdown(visible=False)
            timing = gr.Markdown(label="timings", elem_id="generate-timing")
            with gr.Accordion("Tokens and settings (JSON)", open=False):
                data = gr.JSON(label="tokens")
    last = gr.State(None)
    btn.click(sample, [cls, n, temp, topk, topp, cfg_scale, seed, color, model_dd, compare],
              [plot, pics, timing, data, last, plot2, pics2], api_name="sample")
    common.wire_compare(compare, model_dd, second, caption, (pics, pics2), (4, 2))
    color.change(recolor, [color, last], plot, api_visibility="private")
    return View(cls, temp, topk, topp, cfg_scale, plot)
