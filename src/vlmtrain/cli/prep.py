"""`vlmtrain prep FORMAT --out DIR ...`: convert a public VLM data format into WebDataset shards.

Thin: argument parsing, a progress line, and glue between `vlmtrain.data.formats` (reading) and
`vlmtrain.data.writer` (writing); with `--config`, the model's tokenizer to measure lengths in tokens.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import time

from vlmtrain.errors import VlmtrainError

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_size(s: str) -> int:
    """`1000000`, `1e9`, `500M`, `1G`, `2GiB` → bytes."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]i?)?b?\s*", s.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{s!r} is not a size (e.g. 1G, 500M, 1000000)")
    n = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if n < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: must be at least 1 byte")
    return n


def _positive(s: str) -> int:
    n = int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{s}: must be at least 1")
    return n


class ProgressLine:
    """Prints `records, rate, kept, rejected[, ETA]` to stderr every `every` records or `interval` seconds."""

    def __init__(self, total: int | None, every: int = 10000, interval: float = 2.0, stream=None):
        self.total, self.every, self.interval = total, every, interval
        self.stream = stream or sys.stderr
        self.t0 = self.t_last = None
        self.n_last = 0

    def __call__(self, done: int, kept: int, rejected: int) -> None:
        now = time.monotonic()
        if self.t0 is None:  # the clock starts at the first record, not during imports and input loading
            self.t0 = self.t_last = now
            return
        if done - self.n_last < self.every and now - self.t_last < self.interval:
            return
        self.n_last, self.t_last = done, now
        rate = done / max(now - self.t0, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        line = f"prep: {done:,}{of} records  {rate:,.0f} rec/s  kept {kept:,}  rejected {rejected:,}"
        if self.total and rate > 0:
            line += f"  ETA {_duration(max(self.total - done, 0) / rate)}"
        print(line, file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---- command -------------------------------------------------------------------------------------------------

def _open_source(args):
    from vlmtrain.data.formats import read_format  # lazy: keeps `vlmtrain --help` fast

    if args.fmt == "captions":
        return read_format("captions", src=args.src, csv=args.csv, jsonl=args.jsonl, images=args.images,
                           image_col=args.image_col, caption_col=args.caption_col, ids=args.ids)
    return read_format(args.fmt, path=args.path, images=args.images, ids=args.ids)


def _measure(args):
    """Token lengths from the model config's tokenizer, else the character approximation."""
    from vlmtrain.data.writer import CharLength, TokenLength  # lazy: keeps `vlmtrain --help` fast

    if args.config is None:
        if args.max_len is not None:
            raise VlmtrainError("--max-len counts tokens: give the model with --config MODEL.yaml")
        return CharLength()
    from vlmtrain.config import load_model_config
    from vlmtrain.model import build_model

    cfg = load_model_config(args.config)
    bundle = build_model(cfg, device="meta")  # the tokenizer and slot counts only: no weights are loaded
    if bundle.tokenizer is None:
        raise VlmtrainError(f"{args.config}: the tokenizer is not available offline; download it or point "
                            "tokenizer.pretrained at a local folder")
    m = bundle.model
    return TokenLength(bundle.tokenizer, m.image_token_id, m.num_image_tokens, args.max_len)


def _summary_line(man: dict, out: str) -> str:
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(man["rejected_by_reason"].items(), key=lambda kv: -kv[1]))
    return (f"prep {man['source_format']}: kept {man['samples']:,} of {man['input_records']:,} records, "
            f"rejected {man['rejected']:,}" + (f" ({reasons})" if reasons else "")
            + f"; {len(man['shards'])} shard(s) in {out}")


def cmd_prep(args) -> int:
    from vlmtrain.data.writer import check_out_dir, write_shards  # lazy: keeps `vlmtrain --help` fast

    # Cheap checks first: a refused folder or a bad config should not wait for a long read of the input.
    check_out_dir(args.out, args.overwrite)
    measure = _measure(args)
    source = _open_source(args)
    total = source.total
    if args.limit is not None:
        source.drafts = itertools.islice(source.drafts, args.limit)
        total = min(total, args.limit) if total is not None else args.limit
    print(f"prep {args.fmt}: {', '.join(source.inputs[:3])}{' ...' if len(source.inputs) > 3 else ''}"
          f" ({f'{total:,} records' if total is not None else 'record count unknown'}), "
          f"lengths in {measure.unit}, {args.workers} worker(s)", file=sys.stderr, flush=True)
    extra = {"inputs": source.inputs, "images_dir": getattr(args, "images", None),
             "options": {"shard_size": args.shard_size, "shard_bytes": args.shard_bytes, "config": args.config,
                         "max_len": args.max_len, "ids": args.ids, "limit": args.limit},
             "warnings": source.warnings}
    man = write_shards(source.samples(args.workers), args.out, source.name, measure=measure,
                       shard_size=args.shard_size, shard_bytes=args.shard_bytes, overwrite=args.overwrite,
                       progress=ProgressLine(total, args.progress_every), extra=extra)
    for w in source.warnings:
        print(f"warning: {w}", file=sys.stderr)
    _finish(man, source.inputs, args.out)
    return 0


def _finish(man: dict, inputs: list[str], out: str) -> None:
    """Exit 1 when nothing usable was written, else print the one summary line."""
    if man["samples"] == 0:
        if man["input_records"] == 0:
            raise VlmtrainError(f"{', '.join(inputs)}: no records found")
        top = ", ".join(f"{k} {v:,}" for k, v in man["rejected_by_reason"].items())
        raise VlmtrainError(f"no usable samples: all {man['input_records']:,} records rejected ({top}); "
                            f"see {os.path.join(out, 'rejects.jsonl')}")
    print(_summary_line(man, out))


def cmd_prep_medical(args) -> int:
    """`prep medical`: the privacy gate (vlmtrain.privacy.gate) in front of the shard writer."""
    from vlmtrain.data.writer import check_out_dir  # lazy: keeps `vlmtrain --help` fast
    from vlmtrain.privacy.gate import count_rows, records_file, run_gate
    from vlmtrain.privacy.policy import load_policy

    check_out_dir(args.out, args.overwrite)
    policy = load_policy(args.policy)  # a bad policy stops here, before anything is read
    measure = _measure(args)
    records = records_file(args.src)
    total = count_rows(records)
    total = min(total, args.limit) if args.limit is not None else total
    print(f"prep medical: {records} ({total:,} records), policy {args.policy} ({policy.hash()[:19]}), "
          f"lengths in {measure.unit}, {args.workers} worker(s)", file=sys.stderr, flush=True)
    man, _ = run_gate(args.src, args.policy, args.out, images=args.images, measure=measure,
                      shard_size=args.shard_size, shard_bytes=args.shard_bytes, overwrite=args.overwrite,
                      progress=ProgressLine(total, args.progress_every), workers=args.workers, limit=args.limit,
                      ids=args.ids)
    _finish(man, [str(records)], args.out)
    return 0


# ---- parser --------------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for shard-*.tar, manifest.json "
                   "and rejects.jsonl")
    p.add_argument("--images", metavar="DIR", help="base folder for relative image paths (default: the input "
                   "file's folder)")
    p.add_argument("--shard-size", type=_positive, default=1000, metavar="N", help="samples per shard (1000)")
    p.add_argument("--shard-bytes", type=parse_size, default=10**9, metavar="SIZE",
                   help="start a new shard once one holds this many bytes: 1G (default), 500M, ...")
    p.add_argument("--config", metavar="MODEL.yaml", help="measure lengths in tokens with this model's tokenizer "
                   "and chat template (else characters, an approximation)")
    p.add_argument("--max-len", type=_positive, metavar="N", help="reject records longer than N tokens, image "
                   "slots included (needs --config)")
    p.add_argument("--ids", choices=["source", "index"], default="source",
                   help="source: keep the records' ids (a repeat is rejected as duplicate_id); index: number "
                        "records FORMAT-INDEX and keep the original in meta.source_id")
    p.add_argument("--workers", type=_positive, default=min(8, os.cpu_count() or 1), metavar="N",
                   help="threads reading and decode-checking images (default: min(8, CPUs))")
    p.add_argument("--limit", type=_positive, metavar="N", help="convert only the first N records (a trial run)")
    p.add_argument("--progress-every", type=_positive, default=10000, metavar="N",
                   help="progress line every N records (and at least every 2 s)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's shards and manifest in DIR")
    p.set_defaults(func=cmd_prep)


_JSON_FORMATS = {
    "llava": ("LLaVA conversations (LLaVA-Pretrain, LLaVA-Instruct, ShareGPT4V) → chat",
              'JSON list or JSONL of {"id", "image": path | [paths] | absent, "conversations": [{"from": '
              '"human"|"gpt"|"system", "value": "...<image>..."}]}. <image> marks where each image goes; with '
              "images but no <image>, they start the first user turn."),
    "sharegpt": ("OpenAI-style messages (alias: messages) → chat",
                 'JSON list or JSONL of {"id"?, "messages": [{"role", "content": str | [{"type": "text", "text"} '
                 '| {"type": "image"}]}], "images": [paths]}; string content may hold <image> placeholders; '
                 'ShareGPT "conversations" with from/value are accepted too.'),
    "dpo": ("preference pairs (RLAIF-V style, TRL style) → preference",
            'JSON list or JSONL of {"id"?, "image": path | [paths] | absent, "prompt" | "question": str or '
            'messages, "chosen": str or messages, "rejected": str or messages}. Images belong to the prompt.'),
}


def add_parser(sub) -> None:
    """Register `prep` and its per-format subcommands on the top-level subparsers."""
    p = sub.add_parser("prep", help="convert LLaVA / ShareGPT / captions / DPO / medical data into WebDataset shards",
                       description="Convert a public VLM data format into WebDataset tar shards with a manifest "
                                   "(counts, lengths) and rejects.jsonl (one line per dropped record). Exit 0 "
                                   "when at least one sample was written, 1 when none was.")
    fmts = p.add_subparsers(dest="fmt_given", required=True, metavar="FORMAT")
    for name, (help_, desc) in _JSON_FORMATS.items():
        aliases = ["messages"] if name == "sharegpt" else []
        f = fmts.add_parser(name, aliases=aliases, help=help_, description=desc)
        f.add_argument("--json", "--jsonl", dest="path", required=True, metavar="FILE",
                       help="the records: a JSON list or JSONL (told apart by the first character)")
        _common(f)
        f.set_defaults(fmt=name)
    c = fmts.add_parser("captions", help="image-caption pairs (img2dataset shards, CSV, JSONL) → caption",
                        description="img2dataset output shards (--src: key.jpg + key.txt per sample) or a table "
                                    "of image path + caption (--csv / --jsonl).")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", metavar="DIR_OR_TAR_GLOB", help="img2dataset output: a folder of *.tar, a tar, a "
                     "glob or a brace list ({00000..00099}.tar)")
    src.add_argument("--csv", metavar="FILE", help="CSV with a header row")
    src.add_argument("--jsonl", metavar="FILE", help="JSONL (or a JSON list) of objects")
    c.add_argument("--image-col", metavar="COL", help="image path column (default: image, else filepath, url, path)")
    c.add_argument("--caption-col", metavar="COL", help="caption column (default: caption, else text)")
    _common(c)
    c.set_defaults(fmt="captions")
    m = fmts.add_parser("medical", help="DICOM/PNG/JPEG + reports → chat, through the privacy gate",
                        description="Medical images with report text, consent and provenance "
                                    "(DIR/records.jsonl: id, image, report, consent, patient_id?) through the "
                                    "privacy gate: consent and policy checks, DICOM de-identification (PS3.15 "
                                    "Basic Profile), PHI in reports replaced by [CATEGORY] tags. Also writes "
                                    "privacy_report.json (counts per reason, policy hash). See docs/privacy.md.")
    m.add_argument("--src", required=True, metavar="DIR", help="folder with records.jsonl; image paths are "
                   "relative to it (or to --images)")
    m.add_argument("--policy", required=True, metavar="POLICY.yaml", help="the privacy policy "
                   "(configs/privacy/default-policy.yaml documents every field)")
    _common(m)
    m.set_defaults(fmt="medical", func=cmd_prep_medical)
