"""Figures of a run, drawn with Pillow (docs/method.md section 4): loss curves, routing, cross-modal similarity.

Three drawing primitives, `line_panels` (curves with labelled axes, ticks and a legend),
`heatmap` (a matrix in coloured cells with labelled row and column groups) and `bar_chart`
(ablations.py's), and the three figures eval.py writes into the run folder.
"""

import json
import math
import os

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

FONT = ImageFont.load_default(size=13)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def colour(value):
    """0..1 -> a dark-blue..yellow colour ramp (viridis-like)."""
    stops = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    x = min(max(value, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    return tuple(round(a + (b - a) * (x - i)) for a, b in zip(stops[i], stops[i + 1]))


def text_width(text):
    return int(FONT.getlength(text))


def line_panels(panels, path, x_label, y_label, size=(380, 280)):
    """panels: [(title, {series name: (xs, ys, dashed)})] side by side, each with both axes labelled,
    ticks, a legend, and a dot on every point (a series of one point is still visible)."""
    w, h = size
    legend_w = max(text_width(name) for _, series in panels for name in series) + 16
    img = Image.new("RGB", (len(panels) * (w + legend_w), h), "white")
    draw = ImageDraw.Draw(img)
    for p, (title, series) in enumerate(panels):
        x_off = p * (w + legend_w)
        left, top, right, bottom = x_off + 62, 28, x_off + w - 10, h - 44
        xs = [x for s in series.values() for x in s[0]] or [0, 1]
        ys = [y for s in series.values() for y in s[1]] or [0, 1]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
        to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, 6), title, fill="black", font=FONT)
        for k in range(5):
            yv = y0 + (y1 - y0) * k / 4
            draw.text((left - 6 - text_width(f"{yv:.2f}"), to_px(x0, yv)[1] - 7), f"{yv:.2f}", fill="black", font=FONT)
        x_ticks = range(int(x0), int(x1) + 1) if x1 - x0 <= 8 else [x0 + (x1 - x0) * k / 4 for k in range(5)]
        for xv in x_ticks:  # whole numbers: steps and layers
            label = f"{xv:.0f}"
            draw.text((to_px(xv, y0)[0] - text_width(label) / 2, bottom + 4), label, fill="black", font=FONT)
        draw.text(((left + right - text_width(x_label)) / 2, bottom + 22), x_label, fill="black", font=FONT)
        label = Image.new("RGB", (text_width(y_label) + 4, 16), "white")
        ImageDraw.Draw(label).text((2, 0), y_label, fill="black", font=FONT)
        img.paste(label.rotate(90, expand=True), (x_off + 2, int((top + bottom - label.width) / 2)))
        for k, (name, (sx, sy, dashed)) in enumerate(series.items()):
            c = PALETTE[k % len(PALETTE)]
            points = [to_px(x, y) for x, y in zip(sx, sy)]
            for a, b in zip(points, points[1:]):
                if dashed:  # a dashed segment: every other tenth of it
                    for t in range(0, 10, 2):
                        draw.line([tuple(a[i] + (b[i] - a[i]) * t / 10 for i in range(2)),
                                   tuple(a[i] + (b[i] - a[i]) * (t + 1) / 10 for i in range(2))], fill=c, width=2)
                else:
                    draw.line([a, b], fill=c, width=2)
            for x, y in points:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c)
            draw.text((right + 8, top + 15 * k), name, fill=c, font=FONT)
    img.save(path)


def heatmap(matrix, rows, cols, path, title, lo=None, hi=None, cell=12):
    """A matrix as coloured cells, NaN cells light grey. `rows`/`cols`: [(label, number of cells)]
    groups, each labelled in full once and separated by white lines; a colour scale from lo to hi on
    the right."""
    n_rows, n_cols = matrix.shape
    known = matrix[~torch.isnan(matrix)]
    lo = float(known.min()) if lo is None else lo
    hi = float(known.max()) if hi is None else hi
    pad_l = 12 + max(text_width(label) for label, _ in rows)
    pad_t = 40 + max(text_width(label) for label, _ in cols)  # column labels are written upwards
    width = max(pad_l + n_cols * cell + 80, text_width(title) + 12)
    img = Image.new("RGB", (width, pad_t + n_rows * cell + 12), "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 6), title, fill="black", font=FONT)
    for i in range(n_rows):
        for j in range(n_cols):
            x, y = pad_l + j * cell, pad_t + i * cell
            value = float(matrix[i, j])
            fill = (225, 225, 225) if math.isnan(value) else colour((value - lo) / max(hi - lo, 1e-9))
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fill)
    start = 0
    for label, size in rows:
        draw.text((6, pad_t + (start + size / 2) * cell - 7), label, fill="black", font=FONT)
        if start:
            draw.line([pad_l, pad_t + start * cell, pad_l + n_cols * cell, pad_t + start * cell], fill="white", width=2)
        start += size
    start = 0
    for label, size in cols:
        tile = Image.new("RGB", (text_width(label) + 4, 16), "white")
        ImageDraw.Draw(tile).text((2, 0), label, fill="black", font=FONT)
        tile = tile.rotate(90, expand=True)
        img.paste(tile, (int(pad_l + (start + size / 2) * cell - 8), pad_t - 4 - tile.height))
        if start:
            draw.line([pad_l + start * cell, pad_t, pad_l + start * cell, pad_t + n_rows * cell], fill="white", width=2)
        start += size
    bar_x, height = pad_l + n_cols * cell + 14, n_rows * cell
    for k in range(height):
        draw.line([bar_x, pad_t + k, bar_x + 12, pad_t + k], fill=colour(1 - k / max(height - 1, 1)))
    draw.text((bar_x + 16, pad_t - 6), f"{hi:.2f}", fill="black", font=FONT)
    draw.text((bar_x + 16, pad_t + height - 8), f"{lo:.2f}", fill="black", font=FONT)
    img.save(path)


def bar_chart(bars, path, title, y_label):
    """bars: [(label, value, whisker)] as bars from zero with +-whisker lines and their value, the zero
    line drawn, labels written upwards under the plot (values may be negative: paired differences)."""
    bar_w, gap, left, top, plot_h = 44, 22, 78, 34, 260
    label_h = max(text_width(label) for label, _, _ in bars) + 10
    plot_right = left + len(bars) * (bar_w + gap)
    ends = [v + s for _, v, s in bars] + [v - s for _, v, s in bars] + [0.0]
    lo, hi = min(ends), max(ends)
    lo, hi = lo - 0.08 * (hi - lo or 1), hi + 0.08 * (hi - lo or 1)
    img = Image.new("RGB", (max(plot_right + 20, text_width(title) + 20), top + plot_h + label_h + 10), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black", font=FONT)
    bottom = top + plot_h
    to_y = lambda v: bottom - (v - lo) / (hi - lo) * plot_h
    draw.line([left, top, left, bottom, plot_right, bottom], fill="black")
    for k in range(6):
        v = lo + (hi - lo) * k / 5
        draw.text((left - 8 - text_width(f"{v:+.3f}"), to_y(v) - 7), f"{v:+.3f}", fill="black", font=FONT)
    draw.line([left, to_y(0), plot_right, to_y(0)], fill=(120, 120, 120), width=1)
    axis = Image.new("RGB", (text_width(y_label) + 4, 16), "white")
    ImageDraw.Draw(axis).text((2, 0), y_label, fill="black", font=FONT)
    img.paste(axis.rotate(90, expand=True), (4, int(top + (plot_h - axis.width) / 2)))
    for i, (label, value, whisker) in enumerate(bars):
        x = left + gap / 2 + i * (bar_w + gap)
        draw.rectangle([x, min(to_y(value), to_y(0)), x + bar_w, max(to_y(value), to_y(0))], fill=PALETTE[i % len(PALETTE)])
        draw.line([x + bar_w / 2, to_y(value + whisker), x + bar_w / 2, to_y(value - whisker)], fill="black", width=2)
        draw.text((x, to_y(max(value + whisker, 0)) - 16), f"{value:+.3f}", fill="black", font=FONT)
        tile = Image.new("RGB", (text_width(label) + 4, 16), "white")
        ImageDraw.Draw(tile).text((2, 0), label, fill="black", font=FONT)
        img.paste(tile.rotate(90, expand=True), (int(x + bar_w / 2 - 8), bottom + 6))
    img.save(path)


def loss_figure(out):
    """OUT/loss_curves.png: every stage's loss from OUT/log.jsonl; for UniAlign also L_bind, L_anchor, L_prior."""
    curves = {}
    with open(os.path.join(out, "log.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            stage, _, name = rec["stage"].partition(":")
            for key in ([name or "loss"] if stage != "unialign" else ["loss", "bind", "anchor", "prior"]):
                xs, ys, _ = curves.setdefault(stage, {}).setdefault(key, ([], [], False))
                xs.append(rec["step"])
                ys.append(rec["loss"] if key in ("loss", name) else rec[key])
    titles = {"anchor": "anchor CLIP (Eq. 5)", "specialist": "specialists (Eq. 5)", "unialign": "UniAlign (Eq. 10)"}
    line_panels([(titles[s], curves[s]) for s in titles if s in curves], os.path.join(out, "loss_curves.png"),
                "optimizer step", "loss")


def routing_figure(out, entropy, experts):
    """OUT/routing.png: per layer, the mean entropy of each token's routing distribution (Eq. 2's softmax),
    for every modality's trained router and for an untrained router on the same tokens.

    entropy: {modality: {"trained": [per layer], "untrained": [per layer]}}. Eq. 3 pushes each
    modality's *mean* gate towards uniform, so the mean gate cannot show routing; a token's own
    distribution can: below the untrained level, routers send tokens decisively to some experts.
    """
    series = {}
    for m, e in entropy.items():
        layers = list(range(len(e["trained"])))
        series[f"{m} trained"] = (layers, e["trained"], False)
    untrained = [sum(e["untrained"][layer] for e in entropy.values()) / len(entropy) for layer in layers]
    series["untrained (mean)"] = (layers, untrained, True)
    series[f"uniform, ln {experts}"] = (layers, [math.log(experts)] * len(layers), True)
    line_panels([("routing entropy per token (nats)", series)], os.path.join(out, "routing.png"),
                "ViT block (layer)", "entropy (nats)", size=(520, 320))


def similarity_figure(out, embeddings, concepts):
    """OUT/similarity.png: cosine similarity of concept-mean embeddings of every modality, blocks in
    the same concept order. embeddings: {modality: (z (N, D), the concept of each item)}; concepts:
    the order of every block's rows. A concept a modality does not cover is grey."""
    means = []
    for z, of in embeddings.values():
        for c in concepts:
            rows = torch.tensor([x == c for x in of])
            means.append(F.normalize(z[rows].mean(0), dim=-1) if rows.any() else torch.full((z.shape[1],), math.nan))
    means = torch.stack(means)
    groups = [(m, len(concepts)) for m in embeddings]
    heatmap(means @ means.T, groups, groups, os.path.join(out, "similarity.png"),
            "cosine similarity of concept-mean embeddings (same concept order in every block)", cell=6)
