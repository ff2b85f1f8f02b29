"""Checkpoint files that survive SIGKILL, and sharded (DCP) checkpoints that load on any world size.

Two layouts live at `checkpoints/last.ckpt`:
- a file: one `torch.save` of Lightning's checkpoint dict (single, ddp);
- a directory: a `torch.distributed.checkpoint` (DCP) checkpoint written by the `fsdp` strategy — every rank writes
  its own shards (`__<rank>_0.distcp`), `.metadata` maps them to global tensors, `meta.pt` holds the rest (loop
  state, scheduler, vlmtrain's data cursor and RNG). DCP reshards on load, so `fsdp` resumes it on any world size;
  `read_checkpoint` turns it into the single-file dict, so `single`/`ddp` resume it too (2 → 1 → 2).

Either layout replaces the previous one atomically enough for a kill at any moment: the new checkpoint is written
beside the old (`last.ckpt.tmp`), then rotated in by renames (`last.ckpt` → `last.ckpt.prev`, `.tmp` →
`last.ckpt`); `resolve_last` finds the previous one if a kill lands between the renames.

Single files also survive storage faults: a write that fails (ENOSPC, EIO) leaves the previous checkpoint in place
and raises one `CheckpointWriteError`; each file's sha256 is stored beside it (`last.ckpt.sha256`) and verified
before a resume; the previous checkpoint is kept (`last.ckpt.prev`), so a truncated or corrupted `last.ckpt` falls
back to it, and when neither is intact the error names both files.

Directories (fsdp's DCP, DeepSpeed's per-rank layout) carry a manifest of their files' sha256 (`manifest.sha256`
inside, `sha256sum -c` format), written by rank 0 once every rank has finished writing; the previous directory is
kept as `last.ckpt.prev` the same way, and a resume verifies the manifest (a missing, truncated or changed file is
named) and falls back to the previous directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vlmtrain import atomic
from vlmtrain.train import phases

from vlmtrain.errors import VlmtrainError

META = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint
log = logging.getLogger("vlmtrain.train")


class CheckpointWriteError(VlmtrainError):
    """Writing a checkpoint failed (disk full, I/O error); the previous checkpoint is untouched."""


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _previous(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _known_digests(path: Path) -> set[str]:
    """The digests recorded beside `path`'s checkpoints. A file is intact when its digest is any of them: renames
    move a checkpoint and its sidecar one after the other, so a kill between them may pair them differently."""
    out = set()
    for side in path.parent.glob(path.name.split(".")[0] + "*.sha256"):
        try:
            out.add(side.read_text().split()[0])
        except (OSError, IndexError):
            continue
    return out


MANIFEST = "manifest.sha256"


def _directory_files(path: Path) -> list[str]:
    """The files of a checkpoint directory (relative, sorted), its manifest excluded."""
    return sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and f.name != MANIFEST)


def write_manifest(path: Path) -> None:
    """`path/manifest.sha256`: one `<sha256>  <relative file>` line per file of the finished directory, on disk."""
    lines = "".join(f"{file_sha256(path / rel)}  {rel}\n" for rel in _directory_files(path))
    atomic.write_text(path / MANIFEST, lines)


def _check_directory(path: Path) -> str | None:
    """Why the checkpoint directory `path` is not intact (the first file that differs from its manifest), or None.
    A directory without a manifest was written before manifests existed: accepted, as a file without a sidecar."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None
    for line in manifest.read_text().splitlines():
        digest, _, rel = line.partition("  ")
        f = path / rel
        if not f.is_file():
            return f"{f}: missing (listed in {manifest})"
        if file_sha256(f) != digest:
            return f"{f}: sha256 differs from {manifest} (truncated or corrupted)"
    return None


def check_intact(path: Path) -> str | None:
    """None if the checkpoint at `path` is intact (or carries no checksum: written before checksums), else why not.
    A file is checked against its sidecar, a directory (sharded layouts) against its manifest."""
    path = Path(path)
    if path.is_dir():
        return _check_directory(path)
    known = _known_digests(path)
    if not known:
        return None
    return None if file_sha256(path) in known else "sha256 differs from the recorded one (truncated or corrupted)"


def verify_checkpoint(path: Path) -> None:
    problem = check_intact(path)
    if problem:
        raise VlmtrainError(problem if Path(path).is_dir() else f"{path}: {problem}")


def is_sharded(path: Path) -> bool:
    """A DCP directory (as opposed to DeepSpeed's per-rank directory or a single file)."""
    return path.is_dir() and (path / ".metadata").is_file() and (path / META).is_file()


def resolve_last(path: Path) -> Path | None:
    """The checkpoint to resume from: `path` if intact; else the one a kill left mid-swap (`.old`: the swap of
    versions before 2026-11-30 that kept no `.prev` for directories), else the previous one (`.prev`). None when
    there is none at all; an error naming every file when none is intact."""
    path = Path(path)
    bad = []
    for cand in (path, path.with_name(path.name + ".old"), _previous(path)):
        if not cand.exists():
            continue
        problem = check_intact(cand)
        if problem is None:
            if bad:
                log.warning(f"{'; '.join(bad)}: resuming from {cand} instead")
            return cand
        bad.append(f"{cand}: {problem}")
    if bad:
        raise VlmtrainError("no intact checkpoint to resume from: " + "; ".join(bad))
    return None


def rotate_in(tmp: Path, path: Path) -> None:
    """A finished checkpoint `tmp` (a file with its sidecar written, or a directory with its manifest) becomes
    `path`; `path` (with its sidecar) becomes `.prev`, replacing the one before. File and directory may alternate
    (a run resumed under another strategy changes the layout). Every step is a rename except removing the old
    `.prev`, so a kill at any moment leaves an intact `path` or `.prev` for `resolve_last`."""
    prev = _previous(path)
    if path.exists():
        if prev.exists() and (prev.is_dir() or path.is_dir()):  # a rename cannot replace a directory
            remove_path(prev)
        os.replace(path, prev)
        if _sidecar(path).is_file():
            os.replace(_sidecar(path), _sidecar(prev))
        else:  # `path` was a directory: an older file's digest must not stay paired with it
            _sidecar(prev).unlink(missing_ok=True)
    if _sidecar(tmp).is_file():
        os.replace(_sidecar(tmp), _sidecar(path))
    os.replace(tmp, path)


def rotate_directory_in(tmp: Path, path: Path) -> None:
    """A checkpoint directory every rank has finished writing: its manifest, then `rotate_in`."""
    write_manifest(tmp)
    rotate_in(tmp, path)


def remove_path(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def optimizer_state_by_index(state: dict) -> dict:
    """DCP optimizer state (keyed by parameter name, `param_groups[i]["params"]` = names) → torch's layout (keyed by
    index). torch numbers parameters in param-group order, so the names' order gives the indices."""
    index = {}
    groups = []
    for g in state["param_groups"]:
        ids = []
        for name in g["params"]:
            index[name] = len(index)
            ids.append(index[name])
        groups.append({**g, "params": ids})
    return {"state": {index[name]: s for name, s in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_name(state: dict, optimizer, model) -> dict:
    """The inverse: torch's index-keyed optimizer state → keyed by parameter name (what DCP's
    `set_optimizer_state_dict` takes), the names being `model`'s for the optimizer's parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def load_sharded_optimizer(model, optimizer, index: int, path: Path) -> None:
    """Optimizer `index`'s state from the DCP checkpoint `path` into `optimizer` (this rank's slices, resharded to
    this world size). A parameter without state in the checkpoint (it had no gradient before the save: LLaVA's
    unused top tower layer when the tower trains) gets none here either, as in the run that wrote it — torch's
    state-dict API gives every parameter a state first, for which DCP would then refuse the load as missing."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    key = f"optimizer_{index}"
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = get_optimizer_state_dict(model, optimizer)
    # only a parameter with no saved field at all is left out: a field missing beside others stays a loud DCP error
    state["state"] = {name: fields for name, fields in state["state"].items()
                      if any(f"{key}.state.{name}.{field}" in saved for field in fields)}
    box = {key: state}
    dcp.load(box, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer, optim_state_dict=box[key], options=StateDictOptions(strict=False))


def load_full_optimizer(model, optimizer, state: dict) -> None:
    """torch's index-keyed optimizer state of a single-file checkpoint (full tensors) into `optimizer` of the
    FSDP2-sharded `model`, each rank keeping its slices. As `load_sharded_optimizer`, a parameter without state in
    `state` gets none: torch's state-dict API would refuse it, or with strict=False give it the zero state it
    creates first (a first Adam step then bias-corrected as a second)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(state, optimizer, model),
                             options=StateDictOptions(full_state_dict=True, strict=False))
    order = [p for g in optimizer.param_groups for p in g["params"]]
    for index, param in enumerate(order):
        if index not in state["state"]:
            optimizer.state.pop(param, None)


def read_sharded(path: Path) -> dict:
    """A DCP checkpoint directory as the single-file checkpoint dict (full tensors, index-keyed optimizer states),
    read in this process alone (no process group needed)."""
    # exactly what DCP's public dcp_to_torch_save does, minus writing the result to a file: its "load everything
    # the metadata lists" planner fills an empty dict with full tensors
    from torch.distributed.checkpoint.format_utils import (FileSystemReader, _EmptyStateDictLoadPlanner,
                                                           _load_state_dict)

    tensors: dict = {}
    _load_state_dict(tensors, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    ckpt = torch.load(path / META, map_location="cpu", weights_only=False)
    ckpt["state_dict"] = tensors["state_dict"]
    n = sum(1 for k in tensors if k.startswith("optimizer_"))
    ckpt["optimizer_states"] = [optimizer_state_by_index(tensors[f"optimizer_{i}"]) for i in range(n)]
    return ckpt


def read_checkpoint(path: Path) -> dict:
    """`checkpoints/last.ckpt` in either layout as Lightning's checkpoint dict."""
    path = Path(path)
    if is_sharded(path):
        verify_checkpoint(path)
        return read_sharded(path)
    if path.is_dir():
        raise ValueError(f"{path}: a directory but not a DCP checkpoint (DeepSpeed's per-rank layout is read by "
                         "the deepspeed strategies only)")
    verify_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=False)


def write_file_checkpoint(checkpoint: dict, tmp: Path) -> None:
    """`torch.save` to `tmp`, on disk (fsync), then its sha256 to `tmp.sha256`."""
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    digest = file_sha256(tmp)  # read back: the digest is of the bytes the disk holds
    with open(_sidecar(tmp), "w") as f:
        f.write(digest + "\n")
        f.flush()
        os.fsync(f.fileno())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's single-file checkpoint IO: writes through a temporary file + fsync + rename, and reads a
    sharded DCP checkpoint too (so a run saved by `fsdp` on N ranks resumes under `single` or `ddp`)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            write_file_checkpoint(checkpoint, tmp)
        except OSError as e:
            for p in (tmp, _sidecar(tmp)):
                p.unlink(missing_ok=True)
            kept = f"the previous checkpoint {path} is intact" if path.exists() else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"{path}: writing the checkpoint failed ({e.strerror or e}); {kept}") from None
        phases.mark("checkpoint_write")
        rotate_in(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        path = Path(path)
        verify_checkpoint(path)
        if is_sharded(path):
            return read_sharded(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
