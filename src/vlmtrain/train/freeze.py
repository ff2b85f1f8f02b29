"""One function decides what trains in a stage, logs it, and refuses contradictions (Prismatic's habit)."""

from __future__ import annotations

import logging

from vlmtrain.errors import ConfigError

log = logging.getLogger(__name__)
MODULES = ("vision", "connector", "llm")


def trainable_table(model) -> dict[str, dict[str, int]]:
    """Per module: trainable and frozen parameter counts (tied tensors counted once)."""
    seen: set[int] = set()
    table = {}
    for name in MODULES:
        t = f = 0
        for p in getattr(model, name).parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                t += p.numel()
            else:
                f += p.numel()
        table[name] = {"trainable": t, "frozen": f}
    return table


def apply_stage_trainability(model, train) -> dict[str, dict[str, int]]:
    """Set requires_grad per module from the stage's `train` block, verify, log a table, return it."""
    for name in MODULES:
        getattr(model, name).requires_grad_(bool(getattr(train, name)))
    table = trainable_table(model)
    problems = []
    for name in MODULES:
        want, row = getattr(train, name), table[name]
        if want and row["trainable"] == 0:
            problems.append(f"train.{name}: set to train but has no trainable parameters")
        if not want and row["trainable"] > 0:
            problems.append(f"train.{name}: set frozen but {row['trainable']:,} parameters would train")
    if problems:
        raise ConfigError(problems)
    lines = ["trainable parameters:", f"  {'module':<10} {'trainable':>14} {'frozen':>14}"]
    for name in MODULES:
        r = table[name]
        lines.append(f"  {name:<10} {r['trainable']:>14,d} {r['frozen']:>14,d}")
    tot_t = sum(r["trainable"] for r in table.values())
    tot_f = sum(r["frozen"] for r in table.values())
    lines.append(f"  {'total':<10} {tot_t:>14,d} {tot_f:>14,d}")
    log.info("\n".join(lines))
    return table
