"""
Train UniAlign: one encoder, one phase, all datasets, all three losses (docs/method.md section 3).

With no flags this runs the whole story on the synthetic world (docs/method.md section 5):

  0. world        generate the world's datasets (train, test)               -> the cache
  1. anchor       the world's CLIP, pre-trained on its image-text set       -> OUT/anchor.pt
  2. prior        the world's prior model (Eq. 9): one single-LoRA model
                  per extended modality, on the world's own larger draw     -> OUT/prior_<m>.pt
  3. specialists  the "prior work": one single-LoRA model per extended
                  modality, trained alone, contrastive to text only (Eq. 5) -> OUT/specialist_<m>.pt
  4. unialign     one model on every dataset at once with Eq. 10            -> OUT/ckpt.pt
  5. eval         eval.py on the finished run                               -> OUT/metrics.{json,md}

The world, its anchor and its prior depend on --world-seed, not --seed: like the public CLIP and
prior models of real work, they are the same for every run, built once and kept in the cache
(--cache). A stage whose output is already in OUT, made with the same settings, is reused. Each
stage is seeded from (its seed, its name), so its result does not depend on how earlier stages
were obtained.

  python train.py                          # the default recipe: on 2 CPU cores about 7.5 minutes the first
                                           # time, 4.5 once world, anchor and prior are cached (docs/benchmarks.md)
  python train.py --preset course          # learns clearly in a few minutes: the size for exercises
  python train.py --preset smoke           # every stage in tiny sizes: exercises the code, learns nothing
  torchrun --nproc_per_node 8 train.py --clip ViT-B-16.pt --bpe bpe_simple_vocab_16e6.txt.gz \\
      --data audio.jsonl point.jsonl --device cuda --precision bf16
"""
import copy
import hashlib
import os
import shlex
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import eval as evaluation
from bpe import BPETokenizer
from checkpoint import (CheckpointError, check_writable, load_checkpoint, lock_run_folder, remove_temp_files,
                        save_checkpoint, temp_files, unlock_run_folder)
from config import check_settings, get_args, stage_settings
from clip import CLIP, load_openai_clip
from cache import cached, default_folder
from data import WORLD_CODE, Captioned, build_datasets, sizes_of
from encoder import UniAlign, embed, load_anchor, load_model
from loop import Interrupted, log, rank_and_world, stage_seed, stop_on_signals, train_loop
from manifest import SampleError
from modalities import MODALITIES, extended
from objectives import TextCache, WithPrior, anchor_objective, specialist_objective, unialign_objective

# The code the world's anchor CLIP and prior model are computed by: their cache entries are rebuilt
# when any of it changes.
TRAINING_CODE = WORLD_CODE + ["bpe.py", "clip.py", "encoder.py", "lora_moe.py", "loop.py", "losses.py", "manifest.py",
                              "objectives.py", "tokenizers.py", "train.py"]

# ----------------------------------------------------------------------------- the run folder

def check_run_folder(args):
    """Before any work: refuse every stage file in OUT made with other settings, or unfinished without
    --resume."""
    stages = [("anchor.pt", "anchor", args.anchor_steps), ("ckpt.pt", "unialign", args.steps)]
    for kind, steps in (("prior", args.prior_steps), ("specialist", args.specialist_steps)):
        stages += [(name, f"{kind}:{name[len(kind) + 1:-3]}", steps) for name in sorted(os.listdir(args.out))
                   if name.startswith(f"{kind}_") and name.endswith(".pt")]
    for name, stage, steps in stages:
        reusable(os.path.join(args.out, name), args, stage, steps)


def check_resume(args, lock):
    """--resume needs OUT/ckpt.pt, or the traces of a run killed before its first checkpoint was whole
    (its pid in the lock, a temporary file, its log): then its stages start from step 0. A folder
    with no trace of a run is refused, so a mistyped --out never silently starts afresh."""
    ckpt = os.path.join(args.out, "ckpt.pt")
    if os.path.exists(ckpt):
        return
    traces = [f"pid {lock.previous_pid} in its lock"] if lock.previous_pid else []
    traces += [f"temporary file {name}" for name in temp_files(args.out)]
    traces += ["log.jsonl"] if os.path.exists(os.path.join(args.out, "log.jsonl")) else []
    if not traces:
        raise SystemExit(f"--resume: {ckpt} does not exist, there is nothing to resume")
    log(f"--resume: {ckpt} does not exist, but {args.out} holds a run killed before its first checkpoint was "
        f"whole ({', '.join(traces)}): its stages without a checkpoint start from step 0")


def resume_command(argv):
    """The command that resumes this run: the one that started it, with --resume."""
    if argv is None:  # from the command line: its exact words
        argv, command = sys.argv[1:], sys.orig_argv[:len(sys.orig_argv) - len(sys.argv) + 1]
    else:
        command = ["python", "train.py"]
    if rank_and_world()[1] > 1:  # under torchrun: its launcher's command line, when it can be read
        try:
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
                launcher = [word.decode() for word in f.read().split(b"\0") if word]
        except OSError:
            launcher = []
        if any(word.endswith("train.py") for word in launcher):
            command, argv = launcher, []
        else:
            command = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')}", "train.py"]
    return shlex.join(command + argv + ([] if "--resume" in argv + command else ["--resume"]))


def reusable(path, args, stage, steps):
    """The checkpoint at `path` when it holds `stage` finished with these settings, else None.
    Refuses one made with other settings, and an unfinished one without --resume."""
    if not os.path.exists(path):
        return None
    ckpt = load_checkpoint(path, ("step", "settings"), f"the {stage} stage of a train.py run")
    check_settings(ckpt["settings"], args, stage.split(":")[0], path)
    if ckpt["step"] >= steps:
        return ckpt
    if not args.resume:
        raise SystemExit(f"{path} holds {stage} at step {ckpt['step']} of {steps}: pass --resume to continue it, "
                         f"or choose another --out")
    return None


def cache_folder(args):
    return None if args.no_cache else args.cache or default_folder()


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------- the stages

def train_anchor(args, train_sets):
    """Stage 1: the frozen anchor space: OpenAI weights if given, else the world's tiny CLIP: OUT/anchor.pt
    when it is there with the same settings, else from the cache, else pre-trained by `pretrain_anchor`."""
    path, bpe_path = os.path.join(args.out, "anchor.pt"), os.path.join(args.out, "bpe.txt.gz")
    if not args.clip and rank_and_world()[0] == 0:
        if reusable(path, args, "anchor", args.anchor_steps) is not None:
            log(f"anchor: reusing {path} (finished, same settings)")
        else:
            def build():
                pretrain_anchor(args, train_sets["image"], bpe_path, path)
                with open(bpe_path, "rb") as f:
                    return {"anchor": load_checkpoint(path), "bpe": torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)}
            content, how = cached(cache_folder(args), "anchor", stage_settings(args, "anchor"), TRAINING_CODE, build,
                                  "the anchor CLIP")
            if how == "reused":
                save_checkpoint(content["anchor"], path)
                with open(bpe_path, "wb") as f:
                    f.write(content["bpe"].numpy().tobytes())
                log(f"anchor: the world's CLIP, reused from the cache in {cache_folder(args)}")
    if rank_and_world()[1] > 1:
        dist.barrier()  # the other ranks wait for rank 0's anchor
    clip, bpe = load_anchor(vars(args))
    return clip.to(args.device), bpe


def pretrain_anchor(args, images, bpe_path, path):
    """A tiny CLIP and its BPE learned on the synthetic image-text set with Eq. 5, its targets (Eq. 4)
    hard: identical captions are the positives (docs/method.md section 3 says why). Seeded by the
    world: the same anchor for every run of a world."""
    bpe = BPETokenizer.train(list(images.captions), args.vocab_size, bpe_path)
    config = dict(embed_dim=args.embed_dim, image_resolution=args.image_size, vision_layers=args.clip_layers,
                  vision_width=args.clip_width, vision_patch_size=args.patch_size, vision_heads=args.clip_heads,
                  context_length=args.context_length, vocab_size=bpe.vocab_size, transformer_width=args.clip_width,
                  transformer_heads=args.clip_heads, transformer_layers=args.text_layers)
    torch.manual_seed(stage_seed(args.world_seed, "anchor"))
    clip = CLIP(**config).to(args.device)
    log(f"anchor CLIP: {sum(p.numel() for p in clip.parameters()):,} parameters, all trained")
    train_loop("anchor", clip, anchor_objective(bpe, clip.context_length, args.device), [images], args.anchor_steps,
               args.anchor_batch, args.anchor_lr, args, distributed=False, seed=args.world_seed)
    save_checkpoint({"config": config, "state_dict": clip.state_dict(), "step": args.anchor_steps,
                     "settings": stage_settings(args, "anchor")}, path)


def make_model(clip, modalities, train_sets, args, experts, top_k, rank):
    """A UniAlign on its own copy of the frozen CLIP (the adapters go inside the copy's blocks), each
    tokenizer built for the input size its dataset delivers (modalities.py)."""
    sizes = sizes_of(vars(args))
    settings = {m: MODALITIES[m].settings(train_sets[m][0]["input"].shape, sizes) for m in modalities}
    model_args = dict(modalities=modalities, experts=experts, rank=rank, top_k=top_k, alpha=args.lora_alpha,
                      tokenizer_settings=settings, targets=tuple(args.adapt), shared_router=args.router == "shared",
                      router_scope=args.router_scope, token_positions=args.token_positions)
    model = UniAlign(copy.deepcopy(clip), grad_checkpointing=args.grad_checkpointing, **model_args)
    return model.to(args.device), model_args


def wrap(model):
    """DDP when launched by torchrun. A rank's batch may lack some modality, hence unused parameters."""
    if rank_and_world()[1] == 1:
        return model
    return DDP(model, device_ids=[torch.cuda.current_device()] if next(model.parameters()).is_cuda else None,
               find_unused_parameters=True)


def train_single_lora(args, clip, text_of, dataset, stage, steps, path, seed, distributed=True):
    """One plain-LoRA model (E = 1) for one modality, trained alone with Eq. 5 against text: a specialist,
    or a prior model. Reused from `path` when finished there with the same settings."""
    m = dataset.modality
    torch.manual_seed(stage_seed(seed, stage))
    model, model_args = make_model(clip, [m], {m: dataset}, args, experts=1, top_k=1, rank=args.specialist_rank)
    if (ckpt := reusable(path, args, stage, steps)) is not None:
        log(f"{stage}: reusing {path} (finished, same settings)")
        model.load_trainable_state_dict(ckpt["model"])
    else:
        log(f"{stage}: {model.count_trainable()['total']:,} trainable parameters, {len(dataset)} captioned samples")
        train_loop(stage, wrap(model) if distributed else model, specialist_objective(text_of, 1 / clip.logit_scale.exp(), args),
                   [dataset], steps, args.batch_size, args.lr, args, ckpt_path=path, extra={"model_args": model_args},
                   seed=seed, distributed=distributed)
    return model.eval()


def train_prior(args, clip, bpe, modalities):
    """Stage 2: the world's prior model of Eq. 9, standing in for ImageBind or ViT-Lens, which were
    trained on far more data than a UniAlign run sees: one plain-LoRA model per extended modality,
    trained like a specialist on the world's own draw (split "prior": `prior_size` samples, every
    concept, every name, every sample captioned), never on a run's samples. Seeded by the world and
    kept in the cache, so every run of the world has the same prior; OUT/prior_<m>.pt holds a copy."""
    anchor = file_digest(args.clip or os.path.join(args.out, "anchor.pt"))
    paths = {m: os.path.join(args.out, f"prior_{m}.pt") for m in modalities}
    if rank_and_world()[0] == 0:  # rank 0 builds, the others wait below
        for m, path in paths.items():
            if reusable(path, args, f"prior:{m}", args.prior_steps) is not None:
                log(f"prior:{m}: reusing {path} (finished, same settings)")
                continue

            def build():
                draw = build_datasets(vars(args), "prior", [m])[m]
                text_of = TextCache(clip, bpe, args.device, draw.captions)
                train_single_lora(args, clip, text_of, draw, f"prior:{m}", args.prior_steps, path, args.world_seed,
                                  distributed=False)
                return load_checkpoint(path)
            content, how = cached(cache_folder(args), "prior", {**stage_settings(args, "prior"), "modality": m,
                                                                "anchor": anchor}, TRAINING_CODE, build, f"the {m} prior")
            if how == "reused":
                save_checkpoint(content, path)
                log(f"prior:{m}: the world's prior model, reused from the cache in {cache_folder(args)}")
    if rank_and_world()[1] > 1:
        dist.barrier()  # the other ranks wait for rank 0's prior models
    return {m: load_model(path, clip, args.device)[0] for m, path in paths.items()}


def train_specialists(args, clip, text_of, train_sets, modalities):
    """Stage 3: the "prior work" baseline, separate training per modality with one plain LoRA (E = 1),
    on the samples of the run's own training set that carry a caption."""
    return {m: train_single_lora(args, clip, text_of, Captioned(train_sets[m]), f"specialist:{m}", args.specialist_steps,
                                 os.path.join(args.out, f"specialist_{m}.pt"), args.seed) for m in modalities}


def train_unialign(args, clip, text_of, train_sets, modalities, prior_dims):
    """Stage 4: one model, one phase, every dataset, Eq. 10."""
    path = os.path.join(args.out, "ckpt.pt")
    torch.manual_seed(stage_seed(args.seed, "unialign"))
    model, model_args = make_model(clip, modalities, train_sets, args, args.experts, args.top_k, args.rank)
    counts = model.count_trainable()
    log(f"UniAlign: {counts['total']:,} trainable parameters (" +
        ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "total") + ")")
    if reusable(path, args, "unialign", args.steps) is not None:
        log(f"unialign: reusing {path} (finished, same settings)")
    else:
        train_loop("unialign", wrap(model), unialign_objective(clip, text_of, args, prior_dims),
                   [train_sets[m] for m in modalities], args.steps, args.batch_size, args.lr, args, ckpt_path=path,
                   extra={"model_args": model_args, "config": vars(args)})


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = get_args(argv, __doc__)
    # setup: one process, or one per GPU under torchrun (which sets WORLD_SIZE, RANK, LOCAL_RANK)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    if args.precision == "bf16" and args.device == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit("--precision bf16 is not supported on this GPU: use --precision fp16")
    lock, interrupted = None, False
    with stop_on_signals():  # Ctrl-C and SIGTERM: the step finishes, a checkpoint saves it, exit 130 or 143
        try:
            if args.resume and not os.path.isdir(args.out):
                raise SystemExit(f"--resume: {args.out} does not exist, there is nothing to resume")
            check_writable(args.out)
            if rank_and_world()[0] == 0:
                lock = lock_run_folder(args.out)  # a folder in use is refused in one line, by the handler below
                if args.resume:
                    check_resume(args, lock)
                if stale := remove_temp_files(args.out):
                    log(f"removed {len(stale)} temporary files a killed save left in {args.out}: {', '.join(stale)}")
            run(args)
            if dist.is_initialized():
                dist.barrier()  # every rank is done before any closes its connections
        except (SampleError, CheckpointError) as error:  # a user's bad file, manifest, checkpoint or folder: one line
            raise SystemExit(f"error: {error}") from None
        except Interrupted as stop:
            interrupted = True
            if rank_and_world()[0] == 0:
                print(f"{stop.describe()}. Resume with: {resume_command(argv)}", file=sys.stderr, flush=True)
            if argv is None:  # the process exits now: a further signal (torchrun forwards one) must not change its code
                for signum in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(signum, signal.SIG_IGN)
            raise SystemExit(stop.code) from None
        finally:
            if lock:
                unlock_run_folder(lock, keep_pid=interrupted)
            if dist.is_initialized():
                dist.destroy_process_group()


def run(args):
    if args.clip:  # real CLIP weights: every image-like input is prepared at CLIP's own resolution
        args.image_size = load_openai_clip(args.clip).visual.image_resolution
    check_run_folder(args)
    t0 = time.time()
    train_sets = build_datasets(vars(args), "train")
    modalities = [m for m in args.modalities or extended() if m in train_sets]
    if not args.clip and "image" not in train_sets:
        raise SystemExit("--data without --clip needs an image manifest to pre-train the anchor CLIP on")
    log("datasets: " + ", ".join(f"{m} {len(d)}" + (f" ({sum(c is not None for c in d.captions)} captioned)"
                                                      if None in d.captions else "") for m, d in train_sets.items())
        + f" ({time.time() - t0:.1f}s)")
    if not args.data:
        built = sum(getattr(d, "cache_use", "built") == "built" for d in train_sets.values())
        log(f"world: {built} datasets built, {len(train_sets) - built} reused, "
            + (f"cached in {cache_folder(args)}" if cache_folder(args) else "not cached (--no-cache)"))

    clip, bpe = train_anchor(args, train_sets)
    text_of = TextCache(clip, bpe, args.device, [c for m in modalities for c in train_sets[m].captions])
    prior_dims = {}
    priors = train_prior(args, clip, bpe, modalities) if args.prior == "world" else None
    if args.prior == "specialists" or not args.data:  # on the synthetic world they are also the baseline
        specialists = train_specialists(args, clip, text_of, train_sets, modalities)
        if args.prior == "specialists":
            priors = specialists
    if priors:
        for m in modalities:
            prior = embed(priors[m], train_sets[m], args.device)[0].cpu()
            train_sets[m], prior_dims[m] = WithPrior(train_sets[m], prior), prior.shape[1]
    elif args.prior == "manifest":
        prior_dims = {m: p.shape[0] for m in modalities if (p := train_sets[m][0]["prior"]) is not None}
    train_unialign(args, clip, text_of, train_sets, modalities, prior_dims)
    log(f"training done in {time.time() - t0:.0f}s")
    if rank_and_world()[0] == 0 and not args.no_eval:
        evaluation.evaluate(args.out, args.device)


if __name__ == "__main__":
    main()
