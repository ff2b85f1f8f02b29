"""`vlmtrain fit`, `vlmtrain run`, `vlmtrain eval`: thin wrappers over `vlmtrain.train`."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _prepare_process() -> None:
    """Preemption signals checkpoint and exit 75 (train.preempt); under torchrun, a rank dies with its agent."""
    from vlmtrain.train import preempt

    preempt.install()
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        from vlmtrain.lifeline import die_with_parent  # lazy: only under torchrun

        die_with_parent()


def cmd_fit(args) -> int:
    from vlmtrain.train.recipe import load_stage_config

    overrides = list(args.overrides) + ([f"trainer.strategy={args.strategy}"] if args.strategy else [])
    overrides += [f"trainer.max_steps={args.max_steps}"] if args.max_steps else []
    stage = load_stage_config(args.config, overrides)  # a config error exits 2 before torch and Lightning load
    from vlmtrain.train.runner import fit_stage

    _prepare_process()
    fit_stage(stage, args.out, args.data_root, resume=args.resume, base_dir=Path(args.config).parent)
    return 0


def cmd_run(args) -> int:
    from vlmtrain.train.recipe import resolve_recipe

    overrides = list(args.overrides) + ([f"trainer.strategy={args.strategy}"] if args.strategy else [])
    # every stage is validated again by run_recipe (cheap); here a config error exits 2 before torch and Lightning load
    resolve_recipe(args.recipe, args.out, overrides, args.max_steps)
    from vlmtrain.train.runner import run_recipe

    _prepare_process()
    run_recipe(args.recipe, args.out, resume=args.resume, overrides=overrides, max_steps=args.max_steps)
    return 0


def cmd_eval(args) -> int:
    from vlmtrain.train.artifacts import load_model_source  # lazy: keeps `vlmtrain --help` fast
    from vlmtrain.train.evaluate import evaluate

    bundle = load_model_source(args.run)
    res = evaluate(bundle, args.data, args.max_samples, args.max_new_tokens, args.batch_size)
    print(json.dumps(res))
    return 0


STRATEGY_CHOICES = ["single", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]
STRATEGY_HELP = ("distribution for every stage (launch with torchrun for more than one process): single, ddp, "
                 "fsdp (FSDP2), deepspeed_zero2, deepspeed_zero3")


def add_parsers(sub) -> None:
    f = sub.add_parser("fit", help="train one stage", description="Train one stage config into --out.")
    f.add_argument("--config", required=True, help="stage YAML (preset: align | pretrain | sft | dpo | grpo)")
    f.add_argument("--out", required=True, help="run directory of the stage")
    f.add_argument("--resume", action="store_true", help="continue from --out's checkpoints/last.ckpt")
    f.add_argument("--data-root", default=None, help="where builtin datasets are prepared (default: OUT/../data)")
    f.add_argument("--strategy", choices=STRATEGY_CHOICES, default=None, help=STRATEGY_HELP)
    f.add_argument("--max-steps", type=int, default=None, help="cap the stage at N optimizer steps")
    f.set_defaults(accepts_overrides=True)
    f.set_defaults(func=cmd_fit)

    r = sub.add_parser("run", help="run a multi-stage recipe (align → sft → dpo ...)",
                       description="Run a recipe's stages in order into OUT/<stage>/; each stage starts from the "
                                   "previous stage's model. With --resume, completed stages are skipped and an "
                                   "interrupted stage continues from its last checkpoint.")
    r.add_argument("recipe", metavar="RECIPE", help="recipe YAML")
    r.add_argument("--out", required=True, help="run directory")
    r.add_argument("--resume", action="store_true")
    r.add_argument("--max-steps", type=int, default=None, help="cap every stage at N optimizer steps")
    r.add_argument("--strategy", choices=STRATEGY_CHOICES, default=None, help=STRATEGY_HELP)
    r.set_defaults(accepts_overrides=True)
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("eval", help="VQA exact match and multiple-choice accuracy on shards",
                       description="Evaluate a model: greedy exact match on the last assistant turn, and "
                                   "log-likelihood multiple choice for records with meta.choices. Prints JSON.")
    e.add_argument("run", metavar="RUN", help="run directory, stage directory, checkpoint or model folder")
    e.add_argument("--data", required=True, help="eval shards")
    e.add_argument("--max-samples", type=int, default=1000)
    e.add_argument("--max-new-tokens", type=int, default=16)
    e.add_argument("--batch-size", type=int, default=32)
    e.set_defaults(func=cmd_eval)
