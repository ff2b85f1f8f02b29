"""Data loading: vlmtrain's shard loader vs the LLaVA pattern ("JSON list + image folder" map-style Dataset).

Same 5,000 records (LLaVA JSON, 224 px JPEGs of scikit-learn digits), same tokenizer, chat template, masks and image
processor (the tiny preset's), same batch size and 2 DataLoader workers. The LLaVA-style side loads the whole JSON
list in RAM and opens one image file per sample (LLaVA's `LazySupervisedDataset`); vlmtrain streams tar shards
written once by `vlmtrain prep llava`. Reported: samples/s over one full pass, median of interleaved repeats.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import ROOT, drop_page_cache, interleaved, machine, median, save

BATCH, WORKERS = 16, 2
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def make_llava_folder(root: Path, n: int) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    records = []
    for i in range(n):
        k = i % len(d.images)
        im = Image.fromarray((d.images[k] * 15).astype(np.uint8), "L").resize((224, 224), Image.BILINEAR)
        im.convert("RGB").save(img_dir / f"{i:06d}.jpg", quality=90)
        turns = [{"from": "human", "value": "<image>\nWhat digit is this?"},
                 {"from": "gpt", "value": WORDS[int(d.target[k])]}]
        for t in range(i % 3):  # variable length: 1-3 exchanges
            turns += [{"from": "human", "value": f"Say it again ({t})."}, {"from": "gpt", "value": WORDS[int(d.target[k])]}]
        records.append({"id": f"r{i}", "image": f"{i:06d}.jpg", "conversations": turns})
    (root / "data.json").write_text(json.dumps(records))
    return root


class LlavaStyleDataset(torch.utils.data.Dataset):
    """The peer pattern: JSON list in memory, one image file opened per __getitem__."""

    def __init__(self, json_path: Path, image_dir: Path, encoder):
        self.records = json.loads(Path(json_path).read_text())
        self.image_dir, self.encoder = Path(image_dir), encoder

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        from PIL import Image

        r = self.records[i]
        image = Image.open(self.image_dir / r["image"]).convert("RGB")
        msgs = []
        for t in r["conversations"]:
            role = "user" if t["from"] == "human" else "assistant"
            parts = []
            for j, piece in enumerate(t["value"].split("<image>")):
                if j:
                    parts.append({"type": "image"})
                if piece.strip("\n"):
                    parts.append({"type": "text", "text": piece.strip("\n")})
            msgs.append({"role": role, "content": parts})
        return self.encoder({"id": r["id"], "kind": "chat", "messages": msgs}, [image])


def run(quick: bool = False, out: str | None = None) -> dict:
    from vlmtrain.config import load_model_config
    from vlmtrain.data.batching import collate
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.data.loader import ShardLoader
    from vlmtrain.model import build_model

    n, repeats = (200, 1) if quick else (5000, 3)
    bundle = build_model(load_model_config(ROOT / "configs/models/tiny-clip-llama.yaml"))
    enc = encoder_for(bundle, 512)
    pad = bundle.tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_llava_folder(tmp / "src", n)
        t = time.time()
        subprocess.run([sys.executable, "-m", "vlmtrain", "prep", "llava", "--json", str(tmp / "src/data.json"),
                        "--images", str(tmp / "src/images"), "--out", str(tmp / "shards"), "--shard-size",
                        str(max(n // 20, 10))], check=True, capture_output=True)
        prep_s = time.time() - t

        def ours() -> float:
            t0 = time.perf_counter()
            loader = ShardLoader(str(tmp / "shards"), enc, pad, batch_size=BATCH, num_workers=WORKERS, epochs=1,
                                 shuffle_buffer=64)
            seen = sum(len(b["ids"]) for b in loader)
            assert seen == n, seen
            return seen / (time.perf_counter() - t0)

        ds = LlavaStyleDataset(tmp / "src/data.json", tmp / "src/images", enc)

        def peer() -> float:
            t0 = time.perf_counter()
            dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=WORKERS,
                                             collate_fn=lambda xs: collate(xs, pad))
            seen = sum(b["input_ids"].shape[0] for b in dl)
            assert seen == n, seen
            return seen / (time.perf_counter() - t0)

        runs = {"warm": interleaved({"vlmtrain": ours, "llava_style": peer}, repeats)}
        if not quick and drop_page_cache():  # cold: every pass reads from disk (5,000 files vs 20 tars)
            runs["cold"] = interleaved({"vlmtrain": lambda: (drop_page_cache(), ours())[1],
                                        "llava_style": lambda: (drop_page_cache(), peer())[1]}, repeats)
    ratios = {k: median(v["vlmtrain"]) / median(v["llava_style"]) for k, v in runs.items()}
    a, b = median(runs["warm"]["vlmtrain"]), median(runs["warm"]["llava_style"])
    result = {
        "bench": "data", "quick": quick, "records": n, "batch_size": BATCH, "workers": WORKERS, "repeats": repeats,
        "prep_seconds": prep_s, "runs": runs, "ratios": ratios, "machine": machine(),
        "headline": {"ratio": a / b, "vlmtrain_samples_per_s": a, "peer_samples_per_s": b,
                     "cold_cache_ratio": ratios.get("cold"),
                     "peer": "LLaVA-style JSON list + image folder Dataset"},
    }
    save("data" + ("-quick" if quick else ""), result, out)
    return result
