"""Named moments of a run (phase markers) and the fault-injection hook the reliability tests aim with.

Phases, in the order a stage meets them: `setup`, `data_prep` (before each builtin dataset is prepared),
`eval_before`, `step` (after every optimizer step),
`checkpoint_write` (a checkpoint's bytes are on disk, not yet swapped in), `train_done`, `final_checkpoint`,
`adapter`, `model_save`, `eval_after`, `summary`, `handoff` (the stage is complete, the next one not started).

Hook (tests and `python -m bench chaos` only; unset in normal runs, where a marker costs one dict lookup):
    VLMTRAIN_KILL_AT=<phase>[@<stage>][#<n>]   at the n-th time (default 1st) this process reaches <phase>
                                              (in stage <stage>, if given), it sends itself a signal:
    VLMTRAIN_KILL_SIGNAL=KILL | TERM | USR1     which one (default KILL)
    VLMTRAIN_KILL_RANK=<r>                      only in the process of that rank (torchrun's RANK)
    VLMTRAIN_PHASE_LOG=<file>                   append `<stage> <phase>` per marker (which phase a kill hit)
"""

from __future__ import annotations

import os
import signal

_current_stage: str | None = None
_seen: dict[tuple[str, str | None], int] = {}


def enter_stage(name: str | None) -> None:
    global _current_stage
    _current_stage = name


def mark(phase: str) -> None:
    """This process has reached `phase` of the current stage."""
    trace = os.environ.get("VLMTRAIN_PHASE_LOG")
    if trace:
        with open(trace, "a") as f:
            f.write(f"{_current_stage} {phase}\n")
    target = os.environ.get("VLMTRAIN_KILL_AT")
    if not target or os.environ.get("VLMTRAIN_KILL_RANK", os.environ.get("RANK")) != os.environ.get("RANK"):
        return
    key = (phase, _current_stage)
    _seen[key] = _seen.get(key, 0) + 1
    want, _, nth = target.partition("#")
    want_phase, _, want_stage = want.partition("@")
    if want_phase != phase or (want_stage and want_stage != _current_stage) or _seen[key] != int(nth or 1):
        return
    sig = getattr(signal, "SIG" + os.environ.get("VLMTRAIN_KILL_SIGNAL", "KILL").upper())
    os.kill(os.getpid(), sig)
