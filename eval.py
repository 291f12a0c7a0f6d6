"""Evaluation of a run folder (docs/method.md section 4): one table with every benchmark, and figures.

  python eval.py --ckpt out/ckpt.pt        # also called by train.py at the end

For every extended modality of the test split:
- zero-shot classification: class names in the modality's prompt templates, prompt embeddings
  averaged; top-1, top-5 and mAP (one-vs-rest average precision over classes, so multi-label
  sets are scored the same way);
- retrieval x -> text and text -> x over the split's distinct captions, R@1/5/10 (an item may
  have several correct captions, a caption several correct items);
- emergent retrieval, R@1 by concept, between two extended modalities and between an extended
  modality and images: pairs that no dataset ever paired;
- the raw-input baseline (nearest class mean), the specialists beside UniAlign with their
  trainable parameter counts, and the routers' mean gate per modality, layer and expert.

Writes OUT/metrics.json, OUT/metrics.md and three PNG figures drawn with Pillow: loss curves,
the router heat map and a cross-modal similarity matrix of concept-mean embeddings.
It also holds what train.py and eval.py share: building the datasets and the anchor CLIP from a
run configuration, and embedding a dataset.
"""
import argparse
import copy
import json
import os

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from PIL import Image, ImageDraw, ImageFont

from checkpoint import load_checkpoint
from data import build_datasets, nearest_class_mean_top1
from encoder import embed, encode_texts, load_anchor, load_model
from modalities import MODALITIES


# ----------------------------------------------------------------------------- metrics

@torch.no_grad()
def router_mean_gate(model, dataset, device, chunk=128):
    """The routers' mean gate (layers, E) over a dataset, each layer's adapters averaged."""
    total = 0
    for i in range(0, len(dataset), chunk):
        x = torch.stack([dataset[k]["input"] for k in range(i, min(i + chunk, len(dataset)))]).to(device)
        stats = model.encode(dataset.modality, x)[1]
        total = total + torch.stack([s["P"].float().cpu() for s in stats]) * len(x)  # (adapters, E)
    per_adapter = total / len(dataset)
    return reduce(per_adapter, "(layer t) e -> layer e", "mean", layer=len(model.clip.visual.transformer.resblocks))


def topk_accuracy(scores, labels, k):
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(1).float().mean().item()


def recall_at(scores, positives, k):
    """Fraction of queries (rows) with a positive among their top-k gallery items (columns)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return positives.gather(1, top).any(1).float().mean().item()


def mean_average_precision(scores, labels):
    """Macro mAP over classes: each class ranks all items by its score; AP averages precision at the hits."""
    relevant = F.one_hot(labels, scores.shape[1]).bool()
    order = scores.argsort(dim=0, descending=True)
    hits = relevant.gather(0, order).float()  # (N, C) in ranked order
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)[:, None]
    present = hits.sum(0) > 0
    return ((precision * hits).sum(0)[present] / hits.sum(0)[present]).mean().item()


def zero_shot(z, labels, class_text):
    scores = z @ class_text.T
    return {"top1": topk_accuracy(scores, labels, 1), "top5": topk_accuracy(scores, labels, 5),
            "map": mean_average_precision(scores, labels)}


def class_embeddings(clip, bpe, modality, class_names, device):
    """One text embedding per class: the modality's prompt templates, averaged, renormalised."""
    templates = MODALITIES[modality].prompts
    t = encode_texts(clip, bpe, [tpl.format(c) for c in class_names for tpl in templates], device)
    return F.normalize(reduce(t, "(c k) d -> c d", "mean", k=len(templates)), dim=-1)


def retrieval(z, captions, clip, bpe, device):
    """x -> text and text -> x over the distinct captions; positives are equal caption strings."""
    gallery = sorted(set(captions))
    t = encode_texts(clip, bpe, gallery, device).cpu()
    positives = torch.tensor([[c == g for g in gallery] for c in captions])
    scores = z @ t.T
    return {"x2t": {f"R@{k}": recall_at(scores, positives, k) for k in (1, 5, 10)},
            "t2x": {f"R@{k}": recall_at(scores.T, positives.T, k) for k in (1, 5, 10)}}


def emergent_r1(za, la, names_a, zb, lb, names_b):
    """R@1 of retrieving a same-concept item of modality b for each item of modality a."""
    common = {n: k for k, n in enumerate(names_b)}
    la_in_b = torch.tensor([common.get(names_a[k], -1) for k in la])
    positives = la_in_b[:, None] == lb[None, :]
    return recall_at(za @ zb.T, positives, 1)


# ----------------------------------------------------------------------------- figures (Pillow)

FONT = ImageFont.load_default(size=13)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def colour(value):
    """0..1 -> a dark-blue..yellow colour ramp (viridis-like)."""
    stops = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    x = min(max(value, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    return tuple(round(a + (b - a) * (x - i)) for a, b in zip(stops[i], stops[i + 1]))


def line_panels(panels, path, size=(360, 260)):
    """panels: [(title, {series name: (xs, ys)})] side by side, each with axes, ticks and a legend."""
    w, h = size
    img = Image.new("RGB", (w * len(panels), h), "white")
    draw = ImageDraw.Draw(img)
    for p, (title, series) in enumerate(panels):
        left, top, right, bottom = p * w + 50, 25, p * w + w - 15, h - 35
        xs = [x for s in series.values() for x in s[0]] or [0, 1]
        ys = [y for s in series.values() for y in s[1]] or [0, 1]
        x0, x1, y0, y1 = min(xs), max(xs) or 1, min(ys), max(ys)
        y1 = y1 if y1 > y0 else y0 + 1
        to_px = lambda x, y: (left + (x - x0) / max(x1 - x0, 1e-9) * (right - left),
                              bottom - (y - y0) / (y1 - y0) * (bottom - top))
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, 6), title, fill="black", font=FONT)
        for k in range(5):
            yv = y0 + (y1 - y0) * k / 4
            draw.text((p * w + 4, to_px(x0, yv)[1] - 5), f"{yv:.2f}", fill="black", font=FONT)
            xv = x0 + (x1 - x0) * k / 4
            draw.text((to_px(xv, y0)[0] - 8, bottom + 4), f"{xv:.0f}", fill="black", font=FONT)
        draw.text(((left + right) // 2 - 10, bottom + 18), "step", fill="black", font=FONT)
        for k, (name, (sx, sy)) in enumerate(series.items()):
            c = PALETTE[k % len(PALETTE)]
            if len(sx) > 1:
                draw.line([to_px(x, y) for x, y in zip(sx, sy)], fill=c, width=2)
            draw.text((right - 70, top + 4 + 11 * k), name, fill=c, font=FONT)
    img.save(path)


def heatmap(matrix, rows, cols, path, title, lo=None, hi=None, cell=12):
    """A matrix as coloured cells. `rows`/`cols`: [(label, number of cells)] groups, labelled once each
    and separated by white lines; a colour scale from lo to hi on the right."""
    n_rows, n_cols = matrix.shape
    lo = float(matrix.min()) if lo is None else lo
    hi = float(matrix.max()) if hi is None else hi
    pad_l, pad_t = 10 + 8 * max(len(label) for label, _ in rows), 50
    width = max(pad_l + n_cols * cell + 80, int(FONT.getlength(title)) + 12)
    img = Image.new("RGB", (width, pad_t + n_rows * cell + 12), "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 6), title, fill="black", font=FONT)
    for i in range(n_rows):
        for j in range(n_cols):
            x, y = pad_l + j * cell, pad_t + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1],
                           fill=colour((float(matrix[i, j]) - lo) / max(hi - lo, 1e-9)))
    start = 0
    for label, size in rows:
        draw.text((6, pad_t + (start + size / 2) * cell - 7), label, fill="black", font=FONT)
        if start:
            draw.line([pad_l, pad_t + start * cell, pad_l + n_cols * cell, pad_t + start * cell], fill="white", width=2)
        start += size
    start = 0
    for label, size in cols:
        draw.text((pad_l + (start + size / 2) * cell - 4 * len(label), pad_t - 18), label, fill="black", font=FONT)
        if start:
            draw.line([pad_l + start * cell, pad_t, pad_l + start * cell, pad_t + n_rows * cell], fill="white", width=2)
        start += size
    bar_x, height = pad_l + n_cols * cell + 14, n_rows * cell
    for k in range(height):
        draw.line([bar_x, pad_t + k, bar_x + 12, pad_t + k], fill=colour(1 - k / max(height - 1, 1)))
    draw.text((bar_x + 16, pad_t - 6), f"{hi:.2f}", fill="black", font=FONT)
    draw.text((bar_x + 16, pad_t + height - 8), f"{lo:.2f}", fill="black", font=FONT)
    img.save(path)


def loss_figure(out):
    """Loss curves of every stage from OUT/log.jsonl."""
    curves = {}
    with open(os.path.join(out, "log.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            stage = rec["stage"].split(":")[0]
            name = rec["stage"].split(":")[1] if ":" in rec["stage"] else "loss"
            for key in ([name] if stage != "unialign" else ["loss", "bind", "anchor", "prior"]):
                xs, ys = curves.setdefault(stage, {}).setdefault(key, ([], []))
                xs.append(rec["step"])
                ys.append(rec["loss"] if key in ("loss", name) else rec[key])
    titles = {"anchor": "anchor CLIP (Eq. 5)", "specialist": "specialists (Eq. 5)", "unialign": "UniAlign (Eq. 10)"}
    line_panels([(titles[s], curves[s]) for s in titles if s in curves], os.path.join(out, "loss_curves.png"))


# ----------------------------------------------------------------------------- the evaluation

def evaluate(out, device="cpu"):
    """Every benchmark of a finished run folder -> metrics.json, metrics.md and the figures."""
    ckpt_path = os.path.join(out, "ckpt.pt")
    config = load_checkpoint(ckpt_path)["config"]
    config["out"] = out
    clip, bpe = load_anchor(config)
    clip = clip.to(device).eval()
    model, _ = load_model(ckpt_path, clip, device)
    tests = build_datasets(config, "test")
    trains = build_datasets(config, "train", config.get("modalities"))  # for the raw baseline; not the anchor's image-text set
    modalities = model.modalities
    metrics = {"unialign": {"zero_shot_top1": {}, "zero_shot_top5": {}, "map": {}, "retrieval": {},
                            "trainable_params": model.count_trainable()["total"],
                            "trainable_by_part": model.count_trainable(), "router_mean_gate": {}},
               "specialists": {"zero_shot_top1": {}, "trainable_params": 0},
               "raw_baseline": {"zero_shot_top1": {}}, "emergent_r1": {}}
    emb = {}
    for m in modalities:
        ds = tests[m]
        z, labels = embed(model, ds, device)
        gate = router_mean_gate(model, ds, device)
        emb[m] = (z, labels, ds.class_names)
        scores = zero_shot(z, labels, class_embeddings(clip, bpe, m, ds.class_names, device).cpu())
        u = metrics["unialign"]
        u["zero_shot_top1"][m], u["zero_shot_top5"][m], u["map"][m] = scores["top1"], scores["top5"], scores["map"]
        u["retrieval"][m] = retrieval(z, [ds[i]["text"] for i in range(len(ds))], clip, bpe, device)
        u["router_mean_gate"][m] = gate.tolist()
        metrics["raw_baseline"]["zero_shot_top1"][m] = nearest_class_mean_top1(trains[m], ds)
        spec_path = os.path.join(out, f"specialist_{m}.pt")
        if os.path.exists(spec_path):
            spec, _ = load_model(spec_path, clip, device)
            zs, ls = embed(spec, ds, device)
            metrics["specialists"]["zero_shot_top1"][m] = zero_shot(
                zs, ls, class_embeddings(clip, bpe, m, ds.class_names, device).cpu())["top1"]
            metrics["specialists"]["trainable_params"] += spec.count_trainable()["total"]
    if "image" in tests:
        images = tests["image"]
        with torch.no_grad():
            z = torch.cat([model.encode("image", torch.stack([images[i]["input"] for i in range(k, min(k + 128, len(images)))]).to(device))[0].cpu()
                           for k in range(0, len(images), 128)])
        emb["image"] = (z, torch.tensor([images[i]["label"] for i in range(len(images))]), images.class_names)
    names = list(emb)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            metrics["emergent_r1"][f"{a}->{b}"] = emergent_r1(*emb[a], *emb[b])
    write_report(out, metrics, modalities)
    figures(out, metrics, emb, modalities)
    return metrics


def mean(values):
    return sum(values) / len(values) if values else float("nan")


def write_report(out, metrics, modalities):
    """metrics.json, and metrics.md: the table a report would show (also printed)."""
    u, s, raw = metrics["unialign"], metrics["specialists"], metrics["raw_baseline"]
    for block in (u["zero_shot_top1"], s["zero_shot_top1"], raw["zero_shot_top1"]):
        if block:
            block["mean"] = mean([block[m] for m in modalities if m in block])
    fmt = lambda d, m: f"{d[m]:.3f}" if m in d else "-"
    lines = ["| modality | raw NCM top-1 | specialist top-1 | UniAlign top-1 | UniAlign top-5 | mAP | x->t R@1 | t->x R@1 |",
             "|---|---|---|---|---|---|---|---|"]
    for m in modalities:
        r = u["retrieval"][m]
        lines.append(f"| {m} | {fmt(raw['zero_shot_top1'], m)} | {fmt(s['zero_shot_top1'], m)} | "
                     f"{fmt(u['zero_shot_top1'], m)} | {fmt(u['zero_shot_top5'], m)} | {fmt(u['map'], m)} | "
                     f"{r['x2t']['R@1']:.3f} | {r['t2x']['R@1']:.3f} |")
    lines.append(f"| **mean** | {fmt(raw['zero_shot_top1'], 'mean')} | {fmt(s['zero_shot_top1'], 'mean')} | "
                 f"**{fmt(u['zero_shot_top1'], 'mean')}** | | | | |")
    lines += ["", f"Trainable parameters: UniAlign {u['trainable_params']:,} (one model, every modality); "
                  f"specialists {s['trainable_params']:,} (one model per modality, together).", "",
              "Emergent retrieval R@1 by concept (pairs no dataset paired):", "",
              "| pair | R@1 |", "|---|---|"]
    lines += [f"| {pair} | {r1:.3f} |" for pair, r1 in metrics["emergent_r1"].items()]
    lines.append(f"| **mean** | {mean(list(metrics['emergent_r1'].values())):.3f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "metrics.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(table)


def figures(out, metrics, emb, modalities):
    """Loss curves, the router heat map, and the cross-modal similarity of concept-mean embeddings."""
    loss_figure(out)
    gates = metrics["unialign"]["router_mean_gate"]
    rows = torch.tensor([gates[m] for m in modalities])  # (M, layers, E)
    n_layers, n_experts = rows.shape[1:]
    heatmap(rearrange(rows, "m l e -> m (l e)"), [(m, 1) for m in modalities],
            [(f"L{l}", n_experts) for l in range(n_layers)], os.path.join(out, "router_gates.png"),
            f"router: mean gate per modality, layer L and expert ({n_experts} per layer)", lo=0.0, cell=16)
    concepts = emb[modalities[0]][2]
    names = [m for m in emb if list(emb[m][2]) == list(concepts)]
    means = []
    for m in names:
        z, labels, _ = emb[m]
        means += [F.normalize(z[labels == c].mean(0), dim=-1) if (labels == c).any() else torch.zeros(z.shape[1])
                  for c in range(len(concepts))]
    means = torch.stack(means)
    groups = [(m, len(concepts)) for m in names]
    heatmap(means @ means.T, groups, [(m[:5], len(concepts)) for m in names], os.path.join(out, "similarity.png"),
            "cosine similarity of concept-mean embeddings (same concept order in every block)", cell=6)


def main():
    p = argparse.ArgumentParser(description="Evaluate a UniAlign run folder (docs/method.md section 4).")
    p.add_argument("--ckpt", required=True, help="OUT/ckpt.pt of a finished train.py run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
    if not os.path.exists(args.ckpt):
        raise SystemExit(f"{args.ckpt}: no such checkpoint")
    evaluate(os.path.dirname(os.path.abspath(args.ckpt)), args.device)


if __name__ == "__main__":
    main()
