import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY = CONFIGS / "models" / "tiny-clip-llama.yaml"
TINY_SIGLIP = CONFIGS / "models" / "tiny-siglip-qwen2.yaml"
VLMTRAIN = [sys.executable, "-m", "vlmtrain"]


def tiny_bundle(path=TINY, overrides=None, seed=0):
    import torch

    from vlmtrain.config import load_model_config
    from vlmtrain.model import build_model

    torch.manual_seed(seed)
    return build_model(load_model_config(path, overrides or []))


@pytest.fixture(scope="session")
def tiny():
    return tiny_bundle()


@pytest.fixture(scope="session")
def digit_image():
    import io

    from PIL import Image

    from vlmtrain.data.builtin import _digits

    _, png, _ = next(_digits("eval"))
    return Image.open(io.BytesIO(png)).convert("RGB")


@pytest.fixture(scope="session", autouse=True)
def builtin_cache(tmp_path_factory):
    """Builtin datasets made once for the whole session (tests and the subprocesses they start inherit it)."""
    if "VLMTRAIN_BUILTIN_CACHE" not in os.environ:
        os.environ["VLMTRAIN_BUILTIN_CACHE"] = str(tmp_path_factory.mktemp("builtin-cache"))
    yield os.environ["VLMTRAIN_BUILTIN_CACHE"]


@pytest.fixture
def world_of_one():
    """A gloo process group of one rank in this process (FSDP2 needs one), removed afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
