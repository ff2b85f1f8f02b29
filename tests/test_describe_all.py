"""`vlmtrain describe` on every key of transformers' MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES (issue 24, item 6).

`model_type: KEY` + `config: {}` either prints its JSON, whose total is the parameter count of transformers'
`AutoModelForImageTextToText` built from that default config on meta, or exits 2 with one `error:` line naming why.
The walk runs in one process through the function the CLI calls (`cmd_describe`), reusing each meta build for the
reference count: the model vlmtrain built is checked to be transformers' class for the key, built from transformers'
default config, and its parameters are counted (no second build).
"""

import argparse
import importlib.util
import json
import subprocess

import pytest

from conftest import VLMTRAIN

ERROR_LINE_MAX = 400  # characters: one readable line, not a pasted traceback


def _keys():
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return list(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def _config(tmp_path, key):
    path = tmp_path / f"{key}.yaml"
    path.write_text(f"model_type: {key}\nconfig: {{}}\n")
    return path


def _check_error(key, message, built):
    """The one line a ConfigError becomes (`error: MESSAGE`), naming the key and a cause the test can confirm."""
    assert "\n" not in message and len(message) <= ERROR_LINE_MAX, (key, message)
    assert message.startswith(f"model_type {key!r}: "), (key, message)
    cause = message.split(": ", 1)[1]
    if cause.startswith("transformers cannot build it from this config"):
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText

        assert built is None, key
        with pytest.raises(Exception), torch.device("meta"):  # transformers' own failure, confirmed
            AutoModelForImageTextToText.from_config(AutoConfig.for_model(key))
        return "cannot build"
    if "which is not installed (pip install " in cause:
        package = cause.rsplit("pip install ", 1)[1].rstrip(")")
        assert importlib.util.find_spec(package) is None, (key, message)
        return f"needs {package}"
    if cause.startswith("AutoModelForImageTextToText does not take "):
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

        assert type(AutoConfig.for_model(key)) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, key
        return "not the auto class's"
    if cause.startswith("no native family map in vlmtrain"):
        assert built is not None and type(built).__name__ in message, (key, message)  # built; names what it has
        return "no family map"
    raise AssertionError(f"{key}: an error the walk does not know: {message}")


# 11.1 s on the 2-core box (2026-12-07, first imports of torch and transformers' modeling modules included): not
# marked slow, so `make test-fast` keeps the contract too
def test_describe_walks_every_image_text_to_text_key(tmp_path, monkeypatch, capsys):
    import torch
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    from vlmtrain.cli.main import cmd_describe
    from vlmtrain.errors import ConfigError
    from vlmtrain.model.native import build
    from vlmtrain.model.native.describe import RULES
    from vlmtrain.model.native.families import FAMILIES

    built = {}
    instantiate = build._instantiate

    def spy(cfg, hf_cfg, device, load_weights):  # keep the meta model describe builds, for the reference count
        built["hf"] = instantiate(cfg, hf_cfg, device, load_weights)
        return built["hf"]

    monkeypatch.setattr(build, "_instantiate", spy)
    keys = _keys()
    outcomes = {}
    for key in keys:
        built.clear()
        args = argparse.Namespace(config=str(_config(tmp_path, key)), json=True, overrides=[], verb="describe")
        try:
            assert cmd_describe(args) == 0
        except ConfigError as e:
            assert e.exit_code == 2
            outcomes[key] = _check_error(key, str(e), built.get("hf"))
            continue
        except Exception as e:  # the CLI would print a traceback (or exit 1 for a VlmtrainError)
            raise AssertionError(f"{key}: {type(e).__name__}: {e}") from e
        finally:
            out = capsys.readouterr().out
        lines = out.strip().splitlines()
        assert len(lines) == 1, (key, out)
        result = json.loads(lines[0])
        hf = built.pop("hf")
        default = AutoConfig.for_model(key)
        assert type(hf) is MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(default)], key
        assert hf.config.to_dict() == default.to_dict(), key
        assert all(p.device == torch.device("meta") for p in hf.parameters()), key
        p = result["params"]
        assert p["total"] == sum(t.numel() for t in hf.parameters()), key  # transformers' own count
        assert p["total"] == sum(v for role, v in p.items() if role != "total"), key  # frozen roles (audio) too
        tokens = result["image_tokens"]
        if key in RULES:
            assert isinstance(tokens, int) and tokens > 0, (key, tokens)
        else:
            assert tokens is None, (key, tokens)  # no rule: unknown, never another family's guess
        outcomes[key] = "json"
        del hf
    assert set(outcomes) == set(keys)
    listed = [k for k in FAMILIES if k in keys]
    assert all(outcomes[k] == "json" for k in listed), {k: outcomes[k] for k in listed}


# Representative failures through the real CLI: an optional dependency (timm), a default config transformers cannot
# build, and a family with no map (Llama 4's parts sit at the top of its model object).
@pytest.mark.parametrize("key, says", [("gemma3n", "its vision tower (TimmWrapperModel) needs timm"),
                                       ("emu3", "transformers cannot build it from this config")])
def test_describe_cli_failure_is_one_error_line(key, says, tmp_path):
    # the refusal exists only where timm is absent (CI, this machine kind); with timm gemma3n builds and the
    # walk above checks its JSON instead
    if key == "gemma3n" and importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed: gemma3n builds")
    r = subprocess.run([*VLMTRAIN, "describe", "--config", str(_config(tmp_path, key)), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: model_type {key!r}: ") and says in lines[0], r.stderr


@pytest.mark.parametrize("config, says", [
    ("model_type: qwen2_vl\nconfig: {text_config: {hidden_size: 63}}",
     "model_type 'qwen2_vl': transformers cannot build it from this config (ZeroDivisionError"),
    ("model_type: gemma3\nconfig: {vision_config: 5}",
     "model_type 'gemma3': transformers rejects this config (StrictDataclassFieldValidationError")])
def test_config_transformers_refuses_is_one_line(config, says, tmp_path, capsys):
    from vlmtrain.cli.main import main

    (tmp_path / "bad.yaml").write_text(config + "\n")
    assert main(["describe", "--config", str(tmp_path / "bad.yaml"), "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {says}"), err


def test_describe_text_says_unknown_image_tokens_for_a_family_without_rule(tmp_path, capsys):
    from vlmtrain.cli.main import main

    assert main(["describe", "--config", str(_config(tmp_path, "mistral3"))]) == 0
    out = capsys.readouterr().out
    assert "image tokens: unknown (no vlmtrain rule for model_type 'mistral3'" in out


def test_remote_code_folder_is_one_line_not_a_prompt(tmp_path, capsys):
    from vlmtrain.cli.main import main

    folder = tmp_path / "InternVL3-1B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "internvl_chat", "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"}}))
    cfg = tmp_path / "remote.yaml"
    cfg.write_text(f"pretrained: {folder}\n")
    assert main(["describe", "--config", str(cfg), "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a remote-code checkpoint, model_type 'internvl_chat'" in err[0], err
    assert "Do you wish to run the custom code" not in "\n".join(err)


@pytest.mark.parametrize("model_type, image_processor, says", [
    ("cohere2_vision", "Cohere2VisionImageProcessor",
     "its image processor (Cohere2VisionImageProcessor) exists only for torchvision")])
def test_torchvision_only_processor_is_one_line(model_type, image_processor, says, tmp_path):
    # the refusal exists only where torchvision is absent (CI, this machine kind); with it these processors load.
    # (Mistral 3's PixtralProcessor and vlmtrain's ports load without it: tests/test_native_mistral3.py,
    # tests/test_native_image_processors.py)
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed")
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    from vlmtrain.errors import ConfigError
    from vlmtrain.model.native.processor import load_processor
    from vlmtrain.model.native.tiny import _tokenizer

    _tokenizer(["<|image|>", "[IMG]"], "<s>", "</s>", "<pad>").save_pretrained(tmp_path)
    processor = PROCESSOR_MAPPING_NAMES[model_type]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": image_processor,
                                                                   "processor_class": processor}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": processor}))
    with pytest.raises(ConfigError) as e:
        load_processor(tmp_path, model_type)
    assert e.value.exit_code == 2 and "\n" not in str(e.value) and says in str(e.value), str(e.value)


def test_image_token_rules_equal_the_processors_own_count():
    """Each config rule of describe (no processor files on meta) against the family's transformers processor at the
    checkpoints' settings, both for one 448×448 image: the default config's rule == the processor's own count
    (`_get_num_multimodal_tokens`, or the image ids it writes for Mllama, which has no counting helper)."""
    import transformers as T
    from PIL import Image
    from transformers import AutoConfig

    from vlmtrain.model.native.describe import RULES, _from_config, _from_processor
    from vlmtrain.model.native.processor import build_image_only
    from vlmtrain.model.native.tiny import _tokenizer, tiny_parts

    specials = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>"}
    tok = _tokenizer(list(specials.values()) + ["<|image|>"], "<s>", "</s>", "<pad>", extra=specials)

    def rule(mt):
        tokens, _ = _from_config(AutoConfig.for_model(mt))
        return tokens

    checked = {}
    for mt in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v", "glm4v_moe"):
        v = AutoConfig.for_model(mt).vision_config
        cls = T.Glm4vImageProcessorPil if mt.startswith("glm") else T.Qwen2VLImageProcessorPil
        ip = cls(patch_size=v.patch_size, merge_size=v.spatial_merge_size)
        checked[mt] = (rule(mt), _from_processor(build_image_only(mt, ip, tok)))
    # PaliGemma's processor writes the image_seq_length its checkpoint's image processor carries, which must be the
    # features the model makes per image: counted on meta (no weights, no compute)
    import torch
    from transformers import AutoModelForImageTextToText

    pg = AutoConfig.for_model("paligemma")
    with torch.device("meta"):
        side = pg.vision_config.image_size
        feats = AutoModelForImageTextToText.from_config(pg).model.get_image_features(
            pixel_values=torch.empty(1, 3, side, side)).pooler_output
    checked["paligemma"] = (rule("paligemma"), feats.shape[1])
    checked["gemma3"] = (rule("gemma3"), _from_processor(build_image_only("gemma3", T.Gemma3ImageProcessorPil(), tok)))
    clip = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    llava = {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    checked["llava"] = (rule("llava"), _from_processor(build_image_only("llava", T.CLIPImageProcessorPil(**clip),
                                                                        tok, **llava)))
    checked["llava_next"] = (rule("llava_next"), _from_processor(build_image_only(
        "llava_next", T.LlavaNextImageProcessorPil(**clip), tok, **llava)))
    checked["llava_onevision"] = (rule("llava_onevision"), _from_processor(build_image_only(
        "llava_onevision", T.LlavaOnevisionImageProcessorPil(), tok, vision_feature_select_strategy="full",
        num_image_tokens=729)))
    for crop in (True, False):
        ip = T.GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=crop, max_patches=12)
        checked[f"internvl crop_to_patches={crop}"] = (rule("internvl"),
                                                       _from_processor(build_image_only("internvl", ip, tok)))
    # a 224-px tower: 2x2 tiles + a thumbnail of 64 tokens each (the pixel-shuffled grid), whatever the config's
    # image_seq_length says
    small = AutoConfig.for_model("internvl", vision_config={"image_size": 224})
    ip = T.GotOcr2ImageProcessorPil(size={"height": 224, "width": 224})
    checked["internvl 224"] = (_from_config(small)[0],
                               _from_processor(build_image_only("internvl", ip, tok, image_seq_length=64)))
    tok.image_token = "<|image|>"
    mllama = build_image_only("mllama", T.MllamaImageProcessorPil(), tok)
    ids = mllama(text="<|image|>hello", images=[[Image.new("RGB", (448, 448))]])["input_ids"][0]
    checked["mllama"] = (rule("mllama"), list(ids).count(tok.convert_tokens_to_ids("<|image|>")))
    # Idefics3/SmolVLM's rule counts one crop (image splitting adds crops): the processor's tokens per crop
    for mt in ("idefics3", "smolvlm"):
        cfg, ip, tiny_tok, kwargs = tiny_parts(mt)
        checked[mt] = (_from_config(cfg)[0], build_image_only(mt, ip, tiny_tok, **kwargs).image_seq_len)
    assert all(ours == theirs for ours, theirs in checked.values()), {k: v for k, v in checked.items() if v[0] != v[1]}
    assert set(RULES) <= {k.split()[0] for k in checked}  # every rule describe has is checked here


def test_remote_code_part_of_a_composed_model_is_one_line_not_a_prompt(tmp_path):
    from types import SimpleNamespace

    from vlmtrain.errors import ConfigError
    from vlmtrain.model.hf_parts import make_hf_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "intern_vit_6b",
                                                      "auto_map": {"AutoConfig": "configuration_intern_vit.X"}}))
    with pytest.raises(ConfigError) as e:
        make_hf_config(SimpleNamespace(config=None, pretrained=str(tmp_path)), "vision", vision=True)
    assert e.value.exit_code == 2 and "\n" not in str(e.value) and "is a remote-code checkpoint" in str(e.value)
