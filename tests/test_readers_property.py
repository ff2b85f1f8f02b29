"""Property-based tests (hypothesis) over every reader: arbitrary JSON shapes, unicode, huge and empty fields, and
images that are missing, empty, truncated or not images at all. Each input record comes out once, as a Sample that
passes the schema or as a Reject with a reason from the vocabulary (schema.REASONS); no reader crashes:
samples + rejected == input records."""

import io
import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmtrain.data.formats import Reject, read_format
from vlmtrain.data.loader import parse_sample
from vlmtrain.data.schema import REASONS, RecordError, Sample, validate_record


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
IMAGE_FILES = {"ok.png": PNG, "empty.png": b"", "cut.png": PNG[: len(PNG) // 2], "text.jpg": b"not an image",
               "ünï cødé.png": PNG}
IMAGE_NAMES = st.sampled_from([*IMAGE_FILES, "missing.png", "http://example.com/a.png", "", "sub/../ok.png"])
TEXT = st.one_of(st.text(max_size=40), st.just(""), st.just("<image>"), st.just("<image>\n" * 3),
                 st.text(alphabet="<image>\x00\u202e😀", max_size=30), st.just("x" * 20000))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)
ROLE = st.sampled_from(["human", "gpt", "user", "assistant", "system", "robot", ""])


def _field(value):
    """A field as a plausible record has it, or anything at all."""
    return st.one_of(value, JSON)


def turn(role_key, text_key):
    return st.fixed_dictionaries({role_key: _field(ROLE), text_key: _field(TEXT)})


PLAUSIBLE = {
    "llava": st.fixed_dictionaries({"id": _field(st.text(max_size=8)), "image": _field(IMAGE_NAMES),
                                    "conversations": _field(st.lists(turn("from", "value"), max_size=4))}),
    "sharegpt": st.fixed_dictionaries({"messages": _field(st.lists(turn("role", "content"), max_size=4)),
                                       "images": _field(st.lists(IMAGE_NAMES, max_size=3))}),
    "dpo": st.fixed_dictionaries({"prompt": _field(TEXT), "chosen": _field(TEXT), "rejected": _field(TEXT),
                                  "image": _field(IMAGE_NAMES)}),
    "captions": st.fixed_dictionaries({"image": _field(IMAGE_NAMES), "caption": _field(TEXT),
                                       "key": _field(st.text(max_size=6))}),
}


def _write_input(tmp, fmt: str, records: list, as_list: bool):
    (tmp / "sub").mkdir(exist_ok=True)
    for name, data in IMAGE_FILES.items():
        (tmp / name).write_bytes(data)
    path = tmp / f"{fmt}.{'json' if as_list else 'jsonl'}"
    if as_list:
        path.write_text(json.dumps(records))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("fmt", ["llava", "sharegpt", "messages", "dpo", "captions"])
def test_every_record_is_kept_or_rejected_with_a_known_reason(fmt, tmp_path_factory):
    base = "sharegpt" if fmt == "messages" else fmt

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(records=st.lists(st.one_of(PLAUSIBLE[base], JSON), min_size=1, max_size=6), as_list=st.booleans())
    def check(records, as_list):
        # a file whose first character is `[` is a JSON list by definition (rows.read_json_rows): a JSONL file
        # starting with an array line is another input, not this one
        assume(as_list or not isinstance(records[0], list))
        tmp = tmp_path_factory.mktemp(fmt)
        path = _write_input(tmp, fmt, records, as_list)
        source = read_format(fmt, **({"jsonl": path} if fmt == "captions" else {"path": path}))
        items = list(source.samples(workers=2))
        assert len(items) == len(records)  # samples + rejected == input records
        for item in items:
            if isinstance(item, Reject):
                assert item.reason in REASONS, item
            else:
                assert isinstance(item, Sample)
                validate_record(item.record, len(item.images))  # what is kept passes the schema

    check()


MEMBER_NAMES = st.sampled_from(["img0.png", "img1.jpg", "img0.txt", "img2.png", "imgx.png"])


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(record=st.one_of(PLAUSIBLE["sharegpt"], JSON), raw_json=st.one_of(st.none(), st.binary(max_size=40)),
       images=st.dictionaries(MEMBER_NAMES, st.sampled_from(list(IMAGE_FILES.values())), max_size=3))
def test_shard_members_parse_or_fail_with_a_known_reason(record, raw_json, images):
    """A shard sample's members (`json`, `imgN.ext`) as the training loader reads them."""
    raw = {"__key__": "k", "__url__": "shard-000000.tar", **images}
    if raw_json is None:
        raw["json"] = json.dumps({"id": "r", "source": "t", "kind": "chat", **record}
                                 if isinstance(record, dict) else record).encode()
    elif raw_json:
        raw["json"] = raw_json
    try:
        rec, decoded = parse_sample(raw)
    except RecordError as e:
        assert e.reason in REASONS
        return
    validate_record(rec, len(decoded))


MEDICAL = st.fixed_dictionaries({
    "id": _field(st.sampled_from(["r1", "r2", "John Smith 1970-01-01", ""])),
    "consent": _field(st.sampled_from(["research", "RESEARCH", "none"])),
    "image": _field(IMAGE_NAMES), "report": _field(st.one_of(TEXT, st.just("Patient John Smith, MRN 123456."))),
    "modality": _field(st.sampled_from(["CR", "XC", "US", "??"])),
    "body_part": _field(st.sampled_from(["CHEST", "HEAD", ""])),
    "biometric": _field(st.booleans()), "burned_in": _field(st.booleans())})


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(records=st.lists(st.one_of(MEDICAL, JSON), min_size=1, max_size=6))
def test_medical_records_through_the_gate_are_kept_or_rejected_with_a_gate_reason(records, tmp_path_factory):
    from conftest import ROOT
    from vlmtrain.privacy import gate
    from vlmtrain.privacy.policy import load_policy

    tmp = tmp_path_factory.mktemp("medical")
    path = _write_input(tmp, "records", records, as_list=False)
    g = gate.Gate(load_policy(ROOT / "configs" / "privacy" / "default-policy.yaml"), tmp, b"k" * 32)
    items = list(g.samples(gate.read_rows(path), workers=2))
    assert len(items) == len(records)
    for item in items:
        if isinstance(item, Reject):
            assert item.reason in gate.REASONS, item
        else:
            validate_record(item.record, len(item.images))
