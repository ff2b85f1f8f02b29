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
"""

from __future__ import annotations

import torch
from torch import nn

from vlmtrain.errors import ConfigError
from vlmtrain.model.native.families import Family


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
        for role, parts in family.roles.items():
            for local, path in parts.items():
                getattr(self, role).install(local, _resolve(hf, path))
        self._check_partition()
        cfg = hf.config
        token = getattr(cfg, "image_token_id", None)
        self.image_token_id = int(token if token is not None else cfg.image_token_index)
        self.always_encode_images = False  # data-parallel dummy images: not yet for native families
        self.vision_cache = None  # the frozen-tower feature cache is a composed-model feature

    def _check_partition(self) -> None:
        """Every parameter and buffer of the transformers model belongs to exactly one role."""
        def ids(named):
            return {id(t): n for n, t in named}

        want_p = ids(self.hf.named_parameters(remove_duplicate=True))
        want_b = ids(self.hf.named_buffers(remove_duplicate=True))
        seen_p: dict[int, str] = {}
        for role in ("vision", "connector", "llm"):
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
        logits = self.hf.lm_head(hidden)
        cap = getattr(self.llm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def enable_gradient_checkpointing(self) -> None:
        self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                logits_mask: torch.Tensor | None = None, image_keys: list | None = None, **extras):
        """Logits `[b, s, vocab]` (as `.logits`), or `[n, vocab]` at `logits_mask` (bool `[b, s]`, or `[n, 2]`
        (row, position) pairs). `extras`: the family's tensors from the batch. `image_keys` is accepted for the
        shared contract and unused (no feature cache for native towers)."""
        kw = {k: v for k, v in extras.items() if v is not None}
        out = self.hf.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False, **kw)
        hidden = out.last_hidden_state
        if logits_mask is None:
            from transformers.modeling_outputs import CausalLMOutputWithPast

            return CausalLMOutputWithPast(logits=self.head(hidden))
        if logits_mask.dtype == torch.bool:
            return self.head(hidden[logits_mask])
        return self.head(hidden[logits_mask[:, 0], logits_mask[:, 1]])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, **inputs) -> torch.Tensor:
        """Greedy by default; returns only the new tokens `[b, n_new]` (prompts left-padded)."""
        inputs.setdefault("do_sample", False)
        out = self.hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                               **inputs)
        return out[:, input_ids.shape[1]:]
