"""One line before the tests: the CPU and the kernels torch and bitsandbytes chose on it, so that a failure on a
new CPU model can be read from the CI log (bitsandbytes picks a bf16 4-bit path on AVX512-BF16: model/quantize.py)."""

import importlib.util
import platform
from pathlib import Path

import torch


def cpu() -> tuple[str, list[str]]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                 platform.processor() or "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_tile")
    return model, [f for f in wanted if f in flags]


def bnb_line() -> str:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return "bitsandbytes absent"
    fused = bool(bnb.functional.has_avx512bf16())
    kernels = importlib.util.find_spec("kernels") is not None
    path = ("fused bf16 gemv (" + ("kernels-community" if kernels else "libbitsandbytes_cpu") + ")") if fused \
        else "dequantize + linear"
    return f"bitsandbytes {bnb.__version__} eval 4-bit path: {path}; vlmtrain's layers: dequantize + linear"


if __name__ == "__main__":
    model, flags = cpu()
    print(f"hardware: {model} | {torch.get_num_threads()} threads | flags {' '.join(flags) or '-'} | "
          f"torch {torch.__version__} cpu capability {torch.backends.cpu.get_cpu_capability()} | {bnb_line()}",
          flush=True)
