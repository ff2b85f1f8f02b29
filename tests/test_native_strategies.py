"""Native families under sharded strategies (torchrun, 2 CPU ranks, gloo): FSDP2 (per decoder block and per vision
block from `Family.blocks`), DeepSpeed ZeRO-2 and ZeRO-3 each equal one process with the same global batch (per-step losses
and final weights ≤1e-5), on data where every step gives rank 0 two text-only samples and rank 1 two image samples
— the text-only rank runs a blank image through the sharded tower (`NativeVLM.blank_image_features`), so neither
rank waits on the other."""

import json

import pytest
import yaml

from conftest import ROOT
from native_fixtures import FAMILIES, NEW_FAMILIES, USER_TEMPLATES, checkpoint, model_config
from shard_fixtures import chat_record, png_bytes, write_shards
from test_distributed import STEPS, assert_same_run, plain, torchrun


@pytest.mark.parametrize("family", FAMILIES + NEW_FAMILIES)
def test_family_blocks_are_the_transformer_blocks_fsdp_wraps(tmp_path, family):
    """`Family.blocks` (what FSDP2 wraps per block) resolves, per role, to the model's one list of repeated blocks
    (found independently here by its name among the role's modules)."""
    from torch import nn

    from vlmtrain.model import build_model
    from vlmtrain.train.strategy import layer_lists

    model = build_model(model_config(checkpoint(tmp_path, family))).model
    lists = layer_lists(model, ("vision", "llm"))
    assert len(lists) == 2
    for role, found in zip(("vision", "llm"), lists):
        by_name = [m for n, m in getattr(model, role).named_modules()
                   if isinstance(m, nn.ModuleList) and len(m) and n.rsplit(".", 1)[-1] in ("layers", "blocks")]
        assert len(by_name) == 1 and found is by_name[0], (family, role)
        assert len(found) == 2  # the tiny checkpoints have 2 blocks per tower and LM


def text_rank_beside_image_rank(out, n: int = 32) -> None:
    """Shards of 4 records [text, text, 1 image, 2 images]: with `split: stride` and batch 2 per rank, global batch
    g is shard g, rank 0 gets its two text-only records and rank 1 the two with images."""
    samples = [(chat_record(i, max(0, i % 4 - 1), turns=1), [png_bytes(10 * i + j) for j in range(max(0, i % 4 - 1))])
               for i in range(n)]
    write_shards(out, samples, per_shard=4)


# An MoE family's router load-balancing loss is computed over each rank's own tokens (as transformers' forward does
# under any data parallelism), so with it on 2 ranks cannot equal one process (measured for qwen3_vl_moe at the
# config's 0.001: 1.9e-4 apart in loss); these runs compare the sharded experts with the router loss off.
FAMILY_TRAINER = {"qwen3_5_moe": {"router_aux_loss_coef": 0.0}}


def family_model(family: str) -> dict:
    """Model-config extras a family's tiny checkpoint needs: a user's chat template where none is vendored."""
    return {"chat_template": USER_TEMPLATES[family]} if family in USER_TEMPLATES else {}


def stage(tmp_path, family: str, name: str, **trainer) -> str:
    cfg = {"name": "sft", "preset": "sft",
           "model": {"pretrained": str(checkpoint(tmp_path / "ck", family)), **family_model(family)},
           "data": {"train": [{"path": str(tmp_path / "shards")}], "batch_size": 4 if not trainer else 2,
                    "num_workers": 1, "max_len": 256, "split": "stride", "shuffle_buffer": 1},
           # eps 1e-6: Adam divides by √v + eps, so with the default 1e-8 an element whose gradient is float noise
           # (~1e-9, from a sum taken in another order across ranks) still moves by up to lr; gemma3's ZeRO-3 run
           # ended 3.5e-5 off one process in one MLP weight that way while every loss agreed to 4e-7
           "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0, "eps": 1e-6},
           "trainer": {"max_steps": STEPS, "save_every_n_steps": 2, "log_every_n_steps": 1,
                       **FAMILY_TRAINER.get(family, {}), **trainer}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


SHARDED = ("fsdp", "deepspeed_zero2", "deepspeed_zero3")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """family → a folder with `text_rank_beside_image_rank` shards and the reference run on them, in one process
    with the global batch (4) of the 2-rank runs: `ref/`. Made once per family for the tests below."""
    made = {}

    def run(family: str):
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            text_rank_beside_image_rank(root / "shards")
            r = plain("fit", "--config", stage(root, family, "one"), "--out", str(root / "ref"), timeout=600)
            assert r.returncode == 0, r.stderr[-3000:]
            made[family] = root
        return made[family]

    return run


@pytest.mark.parametrize("family", FAMILIES + NEW_FAMILIES + ("gemma4", "internvl", "mistral3", "llama4", "lfm2_vl"))
def test_blank_image_touches_exactly_the_parameters_a_real_image_does(tmp_path, family):
    """What a text-only rank runs instead of an image (`NativeVLM.blank_image_features`, weighted 0) gives gradients
    to the same tower and connector parameters as a real image through transformers' forward — no more (LLaVA's
    unused top tower layer, the tower's post-norm) and no fewer (OneVision's `image_newline`): sharded ranks then
    gather and reduce the same tensors whichever data they hold."""
    import torch

    from vlmtrain.data.batching import collate
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.model import build_model
    from vlmtrain.train.module import model_extras
    from native_fixtures import records

    bundle = build_model(model_config(checkpoint(tmp_path, family), **family_model(family)))
    m = bundle.model.train()
    m.requires_grad_(False)
    m.vision.requires_grad_(True)
    m.connector.requires_grad_(True)
    rec, images = records()[0]
    b = collate([encoder_for(bundle)(rec, images)], bundle.tokenizer.pad_token_id)
    m(b["input_ids"], b["pixel_values"], b["attention_mask"], **model_extras(b)).logits.float().sum().backward()
    real = {n for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    m.blank_image_features(torch.device("cpu")).backward()
    blank = {n for n, p in m.named_parameters() if p.grad is not None}
    assert real and blank == real, sorted(real ^ blank)


def test_mllama_text_only_batch_runs_a_padding_image_slot_through_its_cross_attention(tmp_path):
    """Mllama's blank image is a padding image slot per row run through transformers' forward (its LM calls the
    cross-attention layers only when image states exist): a text-only batch then gives gradients to exactly the
    parameters a real image does (tower, projector and the cross-attention layers included), and its logits equal
    transformers' text-only forward exactly (the slot's zeroed states add nothing)."""
    import torch

    from vlmtrain.data.batching import collate
    from vlmtrain.data.inspect import encoder_for
    from vlmtrain.model import build_model
    from vlmtrain.train.module import model_extras
    from native_fixtures import records

    bundle = build_model(model_config(checkpoint(tmp_path, "mllama")))
    m, enc, pad = bundle.model.train(), encoder_for(bundle), bundle.tokenizer.pad_token_id
    img = collate([enc(*records()[0])], pad)
    m(img["input_ids"], img["pixel_values"], img["attention_mask"], **model_extras(img)).logits.sum().backward()
    real = {n for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    text = collate([enc(*records()[1])], pad)
    assert text.get("pixel_values") is None
    m.always_encode_images = True
    out = m(text["input_ids"], None, text["attention_mask"], **model_extras(text)).logits
    out.sum().backward()
    blank = {n for n, p in m.named_parameters() if p.grad is not None}
    assert any("cross_attn" in n for n in real) and blank == real, sorted(real ^ blank)
    with torch.no_grad():
        alone = m.hf(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).logits
    assert torch.equal(out.detach(), alone)


@pytest.mark.parametrize("family", ["llava_onevision"])
def test_fsdp2_trains_the_bare_parameter_transformers_reads(tmp_path, family, world_of_one):
    """OneVision's `image_newline` is a bare parameter of the connector role that transformers reads from its own
    module. FSDP2 replaces the role's parameter objects; the forward must use the replacement: under FSDP2 (a world
    of one) its gradient equals the unsharded model's on the same batch. Before `_share_bare_parameters`
    transformers used the stale object (no gradient reached the sharded one: it never trained under fsdp)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from vlmtrain.data.batching import collate
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.model import build_model
    from vlmtrain.train.module import model_extras
    from vlmtrain.train.strategy import apply_fsdp2
    from native_fixtures import records

    def image_newline_grad(sharded: bool):
        bundle = build_model(model_config(checkpoint(tmp_path, family)))
        m = bundle.model.train()
        assert [n for n, _ in m.named_parameters() if n.endswith("image_newline")] == ["connector.image_newline"]
        if sharded:
            apply_fsdp2(m, init_device_mesh("cpu", (1,)))
        rec, images = records()[0]
        b = collate([encoder_for(bundle)(rec, images)], bundle.tokenizer.pad_token_id)
        m(b["input_ids"], b["pixel_values"], b["attention_mask"], **model_extras(b)).logits.float().sum().backward()
        grad = m.connector.image_newline.grad
        return grad.full_tensor() if sharded and grad is not None else grad

    plain, sharded = image_newline_grad(False), image_newline_grad(True)
    assert plain is not None and float(plain.abs().sum()) > 0
    assert sharded is not None, "under FSDP2 no gradient reached the role's image_newline"
    torch.testing.assert_close(sharded, plain, rtol=0, atol=1e-6)


# per family: the strategies run against one process (each torchrun run costs ~1 min on 2 CPU cores); the blank-image
# test above covers every family in-process
SHARDED_RUNS = {"qwen2_5_vl": SHARDED, "gemma3": SHARDED, "llava_onevision": ("deepspeed_zero3",),
                "idefics3": ("fsdp",),
                # hybrid Gated DeltaNet + attention LM with fused experts: ranks route their tokens to different experts
                "qwen3_5_moe": ("fsdp", "deepspeed_zero3"),
                # a padding image slot through the forward on the text-only rank (its cross-attention layers run)
                "mllama": ("fsdp",),
                # InternVL's one-tile blank image; Gemma 4's pooled patches beside its frozen audio tower
                "internvl": ("fsdp",), "gemma4": ("fsdp",),
                # Pixtral's 2×2 merged tokens; Llama 4's tile projected outside get_image_features and its fused
                # experts; LFM2-VL's NaFlex tile beside its short-convolution layers
                "mistral3": ("fsdp",), "llama4": ("fsdp", "deepspeed_zero3"), "lfm2_vl": ("fsdp",)}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(SHARDED_RUNS))
def test_sharded_two_ranks_equal_one_process_with_a_text_only_rank(one_process, family):
    """FSDP2, ZeRO-2 and ZeRO-3 (every parameter partitioned: persistence threshold 0, so each module's weights are
    gathered when it is called; OneVision's bare `image_newline` for the whole forward, as an external parameter)
    each equal one process. Before the blank image ran inside the transformers call
    (right after the token embedding, where an image rank runs its tower), ZeRO-3 aborted on a collective mismatch
    and ZeRO-2 drifted by 2e-3 from step 2."""
    tmp_path = one_process(family)
    zero3 = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))
    for strategy in SHARDED_RUNS[family]:
        extra = {"deepspeed_config": str(tmp_path / "zero3.json")} if strategy == "deepspeed_zero3" else {}
        r = torchrun(2, "fit", "--config", stage(tmp_path, family, strategy, strategy=strategy, **extra),
                     "--out", str(tmp_path / strategy), timeout=600)
        assert r.returncode == 0, f"{strategy}: {r.stderr[-3000:]}"
        assert_same_run(tmp_path / "ref", tmp_path / strategy)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero3"])
def test_sharded_strategy_refused_for_a_family_without_a_blank_image(tmp_path, strategy, monkeypatch):
    """A family with no blank image (an unlisted one mapped by the generic rule) is refused sharded strategies with
    one line saying so (the CLI turns it into exit 2)."""
    from vlmtrain.errors import ConfigError
    from vlmtrain.model import build_model
    from vlmtrain.train.native import check_native_stage
    from vlmtrain.plan import load_plan_stages

    [(stage_cfg, model_cfg)] = load_plan_stages(stage(tmp_path, "llava_next", "x", strategy=strategy))
    bundle = build_model(model_cfg)
    monkeypatch.setattr(bundle.model, "blank_image_inputs", lambda: None)
    with pytest.raises(ConfigError, match=f"trainer.strategy: {strategy} is not available for llava_next"):
        check_native_stage(stage_cfg, bundle)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl"])
def test_native_fsdp_resumes_across_world_sizes_2_1_2(one_process, family):
    """A native family's sharded DCP checkpoint resumes on another world size: 2 fsdp ranks (rank 0 text-only) for 2
    steps → 1 fsdp process (`--resume`, same global batch) to step 4 → 2 ranks again to step 6 equals the
    uninterrupted run in one process (per-step losses and final weights ≤1e-5)."""
    root = one_process(family)
    cfg, out = stage(root, family, "fsdp", strategy="fsdp"), root / "elastic"  # batch 2 per rank
    legs = [(2, ["trainer.max_steps=2"]), (1, ["--resume", "data.batch_size=4", "trainer.max_steps=4"]),
            (2, ["--resume"])]
    for ranks, extra in legs:
        args = ["fit", "--config", cfg, "--out", str(out), *extra]
        # the middle leg: fsdp on a world of one, a plain process (torchrun adds only its launcher)
        r = torchrun(2, *args, timeout=600) if ranks == 2 else plain(*args, timeout=600)
        assert r.returncode == 0, f"{ranks} ranks {extra}: {r.stderr[-3000:]}"
        # a DCP directory with one shard file per rank of the leg that wrote it
        assert len(list((out / "checkpoints" / "last.ckpt").glob("*.distcp"))) == ranks, extra
    assert_same_run(root / "ref", out)
