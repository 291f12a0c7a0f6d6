"""How the speed scripts measure (bench.py, paper_scale.py), which print numbers and never assert.

- `median_times`: the calls of one comparison interleaved, one of each per repeat and the order
  rotated every repeat, after one warm-up call each, so that drift in the machine's load hits them
  alike; the median seconds of each;
- `row`: one line of a comparison, the ratio of two medians against its target; `print_table`
  prints such rows, `print_rows` any other list of results;
- `CONFIGS`: the two shapes they measure at, the default recipe's and ViT-B/16's, on random frozen
  weights.
"""
import statistics
import time

import torch

from modalities import extended


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(calls, repeats, device):
    """{name: call} -> {name: median seconds}, the calls interleaved (one of each per repeat, the
    order rotated every repeat) after one warm-up call each."""
    for call in calls.values():
        call()
    names, times = list(calls), {name: [] for name in calls}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            calls[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def row(measurement, times, numerator, denominator, target):
    """One line of a section's table: the ratio times[numerator] / times[denominator] vs its target."""
    ratio = times[numerator] / times[denominator]
    bound, limit = target.split()
    return {"measurement": measurement, "ms": [1000 * times[numerator], 1000 * times[denominator]],
            "ratio": ratio, "target": target, "met": ratio <= float(limit) if bound == "<=" else ratio >= float(limit)}


CONFIGS = {
    # the default recipe's sizes (train.py's default preset) on random frozen weights
    "default": dict(clip=dict(embed_dim=64, image_resolution=32, vision_layers=4, vision_width=64, vision_patch_size=8,
                              vision_heads=4, context_length=24, vocab_size=800, transformer_width=64,
                              transformer_heads=4, transformer_layers=3),
                    modalities=extended(), world=dict(image_size=32)),
    # ViT-B/16 shapes; image-shaped extended modalities at 224 x 224 (196 tokens + class token each)
    "vit_b16": dict(clip=dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                              vision_patch_size=16, vision_heads=12, context_length=77, vocab_size=49408,
                              transformer_width=512, transformer_heads=8, transformer_layers=12),
                    modalities=["depth", "tactile"], world=dict(image_size=224)),
}


def print_table(title, rows):
    width = max(50, *(len(r["measurement"]) for r in rows))
    print(f"\n{title}")
    print(f"{'measurement':<{width}} {'ms (num / den)':>18} {'ratio':>7} {'target':>8} {'met':>4}")
    for r in rows:
        ms = " / ".join(f"{t:.0f}" if t >= 100 else f"{t:.1f}" for t in r["ms"])
        print(f"{r['measurement']:<{width}} {ms:>18} {r['ratio']:>7.3f} {r['target']:>8} {'yes' if r['met'] else 'NO':>4}")


def print_rows(title, rows):
    """Any list of flat-ish dicts as an aligned table."""
    print(f"\n{title}")
    flat = [{k: (" ".join(f"{a} {b:.1f}" for a, b in v.items()) if isinstance(v, dict) else
                 "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)) for k, v in r.items()} for r in rows]
    keys = list(dict.fromkeys(k for r in flat for k in r))
    widths = {k: max(len(k), *(len(r.get(k, "-")) for r in flat)) for k in keys}
    print("  ".join(k.ljust(w) for k, w in widths.items()))
    for r in flat:
        print("  ".join(r.get(k, "-").ljust(w) for k, w in widths.items()))
