import json
from collections import Counter

import pytest
import torch

from conftest import tiny_bundle
from shard_fixtures import chat_record, chat_shards, png_bytes, write_shards
from vlmtrain.data.chat import IGNORE
from vlmtrain.data.encode import SampleEncoder
from vlmtrain.data.loader import ShardLoader
from vlmtrain.data.shards import Source
from vlmtrain.errors import VlmtrainError


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


@pytest.fixture(scope="module")
def encoder(bundle):
    m = bundle.model
    return SampleEncoder(bundle.tokenizer, bundle.image_processor, m.image_token_id, m.num_image_tokens, max_len=512)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    chat_shards(out, n=40, per_shard=5)
    return str(out)


def loader(shards, encoder, bundle, **kw):
    kw.setdefault("shuffle_buffer", 8)
    return ShardLoader(shards, encoder, bundle.tokenizer.pad_token_id, **kw)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("mode", ["plain", "group", "pack"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_exactly(shards, encoder, bundle, mode, workers):
    kw = dict(batch_size=4, num_workers=workers, mode=mode, group_chunk=3, pack_len=128, pack_chunk=12)
    ref = loader(shards, encoder, bundle, **kw)
    it = iter(ref)
    seen = [next(it) for _ in range(5)]
    cursor = ref.state_dict()
    expected = [next(it) for _ in range(14)]  # crosses an epoch boundary (40 samples / 4 per batch)
    del it
    resumed = loader(shards, encoder, bundle, **kw)
    resumed.load_state_dict(json.loads(json.dumps(cursor)))  # the cursor survives JSON (checkpoint) round trips
    it2 = iter(resumed)
    got = [next(it2) for _ in range(14)]
    assert all(_same(a, b) for a, b in zip(expected, got))
    # the resumed stream neither repeats nor skips: seen + resumed covers epoch 0 exactly once (grouping and
    # packing chunks straddle the epoch boundary by design, so the plain single-slot case shows it cleanly)
    ids = [i for b in seen + got for i in b["ids"]]
    if workers == 0 and mode == "plain":
        assert sorted(ids[:40]) == sorted(f"r{i}" for i in range(40))


def test_two_ranks_two_workers_partition_the_dataset(shards, encoder, bundle):
    per_rank = []
    for rank in range(2):
        L = loader(shards, encoder, bundle, batch_size=3, num_workers=2, epochs=1, rank=rank, world_size=2)
        per_rank.append([i for b in L for i in b["ids"]])
    a, b = set(per_rank[0]), set(per_rank[1])
    assert not a & b
    assert a | b == {f"r{i}" for i in range(40)}
    assert len(per_rank[0]) + len(per_rank[1]) == 40  # nothing read twice within a rank either


def test_seeded_and_deterministic(shards, encoder, bundle):
    def first_ids(seed):
        it = iter(loader(shards, encoder, bundle, batch_size=4, num_workers=0, seed=seed))
        return [i for _ in range(5) for i in next(it)["ids"]]

    assert first_ids(1) == first_ids(1)
    assert first_ids(1) != first_ids(2)


def test_packed_logits_equal_per_sample_logits(shards, encoder, bundle):
    m = bundle.model.eval()
    it = iter(loader(shards, encoder, bundle, batch_size=2, num_workers=0, mode="pack", pack_len=160, pack_chunk=8))
    batch = next(it)
    assert (batch["samples_per_row"] > 1).any(), "fixture should pack several samples per row"
    with torch.no_grad():
        packed = m(batch["input_ids"], batch.get("pixel_values"), attention_mask=None,
                   position_ids=batch["position_ids"]).logits
    # Walk the rows, cutting samples where positions restart, and images in slot order.
    img_i = 0
    t = m.num_image_tokens
    checked = 0
    for r in range(batch["input_ids"].shape[0]):
        pos = batch["position_ids"][r].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for s, e in zip(starts[:-1], starts[1:]):
            ids = batch["input_ids"][r, s:e]
            if (ids == bundle.tokenizer.pad_token_id).all():
                continue
            n_img = int((ids == m.image_token_id).sum()) // t
            pix = batch["pixel_values"][img_i : img_i + n_img] if n_img else None
            img_i += n_img
            with torch.no_grad():
                alone = m(ids[None], pix).logits[0]
            assert (alone - packed[r, s:e]).abs().max() <= 1e-5
            checked += 1
    assert checked == len(batch["ids"])


def test_labels_supervise_only_assistant_text(shards, encoder, bundle):
    tok = bundle.tokenizer
    L = loader(shards, encoder, bundle, batch_size=5, num_workers=0, epochs=1, keep_raw=True)
    for batch in L:
        for row, rec in zip(range(batch["labels"].shape[0]), batch["records"]):
            lab = batch["labels"][row]
            sup = tok.decode(lab[lab != IGNORE])
            replies = [p["text"] for m in rec["messages"] if m["role"] == "assistant" for p in m["content"]]
            assert sup == "".join(r + "<|end|>" for r in replies)


def test_malformed_samples_are_counted_and_skipped(tmp_path, encoder, bundle):
    good = [(chat_record(i, 1), [png_bytes(i)]) for i in range(12)]
    truncated = png_bytes(99)[:60]
    bad = [
        (b"{not json", []),
        (chat_record(100, 1), [truncated]),
        (chat_record(101, 2), [png_bytes(5)]),  # 2 slots, 1 image
        ({"id": "r102", "kind": "chat", "messages": []}, []),
        ({"id": "r103", "kind": "chat", "messages": [{"role": "user", "content": [{"type": "text", "text": "x " * 600}]},
                                                     {"role": "assistant", "content": [{"type": "text", "text": "y"}]}]}, []),
    ]
    write_shards(tmp_path, good[:6] + bad + good[6:], per_shard=100)
    L = loader(str(tmp_path), encoder, bundle, batch_size=4, num_workers=0, epochs=1, max_bad_fraction=0.5)
    ids = [i for b in L for i in b["ids"]]
    assert sorted(ids) == sorted(f"r{i}" for i in range(12))
    assert L.skipped == Counter({"bad_json": 1, "undecodable_image": 1, "image_slot_mismatch": 1,
                                 "empty_turns": 1, "over_length": 1})
    # past the configured fraction the run fails with the reasons listed
    L = loader(str(tmp_path), encoder, bundle, batch_size=4, num_workers=0, epochs=1, max_bad_fraction=0.1,
               min_samples_for_bad_check=10)
    with pytest.raises(VlmtrainError, match=r"malformed .* bad_json=1"):
        list(L)


def test_truncated_shard_is_counted_and_the_rest_is_read(tmp_path, encoder, bundle):
    paths = chat_shards(tmp_path, n=12, per_shard=6)
    data = open(paths[0], "rb").read()
    open(paths[0], "wb").write(data[: len(data) // 2])
    L = loader(str(tmp_path), encoder, bundle, batch_size=2, num_workers=0, epochs=1, max_bad_fraction=1.0)
    ids = [i for b in L for i in b["ids"]]
    assert L.skipped["corrupt_shard"] == 1
    assert {f"r{i}" for i in range(6, 12)} <= set(ids) and len(ids) < 12


def test_weighted_mixture(tmp_path, encoder, bundle):
    a = [(chat_record(i, 0), []) for i in range(30)]
    b = [({**chat_record(i, 0), "id": f"b{i}"}, []) for i in range(30)]
    write_shards(tmp_path / "a", a, per_shard=5)
    write_shards(tmp_path / "b", b, per_shard=5)
    L = ShardLoader([Source(str(tmp_path / "a"), 3.0), Source(str(tmp_path / "b"), 1.0)], encoder,
                    bundle.tokenizer.pad_token_id, batch_size=8, num_workers=0, shuffle_buffer=4)
    it = iter(L)
    ids = [i for _ in range(50) for i in next(it)["ids"]]
    frac_a = sum(i.startswith("r") for i in ids) / len(ids)
    assert 0.70 < frac_a < 0.80  # 400 draws at p = 0.75


def test_preference_batches(tmp_path, bundle):
    m = bundle.model
    rec = {"id": "p0", "kind": "preference",
           "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit?"}]}],
           "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "seven"}]}],
           "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "one"}]}]}
    write_shards(tmp_path, [({**rec, "id": f"p{i}"}, [png_bytes(i)]) for i in range(4)], per_shard=4)
    enc = SampleEncoder(bundle.tokenizer, bundle.image_processor, m.image_token_id, m.num_image_tokens)
    L = ShardLoader(str(tmp_path), enc, bundle.tokenizer.pad_token_id, batch_size=2, num_workers=0, epochs=1)
    batch = next(iter(L))
    assert batch["preference"]
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape[0] == 4
    tok = bundle.tokenizer
    sup = [tok.decode(r[r != IGNORE]) for r in batch["labels"]]
    assert sup == ["seven<|end|>", "seven<|end|>", "one<|end|>", "one<|end|>"]
    torch.testing.assert_close(batch["pixel_values"][:2], batch["pixel_values"][2:])


@pytest.mark.parametrize("workers", [0, 2])
def test_stride_split_is_world_size_invariant_and_resumes_across_world_sizes(shards, encoder, bundle, workers):
    def take(rank, world, b, n, state=None):
        L = loader(shards, encoder, bundle, batch_size=b, num_workers=workers, split="stride", rank=rank,
                   world_size=world)
        if state:
            L.load_state_dict(state)
        it = iter(L)
        got = [next(it) for _ in range(n)]
        return got, L.state_dict()

    single, _ = take(0, 1, 4, 12)
    r0, sd0 = take(0, 2, 2, 12)
    r1, _ = take(1, 2, 2, 12)
    assert [a["ids"] + b["ids"] for a, b in zip(r0, r1)] == [s["ids"] for s in single]
    # a cursor saved at world size 2 after 5 global batches resumes at world size 1 (and back)
    _, sd = take(0, 2, 2, 5)
    resumed, sd1 = take(0, 1, 4, 7, state=sd)
    assert [b["ids"] for b in resumed] == [s["ids"] for s in single[5:12]]
    back0, _ = take(0, 2, 2, 3, state=sd1)
    back1, _ = take(1, 2, 2, 3, state=sd1)
    more, _ = take(0, 1, 4, 15)
    assert [a["ids"] + b["ids"] for a, b in zip(back0, back1)] == [s["ids"] for s in more[12:15]]
    with pytest.raises(VlmtrainError, match="global batch"):
        take(0, 1, 2, 1, state=sd)  # 2 × 1 ≠ the saved global batch of 4


def test_anyres_tiling_expands_one_image_into_base_plus_tiles(bundle):
    from PIL import Image

    from vlmtrain.data.anyres import AnyResTiler, select_best_resolution

    assert select_best_resolution((100, 40), [(64, 32), (32, 64), (64, 64)]) == (64, 32)
    assert select_best_resolution((40, 100), [(64, 32), (32, 64), (64, 64)]) == (32, 64)
    m = bundle.model
    tiler = AnyResTiler([(64, 32), (32, 64), (64, 64)], tile=32)
    views = tiler(Image.new("RGB", (100, 40), (200, 10, 10)))
    assert len(views) == 3 and all(v.size == (32, 32) for v in views[1:])
    enc = SampleEncoder(bundle.tokenizer, bundle.image_processor, m.image_token_id, m.num_image_tokens, tiler=tiler)
    rec = chat_record(0, n_images=1)
    out = enc(rec, [Image.new("RGB", (100, 40))])
    assert out["pixel_values"].shape[0] == 3
    assert out["input_ids"].count(m.image_token_id) == 3 * m.num_image_tokens
    plain = SampleEncoder(bundle.tokenizer, bundle.image_processor, m.image_token_id, m.num_image_tokens)(
        rec, [Image.new("RGB", (100, 40))])
    sup = lambda o: [t for t in o["labels"] if t != IGNORE]  # noqa: E731
    assert sup(out) == sup(plain)  # tiling changes image slots only, never supervision
    with torch.no_grad():
        assert m(torch.tensor([out["input_ids"]]), out["pixel_values"]).logits.shape[1] == len(out["input_ids"])


@pytest.mark.parametrize("mode", ["plain", "pack"])
def test_encoded_cache_changes_nothing_but_the_work(tmp_path, encoder, bundle, mode):
    """Three epochs with the encoded-sample cache on give exactly the batches (and skip counts) of an uncached
    run, while each sample is encoded once, not three times; a malformed sample is still counted every epoch."""
    out = tmp_path / "s"
    samples = [(chat_record(i), [png_bytes(i)]) for i in range(12)]
    samples.append(({"id": "bad", "kind": "chat", "messages": []}, [png_bytes(99)]))
    write_shards(out, samples, per_shard=13)
    calls = Counter()

    def counting(rec, images):
        calls[rec["id"]] += 1
        return encoder(rec, images)

    kw = dict(batch_size=4, num_workers=0, mode=mode, pack_len=128, pack_chunk=12)
    plain = loader(str(out), encoder, bundle, cache_mb=0, **kw)
    cached = loader(str(out), counting, bundle, cache_mb=64, **kw)
    it_a, it_b = iter(plain), iter(cached)
    n = 9 if mode == "plain" else 6  # three epochs of 12 good samples
    for _ in range(n):
        assert _same(next(it_a), next(it_b))
    assert plain.skipped == cached.skipped and sum(cached.skipped.values()) >= 2
    assert set(calls.values()) == {1} and len(calls) == 12


def test_receiving_ahead_keeps_order_errors_and_stops():
    import threading
    import time

    from vlmtrain.data.loader import _received_ahead

    assert list(_received_ahead(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise VlmtrainError("worker failed on shard x")

    it = iter(_received_ahead(failing()))
    assert next(it) == 1
    with pytest.raises(VlmtrainError, match="worker failed"):
        next(it)
    gen = iter(_received_ahead(iter(range(10**6))))
    next(gen)
    gen.close()  # the consumer stops early: the receiver thread must end too
    deadline = time.time() + 5
    while any(t.name == "vlmtrain-batch-receiver" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "vlmtrain-batch-receiver" for t in threading.enumerate())


def test_workers_are_born_with_preemption_signals_blocked_and_then_ignore_them(shards, encoder, bundle):
    """A DataLoader worker is forked from the batch-receiver thread, whose mask blocks SIGTERM/SIGUSR1: a signal
    sent to the process group between the fork and `worker_init` stays pending and is then discarded (the worker
    ignores them), instead of killing the worker. Read from the kernel (/proc/PID/status), with the worker alive."""
    import signal

    import psutil

    def bits(pid: int, field: str) -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(ln.split()[1], 16) for ln in f if ln.startswith(field + ":"))

    before = {p.pid for p in psutil.Process().children()}  # a pytest worker may have others (warm launchers)
    it = iter(loader(shards, encoder, bundle, batch_size=2, num_workers=1))
    next(it)
    [worker] = [p for p in psutil.Process().children() if p.pid not in before]  # torch names it pt_data_worker
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        assert bits(worker.pid, "SigBlk") >> (sig - 1) & 1, sig.name
        assert bits(worker.pid, "SigIgn") >> (sig - 1) & 1, sig.name
    main = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert signal.SIGTERM not in main  # this thread (the training loop's) still receives them
    it.close()
