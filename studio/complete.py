"""The Complete tab: keep the top rows of an image's tokens, let stage 1 continue them."""
from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np

from digit_core import demo, ood, viz

from . import common, generate

TITLE = "Stage 1 continues the kept rows"
DEFAULT_KEEP, DEFAULT_N = 50.0, 4
HOWTO = ("the image is tokenized, its top token rows (above the black line) are kept, and stage 1 writes the rest, "
         "one token at a time; stage 2 and the decoder then render every completion from its tokens. So the kept "
         "part of each completion is the kept tokens re-rendered, not the original pixels.")


def looked_at(m: demo.Model, img: Any, info: str) -> tuple[Any, str, str, dict | None]:
    """The image as the model sees it, its caption, ``info`` with the out-of-distribution notice
    (if any) in front, and the distance check for the JSON."""
    seen, grey = demo.seen_image(m, img)
    check = ood.distance_check(m, img)
    caption = "original, in grey" if grey else "original"   # short: captions are cut at about 16 characters
    notice = ood.distance_notice(check)
    return seen, caption, (notice + "\n\n" if notice else "") + info + (" · " + demo.GREY_NOTE if grey else ""), check


def _result(m: demo.Model, img: Any, g: Any, rows: int, B: int, info: str) -> tuple:
    c = m.config
    labels = [f"#{i}" for i in range(B)]
    fig = viz.generation_figure(g.disc_tokens, g.disc_probs, c.stage1_vocab, title=TITLE + " (done)", keep_rows=rows,
                                labels=labels)
    seen, caption, info, check = looked_at(m, img, info)
    pics = [(viz.mark_kept(seen, rows, c.disc_grid, dim=True), caption)]
    pics += [(viz.mark_kept(x, rows, c.disc_grid, dim=False), f"#{i} re-rendered")
             for i, x in enumerate(g.images)]
    data = {"model": c.name, "tokens": c.tokens, "keep_rows": rows, "grid": c.disc_grid, "seed": g.seed,
            "settings": g.settings.to_dict(),
            "disc_tokens": g.disc_tokens.tolist(),
            "vq_tokens": g.vq_tokens.tolist(), "timings": g.timings, "distance_check": check}
    text = info + f" · seed {g.seed} · " + demo.timing_text(g.timings, B, c.disc_grid, c.vq_grid, kept=rows * c.disc_grid,
                                                            stage2=not c.is_vq)
    return fig, common.gallery(pics), text, data


@common.handled
def complete(image: str | None, example: str | None, keep_percent: float = DEFAULT_KEEP,
             num_completions: float = DEFAULT_N, class_name: str | None = None, seed: float = 0,
             temperature: float | None = None, top_k: float | None = None, top_p: float | None = None,
             live: bool = True, model: str | None = None, compare_model: str | None = None) -> Iterator[tuple]:
    """``num_completions`` continuations of the kept top rows, and with ``compare_model`` the same
    on a second bundle; yields (figure, gallery, info, JSON, second figure, second gallery)."""
    m = common.model(model)
    m2 = common.second_model(m, compare_model)
    c, img = m.config, demo.choose_image(m, image, example)
    B = demo.integer("num_completions", num_completions, 1, 8)
    rows = demo.keep_rows_for(keep_percent, c.disc_grid)
    if m2 is not None and m2.config.disc_grid != c.disc_grid:
        raise ValueError(f"cannot compare completions: {c.name} has {c.disc_grid} token rows, "
                         f"{m2.config.name} {m2.config.disc_grid}")
    class_id = demo.completion_class(m, class_name)
    models = [m] if m2 is None else [m, m2]
    runs = [functools.partial(x.flows.complete_detailed, img, rows, B, class_id=class_id, seed=seed,
                              **demo.sampling_args(temperature, top_k, top_p)) for x in models]
    info = (f"keeping the top {rows} of {c.disc_grid} token rows ({100 * rows / c.disc_grid:.1f}%); every "
            "completion, kept rows included, is re-rendered from its tokens")
    labels = [f"#{i}" for i in range(B)]
    live_info = looked_at(m, img, info)[2]
    yield (generate.empty_figure(m, B), [], live_info + " · starting …", None,
           generate.empty_figure(m2, B) if m2 else None, [])

    def on_token(i: int, codes: np.ndarray) -> tuple | None:
        if not live:
            return None
        fig = viz.generation_figure(demo.pad_grid(codes, c.disc_grid), None, models[i].config.stage1_vocab,
                                    title=TITLE, keep_rows=rows, labels=labels)
        return (fig, gr.skip(), f"{live_info} · stage 1: token {codes.shape[1]} of {c.disc_grid ** 2} …") if i == 0 \
            else (fig,)

    def merge(done: dict[int, tuple]) -> tuple:
        fig, pics, text, data = done[0]
        if m2 is None:
            return fig, pics, text, data, None, []
        fig2, pics2, text2, data2 = done[1]
        return fig, pics, f"{text}\n\n{m2.config.name}: {text2}", data | {"compare": data2}, fig2, pics2

    yield from common.side_by_side(runs, 4, on_token, lambda i, g: _result(models[i], img, g, rows, B, info), merge)


def initial(model: str | None) -> tuple:
    """What the tab shows on load: the first example completed with the tab's defaults (computed
    once per model, so a page load costs no generation)."""
    m, _ = common.registry().try_get(model)
    names = m.example_names() if m else []
    if not names:
        return tuple(gr.skip() for _ in range(6))
    img = m.example(names[0])
    rows = demo.keep_rows_for(DEFAULT_KEEP, m.config.disc_grid)
    class_id = demo.completion_class(m, demo.completion_class_choices(m)[0])
    g = m.once("initial-completion", lambda: m.flows.complete_detailed(img, rows, DEFAULT_N, class_id=class_id, seed=0))
    info = f"{names[0]}, keeping the top {rows} of {m.config.disc_grid} token rows; re-rendered from tokens"
    return (*_result(m, img, g, rows, DEFAULT_N, info), None, [])


@dataclass
class View:
    image: common.ImageInput
    cls: gr.Dropdown
    temperature: gr.Slider
    top_k: gr.Slider
    top_p: gr.Slider
    outputs: list


def on_model(v: View, m: demo.Model | None) -> dict:
    if m is None:
        return {}
    d = generate.defaults(m)
    choices = demo.completion_class_choices(m)
    return v.image.on_model(m) | {
        v.cls: gr.update(choices=choices, value=choices[0]), v.temperature: d["temperature"],
        v.top_k: gr.update(maximum=m.config.stage1_vocab, value=d["top_k"]), v.top_p: d["top_p"]}


def build(m: demo.Model | None, model_dd: gr.Dropdown) -> View:
    d = generate.defaults(m)
    K = m.config.stage1_vocab if m else 512
    choices = demo.completion_class_choices(m) if m else [demo.UNCONDITIONAL]
    common.howto(HOWTO)
    with gr.Row():
        with gr.Column(scale=1):
            image = common.image_input(m)
            keep = gr.Slider(12.5, 87.5, DEFAULT_KEEP, step=12.5, label="Keep the top … % (whole token rows)")
            n = gr.Slider(1, 8, DEFAULT_N, step=1, label="Number of completions")
            cls = gr.Dropdown(choices, value=choices[0], label="Condition on class")
            seed = gr.Number(0, label="Seed", precision=0, minimum=0)
            temp = gr.Slider(0.1, 2.0, d["temperature"], step=0.05, label="Temperature (starts at the model's default)")
            topk = gr.Slider(0, K, d["top_k"], step=1, label="Top-k (0 = off)")
            topp = gr.Slider(0.05, 1.0, d["top_p"], step=0.05, label="Top-p (1 = off)")
            live = gr.Checkbox(True, label="Stream stage 1 live")
            compare = common.compare_dropdown()
            btn = gr.Button("Complete", variant="primary", elem_id="complete-btn")
        with gr.Column(scale=2):
            with gr.Row():
                with gr.Column():
                    plot = gr.Plot(generate.empty_figure(m), label="Stage-1 tokens")
                    pics = gr.Gallery(label="Original (kept rows above the red line, the rest dimmed), then "
                                            "completions, each re-rendered from its tokens", columns=5, height=300,
                                      format="png", object_fit="contain", buttons=["download", "fullscreen"],
                                      elem_classes="pixelated", elem_id="complete-gallery")
                with gr.Column(visible=False) as second:
                    plot2 = gr.Plot(None, label="Compared bundle: stage-1 tokens", elem_id="complete-plot-2")
                    pics2 = gr.Gallery(label="Compared bundle: original, then its completions", columns=5, height=300,
                                       format="png", object_fit="contain", buttons=["download", "fullscreen"],
                                       elem_classes="pixelated", elem_id="complete-gallery-2")
            caption = gr.Markdown(visible=False)
            info = gr.Markdown(label="info")
            with gr.Accordion("Tokens (JSON)", open=False):
                data = gr.JSON(label="tokens")
    outputs = [plot, pics, info, data, plot2, pics2]
    inputs = [*image.inputs, keep, n, cls, seed, temp, topk, topp, live, model_dd, compare]
    btn.click(complete, inputs, outputs, api_name="complete")
    common.wire_compare(compare, model_dd, second, caption, (pics, pics2), (5, 3))
    image.wire(model_dd)   # picking an image does not start a generation: the button does
    return View(image, cls, temp, topk, topp, outputs)
