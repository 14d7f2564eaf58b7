"""Pictures of the tools: per-image restoration strips, a contact sheet (grid.png + index.html), and
histograms of energies per image set."""
from __future__ import annotations

import html
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_PANEL_SIDE = 128  # a panel is enlarged (nearest neighbour) to at least this along each axis, so labels fit
MAX_PANEL_SIDE = 512  # ... but uniform enlargement stops at this longer side (a thin image is then stretched)
MAX_STEP_PANELS = 8  # a longer descent shows this many steps, evenly spaced, the last included
LABEL_HEIGHT = 42  # three lines: panel name, PSNR and SSIM, energy
GAP = 4
GRID_ROWS = 16
GRID_MAX_WIDTH = 1600


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def to_pil(x01: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image (rounded to 8 bits)."""
    arr = (x01.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def shown_steps(n: int, limit: int = MAX_STEP_PANELS) -> List[int]:
    """Step numbers (1-based) drawn in a strip: all when n <= limit, else ``limit`` evenly spaced incl. n."""
    if n <= limit:
        return list(range(1, n + 1))
    return sorted({int(round(1 + (n - 1) * i / (limit - 1))) for i in range(limit)})


def strip(result) -> Image.Image:
    """clean | corrupted | after each step (a RestorationResult); labels: PSNR (dB), SSIM, energy E."""
    panels, labels = [], []
    if result.clean is not None:
        panels.append(result.clean)
        labels.append(("clean", "", ""))
    first = "corrupted" if result.task else "input"
    if result.task:
        first += f" ({result.task})"
    panels.append(result.corrupted)
    labels.append((first, *_metric_lines(result.psnr_corrupted, result.ssim_corrupted, result.energies[0])))
    n = len(result.steps)
    for t in shown_steps(n):
        panels.append(result.steps[t - 1])
        last = t == n
        psnr = result.psnr_steps[t - 1] if result.psnr_steps else None
        labels.append((f"step {t}" + (" (restored)" if last and n > 1 else ""),
                       *_metric_lines(psnr, result.ssim_restored if last else None, result.energies[t])))
    h, w = panels[0].shape[-2:]
    ph, pw = panel_size(h, w)
    canvas = Image.new("RGB", (len(panels) * (pw + GAP) - GAP, ph + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for i, (panel, lines) in enumerate(zip(panels, labels)):
        im = to_pil(panel)
        if (ph, pw) != (h, w):
            im = im.resize((pw, ph), Image.NEAREST)
        x0 = i * (pw + GAP)
        canvas.paste(im, (x0, LABEL_HEIGHT))
        for row, text in enumerate(lines):
            draw.text((x0 + 2, 1 + 13 * row), text, fill="black" if row == 0 else (60, 60, 60), font=font)
    return canvas


def panel_size(h: int, w: int) -> Tuple[int, int]:
    """(height, width) of a strip panel for an h x w image: enlarged by one integer factor until the
    shorter side reaches MIN_PANEL_SIDE, as long as the longer side stays within MAX_PANEL_SIDE; an
    axis still under MIN_PANEL_SIDE (a thin image, e.g. 200x3) is then stretched alone to reach it.
    Images with both sides >= MIN_PANEL_SIDE keep their size."""
    scale = max(1, min(math.ceil(MIN_PANEL_SIDE / min(h, w)), MAX_PANEL_SIDE // max(h, w)))
    ph, pw = h * scale, w * scale
    if ph < MIN_PANEL_SIDE:
        ph = h * math.ceil(MIN_PANEL_SIDE / h)
    if pw < MIN_PANEL_SIDE:
        pw = w * math.ceil(MIN_PANEL_SIDE / w)
    return ph, pw


def _metric_lines(psnr: Optional[float], ssim: Optional[float], energy: float) -> Tuple[str, str]:
    parts = []
    if psnr is not None:
        parts.append(f"{psnr:.2f} dB")
    if ssim is not None:
        parts.append(f"SSIM {ssim:.3f}")
    return " ".join(parts), f"E {energy:.4g}"


def grid(strips: Sequence[Image.Image], max_width: int = GRID_MAX_WIDTH, rows: int = GRID_ROWS) -> Image.Image:
    """The first ``rows`` strips stacked vertically, each shrunk to at most ``max_width`` px wide."""
    shown = []
    for im in list(strips)[:rows]:
        if im.width > max_width:
            im = im.resize((max_width, max(1, round(im.height * max_width / im.width))), Image.LANCZOS)
        shown.append(im)
    width = max(im.width for im in shown)
    canvas = Image.new("RGB", (width, sum(im.height + GAP for im in shown) - GAP), "white")
    y = 0
    for im in shown:
        canvas.paste(im, (0, y))
        y += im.height + GAP
    return canvas


def contact_sheet(title: str, rows: Sequence[Dict[str, str]], columns: Sequence[str], summary: str = "") -> str:
    """index.html: one table row per image: ``path``, its strip (``strip``, a relative path) and ``columns``."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["image", "strip", *columns])
    body = []
    for row in rows:
        cells = [f"<td>{html.escape(str(row['path']))}</td>",
                 f"<td><a href=\"{html.escape(row['strip'])}\"><img src=\"{html.escape(row['strip'])}\" "
                 f"style=\"max-width:900px\"></a></td>"]
        cells += [f"<td>{html.escape(_cell(row.get(c)))}</td>" for c in columns]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif}td,th{border-bottom:1px solid #ddd;padding:4px;"
            "vertical-align:top;font-size:13px}</style></head>\n<body>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>\n<table><tr>{head}</tr>\n"
            + "\n".join(body) + "\n</table></body></html>\n")


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def energy_histograms(per_model: Dict[str, Dict[str, np.ndarray]], captions: Dict[str, str], path: str,
                      xlabel: str = "energy E(x)") -> str:
    """One panel per model with a histogram of the energies of each set (shared bins per panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .output import save_figure

    n = len(per_model)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8), dpi=100, squeeze=False)
    for ax, (model, sets) in zip(axes[0], per_model.items()):
        finite = np.concatenate([v[np.isfinite(v)] for v in sets.values()])
        bins = np.histogram_bin_edges(finite, bins=40) if finite.size else 10
        for i, (name, values) in enumerate(sets.items()):
            ax.hist(values[np.isfinite(values)], bins=bins, alpha=0.5, density=True, label=name, color=f"C{i}")
        ax.set_title(f"{model}\n{captions.get(model, '')}", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return path
