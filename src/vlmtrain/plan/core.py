"""Memory planner: the peak memory of one training step of a stage on one GPU, from the config alone.

The model is built on the `meta` device (no weights, no download); every number below comes from its real module
shapes, the stage's `train` / `lora` / `data` / `trainer` blocks, and a model of what PyTorch keeps alive.
Units: bytes internally, GiB (2**30 bytes) in `MemoryPlan.to_json()`. Native transformers families (Qwen2-VL,
Qwen2.5-VL, Gemma 3): the same step model over a geometry from `vlmtrain.plan.families`; composed VLMs: over one
from `vlmtrain.plan.composed`. `vlmtrain.plan` (the package) plans a stage or a config with them.

What is counted (each a `part` of the plan; parts sum to the peak):

    weights                 every parameter and buffer of the model, in the precision's dtype
                            (32-true and bf16-mixed: fp32 — Lightning's mixed precision keeps the fp32 module and
                            autocasts; bf16-true: bf16), the 4-bit QLoRA base at `NF4_BYTES_PER_PARAM`
    batch                   the micro-batch on the device: ids, labels, mask (int64) and the pixel values (in the
                            parameter dtype; Qwen's dynamic resolution makes them tens of MiB per batch)
    lora                    LoRA adapters r·(in+out) per targeted Linear (+ `out` DoRA magnitudes), counted from the
                            target regexes over the meta model's module names — the same full-match PEFT does
    reference_model         DPO with `reference: copy`: a frozen deep copy of the model
    grads                   one gradient per trainable parameter, in the parameter's dtype
    optimizer               AdamW: exp_avg + exp_avg_sq per trainable parameter (`torch.zeros_like(param)`, so the
                            parameter's dtype: fp32 under 32-true / bf16-mixed, bf16 under bf16-true)
    autocast_weight_copies  bf16-mixed only: autocast caches a bf16 copy of every trainable matmul weight for the
                            whole step, and a frozen weight whose input needs a gradient has its bf16 copy saved for
                            backward (one per Linear, unless the layer is checkpointed)
    activations             the LLM's saved tensors (per layer, below), the attention masks, the recompute of one
                            layer under gradient checkpointing and the excess of one layer's backward
    vision_activations      the same for the vision tower, plus the connector's saved tensors
    logits                  the loss over [n, V] logits: vlmtrain applies the LM head to the n supervised positions
                            only (`VLM.forward(logits_mask=...)`); the loss's fp32 log_softmax output and its two fp32
                            gradients make 12 bytes per logit at the peak — often the largest single activation
    ddp_buckets             DDP's gradient buckets (a second copy of the gradients)
    shard_buffers           FSDP2 (`--world-size N` shards weights, gradients and optimizer state): the root unit's
                            parameters (never resharded) and the all-gather buffers of two transformer blocks (the
                            one computing, the one prefetched) plus one block's gradients. DeepSpeed ZeRO-2/3 (also
                            over N; ZeRO-2 keeps the 16-bit weights whole, and bf16-mixed becomes a bf16 module with
                            fp32 master weights in the optimizer): the reduce / all-gather / prefetch buckets of its
                            JSON config
    cuda_context            `CUDA_CONTEXT_BYTES`, a fixed allowance (0 when planning for the CPU)

Activation model. Per transformer layer we list the tensors autograd saves — the derivation of Korthikanti et
al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (sec. 4.1: 34·s·b·h + 5·a·s²·b bytes
per GPT layer in fp16), adapted op by op to the layers these models actually run: pre-norm RMSNorm (saves its fp32 input
and, when its weight trains, the normalised tensor), grouped-query attention through SDPA/flash (saves q, k, v,
the output and an fp32 log-sum-exp — no s² term; with a padding mask, the mask converted to the query dtype,
b·s² per layer, and k/v repeated to all heads), SwiGLU MLP (gate, act, up, and the down-projection input when it
trains), and the ViT layer (LayerNorm, MHA, fc1 → act → fc2; quick_gelu saves two tensors). A Linear saves its
input only when its weight trains (a frozen Linear needs only its weight for the input gradient); a LoRA Linear
saves the dropout mask (1 byte/element from CUDA's fused dropout; the float noise on CPU), the dropout output and
the r-wide A output; DoRA adds the base and LoRA outputs. A layer saves nothing when neither its parameters nor
anything below it trains — but a frozen LLM *does* save activations when the connector or the vision tower below
it trains, because the gradient flows through it.
With gradient checkpointing a layer keeps only its input; during backward one layer is recomputed at a time.
`tests/test_plan.py` checks this per-layer count against autograd's own saved tensors; `python -m bench plan`
checks whole-step peaks against measured CPU peaks.

Peak. A step's memory rises through the forward, peaks around the start of backward (all saved activations + the
loss's temporaries over the logits), then trades activations for gradients block by block (linearly, so the top
and the bottom block are the candidates), and ends with the optimizer step (weights + gradients + states +
temporaries). The planner evaluates those moments and reports the largest (`MemoryPlan.phase`); with gradient
accumulation the gradients of earlier micro-batches are held throughout.

Assumed batch (the worst case unless told otherwise): every row is `data.max_len` tokens (`pack_len` when
packing) with `images_per_sample` images of `num_image_tokens` slots each; a padding mask whenever a micro-batch
has more than one row (always when packing); `supervised_fraction` of the text positions carry a loss (1.0).

Not modelled: the CUDA caching allocator's fragmentation (reserved − allocated, typically a few %), the data
loader's pinned buffers, and custom kernels (Liger, fused cross-entropy) that would shrink the logits term.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field

from vlmtrain.errors import ConfigError
from vlmtrain.plan.traced import count_saved

GiB = 2**30

# CUDA context (driver state and kernel images; ~0.5 GiB on Hopper with CUDA 12 lazy loading) plus cuBLAS/cuBLASLt
# workspaces (tens of MiB per handle) plus NCCL/allocator bookkeeping: a fixed 1 GiB allowance that nvidia-smi
# shows beyond `torch.cuda.max_memory_allocated()`. Not measured here (no GPU on the dev machine); adjust when
# measured on the target GPU.
CUDA_CONTEXT_BYTES = 1 * GiB

# bitsandbytes NF4 with double quantisation (QLoRA's default): 4 bits per weight, one uint8 absmax per 64-weight
# block, and one fp32 second-level absmax per 256 blocks → 0.5 + 1/64 + 4/(64·256) bytes per weight.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)

PART_NAMES = ("weights", "batch", "lora", "reference_model", "grads", "optimizer", "autocast_weight_copies",
              "activations", "vision_activations", "logits", "ddp_buckets", "shard_buffers", "cuda_context")

_UNITS = {"": 1, "b": 1,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_memory(text: str) -> int:
    """`24GiB` / `24G` (binary: 24·2**30), `80GB` (decimal: 80·10**9), `512MiB`, or plain bytes → bytes.

    Bare K/M/G/T are binary, as in nvidia-smi and Docker. Raises ConfigError (exit 2) on anything else."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(f"--gpu-memory: cannot read {text!r} (examples: 24GiB, 80GB, 24G, 25769803776)")
    value = float(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise ConfigError(f"--gpu-memory: must be positive, got {text!r}")
    return int(value)


# ---- precision ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of tensor under one Lightning precision setting."""

    name: str
    param: int  # parameters (trainable and frozen), their gradients and AdamW states
    act: int  # outputs of matmul-class ops (Linear, SDPA) and everything computed from them
    resid: int  # the residual stream and norm outputs
    autocast: bool  # matmul inputs are cast per call; matmul weights get bf16 copies


PRECISIONS = {
    "32-true": Precision("32-true", 4, 4, 4, False),
    "bf16-true": Precision("bf16-true", 2, 2, 2, False),
    # Lightning's mixed precision keeps the module in fp32 and runs the step under autocast: matmuls produce bf16,
    # the residual stream (fp32 embeddings + bf16 branch outputs) stays fp32, norms run in fp32.
    "bf16-mixed": Precision("bf16-mixed", 4, 2, 4, True),
    "16-mixed": Precision("16-mixed", 4, 2, 4, True),
}


# ---- model geometry from the meta build ---------------------------------------------------------------------------

# Canonical roles of the Linear layers inside one transformer block (HF names → role).
ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "qkv_proj": "qkv", "o_proj": "o", "out_proj": "o",
          "dense": "o", "gate_proj": "gate", "up_proj": "up", "gate_up_proj": "gate_up", "down_proj": "down",
          "fc1": "fc1", "fc2": "fc2"}
LAYER_RE = re.compile(r"^(vision|llm)\..*?\blayers?\.(\d+)\.(.+)$")


@dataclass
class LinearSpec:
    """One Linear of a block: `kind` is full (trains), frozen, lora or dora; `quantized` = 4-bit base."""

    n_in: int
    n_out: int
    kind: str = "frozen"
    quantized: bool = False


@dataclass
class StackGeo:
    """A stack of transformer blocks (the LLM's decoder or the vision tower's encoder)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    norm: str  # "rms" (saves an fp32 copy of its input) | "layer"
    gated: bool  # gate·act(…)·up MLP (LLMs) vs fc1 → act → fc2 (ViTs)
    act_saves: int  # [.., intermediate] tensors the MLP activation saves: 1 (silu, gelu) or 2 (quick_gelu)
    attn_impl: str  # sdpa | eager | flash_attention_2 | ...
    rotary: bool
    blocks: list[dict[str, LinearSpec]] = field(default_factory=list)  # per block: role → Linear
    norms_train: bool = False
    qk_norm: bool = False  # RMSNorm over q and k heads (Gemma 3): saves both projections' outputs in fp32
    post_norms: bool = False  # sandwich norms on the attention and MLP outputs (Gemma 3)
    # token mixers, MLPs or whole blocks without a closed form here (Gated DeltaNet layers, mixture-of-experts MLPs,
    # Gemma 4's decoder layers), traced on meta: an object with `kind(idx, part)` (part: mixer, mlp or block),
    # `saved(kind, shape, x_rg, p)` and `outside(...)` (`vlmtrain.plan.traced`); None: every block is the
    # closed-form transformer block
    traced: object = None


@dataclass
class Geometry:
    """Everything the planner needs to know about a model, read off its meta build."""

    llm: StackGeo
    vision: StackGeo
    vision_used_layers: int  # blocks whose output reaches the feature layer (LLaVA: all but the last)
    vision_tokens: int  # tokens through the tower per image (patches + CLS)
    vision_feature_tokens: int  # tokens handed to the connector per image
    image_size: int
    image_tokens: int  # LM slots per image (connector output)
    vocab: int  # LM head rows
    params: dict[str, int]  # per module: vision, connector, llm (tied tensors once)
    buffers_bytes: dict[str, int]  # {"float": elements (stored in the precision's dtype), "int": bytes}
    lora_params: int
    lora_tensors: int
    quantized_params: int  # 4-bit base weights
    trainable: dict[str, int]  # module → trainable parameter count (LoRA under its module)
    trainable_groups: list[int]  # AdamW parameter-group sizes (module × decay/no_decay), as build_optimizer forms
    trainable_tensors: int
    head_trainable: int  # lm_head (+ final norm) parameters that train: their gradients appear first in backward
    block_trainable: list[int]  # trainable parameters per LLM block (full: all; LoRA: its adapters)
    selective_head: bool  # VLM.forward(logits_mask=...) applies the head to the supervised positions only
    connector_name: str
    connector_module: object  # the meta connector (for tracing connectors without a closed form)
    max_block_params: int  # largest transformer block (FSDP all-gather unit)
    root_params: int  # parameters outside the transformer blocks (FSDP root unit)
    pixel_elements: int = 0  # pixel values per image (0: 3·image_size²; Qwen: patches × 3·2·14²)
    crops_per_image: int = 1  # tower passes per image (Idefics3/SmolVLM image splitting: tiles + the global view)
    vision_keeps_hidden_states: bool = True  # a frozen tower's forward holds every layer's output (composed)
    llm_mask_always: bool = False  # a [rows, 1, s, s] mask even for one row (Gemma 3: bidirectional image spans)
    router_logits: int = 0  # per token: router logits the MoE load-balancing loss reads (Σ experts over MoE layers)
    # the tower runs every image of the micro-batch as one sequence under an [N, N] block mask in the compute dtype
    # (Pixtral): a frozen tower's forward holds it next to the hidden states
    vision_block_mask: bool = False
    notes: list[str] = field(default_factory=list)  # what the plan assumed about the images (native families)


def _lora_targets(names: list[str], pattern: str) -> set[str]:
    rx = re.compile(pattern)
    return {n for n in names if rx.fullmatch(n)}


def lora_param_count(model, stage) -> tuple[int, int, dict[str, str]]:
    """(adapter parameters, adapter tensors, {module name: "lora"|"dora"}) for the stage's LoRA block.

    PEFT full-matches a string `target_modules` against every module name and wraps the supported layers; for a
    Linear it adds A [r, in] and B [out, r] (+ a magnitude vector [out] with DoRA), for an Embedding
    A [r, num] and B [dim, r]. Counted on the meta model, so it equals PEFT's count without building weights."""
    from torch import nn

    if stage.lora is None:
        return 0, 0, {}
    lc = stage.lora
    pats = []
    if stage.train.llm == "lora":
        pats.append(lc.llm_target)
    if stage.train.vision == "lora":
        pats.append(lc.vision_target)
    mods = dict(model.named_modules())
    hit: set[str] = set()
    for p in pats:
        hit |= _lora_targets(list(mods), p)
    n = tensors = 0
    kinds = {}
    for name in sorted(hit):
        m = mods[name]
        if isinstance(m, nn.Linear):
            n += lc.r * (m.in_features + m.out_features) + (m.out_features if lc.dora else 0)
        elif isinstance(m, nn.Embedding):
            n += lc.r * (m.num_embeddings + m.embedding_dim) + (m.embedding_dim if lc.dora else 0)
        else:
            continue
        tensors += 3 if lc.dora else 2
        kinds[name] = "dora" if lc.dora else "lora"
    return n, tensors, kinds


def stack_geo(cfg, layer_module, rotary: bool) -> StackGeo:
    heads = int(cfg.num_attention_heads)
    hidden = int(cfg.hidden_size)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    roles = {ROLES.get(n.rsplit(".", 1)[-1]) for n, _ in layer_module.named_modules()}
    norm_names = [type(m).__name__.lower() for m in layer_module.modules()]
    act = str(getattr(cfg, "hidden_act", "silu"))
    # mixture-of-experts text configs may have no dense width (plan.families sets the routed one)
    return StackGeo(hidden=hidden, intermediate=int(getattr(cfg, "intermediate_size", None) or 0), heads=heads,
                    kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads), head_dim=head_dim,
                    norm="rms" if any("rms" in n for n in norm_names) else "layer",
                    gated=bool(roles & {"gate", "gate_up"}), act_saves=2 if act == "quick_gelu" else 1,
                    attn_impl=str(getattr(cfg, "_attn_implementation", None) or "sdpa"), rotary=rotary)


def stacks_geometry(model, stage, llm: StackGeo, vis: StackGeo, layers: dict, image: dict, layer_re, roles: dict
                    ) -> Geometry:
    """The parts of `Geometry` every model kind shares: per-Linear kinds of the blocks (`layer_re` matches a block
    Linear's name → (part, block index, rest); `roles` maps its leaf name to a role), parameter, LoRA, QLoRA,
    trainable and buffer counts. `image`: the kind's image fields of `Geometry`.

    Long because it is one walk over the model's modules and parameters whose counts feed each other (a Linear's
    kind decides its block spec, the LoRA/QLoRA counts and the AdamW groups); split, the walks would repeat."""
    from torch import nn

    from vlmtrain.model.bundle import count_params

    train = stage.train
    lora_n, lora_t, lora_kinds = lora_param_count(model, stage)
    quantize = stage.lora is not None and stage.lora.quantize == "4bit"
    llm.blocks = [dict() for _ in layers["llm"]]
    vis.blocks = [dict() for _ in layers["vision"]]
    head = model.llm.get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)

    quantized = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        part = name.split(".", 1)[0]
        want = getattr(train, part, False)
        kind = lora_kinds.get(name) or ("full" if want is True else "frozen")
        # QLoRA quantises the LLM's Linears except the output head (transformers' bitsandbytes integration keeps
        # the LM head in the compute dtype); the vision tower and connector stay unquantised.
        q = quantize and part == "llm" and name != head_name
        if q:
            quantized += mod.in_features * mod.out_features
        m = layer_re.match(name)
        # Gemma 4's tower wraps each projection as `q_proj.linear` (a clipping wrapper): the role is the wrapper's
        leaf = name.rsplit(".", 2)[-2] if name.endswith(".linear") else name.rsplit(".", 1)[-1]
        role = roles.get(leaf)
        if m and role:
            stack = llm if m.group(1) == "llm" else vis
            stack.blocks[int(m.group(2))][role] = LinearSpec(mod.in_features, mod.out_features, kind, q)
    llm.norms_train = train.llm is True
    vis.norms_train = train.vision is True

    # Trainable parameters per module and the AdamW groups `vlmtrain.train.optim.param_groups` forms
    # (module × {≥2-D weights, 1-D/norm}); LoRA tensors join their module's groups (A/B 2-D, DoRA magnitudes 1-D).
    trainable = {"vision": 0, "connector": 0, "llm": 0}
    groups = []
    seen: set[int] = set()
    tensors = 0
    for part in ("vision", "connector", "llm"):
        decay = no_decay = 0
        if getattr(train, part) is True:
            for pname, p in getattr(model, part).named_parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                tensors += 1
                if p.ndim < 2 or "norm" in pname.lower():
                    no_decay += p.numel()
                else:
                    decay += p.numel()
        if getattr(train, part) == "lora":
            lc = stage.lora
            for name, kind in lora_kinds.items():
                if name.startswith(part + "."):
                    mod = model.get_submodule(name)
                    i, o = ((mod.in_features, mod.out_features) if isinstance(mod, nn.Linear)
                            else (mod.num_embeddings, mod.embedding_dim))
                    decay += lc.r * (i + o)
                    no_decay += o if kind == "dora" else 0
            tensors += sum(1 for n in lora_kinds if n.startswith(part + ".")) * (3 if stage.lora.dora else 2)
        trainable[part] = decay + no_decay
        groups += [g for g in (decay, no_decay) if g]

    head_trainable = 0
    if train.llm is True:
        head_trainable = head.weight.numel() + (head.bias.numel() if head.bias is not None else 0)
        dec = model.llm.get_decoder() if hasattr(model.llm, "get_decoder") else model.llm.model  # native: role
        head_trainable += sum(q.numel() for q in dec.norm.parameters()) if hasattr(dec, "norm") else 0
    block_trainable = [0] * len(layers["llm"])
    for i, blk in enumerate(layers["llm"]):
        if train.llm is True:
            block_trainable[i] = sum(q.numel() for q in blk.parameters())
    if train.llm == "lora":
        for name, kind in lora_kinds.items():
            m = layer_re.match(name)
            if m and m.group(1) == "llm":
                mod = model.get_submodule(name)
                block_trainable[int(m.group(2))] += stage.lora.r * (mod.in_features + mod.out_features) + (
                    mod.out_features if kind == "dora" else 0)

    buffers = {"float": 0, "int": 0}
    for b in model.buffers():
        if b.is_floating_point():
            buffers["float"] += b.numel()
        else:
            buffers["int"] += b.numel() * b.element_size()

    block_params = [sum(p.numel() for p in blk.parameters()) for part in layers.values() for blk in part]
    params = count_params(model)
    return Geometry(
        llm=llm, vision=vis, **image, vocab=int(head.out_features), params=params, buffers_bytes=buffers,
        lora_params=lora_n, lora_tensors=lora_t, quantized_params=quantized, trainable=trainable,
        trainable_groups=groups, trainable_tensors=tensors, head_trainable=head_trainable,
        block_trainable=block_trainable, selective_head=bool(getattr(model, "supports_selective_head", False)),
        max_block_params=max(block_params), root_params=params["total"] - sum(block_params))


# ---- saved-tensor model -------------------------------------------------------------------------------------------

class Saved:
    """Tensors autograd keeps for backward, by name: a tensor saved by several ops is counted once.

    Categories: "act" (activations) and "wcopy" (autocast bf16 copies of frozen weights)."""

    def __init__(self):
        self.items: dict[str, tuple[int, str]] = {}

    def add(self, name: str, nbytes: float, cat: str = "act") -> None:
        self.items.setdefault(name, (int(nbytes), cat))

    def total(self, cat: str | None = None) -> int:
        return sum(n for n, c in self.items.values() if cat is None or c == cat)


@dataclass
class _T:
    """A tensor flowing through the block model: name, bytes per element, requires-grad."""

    name: str
    bpe: int
    rg: bool


@dataclass
class StepShape:
    """What one micro-batch looks like to one stack: `rows` sequences of `seq` tokens."""

    rows: int
    seq: int
    mask: bool = False  # a [rows, 1, seq, seq] attention mask is materialised (padding or packing)


def _linear(sv: Saved, x: _T, spec: LinearSpec, tag: str, tokens: int, p: Precision, lora_r: int,
            lora_dropout: float, device: str, out_name: str | None = None) -> _T:
    """y = x·Wᵀ (+ LoRA). Saves x when W trains; under autocast an fp32 x is cast to bf16 per call, and that
    copy is what gets saved. A frozen W whose input needs a gradient keeps W for backward — free, unless autocast
    made a bf16 copy of it (bitsandbytes' 4-bit matmul saves only the packed weight)."""
    cast = p.autocast and x.bpe == 4
    x_in = _T(f"{x.name}@cast:{tag}", 2, x.rg) if cast else x
    full = spec.kind == "full"
    lora = spec.kind in ("lora", "dora")
    if full:
        sv.add(x_in.name, tokens * spec.n_in * x_in.bpe)
    if p.autocast and not full and x.rg and not spec.quantized:
        sv.add(f"wcopy:{tag}", spec.n_in * spec.n_out * 2, "wcopy")
    if lora:
        # PEFT: x = x.to(adapter dtype); result + lora_B(lora_A(dropout(x))) * scaling.
        x_l = x if x.bpe == p.param else _T(f"{x.name}@{p.param}:{tag}", p.param, x.rg)
        a_in = x_l
        if lora_dropout > 0:
            if x.rg:
                # CUDA's fused dropout saves a bool mask; elsewhere dropout is x·noise and saves the float noise
                sv.add(f"dropmask:{tag}", tokens * spec.n_in * (1 if device == "cuda" else x_l.bpe))
            a_in = _T(f"drop:{tag}", x_l.bpe, x.rg)
        if p.autocast:  # the fp32 adapter input is cast back to bf16 for lora_A's matmul: a fresh copy per call
            a_in = _T(f"{a_in.name}@cast:A:{tag}", 2, x.rg)
        sv.add(a_in.name, tokens * spec.n_in * a_in.bpe)
        sv.add(f"loraA:{tag}", tokens * lora_r * p.act)
        if spec.kind == "dora":  # (m/‖W+BA‖ − 1)·base_out + m/‖W+BA‖·lora_out: both outputs are saved,
            sv.add(f"dora_base:{tag}", tokens * spec.n_out * p.act)  # plus the detached norm and two
            sv.add(f"dora_lora:{tag}", tokens * spec.n_out * p.act)  # [1, out] scale vectors
            sv.add(f"dora_vec:{tag}", 3 * spec.n_out * x_l.bpe)
    return _T(out_name or f"out:{tag}", p.act, x.rg or full or lora)


def _norm(sv: Saved, x: _T, stack: StackGeo, tag: str, tokens: int, p: Precision) -> _T:
    """Pre-norm. RMSNorm (HF): saves x.float() (a copy when x is bf16) and rsqrt [tokens, 1]; when its weight
    trains also the normalised tensor. LayerNorm: saves its input and mean/rstd whenever anything needs a grad."""
    h = stack.hidden
    if stack.norm == "rms":
        if x.rg:
            sv.add(f"{x.name}@f32" if x.bpe != 4 else x.name, tokens * h * 4)
            sv.add(f"rsqrt:{tag}", tokens * 4)
        if stack.norms_train:
            sv.add(f"normed:{tag}", tokens * h * p.resid)
    elif x.rg or stack.norms_train:
        sv.add(x.name, tokens * h * x.bpe)
        sv.add(f"mean_rstd:{tag}", 2 * tokens * x.bpe)
    return _T(f"norm:{tag}", p.resid, x.rg or stack.norms_train)


def block_saved(stack: StackGeo, idx: int, x: _T, shape: StepShape, p: Precision, lora_r: int = 0,
                lora_dropout: float = 0.0, device: str = "cuda") -> tuple[Saved, _T]:
    """Saved tensors of block `idx` for input `x` [rows, seq, hidden]; returns them and the block's output."""
    sv = Saved()
    lin = stack.blocks[idx]
    t = shape.rows * shape.seq
    tag = f"{idx}"

    def L(x_, role, out_name=None):
        return _linear(sv, x_, lin[role], f"{role}{tag}", t, p, lora_r, lora_dropout, device, out_name)

    whole = stack.traced.kind(idx, "block") if stack.traced is not None else None
    if whole is not None:  # a block with no closed form, traced whole (Gemma 4)
        return sv, _traced_part(sv, stack, whole, x, lin, shape, p, lora_r, lora_dropout, device, tag)

    # ---- attention (or a traced token mixer)
    y1 = _norm(sv, x, stack, f"n1.{tag}", t, p)
    mixer = stack.traced.kind(idx, "mixer") if stack.traced is not None else None
    if mixer is not None:
        o = _traced_part(sv, stack, mixer, y1, lin, shape, p, lora_r, lora_dropout, device, tag)
    else:
        o = _attention(sv, stack, y1, lin, shape, p, L, tag)
    if o.rg and stack.post_norms:  # post-attention RMSNorm: its fp32 input + rsqrt
        sv.add(f"post_attn:{tag}", t * (stack.hidden + 1) * 4)
    h1 = _T(f"h1:{tag}", p.resid, x.rg or o.rg)

    # ---- MLP (or a traced mixture of experts)
    y2 = _norm(sv, h1, stack, f"n2.{tag}", t, p)
    moe = stack.traced.kind(idx, "mlp") if stack.traced is not None else None
    if moe is not None:
        d = _traced_part(sv, stack, moe, y2, lin, shape, p, lora_r, lora_dropout, device, tag)
    else:
        d = _mlp(sv, stack, y2, lin, t, p, L, tag)
    if d.rg and stack.post_norms:
        sv.add(f"post_mlp:{tag}", t * (stack.hidden + 1) * 4)
    out = _T(f"x{idx + 1}", p.resid, h1.rg or d.rg)
    return sv, out


def _traced_part(sv: Saved, stack: StackGeo, kind: str, x: _T, lin: dict, shape: StepShape, p: Precision,
                 lora_r: int, lora_dropout: float, device: str, tag: str) -> _T:
    """A token mixer, MLP or whole block traced on meta (`StackGeo.traced`): autograd's saved tensors for input `x`,
    with the stage's full-training parameters requiring grad (their Linears' inputs included), plus what the trace
    cannot see: each LoRA adapter's own saved tensors and autocast's bf16 copies of frozen weights (`_linear` on the
    part's Linears: `x` feeds a module's input projections, the others get the part's inner tensor; in a whole
    block, q / k / v read one normed input and gate / up another)."""
    t = shape.rows * shape.seq
    roles = stack.traced.roles(kind)  # None: every Linear of the block
    specs = {role: spec for role, spec in lin.items() if roles is None or role in roles}
    adapters = any(s.kind in ("lora", "dora") for s in specs.values())
    x_rg = x.rg or adapters
    sv.add(f"{kind}:{tag}", stack.traced.saved(kind, shape, x_rg, p))
    shared_inputs = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "gate": "mlp_in", "up": "mlp_in"}
    for role, spec in specs.items():
        if spec.kind != "full":  # a trained weight's input is in the trace already
            if roles is None and role in shared_inputs:
                inner = _T(f"{kind}_{shared_inputs[role]}:{tag}", p.act, x_rg)
            elif role in stack.traced.INPUT_ROLES:
                inner = x
            else:
                inner = _T(f"{kind}_in:{role}{tag}", p.act, x_rg)
            _linear(sv, inner, spec, f"{role}{tag}", t, p, lora_r, lora_dropout, device)
    trains = stack.traced.trains(kind) or any(s.kind != "frozen" for s in specs.values())
    return _T(f"{kind}_out:{tag}", p.act, x_rg or trains)


def _attention(sv: Saved, stack: StackGeo, y1: _T, lin: dict, shape: StepShape, p: Precision, L, tag: str) -> _T:
    """Self-attention's saved tensors (projections through `L`, SDPA/eager, the output projection) → its output."""
    t = shape.rows * shape.seq
    q_dim, kv_dim = stack.heads * stack.head_dim, stack.kv_heads * stack.head_dim
    if "qkv" in lin:
        qkv = L(y1, "qkv")
        q_rg = k_rg = v_rg = qkv.rg
    else:
        q_rg, k_rg, v_rg = L(y1, "q").rg, L(y1, "k").rg, L(y1, "v").rg
    attn_rg = q_rg or k_rg or v_rg
    if attn_rg and stack.qk_norm:  # RMSNorm per head: the q/k projections' outputs in fp32 + rsqrt
        sv.add(f"qk_norm:{tag}", t * (q_dim + kv_dim) * 4 + t * (stack.heads + stack.kv_heads) * 4)
    if attn_rg and "q" in lin and lin["q"].n_out == 2 * q_dim:
        # gated attention (Qwen3.5): q_proj also yields a gate; output·sigmoid(gate) saves the sigmoid's output
        # (the attention output it multiplies is saved below)
        sv.add(f"attn_gate:{tag}", t * q_dim * p.act)
    if attn_rg:
        impl = stack.attn_impl
        # SDPA/flash save q, k, v, out and an fp32 log-sum-exp; rotary (or autocast's cast) makes q and k new
        # tensors, in the matmul dtype. With a mask, transformers repeats k/v to all heads (no enable_gqa) and
        # SDPA converts the bool mask to the query dtype per call — one [rows, 1, s, s] tensor saved per layer.
        repeat = stack.kv_heads < stack.heads and (impl == "eager" or (impl == "sdpa" and shape.mask))
        kv_eff = q_dim if repeat else kv_dim
        sv.add(f"q:{tag}", t * q_dim * p.act)
        sv.add(f"k:{tag}", t * kv_eff * p.act)
        sv.add(f"v:{tag}", t * kv_eff * p.act)
        sv.add(f"attn_out:{tag}", t * q_dim * p.act)
        if impl == "eager":  # Korthikanti's 5·a·s² term: fp32 softmax output (+ its cast copy for the PV matmul)
            probs = shape.rows * stack.heads * shape.seq**2
            sv.add(f"probs:{tag}", probs * (4 + (p.act if p.act != 4 else 0)))
        else:
            sv.add(f"lse:{tag}", shape.rows * stack.heads * shape.seq * 4)
            if shape.mask and impl == "sdpa":
                sv.add(f"mask:{tag}", shape.rows * shape.seq * shape.seq * p.act)
    return L(_T(f"attn_out:{tag}", p.act, attn_rg), "o")


def _mlp(sv: Saved, stack: StackGeo, y2: _T, lin: dict, t: int, p: Precision, L, tag: str) -> _T:
    """The MLP's saved tensors (gated SwiGLU/GeGLU or fc1 → act → fc2) → its output."""
    f = stack.intermediate
    if stack.gated:
        if "gate_up" in lin:  # fused: gate and up are views of one [t, 2f] tensor
            gu = L(y2, "gate_up", out_name=f"gu:{tag}")
            g, u = _T(f"gu:{tag}", p.act, gu.rg), _T(f"gu:{tag}", p.act, gu.rg)
            gsize = usize = 2 * f
        else:
            g, u = L(y2, "gate"), L(y2, "up")
            gsize = usize = f
        if g.rg:
            sv.add(g.name, t * gsize * p.act)  # silu/gelu backward needs its input
        act = _T(f"act:{tag}", p.act, g.rg)
        if u.rg:
            sv.add(act.name, t * f * p.act)  # act·up saves each factor when the other needs a grad
        if act.rg:
            sv.add(u.name, t * usize * p.act)
        prod = _T(f"prod:{tag}", p.act, g.rg or u.rg)
        d = L(prod, "down")
    else:
        f1 = L(y2, "fc1")
        if f1.rg:
            sv.add(f1.name, t * f * p.act)
            if stack.act_saves == 2:  # quick_gelu: x·sigmoid(1.702x) also saves the sigmoid output
                sv.add(f"sig:{tag}", t * f * p.act)
        d = L(_T(f"act:{tag}", p.act, f1.rg), "fc2")
    return d


def block_backward_temp(stack: StackGeo, shape: StepShape, p: Precision) -> int:
    """Memory beyond one block's saved tensors while it is recomputed / run backward: each backward node frees its
    saved inputs as it creates their gradients, so the excess stays near one [t, f] tensor (the MLP product, alive
    as the down projection's argument while its LoRA branch runs; later its gradient) plus three [t, h] fp32
    buffers (the gradient arriving from above, the block output, norm temporaries) — measured on CPU to within a
    few MiB (`bench/plan.py`). A 4-bit base adds the one weight bitsandbytes dequantises per matmul."""
    t = shape.rows * shape.seq
    dequant = max((s.n_in * s.n_out for blk in stack.blocks for s in blk.values() if s.quantized), default=0)
    return t * stack.intermediate * p.act + 3 * t * stack.hidden * 4 + dequant * p.act


def _block_has_trainable(stack: StackGeo, idx: int) -> bool:
    return stack.norms_train or any(s.kind != "frozen" for s in stack.blocks[idx].values())


@dataclass
class StackActs:
    saved: int  # activations held from forward to backward (checkpointing: the blocks' inputs)
    wcopy: int  # autocast frozen-weight copies held to backward
    recompute: int  # one block's saved tensors + wcopies rebuilt during backward (checkpointing), else 0
    temp: int  # excess over one block's saved tensors while it runs backward
    first: int  # what the first (bottom) block holds: its saved tensors / its checkpointed input
    first_wcopy: int  # ... and its autocast frozen-weight copies (without checkpointing)
    out_rg: bool
    out_bpe: int


def stack_activations(stack: StackGeo, n_blocks: int, x_rg: bool, shape: StepShape, p: Precision,
                      checkpointing: bool, lora_r: int, lora_dropout: float, device: str) -> StackActs:
    """Sum `block_saved` over the first `n_blocks` blocks, threading requires-grad upward."""
    x = _T("x0", p.resid, x_rg)
    saved = wcopy = recompute = first = first_wcopy = 0
    any_graph = False
    for i in range(n_blocks):
        graph = x.rg or _block_has_trainable(stack, i)
        sv, out = block_saved(stack, i, x, shape, p, lora_r, lora_dropout, device)
        if graph:
            any_graph = True
            if checkpointing:  # non-reentrant checkpoint keeps the block's input and recomputes the rest
                held = shape.rows * shape.seq * stack.hidden * x.bpe
                saved += held
                recompute = max(recompute, sv.total())
            else:
                held = sv.total("act")
                saved += sv.total("act")
                wcopy += sv.total("wcopy")
            if i == 0:
                first, first_wcopy = held, (0 if checkpointing else sv.total("wcopy"))
        x = _T(f"x{i + 1}", p.resid, out.rg)
    temp = block_backward_temp(stack, shape, p) if any_graph else 0
    if any_graph and stack.traced is not None:  # a traced stack's prologue and the blocks' shared arguments
        outside = stack.traced.outside(shape, x.rg, p, checkpointing)  # x: the top block's output
        saved, first = saved + outside, first + outside
    return StackActs(saved, wcopy, recompute, temp, first, first_wcopy, x.rg, x.bpe)


def _trace_connector(connector, n_img: int, tokens: int, dim: int, p: Precision, x_rg: bool, trains: bool) -> int:
    """Saved bytes of a connector without a closed form (resamplers, pixel shuffle, LDP), by running it on the
    meta device (`plan.traced.count_saved`: no memory, no compute) for one and two images: a connector works image
    by image, so its bytes are linear in the images (and a per-image Python loop, Mistral 3's patch merger, never
    runs over the thousands of images the largest-micro-batch search asks about). Autocast does not apply on meta, so
    bf16-mixed is traced in bf16."""
    if n_img <= 2:
        return _trace_connector_once(connector, n_img, tokens, dim, p, x_rg, trains)
    one, two = (_trace_connector_once(connector, n, tokens, dim, p, x_rg, trains) for n in (1, 2))
    return one + (two - one) * (n_img - 1)


def _trace_connector_once(connector, n_img: int, tokens: int, dim: int, p: Precision, x_rg: bool,
                          trains: bool) -> int:
    import torch

    dtype = torch.float32 if p.act == 4 else torch.bfloat16
    mod = copy.deepcopy(connector).to(dtype).requires_grad_(trains).train()
    params = {q.untyped_storage()._cdata for q in mod.parameters()}
    x = torch.empty(n_img, tokens, dim, device="meta", dtype=dtype, requires_grad=x_rg)
    return sum(count_saved(lambda: mod(x), params).values())


# ---- the plan -----------------------------------------------------------------------------------------------------

@dataclass
class PlanOptions:
    """What the config does not say: the batch's content and the hardware being planned for."""

    images_per_sample: int = 1
    world_size: int = 1
    supervised_fraction: float = 1.0  # share of text positions with a loss (1.0: the worst case)
    device: str = "cuda"  # "cuda": + CUDA context, bool dropout masks; "cpu": no context, float dropout noise
    image_size: tuple[int, int] | None = None  # (height, width) of each image; None: the family's largest


@dataclass
class MemoryPlan:
    """A plan for one stage. `parts` (bytes) sum to `peak`; `phase` names the moment of the step it occurs."""

    stage: str
    micro_batch: int
    seq_len: int
    gpu_memory: int
    peak: int
    parts: dict[str, int]
    phase: str
    max_micro_batch: int
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_memory

    def to_json(self) -> dict:
        """The stable contract: {"peak_gib", "fits", "max_micro_batch", "parts": {name: GiB}}."""
        return {"peak_gib": self.peak / GiB, "fits": self.fits, "max_micro_batch": self.max_micro_batch,
                "parts": {k: v / GiB for k, v in self.parts.items()}}


def step_parts(geo: Geometry, stage, batch: int, opts: PlanOptions) -> tuple[dict[str, int], str]:
    """Peak-memory parts (bytes) of one training step with micro-batch `batch`, and the phase where it occurs."""
    phases = step_phases(geo, stage, batch, opts)
    name = max(phases, key=lambda k: sum(phases[k].values()))
    return phases[name], name


def step_phases(geo: Geometry, stage, batch: int, opts: PlanOptions) -> dict[str, dict[str, int]]:
    """Memory parts (bytes) at each candidate peak moment of one training step: loss (end of forward, inside the
    loss), head_backward, backward (top decoder block), backward_bottom (first decoder block), backward_vision
    (connector and tower), optimizer, and vision_forward (a frozen tower's forward).

    Long because it is one memory model: the static parts, the activations and the candidate moments share a few
    dozen intermediate sizes, and each moment reads as one line next to the term it adds; split, every helper
    would take and return most of them."""
    tr = stage.trainer
    p = PRECISIONS[tr.precision]
    dpo = stage.objective == "dpo"
    rows = 2 * batch if dpo else batch  # DPO scores chosen and rejected rows
    seq = (stage.data.pack_len or stage.data.max_len) if stage.data.mode == "pack" else stage.data.max_len
    if stage.objective == "grpo":  # one row per prompt: the prompt (room left for a completion), then G completions
        seq += (stage.grpo.num_generations - 1) * stage.grpo.max_completion_length
    n_img = rows * opts.images_per_sample * geo.crops_per_image  # tower inputs (crops), each vision_tokens long
    mask = stage.data.mode == "pack" or rows > 1 or geo.llm_mask_always  # one padded row needs none
    llm_shape = StepShape(rows, seq, mask)
    vis_shape = StepShape(n_img, geo.vision_tokens, False)
    lora_r = stage.lora.r if stage.lora else 0
    lora_dropout = stage.lora.dropout if stage.lora else 0.0
    ckpt = tr.grad_checkpointing
    train = stage.train

    # ---- static: weights, adapters, gradients, optimizer
    strategy = tr.strategy
    deepspeed = strategy.startswith("deepspeed")
    world = opts.world_size if strategy == "fsdp" or deepspeed else 1
    master = 0  # bytes per trainable parameter of an fp32 master copy kept by the optimizer
    if deepspeed and p.autocast:
        # Lightning + DeepSpeed "bf16/16-mixed": the engine casts the module to 16 bit (no autocast) and keeps fp32
        # master weights, AdamW states and the update in its optimizer partition.
        p = Precision(p.name, 2, 2, 2, False)
        master = 4
    total = geo.params["total"]
    base_w = (total - geo.quantized_params) * p.param + geo.quantized_params * NF4_BYTES_PER_PARAM
    base_w += geo.buffers_bytes["float"] * p.param + geo.buffers_bytes["int"]
    n_train = sum(geo.trainable.values())
    shard_w = world if strategy in ("fsdp", "deepspeed_zero3") else 1  # weights sharded (ZeRO-3 / FSDP)
    parts = dict.fromkeys(PART_NAMES, 0)
    parts["weights"] = base_w / shard_w
    parts["lora"] = geo.lora_params * p.param / shard_w
    parts["batch"] = rows * seq * 3 * 8 + n_img * (geo.pixel_elements or 3 * geo.image_size**2) * p.param
    if dpo and stage.dpo.reference == "copy":
        parts["reference_model"] = base_w + geo.lora_params * p.param
    grads = n_train * p.param / world
    state = 4 if master else p.param
    parts["optimizer"] = (n_train * (2 * state + master) + geo.trainable_tensors * 4) / world  # + step counters
    cache = 0
    if p.autocast and strategy != "fsdp":
        # bf16 copies of trainable matmul weights, cached by autocast until the step's autocast region ends
        # (Lightning runs the whole manual-optimisation step, backward and optimizer included, inside it).
        cache = sum(s.n_in * s.n_out for st in (geo.llm, geo.vision) for blk in st.blocks
                    for s in blk.values() if s.kind == "full") * 2
        cache += (geo.head_trainable if train.llm is True else 0) * 2
        cache += geo.trainable["connector"] * 2
        if stage.lora is not None:
            cache += geo.lora_params * 2
    if strategy == "ddp":
        parts["ddp_buckets"] = grads
    if strategy == "fsdp":
        compute = 2 if tr.precision.startswith("bf16") else p.param
        blocks = (2 * geo.max_block_params if tr.fsdp_reshard_after_forward
                  else total - geo.root_params)
        parts["shard_buffers"] = (geo.root_params + blocks) * compute + geo.max_block_params * p.param
    if deepspeed:
        from vlmtrain.train.strategy import deepspeed_config

        z = deepspeed_config(stage).get("zero_optimization", {})
        # gradient reduce bucket (+ ZeRO-2's parameter all-gather bucket after the step; ZeRO-3: the prefetch
        # bucket and the two blocks being gathered), in 16-bit elements
        buf = int(z.get("reduce_bucket_size", 5e8)) * p.param
        if strategy == "deepspeed_zero3":
            buf += int(z.get("stage3_prefetch_bucket_size", 5e7)) * p.param + 2 * geo.max_block_params * p.param
        else:
            buf += int(z.get("allgather_bucket_size", 5e8)) * p.param
        parts["shard_buffers"] = buf
    if opts.device == "cuda":
        parts["cuda_context"] = CUDA_CONTEXT_BYTES

    # ---- activations
    vis_graph = train.vision is not False
    # The vision tower: saved tensors of the blocks below the feature layer (those above are dropped, unused).
    v = stack_activations(geo.vision, geo.vision_used_layers, False, vis_shape, p, ckpt and vis_graph,
                          lora_r, lora_dropout, opts.device)
    vis_saved = v.saved
    if vis_graph:
        # embeddings: pre-LN input [n, p, d] (CLIP's pre_layrnorm), the pixels when the patch conv trains
        vis_saved += n_img * geo.vision_tokens * geo.vision.hidden * p.resid
        if train.vision is True:
            vis_saved += n_img * (geo.pixel_elements or 3 * geo.image_size**2) * (2 if p.autocast else p.resid)
    # A frozen tower with no graph still holds every hidden state while it runs (output_hidden_states=True).
    vis_forward = 0
    if not vis_graph:
        kept = len(geo.vision.blocks) + 1 if geo.vision_keeps_hidden_states else 2  # else: a layer's in and out
        vis_forward = (kept * n_img * geo.vision_tokens * geo.vision.hidden * p.resid
                       + 2 * n_img * geo.vision_tokens * geo.vision.intermediate * p.act
                       + (n_img * geo.vision_tokens) ** 2 * p.act * geo.vision_block_mask)

    # Connector: LLaVA's linear / mlp2x_gelu in closed form (same Linear rule), others traced on meta.
    conn_trains = train.connector
    feats = _T("feats", p.resid, vis_graph)
    csv = Saved()
    c_tokens = n_img * geo.vision_feature_tokens
    if geo.connector_name in ("linear", "mlp2x_gelu"):
        d_v, d = geo.vision.hidden, geo.llm.hidden
        spec1 = LinearSpec(d_v, d, "full" if conn_trains else "frozen")
        o1 = _linear(csv, feats, spec1, "c1", c_tokens, p, 0, 0.0, opts.device)
        if geo.connector_name == "mlp2x_gelu":
            if o1.rg:
                csv.add(o1.name, c_tokens * d * p.act)  # GELU saves its input
            _linear(csv, _T("gelu", p.act, o1.rg), LinearSpec(d, d, spec1.kind), "c2", c_tokens, p, 0, 0.0,
                    opts.device)
        conn_saved = csv.total()
    elif conn_trains or vis_graph:
        conn_saved = _trace_connector(geo.connector_module, n_img, geo.vision_feature_tokens, geo.vision.hidden,
                                      p, vis_graph, conn_trains)
    else:
        conn_saved = 0
    x0_rg = bool(conn_trains) or vis_graph or train.llm is True  # LLM input needs a grad (embeddings or below)

    # The LLM's decoder blocks, then the final norm and the LM head.
    a = stack_activations(geo.llm, len(geo.llm.blocks), x0_rg, llm_shape, p, ckpt, lora_r, lora_dropout,
                          opts.device)
    t = rows * seq
    # Positions whose logits carry a loss: never an image slot nor the last position; `supervised_fraction` of the
    # rest (1.0, the default, is the worst case: every text token supervised).
    text = max(seq - 1 - opts.images_per_sample * geo.image_tokens, 0)
    n_sel = math.ceil(rows * text * opts.supervised_fraction)
    top = Saved()
    xL = _T("xL", a.out_bpe, a.out_rg)
    y = _norm(top, xL, geo.llm, "final", t, p)
    head_spec = LinearSpec(geo.llm.hidden, geo.vocab, "full" if train.llm is True else "frozen")
    if geo.selective_head:  # VLM.forward(logits_mask=...): the head runs on hidden[mask], a [n, h] copy
        _linear(top, _T("hidden_sel", p.resid, y.rg), head_spec, "lm_head", n_sel, p, 0, 0.0, opts.device)
    else:
        _linear(top, y, head_spec, "lm_head", t, p, 0, 0.0, opts.device)
    # transformers' [rows, 1, s, s] bool mask: kept by every checkpointed block's arguments until its backward
    # (a whole-traced stack counts its masks among the blocks' shared arguments)
    whole = geo.llm.traced is not None and geo.llm.traced.kind(0, "block") is not None
    mask_bool = rows * seq * seq if mask and geo.llm.attn_impl == "sdpa" and ckpt and not whole else 0

    # Logits [n, V] in the matmul dtype. The loss upcasts them to fp32 (a copy when bf16) and log_softmax saves its
    # fp32 output; the logits themselves are not referenced after the loss returns. Backward then holds that saved
    # output, nll's dense fp32 gradient and log_softmax's fp32 gradient: 12 bytes per element, the peak
    # (forward: 8, or 10 for bf16 logits). DPO: the policy's saved log_softmax (4) stays while the reference runs
    # its forward (logits + fp32 copy + log_softmax: 8 / 10) → 12 / 14. Families without a plain head (soft-capped
    # logits) compute all [rows·s, V] logits first and index them.
    n_v = n_sel * geo.vocab
    fwd = 10 if p.act == 2 else 8
    logits_peak = n_v * (max(12, 4 + fwd) if dpo else 12)
    if not geo.selective_head:
        logits_peak = max(logits_peak, t * geo.vocab * p.act + n_v * fwd)
    logits_grad = n_v * p.act  # the logits' gradient, alive while the LM head runs backward

    # Gradients: with accumulation the earlier micro-batches' gradients are held from the start of the step.
    g_prev = grads if tr.grad_accum > 1 else 0
    g_head = geo.head_trainable * p.param / world
    g_blocks = sum(geo.block_trainable) * p.param / world
    g_block0 = geo.block_trainable[0] * p.param / world if geo.block_trainable else 0
    g_below_llm = (geo.trainable["vision"] + geo.trainable["connector"]) * p.param / world
    # MoE router loss: every MoE layer's [t, experts] logits are kept to the end of the forward and the loss's
    # softmax over their concatenation is saved for its backward (fp32)
    router = t * geo.router_logits * (p.act + 4)
    act_llm = a.saved + top.total("act") + mask_bool + router
    wc_llm = a.wcopy + top.total("wcopy")
    vis_act = vis_saved + conn_saved

    def phase(name: str, **kw) -> tuple[str, dict[str, float]]:
        d = dict(parts)
        d["autocast_weight_copies"] = cache + kw.pop("wcopy", 0)
        d.update(kw)
        return name, d

    # Backward frees each block's activations as it creates that block's gradients, so memory moves linearly from
    # the top block's moment to the bottom block's: both ends are candidates.
    candidates = [
        # the end of forward, inside the loss: every saved activation + the loss's temporaries over the logits
        phase("loss", grads=g_prev, activations=act_llm, vision_activations=vis_act, logits=logits_peak,
              wcopy=wc_llm + v.wcopy),
        # the LM head's backward: its weight gradient appears next to the logits' gradient
        phase("head_backward", grads=max(g_prev, g_head), activations=act_llm, vision_activations=vis_act,
              logits=logits_grad, wcopy=wc_llm + v.wcopy),
        # the top decoder block's backward: + one block recomputed (checkpointing) and the backward excess
        phase("backward", grads=max(g_prev, g_head), activations=act_llm + a.recompute + a.temp,
              vision_activations=vis_act, wcopy=wc_llm + v.wcopy),
        # the bottom decoder block's backward: the other blocks' gradients, only this block's activations left
        phase("backward_bottom", grads=max(g_prev, g_head + g_blocks - g_block0),
              activations=a.first + a.recompute + a.temp + mask_bool, vision_activations=vis_act,
              wcopy=v.wcopy + a.first_wcopy),
        # the LLM's backward is done: its gradients against the connector's and vision tower's activations
        phase("backward_vision", grads=max(g_prev, grads - g_below_llm), wcopy=v.wcopy,
              vision_activations=vis_act + v.recompute + v.temp),
        # optimizer.step(): weights + gradients + states (fused AdamW, CPU and CUDA: no temporaries)
        phase("optimizer", grads=grads),
    ]
    if vis_forward:
        candidates.append(phase("vision_forward", grads=g_prev, vision_activations=vis_forward))
    return {name: {k: int(v) for k, v in d.items()} for name, d in candidates}


def search_max_batch(geo, stage, opts, limit: int) -> int:
    """Largest micro-batch whose peak ≤ limit (peaks grow with the batch): doubling, then bisection; 0 if none."""
    def fits(b):
        return sum(step_parts(geo, stage, b, opts)[0].values()) <= limit

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
