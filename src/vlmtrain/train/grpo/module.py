"""The GRPO objective for composed VLMs: each optimizer step samples G completions per prompt, scores them with the
stage's reward functions, turns the rewards into group-relative advantages and trains on the clipped objective.

One step over a window of micro-batches of prompts (`data.batch_size` prompts each):

    rollout (per micro-batch, no grad):
        images → vlm.encode_images once per prompt            features [n_img, t, d]
        sample_groups: r prompts × G completions (KV cache)   the features repeated per completion, not re-encoded
        rewards [r*G, k] → weighted sum → advantages [r*G]    (advantages.py; TRL's formulas)
        collate_groups: one row per prompt, its G completions after it
        old log-probs [r*G, t] (num_iterations > 1), reference log-probs (beta > 0)
    loss (per micro-batch, with grad):
        group_token_logps (prompt and images once per group) → grpo_loss → backward

With `num_iterations` = n the data yields each window n times (`RepeatWindows`); iteration 0 generates and the
later ones reuse its rollouts (old log-probs from iteration 0, clipping against them), as TRL's buffer does.
The reference is the policy with its LoRA adapters off for LoRA stages (as DPO's `adapters_off`), else a frozen
copy of the starting model; `beta: 0` loads none.

Under `ddp` / `fsdp` each rank completes its own prompts (a group never leaves its rank) and a completion's tokens
come from its key (`sampler.py`), so the ranks together sample what one process would for the same global batch.
What spans the batch is reduced over the ranks: `dapo`'s token count, `scale_rewards: batch`'s std (the rewards are
gathered, as TRL gathers them) and the logged reward statistics. Under `fsdp` generation gathers the sharded
weights per forward, so every rank steps until all are done (`synced_gpus`) and a rank without images runs a blank
one through the tower when another rank has some.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vlmtrain.data.prompts import end_of_turn_ids
from vlmtrain.errors import VlmtrainError
from vlmtrain.train.grpo.advantages import group_advantages, groups_with_spread, reward_metrics, weighted_rewards
from vlmtrain.train.grpo.generate import SamplingSettings, sample_groups
from vlmtrain.train.grpo.loss import grpo_loss, mask_truncated
from vlmtrain.train.grpo.rewards import RewardState, load_rewards
from vlmtrain.train.grpo.sampler import completion_keys
from vlmtrain.train.grpo.scoring import GroupRows, collate_groups, group_token_logps
from vlmtrain.train.module import VLMModule

log = logging.getLogger(__name__)


class RepeatWindows:
    """Each window of `windows` (`StepWindows`) `n` times, marked `iteration` 0..n-1 (`num_iterations`).
    `unfinished`: a window a resumed run restored mid-way (`{"micro", "cursor", "iteration"}`, its rollout in the
    module); its remaining iterations come first."""

    def __init__(self, windows, n: int):
        self.windows, self.n = windows, n
        self.unfinished: dict | None = None

    def __iter__(self):
        if self.unfinished is not None:
            window, self.unfinished = self.unfinished, None
            for i in range(window["iteration"] + 1, self.n):
                yield {**window, "iteration": i}
        for window in self.windows:
            for i in range(self.n):
                yield {**window, "iteration": i}


class SkipEmptyWindows:
    """`windows` without those in which some rank's micro-batch holds no prompt (the loader's placeholder batch: a
    partial last global batch left the rank's slice empty, or every prompt in it was over_length). Whether to skip is
    agreed by all ranks (one all-reduce per window, in the training loop's own fetch), so every rank skips the same
    windows: a rank with nothing to generate would otherwise leave the others' collectives unpaired."""

    def __init__(self, windows):
        self.windows = windows
        self.skipped = 0

    def __iter__(self):
        for window in self.windows:
            empty = any(not b.get("ids") for b in window["micro"])
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
                flag = torch.tensor([float(empty)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                empty = bool(flag.item())
            if empty:
                self.skipped += 1
                log.warning(f"grpo: a step's prompts skipped on every rank ({self.skipped} so far): a rank had none "
                            "(the data's end left its slice empty, or every prompt in it was over_length)")
                continue
            yield window


def _prompt_lists(b: dict) -> list[list[int]]:
    """The prompts of a right-padded prompt batch as token lists."""
    lengths = b["attention_mask"].sum(1).tolist()
    return [row[:n] for row, n in zip(b["input_ids"].tolist(), lengths)]


def _columns(cols: list[dict], G: int) -> dict[str, list]:
    """Per-prompt reward columns → one list per column with each prompt's value repeated for its G completions
    (None where a record lacks the column), TRL's layout."""
    names = sorted({k for c in cols for k in c})
    return {k: [c.get(k) for c in cols for _ in range(G)] for k in names}


class GRPOModule(VLMModule):
    """`VLMModule` with the GRPO objective (module docstring). `completions_path`: where the sampled completions
    of every `grpo.log_completions_every`-th step go (completions.jsonl in the run directory)."""

    def __init__(self, bundle, stage, loader=None, completions_path: str | Path | None = None):
        super().__init__(bundle, stage, loader)
        g = stage.grpo
        self.cfg = g
        self.rewards = load_rewards(g.rewards)
        self.settings = SamplingSettings(g.temperature, g.top_p, g.top_k, g.max_completion_length)
        self.tokenizer = bundle.tokenizer
        self.pad_id = bundle.tokenizer.pad_token_id
        self.stop_ids = self._stop_ids(bundle)
        self.completions_path = Path(completions_path) if completions_path else None
        self.rollouts: list[dict] | None = None
        self.iteration = 0  # of the last trained window (num_iterations > 1)
        self.windows: RepeatWindows | None = None  # set by the stage: where a resumed rollout's iterations go
        # images frozen (tower, connector, no tower adapters): features from generation serve every forward
        self.frozen_images = not (stage.train.vision or stage.train.connector)
        self.reference = None
        if g.beta > 0:
            self.reference = "adapters_off" if stage.train.llm == "lora" else "copy"
            if self.reference == "copy":
                self._ref.append(copy.deepcopy(self.model).eval().requires_grad_(False))
                if stage.trainer.strategy == "fsdp":
                    log.warning("grpo: the frozen reference (beta > 0, the LLM fully trained) is a whole copy of the "
                                "model on every rank, not sharded; with a large model use LoRA (the reference is "
                                "then the policy with its adapters off) or beta: 0")

    # ---- rollout ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, b: dict) -> dict:
        """Generate, reward and score one micro-batch of prompts (no grad): everything the loss passes need."""
        m, G, dev = self.model, self.cfg.num_generations, self.device
        prompts = _prompt_lists(b)
        step = self.global_step if self._trainer is not None else 0
        keys = completion_keys(self.stage.trainer.seed, step, b["ids"], G)
        t0 = time.perf_counter()
        was_training = m.training
        m.eval()  # sample from the policy without dropout
        try:
            pix, feats, groups = self._generate(b, prompts, keys)
        finally:
            m.train(was_training)
        gen_seconds = time.perf_counter() - t0
        flat = [c for g in groups for c in g]
        texts = self.tokenizer.batch_decode(flat, skip_special_tokens=True)
        prompt_msgs = [p for p in b["prompts"] for _ in range(G)]
        completions = [[{"role": "assistant", "content": t}] for t in texts]  # TRL's conversational form
        max_steps = self.stage.trainer.max_steps
        per_func = self.rewards.score(prompt_msgs, completions, completion_ids=flat,
                                      columns=_columns(b["columns"], G), state=RewardState(step, max_steps))
        total = weighted_rewards(per_func, self.rewards.weights)
        adv = self._advantages(total)
        cpu_rows = self._group_rows(b, prompts, groups)
        mask = torch.arange(int(cpu_rows.lengths.max()))[None] < cpu_rows.lengths[:, None]  # [r*G, t]
        rows = cpu_rows.to(dev)
        truncated = torch.tensor([c[-1] not in self.stop_ids for c in flat])
        if self.cfg.mask_truncated_completions:
            mask = mask_truncated(mask, flat, self.stop_ids)
        kept = len(flat)
        if self.cfg.dynamic_sampling:  # DAPO's filter: a zero-spread group leaves the loss (advantages all 0)
            keep = groups_with_spread(total, G).repeat_interleave(G)
            mask = mask * keep[:, None].to(mask.dtype)
            kept = int(keep.sum())
        ro = {"rows": rows, "pix": pix, "feats": feats if self.frozen_images else None, "mask": mask.to(dev),
              "advantages": adv.advantages.to(dev), "zero_spread": adv.zero_spread_fraction, "per_func": per_func,
              "total": total, "texts": texts, "prompts": prompts, "ids": b["ids"], "truncated": truncated,
              "gen_seconds": gen_seconds, "old": None, "ref": None, "kept": kept,
              "tokens": sum(len(p) for p in prompts) + sum(len(c) for c in flat)}
        if self.cfg.num_iterations > 1:  # the sampling policy's log-probs, for the ratio in later iterations
            ro["old"] = self._logps(m, ro)[0]
        if self.reference is not None:
            ro["ref"] = self._reference_token_logps(ro)
        return ro

    def _stop_ids(self, bundle) -> list[int]:
        return end_of_turn_ids(bundle.tokenizer, bundle.model.image_token_id)

    # ---- across ranks ----------------------------------------------------------------------------------------
    @property
    def _synced(self) -> bool:
        """Sharded weights: every rank's generation forwards must pair up with the others'."""
        return self.stage.trainer.strategy == "fsdp" and self._world() > 1

    def _gather(self, obj) -> list:
        """`obj` from every rank, in rank order (`[obj]` in one process)."""
        if self._world() == 1:
            return [obj]
        out = [None] * self._world()
        dist.all_gather_object(out, obj)
        return out

    def _advantages(self, total: torch.Tensor):
        """Group-relative advantages of this rank's `[r*G]` rewards; under `scale_rewards: batch` the std is the
        whole batch's, over all ranks (TRL gathers the rewards for it too)."""
        G, scale = self.cfg.num_generations, self.cfg.scale_rewards
        if scale != "batch" or self._world() == 1:
            return group_advantages(total, G, scale)
        parts = self._gather(total.cpu())
        adv = group_advantages(torch.cat(parts), G, scale)
        start = sum(p.numel() for p in parts[:dist.get_rank()])
        part = slice(start, start + total.numel())
        adv.advantages, adv.baseline, adv.std = adv.advantages[part], adv.baseline[part], adv.std[part]
        adv.zero_spread = adv.zero_spread[start // G:(start + total.numel()) // G]
        return adv

    def _images_elsewhere(self, has_images: bool) -> bool:
        """Under `fsdp`: True when this rank has no images but another rank has (its tower must run too, on a
        blank image, so the tower's gathers pair up)."""
        if not self._synced:
            return False
        flag = torch.tensor([float(has_images)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not has_images and bool(flag.item())

    def _generate(self, b: dict, prompts: list[list[int]], keys: list[int]) -> tuple:
        """(the step's image inputs, their features or None, completions [r][G]): the images encoded once per
        prompt, the features repeated for its G completions; `keys` name each completion's random stream."""
        pix = b.get("pixel_values")
        pix = pix.to(self.device) if pix is not None else None
        if self._images_elsewhere(pix is not None):
            p = next(self.model.vision.parameters())
            size = self.model.vision.image_size
            self.model.encode_images(torch.zeros(1, 3, size, size, dtype=p.dtype, device=self.device))
        feats = self.model.encode_images(pix) if pix is not None else None
        groups = sample_groups(self.model, prompts, feats, self.cfg.num_generations, self.settings, self.pad_id,
                               self.stop_ids, keys, synced=self._synced)
        return pix, feats, groups

    def configure_model(self) -> None:
        """After sharding: generation calls the model's `_generation_methods`, not its forward, so FSDP is told to
        gather the root's weights for them as it does for a forward."""
        super().configure_model()
        if self.frozen_images:
            # the loss forward takes generation's features on every rank and runs no tower, so a text-only rank must
            # not run the blank image data-parallel strategies otherwise run (its gathers would pair with nothing);
            # generation pairs the tower's runs itself (`_images_elsewhere`)
            self.model.always_encode_images = False
        if self.stage.trainer.strategy == "fsdp":
            from torch.distributed.fsdp import register_fsdp_forward_method

            for name in self._generation_methods:
                register_fsdp_forward_method(self.model, name)

    _generation_methods: tuple[str, ...] = ("encode_images", "generate_repeated")

    def _group_rows(self, b: dict, prompts: list[list[int]], groups: list) -> GroupRows:
        return collate_groups(prompts, groups, self.pad_id, self.model.image_token_id)

    def _logps(self, model, ro: dict, entropy: bool = False):
        """Per-token log-probs `[r*G, t]` of a rollout's completions under `model`, prompt and images once per
        group; the generation's image features when the images are frozen, else the pixels."""
        feats = ro["feats"]
        return group_token_logps(model, ro["rows"], pixel_values=None if feats is not None else ro["pix"],
                                 image_embeds=feats, return_entropy=entropy)

    @torch.no_grad()
    def _reference_token_logps(self, ro: dict) -> torch.Tensor:
        if self.reference == "copy":
            return self._logps(self._ref[0], ro)[0]
        from vlmtrain.model.lora import set_adapters_enabled

        set_adapters_enabled(self.model, False)
        try:
            return self._logps(self.model, ro)[0]
        finally:
            set_adapters_enabled(self.model, True)

    # ---- the step --------------------------------------------------------------------------------------------
    def accumulate(self, window: dict) -> dict:
        """Rollouts (iteration 0) or the kept ones (later iterations), then the loss and backward of each
        micro-batch. The loss over a window: dapo's token mean over all its completion tokens (`num_items`);
        the other reductions averaged over the micro-batches (TRL's division by accumulation steps)."""
        micro = window["micro"]
        self.iteration = window.get("iteration", 0)
        if self.iteration == 0 or self.rollouts is None:
            self.rollouts = [self.rollout(b) for b in micro]
            self._log_completions()
        else:
            for ro in self.rollouts:
                ro["gen_seconds"] = 0.0
        t0 = time.perf_counter()
        k = len(self.rollouts)
        # dapo's normaliser: the window's completion tokens over all ranks, per rank (the gradients are averaged)
        n_items = self._all_sum(sum(ro["mask"].sum() for ro in self.rollouts)) / self._world()
        # dynamic sampling: the kept completions of the step, per rank, replace the row count of the other reductions
        n_seq = (self._all_sum(sum(ro["kept"] for ro in self.rollouts)) / self._world()
                 if self.cfg.dynamic_sampling else None)
        loss_total, sums = 0.0, {}
        for i, ro in enumerate(self.rollouts):
            logps, _, ent = self._logps(self.model, ro, entropy=True)
            g = self.cfg
            out = grpo_loss(logps, ro["old"], ro["ref"], ro["advantages"], ro["mask"], loss_type=g.loss_type,
                            epsilon=g.epsilon, epsilon_high=g.epsilon_high, beta=g.beta,
                            max_completion_length=g.max_completion_length, num_items=n_items,
                            num_sequences=n_seq, entropies=ent)
            loss = out.loss if g.loss_type == "dapo" or n_seq is not None else out.loss / k
            self._backward(loss, last=i == k - 1)
            loss_total += float(loss.detach())
            tokens = float(ro["mask"].sum())  # the metrics are masked token means: weighted by their tokens
            for name, v in out.metrics.items():
                sums[name] = sums.get(name, 0.0) + float(v) * tokens
        for b, ro in zip(micro, self.rollouts):
            b["token_count"] = ro["tokens"]  # prompt + completion tokens: the step's tokens/s
        # token means over the whole step (all micro-batches, all ranks); the keys in the same order on every rank
        n_tokens = max(n_items * self._world(), 1.0)
        means = {name: self._all_sum(v) / n_tokens for name, v in sorted(sums.items())}
        loss = self._all_sum(loss_total) / self._world()
        return {"loss": loss} | self._rl_stats(means, time.perf_counter() - t0)

    def _rl_stats(self, loss_metrics: dict, train_seconds: float) -> dict:
        """The step's RL metrics (TRL's, under `rl/`; per-function rewards under `rewards/<name>/mean|std`)."""
        ros = self.rollouts
        local = (torch.cat([ro["per_func"].cpu() for ro in ros]),
                 torch.cat([ro["rows"].lengths.cpu() for ro in ros]).float(),
                 torch.cat([ro["truncated"].cpu() for ro in ros]).float(), [ro["zero_spread"] for ro in ros])
        parts = self._gather(local)  # the whole step's completions, all ranks
        per_func, lengths, truncated = (torch.cat([p[i] for p in parts]) for i in range(3))
        zero_spread = [z for p in parts for z in p[3]]
        rm = reward_metrics(per_func, self.rewards.weights, self.rewards.names)
        gen = sum(ro["gen_seconds"] for ro in ros)
        stats = {k: v for k, v in rm.items() if k.startswith("rewards/")}
        stats |= {"rl/reward": rm["reward"], "rl/reward_std": rm["reward_std"],
                  "rl/zero_spread_fraction": sum(zero_spread) / len(zero_spread),
                  "rl/completion_len_mean": float(lengths.mean()),
                  "rl/completion_clipped_fraction": float(truncated.mean()),
                  "rl/generate_seconds": gen, "rl/train_seconds": train_seconds,
                  "rl/generate_share": gen / max(gen + train_seconds, 1e-9)}
        stats |= {f"rl/{k}": v for k, v in loss_metrics.items()}
        return stats

    # ---- completions.jsonl -----------------------------------------------------------------------------------
    def _log_completions(self) -> None:
        """Every `log_completions_every` steps (and at step 1), the step's prompts, completions and rewards."""
        every, path = self.cfg.log_completions_every, self.completions_path
        step = (self.global_step if self._trainer is not None else 0) + 1  # the step being trained
        if not every or path is None or not (step == 1 or step % every == 0):
            return
        G, names, image = self.cfg.num_generations, self.rewards.names, self.model.image_token_id
        rows = []
        for ro in self.rollouts:
            prompts = self.tokenizer.batch_decode([_one_slot_per_image(p, image) for p in ro["prompts"]])
            for j, text in enumerate(ro["texts"]):
                rewards = {n: _num(ro["per_func"][j, i]) for i, n in enumerate(names)}
                rows.append({"step": step, "id": ro["ids"][j // G], "prompt": prompts[j // G], "completion": text,
                             "rewards": rewards, "reward": _num(ro["total"][j]),
                             "advantage": float(ro["advantages"][j])})
        rows = [row for part in self._gather(rows) for row in part]  # every rank's completions, rank 0 writes
        if self._trainer is not None and not self.trainer.is_global_zero:
            return
        with path.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    # ---- checkpoints: the in-flight rollout ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Between a window's iterations the checkpoint carries every rank's rollout (`rollout_state`), so a resumed
        run trains the remaining iterations on it."""
        super().on_save_checkpoint(checkpoint)
        if self.rollouts is None or self.iteration >= self.cfg.num_iterations - 1:
            return
        from vlmtrain.train.grpo.rollout_state import pack

        ranks = self._gather(pack(self.rollouts))  # on every rank: a collective under ddp / fsdp
        checkpoint["vlmtrain"]["grpo_rollout"] = {"iteration": self.iteration, "ranks": ranks}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint["vlmtrain"].get("grpo_rollout")
        if saved is None:
            return
        from vlmtrain.train.grpo.rollout_state import unpack

        if len(saved["ranks"]) != self._world():
            raise VlmtrainError(f"the checkpoint holds a GRPO rollout in flight (iteration {saved['iteration'] + 1} of "
                                f"{self.cfg.num_iterations}) generated by {len(saved['ranks'])} ranks; resume it "
                                f"with {len(saved['ranks'])} ranks, not {self._world()}")
        rank = dist.get_rank() if self._world() > 1 else 0
        self.rollouts = unpack(saved["ranks"][rank], self.device)
        self.iteration = saved["iteration"]
        if self.windows is not None:
            stubs = [{"ids": ro["ids"]} for ro in self.rollouts]  # what a step reads of its batches besides these
            self.windows.unfinished = {"micro": stubs, "cursor": self.cursor, "iteration": self.iteration}

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.completions_path is not None and self.trainer.is_global_zero:
            from vlmtrain.train.recorder import truncate_metrics

            truncate_metrics(self.completions_path, self.global_step)  # a resumed run logs those steps again


def _num(x: torch.Tensor) -> float | None:
    v = float(x)
    return None if v != v else v  # NaN (no function scored it) is not JSON


def _one_slot_per_image(ids: list[int], image_token_id: int) -> list[int]:
    """Prompt ids with each run of image slots cut to one image token (a readable prompt in completions.jsonl)."""
    return [t for i, t in enumerate(ids) if not (t == image_token_id and i and ids[i - 1] == image_token_id)]
