"""The on-disk cache: work that depends only on its settings and its code, done once per machine
(docs/method.md section 5). It holds the synthetic world's datasets, the world's anchor CLIP and
its prior model.

An entry is a checkpoint file (checkpoint.py: checksummed, written whole or not at all) named by
its key, the SHA-256 of everything its content depends on: the settings, the source of the code
that makes it, and the thread count (reductions round differently on another count). The file
also holds the key material it was made from, and is used only when that matches; a damaged,
truncated or stale file is rebuilt with a message, never trusted. Two processes that need the
same entry take turns on its lock file: the first builds, the second waits and then reads it.
"""

import fcntl
import hashlib
import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import CheckpointError, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent


def default_folder():
    """$UNIALIGN_CACHE, else ~/.cache/unialign."""
    return os.environ.get("UNIALIGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unialign")


def source_digest(files):
    """SHA-256 of these source files of the repository (names and bytes, in sorted order)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return digest.hexdigest()


def key_material(kind, settings, files):
    return {"kind": kind, "settings": settings, "code": source_digest(files), "threads": torch.get_num_threads()}


def cached(folder, kind, settings, files, build, describe):
    """build()'s content, read from the cache entry of (kind, settings, files) when it is whole and
    current, else built and saved there. `folder` None: built, nothing read or written.

    `describe` names the content in messages. Returns (content, "built" or "reused").
    """
    if folder is None:
        return build(), "built"
    material = key_material(kind, settings, files)
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{kind}-{key[:24]}.pt")
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process needing this entry waits here, then reads it
        remove_dead_temp_files(path)
        if os.path.exists(path):
            try:
                entry = load_checkpoint(path)
                if entry.get("material") == material:
                    return entry["content"], "reused"
                tqdm.write(f"cache: {path} is stale (made from other settings or code); rebuilding {describe}")
            except CheckpointError as error:
                tqdm.write(f"cache: {error.args[0].split(';')[0]}; rebuilding {describe}")
        content = build()
        save_checkpoint({"material": material, "content": content}, path)
        return content, "built"


def remove_dead_temp_files(path):
    """Temporary files of `path` that a killed process left (its pid no longer runs)."""
    folder, name = os.path.split(path)
    for other in os.listdir(folder):
        pid = other[len(name) + 4:] if other.startswith(name + ".tmp") else ""
        if pid.isdigit() and not pid_alive(int(pid)):
            os.remove(os.path.join(folder, other))


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

