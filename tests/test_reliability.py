"""Runs interrupted the way real runs are: a second run on a folder in use, a kill before the first
checkpoint, Ctrl-C and SIGTERM, a full disk or an unwritable folder, files this project did not
write, and reruns that come out bit for bit the same. Kills and signals are real, on this machine;
every wait polls for a file and is bounded."""

import os

import pytest

import train
from checkpoint import lock_run_folder


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
