import subprocess

import pytest
import torch

from conftest import TINY, TINY_SIGLIP, VLMTRAIN, tiny_bundle
from vlmtrain.errors import VlmtrainError
from vlmtrain.model.hf_llava import export_llava
from vlmtrain.model.inference import generate_text, prompt_messages
from vlmtrain.model.io import load_any, save_vlmtrain

CASES = {
    "clip-llama-mlp2x": (TINY, []),
    "clip-llama-linear": (TINY, ["connector.name=linear"]),
    "siglip-qwen2-tied": (TINY_SIGLIP, ["connector.name=mlp2x_gelu", "connector.args={}"]),
}


def _llava_inputs(folder, image, prompt="What digit is this?"):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(folder)
    inputs = proc.apply_chat_template(prompt_messages(prompt, 1), add_generation_prompt=True, tokenize=True,
                                      return_dict=True, return_tensors="pt", images=[image])
    return proc, inputs


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_in_transformers_with_equal_logits(case, tmp_path, digit_image):
    from transformers import LlavaForConditionalGeneration

    path, ov = CASES[case]
    bundle = tiny_bundle(path, ov, seed=3)
    export_llava(bundle, tmp_path / "hf")
    llava, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    proc, inputs = _llava_inputs(tmp_path / "hf", digit_image)
    n_slots = int((inputs["input_ids"] == bundle.model.image_token_id).sum())
    assert n_slots == bundle.model.num_image_tokens  # the processor expands <image> exactly like vlmtrain
    with torch.no_grad():
        ref = llava.eval()(**inputs).logits
        ours = bundle.model.eval()(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]).logits
        # and vlmtrain's own preprocessing yields the same pixels
        own_pix = bundle.image_processor(images=[digit_image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(own_pix, inputs["pixel_values"])
    assert (ref - ours).abs().max() <= 1e-5
    # greedy generation: transformers on the export == vlmtrain
    with torch.no_grad():
        new = llava.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert proc.tokenizer.decode(new, skip_special_tokens=True) == generate_text(
        bundle, "What digit is this?", [digit_image], 6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_import_round_trip(case, tmp_path, digit_image):
    path, ov = CASES[case]
    bundle = tiny_bundle(path, ov, seed=4)
    export_llava(bundle, tmp_path / "hf")
    back = load_any(tmp_path / "hf")
    assert back.config.connector.name == bundle.config.connector.name
    a, b = bundle.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    ids = torch.tensor([[5, 6] + [bundle.model.image_token_id] * bundle.model.num_image_tokens + [7]])
    pix = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model.eval()(ids, pix).logits, back.model.eval()(ids, pix).logits)
    assert back.tokenizer.chat_template == bundle.tokenizer.chat_template


@pytest.mark.parametrize("connector", ["pixel_shuffle", "ldp", "perceiver_resampler", "qformer", "cross_attn_resampler"])
def test_other_connectors_refuse_llava_and_round_trip_natively(connector, tmp_path):
    args = {"pixel_shuffle": ["connector.args.scale_factor=2"], "qformer": ["connector.args.num_heads=4"],
            "perceiver_resampler": ["connector.args.num_heads=4"], "cross_attn_resampler": ["connector.args.num_heads=4"]}
    bundle = tiny_bundle(TINY, [f"connector.name={connector}", *args.get(connector, [])], seed=5)
    with pytest.raises(VlmtrainError, match="no transformers Llava equivalent"):
        export_llava(bundle, tmp_path / "hf")
    save_vlmtrain(bundle, tmp_path / "vlmtrain")
    back = load_any(tmp_path / "vlmtrain")
    ids = torch.tensor([[5, 6] + [bundle.model.image_token_id] * bundle.model.num_image_tokens + [7]])
    pix = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bundle.model.eval()(ids, pix).logits, back.model.eval()(ids, pix).logits)


def test_cli_export_and_generate_match_transformers(tmp_path, digit_image):
    """The README's contract: export a native folder to hf-llava, then `generate` prints transformers' text."""
    from transformers import LlavaForConditionalGeneration

    bundle = tiny_bundle(TINY, [], seed=6)
    save_vlmtrain(bundle, tmp_path / "model")
    img = tmp_path / "digit.png"
    digit_image.save(img)
    r = subprocess.run([*VLMTRAIN, "export", str(tmp_path / "model"), "--format", "hf-llava", "--out",
                        str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*VLMTRAIN, "generate", str(tmp_path / "hf"), "--image", str(img), "--prompt",
                        "What digit is this?", "--max-new-tokens", "5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    proc, inputs = _llava_inputs(tmp_path / "hf", digit_image)
    new = llava.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert r.stdout.rstrip("\n") == proc.tokenizer.decode(new, skip_special_tokens=True)
