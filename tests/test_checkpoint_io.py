"""train.checkpoint_io: the sharded (DCP) checkpoint read back as torch's own single-file layout or loaded under
FSDP2, and the swap that replaces a checkpoint (file or directory) without ever leaving none. The multi-process
2 → 1 → 2 resumes are in tests/test_distributed.py and tests/test_native_strategies.py."""

import errno
import os

import pytest
import torch
from torch import nn

from vlmtrain.train.checkpoint_io import (META, is_sharded, load_full_optimizer, load_sharded_optimizer,
                                          optimizer_state_by_index, optimizer_state_by_name, read_checkpoint,
                                          resolve_last, rotate_directory_in, rotate_in)


def trained_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].weight.requires_grad_(False)  # a frozen tensor: in the model, not in the optimizer
    opt = torch.optim.AdamW([{"params": [model[2].weight], "weight_decay": 0.1},
                             {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}], lr=1e-2)
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def write_dcp(model, opt, path):
    """What the fsdp strategy writes: DCP tensors {state_dict, optimizer_0} (optimizer keyed by parameter name),
    plus meta.pt with the rest."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"state_dict": get_model_state_dict(model), "optimizer_0": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(path), no_dist=True)
    torch.save({"global_step": 2, "vlmtrain": {"data_cursor": None}}, path / META)


def test_sharded_checkpoint_reads_as_torchs_own_state_dicts(tmp_path):
    model, opt = trained_model()
    write_dcp(model, opt, tmp_path / "last.ckpt")
    assert is_sharded(tmp_path / "last.ckpt")
    ck = read_checkpoint(tmp_path / "last.ckpt")
    assert ck["global_step"] == 2 and ck["vlmtrain"] == {"data_cursor": None}
    for k, v in model.state_dict().items():
        assert torch.equal(ck["state_dict"][k], v)
    # the index-keyed optimizer state loads into a fresh optimizer exactly as torch's own state_dict() would
    want = opt.state_dict()
    got = ck["optimizer_states"][0]
    assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in want["param_groups"]] == [[0], [1, 2]]
    assert sorted(got["state"]) == sorted(want["state"])
    for i, s in want["state"].items():
        for name, t in s.items():
            assert torch.equal(got["state"][i][name], t), (i, name)
    fresh_model, fresh_opt = trained_model()
    fresh_opt.load_state_dict(got)
    assert fresh_opt.param_groups[0]["weight_decay"] == 0.1


def test_optimizer_state_by_index_numbers_parameters_in_group_order():
    state = {"state": {"b": {"step": 1}, "c": {"step": 2}},
             "param_groups": [{"lr": 1, "params": ["c"]}, {"lr": 2, "params": ["a", "b"]}]}
    out = optimizer_state_by_index(state)
    assert out == {"state": {2: {"step": 1}, 0: {"step": 2}},
                   "param_groups": [{"lr": 1, "params": [0]}, {"lr": 2, "params": [1, 2]}]}


@pytest.mark.parametrize("written_by", ["fsdp", "single"])
def test_optimizer_load_under_fsdp2_gives_a_parameter_without_state_none(tmp_path, world_of_one, written_by):
    """A trainable parameter that had no gradient before a save (LLaVA's unused top tower layer when the tower
    trains) has no optimizer state in the checkpoint — a DCP directory (fsdp) or torch's index-keyed state (single,
    ddp). Loading it into an FSDP2 model gives the other parameters their saved state (compared with torch's own
    tensors) and this one none, as in the run that wrote it; before, torch refused either load (DCP: `Missing key in
    checkpoint state_dict: optimizer_0.state.unused.weight.step`; the full state: `Missing optimizer state`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    class OneUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    def build(sharded: bool = True):
        torch.manual_seed(0)
        model = OneUnused()
        if sharded:
            fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, opt = build(sharded=written_by == "fsdp")
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    resumed, resumed_opt = build()
    if written_by == "fsdp":
        dcp.save({"optimizer_0": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path / "ck"))
        load_sharded_optimizer(resumed, resumed_opt, 0, tmp_path / "ck")
    else:
        load_full_optimizer(resumed, resumed_opt, opt.state_dict())

    def by_name(m, o):
        return {n: o.state[p] for n, p in m.named_parameters() if p in o.state}

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    want, got = by_name(model, opt), by_name(resumed, resumed_opt)
    assert sorted(got) == sorted(want) == ["used.bias", "used.weight"]
    for name, state in want.items():
        for field in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(full(got[name][field]), full(state[field]), rtol=0, atol=0)
        assert float(got[name]["step"]) == float(state["step"]) == 1


def test_rotation_replaces_files_and_directories_keeps_the_previous_and_resolve_finds_the_survivor(tmp_path):
    last, prev, tmp = tmp_path / "last.ckpt", tmp_path / "last.ckpt.prev", tmp_path / "last.ckpt.tmp"
    assert resolve_last(last) is None
    tmp.write_text("one")
    rotate_in(tmp, last)
    assert last.read_text() == "one" and not tmp.exists() and not prev.exists()
    tmp.mkdir()  # a sharded checkpoint replaces a single file (a run resumed under fsdp)
    (tmp / "x.distcp").write_text("two")
    rotate_directory_in(tmp, last)
    assert (last / "x.distcp").read_text() == "two" and prev.read_text() == "one" and not tmp.exists()
    tmp.mkdir()  # a directory replaces a directory
    (tmp / "x.distcp").write_text("three")
    rotate_directory_in(tmp, last)
    assert (last / "x.distcp").read_text() == "three" and (prev / "x.distcp").read_text() == "two"
    tmp.write_text("four")  # and back to a file: the previous directory becomes .prev
    rotate_in(tmp, last)
    assert last.read_text() == "four" and (prev / "x.distcp").read_text() == "three"
    tmp.write_text("five")
    rotate_in(tmp, last)
    assert last.read_text() == "five" and prev.read_text() == "four"
    # a kill between the renames leaves only .prev: resume uses it; (.old: what older versions' swap left)
    last.unlink()
    assert resolve_last(last) == prev
    prev.rename(tmp_path / "last.ckpt.old")
    assert resolve_last(last) == tmp_path / "last.ckpt.old"


def test_a_directory_checkpoint_is_verified_against_its_manifest_and_the_previous_one_is_used(tmp_path):
    """Every file of a sharded checkpoint is listed with its sha256 (`sha256sum -c` format, computed here with
    hashlib); a changed, truncated or missing shard is named, and resume falls back to `.prev`."""
    import hashlib

    from vlmtrain.errors import VlmtrainError
    from vlmtrain.train.checkpoint_io import MANIFEST, check_intact

    model, opt = trained_model()
    last, prev, tmp = tmp_path / "last.ckpt", tmp_path / "last.ckpt.prev", tmp_path / "last.ckpt.tmp"
    for _ in range(2):
        write_dcp(model, opt, tmp)
        rotate_directory_in(tmp, last)
    listed = dict(reversed(ln.split("  ")) for ln in (last / MANIFEST).read_text().splitlines())
    on_disk = {str(f.relative_to(last)) for f in last.rglob("*") if f.name != MANIFEST}
    assert set(listed) == on_disk and {".metadata", META} <= on_disk
    for rel, digest in listed.items():
        assert digest == hashlib.sha256((last / rel).read_bytes()).hexdigest()
    assert check_intact(last) is None and resolve_last(last) == last
    shard = next(last.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit
    assert check_intact(last) == f"{shard}: sha256 differs from {last / MANIFEST} (truncated or corrupted)"
    with pytest.raises(VlmtrainError, match=f"{shard}: sha256 differs"):
        read_checkpoint(last)
    assert resolve_last(last) == prev
    assert read_checkpoint(prev)["global_step"] == 2
    shard.unlink()
    assert check_intact(last) == f"{shard}: missing (listed in {last / MANIFEST})"
    (prev / META).write_bytes((prev / META).read_bytes()[:10])  # half-copied
    with pytest.raises(VlmtrainError) as e:
        resolve_last(last)
    assert f"{shard}: missing" in str(e.value) and f"{prev / META}: sha256 differs" in str(e.value)


def test_by_name_and_by_index_are_inverse_on_torchs_own_state_dict():
    model, opt = trained_model()
    want = opt.state_dict()
    by_name = optimizer_state_by_name(want, opt, model)
    assert [g["params"] for g in by_name["param_groups"]] == [["2.weight"], ["0.bias", "2.bias"]]
    back = optimizer_state_by_index(by_name)
    assert back["param_groups"] == want["param_groups"] and back["state"].keys() == want["state"].keys()


def _write(io, path, value: float) -> None:
    io.save_checkpoint({"state_dict": {"w": torch.full((64,), value)}, "global_step": int(value)}, path)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_a_failed_checkpoint_write_keeps_the_previous_one_and_says_so_once(tmp_path, monkeypatch, err):
    from vlmtrain.train.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError

    io, last = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    _write(io, last, 1.0)
    before = last.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **kw):  # half a checkpoint reaches the disk, then the device gives up
        f.write(b"PK\x03\x04 partial")
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointWriteError) as e:
        _write(io, last, 2.0)
    monkeypatch.setattr(torch, "save", real_save)
    assert str(e.value) == f"{last}: writing the checkpoint failed ({os.strerror(err)}); the previous checkpoint " \
                           f"{last} is intact"
    assert last.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "last.ckpt", "last.ckpt.sha256"]
    assert torch.load(resolve_last(last), weights_only=False)["global_step"] == 1


def test_checksums_catch_a_truncated_or_corrupted_checkpoint_and_the_previous_one_is_used(tmp_path):
    import hashlib

    from vlmtrain.errors import VlmtrainError
    from vlmtrain.train.checkpoint_io import AtomicCheckpointIO

    io, last = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    _write(io, last, 1.0)
    _write(io, last, 2.0)
    prev = tmp_path / "last.ckpt.prev"
    for p in (last, prev):  # the recorded digest is the file's own (hashlib, independently)
        side = p.with_name(p.name + ".sha256").read_text().split()[0]
        assert side == hashlib.sha256(p.read_bytes()).hexdigest()
    assert resolve_last(last) == last
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # half-copied
    assert resolve_last(last) == prev
    assert torch.load(prev, weights_only=False)["global_step"] == 1
    last.write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])  # one flipped bit
    assert resolve_last(last) == prev
    with pytest.raises(VlmtrainError, match="sha256 differs"):
        io.load_checkpoint(last)
    prev.write_bytes(b"")
    with pytest.raises(VlmtrainError) as e:
        resolve_last(last)
    assert f"{last}: sha256 differs" in str(e.value) and f"{prev}: sha256 differs" in str(e.value)
    last.write_bytes(data)  # restored: intact again
    assert torch.load(resolve_last(last), weights_only=False)["global_step"] == 2
