"""Where samples come from: shard lists per source, and a deterministic, resumable raw-sample stream per slot.

A *slot* is one (rank, dataloader-worker) pair. In every epoch each source's shards are permuted with a seed that
all slots share, then dealt round-robin to slots, so slots see disjoint shards whose union is the dataset. Inside a
slot a seeded shuffle buffer mixes samples across its shards. A stream's position is `(epoch, emitted)`: replaying
the same epoch and dropping `emitted` raw samples (tar bytes only, no image decoding) restores it exactly.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from braceexpand import braceexpand

from vlmtrain.errors import VlmtrainError


@dataclass
class Source:
    """One dataset in a mixture: a shard folder (with manifest.json), a glob, or a brace URL list."""

    path: str
    weight: float = 1.0

    def shard_urls(self) -> list[str]:
        p = Path(self.path)
        if p.is_dir():
            man = p / "manifest.json"
            if man.is_file():
                names = [s["name"] for s in json.loads(man.read_text())["shards"]]
                return [str(p / n) for n in names]
            urls = sorted(str(x) for x in p.glob("*.tar"))
        elif any(c in self.path for c in "*?["):
            urls = sorted(glob.glob(self.path))
        elif "{" in self.path or self.path.startswith(("pipe:", "http")):
            urls = list(braceexpand(self.path))
        else:
            urls = [self.path] if p.is_file() else []
        if not urls:
            raise VlmtrainError(f"{self.path}: no shards found (expected a folder with manifest.json or *.tar)")
        return urls

    def num_samples(self) -> int | None:
        man = Path(self.path) / "manifest.json"
        return json.loads(man.read_text())["samples"] if man.is_file() else None


def shard_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


def iter_shard(url: str) -> Iterator[dict]:
    """Raw samples of one tar: {"__key__", "__url__", ext: bytes}. A truncated/unreadable tar yields a final
    {"__error__": "corrupt_shard", ...} marker instead of raising, so the caller counts it and moves on."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    try:
        stream = wds.gopen(url, "rb")
    except Exception as e:
        yield {"__error__": "corrupt_shard", "__url__": url, "__detail__": f"cannot open: {type(e).__name__}"}
        return
    try:
        files = tar_file_iterator(stream)
        for sample in group_by_keys(({**f, "__url__": url} for f in files)):
            yield sample
    except Exception as e:  # tarfile.ReadError, EOFError, ... on a truncated shard
        yield {"__error__": "corrupt_shard", "__url__": url, "__detail__": f"{type(e).__name__}: {e}"[:200]}
    finally:
        stream.close()


class SlotStream:
    """Infinite (or `epochs`-bounded) raw-sample stream of one source for one slot. Not thread-safe."""

    def __init__(self, urls: list[str], slot: int, n_slots: int, seed: int, source_idx: int, shuffle_buffer: int,
                 epochs: int | None = None, epoch: int = 0, emitted: int = 0, opener=None):
        if len(urls) < n_slots:
            raise VlmtrainError(
                f"{len(urls)} shard(s) cannot be split over {n_slots} rank×worker slots: re-shard with a smaller "
                "--shard-size or use fewer dataloader workers"
            )
        self.urls, self.slot, self.n_slots = urls, slot, n_slots
        self.seed, self.source_idx, self.buffer = seed, source_idx, max(1, shuffle_buffer)
        self.epochs = epochs
        self.epoch, self.emitted = epoch, emitted
        self.opener = opener or iter_shard  # url → raw samples (the loader may serve cached shards without IO)
        self._it = self._run(epoch, emitted)

    def state(self) -> dict:
        return {"epoch": self.epoch, "emitted": self.emitted}

    def my_shards(self, epoch: int) -> list[str]:
        order = shard_rng(self.seed, self.source_idx, epoch).permutation(len(self.urls))
        return [self.urls[i] for i in order[self.slot :: self.n_slots]]

    def _epoch_stream(self, epoch: int) -> Iterator[dict]:
        rng = shard_rng(self.seed, self.source_idx, epoch, self.slot, 1)
        buf: list[dict] = []
        for url in self.my_shards(epoch):
            for s in self.opener(url):
                buf.append(s)
                if len(buf) >= self.buffer:
                    j = int(rng.integers(len(buf)))
                    buf[j], buf[-1] = buf[-1], buf[j]
                    yield buf.pop()
        while buf:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()

    def _run(self, epoch: int, skip: int) -> Iterator[dict]:
        while self.epochs is None or epoch < self.epochs:
            self.epoch, self.emitted = epoch, 0
            for i, s in enumerate(self._epoch_stream(epoch)):
                if i < skip:
                    self.emitted = i + 1
                    continue
                self.emitted = i + 1
                yield s
            skip = 0
            epoch += 1
        self.epoch = epoch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)


def env_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else torchrun's environment, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
