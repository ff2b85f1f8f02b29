"""TRL side for the native families (`--family`): `trl.SFTTrainer` / `trl.DPOTrainer` on the family's own
transformers class and processor, loaded from the checkpoint folder both sides start from.

The processor is vlmtrain's `load_processor` (model/native/processor.py): without torchvision it builds the real
transformers `Qwen2_5_VLProcessor` class with its video half left out; TRL takes it as `processing_class` unchanged
(TRL's vision collator only calls `processor.apply_chat_template` with images, and its DPO tokenizer calls the
processor on images + text; neither touches the video processor). The processor carries the generation-marked
template vlmtrain builds its labels with (`chat_template`), so both sides supervise the same positions: left to
itself TRL would swap in its own marked copy (trl/chat_templates/qwen2_5_vl_training.jinja), which renders the
same tokens but also supervises the newline after each `<|im_end|>` (one more target per assistant turn; measured
on the bench's first batch, 2026-11-30). All trainer settings are `bench.trl_side`'s.
"""

from __future__ import annotations

from functools import partial

import torch

from bench import trl_side

# Qwen2.5-VL's parts inside `Qwen2_5_VLForConditionalGeneration`: the tower (patch embedding + blocks; the rotary
# table has no parameters) and the merger (vlmtrain's connector role, see vlmtrain.model.native.families).
VISION = ("model.visual.patch_embed", "model.visual.blocks")
CONNECTOR = ("model.visual.merger",)


def load(folder, freeze: tuple[str, ...] = (), chat_template: str | None = None):
    from transformers import AutoModelForImageTextToText

    from vlmtrain.model.native.processor import load_processor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    for name in freeze:  # the modules the vlmtrain stage keeps frozen
        model.get_submodule(name).requires_grad_(False)
    processor = load_processor(folder, model.config.model_type)
    if chat_template is not None:
        processor.chat_template = chat_template
    return model, processor


def sft_trainer(folder, dataset, args: dict, chat_template: str):
    """SFT on merger + LM (vision tower frozen), assistant-only loss."""
    return trl_side.sft_trainer(folder, dataset, args, load_fn=partial(load, chat_template=chat_template),
                                freeze=VISION)


def dpo_trainer(folder, dataset, args: dict, beta: float, chat_template: str):
    """DPO on the LM (tower + merger frozen), sigmoid loss, a frozen copy as reference."""
    return trl_side.dpo_trainer(folder, dataset, args, beta, load_fn=partial(load, chat_template=chat_template),
                                freeze=VISION + CONNECTOR)
