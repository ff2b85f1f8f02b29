"""SIGKILL a `vlmtrain fit` mid-epoch, resume it, and compare with an uninterrupted run (shared by the composed and
native tests): bit-identical output weights and the same samples at every step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import torch

from conftest import VLMTRAIN


def kill_then_resume_matches(tmp_path, cfg, steps: int, kill_after: int, timeout: int = 900) -> None:
    from safetensors.torch import load_file

    from vlmtrain.train.checkpoint_io import read_checkpoint, resolve_last

    data = ["--data-root", str(tmp_path / "data")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run([*VLMTRAIN, "fit", "--config", str(cfg), "--out", str(tmp_path / "ref"), *data],
                         capture_output=True, text=True, timeout=timeout, env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = subprocess.Popen([*VLMTRAIN, "fit", "--config", str(cfg), "--out", str(tmp_path / "killed"), *data],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ids = tmp_path / "killed" / "sample_ids.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:  # kill once a few checkpoints exist, well before the end
        if ids.is_file() and len(ids.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "summary.json").exists()
    # the checkpoint a resume will take: a kill can land between the renames that rotate a new one in (last.ckpt
    # is then absent and last.ckpt.prev holds the previous one), which resolve_last recovers
    last = resolve_last(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    assert last is not None
    ck = read_checkpoint(last)
    assert 0 < ck["global_step"] < steps
    res = subprocess.run([*VLMTRAIN, "fit", "--config", str(cfg), "--out", str(tmp_path / "killed"), "--resume",
                          *data], capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    a = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    seq = lambda p: [json.loads(ln) for ln in (p / "sample_ids.jsonl").read_text().splitlines()]  # noqa: E731
    assert seq(tmp_path / "ref") == seq(tmp_path / "killed")  # same samples at every step: no repeat, no skip
    assert [r["step"] for r in seq(tmp_path / "killed")] == list(range(1, steps + 1))
