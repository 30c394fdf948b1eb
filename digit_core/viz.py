"""Pictures of tokens for the demo: plotly figures and Pillow overlays. numpy/plotly/Pillow only.

Token grids are shown as heatmaps in raster order (row 0 at the top, as in the image), so a
grid lines up with the image it came from.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from PIL import Image, ImageDraw, ImageFont

from .metrics import PAPER_TABLE1, SNR_LEVELS_DB

PROB_SCALE = "Viridis"
_MARGIN = dict(l=10, r=10, t=40, b=10)
# Token ids are categories, not magnitudes: each id gets one of these colours through a
# golden-ratio spread (``category_value``), so neighbouring ids look different and equal ids alike.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354",
           "#756bb1", "#636363", "#9ecae1", "#fdae6b", "#a1d99b", "#bcbddc", "#fdd0a2", "#c7e9c0", "#f7b6d2",
           "#c49c94", "#dbdb8d", "#9edae5", "#ad494a", "#e7ba52"]
CATEGORY_SCALE = [[v, c] for i, c in enumerate(PALETTE)
                  for v in (i / len(PALETTE), (i + 1) / len(PALETTE) - 1e-9 if i + 1 < len(PALETTE) else 1.0)]


# -- images ----------------------------------------------------------------------------------------
def upscale(img: np.ndarray, target: int = 256) -> np.ndarray:
    """Nearest-neighbour enlarge a uint8 ``[H, W, 3]`` image by an integer factor to >= ``target``."""
    f = max(1, int(np.ceil(target / img.shape[0])))
    return np.repeat(np.repeat(img, f, 0), f, 1)


def grid_overlay(img: np.ndarray, ids: np.ndarray | None, grid: int, target: int = 384) -> np.ndarray:
    """The image enlarged, with the token grid drawn over it and each cell's token id."""
    big = Image.fromarray(upscale(img, target))
    draw = ImageDraw.Draw(big, "RGBA")
    cell = big.width / grid
    for i in range(1, grid):
        p = round(i * cell)
        draw.line([(p, 0), (p, big.height)], fill=(255, 40, 40, 170), width=1)
        draw.line([(0, p), (big.width, p)], fill=(255, 40, 40, 170), width=1)
    if ids is not None and cell >= 14:
        font = _font(int(min(16, max(8, cell / 4))))
        for r in range(grid):
            for c in range(grid):
                x, y = round(c * cell) + 3, round(r * cell) + 3
                text = str(int(ids[r, c]))
                box = draw.textbbox((x, y), text, font=font)
                draw.rectangle(box, fill=(0, 0, 0, 150))
                draw.text((x, y), text, fill=(255, 255, 255, 255), font=font)
    return np.asarray(big)


def overlay_side(image_size: int, target: int = 384) -> int:
    """The side in pixels of ``grid_overlay``'s picture of a ``image_size`` image (what a click on it is relative to)."""
    return image_size * max(1, int(np.ceil(target / image_size)))


def mark_kept(img: np.ndarray, keep_rows: int, grid: int, dim: bool, target: int = 256) -> np.ndarray:
    """The image enlarged with a line under the kept token rows; ``dim`` greys out the rest
    (the original: what the model did not see)."""
    big = upscale(img, target).copy()
    y = round(keep_rows * big.shape[0] / grid)
    if dim:
        big[y:] = (big[y:].astype(np.float32) * 0.35 + 255 * 0.65 * 0.5).astype(np.uint8)
    big[max(0, y - 1): y + 2] = (255, 40, 40)
    return big


def side_by_side(images: Sequence[np.ndarray], gap: int = 6) -> np.ndarray:
    """Images of equal height next to each other on white."""
    h = max(i.shape[0] for i in images)
    w = sum(i.shape[1] for i in images) + gap * (len(images) - 1)
    out = np.full((h, w, 3), 255, np.uint8)
    x = 0
    for i in images:
        out[: i.shape[0], x: x + i.shape[1]] = i
        x += i.shape[1] + gap
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


# -- token grids -----------------------------------------------------------------------------------
def tile(grids: np.ndarray, cols: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``[B, n, n]`` -> one float array with the grids in rows of ``cols`` (NaN gaps), and the
    sample index of every cell (-1 in the gaps)."""
    B, n = grids.shape[0], grids.shape[1]
    cols = min(cols, B)
    rows = -(-B // cols)
    out = np.full((rows * (n + 1) - 1, cols * (n + 1) - 1), np.nan)
    which = np.full(out.shape, -1)
    for b in range(B):
        r, c = divmod(b, cols)
        out[r * (n + 1): r * (n + 1) + n, c * (n + 1): c * (n + 1) + n] = grids[b]
        which[r * (n + 1): r * (n + 1) + n, c * (n + 1): c * (n + 1) + n] = b
    return out, which


def category_value(ids: np.ndarray) -> np.ndarray:
    """Token ids -> values in [0, 1) for ``CATEGORY_SCALE``: one colour per id, spread so that
    neighbouring ids differ (NaN stays NaN: cells not generated yet)."""
    return np.mod(np.asarray(ids, dtype=np.float64) * 0.6180339887498949, 1.0)


def _heatmap_layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(title=dict(text=title, font=dict(size=14)), height=height, margin=_MARGIN,
                      plot_bgcolor="white", paper_bgcolor="white")
    fig.update_yaxes(autorange="reversed", showticklabels=False, showgrid=False, zeroline=False,
                     scaleanchor="x", constrain="domain")
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, constrain="domain")
    return fig


def generation_figure(codes: np.ndarray, probs: np.ndarray | None, vocab: int, color_by: str = "id",
                      title: str = "", height: int = 360, keep_rows: int | None = None,
                      labels: Sequence[str] | None = None) -> go.Figure:
    """Stage-1 grids ``[B, n, n]`` of a batch, tiled four to a row, each titled with its entry of
    ``labels`` (e.g. sample number and class); NaN cells (not generated yet) stay blank.
    ``color_by`` "id" colours each token id as a category, "probability" by the probability each
    token had; ``keep_rows`` draws a line under the rows a completion kept."""
    ids, which = tile(codes.astype(np.float64))
    p = tile(probs.astype(np.float64))[0] if probs is not None else np.full(ids.shape, np.nan)
    B, n = codes.shape[0], codes.shape[1]
    cols = min(4, B)
    rr, cc = np.indices(ids.shape)
    custom = np.stack([which + 1, rr % (n + 1), cc % (n + 1), np.nan_to_num(ids, nan=-1), np.nan_to_num(p, nan=-1)], -1)
    by_prob = color_by == "probability" and probs is not None
    fig = go.Figure(go.Heatmap(
        z=p if by_prob else category_value(ids), customdata=custom, colorscale=PROB_SCALE if by_prob else CATEGORY_SCALE,
        hoverongaps=False, zmin=0, zmax=1, xgap=1, ygap=1, showscale=by_prob,
        colorbar=dict(title=dict(text="p"), thickness=12),
        hovertemplate="sample %{customdata[0]} row %{customdata[1]} col %{customdata[2]}<br>"
                      "token %{customdata[3]}" + ("<br>p = %{customdata[4]:.3f}" if probs is not None else "")
                      + f"<br>({vocab} token ids)<extra></extra>"))
    for b in range(B):
        r, c = divmod(b, cols)
        if keep_rows:
            y = r * (n + 1) + keep_rows - 0.5
            fig.add_shape(type="line", x0=c * (n + 1) - 0.5, x1=c * (n + 1) + n - 0.5, y0=y, y1=y,
                          line=dict(color="black", width=4))
        if labels is not None:
            fig.add_annotation(x=c * (n + 1) + (n - 1) / 2, y=r * (n + 1) - 0.5, text=labels[b], showarrow=False,
                               yanchor="bottom", font=dict(size=11))
    fig = _heatmap_layout(fig, title, height)
    if labels is not None:   # room for the labels above each row of grids
        fig.update_yaxes(range=[ids.shape[0] - 0.5, -1.6], autorange=False)
    return fig


def token_figure(ids: np.ndarray, title: str, vocab: int, dists: np.ndarray | None = None,
                 sizes: np.ndarray | None = None, height: int = 360) -> go.Figure:
    """One token grid ``[n, n]``: hover shows row, column, token id, and where given the squared
    distance to the centroid and the cluster's size."""
    n = ids.shape[0]
    rr, cc = np.indices(ids.shape)
    d = dists if dists is not None else np.full(ids.shape, np.nan)
    s = sizes[ids] if sizes is not None else np.full(ids.shape, np.nan)
    custom = np.stack([rr, cc, d, s], -1)
    hover = "row %{customdata[0]} col %{customdata[1]}<br>token %{text}"
    if dists is not None:
        hover += "<br>distance² to centroid %{customdata[2]:.3f}"
    if sizes is not None:
        hover += "<br>cluster size %{customdata[3]:,.0f}"
    fig = go.Figure(go.Heatmap(
        z=category_value(ids), customdata=custom, colorscale=CATEGORY_SCALE, zmin=0, zmax=1, xgap=1, ygap=1,
        text=ids if n <= 16 else None, texttemplate="%{text}" if n <= 16 else None, showscale=False,
        textfont=dict(size=max(7, 16 - n // 2)), hovertemplate=hover + f"<br>({vocab} token ids)<extra></extra>"))
    return _heatmap_layout(fig, title, height)


def change_figure(changed: np.ndarray, title: str, height: int = 320) -> go.Figure:
    """Where a token grid changed (1) or stayed (0)."""
    fig = go.Figure(go.Heatmap(
        z=changed.astype(int), colorscale=[[0, "#e8f0fe"], [1, "#d62728"]], zmin=0, zmax=1, xgap=1, ygap=1,
        showscale=False, hovertemplate="row %{y} col %{x}<br>changed: %{z}<extra></extra>"))
    return _heatmap_layout(fig, title, height)


def histogram_figure(ids: np.ndarray, vocab: int, title: str = "Tokens used", height: int = 280) -> go.Figure:
    """Counts of each token id in ``ids`` (only the ids that occur)."""
    used, counts = np.unique(ids.ravel(), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    fig = go.Figure(go.Bar(x=[str(u) for u in used[order]], y=counts[order], marker_color="#4c78a8",
                           hovertemplate="token %{x}: %{y} patches<extra></extra>"))
    fig.update_layout(title=dict(text=f"{title}: {len(used)} distinct of {vocab}", font=dict(size=14)),
                      height=height, margin=_MARGIN, xaxis_title="token id (most used first)",
                      yaxis_title="patches", xaxis_type="category", plot_bgcolor="white")
    return fig


def stability_figure(snrs: Sequence[float], vq: Sequence[float], disc: Sequence[float] | None, height: int = 380,
                     current: tuple[float, float, float | None] | None = None) -> go.Figure:
    """Token change rate vs SNR for both tokenizers, with the paper's Table 1 beside them;
    ``current = (snr_db, vq_rate, disc_rate)`` marks one image's measurement on the curve.
    ``disc`` None: a VQ-token model, which has VQ tokens only."""
    x = [str(float(s)) for s in snrs]       # category names; callers adding traces use str() of the same floats
    px = [str(float(s)) for s in SNR_LEVELS_DB]
    fig = go.Figure()
    fig.add_scatter(x=x, y=list(vq), name="VQ tokens (this model)", mode="lines+markers", line=dict(color="#d62728"))
    if disc is not None:
        fig.add_scatter(x=x, y=list(disc), name="Disc. tokens (this model)", mode="lines+markers", line=dict(color="#1f77b4"))
    fig.add_scatter(x=px, y=list(PAPER_TABLE1["vq_change"]), name="VQ tokens (paper, ImageNet)",
                    mode="lines+markers", line=dict(color="#d62728", dash="dot"), marker=dict(symbol="x"))
    fig.add_scatter(x=px, y=list(PAPER_TABLE1["disc_change"]), name="Disc. tokens (paper, ImageNet)",
                    mode="lines+markers", line=dict(color="#1f77b4", dash="dot"), marker=dict(symbol="x"))
    order = sorted({float(s) for s in [*snrs, *SNR_LEVELS_DB]}, reverse=True)
    if current is not None:
        snr, vq_now, disc_now = current
        order = sorted({*order, float(snr)}, reverse=True)
        for rate, name, color in ((vq_now, "VQ", "#d62728"), (disc_now, "Disc.", "#1f77b4")):
            if rate is None:
                continue
            fig.add_scatter(x=[str(float(snr))], y=[rate], mode="markers", name=f"{name} tokens, this image",
                            marker=dict(symbol="star", size=16, color=color, line=dict(color="black", width=1)))
    fig.update_layout(title=dict(text="Token change rate vs SNR (lower = more stable)", font=dict(size=14)),
                      height=height, margin=dict(l=10, r=10, t=40, b=10), yaxis=dict(range=[0, 1.02], title="change rate"),
                      xaxis=dict(title="SNR (dB)", type="category", categoryorder="array",
                                 categoryarray=[str(s) for s in order]),
                      legend=dict(orientation="h", y=-0.25), plot_bgcolor="white")
    fig.update_yaxes(gridcolor="#eee")
    return fig
