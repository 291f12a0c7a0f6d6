"""Checkpoint files: whole or refused, never half-written or silently corrupt; one run per folder.

A checkpoint is the SHA-256 of its payload on the first line, then the payload (`torch.save`).
`save_checkpoint` writes a temporary file, flushes and fsyncs it, renames it over the old one and
fsyncs the folder, so a kill at any moment leaves either the old file or the new one; SIGINT and
SIGTERM wait until the save is done, and a save that fails (a full disk, a file size limit, a
read-only folder) removes its temporary file and leaves the old one as it was.
`load_checkpoint` refuses a truncated, empty or altered file, and a file this project did not
write, in one line that names it; it never runs code from a file (`weights_only`).
`lock_run_folder` keeps a second run out of a folder in use.
"""

import contextlib
import fcntl
import hashlib
import io
import os
import pickle
import signal
import threading
import zipfile

import torch

TEMP = ".tmp"  # a temporary file is "<path>.tmp<pid>"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, or a run folder that cannot be written; the message names it."""


@contextlib.contextmanager
def signals_deferred(signums=(signal.SIGINT, signal.SIGTERM)):
    """SIGINT and SIGTERM arriving inside are delivered when it ends, to the handlers in place before:
    a second Ctrl-C never cuts a save in half. (Python runs handlers in the main thread only.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {}
    for signum in signums:
        if signal.getsignal(signum) is not None:  # None: a handler not set from Python, left alone
            previous[signum] = signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


def save_checkpoint(state, path):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    tmp = f"{path}{TEMP}{os.getpid()}"
    replaced = False
    with signals_deferred():
        try:
            with open(tmp, "wb") as f:
                f.write(hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            replaced = True
            folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            folder, name = os.path.split(os.path.abspath(path))
            kept = ("it is saved, but the folder could not be synced" if replaced else
                    f"the previous {name} is intact, --resume continues from it" if os.path.exists(path) else
                    "nothing was saved")
            raise CheckpointError(f"{folder}: cannot save {name} ({error.strerror or error}); {kept}") from None


def load_checkpoint(path, keys=(), expected="a checkpoint of train.py"):
    """The state `save_checkpoint` wrote to `path`; `keys` are entries it must hold, `expected` says
    in a refusal what `path` should have been."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    with open(path, "rb") as f:
        blob = f.read()
    digest, _, payload = blob.partition(b"\n")
    if not ours(digest, payload):
        raise CheckpointError(f"{path} is {foreign_kind(blob)}, not {expected} (a file this project wrote: a "
                              f"SHA-256 line, then a torch.save payload)")
    if len(digest) != 64 or hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"{path}: checkpoint is damaged (empty, truncated or altered: its checksum does "
                              f"not match); delete it to redo that stage")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only: objects other than tensors and plain data are refused, not built
        raise CheckpointError(f"{path} holds Python objects that only running code could rebuild, not "
                              f"{expected}; it was not loaded") from None
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} holds no {', '.join(missing)}: it is not {expected}")
    return state


def ours(first_line, rest):
    """Whether a file starts as this project's checkpoints do: a line of 64 characters (the digest), or
    a file cut off inside that line."""
    return len(first_line) == 64 or (not rest and all(c in b"0123456789abcdef" for c in first_line))


def foreign_kind(blob):
    """What a file that is not one of this project's checkpoints looks like, in a few words."""
    if blob.startswith(b"PK\x03\x04"):
        try:
            names = zipfile.ZipFile(io.BytesIO(blob)).namelist()
        except zipfile.BadZipFile:
            names = []
        if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
            return "a TorchScript archive (as OpenAI distributes CLIP: pass it to train.py --clip)"
        return "a plain torch.save file"
    if blob.startswith(b"\x80"):
        return "a plain pickle"
    return "not a checkpoint"


def check_writable(folder):
    """Create `folder` if need be and make sure a file can be created in it, before any work."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CheckpointError(f"--out {folder} is a file, not a folder; choose another --out")
    probe = os.path.join(folder, f".probe{TEMP}{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"probe")
        os.remove(probe)
    except OSError as error:
        raise CheckpointError(f"--out {folder}: cannot write in this folder ({error.strerror or error}); "
                              f"choose another --out") from None


def temp_files(folder):
    """The temporary files killed saves left in `folder`."""
    return sorted(name for name in os.listdir(folder) if TEMP in name and name.split(TEMP)[-1].isdigit())


def remove_temp_files(folder):
    """Delete the temporary files a killed save left in `folder`; returns their names."""
    stale = temp_files(folder)
    for name in stale:
        os.remove(os.path.join(folder, name))
    return stale


def lock_run_folder(out):
    """One run per folder: an exclusive lock on OUT/.lock, held until this process exits (a dead
    process's lock is released by the kernel; the pid inside says who holds a live one). The handle's
    `previous_pid` is the pid a killed run left in it, else None."""
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
    handle.previous_pid = previous or None
    if previous and previous != str(os.getpid()):
        print(f"{out}: taking over the lock of pid {previous}, which is no longer running")
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def unlock_run_folder(handle, keep_pid=False):
    """A finished run empties the lock file: only a killed or interrupted run (keep_pid) leaves its pid
    behind, which --resume takes as the trace of a run to continue."""
    if not keep_pid:
        handle.truncate(0)
    handle.close()
