"""`vlmtrain export`: a run, stage, checkpoint or model folder → transformers (hf, hf-llava), vlmtrain's own folder,
or a LoRA stage's PEFT adapter over its base.

An export is staged in a hidden sibling of the output folder and swapped in whole when complete, so a killed
export never leaves a loadable half. It reads runs (`vlmtrain.train.artifacts`), so it sits in train.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from vlmtrain.atomic import swap_dir
from vlmtrain.errors import VlmtrainError
from vlmtrain.train.artifacts import load_lora_stage, load_model_source


def export_model(source: str, fmt: str, out: str | Path) -> str:
    """Export `source` as `fmt` to `out`; returns the line `vlmtrain export` prints.

    Writes into a hidden sibling of `out` and renames it into place when complete: an export killed at any moment
    leaves either the previous folder or none under `out`, never a loadable half (weights without the processor),
    and running the same command again finishes it."""
    final = Path(out)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_exports(final)
    staging = final.parent / f".{final.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        message = _export_into(source, fmt, staging)
        _name_final_folder(staging, final)
        _swap_in(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return message.replace(str(staging), str(final))


def _remove_dead_exports(final: Path) -> None:
    """Hidden siblings left by exports to `final` that were killed (`.NAME.export-PID`, `.NAME.replaced-PID` whose
    process is gone): removed, so retries do not accumulate copies. A live process's folders are left alone."""
    for sibling in final.parent.glob(f".{final.name}.*-*"):
        kind, _, pid = sibling.name[len(final.name) + 2:].rpartition("-")
        if kind not in ("export", "replaced") or not pid.isdigit():
            continue
        if not _alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (signal 0 probes without sending; PermissionError: alive, another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _name_final_folder(staging: Path, final: Path) -> None:
    """Paths the libraries record in their JSON files (PEFT's `base_model_name_or_path` = OUT/base) name the
    folder being written; make them name the folder the export ends up in."""
    for f in staging.rglob("*.json"):
        text = f.read_text(encoding="utf-8")
        if str(staging) in text:
            f.write_text(text.replace(str(staging), str(final)), encoding="utf-8")


def _swap_in(staging: Path, final: Path) -> None:
    """Rename `staging` to `final`, replacing a previous export whole (no stale files of it survive)."""
    swap_dir(staging, final)


def _export_into(source: str, fmt: str, out: Path) -> str:
    """Run the export of `source` as `fmt` into `out`; returns the line to print."""
    if fmt == "peft":
        from vlmtrain.model.hf_llava import export_peft

        bundle, base_connector = load_lora_stage(source)
        if bundle.native:
            from vlmtrain.model.native.peft_export import export_native_peft

            out = export_native_peft(bundle, out, base_connector)
            return (f"exported the LoRA adapter of {source} to {out}/adapter (PEFT) over {out}/base "
                    f"({bundle.model.model_type})")
        out = export_peft(bundle, out, base_connector)
        return f"exported the LoRA adapter of {source} to {out}/adapter (PEFT) over {out}/base (Llava)"
    bundle = load_model_source(source)
    if bundle.native:
        if fmt == "vlmtrain":
            raise VlmtrainError("export --format vlmtrain: a native model's own format is its transformers "
                                "folder; use --format hf")
        if fmt == "hf-llava" and bundle.model.model_type != "llava":
            raise VlmtrainError(f"export --format hf-llava: {bundle.model.model_type} is not a Llava model; "
                                "use --format hf")
        from vlmtrain.model.native.build import save_native_hf

        out = save_native_hf(bundle, out)
    elif fmt in ("hf-llava", "hf"):
        from vlmtrain.model.hf_llava import export_llava

        out = export_llava(bundle, out)
    else:
        from vlmtrain.model.io import save_vlmtrain

        out = save_vlmtrain(bundle, out)
    return f"exported {source} as {fmt} to {out}"
