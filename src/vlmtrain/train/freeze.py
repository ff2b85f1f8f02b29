"""One function decides what trains in a stage, logs it, and refuses contradictions (Prismatic's habit)."""

from __future__ import annotations

import logging

from vlmtrain.errors import ConfigError

log = logging.getLogger(__name__)
MODULES = ("vision", "connector", "llm")


def trainable_table(model) -> dict[str, dict[str, int]]:
    """Per module: trainable and frozen parameter counts (tied tensors counted once); a mixture-of-experts LM's row
    also says how many of its trainable parameters are in the experts (`experts_trainable`: the fused expert tensors
    or their adapters)."""
    seen: set[int] = set()
    table = {}
    for name in (*MODULES, *frozen_roles(model)):
        t = f = 0
        experts: int | None = None
        for pname, p in getattr(model, name).named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if ".experts." in f".{pname}":
                experts = (experts or 0) + (p.numel() if p.requires_grad else 0)
            if p.requires_grad:
                t += p.numel()
            else:
                f += p.numel()
        table[name] = {"trainable": t, "frozen": f} | ({"experts_trainable": experts} if experts is not None else {})
    return table


def frozen_roles(model) -> tuple[str, ...]:
    """Roles beside vision / connector / llm that no stage trains (a native family's `frozen_roles`, e.g. Gemma 4's
    audio tower): frozen at build, shown as frozen rows of the trainable table."""
    family = getattr(model, "family", None)
    return tuple(getattr(family, "frozen_roles", None) or ())


def _is_adapter(param_name: str) -> bool:
    return "lora_" in param_name


def apply_stage_trainability(model, train) -> dict[str, dict[str, int]]:
    """Set requires_grad per module from the stage's `train` block (true | false | "lora"), verify, log a table.

    Verification is what catches "LoRA silently became full fine-tuning": in a `lora` module every adapter
    parameter must train and no base parameter may; in a frozen module nothing may train."""
    for name in MODULES:
        want = getattr(train, name)
        for pname, p in getattr(model, name).named_parameters():
            p.requires_grad_(_is_adapter(pname) if want == "lora" else bool(want))
    table = trainable_table(model)
    problems = []
    for name in MODULES:
        want, row = getattr(train, name), table[name]
        row["mode"] = "lora" if want == "lora" else "full" if want else "frozen"
        params = list(getattr(model, name).named_parameters())
        if want == "lora":
            adapters = [p for n, p in params if _is_adapter(n)]
            if not adapters:
                problems.append(f"train.{name}: 'lora' but the module has no LoRA adapters")
            leaked = sum(p.numel() for n, p in params if p.requires_grad and not _is_adapter(n))
            if leaked:
                problems.append(f"train.{name}: 'lora' but {leaked:,} base parameters would train")
        elif want and row["trainable"] == 0:
            problems.append(f"train.{name}: set to train but has no trainable parameters")
        if not want and row["trainable"] > 0:
            problems.append(f"train.{name}: set frozen but {row['trainable']:,} parameters would train")
    for name in frozen_roles(model):
        if table[name]["trainable"]:
            problems.append(f"{name}: a frozen role of this family, but {table[name]['trainable']:,} parameters "
                            "would train")
        table[name]["mode"] = "frozen"
    if problems:
        raise ConfigError(problems)
    lines = ["trainable parameters:", f"  {'module':<10} {'mode':<7} {'trainable':>14} {'frozen':>14}"]
    for name in table:
        r = table[name]
        lines.append(f"  {name:<10} {r['mode']:<7} {r['trainable']:>14,d} {r['frozen']:>14,d}")
        if "experts_trainable" in r:
            lines.append(f"    {'experts':<15} {r['experts_trainable']:>14,d}")
    tot_t = sum(r["trainable"] for r in table.values())
    tot_f = sum(r["frozen"] for r in table.values())
    lines.append(f"  {'total':<10} {'':<7} {tot_t:>14,d} {tot_f:>14,d}")
    log.info("\n".join(lines))
    return table
