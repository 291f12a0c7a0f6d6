"""
Train UniAlign: one encoder, one phase, all datasets, all three losses (METHOD.md section 3).

With no flags this runs the whole story on the synthetic world (METHOD.md section 5):

  1. anchor       pre-train a tiny CLIP on the synthetic image-text set     -> OUT/anchor.pt
  2. specialists  the "prior work": one single-LoRA model per extended
                  modality, trained alone, contrastive to text only (Eq. 5) -> OUT/specialist_<m>.pt
  3. unialign     one model on every dataset at once with Eq. 10            -> OUT/ckpt.pt
  4. eval         zero-shot, retrieval, emergent retrieval, router stats    -> OUT/metrics.{json,md}

A stage whose output is already in OUT is reused, so a finished run re-evaluates in seconds.

  python train.py                          # the default recipe on 2 CPU cores
  python train.py --preset smoke           # the same story in tiny sizes (tests)
  torchrun --nproc_per_node 8 train.py --clip ViT-B-16.pt --bpe bpe_simple_vocab_16e6.txt.gz \\
      --data audio.jsonl point.jsonl --device cuda --precision bf16
"""
import argparse
import copy
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import MixedBatchSampler, MixedDataset, collate
from encoder import CLIP, UniAlign, load_openai_clip
from eval import EXTENDED, build_datasets, embed, encode_texts, evaluate, load_anchor
from losses import gather_with_grad, soft_binding_loss, unialign_loss
from tokenizers import BPETokenizer

# ----------------------------------------------------------------------------- configuration

PRESETS = {
    # the default recipe: the whole story in minutes on a laptop CPU
    "default": dict(concepts=10, n_train=2000, n_test=300, n_anchor=4000, image_size=32, clip_width=64, clip_layers=4,
                    clip_heads=4, text_layers=3, embed_dim=64, vocab_size=800, anchor_steps=300, anchor_batch=128,
                    specialist_steps=120, steps=400, batch_size=128, experts=4, rank=8, top_k=2),
    # every stage exercised in tiny sizes: the test suite runs this
    "smoke": dict(concepts=4, n_train=48, n_test=24, n_anchor=96, image_size=16, clip_width=32, clip_layers=2,
                  clip_heads=2, text_layers=1, embed_dim=32, vocab_size=600, anchor_steps=20, anchor_batch=32,
                  specialist_steps=4, steps=8, batch_size=28, experts=2, rank=4, top_k=1),
}


def get_args(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=PRESETS, default="default")
    preset = pre.parse_known_args(argv)[0].preset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=PRESETS, default="default", help="size of everything (default: %(default)s)")
    g.add_argument("--out", default="out", help="run folder: stages, checkpoint, log, metrics (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="synthetic world, initialisation and batch order")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="default: cuda when available")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype; fp16 adds a gradient scaler (default: %(default)s)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers (real data)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--no-eval", action="store_true", help="stop after training")

    g = p.add_argument_group("data (synthetic world unless --data is given)")
    g.add_argument("--data", nargs="+", metavar="MANIFEST", help="JSON Lines manifests, one dataset each")
    g.add_argument("--concepts", type=int, help="concepts in the synthetic world")
    g.add_argument("--n-train", type=int, help="training samples per synthetic dataset")
    g.add_argument("--n-test", type=int, help="test samples per synthetic dataset")
    g.add_argument("--n-anchor", type=int, help="training samples of the synthetic image-text set (stage 1)")
    g.add_argument("--held-out", nargs="*", default=[], metavar="CONCEPT",
                   help="concepts removed from the extended-modality training sets (kept for image-text)")
    g.add_argument("--alpha-sampling", type=float, default=0.5, help="dataset drawn with prob. ~ size^alpha")
    g.add_argument("--on-bad", default="raise", choices=["raise", "skip"],
                   help="a manifest sample that cannot be read: stop, or skip it (counted and logged)")
    g.add_argument("--image-size", type=int, help="images, tactile, depth and video frames (with --clip: CLIP's)")
    g.add_argument("--frames", type=int, default=4, help="video frames per clip")
    g.add_argument("--audio-seconds", type=float, default=0.5, help="audio crop/pad length")
    g.add_argument("--points", type=int, default=256, help="points per cloud")
    g.add_argument("--point-channels", type=int, default=3, choices=[3, 6], help="xyz, or xyz + rgb/normals")
    g.add_argument("--point-groups", type=int, default=32, help="point tokens: farthest-point-sampled centres")
    g.add_argument("--point-neighbours", type=int, default=16, help="neighbours pooled per point token")
    g.add_argument("--imu-length", type=int, default=128, help="imu samples per recording")
    g.add_argument("--eeg-channels", type=int, default=16)
    g.add_argument("--eeg-length", type=int, default=128, help="eeg samples per recording")
    g.add_argument("--series-kernel", type=int, default=8, help="Conv1d kernel and stride of the imu/eeg tokenizers")

    g = p.add_argument_group("anchor CLIP (stage 1)")
    g.add_argument("--clip", metavar="PATH", help="OpenAI CLIP checkpoint (TorchScript or state dict): replaces stage 1")
    g.add_argument("--bpe", metavar="PATH", help="CLIP's bpe_simple_vocab_16e6.txt.gz (with --clip)")
    g.add_argument("--anchor-steps", type=int)
    g.add_argument("--anchor-batch", type=int)
    for name in ["clip-width", "clip-layers", "clip-heads", "text-layers", "embed-dim", "vocab-size"]:
        g.add_argument("--" + name, type=int, help=argparse.SUPPRESS)

    g = p.add_argument_group("specialists (stage 2) and the prior of Eq. 9")
    g.add_argument("--specialist-steps", type=int)
    g.add_argument("--prior", default="specialists", choices=["specialists", "manifest", "none"],
                   help="prior embeddings p_i: this run's specialists, the manifests' prior fields, or none")

    g = p.add_argument_group("UniAlign (stage 3)")
    g.add_argument("--steps", type=int, help="optimizer steps of the UniAlign stage")
    g.add_argument("--batch-size", type=int, help="samples per optimizer step and process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (batch-size is split)")
    g.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (specialists and UniAlign)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup", type=int, default=20, help="linear warm-up steps before the cosine decay")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--experts", type=int, help="E, LoRA experts per adapted linear (Eq. 1)")
    g.add_argument("--rank", type=int, help="r, rank of each expert")
    g.add_argument("--top-k", type=int, help="k experts per token; k = E is dense soft routing (Eq. 2)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator (alpha / r)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute frozen blocks in backward")
    g.add_argument("--ckpt-every", type=int, default=100)
    g.add_argument("--resume", action="store_true", help="continue the UniAlign stage from OUT/ckpt.pt")
    g.add_argument("--max-bad-steps", type=int, default=20, help="stop after this many non-finite losses in a row")

    g = p.add_argument_group("losses (Eq. 4-10)")
    g.add_argument("--beta", type=float, default=0.5, help="weight of L_xx in L_bind (Eq. 7)")
    g.add_argument("--tau-s", type=float, default=0.02, help="temperature of the soft targets (Eq. 4)")
    g.add_argument("--tau-kd", type=float, default=0.1, help="distillation temperature (Eq. 8, 9)")
    g.add_argument("--gamma", type=float, default=1.0, help="feature term of Eq. 8")
    g.add_argument("--lambda-anchor", type=float, default=1.0)
    g.add_argument("--lambda-prior", type=float, default=1.0)
    g.add_argument("--lambda-bal", type=float, default=0.01)

    p.set_defaults(**PRESETS[preset])
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- small helpers

def save_atomic(obj, path):
    """Write to a temporary file, then rename: a kill at any moment leaves the old file whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_at(step, lr, warmup, steps):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    warmup = min(warmup, steps // 5)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class TextCache:
    """Normalised embeddings of captions from the frozen text tower, computed once, all at the start.

    Encoding every caption up front, in one fixed order, makes each embedding independent of which
    captions a batch happened to bring: a resumed run sees bit-for-bit the same targets.
    """

    def __init__(self, clip, bpe, device, texts):
        texts = sorted(set(texts))
        self.cache = dict(zip(texts, encode_texts(clip, bpe, texts, device)))

    def __call__(self, texts):
        return torch.stack([self.cache[t] for t in texts])


def scatter_groups(z, index, batch_size):
    """Put per-modality embeddings {m: (n_m, D)} back in batch order (B, D)."""
    out = next(iter(z.values())).new_empty(batch_size, next(iter(z.values())).shape[-1])
    for m, rows in z.items():
        out[index[m]] = rows
    return out


def to_device(batch, device):
    move = lambda x: x.to(device, non_blocking=True) if torch.is_tensor(x) else x
    return {k: ({m: move(x) for m, x in v.items()} if isinstance(v, dict) else move(v)) for k, v in batch.items()}


# ----------------------------------------------------------------------------- the training loop

def fit(name, model, params, datasets, batch_loss, steps, batch_size, args, ctx, lr, ckpt_path=None,
        extra_state=None, distributed=True):
    """One plain loop serves all three stages: AdamW, warm-up + cosine, autocast, clipping,
    accumulation, DDP, non-finite guard, atomic checkpoints and exact resume."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(ctx["device"], enabled=args.precision == "fp16")
    rank, world_size = (ctx["rank"], ctx["world_size"]) if distributed else (0, 1)
    micro_batch = batch_size // world_size // args.grad_accum
    sampler = MixedBatchSampler([len(d) for d in datasets], micro_batch, args.alpha_sampling,
                                seed=args.seed, rank=rank, world_size=world_size)
    step = 0
    if ckpt_path and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        check_config(ckpt["config"], vars(args), name)
        if ckpt["step"] < steps and not args.resume:
            raise SystemExit(f"{ckpt_path} holds {name} at step {ckpt['step']} of {steps}: "
                             f"pass --resume to continue it, or choose another --out")
        model_of(model).load_trainable_state_dict(ckpt["model"])
        step = ckpt["step"]
        if step >= steps:  # a finished stage: its weights are all that is needed
            return
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        sampler.load_state_dict(ckpt["sampler"])
        torch.set_rng_state(ckpt["rng"])
        ctx["print"](f"resumed {name} at step {step} from {ckpt_path}")
    loader = torch.utils.data.DataLoader(MixedDataset(datasets), batch_sampler=sampler, collate_fn=collate,
                                         num_workers=args.workers, pin_memory=ctx["device"] == "cuda")
    autocast = (torch.autocast(ctx["device"], dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision])
                if args.precision != "fp32" else nullcontext())

    def save(path):
        save_atomic({"model": model_of(model).trainable_state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "rng": torch.get_rng_state(),
                     # batches consumed, not drawn: DataLoader workers may have prefetched more
                     "sampler": {**sampler.state_dict(), "batch": step * args.grad_accum},
                     "step": step, "config": vars(args), **(extra_state or {})}, path)

    log = open(os.path.join(args.out, "log.jsonl"), "a") if rank == 0 else None
    bar = tqdm(total=steps, initial=step, desc=name, disable=rank != 0, dynamic_ncols=True)
    batches, bad, t0, seen = iter(loader), 0, time.time(), 0
    model.train()
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, args.warmup, steps)
        parts, finite = {}, True
        for micro in range(args.grad_accum):
            batch = to_device(next(batches), ctx["device"])
            sync = micro == args.grad_accum - 1 or not isinstance(model, DDP)
            with (nullcontext() if sync else model.no_sync()), autocast:
                loss, parts = batch_loss(model, batch)
            finite &= bool(torch.isfinite(loss))
            scaler.scale(loss / args.grad_accum).backward()
            seen += len(batch["modality"]) * world_size
        if finite:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            bad = 0
        else:
            bad += 1
            ctx["print"](f"{name} step {step}: non-finite loss, step skipped ({bad} in a row)")
            if bad >= args.max_bad_steps:
                raise RuntimeError(f"{name}: {bad} non-finite losses in a row at step {step}; stopping. "
                                   f"The last good checkpoint is kept{f' in {ckpt_path}' if ckpt_path else ''}. "
                                   f"Try a lower --lr or --precision fp32/bf16.")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if log and (step % args.log_every == 0 or step == steps or not finite):
            rate = seen / (time.time() - t0)
            log.write(json.dumps({"stage": name, "step": step, "lr": lr_at(step - 1, lr, args.warmup, steps),
                                  "loss": loss.item(), "finite": finite, "samples_per_s": rate, **parts}) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{rate:.0f}")
        bar.update(1)
        if ckpt_path and rank == 0 and (step % args.ckpt_every == 0 or step == steps):
            save(ckpt_path)
    bar.close()
    if log:
        log.close()


def check_config(saved, current, stage):
    """Refuse to continue or reuse a stage whose checkpoint was made with settings that shape it."""
    keys = ["seed", "data", "clip", "concepts", "n_train", "held_out", "clip_width", "clip_layers", "embed_dim",
            "rank", "lora_alpha", "batch_size", "grad_accum", "lr", "tau_s"]
    keys += ["specialist_steps"] if stage.startswith("specialist") else [
        "steps", "experts", "top_k", "prior", "beta", "tau_kd", "gamma", "lambda_anchor", "lambda_prior", "lambda_bal"]
    diff = [f"--{k.replace('_', '-')}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]
    if diff:
        raise SystemExit(f"{stage}: the checkpoint in {current['out']} was made with other settings:\n  "
                         + "\n  ".join(diff) + "\nUse another --out, or the same settings.")


def model_of(model):
    return model.module if isinstance(model, DDP) else model


# ----------------------------------------------------------------------------- the three stages

def anchor_stage(args, ctx, train_sets):
    """Stage 1: the frozen anchor space. OpenAI weights if given, else a tiny CLIP pre-trained here on
    the synthetic image-text set with Eq. 5, its targets (Eq. 4) computed in a space of one-hot caption
    identities: identical captions are the positives (see losses.soft_binding_loss)."""
    bpe_path, path = os.path.join(args.out, "bpe.txt.gz"), os.path.join(args.out, "anchor.pt")
    if not args.clip and not os.path.exists(path) and ctx["rank"] == 0:
        images = train_sets["image"]
        bpe = BPETokenizer.train(list(images.captions), args.vocab_size, bpe_path)
        config = dict(embed_dim=args.embed_dim, image_resolution=images[0]["input"].shape[-1],
                      vision_layers=args.clip_layers, vision_width=args.clip_width, vision_patch_size=8,
                      vision_heads=args.clip_heads, context_length=24, vocab_size=bpe.vocab_size,
                      transformer_width=args.clip_width, transformer_heads=args.clip_heads,
                      transformer_layers=args.text_layers)
        clip = CLIP(**config).to(ctx["device"])
        ctx["print"](f"anchor CLIP: {sum(p.numel() for p in clip.parameters()):,} parameters, all trained")
        caption_id = {c: k for k, c in enumerate(sorted(set(images.captions)))}

        def loss(model, batch):
            ids = bpe(batch["text"], context_length=clip.context_length, truncate=True).to(ctx["device"])
            z = F.normalize(clip.encode_image(batch["inputs"]["image"]), dim=-1)
            t = F.normalize(clip.encode_text(ids), dim=-1)
            same = F.one_hot(torch.tensor([caption_id[c] for c in batch["text"]]), len(caption_id)).float()
            return soft_binding_loss(z, t, 1 / clip.logit_scale.exp(), args.tau_s, beta=0.0,
                                     target_space=same.to(ctx["device"]))

        fit("anchor", clip, list(clip.parameters()), [images], loss, args.anchor_steps, args.anchor_batch,
            args, ctx, lr=1e-3, distributed=False)
        save_atomic({"config": config, "state_dict": clip.state_dict()}, path)
    if ctx["world_size"] > 1:
        dist.barrier()  # the other ranks wait for rank 0's anchor
    clip, bpe = load_anchor(vars(args))
    return clip.to(ctx["device"]), bpe


def tokenizer_settings(train_sets, args):
    """Each tokenizer is built for the input size its dataset delivers (METHOD.md section 1 table)."""
    settings = {}
    for m, ds in train_sets.items():
        shape = ds[0]["input"].shape
        settings[m] = {"tactile": lambda: dict(image_size=shape[-1]), "depth": lambda: dict(image_size=shape[-1]),
                       "video": lambda: dict(frames=shape[0], image_size=shape[-1]),
                       "audio": lambda: dict(frames=shape[-1]),
                       "point": lambda: dict(points=shape[0], channels=shape[1], groups=args.point_groups,
                                             neighbours=args.point_neighbours),
                       "imu": lambda: dict(length=shape[-1], kernel=args.series_kernel),
                       "eeg": lambda: dict(channels=shape[0], length=shape[-1], kernel=args.series_kernel),
                       }[m]()
    return settings


def make_model(clip, modalities, train_sets, args, ctx, experts, top_k):
    """A UniAlign on its own copy of the frozen CLIP (the adapters go inside the copy's blocks)."""
    model_args = dict(modalities=modalities, experts=experts, rank=args.rank, top_k=top_k, alpha=args.lora_alpha,
                      tokenizer_settings=tokenizer_settings({m: train_sets[m] for m in modalities}, args))
    model = UniAlign(copy.deepcopy(clip), grad_checkpointing=args.grad_checkpointing, **model_args)
    return model.to(ctx["device"]), model_args


def text_loss(text_of, tau, args):
    """The specialists' objective: their modality against frozen text only (Eq. 5)."""
    def loss(model, batch):
        z = scatter_groups(model(batch["inputs"]), batch["index"], len(batch["text"]))
        return soft_binding_loss(gather_with_grad(z), gather_with_grad(text_of(batch["text"])), tau, args.tau_s, beta=0.0)
    return loss


def specialist_stage(args, ctx, clip, text_of, train_sets, modalities):
    """Stage 2: the "prior work" baseline, separate training per modality with one plain LoRA (E = 1)."""
    specialists = {}
    for m in modalities:
        model, model_args = make_model(clip, [m], train_sets, args, ctx, experts=1, top_k=1)
        ctx["print"](f"specialist {m}: {model.count_trainable()['total']:,} trainable parameters")
        fit(f"specialist:{m}", wrap(model, ctx), [p for p in model.parameters() if p.requires_grad],
            [train_sets[m]], text_loss(text_of, 1 / clip.logit_scale.exp(), args), args.specialist_steps,
            args.batch_size, args, ctx, lr=args.lr, ckpt_path=os.path.join(args.out, f"specialist_{m}.pt"),
            extra_state={"model_args": model_args})
        specialists[m] = model.eval()
    return specialists


class WithPrior(torch.utils.data.Dataset):
    """A dataset whose samples carry a prior embedding p_i (Eq. 9) computed once by a specialist."""

    def __init__(self, dataset, prior):
        self.dataset, self.prior = dataset, prior

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], "prior": self.prior[i]}


def unialign_objective(model, clip, text_of, args, rank=0):
    """The UniAlign stage's batch -> (Eq. 10 loss, parts); also what bench.py times."""
    tau = 1 / clip.logit_scale.exp()

    def loss(ddp_model, batch):
        B = len(batch["text"])
        z = scatter_groups(ddp_model(batch["inputs"]), batch["index"], B)
        v = torch.zeros_like(z)
        if batch["anchor_image"] is not None:
            with torch.no_grad():
                v[batch["anchor_mask"]] = F.normalize(clip.encode_image(batch["anchor_image"]).float(), dim=-1).to(v.dtype)
        offset = rank * B  # Eq. 9 stays inside each rank's batch: its positions in the gathered one
        priors = [(batch["prior_index"][m] + offset, p) for m, p in batch["prior"].items()]
        balance = [(s["f"], s["P"]) for stats in model.router_stats.values() for s in stats]
        mask = gather_with_grad(batch["anchor_mask"].float()).bool()
        return unialign_loss(gather_with_grad(z), gather_with_grad(text_of(batch["text"])), tau,
                             anchor_mask=mask, v=gather_with_grad(v), tau_s=args.tau_s, beta=args.beta,
                             tau_kd=args.tau_kd, gamma=args.gamma, lambda_anchor=args.lambda_anchor,
                             priors=priors, lambda_prior=args.lambda_prior, balance=balance,
                             lambda_bal=args.lambda_bal)
    return loss


def unialign_stage(args, ctx, clip, text_of, train_sets, modalities):
    """Stage 3: one model, one phase, every dataset, Eq. 10."""
    model, model_args = make_model(clip, modalities, train_sets, args, ctx, args.experts, args.top_k)
    counts = model.count_trainable()
    ctx["print"](f"UniAlign: {counts['total']:,} trainable parameters (" +
                 ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "total") + ")")
    fit("unialign", wrap(model, ctx), [p for p in model.parameters() if p.requires_grad],
        [train_sets[m] for m in modalities], unialign_objective(model, clip, text_of, args, ctx["rank"]),
        args.steps, args.batch_size, args, ctx, lr=args.lr, ckpt_path=os.path.join(args.out, "ckpt.pt"),
        extra_state={"model_args": model_args})


# ----------------------------------------------------------------------------- main

def setup(args):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python train.py` is one process."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, device = int(os.environ.get("RANK", 0)), args.device
    if world_size > 1:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if args.precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit("--precision bf16 is not supported on this GPU: use --precision fp16")
    show = rank == 0
    return dict(rank=rank, world_size=world_size, device=device,
                print=lambda *a: show and tqdm.write(" ".join(str(x) for x in a)))


def wrap(model, ctx):
    """DDP when launched by torchrun. Every rank's batch may lack some modality, hence unused parameters."""
    if ctx["world_size"] == 1:
        return model
    return DDP(model, device_ids=[torch.cuda.current_device()] if ctx["device"] == "cuda" else None,
               find_unused_parameters=True)


def main(argv=None):
    args = get_args(argv)
    ctx = setup(args)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    t0 = time.time()
    if args.clip:  # real CLIP weights: every image-like input is prepared at CLIP's own resolution
        args.image_size = load_openai_clip(args.clip).visual.image_resolution
    train_sets = build_datasets(vars(args), "train")
    modalities = [m for m in EXTENDED if m in train_sets]
    if not args.clip and "image" not in train_sets:
        raise SystemExit("--data without --clip needs an image manifest to pre-train the anchor CLIP on")
    ctx["print"]("datasets: " + ", ".join(f"{m} {len(d)}" for m, d in train_sets.items()) + f" ({time.time() - t0:.1f}s)")

    clip, bpe = anchor_stage(args, ctx, train_sets)
    text_of = TextCache(clip, bpe, ctx["device"], [c for m in modalities for c in train_sets[m].captions])
    if args.prior == "specialists" or not args.data:  # on the synthetic world they are also the baseline
        specialists = specialist_stage(args, ctx, clip, text_of, train_sets, modalities)
    if args.prior == "specialists":
        for m in modalities:
            prior = embed(specialists[m], train_sets[m], ctx["device"])[0]
            train_sets[m] = WithPrior(train_sets[m], prior.cpu())
    elif args.prior == "none":
        args.lambda_prior = 0.0
    unialign_stage(args, ctx, clip, text_of, train_sets, modalities)
    ctx["print"](f"training done in {time.time() - t0:.0f}s")
    if ctx["rank"] == 0 and not args.no_eval:
        evaluate(args.out, ctx["device"])
    if ctx["world_size"] > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
