"""Training from a folder that carries its family's official chat template, as a download does
(tests/fixtures/official_templates: GLM-4.1V-9B-Thinking's and Mistral-Small-3.1's, with their sources).

GLM-4.1V's template prints an assistant (and system) message's content whole (`{{ msg.content }}`): given a record's
content parts it would print their Python list, and the labels would be that repr. The encoder probes the template
(`string_content_roles`) and hands those roles their text as a string; the rendering must then equal transformers'
own `apply_chat_template` of the conversation written with string content, and the supervised tokens must be
exactly the replies plus the token that ends them: Mistral's `</s>`, which its template writes; for GLM-4.1V, whose
template writes none, the next turn's `<|user|>` and, after the last reply, `<|user|>` appended (as GLM-4's own
fine-tuning does), not the tokenizer's EOS (`<|endoftext|>` in this folder, as in GLM-4.1V's tokenizer)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from native_fixtures import IMG, assistant, checkpoint, image, model_config, user

pytestmark = pytest.mark.slow  # two more tiny checkpoints per run; the fast tier has the USER_TEMPLATES ones

TEMPLATES = Path(__file__).parent / "fixtures" / "official_templates"
CASES = {  # family: (template file, its sha256, roles the template prints whole)
    "glm4v": ("glm-4.1v-9b-thinking.jinja", "847603d3ed14387a2b45c197f8d07ddee0f9938051549c727cbc894facfea78b",
              ("system", "assistant")),
    "mistral3": ("mistral-small-3.1-24b-instruct-2503.jinja",
                 "773c8c8c2ffb59c8d1069fe423733d2007a88c52d0a838d89e6aae6693b97427", ()),
}
CONVERSATION = [user(IMG, "what digit is this"), assistant("seven"), user("and this one?"), assistant("eight")]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("official-templates")


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, root):
    """(family, the encoder of a tiny checkpoint folder carrying the official template, its bundle)."""
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.model import build_model

    family = request.param
    name, digest, _ = CASES[family]
    text = (TEMPLATES / name).read_text()
    assert hashlib.sha256(text.encode()).hexdigest() == digest  # the copy the README names
    folder = root / f"{family}-official"
    shutil.copytree(checkpoint(root, family), folder)
    (folder / "chat_template.jinja").write_text(text)
    if family == "glm4v":  # GLM-4.1V's tokenizer names `<|endoftext|>` its EOS; `<|user|>` ends a turn
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "eos_token": "<|endoftext|>"}))
    bundle = build_model(model_config(folder))
    return family, encoder_for(bundle, 1024), bundle


def _supervised(tokenizer, ids, labels) -> list[str]:
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            cur.append(i)
        elif cur:
            spans.append(tokenizer.decode(cur))
            cur = []
    return spans + ([tokenizer.decode(cur)] if cur else [])


def test_an_official_template_renders_as_transformers_does_and_supervises_the_replies(case):
    family, enc, bundle = case
    assert enc.string_roles == CASES[family][2]
    tok = bundle.tokenizer
    as_strings = [{**m, "content": m["content"][0]["text"]} if m["role"] == "assistant" else m for m in CONVERSATION]
    kw = dict(enc.template_kwargs)
    expected = tok.apply_chat_template(as_strings if enc.string_roles else CONVERSATION,
                                       chat_template=enc.template, tokenize=False, **kw)
    assert enc.render(CONVERSATION) == expected and "'type'" not in expected
    x = enc.encode_conversation(CONVERSATION, [image(40, 30, 1)])
    assert bool(enc.stop_ids) is (family == "glm4v")  # Mistral's replies end themselves: nothing is added
    # GLM-4.1V: the next turn's `<|user|>` after the first reply, and the same token appended after the last (as
    # GLM-4's fine-tuning does), not the tokenizer's EOS `<|endoftext|>`
    end = "<|user|>" if family == "glm4v" else tok.eos_token
    assert _supervised(tok, x["input_ids"], x["labels"]) == [f"seven{end}", f"eight{end}"]
    rendered = enc.process(expected, [image(40, 30, 1)])["input_ids"][0].tolist()
    user = tok.convert_tokens_to_ids("<|user|>")
    assert x["input_ids"] == rendered + ([user] if family == "glm4v" else [])  # nothing inserted inside


def test_the_glm_stop_tokens_come_from_the_generation_config(case):
    """GLM-4.1V's template writes no end-of-turn token: the stop ids are the checkpoint's EOS ids, not a token of
    the reply."""
    from vlmtrain.train.grpo.native import native_stop_ids

    family, enc, bundle = case
    eos = bundle.model.hf.generation_config.eos_token_id
    stops = native_stop_ids(enc, bundle.tokenizer, eos)
    a = bundle.tokenizer("a", add_special_tokens=False)["input_ids"]
    assert not set(a) & set(stops)
    assert set(eos if isinstance(eos, list) else [eos]) - {None} <= set(stops)
