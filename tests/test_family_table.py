"""`vlmtrain families`: the table agrees with the decisions a run makes, and docs/families.md is its output.

The table builds transformers' default config of each family on meta and asks vlmtrain's checks. Here each listed
family's *tiny* config (vlmtrain.model.native.tiny, another size) goes through the paths a user's run takes
instead: stage YAMLs loaded by the stage schema and `check_native_stage` (packing, FSDP2, ZeRO-3, DP-SGD), `vlmtrain
plan`'s `plan_config`, PEFT injection by `apply_lora`, and the family row's own fields (template, bare connector
parameters, MoE router). A table that said yes where the run refuses, or another reason, fails here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from vlmtrain.model.native.families import FAMILIES

DOC = Path(__file__).resolve().parents[1] / "docs" / "families.md"


@pytest.fixture(scope="module")
def rows():
    """Every row, built once (≈15 s on the 2-core box: one meta build per model type)."""
    import logging

    from vlmtrain.cli.family_table import build_rows

    logging.getLogger("vlmtrain.train").setLevel(logging.WARNING)
    return build_rows()


def _stage_file(tmp_path, name, model: dict, **fields) -> Path:
    body = {"name": name, "preset": "sft", "model": model, "data": {"train": [{"builtin": "digits-qa"}]}}
    for key, value in fields.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _run_check(path, bundle) -> str:
    """What `check_native_stage` says for the stage YAML at `path` ("" = accepted) on `bundle`, its model built on
    meta from the YAML's model section."""
    from vlmtrain.errors import ConfigError
    from vlmtrain.train.native import check_native_stage
    from vlmtrain.plan import load_plan_stages

    [(stage_cfg, model_cfg)] = load_plan_stages(path)
    assert model_cfg.model_type == bundle.model.model_type
    try:
        check_native_stage(stage_cfg, bundle)
    except ConfigError as e:
        return "; ".join(e.problems)
    return ""


def _tiny_model(mt: str) -> dict:
    from vlmtrain.model.native.tiny import tiny_parts

    cfg = tiny_parts(mt)[0].to_dict()
    return {"model_type": mt, "config": {k: v for k, v in cfg.items() if k != "model_type"}}


def test_every_mapping_key_and_listed_family_has_one_row(rows):
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    names = [r.family for r in rows]
    assert sorted(names) == sorted(set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) | set(FAMILIES))
    by = {r.family: r for r in rows}
    assert all(by[mt].kind == "listed" for mt in FAMILIES)
    for r in rows:
        if r.kind == "refused":  # describe's own line for the key, nothing else
            assert r.why.startswith(f"model_type {r.family!r}: ") and not r.cells, r
        else:
            assert set(r.cells) == {"stages", "lora", "qlora", "packing", "fsdp", "zero3", "dp_sgd", "plan",
                                    "export"}, r.family


@pytest.mark.parametrize("mt", sorted(FAMILIES))
def test_listed_family_row_agrees_with_the_run_checks(mt, rows, tmp_path):
    from vlmtrain.errors import ConfigError
    from vlmtrain.plan import plan_config

    from torch import nn

    from vlmtrain.config.model import NativeModelConfig
    from vlmtrain.model import build_model

    row = next(r for r in rows if r.family == mt)
    c = row.cells
    model = _tiny_model(mt)
    bundle = build_model(NativeModelConfig(**model), device="meta")
    asks = {"packing": {"data": {"mode": "pack"}}, "fsdp": {"trainer": {"strategy": "fsdp"}},
            "zero3": {"trainer": {"strategy": "deepspeed_zero3"}}}
    for col, fields in asks.items():
        said = _run_check(_stage_file(tmp_path, col, model, **fields), bundle)
        assert (c[col].ok, c[col].note) == (not said, said), (mt, col)
    dp = {"privacy": {"noise_multiplier": 1.0, "delta": 1e-5}, "train": {"llm": "lora"}, "lora": {"r": 4}}
    full = _run_check(_stage_file(tmp_path, "dp", model, **dp), bundle)
    lora_only = _run_check(_stage_file(tmp_path, "dp_lora", model, **{**dp, "train": {"llm": "lora",
                                                                                         "connector": False}}), bundle)
    if not full:
        assert c["dp_sgd"].ok and not c["dp_sgd"].note, mt
    elif not lora_only:
        assert c["dp_sgd"].ok and c["dp_sgd"].note == f"LoRA only: {full}", mt
    else:
        assert not c["dp_sgd"].ok and c["dp_sgd"].note == lora_only, mt
    def plan(**fields) -> str:
        try:
            plan_config(_stage_file(tmp_path, "plan", model, **fields), 80 * 2**30)
        except ConfigError as e:
            return str(e)
        return ""

    planned, lora = plan(), plan(train={"llm": "lora"}, lora={"r": 4})
    if planned:
        assert (c["plan"].ok, c["plan"].note) == (False, planned), mt
    else:  # planned; a LoRA stage too unless the cell names its condition
        assert c["plan"].ok and ("not planned yet" in lora) == ("fused expert" in c["plan"].note), (mt, lora)
    # the family row's own data: a family without a vendored template (and a chat at all: PaliGemma's samples are a
    # prefix and a suffix) trains with the checkpoint's own or `chat_template:`; bare connector parameters limit PEFT
    # export; an MoE family's experts take adapters and stay out of NF4
    fam = FAMILIES[mt]
    assert ("chat_template:" in c["stages"].note) == (fam.template == "" and not fam.prefix_suffix), mt
    assert c["stages"].ok and c["stages"].short == "yes", mt
    hf = bundle.model.hf
    bare = [p for p in fam.roles["connector"].values() if isinstance(hf.get_submodule(p.rpartition(".")[0]).__dict__
                                                                     .get("_parameters", {}).get(p.rpartition(".")[2]),
                                                                     nn.Parameter)]
    assert ("bare parameter" in c["export"].note) == bool(bare), (mt, bare)
    # MoE: a router loss, or fused experts under the family's own regex (Llama 4: transformers adds no router loss)
    moe = fam.router_aux_loss or bool(fam.expert_lora_target)
    assert ("experts" in c["lora"].short) == moe == ("expert" in c["qlora"].note), mt


@pytest.mark.parametrize("mt", ["qwen3_5_moe", "llava_next", "qwen2_vl"])
def test_lora_cell_is_what_peft_injection_does(mt, rows):
    """The LoRA cell's parts against `apply_lora` on the tiny model: the tower only where the default vision regex
    reaches it (else the run's one-line refusal), fused experts through `target_parameters`."""
    import torch

    from vlmtrain.config.model import NativeModelConfig
    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.errors import ConfigError
    from vlmtrain.model import build_model
    from vlmtrain.model.lora import apply_lora

    cell = next(r for r in rows if r.family == mt).cells["lora"]
    parts = cell.short.split("+")
    torch.manual_seed(0)
    m = build_model(NativeModelConfig(**_tiny_model(mt)), device="meta").model
    names = apply_lora(m, LoRAConfig(), llm=True, vision=False)
    assert any(".experts." in n for n in names) == ("experts" in parts), names
    m = build_model(NativeModelConfig(**_tiny_model(mt)), device="meta").model
    if "tower" in parts:
        assert any(n.startswith("vision.") for n in apply_lora(m, LoRAConfig(), llm=True, vision=True))
    else:
        with pytest.raises(ConfigError, match="lora.vision_target: .* matches no linear layer of the tower"):
            apply_lora(m, LoRAConfig(), llm=True, vision=True)


def test_docs_families_md_is_the_command_output(rows):
    # describe's answers for gemma3n and the torchvision-only processors depend on those packages being absent
    # (this project's stack): with them installed the table differs from the committed one
    if importlib.util.find_spec("timm") or importlib.util.find_spec("torchvision"):
        pytest.skip("timm or torchvision installed: some rows differ from docs/families.md")
    from vlmtrain.cli.family_table import to_markdown

    assert DOC.read_text() == to_markdown(rows), "regenerate: vlmtrain families --format md > docs/families.md"


def test_cli_json_and_markdown(rows, capsys):
    from vlmtrain.cli.main import main

    assert main(["families", "mllama", "qwen3_5", "gemma3n", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    by = {r.family: r for r in rows}
    assert [d["family"] for d in out] == ["mllama", "qwen3_5", "gemma3n"]  # listed first, refused last
    from dataclasses import asdict

    assert all(d == asdict(by[d["family"]]) for d in out)
    assert main(["families", "mllama", "--format", "md"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("# Families") and "| mllama | listed |" in md and "packed samples would attend" in md


def test_readme_lists_the_table_families(rows):
    if importlib.util.find_spec("timm") or importlib.util.find_spec("torchvision"):
        pytest.skip("timm or torchvision installed: some rows differ from the README's lists")
    from vlmtrain.cli.family_table import family_lists

    readme = (DOC.parents[1] / "README.md").read_text()
    block = readme.split("<!-- families:start -->", 1)[1].split("<!-- families:end -->", 1)[0]
    assert " ".join(block.split()) == " ".join(family_lists(rows).split())


def test_cli_unknown_model_type_is_one_line(capsys):
    from vlmtrain.cli.main import main

    assert main(["families", "qwen3_5", "qwen9_vl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: families: 'qwen9_vl': not a key"), err
