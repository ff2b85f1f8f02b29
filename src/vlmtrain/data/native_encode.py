"""Records → model inputs for native transformers VLMs, through the family's own processor.

The processor decides how many image tokens each image gets (Qwen's dynamic resolution, Idefics3 image splitting,
OneVision AnyRes) and which family tensors travel with them (`image_grid_thw`, `pixel_attention_mask`,
`image_sizes`, `token_type_ids`, ...). Labels are still built from role spans:

1. the generation-marked chat template renders the conversation; the tokenizer returns its tokens with the
   assistant mask (`return_assistant_tokens_mask`), one placeholder token per image;
2. the processor turns the same rendered text (+ images) into the model's input ids, expanding each placeholder
   into the family's image-token run;
3. the two token sequences differ only around the images, so a sequence alignment (difflib) carries every
   supervised token over. A supervised token the alignment cannot carry, or an image token inside an assistant
   span, rejects the record (`mask_unbuildable`) — never a guess.

Why an alignment and not the processor's own `return_assistant_tokens_mask`: processors expand images before
tokenizing, and some expansions change how the neighbouring text tokenizes (Gemma 3 wraps each image in blank
lines), so character offsets of the rendered text do not map onto the processor's tokens; aligning tokens does.

A template without generation marks (a checkpoint's own `chat_template.jinja`, for a family whose official template
vlmtrain has not vendored) gives step 1's mask from prefix renders instead (`prefix_assistant_mask`): an assistant
turn is the text that rendering the conversation up to that turn adds to rendering the turns before it with the
generation prompt. A template that renders earlier turns differently once later ones follow (one that drops the
reasoning of earlier answers, say) cannot be read that way and rejects the record (`mask_unbuildable`).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any

from vlmtrain.data.chat import IGNORE, MaskError
from vlmtrain.data.schema import RecordError, record_messages

# `{% generation %}` / `{%- generation -%}`: the marks transformers reads for `return_assistant_tokens_mask`
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Processor outputs that are per token (padded with the batch) rather than per image.
TOKEN_EXTRAS = ("token_type_ids", "mm_token_type_ids")
# Processor outputs the collator rebuilds itself.
DROPPED = ("input_ids", "attention_mask")
# the reply texts of the probes that read how a template ends a reply
_PROBE_REPLY, _PROBE_OTHER = "a", "b"


def align_labels(ids_text: list[int], mask_text: list[int], ids_model: list[int]) -> list[int]:
    """Labels for `ids_model` from the assistant mask of `ids_text` (the same text before image expansion).

    Tokens of `ids_model` that match `ids_text` take its mask; inserted tokens (image runs and their wrappers)
    are unsupervised. Raises MaskError when a supervised token has no counterpart."""
    sm = difflib.SequenceMatcher(None, ids_text, ids_model, autojunk=False)
    labels = [IGNORE] * len(ids_model)
    carried = 0
    for a, b, n in sm.get_matching_blocks():
        for k in range(n):
            if mask_text[a + k]:
                labels[b + k] = ids_model[b + k]
                carried += 1
    wanted = sum(1 for m in mask_text if m)
    if carried != wanted:
        raise MaskError(f"the processor changed assistant tokens ({carried} of {wanted} supervised tokens found)")
    return labels


def prefix_assistant_spans(render, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """`render(messages)` and the character span of each assistant turn in it, for a template without generation
    marks: the text that `render(messages[:i + 1])` adds after what it shares with `render(messages[:i],
    add_generation_prompt=True)`, less the whitespace it starts and ends with (the separator after a role header, the
    line break after the end-of-turn token: the template writes them, the model does not; LLaVA-OneVision's official
    template even writes its generation prompt `assistant\n` as `assistant ` in history).
    Raises RecordError when a later turn changes how an earlier one renders."""
    full = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise RecordError("malformed_turns", "the conversation starts with an assistant turn")
        before, upto = render(messages[:i], add_generation_prompt=True), render(messages[:i + 1])
        if not full.startswith(upto):
            raise RecordError("mask_unbuildable", "the chat template renders earlier turns differently once later "
                                                  "turns follow, so assistant spans cannot be read from prefix "
                                                  "renders; set `chat_template:` with {% generation %} marks")
        start, end = len(os.path.commonprefix([before, upto])), len(upto.rstrip())
        start += len(upto[start:]) - len(upto[start:].lstrip())
        if start < end:
            spans.append((start, end))
    return full, spans


_PROBE = {"system": "vlmtrain probe system text", "user": "vlmtrain probe user text",
          "assistant": "vlmtrain probe assistant text"}


def string_content_roles(render) -> tuple[str, ...]:
    """Roles whose content a template prints whole (`{{ message.content }}`) instead of walking its parts, found by
    rendering a probe conversation with each message's text as a list of parts: a role whose text comes out inside
    a printed list (`[{'type': 'text', 'text': ...}]`) needs its content as a plain string. GLM-4.1V's official
    template prints assistant content so (its user branch walks the parts); trained as is, the labels would be the
    list's Python repr. A template that rejects the system role is probed without it."""
    for roles in (("system", "user", "assistant"), ("user", "assistant")):
        msgs = [{"role": r, "content": [{"type": "text", "text": _PROBE[r]}]} for r in roles]
        try:
            text = render(msgs)
        except Exception:  # noqa: BLE001 - the template's own check (no system role, ...): try the next probe
            continue
        return tuple(r for r in roles if f"'text': '{_PROBE[r]}'" in text or f'"text": "{_PROBE[r]}"' in text)
    return ()


def prefix_assistant_mask(tokenizer, render, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of `render(messages)` and their assistant mask from `prefix_assistant_spans`: a token is supervised
    when it overlaps a span (as transformers marks the tokens from the one holding a span's first character to the
    one holding its last)."""
    full, spans = prefix_assistant_spans(render, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


@dataclass
class NativeSampleEncoder:
    """Picklable (ships to DataLoader workers). `max_len` counts tokens including image tokens."""

    processor: Any
    template: str  # Jinja with {% generation %} marks
    image_token_id: int
    max_len: int = 2048
    caption_prompt: str = ""
    nested_images: bool = False  # processors that take one image list per text (Idefics3, Gemma 3)
    processor_kwargs: dict = field(default_factory=dict)
    # fixed template variables (Family.template_kwargs), e.g. Mllama's `date_string`: the same text every day
    template_kwargs: dict = field(default_factory=dict)
    # give text-only samples their rows of the image tensors (Family.batch_aligned_images), done by the collator
    batch_aligned_images: bool = False
    # preference batches in shared-prefix rows (`collate_preference_prefix`; the DPO stage decides, see
    # vlmtrain.train.native.configure_shared_prefix), read by the loader
    shared_prefix_rows: bool = False
    # roles whose text-only content goes to the template as one string (`string_content_roles`); None: probe it
    string_roles: tuple | None = None
    # the tokens generation stops at (the checkpoint's generation_config EOS ids + the tokenizer's EOS). Where the
    # template's reply span ends without a special token (GLM-4.1V's writes nothing after a reply, the next turn's
    # `<|user|>` ends it; LLaVA-1.5's a space), labels then also supervise a stop after every reply
    # (`supervise_reply_ends`), so a fine-tune learns to end its turn; cleared when the template's replies end
    # themselves (`reply_ends_itself`)
    stop_ids: tuple = ()
    # the stop put after a reply that no stop follows: the token the template writes after a reply when another
    # turn follows, where generation stops at it (GLM's `<|user|>`, which GLM-4's own fine-tuning appends), else the
    # tokenizer's EOS (`_reply_stop`)
    reply_stop_id: int | None = None

    def __post_init__(self):
        if self.string_roles is None:
            self.string_roles = string_content_roles(self._render_as_is) if self.template else ()
        if self.stop_ids and (not self.template or self.batch_aligned_images or self.reply_ends_itself()):
            self.stop_ids = ()
        if self.stop_ids and self.reply_stop_id is None:
            self.reply_stop_id = self._reply_stop()

    def reply_ends_itself(self) -> bool:
        """Whether the template's reply span ends with a special token or a stop after the reply's text
        (`<|im_end|>`, `<end_of_turn>`, `</s>`). Plain text there (LLaVA-1.5's trailing space, LLaVA-NeXT's literal
        `<\\s> `) ends nothing; a reasoning block before the text (`<think></think>`) does not count. What the
        template writes after the text is the common tail of the spans of two different replies."""
        special = self.special_ids()
        return any(t in special or t in self.stop_ids for t in self.reply_tail())

    def reply_tail(self) -> list[int]:
        """The tokens the template supervises after a reply's text: the common tail of two different replies'
        spans (`<|im_end|>`; LLaVA-1.5's space; nothing for GLM-4.1V)."""
        a, b = self._probe_reply(reply=_PROBE_REPLY)[2], self._probe_reply(reply=_PROBE_OTHER)[2]
        n = 0
        while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
            n += 1
        return a[len(a) - n:]

    def special_ids(self) -> set[int]:
        """The tokenizer's special tokens: its named ones and every added token marked special."""
        tok = self.tokenizer
        return set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}

    def _probe_reply(self, next_turn: bool = False, reply: str = _PROBE_REPLY) -> tuple[list[int], list[int],
                                                                                     list[int]]:
        """(ids, mask, supervised ids) of a one-reply conversation (+ a following user turn)."""
        turns = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": reply}]}]
        if next_turn:
            turns.append(turns[0])
        ids, mask = self.text_mask(turns)
        return ids, mask, [i for i, m in zip(ids, mask) if m]

    def _reply_stop(self) -> int:
        """`reply_stop_id`: the token after a reply's span when a turn follows and generation stops at it, else the
        tokenizer's EOS (else the first stop)."""
        ids, mask, _ = self._probe_reply(next_turn=True)
        last = max(k for k, m in enumerate(mask) if m)
        if last + 1 < len(ids) and ids[last + 1] in self.stop_ids:
            return ids[last + 1]
        eos = self.tokenizer.eos_token_id
        return eos if eos in self.stop_ids else self.stop_ids[0]

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def _render_as_is(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **self.template_kwargs)

    def shaped(self, messages: list[dict]) -> list[dict]:
        """`messages` as the template reads them: a text-only message of a role in `string_roles` with its text
        parts joined into one string (a record's content is a list of parts)."""
        if not self.string_roles:
            return messages
        return [{**m, "content": "".join(p["text"] for p in m["content"])}
                if m["role"] in self.string_roles and isinstance(m["content"], list)
                and all(p.get("type") == "text" for p in m["content"]) else m for m in messages]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._render_as_is(self.shaped(messages), add_generation_prompt)

    def process(self, text: str, images: list) -> dict:
        """The processor on one rendered text: input ids `[1, s]` and the family's tensors."""
        kwargs = dict(self.processor_kwargs)
        if images:
            kwargs["images"] = [images] if self.nested_images else images
        return self.processor(text=[text], return_tensors="pt", add_special_tokens=False, **kwargs)

    def split_outputs(self, out, n_tokens: int) -> dict:
        """Processor output → {"pixel_values", "image_extras", "token_extras"} (sample-level, collatable)."""
        res = {"pixel_values": None, "image_extras": {}, "token_extras": {}}
        for k, v in out.items():
            if k in DROPPED or v is None:
                continue
            if k in TOKEN_EXTRAS:
                res["token_extras"][k] = v[0].tolist()
            elif k == "pixel_values":
                res["pixel_values"] = _float_pixels(v)
            else:
                res["image_extras"][k] = v
        if res["pixel_values"] is None:
            res["image_extras"] = {}
        return res

    def text_mask(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """The rendered conversation's token ids (one placeholder per image) and its assistant mask: from the
        template's generation marks, or from prefix renders where it has none (`prefix_assistant_mask`)."""
        try:
            if not GENERATION_TAG.search(self.template):
                return prefix_assistant_mask(self.tokenizer, self.render, messages)
            t = self.tokenizer.apply_chat_template(self.shaped(messages), chat_template=self.template, tokenize=True,
                                                   return_dict=True, return_assistant_tokens_mask=True,
                                                   **self.template_kwargs)
        except RecordError:
            raise
        except Exception as e:  # a template error on a malformed conversation (Jinja raises its own types)
            raise RecordError("malformed_turns", f"chat template: {e}") from None
        return list(t["input_ids"]), list(t["assistant_masks"])

    def encode_conversation(self, messages: list[dict], images: list) -> dict:
        ids_text, mask_text = self.text_mask(messages)
        if not any(mask_text):
            raise RecordError("mask_unbuildable", "no assistant tokens to supervise")
        out = self.process(self.render(messages), images)
        ids = out["input_ids"][0].tolist()
        if len(ids) > self.max_len:
            # never truncated: a cut could fall inside an image-token run
            raise RecordError("over_length", f"{len(ids)} tokens > max_len {self.max_len}")
        try:
            labels = align_labels(ids_text, mask_text, ids)
        except MaskError as e:
            raise RecordError("mask_unbuildable", str(e)) from None
        if any(i == self.image_token_id and lab != IGNORE for i, lab in zip(ids, labels)):
            raise RecordError("mask_unbuildable", "image token inside an assistant span")
        inserted = []
        if self.stop_ids:
            ids, labels, inserted = supervise_reply_ends(ids, labels, self.stop_ids, self.reply_stop_id)
            if len(ids) > self.max_len:
                raise RecordError("over_length", f"{len(ids)} tokens > max_len {self.max_len}")
        sample = {"input_ids": ids, "labels": labels, **self.split_outputs(out, len(ids))}
        for values in sample["token_extras"].values():
            for k in inserted:  # an inserted stop is a text token
                values.insert(k, 0)
        if self.batch_aligned_images:
            sample["batch_aligned"] = True  # read by batching._add_pixels
        return sample

    def __call__(self, record: dict, images: list) -> dict:
        """Chat/caption → {"id", "input_ids", "labels", "pixel_values", "image_extras", "token_extras"};
        preference → {"id", "chosen": {...}, "rejected": {...}, "pixel_values", "image_extras"}."""
        msgs = record_messages(record, self.caption_prompt)
        if isinstance(msgs, tuple):
            sides = {name: self.encode_conversation(m, images) for name, m in zip(("chosen", "rejected"), msgs)}
            first = sides["chosen"]
            aligned = {"batch_aligned": True} if self.batch_aligned_images else {}
            return {"id": record["id"], "pixel_values": first["pixel_values"], "image_extras": first["image_extras"],
                    **aligned,
                    **{name: {"input_ids": s["input_ids"], "labels": s["labels"], "token_extras": s["token_extras"],
                              **_per_token_image_extras(s)} for name, s in sides.items()}}
        return {"id": record["id"], **self.encode_conversation(msgs, images)}

    def prompt_inputs(self, messages: list[dict], images: list) -> dict:
        """Inputs for generation: the prompt turns + the generation prompt → {"input_ids" [1, s], ...} tensors."""
        out = self.process(self.render(messages, add_generation_prompt=True), images)
        return {k: _float_pixels(v) if k == "pixel_values" else v for k, v in out.items() if v is not None}


def supervise_reply_ends(ids: list[int], labels: list[int], stop_ids: tuple, eos_id: int) -> tuple[list, list,
                                                                                                   list[int]]:
    """(ids, labels, inserted positions) with a supervised stop after every reply whose last token is not one: the
    next token where it is a stop (a following turn's opener, such as `<|user|>`), else `eos_id` inserted right
    after the reply, as GLM-4's fine-tuning does (it appends `<|user|>`) for templates without an end-of-turn token.
    `inserted` are the new tokens' indices in the returned ids, ascending."""
    ids, labels = list(ids), list(labels)
    ends = [i for i, lab in enumerate(labels)
            if lab != IGNORE and (i + 1 == len(labels) or labels[i + 1] == IGNORE) and ids[i] not in stop_ids]
    inserted = []
    for i in reversed(ends):  # from the back, so earlier indices stay valid
        if i + 1 < len(ids) and ids[i + 1] in stop_ids:
            labels[i + 1] = ids[i + 1]
        else:
            ids.insert(i + 1, eos_id)
            labels.insert(i + 1, eos_id)
            inserted = [i + 1] + [k + 1 for k in inserted]
    return ids, labels, inserted


def _per_token_image_extras(sample: dict) -> dict:
    """{"image_extras": ...} with the image tensors that also run along the tokens (`SEQ_IMAGE_EXTRAS`: Mllama's
    `cross_attention_mask [1, s, images, tiles]`), which each side of a preference pair needs at its own length."""
    from vlmtrain.data.batching import SEQ_IMAGE_EXTRAS

    own = {k: v for k, v in sample["image_extras"].items() if k in SEQ_IMAGE_EXTRAS}
    return {"image_extras": own} if own else {}


def _float_pixels(v):
    """Llama 4's processor normalises in bfloat16: held as float32 (exact) like every other family's pixels, so
    batches mix and the model's own dtype decides the tower's."""
    return v.float() if str(getattr(v, "dtype", "")) == "torch.bfloat16" else v


def _text_of(message: dict) -> str:
    """A message's text parts joined by single spaces (its image parts left out)."""
    content = message["content"]
    if isinstance(content, str):
        return content.strip()
    return " ".join(p["text"].strip() for p in content if p.get("type") == "text" and p["text"].strip())


def _image_parts(message: dict) -> int:
    content = message["content"]
    return 0 if isinstance(content, str) else sum(1 for p in content if p.get("type") == "image")


@dataclass
class PrefixSuffixEncoder(NativeSampleEncoder):
    """PaliGemma: no chat template exists; a sample is a prefix and a suffix, as `PaliGemmaProcessor(suffix=)` builds
    them for fine-tuning: `<image>`×n + `<bos>` + the user's text + `\n` (the prefix, token_type_ids 0, attended
    bidirectionally by the model) then the answer + `<eos>` (the suffix, token_type_ids 1, causal). Labels are the
    processor's own: the suffix tokens only. So the answer never sits in the bidirectional prefix, where every
    prefix token would see it.

    A record is one user turn (its images and text) and one assistant answer; a system turn, more turns or a
    sample without an image (the processor takes none) is rejected with a reason."""

    def _prefix(self, messages: list[dict], images: list) -> str:
        users = [m for m in messages if m["role"] == "user"]
        if [m["role"] for m in messages] not in (["user"], ["user", "assistant"]):
            raise RecordError("malformed_turns", "paligemma takes one user turn (the prefix) and one answer (the "
                                                 "suffix); it has no chat template for other turns")
        if not images:
            raise RecordError("malformed_turns", "paligemma needs an image in every sample (its processor takes "
                                                 "none without)")
        if _image_parts(users[0]) != len(images):
            raise RecordError("image_slot_mismatch", f"{_image_parts(users[0])} image parts, {len(images)} images")
        return self.processor.image_token * len(images) + _text_of(users[0])

    def encode_conversation(self, messages: list[dict], images: list) -> dict:
        prefix = self._prefix(messages, images)
        answer = _text_of(messages[-1]) if messages[-1]["role"] == "assistant" else ""
        if not answer:
            raise RecordError("mask_unbuildable", "no answer text to supervise")
        out = dict(self.processor(text=[prefix], images=[images], suffix=[answer], return_tensors="pt",
                                  **self.processor_kwargs))
        labels = out.pop("labels")[0].tolist()
        ids = out["input_ids"][0].tolist()
        if len(ids) > self.max_len:
            raise RecordError("over_length", f"{len(ids)} tokens > max_len {self.max_len}")
        return {"input_ids": ids, "labels": labels, **self.split_outputs(out, len(ids))}

    def prompt_inputs(self, messages: list[dict], images: list) -> dict:
        """The prefix alone (token_type_ids 0): what generation continues from."""
        out = self.processor(text=[self._prefix(messages, images)], images=[images], return_tensors="pt",
                             **self.processor_kwargs)
        return {k: v for k, v in out.items() if v is not None and k != "labels"}


__all__ = ["NativeSampleEncoder", "PrefixSuffixEncoder", "align_labels"]
