"""The About tab: the model card, the paper, how to serve your own bundle."""
from __future__ import annotations

import re

import gradio as gr

from digit_core import demo

from .common import PAPER


def card_markdown(card: str) -> str:
    """A model card as Markdown that renders as written: a wrapped line starting with ``>=`` or
    ``>90%`` is a comparison, not a block quote (``> text`` still is one)."""
    return re.sub(r"^(\s*)>(?=[=\d])", r"\1\\>", card, flags=re.M)


def text(m: demo.Model | None, problem: str | None = None) -> str:
    card = m.model_card() if m else None
    card = card_markdown(card) if card else ("*This bundle ships no MODEL_CARD.md.*" if m else
                                             f"*No model loaded.* {problem}")
    return f"""## Model card
{card}

## The paper
Yongxin Zhu, Bocheng Li, Hang Zhang, Xin Li, Linli Xu, Lidong Bing, *Stabilize the Latent Space for Image
Autoregressive Modeling: A Unified Perspective*, NeurIPS 2024, {PAPER}. A frozen self-supervised encoder's patch
features, clustered with K-Means, give *discriminative tokens*; a GPT generates them (stage 1), a second GPT maps
them to VQGAN tokens (stage 2), and the VQGAN decoder renders pixels.

## Your own bundle
Export a saved model: `python -m digit_core.export --model MODEL_DIR --out exported/NAME`, then
`python app.py --model exported/NAME` (every folder in `exported/` is listed in the model selector).
Options: `--device auto|cpu|cuda`, `--host`, `--port`, `--auth USER:PASSWORD`, `--share`. The API (`/sample`,
`/tokenize`, `/complete`, `/stability`) is described in README.md and under "Use via API" below.
"""


def build(m: demo.Model | None, problem: str | None) -> gr.Markdown:
    return gr.Markdown(text(m, problem))
