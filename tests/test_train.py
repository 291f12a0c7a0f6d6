"""Tests for train.py and eval.py: the smoke recipe end to end, exact resume after SIGKILL, a
two-process gloo DDP run, evaluation of a finished run folder, and a readable --help."""

import contextlib
import io
import json
import os
import runpy
import socket
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

import train
from checkpoint import load_checkpoint
from modalities import extended

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["anchor.pt", "bpe.txt.gz"] + [f"{kind}_{m}.pt" for kind in ("prior", "specialist") for m in extended()]
FLAGS = ["--preset", "smoke", "--steps", "12", "--no-eval"]  # runs interrupted in tests, and the one that is not


def run(*args, **kw):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def in_process(script, *args):
    """`python SCRIPT ARGS` run in this process (runpy, as the interpreter runs a script) -> (exit code,
    stdout, stderr): a SystemExit with a message prints it and gives 1, as Python does; any other
    exception gives its traceback and 1. The behaviour of a command line without the second or two a
    new interpreter takes to import torch."""
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [str(ROOT / script), *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) or stop.code is None else print(stop.code, file=err) or 1
            except Exception:
                traceback.print_exc(file=err)
                code = 1
    finally:
        sys.argv = argv
    return code or 0, out.getvalue(), err.getvalue()


class forked:
    """`train.main(argv)` in a forked copy of this process: a real process, which tests signal and
    kill for real, without the second or two a new interpreter takes to import torch. Safe because
    the test session never starts a thread pool (conftest: one thread). Its output (stdout and
    stderr) is read with `communicate`, its exit code as `python train.py` would give it. `before`
    runs in the child first (a resource limit, say)."""

    def __init__(self, *argv, before=None):
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: run, then leave without pytest's teardown
            os.close(read)
            sys.stdout = sys.stderr = os.fdopen(write, "w", buffering=1)
            code = 1
            try:
                if before:  # e.g. a resource limit for this process alone
                    before()
                train.main(list(argv))
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else print(stop.code, file=sys.stderr) or 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        os.close(write)
        self.output, self.returncode = os.fdopen(read), None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self):
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def send_signal(self, signum):
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout=None):
        text = self.output.read()
        self.wait()
        return text, None


def with_finished_stages(smoke, out):
    """A run folder holding the smoke run's anchor and specialists, so only the UniAlign stage runs."""
    out.mkdir()
    for name in STAGES:
        shutil.copy(smoke / name, out / name)
    return out


def trainable_state(out):
    return load_checkpoint(out / "ckpt.pt")["model"]


def test_smoke_recipe_writes_every_artefact(smoke):
    for name in STAGES + ["ckpt.pt", "log.jsonl", "metrics.json", "metrics.md", "loss_curves.png",
                          "routing.png", "similarity.png"]:
        assert (smoke / name).exists(), name
    metrics = json.loads((smoke / "metrics.json").read_text())
    for block in ("unialign", "specialists", "prior", "raw_baseline"):
        assert set(extended()) <= set(metrics[block]["zero_shot_top1"]), block
    assert metrics["unialign"]["trainable_params"] < metrics["specialists"]["trainable_params"]
    assert "imu->image" in metrics["emergent_r1"]
    assert metrics["cross_modal"]["audio->image"]["connected_by"].startswith("anchor images")
    assert metrics["cross_modal"]["audio->point"]["connected_by"].startswith("soft binding")
    stages = {json.loads(line)["stage"].split(":")[0] for line in (smoke / "log.jsonl").read_text().splitlines()}
    assert {"specialist", "unialign"} <= stages <= {"anchor", "prior", "specialist", "unialign"}
    ckpt = load_checkpoint(smoke / "ckpt.pt")
    assert ckpt["step"] == ckpt["config"]["steps"] and {"optimizer", "sampler", "rng", "model_args", "settings"} <= set(ckpt)


def test_finished_stages_are_reused_and_other_settings_refused(smoke, capsys):
    before = (smoke / "ckpt.pt").stat().st_mtime_ns
    train.main(["--preset", "smoke", "--out", str(smoke), "--no-eval"])
    assert (smoke / "ckpt.pt").stat().st_mtime_ns == before  # nothing retrained
    with pytest.raises(SystemExit, match="--experts: saved 2, now 3"):
        train.main(["--preset", "smoke", "--out", str(smoke), "--no-eval", "--experts", "3"])


def test_unialign_does_not_depend_on_how_earlier_stages_were_obtained(smoke, tmp_path, capsys):
    """Copying the anchor, the prior and the specialists into a fresh folder and rerunning gives the
    UniAlign of the run that trained them, bit for bit: each stage is seeded from (seed, its name).
    So does a run that builds the world, its anchor and its prior afresh (--no-cache)."""
    out = with_finished_stages(smoke, tmp_path / "copied")
    train.main(["--preset", "smoke", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "anchor: reusing" in printed and "prior:audio: reusing" in printed and "specialist:audio: reusing" in printed
    fresh = tmp_path / "fresh"
    train.main(["--preset", "smoke", "--out", str(fresh), "--no-cache", "--no-eval"])
    assert "not cached (--no-cache)" in capsys.readouterr().out
    a = trainable_state(smoke)
    for other in (out, fresh):
        b = trainable_state(other)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before, after = (json.loads((o / "metrics.json").read_text())["unialign"] for o in (smoke, out))
    assert before == after


def test_resume_after_sigkill_is_bit_for_bit_an_uninterrupted_run(smoke, uninterrupted, tmp_path):
    flags = [*FLAGS, "--ckpt-every", "2"]
    killed = with_finished_stages(smoke, tmp_path / "killed")
    proc = forked(*flags, "--out", str(killed))
    deadline = time.time() + 120
    while not (killed / "ckpt.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = load_checkpoint(killed / "ckpt.pt")["step"]
    assert step < 12, "the run finished before it could be killed"
    with pytest.raises(SystemExit, match="--resume"):
        train.main([*flags, "--out", str(killed)])
    train.main([*flags, "--out", str(killed), "--resume"])

    a, b = trainable_state(uninterrupted), trainable_state(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def forked_ranks(world_size, *argv):
    """`torchrun --nproc_per_node N train.py ARGV` without the launcher: N forked ranks, each with the
    environment torchrun gives a worker (RANK, WORLD_SIZE, the rendezvous address)."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = lambda rank: os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                                                 LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                                                 MASTER_PORT=str(port))
    return [forked(*argv, before=lambda rank=rank: environment(rank)) for rank in range(world_size)]


def worker_of_rank(launcher, rank):
    """The pid of the worker torchrun started for `rank` (read from /proc)."""
    children = [int(pid) for task in Path(f"/proc/{launcher}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    return next(pid for pid in children if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))


def test_two_process_gloo_ddp_run_stops_every_rank_at_one_step_on_sigterm_to_one_and_resumes(smoke, tmp_path):
    """SIGTERM to rank 1 alone: the ranks agree on it (all_reduce), both finish the same step, rank 0
    saves it, and the launch resumes to the end with --resume."""
    out = with_finished_stages(smoke, tmp_path / "ddp")
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", "--preset", "smoke",
              "--steps", "12", "--device", "cpu", "--no-eval", "--log-every", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc, workers = run(*launch, env=env), []
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and '"unialign"' not in (
                (out / "log.jsonl").read_text() if (out / "log.jsonl").exists() else ""):
            time.sleep(0.02)
        workers = [worker_of_rank(proc.pid, rank) for rank in (0, 1)]
        os.kill(workers[1], signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # the test failed: end the launch (torchrun gives each worker its own session)
            for pid in [proc.pid, *workers]:
                os.kill(pid, signal.SIGKILL)
    ckpt = load_checkpoint(out / "ckpt.pt")
    step = ckpt["step"]
    assert step < 12 and ckpt["sampler"]["world_size"] == 2, log[-3000:]
    assert f"unialign: stopped by SIGTERM after step {step} of 12, saved in {out / 'ckpt.pt'}. Resume with: " in log
    assert log.count("exitcode  : 143") == 2, log[-3000:]  # both ranks stopped as SIGTERM asks, neither crashed
    ranks = forked_ranks(2, *launch[launch.index("train.py") + 1:], "--resume")  # torchrun's environment, forked
    logs = [rank.communicate()[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert f"resumed unialign at step {step} of 12" in logs[0]
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 12 and ckpt["sampler"]["world_size"] == 2


def test_eval_cli_on_a_finished_run(smoke):
    (smoke / "metrics.json").unlink()
    code, log, err = in_process("eval.py", "--ckpt", str(smoke / "ckpt.pt"), "--device", "cpu")
    assert code == 0, err[-3000:]
    assert "| **mean** |" in log
    metrics = json.loads((smoke / "metrics.json").read_text())
    assert all(0.0 <= v <= 1.0 for v in metrics["unialign"]["zero_shot_top1"].values())


def test_every_flag_is_explained_and_preset_values_shown():
    import argparse

    import config
    parser = config.make_parser(config.PRESETS["default"])
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.dest
    for key in config.PRESETS["default"]:
        help_text = next(a.help for a in parser._actions if a.dest == key)
        assert "presets: " + ", ".join(f"{n} {p[key]}" for n, p in config.PRESETS.items()) in help_text, key


@pytest.mark.parametrize("flags, message", [
    (["--experts", "1", "--top-k", "2"], "--top-k 2 is more than --experts 1"),
    (["--lr", "-1"], "argument --lr: must be > 0, got -1"),
    (["--steps", "0"], "argument --steps: must be > 0, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be > 0, got 0"),
    (["--held-out", "banana"], "--held-out: unknown concept ['banana']"),
    (["--modalities", "smell"], "--modalities: unknown ['smell']"),
])
def test_impossible_settings_are_refused_before_any_work_in_one_line(flags, message, capsys):
    import config
    with pytest.raises(SystemExit) as exit:
        config.get_args(["--preset", "smoke", "--out", "/nonexistent/never", *flags])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"train.py: error: {message}")


def test_help_reads_well():
    code, text, _ = in_process("train.py", "--help")
    assert code == 0
    for flag in ["--preset", "--out", "--steps", "--batch-size", "--lr", "--seed", "--device", "--precision",
                 "--ckpt-every", "--resume", "--experts", "--rank", "--top-k", "--clip", "--data", "--prior",
                 "--lambda-anchor", "--lambda-prior", "--lambda-bal"]:
        assert flag in text, flag
