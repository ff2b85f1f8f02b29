"""A native transformers VLM under vlmtrain's contract: parts by role, a forward that can return logits at
selected positions, generation, and the family's own batch tensors.

The transformers model (`*ForConditionalGeneration`) runs the forward unchanged. vlmtrain's module tree is three
role containers — `vision`, `connector`, `llm` — that register the *same* submodules (see `families.py`), so
freezing, LoRA regexes (`llm.model.layers.N...`), the trainable table, checkpoints and weight hashes work on
roles for every family. The transformers object itself is kept outside the module tree: the roles own every
parameter and buffer exactly once (checked at build), and in-place changes (PEFT adapters, NF4 layers, device
moves) are seen by both views because the modules are shared.

Batch contract (from `vlmtrain.data.native_encode`): `input_ids [b, s]` already hold the processor's image-token
runs; `pixel_values` and the per-image tensors (`image_grid_thw`, `image_sizes`, `pixel_attention_mask`) cover the
batch's images in order; per-token tensors (`token_type_ids`) are `[b, s]`.

Packed rows (`vlmtrain.data.batching.collate_packed`): `position_ids [b, s]` restart at 0 for every sample and
`attention_mask` is None; transformers derives the block-diagonal causal mask from the restarts
(`masking_utils.find_packed_sequence_indices`). Families with 3-D mRoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) get
`[4, b, s]` ids instead: row 0 the restarting text positions (for the mask), rows 1–3 the family's own
`get_rope_index` run on each sample alone — the layout their text models take for packed input
(`position_ids.shape[0] == 4`). Families with bidirectional image blocks (Gemma 3's `token_type_ids`,
`Family.bidirectional_images`) get their masks built here (`packed_block_masks`): when transformers 5.23 detects
packing it remaps mask indices to per-sample positions *before* Gemma 3's sliding-window image overlay looks up
its blocks (`remap_positions_for_packed_sequence` wraps the `or_mask_function`), so a text-only sample would
attend bidirectionally wherever an earlier sample of its row had image tokens.
"""

from __future__ import annotations

import inspect
import sys
from typing import NamedTuple

import torch
from torch import nn

from vlmtrain.errors import ConfigError, VlmtrainError
from vlmtrain.model.native.families import Family


class RouterLoss(NamedTuple):
    """What one forward of a mixture-of-experts LM tells the objective about its routers."""

    aux: torch.Tensor  # scalar: the load-balancing loss, unweighted (transformers' `aux_loss`)
    expert_tokens: torch.Tensor  # [n_experts] token slots routed to each expert, summed over MoE layers (no padding)


class RolePart(nn.Module):
    """One role's view onto submodules (and bare parameters) of the transformers model."""

    def install(self, local: str, obj) -> None:
        *parents, leaf = local.split(".")
        holder = self
        for p in parents:
            if not hasattr(holder, p):
                holder.add_module(p, RolePart())
            holder = getattr(holder, p)
        if isinstance(obj, nn.Parameter):
            holder.register_parameter(leaf, obj)
        else:
            holder.add_module(leaf, obj)


class LLMRole(RolePart):
    """The language model role, with the causal-LM accessors the rest of vlmtrain uses."""

    def __init__(self, hf):
        super().__init__()
        object.__setattr__(self, "_hf", hf)

    @property
    def config(self):
        return self._hf.config.get_text_config()

    def get_input_embeddings(self) -> nn.Module:
        return self._hf.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self._hf.get_output_embeddings()


def _resolve(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"native family map: {type(root).__name__} has no `{path}`")
        obj = getattr(obj, part)
    return obj


def _find(root: nn.Module, path: str):
    """The object at dotted `path` under `root`, or None where a part is missing or None."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class NativeVLM(nn.Module):
    kind = "native"

    def __init__(self, hf, family: Family, model_type: str):
        super().__init__()
        object.__setattr__(self, "hf", hf)  # outside the module tree (see module doc)
        self.model_type = model_type
        self.family = family
        self.vision = RolePart()
        self.connector = RolePart()
        self.llm = LLMRole(hf)
        self._bare_paths: list[tuple[str, str]] = []  # (path here, path in hf) of each bare parameter
        for role in family.frozen_roles:
            self.add_module(role, RolePart())
        for role, parts in {**family.roles, **family.frozen_roles}.items():
            for local, path in parts.items():
                obj = _resolve(hf, path)
                if obj is None:  # a part the config leaves out (Gemma 4 without a vision or audio tower)
                    continue
                getattr(self, role).install(local, obj)
                if isinstance(obj, nn.Parameter):
                    self._bare_paths.append((f"{role}.{local}", path))
        self._check_partition()
        for role in family.frozen_roles:
            # frozen for good: never trained by a stage, so DDP/FSDP see no parameter without a gradient
            getattr(self, role).requires_grad_(False)
        cfg = hf.config
        token = getattr(cfg, "image_token_id", None)
        self.image_token_id = int(token if token is not None else cfg.image_token_index)
        # set by data-parallel strategies: a batch without images runs a blank image through the tower and
        # connector (weight 0), so sharded ranks (FSDP2, ZeRO-3) all take part in every tower forward/backward
        self.always_encode_images = False
        self.vision_cache = None  # the frozen-tower feature cache is a composed-model feature
        # weight of the router load-balancing loss in the training objective (MoE families, Family.router_aux_loss):
        # the checkpoint config's `router_aux_loss_coef`, as transformers' own forward adds it; a stage may override
        # it (`trainer.router_aux_loss_coef`, 0 = off). 0 for dense families.
        text_cfg = hf.config.get_text_config()
        self.router_aux_loss_coef = float(getattr(text_cfg, "router_aux_loss_coef", 0.0) or 0.0) \
            if family.router_aux_loss else 0.0
        # DPO batches in shared-prefix rows (`collate_preference_prefix`): set per stage by
        # `vlmtrain.train.native.configure_shared_prefix`, read by the encoder (`encoder_for`)
        self.dpo_shared_prefix = False

    def _check_partition(self) -> None:
        """Every parameter and buffer of the transformers model belongs to exactly one role."""
        def ids(named):
            return {id(t): n for n, t in named}

        want_p = ids(self.hf.named_parameters(remove_duplicate=True))
        want_b = ids(self.hf.named_buffers(remove_duplicate=True))
        seen_p: dict[int, str] = {}
        for role in ("vision", "connector", "llm", *self.family.frozen_roles):
            for n, p in getattr(self, role).named_parameters(remove_duplicate=True):
                if id(p) in seen_p and seen_p[id(p)] != role:
                    raise ConfigError(f"native family map of {self.model_type}: `{n}` is in two roles")
                seen_p[id(p)] = role
        have_b = {id(b) for b in self.buffers()}
        missing = [n for i, n in want_p.items() if i not in seen_p] + [n for i, n in want_b.items()
                                                                         if i not in have_b]
        if missing:
            raise ConfigError(f"native family map of {self.model_type}: no role holds {missing[:3]} "
                              f"({len(missing)} tensors)")

    # ---- what the stages need --------------------------------------------------------------------------------
    @property
    def num_image_tokens(self) -> None:
        """Image tokens vary per image (the processor decides); there is no fixed count."""
        return None

    @property
    def supports_selective_head(self) -> bool:
        return True  # the head is lm_head (+ soft-capping, applied in `head`) for every mapped family

    def train(self, mode: bool = True):
        super().train(mode)
        self.hf.train(mode)  # the transformers wrappers outside the tree read `self.training` too
        return self

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[..., d]` → logits `[..., vocab]`: the LM head plus the family's final soft-capping (Gemma)."""
        logits = self.hf.get_output_embeddings()(hidden)  # lm_head (Llama 4's sits inside its language_model)
        cap = getattr(self.llm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def enable_gradient_checkpointing(self) -> None:
        self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                logits_mask: torch.Tensor | None = None, image_keys: list | None = None, router_aux: bool = False,
                segments: torch.Tensor | None = None, **extras):
        """Logits `[b, s, vocab]` (as `.logits`), or `[n, vocab]` at `logits_mask` (bool `[b, s]`, or `[n, 2]`
        (row, position) pairs). `extras`: the family's tensors from the batch. `image_keys` is accepted for the
        shared contract and unused (no feature cache for native towers). `router_aux` (MoE families): return
        `(logits, RouterLoss)`: the router load-balancing loss of this forward and its per-expert token counts.
        `segments [b, s]`: shared-prefix rows (`vlmtrain.data.prefix`; `attention_mask` None, `position_ids [b, s]`
        continuing the prefix): the masks and mRoPE ids are built here (`shared_prefix`)."""
        self._share_bare_parameters()
        kw = {k: v for k, v in extras.items() if v is not None}
        if router_aux:
            kw["output_router_logits"] = True
        if segments is not None:
            attention_mask, position_ids = self._shared_prefix_inputs(input_ids, segments, position_ids, kw)
        if attention_mask is None and position_ids is not None and self.family.bidirectional_images:
            # a batch without image tokens may come without token_type_ids: no image blocks then
            types = kw.get(self.family.image_block_key, torch.zeros_like(position_ids))
            attention_mask = self.packed_block_masks(position_ids, types)
        if position_ids is not None and position_ids.dim() == 2 and self._rope_index() is not None:
            position_ids = self.packed_mrope_positions(input_ids, position_ids, kw.get("mm_token_type_ids"),
                                                       kw.get("image_grid_thw"))
        blank: list[torch.Tensor] = []
        hook = None
        blank_inputs = (self.blank_image_inputs() if pixel_values is None and self.always_encode_images
                        and torch.is_grad_enabled() else None)
        if blank_inputs and self.family.batch_aligned_images:
            pixel_values = self._blank_aligned_rows(input_ids, blank_inputs, kw)  # Mllama: through the forward
            blank_inputs = None
        text_rows = self._zero_text_only_image_states(pixel_values, kw.get("aspect_ratio_ids"))
        if blank_inputs:
            # Right after the token embedding (Gemma 4: its per-layer embedding, `Family.blank_image_after`), where
            # transformers runs the tower on a rank with images: sharded ranks then touch the embedding, tower,
            # connector and decoder blocks in the same order (ZeRO-3 gathers each module's parameters when it is
            # called; a mismatch between ranks aborts the collective).
            hook = self._blank_anchor().register_forward_hook(
                lambda *_: blank.append(self.blank_image_features(input_ids.device, blank_inputs)))
        try:
            hidden, out = self._body(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                     position_ids=position_ids, use_cache=False, **kw)
        finally:
            if hook is not None:
                hook.remove()
            if text_rows is not None:
                text_rows.remove()
        if blank:
            hidden = hidden + 0.0 * blank[0]
        logits = self._logits(hidden, logits_mask)
        if router_aux:
            # a padding mask [b, s]; packed rows (None, per-layer masks) have none, shared-prefix rows mark their
            # padding in `segments` (-1)
            mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
            if segments is not None:
                mask = (segments >= 0).long()
            return logits, RouterLoss(self.router_aux_loss(out.router_logits, mask),
                                      self.expert_tokens(out.router_logits, mask))
        return logits

    def _rope_index(self):
        """The family's `get_rope_index` (mRoPE families), or None."""
        return getattr(getattr(self.hf, "model", None), "get_rope_index", None)

    def _body(self, **inputs) -> tuple[torch.Tensor, object]:
        """(decoder hidden states `[b, s, d]`, transformers' output) of one forward without the LM head: the family's
        `hf.model`, or, for a model whose top-level forward runs a whole causal LM (`Family.hidden_from`, Llama 4),
        that forward with the decoder's output read off a hook; its own head then runs on one position only
        (`logits_to_keep=1`), and vlmtrain's `head` makes the logits it needs from the hidden states."""
        if not self.family.hidden_from:
            out = self.hf.model(**inputs)
            return out.last_hidden_state, out
        seen: list[torch.Tensor] = []
        decoder = _resolve(self.hf, self.family.hidden_from)
        hook = decoder.register_forward_hook(lambda _m, _i, o: seen.append(o.last_hidden_state if hasattr(
            o, "last_hidden_state") else o[0]))
        try:
            out = self.hf(**inputs, logits_to_keep=1)
        finally:
            hook.remove()
        return seen[-1], out

    def _shared_prefix_inputs(self, input_ids: torch.Tensor, segments: torch.Tensor, position_ids: torch.Tensor,
                              kw: dict) -> tuple:
        """(attention mask(s), position ids) of shared-prefix rows: `[4, b, s]` ids for mRoPE families."""
        from vlmtrain.model.native.shared_prefix import shared_prefix_masks, shared_prefix_mrope_positions

        if self.family.shared_prefix:
            raise VlmtrainError(f"shared-prefix rows are not available for {self.model_type}: "
                                f"{self.family.shared_prefix}")
        masks = shared_prefix_masks(self, segments, position_ids, kw.get(self.family.image_block_key))
        position_ids = position_ids + self.family.position_offset  # PaliGemma's positions start at 1
        if self._rope_index() is not None:
            position_ids = shared_prefix_mrope_positions(self._rope_index(), input_ids, segments,
                                                         position_ids, kw.get("mm_token_type_ids"),
                                                         kw.get("image_grid_thw"))
        return masks, position_ids

    def _blank_anchor(self) -> nn.Module:
        """The LM module after which transformers runs the tower: `Family.blank_image_after` under the llm role
        when the model has it (a None attribute: Gemma 4 sizes without per-layer inputs), else the token embedding."""
        module = _find(self.llm, self.family.blank_image_after) if self.family.blank_image_after else None
        return module if module is not None else self.llm.get_input_embeddings()

    def _blank_aligned_rows(self, input_ids: torch.Tensor, inputs: dict, kw: dict) -> torch.Tensor:
        """A text-only batch of a batch-aligned family (Mllama) given one padding image slot per row, as its collate
        gives a text-only row beside an image row: `pixel_values [b, 1, tiles, c, h, w]` (returned), and into `kw`
        `aspect_ratio_ids [b, 1]` (0 = no image), `aspect_ratio_mask [b, 1, tiles]` and `cross_attention_mask
        [b, s, 1, tiles]` of zeros. Why through the forward and not beside it (`blank_image_features`): the
        cross-attention layers of the LM run only when image states exist, and a sharded rank must call them as an
        image rank does. `_zero_text_only_image_states` then zeroes the states, so the rows equal the text alone."""
        b, s = input_ids.shape
        rows = {k: v.to(input_ids.device).expand(b, *v.shape[1:]).contiguous() for k, v in inputs.items()}
        kw["aspect_ratio_ids"], kw["aspect_ratio_mask"] = rows["aspect_ratio_ids"], rows["aspect_ratio_mask"]
        kw["cross_attention_mask"] = input_ids.new_zeros((b, s, 1, rows["aspect_ratio_mask"].shape[-1]))
        return rows["pixel_values"]

    def _zero_text_only_image_states(self, pixel_values, aspect_ratio_ids):
        """Batch-aligned families (Mllama): a hook that zeroes the projected image states of rows without an image
        (all `aspect_ratio_ids` 0, the padding id), or None when every row has one.

        Why: such a row's tokens have fully masked cross-attention rows, which transformers un-masks
        (`_prepare_cross_attention_mask`), so they would attend to the padding image's states; alone, the same
        sample skips the cross-attention layers. With zero states the bias-free k/v projections give zero values,
        the attention adds exactly 0 and the MLP branch is masked: the row equals the sample alone. Rows with an
        image are untouched, so a batch where every sample has images is transformers' own forward."""
        if not self.family.batch_aligned_images or pixel_values is None or aspect_ratio_ids is None:
            return None
        has_image = (aspect_ratio_ids != 0).any(dim=-1)
        if bool(has_image.all()):
            return None

        def zero_rows(_module, _inputs, out):
            return out * has_image.view(-1, *([1] * (out.dim() - 1))).to(out.dtype)

        return self.hf.model.multi_modal_projector.register_forward_hook(zero_rows)

    def _logits(self, hidden: torch.Tensor, logits_mask: torch.Tensor | None):
        """Hidden states `[b, s, d]` → `.logits [b, s, vocab]`, or `[n, vocab]` at `logits_mask` (see forward)."""
        if logits_mask is None:
            from transformers.modeling_outputs import CausalLMOutputWithPast

            return CausalLMOutputWithPast(logits=self.head(hidden))
        if logits_mask.dtype == torch.bool:
            return self.head(hidden[logits_mask])
        return self.head(hidden[logits_mask[:, 0], logits_mask[:, 1]])

    def router_aux_loss(self, router_logits: tuple, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Switch-style load-balancing loss (scalar) of one forward: the family's own `load_balancing_loss_func` on
        the per-layer router logits (each `[b·s, n_experts]`), with the batch's `attention_mask [b, s]` excluding
        padding — the call transformers' `*ForConditionalGeneration.forward` makes. Packed rows (no padding mask)
        count every position, as transformers does without a mask."""
        balance = sys.modules[type(self.hf).__module__].load_balancing_loss_func
        return balance(tuple(router_logits), self._experts(), self.llm.config.num_experts_per_tok, attention_mask)

    def _experts(self) -> int:
        """Routed experts per MoE layer, as the family's forward reads them (GLM-4.5V's text config names them
        `n_routed_experts` / `num_local_experts`, Qwen's `num_experts`)."""
        cfg = self.llm.config
        n = getattr(cfg, "num_experts", None)
        return int(n if n is not None else cfg.num_local_experts)

    def expert_tokens(self, router_logits: tuple, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """`[n_experts]` top-k token slots each expert received, summed over the MoE layers' router logits (each
        `[b·s, n_experts]`; padding excluded by `attention_mask [b, s]`), for the step's log."""
        n_experts = self._experts()
        counts = torch.zeros(n_experts, device=router_logits[0].device)
        keep = None if attention_mask is None else attention_mask.reshape(-1, 1).bool()
        biased = [r for r in self.hf.modules() if hasattr(r, "e_score_correction_bias")]  # in layer order
        with torch.no_grad():
            for i, layer in enumerate(router_logits):
                chosen = self._routed(layer, biased[i] if len(biased) == len(router_logits) else None)  # [b·s, k]
                if keep is not None:
                    chosen = chosen[keep.expand_as(chosen)]
                counts += torch.bincount(chosen.reshape(-1), minlength=n_experts).to(counts.dtype)
        return counts

    def _routed(self, logits: torch.Tensor, router) -> torch.Tensor:
        """`[b·s, k]` experts each token is sent to, from one layer's router logits `[b·s, n_experts]`: their top-k
        (softmax routers: Qwen), or for a sigmoid router with a score-correction bias and expert groups (GLM-4.5V,
        DeepSeek-style `*TopkRouter`) the selection its forward makes — sigmoid + bias, the best `topk_group` groups
        by their two best scores, top-k within them (re-stated here: the router's forward needs hidden states)."""
        k = self.llm.config.num_experts_per_tok
        if router is None:
            return logits.topk(k, dim=-1).indices
        scores = logits.float().sigmoid() + router.e_score_correction_bias
        grouped = scores.view(scores.shape[0], router.num_group, -1)  # [b·s, groups, experts per group]
        best_groups = grouped.topk(2, dim=-1)[0].sum(-1).topk(router.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros(grouped.shape[:2], dtype=torch.bool, device=scores.device).scatter_(1, best_groups, True)
        scores = scores.masked_fill(~keep.unsqueeze(-1).expand_as(grouped).reshape_as(scores), float("-inf"))
        return scores.topk(k, dim=-1, sorted=False).indices

    def _share_bare_parameters(self) -> None:
        """Point transformers at the role's current object of each bare parameter (`bare_parameters`). FSDP2
        replaces a module's parameters with new objects (its sharded DTensor; the unsharded tensor during a forward)
        by setting them on the module that registers them — for a bare parameter that is the role, while
        transformers reads its own attribute. Without this, OneVision's `image_newline` under fsdp kept its initial
        value (transformers used the stale object, which no optimizer holds) and a resume of its DCP checkpoint
        failed on the optimizer state the checkpoint lacked."""
        for ours, theirs in self._bare_paths:
            owner, _, leaf = theirs.rpartition(".")
            holder = _resolve(self.hf, owner) if owner else self.hf
            current = _resolve(self, ours)
            if getattr(holder, leaf) is not current:
                setattr(holder, leaf, current)

    def bare_parameters(self) -> list[nn.Parameter]:
        """Parameters a role holds directly, not inside a module (LLaVA-NeXT/OneVision's `image_newline`): the
        transformers forward reads them without calling a module."""
        return [p for role in (self.vision, self.connector, self.llm) for p in role.parameters(recurse=False)]

    def blank_image_inputs(self) -> dict | None:
        """Inputs of `hf.model.get_image_features` for one blank image of the smallest size the family takes:
        Qwen-style towers `pixel_values [m², c·t·p²]` + `image_grid_thw [[1, m, m]]` (one merged token); fixed-size
        towers (Gemma 3's SigLIP, LLaVA-1.5's CLIP, InternVL's and Llama 4's one tile) `pixel_values [1, c, h, w]`;
        Mistral 3's Pixtral a 2×2-merged-token image + `image_sizes`; LFM2-VL one NaFlex tile of k×k patches
        (`[1, k², c·p²]`, `spatial_shapes`, `pixel_attention_mask`; k the pixel-unshuffle factor); Gemma 4 the
        patches of one pooled soft token (`_pooled_patches`); Mllama one padding image slot per row, run through the
        forward (`_blank_aligned_rows`); Idefics3/SmolVLM one crop
        `[1, 1, c, size, size]` + its pixel mask, filled with 0.5 (an all-zero crop is dropped as padding);
        LLaVA-NeXT/OneVision a tower-sized image as AnyRes tiles it (`[1, crops, c, size, size]` + `image_sizes`,
        so the base view, the tiles and `image_newline` all take part). None: no blank image defined (sharded
        strategies refused); {}: the model has no vision tower, so nothing to run."""
        kind = self.family.blank_image  # Family.blank_image: which of the shapes below the family takes
        if not kind:
            return None  # none for this family (the generic map): sharded strategies are refused for it
        vc = self.hf.config.vision_config
        if vc is None:
            return {}  # no tower (Gemma 4's default config): text-only ranks have nothing to run
        if kind == "grid":
            m, p, t = vc.spatial_merge_size, vc.patch_size, vc.temporal_patch_size
            return {"pixel_values": torch.zeros(m * m, vc.in_channels * t * p * p),
                    "image_grid_thw": torch.tensor([[1, m, m]])}
        channels = int(getattr(vc, "num_channels", 3))
        if kind == "patches":
            return _pooled_patches(vc, channels)
        if kind == "pixtral":  # 2×2 merged tokens: the patch merger's unfold takes no smaller grid
            side = int(vc.patch_size) * int(self.hf.config.spatial_merge_size) * 2
            return {"pixel_values": torch.zeros(1, channels, side, side), "image_sizes": torch.tensor([[side, side]])}
        if kind == "naflex":  # SigLIP2 NaFlex: one tile of k×k patches, one token after the k×k pixel unshuffle
            k = int(self.hf.config.downsample_factor)
            return {"pixel_values": torch.zeros(1, k * k, channels * int(vc.patch_size) ** 2),
                    "spatial_shapes": torch.tensor([[k, k]]),
                    "pixel_attention_mask": torch.ones(1, k * k, dtype=torch.bool)}
        # InternVL's image_size is [h, w]; the others' one int
        height, width = vc.image_size if isinstance(vc.image_size, (list, tuple)) else (vc.image_size,) * 2
        size = int(height)
        if kind == "fixed":
            return {"pixel_values": torch.zeros(1, channels, int(height), int(width))}
        if kind == "aligned":  # Mllama's padding image slot: its processor marks tile 0 of every slot
            tiles = int(vc.max_num_tiles)
            mask = torch.zeros(1, 1, tiles, dtype=torch.long)
            mask[..., 0] = 1
            return {"pixel_values": torch.zeros(1, 1, tiles, channels, size, size),
                    "aspect_ratio_ids": torch.zeros(1, 1, dtype=torch.long), "aspect_ratio_mask": mask}
        if kind == "crop":
            return {"pixel_values": torch.full((1, 1, channels, size, size), 0.5),
                    "pixel_attention_mask": torch.ones(1, 1, size, size, dtype=torch.bool)}
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        crops = image_size_to_num_patches([size, size], self.hf.config.image_grid_pinpoints, size)  # "anyres"
        return {"pixel_values": torch.zeros(1, crops, channels, size, size), "image_sizes": torch.tensor([[size, size]])}

    def blank_image_features(self, device: torch.device, inputs: dict | None = None) -> torch.Tensor:
        """Scalar sum of what the tower + connector hand the LM for a blank image (`blank_image_inputs`): the image
        features (`pooler_output`) and Qwen3-VL's DeepStack features — exactly the tensors a real image feeds the LM,
        so times 0 it gives the parameters a real image gives a gradient (zero) and no others (the tower's last
        hidden state would also reach LLaVA's unused top layer). `device` is the batch's: reading it off a weight
        (`module.weight`) would make ZeRO-3 gather that weight on this rank alone. `inputs`: `blank_image_inputs()`
        when the caller already built them."""
        inputs = {k: v.to(device) for k, v in (inputs or self.blank_image_inputs()).items()}
        if not hasattr(self.hf, "model"):
            # Llama 4 has no inner `.model`: its `get_image_features` is the tower alone, and its forward projects
            # the flattened states itself (`multi_modal_projector(vision_flat)`)
            states = self.hf.get_image_features(**inputs, return_dict=True).last_hidden_state
            return self.hf.multi_modal_projector(states.reshape(-1, states.shape[-1])).float().sum()
        out = self.hf.model.get_image_features(**inputs, return_dict=True)
        total = torch.zeros((), device=device)
        stack = [out.pooler_output, getattr(out, "deepstack_features", None)]
        while stack:
            v = stack.pop()
            if isinstance(v, torch.Tensor):
                total = total + v.float().sum()
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
        return total

    def packed_mrope_positions(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                               mm_token_type_ids: torch.Tensor | None,
                               image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """`[4, b, s]` position ids of packed rows for an mRoPE family (see module doc).

        `position_ids [b, s]`: text positions restarting per sample (a new sample starts wherever a position is not
        its left neighbour + 1, transformers' own rule); `mm_token_type_ids [b, s]` (1 = image token) tells which
        sample owns which of `image_grid_thw [n_img, 3]`'s rows, taken in order, one per run of image tokens."""
        if mm_token_type_ids is None:
            raise VlmtrainError(f"packing {self.model_type}: the batch has no mm_token_type_ids (the processor's "
                              "modality map), which 3-D mRoPE positions need")
        rope_index = self.hf.model.get_rope_index
        out = position_ids.new_zeros((4, *position_ids.shape))
        out[0] = position_ids
        first_image = 0
        for row in range(position_ids.shape[0]):
            starts = _sample_starts(position_ids[row])
            for a, e in zip(starts, starts[1:] + [position_ids.shape[1]]):
                types = mm_token_type_ids[row, a:e]
                n_images = int(((types == 1) & (_shifted_right(types) != 1)).sum())  # runs of image tokens
                grids = None
                if n_images:
                    grids = image_grid_thw[first_image:first_image + n_images]
                    first_image += n_images
                pos, _ = rope_index(input_ids[row:row + 1, a:e], mm_token_type_ids=types[None],
                                    image_grid_thw=grids)
                out[1:, row, a:e] = pos[:, 0]
        return out

    def packed_block_masks(self, position_ids: torch.Tensor, token_type_ids: torch.Tensor) -> dict:
        """Attention masks of packed rows with bidirectional image blocks, one per layer type, in the form the
        model's attention implementation takes (transformers' `create_causal_mask`, no packing detection):
        allowed(q, k) = same sample ∧ (k ≤ q ∨ same image block) [∧ q − k < window for sliding layers].

        `position_ids [b, s]` restart per sample; `token_type_ids [b, s]` (1 = image token). Within one sample row
        indices and positions differ by a constant, so causal and window tests on indices are the per-sample ones."""
        from transformers.masking_utils import (and_masks, blockwise_overlay, create_causal_mask,
                                                find_packed_sequence_indices, sliding_window_overlay)

        text_cfg = self.llm.config
        if self.family.image_blocks_sliding_only and getattr(text_cfg, "use_bidirectional_attention", None) != "vision":
            token_type_ids = torch.zeros_like(token_type_ids)  # Gemma 4 sizes whose images attend causally
        sample_ids = find_packed_sequence_indices(position_ids)
        if sample_ids is None:  # one sample per row
            sample_ids = torch.zeros_like(position_ids)
        # image blocks as transformers numbers them (Gemma 3's get_block_sequence_ids_for_mask)
        is_image = token_type_ids == 1
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        blocks = torch.where(is_image, starts.long().cumsum(1) - 1, -1)

        def same_sample(batch_idx, head_idx, q_idx, kv_idx):
            return sample_ids[batch_idx, q_idx] == sample_ids[batch_idx, kv_idx]

        dtype = self.llm.get_input_embeddings().weight.dtype
        shape_probe = torch.empty((*position_ids.shape, 0), dtype=dtype, device=position_ids.device)
        common = {"config": text_cfg, "inputs_embeds": shape_probe, "attention_mask": None, "past_key_values": None}
        overlay = {"or_mask_function": blockwise_overlay(blocks)}
        # Gemma 4 keeps its full-attention layers causal (image blocks on sliding layers only)
        full_overlay = {} if self.family.image_blocks_sliding_only else overlay
        masks = {"full_attention": create_causal_mask(**common, **full_overlay, and_mask_function=same_sample)}
        window = getattr(text_cfg, "sliding_window", None)
        if window and "sliding_attention" in (getattr(text_cfg, "layer_types", None) or ()):
            masks["sliding_attention"] = create_causal_mask(
                **common, **overlay, and_mask_function=and_masks(same_sample, sliding_window_overlay(window)))
        return masks

    def image_features(self, images: dict):
        """The family's `get_image_features` on a batch's image tensors (`pixel_values` and the family's per-image
        tensors, `image_grid_thw`, ...), each image once: a `BaseModelOutputWithPooling` whose `pooler_output` is
        what `generate` and the forward take as `mm_encoder_outputs["image"]`."""
        fn = self.hf.model.get_image_features
        names = [n for n in inspect.signature(fn).parameters if n not in ("pixel_values", "kwargs")]
        return fn(pixel_values=images["pixel_values"], **{n: images[n] for n in names if n in images},
                  return_dict=True)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, **inputs) -> torch.Tensor:
        """Greedy by default; returns only the new tokens `[b, n_new]` (prompts left-padded)."""
        inputs.setdefault("do_sample", False)
        out = self.hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                               **inputs)
        return out[:, input_ids.shape[1]:]


def _pooled_patches(vc, channels: int) -> dict:
    """Gemma 4's smallest image: the k×k patches its pooler turns into one soft token (k = `pooling_kernel_size`),
    laid out as its image processor does: `pixel_values [1, k², c·p²]` (patches flattened), `image_position_ids
    [1, k², 2]` (x, y) with x running fastest."""
    k, p = int(vc.pooling_kernel_size), int(vc.patch_size)
    ys, xs = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    return {"pixel_values": torch.zeros(1, k * k, channels * p * p),
            "image_position_ids": torch.stack([xs.flatten(), ys.flatten()], dim=-1)[None]}


def _sample_starts(positions: torch.Tensor) -> list[int]:
    """Indices where a packed sample begins in one row's positions `[s]` (position ≠ left neighbour + 1)."""
    breaks = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
    return [0] + breaks.tolist()


def _shifted_right(t: torch.Tensor) -> torch.Tensor:
    """`[s]` → `[s]`: each element's left neighbour (0 before the first)."""
    return torch.cat([t.new_zeros(1), t[:-1]])
