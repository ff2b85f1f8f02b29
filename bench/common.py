"""Shared benchmark plumbing: interleaved repeats, medians, machine description, results files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": dt.date.today().isoformat()}


def interleaved(sides: dict, repeats: int) -> dict[str, list[float]]:
    """Run each side's callable `repeats` times, alternating sides, so drift (thermal, cache) hits both alike."""
    out = {k: [] for k in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            out[name].append(fn())
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def save(name: str, result: dict, out: str | None) -> Path:
    path = Path(out) if out else ROOT / "bench" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


def drop_page_cache() -> bool:
    """Evict the OS page cache (root only) so the next read comes from disk; False when not permitted."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False
