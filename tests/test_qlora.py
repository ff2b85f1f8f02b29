"""QLoRA (`lora.quantize: 4bit`, model/quantize.py): the LLM's Linears (not the LM head) become bitsandbytes NF4
layers, adapters train on top, the stage's output is the dequantised base with the adapters merged. References:
bitsandbytes' own dequantisation, the planner's NF4 byte count, PEFT's export loaded by transformers."""

import json
import subprocess

import bitsandbytes as bnb
import pytest
import torch

from conftest import VLMTRAIN, tiny_bundle
from test_lora import _ids_pix, _stage
from vlmtrain.config.load import validate
from vlmtrain.config.stage import StageConfig
from vlmtrain.errors import ConfigError
from vlmtrain.train.presets import with_preset

QLORA = {"r": 4, "alpha": 8, "dropout": 0.0, "quantize": "4bit"}


def test_llm_linears_become_nf4_computing_with_the_dequantised_weights():
    from vlmtrain.model.quantize import quantize_llm_
    from vlmtrain.plan.core import NF4_BYTES_PER_PARAM

    bundle = tiny_bundle()
    m = bundle.model
    linears = [(n, mod) for n, mod in m.llm.named_modules() if type(mod) is torch.nn.Linear]
    head = m.llm.get_output_embeddings()
    n_weights = sum(mod.weight.numel() for _, mod in linears if mod is not head)
    assert quantize_llm_(m, torch.float32) == len(linears) - 1
    assert m.llm.get_output_embeddings() is head and type(head) is torch.nn.Linear
    quantized = [mod for mod in m.llm.modules() if isinstance(mod, bnb.nn.Linear4bit)]
    assert len(quantized) == len(linears) - 1
    assert not any(isinstance(mod, bnb.nn.Linear4bit) for mod in m.vision.modules())
    torch.manual_seed(0)
    for q in quantized:
        w = q.weight
        assert w.dtype == torch.uint8 and not w.requires_grad and w.quant_state.quant_type == "nf4"
        x = torch.randn(3, q.in_features)
        ref = torch.nn.functional.linear(x, bnb.functional.dequantize_4bit(w.data, w.quant_state), q.bias)
        assert (q(x) - ref).abs().max() <= 1e-5
    # storage: packed 4-bit weights + per-block absmax (double-quantised) ≈ the planner's bytes per weight
    stored = sum(q.weight.data.numel() + q.weight.quant_state.absmax.numel() * q.weight.quant_state.absmax.element_size()
                 + q.weight.quant_state.state2.absmax.numel() * 4 for q in quantized)
    assert stored == pytest.approx(n_weights * NF4_BYTES_PER_PARAM, rel=0.02)
    # bf16-true: Lightning casts the whole module to bf16; the packed 4-bit weights must come through untouched
    from lightning.pytorch.plugins.precision import HalfPrecision

    packed = [q.weight.data.clone() for q in quantized]
    HalfPrecision("bf16-true").convert_module(m)
    assert all(q.weight.dtype == torch.uint8 and torch.equal(q.weight.data, w) for q, w in zip(quantized, packed))
    assert head.weight.dtype == torch.bfloat16


def _nf4(n_in=128, n_out=64):
    torch.manual_seed(0)
    lin = torch.nn.Linear(n_in, n_out, bias=True)
    q = bnb.nn.Linear4bit(n_in, n_out, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                          quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4")
    q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
    return q.to("cpu")


def test_one_nf4_layer_in_eval_computes_what_the_merge_assumes_on_every_cpu():
    """bitsandbytes 0.50.2 on an AVX512-BF16 CPU rewrites an eval-mode layer's weight into a CPU-tiled layout and
    computes in bf16 (model/quantize.py). The layers quantize_llm_ makes never do: in train and eval mode, with and
    without grad, their output is `linear(x, dequantize_4bit(W))` in fp32, and their bytes stay put. On a CPU with
    the fused path, bitsandbytes' own layer is shown to leave it (the cause), and dequantize_ still recovers W."""
    from vlmtrain.model.quantize import dequantize_, quantize_llm_

    holder = torch.nn.Module()  # quantize_llm_ works on `model.llm`, whose output embedding is not quantised
    torch.manual_seed(1)
    holder.llm = torch.nn.Sequential(torch.nn.Linear(128, 64))
    holder.llm.get_output_embeddings = lambda: None
    assert quantize_llm_(holder, torch.float32) == 1
    q = holder.llm[0]
    w = q.weight
    packed = w.data.clone()
    W = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    x = torch.randn(5, 128)
    ref = torch.nn.functional.linear(x, W, q.bias)
    for mode in ("train", "eval"):
        getattr(q, mode)()
        with torch.no_grad():
            assert torch.equal(q(x), ref), mode
        assert torch.equal(q(x.clone().requires_grad_(True)), ref), mode
    assert torch.equal(w.data, packed) and not getattr(w.quant_state, "packing_format_for_cpu", False)
    dequantize_(holder)
    assert torch.equal(holder.llm[0].weight, W)

    if not bnb.functional.has_avx512bf16():
        return
    raw = _nf4()  # bitsandbytes' own layer, its default path on this CPU
    W_raw = bnb.functional.dequantize_4bit(raw.weight.data, raw.weight.quant_state).float()
    raw.eval()
    with torch.no_grad():
        bf16_out = raw(x)
    assert raw.weight.quant_state.packing_format_for_cpu  # rewritten in place
    assert (bf16_out - torch.nn.functional.linear(x, W_raw, raw.bias)).abs().max() > 1e-4  # bf16 rounding
    box = torch.nn.Sequential(raw)
    dequantize_(box)
    # the tiling undone; absmax went through bf16 in bitsandbytes' rewrite, so W comes back to bf16 precision
    torch.testing.assert_close(box[0].weight, W_raw, rtol=1e-2, atol=1e-2)


def test_qlora_trains_only_adapters_and_connector():
    from test_train import _samples

    from vlmtrain.data.batching import collate
    from vlmtrain.model.lora import lora_layers
    from vlmtrain.train.freeze import apply_stage_trainability
    from vlmtrain.train.module import VLMModule
    from vlmtrain.train.runner import load_stage_start

    stage = validate(StageConfig, with_preset(_stage(lora=QLORA)))
    bundle = load_stage_start(stage, ".")
    apply_stage_trainability(bundle.model, stage.train)
    assert all(isinstance(layer.get_base_layer(), bnb.nn.Linear4bit) for _, layer in lora_layers(bundle.model))
    for _, layer in lora_layers(bundle.model):  # B starts at zero: move it so every A gets a gradient too
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    VLMModule(bundle, stage).accumulate_lm([collate(_samples(bundle, 4), bundle.tokenizer.pad_token_id)])
    grads = {n for n, p in bundle.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    adapters = {n for n, _ in bundle.model.named_parameters() if "lora_" in n}
    connector = {n for n, _ in bundle.model.named_parameters() if n.startswith("connector.")}
    assert grads == adapters | connector


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    from vlmtrain.train.runner import fit_stage

    root = tmp_path_factory.mktemp("qlora")
    summary = fit_stage(validate(StageConfig, with_preset(_stage(lora=QLORA))), root / "q", root / "data")
    return root / "q", summary


def test_qlora_stage_trains_and_its_outputs_reproduce_the_trained_model(qlora_run, tmp_path):
    """The trained model (NF4 base + adapters, rebuilt from the adapter file) = the merged full-precision output
    = PEFT's export (dequantised base + adapter) loaded by transformers."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from vlmtrain.model.io import load_any
    from vlmtrain.train.artifacts import load_lora_stage

    run, summary = qlora_run
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 4 and all(x == x for x in losses) and losses[-1] < losses[0]
    bundle, _ = load_lora_stage(run)
    m = bundle.model.eval()
    ids, pix = _ids_pix(m)
    with torch.no_grad():
        trained = m(ids, pix).logits
        merged = load_any(run / "model").model.eval()(ids, pix).logits
    assert (merged - trained).abs().max() <= 1e-4
    r = subprocess.run([*VLMTRAIN, "export", str(run), "--format", "peft", "--out", str(tmp_path / "peft")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "peft" / "base")
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(base, tmp_path / "peft" / "adapter").eval()(
            input_ids=ids, pixel_values=pix).logits
    assert (peft_logits - trained).abs().max() <= 1e-4


def test_qlora_resume_is_exact(qlora_run, tmp_path):
    from safetensors.torch import load_file

    from vlmtrain.train.runner import fit_stage

    run, _ = qlora_run
    cut = tmp_path / "cut"
    fit_stage(validate(StageConfig, with_preset(_stage(lora=QLORA, trainer={"max_steps": 2}))), cut, run.parent / "data")
    (cut / "summary.json").unlink()
    fit_stage(validate(StageConfig, with_preset(_stage(lora=QLORA))), cut, run.parent / "data", resume=True)
    a = load_file(run / "adapter" / "adapter.safetensors")
    b = load_file(cut / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qlora_with_dora_is_refused():
    with pytest.raises(ConfigError, match="quantize and dora together"):
        validate(StageConfig, with_preset(_stage(lora={**QLORA, "dora": True})))
