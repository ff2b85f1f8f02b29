"""Schema of a training stage and of a multi-stage recipe.

A stage is data, not a subclass: what trains, the objective, learning-rate groups, schedule, data mixture, eval.
`align`, `pretrain`, `sft` and `dpo` are presets (`vlmtrain.train.presets`) that a stage's own fields override.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vlmtrain.config.model import AnyModelConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TrainSet(_Strict):
    """Which modules receive gradients: true (all weights), false (frozen) or "lora" (base frozen, LoRA adapters
    train; needs a `lora:` block)."""

    vision: bool | Literal["lora"] = False
    connector: bool = True
    llm: bool | Literal["lora"] = False


class LoRAConfig(_Strict):
    """PEFT LoRA adapters. Targets are regexes over the VLM's module names, so `q_proj` in the vision tower is never
    hit by accident (the LLM pattern is anchored at `llm.`)."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # attention and MLP projections, and the projections of linear-attention token mixers (Qwen3.5's Gated
    # DeltaNet: in_proj_qkv/z/b/a, out_proj), which a Transformer-only pattern would leave without adapters
    llm_target: str = Field(r"llm\.model\.layers\.\d+\..*((q|k|v|o|gate|up|down)_proj|in_proj_(qkv|z|b|a)|out_proj)",
                            description="regex (full match) of LLM linear layers that get adapters")
    llm_target_parameters: str = Field(r"llm\.model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)",
                                       description="regex (full match) of LLM parameters outside linear layers that "
                                                   "get adapters through PEFT's target_parameters: the fused 3-D "
                                                   "expert tensors of mixture-of-experts LMs (matches nothing in "
                                                   "dense ones; no dropout: PEFT's parameter adapters take "
                                                   "none); '' = none")
    vision_target: str = Field(r"vision\.model\..*layers\.\d+\..*(q|k|v|out)_proj",
                               description="regex for the vision tower (used when train.vision is 'lora')")
    dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    quantize: Literal["4bit"] | None = Field(None, description="QLoRA: the LLM's linear layers (not the LM head) "
                                             "as a frozen 4-bit NF4 base (bitsandbytes, double quantisation)")


class DatasetRef(_Strict):
    path: str | None = Field(None, description="shard folder, tar glob or brace URL")
    builtin: str | None = Field(None, description="a dataset made by the code (e.g. digits-qa), prepared on demand")
    weight: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _one(self):
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of `path` or `builtin`")
        return self


class DataConfig(_Strict):
    train: list[DatasetRef] = Field(default_factory=list)
    batch_size: int = Field(8, ge=1, description="micro-batch (sequences; packed rows when mode=pack)")
    num_workers: int = Field(2, ge=0)
    mode: Literal["plain", "group", "pack"] = "plain"
    max_len: int = Field(2048, ge=8)
    pack_len: int | None = Field(None, ge=8, description="tokens per packed row (default: max_len)")
    shuffle_buffer: int = Field(256, ge=1)
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    caption_prompt: str = ""
    anyres_pinpoints: list[tuple[int, int]] | None = Field(
        None, description="AnyRes tiling: candidate canvases (width, height), multiples of the tower's image size")
    encoded_cache_mb: int = Field(256, ge=0, description="per dataloader worker: keep encoded samples (decoded, "
                                                         "resized, tokenized) for reuse in later epochs; 0 = off")
    split: Literal["shard", "stride"] = Field(
        "shard", description="shard: ranks×workers own disjoint shards; stride: world-size-invariant order "
                             "(resume on another world size; every worker reads all raw samples)")


class DPOConfig(_Strict):
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    share_prompt: bool = Field(True, description="one row per pair: the prompt (and its images) computed once, "
                                                 "chosen and rejected answers after it under a custom mask "
                                                 "(needs sdpa or eager attention; native families where "
                                                 "Family.shared_prefix gives a reason keep two rows)")
    reference: Literal["copy", "adapters_off"] = Field(
        "copy", description="copy: a frozen copy of the starting model; adapters_off: the policy with its LoRA "
                            "adapters disabled (LoRA stages; no second model in memory)")


# the rewards vlmtrain ships (vlmtrain.train.grpo.reward_fns.SHIPPED), named here so a misspelt one is refused before
# anything heavy loads
REWARD_NAMES: tuple[str, ...] = ("accuracy", "multiple_choice", "think_answer_format", "box_iou", "length_penalty")
_REWARD_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class RewardRef(_Strict):
    """One reward function of a GRPO stage, called as TRL calls it: `f(prompts, completions, **columns)`."""

    fn: str = Field(description="'package.module:function' (imported from the working directory or PYTHONPATH) "
                                f"or a shipped reward: {', '.join(REWARD_NAMES)}")
    weight: float = Field(1.0, allow_inf_nan=False, description="weight in the summed reward")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments bound to the function")

    @field_validator("fn")
    @classmethod
    def _path(cls, v: str) -> str:
        if ":" in v and not _REWARD_PATH.fullmatch(v):
            raise ValueError(f"{v!r} is not 'package.module:function'")
        if ":" not in v and v not in REWARD_NAMES:
            raise ValueError(f"unknown reward {v!r}; give 'package.module:function' or one of "
                             f"{', '.join(REWARD_NAMES)}")
        return v


class GRPOConfig(_Strict):
    """Online RL with group-relative advantages (GRPO and its variants); defaults are TRL 1.16's `GRPOConfig`'s.
    The `grpo` objective runs it for composed models (docs/grpo.md); `data.batch_size` counts prompts, each
    completed `num_generations` times."""

    num_generations: int = Field(8, ge=2, description="G: completions sampled per prompt (a group)")
    max_completion_length: int = Field(512, ge=1, description="tokens per completion at most")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "gspo"] = Field(
        "dapo", description="grpo: sequence means; dr_grpo: constant normaliser; dapo: token mean; gspo: "
                            "sequence-level importance ratio")
    beta: float = Field(0.0, ge=0, description="weight of the k3 KL to the reference (0: no reference model)")
    epsilon: float = Field(0.2, gt=0, lt=1, description="clip range below (and above, without epsilon_high)")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip range (DAPO's clip-higher)")
    num_iterations: int = Field(1, ge=1, description="optimizer passes over each generated batch")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the group's or the batch's reward std, or not at all")
    mask_truncated_completions: bool = Field(False, description="completions cut at max_completion_length "
                                                                "do not count in the loss")
    dynamic_sampling: bool = Field(False, description="DAPO's filter: a group whose rewards are all equal (no "
                                                      "advantage) leaves the loss and its normalisers; not refilled")
    rewards: list[RewardRef] = Field(min_length=1, description="reward functions and weights")
    log_completions_every: int = Field(10, ge=0, description="every this many steps, write the step's prompts, "
                                                             "completions and rewards to completions.jsonl (0: off)")

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _bool_scale(cls, v):
        return {True: "group", False: "none"}.get(v, v) if isinstance(v, bool) else v  # TRL accepts booleans

    @model_validator(mode="after")
    def _clip(self):
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise ValueError(f"epsilon_high ({self.epsilon_high}) is below epsilon ({self.epsilon}); clip-higher "
                             "only widens the upper edge")
        return self


class OptimConfig(_Strict):
    lr: float = Field(2e-5, gt=0)
    lr_groups: dict[Literal["vision", "connector", "llm"], float] = Field(
        default_factory=dict, description="per-module learning rates (LLaVA's mm_projector_lr); default: lr")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)


class EvalConfig(_Strict):
    data: DatasetRef | None = None
    every_n_steps: int | None = Field(None, ge=1, description="also evaluate during training")
    max_samples: int = Field(300, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)


class PrivacyConfig(_Strict):
    """DP-SGD for this stage (`vlmtrain.train.dp`): Poisson-sampled batches of expected size `data.batch_size`,
    per-sample gradients clipped to `max_grad_norm`, Gaussian noise of std `noise_multiplier × max_grad_norm`, and
    an accountant that reports ε at `delta`. Give `noise_multiplier` or `target_epsilon` (noise then chosen by the
    accountant for `trainer.max_steps` steps)."""

    noise_multiplier: float | None = Field(None, gt=0, description="σ: noise std over the clipping norm")
    target_epsilon: float | None = Field(None, gt=0, description="ε to reach after trainer.max_steps steps")
    delta: float | None = Field(None, gt=0, lt=1, description="δ of the (ε, δ) guarantee; required "
                                                                "(usually below 1 / number of records)")
    max_grad_norm: float = Field(1.0, gt=0, description="C: per-sample (per-unit) gradient clipping norm")
    accountant: Literal["rdp", "prv"] = "rdp"
    unit: Literal["record", "patient"] = Field(
        "record", description="what ε protects: one record, or one patient (records grouped by the gate's "
                              "meta.patient_group; each sampled patient contributes one of their records)")
    sampling: Literal["poisson", "shuffle"] = Field(
        "poisson", description="poisson: the sampling the accountant assumes (the only one accepted)")
    secure_mode: bool = Field(False, description="Opacus secure RNG for the noise (needs torchcsprng)")
    seed: int | None = Field(None, description="seed of the Poisson sampler and noise (default: trainer.seed)")


class AuditConfig(_Strict):
    """Inputs of `vlmtrain privacy audit` (works with or without DP): canaries planted in the training data, and
    held-out records of the same distribution as the non-members of the membership-inference test."""

    canaries: int = Field(0, ge=0, description="training records copied with a random 3-digit secret appended "
                                               "to the answer (secret-sharer canaries)")
    canary_repeats: int = Field(1, ge=1, description="copies of each canary record in the training data")
    holdout: DatasetRef | None = Field(None, description="held-out records (non-members)")
    max_records: int = Field(1000, ge=2, description="members and non-members scored, at most, each")
    seed: int = 0


class TrainerConfig(_Strict):
    max_steps: int = Field(100, ge=1)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] = "32-true"
    grad_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile each LLM decoder layer (fuses the elementwise work "
                                             "between matmuls; the first steps pay the compile)")
    log_every_n_steps: int = Field(10, ge=1)
    save_every_n_steps: int = Field(50, ge=1)
    seed: int = 0
    strategy: Literal["single", "auto", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = "auto"
    deepspeed_config: str | None = Field(None, description="DeepSpeed JSON (default: configs/deepspeed/zero2|3.json)")
    fsdp_reshard_after_forward: bool = Field(True, description="True: full shard (ZeRO-3-like); False: shard "
                                                               "gradients and optimizer state only (ZeRO-2-like)")
    fsdp_cpu_offload: bool = False
    fsdp_shard_size: int | None = Field(None, ge=1, description="hybrid sharding (HSDP): shard within groups of this "
                                        "many ranks (usually one node's GPUs), replicate across groups; "
                                        "null = shard across all ranks")
    vision_feature_cache_mb: int = Field(0, ge=0, description="keep a frozen vision tower's outputs per image "
                                                                 "(CPU, this budget) and reuse them in later epochs; "
                                                                 "0 = off (the align preset turns it on)")
    router_aux_loss_coef: float | None = Field(None, ge=0, description="mixture-of-experts families: weight of the "
                                               "router load-balancing loss in the objective (null: the checkpoint "
                                               "config's router_aux_loss_coef; 0: off)")
    log_sample_ids: bool = Field(False, description="write sample_ids.jsonl: the record ids of every step")
    wandb: bool = False
    wandb_project: str = "vlmtrain"
    wandb_online: bool = Field(False, description="sync to the wandb server (default: offline, files in the run dir)")


class StageConfig(_Strict):
    name: str
    preset: Literal["align", "pretrain", "sft", "dpo", "grpo"] | None = None
    model: AnyModelConfig | str | None = Field(None, description="model YAML path or inline (first stage only)")
    init_from: str | None = Field(None, description="a model folder to start from (set by recipes)")
    objective: Literal["next_token", "dpo", "grpo"] = "next_token"
    train: TrainSet = Field(default_factory=TrainSet)
    lora: LoRAConfig | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    grpo: GRPOConfig | None = Field(None, description="GRPO settings (the grpo objective)")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    privacy: PrivacyConfig | None = Field(None, description="DP-SGD (Opacus) for this stage")
    audit: AuditConfig | None = Field(None, description="canaries and held-out data for `vlmtrain privacy audit`")

    @model_validator(mode="before")
    @classmethod
    def _stage_rewards(cls, data):
        """`rewards:` at the stage's top level (the short recipe form) belongs to the grpo section."""
        if isinstance(data, dict) and "rewards" in data:
            data = dict(data)
            grpo = dict(data.get("grpo") or {})
            if "rewards" in grpo:
                raise ValueError("rewards: given both at the stage level and in grpo.rewards; keep one")
            grpo["rewards"] = data.pop("rewards")
            data["grpo"] = grpo
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if not self.data.train:
            raise ValueError("data.train: at least one dataset is needed")
        if self.dpo.reference == "adapters_off" and self.train.llm != "lora":
            raise ValueError("dpo.reference: adapters_off needs train.llm: lora")
        if not (self.train.vision or self.train.connector or self.train.llm):
            raise ValueError("train: nothing would train (vision, connector and llm are all false)")
        uses_lora = "lora" in (self.train.vision, self.train.llm)
        if uses_lora and self.lora is None:
            raise ValueError("train: 'lora' needs a `lora:` block (r, alpha, targets)")
        if self.lora is not None and not uses_lora:
            raise ValueError("lora: given but no module trains with 'lora' (set train.llm: lora)")
        if self.lora is not None and self.lora.quantize and self.lora.dora:
            raise ValueError("lora: quantize and dora together are not supported (DoRA's magnitude over a 4-bit base)")
        if self.objective == "dpo" and self.data.mode == "pack":
            raise ValueError("data.mode: packing is not supported with the dpo objective")
        if self.trainer.compile and self.trainer.strategy not in ("auto", "single", "ddp"):
            raise ValueError(f"trainer.compile: tested with single and ddp; not with {self.trainer.strategy}")
        if self.privacy is not None:
            _check_dp(self)
        _check_grpo(self)
        return self


def _check_grpo(stage: "StageConfig") -> None:
    """The grpo section and the grpo objective come together; what the GRPO stage does not run is refused."""
    if stage.objective != "grpo":
        if stage.grpo is not None:  # refused rather than silently ignored by a next_token or dpo run
            raise ValueError(f"grpo: given but the objective is {stage.objective}; use preset: grpo (or "
                             "objective: grpo) or remove this section")
        return
    if stage.grpo is None:
        raise ValueError("grpo: the grpo objective needs a grpo section with at least one reward "
                         "(grpo: {rewards: [{fn: accuracy}]})")
    if stage.data.mode != "plain":
        raise ValueError(f"data.mode: {stage.data.mode} is not supported with the grpo objective (prompts are "
                         "completed and scored per group); use mode: plain")
    if stage.trainer.strategy.startswith("deepspeed"):
        raise ValueError(f"trainer.strategy: the grpo objective runs with single, ddp and fsdp, not "
                         f"{stage.trainer.strategy} yet (generation under ZeRO-3 is not built); use fsdp")


def _check_dp(stage: "StageConfig") -> None:
    """What DP-SGD cannot do honestly is refused here, before anything loads (exit 2 from the CLI)."""
    p, d, tr = stage.privacy, stage.data, stage.trainer
    if p.delta is None:
        raise ValueError("privacy.delta: required — ε means nothing without δ (use less than 1/records, e.g. 1e-5)")
    if (p.noise_multiplier is None) == (p.target_epsilon is None):
        raise ValueError("privacy: give exactly one of noise_multiplier or target_epsilon")
    if p.sampling != "poisson":
        raise ValueError("privacy.sampling: the accountant's guarantee assumes Poisson sampling; a streaming "
                         "shuffle would report an ε that does not hold")
    if d.mode != "plain":
        raise ValueError(f"data.mode: {d.mode} is refused under DP-SGD — packing puts several records in one row "
                         "(a clipped row gradient would not bound one record) and length grouping replaces "
                         "Poisson sampling; use mode: plain")
    if any(r.weight != 1.0 for r in d.train):
        raise ValueError("data.train: mixture weights cannot apply under Poisson sampling (every record is drawn "
                         "with the same probability); remove `weight`")
    if stage.train.vision:
        raise ValueError("train.vision: must be false under DP-SGD — Opacus has no per-sample gradients for the "
                         "vision tower's embeddings (CLIP's class/patch/position embeddings)")
    if stage.objective == "grpo":
        raise ValueError("privacy: DP-SGD is refused for the grpo objective: a completion's advantage depends on "
                         "the rewards of its whole group, so clipping one record's gradient does not bound its "
                         "influence, and the accountant's guarantee would not hold")
    if stage.objective != "next_token":
        raise ValueError("objective: DP-SGD supports next_token only (DPO pairs are not built for per-record "
                         "clipping)")
    if stage.lora is not None and stage.lora.dora:
        raise ValueError("lora.dora: DoRA's magnitude vector has no per-sample gradient rule in Opacus; use LoRA")
    if stage.lora is not None and stage.lora.quantize:
        raise ValueError("lora.quantize: not supported under DP-SGD")
    if tr.grad_accum != 1:
        raise ValueError("trainer.grad_accum: must be 1 under DP-SGD (the Poisson batch is the step; its expected "
                         "size is data.batch_size)")
    if tr.strategy not in ("auto", "single"):
        raise ValueError(f"trainer.strategy: {tr.strategy} is not supported under DP-SGD (one process: single)")
    if tr.precision not in ("32-true", "bf16-mixed"):
        raise ValueError(f"trainer.precision: {tr.precision} is not supported under DP-SGD (32-true or bf16-mixed)")
    if tr.grad_checkpointing:
        raise ValueError("trainer.grad_checkpointing: not supported with Opacus' per-sample gradient hooks")
    if tr.compile:
        raise ValueError("trainer.compile: not supported with Opacus' per-sample gradient hooks")


class RecipeConfig(_Strict):
    name: str
    model: str | dict[str, Any] = Field(description="model YAML path (relative to the recipe) or inline")
    stages: list[dict[str, Any]] = Field(min_length=1, description="stage configs, run in order")
    defaults: dict[str, Any] = Field(default_factory=dict, description="merged under every stage")
    federated: dict[str, Any] | None = Field(None, description="federated training of one stage across sites "
                                                                "(`vlmtrain fed run`; validated by vlmtrain.fed.config)")
