"""Benchmarks: each section times the real modules side by side and prints numbers (never asserts).

Sections (`--only` picks some):
- lora_moe: a ViT-B/16-shaped encoder (width 768, 12 layers, 12 heads, 197 tokens), forward +
  backward with the input tokens requiring grad (so the frozen path's backward runs, as it does
  under the tokenizers):
    (a) LoRA-MoE E=4, r=8, k=2 in all four linears vs no adapters          target <= 1.3
    (b) at E=8: a loop over experts (the baseline below) vs lora_moe.py     target >= 1.5
    (c) merged adapters vs the frozen ViT, inference without grad           target <= 1.05
    (d) E=16 vs E=2 at k=2                                                  target <= 1.15
- step: the UniAlign training step as train.py runs it (default recipe, and ViT-B/16 shapes on
  random frozen weights), split into data wait, forward + losses, backward and optimizer;
  FLOPs counted by torch's FlopCounterMode, and MFU against the chip's dense bf16 peak on a GPU.
- memory: the bytes autograd keeps for backward per batch size, with and without checkpointing
  of the frozen blocks, and its cost in backward time (plus CUDA's peak on a GPU).
- encode: encode() samples/s per modality, and the point tokenizer at 8,192 points.
- generation: synthetic samples generated per second per modality, on one core.
- recipe: `train.py --preset P` end to end as a user runs it, a first run (the cache empty) and a
  rerun (the cache warm), per stage, with its mean top-1; with `--baseline DIR` interleaved with the
  same preset of other code (a checkout of an earlier commit), for ratios.
paper_scale.py holds this code at ViT-B/16: its trainable parameters, and clip.py against OpenAI's
model on the same weights. Models in one comparison see the same inputs and are called in turn, repeat after repeat, so
drift in machine load hits them alike; times are medians (timing.py: how both scripts measure, and at which shapes).

    python bench.py --threads 1             # CPU
    python bench.py --only recipe --presets course --baseline ../previous-commit
    python bench.py --device cuda --compile # GPU: bf16 and fp16 steps at batch 256, and torch.compile
"""

import argparse
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.flop_counter import FlopCounterMode

import loop
import train
from clip import CLIP, ViT
from data import MixedBatchSampler, MixedDataset, SyntheticDataset, collate
from lora_moe import LoRAMoELinear, add_lora_moe
from modalities import extended
from objectives import unialign_objective
from timing import CONFIGS, median_times, print_rows, print_table, row, synchronize
from tokenizers import PointCloudTokenizer, farthest_point_sampling

# ----------------------------------------------------------------------------------------------
# LoRA-MoE overhead
# ----------------------------------------------------------------------------------------------

class LoopLoRAMoELinear(LoRAMoELinear):
    """The baseline for (b): the same parameters, each expert computed densely for all tokens in a
    Python loop and weighted by its gate."""

    def add_expert_update(self, y, x, gates):
        """y + (alpha / r) * sum_e g_e B_e A_e x (Eq. 1), one expert at a time, over every token."""
        A = rearrange(self.lora_A, "(e r) i -> e r i", e=self.experts)
        B = rearrange(self.lora_B, "o (e r) -> e o r", e=self.experts)
        for e in range(self.experts):
            y = y + self.scaling * gates[..., e, None].to(x.dtype) * F.linear(F.linear(x, A[e]), B[e])
        return y


def vit_b16(device):
    torch.manual_seed(0)
    return ViT(image_resolution=224, patch_size=16, width=768, layers=12, heads=12,
               output_dim=512).to(device).requires_grad_(False)


def adapted(vit, experts, top_k=2):
    """A copy of `vit` with LoRA-MoE (r=8) in all four linears, routing "audio"; B made nonzero."""
    vit = copy.deepcopy(vit)
    for adapter in add_lora_moe(vit.transformer.resblocks, ["audio"], experts=experts, top_k=top_k):
        adapter.modality = "audio"
        torch.nn.init.normal_(adapter.lora_B, std=1e-3)
    return vit


def tokens(batch, device):
    """(B, 196, 768) patch tokens; with the class token the encoder sees 197."""
    return torch.randn(batch, 196, 768, device=device, requires_grad=True)


def training_step(vit, x):
    """forward + backward; x requires grad, so the frozen path's backward runs as well."""
    vit.zero_grad(set_to_none=True)
    x.grad = None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        loss = vit.encode_tokens(x).float().square().mean()
    loss.backward()


def inference(vit, x):
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        vit.encode_tokens(x)


def adapter_overhead(device, batch, repeats):
    """(a) step time with LoRA-MoE E=4, r=8, k=2 over the frozen ViT's."""
    frozen = vit_b16(device)
    models, x = {"frozen": frozen, "moe": adapted(frozen, experts=4)}, tokens(batch, device)
    times = median_times({name: lambda m=m: training_step(m, x) for name, m in models.items()}, repeats, device)
    return row("(a) step, E=4 r=8 k=2 / no adapters", times, "moe", "frozen", "<= 1.3")


def loop_baseline_speedup(device, batch, repeats):
    """(b) at E=8, k=2: the loop-over-experts baseline's step time over lora_moe.py's."""
    moe = adapted(vit_b16(device), experts=8)
    loop = copy.deepcopy(moe)
    for module in loop.modules():
        if isinstance(module, LoRAMoELinear):  # same parameters, only the expert sum computed differently
            module.__class__ = LoopLoRAMoELinear
    x = tokens(batch, device)
    with torch.no_grad():  # the baseline computes the same function
        torch.testing.assert_close(loop.encode_tokens(x), moe.encode_tokens(x), rtol=1e-4, atol=1e-4)
    times = median_times({"moe": lambda: training_step(moe, x), "loop": lambda: training_step(loop, x)},
                         repeats, device)
    return row("(b) step at E=8: loop over experts / lora_moe.py", times, "loop", "moe", ">= 1.5")


def merged_inference(device, batch, repeats):
    """(c) inference without grad: merged adapters (E=4, k=2) over the frozen ViT."""
    frozen = vit_b16(device)
    merged, x = adapted(frozen, experts=4), tokens(batch, device)
    with torch.no_grad():
        merged.encode_tokens(x)  # training mode: the gate statistics merge() needs
    for module in merged.modules():
        if isinstance(module, LoRAMoELinear):
            module.merge("audio")
    frozen.eval()
    merged.eval()
    times = median_times({"frozen": lambda: inference(frozen, x), "merged": lambda: inference(merged, x)},
                         repeats, device)
    return row("(c) inference: merged / frozen", times, "merged", "frozen", "<= 1.05")


def expert_scaling(device, batch, repeats):
    """(d) step time at E=16 over E=2, both k=2, r=8."""
    frozen = vit_b16(device)
    models, x = {"E2": adapted(frozen, experts=2), "E16": adapted(frozen, experts=16)}, tokens(batch, device)
    times = median_times({name: lambda m=m: training_step(m, x) for name, m in models.items()}, repeats, device)
    return row("(d) step: E=16 / E=2 (k=2)", times, "E16", "E2", "<= 1.15")


def lora_moe_overhead(device, batch, repeats):
    return [measure(device, batch, repeats)
            for measure in (adapter_overhead, loop_baseline_speedup, merged_inference, expert_scaling)]


# ----------------------------------------------------------------------------------------------
# The UniAlign training step: time split, data wait, FLOPs utilisation, memory
# ----------------------------------------------------------------------------------------------

# dense bf16 tensor-core peaks (FLOP/s) of the chips we report MFU for
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

@functools.lru_cache
def world(modality, size, image_size):
    """A synthetic dataset at train.py's default sizes, generated once per bench run."""
    return SyntheticDataset(modality, "train", size, image_size=image_size)


def unialign_step_setup(name, device, batch):
    """(model, loss, optimizer, loader) of the UniAlign stage as train.py builds them, for one CONFIGS entry."""
    config = CONFIGS[name]
    args = train.get_args(["--batch-size", str(batch), "--image-size", str(config["world"]["image_size"])])
    torch.manual_seed(0)
    clip = CLIP(**config["clip"]).to(device).requires_grad_(False).eval()
    sets = {m: world(m, max(batch, 64), args.image_size) for m in config["modalities"]}
    args.device = device.type
    model, _ = train.make_model(clip, config["modalities"], sets, args, args.experts, args.top_k, args.rank)
    for adapter in model.adapters:  # as after some training: B != 0, so every expert's work is real
        torch.nn.init.normal_(adapter.lora_B, std=1e-3)
    texts = {t for ds in sets.values() for t in ds.captions}
    text_of = dict(zip(sorted(texts), F.normalize(torch.randn(len(texts), clip.visual.output_dim, device=device), dim=-1)))
    loss = unialign_objective(clip, lambda ts: torch.stack([text_of[t] for t in ts]), args)
    params = [p for p in model.parameters() if p.requires_grad]
    sampler = MixedBatchSampler([len(d) for d in sets.values()], batch, args.alpha_sampling)
    loader = torch.utils.data.DataLoader(MixedDataset(list(sets.values())), batch_sampler=sampler, collate_fn=collate,
                                         pin_memory=device.type == "cuda")
    return model.train(), loss, torch.optim.AdamW(params, lr=1e-4, fused=True), iter(loader)  # as loop.train_loop


def step_breakdown(name, device, batch, repeats, precision, compiled=False):
    """Median seconds of data (waiting for the next batch), forward (+ losses), backward and optimizer,
    samples/s, the FLOPs of one step counted by torch's FlopCounterMode, and MFU on a known GPU."""
    model, loss, optimizer, batches = unialign_step_setup(name, device, batch)
    forward = torch.compile(model) if compiled else model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    phases = {k: [] for k in ("data", "forward", "backward", "optimizer")}

    def step(record=True, net=forward):
        marks = [time.perf_counter()]
        b = loop.to_device(next(batches), device)
        for phase in range(3):
            synchronize(device)
            marks.append(time.perf_counter())
            if phase == 0:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    value = loss(net, b)[0]
            elif phase == 1:
                scaler.scale(value).backward()
            else:  # as loop.train_loop: unscale, clip, step
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 1.0)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        marks.append(time.perf_counter())
        if record:
            for k, (t0, t1) in zip(phases, zip(marks, marks[1:])):
                phases[k].append(t1 - t0)

    for _ in range(3 if compiled else 1):
        step(record=False)
    with FlopCounterMode(display=False) as counter:  # counted on the eager model: the same FLOPs
        step(record=False, net=model)
    for _ in range(repeats):
        step()
    times = {k: statistics.median(v) for k, v in phases.items()}
    total = sum(times.values())
    flops = counter.get_total_flops()
    chip = next((k for k in PEAK_BF16 if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
    return {"config": name, "batch": batch, "precision": precision, "compiled": compiled,
            "ms": {k: 1000 * v for k, v in times.items()}, "samples_per_s": batch / total,
            "tflop_per_step": flops / 1e12, "achieved_tflops": flops / total / 1e12,
            "of_matmul_rate": flops / total / matmul_rate(device) if device.type == "cpu" else None,
            "mfu": flops / total / PEAK_BF16[chip] if chip and precision == "bf16" else None}


def activation_memory(name, device, batches, checkpointing):
    """Bytes the autograd graph keeps for backward (saved tensors, each storage once) in one training
    forward, per batch size; and the step time. With `checkpointing`, the frozen blocks recompute."""
    rows = []
    for batch in batches:
        model, loss, optimizer, loader = unialign_step_setup(name, device, batch)
        model.clip.visual.transformer.grad_checkpointing = checkpointing
        b = loop.to_device(next(loader), device)
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            value = loss(model, b)[0]
        start = time.perf_counter()
        value.backward()
        synchronize(device)
        rows.append({"config": name, "batch": batch, "checkpointing": checkpointing,
                     "saved_mib": sum(seen.values()) / 2 ** 20, "backward_ms": 1000 * (time.perf_counter() - start),
                     "cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None})
    return rows


def matmul_rate(device, n=2048, repeats=5):
    """This CPU's (or GPU's) own fp32 matmul rate, FLOP/s: the best of `repeats` (n x n) @ (n x n) products."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = min(median_times({"mm": lambda: a @ b}, 1, device)["mm"] for _ in range(repeats))
    return 2 * n ** 3 / best


# ----------------------------------------------------------------------------------------------
# The recipe end to end, as a user runs it
# ----------------------------------------------------------------------------------------------

def run_recipe(code, preset, out, cache):
    """`python train.py --preset P` in folder `code` with its cache in `cache`: wall seconds, the seconds
    of each kind of stage from OUT/log.jsonl, and the mean zero-shot top-1 with its chance."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "train.py", "--preset", preset, "--out", out], cwd=code, check=True,
                   env={**os.environ, "UNIALIGN_CACHE": cache}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    stages = {}
    with open(os.path.join(out, "log.jsonl")) as f:
        for record in map(json.loads, f):
            stages[record["stage"]] = record.get("seconds", 0.0)  # the stage's last record: its whole time
    kinds = dict.fromkeys(("anchor", "prior", "specialist", "unialign"), 0.0)  # a reused stage takes 0 s
    for stage, seconds in stages.items():
        kinds[stage.split(":")[0]] = kinds.get(stage.split(":")[0], 0.0) + seconds
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    return {"wall": wall, **kinds, "rest": wall - sum(kinds.values()),
            "top1": metrics["unialign"]["zero_shot_top1"]["mean"], "chance": metrics["chance"]["mean"]}


def recipe_times(presets, repeats, baseline=None):
    """Each preset end to end: a first run (an empty cache: the world, its anchor and prior are built)
    and a rerun (the cache warm, a new run folder), best of `repeats`. With `baseline`, a checkout of
    other code (say the previous commit) runs the same preset interleaved with these, turn by turn,
    so that the machine's drift hits both alike; the ratios are against its best."""
    rows = []
    for preset in presets:
        best = {}
        with tempfile.TemporaryDirectory() as scratch:
            for r in range(repeats):
                cache = os.path.join(scratch, f"cache{r}")
                turns = [("first run", os.path.dirname(os.path.abspath(__file__))), ("rerun", None)]
                turns += [("baseline", baseline)] if baseline else []
                for kind, code in turns:
                    result = run_recipe(code or turns[0][1], preset, os.path.join(scratch, f"{kind}{r}"), cache)
                    print(f"{preset} {kind} {r}: " + json.dumps({k: round(v, 2) for k, v in result.items()}), flush=True)
                    if kind not in best or result["wall"] < best[kind]["wall"]:
                        best[kind] = result
        for kind, result in best.items():
            ratio = result["wall"] / best["baseline"]["wall"] if baseline else None
            rows.append({"preset": preset, "run": kind, **{k: round(v, 3) for k, v in result.items()},
                         "vs_baseline": round(ratio, 3) if ratio else None})
    return rows


# ----------------------------------------------------------------------------------------------
# Inference encoding and synthetic data generation
# ----------------------------------------------------------------------------------------------

def encode_throughput(device, repeats):
    """Samples/s of `encode` per modality (default configuration, no grad, batch 64), and farthest
    point sampling + grouping of the point tokenizer at 8,192 points (batch 8, 512 groups, 32 neighbours)."""
    model, _, _, _ = unialign_step_setup("default", device, 64)
    model.eval()
    rows = []
    for m, tokenizer_input in ((m, SyntheticDataset(m, "test", 64, image_size=32)) for m in CONFIGS["default"]["modalities"]):
        x = torch.stack([tokenizer_input[i]["input"] for i in range(64)]).to(device)
        with torch.no_grad():
            t = median_times({m: lambda: model.encode(m, x)}, repeats, device)[m]
        rows.append({"modality": m, "samples_per_s": 64 / t})
    cloud = torch.randn(8, 8192, 3, device=device)
    tokenizer = PointCloudTokenizer(torch.zeros(768, 3, 16, 16), points=8192, groups=512, neighbours=32).to(device)
    with torch.no_grad():
        times = median_times({"fps": lambda: farthest_point_sampling(cloud, 512), "tokenize": lambda: tokenizer(cloud)},
                             repeats, device)
    rows.append({"modality": "point @ 8192 pts: FPS only", "samples_per_s": 8 / times["fps"]})
    rows.append({"modality": "point @ 8192 pts: whole tokenizer", "samples_per_s": 8 / times["tokenize"]})
    return rows


def generation_rates(size=200):
    """Synthetic samples generated per second per modality, on one core (world.py, default sizes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    for m in ["image", *extended()]:
        start = time.perf_counter()
        SyntheticDataset(m, "train", size)
        rows.append({"modality": m, "samples_per_s": size / (time.perf_counter() - start)})
    torch.set_num_threads(threads)
    return rows


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

SECTIONS = ["lora_moe", "step", "memory", "encode", "generation", "recipe"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--quick", action="store_true", help="smaller batch, fewer repeats")
    parser.add_argument("--batch", type=int, help="LoRA-MoE section: default 64 on GPU, 4 on CPU (16 / 2 with --quick)")
    parser.add_argument("--step-batch", type=int, help="ViT-B/16 training step: default 256 on GPU, 8 on CPU")
    parser.add_argument("--repeats", type=int, help="default: 20 on GPU, 7 on CPU (5 / 3 with --quick)")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=SECTIONS, help="sections to run")
    parser.add_argument("--compile", action="store_true", help="also time the ViT-B/16 step under torch.compile")
    parser.add_argument("--presets", nargs="+", default=["smoke", "course", "default"], help="recipe section: the presets")
    parser.add_argument("--baseline", metavar="DIR",
                        help="recipe section: a checkout of other code (e.g. the previous commit) timed interleaved with this")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.quick:
        batch, repeats = (16, 5) if gpu else (2, 3)
    else:
        batch, repeats = (64, 20) if gpu else (4, 7)
    batch, repeats = args.batch or batch, args.repeats or repeats
    step_batch = args.step_batch or (256 if gpu else 8)

    setting = {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2), "batch": batch, "repeats": repeats,
               "torch": torch.__version__}
    results = {"setting": setting}
    if "lora_moe" in args.only:
        results["lora_moe_overhead"] = lora_moe_overhead(device, batch, repeats)
    if "step" in args.only:
        precisions = ["bf16", "fp16"] if gpu else ["fp32"]
        results["step"] = [step_breakdown("default", device, 128, repeats, precisions[0])]
        results["step"] += [step_breakdown("vit_b16", device, step_batch, repeats, p) for p in precisions]
        if args.compile:
            results["step"].append(step_breakdown("vit_b16", device, step_batch, repeats, precisions[0], compiled=True))
    if "memory" in args.only:
        sizes = [step_batch // 4, step_batch // 2, step_batch]
        results["memory"] = [row for ckpt in (False, True) for row in activation_memory("vit_b16", device, sizes, ckpt)]
    if "encode" in args.only:
        results["encode"] = encode_throughput(device, repeats)
    if "generation" in args.only:
        results["generation"] = generation_rates()
    if "recipe" in args.only:
        results["recipe"] = recipe_times(args.presets, args.repeats or 3, args.baseline)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(", ".join(f"{k} {v}" for k, v in setting.items()))
    if "lora_moe_overhead" in results:
        print_table("LoRA-MoE overhead (ViT-B/16 shape, 197 tokens; medians)", results["lora_moe_overhead"])
    titles = {"step": "UniAlign training step (medians; data = waiting for the next batch)",
              "memory": "Activation memory of one training step (saved tensors), with and without checkpointing",
              "encode": "encode() throughput per modality (default configuration, batch 64)",
              "generation": "Synthetic world: samples generated per second, one core",
              "recipe": "train.py end to end, best of the repeats (seconds; rest = process start, datasets, eval)"}
    for key, title in titles.items():
        if key in results:
            print_rows(title, results[key])


if __name__ == "__main__":
    main()
