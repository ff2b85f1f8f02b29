"""The grpo stage: `StageRun`'s phases with GRPO's data, module and summary plugged into its objective-specific
methods (no phase copied):

- `training_data`: the stage's encoder wrapped as a prompt encoder (`data.prompts.PromptEncoder`: prompts with
  their reward columns, `over_length` rejected with room for `max_completion_length`), the loader's windows without
  those where a rank got no prompt (`SkipEmptyWindows`), each repeated `num_iterations` times (`RepeatWindows`);
- `build_module`: `GRPOModule` (`NativeGRPOModule` for a native family), writing completions.jsonl into the run
  directory;
- `objective_summary`: the `rl` block of summary.json, from the steps metrics.jsonl holds;
- `plots`: completions.png beside loss.png and eval.png (the logged completions' rewards by step).
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmtrain.data.prompts import PromptEncoder
from vlmtrain.train.finalize import read_metrics
from vlmtrain.train.stage import StageRun

# summary.json's rl block: (key, metrics.jsonl column), each the mean over the logged steps
_RL_MEANS = (("reward_mean", "rl/reward"), ("reward_std", "rl/reward_std"), ("kl", "rl/kl"),
             ("entropy", "rl/entropy"), ("completion_len_mean", "rl/completion_len_mean"),
             ("completion_clipped_fraction", "rl/completion_clipped_fraction"),
             ("zero_spread_fraction", "rl/zero_spread_fraction"), ("clip_ratio_region", "rl/clip_ratio/region_mean"))


def rl_summary(metrics_path: Path) -> dict:
    """The stage's RL figures from metrics.jsonl: means over the logged steps (None for a metric never logged,
    e.g. `kl` with beta 0), the reward of the first and last logged steps' quarter (the learning curve's ends),
    each reward function's mean, and the share of time spent generating."""
    rows = [r for r in read_metrics(metrics_path) if r.get("rl/reward") is not None]
    mean = lambda key, rs=rows: (sum(r[key] for r in rs if r.get(key) is not None)  # noqa: E731
                                 / max(1, sum(r.get(key) is not None for r in rs))
                                 if any(r.get(key) is not None for r in rs) else None)
    out = {name: mean(col) for name, col in _RL_MEANS}
    q = max(1, len(rows) // 4)
    out["reward_first_quarter"] = mean("rl/reward", rows[:q]) if rows else None
    out["reward_last_quarter"] = mean("rl/reward", rows[-q:]) if rows else None
    gen = sum(r.get("rl/generate_seconds") or 0.0 for r in rows)
    train = sum(r.get("rl/train_seconds") or 0.0 for r in rows)
    out["generate_time_share"] = gen / (gen + train) if gen + train > 0 else None
    funcs = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    out["rewards"] = {f: mean(f"rewards/{f}/mean") for f in funcs}
    out["steps_logged"] = len(rows)
    return out


def plot_completions(run_dir: Path) -> list[str]:
    """completions.png from completions.jsonl: every logged completion's weighted reward at its step (points,
    spread sideways so a group's equal rewards stay visible) and the mean per logged step (line). [] without rows."""
    path = Path(run_dir) / "completions.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    rows = [r for r in rows if r.get("reward") is not None]
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["step"] for r in rows})
    width = 0.3 * min((b - a for a, b in zip(steps, steps[1:])), default=1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [r["step"] + width * (((i * 0.618) % 1.0) - 0.5) for i, r in enumerate(rows)]
    ax.scatter(xs, [r["reward"] for r in rows], s=8, alpha=0.35, label="a completion")
    means = [sum(r["reward"] for r in rows if r["step"] == s) / sum(r["step"] == s for r in rows) for s in steps]
    ax.plot(steps, means, marker="o", color="C1", label="mean of the step")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(f"{Path(run_dir).name}: sampled completions")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(run_dir) / "completions.png", dpi=100)
    plt.close(fig)
    return ["completions.png"]


class GRPOStageRun(StageRun):
    """A stage with the grpo objective (module docstring)."""

    def training_data(self) -> tuple:
        from vlmtrain.train.grpo.module import RepeatWindows, SkipEmptyWindows

        g = self.stage.grpo
        self.encoder = PromptEncoder(self.encoder, g.max_completion_length)
        loader, windows = super().training_data()
        windows = SkipEmptyWindows(windows)
        return loader, (RepeatWindows(windows, g.num_iterations) if g.num_iterations > 1 else windows)

    def build_module(self):
        if self.bundle.native:  # the family's own generate, shared-prefix rows
            from vlmtrain.train.grpo.native import NativeGRPOModule as GRPOModule
        else:
            from vlmtrain.train.grpo.module import GRPOModule
        module = GRPOModule(self.bundle, self.stage, self.loader, self.run_dir / "completions.jsonl")
        from vlmtrain.train.grpo.module import RepeatWindows

        if isinstance(self.train_data, RepeatWindows):  # a resumed rollout's remaining iterations go first
            module.windows = self.train_data
        return module

    def objective_summary(self, summary: dict, fig: dict) -> None:
        summary["rl"] = rl_summary(self.run_dir / "metrics.jsonl")

    def plots(self) -> list[str]:
        return super().plots() + plot_completions(self.run_dir)
