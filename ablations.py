"""The paper's ablations in one command (docs/method.md sections 1-4).

  python ablations.py --preset course --seeds 3 --out runs/ablations

Every variant is an ordinary train.py flag set, so any one can also be run by hand (the command is
printed). For each seed, the full variant runs first in OUT/seed<S>/full; every other variant gets
its own folder with the full run's anchor and specialist stages copied in, which train.py reuses
(they do not depend on UniAlign-only flags): all variants of a seed share one world and one anchor
stage. A variant whose metrics.json exists is reused. The specialists are read from the full runs.
Writes OUT/ablations.md, OUT/ablations.json and OUT/ablations.png: per variant, mean +- std over
seeds of zero-shot top-1 per modality and on average, the emergent mean and the trainable
parameters, with a chance row; a difference from full UniAlign within the larger of the two stds is
marked as within noise.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from tqdm import tqdm

from figures import bar_chart

VARIANTS = {
    "full": ("full UniAlign", []),
    "no_moe": ("no MoE (one LoRA expert)", ["--experts", "1", "--top-k", "1"]),
    "shared_router": ("one shared router", ["--router", "shared"]),
    "hard_targets": ("no soft binding (one-hot targets)", ["--targets", "hard"]),
    "no_anchor": ("no anchor distillation", ["--lambda-anchor", "0"]),
    "no_prior": ("no prior distillation", ["--lambda-prior", "0"]),
}


def shared_stages(folder):
    """The stage files every variant of a seed reuses: the anchor CLIP, its BPE and the specialists."""
    return [name for name in sorted(os.listdir(folder))
            if name in ("anchor.pt", "bpe.txt.gz") or (name.startswith("specialist_") and name.endswith(".pt"))]


def run_variant(command, folder, full_folder=None):
    """Run one variant (a train.py command line) into `folder`, unless its metrics.json is there."""
    if os.path.exists(os.path.join(folder, "metrics.json")):
        tqdm.write(f"reusing {folder}")
        return
    os.makedirs(folder, exist_ok=True)
    for name in shared_stages(full_folder) if full_folder else []:
        if not os.path.exists(os.path.join(folder, name)):
            shutil.copy(os.path.join(full_folder, name), os.path.join(folder, name))
    tqdm.write(" ".join(command))
    with open(os.path.join(folder, "train.log"), "w") as log:
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"error: {' '.join(command)} failed; its output is in {log.name}")


def spread(values):
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def collect(out, seeds):
    """{row: {"top1": {modality or "mean": spread}, "emergent": spread or None, "params": int}} from the runs."""
    metrics = {key: [json.load(open(os.path.join(out, f"seed{s}", key, "metrics.json"))) for s in seeds]
               for key in VARIANTS}
    modalities = [m for m in metrics["full"][0]["unialign"]["zero_shot_top1"] if m != "mean"]
    rows = {}
    for key, (label, _) in VARIANTS.items():
        runs = metrics[key]
        rows[label] = {"top1": {m: spread([r["unialign"]["zero_shot_top1"][m] for r in runs]) for m in [*modalities, "mean"]},
                       "emergent": spread([r["unialign"]["emergent_mean"] for r in runs]),
                       "params": runs[0]["unialign"]["trainable_params"]}
    for label, block in (("specialists (prior work)", "specialists"), ("raw inputs, nearest class mean", "raw_baseline")):
        rows[label] = {"top1": {m: spread([r[block]["zero_shot_top1"][m] for r in metrics["full"]])
                                for m in [*modalities, "mean"]},
                       "emergent": None, "params": metrics["full"][0][block].get("trainable_params", 0)}
    chance = metrics["full"][0]["chance"]
    rows["chance"] = {"top1": {m: spread([chance[m]] * len(seeds)) for m in [*modalities, "mean"]},
                      "emergent": spread([statistics.mean(e["chance"] for e in metrics["full"][0]["emergent"].values()
                                                          if not e["paired_in_training"])] * len(seeds)),
                      "params": None}
    return rows, modalities


def versus_full(row, full):
    """The average's difference from full UniAlign, marked within noise when smaller than the larger std."""
    diff = row["top1"]["mean"]["mean"] - full["top1"]["mean"]["mean"]
    noise = max(row["top1"]["mean"]["std"], full["top1"]["mean"]["std"])
    return f"{diff:+.3f}" + (" (within noise)" if abs(diff) <= noise else "")


def table(rows, modalities, settings):
    fmt = lambda s: f"{s['mean']:.3f} +- {s['std']:.3f}"
    full = rows[VARIANTS["full"][0]]
    lines = ["| variant | " + " | ".join(modalities) + " | **mean top-1** | vs full | emergent R@1 | trainable |",
             "|---|" + "---|" * (len(modalities) + 4)]
    for label, row in rows.items():
        emergent = fmt(row["emergent"]) if row["emergent"] else "-"
        vs = versus_full(row, full) if label not in (VARIANTS["full"][0], "chance") else ""
        params = f"{row['params']:,}" if row["params"] is not None else ""
        lines.append(f"| {label} | " + " | ".join(fmt(row["top1"][m]) for m in modalities)
                     + f" | **{fmt(row['top1']['mean'])}** | {vs} | {emergent} | {params} |")
    lines += ["", f"Zero-shot top-1, mean +- std over seeds {settings['seeds']} ({settings['preset']} preset, world seed "
                  f"{settings['world_seed']}); a difference from full UniAlign no larger than the larger of the two stds "
                  "is within noise. Emergent R@1: modality pairs no training loss paired."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="course", choices=["smoke", "course", "default"],
                   help="train.py preset of every run (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1, one world (default: %(default)s)")
    p.add_argument("--world-seed", type=int, default=0, help="the synthetic world of every run (default: %(default)s)")
    p.add_argument("--out", default="runs/ablations", help="folder of the runs and the results (default: %(default)s)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    t0, seeds = time.time(), list(range(args.seeds))
    jobs = [(s, key) for s in seeds for key in VARIANTS]
    for seed, key in tqdm(jobs, desc="variants"):
        folder, full = (os.path.join(args.out, f"seed{seed}", k) for k in (key, "full"))
        command = [sys.executable, "train.py", "--preset", args.preset, "--seed", str(seed),
                   "--world-seed", str(args.world_seed), "--out", folder, *VARIANTS[key][1]]
        run_variant(command, folder, None if key == "full" else full)
    rows, modalities = collect(args.out, seeds)
    settings = {"preset": args.preset, "seeds": seeds, "world_seed": args.world_seed}
    report = table(rows, modalities, settings)
    with open(os.path.join(args.out, "ablations.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.out, "ablations.json"), "w") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=1)
    bar_chart([(label, row["top1"]["mean"]["mean"], row["top1"]["mean"]["std"]) for label, row in rows.items()
               if label != "chance"], rows["chance"]["top1"]["mean"]["mean"], os.path.join(args.out, "ablations.png"),
              f"mean zero-shot top-1 over seeds {seeds} ({args.preset} preset)", "zero-shot top-1")
    print(report)
    print(f"ablations done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
