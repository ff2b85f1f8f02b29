"""Multi-process training on CPU (gloo), launched with torchrun as a subprocess — the commands of
docs/distributed.md. Reference: a single process with the same global batch; data.split=stride makes the global
sample order independent of world size, and the loss is normalised by the global supervised-token count, so the
per-step losses and final weights must agree (≤1e-5)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, TINY
from shard_fixtures import chat_record, cycled_shards, png_bytes, write_shards
from warm_torchrun import WARM

pytestmark = pytest.mark.slow
STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, *args, timeout: int = 300, env=None, real: bool = False, cwd=None):
    """`torchrun --nproc_per_node=n -m vlmtrain ARGS`. By default its agent runs in a process forked from one that
    imported the training stack once (tests/warm_torchrun.py: same agent, rendezvous and rank variables, ~1/5 of
    the CPU); `real=True` runs the `torchrun` command itself, for claims about the launcher or the process
    boundary."""
    if not real:
        return WARM.run(n, args, timeout=timeout, env=env, cwd=cwd)
    for attempt in range(3):  # a freshly freed port can be grabbed by another process before torchrun binds it
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
               f"--master_port={free_port()}", "-m", "vlmtrain", *map(str, args)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        if r.returncode == 0 or "address already in use" not in r.stderr.lower():
            return r
    return r


def plain(*args, timeout: int = 300, cwd=None):
    """`python -m vlmtrain ARGS`, one process without a process group (forked from the same warm server)."""
    return WARM.run(0, args, timeout=timeout, cwd=cwd)


def stage_yaml(tmp, data_path, **over) -> str:
    cfg = {"name": "sft", "preset": "sft", "model": str(TINY),
           "data": {"train": [{"path": str(data_path)}], "batch_size": 4, "num_workers": 1, "max_len": 128,
                    "split": "stride", "shuffle_buffer": 8},
           "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
           "trainer": {"max_steps": STEPS, "save_every_n_steps": 2, "log_every_n_steps": 1}}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path = tmp / f"stage-{abs(hash(json.dumps(over, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def losses(run) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def weights(run) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "model" / "model.safetensors")


def assert_same_run(a, b, tol=1e-5):
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == STEPS
    assert max(abs(x - y) for x, y in zip(la, lb)) <= tol, (la, lb)
    wa, wb = weights(a), weights(b)
    # equal values count 0 apart, equal infinities too (Gemma 4's clipping bounds are ±inf buffers: inf - inf = nan)
    assert max(float(torch.where(wa[k] == wb[k], 0.0, (wa[k] - wb[k]).abs()).max()) for k in wa) <= tol


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    cycled_shards(root / "shards", 48, per_shard=8)
    return root


@pytest.fixture(scope="module")
def reference(data):
    r = plain("fit", "--config", stage_yaml(data, data / "shards"), "--out", str(data / "ref"))
    assert r.returncode == 0, r.stderr[-3000:]
    return data / "ref"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(data, reference, strategy):
    out = data / f"two-{strategy}"
    r = torchrun(2, "fit", "--config", stage_yaml(data, data / "shards"), "--out", str(out), "--strategy", strategy,
                 "data.batch_size=2")
    assert r.returncode == 0, r.stderr[-4000:]
    assert_same_run(reference, out)
    for f in ("summary.json", "stage.json", "checkpoints/last.ckpt", "metrics.jsonl"):
        assert (out / f).exists()  # last.ckpt: a file (ddp), a sharded DCP directory (fsdp)
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == STEPS and s["samples"] == STEPS * 4  # global samples, all ranks


def test_ddp_with_compiled_layers_equals_one_process(data, reference):
    out = data / "ddp-compiled"
    r = torchrun(2, "fit", "--config", stage_yaml(data, data / "shards"), "--out", str(out), "--strategy", "ddp",
                 "data.batch_size=2", "trainer.compile=true", timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert_same_run(reference, out, tol=1e-4)  # fused kernels reorder float sums


def test_hybrid_sharding_equals_one_process(data, reference):
    """HSDP: a (replicate 2, shard 1) mesh on 2 ranks — the sharding and the cross-group all-reduce both run."""
    out = data / "hsdp"
    r = torchrun(2, "fit", "--config", stage_yaml(data, data / "shards"), "--out", str(out), "--strategy", "fsdp",
                 "data.batch_size=2", "trainer.fsdp_shard_size=1")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "FSDP2 hybrid sharding: 2 replica groups × 1 shards" in r.stderr + r.stdout
    assert_same_run(reference, out)


@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_zero_equals_one_process(data, reference, zero):
    extra = []
    if zero == 3:  # partition every parameter (DeepSpeed keeps small ones whole by default) to test the gather
        cfg = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (data / "z3.json").write_text(json.dumps(cfg))
        extra = [f"trainer.deepspeed_config={data / 'z3.json'}"]
    # ZeRO-3 also accumulates: 2 ranks × 1 sample × 2 micro-batches = the reference's global batch of 4
    batch = ["data.batch_size=2"] if zero == 2 else ["data.batch_size=1", "trainer.grad_accum=2"]
    out = data / f"zero{zero}"
    r = torchrun(2, "fit", "--config", stage_yaml(data, data / "shards"), "--out", str(out), "--strategy",
                 f"deepspeed_zero{zero}", *batch, *extra, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "deepspeed_shm_comm" not in r.stdout + r.stderr  # the CPU inference-only op is not compiled (strategy.py)
    assert_same_run(reference, out)


def corrupt_checkpoint_directory(ckpt, pattern: str):
    """Check a checkpoint directory's manifest against the bytes (hashlib), then flip a bit in one of its files
    (`pattern`): the run after it must resume from `last.ckpt.prev`. Returns that file."""
    import hashlib

    from vlmtrain.train.checkpoint_io import MANIFEST, check_intact

    listed = dict(reversed(ln.split("  ")) for ln in (ckpt / MANIFEST).read_text().splitlines())
    assert set(listed) == {str(f.relative_to(ckpt)) for f in ckpt.rglob("*") if f.is_file() and f.name != MANIFEST}
    assert all(hashlib.sha256((ckpt / rel).read_bytes()).hexdigest() == d for rel, d in listed.items())
    assert (ckpt.parent / "last.ckpt.prev" / MANIFEST).is_file()
    victim = next(ckpt.glob(pattern))
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert check_intact(ckpt) == f"{victim}: sha256 differs from {ckpt / MANIFEST} (truncated or corrupted)"
    return victim


def first_leg(data, strategy: str, out):
    """The first leg of a 2-1-2 resume: 2 ranks, `strategy`, 2 of the reference's 6 steps, into `out`."""
    r = torchrun(2, "fit", "--config", stage_yaml(data, data / "shards"), "--out", str(out), "--strategy", strategy,
                 "data.batch_size=2", "trainer.max_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def fsdp_first_leg(data):
    """Both sharded variants start with the same fsdp leg: run once, each test resumes its own copy."""
    return first_leg(data, "fsdp", data / "elastic-first-leg-fsdp")


# (strategy at 2 ranks, at 1 process, back at 2 ranks): fsdp writes sharded DCP checkpoints (resharded on load),
# single/ddp a single file; each leg reads what the previous one wrote
@pytest.mark.parametrize("legs", [("fsdp", "fsdp", "fsdp"), ("fsdp", "single", "fsdp"), ("ddp", "single", "ddp")],
                         ids=["sharded", "sharded-file-sharded", "file"])
def test_resume_across_world_sizes_2_1_2(data, reference, legs, request):
    out = data / ("elastic-" + "-".join(legs))
    cfg = stage_yaml(data, data / "shards")
    if legs[0] == "fsdp":
        shutil.copytree(request.getfixturevalue("fsdp_first_leg"), out)
    else:
        first_leg(data, legs[0], out)
    assert (out / "checkpoints" / "last.ckpt").is_dir() == (legs[0] == "fsdp")
    if legs[0] == "fsdp":  # one shard file per rank
        assert len(list((out / "checkpoints" / "last.ckpt").glob("*.distcp"))) == 2
    middle = ["fit", "--config", cfg, "--out", str(out), "--resume", "--strategy", legs[1], "trainer.max_steps=4"]
    r = (torchrun(1, *middle) if legs[1] == "fsdp" else
         plain(*middle))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_dir() == (legs[1] == "fsdp")
    if legs[1] == "fsdp":  # its last two checkpoints are both of step 4: the 2-rank leg resumes from the kept one
        corrupt_checkpoint_directory(out / "checkpoints" / "last.ckpt", "*.distcp")
    r = torchrun(2, "fit", "--config", cfg, "--out", str(out), "--resume", "--strategy", legs[2], "data.batch_size=2")
    assert r.returncode == 0, r.stderr[-3000:]
    if legs[1] == "fsdp":
        assert f"resuming from {out / 'checkpoints' / 'last.ckpt.prev'} instead" in r.stderr, r.stderr[-3000:]
    assert_same_run(reference, out)


def test_deepspeed_resumes_on_the_same_world_size_and_refuses_another(data, reference):
    out = data / "zero3-resume"
    cfg = stage_yaml(data, data / "shards")
    r = torchrun(2, "fit", "--config", cfg, "--out", str(out), "--strategy", "deepspeed_zero3", "data.batch_size=2",
                 "trainer.max_steps=2", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt" / "latest").is_file()  # DeepSpeed's per-rank layout
    r = torchrun(1, "fit", "--config", cfg, "--out", str(out), "--resume", "--strategy", "deepspeed_zero3",
                 timeout=600)
    assert r.returncode == 1 and "DeepSpeed checkpoint written by 2 ranks, this run has 1" in r.stderr
    # the first run's last two checkpoints are both of step 2: with one shard corrupted, resume uses the kept one
    corrupt_checkpoint_directory(out / "checkpoints" / "last.ckpt", "*/*optim_states.pt")
    r = torchrun(2, "fit", "--config", cfg, "--out", str(out), "--resume", "--strategy", "deepspeed_zero3",
                 "data.batch_size=2", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'last.ckpt.prev'} instead" in r.stderr, r.stderr[-3000:]
    assert_same_run(reference, out)


def test_text_only_rank_and_image_rank_do_not_hang(tmp_path):
    # stride split, no shuffle: each global batch of 4 is [text, text, image, image] → rank 0 never sees an image
    samples = []
    for i in range(16):
        k = 0 if i % 4 < 2 else 1
        samples.append((chat_record(i, k), [png_bytes(i)] * k))
    write_shards(tmp_path / "shards", samples, per_shard=16)
    for strategy in ("ddp", "fsdp", "deepspeed_zero3"):
        cfg = stage_yaml(tmp_path, tmp_path / "shards", data={"shuffle_buffer": 1, "num_workers": 0},
                         trainer={"max_steps": 3})
        r = torchrun(2, "fit", "--config", cfg, "--out", str(tmp_path / strategy), "--strategy", strategy,
                     "data.batch_size=2", timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads((tmp_path / strategy / "summary.json").read_text())["steps"] == 3


def test_two_nodes_on_loopback(data, reference):
    port = free_port()
    cfg = stage_yaml(data, data / "shards")
    out = data / "two-nodes"
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=vlmtrain-test",
                               "-m", "vlmtrain", "fit", "--config", cfg, "--out", str(out), "--strategy", "ddp",
                               "data.batch_size=2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert_same_run(reference, out)


def test_recipe_under_torchrun_with_fsdp_writes_the_same_layout(tmp_path):
    """The contract: `torchrun --nproc_per_node=2 -m vlmtrain run RECIPE --out DIR --strategy S --max-steps N`."""
    from conftest import CONFIGS

    out = tmp_path / "demo"
    r = torchrun(2, "run", str(CONFIGS / "recipes" / "demo.yaml"), "--out", str(out), "--strategy", "fsdp",
                 "--max-steps", "2", "eval.max_samples=16", "data.batch_size=8", timeout=600, real=True)
    assert r.returncode == 0, r.stderr[-4000:]
    for stage in ("align", "sft", "dpo"):
        for f in ("summary.json", "metrics.jsonl", "stage.json", "checkpoints/last.ckpt", "model/model.safetensors"):
            assert (out / stage / f).exists(), f"{stage}/{f}"
        s = json.loads((out / stage / "summary.json").read_text())
        assert s["steps"] == 2 and "eval" in s
    st = {n: json.loads((out / n / "stage.json").read_text())["weights_sha256"] for n in ("align", "sft")}
    assert st["sft"]["start"]["connector"] == st["align"]["end"]["connector"]  # handoff survives FSDP gathering


def test_preemption_of_one_rank_stops_both_at_the_same_step_and_resumes(data, reference):
    """SIGTERM reaches rank 1 only (after its step 2): both ranks agree at that step boundary, write one checkpoint
    at step 2 and exit 75; the resumed 2-rank run equals the uninterrupted one."""
    out = data / "preempted"
    cfg = stage_yaml(data, data / "shards")
    env = {**os.environ, "VLMTRAIN_KILL_AT": "step#2", "VLMTRAIN_KILL_SIGNAL": "TERM", "VLMTRAIN_KILL_RANK": "1"}
    r = torchrun(2, "fit", "--config", cfg, "--out", str(out), "--strategy", "ddp", "data.batch_size=2", env=env,
                 real=True)
    assert r.returncode != 0 and "exitcode  : 75" in r.stderr, r.stderr[-3000:]
    assert "SIGTERM received: checkpoint written at step 2" in r.stderr  # rank 1, signalled
    assert "a preemption signal on another rank received: checkpoint written at step 2" in r.stderr  # rank 0
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not (out / "summary.json").exists()
    r = torchrun(2, "fit", "--config", cfg, "--out", str(out), "--resume", "--strategy", "ddp", "data.batch_size=2",
                 real=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(reference, out)  # the global batch of the 1-process reference: 2 ranks × 2
