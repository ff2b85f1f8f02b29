"""Official chat templates of the native transformers VLM families, and generation-marked copies for training.

`official_template(family)` is the checkpoint's own Jinja chat template, vendored byte for byte (each constant names the
checkpoint, the file, and the public copy it was taken from; `tests/test_native_templates.py` pins their SHA-256).
`training_template(family)` is the same template with `{% generation %}…{% endgeneration %}` around what the model is
trained to emit in an assistant turn — its text and the end-of-turn token(s) that close it, never the role header —
so transformers' `return_assistant_tokens_mask=True` gives the label mask straight from the template (train/serve
parity: both render the same text).

Where the official template renders assistant and user turns through one shared piece of Jinja (Qwen, Gemma 3,
SmolVLM, the shared `<|im_end|>` of LLaVA-OneVision), a generation tag alone would also mark user text, so that
piece is wrapped as `{% if message['role'] == 'assistant' %}{% generation %}PIECE{% endgeneration %}{% else %}PIECE
{% endif %}`: the same PIECE on both branches, so the rendered text cannot change. Removing these wrappers (and plain
generation tags) gives back the official text exactly; the test checks that, and checks the rendering on real
conversations with transformers' own renderer.

In the raw strings below a line break inside a Jinja string literal (e.g. `'<image>` / `'`) is a newline character
of the original template, not a formatting choice; nothing here is reflowed.
"""

from __future__ import annotations

# ruff: noqa: E501  (vendored templates keep their own lines)

# --- Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct: chat_template.json (identical texts) -------------------
# Copied from huggingface/huggingface.js packages/jinja/test/e2e.test.js, entry "Qwen/Qwen2.5-VL-7B-Instruct" (commit
# fe42e68, 2026-08-21); the same bytes are the GGUF template of ollama's library/qwen2.5vl (huggingface.js
# packages/ollama-utils/src/chat-template-automap.ts) and openvino.genai's src/cpp/src/tokenizer/
# chat_template_fallback_map.hpp entry "Qwen2-VL-2B-Instruct (tokenizer_config.json)" (commit 8433e664e^).
_QWEN2_VL = r"""{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}<|im_start|>{{ message['role'] }}
{% if message['content'] is string %}{{ message['content'] }}<|im_end|>
{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# --- google/gemma-3-4b-it (also google/medgemma-4b-it): chat_template.json / tokenizer_config.json ---------------------
# Copied from huggingface.js packages/ollama-utils/src/chat-template-automap.ts, entry "library/gemma3:270m" (the GGUF
# copy of Google's template); identical to openvino.genai tests/python_tests/data/tokenizer_configs.py
# "google/gemma-3-1b-it" and to the template in ggml-org/gemma-3-12b-it-GGUF (converted from google/gemma-3-12b-it on
# 2025-03-12). All Gemma 3 instruction checkpoints share this template; the 4b-it file itself was not reachable here.
_GEMMA3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""

# --- HuggingFaceTB/SmolVLM-Instruct (SmolVLM-256M/500M-Instruct use the same template): chat_template.json ------------
# Copied from huggingface.js packages/jinja/test/e2e.test.js, entry "HuggingFaceTB/SmolVLM-Instruct"
# ("https://huggingface.co/HuggingFaceTB/SmolVLM-Instruct?chat_template=default"); the same text is transformers'
# SmolVLM/Idefics3 processor test template. The 256M checkpoint's own file was not reachable here.
_SMOLVLM = r"""<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>
{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"""

# --- llava-hf/llava-onevision-qwen2-7b-ov-hf: chat_template.json ---------------------------------------------------------
# Copied from transformers tests/models/llava_onevision/test_processing_llava_onevision.py, prepare_processor_dict()
# (the llava-hf OneVision template; it ships its own generation tags around the assistant text).
_LLAVA_ONEVISION = r"""{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '
' + content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ '
' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant
' }}{% endif %}"""

# --- llava-hf/llava-v1.6-mistral-7b-hf: chat_template.json -------------------------------------------------------------
# Copied from openvino.genai src/cpp/src/tokenizer/chat_template_fallback_map.hpp (commit 8433e664e^), entry
# "tiny-random-llava-next, llava-v1.6-mistral (chat_template.json)" — a byte-exact match key for that file. As
# published it closes an assistant turn with the literal text `<\s> ` (not the `</s>` eos) and has no generation prompt.
_LLAVA_NEXT = r"""{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>
' + message['content'][0]['text'] + '
<</SYS>>

' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>
' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '<\s> '}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"""

# --- llava-hf/llava-1.5-7b-hf: chat_template.json ------------------------------------------------------------------------
# Copied from openvino.genai src/cpp/src/tokenizer/chat_template_fallback_map.hpp (commit 8433e664e^), entry
# "llava-1.5, llava-v1.6-vicuna (chat_template.json)". It ships its own generation tags and renders no end-of-turn
# token after an assistant turn.
_LLAVA = r"""{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>
' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"""

# --- Qwen/Qwen3-VL-*-Instruct: chat_template.json ------------------------------------------------------------------
# Copied from TRL 1.16's trl/chat_templates/qwen3_vl.jinja ("Original Qwen3-VL chat template"); TRL identifies models
# by exact comparison with these files and its weekly CI (scripts/check_chat_templates.py) fails when a reference
# Hub repo ships a template not stored there. The checkpoint's own file was not reachable here.
_QWEN3_VL = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# --- Qwen/Qwen3.5-4B and larger (dense and MoE: Qwen3.5-35B-A3B, -122B-A10B, -397B-A17B): chat_template ---------------
# Copied from huggingface/trl trl/chat_templates/qwen3_5_think.jinja at commit f2cd57710ae345ea6428ae95363267fcf38a3dc8
# (blob a585dec8; file last changed in fb9cb790, 2026-05-25); TRL's README names it the template "shipped by Qwen3.5-4B
# and larger" and matches processors against it by exact comparison. The same bytes are xorbitsai/inference's
# xinference/model/llm/llm_family.json entry "qwen3.5" (commit 7ecec16b), which lists the MoE checkpoints with it.
# Qwen3.5-0.8B/2B ship qwen3_5_nothink.jinja instead (only the default of `enable_thinking` differs); a checkpoint
# folder with that one gets the "not the official template" warning at build and can set `chat_template:`.
# The file has no trailing newline.
_QWEN3_5 = r"""{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count, is_system_content=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ image_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain videos.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ video_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if tools and tools is iterable and tools is not mapping %}
    {{- '<|im_start|>system\n' }}
    {{- "# Tools\n\nYou have access to the following functions:\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>" }}
    {{- '\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>' }}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {%- if content %}
            {{- '\n\n' + content }}
        {%- endif %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set content = render_content(message.content, false)|trim %}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if ns.multi_step_tool %}
    {{- raise_exception('No user query found in messages.') }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true)|trim %}
    {%- if message.role == "system" %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- set reasoning_content = reasoning_content|trim %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content + '\n</think>\n\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if loop.first %}
                    {%- if content|trim %}
                        {{- '\n\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- else %}
                        {{- '<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- endif %}
                {%- else %}
                    {{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                {%- endif %}
                {%- if tool_call.arguments is defined %}
                    {%- for args_name, args_value in tool_call.arguments|items %}
                        {{- '<parameter=' + args_name + '>\n' }}
                        {%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}
                        {{- args_value }}
                        {{- '\n</parameter>\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if not loop.last and loop.nextitem.role != "tool" %}
            {{- '<|im_end|>\n' }}
        {%- elif loop.last %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}"""

# --- meta-llama/Llama-3.2-11B-Vision-Instruct (also -90B-Vision-Instruct): chat_template.json ---------------------------
# Copied from huggingface/huggingface.js packages/jinja/test/e2e.test.js, entry "meta-llama/Llama-3.2-11B-Vision-Instruct"
# (commit fe42e68017ffc76d09922ea8f9b38a6964345710, 2026-08-21); byte-identical to the GGUF template of ollama's
# library/llama3.2-vision:latest (packages/ollama-utils/src/chat-template-automap.ts, same commit). It ends with a
# newline, and one line (`{% set image_ns = ... %}`) carries trailing spaces in the original: both are kept.
# Without `date_string` it renders today's date (`strftime_now`) into every text-only conversation's system block;
# the family row passes the template's own fallback date (Family.template_kwargs).
_MLLAMA = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
    {%- set user_supplied_system_message = true %}
{%- else %}
    {%- set system_message = "" %}
    {%- set user_supplied_system_message = false %}
{%- endif %}

{#- Find out if there are any images #}
{% set image_ns = namespace(has_images=false) %}      
{%- for message in messages %}
    {%- for content in message['content'] %}
        {%- if content['type'] == 'image' %}
            {%- set image_ns.has_images = true %}
        {%- endif %}
    {%- endfor %}
{%- endfor %}

{#- System message if there are no images, or if the user supplied one #}
{%- if user_supplied_system_message or not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\n" }}
    {%- endif %}
    {{- "Cutting Knowledge Date: December 2023\n" }}
    {{- "Today Date: " + date_string + "\n\n" }}
    {%- if tools is not none and not tools_in_user_message %}
        {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
        {{- "Do not use variables.\n\n" }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "\n\n" }}
        {%- endfor %}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

_OFFICIAL: dict[str, str] = {
    "qwen2_vl": _QWEN2_VL,
    "qwen2_5_vl": _QWEN2_VL,
    "qwen3_vl": _QWEN3_VL,
    "qwen3_5": _QWEN3_5,
    "gemma3": _GEMMA3,
    "smolvlm": _SMOLVLM,
    "llava_onevision": _LLAVA_ONEVISION,
    "llava_next": _LLAVA_NEXT,
    "llava": _LLAVA,
    "mllama": _MLLAMA,
}

FAMILIES: tuple[str, ...] = tuple(_OFFICIAL)

_IS_ASSISTANT = "message['role'] == 'assistant'"


def _guarded(piece: str, *, trim: bool) -> str:
    """`piece` marked as generated for assistant turns and rendered unmarked for any other role.

    `trim` uses whitespace-trimming tags (`{%- … -%}`) for templates written in that style (Gemma 3), so the
    inserted tags strip exactly the whitespace the official tags around `piece` already strip.
    """
    o, c = ("{%-", "-%}") if trim else ("{%", "%}")
    # transformers renders with trim_blocks=True, which would eat a newline that followed `piece` in the official
    # text and now follows the inserted `endif`; `+%}` turns trim_blocks off for that one tag.
    close = "-%}" if trim else "+%}"
    return (
        f"{o} if {_IS_ASSISTANT} {c}{o} generation {c}{piece}{o} endgeneration {c}"
        f"{o} else {c}{piece}{o} endif {close}"
    )


def _marked(piece: str) -> str:
    """`piece` already sits in an assistant-only branch: plain generation tags suffice."""
    return "{% generation %}" + piece + "{% endgeneration %}"


def _span(template: str, start: str, end: str) -> str:
    """The one piece of `template` from `start` through `end` (both anchors must occur exactly once)."""
    for anchor in (start, end):
        if template.count(anchor) != 1:
            found = template.count(anchor)
            raise AssertionError(f"vendored template changed: {anchor!r} occurs {found} times, expected 1")
    i = template.index(start)
    j = template.index(end, i) + len(end)
    return template[i:j]


def _replace_once(template: str, piece: str, new: str) -> str:
    if template.count(piece) != 1:
        found = template.count(piece)
        raise AssertionError(f"vendored template changed: {piece[:60]!r}… occurs {found} times, expected 1")
    return template.replace(piece, new)


def _qwen2_vl_training(official: str) -> str:
    # String content: `{{ message['content'] }}<|im_end|>`; list content: the parts loop + `<|im_end|>`. The newline
    # after `<|im_end|>` is template glue the model never emits (generation stops at <|im_end|>), so it stays unmarked.
    string_piece = "{{ message['content'] }}<|im_end|>"
    parts_piece = _span(official, "{% for content in message['content'] %}", "{% endfor %}<|im_end|>")
    out = _replace_once(official, string_piece, _guarded(string_piece, trim=False))
    return _replace_once(out, parts_piece, _guarded(parts_piece, trim=False))


def _qwen3_vl_training(official: str) -> str:
    # The assistant branch's content (string or parts) and tool calls through `{{- '<|im_end|>\n' }}`, which prints
    # the turn's newline with <|im_end|> (so it is inside the span, as for Gemma 3); the header is not. The branch is
    # assistant-only, so plain tags suffice; `{%-` keeps the whitespace trimming of the `{%- if` it now precedes.
    branch = '{%- elif message.role == "assistant" %}'
    if official.count(branch) != 1:
        raise AssertionError(f"vendored template changed: {branch!r} occurs {official.count(branch)} times")
    start = official.index("{%- if message.content is string %}", official.index(branch))
    end = official.index("{{- '<|im_end|>\\n' }}", start) + len("{{- '<|im_end|>\\n' }}")
    return official[:start] + "{%- generation %}" + official[start:end] + "{%- endgeneration %}" + official[end:]


def _gemma3_training(official: str) -> str:
    # Content (string or parts) through `{{ '<end_of_turn>\n' }}`. That expression prints the turn's newline together
    # with <end_of_turn>, so the newline is inside the span; the header `<start_of_turn>model\n` is not.
    piece = _span(official, "{%- if message['content'] is string -%}", "{{ '<end_of_turn>\n' }}")
    return _replace_once(official, piece, _guarded(piece, trim=True))


def _smolvlm_training(official: str) -> str:
    # The parts loop + <end_of_utterance>; the header ("Assistant" + ':' / ': ') and the newline after stay unmarked.
    piece = _span(official, "{% for line in message['content'] %}", "{% endfor %}<end_of_utterance>")
    return _replace_once(official, piece, _guarded(piece, trim=False))


def _llava_onevision_training(official: str) -> str:
    # The official template already marks '\n' + text in the assistant branch; add the shared <|im_end|> after it.
    piece = "{{'<|im_end|>'}}"
    return _replace_once(official, piece, _guarded(piece, trim=False))


def _llava_next_training(official: str) -> str:
    # One expression prints ' ' + text + the turn's closing literal, inside the assistant-only branch.
    piece = "{{ ' ' + message['content'][0]['text'] + '<\\s> '}}"
    return _replace_once(official, piece, _marked(piece))


def _llava_training(official: str) -> str:
    # Already marked upstream (`{% generation %}{{ content['text'] + ' '}}{% endgeneration %}`); the template renders
    # no end-of-turn token, and adding one would change the rendered text, so the official template is used as is.
    if official.count("{% generation %}") != 1:
        raise AssertionError("vendored llava template changed: expected exactly one {% generation %} block")
    return official


# The official assistant branch prints the role header and the turn's text in one expression (with Qwen3.5's think
# block for turns after the last user query). A generation block must nest inside Jinja's blocks and must not cover
# the header, so the header is hoisted out of the `if` as its own expression and the block opens after it; both
# branches then print exactly what they printed before, and the block closes after the turn's `<|im_end|>\n`.
_QWEN3_5_ASSISTANT = """        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}"""
_QWEN3_5_ASSISTANT_MARKED = """        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- generation %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<think>\\n' + reasoning_content + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- content }}
        {%- endif %}"""


def _qwen3_5_training(official: str) -> str:
    # After the hoisted header: the text (and think block), the tool calls, and `{{- '<|im_end|>\n' }}`, which prints
    # the turn's newline with <|im_end|> (as in Qwen3-VL). The first such expression at this indentation after the
    # branch is the assistant branch's own (the tool branch's sits deeper).
    out = _replace_once(official, _QWEN3_5_ASSISTANT, _QWEN3_5_ASSISTANT_MARKED)
    end_turn = "        {{- '<|im_end|>\\n' }}\n"
    end = out.index(end_turn, out.index(_QWEN3_5_ASSISTANT_MARKED)) + len(end_turn)
    return out[:end] + "        {%- endgeneration %}\n" + out[end:]


def _mllama_training(official: str) -> str:
    # The plain-message branch's content (string or parts) through `{{- '<|eot_id|>' }}`; the header
    # `<|start_header_id|>assistant<|end_header_id|>\n\n` before it stays unmarked. The branch serves every role, so
    # the piece is guarded. The tool-call branch is not marked (vlmtrain records carry no tool calls).
    piece = _span(official, "{%- if message['content'] is string %}\n            {{- message['content'] }}",
                  "{{- '<|eot_id|>' }}")
    return _replace_once(official, piece, _guarded(piece, trim=True))


_TRAINING_EDITS = {
    "qwen2_vl": _qwen2_vl_training,
    "qwen2_5_vl": _qwen2_vl_training,
    "qwen3_vl": _qwen3_vl_training,
    "qwen3_5": _qwen3_5_training,
    "gemma3": _gemma3_training,
    "smolvlm": _smolvlm_training,
    "llava_onevision": _llava_onevision_training,
    "llava_next": _llava_next_training,
    "llava": _llava_training,
    "mllama": _mllama_training,
}


def _check_family(family: str) -> None:
    if family not in _OFFICIAL:
        raise ValueError(f"unknown native VLM family {family!r}; supported families: {', '.join(FAMILIES)}")


def official_template(family: str) -> str:
    """The family's official chat template, byte for byte as its reference checkpoint ships it."""
    _check_family(family)
    return _OFFICIAL[family]


def training_template(family: str) -> str:
    """The official template with generation marks around each assistant turn's text and end-of-turn token(s)."""
    _check_family(family)
    return _TRAINING_EDITS[family](_OFFICIAL[family])
