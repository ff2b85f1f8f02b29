"""`vlmtrain families`: the table of what each image-text-to-text family can do, from `vlmtrain.cli.family_table`."""

from __future__ import annotations

import json
import logging

from vlmtrain.errors import ConfigError


def cmd_families(args) -> int:
    from vlmtrain.cli import family_table  # lazy: it loads the plan and train modules; `--help` does not

    # each unlisted family's build logs "mapped by the generic rule": the table's kind column says it once
    # and each align stage asked of check_native_stage logs its feature-cache line: quiet both
    for name in ("vlmtrain.model.native.build", "vlmtrain.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    unknown = [mt for mt in args.model_type if mt not in family_table.keys()]
    if unknown:
        raise ConfigError(f"families: {', '.join(map(repr, unknown))}: not a key of transformers' image-text-to-text "
                          "mapping nor a listed family (`vlmtrain families` lists them all)")
    rows = family_table.build_rows(args.model_type or None)
    if args.json:
        print(json.dumps(family_table.to_json(rows)))
    elif args.format == "md":
        print(family_table.to_markdown(rows), end="")
    else:
        print(family_table.to_text(rows), end="")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "families", help="table of every image-text-to-text family: listed or generic, stages, LoRA, packing, ...",
        description="Build each model type of transformers' image-text-to-text mapping from its default config on "
                    "the meta device (as `describe` does) and ask vlmtrain's own checks what it can train: the "
                    "stages, LoRA and QLoRA with the default targets, packing, FSDP2, ZeRO-3, DP-SGD, the memory "
                    "planner and export. A refused feature's note is the error a run would print.")
    p.add_argument("model_type", nargs="*", help="only these model types (default: every key, ~15 s)")
    p.add_argument("--json", action="store_true", help="one JSON list: per family its kind and each cell's "
                                                       "{ok, note, short}")
    p.add_argument("--format", choices=["text", "md"], default="text",
                   help="text (aligned columns) or md (a markdown table + notes, as in docs/families.md)")
    p.set_defaults(func=cmd_families)
