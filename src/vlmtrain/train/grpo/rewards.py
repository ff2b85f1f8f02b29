"""Reward functions named by dotted path, with weights, called with TRL's convention.

A stage names each function as `package.module:function` (imported from the working directory or PYTHONPATH) or by
the short name of a shipped one (`reward_fns.SHIPPED`), with a weight and optional keyword `args`. Each is called as
TRL 1.16's `GRPOTrainer._calculate_rewards` calls it, so a TRL user's reward function runs unchanged:

    f(prompts=[n], completions=[n], completion_ids=[n], **columns, trainer_state=..., log_extra=..., log_metric=...)
        -> list of n floats or None   (None: the function does not apply to that completion)

`columns` are the record's other fields, one value per completion (each prompt's value repeated for its G
completions). Async functions (`async def`, or a callable object whose `__call__` is) run concurrently.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import math
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vlmtrain.errors import ConfigError, VlmtrainError
from vlmtrain.train.grpo.reward_fns import SHIPPED


@dataclass
class RewardState:
    """What TRL hands reward functions as `trainer_state` and reward shaping usually reads."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


def _import_module(module: str, where: str):
    if os.getcwd() not in sys.path:  # `fn: "mymod:f"` finds mymod.py in the working directory, as `python -m` does
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ConfigError(f"{where}: cannot import module {module!r} ({e}); is it on PYTHONPATH or in the working "
                          f"directory?") from None
    except Exception as e:  # the user's module raised while importing: say which, in one line
        raise ConfigError(f"{where}: importing {module!r} failed: {type(e).__name__}: {e}") from None


def resolve_reward(path: str, where: str = "fn") -> Callable:
    """The callable a reward path names: a shipped reward's short name, or `package.module:function` (the function
    may be an attribute path, `module:Class.method`). A bad path is a ConfigError naming `where` (exit 2)."""
    if ":" not in path:
        if path in SHIPPED:
            return SHIPPED[path]
        raise ConfigError(f"{where}: unknown reward {path!r}; give 'package.module:function' or one of "
                          f"{', '.join(SHIPPED)}")
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ConfigError(f"{where}: {path!r} is not 'package.module:function'")
    obj = _import_module(module, where)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: module {module!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {path!r} is {type(obj).__name__}, not a function")
    return obj


def is_async(fn: Callable) -> bool:
    """Whether calling `fn` returns a coroutine: async functions, partials of them, and objects with an async
    `__call__` (which `inspect.iscoroutinefunction` alone misses)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


@dataclass
class Reward:
    """One reward function of a stage: `name` (for metrics), the callable with `args` bound, its weight."""

    name: str
    fn: Callable
    weight: float


@dataclass
class RewardSet:
    """The stage's reward functions; `score` calls them all and stacks the results `[n, k]` (NaN = None)."""

    rewards: list[Reward]
    extra_columns: dict[str, list] = field(default_factory=dict)
    logged_metrics: dict[str, list[float]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @property
    def weights(self) -> torch.Tensor:
        return torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)

    def _log_extra(self, column: str, values: list) -> None:
        self.extra_columns.setdefault(column, []).extend(values)

    def _log_metric(self, name: str, value: float) -> None:
        self.logged_metrics.setdefault(name, []).append(value)

    def score(self, prompts: list, completions: list, completion_ids: list | None = None,
              columns: dict[str, list] | None = None, state: RewardState | None = None) -> torch.Tensor:
        """`[n, k]` float32 rewards of n completions from k functions (NaN where a function returned None)."""
        kwargs = dict(columns or {})
        kwargs.update(trainer_state=state or RewardState(), log_extra=self._log_extra, log_metric=self._log_metric)
        call = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        out = torch.full((len(prompts), len(self.rewards)), float("nan"))
        pending = []
        for i, r in enumerate(self.rewards):
            if is_async(r.fn):
                pending.append((i, r))
            else:
                out[:, i] = self._check(r.name, r.fn(**call), len(prompts))
        if pending:
            results = _run_async([r.fn(**call) for _, r in pending])
            for (i, r), values in zip(pending, results):
                out[:, i] = self._check(r.name, values, len(prompts))
        return out

    @staticmethod
    def _check(name: str, values: Any, n: int) -> torch.Tensor:
        """A function's output as `[n]` float32 (None → NaN); anything else is one error naming the function."""
        if not isinstance(values, (list, tuple)) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise VlmtrainError(f"reward {name!r} returned {got}; expected a list of {n} (one per completion)")
        clean = []
        for j, v in enumerate(values):
            if v is None:
                clean.append(math.nan)
            elif not isinstance(v, str) and hasattr(v, "__float__"):  # numbers, numpy scalars, 0-d tensors
                clean.append(float(v))
            else:
                raise VlmtrainError(f"reward {name!r}: value {j} is {type(v).__name__} ({v!r}); expected a number "
                                    "or None")
        return torch.tensor(clean, dtype=torch.float32)


def _run_async(coros: list) -> list:
    """Await the coroutines concurrently. From inside a running event loop (a notebook) they run on a fresh loop in
    a helper thread, since `asyncio.run` refuses a nested loop."""
    async def gather():
        return await asyncio.gather(*coros)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    box: list = []
    thread = threading.Thread(target=lambda: box.append(asyncio.run(gather())))
    thread.start()
    thread.join()
    return box[0]


def _name(fn: Callable, path: str) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", None) or path.rpartition(":")[2] or path


def _unknown_args(fn: Callable, args: dict) -> str | None:
    """The first of `args` that is not a named parameter of `fn`. Names only `**kwargs` would absorb are refused
    too: TRL-style functions all take `**kwargs`, so a misspelt argument would otherwise vanish silently."""
    try:
        params = inspect.signature(fn).parameters
    except ValueError:  # no signature to read (some C callables): the call itself reports a bad argument
        return None
    named = {k for k, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return next((k for k in args if k not in named), None)


def load_rewards(specs: list, where: str = "grpo.rewards") -> RewardSet:
    """A RewardSet from config entries (objects or dicts with `fn`, `weight`, optional `args`); every bad path is
    reported (one line each) in a single ConfigError."""
    rewards, problems = [], []
    for i, spec in enumerate(specs):
        spec = spec if isinstance(spec, dict) else spec.model_dump()
        try:
            fn = resolve_reward(spec["fn"], f"{where}[{i}].fn")
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        args = spec.get("args") or {}
        unknown = _unknown_args(fn, args)
        if unknown:
            problems.append(f"{where}[{i}].args: {spec['fn']} has no parameter {unknown!r}")
            continue
        name = _name(fn, spec["fn"])
        name = name if name not in {r.name for r in rewards} else f"{name}_{i}"  # metric names stay distinct
        bound = functools.partial(fn, **args) if args else fn
        rewards.append(Reward(name=name, fn=bound, weight=float(spec.get("weight", 1.0))))
    if problems:
        raise ConfigError(problems)
    return RewardSet(rewards)
