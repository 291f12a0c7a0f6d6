"""Writes assignments/expected.json: for each exercise, small inputs and what this repository's
functions return for them. The exercise tests (tests/exercises/) compare a student's function with
these stored numbers and check properties; they never hold a second implementation.

    python assignments/expected.py    # rerun only after changing a solution on purpose; commit the json

Inputs are stored with the outputs, so the tests do not depend on a random generator's stream.
"""

import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bpe import learn_merges  # noqa: E402
from clip import attention  # noqa: E402
from lora_moe import LoRAMoELinear  # noqa: E402
from losses import (anchor_distillation_loss, load_balance_loss, prior_distillation_loss,  # noqa: E402
                    soft_binding_loss, soft_targets)
from preprocess import mel_filter_bank  # noqa: E402
from tokenizers import ConvTokenizer, farthest_point_sampling  # noqa: E402


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def conv_tokenizer():
    tokenizer = ConvTokenizer(torch.nn.Conv2d(3, 8, 4, stride=4, bias=False), grid=(2, 2))
    x, wider = torch.randn(2, 3, 8, 8), torch.randn(1, 3, 8, 12)  # a 2 x 2 grid, and a 2 x 3 one
    with torch.no_grad():
        return {"conv_weight": tokenizer.conv.weight, "positional_embedding": tokenizer.positional_embedding,
                "x": x, "tokens": tokenizer(x), "wider": wider, "wider_tokens": tokenizer(wider)}


def farthest_point_sampling_case():
    xyz = torch.rand(2, 40, 3)
    return {"xyz": xyz, "n": 10, "picked": farthest_point_sampling(xyz, 10)}


def attention_case():
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)  # (B=1, H=2, L=5, d=4) each
    return {"q": q, "k": k, "v": v, "out": attention(q, k, v), "causal_out": attention(q, k, v, causal=True)}


def lora_layer(experts, top_k):
    linear = torch.nn.Linear(5, 6)
    layer = LoRAMoELinear(linear.weight, linear.bias, ["audio"], experts=experts, rank=2, top_k=top_k, alpha=4.0)
    torch.nn.init.normal_(layer.lora_B, std=0.5)
    return layer


def lora_expert():
    layer = lora_layer(experts=3, top_k=2)
    x, gates = torch.randn(4, 5), torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
    gate_sum = torch.tensor([1.2, 2.0, 0.8], dtype=torch.float64)  # as if 2 tokens were routed
    with torch.no_grad():
        y = F.linear(x, layer.weight, layer.bias)  # the frozen linear's output
        out = layer.add_expert_update(y, x, gates)
        layer.gate_sum[0] = gate_sum
        layer.token_count[0] = 2.0
        layer.merge("audio")
    return {"weight": layer.weight, "bias": layer.bias, "lora_A": layer.lora_A, "lora_B": layer.lora_B,
            "x": x, "gates": gates, "out": out, "gate_sum": gate_sum, "token_count": 2.0,
            "merged_weight": layer.merged_weight}


def top_k_routing():
    layer = lora_layer(experts=4, top_k=2)
    x = torch.randn(6, 5)
    with torch.no_grad():
        gates = layer.route(x, "audio")
    router = layer.routers["audio"]
    return {"router_weight": router.weight, "router_bias": router.bias, "lora_A": layer.lora_A, "x": x,
            "gates": gates, "f": layer.stats["audio"]["f"], "P": layer.stats["audio"]["P"]}


def load_balance():
    f, P = torch.tensor([0.5, 0.25, 0.25, 0.0]), torch.tensor([0.4, 0.3, 0.2, 0.1])
    return {"f": f, "P": P, "loss": load_balance_loss(f, P)}


def soft_targets_case():
    t = unit(5, 8)
    t[3] = t[1]  # two samples share a caption
    return {"t": t, "tau_s": 0.3, "y": soft_targets(t, 0.3)}


def binding():
    z, t = unit(5, 8), unit(5, 8)
    y = torch.softmax(torch.randn(5, 5), dim=-1)
    bind, parts = soft_binding_loss(z, t, y, 0.1, beta=0.5)
    return {"z": z, "t": t, "y": y, "tau": 0.1, "beta": 0.5, "bind": bind, "xt": parts["xt"], "xx": parts["xx"]}


def anchor():
    z, v, t = unit(3, 8), unit(3, 8), unit(5, 8)
    return {"z": z, "v": v, "t": t, "tau_kd": 0.5, "gamma": 0.5,
            "loss": anchor_distillation_loss(z, v, t, 0.5, gamma=0.5)}


def prior():
    z, p = unit(5, 8), 3 * torch.randn(5, 12)
    return {"z": z, "p": p, "tau_kd": 0.5, "loss": prior_distillation_loss(z, p, 0.5)}


def bpe_merges():
    text = "the cat sat on the mat the hat that cat ate a rat at the flat"
    words = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in text.split())
    return {"words": [[list(w), c] for w, c in words.items()], "n_merges": 12,
            "merges": [list(pair) for pair in learn_merges(words, 12)]}


def mel_filter_bank_case():
    return {"n_mels": 6, "n_fft": 32, "sample_rate": 8000, "filters": mel_filter_bank(6, 32, 8000)}


CASES = {"conv_tokenizer": conv_tokenizer, "farthest_point_sampling": farthest_point_sampling_case,
         "attention": attention_case, "lora_expert": lora_expert, "top_k_routing": top_k_routing,
         "load_balance": load_balance, "soft_targets": soft_targets_case, "binding": binding, "anchor": anchor,
         "prior": prior, "bpe_merges": bpe_merges, "mel_filter_bank": mel_filter_bank_case}


def plain(value):
    """Tensors and floats -> JSON lists and numbers (float32 values are exact in a JSON double)."""
    if isinstance(value, torch.Tensor):
        return value.detach().tolist()
    return value


def main():
    cases = {}
    for name, case in CASES.items():
        torch.manual_seed(0)
        cases[name] = {key: plain(value) for key, value in case().items()}
    path = ROOT / "assignments" / "expected.json"
    blocks = [f" {json.dumps(name)}: {{\n" + ",\n".join(f"  {json.dumps(key)}: {json.dumps(value)}"
                                                      for key, value in case.items()) + "\n }"
              for name, case in cases.items()]
    path.write_text("{\n" + ",\n".join(blocks) + "\n}\n", encoding="utf-8")  # one line per stored value
    print(f"wrote {path.relative_to(ROOT)}: {', '.join(cases)}")


if __name__ == "__main__":
    main()
