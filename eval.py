"""Evaluation of a trained run (docs/method.md section 4): every number beside its chance level.

  python eval.py --ckpt out/ckpt.pt                  # the run's own test sets; train.py calls this at the end
  python eval.py --ckpt out/ckpt.pt --data esc50.jsonl --classes @classes.txt   # any manifest

For every extended modality of the test split:
- zero-shot classification: class names in the modality's prompt templates, prompt embeddings
  averaged; top-1 (chance 1/classes), top-5 where there are more than 5 classes, and mAP; with
  held-out concepts, top-1 on the seen and on the held-out concepts apart;
- retrieval x -> text and text -> x, counted by concept: a hit is a retrieved caption (or sample)
  that shows the query's concept, as multi-caption benchmarks count any of an item's captions;
  chance is the same count for a random ranking;
- retrieval between two modalities (R@1 by concept) for every pair, marked by whether training
  ever paired them (anchor images pair video, audio, point and depth with image): the unpaired
  pairs are the emergent ones;
- the raw-input nearest-class-mean baseline, the specialists beside UniAlign with their trainable
  parameter counts, and how decisively the routers route (figures.routing_figure).
The measures, each with its chance level, are metrics.py's. Writes OUT/metrics.json (which
describes itself: config, classes, chance), OUT/metrics.md and the figures of figures.py.
"""
import argparse
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import figures
from checkpoint import CheckpointError
from config import get_args
from data import build_datasets, nearest_class_mean_top1, sizes_of
from encoder import embed, encode_texts, load_model, load_run
from manifest import ManifestDataset, SampleError
from metrics import (ANCHOR, BINDING, TEXT, class_embeddings, concept_retrieval, connections, cross_modal_r1,
                     other_names, own_anchor_r1, renamed_queries, routing_entropy, zero_shot)
from modalities import MODALITIES

# ----------------------------------------------------------------------------- the evaluation

def finished_run(out, device, ckpt_path=None):
    """load_run, refusing in one line a run whose settings this code does not know in full (made by
    an older version of it)."""
    model, clip, bpe, config = load_run(out, device, ckpt_path)
    if missing := sorted(set(vars(get_args([]))) - set(config)):
        raise CheckpointError(f"{ckpt_path or os.path.join(out, 'ckpt.pt')} was made by an older version of this "
                              f"code (its settings lack {', '.join(missing[:5])}); train it again to evaluate it")
    return model, clip, bpe, config


def evaluate(out, device="cpu", ckpt_path=None, merged=False):
    """Every benchmark of a finished run folder -> metrics.json, metrics.md and the figures; the model
    is `ckpt_path`, by default OUT/ckpt.pt. With `merged`, also zero-shot top-1 with each modality's
    expected expert update folded into the weights (UniAlign.merge), beside the routed model's."""
    model, clip, bpe, config = finished_run(out, device, ckpt_path)
    modalities = model.modalities
    tests = build_datasets(config, "test", ["image", *modalities])
    trains = build_datasets(config, "train", modalities)  # the raw baseline's class means; what connects the pairs
    held_out = set(config.get("held_out") or [])
    counts = model.count_trainable()
    macs = [a.macs_per_token() for a in model.adapters]
    u = {"zero_shot_top1": {}, "other_names_top1": {}, "zero_shot_top5": {}, "map": {}, "retrieval": {},
         "own_anchor_r1": {}, "trainable_params": counts["total"], "trainable_by_part": counts, "routing_entropy": {},
         "adapter_macs_per_token": {k: sum(m[k] for m in macs) for k in ("routed", "computed")}}
    metrics = {"config": config, "classes": {}, "chance": {}, "unialign": u,
               "train_size": {m: len(ds) for m, ds in trains.items()},
               "train_captioned": {m: sum(c is not None for c in ds.captions) for m, ds in trains.items()},
               "specialists": {"zero_shot_top1": {}, "trainable_params": 0}, "prior": {"zero_shot_top1": {}},
               "raw_baseline": {"zero_shot_top1": {}}, "cross_modal": {}, "emergent_r1": {}}
    if held_out:
        u["seen_top1"], u["held_out_top1"] = {}, {}
    embeddings = {}
    for m in modalities:
        ds = tests[m]
        prompts = MODALITIES[m].prompts
        class_text = class_embeddings(clip, bpe, prompts, ds.class_names, device)
        z, labels = embed(model, ds, device)
        embeddings[m] = (z, [ds.class_concepts[k] for k in labels.tolist()])
        metrics["classes"][m], metrics["chance"][m] = list(ds.class_names), 1 / len(ds.class_names)
        scores = zero_shot(z, labels, class_text)
        u["zero_shot_top1"][m], u["map"][m] = scores["top1"], scores["map"]
        if "top5" in scores:
            u["zero_shot_top5"][m] = scores["top5"]
        if merged:
            u.setdefault("merged_top1", {})[m] = zero_shot(embed(model.merge(m), ds, device)[0], labels, class_text)["top1"]
            model.unmerge()
        if (names := other_names(ds)) is not None:
            u["other_names_top1"][m] = zero_shot(z, labels, class_embeddings(clip, bpe, prompts, names, device))["top1"]
        if held_out:
            unseen = torch.tensor([ds.class_concepts[k] in held_out for k in labels.tolist()])
            for key, rows in (("seen_top1", ~unseen), ("held_out_top1", unseen)):
                u[key][m] = zero_shot(z[rows], labels[rows], class_text)["top1"] if rows.any() else None
        captions = sorted(set(ds.captions))
        concept_of = {ds.captions[i]: ds[i]["label"] for i in range(len(ds))}
        u["retrieval"][m] = concept_retrieval(z, labels.tolist(), encode_texts(clip, bpe, captions, device).cpu(),
                                              [concept_of[c] for c in captions])
        if ds.anchored:
            anchors = torch.cat([clip.encode_image(ds.anchors[i:i + 256].to(device)).float().cpu()
                                 for i in range(0, len(ds), 256)])
            r1, chance = own_anchor_r1(z, F.normalize(anchors, dim=-1), labels)
            u["own_anchor_r1"][m] = {"r1": r1, "chance": chance}
        routing = routing_entropy(model, ds, device)
        if routing:
            u["routing_entropy"][m] = routing
        metrics["raw_baseline"]["zero_shot_top1"][m] = nearest_class_mean_top1(trains[m], ds)
        for kind, block in (("specialist", metrics["specialists"]), ("prior", metrics["prior"])):
            path = os.path.join(out, f"{kind}_{m}.pt")
            if os.path.exists(path):
                other = load_model(path, clip, device)[0]
                block["zero_shot_top1"][m] = zero_shot(*embed(other, ds, device), class_text)["top1"]
                if kind == "specialist":
                    block["trainable_params"] += other.count_trainable()["total"]
    if "image" in tests:
        images = tests["image"]
        z, labels = embed(model, images, device)
        embeddings["image"] = (z, [images.class_concepts[k] for k in labels.tolist()])
    links = connections(config, trains)
    names = list(embeddings)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            r1, chance = cross_modal_r1(*embeddings[a], *embeddings[b])
            if r1 is None:
                continue
            pair = {"r1": r1, "chance": chance, "connected_by": links[frozenset((a, b))]}
            if "image" not in (a, b) and (renamed := renamed_queries(tests[a], tests[b])) is not None:
                za, concepts_a = embeddings[a]
                keep = torch.tensor([c in renamed for c in concepts_a])
                pair["renamed_r1"], pair["renamed_chance"] = cross_modal_r1(za[keep], [c for c, k in zip(concepts_a, keep)
                                                                                       if k], *embeddings[b])
            metrics["cross_modal"][f"{a}->{b}"] = pair
            if pair["connected_by"] == TEXT:
                metrics["emergent_r1"][f"{a}->{b}"] = r1
    write_report(out, metrics, modalities)
    figures.loss_figure(out)
    if u["routing_entropy"]:
        figures.routing_figure(out, u["routing_entropy"], model.adapters[0].experts)
    image_first = [*embeddings.get("image", (None, []))[1], *(c for _, of in embeddings.values() for c in of)]
    figures.similarity_figure(out, embeddings, list(dict.fromkeys(image_first)))
    return metrics


def evaluate_manifests(ckpt, manifests, class_names=None, templates=None, device="cpu"):
    """A trained run on any manifests (their "test" lines, or every line when none has a split):
    zero-shot top-1 against the manifest's labels (or `class_names`) and concept-level retrieval."""
    out = os.path.dirname(os.path.abspath(ckpt))
    model, clip, bpe, config = finished_run(out, device, ckpt)
    results = {}
    for path in manifests:
        ds = test_lines(path, model, config, ckpt)
        names = list(class_names or ds.class_names)
        missing = sorted(set(ds.class_names) - set(names))
        if missing:
            raise SampleError(f"{path}: labels {missing[:5]} are not among the {len(names)} class names given")
        labels = torch.tensor([names.index(ds.class_names[ds[i]["label"]]) for i in range(len(ds))])
        z, _ = embed(model, ds, device)
        class_text = class_embeddings(clip, bpe, templates or MODALITIES[ds.modality].prompts, names, device)
        scores = zero_shot(z, labels, class_text)
        results[path] = {"modality": ds.modality, "samples": len(ds), "classes": len(names),
                         "chance": 1 / len(names), **{f"zero_shot_{k}": v for k, v in scores.items()}}
    return results


def test_lines(path, model, config, ckpt):
    """A manifest's "test" lines (every line when it has no split), of a modality the model was trained on."""
    try:
        ds = ManifestDataset(path, split="test", **sizes_of(config))
    except SampleError as error:
        if "no usable samples with split" not in str(error):
            raise
        ds = ManifestDataset(path, **sizes_of(config))
    if ds.modality not in model.modalities:
        raise SampleError(f"{path}: modality '{ds.modality}' was not trained in {ckpt} ({model.modalities})")
    return ds


def export(ckpt, path, manifests=None, device="cpu"):
    """Embeddings out: the test samples of `manifests` (or of the run's own world) embedded by the run's
    model, written to `path`. .npz: for each modality M, arrays "M/embeddings" (N, D), "M/labels" (N,)
    (-1: no label), "M/class_names" and "M/paths" (a manifest's paths as written; "world:M/test/i"
    for the synthetic world). .npy: the (N, D) embeddings of one dataset, and beside it PATH.tsv with
    each row's label and path."""
    out = os.path.dirname(os.path.abspath(ckpt))
    model, _, _, config = finished_run(out, device, ckpt)
    if manifests:
        sets = {ds.modality: ds for ds in (test_lines(p, model, config, ckpt) for p in manifests)}
    else:
        sets = build_datasets(config, "test", model.modalities)
    if path.endswith(".npy") and len(sets) > 1:
        raise SampleError(f"{path}: a .npy holds one dataset's embeddings, and there are {len(sets)}; use .npz")
    arrays = {}
    for m, ds in sets.items():
        z, labels = embed(model, ds, device)
        paths = [e["written"]["path"] for e in ds.entries] if hasattr(ds, "entries") else \
            [f"world:{m}/test/{i}" for i in range(len(ds))]
        arrays |= {f"{m}/embeddings": z.numpy(), f"{m}/labels": labels.numpy(), f"{m}/class_names": np.array(ds.class_names),
                   f"{m}/paths": np.array(paths)}
    if path.endswith(".npy"):
        (m,) = sets
        np.save(path, arrays[f"{m}/embeddings"])
        names = arrays[f"{m}/class_names"]
        with open(path + ".tsv", "w") as f:
            f.write("row\tlabel\tpath\n")
            f.writelines(f"{i}\t{names[k] if k >= 0 else ''}\t{p}\n"
                         for i, (k, p) in enumerate(zip(arrays[f"{m}/labels"], arrays[f"{m}/paths"])))
    else:
        np.savez(path, **arrays)
    return {m: len(ds) for m, ds in sets.items()}


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def write_report(out, metrics, modalities):
    """metrics.json, and metrics.md: the tables a report would show (also printed)."""
    u, chance = metrics["unialign"], metrics["chance"]
    blocks = (u["zero_shot_top1"], u["other_names_top1"], metrics["specialists"]["zero_shot_top1"],
              metrics["prior"]["zero_shot_top1"], metrics["raw_baseline"]["zero_shot_top1"])
    for block in blocks:
        if block:
            block["mean"] = mean([block[m] for m in modalities if m in block])
    chance["mean"] = mean([chance[m] for m in modalities])
    f = lambda d, m: f"{d[m]:.3f}" if d.get(m) is not None else "-"
    with_chance = lambda value, c: f"{value:.3f} ({c:.3f})"
    sizes = lambda m: f"{metrics['train_size'][m]}" + (f" ({metrics['train_captioned'][m]})"
                                                       if metrics["train_captioned"][m] < metrics["train_size"][m] else "")
    lines = ["Zero-shot classification, top-1 (chance beside it); training samples, in brackets those with a caption:", "",
             "| modality | train samples | classes | chance | raw NCM | prior model | specialist | **UniAlign** "
             "| UniAlign, other names |", "|---|---|---|---|---|---|---|---|---|"]
    for m in modalities:
        lines.append(f"| {m} | {sizes(m)} | {len(metrics['classes'][m])} | {chance[m]:.3f} | "
                     + " | ".join(f(block, m) for block in blocks[4:1:-1]) + f" | **{f(u['zero_shot_top1'], m)}** | "
                     f"{f(u['other_names_top1'], m)} |")
    lines.append(f"| **mean** | | | {chance['mean']:.3f} | " + " | ".join(f(block, "mean") for block in blocks[4:1:-1])
                 + f" | **{f(u['zero_shot_top1'], 'mean')}** | {f(u['other_names_top1'], 'mean')} |")
    if "merged_top1" in u:
        merged = u["merged_top1"]
        merged["mean"] = mean([merged[m] for m in modalities])
        lines += ["", "UniAlign merged (each modality's expected expert update folded into the weights), top-1:", "",
                  "| modality | routed | merged | merged - routed |", "|---|---|---|---|"]
        lines += [f"| {m} | {u['zero_shot_top1'][m]:.3f} | {merged[m]:.3f} | {merged[m] - u['zero_shot_top1'][m]:+.3f} |"
                  for m in [*modalities, "mean"]]
    lines += ["", "Retrieval by concept, and of each sample's own anchor image among its concept's (chance in brackets):", "",
              "| modality | top-5 | mAP | x->t R@1 | t->x R@1 | own anchor R@1 |", "|---|---|---|---|---|---|"]
    for m in modalities:
        r = u["retrieval"][m]
        top5 = with_chance(u["zero_shot_top5"][m], min(5, len(metrics["classes"][m])) * chance[m]) \
            if m in u["zero_shot_top5"] else "-"
        own = with_chance(u["own_anchor_r1"][m]["r1"], u["own_anchor_r1"][m]["chance"]) if m in u["own_anchor_r1"] else "-"
        lines.append(f"| {m} | {top5} | {f(u['map'], m)} | {with_chance(r['x2t']['R@1'], r['chance']['x2t']['R@1'])} | "
                     f"{with_chance(r['t2x']['R@1'], r['chance']['t2x']['R@1'])} | {own} |")
    lines += ["", f"Trainable parameters: UniAlign {u['trainable_params']:,} (one model, every modality); "
                  f"specialists {metrics['specialists']['trainable_params']:,} (one model per modality, together)."]
    if "seen_top1" in u:
        held = ", ".join(metrics["config"]["held_out"])
        lines += ["", f"Held-out concepts ({held}: in no extended-modality training set), UniAlign top-1:", "",
                  "| modality | seen concepts | held-out concepts | chance |", "|---|---|---|---|"]
        lines += [f"| {m} | {f(u['seen_top1'], m)} | {f(u['held_out_top1'], m)} | {chance[m]:.3f} |" for m in modalities]
    lines += ["", "Cross-modal retrieval, R@1 by concept, grouped by what connects the pair in training; "
                  "renamed: queries whose concept the other dataset calls by another name:"]
    for group in (TEXT, BINDING, ANCHOR):
        rows = {p: e for p, e in metrics["cross_modal"].items() if e["connected_by"] == group}
        if not rows:
            continue
        renamed = lambda e: with_chance(e["renamed_r1"], e["renamed_chance"]) if e.get("renamed_r1") is not None else "-"
        lines += ["", f"Connected by {group}:", "", "| pair | R@1 | chance | renamed R@1 (chance) |", "|---|---|---|---|"]
        lines += [f"| {p} | {e['r1']:.3f} | {e['chance']:.3f} | {renamed(e)} |" for p, e in rows.items()]
        average = mean([e["r1"] for e in rows.values()]), mean([e["chance"] for e in rows.values()])
        renamed_mean = mean([e.get("renamed_r1") for e in rows.values()])
        lines.append(f"| **mean** | **{average[0]:.3f}** | {average[1]:.3f} | "
                     + ("-" if math.isnan(renamed_mean) else f"{renamed_mean:.3f}") + " |")
        u[{TEXT: "emergent_mean", BINDING: "bound_mean", ANCHOR: "anchored_mean"}[group]] = average[0]
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "metrics.md"), "w") as file:
        file.write(table)
    with open(os.path.join(out, "metrics.json"), "w") as file:
        json.dump(metrics, file, indent=1)
    print(table)


def main():
    p = argparse.ArgumentParser(description="Evaluate a trained UniAlign run (docs/method.md section 4). "
                                            "Arguments may be read from a file, one per line: @FILE.",
                                fromfile_prefix_chars="@")
    p.add_argument("--ckpt", required=True, help="RUN/ckpt.pt of a finished train.py run")
    p.add_argument("--data", nargs="+", metavar="MANIFEST",
                   help="evaluate on these manifests instead of the run's own test sets (their test lines, or all)")
    p.add_argument("--classes", nargs="+", metavar="NAME",
                   help="with --data: score against these class names (e.g. @classes.txt), not the manifest's labels")
    p.add_argument("--prompts", nargs="+", metavar="TEMPLATE",
                   help="with --data: prompt templates with {} for the class name (e.g. @prompts.txt)")
    p.add_argument("--merged", action="store_true",
                   help="also score each modality with its expected expert update folded into the weights "
                        "(UniAlign.merge: inference at the frozen ViT's cost), beside the routed model")
    p.add_argument("--export", metavar="FILE",
                   help="instead of evaluating, write the embeddings of the test samples (of --data, else the run's own) "
                        "with their labels and paths to FILE: .npz (every modality) or .npy (one dataset, labels in FILE.tsv)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="default: cuda when available")
    args = p.parse_args()
    if args.merged and (args.data or args.export):
        p.error("--merged scores the run's own test sets: leave out --data and --export")
    if args.export and not args.export.endswith((".npz", ".npy")):
        p.error(f"--export {args.export}: the file must end in .npz or .npy")
    if (args.classes or args.prompts) and not args.data:
        p.error("--classes and --prompts go with --data")
    if args.prompts and any("{}" not in t for t in args.prompts):
        p.error("--prompts: every template needs {} where the class name goes")
    try:
        if args.export:
            counts = export(args.ckpt, args.export, args.data, args.device)
            print(f"wrote the embeddings of {', '.join(f'{n} {m}' for m, n in counts.items())} samples to {args.export}")
            return
        if not args.data:
            evaluate(os.path.dirname(os.path.abspath(args.ckpt)), args.device, args.ckpt, args.merged)
            return
        results = evaluate_manifests(args.ckpt, args.data, args.classes, args.prompts, args.device)
    except (SampleError, CheckpointError) as error:
        raise SystemExit(f"error: {error}") from None
    print("| manifest | modality | samples | classes | chance | top-1 | top-5 | mAP |\n|---|---|---|---|---|---|---|---|")
    for path, r in results.items():
        top5 = f"{r['zero_shot_top5']:.3f}" if "zero_shot_top5" in r else "-"
        print(f"| {path} | {r['modality']} | {r['samples']} | {r['classes']} | {r['chance']:.3f} | "
              f"{r['zero_shot_top1']:.3f} | {top5} | {r['zero_shot_map']:.3f} |")
    with open(os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval_data.json"), "w") as file:
        json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
