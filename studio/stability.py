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


def _rates(m: demo.Model, r: dict, snr: float) -> str:
    c = m.config
    vq = f"VQ tokens changed **{r['vq_change_rate']:.1%}** ({int(r['vq_changed'].sum())} of {c.vq_grid ** 2})"
    if c.is_vq:
        return f"At **{snr:g} dB**: {vq} (a VQ-token model has no discriminative tokens)"
    return (f"At **{snr:g} dB**: discriminative tokens changed **{r['disc_change_rate']:.1%}** "
            f"({int(r['disc_changed'].sum())} of {c.disc_grid ** 2}), {vq}; encoder-feature cosine similarity "
            f"{r['disc_cos_sim']:.3f}")


def _numbers(r: dict) -> dict:
    return {k: r[k] for k in ("disc_change_rate", "vq_change_rate", "disc_cos_sim")} | {
        "disc_changed": None if r["disc_changed"] is None else r["disc_changed"].astype(int).tolist(),
        "vq_changed": r["vq_changed"].astype(int).tolist()}


def _stage1_changes(m: demo.Model, r: dict, what: str) -> object:
    """The change map of the tokens ``m``'s stage 1 models: discriminative, or VQ for a VQ-token model."""
    kind = demo.stage1_tokens(m.config)
    changed = r["vq_changed"] if m.config.is_vq else r["disc_changed"]
    return viz.change_figure(changed, f"{what}{kind[0].upper()}{kind[1:]} changed (red)")


@common.handled
def stability(image: str | None, example: str | None, snr_db: float = DEFAULT_SNR, seed: float = 0,
              model: str | None = None, compare_model: str | None = None) -> tuple:
    """Noise one image at ``snr_db``: clean|noisy, both change maps, rates, the curve, JSON, and
    with ``compare_model`` the same noisy image on a second bundle's stage-1 tokens."""
    m = common.model(model)
    m2 = common.second_model(m, compare_model)
    c, img = m.config, demo.choose_image(m, image, example)
    snr = demo.number("snr_db", snr_db, -100.0, 200.0)
    r = demo.stability_one(m, img, snr, check_seed(seed))
    curve = m.stability_curve()
    seen, grey = demo.seen_image(m, img)
    check = ood.distance_check(m, img)
    pair = viz.side_by_side([viz.upscale(seen, 256), viz.upscale(r["noisy"], 256)])
    rates = (f"{_rates(m, r, snr)}. The curve averages the {curve['num_images']} example images (noise seed 0).")
    if grey:
        rates += " " + demo.GREY_NOTE + " The noise is added to that grey image."
    if notice := ood.distance_notice(check):
        rates = notice + "\n\n" + rates
    data = _numbers(r) | {"model": c.name, "distance_check": check, "curve": curve}
    fig = viz.stability_figure(curve["snr_db"], curve["vq_change"], curve["disc_change"],
                               current=(snr, r["vq_change_rate"], r["disc_change_rate"]))
    disc = None if c.is_vq else viz.change_figure(r["disc_changed"], "Discriminative tokens changed (red)")
    other = None
    if m2 is not None:   # the same noise (image, SNR, seed) on the second bundle's tokenizers
        r2 = demo.stability_one(m2, img, snr, check_seed(seed))
        rates += f"\n\n**{m2.config.name}**, same noise: {_rates(m2, r2, snr)}."
        data["compare"] = _numbers(r2) | {"model": m2.config.name}
        other = _stage1_changes(m2, r2, f"{m2.config.name}: ")
    return (common.png(pair), disc, viz.change_figure(r["vq_changed"], "VQ tokens changed (red)"), rates, fig, data,
            other)


def initial(model: str | None) -> tuple:
    """What the tab shows on load: the first example at the default SNR."""
    m, _ = common.registry().try_get(model)
    names = m.example_names() if m else []
    if not names:
        return tuple(gr.skip() for _ in range(7))
    return stability(None, names[0], DEFAULT_SNR, 0, model, None)


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
            compare = common.compare_dropdown()
            btn = gr.Button("Add noise", variant="primary", elem_id="stability-btn")
            rates = gr.Markdown(label="change rates")
        with gr.Column(scale=2):
            pair = gr.Image(label="Clean | noisy", interactive=False, format="png")
            with gr.Row():
                disc = gr.Plot(label="Discriminative-token changes")
                vq = gr.Plot(label="VQ-token changes")
            with gr.Row(visible=False) as second:   # its own row: three maps side by side cut the heatmaps
                other = gr.Plot(label="Compared bundle: its stage-1 tokens' changes")
                gr.Markdown("Each bundle's own noisy copy of the image is the same (image, SNR and noise seed); "
                            "this map shows the tokens the compared bundle's stage 1 models.")
            caption = gr.Markdown(visible=False)
            curve = gr.Plot(label="Change rate vs SNR")
            with gr.Accordion("Numbers (JSON)", open=False):
                data = gr.JSON(label="numbers")
    outputs = [pair, disc, vq, rates, curve, data, other]
    inputs = [*image.inputs, snr, seed, model_dd, compare]
    btn.click(stability, inputs, outputs, api_name="stability")
    image.wire(model_dd, stability, outputs, inputs)
    snr.release(stability, inputs, outputs, api_visibility="private")
    common.wire_compare(compare, model_dd, second, caption)
    return View(image, outputs)

