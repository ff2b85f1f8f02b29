"""Run-directory bookkeeping during training: metrics.jsonl, a progress line with samples/s and ETA, plots."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning.pytorch as pl

from vlmtrain.train import phases
from vlmtrain.train.finalize import read_metrics, write_metrics

log = logging.getLogger("vlmtrain.train")


def _fmt_eta(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop lines logged after the checkpoint's step (they will be logged again)."""
    if path.is_file():  # read_metrics drops a line a kill cut short
        write_metrics(path, [r for r in read_metrics(path) if r.get("step", 0) <= after_step])


class Recorder(pl.Callback):
    """Appends one JSON line per logged step and prints `step k/N | loss | lr | samples/s | tok/s | ETA`."""

    def __init__(self, run_dir: Path, max_steps: int, every: int, evaluator=None, eval_every: int | None = None,
                 log_sample_ids: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.ids_path = Path(run_dir) / "sample_ids.jsonl" if log_sample_ids else None
        self.max_steps, self.every = max_steps, every
        self.evaluator, self.eval_every = evaluator, eval_every
        self.window = {"samples": 0, "tokens": 0, "supervised": 0.0, "loss": 0.0, "n": 0}
        self.totals = {"samples": 0, "tokens": 0, "supervised": 0, "train_seconds": 0.0}
        self.last_loss: float | None = None
        self.last_eval: dict | None = None

    def state_dict(self) -> dict:
        """Saved in every checkpoint: a resumed (or only re-finalised) stage reports totals over all its steps."""
        return {"totals": dict(self.totals), "window": dict(self.window), "last_loss": self.last_loss}

    def load_state_dict(self, state: dict) -> None:
        self.totals = dict(state["totals"])
        self.window = dict(state["window"])
        self.last_loss = state["last_loss"]

    def on_train_start(self, trainer, pl_module) -> None:
        self.is_zero = trainer.is_global_zero
        if self.is_zero:
            truncate_metrics(self.path, trainer.global_step)
            if self.ids_path is not None:
                truncate_metrics(self.ids_path, trainer.global_step)
        self.t_last = self.t_start = time.time()
        self.start_step = trainer.global_step

    def _write(self, row: dict) -> None:
        if not self.is_zero:
            return
        row = {k: None if isinstance(v, float) and v != v else v for k, v in row.items()}  # NaN is not JSON
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        st = pl_module.last_stats
        w = self.window
        w["samples"] += st["samples"]
        self.totals["supervised"] += int(st.get("supervised_tokens", 0))
        w["tokens"] += st["tokens"]
        if st["loss"] == st["loss"]:  # an empty DP-SGD (Poisson) batch has no loss (NaN): not averaged in
            w["loss"] += st["loss"]
            w["n"] += 1
        step = trainer.global_step
        if self.ids_path is not None:  # audit trail: which records each optimizer step trained on (per rank)
            path = self.ids_path if trainer.world_size == 1 else self.ids_path.with_suffix(
                f".rank{trainer.global_rank}.jsonl")
            with path.open("a") as f:
                f.write(json.dumps({"step": step, "ids": st["ids"]}) + "\n")
        if step % self.every == 0 or step >= self.max_steps:
            now = time.time()
            dt = max(now - self.t_last, 1e-9)
            loss = w["loss"] / w["n"] if w["n"] else float("nan")
            row = {"step": step, "loss": loss, "lr": st["lr"], "grad_norm": st["grad_norm"],
                   "samples_per_s": w["samples"] / dt, "tokens_per_s": w["tokens"] / dt, "seconds": dt}
            row.update({k: v for k, v in st.items() if k.startswith(("rewards/", "privacy/", "moe/", "rl/"))})
            self.totals["samples"] += w["samples"]
            self.totals["tokens"] += w["tokens"]
            self.totals["train_seconds"] += dt
            self.last_loss = row["loss"]
            rate = (step - self.start_step) / max(now - self.t_start, 1e-9)
            eta = (self.max_steps - step) / max(rate, 1e-9)
            extra = "".join(f" | {k.split('/')[1]} {v:.3f}" for k, v in row.items()
                            if k.startswith("rewards/") and not k.endswith("/std"))
            if "privacy/epsilon" in row:
                extra += f" | ε {row['privacy/epsilon']:.3f}"
            if self.is_zero:
                log.info(f"step {step}/{self.max_steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
                         f"{row['samples_per_s']:.1f} samples/s | {row['tokens_per_s']:.0f} tok/s{extra} | "
                         f"ETA {_fmt_eta(eta)}")
            if trainer.logger is not None:
                # scalars only: per-expert token counts (a list) go to metrics.jsonl, not to the logger
                trainer.logger.log_metrics({f"train/{k}": v for k, v in row.items()
                                            if k != "step" and not isinstance(v, list)}, step=step)
            self._write(row)
            self.window = {"samples": 0, "tokens": 0, "supervised": 0.0, "loss": 0.0, "n": 0}
            self.t_last = time.time()
        if self.evaluator is not None and self.eval_every and step % self.eval_every == 0 and step < self.max_steps:
            res = self.evaluator()  # every rank runs it: an FSDP-sharded model needs all ranks in each forward
            self.last_eval = res
            if self.is_zero:
                log.info(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
            self._write({"step": step, **{f"eval/{k}": v for k, v in res.items()}})
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"eval/{k}": v for k, v in res.items()}, step=step)
            self.t_last = time.time()  # eval time is not training time
        phases.mark("step")


def plot_metrics(run_dir: Path) -> list[str]:
    """loss.png (and eval.png when eval rows exist) from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    made = []
    train = [r for r in rows if r.get("loss") is not None]
    if train:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train])
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{Path(run_dir).name}: training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(Path(run_dir) / "loss.png", dpi=100)
        plt.close(fig)
        made.append("loss.png")
    ev = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if ev:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in sorted({k for r in ev for k in r if k.startswith("eval/") and not k.endswith("samples")}):
            pts = [(r["step"], r[key]) for r in ev if key in r]
            ax.plot(*zip(*pts), marker="o", label=key.split("/", 1)[1])
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
        ax.set_title(f"{Path(run_dir).name}: eval")
        fig.tight_layout()
        fig.savefig(Path(run_dir) / "eval.png", dpi=100)
        plt.close(fig)
        made.append("eval.png")
    return made
