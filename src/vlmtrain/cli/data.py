"""`vlmtrain data inspect SHARDS --config CFG [--n N] [--json]`."""

from __future__ import annotations

import json
from pathlib import Path


def cmd_inspect(args) -> int:
    from vlmtrain.config import load_model_config
    from vlmtrain.data.inspect import inspect_samples, render
    from vlmtrain.model import build_model
    from vlmtrain.model.io import detect_source, load_any

    src = Path(args.config)
    bundle = load_any(src) if src.is_dir() and detect_source(src) else build_model(
        load_model_config(args.config, args.overrides), load_weights=False)
    for s in inspect_samples(args.shards, bundle, n=args.n, max_len=args.max_len):
        if args.json:
            print(json.dumps({k: s[k] for k in ("id", "input_ids", "labels", "text", "supervised_text",
                                                "image_slots", "images", "side") if k in s}), flush=True)
        else:
            side = f" ({s['side']})" if "side" in s else ""
            sup = sum(1 for t in s["labels"] if t != -100)
            print(f"── {s['id']}{side}: {len(s['input_ids'])} tokens, {s['images']} image(s), "
                  f"{sup} supervised ({sup / max(1, len(s['labels'])):.0%})")
            print(render(s, bundle.tokenizer, bundle.model.image_token_id))
    return 0


def add_parser(sub) -> None:
    d = sub.add_parser("data", help="inspect shards as the trainer sees them",
                       description="Data tools. `inspect` renders samples with supervised spans marked.")
    dsub = d.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    i = dsub.add_parser("inspect", help="show N samples: tokens, labels, supervised text, image slots",
                        description="Render samples exactly as training sees them: chat template applied, image "
                                    "slots expanded, supervised spans marked [[...]] (or --json per sample).")
    i.add_argument("shards", metavar="SHARDS", help="shard folder (with manifest.json), tar glob or brace URL")
    i.add_argument("--config", required=True, help="model YAML (or a model folder) giving tokenizer and image slots")
    i.add_argument("--n", type=int, default=5, help="samples to show")
    i.add_argument("--max-len", type=int, default=4096, help="reject samples longer than this (tokens)")
    i.add_argument("--json", action="store_true",
                   help='one JSON object per line: {"id", "input_ids", "labels", "text", "supervised_text", '
                        '"image_slots", "images"[, "side"]}')
    i.set_defaults(accepts_overrides=True)
    i.set_defaults(func=cmd_inspect)
