"""GRPO for native transformers families: generation through the family's own `generate`, scoring on shared-prefix
rows (`vlmtrain.data.prefix`, k = G; masks and mRoPE ids from `vlmtrain.model.native.shared_prefix`).

The processor's output for a prompt serves both halves: the same `pixel_values`, `image_grid_thw`,
`token_type_ids` / `mm_token_type_ids`, … go to `generate` and to the loss forward.

    encode_images(model, images)     the family's `get_image_features` once per prompt's image
                                     (`BaseModelOutputWithPooling`)
    sample_native_groups(...)        `hf.generate(num_return_sequences=G, mm_encoder_outputs=...)`: transformers
                                     repeats the precomputed features for the G copies (`_expand_multimodal_outputs`)
                                     and derives the 3-D mRoPE ids of the prompt and of every generated token itself
    native_group_logps(...)          one forward of the shared-prefix rows: the prompt, its images (the same
                                     features when the tower is frozen) once per group

Every family listed with `Family.shared_prefix == ""` takes precomputed features (`mm_encoder_outputs`, transformers
5.23), so an image is encoded once per group per step, for generation and loss together, when the tower is frozen;
with a training tower the loss forward encodes the pixels once more (with grad), still once per group.
"""

from __future__ import annotations

import torch

from vlmtrain.data.encode import encoder_for
from vlmtrain.data.native_encode import TOKEN_EXTRAS
from vlmtrain.train.grpo.generate import cut_at_stop, left_pad
from vlmtrain.train.grpo.module import GRPOModule
from vlmtrain.train.grpo.sampler import NEUTRAL_WARPERS, KeyedSampler
from vlmtrain.train.grpo.scoring import GroupRows, collate_groups, scatter_token_logps


def image_inputs(b: dict, device=None, dtype=None) -> dict:
    """The batch's image tensors: `pixel_values` and the per-image family tensors (`image_grid_thw`, …), on
    `device`, floating ones in `dtype`. Empty for a text-only batch."""
    if b.get("pixel_values") is None:
        return {}
    keys = ["pixel_values"] + [k for k in b.get("model_extras", ()) if k not in TOKEN_EXTRAS]
    out = {}
    for k in keys:
        v = b[k].to(device) if device is not None else b[k]
        out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out


def encode_images(model, images: dict):
    """The family's `get_image_features` on a batch's images (each once, `NativeVLM.image_features`): a
    `BaseModelOutputWithPooling` whose `pooler_output` is what `mm_encoder_outputs["image"]` takes. None for a
    text-only batch."""
    return model.image_features(images) if images else None


def prompt_token_extras(b: dict, prompts: list[list[int]]) -> list[dict]:
    """Per prompt its per-token family tensors as lists (`{"mm_token_type_ids": [p_i]}`), from the right-padded
    batch."""
    keys = [k for k in b.get("model_extras", ()) if k in TOKEN_EXTRAS]
    return [{k: b[k][i, :len(p)].tolist() for k in keys} for i, p in enumerate(prompts)]


@torch.no_grad()
def sample_native_groups(model, prompts: list[list[int]], extras: list[dict], images: dict, features, G: int,
                         settings, pad_token_id: int, stop_ids: list[int], keys: list[int],
                         synced: bool = False) -> list[list[list[int]]]:
    """G sampled completions per prompt (module doc) from left-padded prompts; `extras` their per-token tensors,
    `images` the batch's image tensors, `features` their `encode_images` output (None: `generate` encodes the
    pixels, once per prompt too); `keys` [r*G] each completion's random stream (`sampler.KeyedSampler`); `synced`
    as in `generate.sample_groups`. Returns completions [r][G] token lists, each cut after its first stop token."""
    ids, att = left_pad(prompts, pad_token_id)
    dev = next(model.parameters()).device
    kw = {k: left_pad([e[k] for e in extras], 0)[0].to(dev) for k in (extras[0] if extras else {})}
    kw |= {k: v for k, v in images.items() if k != "pixel_values"}
    if features is not None:  # a new output object: generate replaces its pooler_output with the expanded one
        kw["mm_encoder_outputs"] = {"image": type(features)(**features)}
    elif images:
        kw["pixel_values"] = images["pixel_values"]
    out = model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), **kw, num_return_sequences=G,
                         do_sample=True, max_new_tokens=settings.max_completion_length,
                         **NEUTRAL_WARPERS,
                         logits_processor=[KeyedSampler(keys, settings, dev)], synced_gpus=synced,
                         eos_token_id=list(stop_ids), pad_token_id=pad_token_id,
                         suppress_tokens=[model.image_token_id])  # image slots belong to prompts
    stop = set(stop_ids)
    rows = [cut_at_stop(r, stop) for r in out.tolist()]  # new tokens [r*G], prompt i's at i*G .. i*G+G-1
    return [rows[i * G:(i + 1) * G] for i in range(len(prompts))]


def native_group_logps(model, rows: GroupRows, images: dict, features=None, return_entropy: bool = False):
    """Per-token log-probs `[r*G, t]` and mask `[r*G, t]` (and entropies) of G completions per prompt in one
    forward of the NativeVLM `model` on shared-prefix rows: each prompt's images once (`images`, in row order), or
    their `features` from generation when the tower is frozen."""
    kw = {k: v for k, v in images.items() if k != "pixel_values"}
    pix = images.get("pixel_values")
    if features is not None:
        kw["mm_encoder_outputs"] = {"image": features}
        pix = None
    logits = model(rows.input_ids, pix, None, rows.position_ids, logits_mask=rows.logits_index,
                   segments=rows.segments, **kw, **rows.token_extras)
    return scatter_token_logps(logits, rows, return_entropy)


def native_stop_ids(encoder, tokenizer, generation_eos=None) -> list[int]:
    """The tokens that end an assistant turn: the special tokens the template supervises after a reply's text
    (`NativeSampleEncoder.reply_tail`: `<|im_end|>`, Gemma's `<end_of_turn>`, an EOS; not plain text such as
    LLaVA's trailing space, which would cut every completion at its first space), the tokenizer's EOS, and the
    checkpoint's `generation_config.eos_token_id` (`generation_eos`, an id or a list: GLM-4.1V's template writes
    nothing after a reply, its model ends a turn with `<|user|>`, which the generation config lists)."""
    special = encoder.special_ids()
    ids = {int(t) for t in encoder.reply_tail() if t in special}
    extra = generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos]
    ids.update(int(t) for t in [tokenizer.eos_token_id, *extra] if t is not None)
    if not ids:
        raise ValueError("no end-of-turn token: the template writes none after a reply and neither the tokenizer "
                         "nor the generation config names an EOS")
    return sorted(ids)


class NativeGRPOModule(GRPOModule):
    """`GRPOModule` for a native family (module doc): its own generate and shared-prefix rows."""

    def _stop_ids(self, bundle) -> list[int]:
        config = getattr(bundle.model.hf, "generation_config", None)
        return native_stop_ids(encoder_for(bundle), bundle.tokenizer, getattr(config, "eos_token_id", None))

    # FSDP gathers the root's weights for these too (not `blank_image_features`: the forward calls it inside itself,
    # and a registered method's post-forward would reshard the weights under the running forward)
    _generation_methods = ("image_features", "generate")

    def _generate(self, b: dict, prompts: list[list[int]], keys: list[int]) -> tuple:
        m, dtype = self.model, self.model.llm.get_input_embeddings().weight.dtype
        images = image_inputs(b, self.device, dtype)
        if self._images_elsewhere(bool(images)) and (blank := m.blank_image_inputs()):
            # the tower's gathers pair up with those of the ranks that have images
            m.image_features({k: v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)
                              for k, v in blank.items()})
        feats = encode_images(m, images)  # once per prompt's image, repeated for its G completions by generate
        groups = sample_native_groups(m, prompts, prompt_token_extras(b, prompts), images, feats,
                                      self.cfg.num_generations, self.settings, self.pad_id, self.stop_ids, keys,
                                      synced=self._synced)
        return images, feats, groups

    def _group_rows(self, b: dict, prompts: list[list[int]], groups: list) -> GroupRows:
        return collate_groups(prompts, groups, self.pad_id, self.model.image_token_id,
                              prompt_extras=prompt_token_extras(b, prompts))

    def _logps(self, model, ro: dict, entropy: bool = False):
        return native_group_logps(model, ro["rows"], ro["pix"], ro["feats"], return_entropy=entropy)
