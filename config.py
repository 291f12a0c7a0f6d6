"""The configuration of a run: presets, every flag of train.py with its help, the refusal of
impossible settings, and which settings shape which stage (docs/method.md section 3).

A stage already in the run folder is reused, or resumed, only when every setting that shapes it
is equal; that set is derived from one list (`stage_settings`), so a new flag is checked
everywhere unless it is declared not to change what a stage computes.
"""
import argparse
import os

import torch

from checkpoint import CheckpointError
from lora_moe import TARGETS
from modalities import extended
from world import CONCEPTS

PRESETS = {
    # every stage exercised in tiny sizes: the test suite runs this; it learns nothing
    "smoke": dict(concepts=4, n_train=48, n_test=24, n_anchor=96, image_size=16, clip_width=32, clip_layers=2,
                  clip_heads=2, text_layers=1, embed_dim=32, vocab_size=600, anchor_steps=20, anchor_batch=32,
                  prior_size=48, prior_steps=4, specialist_steps=4, steps=8, batch_size=28, experts=2, rank=4, top_k=1, specialist_rank=4),
    # learns clearly in a few minutes on 2 CPU cores: the size a student reruns many times
    "course": dict(concepts=10, n_train=500, n_test=150, n_anchor=1000, image_size=32, clip_width=64, clip_layers=4,
                   clip_heads=4, text_layers=3, embed_dim=64, vocab_size=800, anchor_steps=150, anchor_batch=128,
                   prior_size=1000, prior_steps=40, specialist_steps=40, steps=120, batch_size=64, experts=4, rank=8,
                   top_k=2, specialist_rank=8),
    # the default recipe: the whole story in minutes on a laptop CPU
    "default": dict(concepts=10, n_train=2000, n_test=300, n_anchor=4000, image_size=32, clip_width=64, clip_layers=4,
                    clip_heads=4, text_layers=3, embed_dim=64, vocab_size=800, anchor_steps=300, anchor_batch=128,
                    prior_size=4000, prior_steps=120, specialist_steps=120, steps=400, batch_size=128, experts=4,
                    rank=8, top_k=2, specialist_rank=8),
}

# Which settings shape which stage. A stage is reused, or resumed, only when every setting that shapes
# it is equal. The stages: "anchor" (the world's CLIP), "prior" (the world's prior model), "specialist"
# (this run's baselines) and "unialign"; each is shaped by every setting except those named here.
RUN_ONLY = {"preset", "out", "resume", "device", "workers", "log_every", "ckpt_every", "no_eval", "max_bad_steps",
            "grad_checkpointing", "n_test", "on_bad", "cache", "no_cache"}  # change nothing a stage computes
UNIALIGN_ONLY = {"steps", "experts", "rank", "top_k", "router", "router_scope", "modalities", "alpha_sampling", "prior", "targets",
                 "beta", "tau_kd", "gamma", "lambda_anchor", "lambda_prior", "lambda_bal"}
SPECIALIST_ONLY = {"specialist_steps"}
PRIOR_ONLY = {"prior_size", "prior_steps"}
RUN_DATA = {"seed", "n_train", "train_sizes", "coverage", "caption_fraction", "held_out"}  # a run's own draw, not the world's
NOT_ANCHOR = {"lr", "batch_size", "specialist_rank", "lora_alpha", "frames", "audio_seconds", "points", "point_channels",
              "point_groups", "point_neighbours", "imu_length", "eeg_channels", "eeg_length",
              "series_kernel", "token_positions", "depth_format", "adapt"}  # used by the models trained on the anchor, not by the anchor CLIP
NOT_SHAPING = {"anchor": UNIALIGN_ONLY | SPECIALIST_ONLY | PRIOR_ONLY | RUN_DATA | NOT_ANCHOR,
               "prior": UNIALIGN_ONLY | SPECIALIST_ONLY | RUN_DATA,
               "specialist": UNIALIGN_ONLY | PRIOR_ONLY,
               "unialign": set()}


def stage_settings(args, stage):
    """The settings that shape `stage` ("anchor", "prior", "specialist" or "unialign")."""
    drop = RUN_ONLY | NOT_SHAPING[stage]
    return {k: v for k, v in sorted(vars(args).items()) if k not in drop}


def size_list(text):
    """An argparse type: MODALITY=N."""
    modality, _, size = text.partition("=")
    if modality not in extended() or not size.isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(f"expected MODALITY=N with N >= 1 and MODALITY one of {' '.join(extended())}, "
                                         f"got {text}")
    return modality, int(size)


def positive(kind):
    """An argparse type: a number > 0."""
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def fraction(text):
    """An argparse type: a number in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def non_negative(kind):
    """An argparse type: a number >= 0."""
    def parse(text):
        value = kind(text)
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def get_args(argv=None, description=None):
    """train.py's flags -> the resolved, checked settings; a preset sets the sizes a later flag may override."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=PRESETS, default="default")
    parser = make_parser(PRESETS[pre.parse_known_args(argv)[0].preset], description)
    args = parser.parse_args(argv)
    args.train_sizes = dict(args.train_sizes or [])
    if args.prior is None:
        args.prior = "specialists" if args.data else "world"
    check_args(parser, args)
    return args


def make_parser(preset, description=None):
    def by_preset(key):
        return "presets: " + ", ".join(f"{name} {p[key]}" for name, p in PRESETS.items())

    p = argparse.ArgumentParser(prog="train.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=PRESETS, default="default",
                   help="size of everything; a flag given after it overrides one value (default: %(default)s)")
    g.add_argument("--out", default="out", help="run folder: stages, checkpoint, log, metrics (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="initialisation and batch order; each stage is seeded from (seed, stage) (default: %(default)s)")
    g.add_argument("--world-seed", type=int, default=0,
                   help="the synthetic world (its data, hence also the raw baseline) (default: %(default)s)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="default: cuda when available")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype; fp16 adds a gradient scaler (default: %(default)s)")
    g.add_argument("--workers", type=non_negative(int), default=0, help="DataLoader worker processes (default: %(default)s)")
    g.add_argument("--log-every", type=positive(int), default=10, help="steps between log.jsonl lines (default: %(default)s)")
    g.add_argument("--no-eval", action="store_true", help="stop after training, without running eval.py")
    g.add_argument("--cache", metavar="DIR", help="where the world, its anchor CLIP and its prior model are kept once "
                                                 "built (default: $UNIALIGN_CACHE, else ~/.cache/unialign)")
    g.add_argument("--no-cache", action="store_true", help="build the world, anchor and prior afresh, reading and writing no cache")

    g = p.add_argument_group("data (the synthetic world unless --data is given)")
    g.add_argument("--data", nargs="+", metavar="MANIFEST", help="JSON Lines manifests, one dataset (modality) each")
    g.add_argument("--modalities", nargs="+", metavar="M",
                   help=f"extended modalities to train (default: every registered one: {' '.join(extended())})")
    g.add_argument("--concepts", type=positive(int), help="concepts in the synthetic world; " + by_preset("concepts"))
    g.add_argument("--n-train", type=positive(int),
                   help="training samples of each synthetic dataset of video, audio, point and depth; tactile, imu and eeg "
                        "get 15%% of it, as real ones are small (modalities.py: train_share); " + by_preset("n_train"))
    g.add_argument("--train-sizes", nargs="+", type=size_list, metavar="M=N",
                   help="training samples of these synthetic datasets, overriding --n-train's (e.g. tactile=500)")
    g.add_argument("--n-test", type=positive(int), help="test samples per synthetic dataset; " + by_preset("n_test"))
    g.add_argument("--n-anchor", type=positive(int),
                   help="samples of the synthetic image-text set (stage 1); " + by_preset("n_anchor"))
    g.add_argument("--vocabulary", default="own", choices=["own", "shared"],
                   help="own: each synthetic dataset names each concept by one of its synonyms; shared: every dataset "
                        "uses the shape's name (default: %(default)s)")
    g.add_argument("--coverage", type=fraction, default=0.7,
                   help="share of the concepts each extended synthetic dataset covers (default: %(default)s)")
    g.add_argument("--caption-fraction", type=fraction, default=0.2,
                   help="share of the training samples of a synthetic dataset with anchor images (video, audio, point, "
                        "depth) that carry a caption; the rest carry their anchor image only (default: %(default)s)")
    g.add_argument("--held-out", nargs="*", default=[], metavar="CONCEPT",
                   help="concepts removed from the extended-modality training sets (kept for image-text); "
                        "eval scores them apart")
    g.add_argument("--alpha-sampling", type=non_negative(float), default=0.5,
                   help="a dataset is drawn with probability ~ size^alpha (default: %(default)s)")
    g.add_argument("--on-bad", default="raise", choices=["raise", "skip"],
                   help="a manifest sample that cannot be read: stop, or skip it, counted and logged (default: raise)")
    g.add_argument("--depth-format", default="mm", choices=["mm", "sunrgbd"],
                   help="16-bit depth PNGs in millimetres (NYU Depth v2), or SUN RGB-D's bit-rotated millimetres "
                        "(readers.read_depth_metres) (default: mm)")
    g.add_argument("--image-size", type=positive(int),
                   help="images, tactile, depth and video frames (with --clip: CLIP's own); " + by_preset("image_size"))
    g.add_argument("--frames", type=positive(int), default=4, help="video frames per clip (default: %(default)s)")
    g.add_argument("--audio-seconds", type=positive(float), default=0.5, help="audio crop/pad length (default: %(default)s)")
    g.add_argument("--points", type=positive(int), default=256, help="points per cloud (default: %(default)s)")
    g.add_argument("--point-channels", type=int, default=3, choices=[3, 6], help="xyz, or xyz + rgb/normals (default: 3)")
    g.add_argument("--point-groups", type=positive(int), default=32,
                   help="point tokens: farthest-point-sampled centres (default: %(default)s)")
    g.add_argument("--point-neighbours", type=positive(int), default=16,
                   help="neighbours pooled per point token (default: %(default)s)")
    g.add_argument("--imu-length", type=positive(int), default=128, help="imu samples per recording (default: %(default)s)")
    g.add_argument("--eeg-channels", type=positive(int), default=16, help="eeg channels (default: %(default)s)")
    g.add_argument("--eeg-length", type=positive(int), default=128, help="eeg samples per recording (default: %(default)s)")
    g.add_argument("--series-kernel", type=positive(int), default=8,
                   help="Conv1d kernel and stride of the imu and eeg tokenizers (default: %(default)s)")

    g = p.add_argument_group("anchor CLIP (stage 1)")
    g.add_argument("--clip", metavar="PATH", help="OpenAI CLIP checkpoint (TorchScript or state dict): replaces stage 1")
    g.add_argument("--bpe", metavar="PATH", help="CLIP's bpe_simple_vocab_16e6.txt.gz (required with --clip)")
    g.add_argument("--anchor-steps", type=positive(int), help="optimizer steps of stage 1; " + by_preset("anchor_steps"))
    g.add_argument("--anchor-batch", type=positive(int), help="batch size of stage 1; " + by_preset("anchor_batch"))
    g.add_argument("--anchor-lr", type=positive(float), default=1e-3, help="peak AdamW learning rate of stage 1 (default: %(default)s)")

    g = p.add_argument_group("size of the tiny anchor CLIP (stage 1 without --clip)")
    g.add_argument("--clip-width", type=positive(int), help="width of both towers; " + by_preset("clip_width"))
    g.add_argument("--clip-layers", type=positive(int), help="blocks of the image tower; " + by_preset("clip_layers"))
    g.add_argument("--clip-heads", type=positive(int), help="attention heads; " + by_preset("clip_heads"))
    g.add_argument("--text-layers", type=positive(int), help="blocks of the text tower; " + by_preset("text_layers"))
    g.add_argument("--embed-dim", type=positive(int), help="dimension D of the joint space; " + by_preset("embed_dim"))
    g.add_argument("--vocab-size", type=positive(int), help="BPE vocabulary learned on the captions; " + by_preset("vocab_size"))
    g.add_argument("--patch-size", type=positive(int), default=8, help="patch size of the image tower (default: %(default)s)")
    g.add_argument("--context-length", type=positive(int), default=24,
                   help="text tokens per caption, longer ones cut (default: %(default)s)")

    g = p.add_argument_group("the prior model of Eq. 9, and the specialists (the prior work baseline)")
    g.add_argument("--prior", choices=["world", "specialists", "manifest", "none"],
                   help="prior embeddings p_i: world = one single-LoRA model per modality trained on the world's own "
                        "larger draw (every concept, every sample captioned), cached per world; specialists = this "
                        "run's; manifest = the manifests' prior fields; none (default: world, with --data specialists)")
    g.add_argument("--prior-size", type=positive(int), help="samples per modality of the prior's draw; " + by_preset("prior_size"))
    g.add_argument("--prior-steps", type=positive(int), help="optimizer steps of each prior model; " + by_preset("prior_steps"))
    g.add_argument("--specialist-steps", type=positive(int),
                   help="optimizer steps of each specialist; " + by_preset("specialist_steps"))
    g.add_argument("--specialist-rank", type=positive(int),
                   help="rank of the one LoRA of each specialist and prior model; " + by_preset("specialist_rank"))

    g = p.add_argument_group("UniAlign (stage 3)")
    g.add_argument("--steps", type=positive(int), help="optimizer steps of the UniAlign stage; " + by_preset("steps"))
    g.add_argument("--batch-size", type=positive(int),
                   help="global batch per optimizer step (all ranks together), also of the specialists; " + by_preset("batch_size"))
    g.add_argument("--grad-accum", type=positive(int), default=1, help="micro-batches per step (batch-size is split) (default: 1)")
    g.add_argument("--lr", type=positive(float), default=3e-3, help="peak AdamW learning rate of the prior models, specialists and UniAlign (stage 1: --anchor-lr) (default: %(default)s)")
    g.add_argument("--weight-decay", type=non_negative(float), default=0.01, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--warmup", type=non_negative(int), default=20,
                   help="linear warm-up steps before the cosine decay, at most a fifth of a stage's steps (default: %(default)s)")
    g.add_argument("--grad-clip", type=positive(float), default=1.0, help="gradient norm clip (default: %(default)s)")
    g.add_argument("--experts", type=positive(int), help="E, LoRA experts per adapted linear (Eq. 1); 1 = plain LoRA; " + by_preset("experts"))
    g.add_argument("--rank", type=positive(int), help="r, rank of each of UniAlign's experts; " + by_preset("rank"))
    g.add_argument("--top-k", type=positive(int), help="k experts per token; k = E is dense soft routing (Eq. 2); " + by_preset("top_k"))
    g.add_argument("--router", default="per-modality", choices=["per-modality", "shared"],
                   help="one router per modality (Eq. 2), or one router shared by all (an ablation) (default: per-modality)")
    g.add_argument("--router-scope", default="linear", choices=["linear", "block"],
                   help="a router per modality in every adapted linear (reading its input), or one per modality "
                        "per block shared by its linears (reading the block's ln_1 input; lora_moe.py) (default: linear)")
    g.add_argument("--adapt", nargs="+", default=list(TARGETS), choices=TARGETS, metavar="LINEAR",
                   help=f"which frozen linears of each block get experts (the specialists' and prior models' LoRA too), "
                        f"of {' '.join(TARGETS)} (default: all four)")
    g.add_argument("--token-positions", default="random", choices=["random", "clip"],
                   help="start of the tactile, depth and video tokenizers' positional embeddings: random, or CLIP's "
                        "own resampled to their grid (specialists and UniAlign) (default: random)")
    g.add_argument("--lora-alpha", type=positive(float), default=16.0, help="LoRA scale numerator, alpha / r (default: %(default)s)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute the frozen blocks in backward (less memory)")
    g.add_argument("--ckpt-every", type=positive(int), default=100, help="steps between checkpoints (default: %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted stage from its checkpoint in OUT")
    g.add_argument("--max-bad-steps", type=positive(int), default=20,
                   help="stop after this many non-finite losses in a row (default: %(default)s)")

    g = p.add_argument_group("losses (Eq. 4-10)")
    g.add_argument("--targets", default="soft", choices=["soft", "hard"],
                   help="soft binding targets Y of Eq. 4, or one-hot (plain contrastive, an ablation) (default: soft)")
    g.add_argument("--beta", type=non_negative(float), default=0.5, help="weight of L_xx in L_bind (Eq. 7) (default: %(default)s)")
    g.add_argument("--tau-s", type=positive(float), default=0.02, help="temperature of the soft targets (Eq. 4) (default: %(default)s)")
    g.add_argument("--tau-kd", type=positive(float), default=0.1, help="distillation temperature (Eq. 8, 9) (default: %(default)s)")
    g.add_argument("--gamma", type=non_negative(float), default=1.0, help="weight of the feature term of Eq. 8 (default: %(default)s)")
    g.add_argument("--lambda-anchor", type=non_negative(float), default=1.0, help="weight of L_anchor in Eq. 10 (default: %(default)s)")
    g.add_argument("--lambda-prior", type=non_negative(float), default=1.0, help="weight of L_prior in Eq. 10 (default: %(default)s)")
    g.add_argument("--lambda-bal", type=non_negative(float), default=0.01, help="weight of L_bal in Eq. 10 (default: %(default)s)")

    p.set_defaults(**preset)
    return p


def check_args(parser, args):
    """Refuse impossible settings before any work, in one line naming the flag (parser.error exits 2)."""
    if args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} is more than --experts {args.experts}")
    if args.batch_size % args.grad_accum:
        parser.error(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
    if args.clip and not args.bpe:
        parser.error("--clip needs --bpe: the path of CLIP's bpe_simple_vocab_16e6.txt.gz")
    for flag, path in (("--clip", args.clip), ("--bpe", args.bpe), *(("--data", d) for d in args.data or [])):
        if path and not os.path.isfile(path):
            parser.error(f"{flag} {path}: no such file")
    unknown = [m for m in args.modalities or [] if m not in extended()]
    if unknown:
        parser.error(f"--modalities: unknown {unknown}; registered extended modalities are {extended()}")
    if args.held_out and not args.data:
        names = CONCEPTS[:args.concepts]
        if unknown := [c for c in args.held_out if c not in names]:
            parser.error(f"--held-out: unknown concept {unknown}; this world's concepts are {' '.join(names)}")
        if len(set(args.held_out)) >= len(names):
            parser.error("--held-out: every concept is held out")
    if args.concepts > len(CONCEPTS):
        parser.error(f"--concepts {args.concepts}: the synthetic world has {len(CONCEPTS)} shapes")


def check_settings(saved, args, stage, path):
    """Refuse to reuse or resume a stage saved with other settings, naming every one that differs."""
    current = stage_settings(args, stage)
    diff = [f"--{k.replace('_', '-')}: saved {saved.get(k)!r}, now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        raise CheckpointError(f"{path} was made with other settings ({'; '.join(diff)}); "
                              f"use the same settings or another --out")
