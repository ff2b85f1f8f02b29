"""`vlmtrain prep`: the contract shape (as a subprocess), exit codes, overwrite refusal, and token lengths with a
model config. Formats in detail: test_prep.py."""

import json
import re
import subprocess

import pytest

from conftest import TINY, VLMTRAIN
from test_prep import DPO, LLAVA, SHAREGPT, make_images, make_img2dataset, write_json, write_jsonl
from vlmtrain.cli.main import main
from vlmtrain.cli.prep import parse_size


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("prep_cli"))


def prep(*args, timeout=120):
    return subprocess.run([*VLMTRAIN, "prep", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def load(out):
    man = json.loads((out / "manifest.json").read_text())
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    return man, rejects


def test_contract_shape_exit_codes_and_overwrite(tmp_path, images):
    src = write_json(tmp_path / "llava.json", LLAVA)
    out = tmp_path / "shards"
    r = prep("llava", "--json", src, "--images", images, "--out", out, "--progress-every", 5, "--shard-size", 4)
    assert r.returncode == 0, r.stderr
    man, rejects = load(out)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert (man["samples"], man["rejected"], man["input_records"]) == (7, 11, len(LLAVA))
    assert all({"id", "reason"} <= set(x) for x in rejects) and len(rejects) == 11
    # one summary line on stdout; progress lines with rate and ETA on stderr
    assert r.stdout.strip().splitlines() == [
        f"prep llava: kept 7 of 18 records, rejected 11 (empty_turns 2, image_slot_mismatch 2, malformed_turns 2, "
        f"bad_json 1, duplicate_id 1, missing_field 1, missing_image 1, undecodable_image 1); 2 shard(s) in {out}"]
    progress = [x for x in r.stderr.splitlines() if x.startswith("prep: ")]
    assert progress and all(re.fullmatch(r"prep: \d+/18 records  [\d,]+ rec/s  kept \d+  rejected \d+  ETA \d+m\d\ds",
                                         x) for x in progress), progress

    again = prep("llava", "--json", src, "--images", images, "--out", out)
    assert again.returncode == 1
    assert again.stderr.strip() == f"error: {out}: already holds a manifest.json; pass --overwrite to replace it"
    assert prep("llava", "--json", src, "--images", images, "--out", out, "--overwrite").returncode == 0


def test_nothing_usable_is_exit_1_with_one_error_line(tmp_path, images):
    src = write_jsonl(tmp_path / "bad.jsonl", ['{"id": ', LLAVA[9]])  # a bad line and a missing image
    r = prep("llava", "--json", src, "--images", images, "--out", tmp_path / "o")
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 1 and r.stdout == ""
    assert errors == [f"error: no usable samples: all 2 records rejected (bad_json 1, missing_image 1); "
                      f"see {tmp_path / 'o' / 'rejects.jsonl'}"]
    assert load(tmp_path / "o")[0]["samples"] == 0


def test_other_formats_contract_shape(tmp_path, images, capsys):
    cases = {
        "sharegpt": ["--json", write_jsonl(tmp_path / "m.jsonl", SHAREGPT), "--images", images],
        "messages": ["--jsonl", write_jsonl(tmp_path / "m2.jsonl", SHAREGPT), "--images", images],
        "dpo": ["--json", write_json(tmp_path / "d.json", DPO), "--images", images],
        "captions": ["--src", make_img2dataset(tmp_path)],
    }
    for name, args in cases.items():
        out = tmp_path / f"out-{name}"
        assert main(["prep", name, *map(str, args), "--out", str(out)]) == 0
        man, rejects = load(out)
        assert man["samples"] > 0 and man["samples"] + man["rejected"] == man["input_records"] == {
            "sharegpt": len(SHAREGPT), "messages": len(SHAREGPT), "dpo": len(DPO), "captions": 5}[name]
        assert len(rejects) == man["rejected"] and list(out.glob("shard-*.tar"))
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("url,text\na.jpg,zero\nb.png,one\n")
    assert main(["prep", "captions", "--csv", str(csv_path), "--images", str(images), "--out",
                 str(tmp_path / "out-csv")]) == 0
    assert load(tmp_path / "out-csv")[0]["kinds"] == {"caption": 2}
    assert "prep captions: kept 2 of 2 records, rejected 0;" in capsys.readouterr().out


def test_config_gives_token_lengths_and_over_length_rejects(tmp_path, images, capsys):
    src = write_json(tmp_path / "d.json", DPO[:4])  # four usable pairs, different lengths
    out = tmp_path / "tok"
    assert main(["prep", "dpo", "--json", str(src), "--images", str(images), "--out", str(out),
                 "--config", str(TINY)]) == 0
    man, _ = load(out)
    assert man["length_unit"] == "tokens" and man["options"]["config"] == str(TINY)
    lengths = man["length_index"]["shard-000000.tar"]
    # the tiny model spends 16 slots per image: 1 image, 2 images, 1 image, text-only
    assert len(lengths) == 4 and lengths[0] > 16 and lengths[1] > 32 and lengths[2] > 16 and lengths[3] < 16
    cut = sorted(lengths)[1]  # keep the two shortest
    assert main(["prep", "dpo", "--json", str(src), "--images", str(images), "--out", str(out), "--overwrite",
                 "--config", str(TINY), "--max-len", str(cut)]) == 0
    man, rejects = load(out)
    assert man["length_index"]["shard-000000.tar"] == [n for n in lengths if n <= cut]
    assert man["rejected_by_reason"] == {"over_length": 2} and all(r["reason"] == "over_length" for r in rejects)
    assert main(["prep", "dpo", "--json", str(src), "--out", str(tmp_path / "x"), "--max-len", "9"]) == 1
    assert "--max-len counts tokens" in capsys.readouterr().err


def test_parse_size():
    assert [parse_size(s) for s in ["1000", "1e9", "500M", "1G", "2GiB", "64kb"]] == [
        1000, 10**9, 500 * 10**6, 10**9, 2 * 2**30, 64000]
