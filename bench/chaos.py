"""`python -m bench chaos`: kill a multi-stage recipe at seeded random moments (by wall time and at phase markers),
with SIGKILL and with SIGTERM, resume after every kill, and check that nothing is lost: every stage's final
weights bit-identical to an uninterrupted run, every summary.json complete and equal in its deterministic fields,
no process of a killed run left alive. Results: bench/results/chaos.json; write-up: docs/reliability.md.

One episode = a fresh run directory, killed `kills_per_episode` times (each kill followed by a `--resume` launch
that is itself the next one to be killed), then resumed to the end. Phase kills use vlmtrain's hook
(VLMTRAIN_KILL_AT, train/phases.py); wall-time kills are sent from here, SIGTERM to the whole process group (as
SLURM does). Which phase a wall-time kill hit is read from the phase log (VLMTRAIN_PHASE_LOG).
"""

from __future__ import annotations

import contextlib

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import yaml

from bench.common import ROOT, machine, save

PHASES = ["setup", "data_prep", "eval_before", "step", "checkpoint_write", "train_done", "final_checkpoint",
          "adapter", "model_save", "eval_after", "summary", "handoff"]
DETERMINISTIC = ("status", "steps", "final_loss", "samples", "tokens", "skipped", "eval", "eval_before",
                 "supervised_fraction")
REQUIRED = ("final_loss", "steps", "samples_per_s", "tokens_per_s", "skipped")

# the demo recipe, shorter: same stages, builtins and eval; the sft stage trains LoRA (so `adapter` is a phase);
# then a grpo stage
RECIPE = {
    "name": "chaos", "model": str(ROOT / "configs" / "models" / "tiny-clip-llama.yaml"),
    "defaults": {"data": {"batch_size": 8, "num_workers": 2, "max_len": 128},
                 "eval": {"data": {"builtin": "digits-eval"}, "max_samples": 16, "max_new_tokens": 2,
                          "batch_size": 16},
                 "trainer": {"log_every_n_steps": 1, "save_every_n_steps": 2}},
    "stages": [
        {"name": "align", "preset": "align", "data": {"train": [{"builtin": "digits-captions"}]},
         "optim": {"lr": 3.0e-3}, "trainer": {"max_steps": 6}},
        {"name": "sft", "preset": "sft", "data": {"train": [{"builtin": "digits-qa"}]},
         "train": {"llm": "lora"}, "lora": {"r": 4, "alpha": 8},
         "optim": {"lr": 2.0e-3, "warmup_ratio": 0.1}, "trainer": {"max_steps": 6}},
        {"name": "dpo", "preset": "dpo", "data": {"train": [{"builtin": "digits-pref"}]},
         "optim": {"lr": 5.0e-5}, "dpo": {"beta": 0.1}, "trainer": {"max_steps": 4}},
        # two iterations per rollout and a checkpoint every step: half the checkpoints hold a rollout in flight
        {"name": "grpo", "preset": "grpo", "data": {"train": [{"builtin": "digits-qa"}], "batch_size": 4},
         "rewards": [{"fn": "bench.chaos:text_length_reward"}], "optim": {"lr": 1.0e-4},
         "grpo": {"num_generations": 4, "max_completion_length": 3, "num_iterations": 2, "beta": 0.04,
                  "log_completions_every": 1},
         "trainer": {"max_steps": 4, "save_every_n_steps": 1}},
    ],
}
STAGES = [s["name"] for s in RECIPE["stages"]]


def text_length_reward(completions, **kwargs) -> list[float]:
    """The grpo stage's reward: characters of each completion. The tiny model never answers a digit right after
    these few steps (the accuracy reward would be 0 everywhere: no advantage, no update, nothing to lose on a
    kill), while the lengths of its sampled texts differ, so every step moves the weights."""
    return [float(len(c[0]["content"])) for c in completions]


class Launch:
    """One `vlmtrain run --resume` process, its descendants tracked while it runs (for the orphan check)."""

    def __init__(self, recipe: Path, out: Path, env: dict):
        self.t0 = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "vlmtrain", "run", str(recipe), "--out", str(out),
                                      "--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env, start_new_session=True)
        self.seen: dict[int, psutil.Process] = {}

    def poll_children(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):  # the launch already ended: nothing new to record
            for c in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(c.pid, c)

    def wait(self, kill_after: float | None, sig: int, timeout: float = 900) -> int:
        sent = False
        while self.proc.poll() is None:
            self.poll_children()
            if kill_after is not None and not sent and time.time() - self.t0 >= kill_after:
                os.killpg(self.proc.pid, sig) if sig == signal.SIGTERM else self.proc.send_signal(sig)
                sent = True
            if time.time() - self.t0 > timeout:
                self.proc.kill()
            time.sleep(0.05)
        self.stderr = self.proc.stderr.read().decode(errors="replace")
        return self.proc.returncode

    def survivors(self, grace: float = 5.0) -> list[int]:
        """Descendants still alive `grace` seconds after the launch ended."""
        procs = list(self.seen.values())
        _, alive = psutil.wait_procs(procs, timeout=grace)
        return [p.pid for p in alive]


def _stage_done(out: Path, name: str) -> bool:
    try:
        s = json.loads((out / name / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return s.get("status") == "completed" and all(s.get(k) is not None for k in REQUIRED)


def _weights(stage_dir: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    ck = torch.load(stage_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return {"ckpt": ck, "model": load_file(stage_dir / "model" / "model.safetensors")}


def _compare(ref: Path, out: Path) -> list[str]:
    """Every difference between a resumed run and the reference (empty: nothing lost)."""
    import torch

    problems = []
    for name in STAGES:
        if not _stage_done(out, name):
            problems.append(f"{name}: summary.json incomplete")
            continue
        a, b = _weights(ref / name), _weights(out / name)
        for kind in ("ckpt", "model"):
            if a[kind].keys() != b[kind].keys() or not all(torch.equal(a[kind][k], b[kind][k]) for k in a[kind]):
                problems.append(f"{name}: {kind} weights differ")
        sa, sb = (json.loads((d / name / "summary.json").read_text()) for d in (ref, out))
        diff = [k for k in DETERMINISTIC if sa.get(k) != sb.get(k)]
        if diff:
            problems.append(f"{name}: summary differs in {diff}")
    return problems


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMTRAIN_KILL")}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)  # the grpo stage's reward
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": path,
            **extra}


def _last_phase(trace: Path) -> str:
    lines = trace.read_text().split("\n") if trace.is_file() else []
    lines = [ln for ln in lines if ln.strip()]
    return lines[-1].split()[1] if lines else "startup"  # killed before the first marker: imports, config


def _pick(rng: random.Random, out: Path, phase_cycle: list, ref_seconds: float, sig_name: str) -> dict:
    """A kill moment for the next launch: a phase marker of a stage not yet complete, or a wall time."""
    pending = [s for s in STAGES if not _stage_done(out, s)]
    if rng.random() < 0.5 and pending:
        if not phase_cycle:
            phase_cycle.extend(rng.sample(PHASES, len(PHASES)))
        phase = phase_cycle.pop()
        stage = "sft" if phase == "adapter" else rng.choice(pending)
        if stage not in pending:
            stage = pending[0]
            phase = phase if phase != "adapter" else "step"
        if phase == "eval_before" and (out / stage / "eval_before.json").is_file():  # measured once: not again
            return {"by": "wall", "seconds": round(rng.uniform(2.0, ref_seconds), 2), "signal": sig_name}
        nth = rng.randint(1, 3) if phase == "step" else 1
        return {"by": "phase", "target": f"{phase}@{stage}#{nth}", "signal": sig_name}
    return {"by": "wall", "seconds": round(rng.uniform(2.0, ref_seconds), 2), "signal": sig_name}


def run(quick: bool = False, out: str | None = None, seed: int = 0, sigkills: int = 30, sigterms: int = 10,
        kills_per_episode: int = 8, work: str | None = None) -> dict:
    if quick:
        sigkills, sigterms, kills_per_episode = 2, 1, 3
    rng = random.Random(seed)
    work_dir = Path(work or "runs/chaos")
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    recipe = work_dir / "chaos.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    env = _env({})
    t = time.time()
    ref = Launch(recipe, work_dir / "ref", env)
    if ref.wait(None, 0) != 0:
        raise RuntimeError(f"reference run failed: {ref.stderr[-3000:]}")
    ref_seconds = time.time() - t
    print(f"reference run: {ref_seconds:.0f} s", flush=True)

    plan = ["KILL"] * sigkills + ["TERM"] * sigterms
    rng.shuffle(plan)
    phase_cycle: list = []
    launches, episodes, orphans = [], [], []
    episode, out_dir, in_episode = 0, None, 0
    while plan:
        if out_dir is None:
            episode += 1
            out_dir, in_episode = work_dir / f"episode{episode}", 0
        sig_name = plan[0]
        moment = _pick(rng, out_dir, phase_cycle, ref_seconds, sig_name)
        trace = work_dir / f"phases-{len(launches)}.log"
        extra = {"VLMTRAIN_PHASE_LOG": str(trace)}
        if moment["by"] == "phase":
            extra.update(VLMTRAIN_KILL_AT=moment["target"], VLMTRAIN_KILL_SIGNAL=sig_name)
        launch = Launch(recipe, out_dir, _env(extra))
        sig = getattr(signal, "SIG" + sig_name)
        rc = launch.wait(moment.get("seconds"), sig)
        killed = rc in (-signal.SIGKILL, -signal.SIGTERM, 75)
        left = launch.survivors()
        orphans += left
        rec = {**moment, "episode": episode, "rc": rc, "killed": killed, "phase_hit": _last_phase(trace),
               "elapsed_s": round(time.time() - launch.t0, 1), "survivors": left}
        if not killed and rc != 0:
            rec["error"] = launch.stderr[-2000:]
        launches.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "error"}), flush=True)
        if killed:
            plan.pop(0)
            in_episode += 1
        finished = rc == 0 or (not killed)
        if finished or in_episode >= kills_per_episode or not plan:
            if not finished:  # resume to the end, untouched
                final = Launch(recipe, out_dir, _env({}))
                frc = final.wait(None, 0)
                orphans += final.survivors()
            else:
                frc = rc
            problems = _compare(work_dir / "ref", out_dir) if frc == 0 else [f"final resume exit {frc}"]
            episodes.append({"episode": episode, "kills": in_episode, "final_rc": frc, "problems": problems})
            print(json.dumps(episodes[-1]), flush=True)
            out_dir = None

    kills = [x for x in launches if x["killed"]]
    result = {
        "machine": machine(), "seed": seed, "recipe": RECIPE, "reference_seconds": round(ref_seconds, 1),
        "launches": launches, "episodes": episodes,
        "headline": {
            "kills": len(kills),
            "by_signal": dict(Counter(x["signal"] for x in kills)),
            "by_moment": dict(Counter(x["by"] for x in kills)),
            "phases_hit": dict(Counter(x["phase_hit"] for x in kills)),
            "phases_never_hit": [p for p in PHASES if p not in {x["phase_hit"] for x in kills}],
            "sigterm_exit_75": sum(1 for x in kills if x["signal"] == "TERM" and x["rc"] == 75),
            "launches_not_killed": len(launches) - len(kills),
            "episodes": len(episodes),
            "episodes_identical": sum(1 for e in episodes if not e["problems"]),
            "resumes_failed": sum(1 for x in launches if not x["killed"] and x["rc"] != 0),
            "orphans": len(orphans),
        },
    }
    save("chaos", result, out)
    return result
