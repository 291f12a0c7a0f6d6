"""The paper's ablations as paired experiments (docs/method.md section 4; the lab of assignments/README.md).

  python ablations.py --preset course --seeds 5 --out runs/ablations [--only no_moe hard_targets] [--jobs 2]
  python ablations.py --across runs/lab_w0 runs/lab_w1 runs/lab_w2   # the claims of several worlds side by side

Every variant is an ordinary train.py flag set (the command is printed), run for seeds 0..N-1 on
one world, with the concept `--held-out` (default cone) kept out of the extended training sets so
that held-out top-1 is measured. For each seed the full variant runs first in OUT/seed<S>/full;
every other variant gets its own folder with that run's shared stages copied in (the world's
anchor and prior, the seed's specialists), which train.py reuses. So the variants of a seed share
the world, the anchor, the prior and the specialists, and differ only in what the variant changes.

A comparison is paired: for each seed s, d_s = variant_s - full_s of a measure. The report gives
the mean of d over seeds, its standard error SE = std(d) / sqrt(n), and how many seeds agree with
the mean's sign. Verdict: a difference *holds* when every seed agrees in sign and |mean| > 2 SE;
otherwise it is within noise. Each claim of the paper is one such comparison (CLAIMS). A variant
whose metrics.json exists is reused. Writes OUT/ablations.md, OUT/ablations.json, OUT/ablations.png.

`--summary` runs nothing: for finished runs of one world that differ only in --seed, each modality's
zero-shot top-1 of UniAlign and its baselines, mean +- std over the runs, and UniAlign minus the
specialists paired by run (the same table closes OUT/ablations.md, for full UniAlign).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from config import PRESETS
from figures import bar_chart


def variants(preset):
    """{key: (label, train.py flags)}; the single-LoRA controls take their rank from the preset's E, k, r."""
    e, k, r = (PRESETS[preset][key] for key in ("experts", "top_k", "rank"))
    lora = lambda rank: ["--experts", "1", "--top-k", "1", "--rank", str(rank)]
    return {
        "full": ("full UniAlign", []),
        "no_moe": (f"one LoRA, rank r = {r}", lora(r)),
        "lora_params": (f"one LoRA, rank E*r = {e * r} (equal parameters)", lora(e * r)),
        "lora_compute": (f"one LoRA, rank k*r = {k * r} (equal compute)", lora(k * r)),
        "shared_router": ("one shared router", ["--router", "shared"]),
        "block_router": ("a router per block (fewer parameters)", ["--router-scope", "block"]),
        "hard_targets": ("hard targets (no soft binding)", ["--targets", "hard"]),
        "no_xx": ("beta = 0 (no L_xx)", ["--beta", "0"]),
        "no_anchor": ("no anchor distillation", ["--lambda-anchor", "0"]),
        "no_prior": ("no prior distillation", ["--lambda-prior", "0"]),
    }


# The claims, each a paired comparison: (variant, measure, expected sign of variant - full, claim).
# "specialists" compares the seed's specialists with its full UniAlign; their "scarce_gain" is
# UniAlign's top-1 gain over them on the scarce modalities minus its gain on the others (against 0).
CLAIMS = [
    ("no_moe", "top1", -1, "modality-aware experts beat one LoRA of rank r"),
    ("lora_params", "top1", -1, "... and one LoRA of equal adapter parameters (rank E*r)"),
    ("lora_compute", "top1", -1, "... and one LoRA of equal adapter compute per token (rank k*r)"),
    ("shared_router", "top1", -1, "a router per modality beats one shared router"),
    ("block_router", "top1", -1, "a router per linear beats one per block, which has fewer parameters"),
    ("hard_targets", "renamed_r1", -1, "soft binding binds same-concept samples of datasets that name them differently"),
    ("hard_targets", "top1", -1, "soft binding raises zero-shot top-1"),
    ("no_xx", "xx_r1", -1, "L_xx raises retrieval between extended modalities"),
    ("no_anchor", "top1_anchored", -1, "anchor distillation carries the concept into uncaptioned samples"),
    ("no_anchor", "own_anchor_r1", -1, "instance-level retrieval of a sample's own anchor comes through anchors"),
    ("no_prior", "top1_scarce", -1, "prior distillation helps the data-scarce modalities"),
    ("no_prior", "held_out_top1", -1, "prior distillation helps on held-out concepts"),
    ("specialists", "scarce_gain", +1, "joint training helps data-scarce modalities more than separate specialists"),
]

COLUMNS = {"top1": "top-1", "top1_scarce": "scarce top-1", "top1_anchored": "anchored top-1",
           "other_names_top1": "other names top-1", "held_out_top1": "held-out top-1", "xx_r1": "x<->x R@1",
           "renamed_r1": "renamed R@1", "own_anchor_r1": "own anchor R@1"}


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def measures(metrics, block="unialign"):
    """A run's metrics.json -> {measure: value}: zero-shot top-1 (mean, per modality, on the scarce
    modalities, those with anchor images), and for UniAlign the retrieval measures."""
    top1 = metrics[block]["zero_shot_top1"]
    modalities = [m for m in top1 if m != "mean"]
    sizes = metrics["train_size"]
    scarce = [m for m in modalities if sizes[m] < max(sizes.values()) / 2]
    anchored = list(metrics["unialign"]["own_anchor_r1"])
    out = {"top1": top1["mean"], **{f"top1:{m}": top1[m] for m in modalities},
           "top1_scarce": mean([top1[m] for m in scarce]), "top1_anchored": mean([top1[m] for m in anchored])}
    if block == "unialign":
        u, pairs = metrics["unialign"], metrics["cross_modal"]
        extended = [e for p, e in pairs.items() if "image" not in p.split("->")]
        out.update(other_names_top1=mean(u["other_names_top1"].get(m) for m in modalities),
                   held_out_top1=mean((u.get("held_out_top1") or {}).values()),
                   xx_r1=mean(e["r1"] for e in extended), renamed_r1=mean(e.get("renamed_r1") for e in extended),
                   own_anchor_r1=mean(e["r1"] for e in u["own_anchor_r1"].values()))
    return out


def paired(values, reference):
    """Per-seed differences values[s] - reference[s] -> {"mean", "se", "agree", "n", "holds", "per_seed"}."""
    d = [v - r for v, r in zip(values, reference) if v is not None and r is not None]
    if not d:
        return None
    mu = statistics.mean(d)
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("inf")
    agree = sum((x > 0) == (mu > 0) and x != 0 for x in d)
    return {"mean": mu, "se": se, "agree": agree, "n": len(d), "holds": agree == len(d) and abs(mu) > 2 * se,
            "per_seed": d}


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summary(runs):
    """Finished runs of one world (their metrics.json, one per seed) -> a table per modality: training
    samples (with a caption), chance, the raw baseline, the prior model, the specialists and UniAlign,
    mean +- std over the runs, and UniAlign minus the specialists paired run by run."""
    f = lambda s: f"{s['mean']:.3f} +- {s['std']:.3f}"
    first, blocks = runs[0], ("raw_baseline", "prior", "specialists", "unialign")
    top1 = lambda block, m: [run[block]["zero_shot_top1"].get(m) for run in runs if block in run]
    size = lambda m: (f"{first['train_size'][m]}" + (f" ({first['train_captioned'][m]})"
                      if first["train_captioned"][m] < first["train_size"][m] else "")) if m != "mean" else ""
    lines = [f"Zero-shot top-1 over {len(runs)} runs (mean +- std); UniAlign minus specialists paired by run: "
             "mean +- SE (runs agreeing in sign / runs), **holds** when every run agrees and |mean| > 2 SE.", "",
             "| modality | train samples (captioned) | chance | raw NCM | prior model | specialists | **UniAlign** "
             "| UniAlign - specialists |", "|---|---|---|---|---|---|---|---|"]
    for m in first["unialign"]["zero_shot_top1"]:
        d = paired(top1("unialign", m), top1("specialists", m))
        cells = [f(spread(top1(b, m))) if top1(b, m) else "-" for b in blocks]
        lines.append(f"| {'**mean**' if m == 'mean' else m} | {size(m)} | {first['chance'][m]:.3f} | " + " | ".join(cells[:3]) + f" | **{cells[3]}** | "
                     + (f"{d['mean']:+.3f} +- {d['se']:.3f} ({d['agree']}/{d['n']})" + (" **holds**" if d["holds"] else "")
                        if d and len(runs) > 1 else "-") + " |")
    return "\n".join(lines) + "\n"


def collect(out, seeds, keys):
    """The runs' metrics -> {"rows", "differences", "claims", "modalities"} (see the module docstring)."""
    metrics = {key: [json.load(open(os.path.join(out, f"seed{s}", key, "metrics.json"))) for s in seeds]
               for key in keys}
    per_seed = {key: [measures(m) for m in runs] for key, runs in metrics.items()}
    per_seed["specialists"] = [measures(m, "specialists") for m in metrics["full"]]
    for spec, full, run in zip(per_seed["specialists"], per_seed["full"], metrics["full"]):
        # UniAlign's gain over the specialists on the scarce modalities minus its gain on the others
        gain = {k: full[k] - spec[k] for k in full if k.startswith("top1:")}
        scarce = [k for k in gain if k[5:] in scarce_modalities(run)]
        spec["scarce_gain"] = mean(gain[k] for k in scarce) - mean(gain[k] for k in gain if k not in scarce)
    names = sorted({k for runs in per_seed.values() for run in runs for k in run})
    value = lambda key, name: [run.get(name) for run in per_seed[key]]
    rows = {key: {name: spread(value(key, name)) for name in names} for key in per_seed}
    differences = {key: {name: paired(value(key, name), value("full", name)) for name in names}
                   for key in per_seed if key != "full"}
    differences["specialists"]["scarce_gain"] = paired(value("specialists", "scarce_gain"), [0.0] * len(seeds))
    first = metrics["full"][0]
    for key in metrics:
        u = metrics[key][0]["unialign"]
        rows[key]["params"], rows[key]["macs"] = u["trainable_params"], u["adapter_macs_per_token"]
    rows["specialists"]["params"], rows["specialists"]["macs"] = first["specialists"]["trainable_params"], None
    chance = {"top1": first["chance"]["mean"]}
    claims = [{"variant": v, "measure": name, "claim": text, "expected": sign, **(differences[v][name] or {})}
              for v, name, sign, text in CLAIMS if v in differences and differences[v].get(name)]
    modalities = [m for m in first["unialign"]["zero_shot_top1"] if m != "mean"]
    return {"rows": rows, "differences": differences, "claims": claims, "chance": chance, "modalities": modalities,
            "train_size": first["train_size"], "train_captioned": first["train_captioned"],
            "summary": summary(metrics["full"])}


def scarce_modalities(metrics):
    sizes = metrics["train_size"]
    return [m for m in sizes if sizes[m] < max(sizes.values()) / 2]


def verdict(d, expected=None):
    """'holds' (every seed agrees and |mean| > 2 SE, in the expected direction when one is given),
    'opposite' (holds the other way), else 'within noise'."""
    if not d["holds"]:
        return "within noise"
    return "holds" if expected is None or (d["mean"] > 0) == (expected > 0) else "opposite"


def report(result, labels, settings):
    """The three tables of OUT/ablations.md."""
    f = lambda s: "-" if s is None else f"{s['mean']:.3f} +- {s['std']:.3f}"
    g = lambda d: "-" if d is None else f"{d['mean']:+.3f} +- {d['se']:.3f} ({d['agree']}/{d['n']})" + \
        (" **holds**" if d["holds"] else "")
    rows, diffs, modalities = result["rows"], result["differences"], result["modalities"]
    seeds = settings["seeds"]
    lines = [f"Ablations: {settings['preset']} preset, world seed {settings['world_seed']}, seeds {seeds}, "
             f"held-out {', '.join(settings['held_out']) or 'none'}.", "",
             "Training samples (with a caption): " + ", ".join(
                 f"{m} {result['train_size'][m]}" + (f" ({result['train_captioned'][m]})"
                                                     if result["train_captioned"][m] < result["train_size"][m] else "")
                 for m in modalities) + ".", "",
             "Mean +- std over seeds (chance of top-1: %.3f):" % result["chance"]["top1"], "",
             "| variant | " + " | ".join(COLUMNS.values()) + " | trainable | adapter MACs/token (routed, computed) |",
             "|---|" + "---|" * (len(COLUMNS) + 2)]
    for key, row in rows.items():
        macs = f"{row['macs']['routed']:,}, {row['macs']['computed']:,}" if row["macs"] else "-"
        lines.append(f"| {labels.get(key, key)} | " + " | ".join(f(row.get(c)) for c in COLUMNS)
                     + f" | {row['params']:,} | {macs} |")
    lines += ["", "Paired differences from full UniAlign, variant minus full: mean +- SE over seeds (seeds agreeing "
                  "in sign / seeds); **holds**: every seed agrees and |mean| > 2 SE, else within noise:", "",
              "| variant | " + " | ".join(COLUMNS.values()) + " |", "|---|" + "---|" * len(COLUMNS)]
    lines += [f"| {labels.get(key, key)} | " + " | ".join(g(d.get(c)) for c in COLUMNS) + " |" for key, d in diffs.items()]
    lines += ["", "Per modality, top-1 of the variant minus full UniAlign (paired, as above):", "",
              "| variant | " + " | ".join(modalities) + " |", "|---|" + "---|" * len(modalities)]
    lines += [f"| {labels.get(key, key)} | " + " | ".join(g(d.get(f"top1:{m}")) for m in modalities) + " |"
              for key, d in diffs.items()]
    lines += ["", "The claims (expected: the variant is worse than full UniAlign; for the specialists, "
                  "UniAlign's gain over them is larger on the scarce modalities, scarce_gain > 0):", "",
              "| claim | variant | measure | variant - full | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {c['claim']} | {labels.get(c['variant'], c['variant'])} | {c['measure']} | {g(c)} | "
              f"{verdict(c, c['expected'])} |" for c in result["claims"]]
    lines += ["", "Full UniAlign and its baselines, per modality:", "", result["summary"]]
    return "\n".join(lines)


def across(folders):
    """The claims of several labs (one world each: their ablations.json) side by side: per claim, each
    world's paired difference and verdict, and whether it holds on every world."""
    labs = [json.load(open(os.path.join(f, "ablations.json"))) for f in folders]
    worlds = [lab["settings"]["world_seed"] for lab in labs]
    lines = ["| claim | measure | " + " | ".join(f"world {w}" for w in worlds) + " | every world |",
             "|---|---|" + "---|" * (len(worlds) + 1)]
    for variant, name, sign, text in CLAIMS:
        found = [next((c for c in lab["claims"] if c["variant"] == variant and c["measure"] == name), None) for lab in labs]
        if None in found:
            continue
        verdicts = [verdict(c, sign) for c in found]
        cells = [f"{c['mean']:+.3f} +- {c['se']:.3f} ({c['agree']}/{c['n']}) {v}" for c, v in zip(found, verdicts)]
        every = "holds" if set(verdicts) == {"holds"} else "no" if "holds" not in verdicts else "on some worlds only"
        lines.append(f"| {text} | {name} | " + " | ".join(cells) + f" | {every} |")
    return "\n".join(lines) + "\n"


def shared_stages(folder):
    """The stage files every variant of a seed reuses: the anchor CLIP, its BPE, the prior models and the specialists."""
    return [name for name in sorted(os.listdir(folder)) if name in ("anchor.pt", "bpe.txt.gz")
            or (name.startswith(("specialist_", "prior_")) and name.endswith(".pt"))]


def run_variant(command, folder, full_folder=None, threads=None):
    """Run one variant (a train.py command line) into `folder`, unless its metrics.json is there; a run an
    earlier attempt left unfinished is resumed."""
    if os.path.exists(os.path.join(folder, "metrics.json")):
        tqdm.write(f"reusing {folder}")
        return
    os.makedirs(folder, exist_ok=True)
    for name in shared_stages(full_folder) if full_folder else []:
        if not os.path.exists(os.path.join(folder, name)):
            shutil.copy(os.path.join(full_folder, name), os.path.join(folder, name))
    if os.path.exists(os.path.join(folder, "ckpt.pt")):  # an earlier attempt was stopped: it resumes, bit for bit
        command = [*command, "--resume"]
    tqdm.write(" ".join(command))
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(os.path.join(folder, "train.log"), "w") as log:
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
            raise SystemExit(f"error: {' '.join(command)} failed; its output is in {log.name}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="course", choices=list(PRESETS), help="train.py preset of every run (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=5, help="training seeds 0..N-1, one world (default: %(default)s)")
    p.add_argument("--world-seed", type=int, default=0, help="the synthetic world of every run (default: %(default)s)")
    p.add_argument("--held-out", nargs="*", default=["cone"], metavar="CONCEPT",
                   help="concepts kept out of the extended training sets (default: cone)")
    p.add_argument("--only", nargs="+", metavar="VARIANT", help="these variants (full always runs): "
                   + " ".join(variants("course")))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each with cpus / jobs threads (default: 1)")
    p.add_argument("--out", default="runs/ablations", help="folder of the runs and the results (default: %(default)s)")
    p.add_argument("--across", nargs="+", metavar="OUT",
                   help="run nothing: print the claims of these labs (one world each) side by side")
    p.add_argument("--summary", nargs="+", metavar="RUN",
                   help="run nothing: per modality, the top-1 of these finished train.py runs (one world, "
                        "different --seed) and their baselines, mean +- std, UniAlign - specialists paired")
    args = p.parse_args(argv)
    if args.across:
        print(across(args.across))
        return
    if args.summary:
        print(summary([json.load(open(os.path.join(run, "metrics.json"))) for run in args.summary]))
        return
    table = variants(args.preset)
    if args.seeds < 2:
        p.error("--seeds must be at least 2: a paired difference needs a spread")
    if unknown := [v for v in args.only or [] if v not in table]:
        p.error(f"--only: unknown variants {unknown}; they are {' '.join(table)}")
    keys = ["full", *[k for k in table if k != "full" and (not args.only or k in args.only)]]
    t0, seeds = time.time(), list(range(args.seeds))
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    command = lambda seed, key, folder: [sys.executable, "train.py", "--preset", args.preset, "--seed", str(seed),
                                         "--world-seed", str(args.world_seed), "--held-out", *args.held_out,
                                         "--out", folder, *table[key][1]]
    folder = lambda seed, key: os.path.join(args.out, f"seed{seed}", key)
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(seeds) * len(keys), desc="runs") as bar:
        def one(seed, key):
            run_variant(command(seed, key, folder(seed, key)), folder(seed, key),
                        None if key == "full" else folder(seed, "full"), threads)
            bar.update(1)
        list(pool.map(lambda s: one(s, "full"), seeds))  # the full runs first: the others copy their stages
        list(pool.map(lambda job: one(*job), [(s, k) for s in seeds for k in keys if k != "full"]))
    result = collect(args.out, seeds, keys)
    settings = {"preset": args.preset, "seeds": seeds, "world_seed": args.world_seed, "held_out": args.held_out}
    labels = {key: label for key, (label, _) in table.items()} | {"specialists": "specialists (prior work)"}
    text = report(result, labels, settings)
    with open(os.path.join(args.out, "ablations.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "ablations.json"), "w") as f:
        json.dump({"settings": settings, **result}, f, indent=1)
    bars = [(labels[key], d["top1"]["mean"], 2 * d["top1"]["se"]) for key, d in result["differences"].items()]
    bar_chart(bars, os.path.join(args.out, "ablations.png"),
              f"mean zero-shot top-1, variant minus full UniAlign, paired over seeds {seeds} ({args.preset} preset)",
              "difference in top-1 (bars: +-2 SE)")
    print(text)
    print(f"ablations done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
