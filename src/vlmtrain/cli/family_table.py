"""`vlmtrain families`: what each transformers image-text-to-text family can do in vlmtrain, decided by the code.

A row per key of transformers' `MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES` (and per listed family). Nothing here
is a second list of capabilities: each key is built on `meta` exactly as `vlmtrain describe` builds it
(`model_type: KEY` + `config: {}`: transformers' default config), and each cell asks the function a run asks:

- kind: `family_for` (listed family row, the generic map, or describe's one-line refusal);
- stages: each preset through the stage schema and `check_native_stage`, the training template
  (`training_template`: a family with none vendored needs `chat_template:`), the processor class, and whether its
  image processor exists only for torchvision (which `load_processor` then needs);
- LoRA: the default `lora.*_target` regexes through `target_names` / `target_parameter_names` (what `apply_lora`
  injects; DoRA is refused on fused experts); QLoRA: `quantize_targets` (what `quantize_llm_` turns into NF4);
- packing, FSDP2, ZeRO-3, DP-SGD: a stage asking for it through `check_native_stage` (DP-SGD first with the
  connector training, then LoRA only);
- plan: the planner's family check (`plan_refusal`; for MoE families, LoRA on fused experts is not planned);
  export: `hf` always, `peft` unless the connector holds a bare
  parameter (`bare_connector_parameters`, what `export_native_peft` refuses for a trained connector).

A cell is `Cell(ok, note)`: ok with a note is a condition (e.g. LoRA only), not ok names the refusal. The default
config is the family's own shape; a checkpoint of another size gets the same answers, except where a row says the
answer depends on the config (linear-attention layers, bare connector parameters).
"""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass, field

from vlmtrain.errors import ConfigError
from vlmtrain.plan.families import plan_refusal
from vlmtrain.train.native import check_native_stage
from vlmtrain.train.presets import deep_merge, with_preset

PRESETS = ("align", "pretrain", "sft", "dpo")
COLUMNS = ("stages", "lora", "qlora", "packing", "fsdp", "zero3", "dp_sgd", "plan", "export")
HEADERS = {"family": "family", "kind": "kind", "stages": "stages", "lora": "LoRA", "qlora": "QLoRA",
           "packing": "packing", "fsdp": "FSDP2", "zero3": "ZeRO-3", "dp_sgd": "DP-SGD", "plan": "plan",
           "export": "export"}
_DATA = {"train": [{"builtin": "digits-qa"}]}  # the schema needs a dataset; nothing is read
_LORA = {"train": {"llm": "lora"}, "lora": {}}
_DP = {"privacy": {"noise_multiplier": 1.0, "delta": 1e-5}}


@dataclass
class Cell:
    ok: bool
    note: str = ""  # ok: the condition; not ok: the refusal
    short: str = ""  # what the table shows instead of yes (LoRA's targeted parts, QLoRA's NF4 share)


@dataclass
class FamilyRow:
    family: str  # the model_type
    kind: str  # listed | generic | refused
    why: str = ""  # refused: describe's one line
    cells: dict[str, Cell] = field(default_factory=dict)


def stage(preset: str = "sft", **over):
    """A StageConfig of `preset` with `over` merged in (the stage a user would write to ask for the feature)."""
    from vlmtrain.config.stage import StageConfig

    return StageConfig(**with_preset(deep_merge({"name": f"families-{preset}", "preset": preset, "data": _DATA},
                                                over)))


def refusal(stage_cfg, bundle) -> str:
    """"" when `check_native_stage` accepts the stage for this model, else its reasons joined by "; "."""
    try:
        check_native_stage(stage_cfg, bundle)
    except ConfigError as e:
        return "; ".join(e.problems)
    return ""


def keys() -> list[str]:
    """Every image-text-to-text model type of transformers plus vlmtrain's listed families."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from vlmtrain.model.native.families import FAMILIES

    return list(dict.fromkeys([*MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, *FAMILIES]))


def build_rows(model_types: list[str] | None = None) -> list[FamilyRow]:
    """One row per model type: listed families first, then generic, then refused; by name within each."""
    rows = [family_row(mt) for mt in (model_types or keys())]
    order = {"listed": 0, "generic": 1, "refused": 2}
    return sorted(rows, key=lambda r: (order[r.kind], r.family))


def family_row(model_type: str) -> FamilyRow:
    """Build `model_type`'s default config on meta (as `describe` does) and ask each decision."""
    from vlmtrain.config.model import NativeModelConfig
    from vlmtrain.model.builder import build_model
    from vlmtrain.model.native.families import FAMILIES

    cfg = NativeModelConfig(name=model_type, model_type=model_type, config={})
    try:
        bundle = build_model(cfg, device="meta")
    except ConfigError as e:
        return FamilyRow(model_type, "refused", why=str(e))
    m = bundle.model
    row = FamilyRow(model_type, "listed" if FAMILIES.get(model_type) is m.family else "generic")
    row.cells = {"stages": _stages(bundle), **_adapters(m), **_strategies(bundle), "dp_sgd": _dp(bundle),
                 "plan": _plan(m), "export": _export(m)}
    return row


def _stages(bundle) -> Cell:
    """The presets `check_native_stage` accepts, on condition of a processor class (and, with no official template
    vendored, of the checkpoint's own or `chat_template:`)."""
    from vlmtrain.model.native.processor import processor_class, torchvision_only_image_processor

    m = bundle.model
    try:
        processor_class(m.model_type)
    except ConfigError as e:
        return Cell(False, str(e))
    refused = {p: refusal(stage(p), bundle) for p in PRESETS}
    ok = [p for p in PRESETS if not refused[p]]
    notes = [f"{p}: {why}" for p, why in refused.items() if why]
    if not m.family.template and not m.family.prefix_suffix:
        notes.append("no official chat template vendored: training uses the checkpoint's own chat_template.jinja "
                     "(assistant spans read from prefix renders) or `chat_template:` with generation marks")
    only = torchvision_only_image_processor(m.model_type)
    if only:  # load_processor refuses it in an environment without torchvision (this project's CPU stack)
        notes.append(f"its image processor ({only}) exists only for torchvision, which training needs installed")
    if not ok:
        return Cell(False, "; ".join(notes))
    return Cell(True, "; ".join(notes), short="yes" if len(ok) == len(PRESETS) else ", ".join(ok))


def _adapters(m) -> dict[str, Cell]:
    """LoRA with the default targets (what `apply_lora` would inject: `short` names the parts that get adapters),
    and QLoRA's NF4 share of the LLM's parameters (what `quantize_llm_` replaces)."""
    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.model.lora import lora_regex, target_names, target_parameter_names, with_family_vision_target
    from vlmtrain.model.quantize import quantize_targets

    lc = with_family_vision_target(m, LoRAConfig())
    llm = [n for n in target_names(m, lora_regex(lc, llm=True, vision=False)) if n.startswith("llm.")]
    tower = [n for n in target_names(m, lora_regex(lc, llm=False, vision=True)) if n.startswith("vision.")]
    experts = target_parameter_names(m, lc.llm_target_parameters)
    if not llm:
        return {"lora": Cell(False, f"lora.llm_target: the default {lc.llm_target!r} matches no linear layer of the "
                                    "LLM; set lora.llm_target"), "qlora": Cell(False, "no LoRA targets")}
    parts = ["LLM"] + (["experts"] if experts else []) + (["tower"] if tower else [])
    notes = ([f"{len(experts)} fused expert tensors take adapters through PEFT's target_parameters (no DoRA)"]
             if experts else [])
    if not tower:
        notes.append("the default lora.vision_target matches no tower layer: set it to put adapters on the tower")
    lora = Cell(True, "; ".join(notes), short="+".join(parts))
    quantized = sum(lin.weight.numel() for _, lin in quantize_targets(m))
    if not quantized:
        return {"lora": lora, "qlora": Cell(False, "the LLM has no linear layer besides the LM head to quantise")}
    share = quantized / sum(p.numel() for p in m.llm.parameters())
    note = ("the fused expert tensors are not linear layers and keep their precision" if experts else "")
    return {"lora": lora, "qlora": Cell(True, note, short=f"NF4 {share:.0%}")}


def _strategies(bundle) -> dict[str, Cell]:
    asks = {"packing": stage(data={"mode": "pack"}), "fsdp": stage(trainer={"strategy": "fsdp"}),
            "zero3": stage(trainer={"strategy": "deepspeed_zero3"})}
    return {k: _cell(refusal(s, bundle)) for k, s in asks.items()}


def _dp(bundle) -> Cell:
    """DP-SGD with the connector training; else with LoRA only (the connector frozen); else refused."""
    full = refusal(stage(**_DP, **_LORA), bundle)
    if not full:
        return Cell(True)
    lora_only = refusal(stage(**_DP, lora={}, train={"llm": "lora", "connector": False}), bundle)
    return Cell(True, f"LoRA only: {full}") if not lora_only else Cell(False, lora_only)


def _plan(m) -> Cell:
    """The planner's family check (`plan_refusal`, what `vlmtrain plan` refuses before modelling a step), and its
    condition for LoRA stages of MoE families: adapters on fused expert tensors are not planned."""
    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.model.lora import target_parameter_names

    refused = plan_refusal(m.model_type)
    if refused:
        return Cell(False, refused)
    if target_parameter_names(m, LoRAConfig().llm_target_parameters):
        return Cell(True, "LoRA stages with adapters on the fused expert tensors (the default "
                          "lora.llm_target_parameters) are not planned yet; lora.llm_target_parameters: '' plans them")
    return Cell(True)


def _export(m) -> Cell:
    from vlmtrain.model.native.peft_export import bare_connector_parameters

    bare = bare_connector_parameters(m)
    if bare:
        return Cell(True, f"peft only for stages with a frozen connector: its bare parameter `{bare[0]}` cannot be "
                          "a PEFT modules_to_save (a trained connector exports merged, --format hf)", short="hf, peft")
    return Cell(True, short="hf, peft")


def _cell(reason: str) -> Cell:
    return Cell(not reason, reason)


# ---- output ------------------------------------------------------------------------------------------------------

def to_json(rows: list[FamilyRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def _short(cell: Cell | None, notes: list[str]) -> str:
    """The cell as the table shows it: `yes` / `no` (or the cell's own short text), `(a)` naming its note."""
    if cell is None:
        return "—"
    word = cell.short or ("yes" if cell.ok else "no")
    if not cell.note:
        return word
    notes.append(cell.note)
    return f"{word} ({_letter(len(notes) - 1)})"


def _letter(i: int) -> str:
    return chr(ord("a") + i) if i < 26 else f"a{i - 25}"


def table(rows: list[FamilyRow]) -> tuple[list[list[str]], list[tuple[str, list[str]]]]:
    """(the table's rows of short cells, header first; per family, its notes in letter order (a), (b), ...)."""
    out = [list(HEADERS.values())]
    per_family = []
    for r in rows:
        notes: list[str] = []
        kind = _short(Cell(False, r.why, short="refused"), notes) if r.kind == "refused" else r.kind
        out.append([r.family, kind, *(_short(r.cells.get(c), notes) for c in COLUMNS)])
        if notes:
            per_family.append((r.family, notes))
    return out, per_family


_MD_INTRO = """# Families: what each one can do

Generated by `vlmtrain families --format md > docs/families.md` (transformers {version}); a test checks that this
file equals the command's output. Each model type of transformers' `MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES` is
built from its default config on the meta device, as `vlmtrain describe` builds it, and each cell is the answer of
the check a run makes: **listed** families have a family row in vlmtrain (roles, template, tested stages);
**generic** ones are mapped by the generic rule (vision / connector / LLM at the usual attribute names) and are
accepted by these checks without a family's tests; **refused** ones get `describe`'s one-line reason. A cell with a
letter has a note below: for `yes` the condition, for `no` the error a run would print. LoRA names the parts the
default `lora.*_target` regexes reach; QLoRA the share of the LLM's parameters that become NF4.

"""


def to_markdown(rows: list[FamilyRow]) -> str:
    """The table as markdown with a title and an introduction: docs/families.md is exactly this text."""
    import transformers

    cells, per_family = table(rows)

    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("*", "\\*")

    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in cells[0]) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells[1:]]
    lines += ["", "Notes:", ""]
    for family, notes in per_family:
        lines += [f"- **{family}**"]
        for i, n in enumerate(notes):  # wrapped: the docs keep prose lines short (tests/test_docs.py)
            lines += textwrap.wrap(f"({_letter(i)}) {esc(n)}", 116, initial_indent="  - ", subsequent_indent="    ",
                                   break_long_words=False, break_on_hyphens=False)
    return _MD_INTRO.format(version=transformers.__version__) + "\n".join(lines) + "\n"


def family_lists(rows: list[FamilyRow]) -> str:
    """README's list of the table's families by kind (the README test compares it, whitespace aside)."""
    by: dict[str, list[str]] = {}
    for r in rows:
        by.setdefault(r.kind, []).append(f"`{r.family}`")
    text = (f"Listed ({len(by.get('listed', []))}): {', '.join(by.get('listed', []))}. "
            f"Generic map ({len(by.get('generic', []))}): {', '.join(by.get('generic', []))}. "
            f"Refused with one line ({len(by.get('refused', []))}): the rest of the mapping, each reason in "
            "docs/families.md.")
    return "\n".join(textwrap.wrap(text, 118, break_long_words=False, break_on_hyphens=False))


def to_text(rows: list[FamilyRow]) -> str:
    cells, per_family = table(rows)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines += ["", "notes:"]
    for family, notes in per_family:
        lines += [f"  {family}"] + [f"    ({_letter(i)}) {n}" for i, n in enumerate(notes)]
    return "\n".join(lines) + "\n"
