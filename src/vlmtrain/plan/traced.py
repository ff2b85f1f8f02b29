"""Saved-tensor traces on the meta device: what autograd keeps for backward, read off a module run under
`saved_tensors_hooks` with no memory and no compute. The planner uses them where a block has no closed form:

- `TracedLayers`: Qwen3.5's Gated DeltaNet token mixers and mixture-of-experts MLPs, one module per kind, inside
  otherwise closed-form transformer blocks;
- `TracedStack`: a whole decoder run once, its saved tensors attributed to the block that saved them first
  (Gemma 4: two head sizes, key/value-sharing layers, per-layer inputs; no block is like the next);
- `count_saved`: the counting both use (and `plan.core` for connectors).

SDPA on meta decomposes into the math path (it saves the [b, h, s, s] probabilities); CUDA's and CPU's fused kernels
save q, k, v, the output (laid out [b, s, h, d]) and an fp32 log-sum-exp, plus the mask converted to the query dtype.
`fused_sdpa_on_meta` stands in for SDPA during a trace so that the trace saves what the fused kernels save (checked
against real CPU runs: `tests/test_plan_native.py`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from dataclasses import dataclass, field


def count_saved(run, params: set[int], widen: int = 1, on_save=None) -> dict[int, int]:
    """{storage id: bytes} of the tensors autograd saves while `run()` executes, parameters' storages excluded
    (they are weights, counted elsewhere). bf16 storages count `widen` times (a bf16 trace standing in for fp32).
    `on_save(storage id)`, if given, is called at each first save (to attribute it). Every saved tensor stays alive
    until the count is done: a storage saved and freed inside the forward would otherwise hand its address to the
    next one, and the two would count once or twice depending on the allocator."""
    import torch

    seen: dict[int, int] = {}
    held = []

    def pack(t):
        st = t.untyped_storage()
        held.append(t)
        if st._cdata not in params and st._cdata not in seen:
            seen[st._cdata] = st.nbytes() * (widen if t.dtype == torch.bfloat16 else 1)
            if on_save is not None:
                on_save(st._cdata)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return seen


@contextlib.contextmanager
def fused_sdpa_on_meta():
    """Within the block, `F.scaled_dot_product_attention` on meta tensors saves what the fused kernels save (see
    the module doc); on real tensors it is the real function."""
    import torch
    import torch.nn.functional as F

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, mask):  # q [b, h, s, d], k / v [b, h_kv, s, d]
            b, h, s, _ = q.shape
            out = q.new_empty(b, s, h, v.shape[-1]).transpose(1, 2)  # the kernels' [b, s, h, d] layout
            saved = [q, k, v, out, q.new_empty(b, h, s, dtype=torch.float32)]
            if mask is not None:
                saved.append(mask.to(q.dtype) if mask.dtype == torch.bool else mask)
            ctx.save_for_backward(*saved)
            return out

    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, **kw):
        if q.device.type != "meta":
            return real(q, k, v, attn_mask=attn_mask, **kw)
        return Fused.apply(q, k, v, attn_mask)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def _param_storages(mod) -> set[int]:
    return {q.untyped_storage()._cdata for q in (*mod.parameters(), *mod.buffers())}


class TracedLayers:
    """Saved bytes of the decoder's Gated DeltaNet token mixers (Qwen3.5's `linear_attn`: projections, causal conv,
    the chunked delta rule of transformers' CPU path, the gated norm) and mixture-of-experts MLPs (router, the
    experts of each token's top k through transformers' `grouped_mm` path, a shared expert), read by running one
    such module on the meta device (`count_saved`). Both are linear in the rows, so two traces (1 and 2 rows) per
    sequence length give every micro-batch. The stage's full-training parameters require grad in the trace; LoRA
    adapters and autocast copies are added by `plan.core._traced_part`. transformers' grouped_mm has a bf16-only
    meta kernel, so expert MLPs are traced in bf16 and their bf16 tensors counted at 4 bytes for an fp32 step."""

    ROLES = {"linear_attention": {"in_qkv", "in_z", "in_b", "in_a", "o"}, "moe": {"gate", "up", "down"}}
    INPUT_ROLES = {"in_qkv", "in_z", "in_b", "in_a", "gate", "up"}  # Linears that read the module's input

    def __init__(self, layers, stage):
        self.kinds = [{"mixer": "linear_attention" if hasattr(layer, "linear_attn") else None,
                       "mlp": "moe" if hasattr(getattr(layer, "mlp", None), "experts") else None} for layer in layers]
        self.modules = {}
        for layer, k in zip(layers, self.kinds):
            if k["mixer"]:
                self.modules.setdefault(k["mixer"], layer.linear_attn)
            if k["mlp"]:
                self.modules.setdefault(k["mlp"], layer.mlp)
        self.full = stage.train.llm is True
        self.hidden = int(layers[0].input_layernorm.weight.shape[0])
        self._cache: dict = {}

    def any(self) -> bool:
        return bool(self.modules)

    def kind(self, idx: int, part: str) -> str | None:
        return self.kinds[idx].get(part)

    def roles(self, kind: str) -> set[str]:
        return self.ROLES[kind]

    def trains(self, kind: str) -> bool:
        return self.full

    def outside(self, shape, x_rg: bool, p, checkpointing: bool) -> int:
        return 0  # the traced modules sit inside closed-form blocks: nothing outside them

    def saved(self, kind: str, shape, x_rg: bool, p) -> int:
        """Bytes one `kind` module saves for `shape.rows` rows of `shape.seq` tokens."""
        if not (x_rg or self.full):
            return 0
        key = (kind, shape.seq, shape.mask, x_rg, p.act)
        if key not in self._cache:
            self._cache[key] = tuple(self._trace(kind, rows, shape.seq, shape.mask, x_rg, p) for rows in (1, 2))
        one, two = self._cache[key]
        return one + (two - one) * (shape.rows - 1)

    def _trace(self, kind: str, rows: int, seq: int, mask: bool, x_rg: bool, p) -> int:
        import torch

        dtype = torch.float32 if p.act == 4 and kind != "moe" else torch.bfloat16
        widen = 2 if p.act == 4 and dtype == torch.bfloat16 else 1
        mod = copy.deepcopy(self.modules[kind]).to(device="meta", dtype=dtype).requires_grad_(self.full).train()
        x = torch.empty(rows, seq, self.hidden, device="meta", dtype=dtype, requires_grad=x_rg)
        kw = {}
        if kind == "linear_attention" and mask:  # padded rows: the mixer zeroes padding positions first
            kw["attention_mask"] = torch.ones(rows, seq, dtype=torch.long, device="meta")
        return sum(count_saved(lambda: mod(x, **kw), _param_storages(mod), widen).values())


@dataclass
class StackTrace:
    """One whole-stack trace: bytes saved before the first block (`prologue`), by each block first
    (`blocks`), and by any block from the blocks' shared arguments (`args_saved`: rotary tables, masks, per-layer
    inputs, counted once); `args_all`: every shared argument's bytes (what checkpointed blocks hold)."""

    prologue: int = 0
    blocks: list[int] = field(default_factory=list)
    args_saved: int = 0
    args_all: int = 0


class TracedStack:
    """Every block of a stack whose blocks have no closed form, traced by running the whole stack once on meta
    (`run(module, rows, seq, dtype, x_rg, mask)` builds the family's inputs and calls it) under
    `fused_sdpa_on_meta`: a saved storage belongs to the block that saves it first; the blocks' shared arguments
    (every tensor argument but the hidden states) are counted once, apart. One row is traced as is; more rows are
    linear in the rows (traces of two and three), or quadratic for `one_sequence` stacks (Pixtral runs every image
    as one sequence under an [N, N] block mask; fitted through 1, 2 and 3). Answers the `StackGeo.traced` questions with one kind per block
    (`kind(i, "block") == "block:i"`); LoRA adapters and autocast copies are added by `plan.core._traced_part`
    over the block's Linears. `moe_bf16`: a stack with expert MLPs (bf16-only grouped_mm meta kernel) is traced in
    bf16 and counted at 4 bytes for an fp32 step, as `TracedLayers` does."""

    INPUT_ROLES = {"q", "k", "v", "gate", "up"}  # Linears that read a normed block input (LoRA naming only)

    def __init__(self, module, blocks, run, stage_trains: bool, moe_bf16: bool = False, one_sequence: bool = False):
        self.module, self.run, self.full, self.moe_bf16 = module, run, stage_trains, moe_bf16
        self.one_sequence = one_sequence  # the rows run as one sequence (Pixtral): bytes quadratic in the rows
        self.n_blocks = len(blocks)
        self.block_names = [next(n for n, m in module.named_modules() if m is b) for b in blocks]
        self._cache: dict = {}

    def any(self) -> bool:
        return True

    def kind(self, idx: int, part: str) -> str | None:
        return f"block:{idx}" if part == "block" else None

    def roles(self, kind: str) -> None:
        return None  # every Linear of the block

    def trains(self, kind: str) -> bool:
        return self.full

    def saved(self, kind: str, shape, x_rg: bool, p) -> int:
        return self._scaled(shape, x_rg, p, lambda tr: tr.blocks[int(kind.split(":")[1])])

    def outside(self, shape, x_rg: bool, p, checkpointing: bool) -> int:
        """Bytes held next to the blocks' own: the prologue's saved tensors and the shared arguments (all of them
        when the blocks are checkpointed, which keeps each block's arguments; else those a block saved)."""
        return self._scaled(shape, x_rg, p, lambda tr: tr.prologue + (tr.args_all if checkpointing
                                                                       else tr.args_saved))

    def _scaled(self, shape, x_rg: bool, p, pick) -> int:
        if not (x_rg or self.full):
            return 0
        if self.one_sequence:  # [rows·seq]² masks and scores: quadratic in the rows, fitted through 1, 2 and 3
            f1, f2, f3 = (pick(self._cached(r, shape, x_rg, p)) for r in (1, 2, 3))
            r = shape.rows
            return f1 + (r - 1) * (f2 - f1) + (r - 1) * (r - 2) // 2 * (f3 - 2 * f2 + f1)
        # one row is traced as is (a family may build fewer masks for it: no padding); more rows are linear in
        # the rows from two and three
        base = 1 if shape.rows == 1 else 2
        one, two = (pick(self._cached(r, shape, x_rg, p)) for r in (base, base + 1))
        return one + (two - one) * (shape.rows - base)

    def _cached(self, rows: int, shape, x_rg: bool, p) -> StackTrace:
        key = (rows, shape.seq, shape.mask, x_rg, p.act)
        if key not in self._cache:
            self._cache[key] = self._trace(rows, shape.seq, shape.mask, x_rg, p)
        return self._cache[key]

    def _trace(self, rows: int, seq: int, mask: bool, x_rg: bool, p) -> StackTrace:
        import torch

        dtype = torch.float32 if p.act == 4 and not self.moe_bf16 else torch.bfloat16
        widen = 2 if p.act == 4 and dtype == torch.bfloat16 else 1
        mod = copy.deepcopy(self.module).to(device="meta", dtype=dtype).requires_grad_(self.full).train()
        blocks = [mod.get_submodule(n) for n in self.block_names]
        where = {"at": None}  # None: before the first block; i: inside block i; "after": past the last
        args: dict[int, int] = {}
        owner: dict[int, object] = {}

        def enter(i, args_, kwargs):
            where["at"] = i
            shared = [*args_[1:], *kwargs.values()]  # the hidden states are args_[0]
            for t in _tensors(shared):
                args.setdefault(t.untyped_storage()._cdata, t.untyped_storage().nbytes()
                                * (widen if t.dtype == torch.bfloat16 else 1))

        hooks = [b.register_forward_pre_hook(lambda _m, a, k, i=i: enter(i, a, k), with_kwargs=True)
                 for i, b in enumerate(blocks)]
        hooks.append(blocks[-1].register_forward_hook(lambda *_: where.update(at="after")))
        try:
            with fused_sdpa_on_meta():
                seen = count_saved(lambda: self.run(mod, rows, seq, dtype, x_rg, mask), _param_storages(mod), widen,
                                   on_save=lambda sid: owner.__setitem__(sid, where["at"]))
        finally:
            for h in hooks:
                h.remove()
        out = StackTrace(blocks=[0] * self.n_blocks, args_all=sum(args.values()))
        for sid, nbytes in seen.items():
            at = owner[sid]
            if sid in args:
                out.args_saved += nbytes
            elif at is None:
                out.prologue += nbytes
            elif at != "after":  # past the last block: the final norm, which the planner counts itself
                out.blocks[at] += nbytes
        return out


def _tensors(values) -> list:
    """Tensors among block arguments, looking inside tuples and mappings (rotary (cos, sin), masks by kind, keys
    and values shared between layers)."""
    import torch

    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out += _tensors(v)
        elif isinstance(v, Mapping):  # dicts, and Gemma 4's shared keys/values (a UserDict)
            out += _tensors(list(v.values()))
    return out


@contextlib.contextmanager
def meta_mask_creation():
    """Within the block, transformers' mask creation runs on meta inputs: its packed-sequence check reads the position
    ids' values (`find_packed_sequence_indices`), which meta tensors do not have; the planner never traces packed
    rows through it (its masks are passed in), so the check answers "not packed"."""
    from transformers import masking_utils

    real = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = real


def decoder_run(text_model, rows: int, seq: int, dtype, x_rg: bool, mask: bool) -> None:
    """One training forward of a transformers text decoder on meta: embeddings `[rows, seq, d]` and, when the rows
    are padded or attend in blocks (`mask`), a mask per layer kind the config names (one per kind, as the model
    builds them: `[rows, 1, seq, seq]` for attention layers, the `[rows, seq]` padding mask for convolution layers);
    else transformers' own mask creation (causal: none; a sliding window shorter than the rows: its mask)."""
    import torch

    cfg = text_model.config
    x = torch.empty(rows, seq, cfg.hidden_size, device="meta", dtype=dtype, requires_grad=x_rg)
    masks = None
    if mask:  # attention layers take [rows, 1, s, s]; convolution / recurrent layers the [rows, s] padding mask
        kinds = sorted(set(getattr(cfg, "layer_types", None) or [])) or [None]
        masks = {k: torch.ones(*((rows, 1, seq, seq) if k is None or "attention" in k else (rows, seq)),
                               dtype=torch.bool, device="meta") for k in kinds}
        masks = masks.get(None, masks)  # no layer kinds: one tensor
    with meta_mask_creation():
        text_model(inputs_embeds=x, attention_mask=masks, use_cache=False)
