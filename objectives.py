"""A batch -> the loss: what each stage optimises, between the data, the model and losses.py
(docs/method.md sections 2-3).

A stage's objective is a function loss(model, batch) -> (loss, parts), which loop.train_loop calls
on each mixed batch (data.collate): the model embeds each modality's rows, `scatter_groups` puts
them back in batch order, and the terms of losses.py see the whole global batch under DDP.
- `anchor_objective`: the world's anchor CLIP's, Eq. 5 between its own two towers;
- `specialist_objective`: a specialist's or a prior model's, Eq. 5 against frozen text only;
- `unialign_objective`: the UniAlign stage's, Eq. 10 with captions, anchor images and priors;
- the targets, computed once: `TextCache` (the frozen text tower's caption embeddings) and
  `WithPrior` (a dataset whose samples carry a prior model's embedding p_i, Eq. 9).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from encoder import encode_texts
from loop import rank_and_world
from losses import gather_with_grad, hard_targets, soft_binding_loss, soft_targets, unialign_loss


def scatter_groups(z, index, batch_size):
    """Per-modality embeddings {m: (n_m, D)} back in batch order: (B, D)."""
    first = next(iter(z.values()))
    out = first.new_empty(batch_size, first.shape[-1])
    for m, rows in z.items():
        out[index[m]] = rows
    return out


def caption_ids(texts):
    """(B,) ids of captions, equal for equal captions: what hard targets (plain contrastive) compare."""
    ids = {c: k for k, c in enumerate(dict.fromkeys(texts))}
    return torch.tensor([ids[c] for c in texts])


def anchor_objective(bpe, context_length, device):
    """The anchor CLIP's batch -> Eq. 5 between its own image and text towers, both trained, the
    targets (Eq. 4) hard: identical captions are the positives (docs/method.md section 3 says why)."""
    def loss(model, batch):
        ids = bpe(batch["text"], context_length=context_length, truncate=True).to(device)
        z = F.normalize(model.encode_image(batch["inputs"]["image"]), dim=-1)
        t = F.normalize(model.encode_text(ids), dim=-1)
        y = hard_targets(caption_ids(batch["text"]).to(device))
        return soft_binding_loss(z, t, y, 1 / model.logit_scale.exp(), beta=0.0)
    return loss


def specialist_objective(text_of, tau, args):
    """A specialist's (or prior model's) batch -> Eq. 5 against frozen text only (L_bind with beta = 0)."""
    def loss(model, batch):
        z, _ = model(batch["inputs"])
        z = scatter_groups(z, batch["index"], len(batch["text"]))
        t = gather_with_grad(text_of(batch["text"]))
        return soft_binding_loss(gather_with_grad(z), t, soft_targets(t, args.tau_s), tau, beta=0.0)
    return loss


def unialign_objective(clip, text_of, args, prior_dims=None):
    """The UniAlign stage's batch -> (Eq. 10, parts), over the global batch under DDP; also what bench.py times.

    Rows without a caption (text None) take part in Eq. 8 and 9 only. prior_dims: {modality: P} of
    the prior embeddings the datasets carry (Eq. 9).
    """
    tau = 1 / clip.logit_scale.exp()

    def loss(model, batch):
        B = len(batch["text"])
        z, stats = model(batch["inputs"])
        z = scatter_groups(z, batch["index"], B)
        captioned = torch.tensor([c is not None for c in batch["text"]], device=z.device)
        t = torch.zeros_like(z)
        if captioned.any():
            t[captioned] = text_of([c for c in batch["text"] if c is not None]).to(t.dtype)
        v = torch.zeros_like(z)
        if batch["anchor_image"] is not None:
            with torch.no_grad():
                v[batch["anchor_mask"]] = F.normalize(clip.encode_image(batch["anchor_image"]).float(), dim=-1).to(v.dtype)
        priors = []
        for m, dim in (prior_dims or {}).items():  # one group per prior model, gathered over ranks
            p, has = z.new_zeros(B, dim), torch.zeros(B, device=z.device)
            if m in batch["prior"]:
                p[batch["prior_index"][m]], has[batch["prior_index"][m]] = batch["prior"][m].to(p.dtype), 1.0
            rows = gather_with_grad(has).bool().nonzero().squeeze(1)
            priors.append((rows, gather_with_grad(p)[rows]))
        captioned = gather_with_grad(captioned.float()).bool()
        t = gather_with_grad(t)[captioned]
        texts = [c for c in gathered_texts(batch["text"]) if c is not None]
        y = soft_targets(t, args.tau_s) if args.targets == "soft" else hard_targets(caption_ids(texts).to(t.device))
        return unialign_loss(gather_with_grad(z), t, tau, caption_mask=captioned, y=y, beta=args.beta,
                             anchor_mask=gather_with_grad(batch["anchor_mask"].float()).bool(), v=gather_with_grad(v),
                             tau_kd=args.tau_kd, gamma=args.gamma, lambda_anchor=args.lambda_anchor,
                             priors=priors, lambda_prior=args.lambda_prior,
                             balance=[(s["f"], s["P"]) for ss in stats.values() for s in ss], lambda_bal=args.lambda_bal)
    return loss


def gathered_texts(texts):
    """The captions of the global batch, in rank order (as gather_with_grad orders embeddings)."""
    if rank_and_world()[1] == 1:
        return list(texts)
    everyone = [None] * rank_and_world()[1]
    dist.all_gather_object(everyone, list(texts))
    return [t for rank_texts in everyone for t in rank_texts]


class TextCache:
    """Normalised embeddings of captions from the frozen text tower, computed once, all at the start.

    Encoding every caption up front, in one fixed order, makes each embedding independent of which
    captions a batch happened to bring: a resumed run sees bit-for-bit the same targets.
    """

    def __init__(self, clip, bpe, device, texts):
        texts = sorted({t for t in texts if t is not None})
        self.cache = dict(zip(texts, encode_texts(clip, bpe, texts, device)))

    def __call__(self, texts):
        return torch.stack([self.cache[t] for t in texts])


class WithPrior(torch.utils.data.Dataset):
    """A dataset whose samples carry a prior embedding p_i (Eq. 9) computed once by a prior model."""

    def __init__(self, dataset, prior):
        self.dataset, self.prior = dataset, prior
        self.modality, self.class_names, self.captions = dataset.modality, dataset.class_names, dataset.captions

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], "prior": self.prior[i]}
