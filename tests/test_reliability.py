"""Runs interrupted the way real runs are: a second run on a folder in use, a kill before the first
checkpoint, Ctrl-C and SIGTERM, a full disk or an unwritable folder, files this project did not
write, and reruns that come out bit for bit the same. Kills and signals are real, on this machine;
every wait polls for a file and is bounded."""

import gzip
import hashlib
import io
import json
import os
import pickle
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import eval as evaluation
import loop
import train
from checkpoint import CheckpointError, load_checkpoint, lock_run_folder, save_checkpoint, temp_files
from config import RUN_ONLY
from test_train import FLAGS, STAGES, forked, run, trainable_state, with_finished_stages


def started(out, proc, stage="unialign", timeout=120):
    """Wait until the run writing to `out` has logged a step of `stage`."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "log.jsonl").exists() and f'"stage": "{stage}"' in (out / "log.jsonl").read_text():
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {stage} step logged: {proc.communicate()[0][-2000:]}")


def same_as_uninterrupted(out, uninterrupted):
    a, b = trainable_state(uninterrupted), trainable_state(out)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- a second run

def test_a_second_run_on_a_folder_in_use_is_refused_in_one_line(tmp_path, monkeypatch):
    held = lock_run_folder(str(tmp_path))
    monkeypatch.setattr(train, "build_datasets", lambda *a, **k: pytest.fail("work started in a folder in use"))
    with pytest.raises(SystemExit) as refusal:
        train.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert refusal.value.code == (f"error: {tmp_path} is in use by another run (pid {os.getpid()}); "
                                  f"wait for it or choose another --out")
    assert (tmp_path / ".lock").read_text() == str(os.getpid())  # the refused run left the owner's lock alone
    held.close()


# ----------------------------------------------------------------------------- killed before its first checkpoint

def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(smoke, uninterrupted, tmp_path, capsys):
    out = with_finished_stages(smoke, tmp_path / "run")
    proc = forked(*FLAGS, "--log-every", "1", "--out", str(out))  # its first checkpoint is at step 12
    started(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "ckpt.pt").exists(), "the run saved a checkpoint before it could be killed"
    train.main([*FLAGS, "--out", str(out), "--resume"])
    printed = capsys.readouterr().out
    assert f"holds a run killed before its first checkpoint was whole (pid {proc.pid} in its lock, log.jsonl)" in printed
    assert f"unialign: no checkpoint in {out / 'ckpt.pt'} to resume, starting from step 0" in printed
    assert same_as_uninterrupted(out, uninterrupted)


@pytest.mark.parametrize("trace", ["pid", "temporary file", "log"])
def test_each_trace_of_a_killed_run_lets_resume_start_from_step_0(tmp_path, monkeypatch, capsys, trace):
    {"pid": lambda: (tmp_path / ".lock").write_text("4242"),
     "temporary file": lambda: (tmp_path / "ckpt.pt.tmp4242").write_bytes(b"half a checkpoint"),
     "log": lambda: (tmp_path / "log.jsonl").write_text('{"stage": "anchor", "step": 10}\n')}[trace]()
    monkeypatch.setattr(train, "run", lambda args: print("the run starts"))
    train.main(["--preset", "smoke", "--out", str(tmp_path), "--resume"])
    printed = capsys.readouterr().out
    words = {"pid": "pid 4242 in its lock", "temporary file": "temporary file ckpt.pt.tmp4242", "log": "log.jsonl"}
    assert f"but {tmp_path} holds a run killed before its first checkpoint was whole ({words[trace]})" in printed
    assert printed.rstrip().endswith("the run starts")


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM

@pytest.fixture(scope="module")
def ctrl_c(smoke, tmp_path_factory):
    """A run stopped by Ctrl-C, pressed again and again until it has exited (some presses land in its
    one save): (OUT, the finished process, its output). Its only checkpoint would otherwise be at step 12."""
    out = with_finished_stages(smoke, tmp_path_factory.mktemp("ctrl_c") / "run")
    proc = run("train.py", *FLAGS, "--log-every", "1", "--out", str(out))
    started(out, proc)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
    return out, proc, proc.communicate()[0]


def test_ctrl_c_finishes_the_step_saves_it_and_prints_the_command_that_resumes_it(ctrl_c, uninterrupted, tmp_path):
    out, proc, output = ctrl_c
    assert proc.returncode == 130, output[-3000:]
    step = load_checkpoint(out / "ckpt.pt")["step"]
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert 0 < step < 12 and logged[-1] == step  # the step it was in was finished, then saved
    assert not temp_files(out) and (out / ".lock").read_text() == str(proc.pid)  # a trace for --resume
    message, command = output.splitlines()[-1].split(". Resume with: ")
    assert message == f"unialign: stopped by SIGINT after step {step} of 12, saved in {out / 'ckpt.pt'}"
    words = shlex.split(command)
    assert words == [sys.executable, "train.py", *FLAGS, "--log-every", "1", "--out", str(out), "--resume"]

    copy = shutil.copytree(out, tmp_path / "run")  # the fixture's folder stays as the interruption left it
    train.main([str(copy) if w == str(out) else w for w in words[2:]])
    assert same_as_uninterrupted(copy, uninterrupted)


def test_a_signal_during_a_save_waits_for_the_save_to_end(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)

    class Stopped(Exception):
        pass

    def stop(signum, frame):
        raise Stopped

    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (signal.raise_signal(signal.SIGINT), fsync(fd)))  # Ctrl-C mid-save
    previous = signal.signal(signal.SIGINT, stop)
    try:
        with pytest.raises(Stopped):
            save_checkpoint({"step": 2}, path)
    finally:
        signal.signal(signal.SIGINT, previous)
        monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 2 and os.listdir(tmp_path) == ["ckpt.pt"]


# ----------------------------------------------------------------------------- a full disk, an unwritable folder

def test_a_save_that_hits_a_file_size_limit_keeps_the_previous_checkpoint_and_resume_continues(
        ctrl_c, uninterrupted, tmp_path):
    out = shutil.copytree(ctrl_c[0], tmp_path / "run")
    before = (out / "ckpt.pt").read_bytes()
    limit = len(before) // 4  # the lock and the log fit under it, a checkpoint does not (EFBIG: Python ignores SIGXFSZ)
    proc = forked(*FLAGS, "--ckpt-every", "1", "--out", str(out), "--resume",
                  before=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, output[-3000:]
    assert output.splitlines()[-1] == (f"error: {out}: cannot save ckpt.pt (File too large); "
                                       f"the previous ckpt.pt is intact, --resume continues from it")
    assert (out / "ckpt.pt").read_bytes() == before and not temp_files(out)
    train.main([*FLAGS, "--out", str(out), "--resume"])
    assert same_as_uninterrupted(out, uninterrupted)


def can_create_in(folder):
    try:
        (folder / "probe").touch()
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


@pytest.fixture
def read_only(tmp_path):
    """A folder holding a checkpoint, in which no file can be created: by its mode, or, for root (whom
    modes do not stop), by `chattr +i`."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    save_checkpoint({"step": 1}, folder / "ckpt.pt")
    folder.chmod(0o555)
    undo = lambda: folder.chmod(0o755)
    if can_create_in(folder):
        undo()
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", folder], capture_output=True).returncode:
            pytest.skip("no way to make a folder read-only here: modes do not stop root and chattr +i failed")
        undo = lambda: subprocess.run(["chattr", "-i", folder], check=True)
        assert not can_create_in(folder)
    yield folder
    undo()


def test_a_save_in_a_read_only_folder_fails_in_one_line_and_keeps_the_previous_checkpoint(read_only):
    with pytest.raises(CheckpointError) as failure:
        save_checkpoint({"step": 2}, read_only / "ckpt.pt")
    assert str(failure.value).startswith(f"{read_only}: cannot save ckpt.pt (")
    assert str(failure.value).endswith("); the previous ckpt.pt is intact, --resume continues from it")
    assert load_checkpoint(read_only / "ckpt.pt")["step"] == 1 and os.listdir(read_only) == ["ckpt.pt"]


def test_a_full_disk_under_the_log_stops_the_loop_in_one_line(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    from test_encoder import tiny_unialign
    (tmp_path / "log.jsonl").symlink_to("/dev/full")  # a device that is always full: writes fail with ENOSPC
    args = train.get_args(["--preset", "smoke", "--out", str(tmp_path)])
    samples = [{"modality": "imu", "input": torch.randn(6, 40), "text": "t", "label": 0, "anchor_image": None,
                "prior": None}] * 8

    def loss(net, batch):
        return net(batch["inputs"])[0]["imu"].square().mean(), {}

    with pytest.raises(CheckpointError, match=f"^{tmp_path}: cannot write log.jsonl \\(No space left on device\\)$"):
        loop.train_loop("unialign", tiny_unialign(), loss, [samples], 2, 4, 1e-3, args)


@pytest.mark.parametrize("kind", ["a file in its place", "read-only"])
def test_an_unwritable_out_is_refused_before_any_work(tmp_path, monkeypatch, request, kind):
    if kind == "read-only":
        out = request.getfixturevalue("read_only")
        expected = f"error: --out {out}: cannot write in this folder ("
    else:
        out = tmp_path / "out"
        out.write_text("a file where the run folder should be")
        expected = f"error: --out {out} is a file, not a folder; choose another --out"
    monkeypatch.setattr(train, "build_datasets", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(SystemExit) as refusal:
        train.main(["--preset", "smoke", "--out", str(out)])
    assert refusal.value.code.startswith(expected) and "\n" not in refusal.value.code


# ----------------------------------------------------------------------------- files this project did not write

class RunsCode:
    """Unpickled by anything that runs code from a pickle, it creates the file `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def with_our_header(state, path):
    """`state` as this project's files are written (a SHA-256 line, then torch.save) without save_checkpoint's checks."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.write_bytes(hashlib.sha256(buffer.getvalue()).hexdigest().encode() + b"\n" + buffer.getvalue())


FOREIGN = {
    "torch.save": (lambda p, ran: torch.save({"model": torch.nn.Linear(2, 2).state_dict(), "step": 3}, p),
                   "is a plain torch.save file, not"),
    "bare state dict": (lambda p, ran: torch.save(torch.nn.Linear(2, 2).state_dict(), p), "is a plain torch.save file, not"),
    "OpenAI TorchScript": (lambda p, ran: torch.jit.script(torch.nn.Linear(2, 2)).save(str(p)),
                           "is a TorchScript archive (as OpenAI distributes CLIP: pass it to train.py --clip), not"),
    "pickle that runs code": (lambda p, ran: p.write_bytes(pickle.dumps(RunsCode(ran))), "is a plain pickle, not"),
    "our header, code inside": (lambda p, ran: with_our_header({"model": RunsCode(ran)}, p),
                                "holds Python objects that only running code could rebuild, not"),
    "our header, bare state dict": (lambda p, ran: with_our_header(torch.nn.Linear(2, 2).state_dict(), p),
                                    "holds no config, model_args, model: it is not"),
}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script, to make a TorchScript archive
@pytest.mark.parametrize("kind", FOREIGN)
def test_a_foreign_file_as_eval_ckpt_is_refused_in_one_line_and_never_run(tmp_path, monkeypatch, kind):
    make, words = FOREIGN[kind]
    path, ran = tmp_path / "model.pt", tmp_path / "code_ran"
    make(path, ran)
    monkeypatch.setattr(sys, "argv", ["eval.py", "--ckpt", str(path)])
    with pytest.raises(SystemExit) as refusal:
        evaluation.main()
    assert refusal.value.code.startswith(f"error: {path} {words}") and "\n" not in refusal.value.code
    assert "RUN/ckpt.pt of a train.py run" in refusal.value.code
    assert not ran.exists()


def test_a_foreign_file_in_the_run_folder_is_refused_before_any_work(smoke, tmp_path, monkeypatch):
    out = with_finished_stages(smoke, tmp_path / "run")
    torch.save(load_checkpoint(smoke / "ckpt.pt"), out / "ckpt.pt")  # our state, not written by us
    monkeypatch.setattr(train, "build_datasets", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(SystemExit, match=f"^error: {out / 'ckpt.pt'} is a plain torch.save file, not the unialign "
                                         f"stage of a train.py run \\(a file this project wrote"):
        train.main([*FLAGS, "--out", str(out), "--resume"])


# ----------------------------------------------------------------------------- determinism

def same(a, b):
    """Equal to the bit: tensors, and the containers and plain values around them, but for the settings
    that change nothing a run computes (its folder, whether it evaluates, ...)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a if k not in RUN_ONLY)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def test_a_rerun_in_a_new_process_with_the_same_thread_count_is_bit_identical(smoke, tmp_path):
    """Same machine, same thread count, CPU: the whole recipe again in a fresh process (its own hash
    seed, its own allocator) gives every stage's weights, optimizer state and RNG state to the bit."""
    out = tmp_path / "rerun"
    proc = run("train.py", "--preset", "smoke", "--no-eval", "--out", str(out),
               env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output[-3000:]
    for name in STAGES + ["ckpt.pt"]:
        if name.endswith(".gz"):
            assert gzip.decompress((smoke / name).read_bytes()) == gzip.decompress((out / name).read_bytes())
        else:
            assert same(load_checkpoint(smoke / name), load_checkpoint(out / name)), name
