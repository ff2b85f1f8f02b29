"""Vendored official chat templates and their generation-marked training copies (train/serve parity).

References are independent of `native_templates`' own logic: SHA-256 of the upstream bytes (computed when the
templates were copied, from the public copies named in the module), transformers' own Jinja renderer
(`render_jinja_template`, the function behind `apply_chat_template`), and hand-written expectations of what each
family's assistant turn looks like.
"""

from __future__ import annotations

import hashlib
import re

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from vlmtrain.model.native import templates as native_templates
from vlmtrain.model.native.templates import FAMILIES, official_template, training_template

# SHA-256 of each official template's UTF-8 bytes, computed from the upstream copies (see the module's comments):
# huggingface.js e2e.test.js / chat-template-automap.ts, openvino.genai chat_template_fallback_map.hpp (8433e664e^),
# transformers' test_processing_llava_onevision.py, TRL 1.16's trl/chat_templates/qwen3_vl.jinja, TRL's
# trl/chat_templates/qwen3_5_think.jinja at f2cd57710ae345ea6428ae95363267fcf38a3dc8 (= xinference's "qwen3.5").
OFFICIAL_SHA256 = {
    "qwen2_vl": "a0bc6f6fc7a29a80017a433e8f03a1cc1236e838a944a2d034295a60c4f2fddb",
    "qwen2_5_vl": "a0bc6f6fc7a29a80017a433e8f03a1cc1236e838a944a2d034295a60c4f2fddb",
    "qwen3_vl": "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4",
    "qwen3_5": "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715",
    "gemma3": "7de1c58e208eda46e9c7f86397df37ec49883aeece39fb961e0a6b24088dd3c4",
    "smolvlm": "830005085ddd94cec605b6e21b885b28ffad6e3f82ee6a212c523533e8f04f01",
    "llava_onevision": "fbf77862dcdda46840b6da02767d651eadad3582310e40fed04dc7594a0a80dd",
    "llava_next": "ac1751256d0e7c19dcbac63d0feebee11bf81b86015276d08ee8b1f9ba0a42bc",
    "llava": "6fef09c05345e88b9f85e80bcb3491003332050750586568bdf91cfa81965d0c",
    # huggingface.js e2e.test.js "meta-llama/Llama-3.2-11B-Vision-Instruct" at fe42e68017ffc76d09922ea8f9b38a6964345710
    # (= ollama's library/llama3.2-vision:latest GGUF template in chat-template-automap.ts, same commit)
    "mllama": "53ff0dc467531d098a8bdd2ba38a3b2c157c9a90e96e16a0a79aa86476d47eea",
}

# What an assistant turn with text T looks like inside the generation marks, written out by hand per family from
# the official templates: the text plus the end-of-turn piece the template prints after it.
ASSISTANT_SPAN = {
    "qwen2_vl": lambda t: t + "<|im_end|>",
    "qwen2_5_vl": lambda t: t + "<|im_end|>",
    "qwen3_vl": lambda t: t + "<|im_end|>\n",
    "qwen3_5": lambda t: t + "<|im_end|>\n",
    "gemma3": lambda t: t.strip() + "<end_of_turn>\n",
    "smolvlm": lambda t: t + "<end_of_utterance>",
    "llava_onevision": lambda t: "\n" + t + "<|im_end|>",
    "llava_next": lambda t: " " + t + "<\\s> ",
    "llava": lambda t: t + " ",
    "mllama": lambda t: t + "<|eot_id|>",
}
IMAGE_PLACEHOLDER = {
    "qwen2_vl": "<|image_pad|>",
    "qwen2_5_vl": "<|image_pad|>",
    "qwen3_vl": "<|image_pad|>",
    "qwen3_5": "<|image_pad|>",
    "gemma3": "<start_of_image>",
    "smolvlm": "<image>",
    "llava_onevision": "<image>",
    "llava_next": "<image>",
    "llava": "<image>",
    "mllama": "<|image|>",
}
# Qwen3.5 renders an (empty) think block before the text of assistant turns after the last user query, and none
# before earlier ones (their reasoning is dropped from the history)
THINK_AFTER_LAST_QUERY = {"qwen3_5": "<think>\n\n</think>\n\n"}
# Qwen3.5's official assistant branch prints header and text in one expression; the marked copy prints the header
# first, on its own (a generation block cannot start inside the `if` and end after it). Undoing that, written out:
HOISTED_HEADER = {"qwen3_5": (
    """        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<think>\\n' + reasoning_content + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- content }}
        {%- endif %}""",
    """        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}""")}
RENDER_KWARGS = {"bos_token": "<bos>", "eos_token": "</s>"}


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


IMAGE = {"type": "image"}
CONVERSATIONS = {
    "single_turn_image": [
        {"role": "user", "content": [IMAGE, _text("What is shown in this image?")]},
        {"role": "assistant", "content": [_text("A red stop sign at a crossing.")]},
    ],
    "multi_turn": [
        {"role": "user", "content": [IMAGE, _text("What animal is this?")]},
        {"role": "assistant", "content": [_text("A cat.")]},
        {"role": "user", "content": [_text("What colour is it?")]},
        {"role": "assistant", "content": [_text("Black and white.")]},
    ],
    "system_message": [
        {"role": "system", "content": [_text("You are a careful radiologist.")]},
        {"role": "user", "content": [IMAGE, _text("Findings?")]},
        {"role": "assistant", "content": [_text("No acute cardiopulmonary findings.")]},
    ],
    "text_only": [
        {"role": "user", "content": [_text("Say hello in French.")]},
        {"role": "assistant", "content": [_text("Bonjour !")]},
    ],
    "two_images": [
        {"role": "user", "content": [IMAGE, IMAGE, _text("Which one is larger?")]},
        {"role": "assistant", "content": [_text("The left one.")]},
    ],
}


def _render(template: str, messages: list[dict], *, add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    rendered, indices = render_jinja_template(
        [messages],
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        return_assistant_tokens_mask=True,
        **RENDER_KWARGS,
    )
    return rendered[0], indices[0]


def _merged(indices: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent generation blocks (e.g. text, then a separately printed end-of-turn) as one span."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(indices):
        if out and start == out[-1][1]:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


# A mark is a plain `{% generation %}…{% endgeneration %}` pair, or a role-guarded duplicate of an official piece:
# `{% if message['role'] == 'assistant' %}{% generation %}P{% endgeneration %}{% else %}P{% endif %}` (any `-`/`+`
# whitespace-control variants). Written here independently of the module.
_GUARDED = re.compile(
    r"\{%-? if message\['role'\] == 'assistant' -?%\}\{%-? generation -?%\}(?P<p>.*?)\{%-? endgeneration -?%\}"
    r"\{%-? else -?%\}(?P=p)\{%-? endif [-+]?%\}",
    re.S,
)
_TAG = re.compile(r"\{%-? (?:generation|endgeneration) -?%\}")
_TAG_LINE = re.compile(r"^[ \t]*\{%-? (?:generation|endgeneration) -?%\}\n", re.M)  # a tag on a line of its own


def _strip_marks(template: str, family: str = "") -> str:
    out = _TAG.sub("", _TAG_LINE.sub("", _GUARDED.sub(lambda m: m.group("p"), template)))
    if family in HOISTED_HEADER:
        hoisted, official = HOISTED_HEADER[family]
        out = out.replace(hoisted, official)
    return out


def _expected_spans(family: str, messages: list[dict]) -> list[str]:
    """The generation span of each assistant turn, from ASSISTANT_SPAN (+ Qwen3.5's think block where it renders)."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            text = m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
            prefix = THINK_AFTER_LAST_QUERY.get(family, "") if i > last_user else ""
            spans.append(prefix + ASSISTANT_SPAN[family](text))
    return spans


def test_every_family_has_a_pinned_upstream_hash():
    assert set(FAMILIES) == set(OFFICIAL_SHA256)


@pytest.mark.parametrize("family", FAMILIES)
def test_official_template_is_the_vendored_upstream_text(family):
    assert hashlib.sha256(official_template(family).encode()).hexdigest() == OFFICIAL_SHA256[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_the_marks_gives_back_the_official_template(family):
    official, training = official_template(family), training_template(family)
    assert training != official or family == "llava"  # llava ships its own marks and renders no end-of-turn
    # The official templates of llava and llava_onevision already carry generation tags; the others carry none.
    assert _strip_marks(training, family) == _strip_marks(official)
    if family not in ("llava", "llava_onevision"):
        assert _strip_marks(official) == official


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_training_template_renders_exactly_like_the_official_one(family, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    if add_generation_prompt:
        messages = messages[:-1]  # a prompt ends with the user turn the model answers
    official, _ = _render(official_template(family), messages, add_generation_prompt=add_generation_prompt)
    training, _ = _render(training_template(family), messages, add_generation_prompt=add_generation_prompt)
    assert training == official


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_spans_are_exactly_the_assistant_turns(family, conversation):
    messages = CONVERSATIONS[conversation]
    rendered, indices = _render(training_template(family), messages, add_generation_prompt=False)
    spans = [rendered[a:b] for a, b in _merged(indices)]
    assert spans == _expected_spans(family, messages)
    others = [p["text"] for m in messages if m["role"] != "assistant" for p in m["content"] if p["type"] == "text"]
    for span in spans:
        assert IMAGE_PLACEHOLDER[family] not in span
        assert not any(text in span for text in others)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_5", "gemma3", "mllama"])
def test_string_content_is_marked_too(family):
    """Qwen and Gemma 3 templates also render `content` given as a plain string; that branch is marked as well."""
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}]
    official, _ = _render(official_template(family), messages, add_generation_prompt=False)
    rendered, indices = _render(training_template(family), messages, add_generation_prompt=False)
    assert rendered == official
    assert [rendered[a:b] for a, b in _merged(indices)] == _expected_spans(family, messages)


def _renderer(template: str):
    def render(messages, add_generation_prompt=False):
        return _render(template, messages, add_generation_prompt=add_generation_prompt)[0]

    return render


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_renders_of_the_unmarked_official_template_find_the_marked_spans(family, conversation):
    """A checkpoint's own template without generation marks (what a download carries for a family with nothing
    vendored) is read by prefix renders. On every vendored official template, those spans are the marked copy's
    spans up to the whitespace around them — except Qwen3.5's `<think>` opener, which its generation prompt writes
    (the model never emits it), and a Qwen3.5 conversation with two answers, whose first answer renders without its
    think block once another follows: refused, never guessed."""
    from vlmtrain.data.native_encode import prefix_assistant_spans
    from vlmtrain.data.schema import RecordError

    messages = CONVERSATIONS[conversation]
    rendered, indices = _render(training_template(family), messages, add_generation_prompt=False)
    marked = [rendered[a:b].strip() for a, b in _merged(indices)]
    if family == "qwen3_5":
        marked = [m.removeprefix("<think>").lstrip() for m in marked]
    if family == "qwen3_5" and conversation == "multi_turn":
        with pytest.raises(RecordError, match="renders earlier turns differently"):
            prefix_assistant_spans(_renderer(official_template(family)), messages)
        return
    full, spans = prefix_assistant_spans(_renderer(official_template(family)), messages)
    assert full == rendered
    assert [full[a:b] for a, b in spans] == marked


def test_a_changed_vendored_template_fails_loudly(monkeypatch):
    changed = official_template("qwen2_5_vl").replace("<|im_end|>", "<|end|>")
    monkeypatch.setitem(native_templates._OFFICIAL, "qwen2_5_vl", changed)
    with pytest.raises(AssertionError, match="vendored template changed"):
        training_template("qwen2_5_vl")


def test_unknown_family_is_refused_with_the_supported_list():
    with pytest.raises(ValueError) as err:
        training_template("paligemma")
    assert "paligemma" in str(err.value)
    assert all(family in str(err.value) for family in FAMILIES)
    with pytest.raises(ValueError):
        official_template("paligemma")


QWEN3_5_REASONING_AND_TOOLS = [
    [{"role": "system", "content": [_text("Be brief.")]},
     {"role": "user", "content": [_text("Hi")]},
     {"role": "assistant", "content": [_text("<think>\nhm\n</think>\n\nHello")]},
     {"role": "user", "content": [IMAGE, _text("and this?")]},
     {"role": "assistant", "content": [_text("A dog.")], "reasoning_content": "It has four legs."}],
    [{"role": "user", "content": [_text("Weather in Paris?")]},
     {"role": "assistant", "content": [_text("Checking.")],
      "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "content": [_text("12 C, rain")]},
     {"role": "assistant", "content": [_text("12 C and rain.")]}],
]


@pytest.mark.parametrize("messages", QWEN3_5_REASONING_AND_TOOLS)
def test_qwen3_5_reasoning_and_tool_calls_render_like_the_official_template(messages):
    """Qwen3.5's branches the shared conversations do not reach: reasoning (in the text or `reasoning_content`), a
    tool call and a tool turn. The marked copy renders the official text; each span starts after the role header
    and ends with the turn's `<|im_end|>\n`."""
    official, _ = _render(official_template("qwen3_5"), messages, add_generation_prompt=False)
    rendered, indices = _render(training_template("qwen3_5"), messages, add_generation_prompt=False)
    assert rendered == official
    spans = [rendered[a:b] for a, b in _merged(indices)]
    assert len(spans) == sum(m["role"] == "assistant" for m in messages)
    for span in spans:
        assert not span.startswith("<|im_start|>") and span.endswith("<|im_end|>\n")
        assert "<|im_start|>" not in span and "<tool_response>" not in span
    assert rendered.endswith("<|im_start|>assistant\n" + spans[-1])


def test_mllama_date_line_is_fixed_by_the_family_row():
    """Llama 3.2 Vision's template writes `Today Date: ` + today into every conversation without an image; the family
    row passes the template's own fallback date, so the training text is the same on every day."""
    from vlmtrain.model.native.families import FAMILIES as ROWS

    kwargs = ROWS["mllama"].template_kwargs
    assert kwargs == {"date_string": "26 Jul 2024"}
    text_only = CONVERSATIONS["text_only"]
    rendered, _ = render_jinja_template([text_only], chat_template=training_template("mllama"), **RENDER_KWARGS,
                                        **kwargs)
    assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" in rendered[0]
    # with an image and no system message the template writes no system block, so no date either
    with_image, _ = render_jinja_template([CONVERSATIONS["single_turn_image"]],
                                          chat_template=training_template("mllama"), **RENDER_KWARGS)
    assert "Today Date" not in with_image[0]


def test_a_reply_without_an_end_of_turn_gets_a_supervised_stop():
    """`supervise_reply_ends` on hand-built sequences (stops 7 and 9, EOS 9; -100 = not supervised): a reply followed
    by a stop supervises it, a reply followed by other text gets the EOS inserted after it, a final reply gets it
    appended, and a reply that already ends with a stop is left alone."""
    from vlmtrain.data.native_encode import supervise_reply_ends

    x = -100
    ids = [1, 2, 3, 7, 4, 5, 6, 8, 4, 5, 9, 8, 4, 5]
    labels = [x, x, 3, x, x, x, 6, x, x, x, 9, x, x, 5]
    got_ids, got_labels, inserted = supervise_reply_ends(ids, labels, (7, 9), 9)
    assert got_ids == [1, 2, 3, 7, 4, 5, 6, 9, 8, 4, 5, 9, 8, 4, 5, 9]
    assert got_labels == [x, x, 3, 7, x, x, 6, 9, x, x, x, 9, x, x, 5, 9]
    assert inserted == [7, 15]
    assert supervise_reply_ends([1, 7], [x, 7], (7,), 7) == ([1, 7], [x, 7], [])
