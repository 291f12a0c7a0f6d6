"""Tests for checkpoint.py and train.py's use of it: a damaged checkpoint is refused in one line, a
kill during a save leaves the old file whole, a run killed again and again resumes to the very
state of an uninterrupted one, one folder takes one run, and non-finite losses stop cleanly."""

import os
import signal
import time

import pytest
import torch

import loop
import train
from checkpoint import CheckpointError, load_checkpoint, lock_run_folder, remove_temp_files, save_checkpoint
from test_train import FLAGS, forked, trainable_state, with_finished_stages


@pytest.mark.parametrize("damage", ["empty", "truncated", "flipped"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"weights": torch.arange(1000.0)}, path)
    blob = path.read_bytes()
    blob = {"empty": b"", "truncated": blob[:len(blob) // 2],
            "flipped": blob[:-100] + bytes([blob[-100] ^ 1]) + blob[-99:]}[damage]
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match=f"{path}: checkpoint is damaged"):
        load_checkpoint(path)


def saver(path):
    """A forked process saving checkpoints of 8 MB to `path` in a loop; returns (pid, a file of the
    steps it has saved, one line each)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: save forever, until killed
        os.close(read)
        step = 0
        while True:
            step += 1
            save_checkpoint({"step": step, "weights": torch.full((2_000_000,), float(step))}, str(path))
            os.write(write, f"{step}\n".encode())
    os.close(write)
    return pid, os.fdopen(read)


def test_a_kill_during_a_save_leaves_the_old_checkpoint_whole(tmp_path):
    path = tmp_path / "ckpt.pt"
    for delay in (0.05, 0.13, 0.31):
        pid, saved = saver(path)
        saved.readline()  # one save is complete
        time.sleep(delay)  # then kill it somewhere, most likely in the middle of a later save
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        saved.close()
        state = load_checkpoint(path)
        assert torch.equal(state["weights"], torch.full((2_000_000,), float(state["step"])))
        stale = remove_temp_files(tmp_path)
        assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"] and all(".tmp" in name for name in stale)


def saved_step(path):
    """The step of the checkpoint at `path`, 0 while there is none."""
    return load_checkpoint(path)["step"] if path.exists() else 0


def test_a_run_killed_again_and_again_resumes_to_the_uninterrupted_state(smoke, uninterrupted, tmp_path):
    flags = [*FLAGS, "--ckpt-every", "1"]
    killed = with_finished_stages(smoke, tmp_path / "killed")
    # Kill points follow the run's own progress, not the clock, so a fast machine cannot finish all 12
    # steps first: each run is killed once it has saved a step past the last one, after a short delay
    # that lands the kill in a step or in a save.
    for target, delay in ((1, 0.0), (3, 0.01), (5, 0.03)):
        resume = ["--resume"] if (killed / "ckpt.pt").exists() else []
        proc = forked(*flags, "--out", str(killed), *resume)
        deadline = time.time() + 120
        while saved_step(killed / "ckpt.pt") < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 5 <= saved_step(killed / "ckpt.pt") < 12, "the runs did not progress, or finished before they were killed"
    train.main([*flags, "--out", str(killed), "--resume"])
    a, b = trainable_state(uninterrupted), trainable_state(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [name for name in os.listdir(killed) if ".tmp" in name]


def test_one_run_per_folder(tmp_path):
    held = lock_run_folder(str(tmp_path))
    with pytest.raises(CheckpointError, match=f"{tmp_path} is in use by another run \\(pid {os.getpid()}\\)"):
        lock_run_folder(str(tmp_path))
    held.close()  # as a killed run's lock: released, its pid left behind
    lock_run_folder(str(tmp_path))


def test_many_non_finite_losses_stop_in_one_line_with_the_last_good_state_saved(tmp_path):
    from test_encoder import tiny_unialign
    model = tiny_unialign()
    before = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    args = train.get_args(["--preset", "smoke", "--out", str(tmp_path), "--max-bad-steps", "3"])
    samples = [{"modality": "imu", "input": torch.randn(6, 40), "text": "t", "label": 0, "anchor_image": None,
                "prior": None}] * 8

    def nan_loss(net, batch):
        z, _ = net(batch["inputs"])
        return z["imu"].sum() * float("nan"), {}

    with pytest.raises(SystemExit, match="3 non-finite losses in a row at step 2, stopping; the last good state is saved"):
        loop.train_loop("unialign", model, nan_loss, [samples], 10, 4, 1e-3, args, ckpt_path=str(tmp_path / "ckpt.pt"))
    saved = load_checkpoint(tmp_path / "ckpt.pt")["model"]
    assert all(torch.equal(saved[k], before[k]) for k in before)  # no bad step touched the weights


@pytest.mark.parametrize("flag, value", [("--weight-decay", "0.5"), ("--alpha-sampling", "1.0"), ("--frames", "2"),
                                         ("--lambda-prior", "0")])
def test_a_changed_setting_on_resume_is_refused_by_name_before_any_work(smoke, tmp_path, monkeypatch, flag, value):
    out = with_finished_stages(smoke, tmp_path / "run")
    save_checkpoint({**load_checkpoint(smoke / "ckpt.pt"), "step": 3}, out / "ckpt.pt")  # an unfinished UniAlign
    monkeypatch.setattr(train, "build_datasets", lambda *a, **k: pytest.fail("work started before the refusal"))
    with pytest.raises(SystemExit, match=f"{flag}: saved .*, now {value}"):
        train.main(["--preset", "smoke", "--out", str(out), "--resume", flag, value])


def test_resume_without_a_checkpoint_or_a_trace_of_a_run_is_refused(smoke, tmp_path):
    stages = with_finished_stages(smoke, tmp_path / "stages")  # stage files, but no run was here
    for out in (tmp_path, stages, stages):  # the second time: a refused run leaves no trace either
        with pytest.raises(SystemExit, match="--resume: .*ckpt.pt does not exist, there is nothing to resume"):
            train.main(["--preset", "smoke", "--out", str(out), "--resume"])
    with pytest.raises(SystemExit, match=f"--resume: {tmp_path / 'typo'} does not exist, there is nothing to resume"):
        train.main(["--preset", "smoke", "--out", str(tmp_path / "typo"), "--resume"])
    assert not (tmp_path / "typo").exists()
