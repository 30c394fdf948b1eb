"""DiGIT Studio: the Gradio demo on an exported bundle (onnxruntime; this app never imports torch).

    python app.py                                # exported/fmnist on 127.0.0.1:7860
    python app.py --model exported/NAME --device cuda --port 7861

Tabs: Generate (live class-conditional sampling), Tokenize (token explorer), Complete (the top
of an image, continued), Stability (tokens under pixel noise, the paper's Table 1), About.
Every action is also an API endpoint: /sample, /tokenize, /complete, /stability (README.md,
"The demo"). UI only: the work lives in digit_core.demo, the pictures in digit_core.viz.
"""
from __future__ import annotations

import time

_T0 = time.perf_counter()   # startup is measured from here

import argparse
import functools
import inspect
import sys
import threading
from pathlib import Path

import gradio as gr
import numpy as np

from digit_core import demo, viz
from digit_core.images import MAX_FILE_BYTES, load_image
from digit_core.runtime import BundleError, load_bundle

CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; }
#banner { border-left: 4px solid #d62728; padding-left: 10px; }
"""
NULL_CLASS = "(no class: null token)"
PAPER = "[arXiv:2410.12490](https://arxiv.org/abs/2410.12490)"


class Registry:
    """Opened bundles by path, shared by every user (read-only models; no per-request state)."""

    def __init__(self, default: str, device: str, threads: int | None) -> None:
        self.default, self.device, self.threads = default, device, threads
        self._models: dict[str, demo.Model] = {}
        self._lock = threading.Lock()

    def get(self, path: str | None) -> demo.Model:
        path = str(path or self.default)
        if path not in self.choices():   # API callers may only open the bundles the selector lists
            raise ValueError(f"unknown model {path!r}; choose one of {self.choices()}")
        with self._lock:
            if path not in self._models:
                if not (Path(path) / "manifest.json").is_file():
                    raise demo.ModelMissing(demo.missing_message(path))
                self._models[path] = demo.Model(Path(path), load_bundle(path, device=self.device, threads=self.threads))
            return self._models[path]

    def choices(self) -> list[str]:
        return sorted(set(demo.list_bundles()) | {self.default})


def friendly(fn):
    """Turn the errors a user can cause (bad upload, bad setting, missing model) into gr.Error."""
    def convert(err: Exception) -> gr.Error:
        return gr.Error(str(err), print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (ValueError, FileNotFoundError, BundleError, RuntimeError) as err:
                raise convert(err) from None
        return gen

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, BundleError, RuntimeError) as err:
            raise convert(err) from None
    return call


def build(registry: Registry) -> gr.Blocks:
    default_model = registry.default
    try:
        m0, problem = registry.get(default_model), None
    except (demo.ModelMissing, BundleError) as err:
        m0, problem = None, str(err)
    bundles = registry.choices()

    def model_summary(m: demo.Model | None, err: str | None = None) -> str:
        if m is None:
            return f"**No model loaded.** {err}"
        c = m.config
        classes = ", ".join(m.class_names) if c.stage1.num_classes else "unconditional"
        return (f"**{c.name}** · {c.image_size}×{c.image_size} images · {c.disc_grid}×{c.disc_grid} discriminative "
                f"tokens ({c.codebook.size} clusters) → {c.vq_grid}×{c.vq_grid} VQ tokens ({c.vqgan.n_embed} codes) · "
                f"{m.flows.provider} · classes: {classes}"
                + (f"\n\nEncoder: {c.encoder.source}" if c.encoder.source else ""))

    def image_of(m: demo.Model, upload: str | None, example: str | None) -> np.ndarray:
        if upload:
            return load_image(upload, m.config.image_size)
        if example:
            return m.example(example)
        raise ValueError("Upload an image or pick an example first.")

    def sampling_args(m: demo.Model, temperature, top_k, top_p, cfg=None) -> dict:
        return dict(temperature=float(temperature), top_k=int(top_k) or None,
                    top_p=float(top_p) if top_p is not None and float(top_p) < 1.0 else None,
                    cfg=float(cfg) if cfg is not None and m.has_cfg and float(cfg) != 1.0 else None)

    def partial(codes: np.ndarray, n: int) -> np.ndarray:
        grid = np.full((codes.shape[0], n * n), np.nan)
        grid[:, : codes.shape[1]] = codes
        return grid.reshape(-1, n, n)

    # -- actions (each also an API endpoint) --------------------------------------------------------
    @friendly
    def sample(class_name: str, num_samples: float, temperature: float, top_k: float, top_p: float,
               cfg_scale: float, seed: float, color_by: str, model: str):
        m = registry.get(model)
        c, B, seed = m.config, int(num_samples), int(seed)
        if not 1 <= B <= 16:
            raise ValueError(f"number of samples must be 1..16, got {B}")
        classes = demo.resolve_classes(m, class_name, B, seed)
        kw = sampling_args(m, temperature, top_k, top_p, cfg_scale)
        run = functools.partial(m.flows.generate, classes, n=None if classes else B, seed=seed, **kw)
        title = "Stage 1: discriminative tokens, token by token"
        for kind, value in demo.stream(run):
            if kind == "token":
                fig = viz.generation_figure(partial(value, c.disc_grid), None, c.codebook.size, title=title)
                yield fig, gr.skip(), f"stage 1: token {value.shape[1]} of {c.disc_grid ** 2} …", gr.skip(), gr.skip()
                continue
            g = value
            names = [m.class_names[k] for k in classes] if classes else ["unconditional"] * B
            fig = viz.generation_figure(g.disc_tokens, g.disc_probs, c.codebook.size, color_by, title=title + " (done)")
            gallery = [(img, f"{name} · seed {seed} · #{i}") for i, (img, name) in enumerate(zip(g.images, names))]
            data = {"class_ids": classes, "seed": seed, "disc_tokens": g.disc_tokens.tolist(),
                    "vq_tokens": g.vq_tokens.tolist(), "disc_probs": np.round(g.disc_probs, 5).tolist(),
                    "timings": g.timings}
            yield fig, gallery, demo.timing_text(g.timings, B, c.disc_grid, c.vq_grid), data, \
                {"codes": g.disc_tokens, "probs": g.disc_probs, "vocab": c.codebook.size}

    def recolor(color_by: str, last: dict | None):
        if not last:
            return gr.skip()
        return viz.generation_figure(last["codes"], last["probs"], last["vocab"], color_by,
                                     title="Stage 1: discriminative tokens, token by token (done)")

    @friendly
    def tokenize(image: str | None, example: str | None, model: str):
        m = registry.get(model)
        c, img = m.config, image_of(m, image, example)
        ids, dists, _ = m.flows.tokenize(img[None])
        vq = m.flows.vq_tokenize(img[None])[0]
        sizes, source = m.cluster_sizes()
        overlay = viz.grid_overlay(img, ids[0], c.disc_grid)
        disc_fig = viz.token_figure(ids[0], f"Discriminative tokens ({c.disc_grid}×{c.disc_grid})", c.codebook.size,
                                    dists[0], sizes)
        vq_fig = viz.token_figure(vq, f"VQ tokens ({c.vq_grid}×{c.vq_grid}), for contrast", c.vqgan.n_embed)
        hist = viz.histogram_figure(ids[0], c.codebook.size, "Discriminative tokens used")
        data = {"disc_tokens": ids[0].tolist(), "distances": np.round(dists[0], 5).tolist(), "vq_tokens": vq.tolist(),
                "cluster_sizes": sizes[ids[0]].tolist(), "cluster_sizes_source": source}
        note = f"{source}. Click a cell of the image to see its cluster."
        return overlay, disc_fig, vq_fig, hist, note, data, ids[0].tolist()

    @friendly
    def pick_cell(ids: list | None, model: str, evt: gr.SelectData):
        if not ids:
            return gr.skip(), gr.skip(), gr.skip()
        n = len(ids)
        size = registry.get(model).config.image_size
        side = size * max(1, -(-384 // size))    # the overlay's side: viz.grid_overlay's upscale
        col, row = (min(n - 1, int(v * n / side)) for v in evt.index[:2])
        return (ids[row][col], *show_cluster(ids[row][col], model))

    @friendly
    def show_cluster(cluster: float, model: str):
        m = registry.get(model)
        k = int(cluster)
        if not 0 <= k < m.config.codebook.size:
            raise ValueError(f"cluster id must be 0..{m.config.codebook.size - 1}")
        sizes, _ = m.cluster_sizes()
        pic = m.cluster_gallery(k)
        if pic is not None:
            return str(pic), (f"Cluster **{k}** ({sizes[k]:,} patches): the training patches nearest its centroid, "
                              "each outlined in its 3×3-patch neighbourhood.")
        folder = m.cluster_dir()
        why = (f"no training patch sampled for {folder} falls in this cluster" if folder else
               f"this model ships no cluster galleries (make them with `python -m training.assets --bundle {m.path} "
               f"--data DATA`)")
        return None, f"Cluster **{k}** ({sizes[k]:,} patches). No gallery: {why}."

    @friendly
    def complete(image: str | None, example: str | None, keep_percent: float, num_completions: float,
                 class_name: str, seed: float, temperature: float, top_k: float, top_p: float, live: bool, model: str):
        m = registry.get(model)
        c, img, B, seed = m.config, image_of(m, image, example), int(num_completions), int(seed)
        if not 1 <= B <= 8:
            raise ValueError(f"number of completions must be 1..8, got {B}")
        rows = demo.keep_rows_for(keep_percent, c.disc_grid)
        names = m.class_names
        if class_name not in (None, "", NULL_CLASS, demo.UNCONDITIONAL) and class_name not in names:
            raise ValueError(f"unknown class {class_name!r}; this model has: {', '.join(names)}")
        class_id = names.index(class_name) if class_name in names else None
        run = functools.partial(m.flows.complete_detailed, img, rows, B, class_id=class_id, seed=seed,
                                **sampling_args(m, temperature, top_k, top_p))
        info = f"keeping the top {rows} of {c.disc_grid} token rows ({100 * rows / c.disc_grid:.1f}%)"
        title = "Stage 1 continues the kept rows"
        for kind, value in demo.stream(run):
            if kind == "token":
                if live:
                    fig = viz.generation_figure(partial(value, c.disc_grid), None, c.codebook.size, title=title, keep_rows=rows)
                    yield fig, gr.skip(), f"{info} · stage 1: token {value.shape[1]} of {c.disc_grid ** 2} …", gr.skip()
                continue
            g = value
            fig = viz.generation_figure(g.disc_tokens, g.disc_probs, c.codebook.size, title=title + " (done)", keep_rows=rows)
            gallery = [(viz.mark_kept(img, rows, c.disc_grid, dim=True), "original")]
            gallery += [(viz.mark_kept(x, rows, c.disc_grid, dim=False), f"#{i} · seed {seed}")
                        for i, x in enumerate(g.images)]
            data = {"keep_rows": rows, "grid": c.disc_grid, "disc_tokens": g.disc_tokens.tolist(),
                    "vq_tokens": g.vq_tokens.tolist(), "timings": g.timings}
            yield fig, gallery, info + " · " + demo.timing_text(g.timings, B, c.disc_grid, c.vq_grid), data

    @friendly
    def stability(image: str | None, example: str | None, snr_db: float, seed: float, model: str):
        m = registry.get(model)
        c, img = m.config, image_of(m, image, example)
        r = demo.stability_one(m, img, float(snr_db), int(seed))
        curve = m.stability_curve()
        pair = viz.side_by_side([viz.upscale(img, 256), viz.upscale(r["noisy"], 256)])
        rates = (f"At **{float(snr_db):g} dB**: discriminative tokens changed **{r['disc_change_rate']:.1%}** "
                 f"({int(r['disc_changed'].sum())} of {c.disc_grid ** 2}), VQ tokens changed "
                 f"**{r['vq_change_rate']:.1%}** ({int(r['vq_changed'].sum())} of {c.vq_grid ** 2}); "
                 f"encoder-feature cosine similarity {r['disc_cos_sim']:.3f}. The curve averages the "
                 f"{curve['num_images']} example images (noise seed 0).")
        data = {k: r[k] for k in ("disc_change_rate", "vq_change_rate", "disc_cos_sim")}
        data |= {"disc_changed": r["disc_changed"].astype(int).tolist(), "vq_changed": r["vq_changed"].astype(int).tolist(),
                 "curve": curve}
        return (pair, viz.change_figure(r["disc_changed"], "Discriminative tokens changed (red)"),
                viz.change_figure(r["vq_changed"], "VQ tokens changed (red)"), rates,
                viz.stability_figure(curve["snr_db"], curve["vq_change"], curve["disc_change"]), data)

    def switch_model(model: str):
        try:
            m = registry.get(model)
        except (demo.ModelMissing, BundleError) as err:
            return (model_summary(None, str(err)), *[gr.skip()] * 7)
        ex = gr.update(choices=m.example_names(), value=None)
        return (model_summary(m), gr.update(choices=demo.class_choices(m), value=demo.class_choices(m)[0]),
                gr.update(maximum=m.config.codebook.size, value=0), gr.update(interactive=m.has_cfg),
                gr.update(**complete_classes(m)), ex, ex, ex)


    # -- layout ---------------------------------------------------------------------------------------
    ex_names = m0.example_names() if m0 else []
    K = m0.config.codebook.size if m0 else 512
    s = m0.config.sampling if m0 else None
    d_temp, d_topk = (s.temperature, s.top_k or 0) if s else (1.0, 0)
    d_topp, d_cfg = (s.top_p or 1.0, s.cfg or 1.0) if s else (1.0, 1.0)
    with gr.Blocks(title="DiGIT Studio") as app:
        gr.Markdown(f"# DiGIT Studio\nDiscriminative image tokens + autoregressive generation (NeurIPS 2024, {PAPER}).")
        with gr.Row():
            model_dd = gr.Dropdown(bundles, value=default_model, label="Model bundle", scale=1)
            summary = gr.Markdown(model_summary(m0, problem), elem_id="banner" if m0 is None else None)

        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    g_class = gr.Dropdown(demo.class_choices(m0) if m0 else [demo.RANDOM], value=(demo.class_choices(m0) if m0 else [demo.RANDOM])[0], label="Class")
                    g_n = gr.Slider(1, 16, 4, step=1, label="Number of samples")
                    g_temp = gr.Slider(0.1, 2.0, d_temp, step=0.05, label="Temperature")
                    g_topk = gr.Slider(0, K, d_topk, step=1, label="Top-k (0 = off)")
                    g_topp = gr.Slider(0.05, 1.0, d_topp, step=0.05, label="Top-p (1 = off)")
                    g_cfg = gr.Slider(1.0, 8.0, d_cfg, step=0.25, label="Classifier-free guidance (1 = off)",
                                      interactive=bool(m0 and m0.has_cfg))
                    g_seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                    g_color = gr.Radio(["id", "probability"], value="id", label="Colour tokens by")
                    g_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                with gr.Column(scale=2):
                    g_plot = gr.Plot(label="Stage-1 tokens (live)")
                    g_time = gr.Markdown(label="timings")
                    g_gallery = gr.Gallery(label="Samples", columns=4, height=380, format="png", object_fit="contain",
                                           buttons=["download", "fullscreen"], elem_classes="pixelated")
                    with gr.Accordion("Tokens (JSON)", open=False):
                        g_json = gr.JSON(label="tokens")
            g_last = gr.State(None)
            g_btn.click(sample, [g_class, g_n, g_temp, g_topk, g_topp, g_cfg, g_seed, g_color, model_dd],
                        [g_plot, g_gallery, g_time, g_json, g_last], api_name="sample")
            g_color.change(recolor, [g_color, g_last], g_plot, api_visibility="private")

        with gr.Tab("Tokenize"):
            with gr.Row():
                with gr.Column(scale=1):
                    t_file = gr.File(label="Upload an image", file_types=["image"], height=120)
                    t_ex = gr.Dropdown(ex_names, value=ex_names[0] if ex_names else None, label="…or pick an example")
                    t_btn = gr.Button("Tokenize", variant="primary", elem_id="tokenize-btn")
                    t_note = gr.Markdown(label="note")
                    t_cluster = gr.Number(label="Cluster id (or click a cell of the image)", precision=0, minimum=0)
                    t_cluster_img = gr.Image(label="Cluster gallery", interactive=False, format="png", elem_classes="pixelated")
                    t_cluster_note = gr.Markdown()
                with gr.Column(scale=2):
                    t_overlay = gr.Image(label="Image with its discriminative-token grid (click a cell)", interactive=False,
                                         format="png")
                    with gr.Row():
                        t_disc = gr.Plot(label="Discriminative tokens")
                        t_vq = gr.Plot(label="VQ tokens")
                    t_hist = gr.Plot(label="Histogram")
                    with gr.Accordion("Tokens (JSON)", open=False):
                        t_json = gr.JSON(label="tokens")
            t_ids = gr.State(None)
            t_out = [t_overlay, t_disc, t_vq, t_hist, t_note, t_json, t_ids]
            t_btn.click(tokenize, [t_file, t_ex, model_dd], t_out, api_name="tokenize")
            t_ex.input(tokenize, [t_file, t_ex, model_dd], t_out, api_visibility="private")
            t_file.upload(tokenize, [t_file, t_ex, model_dd], t_out, api_visibility="private")
            t_overlay.select(pick_cell, [t_ids, model_dd], [t_cluster, t_cluster_img, t_cluster_note], api_visibility="private")
            t_cluster.submit(show_cluster, [t_cluster, model_dd], [t_cluster_img, t_cluster_note], api_visibility="private")

        with gr.Tab("Complete"):
            with gr.Row():
                with gr.Column(scale=1):
                    c_file = gr.File(label="Upload an image", file_types=["image"], height=120)
                    c_ex = gr.Dropdown(ex_names, value=ex_names[0] if ex_names else None, label="…or pick an example")
                    c_keep = gr.Slider(12.5, 87.5, 50, step=12.5, label="Keep the top … % (whole token rows)")
                    c_n = gr.Slider(1, 8, 4, step=1, label="Number of completions")
                    c_class = gr.Dropdown(label="Condition on class", **complete_classes(m0))
                    c_seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                    c_temp = gr.Slider(0.1, 2.0, d_temp, step=0.05, label="Temperature")
                    c_topk = gr.Slider(0, K, d_topk, step=1, label="Top-k (0 = off)")
                    c_topp = gr.Slider(0.05, 1.0, d_topp, step=0.05, label="Top-p (1 = off)")
                    c_live = gr.Checkbox(True, label="Stream stage 1 live")
                    c_btn = gr.Button("Complete", variant="primary", elem_id="complete-btn")
                with gr.Column(scale=2):
                    c_plot = gr.Plot(label="Stage-1 tokens")
                    c_info = gr.Markdown(label="info")
                    c_gallery = gr.Gallery(label="Original (kept part above the red line) and completions", columns=5,
                                           height=260, format="png", object_fit="contain", buttons=["download", "fullscreen"])
                    with gr.Accordion("Tokens (JSON)", open=False):
                        c_json = gr.JSON(label="tokens")
            c_btn.click(complete, [c_file, c_ex, c_keep, c_n, c_class, c_seed, c_temp, c_topk, c_topp, c_live, model_dd],
                        [c_plot, c_gallery, c_info, c_json], api_name="complete")

        with gr.Tab("Stability"):
            with gr.Row():
                with gr.Column(scale=1):
                    s_file = gr.File(label="Upload an image", file_types=["image"], height=120)
                    s_ex = gr.Dropdown(ex_names, value=ex_names[0] if ex_names else None, label="…or pick an example")
                    s_snr = gr.Slider(0.01, 40, 10, step=0.01, label="SNR (dB): lower = more noise")
                    s_seed = gr.Number(0, label="Noise seed", precision=0, minimum=0)
                    s_btn = gr.Button("Add noise", variant="primary", elem_id="stability-btn")
                    s_rates = gr.Markdown(label="change rates")
                with gr.Column(scale=2):
                    s_pair = gr.Image(label="Clean | noisy", interactive=False, format="png")
                    with gr.Row():
                        s_disc = gr.Plot(label="Discriminative-token changes")
                        s_vq = gr.Plot(label="VQ-token changes")
                    s_curve = gr.Plot(label="Change rate vs SNR")
                    with gr.Accordion("Numbers (JSON)", open=False):
                        s_json = gr.JSON(label="numbers")
            s_btn.click(stability, [s_file, s_ex, s_snr, s_seed, model_dd], [s_pair, s_disc, s_vq, s_rates, s_curve, s_json],
                        api_name="stability")

        with gr.Tab("About"):
            about = gr.Markdown(about_text(m0, problem))

        model_dd.change(switch_model, model_dd, [summary, g_class, g_topk, g_cfg, c_class, t_ex, c_ex, s_ex],
                        api_visibility="private").then(
            lambda path: about_text(*_try(registry, path)), model_dd, about, api_visibility="private")
    return app


def complete_classes(m: demo.Model | None) -> dict:
    """Choices of the Complete tab's class: the null class first when the model has one."""
    if m is None or not m.config.stage1.num_classes:
        return dict(choices=[demo.UNCONDITIONAL], value=demo.UNCONDITIONAL)
    choices = ([NULL_CLASS] if m.has_cfg else []) + m.class_names
    return dict(choices=choices, value=choices[0])


def _try(registry: Registry, path: str) -> tuple[demo.Model | None, str | None]:
    try:
        return registry.get(path), None
    except (demo.ModelMissing, BundleError) as err:
        return None, str(err)


def about_text(m: demo.Model | None, problem: str | None = None) -> str:
    card = (m.model_card() if m else None) or (
        "*This bundle ships no MODEL_CARD.md.*" if m else f"*No model loaded.* {problem}")
    return f"""## Model card
{card}

## The paper
Yongxin Zhu, Bocheng Li, Hang Zhang, Xin Li, Linli Xu, Lidong Bing,, *Stabilize the Latent Space for Image Autoregressive Modeling: A Unified Perspective*,
NeurIPS 2024, {PAPER}. A frozen self-supervised encoder's patch features, clustered with K-Means, give
*discriminative tokens*; a GPT generates them (stage 1), a second GPT maps them to VQGAN tokens (stage 2),
and the VQGAN decoder renders pixels.

## Your own bundle
Export a saved model: `python -m digit_core.export --model MODEL_DIR --out exported/NAME`, then
`python app.py --model exported/NAME` (every folder in `exported/` is listed in the model selector).
Options: `--device auto|cpu|cuda`, `--host`, `--port`, `--share`. The API (`/sample`, `/tokenize`,
`/complete`, `/stability`) is described in README.md and under "Use via API" below.
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="DiGIT Studio: the Gradio demo.")
    p.add_argument("--model", default=str(demo.DEFAULT_MODEL), help="bundle folder (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads per graph (default: all cores)")
    p.add_argument("--concurrency", type=int, default=4, help="requests run at once; the rest queue")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    a = p.parse_args(argv)
    registry = Registry(a.model, a.device, a.threads)
    app = build(registry)
    if not (Path(a.model) / "manifest.json").is_file():
        print(f"warning: {demo.missing_message(a.model)}", file=sys.stderr)
    app.queue(default_concurrency_limit=a.concurrency, max_size=256)
    app.launch(server_name=a.host, server_port=a.port, share=a.share, max_file_size=MAX_FILE_BYTES, show_error=True,
               css=CSS, footer_links=["api", "gradio"], prevent_thread_lock=True, quiet=True)
    print(f"DiGIT Studio ready on http://{a.host}:{a.port} ({time.perf_counter() - _T0:.1f} s after start)", flush=True)
    app.block_thread()


if __name__ == "__main__":
    main()
