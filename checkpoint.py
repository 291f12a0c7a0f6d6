"""Checkpoint files: whole or refused, never half-written or silently corrupt; one run per folder.

A checkpoint is the SHA-256 of its payload on the first line, then the payload (`torch.save`).
`save_checkpoint` writes a temporary file, flushes and fsyncs it, renames it over the old one and
fsyncs the folder, so a kill at any moment leaves either the old file or the new one.
`load_checkpoint` refuses a truncated, empty or altered file in one line that names it.
`lock_run_folder` keeps a second run out of a folder in use.
"""

import fcntl
import hashlib
import io
import os

import torch

TEMP = ".tmp"  # a temporary file is "<path>.tmp<pid>"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file."""


def save_checkpoint(state, path):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    tmp = f"{path}{TEMP}{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_checkpoint(path):
    """The state `save_checkpoint` wrote to `path`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    with open(path, "rb") as f:
        digest, _, payload = f.read().partition(b"\n")
    if len(digest) != 64 or hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"{path}: checkpoint is damaged (empty, truncated or altered: its checksum does "
                              f"not match); delete it to redo that stage")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def remove_temp_files(folder):
    """Delete the temporary files a killed save left in `folder`; returns their names."""
    stale = [name for name in os.listdir(folder) if TEMP in name and name.split(TEMP)[-1].isdigit()]
    for name in stale:
        os.remove(os.path.join(folder, name))
    return stale


def lock_run_folder(out):
    """One run per folder: an exclusive lock on OUT/.lock, held until this process exits (a dead
    process's lock is released by the kernel; the pid inside says who holds a live one)."""
    handle = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise CheckpointError(f"{out} is in use by another run (pid {owner}); "
                              f"wait for it or choose another --out") from None
    handle.seek(0)
    previous = handle.read().strip()
    if previous and previous != str(os.getpid()):
        print(f"{out}: taking over the lock of pid {previous}, which is no longer running")
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def unlock_run_folder(handle):
    """A clean exit empties the lock file: only a killed run leaves its pid behind."""
    handle.truncate(0)
    handle.close()
