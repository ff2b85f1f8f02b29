"""TRL side of the training comparisons: `trl.SFTTrainer` / `trl.DPOTrainer` (1.16) training the vlmtrain model
exported to a transformers Llava folder, with `LlavaForConditionalGeneration` and `AutoProcessor` loaded from it.

Settings are pinned to what the vlmtrain stage does, including two TRL 1.16 defaults that would otherwise differ:
bf16 autocast (on by default, even on CPU) and activation checkpointing (on by default). AdamW with the same LR,
betas, eps, no weight decay, constant schedule without warmup, gradient clipping at 1.0, fp32 (or bf16 autocast when
the bench asks for it, on both sides), no eval, no saving,
no logging, the same dataloader worker count. The optimizer implementation is TRL's default (`adamw_torch_fused`).

Per-step logs match `bench.vlm_side`: a callback stamps the end of every optimizer step, and a thin subclass
records what each step trained on (the step itself is TRL's, untouched).
"""

from __future__ import annotations

import time

import torch


def common_args(out_dir, *, batch: int, steps: int, lr: float, workers: int, max_len: int, seed: int = 0,
                bf16: bool = False) -> dict:
    return dict(output_dir=str(out_dir), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
                bf16=bf16, fp16=False, activation_checkpointing=False,
                logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
                dataloader_num_workers=workers, use_cpu=not torch.cuda.is_available(), seed=seed,
                max_length=max_len)


def load(folder, freeze: tuple[str, ...] = ()):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    for name in freeze:  # the modules the vlmtrain stage keeps frozen
        model.get_submodule(name).requires_grad_(False)
    return model, AutoProcessor.from_pretrained(folder)


def _sft_counts(inputs: dict) -> dict:
    ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs["attention_mask"]
    return {"samples": ids.shape[0], "supervised": int((labels[:, 1:] != -100).sum()),
            "tokens": int(mask.sum()), "slots": ids.numel(), "lengths": mask.sum(dim=1).tolist()}


def _dpo_counts(inputs: dict) -> dict:
    # Rows [0, b) are chosen and [b, 2b) rejected; TRL scores completion_mask tokens as next-token targets.
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    return {"samples": ids.shape[0] // 2, "supervised": int(inputs["completion_mask"][:, 1:].sum()),
            "tokens": int(mask.sum()), "slots": ids.numel(), "lengths": mask.sum(dim=1).tolist()}


def _metered(base, counts):
    class Metered(base):
        def training_step(self, model, inputs, num_items_in_batch=None):
            c = counts(inputs)
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.bench_steps.append({**c, "loss": float(loss)})
            return loss

    return Metered


def sft_trainer(folder, dataset, args: dict, *, load_fn=load, freeze: tuple[str, ...] = ("model.vision_tower",)):
    """SFT on connector + LM (vision frozen) with assistant-only loss (TRL's `{% generation %}` masks).
    `load_fn(folder, freeze)` → (model, processor); `freeze` names the vision tower's modules."""
    from trl import SFTConfig, SFTTrainer

    model, processor = load_fn(folder, freeze=freeze)
    trainer = _metered(SFTTrainer, _sft_counts)(model=model, args=SFTConfig(**args, assistant_only_loss=True),
                                                train_dataset=dataset, processing_class=processor)
    trainer.bench_steps = []
    return trainer


def dpo_trainer(folder, dataset, args: dict, beta: float, *, load_fn=load,
                freeze: tuple[str, ...] = ("model.vision_tower", "model.multi_modal_projector")):
    """DPO on the LM (vision + connector frozen), sigmoid loss, a frozen copy of the start model as reference."""
    from trl import DPOConfig, DPOTrainer

    model, processor = load_fn(folder, freeze=freeze)
    ref, _ = load_fn(folder)
    ref.eval().requires_grad_(False)
    trainer = _metered(DPOTrainer, _dpo_counts)(model=model, ref_model=ref,
                                                args=DPOConfig(**args, beta=beta, loss_type=["sigmoid"]),
                                                train_dataset=dataset, processing_class=processor)
    trainer.bench_steps = []
    return trainer


def run(trainer) -> list[dict]:
    """Train; per-step logs with `dt` from the end of one optimizer step to the end of the next."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.t, self.dts = None, []

        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.dts.append(now - self.t)
            self.t = now

    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    return [{**c, "dt": dt} for c, dt in zip(trainer.bench_steps, clock.dts)]


def collate(trainer, dataset, n: int) -> dict:
    """TRL's own collator on the first `n` rows: the batch TRL trains on for those records."""
    return trainer.data_collator([dataset[i] for i in range(n)])


def step_fn(trainer, batch: dict):
    """One TRL micro-step (its compute_loss, then backward) on `batch`: what the FLOP counter runs."""
    trainer.model.train()
    return lambda: trainer.compute_loss(trainer.model, dict(batch)).backward()
