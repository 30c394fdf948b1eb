"""The Tokenize tab: an image's discriminative tokens over it, their clusters, the VQ tokens beside them."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np
from PIL import Image

from digit_core import demo, ood, viz

from . import common

HOWTO = ("every patch of the image gets the id of its nearest K-Means centroid (its *discriminative token*), "
         "written in its cell; equal colours in the grid are equal ids. Hover a cell for its distance to the "
         "centroid and its cluster's size; click a cell of the image to see the training patches of that cluster. "
         "The VQ tokens on the right are the VQGAN's codes of the same image, for contrast.")


@common.handled
def tokenize(image: str | None, example: str | None, model: str | None = None) -> tuple:
    """An upload or an example -> overlay, token grids, histogram, note, JSON, the ids (state)."""
    m = common.model(model)
    c, img = m.config, demo.choose_image(m, image, example)
    ids, dists, _ = m.flows.tokenize(img[None])
    vq = m.flows.vq_tokenize(img[None])[0]
    sizes, source = m.cluster_sizes()
    seen, grey = demo.seen_image(m, img)
    check = ood.distance_check(m, img, dists[0])
    overlay = viz.grid_overlay(seen, ids[0], c.disc_grid)
    disc_fig = viz.token_figure(ids[0], f"Discriminative tokens ({c.disc_grid}×{c.disc_grid})", c.codebook.size,
                                dists[0], sizes)
    vq_fig = viz.token_figure(vq, f"VQ tokens ({c.vq_grid}×{c.vq_grid}), for contrast", c.vqgan.n_embed)
    hist = viz.histogram_figure(ids[0], c.codebook.size, "Discriminative tokens used")
    data = {"disc_tokens": ids[0].tolist(), "distances": np.round(dists[0], 5).tolist(), "vq_tokens": vq.tolist(),
            "cluster_sizes": sizes[ids[0]].tolist(), "cluster_sizes_source": source, "distance_check": check}
    note = f"{source}. Click a cell of the image to see its cluster."
    if grey:
        note += " " + demo.GREY_NOTE
    if notice := ood.distance_notice(check):
        note = notice + "\n\n" + note
    return common.png(overlay), disc_fig, vq_fig, hist, note, data, ids[0].tolist()


@common.handled
def pick_cell(ids: list | None, model: str | None, evt: gr.SelectData) -> tuple:
    """A click on the overlay -> that cell's cluster id and gallery. The click position comes from
    the client, so it is checked like any other input (no wrap-around, no index errors)."""
    if not ids:
        return gr.skip(), gr.skip(), gr.skip()
    m = common.model(model)
    grid = m.config.disc_grid
    if np.shape(ids) != (grid, grid):
        raise ValueError(f"token grid must be {grid}×{grid}; tokenize an image first")
    row, col = demo.cell_at(evt.index, grid, viz.overlay_side(m.config.image_size))
    k = ids[row][col]
    return (k, *show_cluster(k, model))


@common.handled
def show_cluster(cluster: float | None, model: str | None = None) -> tuple:
    """The training patches nearest cluster ``cluster``'s centroid, and a line about it."""
    m = common.model(model)
    m.flows.check_disc("show a cluster")
    k = demo.integer("cluster id", cluster, 0, m.config.codebook.size - 1)
    sizes, _ = m.cluster_sizes()
    pic = m.cluster_gallery(k)
    if pic is not None:   # served as a copy in the cache: the project folder is not a place clients may read
        return common.png(np.asarray(Image.open(pic).convert("RGB"))), (f"Cluster **{k}** ({sizes[k]:,} patches): the training patches nearest its centroid, "
                          "each outlined in its 3×3-patch neighbourhood.")
    why = ("no training patch sampled for its cluster folder falls in this cluster" if m.cluster_dir() else
           "this model ships no cluster galleries (make them with `python -m training.assets --bundle BUNDLE "
           "--data DATA`)")
    return None, f"Cluster **{k}** ({sizes[k]:,} patches). No gallery: {why}."


@dataclass
class View:
    image: common.ImageInput
    cluster: gr.Number
    outputs: list
    cluster_outputs: list


def initial(model: str | None) -> tuple:
    """What the tab shows on load: its first example, tokenized."""
    m, _ = common.registry().try_get(model)
    names = m.example_names() if m and not m.config.is_vq else []   # a VQ-token model has no clusters
    if not names:
        return tuple(gr.skip() for _ in range(7))
    return tokenize(None, names[0], model)


def initial_cluster(model: str | None) -> tuple:
    """The cluster shown on load: the token of the first example's centre cell (cluster id,
    gallery, note); the most used token is often the background's."""
    m, _ = common.registry().try_get(model)
    names = m.example_names() if m and not m.config.is_vq else []
    if not names:
        return gr.skip(), gr.skip(), gr.skip()
    ids = m.flows.tokenize(m.example(names[0])[None])[0][0]
    n = m.config.disc_grid
    k = int(ids[n // 2, n // 2])
    return (k, *show_cluster(k, model))


def on_model(v: View, m: demo.Model | None) -> dict:
    if m is None:
        return {}
    return v.image.on_model(m) | {v.cluster: gr.update(maximum=m.config.stage1_vocab - 1, value=None)}


def build(m: demo.Model | None, model_dd: gr.Dropdown) -> View:
    common.howto(HOWTO)
    with gr.Row():
        with gr.Column(scale=1):
            image = common.image_input(m)
            btn = gr.Button("Tokenize", variant="primary", elem_id="tokenize-btn")
            note = gr.Markdown(label="note")
        with gr.Column(scale=2):
            with gr.Row():   # the image to click and the cluster a click shows, side by side
                with gr.Column():
                    gr.Markdown("**The image with its discriminative-token grid** (click a cell)")
                    overlay = gr.Image(show_label=False, interactive=False, format="png", elem_id="tokenize-overlay")
                with gr.Column():
                    cluster = gr.Number(label="Cluster id (or click a cell of the image)", precision=0, minimum=0)
                    cluster_img = gr.Image(label="Cluster gallery", interactive=False, format="png", height=400,
                                           elem_classes="pixelated", elem_id="cluster-gallery")
                    cluster_note = gr.Markdown()
            with gr.Row():
                disc = gr.Plot(label="Discriminative tokens")
                vq = gr.Plot(label="VQ tokens")
            hist = gr.Plot(label="Histogram")
            with gr.Accordion("Tokens (JSON)", open=False):
                data = gr.JSON(label="tokens")
    ids = gr.State(None)
    outputs = [overlay, disc, vq, hist, note, data, ids]
    btn.click(tokenize, [*image.inputs, model_dd], outputs, api_name="tokenize")
    image.wire(model_dd, tokenize, outputs)
    overlay.select(pick_cell, [ids, model_dd], [cluster, cluster_img, cluster_note], api_visibility="private")
    cluster.submit(show_cluster, [cluster, model_dd], [cluster_img, cluster_note], api_visibility="private")
    return View(image, cluster, outputs, [cluster, cluster_img, cluster_note])
