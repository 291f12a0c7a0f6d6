"""Tests for losses.py: Eq. 4-10 reward alignment, teachers stay untouched, empty terms are exact zeros,
mixed precision changes nothing, and two DDP ranks give the gradient of one process on the whole batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from losses import (anchor_distillation_loss, gather_with_grad, hard_targets, load_balance_loss,
                    prior_distillation_loss, soft_binding_loss, soft_targets, unialign_loss)

TAU, TAU_S, TAU_KD = 0.07, 0.01, 0.5
SETTINGS = dict(beta=0.5, tau_kd=TAU_KD, gamma=0.5, lambda_anchor=1.0, lambda_prior=1.0, lambda_bal=0.1)


def objective(z, t, **kw):
    """unialign_loss with the soft targets of t (Eq. 4), every row captioned."""
    return unialign_loss(z, t, TAU, y=soft_targets(t, TAU_S), **{**SETTINGS, **kw})


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_aligned_embeddings_bind_better_than_shuffled():
    torch.manual_seed(0)
    t = unit(8, 16)
    shuffled = t.roll(1, dims=0)  # every sample next to another sample's caption
    for beta in (0.0, 1.0):
        aligned, _ = soft_binding_loss(t, t, soft_targets(t, TAU_S), TAU, beta)
        wrong, _ = soft_binding_loss(shuffled, t, soft_targets(t, TAU_S), TAU, beta)
        assert aligned < wrong - 1.0


def test_parity_with_a_transcription_of_eq_4_to_9():
    """Eq. 4-9 written out pair by pair, as on the page, on a batch where two samples share a caption."""
    torch.manual_seed(0)
    B, tau_s = 5, 0.3  # soft targets: the column sums of Y are far from 1
    z, t, v, p = unit(B, 8).double(), unit(B, 8).double(), unit(B, 8).double(), 3 * torch.randn(B, 12).double()
    t[3] = t[1]
    exp, log, others = torch.exp, torch.log, lambda i: [k for k in range(B) if k != i]
    Y = [[exp(t[i] @ t[j] / tau_s) / sum(exp(t[i] @ t[k] / tau_s) for k in range(B)) for j in range(B)]
         for i in range(B)]
    xt = lambda i, j: z[i] @ t[j] / TAU
    xx = lambda i, j: z[i] @ z[j] / TAU
    rows = -sum(Y[i][j] * (xt(i, j) - log(sum(exp(xt(i, k)) for k in range(B))))
                for i in range(B) for j in range(B)) / B
    cols = -sum(Y[i][j] / sum(Y[k][j] for k in range(B)) * (xt(i, j) - log(sum(exp(xt(k, j)) for k in range(B))))
                for i in range(B) for j in range(B)) / B
    within = -sum(Y[i][j] / sum(Y[i][k] for k in others(i)) * (xx(i, j) - log(sum(exp(xx(i, k)) for k in others(i))))
                  for i in range(B) for j in others(i)) / B
    _, parts = soft_binding_loss(z, t, soft_targets(t, tau_s), TAU, beta=1.0)
    assert parts["xt"] == pytest.approx(float(rows + cols) / 2, rel=1e-5)
    assert parts["xx"] == pytest.approx(float(within), rel=1e-5)

    def texts(x, i):  # softmax_j(x_i . t_j / tau_kd)
        return [exp(x[i] @ t[j] / TAU_KD) / sum(exp(x[i] @ t[k] / TAU_KD) for k in range(B)) for j in range(B)]
    kl = sum(q * log(q / s) for i in range(B) for q, s in zip(texts(v, i), texts(z, i))) / B
    cosine = sum(z[i] @ v[i] for i in range(B)) / B
    anchor = anchor_distillation_loss(z, v, t, TAU_KD, gamma=0.5).item()
    assert anchor == pytest.approx(float(kl + 0.5 * (1 - cosine)), rel=1e-5)

    def relations(x, i):  # softmax_{j != i}(x_i . x_j / tau_kd)
        return {j: exp(x[i] @ x[j] / TAU_KD) / sum(exp(x[i] @ x[k] / TAU_KD) for k in others(i)) for j in others(i)}
    p_hat = F.normalize(p, dim=-1)
    kl = sum(q * log(q / relations(z, i)[j]) for i in range(B) for j, q in relations(p_hat, i).items()) / B
    assert prior_distillation_loss(z, p, TAU_KD).item() == pytest.approx(float(kl), rel=1e-5)


def test_identical_captions_share_the_target_mass():
    torch.manual_seed(0)
    t = unit(37, 67)
    t[30] = t[4]
    y = soft_targets(t, TAU_S)
    assert torch.equal(y[4], y[30])  # the two samples have the same targets
    assert torch.equal(y[:, 4], y[:, 30])  # every row gives them the same mass
    assert y[4, 4] == pytest.approx(0.5, abs=1e-3)  # tau_s small: the pair holds almost all the mass
    assert torch.allclose(y.sum(-1), torch.ones(37))


def test_identical_captions_are_positives_of_each_other():
    """L_xx pulls two samples with the same caption together, whatever their datasets."""
    torch.manual_seed(0)
    t = unit(6, 16)
    t[5] = t[0]
    z = t.clone()
    z[5] = unit(16)  # sample 5 points elsewhere: L_xx grows
    y = soft_targets(t, TAU_S)
    assert soft_binding_loss(z, t, y, TAU, 1.0)[1]["xx"] > soft_binding_loss(t, t, y, TAU, 1.0)[1]["xx"] + 1.0


def test_kl_terms_vanish_when_student_equals_teacher():
    torch.manual_seed(0)
    z, t = unit(6, 16), unit(10, 16)
    assert anchor_distillation_loss(z, z.clone(), t, TAU_KD, gamma=1.0).abs() < 1e-6
    assert prior_distillation_loss(z, z.clone(), TAU_KD).abs() < 1e-6


def test_teachers_get_no_gradient():
    torch.manual_seed(0)
    z, t = unit(6, 16).requires_grad_(), unit(10, 16)
    v, p = unit(6, 16).requires_grad_(), torch.randn(6, 24, requires_grad=True)
    (anchor_distillation_loss(z, v, t, TAU_KD, 1.0) + prior_distillation_loss(z, p, TAU_KD)).backward()
    assert v.grad is None and p.grad is None
    assert z.grad.abs().sum() > 0


def test_prior_of_another_dimension():
    """Eq. 9 compares similarity structures: a prior in 40 dimensions with the student's structure
    (an isometric embedding, scaled) costs nothing, a random one does."""
    torch.manual_seed(0)
    z = unit(8, 16)
    isometry = torch.linalg.qr(torch.randn(40, 16)).Q.T  # (16, 40), orthonormal rows
    assert prior_distillation_loss(z, 3 * z @ isometry, TAU_KD).abs() < 1e-6
    assert prior_distillation_loss(z, torch.randn(8, 40), TAU_KD) > 0.01


def test_empty_terms_are_exact_zeros_with_a_graph():
    torch.manual_seed(0)
    z, t, v = unit(6, 16).requires_grad_(), unit(6, 16), unit(6, 16)
    singleton = (torch.tensor([2]), torch.randn(1, 24))
    loss, parts = objective(z, t, v=v, anchor_mask=torch.zeros(6, dtype=torch.bool),
                            priors=[(torch.tensor([], dtype=torch.long), torch.randn(0, 24)), singleton])
    assert parts["anchor"] == 0.0 and parts["prior"] == 0.0 and parts["bal"] == 0.0
    assert loss.item() == parts["bind"]
    loss.backward()
    assert torch.isfinite(z.grad).all()
    one = unit(1, 16).requires_grad_()
    bind, parts = soft_binding_loss(one, unit(1, 16), torch.ones(1, 1), TAU, beta=1.0)
    assert parts["xx"] == 0.0
    bind.backward()
    assert torch.isfinite(one.grad).all()


def test_beta_zero_skips_xx():
    torch.manual_seed(0)
    z, t = unit(6, 16), unit(6, 16)
    bind, parts = soft_binding_loss(z, t, soft_targets(t, TAU_S), TAU, beta=0.0)
    assert parts["xx"] == 0.0 and bind.item() == parts["xt"]


def test_load_balance():
    """E * sum f P is 1 for uniform routing, E when one expert takes everything; only P gets a gradient."""
    P = torch.full((4,), 0.25, requires_grad=True)
    f = torch.full((4,), 0.25, requires_grad=True)
    uniform = load_balance_loss(f, P)
    uniform.backward()
    assert uniform.item() == pytest.approx(1.0) and f.grad is None and P.grad is not None
    assert load_balance_loss(torch.eye(4)[0], torch.eye(4)[0]).item() == pytest.approx(4.0)


def full_batch(n=12, d=16):
    """A mixed batch: duplicate captions, rows without one, some anchored samples, some with a prior."""
    g = torch.Generator().manual_seed(1)
    captions = F.normalize(torch.randn(5, d, generator=g), dim=-1)
    return {
        "x": torch.randn(n, 10, generator=g),
        "t": captions[torch.arange(n) % 5],
        "captioned": torch.arange(n) % 6 != 2,
        "v": F.normalize(torch.randn(n, d, generator=g), dim=-1),
        "anchor": torch.arange(n) % 3 != 0,
        "has_prior": torch.arange(n) % 4 != 1,
        "p": torch.randn(n, 24, generator=g),
    }


def batch_loss(model, batch):
    """unialign_loss on the global batch: gathered across ranks when distributed, as is otherwise."""
    z = gather_with_grad(F.normalize(model(batch["x"]), dim=-1))
    t, v, p = (gather_with_grad(batch[k]) for k in ("t", "v", "p"))
    captioned, anchor, has_prior = (gather_with_grad(batch[k].float()).bool() for k in ("captioned", "anchor", "has_prior"))
    rows = has_prior.nonzero().squeeze(1)
    t = t[captioned]
    return unialign_loss(z, t, TAU, y=soft_targets(t, TAU_S), caption_mask=captioned, v=v, anchor_mask=anchor,
                         priors=[(rows, p[rows])], **SETTINGS)


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))


def ddp_rank(rank, world, batch, out):
    # rendezvous through a file, not a TCP port picked in advance (another process could take it)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    model = DDP(small_model())
    n = len(batch["x"]) // world
    loss, _ = batch_loss(model, {k: x[rank * n:(rank + 1) * n] for k, x in batch.items()})
    loss.backward()  # DDP averages the gradients over ranks
    torch.save({"loss": loss.detach(), "grads": [q.grad for q in model.parameters()]}, os.path.join(out, f"{rank}.pt"))
    dist.barrier()  # no rank closes its connections while the other still talks over them
    dist.destroy_process_group()


def test_two_ddp_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    batch = full_batch()
    assert gather_with_grad(batch["x"]) is batch["x"]  # not distributed: unchanged
    model = small_model()
    loss, _ = batch_loss(model, batch)
    loss.backward()
    # forked ranks: copies of this process, which never started a thread pool (conftest: one thread)
    mp.start_processes(ddp_rank, args=(2, batch, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert torch.allclose(result["loss"], loss.detach(), atol=1e-6)
        for g, q in zip(result["grads"], model.parameters()):
            assert torch.allclose(g, q.grad, atol=1e-5, rtol=0)


def test_autocast_changes_nothing():
    """Under bf16 autocast the losses still compute in float32: float32 inputs give the float32 loss,
    bf16 inputs a finite loss close to it."""
    torch.manual_seed(0)
    z, t, v = unit(12, 32), unit(12, 32), unit(12, 32)
    kwargs = dict(anchor_mask=torch.arange(12) % 2 == 0, priors=[(torch.arange(8), torch.randn(8, 24))],
                  balance=[(torch.full((4,), 0.25), torch.rand(4))])
    reference, _ = objective(z, t, v=v, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same, _ = objective(z, t, v=v, **kwargs)
        half, _ = unialign_loss(z.bfloat16(), t.bfloat16(), TAU, y=soft_targets(t, TAU_S), v=v.bfloat16(),
                                **{**SETTINGS, **kwargs})
    assert same.dtype == half.dtype == torch.float32
    assert torch.allclose(same, reference, atol=1e-6, rtol=0)
    assert torch.isfinite(half) and torch.allclose(half, reference, rtol=0.02)


def test_the_balance_term_is_the_mean_over_router_calls():
    """Three router calls with uniform routing: each has L_bal = 1 (Eq. 3), so their mean is 1, not 3."""
    torch.manual_seed(0)
    z, t = unit(6, 16), unit(6, 16)
    uniform = (torch.full((4,), 0.25), torch.full((4,), 0.25))
    skewed = (torch.tensor([1.0, 0, 0, 0]), torch.tensor([1.0, 0, 0, 0]))  # L_bal = 4
    _, parts = objective(z, t, balance=[uniform] * 3)
    assert parts["bal"] == pytest.approx(1.0)
    _, parts = objective(z, t, balance=[uniform, skewed])
    assert parts["bal"] == pytest.approx(2.5)


def test_hard_targets_are_plain_contrastive_and_a_row_without_a_positive_adds_nothing_to_xx():
    """Hard targets (the "no soft binding" ablation): Y_ij = 1 / n_i for identical captions. A batch
    whose captions are all distinct has L_xx = 0; with one caption repeated, L_xx is the mean over the
    two rows that share it of -log softmax_{j != i}(z_i . z_j / tau) at the other row."""
    torch.manual_seed(0)
    z, t = unit(5, 16), unit(5, 16)
    y = hard_targets(torch.tensor([0, 1, 2, 3, 4]))
    assert torch.equal(y, torch.eye(5))
    assert soft_binding_loss(z, t, y, TAU, beta=1.0)[1]["xx"] == 0.0
    y = hard_targets(torch.tensor([0, 1, 0, 2, 3]))  # rows 0 and 2 share a caption
    assert y[0, 0] == y[0, 2] == 0.5 and y[1, 1] == 1.0
    logits = (z @ z.T / TAU).masked_fill(torch.eye(5, dtype=torch.bool), float("-inf"))
    by_hand = -(logits[0].log_softmax(-1)[2] + logits[2].log_softmax(-1)[0]) / 2
    _, parts = soft_binding_loss(z, t, y, TAU, beta=1.0)
    assert parts["xx"] == pytest.approx(by_hand.item(), rel=1e-5)


def test_rows_without_a_caption_join_only_the_anchor_and_prior_terms():
    """caption_mask: L_bind is taken over the captioned rows alone; an uncaptioned row still meets its
    anchor (Eq. 8): moving it changes L_anchor and nothing in L_bind."""
    torch.manual_seed(0)
    z, v, t = unit(6, 16), unit(6, 16), unit(6, 16)
    captioned = torch.tensor([True, True, False, True, False, True])
    run = lambda z: unialign_loss(z, t[captioned], TAU, y=soft_targets(t[captioned], TAU_S), caption_mask=captioned,
                                  v=v, **SETTINGS)[1]
    parts = run(z)
    bind, _ = soft_binding_loss(z[captioned], t[captioned], soft_targets(t[captioned], TAU_S), TAU, 0.5)
    assert parts["bind"] == pytest.approx(bind.item())
    moved = z.clone()
    moved[2] = v[2]  # the uncaptioned row 2 now equals its anchor image
    assert run(moved)["bind"] == parts["bind"] and run(moved)["anchor"] < parts["anchor"]
