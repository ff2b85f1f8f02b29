"""Small shard sets written directly with webdataset's TarWriter (independent of `vlmtrain prep`)."""

import io
import json

import numpy as np

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def png_bytes(seed: int, size: int = 32) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def chat_record(i: int, n_images: int = 1, turns: int = 1) -> dict:
    msgs = []
    for t in range(turns):
        user = ([{"type": "image"}] * n_images if t == 0 else []) + [{"type": "text", "text": f"q{i} turn {t}?"}]
        msgs += [{"role": "user", "content": user},
                 {"role": "assistant", "content": [{"type": "text", "text": " ".join(WORDS[: 1 + (i + t) % 9])}]}]
    return {"id": f"r{i}", "kind": "chat", "messages": msgs}


def write_shards(out, samples, per_shard: int) -> list[str]:
    """samples: list of (record dict | raw bytes for json, [image bytes]). Returns shard paths; writes manifest."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    paths, shards = [], []
    for s0 in range(0, len(samples), per_shard):
        name = f"shard-{s0 // per_shard:06d}.tar"
        with wds.TarWriter(str(out / name)) as w:
            for k, (rec, imgs) in enumerate(samples[s0 : s0 + per_shard]):
                d = {"__key__": f"{s0 + k:09d}", "json": rec if isinstance(rec, bytes) else json.dumps(rec).encode()}
                for j, b in enumerate(imgs):
                    d[f"img{j}.png"] = b
                w.write(d)
        paths.append(str(out / name))
        shards.append({"name": name, "samples": len(samples[s0 : s0 + per_shard])})
    (out / "manifest.json").write_text(json.dumps({"samples": len(samples), "rejected": 0, "shards": shards}))
    return paths


def chat_shards(out, n: int = 40, per_shard: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        k = int(rng.integers(0, 3))  # 0, 1 or 2 images; text-only included
        samples.append((chat_record(i, k, turns=1 + i % 2), [png_bytes(1000 * seed + 10 * i + j) for j in range(k)]))
    return write_shards(out, samples, per_shard)


def cycled_shards(out, n: int, per_shard: int, max_turns: int = 2):
    """Record i has i % 3 images and 1 + i % max_turns exchanges: every mix of images and turns, deterministic."""
    samples = [(chat_record(i, i % 3, turns=1 + i % max_turns), [png_bytes(i * 10 + j) for j in range(i % 3)])
               for i in range(n)]
    return write_shards(out, samples, per_shard)
