"""`vlmtrain plan`: will a stage fit on one GPU? A thin wrapper over `vlmtrain.plan`."""

from __future__ import annotations

import json
import re

from vlmtrain.errors import ConfigError


def cmd_plan(args) -> int:
    from vlmtrain.plan import PlanOptions, parse_memory, plan_config  # lazy: keeps `vlmtrain --help` fast

    gpu = parse_memory(args.gpu_memory)  # before any model is built: a typo fails in milliseconds
    if args.world_size < 1:
        raise ConfigError(f"--world-size: must be ≥ 1, got {args.world_size}")
    if args.images_per_sample < 0:
        raise ConfigError(f"--images-per-sample: must be ≥ 0, got {args.images_per_sample}")
    if not 0 < args.supervised_fraction <= 1:
        raise ConfigError(f"--supervised-fraction: must be in (0, 1], got {args.supervised_fraction}")
    opts = PlanOptions(images_per_sample=args.images_per_sample, world_size=args.world_size,
                       supervised_fraction=args.supervised_fraction, image_size=parse_image_size(args.image_size))
    plan = plan_config(args.config, gpu, args.overrides, args.stage, opts)
    if args.json:
        print(json.dumps(plan.to_json()))
    else:
        print(format_plan(plan))
    return 0


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """`448x336` (height × width in pixels) → (448, 336); None stays None (the family's largest image)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]+)\s*[xX×]\s*([0-9]+)\s*", text)
    if m is None or min(int(m.group(1)), int(m.group(2))) < 1:
        raise ConfigError(f"--image-size: cannot read {text!r} (HEIGHTxWIDTH in pixels, e.g. 448x336)")
    return int(m.group(1)), int(m.group(2))


def format_plan(plan) -> str:
    gb = plan.gpu_memory / 2**30
    lines = [f"stage {plan.stage}: micro-batch {plan.micro_batch} × {plan.seq_len} tokens",
             f"  {'part':<24} {'GiB':>9}"]
    for k, v in plan.parts.items():
        if v:
            lines.append(f"  {k:<24} {v / 2**30:>9.3f}")
    lines.append(f"  {'peak':<24} {plan.peak / 2**30:>9.3f}   (at: {plan.phase})")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"{verdict} in {gb:.2f} GiB; largest micro-batch that fits: {plan.max_micro_batch}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="estimate a stage's peak GPU memory and the largest micro-batch that fits",
        description="Estimate the peak memory of one training step on one GPU from the config alone (the model is "
                    "built on the meta device: no weights, no download): weights, LoRA adapters, gradients, AdamW "
                    "states, activations (per-layer model, with/without gradient checkpointing), vision tower, "
                    "logits and a fixed CUDA context allowance. --config takes a stage YAML, or a recipe YAML: "
                    "then --stage picks a stage, and without it the most memory-hungry stage is reported.")
    p.add_argument("--config", required=True, help="stage YAML, or recipe YAML (see --stage)")
    p.add_argument("--gpu-memory", required=True, metavar="SIZE",
                   help="memory of one GPU: 24GiB, 24G (binary), 80GB (decimal) or bytes")
    p.add_argument("--stage", default=None, metavar="NAME",
                   help="recipe stage to plan (default: the stage with the highest peak)")
    p.add_argument("--world-size", type=int, default=1, metavar="N",
                   help="ranks that shard gradients and optimizer state (and weights: fsdp, deepspeed_zero3) when "
                        "trainer.strategy is fsdp or deepspeed_zero2/3; other strategies plan one GPU")
    p.add_argument("--images-per-sample", type=int, default=1, metavar="K",
                   help="images per sample (per packed row with data.mode=pack); image slots are part of "
                        "data.max_len")
    p.add_argument("--image-size", default=None, metavar="HxW",
                   help="native families with dynamic resolution (Qwen2-VL/2.5-VL): plan images of this size, "
                        "height x width in pixels, through the processor's resize rule (default: the largest the "
                        "processor's max_pixels allows); fixed-size families ignore it")
    p.add_argument("--supervised-fraction", type=float, default=1.0, metavar="F",
                   help="share of the text positions that carry a loss (default 1.0, the worst case); the logits "
                        "are computed at those positions only")
    p.add_argument("--json", action="store_true",
                   help='print {"peak_gib", "fits", "max_micro_batch", "parts": {name: GiB}} as one JSON line')
    p.set_defaults(accepts_overrides=True)
    p.set_defaults(func=cmd_plan)
