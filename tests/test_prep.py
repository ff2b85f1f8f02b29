"""Format readers + shard writer (library level): every format's shapes round-trip through the tars, and every
malformed input becomes the right reject reason with counts that add up. CLI tests: test_prep_cli.py."""

import copy
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmtrain.data.encode import record_token_length
from vlmtrain.data.formats import Reject, read_format
from vlmtrain.data.schema import IMAGE_PART, REASONS, Sample, text
from vlmtrain.data.writer import TokenLength, prepare_out_dir, write_shards
from vlmtrain.errors import VlmtrainError

IMG = IMAGE_PART


# ---- fixtures ------------------------------------------------------------------------------------------------

def digit(i: int, size: int = 32) -> Image.Image:
    from sklearn.datasets import load_digits

    x = load_digits().images[i]
    return Image.fromarray((x * (255 / 16)).astype(np.uint8), "L").resize((size, size)).convert("RGB")


def make_images(root: Path) -> Path:
    """a.jpg, b.png, sub/c.JPEG, noext (a PNG without extension), trunc.jpg (half a JPEG)."""
    d = root / "images"
    (d / "sub").mkdir(parents=True)
    digit(0).save(d / "a.jpg", quality=90)
    digit(1).save(d / "b.png")
    digit(2).save(d / "sub" / "c.JPEG", format="JPEG")
    digit(3).save(d / "noext", format="PNG")
    data = (d / "a.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(data[: len(data) // 2])
    return d


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("prep"))


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def convert(fmt: str, out: Path, workers: int = 2, **opts) -> tuple[dict, list[dict], dict]:
    """Run a reader + the writer; return (manifest, rejects lines, {id: (record, [(member, bytes)])})."""
    source = read_format(fmt, **opts)
    man = write_shards(source.samples(workers), out, source.name)
    assert json.loads((out / "manifest.json").read_text()) == man
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    return man, rejects, read_tars(out, man)


def read_tars(out: Path, man: dict) -> dict:
    samples: dict = {}
    for shard in man["shards"]:
        with tarfile.open(out / shard["name"]) as tf:
            groups: dict = {}
            for m in tf.getmembers():
                key, _, member = m.name.partition(".")
                groups.setdefault(key, {})[member] = tf.extractfile(m).read()
        for key, g in sorted(groups.items()):
            rec = json.loads(g.pop("json").decode("utf-8"))
            imgs = sorted(g.items(), key=lambda kv: int(kv[0].split(".")[0][3:]))
            samples[rec["id"]] = (rec, imgs)
    return samples


def reasons(rejects: list[dict]) -> dict:
    return {r["id"]: r["reason"] for r in rejects}


def check_counts(man: dict, rejects: list[dict], n_input: int) -> None:
    assert man["input_records"] == n_input
    assert man["samples"] + man["rejected"] == n_input
    assert man["rejected"] == len(rejects) == sum(man["rejected_by_reason"].values())
    assert sum(s["samples"] for s in man["shards"]) == man["samples"] == sum(man["kinds"].values())
    assert all(set(r) <= {"id", "reason", "detail", "line"} and r["reason"] in REASONS for r in rejects)


def user(*parts):
    return {"role": "user", "content": list(parts)}


def assistant(s):
    return {"role": "assistant", "content": [text(s)]}


def turn(who, value):
    return {"from": who, "value": value}


# ---- llava ---------------------------------------------------------------------------------------------------

LLAVA = [
    {"id": "multiturn", "image": "a.jpg", "conversations": [
        turn("human", "<image>\nWhat digit is this?"), turn("gpt", "zero"),
        turn("human", "Are you sure?"), turn("gpt", "Yes, zero.")]},
    {"id": "multiimage", "image": ["a.jpg", "b.png"], "conversations": [
        turn("human", "Compare <image> and <image>\nwhich is larger?"), turn("gpt", "one")]},
    {"id": "textonly", "conversations": [
        turn("system", "Be brief."), turn("human", "Say hi"), turn("gpt", "hi")]},
    {"id": "at-end", "image": "sub/c.JPEG", "conversations": [
        turn("human", "Describe this.\n<image>"), turn("gpt", "A two.")]},
    {"id": "no-placeholder", "image": "b.png", "conversations": [
        turn("human", "What is it?"), turn("gpt", "one")]},
    {"id": "noext", "image": "noext", "conversations": [turn("human", "<image>"), turn("gpt", "three")]},
    {"conversations": [turn("human", "no id here"), turn("gpt", "ok")]},
    # malformed, one per reason
    {"id": "two-slots-one-image", "image": "a.jpg", "conversations": [
        turn("human", "<image> vs <image>"), turn("gpt", "x")]},
    {"id": "slot-no-image", "conversations": [turn("human", "<image> what?"), turn("gpt", "x")]},
    {"id": "missing", "image": "nope.jpg", "conversations": [turn("human", "<image>"), turn("gpt", "x")]},
    {"id": "truncated", "image": "trunc.jpg", "conversations": [turn("human", "<image>"), turn("gpt", "x")]},
    {"id": "empty-turn", "image": "a.jpg", "conversations": [turn("human", "<image>"), turn("gpt", "")]},
    {"id": "no-turns", "conversations": []},
    {"id": "bad-role", "conversations": [turn("function", "call"), turn("gpt", "x")]},
    {"id": "image-in-answer", "image": "a.jpg", "conversations": [turn("human", "hi"), turn("gpt", "<image>")]},
    {"id": "no-conversations", "image": "a.jpg"},
    {"id": "multiturn", "conversations": [turn("human", "again"), turn("gpt", "dup")]},
    7,
]


def test_llava_shapes_round_trip_and_rejects(tmp_path, images):
    src = write_json(tmp_path / "llava.json", LLAVA)
    man, rejects, got = convert("llava", tmp_path / "out", path=src, images=images)
    check_counts(man, rejects, len(LLAVA))
    assert man["samples"] == 7 and man["kinds"] == {"chat": 7} and man["source_format"] == "llava"
    assert reasons(rejects) == {
        "two-slots-one-image": "image_slot_mismatch", "slot-no-image": "image_slot_mismatch",
        "missing": "missing_image", "truncated": "undecodable_image", "empty-turn": "empty_turns",
        "no-turns": "empty_turns", "bad-role": "malformed_turns", "image-in-answer": "malformed_turns",
        "no-conversations": "missing_field", "multiturn": "duplicate_id", "llava-17": "bad_json"}
    assert man["rejected_by_reason"] == {"bad_json": 1, "duplicate_id": 1, "empty_turns": 2, "image_slot_mismatch": 2,
                                         "malformed_turns": 2, "missing_field": 1, "missing_image": 1,
                                         "undecodable_image": 1}

    rec, imgs = got["multiturn"]
    assert rec["messages"] == [user(IMG, text("What digit is this?")), assistant("zero"),
                               user(text("Are you sure?")), assistant("Yes, zero.")]
    assert rec["kind"] == "chat" and rec["source"] == "llava" and rec["meta"] == {"images": ["a.jpg"]}
    assert imgs == [("img0.jpg", (images / "a.jpg").read_bytes())]  # original bytes, not re-encoded

    rec, imgs = got["multiimage"]
    assert rec["messages"][0] == user(text("Compare "), IMG, text(" and "), IMG, text("which is larger?"))
    assert imgs == [("img0.jpg", (images / "a.jpg").read_bytes()), ("img1.png", (images / "b.png").read_bytes())]

    rec, imgs = got["textonly"]
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"] and imgs == []

    rec, imgs = got["at-end"]
    assert rec["messages"][0] == user(text("Describe this."), IMG)
    assert imgs == [("img0.jpg", (images / "sub" / "c.JPEG").read_bytes())]  # .JPEG → jpg

    assert got["no-placeholder"][0]["messages"][0] == user(IMG, text("What is it?"))
    assert got["noext"][1][0][0] == "img0.png"  # no extension: taken from the detected format
    assert got["llava-6"][0]["messages"][0] == user(text("no id here"))

    by_id = {r["id"]: r for r in rejects}
    assert by_id["missing"]["detail"] == "image 0 (nope.jpg): no such file"
    assert "2 <image> placeholder(s) but 1 image(s)" in by_id["two-slots-one-image"]["detail"]
    raw = (tmp_path / "out" / "rejects.jsonl").read_text()
    assert "vs" not in raw and "what?" not in raw  # rejects never carry the record's text


def test_llava_jsonl_bad_line_and_blank_lines(tmp_path, images):
    src = write_jsonl(tmp_path / "llava.jsonl", [LLAVA[0], "", '{"id": "broken", "image": ', LLAVA[2], "[1, 2]"])
    man, rejects, got = convert("llava", tmp_path / "out", path=src, images=images)
    check_counts(man, rejects, 4)  # the blank line is not a record
    assert sorted(got) == ["multiturn", "textonly"]
    assert [(r["id"], r["reason"], r["line"]) for r in rejects] == [("llava-1", "bad_json", 3),
                                                                   ("llava-3", "bad_json", 5)]


def test_llava_unparseable_json_list_is_one_user_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "a"}, {"id": ')
    with pytest.raises(VlmtrainError, match="not a valid JSON list"):
        read_format("llava", path=bad)
    with pytest.raises(VlmtrainError, match="no such file"):
        read_format("llava", path=tmp_path / "nope.json")
    with pytest.raises(VlmtrainError, match="no such image folder"):
        read_format("llava", path=write_json(tmp_path / "ok.json", LLAVA), images=tmp_path / "nope")


def test_ids_index_policy_renumbers_and_keeps_source_id(tmp_path, images):
    recs = [LLAVA[2], {**LLAVA[2], "conversations": LLAVA[2]["conversations"][1:]}]  # same id twice
    src = write_json(tmp_path / "l.json", recs)
    man, rejects, got = convert("llava", tmp_path / "out", path=src, images=images, ids="index")
    assert man["samples"] == 2 and rejects == []
    assert got["llava-0"][0]["meta"] == {"source_id": "textonly"} and "llava-1" in got


# ---- sharegpt / messages -------------------------------------------------------------------------------------

SHAREGPT = [
    {"id": "parts", "images": ["a.jpg", "b.png"], "messages": [
        {"role": "system", "content": "You see digits."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "vs"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The first."}]},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Rounder."}]},
    {"id": "string-end", "images": ["sub/c.JPEG"], "messages": [
        {"role": "user", "content": "Read this:\n<image>"}, {"role": "assistant", "content": "two"}]},
    {"id": "sharegpt-conv", "image": "a.jpg", "conversations": [turn("human", "<image>\nDigit?"), turn("gpt", "0")]},
    {"id": "text", "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    {"id": "url-part", "images": ["a.jpg"], "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": "x"}]},
    {"id": "too-many-slots", "images": ["a.jpg"], "messages": [
        {"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "x"}]},
    {"id": "no-messages", "messages": []},
    {"id": "no-answer", "messages": [{"role": "user", "content": "hello?"}]},
    {"id": "remote", "images": ["https://example.com/a.jpg"], "messages": [
        {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}]},
]


@pytest.mark.parametrize("name", ["sharegpt", "messages"])
def test_sharegpt_shapes_round_trip_and_rejects(tmp_path, images, name):
    src = write_jsonl(tmp_path / "m.jsonl", SHAREGPT)
    man, rejects, got = convert(name, tmp_path / "out", path=src, images=images)
    check_counts(man, rejects, len(SHAREGPT))
    assert man["source_format"] == "sharegpt" and man["samples"] == 4
    assert reasons(rejects) == {"url-part": "malformed_turns", "too-many-slots": "image_slot_mismatch",
                                "no-messages": "empty_turns", "no-answer": "malformed_turns",
                                "remote": "missing_image"}
    rec, imgs = got["parts"]
    assert rec["messages"][:3] == [{"role": "system", "content": [text("You see digits.")]},
                                   user(IMG, text("vs"), IMG), assistant("The first.")]
    assert rec["messages"][3:] == [user(text("Why?")), assistant("Rounder.")]
    assert [m for m, _ in imgs] == ["img0.jpg", "img1.png"]
    assert imgs[1][1] == (images / "b.png").read_bytes()
    assert got["string-end"][0]["messages"][0] == user(text("Read this:"), IMG)
    assert got["sharegpt-conv"][0]["messages"] == [user(IMG, text("Digit?")), assistant("0")]
    assert got["text"][1] == []


# ---- captions ------------------------------------------------------------------------------------------------

def test_captions_csv_round_trip_and_rejects(tmp_path, images):
    csv_path = tmp_path / "caps.csv"
    csv_path.write_text("image,caption\n"
                        "a.jpg,a handwritten zero\n"
                        "b.png,\"one, in gray\"\n"
                        "nope.jpg,missing file\n"
                        "trunc.jpg,truncated\n"
                        "a.jpg,\n"
                        "https://example.com/x.jpg,remote\n"
                        "a.jpg,has <image> inside\n")
    man, rejects, got = convert("captions", tmp_path / "out", csv=csv_path, images=images)
    check_counts(man, rejects, 7)
    assert man["kinds"] == {"caption": 2}
    assert sorted(reasons(rejects).values()) == ["empty_turns", "image_slot_mismatch", "missing_image",
                                                 "missing_image", "undecodable_image"]
    assert [r["line"] for r in rejects] == [4, 5, 6, 7, 8]
    rec, imgs = got["captions-1"]
    assert rec == {"id": "captions-1", "kind": "caption", "caption": "one, in gray", "source": "captions",
                   "meta": {"images": ["b.png"]}}
    assert imgs == [("img0.png", (images / "b.png").read_bytes())]


def test_captions_jsonl_with_img2dataset_column_names(tmp_path, images):
    src = write_jsonl(tmp_path / "caps.jsonl", [
        {"key": "k0", "filepath": str(images / "a.jpg"), "text": "zero"},   # absolute path
        {"key": "k1", "filepath": "file://" + str(images / "b.png"), "text": "one"},
        {"key": "k2", "text": "no image"}])
    man, rejects, got = convert("captions", tmp_path / "out", jsonl=src)
    check_counts(man, rejects, 3)
    assert got["k0"][0]["caption"] == "zero" and got["k1"][1][0][0] == "img0.png"
    assert reasons(rejects) == {"k2": "missing_field"}


def test_captions_csv_without_known_columns_is_a_user_error(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("picture,words\na.jpg,zero\n")
    with pytest.raises(VlmtrainError, match="no image column"):
        read_format("captions", csv=p)
    source = read_format("captions", csv=p, image_col="picture", caption_col="words")
    assert source.total == 1


def make_img2dataset(root: Path) -> Path:
    """Two img2dataset-style shards with their _stats.json (key.jpg/.png + .txt + .json per sample)."""
    d = root / "i2d"
    d.mkdir()
    jpg = io.BytesIO()
    digit(4).save(jpg, format="JPEG")
    png = io.BytesIO()
    digit(5).save(png, format="PNG")
    shards = {
        "00000": [("000000000", {"jpg": jpg.getvalue(), "txt": b"a four\n", "json": b'{"caption": "a four"}'}),
                  ("000000001", {"png": png.getvalue(), "txt": b"a five"})],
        "00001": [("000010000", {"jpg": jpg.getvalue(), "json": b'{"caption": "four from json"}'}),
                  ("000010001", {"txt": b"caption without image"}),
                  ("000010002", {"jpg": jpg.getvalue()[:100], "txt": b"truncated"})],
    }
    for name, samples in shards.items():
        with tarfile.open(d / f"{name}.tar", "w") as tf:
            for key, members in samples:
                for ext, data in members.items():
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        (d / f"{name}_stats.json").write_text(json.dumps({"successes": len(samples)}))
    return d


def test_captions_img2dataset_tars(tmp_path):
    d = make_img2dataset(tmp_path)
    source = read_format("captions", src=d)
    assert source.total == 5 and len(source.inputs) == 2
    man, rejects, got = convert("captions", tmp_path / "out", src=str(d / "*.tar"))
    check_counts(man, rejects, 5)
    assert reasons(rejects) == {"000010001": "missing_image", "000010002": "undecodable_image"}
    assert got["000000000"][0]["caption"] == "a four" and got["000000000"][1][0][0] == "img0.jpg"
    assert got["000000001"][1][0][0] == "img0.png"
    assert got["000010000"][0]["caption"] == "four from json"
    assert "meta" not in got["000000000"][0]


def test_captions_truncated_source_tar_keeps_what_it_read_and_warns(tmp_path):
    d = make_img2dataset(tmp_path)
    data = (d / "00001.tar").read_bytes()
    (d / "00001.tar").write_bytes(data[:1200])  # ends inside the second member
    source = read_format("captions", src=d)
    items = list(source.samples())
    assert len(items) >= 2 and source.warnings and "00001.tar" in source.warnings[0]


# ---- dpo -----------------------------------------------------------------------------------------------------

DPO = [
    {"id": "str", "image": "a.jpg", "prompt": "What digit?\n<image>", "chosen": "zero", "rejected": "eight"},
    {"id": "rlaifv", "image": ["a.jpg", "b.png"], "question": "Which is bigger?", "chosen": "the second",
     "rejected": "the first"},
    {"id": "conv", "images": ["b.png"],
     "prompt": [{"role": "system", "content": "Be exact."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Digit?"}]},
                {"role": "assistant", "content": "one"}, {"role": "user", "content": "Sure?"}],
     "chosen": [{"role": "assistant", "content": "Yes."}], "rejected": [{"role": "assistant", "content": "No."}]},
    {"id": "text", "prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"id": "image-in-answer", "image": "a.jpg", "prompt": "<image>", "chosen": "<image> this", "rejected": "x"},
    {"id": "empty-rejected", "prompt": "hi", "chosen": "hello", "rejected": ""},
    {"id": "no-chosen", "prompt": "hi", "rejected": "x"},
    {"id": "extra-slot", "image": "a.jpg", "prompt": "<image> and <image>", "chosen": "a", "rejected": "b"},
    {"id": "missing", "image": "gone.png", "prompt": "<image>", "chosen": "a", "rejected": "b"},
]


def test_dpo_shapes_round_trip_and_rejects(tmp_path, images):
    src = write_json(tmp_path / "dpo.json", DPO)
    man, rejects, got = convert("dpo", tmp_path / "out", path=src, images=images)
    check_counts(man, rejects, len(DPO))
    assert man["kinds"] == {"preference": 4}
    assert reasons(rejects) == {"image-in-answer": "image_slot_mismatch", "empty-rejected": "empty_turns",
                                "no-chosen": "missing_field", "extra-slot": "image_slot_mismatch",
                                "missing": "missing_image"}
    rec, imgs = got["str"]
    assert rec["prompt"] == [user(text("What digit?"), IMG)]
    assert rec["chosen"] == [assistant("zero")] and rec["rejected"] == [assistant("eight")]
    assert imgs == [("img0.jpg", (images / "a.jpg").read_bytes())]
    rec, imgs = got["rlaifv"]
    assert rec["prompt"] == [user(IMG, IMG, text("Which is bigger?"))] and len(imgs) == 2
    rec, _ = got["conv"]
    assert [m["role"] for m in rec["prompt"]] == ["system", "user", "assistant", "user"]
    assert rec["prompt"][1] == user(IMG, text("Digit?")) and rec["chosen"] == [assistant("Yes.")]
    assert got["text"][1] == [] and got["text"][0]["prompt"] == [user(text("2+2?"))]


# ---- writer --------------------------------------------------------------------------------------------------

def chat_sample(i: int, n_chars: int = 5) -> Sample:
    rec = {"id": f"s{i}", "kind": "chat", "messages": [user(IMG, text("q")), assistant("x" * n_chars)]}
    return Sample(rec, [("png", f"fake-png-{i}".encode())])


def test_shards_rotate_by_count_with_length_index(tmp_path):
    items = [chat_sample(i, n_chars=i + 1) for i in range(5)] + [Reject("r", "bad_json", "line 9", 9)]
    man = write_shards(items, tmp_path / "o", "llava", shard_size=2)
    assert [(s["name"], s["samples"]) for s in man["shards"]] == [
        ("shard-000000.tar", 2), ("shard-000001.tar", 2), ("shard-000002.tar", 1)]
    assert all(s["bytes"] == (tmp_path / "o" / s["name"]).stat().st_size > 0 for s in man["shards"])
    # chars: "q" + answer (images count 0), in shard order
    assert man["length_index"] == {"shard-000000.tar": [2, 3], "shard-000001.tar": [4, 5], "shard-000002.tar": [6]}
    assert man["length_unit"] == "chars"
    assert man["stats"]["length"] == {"min": 2, "mean": 4.0, "p50": 4, "p95": 6, "max": 6}
    assert man["stats"]["images_per_sample"]["total"] == 5
    assert man["format"] == "vlmtrain-shards/1" and man["rejected_by_reason"] == {"bad_json": 1}

    import webdataset as wds  # the shards read back with the library the loader uses
    keys = [(s["__key__"], sorted(k for k in s if not k.startswith("__")))
            for s in wds.WebDataset([str(tmp_path / "o" / s["name"]) for s in man["shards"]], shardshuffle=False)]
    assert keys == [(f"{i:09d}", ["img0.png", "json"]) for i in range(5)]


def test_shards_rotate_by_bytes_and_are_reproducible(tmp_path):
    man = write_shards([chat_sample(i) for i in range(3)], tmp_path / "o", "llava", shard_bytes=1)
    assert [s["samples"] for s in man["shards"]] == [1, 1, 1]
    write_shards([chat_sample(i) for i in range(3)], tmp_path / "o2", "llava", shard_bytes=1)
    assert all((tmp_path / "o" / s["name"]).read_bytes() == (tmp_path / "o2" / s["name"]).read_bytes()
               for s in man["shards"])


def test_writer_rechecks_records_from_any_reader(tmp_path):
    bad = Sample({"id": "x", "kind": "chat", "messages": [user(IMG, text("q")), assistant("a")]}, [])
    man = write_shards([bad, chat_sample(1)], tmp_path / "o", "llava")
    assert man["rejected_by_reason"] == {"image_slot_mismatch": 1} and man["samples"] == 1


def test_token_lengths_over_length_and_unbuildable_masks(tmp_path, tiny):
    m = tiny.model
    short, long_ = chat_sample(0, 3), chat_sample(1, 300)
    n_short = record_token_length(tiny.tokenizer, short.record, m.image_token_id, m.num_image_tokens)
    n_long = record_token_length(tiny.tokenizer, long_.record, m.image_token_id, m.num_image_tokens)
    assert n_short >= m.num_image_tokens + 2 and n_long > n_short
    measure = TokenLength(tiny.tokenizer, m.image_token_id, m.num_image_tokens, max_len=n_long - 1)
    man = write_shards([short, long_], tmp_path / "o", "llava", measure=measure)
    assert man["length_unit"] == "tokens" and man["length_index"] == {"shard-000000.tar": [n_short]}
    assert man["rejected_by_reason"] == {"over_length": 1}
    assert f"{n_long} tokens > max_len {n_long - 1}" in (tmp_path / "o" / "rejects.jsonl").read_text()

    no_generation = copy.deepcopy(tiny.tokenizer)  # a template without {% generation %} supervises nothing
    no_generation.chat_template = ("{% for m in messages %}{% for p in m['content'] %}{% if p['type'] == 'text' %}"
                                   "{{ p['text'] }}{% else %}<image>{% endif %}{% endfor %}{% endfor %}")
    measure = TokenLength(no_generation, m.image_token_id, m.num_image_tokens)
    man = write_shards([short], tmp_path / "o2", "llava", measure=measure)
    assert man["rejected_by_reason"] == {"mask_unbuildable": 1} and man["samples"] == 0 and man["shards"] == []
    assert not list((tmp_path / "o2").glob("*.tar"))


def test_out_dir_refuses_an_earlier_run_and_overwrite_removes_only_its_files(tmp_path):
    out = tmp_path / "o"
    write_shards([chat_sample(0)], out, "llava")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(VlmtrainError, match="--overwrite"):
        prepare_out_dir(out)
    (out / "manifest.json").unlink()  # an interrupted run: shards but no manifest
    with pytest.raises(VlmtrainError, match="unfinished run"):
        prepare_out_dir(out)
    prepare_out_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
