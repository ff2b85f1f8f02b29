"""Mistral 3 (`mistral3`, Mistral-Small-3.1/3.2) against transformers' own model and processor.

One tiny `save_pretrained` checkpoint per pytest run (module-scoped). transformers 5.23 marks PixtralProcessor
`requires torchvision` only for a size helper its module imports from the torchvision image processor; vlmtrain runs
transformers' own processing_pixtral.py with that import served by the PIL image processor's module (same function),
over PixtralImageProcessorPil. Checked here: that PIL path against the torchvision processor's outputs committed in
tests/fixtures/image_processors.npz (written in a side environment with torchvision, see the generator there); forward
on 0/1/2-image samples equals transformers' logits exactly; labels are the configured template's assistant spans (no
official template is vendored: `chat_template:` is required, one exit-2 line otherwise); packed rows keep samples
apart; LoRA and QLoRA merge to the same logits. `describe` of the default config: tests/test_describe_all.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from native_fixtures import (USER_TEMPLATES, adapter_step, assert_merge_keeps_logits, checkpoint, encoded_batch,
                             model_config, records)

FIXTURE = Path(__file__).parent / "fixtures" / "image_processors.npz"

TEMPLATE = USER_TEMPLATES["mistral3"]  # the test template in mistral3's layout (native_fixtures)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("native-mistral3")
    checkpoint(root, "mistral3")
    return root


@pytest.fixture
def bundle(root):
    from vlmtrain.model import build_model

    return build_model(model_config(checkpoint(root, "mistral3"), chat_template=TEMPLATE))



def test_pil_image_processor_matches_transformers_torchvision_processor():
    """PixtralImageProcessorPil (what vlmtrain loads without torchvision) against PixtralImageProcessor's outputs
    (the fixture): sizes exact; pixel values within PIL-vs-torch bicubic. PIL's bicubic kernel has a = -0.5, torch's
    a = -0.75 (torch.nn.functional.interpolate docs), which shows where the scale is near 1 (120×36 → 64×32: at most
    6.8 uint8 levels, 0.33 on average); strong downscales (both antialiased) differ by at most one level."""
    from PIL import Image
    from transformers import PixtralImageProcessorPil

    ref = np.load(FIXTURE)
    ip = PixtralImageProcessorPil(**json.loads(str(ref["mistral3/config"])))
    level = 1 / 255 / min(ip.image_std)  # one uint8 step after normalising
    for i in range(6):
        got = ip(images=[Image.fromarray(ref[f"mistral3/{i}/image"])], return_tensors="np")
        want = ref[f"mistral3/{i}/pixel_values"]
        assert np.array_equal(got["image_sizes"], ref[f"mistral3/{i}/image_sizes"])
        assert got["pixel_values"].shape == want.shape
        diff = np.abs(got["pixel_values"] - want)
        assert diff.max() <= 7 * level and diff.mean() <= level / 2, (i, diff.max() / level, diff.mean() / level)


def test_processor_is_transformers_pixtral_processor_without_torchvision(bundle):
    import inspect

    import transformers
    from transformers import PixtralImageProcessorPil

    proc = bundle.processor
    assert type(proc).__name__ == "PixtralProcessor" and type(proc.image_processor) is PixtralImageProcessorPil
    # the class is transformers' installed processing_pixtral.py, not a copy
    installed = Path(transformers.__file__).parent / "models" / "pixtral" / "processing_pixtral.py"
    assert Path(inspect.getfile(type(proc))) == installed
    with pytest.raises(ImportError):
        import torchvision  # noqa: F401  (the environment this path exists for)


def test_forward_equals_transformers_logits_and_labels_are_the_assistant_spans(bundle):
    import re

    m = bundle.model
    samples, (ids, pixels, mask), extras = encoded_batch(bundle)
    assert set(extras) == {"image_sizes"} and pixels.shape[0] == 3
    # [IMG] per 16 px token (8 px patches merged 2×2): the image sizes the processor chose, rows closed by [IMG_BREAK]
    sizes = extras["image_sizes"].tolist()
    assert int((ids == m.image_token_id).sum()) == sum((h // 16) * (w // 16) for h, w in sizes)
    m.eval()
    with torch.no_grad():
        ours = m(ids, pixels, mask, **extras).logits
        ref = m.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, **extras).logits
    assert torch.equal(ours, ref)
    tok = bundle.tokenizer
    for (rec, _), s in zip(records(), samples):
        rendered = tok.apply_chat_template(rec["messages"], chat_template=TEMPLATE, tokenize=False)
        text = re.sub(r"(\[IMG\]|\[IMG_BREAK\])*\[IMG_END\]", "[IMG]", tok.decode(s["input_ids"]))
        assert text == rendered
        answers = [p["text"] for m in rec["messages"] if m["role"] == "assistant" for p in m["content"]]
        assert tok.decode([t for t in s["labels"] if t != -100]) == "".join(a + "</s>" for a in answers)


def test_without_a_chat_template_is_refused_with_one_line(root):
    from vlmtrain.errors import ConfigError
    from vlmtrain.model import build_model

    with pytest.raises(ConfigError) as e:
        build_model(model_config(checkpoint(root, "mistral3")))
    assert e.value.exit_code == 2 and len(str(e.value).splitlines()) == 1
    assert str(e.value).startswith("chat_template: 'mistral3' has no official template vendored in vlmtrain")


def test_packed_rows_keep_samples_apart(bundle):
    """test_native_pack's packed rows (3 and 4 samples, 0-2 images each): each sample's logits equal it alone."""
    from test_native_hybrid_moe import _packed_vs_alone

    assert max(_packed_vs_alone(bundle)) <= 1e-5


@pytest.mark.parametrize("quantize", [False, True], ids=["lora", "qlora"])
def test_lora_on_lm_and_tower_merges_to_the_same_model(bundle, quantize):
    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.model.lora import apply_lora
    from vlmtrain.model.quantize import quantize_llm_

    m = bundle.model
    _, args, extras = encoded_batch(bundle)
    if quantize:
        assert quantize_llm_(m, torch.float32) > 0
    names = apply_lora(m, LoRAConfig(r=4, quantize="4bit" if quantize else None), llm=True, vision=not quantize)
    assert any(n.startswith("llm.model.layers.1.self_attn.") for n in names)
    assert quantize or any(n.startswith("vision.model.transformer.layers.0.attention.") for n in names)
    trained = adapter_step(m, args, extras)
    assert trained and all("lora_" in n for n in trained)
    assert_merge_keeps_logits(m, args, extras, dequantize=quantize)


def test_published_folder_layout_loads_without_torchvision(root, tmp_path):
    """A checkpoint folder as Mistral publishes it (`preprocessor_config.json` naming the torchvision class
    PixtralImageProcessor, `processor_config.json` naming PixtralProcessor) loads as transformers' PixtralProcessor over
    the PIL image processor, and expands an image as the tiny checkpoint's processor does."""
    import shutil

    from transformers import PixtralImageProcessorPil

    from native_fixtures import image
    from vlmtrain.model.native.processor import load_processor

    src = checkpoint(root, "mistral3")
    folder = tmp_path / "Mistral-Small-3.1-like"
    shutil.copytree(src, folder)
    saved = json.loads((folder / "processor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {**saved.pop("image_processor"), "processor_class": "PixtralProcessor"}))
    (folder / "processor_config.json").write_text(json.dumps(saved))
    proc = load_processor(folder, "mistral3")
    assert type(proc).__name__ == "PixtralProcessor" and type(proc.image_processor) is PixtralImageProcessorPil
    want = load_processor(src, "mistral3")
    img = image(40, 30, 1)
    got, ref = proc(text=["a [IMG] b"], images=[img]), want(text=["a [IMG] b"], images=[img])
    assert torch.equal(got["input_ids"], ref["input_ids"]) and torch.equal(got["pixel_values"], ref["pixel_values"])
