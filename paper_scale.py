"""This code at the paper's scale, ViT-B/16 (no weights or GPU needed). Prints, never asserts.

- params: UniAlign's trainable parameters at ViT-B/16, E = 4, r = 8, the seven extended modalities
  at the README's real-data sizes, by part and for both --router-scope settings, beside the
  paper's 7.8M; counted from shapes on the meta device (no weights, no time).
- reference: clip.py's forward (ViT-B/16 at batch 1 and 8, the default recipe's ViT at batch 128,
  and both text towers) against a reference on the same weights: nn.MultiheadAttention, as in
  OpenAI's ResidualAttentionBlock, and with `--openai-clip DIR` OpenAI's own model.py, imported from
  a checkout of github.com/openai/CLIP at run time. Target: ours / reference <= 1.00, the models
  called in turn, repeat after repeat (timing.median_times).

    python paper_scale.py --only params
    python paper_scale.py --threads 1 --only reference --openai-clip ~/src/CLIP
"""

import argparse
import copy
import importlib.util
import json
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

import config
from clip import CLIP
from data import sizes_of
from encoder import UniAlign
from modalities import MODALITIES
from preprocess import HOP, SAMPLE_RATE, WINDOW
from timing import CONFIGS, median_times, print_table, row

# ----------------------------------------------------------------------------------------------
# Trainable parameters at the paper's scale, from shapes alone
# ----------------------------------------------------------------------------------------------

PAPER_TRAINABLE = 7.8e6  # the paper's count for UniAlign at ViT-B/16, E = 4, r = 8
# the sizes of the README's real-data command (section "Real CLIP weights and real data"), at ViT-B/16's 224 px;
# the rest (E = 4, r = 8, k = 2, all four linears, imu 128 and eeg 16 x 128 samples) are train.py's defaults
REAL_DATA_FLAGS = ["--image-size", "224", "--frames", "8", "--audio-seconds", "5", "--points", "8192",
                   "--point-groups", "512", "--point-neighbours", "32"]


def input_shapes(sizes):
    """The tensor each extended modality's preprocessing delivers at `sizes` (modalities.py), by shape only."""
    s, seconds = sizes["image_size"], sizes["audio_seconds"]
    return {"video": (sizes["frames"], 3, s, s),
            "audio": (1, 128, (round(seconds * SAMPLE_RATE) - WINDOW) // HOP + 1),  # preprocess.log_mel's frames
            "point": (sizes["points"], sizes["point_channels"]), "depth": (1, s, s), "tactile": (3, s, s),
            "imu": (6, sizes["imu_length"]), "eeg": (sizes["eeg_channels"], sizes["eeg_length"])}


def paper_scale_parameters(router_scope, flags=REAL_DATA_FLAGS):
    """UniAlign's trainable parameters at ViT-B/16 for the seven extended modalities: {part: count},
    each tokenizer apart, then tokenizers, experts, routers and total (UniAlign.count_trainable).

    Built on the meta device: tensors have shapes and no storage, so ViT-B/16 costs nothing."""
    args = config.get_args(flags)
    sizes = sizes_of(vars(args))
    shapes = input_shapes(sizes)
    settings = {m: MODALITIES[m].settings(shape, sizes) for m, shape in shapes.items()}
    with torch.device("meta"):
        model = UniAlign(CLIP(**CONFIGS["vit_b16"]["clip"]), list(shapes), settings, experts=args.experts,
                         rank=args.rank, top_k=args.top_k, alpha=args.lora_alpha, targets=tuple(args.adapt),
                         router_scope=router_scope)
    counts = {f"tokenizer {m}": sum(p.numel() for p in model.tokenizers[m].parameters()) for m in shapes}
    return {**counts, **model.count_trainable()}, shapes


def trainable_parameters():
    """The params section: both router scopes side by side, with the input shapes they were counted at."""
    (linear, shapes), (block, _) = paper_scale_parameters("linear"), paper_scale_parameters("block")
    return {"inputs": {m: "x".join(map(str, shape)) for m, shape in shapes.items()},
            "counts": [{"part": part, "linear": linear[part], "block": block[part]} for part in linear],
            "paper": PAPER_TRAINABLE}


def print_parameters(result):
    print("\nUniAlign's trainable parameters at ViT-B/16 (width 768, 12 blocks), E = 4, r = 8, all four linears "
          "adapted;\ninputs " + ", ".join(f"{m} {shape}" for m, shape in result["inputs"].items()))
    print(f"{'part':<20} {'--router-scope linear':>22} {'--router-scope block':>22}")
    for r in result["counts"]:
        print(f"{r['part']:<20} {r['linear']:>22,} {r['block']:>22,}")
    print(f"{'the paper':<20} {result['paper'] / 1e6:>21.1f}M {'':>22}")
# clip.py against a reference on the same weights
# ----------------------------------------------------------------------------------------------

class ReferenceQuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)  # as OpenAI's model.py writes it


class ReferenceBlock(nn.Module):
    """The block as OpenAI's ResidualAttentionBlock runs it: nn.MultiheadAttention on (L, B, W),
    which computes attention with torch's fused scaled_dot_product_attention. Same parameter names
    as clip.ResidualAttentionBlock, so our state dict loads into it."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", ReferenceQuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x, mask):  # (L, B, W)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class ReferenceTransformer(nn.Module):
    """Stands in for a clip.Transformer: (B, L, W) in and out, (L, B, W) inside as in OpenAI's model."""

    def __init__(self, transformer, causal):
        super().__init__()
        self.causal = causal
        self.resblocks = nn.Sequential(*[ReferenceBlock(transformer.width, block.attn.heads)
                                         for block in transformer.resblocks])
        self.load_state_dict(transformer.state_dict())

    def forward(self, x):
        L = x.shape[1]
        mask = torch.full((L, L), float("-inf"), dtype=x.dtype, device=x.device).triu(1) if self.causal else None
        x = x.transpose(0, 1)
        for block in self.resblocks:
            x = block(x, mask)
        return x.transpose(0, 1)


def with_reference_transformer(model):
    """A copy of a clip.ViT or clip.CLIP whose transformer is the nn.MultiheadAttention reference."""
    reference = copy.deepcopy(model)
    reference.transformer = ReferenceTransformer(model.transformer, causal=isinstance(model, CLIP))
    return reference


def openai_model_module(directory):
    """clip/model.py of a checkout of github.com/openai/CLIP, imported by path (it needs only torch)."""
    path = Path(directory).expanduser() / "clip" / "model.py"
    if not path.is_file():
        raise SystemExit(f"paper_scale.py: --openai-clip {directory}: no clip/model.py there "
                         "(give a checkout of github.com/openai/CLIP)")
    spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# (name, tower, clip.CLIP arguments, batch, repeats multiplier): ViT-B/16 and train.py's default recipe
REFERENCE_SHAPES = [
    ("ViT-B/16, batch 1", "image", CONFIGS["vit_b16"]["clip"], 1, 4),
    ("ViT-B/16, batch 8", "image", CONFIGS["vit_b16"]["clip"], 8, 1),
    ("default ViT, batch 128", "image", CONFIGS["default"]["clip"], 128, 20),
    ("ViT-B/16 text, batch 8", "text", CONFIGS["vit_b16"]["clip"], 8, 10),
    ("default text, batch 128", "text", CONFIGS["default"]["clip"], 128, 20),
]


def reference_models(tower, config, device, openai):
    """(ours, {reference name: model}, the configuration), all on the same weights: the ViT for "image",
    the whole CLIP for "text" (with a small image tower: only encode_text runs)."""
    if tower == "text":  # one head per 64 channels in the image tower, as OpenAI's CLIP fixes it
        config = {**config, "image_resolution": 32, "vision_patch_size": 8, "vision_width": 64, "vision_layers": 1,
                  "vision_heads": 1}
    torch.manual_seed(0)
    model = CLIP(**config).to(device).requires_grad_(False).eval()
    ours = model.visual if tower == "image" else model
    references = {"nn.MultiheadAttention": with_reference_transformer(ours)}
    if openai is not None:
        if tower == "image":
            theirs = openai.VisionTransformer(config["image_resolution"], config["vision_patch_size"],
                                              config["vision_width"], config["vision_layers"],
                                              config["vision_heads"], config["embed_dim"])
        else:
            theirs = openai.CLIP(config["embed_dim"], config["image_resolution"], config["vision_layers"],
                                 config["vision_width"], config["vision_patch_size"], config["context_length"],
                                 config["vocab_size"], config["transformer_width"], config["transformer_heads"],
                                 config["transformer_layers"])
        theirs.load_state_dict(ours.state_dict())
        references["OpenAI model.py"] = theirs.to(device).requires_grad_(False).eval()
    return ours, references, config


def reference_parity(device, repeats, openai_dir=None):
    """ours / reference forward time at each REFERENCE_SHAPES entry, interleaved, without grad; the
    outputs are checked to agree first."""
    openai = openai_model_module(openai_dir) if openai_dir else None
    rows = []
    for name, tower, config, batch, more in REFERENCE_SHAPES:
        ours, references, config = reference_models(tower, config, device, openai)
        if tower == "image":
            size = config["image_resolution"]
            x = torch.randn(batch, 3, size, size, device=device)
            calls = {"ours": lambda: ours(x), **{k: lambda m=m: m(x) for k, m in references.items()}}
        else:  # random ids, the end-of-text token (the largest id) last: OpenAI's encode_text wants full rows
            x = torch.randint(1, config["vocab_size"] - 1, (batch, config["context_length"]), device=device)
            x[:, -1] = config["vocab_size"] - 1
            calls = {"ours": lambda: ours.encode_text(x),
                     **{k: lambda m=m: m.encode_text(x) for k, m in references.items()}}
        with torch.no_grad():
            expected = calls["ours"]()
            for k in references:  # the same function, or the times mean nothing
                torch.testing.assert_close(calls[k](), expected, rtol=1e-4, atol=1e-4, msg=f"{name}: {k}")
            times = median_times(calls, repeats * more, device)
        rows += [row(f"{name}: ours / {k}", times, "ours", k, "<= 1.00") for k in references]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=["params", "reference"], default=["params", "reference"],
                        help="sections to run (default: both)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7, help="reference section: interleaved repeats (default: 7)")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--openai-clip", metavar="DIR", help="reference section: also time OpenAI's clip/model.py "
                        "from DIR, a checkout of github.com/openai/CLIP")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    if "params" in args.only:
        results["params"] = trainable_parameters()
    if "reference" in args.only:
        results["reference"] = reference_parity(torch.device(args.device), args.repeats, args.openai_clip)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    if "params" in results:
        print_parameters(results["params"])
    if "reference" in results:
        print_table("clip.py against a reference on the same weights: forward without grad (medians)", results["reference"])


if __name__ == "__main__":
    main()
