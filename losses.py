"""
The UniAlign objective (docs/method.md section 2, Eq. 3-10): pure functions on L2-normalised embeddings.

Every similarity, softmax and log-softmax is computed in float32 with autocast switched off, so the
losses do not change under bf16/fp16 training. A term with nothing to average over (no anchored
sample, fewer than two samples with a prior, no router call, no caption) is an exact zero that
still carries a graph, so backward runs. Under DDP the caller gathers the embeddings with `gather_with_grad` first,
so the contrastive batch of Eq. 4-9 is the global batch.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

MASKED = -1e9  # logit of an excluded pair j = i: finite, so even a fully masked row stays NaN-free


def similarity(a, b, temperature):
    """a_i . b_j / temperature as a float32 (len(a), len(b)) matrix, whatever autocast is doing."""
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float().T / temperature


def without_self(logits):
    """Masks the pairs j = i of a square logit matrix: the `softmax_{j != i}` of Eq. 6 and 9."""
    eye = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    return logits.masked_fill(eye, MASKED)


def zero(x):
    """An exact 0 that depends on x, for a term with nothing to average over."""
    return x.float().sum() * 0.0


def soft_cross_entropy(logits, targets, dim):
    """CE(softmax(logits), targets) along `dim`, averaged over the other dimension."""
    return -(targets * logits.log_softmax(dim)).sum(dim).mean()


def kl_divergence(teacher_logits, student_logits):
    """KL(softmax(teacher) || softmax(student)) per row, averaged over rows."""
    return F.kl_div(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1),
                    reduction="batchmean", log_target=True)


def as_floats(**terms):
    """Scalar tensors -> python floats for logging, with one device sync."""
    return dict(zip(terms, torch.stack([x.detach().float() for x in terms.values()]).tolist()))


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (all_reduce).

    Every rank computes the same global loss, so that sum is world_size times the gradient of the
    loss; DDP's average over ranks divides it back. Terms a rank computes on its own samples only
    (the router balance, per-rank prior groups) end up averaged over ranks, as usual under DDP.
    """

    @staticmethod
    def forward(ctx, x):
        slices = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(slices, x.contiguous())
        return torch.cat(slices)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_with_grad(x):
    """(B, ...) on each rank -> (world_size * B, ...) in rank order, gradients flowing back to each
    rank's own slice; x itself when not running distributed. x must have the same shape on every rank."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    return GatherWithGrad.apply(x)


@torch.no_grad()
def caption_logits(t, tau_s):
    """t_i . t_j / tau_s, the logits of Eq. 4, taken between the distinct rows of t and spread back, so
    identical captions get bit-identical logits and share the target mass exactly equally."""
    distinct, index = torch.unique(t.float(), dim=0, return_inverse=True)
    return similarity(distinct, distinct, tau_s)[index][:, index]  # (B, B)


def soft_targets(t, tau_s):
    """Y_ij = softmax_j( t_i . t_j / tau_s )  (Eq. 4); float32, no gradient."""
    return caption_logits(t, tau_s).softmax(-1)


def hard_targets(ids):
    """Y_ij = 1 / n_i where caption j is caption i, else 0 (n_i: the batch's copies of caption i):
    the one-hot targets of plain (supervised) contrastive learning, the "no soft binding" ablation.
    ids: (B,) caption ids, equal for equal captions. Float32, rows summing to 1."""
    same = (ids[:, None] == ids[None, :]).float()
    return same / same.sum(-1, keepdim=True)


def soft_binding_loss(z, t, y, tau, beta):
    """L_bind = L_xt + beta * L_xx  (Eq. 7), given the targets y = Y (Eq. 4, or `hard_targets`):

        L_xt = 1/2 [ CE( softmax_j(z_i . t_j / tau), Y_i. ) + CE( softmax_i(z_i . t_j / tau), Y_.j ) ]   (Eq. 5)
        L_xx = CE( softmax_{j != i}(z_i . z_j / tau), Y_i. restricted to j != i and renormalised )      (Eq. 6)

    z, t: (B, D) normalised sample and caption embeddings; y: (B, B) rows summing to 1. The column
    targets Y_.j are renormalised to sum to 1. L_xx averages over the rows that have target mass
    off the diagonal: a row with none (with hard targets, a caption no other sample of the batch
    has) has no positive and contributes nothing. beta = 0 skips L_xx; no such row gives L_xx = 0.
    Returns (L_bind, {"bind", "xt", "xx"} as floats for logging); an empty batch gives zeros.
    """
    if len(z) == 0:
        return zero(z), as_floats(bind=zero(z), xt=zero(z), xx=zero(z))
    y = y.float()
    zt = similarity(z, t, tau)  # (B, B)
    xt = (soft_cross_entropy(zt, y, dim=1) + soft_cross_entropy(zt, y / y.sum(0), dim=0)) / 2
    others = y.masked_fill(torch.eye(len(y), dtype=torch.bool, device=y.device), 0.0)
    mass = others.sum(-1)
    rows = mass > 0
    if beta and rows.any():
        xx = soft_cross_entropy(without_self(similarity(z, z, tau))[rows], others[rows] / mass[rows, None], dim=1)
    else:
        xx = zero(z)
    bind = xt + beta * xx
    return bind, as_floats(bind=bind, xt=xt, xx=xx)


def anchor_distillation_loss(z, v, t, tau_kd, gamma):
    """Anchor-modality distillation (Eq. 8), averaged over the anchored samples:

        L_anchor = KL( softmax_j(v_i . t_j / tau_kd) || softmax_j(z_i . t_j / tau_kd) ) + gamma * (1 - z_i . v_i)

    z, v: (n, D) the anchored samples and their anchor images (the teacher, never given a gradient);
    t: (T, D) the batch's captions. No anchored sample -> 0; no caption -> the feature term alone.
    """
    if len(z) == 0:
        return zero(z)
    v = v.detach()
    cosine = (z.float() * v.float()).sum(-1).mean()
    kl = kl_divergence(similarity(v, t, tau_kd), similarity(z, t, tau_kd)) if len(t) else zero(z)
    return kl + gamma * (1 - cosine)


def prior_distillation_loss(z, p, tau_kd):
    """Prior-model distillation (Eq. 9), relational, so no projector is needed:

        L_prior = KL( softmax_{j != i}(p_i . p_j / tau_kd) || softmax_{j != i}(z_i . z_j / tau_kd) )

    z: (n, D) the samples with a prior; p: (n, P) their prior embeddings, any P, normalised here, the
    teacher (never given a gradient). Fewer than 2 samples -> 0.
    """
    if len(z) < 2:
        return zero(z)
    p = F.normalize(p.detach().float(), dim=-1)
    return kl_divergence(without_self(similarity(p, p, tau_kd)), without_self(similarity(z, z, tau_kd)))


def load_balance_loss(f, P):
    """L_bal = E * sum_e f_e * P_e  (Eq. 3) for one router call: f (E,) the fraction of tokens routed
    to expert e (no gradient), P (E,) the mean gate."""
    return len(P) * (f.detach().float() * P.float()).sum()


def unialign_loss(z, t, tau, *, y, beta, caption_mask=None, v=None, anchor_mask=None, tau_kd, gamma, lambda_anchor,
                  priors=(), lambda_prior, balance=(), lambda_bal):
    """L = L_bind + lambda_anchor * L_anchor + lambda_prior * L_prior + lambda_bal * L_bal  (Eq. 10)

    z: (B, D) normalised embeddings of the samples; tau: CLIP's temperature.
    t: (T, D) normalised embeddings of the captions of the rows where caption_mask (B,) bool is True
      (every row when caption_mask is None), y: (T, T) their targets (Eq. 4, or `hard_targets`).
      L_bind (Eq. 5-7) is taken over the captioned rows; a row without a caption joins Eq. 8 and 9 only.
    v: (B, D) normalised anchor-image embeddings, read at the rows where anchor_mask (B,) bool is True
      (every row when anchor_mask is None); v None: no anchor term. Eq. 8 compares them over t.
    priors: [(rows, p)], one group per prior model: rows (n,) long positions in the batch, p (n, P)
      their prior embeddings. Similarities from different prior models are not comparable, so Eq. 9
      is taken within each group; L_prior is the groups' mean weighted by size (groups of one skipped).
    balance: [(f, P)] router statistics, one pair per router call; L_bal is their mean (Eq. 3).
    Returns (L, parts), parts the floats {"bind", "xt", "xx", "anchor", "prior", "bal"}.
    """
    captioned = slice(None) if caption_mask is None else caption_mask
    bind, parts = soft_binding_loss(z[captioned], t, y, tau, beta)
    anchored = slice(None) if anchor_mask is None else anchor_mask
    anchor = zero(z) if v is None else anchor_distillation_loss(z[anchored], v[anchored], t, tau_kd, gamma)
    groups = [(len(rows), prior_distillation_loss(z[rows], p, tau_kd)) for rows, p in priors if len(rows) > 1]
    prior = sum(n * loss for n, loss in groups) / sum(n for n, _ in groups) if groups else zero(z)
    bal = torch.stack([load_balance_loss(f, P) for f, P in balance]).mean() if balance else zero(z)
    loss = bind + lambda_anchor * anchor + lambda_prior * prior + lambda_bal * bal
    return loss, {**parts, **as_floats(anchor=anchor, prior=prior, bal=bal)}
