"""Conversation → (input_ids, labels) with labels taken from role spans.

The chat template marks assistant text with `{% generation %}`, so `apply_chat_template` returns the exact
assistant-token mask of the *same* tokenization that is trained on: nothing is re-tokenized piecewise, so there is
no "tokenization mismatch" to paper over. Image tokens are then expanded to the connector's slot count and are
never supervised.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


class MaskError(ValueError):
    """A record whose supervision cannot be built (it is rejected with this reason, never trained all-masked)."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    n_images: int

    @property
    def n_supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def encode_messages(tokenizer, messages: list[dict], image_token_id: int, num_image_tokens: int) -> Encoded:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if len(mask) != len(ids):
        raise MaskError("chat template returned a mask of a different length than the tokens")
    if not any(mask):
        raise MaskError("no assistant tokens to supervise (template lacks {% generation %} or no assistant turn)")
    input_ids: list[int] = []
    labels: list[int] = []
    n_images = 0
    for t, m in zip(ids, mask):
        if t == image_token_id:
            if m:
                raise MaskError("image token inside an assistant span")
            n_images += 1
            input_ids.extend([t] * num_image_tokens)
            labels.extend([IGNORE] * num_image_tokens)
        else:
            input_ids.append(t)
            labels.append(t if m else IGNORE)
    return Encoded(input_ids, labels, n_images)
