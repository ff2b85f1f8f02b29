"""Distribution strategies: the same sharding code runs on CPU (gloo, tests) and on GPUs (NCCL, production).

- `single`/`auto`: one device.
- `ddp`: Lightning's DDPStrategy (gloo on CPU, NCCL on GPU).
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) applied per transformer layer of the vision tower and the
  LLM, then the root, under Lightning's `ModelParallelStrategy` — Lightning's own `fsdp` strategy (FSDP1) refuses
  CPU, ModelParallelStrategy does not, so tests exercise the production code path. Checkpoints are sharded: each
  rank writes its own shards of a `torch.distributed.checkpoint` directory (`checkpoints/last.ckpt/`), which DCP
  reshards on load, so a run resumes on any world size (and `single`/`ddp` read it too: train.checkpoint_io).

Topology comes from torchrun's environment (WORLD_SIZE, LOCAL_WORLD_SIZE); without torchrun, one process.
"""

from __future__ import annotations

import json
import logging
import os
from functools import reduce
from pathlib import Path

from torch import nn

from vlmtrain.errors import ConfigError, VlmtrainError

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
    cfg["train_micro_batch_size_per_gpu"] = stage.data.batch_size
    cfg["gradient_clipping"] = stage.optim.grad_clip or 0.0
    return cfg


def make_strategy(stage, native: bool = False):
    """Lightning strategy object (or name) and the devices / nodes for the Trainer. `native`: a native
    transformers VLM, whose text-only batches skip the tower and connector (no dummy image is run through them)."""
    name = stage.trainer.strategy
    world, local, nodes = topology()
    if name in ("auto", "single"):
        if world > 1:
            raise ConfigError(f"trainer.strategy: {name!r} under a {world}-process launch; use ddp or fsdp")
        return "auto", 1, 1
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # A trainable vision tower leaves CLIP's post_layernorm (and the last layer with feature_layer=-2) unused.
        # A native family's text-only batch on one rank leaves its connector unused there; DDP then marks those
        # gradients ready (zero) instead of waiting for them.
        return DDPStrategy(find_unused_parameters=bool(stage.train.vision) or native), local, nodes
    if name == "fsdp":
        return _fsdp2_strategy(world), local, nodes
    if name in DEEPSPEED_PRESETS:
        return _deepspeed_strategy(stage), local, nodes
    raise ConfigError(f"trainer.strategy: unknown {name!r} (choose from: {', '.join(STRATEGIES)})")


def _deepspeed_strategy(stage):
    """Lightning's DeepSpeed strategy for a `deepspeed_*` preset, made to run on CPU too and to checkpoint
    atomically; its checkpoints resume on the same world size only (explained where it refuses)."""
    cpu_deepspeed_accelerator()
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
            skip_cpu_inference_comm_op()
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

        def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
            # DeepSpeed writes into the directory in place; write beside it and swap (as the fsdp strategy)
            _save_then_swap(self, lambda tmp: super(_DeepSpeed, self).save_checkpoint(checkpoint, tmp,
                                                                                     storage_options), filepath)

        def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
            path = Path(self.broadcast(str(checkpoint_path)))
            if not path.is_dir() or not (path / "latest").is_file():
                raise VlmtrainError(f"{path}: not a DeepSpeed checkpoint; the deepspeed strategies resume their "
                                    "own checkpoints (on any world size), not those of single/ddp/fsdp runs")
            from vlmtrain.train.checkpoint_io import verify_checkpoint

            verify_checkpoint(path)
            saved = deepspeed_world_size(path)
            if saved != self.world_size:
                # DeepSpeed's own re-partitioning (universal checkpoints) is not exact for vlmtrain: under ZeRO-3
                # it overwrites every param group's hyperparameters with group 0's (per-module LR, no-decay
                # groups), and under ZeRO-1/2 it needs Megatron's universal_checkpoint_info. Refuse, not drift.
                raise VlmtrainError(
                    f"{path}: DeepSpeed checkpoint written by {saved} ranks, this run has {self.world_size}; "
                    "DeepSpeed checkpoints resume on the same world size only (fsdp, ddp and single resume on "
                    "any world size)")
            return super().load_checkpoint(path, weights_only)

    return _DeepSpeed(config=deepspeed_config(stage), exclude_frozen_parameters=True)


def cpu_deepspeed_accelerator() -> None:
    """Without a GPU, tell DeepSpeed to use its CPU accelerator before it is imported (its auto-detection finds
    none and warns on every rank)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU shared-memory all-reduce (ops/op_builder/cpu/comm.py)


def skip_cpu_inference_comm_op() -> None:
    """On DeepSpeed's CPU accelerator, do not JIT-compile its shared-memory all-reduce op when the communication
    backend starts (deepspeed.comm.torch.TorchBackend builds it unconditionally).

    The op serves only `inference_all_reduce` (DeepSpeed-Inference's tensor-parallel all-reduce); ZeRO training
    uses torch.distributed collectives (gloo) and never calls it. Compiling it is ~1 min of C++ on a 2-core machine
    at the first DeepSpeed run of every virtual environment, and again whenever another environment rebuilt it
    last (~/.cache/torch_extensions is shared, and the build is keyed to the environment's include paths).
    `deepspeed.ops.__compatible_ops__` is DeepSpeed's own per-process table of buildable ops (deepspeed/ops/
    __init__.py: edits persist); marking the op not buildable makes TorchBackend go on without it, as it does
    where it cannot build.
    GPU accelerators never build this op, so nothing changes there."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def _fsdp2_strategy(world: int):
    from lightning.pytorch.strategies import ModelParallelStrategy

    class _ShardedFSDP2(ModelParallelStrategy):
        """ModelParallelStrategy (FSDP2) writing sharded DCP checkpoints, swapped in only once every rank has
        finished writing (a kill mid-save leaves the previous checkpoint), and loading them — or a single-file
        checkpoint from a `single`/`ddp` run — with vlmtrain's trainable-only state dict."""

        def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
            # DCP: every rank writes its shards into last.ckpt.tmp/, swapped in once all have finished
            _save_then_swap(self, lambda tmp: super(_ShardedFSDP2, self).save_checkpoint(checkpoint, tmp,
                                                                                        storage_options), filepath)

        def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
            import torch
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 set_model_state_dict)

            from vlmtrain.train.checkpoint_io import (META, is_sharded, load_full_optimizer, load_sharded_optimizer,
                                                      read_checkpoint, verify_checkpoint)

            path = Path(self.broadcast(str(checkpoint_path)))
            if is_sharded(path):
                verify_checkpoint(path)
                ckpt = torch.load(path / META, map_location="cpu", weights_only=False)
                keys = set(ckpt["vlmtrain"]["trainable_keys"])  # the checkpoint holds trainable tensors only
                model_sd = {k: v for k, v in get_model_state_dict(self.model).items() if k in keys}
                dcp.load({"state_dict": model_sd}, checkpoint_id=str(path))  # reads this rank's slices
                set_model_state_dict(self.model, model_sd, options=StateDictOptions(strict=False))
                for i, opt in enumerate(self.optimizers):
                    load_sharded_optimizer(self.model, opt, i, path)
                ckpt["state_dict"] = model_sd
                return ckpt
            # a single-file checkpoint (from a single-process or ddp run): full tensors, index-keyed optimizer
            ckpt = read_checkpoint(path)
            full = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.model, ckpt["state_dict"], options=full)
            for opt, state in zip(self.optimizers, ckpt["optimizer_states"]):
                load_full_optimizer(self.model, opt, state)
            return ckpt

    return _ShardedFSDP2(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=True)


def _save_then_swap(strategy, write, filepath) -> None:
    """Every rank writes its part of a checkpoint directory to `<path>.tmp` via `write(tmp)`; rank 0 writes the
    manifest and swaps it in only after all ranks finished, so a kill mid-save leaves the previous checkpoint whole;
    the one before stays as `<path>.prev` (the fallback when `<path>` fails its manifest)."""
    from vlmtrain.train.checkpoint_io import remove_path, rotate_directory_in

    path = Path(strategy.broadcast(str(filepath)))
    tmp = path.with_name(path.name + ".tmp")
    if strategy.global_rank == 0 and tmp.exists():
        remove_path(tmp)
    strategy.barrier("vlmtrain_ckpt_clean")
    write(tmp)
    strategy.barrier("vlmtrain_ckpt_written")
    if strategy.global_rank == 0:
        rotate_directory_in(tmp, path)
    strategy.barrier("vlmtrain_ckpt_swapped")


def deepspeed_world_size(path) -> int:
    """Data-parallel world size a DeepSpeed checkpoint directory was written at (one optimizer shard per rank)."""
    tag = (path / "latest").read_text().strip()
    return len(list((path / tag).glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt")))


def layer_lists(model: nn.Module, parts: tuple[str, ...] = ("vision", "llm")) -> list[nn.ModuleList]:
    """The repeated transformer blocks (`...layers` / `...layer` ModuleLists) of the given parts of the VLM; for a
    native family, the lists its map names (`Family.blocks`, e.g. Qwen's vision `model.blocks`)."""
    family = getattr(model, "family", None)
    if family is not None and family.blocks:
        return [reduce(getattr, family.blocks[part].split("."), getattr(model, part))
                for part in parts if part in family.blocks]
    out = []
    for part in (getattr(model, name) for name in parts):
        for name, mod in part.named_modules():
            if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "layer") and len(mod):
                out.append(mod)
    return out


def fsdp_mesh(data_parallel, shard_size: int | None):
    """The mesh FSDP2 shards over: all data-parallel ranks (1D), or for hybrid sharding a 2D (replicate, shard)
    mesh — fully_shard then shards within each group of `shard_size` ranks and all-reduces across groups."""
    world = data_parallel.size()
    if not shard_size or shard_size == world:
        return data_parallel
    if world % shard_size:
        raise VlmtrainError(f"trainer.fsdp_shard_size: {shard_size} does not divide the world size {world}")

    from torch.distributed.device_mesh import init_device_mesh

    logging.getLogger("vlmtrain.train").info(f"FSDP2 hybrid sharding: {world // shard_size} replica groups × "
                                       f"{shard_size} shards")
    return init_device_mesh(data_parallel.device_type, (world // shard_size, shard_size),
                            mesh_dim_names=("replicate", "shard"))


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
