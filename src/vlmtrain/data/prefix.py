"""Shared-prefix rows: several sequences that begin with the same tokens (a prompt and its images) laid out as one
row, the prefix once and each sequence's continuation after it: `[prefix | cont 1 | cont 2 | ... | cont k]`.

DPO puts a pair's chosen and rejected answers after one prompt (k = 2); GRPO puts a prompt's G completions after it
(k = G). Every token must see exactly the context it has in its own sequence, so a row carries:

- `segments [b, s]`: 0 on the prefix, j + 1 on continuation j, -1 on padding. A token may attend to a key of the
  prefix or of its own segment (and, being causal, only to keys on its left); continuations never see each other.
  `segment_attention_mask` turns this into the 4-D mask; native families add their own rules on top of the same
  segments (bidirectional image blocks, sliding windows by position: `vlmtrain.model.native.shared_prefix`).
- `position_ids [b, s]`: each continuation continues the prefix (position `n` after a prefix of `n` tokens), as in its
  own sequence. 3-D mRoPE ids are derived from these rows by the model (they need its `get_rope_index`).
- explicit scoring positions: token `t` of sequence j is predicted at the row position of its token `t - 1`, which for
  a continuation's first token is the last prefix position, not its left neighbour in the row:
  `logits_index [n, 2]` (row, position), `targets [n]`, `seq_index [n]` and `token_index [n]` (the target's index in
  its own sequence, for per-token log-probs). `order` numbers the sequences: `"continuation"` (default) makes
  sequence j of row i `j * b + i`, so DPO's `logps.chunk(2)` gives chosen, rejected; `"group"` makes it `i * k + j`,
  each row's k sequences contiguous, as GRPO's group-relative advantages take its G completions.

Hand-written: the layouts in TRL and ms-swift repeat the prompt per sequence; no library builds these rows.
"""

from __future__ import annotations

import torch

from vlmtrain.data.chat import IGNORE


def common_prefix_len(seqs: list[dict], token_keys: tuple[str, ...] = ()) -> int:
    """Tokens the sequences `{"input_ids", "labels", "token_extras"}` share at their start: equal ids, equal labels
    and equal per-token extras (`token_keys`, e.g. Gemma 3's `token_type_ids`)."""
    def column(x: dict, t: int) -> tuple:
        extras = x.get("token_extras", {})
        return (x["input_ids"][t], x["labels"][t], *(extras[k][t] if k in extras else 0 for k in token_keys))

    n = min(len(x["input_ids"]) for x in seqs)
    for t in range(n):
        first = column(seqs[0], t)
        if any(column(x, t) != first for x in seqs[1:]):
            return t
    return n


def shared_prefix_rows(groups: list[list[dict]], prefix_lens: list[int], pad_token_id: int,
                       order: str = "continuation") -> dict:
    """One row per group of k sequences sharing their first `prefix_lens[i]` tokens (see module doc).

    groups[i][j]: `{"input_ids": [s_j], "labels": [s_j], "token_extras": {key: [s_j]}}` (extras optional); every group
    has the same k ≥ 1; `order` "continuation" or "group" numbers them (module doc). Returns input_ids /
    position_ids / segments `[b, s_max]`, each per-token extra `[b, s_max]`
    (padded with 0, under `token_extras`), logits_index `[n, 2]`, targets `[n]`, seq_index `[n]`, token_index `[n]`,
    `n_seq` = k·b and
    `token_count` (the tokens of the k·b sequences laid out one per row, for throughput accounting)."""
    b, k = len(groups), len(groups[0])
    if order not in ("continuation", "group"):
        raise ValueError(f"order: 'continuation' or 'group', got {order!r}")
    if any(len(g) != k for g in groups):
        raise ValueError("shared-prefix rows need the same number of sequences per group; got "
                         f"{[len(g) for g in groups]}")
    keys = sorted({key for g in groups for x in g for key in x.get("token_extras", {})})
    rows = [_row(g, n, keys) for g, n in zip(groups, prefix_lens)]
    s_max = max(len(r["ids"]) for r in rows)
    input_ids = torch.full((b, s_max), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((b, s_max), dtype=torch.long)
    segments = torch.full((b, s_max), -1, dtype=torch.long)
    extras = {key: torch.zeros((b, s_max), dtype=torch.long) for key in keys}
    index, targets, seq, tok = [], [], [], []
    for i, r in enumerate(rows):
        m = len(r["ids"])
        input_ids[i, :m] = torch.tensor(r["ids"])
        position_ids[i, :m] = torch.tensor(r["pos"])
        position_ids[i, m:] = torch.arange(s_max - m)  # padding: its own causal block, never scored
        segments[i, :m] = torch.tensor(r["seg"])
        for key in keys:
            extras[key][i, :m] = torch.tensor(r["extras"][key])
        for j, (where, labels) in enumerate(zip(r["where"], r["labels"])):
            for t in range(1, len(labels)):
                if labels[t] != IGNORE:
                    index.append((i, where[t - 1]))
                    targets.append(labels[t])
                    seq.append(j * b + i if order == "continuation" else i * k + j)
                    tok.append(t)
    return {"input_ids": input_ids, "position_ids": position_ids, "segments": segments, "token_extras": extras,
            "logits_index": torch.tensor(index, dtype=torch.long).reshape(-1, 2),
            "targets": torch.tensor(targets, dtype=torch.long), "seq_index": torch.tensor(seq, dtype=torch.long),
            "token_index": torch.tensor(tok, dtype=torch.long), "n_seq": k * b,
            "token_count": sum(len(x["input_ids"]) for g in groups for x in g)}


def _row(group: list[dict], n: int, keys: list[str]) -> dict:
    """One group's row: ids, positions, segments and extras `[m]`; per sequence the row position of each of its
    tokens (`where`) and its labels."""
    first = group[0]
    ids, pos, seg = list(first["input_ids"][:n]), list(range(n)), [0] * n
    extras = {key: list(first.get("token_extras", {}).get(key, [0] * n)[:n]) for key in keys}
    where, labels = [], []
    for j, x in enumerate(group):
        start, rest = len(ids), len(x["input_ids"]) - n
        ids += x["input_ids"][n:]
        pos += range(n, n + rest)
        seg += [j + 1] * rest
        for key in keys:
            extras[key] += list(x.get("token_extras", {}).get(key, [0] * len(x["input_ids"]))[n:])
        where.append(list(range(n)) + list(range(start, start + rest)))
        labels.append(list(x["labels"]))
    return {"ids": ids, "pos": pos, "seg": seg, "extras": extras, "where": where, "labels": labels}


def segment_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """`segments [b, s]` → bool `[b, 1, s, s]` (True = may attend): causal, and a key is visible when it lies in the
    prefix (segment 0) or in the query's own segment. Padding (-1) sees the prefix and earlier padding, so no query
    row is fully masked (an all-masked softmax row is NaN)."""
    s = segments.shape[1]
    causal = torch.ones((s, s), dtype=torch.bool, device=segments.device).tril()
    q, kv = segments[:, :, None], segments[:, None, :]
    return (causal & ((kv == 0) | (kv == q)))[:, None]
