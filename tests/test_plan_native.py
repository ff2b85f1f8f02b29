"""The memory planner on native transformers families (`vlmtrain.plan.families`): the two 24 GiB native recipes,
image tokens against the family's own processor, a whole training step's planned peak against the peak measured
with PyTorch's profiler, and refusals of what is not planned."""

import pytest
import torch
import yaml

from bench import plan as BP
from bench import plan_native as BN
from vlmtrain.cli.plan import parse_image_size
from vlmtrain.config.model import NativeModelConfig
from vlmtrain.errors import ConfigError
from vlmtrain.model import build_model
from vlmtrain.model.native.tiny import write_tiny_checkpoint
from vlmtrain import plan as P
from vlmtrain.plan import core as C
from vlmtrain.plan import families as PN
from vlmtrain.plan import traced as PT
from conftest import CONFIGS

GiB = 2**30
RECIPES = {  # recipe → published parameter count (describe --json on the meta build; docs/native models)
    "qwen2.5-vl-7b-lora-24gb.yaml": 8_292_166_656,
    "gemma-3-4b-lora-24gb.yaml": 4_300_079_472,
    "qwen3.5-9b-lora-24gb.yaml": 9_409_813_744,
    "internvl3.5-8b-lora-24gb.yaml": 8_528_318_464,
    "gemma-4-e4b-lora-24gb.yaml": 7_941_100_832,
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_native_24gib_recipe_plans_under_24gib(recipe):
    """Under 24 GiB with one image per sample (Qwen: the worse of the smallest and largest image) and for
    text-only samples (every position a supervised text token: the largest logits term)."""
    [(stage, mcfg)] = P.load_plan_stages(CONFIGS / "recipes" / recipe)
    model = build_model(mcfg, device="meta").model  # built once for both plans
    plan = P.plan_stage(stage, mcfg, 24 * GiB, model=model)
    text_only = P.plan_stage(stage, mcfg, 24 * GiB, P.PlanOptions(images_per_sample=0), model=model)
    print(f"\n{recipe}: planned peak {plan.peak / GiB:.2f} GiB ({plan.phase}), text-only "
          f"{text_only.peak / GiB:.2f} GiB, largest micro-batch {plan.max_micro_batch}; "
          + ", ".join(f"{k} {v / GiB:.2f}" for k, v in plan.parts.items() if v) + f"; {plan.notes[-1]}")
    assert plan.peak < 24 * GiB and plan.fits and text_only.peak < 24 * GiB
    assert plan.max_micro_batch >= plan.micro_batch
    # bf16-true: the whole (frozen) base at 2 bytes per published parameter, plus its buffers (rotary inv_freq)
    assert RECIPES[recipe] * 2 <= plan.parts["weights"] < RECIPES[recipe] * 2 * 1.0001
    assert plan.parts["cuda_context"] == C.CUDA_CONTEXT_BYTES and plan.parts["grads"] > 0


def test_qwen35_qlora_24gib_recipe_plans_under_24gib():
    """The QLoRA recipe at 2048 tokens: under 24 GiB with an image and text-only, its 4-bit base well under the
    LoRA recipe's bf16 one, and the LoRA recipe's stage at 2048 tokens would not fit (why it keeps 1024)."""
    [(stage, mcfg)] = P.load_plan_stages(CONFIGS / "recipes" / "qwen3.5-9b-qlora-24gb.yaml")
    model = build_model(mcfg, device="meta").model
    plan = P.plan_stage(stage, mcfg, 24 * GiB, model=model)
    text_only = P.plan_stage(stage, mcfg, 24 * GiB, P.PlanOptions(images_per_sample=0), model=model)
    assert plan.fits and text_only.peak < 24 * GiB and stage.data.max_len == 2048
    assert plan.parts["weights"] < 0.5 * RECIPES["qwen3.5-9b-lora-24gb.yaml"] * 2
    [(lora, _)] = P.load_plan_stages(CONFIGS / "recipes" / "qwen3.5-9b-lora-24gb.yaml", ["data.max_len=2048"])
    assert not P.plan_stage(lora, mcfg, 24 * GiB, model=model).fits


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_image_tokens_match_the_processor(family, tmp_path):
    """The planner's smart_resize rule == the tiny Qwen2.5-VL / Qwen3-VL processor's own image-token count (14- and
    16-px patches), for sizes below, inside and above its pixel budget; without a size, the budget's worst case."""
    from PIL import Image

    ckpt = write_tiny_checkpoint(family, tmp_path / "q")
    cfg = NativeModelConfig.model_validate({"pretrained": str(ckpt)})
    bundle = build_model(cfg)
    vc = bundle.model.hf.config.vision_config
    budget = PN.qwen_pixel_budget(cfg, family)
    unit = 2 * vc.patch_size
    proc = bundle.processor
    for h, w in [(20, 30), (56, 84), (112, 56), (300, 200), (500, 500)]:
        out = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[Image.new("RGB", (w, h))],
                   return_tensors="pt")
        tokens = int((out["input_ids"] == bundle.model.image_token_id).sum())
        assert PN.qwen_patches(vc, budget, (h, w)) // 4 == tokens, (h, w)
        assert PN.qwen_patches(vc, budget, (h, w)) == int(out["image_grid_thw"].prod())
    assert PN.qwen_patches(vc, budget, None) // 4 == budget[1] // unit**2
    if family == "qwen3_vl":  # no saved processor (a hub id, a meta preset): Qwen3-VL checkpoints' own budget
        assert PN.qwen_pixel_budget(NativeModelConfig.model_validate({"pretrained": "Qwen/Qwen3-VL-8B-Instruct"}),
                                    family) == (256 * 256, 4096 * 4096)


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_crops_and_image_tokens_match_the_processor(family, tmp_path):
    """Image splitting as the tiny processor does it (crop grid + global view, for images smaller than a crop, wide
    ones and larger than the longest edge): crops = the processor's pixel_values crops; LM tokens = the processor's
    expansion of `<image>` (within 1: a tokenizer may merge the "\n\n" before the global view)."""
    from PIL import Image

    ckpt = write_tiny_checkpoint(family, tmp_path / family)
    cfg = NativeModelConfig.model_validate({"pretrained": str(ckpt)})
    bundle = build_model(cfg)
    meta = build_model(cfg, device="meta").model
    stage = BP.build_stage({"pretrained": str(ckpt)}, {"train": {"llm": "lora"}, "lora": BN.LORA})
    for h, w in [(20, 30), (40, 90), (64, 64), (300, 200)]:
        out = bundle.processor(text=["<image>"], images=[Image.new("RGB", (w, h))], return_tensors="pt")
        geo = PN.native_geometry(meta, stage, cfg, P.PlanOptions(image_size=(h, w)))
        assert geo.crops_per_image == out["pixel_values"].shape[1], (h, w)
        assert 0 <= out["input_ids"].shape[1] - geo.image_tokens <= 1, (h, w)
    crop, longest = PN.idefics3_budget(meta, cfg)
    assert PN.native_geometry(meta, stage, cfg, P.PlanOptions()).crops_per_image == (longest // crop) ** 2 + 1


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next", "llava"])
def test_llava_crops_and_image_tokens_match_the_processor(family, tmp_path):
    """AnyRes as the tiny processor does it (best grid pinpoint in tower-sized tiles + the base view; LLaVA-1.5 one
    fixed crop), for small, wide, tall, square and large images: crops = the processor's pixel_values crops, LM
    tokens = its expansion of `<image>`. OneVision's two-image sample: one view per image (+ its newline)."""
    from PIL import Image

    ckpt = write_tiny_checkpoint(family, tmp_path / family)
    cfg = NativeModelConfig.model_validate({"pretrained": str(ckpt)})
    bundle = build_model(cfg)
    meta = build_model(cfg, device="meta").model
    stage = BP.build_stage({"pretrained": str(ckpt)}, {"train": {"llm": "lora"}, "lora": BN.LORA})
    image_id = bundle.model.image_token_id
    for h, w in [(20, 30), (40, 90), (90, 40), (64, 64), (32, 32), (300, 200)]:
        out = bundle.processor(text=["<image>"], images=[Image.new("RGB", (w, h))], return_tensors="pt")
        pv = out["pixel_values"]
        geo = PN.native_geometry(meta, stage, cfg, P.PlanOptions(image_size=(h, w)))
        assert geo.crops_per_image == (pv.shape[1] if pv.dim() == 5 else pv.shape[0]), (h, w)
        assert geo.image_tokens == int((out["input_ids"] == image_id).sum()), (h, w)
    if family == "llava_onevision":
        out = bundle.processor(text=["<image><image>"], images=[[Image.new("RGB", (90, 40)),
                                                                 Image.new("RGB", (64, 64))]], return_tensors="pt")
        geo = PN.native_geometry(meta, stage, cfg, P.PlanOptions(images_per_sample=2))
        assert geo.crops_per_image == 1 and 2 * geo.image_tokens == int((out["input_ids"] == image_id).sum())


@pytest.mark.parametrize("name", ["qwen-lora-pack4-224x224-b1-s1024", "qwen3-lora-256x320-b2-s512",
                                  "idefics3-lora-96x128-b2-s512", "onevision-lora-96x128-b2-s512",
                                  # Gated DeltaNet layers (Qwen3.5) and expert MLPs (Qwen3-VL-MoE): traced blocks
                                  "qwen35-lora-256x256-b2-s512", "qwen3moe-sft-conn-256x256-b2-s384",
                                  # GLM-4.1V: its own resize rule, sandwich norms, the downsample conv connector;
                                  # GLM-4.5V: the same tower, expert MLPs traced
                                  "glm4v-lora-224x224-b2-s512", "glm45v-lora-224x224-b2-s512",
                                  # InternVL: tiles through the tower, pixel shuffle + MLP projector traced
                                  "internvl-lora-128x192-b2-s512",
                                  # Gemma 4: the decoder traced whole (head sizes, shared keys/values, per-layer
                                  # inputs); one row: masks on the sliding layers only
                                  "gemma4-lora-160x224-b2-s512", "gemma4-sft-conn-192x192-b1-s640",
                                  # Mistral 3: every image through Pixtral as one sequence, patch merger traced
                                  "mistral3-lora-128x96-b2-s512",
                                  # PaliGemma: its Gemma LM traced whole under the prefix-LM mask
                                  "paligemma-lora-b2-s512",
                                  # Llama 4: tiles, the pixel-shuffle adapter, the MoE decoder with chunked
                                  # attention traced whole
                                  "llama4-lora-128x96-b2-s512",
                                  # LFM2-VL: NaFlex tiles + thumbnail, the short-convolution decoder traced whole
                                  "lfm2vl-sft-conn-64x64-b1-s640"])
def test_planned_peak_matches_measured_step(name, tmp_path):
    """One vlmtrain training step (forward, loss, backward, clip, AdamW) of a scaled tiny native model; the peak of
    allocated bytes from the profiler (as `python -m bench plan` measures) within ±5% of the plan. The Qwen2.5-VL
    row is packed (4 one-image samples per 1,024-token row, vlmtrain's own packing collator)."""
    family, image, fields = BN.CONFIGS[name]
    model = BN.write_checkpoint(family, tmp_path / family)
    torch.manual_seed(0)
    m, opt, step, micro, module = BN.prepare(model, family, image, fields)
    n_img = BN.n_image_tokens(micro[0], m.image_token_id)
    measured = BP.measure_prepared(m, opt, step, micro, module)["peak"]
    planned = BN.planned(model, family, image, fields, BN.supervised_fraction(micro[0], n_img))["peak"]
    print(f"\n{name}: planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert abs(planned - measured) / measured <= 0.05


def test_glm4v_image_tokens_match_the_processor(tmp_path):
    """GLM-4.1V's resize rule (an image counts as `temporal_patch_size` frames against the budget) == the tiny
    processor's own image-token count, below, inside and above its budget; without a size, the budget's largest."""
    from PIL import Image

    ckpt = write_tiny_checkpoint("glm4v", tmp_path / "g")
    cfg = NativeModelConfig.model_validate({"pretrained": str(ckpt),
                                            "chat_template": BN.SCALE["glm4v"]["chat_template"]})
    bundle = build_model(cfg)
    vc = bundle.model.hf.config.vision_config
    budget = PN.qwen_pixel_budget(cfg, "glm4v")
    for h, w in [(20, 30), (48, 64), (64, 32), (96, 80), (300, 200)]:
        out = bundle.processor(text=["<|begin_of_image|><|image|><|end_of_image|>"],
                               images=[Image.new("RGB", (w, h))], return_tensors="pt")
        tokens = int((out["input_ids"] == bundle.model.image_token_id).sum())
        patches = PN.qwen_patches(vc, budget, (h, w), glm=True)
        assert patches == int(out["image_grid_thw"].prod()) == 4 * tokens, (h, w)
    assert PN.qwen_patches(vc, budget, None, glm=True) // 4 == budget[1] // 2 // (2 * vc.patch_size) ** 2


def _tiny(family: str, tmp_path):
    """(model config, built bundle, meta model) of the family's tiny checkpoint, with the bench's template where no
    official one is vendored."""
    ckpt = write_tiny_checkpoint(family, tmp_path / family)
    cfg = NativeModelConfig.model_validate({"pretrained": str(ckpt),
                                            "chat_template": BN.SCALE[family]["chat_template"]})
    return cfg, build_model(cfg), build_model(cfg, device="meta").model


def test_mistral3_patches_and_image_tokens_match_the_processor(tmp_path):
    """Mistral 3's plan (Pixtral's resize to the longest edge in patch × merge units): its LM tokens (rows ×
    (cols + 1): [IMG]s, a break per row, the end) == the tiny processor's image-token ids, its tower patches == the
    pixel values' patches, for images below, at and above the longest edge; without a size, the largest square
    whose tokens fit max_len."""
    from PIL import Image

    cfg, bundle, meta = _tiny("mistral3", tmp_path)
    stage = BP.build_stage({"pretrained": "x"}, {"train": {"vision": False, "connector": True, "llm": True},
                                                 "data": {"max_len": 40}})
    proc = bundle.processor
    image_ids = {proc.tokenizer.convert_tokens_to_ids(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")}
    patch = bundle.model.hf.config.vision_config.patch_size
    for h, w in [(20, 30), (48, 64), (64, 32), (96, 80), (300, 200)]:
        out = proc(text=["[IMG]"], images=[Image.new("RGB", (w, h))], return_tensors="pt")
        geo = PN.native_geometry(meta, stage, cfg, P.PlanOptions(image_size=(h, w)))
        assert geo.image_tokens == sum(int((out["input_ids"] == i).sum()) for i in image_ids), (h, w)
        ph, pw = (int(v) // patch for v in out["image_sizes"][0])
        assert geo.vision_tokens == ph * pw, (h, w)
    geo = PN.native_geometry(meta, stage, cfg, P.PlanOptions())  # 64-px edge: 4 × 5 = 20 tokens ≤ 39
    assert geo.image_tokens == 20 and "largest square" in geo.notes[-1]
    short = BP.build_stage({"pretrained": "x"}, {"train": {"llm": True}, "data": {"max_len": 16}})
    geo = PN.native_geometry(meta, short, cfg, P.PlanOptions())  # 3 × 4 = 12 ≤ 15 < 4 × 5
    assert geo.image_tokens == 12 and "would not fit max_len 16" in geo.notes[-1]


def test_llama4_tiles_and_image_tokens_match_the_processor(tmp_path):
    """Llama 4's plan: its tiles (+ the global tile) == the tiny processor's pixel-value tiles and its LM tokens (the
    image markers, `<|patch|>`s, separators) == the processor's, for one-tile, wide, tall and large images; without a
    size, the most tiles whose tokens fit max_len."""
    from PIL import Image

    cfg, bundle, meta = _tiny("llama4", tmp_path)
    stage = BP.build_stage({"pretrained": "x"}, {"train": {"llm": True}, "data": {"max_len": 40}})
    proc = bundle.processor
    marks = ["<|image_start|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>",
             "<|image_end|>"]
    ids = {proc.tokenizer.convert_tokens_to_ids(t) for t in marks}
    for h, w in [(20, 30), (32, 64), (96, 40), (64, 64), (300, 200)]:
        out = proc(text=["<|image|>"], images=[Image.new("RGB", (w, h))], return_tensors="pt")
        geo = PN.native_geometry(meta, stage, cfg, P.PlanOptions(image_size=(h, w)))
        assert geo.crops_per_image == out["pixel_values"].shape[0], (h, w)
        assert geo.image_tokens == sum(int((out["input_ids"] == i).sum()) for i in ids), (h, w)
    geo = PN.native_geometry(meta, stage, cfg, P.PlanOptions())  # 4 tiles: 4·4 + 2·1 + 2 + 3 + 4 = 27 ≤ 39
    assert geo.crops_per_image == 5 and geo.image_tokens == 27
    short = BP.build_stage({"pretrained": "x"}, {"train": {"llm": True}, "data": {"max_len": 24}})
    geo = PN.native_geometry(meta, short, cfg, P.PlanOptions())  # 3 tiles (3 × 1): 12 + 0 + 3 + 3 + 4 = 22 ≤ 23
    assert geo.crops_per_image == 4 and "would not fit max_len 24" in geo.notes[-1]


def test_lfm2_vl_tiles_and_image_tokens_match_the_processor(tmp_path):
    """LFM2-VL's plan: its tower passes == the tiny processor's tiles (one tile within the budget, else a grid + the
    thumbnail) and its LM tokens == the processor's image tokens and markers, for small, wide, tall and large
    images; without a size, the most tiles whose tokens fit max_len."""
    from PIL import Image

    cfg, bundle, meta = _tiny("lfm2_vl", tmp_path)
    stage = BP.build_stage({"pretrained": "x"}, {"train": {"llm": True}, "data": {"max_len": 80}})
    proc = bundle.processor
    vocab = proc.tokenizer.get_vocab()
    ids = {i for t, i in vocab.items() if t in ("<image>", "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>")
           or t.startswith("<|img_row_")}
    for h, w in [(20, 30), (32, 32), (64, 40), (40, 100), (128, 128), (300, 200)]:
        out = proc(text=["<image>"], images=[[Image.new("RGB", (w, h))]], return_tensors="pt")
        geo = PN.native_geometry(meta, stage, cfg, P.PlanOptions(image_size=(h, w)))
        assert geo.crops_per_image == out["pixel_values"].shape[0], (h, w)
        assert geo.image_tokens == sum(int((out["input_ids"] == i).sum()) for i in ids), (h, w)
    o = PN.lfm2_vl_options(meta, cfg)
    best = PN.native_geometry(meta, stage, cfg, P.PlanOptions())
    assert best.crops_per_image == o["max_tiles"] + 1 and best.image_tokens <= 79  # 4 tiles + the thumbnail


def test_mistral_small_qlora_24gib_recipe_plans_under_24gib():
    """Mistral-Small-3.1-24B QLoRA at 2048 tokens: under 24 GiB with the largest square image that fits (1232 px:
    44 × 45 LM tokens) and text-only; its 4-bit base well under the bf16 one (24,011,361,280 parameters)."""
    [(stage, mcfg)] = P.load_plan_stages(CONFIGS / "recipes" / "mistral-small-3.1-24b-qlora-24gb.yaml")
    model = build_model(mcfg, device="meta").model
    plan = P.plan_stage(stage, mcfg, 24 * GiB, model=model)
    text_only = P.plan_stage(stage, mcfg, 24 * GiB, P.PlanOptions(images_per_sample=0), model=model)
    assert plan.fits and text_only.peak < 24 * GiB and stage.data.max_len == 2048
    assert "1980 LM tokens" in plan.notes[-1] and "1232x1232" in plan.notes[-1]
    assert plan.parts["weights"] < 0.35 * 24_011_361_280 * 2


def test_internvl_tiles_and_image_tokens_match_the_processor(tmp_path):
    """InternVL's tiling as the tiny processor does it (the best grid of 32-px tiles up to 4 + a thumbnail, for small,
    wide, tall, square and large images): tower passes = the processor's pixel_values tiles, LM tokens = its
    `<img>` + context tokens + `</img>`. Without a size: the most tiles whose tokens fit max_len."""
    from PIL import Image

    from native_fixtures import USER_TEMPLATES

    ckpt = write_tiny_checkpoint("internvl", tmp_path / "internvl")
    model_cfg = {"pretrained": str(ckpt), "chat_template": USER_TEMPLATES["internvl"]}
    cfg = NativeModelConfig.model_validate(model_cfg)
    bundle = build_model(cfg)
    meta = build_model(cfg, device="meta").model
    stage = BP.build_stage(model_cfg, {"train": {"llm": "lora"}, "lora": BN.LORA})
    tok = bundle.tokenizer
    marks = {bundle.model.image_token_id, tok.convert_tokens_to_ids("<img>"), tok.convert_tokens_to_ids("</img>")}
    for h, w in [(20, 30), (40, 90), (90, 40), (64, 64), (32, 32), (300, 200)]:
        out = bundle.processor(text=["<IMG_CONTEXT>"], images=[Image.new("RGB", (w, h))], return_tensors="pt")
        geo = PN.native_geometry(meta, stage, cfg, P.PlanOptions(image_size=(h, w)))
        assert geo.crops_per_image == out["pixel_values"].shape[0], (h, w)
        assert geo.image_tokens == sum(int((out["input_ids"] == t).sum()) for t in marks), (h, w)
    assert PN.native_geometry(meta, stage, cfg, P.PlanOptions()).crops_per_image == 5  # 4 tiles + the thumbnail
    short = BP.build_stage(model_cfg, {"train": {"llm": "lora"}, "lora": BN.LORA, "data": {"max_len": 16}})
    assert PN.native_geometry(meta, short, cfg, P.PlanOptions()).image_tokens <= 15  # 3 tiles of 4 + 2 = 14


def _meta(tmp_path, family):
    cfg = NativeModelConfig.model_validate({"pretrained": str(write_tiny_checkpoint(family, tmp_path / family))})
    return cfg, build_model(cfg, device="meta").model


def test_unplanned_family_and_stage_features_are_refused(tmp_path):
    stage = BP.build_stage({"pretrained": "x"}, {"train": {"llm": "lora"}, "lora": BN.LORA})
    cfg, model = _meta(tmp_path, "llava_next")
    model.model_type = "mllama"  # a family the planner does not model
    with pytest.raises(ConfigError, match=r"native family 'mllama' is not planned yet \(planned: qwen2_vl"):
        P.plan_stage(stage, cfg, 24 * GiB, model=model)
    model.model_type = "llava_next"
    model.hf.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ConfigError, match=r"list-valued vision_feature_layer \(\[-2, -1\]\) is not planned yet"):
        P.plan_stage(stage, cfg, 24 * GiB, model=model)
    cfg, model = _meta(tmp_path, "qwen2_5_vl")
    for bad in ("448", "0x10", "wide"):
        with pytest.raises(ConfigError, match="--image-size: cannot read"):
            parse_image_size(bad)
    assert parse_image_size("448x336") == (448, 336)
    packed = BP.build_stage({"pretrained": "x"}, {"data": {"mode": "pack", "pack_len": 256}})
    cfg, model = _meta(tmp_path, "gemma3")
    with pytest.raises(ConfigError, match="plan: data.mode: pack is planned for the Qwen-VL families only, not gemma3"):
        P.plan_stage(packed, cfg, 24 * GiB, model=model)


def test_smolvlm_256m_preset_plans_with_17_crops_per_image(tmp_path):
    """The real-size SmolVLM-256M preset (meta): a square image becomes 4 × 4 crops of 512² + the global view, 64 LM
    tokens each (512/16 patches, pixel shuffle ×4), as the checkpoint's processor (longest edge 2048) makes them."""
    import yaml

    cfg = tmp_path / "stage.yaml"
    cfg.write_text(yaml.safe_dump({"name": "sft", "preset": "sft", "model": str(CONFIGS / "models" /
                                                                              "smolvlm-256m-native.yaml"),
                                   "train": {"vision": False, "connector": True, "llm": "lora"}, "lora": BN.LORA,
                                   "data": {"train": [{"path": "x"}], "batch_size": 2, "max_len": 2048}}))
    [(stage, mcfg)] = P.load_plan_stages(cfg)
    plan = P.plan_stage(stage, mcfg, 24 * GiB)
    assert plan.fits and "17 crops × 1024 tower patches" in plan.notes[-1]
    assert "1127 LM tokens" in plan.notes[-1]  # 17 × 64 image tokens + the processor's crop markers


def test_llava_onevision_7b_preset_plans_anyres_max_9(tmp_path):
    """The real-size LLaVA-OneVision-7B preset (meta) with a bf16 LoRA stage: the largest grid pinpoint (2304²) is
    6 × 6 tiles of 384² + the base view = 37 tower passes of 27² = 729 patches; its 162 × 162 unpadded feature grid
    is over anyres_max_9 (ratio √(162²/(9·729)) = 2), so it is scaled to 81 × 81 = 6561 tokens + 81 newlines + the
    729 base tokens = 7371 LM tokens."""
    import yaml

    cfg = tmp_path / "stage.yaml"
    cfg.write_text(yaml.safe_dump({"name": "sft", "preset": "sft", "model": str(CONFIGS / "models" /
                                                                              "llava-onevision-7b.yaml"),
                                   "train": {"vision": False, "connector": True, "llm": "lora"}, "lora": BN.LORA,
                                   "trainer": {"precision": "bf16-true", "grad_checkpointing": True},
                                   "data": {"train": [{"path": "x"}], "batch_size": 1, "max_len": 8192}}))
    [(stage, mcfg)] = P.load_plan_stages(cfg)
    plan = P.plan_stage(stage, mcfg, 24 * GiB)
    assert "37 crops × 729 tower patches" in plan.notes[-1] and "7371 LM tokens" in plan.notes[-1]
    assert plan.fits and plan.peak < 24 * GiB


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_vl_moe", "qwen3_5_moe", "glm4v_moe"])
@pytest.mark.parametrize("full", [False, True])
def test_traced_layers_equal_autograds_saved_tensors_on_cpu(family, full):
    """The planner's meta trace of a Gated DeltaNet mixer / an expert MLP (`TracedLayers`, two traces extrapolated
    over the rows) against the bytes autograd saves when the real module runs on CPU in fp32 with real routing (3
    rows of 40 tokens, stage-trained parameters requiring grad). Expert MLPs: equal (traced in bf16 on meta,
    counted at 4 bytes). Gated DeltaNet: equal as well, now that both sides hold every saved tensor until it is
    counted (a mask saved and freed inside the forward used to hand its address to the next one, and the count varied
    by one 64 KiB mask between runs). GLM-4.5V's experts (routed + shared, sigmoid router with group-limited top k):
    equal but for the fp32 casts its router makes in the bf16 trace (below)."""
    from transformers import AutoModelForImageTextToText

    from vlmtrain.model.native.families import FAMILIES
    from vlmtrain.model.native.tiny import tiny_parts
    from vlmtrain.model.native.vlm import NativeVLM

    torch.manual_seed(0)
    m = NativeVLM(AutoModelForImageTextToText.from_config(tiny_parts(family)[0]), FAMILIES[family], family)
    stage = BP.build_stage({"pretrained": "x"}, {"train": {"llm": full, "connector": True}})
    traced = PN.TracedLayers(m.llm.model.layers, stage)
    assert set(traced.modules) == {"qwen3_5": {"linear_attention"}, "qwen3_vl_moe": {"moe"},
                                   "qwen3_5_moe": {"linear_attention", "moe"}, "glm4v_moe": {"moe"}}[family]
    params = {q.untyped_storage()._cdata for q in m.parameters()}
    for kind, mod in traced.modules.items():
        mod.requires_grad_(full)
        seen, held = {}, []

        def pack(t):
            held.append(t)  # alive until counted, as in the planner's trace: no storage address is reused mid-forward
            if t.untyped_storage()._cdata not in params:
                seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mod(torch.randn(3, 40, traced.hidden, requires_grad=True))
        real = sum(seen.values())
        planned = traced.saved(kind, C.StepShape(3, 40, False), True, C.PRECISIONS["32-true"])
        # GLM-4.5V's router runs in fp32 (`F.linear(x.float(), weight.float())`): in the bf16 trace the casts are
        # copies it saves (the weight; when the router trains, also its input), in an fp32 step they are the tensors
        # themselves — the trace's extra bytes
        extra = 0
        if family == "glm4v_moe":
            extra = mod.gate.weight.numel() * 4 + (3 * 40 * traced.hidden * 4 if full else 0)
        assert planned == real + extra, (kind, planned, real)


def test_hybrid_and_moe_refusals(tmp_path):
    """What a run refuses the plan refuses too: packed rows through Gated DeltaNet layers; LoRA on fused expert
    tensors is not planned (the default `lora.llm_target_parameters` reaches them; '' plans the linear layers)."""
    cfg, model = _meta(tmp_path, "qwen3_5")
    packed = BP.build_stage({"pretrained": "x"}, {"data": {"mode": "pack", "pack_len": 256}})
    with pytest.raises(ConfigError, match="data.mode: pack is refused for qwen3_5: its Gated DeltaNet"):
        P.plan_stage(packed, cfg, 24 * GiB, model=model)
    cfg, model = _meta(tmp_path, "qwen3_5_moe")
    lora = BP.build_stage({"pretrained": "x"}, {"train": {"llm": "lora"}, "lora": BN.LORA})
    with pytest.raises(ConfigError, match="adapters on fused expert tensors .* are not planned yet"):
        P.plan_stage(lora, cfg, 24 * GiB, model=model)
    linear_only = BP.build_stage({"pretrained": "x"}, {"train": {"llm": "lora"},
                                                       "lora": {**BN.LORA, "llm_target_parameters": ""}})
    plan = P.plan_stage(linear_only, cfg, 24 * GiB, model=model)
    assert plan.fits and plan.parts["activations"] > 0


def test_moe_router_loss_and_all_experts_in_the_plan(tmp_path):
    """Every expert's parameters are in the weights (and, fully trained, in the gradients and AdamW states); the
    router loss's logits are planned only when the loss is on (`trainer.router_aux_loss_coef: 0` turns it off)."""
    cfg, model = _meta(tmp_path, "qwen3_vl_moe")
    total = sum(q.numel() for q in model.parameters())
    experts = sum(q.numel() for n, q in model.named_parameters() if ".experts." in n)
    assert experts > 0  # the fused 3-D tensors [experts, ...] of every layer
    on = BP.build_stage({"pretrained": "x"}, {"train": {"llm": True}})
    off = BP.build_stage({"pretrained": "x"}, {"train": {"llm": True}, "trainer": {"router_aux_loss_coef": 0}})
    opts = P.PlanOptions(device="cpu")
    p_on, p_off = (P.plan_stage(s, cfg, 24 * GiB, opts, model=model) for s in (on, off))
    assert p_on.parts["weights"] == total * 4 + sum(b.numel() * 4 for b in model.buffers() if b.is_floating_point())
    llm = sum(q.numel() for q in model.llm.parameters())  # experts included: all of them train
    assert p_on.parts["optimizer"] >= 2 * 4 * llm
    geo = PN.native_geometry(model, on, cfg, opts)
    assert geo.router_logits == len(model.llm.model.layers) * model.llm.config.num_experts
    assert PN.native_geometry(model, off, cfg, opts).router_logits == 0
    # the held logits (fp32) and the loss's saved softmax (fp32) over every token of the micro-batch
    held = on.data.batch_size * on.data.max_len * geo.router_logits * 8
    assert p_on.parts["activations"] - p_off.parts["activations"] == held


def _saved_by_blocks_on_cpu(decoder, **inputs) -> int:
    """Bytes autograd saves while the real decoder runs on CPU (fp32, SDPA's own CPU kernel), up to its last block."""
    counting = {"on": True}
    hook = decoder.layers[-1].register_forward_hook(lambda *_: counting.update(on=False))
    params = {q.untyped_storage()._cdata for q in (*decoder.parameters(), *decoder.buffers())}
    seen, held = {}, []

    def pack(t):
        held.append(t)
        if counting["on"] and t.untyped_storage()._cdata not in params:
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder(use_cache=False, **inputs)
    hook.remove()
    return sum(seen.values())


def _planned_stack(traced, n_blocks: int, shape) -> int:
    p32 = C.PRECISIONS["32-true"]
    return traced.outside(shape, True, p32, False) + sum(traced.saved(f"block:{i}", shape, True, p32)
                                                         for i in range(n_blocks))


def _padding(rows: int, seq: int) -> torch.Tensor:
    pad = torch.ones(rows, seq, dtype=torch.long)
    pad[0, -5:] = 0
    return pad


@pytest.mark.parametrize("full", [False, True])
def test_gemma4_decoder_trace_equals_autograds_saved_tensors_on_cpu(full):
    """The planner's whole-decoder trace of Gemma 4 (`TracedStack` on meta under the fused-SDPA stand-in, 4 rows
    extrapolated from traces of 2 and 3) against the bytes autograd saves when the real text model runs on CPU in
    fp32 (SDPA's own CPU kernel) with 4 padded rows of 48 tokens: sliding and full layers of two head sizes, two
    layers reusing earlier keys and values, per-layer inputs, a sliding window shorter than the rows. Counted up to
    the last block (the final norm is the planner's own term)."""
    from transformers import AutoModelForImageTextToText

    from vlmtrain.model.native.tiny import tiny_parts

    cfg = tiny_parts("gemma4")[0]
    text = {**cfg.text_config.to_dict(), "num_hidden_layers": 4, "num_kv_shared_layers": 2, "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"] * 2}
    text.pop("per_layer_config")
    cfg.text_config = type(cfg.text_config)(**text)
    torch.manual_seed(0)
    decoder = AutoModelForImageTextToText.from_config(cfg).model.language_model.train().requires_grad_(full)
    assert [layer.self_attn.is_kv_shared_layer for layer in decoder.layers] == [False, False, True, True]
    traced = PT.TracedStack(decoder, decoder.layers, PN._gemma4_text_run, full)
    planned = _planned_stack(traced, len(decoder.layers), C.StepShape(4, 48, True))
    c = decoder.config
    real = _saved_by_blocks_on_cpu(
        decoder, inputs_embeds=torch.randn(4, 48, c.hidden_size, requires_grad=True), attention_mask=_padding(4, 48),
        per_layer_inputs=torch.randn(4, 48, c.num_hidden_layers, c.hidden_size_per_layer_input, requires_grad=full))
    assert planned == real


@pytest.mark.parametrize("full", [False, True])
def test_gemma2_decoder_trace_equals_autograds_saved_tensors_on_cpu(full):
    """PaliGemma 2's LM (Gemma 2: sandwich norms, soft-capped attention and logits, sliding and full layers) traced
    whole by the generic `decoder_run` against autograd's saved bytes on CPU: 4 padded rows of 48 tokens, a window of
    16, both layer kinds' masks as transformers builds them from the padding."""
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, sliding_window=16)
    decoder = Gemma2Model(cfg).train().requires_grad_(full)
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"} and cfg.attn_logit_softcapping
    traced = PT.TracedStack(decoder, decoder.layers, PT.decoder_run, full)
    planned = _planned_stack(traced, len(decoder.layers), C.StepShape(4, 48, True))
    real = _saved_by_blocks_on_cpu(decoder, inputs_embeds=torch.randn(4, 48, 64, requires_grad=True),
                                   attention_mask=_padding(4, 48))
    assert planned == real


def test_paligemma2_preset_plans_its_gemma2_lm_whole():
    """The PaliGemma 2 3B preset plans (its Gemma 2 LM traced on meta; 256 image tokens per 224² image, as its
    processor writes them): a LoRA stage on one 24 GiB GPU."""
    mcfg = NativeModelConfig.model_validate(yaml.safe_load((CONFIGS / "models" / "paligemma2-3b-224.yaml").read_text()))
    stage = BP.build_stage({"pretrained": "x"}, {"train": {"vision": False, "connector": False, "llm": "lora"},
                                                 "lora": {"r": 16, "alpha": 32},
                                                 "data": {"batch_size": 2, "max_len": 1024},
                                                 "trainer": {"precision": "bf16-true", "grad_checkpointing": True}})
    plan = P.plan_stage(stage, mcfg, 24 * GiB)
    assert plan.fits and "256 LM tokens" in plan.notes[-1] and plan.parts["activations"] > 0
