"""Each public format through the whole data path: `vlmtrain prep` → shards → loader → collated labels.

Invariant checked for every sample: the supervised tokens decode to exactly the assistant text (plus the turn's end
token), so no user/system token is ever supervised and no assistant token is lost.
"""

import json
import subprocess

import pytest

from conftest import TINY, VLMTRAIN, tiny_bundle
from vlmtrain.data.chat import IGNORE
from vlmtrain.data.encode import SampleEncoder
from vlmtrain.data.loader import ShardLoader


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from sklearn.datasets import load_digits
    from PIL import Image
    import numpy as np

    d = tmp_path_factory.mktemp("imgs")
    for i in range(4):
        x = load_digits().images[i]
        Image.fromarray((x * 15).astype(np.uint8), "L").resize((32, 32)).convert("RGB").save(d / f"{i}.png")
    return d


LLAVA = [
    {"id": "single", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat digit is this?"}, {"from": "gpt", "value": "zero"}]},
    {"id": "multi-turn", "image": "1.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat digit?"}, {"from": "gpt", "value": "one"},
        {"from": "human", "value": "Are you sure?"}, {"from": "gpt", "value": "yes, one"}]},
    {"id": "two-images", "image": ["2.png", "3.png"], "conversations": [
        {"from": "human", "value": "Compare <image> and <image>"}, {"from": "gpt", "value": "two then three"}]},
    {"id": "image-at-end", "image": "0.png", "conversations": [
        {"from": "human", "value": "Read this:\n<image>"}, {"from": "gpt", "value": "zero"}]},
    {"id": "text-only", "conversations": [
        {"from": "system", "value": "Be terse."}, {"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]},
    {"id": "missing-image", "image": "nope.png", "conversations": [
        {"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]},
]
SHAREGPT = [
    {"id": "s1", "images": ["1.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit?"}]},
        {"role": "assistant", "content": "one"}]},
    {"id": "s2", "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"},
                              {"role": "assistant", "content": "hello back"}]},
]
DPO = [{"id": "d1", "image": "2.png", "prompt": "<image>\nWhich digit?", "chosen": "two", "rejected": "seven"}]


def _prep(tmp_path, fmt, records, images, *extra):
    src = tmp_path / f"{fmt}.json"
    src.write_text(json.dumps(records))
    out = tmp_path / f"{fmt}-shards"
    r = subprocess.run([*VLMTRAIN, "prep", fmt, "--json", str(src), "--images", str(images), "--out", str(out),
                        *extra], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def _assistant_text(messages):
    return ["".join(p["text"] for p in m["content"] if p["type"] == "text")
            for m in messages if m["role"] == "assistant"]


def _read_all(out, bundle):
    m = bundle.model
    enc = SampleEncoder(bundle.tokenizer, bundle.image_processor, m.image_token_id, m.num_image_tokens)
    loader = ShardLoader(str(out), enc, bundle.tokenizer.pad_token_id, batch_size=3, num_workers=0, epochs=1,
                         keep_raw=True, max_bad_fraction=1.0)
    return [b for b in loader], loader


@pytest.mark.parametrize("fmt, records", [("llava", LLAVA), ("sharegpt", SHAREGPT)])
def test_chat_formats_supervise_exactly_the_assistant_turns(tmp_path, bundle, images, fmt, records):
    out = _prep(tmp_path, fmt, records, images)
    man = json.loads((out / "manifest.json").read_text())
    rejects = [json.loads(ln) for ln in (out / "rejects.jsonl").read_text().splitlines()]
    assert man["samples"] + man["rejected"] == len(records) == man["input_records"]
    assert len(rejects) == man["rejected"]
    if fmt == "llava":
        assert rejects == [{"id": "missing-image", "reason": "missing_image", **{k: v for k, v in rejects[0].items()
                                                                               if k not in ("id", "reason")}}]
    batches, loader = _read_all(out, bundle)
    tok, m = bundle.tokenizer, bundle.model
    seen = 0
    for b in batches:
        for row, rec in enumerate(b["records"]):
            lab = b["labels"][row]
            assert tok.decode(lab[lab != IGNORE]) == "".join(t + "<|end|>" for t in _assistant_text(rec["messages"]))
            n_img = sum(p == {"type": "image"} for msg in rec["messages"] for p in msg["content"])
            assert int((b["input_ids"][row] == m.image_token_id).sum()) == n_img * m.num_image_tokens
            seen += 1
    assert seen == man["samples"] and loader.skipped == {}


def test_dpo_format_supervises_each_side(tmp_path, bundle, images):
    out = _prep(tmp_path, "dpo", DPO, images)
    batches, _ = _read_all(out, bundle)
    b = batches[0]
    assert b["preference"]
    sup = [bundle.tokenizer.decode(r[r != IGNORE]) for r in b["labels"]]
    assert sup == ["two<|end|>", "seven<|end|>"]


def test_captions_format(tmp_path, bundle, images):
    csv = tmp_path / "caps.csv"
    csv.write_text("image,caption\n0.png,a handwritten zero\n1.png,a handwritten one\n")
    out = tmp_path / "caps"
    r = subprocess.run([*VLMTRAIN, "prep", "captions", "--csv", str(csv), "--images", str(images), "--out",
                        str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    batches, _ = _read_all(out, bundle)
    sup = sorted(bundle.tokenizer.decode(r[r != IGNORE]) for b in batches for r in b["labels"])
    assert sup == ["a handwritten one<|end|>", "a handwritten zero<|end|>"]


def test_data_inspect_json_contract(tmp_path, bundle, images):
    out = _prep(tmp_path, "llava", LLAVA, images)
    r = subprocess.run([*VLMTRAIN, "data", "inspect", str(out), "--config", str(TINY), "--n", "3", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in r.stdout.strip().splitlines()]
    assert len(rows) == 3
    tok = bundle.tokenizer
    for row in rows:
        assert {"id", "input_ids", "labels", "text", "supervised_text", "image_slots"} <= set(row)
        assert len(row["input_ids"]) == len(row["labels"])
        assert row["text"] == tok.decode(row["input_ids"])
        assert row["supervised_text"] == tok.decode([t for t in row["labels"] if t != -100])
        assert row["image_slots"] == row["input_ids"].count(bundle.model.image_token_id)
        assert row["supervised_text"].endswith("<|end|>")
    human = subprocess.run([*VLMTRAIN, "data", "inspect", str(out), "--config", str(TINY), "--n", "2"],
                           capture_output=True, text=True, timeout=300)
    assert human.returncode == 0 and "[[" in human.stdout and "<image×16>" in human.stdout
