"""One live run per output directory: `vlmtrain run/fit` holds an exclusive lock on OUT/.vlmtrain.lock.

The lock is the kernel's (flock): it is released the moment its holder dies, by any signal, so a lock left behind
by a crash is never stale: the next run simply takes it. The file also records the holder (pid, host, command) so
the refusal can name it. Why by hand: `filelock` truncates the file on every attempt, erasing the holder's name.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from vlmtrain.errors import VlmtrainError

LOCK_NAME = ".vlmtrain.lock"
_held: dict[str, int] = {}  # resolved directory → fd, for the life of this process


def lock_run_dir(out: str | Path) -> Path:
    """Take OUT's lock for the life of this process (idempotent within a process); refuse if a live run holds it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    key = str(path.resolve())
    if key in _held:
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(path)
        os.close(fd)
        raise VlmtrainError(f"{out} is in use by another run ({holder}); wait for it to finish, stop it, or choose "
                            "another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                             "command": " ".join(sys.argv)}).encode())
    _held[key] = fd
    return path


def _describe(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']}: {h['command']}"
    except (OSError, ValueError, KeyError):
        return f"lock {path}"


def release_run_dir(out: str | Path) -> None:
    """Give up OUT's lock, if this process holds it (the file stays: removing it would race a waiting run)."""
    fd = _held.pop(str((Path(out) / LOCK_NAME).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


class holding_lock:
    """`with holding_lock(out):` releases OUT's lock on the way out if this process took it inside."""

    def __init__(self, out: str | Path):
        self.path = str((Path(out) / LOCK_NAME).resolve())
        self.out = out

    def __enter__(self):
        self.had = self.path in _held
        return self

    def __exit__(self, *exc) -> None:
        if not self.had:
            release_run_dir(self.out)
