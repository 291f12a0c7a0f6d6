"""The universal encoder of docs/method.md section 1: every modality through one frozen CLIP ViT.

`UniAlign` holds the frozen CLIP (clip.py), one tokenizer per extended modality (tokenizers.py,
chosen by modalities.py) and the LoRA-MoE experts inside the frozen ViT blocks (lora_moe.py,
Eq. 1-2): z = normalize(UniAlign(x, m)). Below it, what every script needs to use a run: the
anchor CLIP with its BPE, the frozen text tower on captions, and a trained model from its
checkpoint.
"""

import copy
import os

import torch
import torch.nn.functional as F
from torch import nn

from bpe import BPETokenizer
from checkpoint import load_checkpoint
from clip import CLIP, load_openai_clip
from lora_moe import TARGETS, add_lora_moe, routed, routing_context_fn
from modalities import MODALITIES


class UniAlign(nn.Module):
    """One encoder for every modality: z = normalize(UniAlign(x, m)).

    Images and text take CLIP's untouched frozen path, so the anchor space never moves. An extended
    modality m takes its tokenizer -> CLIP's class token + the frozen ViT blocks whose linears are
    LoRA-MoE adapted and routed by m (Eq. 1-2) -> ln_post -> projection. Trainable: the tokenizers,
    the experts and the routers; nothing of CLIP.

    Choices of ours (docs/method.md section 7): `router_scope` "linear" (a router per modality in
    every adapted linear) or "block" (one per modality and block, reading its ln_1(x); lora_moe.py);
    `token_positions` "random" or "clip" (the image-like tokenizers start from CLIP's positional
    embedding; tokenizers.py). `merge(m)` / `unmerge()` fold m's expected expert update in for inference.
    """

    def __init__(self, clip, modalities, tokenizer_settings=None, experts=4, rank=8, top_k=2, alpha=16.0,
                 targets=TARGETS, shared_router=False, grad_checkpointing=False, router_scope="linear",
                 token_positions="random"):
        super().__init__()
        unknown = [m for m in modalities if MODALITIES.get(m) is None or MODALITIES[m].tokenizer is None]
        if unknown:
            raise ValueError(f"no tokenizer for {unknown}; extended modalities are "
                             f"{[m for m, s in MODALITIES.items() if s.tokenizer]}")
        if token_positions not in ("random", "clip"):
            raise ValueError(f"token_positions must be 'random' or 'clip', got {token_positions!r}")
        self.clip = clip.requires_grad_(False).eval()
        self.modalities = list(modalities)
        settings = tokenizer_settings or {}
        self.tokenizers = nn.ModuleDict({m: self.make_tokenizer(m, settings.get(m, {}), token_positions)
                                         for m in self.modalities})
        self.adapters = add_lora_moe(clip.visual.transformer.resblocks, self.modalities, targets, experts, rank,
                                     top_k, alpha, router_scope)  # a plain list: they are registered inside clip
        if shared_router and experts > 1:  # the ablation of Eq. 2's W_g^(m): one router, whatever the modality
            for adapter in self.adapters:
                for m in self.modalities:
                    adapter.routers[m] = adapter.routers[self.modalities[0]]
        clip.visual.transformer.grad_checkpointing = grad_checkpointing

    def make_tokenizer(self, modality, settings, token_positions):
        """Modality's tokenizer from CLIP's patch conv; with token_positions "clip", the image-like ones
        (tactile, depth, video) start from CLIP's positional embedding too (tokenizers.py)."""
        cls = MODALITIES[modality].tokenizer
        if token_positions == "clip" and getattr(cls, "takes_clip_positions", False):
            settings = {**settings, "clip_positions": self.clip.visual.positional_embedding}
        return cls(self.clip.visual.conv1.weight, **settings)

    def train(self, mode=True):
        """The frozen CLIP stays in eval mode; only the trainable parts switch."""
        super().train(mode)
        self.clip.eval()
        for adapter in self.adapters:
            adapter.train(mode)
        return self

    def encode(self, modality, x):
        """One modality's batch -> ((B, D) L2-normalised embeddings, router statistics).

        Router statistics: [{"f", "P"} of every adapter] of this call, for Eq. 3; empty for image
        and text, which take CLIP's untouched frozen path (text as token ids).
        """
        # with grad checkpointing, the blocks recompute in backward, after `routed` has exited
        self.clip.visual.transformer.recompute_context = routing_context_fn(
            self.adapters, modality if modality in self.tokenizers else None)
        if modality == "image":
            return F.normalize(self.clip.encode_image(x).float(), dim=-1), []
        if modality == "text":
            return F.normalize(self.clip.encode_text(x).float(), dim=-1), []
        with routed(self.adapters, modality):
            z = self.clip.visual.encode_tokens(self.tokenizers[modality](x))
        # a merged modality runs no router: nothing for Eq. 3
        return F.normalize(z.float(), dim=-1), [a.stats[modality] for a in self.adapters if a.merged != modality]

    def forward(self, inputs):
        """{modality: batch} -> ({modality: (B, D) embeddings}, {modality: router statistics}).

        Image and text take CLIP's frozen path (`encode`). Extended modalities whose tokens are
        equally long go through the frozen blocks in one pass, each row routed by its own
        modality's router: the function of one pass per modality, in fewer and larger matrix
        products (at the default recipe's sizes 3 passes instead of 7)."""
        z = {m: self.encode(m, x)[0] for m, x in inputs.items() if m in ("image", "text")}
        tokens = {m: self.tokenizers[m](x) for m, x in inputs.items() if m not in z}
        stats = {}
        for length in dict.fromkeys(t.shape[1] for t in tokens.values()):
            group = [(m, len(t)) for m, t in tokens.items() if t.shape[1] == length]
            self.clip.visual.transformer.recompute_context = routing_context_fn(self.adapters, group)
            with routed(self.adapters, group):
                out = self.clip.visual.encode_tokens(torch.cat([tokens[m] for m, _ in group]))
            for (m, _), rows in zip(group, out.split([n for _, n in group])):
                z[m], stats[m] = F.normalize(rows.float(), dim=-1), [a.stats[m] for a in self.adapters]
        return z, stats

    def merge(self, modality):
        """Fold `modality`'s expected expert update into a merged weight of every adapter
        (`LoRAMoELinear.merge`): its encodings then cost what the frozen ViT costs, no router and
        no expert running. Exact only for token-independent routing (E = 1, as the specialists);
        an approximation otherwise (docs/method.md section 7). Needs the routing statistics of
        training-mode forwards of that modality, which a trained model's checkpoint holds.

        Images and text keep CLIP's frozen path bit for bit, and the other modalities keep their
        routing; one modality at a time, until `unmerge()`.
        """
        if modality not in self.tokenizers:
            raise KeyError(f"unknown modality {modality!r}; this model encodes {self.modalities}")
        for adapter in self.adapters:
            adapter.merge(modality)
        return self

    def unmerge(self):
        """Route the merged modality through its experts again."""
        for adapter in self.adapters:
            if adapter.merged is not None:
                adapter.unmerge()
        return self

    def trainable_names(self):
        """Trainable parameters and the persistent buffers (gate statistics); not a merged weight."""
        persistent = self.state_dict().keys()
        return ({n for n, p in self.named_parameters() if p.requires_grad}
                | {n for n, _ in self.named_buffers() if n in persistent})

    def trainable_state_dict(self):
        """Tokenizers, experts, routers and the routers' running gate statistics: what a checkpoint holds."""
        keep = self.trainable_names()
        return {k: v for k, v in self.state_dict().items() if k in keep}

    def load_trainable_state_dict(self, state):
        keep = self.trainable_names()
        missing, unexpected = sorted(keep - state.keys()), sorted(state.keys() - keep)
        if missing or unexpected:
            raise ValueError(f"trainable state does not fit this model: missing {missing[:8]}, unexpected {unexpected[:8]}"
                             " (was it saved with other modalities, experts or targets?)")
        self.load_state_dict(state, strict=False)

    def count_trainable(self):
        """Trainable parameters by part (the paper reports 7.8M for its configuration)."""
        counts = {"tokenizers": 0, "experts": 0, "routers": 0}
        for name, p in self.named_parameters():
            if p.requires_grad:
                part = "tokenizers" if name.startswith("tokenizers.") else "routers" if ".routers." in name else "experts"
                counts[part] += p.numel()
        counts["total"] = sum(counts.values())
        return counts


# ----------------------------------------------------------------------------------------------
# Using a run: the anchor, the text tower, a trained model
# ----------------------------------------------------------------------------------------------

def load_anchor(config):
    """The frozen anchor CLIP and its BPE: OpenAI weights (`clip`, `bpe` paths) or the run's own anchor stage."""
    if config.get("clip"):
        clip, bpe = load_openai_clip(config["clip"]), BPETokenizer(config["bpe"])
    else:
        anchor = load_checkpoint(os.path.join(config["out"], "anchor.pt"), ("config", "state_dict"),
                                 "the anchor stage of a train.py run")
        clip, bpe = CLIP(**anchor["config"]), BPETokenizer(os.path.join(config["out"], "bpe.txt.gz"))
        clip.load_state_dict(anchor["state_dict"])
    return clip.requires_grad_(False).eval(), bpe


@torch.no_grad()
def encode_texts(clip, bpe, texts, device, chunk=256):
    """Captions -> (N, D) normalised embeddings from the frozen text tower."""
    out = []
    for i in range(0, len(texts), chunk):
        ids = bpe(texts[i:i + chunk], context_length=clip.context_length, truncate=True).to(device)
        out.append(F.normalize(clip.encode_text(ids).float(), dim=-1))
    return torch.cat(out)


RUN_CKPT = "RUN/ckpt.pt of a train.py run (its UniAlign stage)"


def load_run(out, device="cpu", ckpt_path=None):
    """A trained run -> (UniAlign, frozen CLIP, BPE, the run's configuration), ready to embed.

    `out` is the run folder (its anchor stage lives there); the model comes from `ckpt_path`,
    by default OUT/ckpt.pt.
    """
    ckpt_path = ckpt_path or os.path.join(out, "ckpt.pt")
    config = {**load_checkpoint(ckpt_path, ("config", "model_args", "model"), RUN_CKPT)["config"], "out": out}
    clip, bpe = load_anchor(config)
    clip = clip.to(device)
    return load_model(ckpt_path, clip, device)[0], clip, bpe, config


def load_model(path, clip, device="cpu"):
    """A UniAlign (or specialist) checkpoint of this repo, built on its own copy of the frozen CLIP."""
    ckpt = load_checkpoint(path, ("model_args", "model"), "a UniAlign or specialist checkpoint of train.py")
    model = UniAlign(copy.deepcopy(clip), **ckpt["model_args"])
    model.load_trainable_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


@torch.no_grad()
def embed(model, dataset, device, chunk=128):
    """A dataset of one extended modality -> (N, D) normalised embeddings and (N,) labels."""
    z, labels = [], []
    for i in range(0, len(dataset), chunk):
        items = [dataset[k] for k in range(i, min(i + chunk, len(dataset)))]
        z.append(model.encode(dataset.modality, torch.stack([item["input"] for item in items]).to(device))[0].cpu())
        labels += [item["label"] for item in items]
    return torch.cat(z), torch.tensor(labels)
