"""The measures of docs/method.md section 4: each beside its chance level.

Functions of embeddings, labels and concepts (class_embeddings runs the frozen text tower,
routing_entropy the model on one dataset); eval.py computes them on a run's test sets and writes
the report.
- classification: `topk_accuracy`, `mean_average_precision`, and `zero_shot` against
  `class_embeddings` (a class name in every prompt template, averaged); chance 1/classes;
- retrieval counted by concept: `recall_at` with `chance_recall_at` (the same count for a random
  ranking), `concept_retrieval` (x -> text and text -> x), `cross_modal_r1` (between two
  modalities), `own_anchor_r1` (each sample's own anchor image among its concept's, Eq. 8);
- what connects two modalities in training (`connections`: ANCHOR, BINDING or TEXT, the emergent
  pairs), and the other names of a concept (`other_names`, `renamed_queries`);
- how decisively the routers route (`routing_entropy`, Eq. 2), beside untrained routers.
"""
import math

import torch
import torch.nn.functional as F
from einops import reduce

from encoder import encode_texts


def topk_accuracy(scores, labels, k):
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(1).float().mean().item()


def recall_at(scores, positives, k):
    """Fraction of queries (rows) with a positive among their top-k gallery items (columns)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return positives.gather(1, top).any(1).float().mean().item()


def chance_recall_at(positives, k):
    """recall_at for a random ranking: per query 1 - C(n - p, k) / C(n, k), p positives among n items."""
    n = positives.shape[1]
    k = min(k, n)
    return sum(1 - math.comb(n - p, k) / math.comb(n, k) for p in positives.sum(1).tolist()) / len(positives)


def mean_average_precision(scores, labels):
    """Macro mAP over classes: each class ranks all items by its score; AP averages precision at the hits."""
    relevant = F.one_hot(labels, scores.shape[1]).bool()
    order = scores.argsort(dim=0, descending=True)
    hits = relevant.gather(0, order).float()  # (N, C) in ranked order
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)[:, None]
    present = hits.sum(0) > 0
    return ((precision * hits).sum(0)[present] / hits.sum(0)[present]).mean().item()


def class_embeddings(clip, bpe, templates, class_names, device):
    """One text embedding per class: the class name in every prompt template, averaged, renormalised."""
    t = encode_texts(clip, bpe, [tpl.format(c) for c in class_names for tpl in templates], device)
    return F.normalize(reduce(t, "(c k) d -> c d", "mean", k=len(templates)), dim=-1).cpu()


def zero_shot(z, labels, class_text):
    """Top-1, top-5 (only with more than 5 classes) and mAP of classifying z against the class embeddings."""
    scores = z @ class_text.T
    out = {"top1": topk_accuracy(scores, labels, 1), "map": mean_average_precision(scores, labels)}
    if len(class_text) > 5:
        out["top5"] = topk_accuracy(scores, labels, 5)
    return out


def concept_retrieval(z, concepts, gallery_text, gallery_concepts, ks=(1, 5, 10)):
    """x -> text and text -> x, a hit being any gallery entry of the query's concept; with chance.

    z (N, D) items of concepts[N]; gallery_text (G, D) captions of gallery_concepts[G].
    """
    positives = torch.tensor([[c == g for g in gallery_concepts] for c in concepts])  # (N, G)
    scores = z @ gallery_text.T
    return {"x2t": {f"R@{k}": recall_at(scores, positives, k) for k in ks},
            "t2x": {f"R@{k}": recall_at(scores.T, positives.T, k) for k in ks},
            "chance": {"x2t": {f"R@{k}": chance_recall_at(positives, k) for k in ks},
                       "t2x": {f"R@{k}": chance_recall_at(positives.T, k) for k in ks}}}


def cross_modal_r1(za, concepts_a, zb, concepts_b):
    """(R@1, chance) of retrieving an item of modality b that shows the concept of each item of
    modality a; concepts_* name each item's concept (a dataset's class_concepts, so that datasets
    that call a concept differently still match). None when no query's concept is in b."""
    positives = torch.tensor([[c == d for d in concepts_b] for c in concepts_a])
    keep = positives.any(1)
    if not keep.any():
        return None, None
    return recall_at(za[keep] @ zb.T, positives[keep], 1), chance_recall_at(positives[keep], 1)


def own_anchor_r1(z, anchors, labels):
    """(R@1, chance) of finding each sample's own anchor image among the anchor images of its concept:
    instance-level retrieval, possible only through what anchors teach (Eq. 8)."""
    same = labels[:, None] == labels[None, :]
    scores = (z @ anchors.T).masked_fill(~same, float("-inf"))
    hits = scores.argmax(1) == torch.arange(len(z))
    return hits.float().mean().item(), (1 / same.sum(1).float()).mean().item()


@torch.no_grad()
def routing_entropy(model, dataset, device, chunk=128):
    """Per layer, the mean entropy (nats) of a token's routing distribution softmax(W_g^(m) x + b_g^(m))
    (Eq. 2), for the trained routers and for untrained ones (nn.Linear's initialisation, seed 0) on
    the very same tokens. None when there is no router (E = 1)."""
    m, adapters = dataset.modality, model.adapters
    if adapters[0].routers is None:
        return None
    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained = [torch.nn.Linear(a.routers[m].in_features, a.experts).to(device) for a in adapters]
    totals, tokens = torch.zeros(2, len(adapters)), [0] * len(adapters)

    def entropy(logits):
        p = logits.float().softmax(-1)
        return -(p * p.clamp_min(1e-12).log()).sum(-1).sum().item()

    def record(i):
        def hook(adapter, inputs, output):  # the router's input: the linear's, or its block's ln_1(x) (router_scope "block")
            x = (inputs[0] if adapter.router_input is None else adapter.router_input.read()).float()
            totals[0, i] += entropy(F.linear(x, adapter.routers[m].weight.float(), adapter.routers[m].bias.float()))
            totals[1, i] += entropy(untrained[i](x))
            tokens[i] += x[..., 0].numel()
        return hook

    handles = [a.register_forward_hook(record(i)) for i, a in enumerate(adapters)]
    for i in range(0, len(dataset), chunk):
        model.encode(m, torch.stack([dataset[k]["input"] for k in range(i, min(i + chunk, len(dataset)))]).to(device))
    for handle in handles:
        handle.remove()
    per_adapter = totals / torch.tensor(tokens)
    per_layer = reduce(per_adapter, "kind (layer t) -> kind layer", "mean", layer=len(model.clip.visual.transformer.resblocks))
    return {"trained": per_layer[0].tolist(), "untrained": per_layer[1].tolist()}


ANCHOR, BINDING, TEXT = "anchor images (Eq. 8)", "soft binding (Eq. 6)", "text only (emergent)"


def connections(config, train_sets):
    """What connects each pair of trained modalities in training, {frozenset pair: one of}:
    - ANCHOR: an extended modality and image, when its training set carries anchor images and
      lambda_anchor > 0;
    - BINDING: two extended modalities that L_xx (Eq. 6) relates directly: beta > 0, both with
      captioned training samples, and targets that give their captions mass: soft targets (Eq. 4
      gives every pair some), or hard ones when the two training sets share a caption;
    - TEXT: the rest. Each was aligned to text on its own, so retrieval between them is emergent.
    """
    names, pairs = ["image", *train_sets], {}
    captions = {m: {c for c in ds.captions if c is not None} for m, ds in train_sets.items()}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if a == "image":
                linked = config["lambda_anchor"] > 0 and train_sets[b].anchored
                pairs[frozenset((a, b))] = ANCHOR if linked else TEXT
            else:
                soft = config["targets"] == "soft" or captions[a] & captions[b]
                linked = config["beta"] > 0 and captions[a] and captions[b] and soft
                pairs[frozenset((a, b))] = BINDING if linked else TEXT
    return pairs


def other_names(ds):
    """Each class of a synthetic dataset by another of its concept's names (the next synonym after
    the dataset's own, as another dataset may call it); None for a manifest or a shared vocabulary."""
    if not hasattr(ds, "world") or ds.class_names == ds.class_concepts:
        return None
    synonyms = [ds.world.synonyms[k] for k in ds.concepts]
    return [names[(names.index(own) + 1) % len(names)] for names, own in zip(synonyms, ds.class_names)]


def renamed_queries(a, b):
    """The concepts datasets a and b both cover but call by different names (None: there are none)."""
    name_in = lambda ds: dict(zip(ds.class_concepts, ds.class_names))
    na, nb = name_in(a), name_in(b)
    renamed = {c for c in na if c in nb and na[c] != nb[c]}
    return renamed or None
