"""Distribution strategies: the same sharding code runs on CPU (gloo, tests) and on GPUs (NCCL, production).

- `single`/`auto`: one device.
- `ddp`: Lightning's DDPStrategy (gloo on CPU, NCCL on GPU).
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) applied per transformer layer of the vision tower and the
  LLM, then the root, under Lightning's `ModelParallelStrategy` — Lightning's own `fsdp` strategy (FSDP1) refuses
  CPU, ModelParallelStrategy does not, so tests exercise the production code path. Checkpoints are gathered to one
  full file (`checkpoints/last.ckpt`, same layout as a single-process run), which reloads on any world size.

Topology comes from torchrun's environment (WORLD_SIZE, LOCAL_WORLD_SIZE); without torchrun, one process.
"""

from __future__ import annotations

import os

from torch import nn

from vlmtrain.errors import ConfigError

STRATEGIES = ("auto", "single", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
DEEPSPEED_PRESETS = {"deepspeed_zero2": "zero2.json", "deepspeed_zero3": "zero3.json"}


def topology() -> tuple[int, int, int]:
    """(world size, processes per node, nodes) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return world, local, max(1, world // max(local, 1))


def is_data_parallel(name: str) -> bool:
    return name in ("ddp", "fsdp") or name.startswith("deepspeed")


def deepspeed_config(stage) -> dict:
    """The stage's DeepSpeed JSON (trainer.deepspeed_config, else configs/deepspeed/<preset>) with the batch and
    clipping fields filled from the stage, so there is one source of truth for them."""
    import json
    from pathlib import Path

    tr = stage.trainer
    path = Path(tr.deepspeed_config) if tr.deepspeed_config else (
        Path(__file__).resolve().parents[3] / "configs" / "deepspeed" / DEEPSPEED_PRESETS[tr.strategy])
    if not path.is_file():
        raise ConfigError(f"trainer.deepspeed_config: {path} not found")
    cfg = json.loads(path.read_text())
    zero = cfg.get("zero_optimization", {}).get("stage")
    want = 3 if tr.strategy == "deepspeed_zero3" else 2
    if zero != want:
        raise ConfigError(f"trainer.deepspeed_config: {path} has ZeRO stage {zero}, strategy {tr.strategy} needs {want}")
    if tr.grad_accum != 1:
        raise ConfigError("trainer.grad_accum: DeepSpeed strategies accumulate inside the engine; use 1 "
                          "(and a larger data.batch_size) for now")
    cfg["train_micro_batch_size_per_gpu"] = stage.data.batch_size
    cfg["gradient_clipping"] = stage.optim.grad_clip or 0.0
    return cfg


def make_strategy(stage):
    """Lightning strategy object (or name) and the devices / nodes for the Trainer."""
    name = stage.trainer.strategy
    world, local, nodes = topology()
    if name in ("auto", "single"):
        if world > 1:
            raise ConfigError(f"trainer.strategy: {name!r} under a {world}-process launch; use ddp or fsdp")
        return "auto", 1, 1
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # A trainable vision tower leaves CLIP's post_layernorm (and the last layer with feature_layer=-2) unused.
        return DDPStrategy(find_unused_parameters=stage.train.vision), local, nodes
    if name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False), local, nodes
    if name in DEEPSPEED_PRESETS:
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

        class _DeepSpeed(DeepSpeedStrategy):
            """Lightning's DeepSpeed strategy minus its CUDA-only check: DeepSpeed itself runs ZeRO on the CPU
            accelerator (gloo), so tests run the production engine."""

            def setup_environment(self) -> None:
                DDPStrategy.setup_environment(self)

            def setup_distributed(self) -> None:
                # the parent validates CUDA device indices; CPU devices have none
                from lightning.fabric.utilities.seed import reset_seed

                reset_seed()
                self.set_world_ranks()
                self._init_deepspeed_distributed()

            def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
                # as the parent, but with the local rank as device_rank: a CPU device has no index, and DeepSpeed
                # reads a missing one as "not distributed" (world size 1)
                import argparse

                import deepspeed

                engine, opt, _, _ = deepspeed.initialize(
                    args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
                    model_parameters=filter(lambda p: p.requires_grad, model.parameters()), optimizer=optimizer,
                    lr_scheduler=lr_scheduler, dist_init_required=False)
                return engine, opt

        return _DeepSpeed(config=deepspeed_config(stage), exclude_frozen_parameters=True), local, nodes
    raise ConfigError(f"trainer.strategy: unknown {name!r} (choose from: {', '.join(STRATEGIES)})")


def layer_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The repeated transformer blocks (`...layers` / `...layer` ModuleLists) of the vision tower and the LLM."""
    out = []
    for part in (model.vision, model.llm):
        for name, mod in part.named_modules():
            if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "layer") and len(mod):
                out.append(mod)
    return out


def apply_fsdp2(model: nn.Module, mesh, reshard_after_forward: bool = True, cpu_offload: bool = False,
                param_dtype=None) -> int:
    """fully_shard each transformer block, then the root; returns the number of sharded units."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype)
    units = 0
    for layers in layer_lists(model):
        for block in layers:
            fully_shard(block, **kw)
            units += 1
    fully_shard(model, **kw)
    return units + 1


def init_distributed() -> None:
    """Join the process group early when launched by torchrun, so run-directory checks and dataset preparation can
    happen on rank 0 first. Lightning reuses an existing group."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def rank_zero_first(fn, *args, others: bool = True, **kwargs):
    """Run `fn` on rank 0, then (if `others`) on the other ranks; an error on rank 0 is raised on every rank, so
    all processes exit with the same one-line message instead of hanging."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn(*args, **kwargs)
    from vlmtrain.errors import VlmtrainError

    box = [None]
    result = None
    if dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except VlmtrainError as e:
            box = [(type(e).__name__, getattr(e, "problems", None), str(e))]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        name, problems, msg = box[0]
        raise ConfigError(problems) if name == "ConfigError" else VlmtrainError(msg)
    if dist.get_rank() != 0 and others:
        result = fn(*args, **kwargs)
    return result
