#!/usr/bin/env python
"""VLFeedback (MMInstruction/VLFeedback: 4 rated completions per prompt) → preference pairs for `prep dpo`.

    python data_prep/vlfeedback_to_dpo.py VLFeedback/data/*.parquet --out vlfeedback-dpo.jsonl
    vlmtrain prep dpo --json vlfeedback-dpo.jsonl --images VLFeedback/images --out shards/vlfeedback

A completion's score is the mean of its numeric aspect ratings (Helpfulness, Visual Faithfulness, Ethical
Considerations; non-numeric ratings are left out of the mean). `--pairs best-worst` (default) keeps one pair per
prompt, highest vs lowest score; `--pairs all` keeps every pair with a strict preference (ids `ID-i-j`).
Prompts whose completions all score the same carry no preference and are counted, not written.
Input: the dataset's parquet files (needs pyarrow) or JSONL rows of the same fields.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path


def score(completion: dict) -> float | None:
    """Mean numeric rating over the aspects; None when no aspect has a number."""
    ratings = []
    for aspect in (completion.get("annotations") or {}).values():
        try:
            ratings.append(float((aspect or {}).get("Rating")))
        except (TypeError, ValueError):
            continue
    return sum(ratings) / len(ratings) if ratings else None


def pairs(row: dict, mode: str = "best-worst") -> list[dict]:
    """Preference records (the `prep dpo` shape) for one VLFeedback row."""
    scored = [(s, c["response"]) for c in row.get("completions") or []
              if (s := score(c)) is not None and isinstance(c.get("response"), str)]
    base = {"image": row.get("img_path"), "prompt": row.get("prompt")}
    if mode == "best-worst":
        if len(scored) < 2:
            return []
        best, worst = max(scored, key=lambda x: x[0]), min(scored, key=lambda x: x[0])
        if best[0] == worst[0]:
            return []
        return [{"id": str(row.get("id")), **base, "chosen": best[1], "rejected": worst[1]}]
    out = []
    for (i, a), (j, b) in itertools.combinations(enumerate(scored), 2):
        if a[0] != b[0]:
            (ci, c), (ri, r) = ((i, a), (j, b)) if a[0] > b[0] else ((j, b), (i, a))
            out.append({"id": f"{row.get('id')}-{ci}-{ri}", **base, "chosen": c[1], "rejected": r[1]})
    return out


def rows(paths: list[str]):
    for path in paths:
        if path.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise SystemExit("error: reading parquet needs pyarrow (pip install pyarrow)") from None
            for batch in pq.ParquetFile(path).iter_batches(batch_size=512):
                yield from batch.to_pylist()
        else:
            with open(path, encoding="utf-8") as f:
                yield from (json.loads(line) for line in f if line.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="VLFeedback parquet or JSONL files")
    p.add_argument("--out", required=True, type=Path, help="output JSONL")
    p.add_argument("--pairs", choices=["best-worst", "all"], default="best-worst")
    args = p.parse_args(argv)
    n_rows = n_pairs = no_pref = 0
    with args.out.open("w", encoding="utf-8") as f:
        for row in rows(args.inputs):
            n_rows += 1
            made = pairs(row, args.pairs)
            no_pref += not made
            for rec in made:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n_pairs += len(made)
    print(f"{n_rows:,} prompts → {n_pairs:,} pairs in {args.out} ({no_pref:,} prompts without a preference)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
