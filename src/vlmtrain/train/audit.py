"""Empirical privacy audit of a trained stage: `vlmtrain privacy audit RUN`.

Two attacks, both black-box on the trained model's losses (they bound nothing; they show leakage when it happens):

- membership inference by loss threshold (Yeom et al. 2018): score = −(mean token loss of the record's answer);
  AUC over members (training records) vs non-members (held-out records of the same distribution). 0.5 = the model
  does not tell them apart; 1.0 = it always does. AUC from scikit-learn.
- canary exposure (Carlini et al. 2019, "The Secret Sharer"): at training time, copies of random training records
  get a random secret appended to the answer (" Reference code 471."); the audit ranks the true secret among all
  1,000 candidates by the model's loss. exposure = log2(1000) − log2(rank): ≈ 0–1 bits means not memorised, the
  maximum 9.97 bits means the secret is the model's top candidate.

Training-time part (`prepare_audit`, called by the runner when a stage has an `audit:` block): writes
`RUN/audit/{sources.json, members.json, canaries.json}` and the canary records as shards under `RUN/audit/canaries`,
added to the stage's training sources (proportionally weighted in a non-DP mixture; one more record each in DP).
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import torch
import yaml

from vlmtrain.data.encode import decode_image, encoder_for
from vlmtrain.data.schema import RecordError, Sample
from vlmtrain.data.writer import write_shards
from vlmtrain.errors import VlmtrainError

log = logging.getLogger("vlmtrain.privacy")

CANARY_DIGITS = 3  # candidate secrets 000..999
CANARY_TEMPLATE = " Reference code {secret}."


def _append_to_answer(record: dict, suffix: str) -> dict:
    """A copy of a chat record with `suffix` appended to its last assistant text."""
    rec = json.loads(json.dumps(record))
    for msg in reversed(rec.get("messages", [])):
        if msg["role"] == "assistant":
            parts = [p for p in msg["content"] if p.get("type") == "text"]
            if parts:
                parts[-1]["text"] = parts[-1]["text"].rstrip() + suffix
                return rec
    raise VlmtrainError(f"record {record.get('id')}: no assistant text to carry a canary")


def _raw_records(sources):
    """(record dict, image members) of every readable chat record in the sources."""
    from vlmtrain.data.loader import image_members
    from vlmtrain.data.shards import iter_shard

    for src in sources:
        for url in src.shard_urls():
            for raw in iter_shard(url):
                if "__error__" in raw or "json" not in raw:
                    continue
                try:
                    rec = json.loads(raw["json"])
                except ValueError:
                    continue
                if rec.get("kind", "chat") != "chat" or "messages" not in rec:
                    continue
                yield rec, [(k.split(".", 1)[1], raw[k]) for k in image_members(raw)]


def prepare_audit(audit, sources, holdout_source, run_dir: Path, encoder=None):
    """Write the audit's inputs into RUN/audit and return the training sources with the canary shards added.
    With `encoder`, canaries are only made from records that still fit the stage's max_len with the secret."""
    from vlmtrain.data.shards import Source

    out = Path(run_dir) / "audit"
    out.mkdir(parents=True, exist_ok=True)
    records = list(_raw_records(sources))
    if not records:
        raise VlmtrainError("audit: the training data has no chat records to audit")
    rng = random.Random(f"canaries:{audit.seed}")
    canaries, samples = [], []
    for k in range(audit.canaries):
        for _ in range(100):
            rec, images = records[rng.randrange(len(records))]
            secret = f"{rng.randrange(10 ** CANARY_DIGITS):0{CANARY_DIGITS}d}"
            if encoder is None or encoded_records(encoder, [(_append_to_answer(rec, CANARY_TEMPLATE.format(
                    secret="0" * CANARY_DIGITS)), images)]):
                break
        else:
            raise VlmtrainError("audit: no training record fits max_len with a canary appended")
        cid = f"canary-{k:03d}"
        canaries.append({"id": cid, "secret": secret, "base_id": rec["id"], "repeats": audit.canary_repeats})
        for r in range(audit.canary_repeats):
            rid = cid if r == 0 else f"{cid}-r{r}"
            samples.append(Sample(_append_to_answer({**rec, "id": rid}, CANARY_TEMPLATE.format(secret=secret)),
                                  images))
    (out / "canaries.json").write_text(json.dumps(canaries, indent=1))
    (out / "members.json").write_text(json.dumps(sorted(r["id"] for r, _ in records)))
    srcs = [str(s.path) for s in sources]
    (out / "sources.json").write_text(json.dumps({"train": srcs, "holdout": str(holdout_source.path)
                                                  if holdout_source else None}))
    if not samples:
        return list(sources)
    # one record per shard: the streaming loader needs at least one shard per rank × worker slot
    write_shards(samples, out / "canaries", "audit:canaries", shard_size=1, overwrite=True)
    weight = len(samples) / len(records) * sum(s.weight for s in sources) / len(sources)
    log.info(f"audit: {len(canaries)} canaries × {audit.canary_repeats} planted among {len(records)} records")
    return [*sources, Source(str(out / "canaries"), weight)]


# ---- the audit ----------------------------------------------------------------------------------------------------
def _stage_dir(run: Path) -> Path:
    """A stage directory with audit inputs: RUN itself, or the last stage of a recipe run that has them."""
    if (run / "audit" / "members.json").is_file():
        return run
    cands = sorted((p.parent.parent for p in run.glob("*/audit/members.json")), key=lambda p: p.stat().st_mtime)
    if not cands:
        raise VlmtrainError(f"{run}: no stage with audit inputs (add an `audit:` block to the stage and train it)")
    return cands[-1]


def encoded_records(encoder, items: list[tuple[dict, list]]) -> list[dict]:
    """Encode like training did; records training would have skipped (over length, ...) are left out here too."""
    out, decoded = [], {}
    for rec, imgs in items:
        if id(imgs) not in decoded:  # a canary's 1,000 candidates share one image list: decode it once
            decoded[id(imgs)] = [decode_image(data, rec["id"]) for _, data in imgs]
        try:
            out.append(encoder(rec, decoded[id(imgs)]))
        except RecordError:
            continue
    return out


@torch.no_grad()
def record_losses(model, pad_id: int, encs: list[dict], batch_size: int = 32, mean: bool = True) -> list[float]:
    from vlmtrain.data.batching import collate
    from vlmtrain.train.dp import per_sample_losses

    out: list[float] = []
    for i in range(0, len(encs), batch_size):
        out += per_sample_losses(model, collate(encs[i:i + batch_size], pad_id), mean=mean).tolist()
    return out


def _auc(member_losses: list[float], non_member_losses: list[float]) -> float:
    from sklearn.metrics import roc_auc_score

    y = [1] * len(member_losses) + [0] * len(non_member_losses)
    return float(roc_auc_score(y, [-x for x in member_losses + non_member_losses]))


def run_audit(run: str | Path, holdout: str | None = None, max_records: int | None = None) -> dict:
    """Membership AUC and canary exposure of a trained stage; also written to STAGE/privacy_audit.json."""
    from vlmtrain.data.shards import Source
    from vlmtrain.model.io import load_any

    stage_dir = _stage_dir(Path(run))
    cfg = json.loads((stage_dir / "audit" / "sources.json").read_text())
    stage = yaml.safe_load((stage_dir / "config.yaml").read_text())
    audit_cfg = stage.get("audit") or {}
    limit = max_records or audit_cfg.get("max_records", 1000)
    holdout = holdout or cfg["holdout"]
    if not holdout:
        raise VlmtrainError("audit: no held-out data (give --holdout SHARDS or audit.holdout in the stage)")
    bundle = load_any(stage_dir / "model")
    model = bundle.model.eval()
    d = stage["data"]  # encode exactly as the stage trained
    encoder = encoder_for(bundle, d["max_len"], d.get("caption_prompt", ""), d.get("anyres_pinpoints"))
    pad = bundle.tokenizer.pad_token_id
    members = set(json.loads((stage_dir / "audit" / "members.json").read_text()))
    rng = random.Random(audit_cfg.get("seed", 0))
    train = list(_raw_records([Source(p) for p in cfg["train"]]))
    mem = [x for x in train if x[0]["id"] in members]
    non = [x for x in _raw_records([Source(holdout)]) if x[0]["id"] not in members]
    if len(mem) < 2 or len(non) < 2:
        raise VlmtrainError(f"audit: need at least 2 members and 2 non-members (got {len(mem)} and {len(non)})")
    mem = encoded_records(encoder, rng.sample(mem, min(limit, len(mem))))
    non = encoded_records(encoder, rng.sample(non, min(limit, len(non))))
    log.info(f"audit: membership inference over {len(mem)} members and {len(non)} held-out records")
    lm, ln = record_losses(model, pad, mem), record_losses(model, pad, non)
    result = {"stage": str(stage_dir),
              "membership": {"attack": "loss-threshold", "auc": _auc(lm, ln), "members": len(lm),
                             "non_members": len(ln), "member_loss_mean": sum(lm) / len(lm),
                             "non_member_loss_mean": sum(ln) / len(ln), "holdout": holdout}}
    canaries = json.loads((stage_dir / "audit" / "canaries.json").read_text())
    if canaries:
        by_id = {r["id"]: (r, imgs) for r, imgs in train}
        space = 10 ** CANARY_DIGITS
        rows = []
        for k, c in enumerate(canaries):
            log.info(f"audit: canary {k + 1}/{len(canaries)}: ranking its secret among {space} candidates")
            rec, imgs = by_id[c["base_id"]]
            cands = [(_append_to_answer({**rec, "id": c["id"]},
                                        CANARY_TEMPLATE.format(secret=f"{s:0{CANARY_DIGITS}d}")), imgs)
                     for s in range(space)]
            # log-perplexity (summed token loss): candidates may tokenize into different numbers of tokens
            encs = encoded_records(encoder, cands)
            if len(encs) != space:
                raise VlmtrainError(f"audit: canary {c['id']}: some candidates do not encode (max_len too small?)")
            losses = record_losses(model, pad, encs, batch_size=100, mean=False)
            true = losses[int(c["secret"])]
            rank = 1 + sum(x < true for x in losses)
            rows.append({"id": c["id"], "repeats": c["repeats"], "rank": rank, "candidates": space,
                         "exposure": math.log2(space) - math.log2(rank)})
        result["canaries"] = {"items": rows, "exposure_mean": sum(r["exposure"] for r in rows) / len(rows),
                              "exposure_max_possible": math.log2(space)}
    summary = stage_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        if "privacy" in s:
            result["privacy"] = {k: s["privacy"][k] for k in ("epsilon", "delta", "noise_multiplier", "steps")}
    (stage_dir / "privacy_audit.json").write_text(json.dumps(result, indent=2))
    return result
