"""Child processes that die with their parent: a SIGKILLed run must not leave DataLoader workers (or torchrun
ranks) behind. An orphaned DataLoader worker does not notice on its own: its output pipe stays open (its sibling
workers inherited the read end), so it blocks on a full pipe forever, holding its memory.

Two layers, because either alone has a gap:
- Linux's parent-death signal (prctl PR_SET_PDEATHSIG): the kernel SIGKILLs this process when the thread that
  created it exits. Why by hand (ctypes): no maintained library exposes prctl without a compiled extension.
- a watchdog thread that polls the parent pid once a second (other platforms, and a parent that died before the
  prctl call took effect).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 1.0


def _set_pdeathsig() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)  # no cleanup to run: the parent that consumed our output is gone
        threading.Event().wait(POLL_SECONDS)


def die_with_parent(parent: int | None = None) -> None:
    """Make this process exit within about a second of its parent's death, by any signal.
    `parent`: the pid expected as parent (default: the current one)."""
    parent = os.getppid() if parent is None else parent
    _set_pdeathsig()
    if os.getppid() != parent:  # the parent died before the prctl call
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), name="vlmtrain-parent-watchdog", daemon=True).start()


def worker_init(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the worker dies with the training process, and ignores preemption signals.
    Why ignore them: SLURM (and a terminal) signal every process of a job, and a worker killed by SIGTERM makes the
    training loop fail before it can checkpoint at the step boundary; the worker ends with its loader instead (or
    with the process, through the parent-death signal)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent()
