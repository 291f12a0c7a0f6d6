"""Modality-aware LoRA-MoE (docs/method.md section 1, Eq. 1-3): experts inside CLIP's frozen linears.

For a token x of modality m, a frozen linear (W, b) becomes

    y = W x + b + (alpha / r) * sum_{e in TopK(g)} g_e(x, m) * B_e A_e x                 (Eq. 1)
    g(x, m) = softmax( W_g^(m) x + b_g^(m) )   renormalised over its top-k entries      (Eq. 2)

with E experts of rank r shared by all modalities and one router (W_g^(m), b_g^(m)) per
modality. Per call, `stats` keeps what the load-balancing term needs:

    L_bal = E * sum_e f_e * P_e     (f_e: fraction of tokens routed to e, P_e: mean gate)  (Eq. 3)

This file holds `LoRAMoELinear` (one adapted linear), `add_lora_moe` (puts one into each chosen
linear of every CLIP block) and `routed` (sets the modality of a list of adapters: one, or
consecutive blocks of rows of several, which then share one pass through the frozen blocks).

Where the routers sit (`router_scope`; the paper does not say):
- "linear" (the default): one router per modality in every adapted linear, reading that linear's
  own input. At ViT-B/16 with E = 4 and all four linears adapted that is 12 blocks x 4 experts x
  (769 + 769 + 769 + 3,073) = 258,240 router parameters per modality (c_proj's router reads 3,072
  features).
- "block": one router per modality per block, shared by the block's adapted linears. It reads
  ln_1(x), the normalised input of the block (the input of in_proj), so every token gets one
  expert mix per block and expert e of a block is one coherent LoRA of all its linears. The
  linears see different inputs and c_proj's is 4x wider, so no single router could read each
  linear's own input; the raw residual stream x (before ln_1) grows in norm with depth in a
  pre-norm transformer and would carry that into the router's logits, ln_1(x) keeps them on one
  scale. 12 x 4 x 769 = 36,912 per modality. Each adapter still runs the (shared) router itself
  and reports the same statistics, so Eq. 3's mean over calls is the mean over blocks.

What differs from loralib and the paper:
- E = 1 is plain LoRA, in the same class: the gate is identically 1 and there are no routers.
- All experts are computed for every token in two matmuls (A of all experts stacked as an
  (E*r, in) matrix, B as (out, E*r)), the unselected experts multiplied by a zero gate; the
  router runs in float32. The cost grows with E*r, not only with k*r. Dispatching each expert only
  its tokens was measured on a CPU (ViT-B/16 shapes, k = 2, one thread): with autograd's own
  backward it was slower than this up to E = 32; with a hand-written backward (~110 more lines) it
  was 2-9% faster at E = 16 and 29% at E = 64, too little to keep E = 16 within 1.15x of E = 2
  (the router and per-expert kernels still grow with E), so this file keeps the dense path alone.
- A routed update depends on the token, so it cannot be folded into W exactly. `merge(m)` folds
  in the *expected* update (alpha / r) * sum_e gbar_e B_e A_e, gbar being the mean top-k gate
  that modality m's tokens received in training-mode forwards. This is exact when the routing
  does not depend on the token (E = 1, or a router with zero weights) and an approximation
  otherwise. The merged weight is a tensor of its own, used only for modality m: W is CLIP's
  frozen weight, which the image path also runs, so merging never moves the anchor space.
"""

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn


class LoRAMoELinear(nn.Module):
    """A frozen linear (CLIP's own `weight` and `bias` Parameters, not copies) plus E LoRA experts
    routed per modality (Eq. 1-2).

    Set `modality` before a forward: `None` is the frozen linear alone (the image path), always,
    merged or not; a name routes every row by that modality's router; [(name, rows), ...] routes
    consecutive blocks of rows each by its own (see `forward`). After a forward,
    `stats[name] = {"f": (E,), "P": (E,)}` holds each modality's fraction of token->expert
    assignments per expert (detached, sums to 1) and mean softmax gate (differentiable) for Eq. 3.
    """

    def __init__(self, weight, bias, modalities, experts=4, rank=8, top_k=2, alpha=16.0):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be between 1 and experts={experts}, got {top_k}")
        out_features, in_features = weight.shape
        self.weight, self.bias = weight, bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.modalities = list(modalities)
        self.experts, self.rank, self.top_k, self.scaling = experts, rank, top_k, alpha / rank
        self.lora_A = nn.Parameter(weight.new_empty(experts * rank, in_features))  # A_e stacked: (E*r, in)
        self.lora_B = nn.Parameter(weight.new_zeros(out_features, experts * rank))  # B_e side by side: (out, E*r)
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)  # as loralib (nn.Linear's default)
        self.routers = (nn.ModuleDict({m: nn.Linear(in_features, experts, device=weight.device, dtype=weight.dtype)
                                       for m in self.modalities}) if experts > 1 else None)
        # running sums of the top-k gates and token counts per modality, for merge()
        self.register_buffer("gate_sum", torch.zeros(len(self.modalities), experts, dtype=torch.float64,
                                                     device=weight.device))
        self.register_buffer("token_count", torch.zeros(len(self.modalities), dtype=torch.float64,
                                                        device=weight.device))
        self.register_buffer("merged_weight", None, persistent=False)  # W + the expected update, while merged
        self.modality, self.merged, self.stats = None, None, {}
        self.router_input = None  # a BlockInput when the router reads the block's input (router_scope="block")

    def __getstate__(self):  # `stats` may hold a graph (P): copies and pickles start without it
        return {**super().__getstate__(), "stats": {}}

    def extra_repr(self):
        out_features, in_features = self.weight.shape
        return (f"in={in_features}, out={out_features}, experts={self.experts}, rank={self.rank}, "
                f"top_k={self.top_k}, scaling={self.scaling}, modalities={self.modalities}")

    def forward(self, x):  # (B, ..., in) -> (B, ..., out)
        """`modality` says how: None, the frozen linear (the image path); a name, every row routed by
        that modality's router; or [(name, rows), ...], consecutive rows of several modalities, each
        block routed by its own modality's router (UniAlign.forward runs modalities whose tokens are
        equally long through the blocks together: one pass instead of one per modality)."""
        if self.modality is None:
            return F.linear(x, self.weight, self.bias)
        if self.modality == self.merged:
            return F.linear(x, self.merged_weight, self.bias)
        parts = [(self.modality, len(x))] if isinstance(self.modality, str) else self.modality
        for m, _ in parts:
            if m not in self.modalities:
                raise KeyError(f"unknown modality {m!r}; this adapter routes {self.modalities}")
            if m == self.merged:
                raise RuntimeError(f"{m!r} is merged: it is encoded alone (UniAlign.encode), not with other modalities")
        # the router reads this linear's input, or under router_scope="block" its block's ln_1(x) (same leading dims)
        routing_input = x if self.router_input is None else self.router_input.read()
        self.stats = {}
        rows = routing_input.split([n for _, n in parts])
        gates = torch.cat([self.route(part, m) for (m, _), part in zip(parts, rows)])
        return self.add_expert_update(F.linear(x, self.weight, self.bias), x, gates)

    def route(self, x, modality):
        """Eq. 2: tokens (..., in) of `modality` -> gates (..., E), the softmax of the modality's router
        renormalised over its top-k (zero elsewhere).

        Also records this call's statistics in `stats[modality]` and, in training mode, adds the gates
        to the modality's running sums.
        """
        if self.routers is None:  # one expert: the gate is identically 1
            gates = x.new_ones(*x.shape[:-1], 1, dtype=torch.float32)
            self.stats[modality] = {"f": gates.new_ones(1), "P": gates.new_ones(1)}
        else:
            router = self.routers[modality]
            with torch.autocast(x.device.type, enabled=False):  # routing decisions in float32
                probs = F.linear(x.float(), router.weight.float(), router.bias.float()).softmax(-1)  # (..., E)
            top, chosen = probs.topk(self.top_k, dim=-1)  # (..., k)
            gates = torch.zeros_like(probs).scatter(-1, chosen, top / top.sum(-1, keepdim=True))
            f = torch.bincount(chosen.flatten(), minlength=self.experts) / chosen.numel()
            self.stats[modality] = {"f": f, "P": rearrange(probs, "... e -> (...) e").mean(0)}
        if self.training:
            with torch.no_grad():
                row = self.modalities.index(modality)
                self.gate_sum[row] += rearrange(gates, "... e -> (...) e").sum(0).to(self.gate_sum.dtype)
                self.token_count[row] += gates.numel() // self.experts
        return gates

    def add_expert_update(self, y, x, gates):
        """y + Eq. 1's sum, (alpha / r) * sum_e g_e B_e A_e x, for y (..., out), x (..., in), gates (..., E).

        A of all experts in one matmul, each expert's r rows scaled by its gate, then B of all
        experts in one matmul: the unchosen experts' gates are zero.
        """
        h = rearrange(F.linear(x, self.lora_A), "... (e r) -> ... e r", e=self.experts)  # (..., E, r)
        h = rearrange(h * (self.scaling * gates)[..., None].to(h.dtype), "... e r -> ... (e r)")  # alpha / r on the E gates
        return y + F.linear(h, self.lora_B)  # (..., out)

    def macs_per_token(self):
        """Multiply-adds per token of the update and the router: "routed" counts the k chosen experts
        (the method's cost, Eq. 1), "computed" all E, as `add_expert_update` computes them."""
        out_features, in_features = self.weight.shape
        router = in_features * self.experts if self.routers is not None else 0
        expert = self.rank * (in_features + out_features)
        return {"routed": self.top_k * expert + router, "computed": self.experts * expert + router}

    def mean_gate(self, modality):
        """gbar (E,): the mean top-k gate of `modality`'s tokens over the training-mode forwards."""
        if modality not in self.modalities:
            raise KeyError(f"unknown modality {modality!r}; this adapter routes {self.modalities}")
        if self.routers is None:
            return self.gate_sum.new_ones(1)
        i = self.modalities.index(modality)
        if self.token_count[i] == 0:
            raise RuntimeError(f"no routing statistics for {modality!r}: run training-mode forwards "
                               f"with this modality before merging")
        return self.gate_sum[i] / self.token_count[i]

    @torch.no_grad()
    def merge(self, modality):
        """merged_weight = W + (alpha / r) * sum_e gbar_e B_e A_e, the expected update of `modality`
        folded in; W itself is left untouched. Until `unmerge()`, a forward routed for `modality`
        is the plain linear with merged_weight (no router, no experts); modality None (the image
        path) still runs the frozen W, and any other modality is routed over W as before.

        Why a weight of its own rather than W updated in place: W is CLIP's frozen tensor, which
        the image path also runs (the adapters sit inside the CLIP copy whose blocks encode
        images too), so changing it would move the anchor space every embedding is compared in.
        The price is one more (out, in) tensor per adapted linear while merged.
        """
        if self.merged is not None:
            raise RuntimeError(f"already merged for {self.merged!r}; call unmerge() first")
        gbar = repeat(self.mean_gate(modality), "e -> (e r)", r=self.rank)
        update = self.scaling * (self.lora_B.double() * gbar) @ self.lora_A.double()  # (out, in)
        self.merged_weight = self.weight.detach() + update.to(self.weight.dtype)
        self.merged = modality

    @torch.no_grad()
    def unmerge(self):
        """Drop the merged weight: `modality` is routed through the experts again (W never changed)."""
        if self.merged is None:
            raise RuntimeError("not merged")
        self.merged_weight, self.merged = None, None


def frozen_linear(block, target):
    """(parent module, weight, bias) of one of a CLIP block's four frozen linears."""
    if target == "in_proj":  # fused q, k, v: nn.MultiheadAttention's parameter names
        return block.attn, block.attn.in_proj_weight, block.attn.in_proj_bias
    parent = block.attn if target == "out_proj" else block.mlp
    return parent, getattr(parent, target).weight, getattr(parent, target).bias


TARGETS = ("in_proj", "out_proj", "c_fc", "c_proj")
ROUTER_SCOPES = ("linear", "block")


class BlockInput:
    """A block's ln_1(x), which its routers read under router_scope="block": kept by a forward hook on
    `ln_1`, dropped by a forward hook on the block once the block has run (no activation outlives
    it). Grad checkpointing recomputes the block through the same hooks."""

    def __init__(self):
        self.x = None

    def __getstate__(self):  # copies and pickles never carry an activation
        return {"x": None}

    def keep(self, module, inputs, output):
        self.x = output

    def clear(self, module, inputs, output):
        self.x = None

    def read(self):
        if self.x is None:
            raise RuntimeError("router_scope='block': this adapter routes on its block's ln_1(x), and no block "
                               "forward is running; call the block, not the linear alone")
        return self.x


def share_block_router(block, adapters, modalities, experts):
    """router_scope="block": one router per modality for `block`, reading its ln_1(x), shared by `adapters`."""
    weight = adapters[0].weight
    routers = nn.ModuleDict({m: nn.Linear(block.ln_1.normalized_shape[0], experts, device=weight.device,
                                          dtype=weight.dtype) for m in modalities})
    block_input = BlockInput()
    block.ln_1.register_forward_hook(block_input.keep)
    block.register_forward_hook(block_input.clear)
    for adapter in adapters:
        adapter.routers, adapter.router_input = routers, block_input


def add_lora_moe(blocks, modalities, targets=TARGETS, experts=4, rank=8, top_k=2, alpha=16.0, router_scope="linear"):
    """Replace the chosen frozen linears of every block by `LoRAMoELinear`s; returns them all.

    router_scope: "linear", a router per modality in every adapted linear, or "block", one per
    modality per block shared by its adapted linears and reading the block's ln_1(x) (see the top
    of this file). The frozen weights keep their state-dict keys (`...mlp.c_fc.weight`,
    `...attn.in_proj_weight`); the fused q, k, v weight also appears as `...attn.in_proj.weight`,
    the same tensor. A block router appears under each of its adapters' keys, the same tensors.
    """
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA-MoE targets {unknown}; valid targets are {list(TARGETS)}")
    if router_scope not in ROUTER_SCOPES:
        raise ValueError(f"unknown router scope {router_scope!r}; valid scopes are {list(ROUTER_SCOPES)}")
    adapters = []
    for block in blocks:
        in_block = []
        for target in targets:
            parent, weight, bias = frozen_linear(block, target)
            if isinstance(getattr(parent, target), LoRAMoELinear):
                raise ValueError(f"{target} of this block already holds a LoRAMoELinear")
            adapter = LoRAMoELinear(weight, bias, modalities, experts, rank, top_k, alpha)
            setattr(parent, target, adapter)
            in_block.append(adapter)
        if router_scope == "block" and experts > 1 and in_block:
            share_block_router(block, in_block, modalities, experts)
        adapters += in_block
    return adapters


@contextmanager
def routed(adapters, modality):
    """`with routed(adapters, "audio"): ...` runs the adapters for one modality (None: frozen path; or
    [(name, rows), ...], consecutive blocks of rows of several) and restores their previous setting."""
    previous = [adapter.modality for adapter in adapters]
    for adapter in adapters:
        adapter.modality = modality
    try:
        yield
    finally:
        for adapter, m in zip(adapters, previous):
            adapter.modality = m


def routing_context_fn(adapters, modality):
    """A `context_fn` for torch.utils.checkpoint: the recomputation in backward routes the adapters
    for `modality`, as the forward did, whatever they are set to by then."""
    return lambda: (nullcontext(), routed(adapters, modality))
