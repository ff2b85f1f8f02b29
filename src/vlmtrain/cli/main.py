"""`vlmtrain <verb> ...`. Each verb parses its arguments and calls one library function.

User errors print one line (`error: ...`) and exit 1; invalid configs exit 2 (one line per bad field).
"""

from __future__ import annotations

# first of all, before any heavy import: a preemption signal during start-up exits 75 like one during training
from vlmtrain.cli.startup import ignore_once_complete, install_early

install_early()

import argparse  # noqa: E402  (after the early signal handler, on purpose)
import json
import logging
import os
import sys
import warnings

from vlmtrain import __version__
from vlmtrain.cli import data as cli_data
from vlmtrain.cli import families as cli_families
from vlmtrain.cli import fed as cli_fed
from vlmtrain.cli import plan as cli_plan
from vlmtrain.cli import prep
from vlmtrain.cli import privacy as cli_privacy
from vlmtrain.cli import train as cli_train
from vlmtrain.errors import VlmtrainError


def _quiet_libraries() -> None:
    """Imports neither torch nor transformers (seconds of start-up that a config error or `plan --gpu-memory`
    typo does not need): transformers takes its verbosity from TRANSFORMERS_VERBOSITY when it is first imported,
    and DeepSpeed's accelerator is chosen where the deepspeed strategies load it (train.strategy)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if "transformers" in sys.modules:  # main() called in a process that already imported it
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


# ---- verbs -------------------------------------------------------------------------------------------------------

def cmd_describe(args) -> int:
    from vlmtrain.config import load_model_config

    cfg = load_model_config(args.config, args.overrides)  # a schema error exits 2 before torch loads
    from vlmtrain.model import build_model, count_params

    bundle = build_model(cfg, device="meta")
    m = bundle.model
    if bundle.native:
        return _describe_native(args, cfg, bundle)
    result = {"params": count_params(m), "image_tokens": m.num_image_tokens}
    if args.json:
        print(json.dumps(result))
        return 0
    p = result["params"]
    print(f"model {cfg.name}  ({args.config})")
    print(f"  vision     {m.vision.model.config.model_type:<22} {p['vision']:>16,d}  "
          f"{m.vision.image_size}px, patch {m.vision.patch_size}, layer {m.vision.feature_layer}, {m.vision.select}")
    print(f"  connector  {cfg.connector.name:<22} {p['connector']:>16,d}  {m.num_image_tokens} image tokens per image")
    print(f"  llm        {m.llm.config.model_type:<22} {p['llm']:>16,d}  "
          f"vocab {m.llm.get_input_embeddings().num_embeddings}")
    print(f"  total      {'':<22} {p['total']:>16,d}  ({p['total'] / 1e9:.3f} B)")
    if bundle.tokenizer is None:
        print("  note: tokenizer not available offline; assumed the image token adds one row to the vocabulary",
              file=sys.stderr)
    return 0


def _describe_native(args, cfg, bundle) -> int:
    from vlmtrain.model import count_params
    from vlmtrain.model.native.describe import image_tokens_estimate

    m = bundle.model
    tokens, how = image_tokens_estimate(m.hf.config, bundle.processor, cfg.processor)
    result = {"params": count_params(m), "image_tokens": tokens}
    if args.json:
        print(json.dumps(result))
        return 0
    p = result["params"]
    print(f"model {cfg.name}  ({args.config})  native {m.model_type}")
    for role, parts in {**m.family.roles, **m.family.frozen_roles}.items():
        frozen = "  (frozen: no stage trains it)" if role in m.family.frozen_roles else ""
        print(f"  {role:<10} {p[role]:>16,d}  {', '.join(parts.values())}{frozen}")
    print(f"  total      {p['total']:>16,d}  ({p['total'] / 1e9:.3f} B)")
    print(f"  image tokens: {tokens} ({how})" if tokens is not None else f"  image tokens: unknown ({how})")
    return 0


def cmd_export(args) -> int:
    """`vlmtrain export`: `vlmtrain.train.export.export_model` (staged beside --out, swapped in when complete)."""
    from vlmtrain.train.export import export_model  # lazy: keeps `vlmtrain --help` fast

    print(export_model(args.source, args.format, args.out))
    return 0


def cmd_generate(args) -> int:
    from vlmtrain.train.artifacts import load_model_source  # lazy: keeps `vlmtrain --help` fast

    bundle = load_model_source(args.source)
    from vlmtrain.model.inference import generate_text, load_image

    images = [load_image(p) for p in args.image]
    print(generate_text(bundle, args.prompt, images, args.max_new_tokens))
    return 0


# ---- parser ------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtrain", description="Train vision-language models composed from parts.")
    p.add_argument("--version", action="version", version=f"vlmtrain {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    d = sub.add_parser("describe", help="build a model config on the meta device and count its parameters",
                       description="Build the model on the meta device (no weights, no download) and print "
                                   "parameters per module and image tokens per image.")
    d.add_argument("--config", required=True, help="model YAML, or a stage/recipe YAML with a `model:` section")
    d.add_argument("--json", action="store_true",
                   help='print {"params": {"vision","connector","llm","total"}, "image_tokens"} as one JSON line '
                        '(image_tokens null where vlmtrain has no rule for the family and no processor)')
    d.set_defaults(accepts_overrides=True)
    d.set_defaults(func=cmd_describe)

    e = sub.add_parser("export", help="export a model to transformers Llava or vlmtrain's own format",
                       description="Export a model folder (vlmtrain or transformers Llava) to another format.")
    e.add_argument("source", metavar="RUN_OR_CKPT", help="run dir, stage dir, checkpoint (.ckpt), vlmtrain model folder or transformers Llava folder")
    e.add_argument("--format", required=True, choices=["hf", "hf-llava", "vlmtrain", "peft"],
                   help="hf: the model's transformers folder (AutoModelForImageTextToText + AutoProcessor; "
                        "native families in their own format, composed models as Llava; LoRA runs merged); "
                        "hf-llava: LlavaForConditionalGeneration + AutoProcessor folder (linear/mlp2x_gelu "
                        "connectors; LoRA runs are exported merged); vlmtrain: vlmtrain's folder (any connector); "
                        "peft: a LoRA stage's adapter in PEFT format (OUT/adapter) over its base (OUT/base)")
    e.add_argument("--out", required=True, help="output folder")
    e.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help="greedy completion for an image and a prompt",
                       description="Print the greedy completion only (the chat template's assistant reply).")
    g.add_argument("source", metavar="RUN_OR_CKPT", help="run dir, stage dir, checkpoint (.ckpt), vlmtrain model folder or transformers Llava folder")
    g.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    g.add_argument("--prompt", required=True, help="user text")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.set_defaults(func=cmd_generate)

    cli_data.add_parser(sub)
    cli_train.add_parsers(sub)
    cli_plan.add_parser(sub)
    cli_families.add_parser(sub)

    prep.add_parser(sub)
    cli_privacy.add_parser(sub)
    cli_fed.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides (`trainer.max_steps=5`, `--optim.lr 1e-4`) are whatever argparse did not recognise.
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Lightning logs through its own handlers too; keep its warnings, drop its banners and tips.
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if int(os.environ.get("RANK", 0)) > 0:  # under torchrun only rank 0 narrates
        logging.getLogger().setLevel(logging.WARNING)
    _quiet_libraries()
    try:
        rc = int(args.func(args) or 0)
        if rc == 0:
            ignore_once_complete()  # a complete run exits 0, not -15 from a signal during teardown
        return rc
    except VlmtrainError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        _release_process_group()


def _release_process_group() -> None:
    """Destroy a torchrun command's process group before the interpreter exits. Left to static destructors, gloo's
    threads can still be running when they are torn down: a compiled DDP rank finished training and then aborted
    with 'terminate called without an active exception' (exit -6) in 1 of 5 suite runs (2026-12-07)."""
    if "torch.distributed" not in sys.modules:  # nothing distributed was imported: nothing to release
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
