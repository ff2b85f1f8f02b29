"""Chat templates (Jinja, rendered by `tokenizer.apply_chat_template`) for tokenizers that ship none.

Every template marks assistant text with `{% generation %}…{% endgeneration %}` so transformers can return the
assistant-token mask: labels then come from role spans, not from re-tokenizing pieces and hoping lengths agree.
Message content is either a string or a list of `{"type": "image"}` / `{"type": "text", "text": ...}` items;
each image item renders as the image token.
"""

from __future__ import annotations

# Renders a content value (string or list of parts); `image_token` is injected by `render_template`.
_CONTENT = (
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}IMAGE_TOKEN"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)

# Tiny tokenizers: role markers are single special tokens; a turn ends with <|end|> (also the EOS).
VLMTRAIN_TINY = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}<|assistant|>{% generation %}" + _CONTENT + "<|end|>{% endgeneration %}"
    "{%- else -%}<|{{ m['role'] }}|>" + _CONTENT + "<|end|>{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

# ChatML (Qwen2, SmolLM2-Instruct style).
CHATML = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}<|im_start|>assistant\n{% generation %}" + _CONTENT
    + "<|im_end|>{% endgeneration %}\n"
    "{%- else -%}<|im_start|>{{ m['role'] }}\n" + _CONTENT + "<|im_end|>\n{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)

# LLaVA-1.5 (vicuna_v1): "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: ...".
LLAVA_V1 = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] != 'system' -%}A chat between a curious human and an artificial intelligence "
    "assistant. The assistant gives helpful, detailed, and polite answers to the human's questions. {% endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}" + _CONTENT + " "
    "{%- elif m['role'] == 'user' -%}USER: " + _CONTENT + " "
    "{%- else -%}ASSISTANT: {% generation %}" + _CONTENT + "{{ eos_token }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

TEMPLATES = {"vlmtrain_tiny": VLMTRAIN_TINY, "chatml": CHATML, "llava_v1": LLAVA_V1}


def render_template(name_or_jinja: str, image_token: str) -> str:
    """A registry name or a literal Jinja string → Jinja with the image token filled in."""
    jinja = TEMPLATES.get(name_or_jinja, name_or_jinja)
    return jinja.replace("IMAGE_TOKEN", image_token)
