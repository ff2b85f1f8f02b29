"""The training data loader: shards → decoded, validated, encoded samples → batches, across ranks and workers,
seeded, with a cursor for exact mid-epoch resume.

Pipeline inside one slot (rank × worker):
    mixture of SlotStreams (raw tar samples) → parse JSON, validate, decode images, encode (template, masks)
    → chunk of good samples → plan batches (plain | length-grouped | packed) → collate
Malformed samples are skipped and counted by reason; the loader raises once the bad fraction passes a limit.

Resume. Every batch carries its slot's state at the start of its chunk and its index in the chunk. The loader keeps
the state of the last *consumed* batch per slot. On resume each slot replays its raw streams to the chunk start
(tar bytes only), re-encodes that chunk and drops the batches already consumed. DataLoader workers are served
round-robin, so after k consumed batches the next one belongs to logical worker k mod N: physical worker w plays
logical worker (w + k) mod N, and the resumed order equals the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import queue
import re
import signal
import threading
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlmtrain.data.batching import (collate, collate_packed, collate_preference, collate_preference_prefix,
                                    collate_preference_shared, pack_rows, sample_length)
from vlmtrain.data.encode import decode_image
from vlmtrain.data.schema import IMAGE_EXTS, RecordError, validate_record
from vlmtrain.data.shards import Source, SlotStream, shard_rng, env_rank_world, iter_shard
from vlmtrain.errors import VlmtrainError
from vlmtrain.lifeline import worker_init


_IMAGE_MEMBER = re.compile(r"img(\d+)\.(\w+)")


@dataclass
class LoaderConfig:
    batch_size: int = 8
    num_workers: int = 2
    seed: int = 0
    shuffle_buffer: int = 256
    mode: str = "plain"  # plain | group | pack
    group_chunk: int = 16  # batches per length-grouping chunk
    pack_len: int = 2048  # tokens per packed row
    pack_chunk: int = 256  # samples considered together when packing
    epochs: int | None = None  # None: endless (training); 1: one pass (eval, inspect)
    max_bad_fraction: float = 0.01
    min_samples_for_bad_check: int = 200
    keep_raw: bool = False  # also return records (inspect)
    split: str = "shard"  # shard: slots own disjoint shards (IO-efficient); stride: world-size-invariant order
    cache_mb: int = 0  # per slot: memo of encoded samples, reused from the second epoch on (0: off)
    share_prompt_image_token: int | None = None  # DPO: one row per pair, prompt shared (collate_preference_shared)


def image_members(raw: dict) -> list[str]:
    """A raw sample's image member names (`img0.png`, `img1.jpg`, …) in slot order; other members (`imgx.png`
    included: not a slot name the writer uses) are not images of the record."""
    slots = [(m, k) for k in raw if (m := _IMAGE_MEMBER.fullmatch(k)) and m.group(2) in IMAGE_EXTS]
    return [k for m, k in sorted(slots, key=lambda mk: int(mk[0].group(1)))]


def parse_sample(raw: dict) -> tuple[dict, list]:
    """Raw tar sample → (validated record, decoded RGB images). Raises RecordError with a reason."""
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    if "json" not in raw:
        raise RecordError("missing_field", f"{where}: no .json member")
    try:
        rec = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError("bad_json", f"{where}.json: {e.msg if hasattr(e, 'msg') else e}") from None
    img_keys = image_members(raw)
    validate_record(rec, len(img_keys))
    images = [decode_image(raw[k], f"{where}.{k}") for k in img_keys]
    return rec, images


class _SlotPipeline:
    """Everything one slot does. Lives in a DataLoader worker (or the main process with num_workers=0)."""

    def __init__(self, sources: list[Source], urls: list[list[str]], encoder, cfg: LoaderConfig, pad_id: int,
                 slot: int, n_slots: int, state: dict | None):
        self.sources, self.encoder, self.cfg, self.pad_id = sources, encoder, cfg, pad_id
        self.slot = slot
        st = state or {}
        self.cache: dict[tuple, tuple] = {}
        self.cache_left = cfg.cache_mb * 2**20
        self.shard_keys: dict[str, list[str]] = {}  # url → its sample keys, after one complete read
        src_states = st.get("sources") or [{"epoch": 0, "emitted": 0}] * len(sources)
        self.streams = [SlotStream(u, slot, n_slots, cfg.seed, i, cfg.shuffle_buffer, cfg.epochs, **s,
                                   opener=self._open_shard if cfg.cache_mb else None)
                        for i, (u, s) in enumerate(zip(urls, src_states))]
        self.alive = list(st.get("alive", [True] * len(sources)))
        self.mix_rng = np.random.default_rng()
        self.mix_rng.bit_generator.state = st["mix"] if "mix" in st else shard_rng(cfg.seed, slot, 2).bit_generator.state
        self.chunks = st.get("chunks", 0)
        self.skip_batches = st.get("next_batch", 0)  # batches of the current chunk already consumed
        self.weights = np.array([s.weight for s in sources], dtype=float)

    def _open_shard(self, url: str) -> Iterator[dict]:
        """A shard's raw samples; once every sample of the shard is in the encoded cache, only their keys (no tar
        read, no parsing): the samples come out of the cache in `_encode`. A shard that failed to read is re-read
        every time, so its error is counted every epoch, as without the cache."""
        keys = self.shard_keys.get(url)
        if keys is not None and all((url, k) in self.cache for k in keys):
            for k in keys:
                yield {"__url__": url, "__key__": k}
            return
        seen, clean = [], True
        for raw in iter_shard(url):
            if "__error__" in raw:
                clean = False
            else:
                seen.append(raw.get("__key__"))
            yield raw
        if clean:
            self.shard_keys[url] = seen

    def _encode(self, raw: dict) -> tuple[dict | None, str | None]:
        """parse + validate + decode + encode one raw sample → (encoded, None) or (None, skip reason).

        Memoised per (shard, key) while the slot's cache budget lasts: from the second epoch on, a cached sample
        costs no image decode, resize, template or tokenization (encoding is deterministic, so the batches, the
        skip counts and the resume cursor are exactly those of an uncached run). Why by hand: no library memoises
        a per-worker stream under a byte budget."""
        key = (raw.get("__url__"), raw.get("__key__"))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        try:
            rec, images = parse_sample(raw)
            enc = self.encoder(rec, images)
            if self.cfg.keep_raw:
                enc["record"] = rec
            if key[1] is not None:  # identifies this sample's images for the frozen-tower feature cache
                enc["cache_key"] = f"{key[0]}:{key[1]}"
            out = (enc, None)
        except RecordError as e:
            out = (None, e.reason)
        if self.cache_left > 0 and key[1] is not None:
            size = _nbytes(out[0])
            if size <= self.cache_left:
                self.cache[key] = out
                self.cache_left -= size
        return out

    def state(self) -> dict:
        return {"sources": [s.state() for s in self.streams], "alive": list(self.alive),
                "mix": self.mix_rng.bit_generator.state, "chunks": self.chunks}

    def _next_raw(self) -> dict | None:
        while any(self.alive):
            if len(self.streams) == 1:
                i = 0
            else:
                w = self.weights * np.array(self.alive, dtype=float)
                i = int(self.mix_rng.choice(len(w), p=w / w.sum()))
            try:
                return next(self.streams[i])
            except StopIteration:
                self.alive[i] = False
        return None

    def _chunk_size(self) -> int:
        c = self.cfg
        return {"plain": c.batch_size, "group": c.batch_size * c.group_chunk, "pack": c.pack_chunk}[c.mode]

    def _read_chunk(self, skipped: Counter) -> tuple[list[dict], list[str]]:
        good: list[dict] = []
        ids: list[str] = []
        while len(good) < self._chunk_size():
            raw = self._next_raw()
            if raw is None:
                break
            if "__error__" in raw:
                skipped[raw["__error__"]] += 1
                continue
            enc, reason = self._encode(raw)
            if enc is None:
                skipped[reason] += 1
                continue
            good.append(enc)
            ids.append(enc["id"])
        return good, ids

    def _plan(self, good: list[dict]) -> list[list]:
        c = self.cfg
        if c.mode == "pack":
            rows = pack_rows(good, c.pack_len)
            return [rows[i : i + c.batch_size] for i in range(0, len(rows), c.batch_size)]
        if c.mode == "group":
            order = sorted(range(len(good)), key=lambda i: sample_length(good[i]))
            batches = [[good[i] for i in order[j : j + c.batch_size]] for j in range(0, len(order), c.batch_size)]
            perm = shard_rng(c.seed, self.slot, self.chunks, 3).permutation(len(batches))
            return [batches[i] for i in perm]
        return [good]

    def _collate(self, plan_item: list) -> dict:
        c = self.cfg
        if c.mode == "pack":
            if any("chosen" in x for row in plan_item for x in row):
                raise VlmtrainError("data.mode: packing is not supported for preference (DPO) records")
            batch = collate_packed(plan_item, self.pad_id)
            samples = [x for row in plan_item for x in row]
        else:
            samples = plan_item
            prefs = sum("chosen" in x for x in samples)
            if prefs not in (0, len(samples)):
                raise VlmtrainError("data: a batch mixes preference and chat/caption records; "
                                    "use separate datasets for DPO and SFT stages")
            batch = None
            if prefs and c.share_prompt_image_token is not None:
                batch = collate_preference_shared(samples, self.pad_id, c.share_prompt_image_token)
            elif prefs and getattr(self.encoder, "shared_prefix_rows", False):  # a native family's encoder
                batch = collate_preference_prefix(samples, self.pad_id, self.encoder.image_token_id)
            if batch is None:
                batch = (collate_preference if prefs else collate)(samples, self.pad_id)
            batch["preference"] = bool(prefs)
        batch["ids"] = [x["id"] for x in samples]
        if "columns" in samples[0]:  # GRPO prompts (data.prompts): reward columns and the prompt messages
            batch["columns"] = [x["columns"] for x in samples]
            batch["prompts"] = [x["prompt"] for x in samples]
        if c.keep_raw:
            batch["records"] = [x["record"] for x in samples]
        return batch

    def __iter__(self) -> Iterator[dict]:
        while True:
            start = self.state()
            skipped: Counter = Counter()
            good, _ = self._read_chunk(skipped)
            if not good:
                if skipped:
                    yield {"_meta": {"slot": self.slot, "state": start, "batch": -1, "skipped": dict(skipped),
                                     "empty": True}}
                return
            plan = self._plan(good)
            self.chunks += 1
            first = self.skip_batches
            self.skip_batches = 0
            for j in range(first, len(plan)):
                batch = self._collate(plan[j])
                # skips of a chunk are reported once, with its first batch (a resumed chunk already reported them)
                report = dict(skipped) if j == 0 else {}
                batch["_meta"] = {"slot": self.slot, "state": start, "batch": j, "skipped": report,
                                  "n_samples": len(batch["ids"])}
                yield batch


def _nbytes(enc: dict | None) -> int:
    """Approximate resident size of an encoded sample (token lists as Python ints, pixel tensors)."""
    if enc is None:
        return 64
    n = 256
    for k, v in enc.items():
        if isinstance(v, torch.Tensor):
            n += v.numel() * v.element_size()
        elif isinstance(v, list):
            n += 36 * len(v)
        elif isinstance(v, dict):
            n += _nbytes(v)
    return n


def dummy_batch(pad_id: int) -> dict:
    """One pad token, nothing supervised, no image: a rank whose slice of a global batch is empty (or all bad)
    still runs forward/backward, so collectives stay in step; it adds 0 to the loss and to the token counts."""
    return {"input_ids": torch.tensor([[pad_id]]), "labels": torch.tensor([[-100]]),
            "attention_mask": torch.ones(1, 1, dtype=torch.long), "preference": False}


class _StridePipeline(_SlotPipeline):
    """World-size-invariant order (`split: stride`). Every rank and worker replays the same global raw stream;
    global batch g is raw samples [g·G, (g+1)·G) with G = batch_size × world; rank r keeps its slice
    [r·B, (r+1)·B); the DataLoader worker w builds the batches g = k + w, k + w + N, ... from the resume point k.
    The order and the cursor (`k`) do not depend on world size or worker count, so a run can resume on another
    world size with the same global batch. The price: each worker reads (not decodes) every raw sample."""

    def __init__(self, sources, urls, encoder, cfg, pad_id, rank: int, world: int, worker: int, n_workers: int,
                 start_batch: int):
        super().__init__(sources, urls, encoder, cfg, pad_id, slot=0, n_slots=1, state=None)
        self.rank, self.world, self.worker, self.n_workers, self.start = rank, world, worker, n_workers, start_batch

    def _parse(self, raw: dict, skipped: Counter) -> dict | None:
        if "__error__" in raw:
            skipped[raw["__error__"]] += 1
            return None
        enc, reason = self._encode(raw)
        if enc is None:
            skipped[reason] += 1
        return enc

    def __iter__(self) -> Iterator[dict]:
        b = self.cfg.batch_size
        g_size = b * self.world
        for _ in range(self.start * g_size):  # replay to the cursor: tar bytes only, no decoding
            if self._next_raw() is None:
                return
        g = self.start
        while True:
            raw = []
            for _ in range(g_size):
                r = self._next_raw()
                if r is None:
                    break
                raw.append(r)
            if not raw:
                return
            if (g - self.start) % self.n_workers == self.worker:
                skipped: Counter = Counter()
                good = [x for x in (self._parse(r, skipped) for r in raw[self.rank * b:(self.rank + 1) * b]) if x]
                batch = self._collate(good) if good else {**dummy_batch(self.pad_id), "ids": []}
                batch["_meta"] = {"global_batch": g + 1, "skipped": dict(skipped), "n_samples": len(good)}
                yield batch
            g += 1


class _ShardDataset(IterableDataset):
    def __init__(self, loader: "ShardLoader", rotation: int, slot_states: dict):
        self.loader, self.rotation, self.slot_states = loader, rotation, slot_states

    def __iter__(self):
        L = self.loader
        info = get_worker_info()
        n = info.num_workers if info else 1
        w = info.id if info else 0
        logical = (w + self.rotation) % n
        slot = L.rank * n + logical
        if info is not None:
            torch.set_num_threads(1)  # workers do light CPU work; leave cores to the training step
        if L.cfg.split == "stride":
            return iter(_StridePipeline(L.sources, L.urls, L.encoder, L.cfg, L.pad_id, L.rank, L.world, w, n,
                                        L.global_batches))
        pipe = _SlotPipeline(L.sources, L.urls, L.encoder, L.cfg, L.pad_id, slot, L.world * n,
                             self.slot_states.get(str(slot)))
        return _as_arrays(iter(pipe)) if info else iter(pipe)


def _as_arrays(batches: Iterator[dict]) -> Iterator[dict]:
    """Worker side: tensors → numpy arrays, which cross the worker→main pipe by value. Why: torch moves each
    tensor of a worker's batch into its own shared-memory segment (create, map, unmap per tensor), which for the
    small tensors of a batch costs more than copying their bytes; `_as_tensors` turns them back (zero-copy)."""
    for b in batches:
        yield {k: (_Array(v.numpy()) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}


class _Array:
    """A numpy array in transit (a marker, so `_as_tensors` only converts what `_as_arrays` converted)."""

    __slots__ = ("a",)

    def __init__(self, a):
        self.a = a


class _received_ahead:
    """Iterate `dl` with a background thread receiving the next batches from the workers.

    Why: receiving a batch (reading it from the worker pipe, unpickling) costs the training loop ~1 ms per batch on
    its own thread; a receiver thread does it while the step computes (pipe reads release the GIL). Only the
    transfer runs ahead: the cursor bookkeeping stays with the consumer, so a checkpoint still records exactly the
    batches trained on. Why by hand: DataLoader has no option for this, and Lightning's prefetch runs on the
    training thread.

    Shutdown: the thread is not a daemon (a daemon thread inside torch code at interpreter exit aborts the process),
    so it must always end: when the consumer closes the iterator, when `stop_receivers()` is called (the runner does
    after training), or at interpreter exit (a `threading` exit hook sets every stop flag before threads are
    joined)."""

    _DONE = object()

    def __init__(self, dl, depth: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._receive, args=(dl,), name="vlmtrain-batch-receiver")
        _RECEIVERS.add(self)
        self.thread.start()

    def _receive(self, dl) -> None:
        # The DataLoader forks its workers from this thread, and a fork inherits the thread's signal mask: with
        # preemption signals blocked here, a SIGTERM sent to the process group (as SLURM does) between a worker's
        # fork and its `worker_init` (which ignores them) stays pending and is then discarded, instead of killing
        # the worker (the chaos run of 2026-12-07 saw one: "DataLoader worker exited unexpectedly", exit 1, no
        # checkpoint). The process's handlers run in the main thread, which keeps receiving the signals.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
        try:
            for item in dl:
                while not self.stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.q.put(self._DONE)
        except BaseException as e:  # a worker's error reaches the training loop, unchanged
            self.q.put(e)

    def __iter__(self) -> Iterator[dict]:
        try:
            while True:
                item = self.q.get()
                if item is self._DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self, wait: float = 30.0) -> None:
        self.stop.set()
        with contextlib.suppress(queue.Empty):
            while True:  # unblock a pending put
                self.q.get_nowait()
        if wait:
            self.thread.join(timeout=wait)


def _stop_all_receivers() -> None:
    for r in list(_RECEIVERS):
        r.stop.set()


def stop_receivers() -> None:
    """End every batch-receiver thread of this process (their loaders are done)."""
    for r in list(_RECEIVERS):
        r.close()


_RECEIVERS: "weakref.WeakSet[_received_ahead]" = weakref.WeakSet()
threading._register_atexit(_stop_all_receivers)  # runs before the interpreter joins non-daemon threads


def _as_tensors(b: dict) -> dict:
    return {k: (torch.from_numpy(v.a) if isinstance(v, _Array) else v) for k, v in b.items()}


class ShardLoader:
    """Iterable of batches with `state_dict()` / `load_state_dict()` (Lightning checkpoints it as a stateful
    loader). Batches are dicts of tensors plus `ids` (record ids) and, with packing, `samples_per_row`."""

    def __init__(self, sources: list[Source] | list[str] | str, encoder, pad_token_id: int,
                 cfg: LoaderConfig | None = None, rank: int | None = None, world_size: int | None = None, **kw):
        if isinstance(sources, str):
            sources = [sources]
        self.sources = [s if isinstance(s, Source) else Source(s) for s in sources]
        self.urls = [s.shard_urls() for s in self.sources]
        self.encoder, self.pad_id = encoder, pad_token_id
        self.cfg = cfg or LoaderConfig(**kw)
        if self.cfg.mode not in ("plain", "group", "pack"):
            raise VlmtrainError(f"data.mode: expected plain, group or pack, got {self.cfg.mode!r}")
        if self.cfg.split not in ("shard", "stride"):
            raise VlmtrainError(f"data.split: expected shard or stride, got {self.cfg.split!r}")
        if self.cfg.split == "stride" and self.cfg.mode != "plain":
            raise VlmtrainError("data.split: stride (world-size-invariant order) supports data.mode plain only")
        r, w = env_rank_world()
        self.rank = r if rank is None else rank
        self.world = w if world_size is None else world_size
        self.slot_states: dict[str, dict] = {}
        self.global_batches = 0  # stride split: global batches consumed (the whole cursor)
        self.batches = 0
        self.skipped: Counter = Counter()
        self.samples = 0

    def _workers(self) -> int:
        return max(1, self.cfg.num_workers)

    def state_dict(self) -> dict:
        sd = {"split": self.cfg.split, "batches": self.batches, "skipped": dict(self.skipped),
              "samples": self.samples, "seed": self.cfg.seed, "world": self.world, "workers": self._workers()}
        if self.cfg.split == "stride":
            sd.update(global_batches=self.global_batches, global_batch_size=self.cfg.batch_size * self.world)
        else:
            sd["slot_states"] = copy.deepcopy(self.slot_states)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("split", "shard") != self.cfg.split:
            raise VlmtrainError(f"data cursor was saved with data.split {sd.get('split', 'shard')!r}, "
                                f"this run uses {self.cfg.split!r}")
        if self.cfg.split == "stride":
            g_now = self.cfg.batch_size * self.world
            if sd["global_batch_size"] != g_now:
                raise VlmtrainError(
                    f"data cursor was saved with a global batch of {sd['global_batch_size']} samples; this run has "
                    f"{self.cfg.batch_size} × {self.world} ranks = {g_now}: set data.batch_size so they match")
            self.global_batches = sd["global_batches"]
            self.batches = sd["batches"]
            self.skipped = Counter(sd.get("skipped", {}))
            self.samples = sd.get("samples", 0)
            return
        if sd.get("world", self.world) != self.world or sd.get("workers", self._workers()) != self._workers():
            raise VlmtrainError(
                f"data cursor was saved with world size {sd.get('world')} × {sd.get('workers')} workers; "
                f"resuming with {self.world} × {self._workers()} changes which samples each slot owns "
                "(data.split: stride resumes on any world size)"
            )
        self.slot_states = copy.deepcopy(sd["slot_states"])
        self.batches = sd["batches"]
        self.skipped = Counter(sd.get("skipped", {}))
        self.samples = sd.get("samples", 0)

    def _check_bad_fraction(self) -> None:
        bad = sum(self.skipped.values())
        total = bad + self.samples
        if total >= self.cfg.min_samples_for_bad_check and bad / total > self.cfg.max_bad_fraction:
            reasons = ", ".join(f"{k}={v}" for k, v in self.skipped.most_common())
            raise VlmtrainError(f"data: {bad} of {total} samples were malformed ({bad / total:.1%} > "
                                f"max_bad_fraction {self.cfg.max_bad_fraction:.1%}): {reasons}")

    def __iter__(self) -> Iterator[dict]:
        n = self._workers()
        ds = _ShardDataset(self, self.batches % n, dict(self.slot_states))
        # An own generator: worker seeding must not consume the global torch RNG (exact resume of dropout etc.)
        dl = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers, persistent_workers=False,
                        prefetch_factor=4 if self.cfg.num_workers else None,
                        generator=torch.Generator().manual_seed(self.cfg.seed),
                        worker_init_fn=worker_init if self.cfg.num_workers else None)
        for batch in (_received_ahead(dl) if self.cfg.num_workers else dl):
            batch = _as_tensors(batch)
            meta = batch.pop("_meta")
            self.skipped.update(meta["skipped"])
            if meta.get("empty"):
                self._check_bad_fraction()
                continue
            if "global_batch" in meta:
                self.global_batches = meta["global_batch"]
            else:
                st = dict(meta["state"])
                st["next_batch"] = meta["batch"] + 1
                self.slot_states[str(meta["slot"])] = st
            self.batches += 1
            self.samples += meta["n_samples"]
            self._check_bad_fraction()
            yield batch
