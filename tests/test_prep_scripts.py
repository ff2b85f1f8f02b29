"""data_prep/ scripts: Hugging Face parquet export and VLFeedback pairing feed `prep dpo` end to end."""

import io
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from test_prep import convert, digit

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def script(name, *args):
    r = subprocess.run([sys.executable, str(ROOT / "data_prep" / name), *map(str, args)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def png_bytes(i):
    buf = io.BytesIO()
    digit(i).save(buf, format="PNG")
    return buf.getvalue()


def test_rlaifv_style_parquet_to_shards(tmp_path):
    rows = {  # RLAIF-V's columns: the image embedded as {"bytes", "path"}, no id column (idx is not unique)
        "ds_name": ["a", "b", "c"],
        "image": [{"bytes": png_bytes(0), "path": "x.png"}, {"bytes": png_bytes(1), "path": None},
                  {"bytes": b"not an image", "path": "y.jpg"}],
        "question": ["What digit?", "Which digit?", "Broken?"],
        "chosen": ["zero", "one", "x"], "rejected": ["six", "seven", "y"],
        "idx": ["0", "0", "1"],
    }
    pq.write_table(pa.table(rows), tmp_path / "part-000.parquet")
    script("parquet_to_jsonl.py", tmp_path / "part-000.parquet", "--out", tmp_path / "rlaif")
    lines = [json.loads(x) for x in (tmp_path / "rlaif" / "data.jsonl").read_text().splitlines()]
    assert [x["image"] for x in lines] == ["images/000000000.png", "images/000000001.png", "images/000000002.jpg"]
    assert (tmp_path / "rlaif" / lines[1]["image"]).read_bytes() == png_bytes(1)

    man, rejects, got = convert("dpo", tmp_path / "shards", path=tmp_path / "rlaif" / "data.jsonl")
    assert man["samples"] == 2 and [(r["id"], r["reason"]) for r in rejects] == [("dpo-2", "undecodable_image")]
    rec, imgs = got["dpo-0"]
    assert rec["prompt"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "What digit?"}]
    assert imgs == [("img0.png", png_bytes(0))]


def vlf_completion(response, *ratings):
    aspects = ["Helpfulness", "Visual Faithfulness", "Ethical Considerations"]
    return {"annotations": {a: {"Rating": r, "Rationale": "..."} for a, r in zip(aspects, ratings)},
            "model": "m", "response": response}


def test_vlfeedback_pairs(tmp_path):
    rows = [
        {"id": "p1", "prompt": "Describe.", "img_path": "a.jpg",
         "completions": [vlf_completion("good", "5", "5", "5"), vlf_completion("bad", "1", "2", "N/A"),
                         vlf_completion("mid", "3", "3", "3")]},
        {"id": "p2", "prompt": "Same?", "img_path": "b.png",
         "completions": [vlf_completion("x", "4", "4", "4"), vlf_completion("y", "4", "4", "4")]},
    ]
    src = tmp_path / "vlf.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = script("vlfeedback_to_dpo.py", src, "--out", tmp_path / "best.jsonl")
    best = [json.loads(x) for x in (tmp_path / "best.jsonl").read_text().splitlines()]
    assert best == [{"id": "p1", "image": "a.jpg", "prompt": "Describe.", "chosen": "good", "rejected": "bad"}]
    assert "2 prompts → 1 pairs" in r.stderr and "1 prompts without a preference" in r.stderr
    script("vlfeedback_to_dpo.py", src, "--out", tmp_path / "all.jsonl", "--pairs", "all")
    every = [json.loads(x) for x in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [(x["id"], x["chosen"], x["rejected"]) for x in every] == [
        ("p1-0-1", "good", "bad"), ("p1-0-2", "good", "mid"), ("p1-2-1", "mid", "bad")]
