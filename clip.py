"""CLIP, written from scratch in OpenAI's layout: the frozen anchor of docs/method.md section 1.

`CLIP(...).state_dict()` has exactly the keys of OpenAI's released ViT checkpoints, so real weights
load unchanged; `clip_from_openai_state_dict` infers the configuration from tensor shapes, as
OpenAI's `build_model` does, and `load_openai_clip` reads their files. The ViT exposes
`encode_tokens`, the entry point for tokens of any modality; each block calls its four frozen
linears as `attn.in_proj`, `attn.out_proj`, `mlp.c_fc`, `mlp.c_proj`, the points where
lora_moe.py puts its experts (Eq. 1-2).
"""

import math
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint, noop_context_fn


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, returned in the input's dtype (safe under fp16/bf16)."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIPs were trained with."""

    def forward(self, x):
        # the same function as silu(1.702 x) / 1.702 (silu(y) = y sigmoid(y)): torch's fused silu and the
        # division both run in place on the one new tensor, where x * sigmoid(1.702 x) writes three
        # (B, L, 4 width) tensors; about 30% less time on the largest activations of the block
        return F.silu(1.702 * x, inplace=True).div_(1.702)


def attention(q, k, v, causal=False):
    """Scaled dot-product attention of every head, softmax_j(q_i . k_j / sqrt(d)) v_j
    (docs/method.md section 1): q, k, v (B, H, L, d) -> (B, H, L, d).

    causal: query i attends to keys j <= i only (the text tower), by a -inf score for j > i.
    """
    B, H, L, d = q.shape
    q, k, v = (t.flatten(0, 1) for t in (q, k, v))  # (B H, L, d): bmm multiplies along one batch dim
    # baddbmm(M, q, k^T, beta=b, alpha=a) = b M + a q k^T: the 1/sqrt(d) scale is applied inside the
    # matrix product and the causal mask M (-inf above the diagonal) is added as the scores are written;
    # dividing and masking the (B H, L, L) scores afterwards would be passes over the largest tensor
    # here. Without a mask, beta=0 and M (a zero) is not read.
    if causal:
        mask = torch.full((L, k.shape[1]), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=d ** -0.5)
    else:
        scores = torch.baddbmm(q.new_zeros(()), q, k.transpose(1, 2), beta=0, alpha=d ** -0.5)
    return torch.bmm(scores.softmax(-1), v).unflatten(0, (B, H))


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (OpenAI's keys).

    The fused q, k, v projection is the raw `in_proj_weight` / `in_proj_bias`, as in OpenAI's
    checkpoints. `in_proj` is empty until lora_moe.py puts a LoRAMoELinear over those same
    tensors there; a bare model keeps OpenAI's state dict.
    """

    def __init__(self, width, heads, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's defaults
        nn.init.zeros_(self.out_proj.bias)
        self.in_proj = None

    def forward(self, x):  # (B, L, W)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias) if self.in_proj is None else self.in_proj(x)
        # q, k, v laid out head after head in one copy (none at batch 1), so that attention's batched
        # matmuls need no copies of their own: one pass over qkv instead of three smaller ones
        qkv = rearrange(qkv, "b l (qkv h d) -> qkv (b h) l d", qkv=3, h=self.heads)
        q, k, v = qkv.unflatten(1, (-1, self.heads)).unbind(0)  # (B, H, L, d) each
        x = attention(q, k, v, self.causal)
        return self.out_proj(rearrange(x, "b h l d -> b l (h d)"))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with a 4x wide MLP."""

    def __init__(self, width, heads, causal=False, quick_gelu=True):
        super().__init__()
        self.attn = Attention(width, heads, causal)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x):  # (B, L, W)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of blocks; with `grad_checkpointing` each block recomputes its activations in backward."""

    def __init__(self, width, layers, heads, causal=False, quick_gelu=True):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.recompute_context = noop_context_fn  # what the recomputation in backward runs under (UniAlign's routing)
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal, quick_gelu)
                                         for _ in range(layers)])

    def forward(self, x):  # (B, L, W)
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False, context_fn=self.recompute_context)
            else:
                x = block(x)
        return x


class ViT(nn.Module):
    """CLIP's image tower f_I: patch conv, class token, transformer, ln_post, projection."""

    def __init__(self, image_resolution, patch_size, width, layers, heads, output_dim, quick_gelu=True):
        super().__init__()
        self.image_resolution, self.output_dim = image_resolution, output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu=quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def encode_tokens(self, tokens):
        """(B, L, width) tokens that already carry their positional embedding -> (B, output_dim).

        The class token (with position 0) goes in front; its output after `ln_post` is projected.
        """
        cls = self.class_embedding + self.positional_embedding[0]
        x = torch.cat([repeat(cls.to(tokens.dtype), "d -> b 1 d", b=tokens.shape[0]), tokens], dim=1)  # (B, 1 + L, W)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj

    def forward(self, images):  # (B, 3, H, W)
        x = rearrange(self.conv1(images), "b d gh gw -> b (gh gw) d")
        return self.encode_tokens(x + self.positional_embedding[1:].to(x.dtype))


class CLIP(nn.Module):
    """OpenAI's ViT CLIP. The text tower f_T (token and positional embeddings, causal transformer,
    ln_final, text_projection) lives at the top level, where OpenAI's checkpoints keep it."""

    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, vision_heads,
                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers,
                 quick_gelu=True):
        super().__init__()
        self.context_length, self.vocab_size = context_length, vocab_size
        self.visual = ViT(image_resolution, vision_patch_size, vision_width, vision_layers, vision_heads,
                          embed_dim, quick_gelu)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, causal=True,
                                       quick_gelu=quick_gelu)
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's text-tower initialisation: GPT-2-like, output projections scaled by depth."""
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=(2 * layers * width) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=(2 * layers * width) ** -0.5)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, images):  # (B, 3, H, W) -> (B, embed_dim), unnormalised
        return self.visual(images.to(self.dtype))

    def encode_text(self, ids):
        """(B, L) token ids -> (B, embed_dim), unnormalised: the causal transformer's output at the
        end-of-text token, which has the largest id in each row (hence `argmax`)."""
        x = self.token_embedding(ids) + self.positional_embedding[:ids.shape[1]]  # (B, L, W)
        x = self.ln_final(self.transformer(x.to(self.dtype)))
        return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ self.text_projection

    def forward(self, images, ids):
        """-> (logits_per_image (B_i, B_t), logits_per_text (B_t, B_i)): scaled cosine similarities."""
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(ids), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


# ----------------------------------------------------------------------------------------------
# Loading OpenAI-format checkpoints
# ----------------------------------------------------------------------------------------------

def _layer_count(state_dict, prefix):
    indices = {int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def clip_from_openai_state_dict(state_dict):
    """OpenAI-format state dict -> float32 `CLIP`, its configuration inferred from the shapes.

    Head counts are not stored in a checkpoint: as in OpenAI's models, one head per 64 channels
    (at least one). OpenAI's int entries `input_resolution`, `context_length`, `vocab_size` are ignored.
    """
    state_dict = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    if "visual.proj" not in state_dict and any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in state_dict):
        raise ValueError("this is a ResNet CLIP checkpoint (no visual.proj); only ViT CLIPs are supported")
    shape_keys = ["visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight",
                  "positional_embedding", "text_projection"]
    if any(k not in state_dict for k in shape_keys):
        raise KeyError(f"not an OpenAI ViT CLIP state dict: missing {[k for k in shape_keys if k not in state_dict]}")

    vision_width, _, patch_size, _ = state_dict["visual.conv1.weight"].shape
    grid = math.isqrt(state_dict["visual.positional_embedding"].shape[0] - 1)
    vocab_size, text_width = state_dict["token_embedding.weight"].shape
    model = CLIP(
        embed_dim=state_dict["text_projection"].shape[1],
        image_resolution=grid * patch_size,
        vision_layers=_layer_count(state_dict, "visual.transformer.resblocks."),
        vision_width=vision_width, vision_patch_size=patch_size, vision_heads=max(vision_width // 64, 1),
        context_length=state_dict["positional_embedding"].shape[0], vocab_size=vocab_size,
        transformer_width=text_width, transformer_heads=max(text_width // 64, 1),
        transformer_layers=_layer_count(state_dict, "transformer.resblocks."),
    )
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise KeyError(f"state dict does not match an OpenAI ViT CLIP: missing keys {missing}, "
                       f"unexpected keys {unexpected}")
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model


def load_openai_clip(path):
    """A TorchScript archive (how OpenAI distributes CLIP) or a plain state-dict file -> float32 `CLIP`.

    A plain file may also hold the state dict under the key "state_dict".
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format OpenAI released
            warnings.simplefilter("ignore", DeprecationWarning)
            state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"cannot read CLIP checkpoint {path}: neither a TorchScript archive nor a "
                             f"state-dict file ({type(error).__name__}: {error})") from error
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise ValueError(f"CLIP checkpoint {path} holds a {type(state_dict).__name__}, not a state dict")
    return clip_from_openai_state_dict(state_dict)
