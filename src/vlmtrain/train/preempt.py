"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends before it reclaims a node, `--signal=USR1@120`) makes a run
write a checkpoint at the next optimizer-step boundary and exit with status PREEMPTED_EXIT (75, sysexits'
EX_TEMPFAIL: "try again later"); `--resume` continues from that checkpoint bit-identically.

Outside the training loop (setup, evaluation, model save, summary) the signal stops the run at once: every phase
there is resumable after a kill, so there is nothing to save first. With several ranks, every rank learns of a
signal that reached any one of them at the same step boundary (a max all-reduce of a flag), so they all save the
same step and stop together.
"""

from __future__ import annotations

import signal
import threading

import lightning.pytorch as pl

from vlmtrain.errors import VlmtrainError

PREEMPTED_EXIT = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(VlmtrainError):
    """The run stopped on a preemption signal; its state on disk resumes with `--resume`."""

    exit_code = PREEMPTED_EXIT


_state = {"signal": None, "deferred": False, "installed": False}


def _handler(signum, frame) -> None:
    _state["signal"] = signal.Signals(signum).name
    if not _state["deferred"]:
        raise Preempted(f"{_state['signal']} received: stopped; continue with --resume")


def install() -> None:
    """Route SIGTERM/SIGUSR1 to the preemption handler (main thread only: Python's rule for signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _handler)
        _state["installed"] = True


def requested() -> str | None:
    return _state["signal"]


class defer_to_step_boundary:
    """Inside: a signal only sets the flag (`PreemptionCheckpoint` acts on it between steps). On leaving normally,
    a flag that no step boundary consumed (e.g. training had already finished) stops the run there."""

    def __enter__(self):
        _state["deferred"] = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _state["deferred"] = False
        if exc_type is None and _state["signal"]:
            raise Preempted(f"{_state['signal']} received: stopped; continue with --resume")


def _any_rank(flag: bool, device) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class PreemptionCheckpoint(pl.Callback):
    """After each optimizer step: if any rank was signalled, all ranks write the checkpoint and stop."""

    def __init__(self, ckpt_path):
        self.ckpt_path = ckpt_path

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning wraps SIGTERM in its own handler when training starts; its handler broadcasts from inside the
        # signal handler (a collective that can cross another one in flight). Ours only sets a flag: put it back.
        if _state["installed"]:
            install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not _any_rank(_state["signal"] is not None, pl_module.device):
            return
        trainer.save_checkpoint(self.ckpt_path)
        name = _state["signal"] or "a preemption signal on another rank"
        _state["deferred"] = False
        raise Preempted(f"{name} received: checkpoint written at step {trainer.global_step} "
                        f"({self.ckpt_path}); continue with --resume")
