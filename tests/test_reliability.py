"""Runs interrupted the way real runs are: a second run on a folder in use, a kill before the first
checkpoint, Ctrl-C and SIGTERM, a full disk or an unwritable folder, files this project did not
write, and reruns that come out bit for bit the same. Kills and signals are real, on this machine;
every wait polls for a file and is bounded."""

import hashlib
import io
import os
import pickle
import sys

import pytest
import torch

import eval as evaluation
import train
from checkpoint import load_checkpoint, lock_run_folder
from test_train import FLAGS, with_finished_stages


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
