"""The training loop every stage runs (docs/method.md section 3): AdamW, warm-up then cosine decay,
autocast, gradient clipping and accumulation, DDP, a guard against non-finite losses agreed across
ranks, checkpoints that resume bit for bit, and SIGINT / SIGTERM that stop it cleanly.

SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) are not crashes: under `stop_on_signals` the
first one raises `Interrupted`, at once outside `train_loop`; inside it, after the step it is in,
which every rank agrees on and a checkpoint saves. Later ones, until the run has stopped, are ignored.

`train_loop(stage, model, loss_fn, datasets, ...)` knows nothing about UniAlign: `loss_fn(model,
batch) -> (loss, parts)` is the stage's objective (objectives.py), the batches mix `datasets` as
data.MixedBatchSampler draws them.
"""
import contextlib
import json
import math
import os
import signal
import threading
import time
import zlib
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from config import stage_settings
from data import MixedBatchSampler, MixedDataset, collate

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RESUMABLE = ("model", "optimizer", "scaler", "sampler", "rng", "step")  # what a stage's checkpoint holds


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run: after `step` of `stage` (None outside a stage), its state
    saved in `saved` (None when nothing was). The process should exit with `code`, 128 + the signal."""

    def __init__(self, signum, stage=None, step=None, steps=None, saved=None):
        self.signum, self.stage, self.step, self.steps, self.saved = signum, stage, step, steps, saved
        self.name, self.code = signal.Signals(signum).name, 128 + signum
        super().__init__(self.describe())

    def describe(self):
        if self.stage is None:
            return f"stopped by {self.name}"
        where = f"{self.stage}: stopped by {self.name} after step {self.step} of {self.steps}"
        if self.saved:
            return f"{where}, saved in {self.saved}"
        return f"{where}; this stage keeps no checkpoint, --resume starts it again"


class _Stop:
    active = False  # inside stop_on_signals
    defer = False  # inside a train_loop: note the signal, stop after the step
    signum = 0  # the first SIGINT or SIGTERM received, 0 if none


def _on_stop_signal(signum, frame):
    first = not _Stop.signum
    _Stop.signum = _Stop.signum or signum
    if first and not _Stop.defer:
        raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise `Interrupted` (in train_loop, after the step it is in); the handlers
    before are back on exit, unless others were set inside. Nested uses are one. Off the main
    thread, signals are left alone."""
    if _Stop.active or threading.current_thread() is not threading.main_thread():
        yield
        return
    _Stop.active, _Stop.defer, _Stop.signum = True, False, 0
    previous = {s: signal.signal(s, _on_stop_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            if signal.getsignal(s) is _on_stop_signal:  # a handler set inside is left in place
                signal.signal(s, signal.SIG_DFL if handler is None else handler)
        _Stop.active, _Stop.defer, _Stop.signum = False, False, 0


def stop_requested():
    """The number of the SIGINT or SIGTERM received since stop_on_signals began, 0 if none."""
    return _Stop.signum


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def log(*words):
    """Print on rank 0 only, without breaking tqdm's bars."""
    if rank_and_world()[0] == 0:
        tqdm.write(" ".join(str(w) for w in words))


def stage_seed(seed, stage):
    """A stage's own seed: a stage draws the same random numbers however earlier stages were obtained."""
    return zlib.crc32(f"{seed}/{stage}".encode())


def lr_at(step, lr, warmup, steps):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    warmup = min(warmup, steps // 5)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(stage, model, loss_fn, datasets, steps, batch_size, lr, args, ckpt_path=None, extra=None,
               distributed=True, seed=None):
    """One plain loop for every stage: AdamW, warm-up + cosine, autocast, clipping, accumulation, DDP,
    a guard against non-finite losses (agreed across ranks), checkpoints and exact resume.

    `loss_fn(model, batch) -> (loss, parts)`. `stage` names the stage in logs and, with `seed`
    (default --seed; the world's stages pass --world-seed), seeds it.
    """
    rank, world_size = rank_and_world() if distributed else (0, 1)
    seed = args.seed if seed is None else seed
    torch.manual_seed(stage_seed(seed, stage))
    net = model.module if isinstance(model, DDP) else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, fused=True)  # one kernel for all tensors
    scaler = torch.amp.GradScaler(args.device, enabled=args.precision == "fp16")
    autocast = torch.autocast(args.device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision),
                              enabled=args.precision != "fp32")
    sampler = MixedBatchSampler([len(d) for d in datasets], batch_size // world_size // args.grad_accum,
                                args.alpha_sampling, seed=stage_seed(seed, stage), rank=rank, world_size=world_size)
    step = 0
    if ckpt_path and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, RESUMABLE, f"a checkpoint of the {stage} stage of train.py")
        net.load_trainable_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        sampler.load_state_dict(ckpt["sampler"])
        torch.set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        log(f"resumed {stage} at step {step} of {steps} from {ckpt_path}")
    elif ckpt_path and getattr(args, "resume", False):
        log(f"{stage}: no checkpoint in {ckpt_path} to resume, starting from step 0")
    loader = torch.utils.data.DataLoader(MixedDataset(datasets), batch_sampler=sampler, collate_fn=collate,
                                         num_workers=args.workers, pin_memory=args.device == "cuda")

    def checkpoint():
        # batches consumed, not drawn: DataLoader workers may have prefetched more
        save_checkpoint({"model": net.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "rng": torch.get_rng_state(),
                         "sampler": {**sampler.state_dict(), "batch": step * args.grad_accum}, "step": step,
                         "steps": steps, "settings": stage_settings(args, stage.split(":")[0]), **(extra or {})},
                        ckpt_path)

    def agreed(finite, signum):
        """(finite, signum) agreed by every rank: the step is skipped if any rank saw a non-finite loss,
        and every rank stops after it if any rank received SIGINT or SIGTERM (one all_reduce for both)."""
        if world_size == 1:
            return finite, signum
        flags = torch.stack([finite, finite.new_tensor(-float(signum))])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        return flags[0], int(-flags[1].item())

    def stop(signum, saved):
        """Save the step just made (rank 0), let every rank get here, and raise Interrupted."""
        if ckpt_path and rank == 0 and not saved:
            checkpoint()
        if world_size > 1:
            dist.barrier()  # no rank leaves before rank 0's checkpoint is whole
        raise Interrupted(signum, stage, step, steps, ckpt_path)

    log_file = open(os.path.join(args.out, "log.jsonl"), "a") if rank == 0 else None
    bar = tqdm(total=steps, initial=step, desc=stage, disable=rank != 0, dynamic_ncols=True)
    batches, bad, t0, seen = iter(loader), 0, time.time(), 0
    model.train()
    with stop_on_signals(), _closing(bar, log_file):
        _Stop.defer = True  # a signal now stops the loop after the step it is in
        while step < steps:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, lr, args.warmup, steps)
            finite = torch.ones((), device=args.device)
            for micro in range(args.grad_accum):
                batch = to_device(next(batches), args.device)
                sync = micro == args.grad_accum - 1 or not isinstance(model, DDP)
                with (nullcontext() if sync else model.no_sync()), autocast:
                    loss, parts = loss_fn(model, batch)
                finite = torch.minimum(finite, torch.isfinite(loss.detach()).float())
                scaler.scale(loss / args.grad_accum).backward()
                seen += len(batch["modality"]) * world_size
            finite, signum = agreed(finite, stop_requested())
            if finite.item():
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                bad = 0
            else:
                bad += 1
                log(f"{stage} step {step}: non-finite loss, step skipped ({bad} in a row)")
            optimizer.zero_grad(set_to_none=True)
            if bad >= args.max_bad_steps:  # the skipped steps left the weights as the last good step made them
                if ckpt_path and rank == 0:
                    checkpoint()
                kept = f"; the last good state is saved in {ckpt_path}" if ckpt_path else ""
                raise SystemExit(f"{stage}: {bad} non-finite losses in a row at step {step}, stopping{kept}. "
                                 f"Try a lower --lr, or --precision fp32 or bf16.")
            step += 1
            if log_file and (step % args.log_every == 0 or step == steps or not finite.item()):
                rate = seen / (time.time() - t0)
                write_log(log_file, {"stage": stage, "step": step, "lr": lr_at(step - 1, lr, args.warmup, steps),
                                     "loss": loss.item(), "finite": bool(finite.item()), "samples_per_s": rate,
                                     "seconds": time.time() - t0, **parts})
                bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{rate:.0f}")
            bar.update(1)
            saved = bool(ckpt_path and rank == 0 and (step % args.ckpt_every == 0 or step == steps))
            if saved:
                checkpoint()
            if signum:
                stop(signum, saved)
        _Stop.defer = False  # from here a signal stops the run at once
        if signum := agreed(torch.ones((), device=args.device), stop_requested())[1]:  # one in the last step
            stop(signum, saved=True)


@contextlib.contextmanager
def _closing(bar, log_file):
    try:
        yield
    finally:
        _Stop.defer = False
        bar.close()
        if log_file:
            log_file.close()


def write_log(log_file, record):
    """One line of OUT/log.jsonl; a full disk or an unwritable file stops the run in one line."""
    try:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
    except OSError as error:
        with contextlib.suppress(OSError):  # closing flushes again: the same error, already being raised
            log_file.close()
        raise CheckpointError(f"{os.path.dirname(os.path.abspath(log_file.name))}: cannot write "
                              f"{os.path.basename(log_file.name)} ({error.strerror or error})") from None


def to_device(batch, device):
    move = lambda x: x.to(device, non_blocking=True) if torch.is_tensor(x) else x
    return {k: ({m: move(x) for m, x in v.items()} if isinstance(v, dict) else move(v)) for k, v in batch.items()}
