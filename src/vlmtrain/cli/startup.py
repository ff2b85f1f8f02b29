"""Preemption during start-up: `vlmtrain run/fit` exits 75 on SIGTERM/SIGUSR1 from its first instructions on.

The training verbs route these signals to `train.preempt` (checkpoint at the next step boundary, exit 75), but that
handler lives in a module that imports Lightning, and the imports before it (torch, transformers, Lightning: many
seconds on a small machine) used to run under the default action: a SLURM preemption in that window ended the run
with -15 instead of the documented 75. This module imports only the standard library, so the entry point installs
its handler before any heavy import; `train.preempt.install()` replaces it once the verb starts.

The handler exits at once (`os._exit`), not by raising: during start-up nothing has trained, so there is nothing to
save, and an exception raised inside an import can be swallowed by a library's `except Exception` availability
check, which would let the run go on as if no signal came. Exiting at any later moment (the handler stays only
until the verb installs its own) is no worse than SIGKILL, which every phase of a run resumes from.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

PREEMPTED_EXIT = 75  # the same status as train.preempt.PREEMPTED_EXIT (kept equal by tests/test_reliability.py)
TRAINING_VERBS = ("run", "fit")


def _exit_preempted(signum, frame) -> None:
    name = signal.Signals(signum).name
    os.write(2, f"error: {name} received during start-up (nothing trained yet); run the same command again, with "
                "--resume if its output directory already exists\n".encode())
    os._exit(PREEMPTED_EXIT)


def verb(argv: list[str]) -> str | None:
    """The verb of a `vlmtrain` command line (the first argument that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def is_vlmtrain_program(argv0: str) -> bool:
    """This process is the `vlmtrain` command (console script, `python -m vlmtrain`, `torchrun -m vlmtrain`),
    not another program importing the CLI (a test runner keeps its own signal handling)."""
    path = Path(argv0)
    return path.name == "vlmtrain" or (path.name == "__main__.py" and path.parent.name == "vlmtrain")


def install_early(argv: list[str] | None = None) -> bool:
    """Exit 75 on SIGTERM/SIGUSR1 from now on, for the training verbs of the `vlmtrain` program (`argv`: its
    command line, default sys.argv); True if installed."""
    argv = sys.argv if argv is None else argv
    if not argv or not is_vlmtrain_program(argv[0]) or verb(argv[1:]) not in TRAINING_VERBS:
        return False
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _exit_preempted)
    return True


def ignore_once_complete(argv: list[str] | None = None) -> bool:
    """After a training verb of the `vlmtrain` program returned 0: ignore SIGTERM/SIGUSR1 from now on; True if set.
    The run is complete (every summary.json written), so a preemption signal during the interpreter's teardown has
    nothing to save, and exiting -15 would tell a scheduler the run was cut off. An ignored signal, unlike a Python
    handler, stays ignored while Python finalises (it resets only its own handlers to the default action). Seen in
    the chaos run of 2026-12-07: 2 of 10 SIGTERMs landed after the last stage's `handoff` and ended with -15."""
    argv = sys.argv if argv is None else argv
    if not argv or not is_vlmtrain_program(argv[0]) or verb(argv[1:]) not in TRAINING_VERBS:
        return False
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    return True
