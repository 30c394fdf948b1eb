"""The Stability tab: which tokens change under pixel noise (the paper's Table 1, on one image)."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from digit_core import demo, ood, viz
from digit_core.sampling import check_seed

from . import common

DEFAULT_SNR = 10.0
HOWTO = ("Gaussian noise at the chosen signal-to-noise ratio is added to the image; red cells are the tokens that "
         "changed. The curve is the change rate over the example images at the paper's SNRs (dotted: the paper's "
         "ImageNet figures); the stars are this image at this SNR. Lower is more stable.")


@common.handled
def stability(image: str | None, example: str | None, snr_db: float = DEFAULT_SNR, seed: float = 0,
              model: str | None = None) -> tuple:
    """Noise one image at ``snr_db``: clean|noisy, both change maps, rates, the curve, JSON."""
    m = common.model(model)
    c, img = m.config, demo.choose_image(m, image, example)
    snr = demo.number("snr_db", snr_db, -100.0, 200.0)
    r = demo.stability_one(m, img, snr, check_seed(seed))
    curve = m.stability_curve()
    seen, grey = demo.seen_image(m, img)
    check = ood.distance_check(m, img)
    pair = viz.side_by_side([viz.upscale(seen, 256), viz.upscale(r["noisy"], 256)])
    rates = (f"At **{snr:g} dB**: discriminative tokens changed **{r['disc_change_rate']:.1%}** "
             f"({int(r['disc_changed'].sum())} of {c.disc_grid ** 2}), VQ tokens changed "
             f"**{r['vq_change_rate']:.1%}** ({int(r['vq_changed'].sum())} of {c.vq_grid ** 2}); "
             f"encoder-feature cosine similarity {r['disc_cos_sim']:.3f}. The curve averages the "
             f"{curve['num_images']} example images (noise seed 0).")
    if grey:
        rates += " " + demo.GREY_NOTE + " The noise is added to that grey image."
    if notice := ood.distance_notice(check):
        rates = notice + "\n\n" + rates
    data = {k: r[k] for k in ("disc_change_rate", "vq_change_rate", "disc_cos_sim")} | {"distance_check": check}
    data |= {"disc_changed": r["disc_changed"].astype(int).tolist(), "vq_changed": r["vq_changed"].astype(int).tolist(),
             "curve": curve}
    fig = viz.stability_figure(curve["snr_db"], curve["vq_change"], curve["disc_change"],
                               current=(snr, r["vq_change_rate"], r["disc_change_rate"]))
    return (common.png(pair), viz.change_figure(r["disc_changed"], "Discriminative tokens changed (red)"),
            viz.change_figure(r["vq_changed"], "VQ tokens changed (red)"), rates, fig, data)


def initial(model: str | None) -> tuple:
    """What the tab shows on load: the first example at the default SNR."""
    m, _ = common.registry().try_get(model)
    names = m.example_names() if m else []
    if not names:
        return tuple(gr.skip() for _ in range(6))
    return stability(None, names[0], DEFAULT_SNR, 0, model)


@dataclass
class View:
    image: common.ImageInput
    outputs: list


def on_model(v: View, m: demo.Model | None) -> dict:
    return v.image.on_model(m) if m is not None else {}


def build(m: demo.Model | None, model_dd: gr.Dropdown) -> View:
    common.howto(HOWTO)
    with gr.Row():
        with gr.Column(scale=1):
            image = common.image_input(m)
            snr = gr.Slider(0.01, 40, DEFAULT_SNR, step=0.01, label="SNR (dB): lower = more noise")
            seed = gr.Number(0, label="Noise seed", precision=0, minimum=0)
            btn = gr.Button("Add noise", variant="primary", elem_id="stability-btn")
            rates = gr.Markdown(label="change rates")
        with gr.Column(scale=2):
            pair = gr.Image(label="Clean | noisy", interactive=False, format="png")
            with gr.Row():
                disc = gr.Plot(label="Discriminative-token changes")
                vq = gr.Plot(label="VQ-token changes")
            curve = gr.Plot(label="Change rate vs SNR")
            with gr.Accordion("Numbers (JSON)", open=False):
                data = gr.JSON(label="numbers")
    outputs = [pair, disc, vq, rates, curve, data]
    inputs = [*image.inputs, snr, seed, model_dd]
    btn.click(stability, inputs, outputs, api_name="stability")
    image.wire(model_dd, stability, outputs, inputs)
    snr.release(stability, inputs, outputs, api_visibility="private")
    return View(image, outputs)

