"""Conversation turns of the public formats → canonical messages, and `<image>` placeholders → image parts.

Every `<image>` in any text becomes an image part at its position: the tokenizer treats the literal string as
the image token, so leaving one inside text would give more image slots than images at training time.
"""

from __future__ import annotations

from vlmtrain.data.schema import IMAGE_PART, RecordError, text

PLACEHOLDER = "<image>"

# LLaVA / ShareGPT speaker names and OpenAI roles → canonical roles.
ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
}


def split_placeholders(s: str) -> list[dict]:
    """Text with `<image>` placeholders → parts in order. The newline LLaVA writes next to a placeholder
    (`<image>\\n...` or `...\\n<image>`) is layout for its own template, so one is dropped on each side;
    whitespace-only pieces are dropped."""
    pieces = s.split(PLACEHOLDER)
    parts: list[dict] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append(dict(IMAGE_PART))
            piece = piece[1:] if piece.startswith("\n") else piece
        if i < len(pieces) - 1 and piece.endswith("\n"):
            piece = piece[:-1]
        if piece.strip():
            parts.append(text(piece))
    return parts


def parse_content(content, where: str) -> list[dict]:
    """A turn's content: a string (with placeholders), a list of {"type": "text"|"image"} parts, or nothing
    (→ no parts, which the schema reports as empty_turns)."""
    if content is None:
        return []
    if isinstance(content, str):
        return split_placeholders(content)
    if not isinstance(content, list):
        raise RecordError("missing_field", f"{where}.content: expected a string or a list of parts")
    parts: list[dict] = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "image":
            parts.append(dict(IMAGE_PART))
        elif kind == "text" and isinstance(p.get("text"), str):
            parts.extend(split_placeholders(p["text"]))
        else:
            raise RecordError("malformed_turns", f"{where}.content[{j}]: expected a text or image part")
    return parts


def parse_turns(turns, where: str) -> list[dict]:
    """A list of {"role", "content"} (OpenAI) or {"from", "value"} (LLaVA/ShareGPT) turns → canonical messages."""
    if not isinstance(turns, list):
        raise RecordError("missing_field", f"{where}: expected a list of turns")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RecordError("malformed_turns", f"{where}[{i}]: not an object")
        speaker = t.get("role", t.get("from"))
        role = ROLE_ALIASES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            shown = repr(speaker)[:24]  # the speaker tag only, never the turn's text
            raise RecordError("malformed_turns", f"{where}[{i}]: unknown role {shown}")
        content = t["content"] if "content" in t else t.get("value")
        messages.append({"role": role, "content": parse_content(content, f"{where}[{i}]")})
    return messages


def count_slots(messages: list[dict]) -> int:
    return sum(1 for m in messages for p in m["content"] if p == IMAGE_PART)


def place_images(messages: list[dict], n_images: int, where: str) -> list[dict]:
    """Check that image slots match the images. A record with images but no placeholder at all gets them at
    the start of its first user turn (what LLaVA's preprocessing does); any other difference is a mismatch."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and IMAGE_PART in m["content"]:
            # The encoder refuses image tokens inside supervised spans; say so now rather than at training.
            raise RecordError("malformed_turns", f"{where}[{i}]: image placeholder in an assistant turn")
    slots = count_slots(messages)
    if slots == 0 and n_images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise RecordError("image_slot_mismatch", f"{where}: {n_images} image(s) but no user turn to hold them")
        first_user["content"] = [dict(IMAGE_PART) for _ in range(n_images)] + first_user["content"]
    elif slots != n_images:
        raise RecordError("image_slot_mismatch", f"{where}: {slots} <image> placeholder(s) but {n_images} image(s)")
    return messages
