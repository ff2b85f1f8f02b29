"""The documentation: the MkDocs site builds with --strict (broken links and anchors fail), the README stays short,
pages stay wrapped and cite no internal issue numbers, and the generated reference covers the CLI and the schemas.

One `mkdocs build` per pytest run (module fixture, ~2 s of CPU); the other checks read Markdown files."""

import argparse
import html
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
README = ROOT / "README.md"
WIDE = 200  # paragraphs are wrapped at ~118; a line past this is an unwrapped paragraph
# What README's "Contracts checked from outside" named before the docs moved into the site; the contracts page must
# still carry every one of them verbatim.
CONTRACT_TERMS = [
    "vlmtrain describe --config CFG --json", '"params"', '"image_tokens"', "7,063,427,072",
    "vlmtrain export RUN_OR_CKPT --format hf-llava --out DIR", "LlavaForConditionalGeneration.from_pretrained(DIR)",
    "AutoProcessor.from_pretrained(DIR)", "--format vlmtrain",
    "vlmtrain generate RUN_OR_CKPT --image IMG --prompt TEXT [--max-new-tokens N]",
    "vlmtrain prep llava --json FILE --images DIR --out DIR", "DIR/manifest.json", '"samples"', '"rejected"',
    "DIR/rejects.jsonl", "vlmtrain data inspect DIR --config CFG --n N --json", '"supervised_text"', '"image_slots"',
    "vlmtrain run RECIPE --out DIR [--resume]", "summary.json", "metrics.jsonl", "stage.json",
    "checkpoints/last.ckpt", "final_loss", "samples_per_s", "tokens_per_s", "skipped",
    "`make demo` runs `configs/recipes/demo.yaml` into `runs/demo/`",
    "vlmtrain plan --config CFG --gpu-memory 24GiB --json", '"peak_gib"', '"max_micro_batch"', '"parts"',
    "vlmtrain run RECIPE --out DIR --strategy S --max-steps N", "deepspeed_zero3",
    "torchrun --nproc_per_node=2 -m vlmtrain", '"privacy": {"epsilon", "delta", "noise_multiplier"',
    "vlmtrain run configs/recipes/medical-dp.yaml --out DIR --max-steps N",
    "vlmtrain privacy audit RUN [--holdout SHARDS] [--json]", "STAGE/privacy_audit.json",
    "vlmtrain fed run configs/recipes/medical-federated.yaml --out DIR", '"bytes_up_per_round"',
    '"secure_aggregation"', "python -m bench sft", '"ratio"', "bench/results/<name>.json",
    "vlmtrain prep medical --src DIR --policy FILE --out DIR", "privacy_report.json", "DIR/records.jsonl",
    "accepted_consent", "{key}.dcm.json",
]


def prose_lines(path):
    """(line number, text) of the lines outside fenced code blocks and tables."""
    fence = False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
            continue
        if not fence and not line.lstrip().startswith("|"):
            yield n, line


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    # No --quiet: it hides the warnings that --strict counts, and a broken link would then build.
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def text_of(page):
    """Visible text of an HTML file or string, whitespace collapsed (highlighted code is split into spans)."""
    page = page if isinstance(page, str) else page.read_text()
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def test_site_builds_strict_and_opens_with_the_two_commands(site):
    body = DOCS.joinpath("index.md").read_text().split("\n")
    assert body[0].startswith("# ") and body[2] == "```bash", "the home page starts with the commands"
    first_block = body[3:body.index("```", 3)]
    assert [ln.split("#")[0].strip() for ln in first_block] == ["make demo", "make test"]
    page = (site / "index.html").read_text()
    article = text_of(page[page.index("<article"):page.index("</article>")])
    assert article.index("make demo") < article.index("make test") < article.index("Where to go")


def test_cli_reference_lists_every_verb_and_option(site):
    """The generated pages against the parser itself: each verb has a page with all of its (sub-)options."""
    from vlmtrain.cli.main import build_parser

    def options(parser):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    yield from options(sub)
            elif a.option_strings and a.help != argparse.SUPPRESS:
                yield from (s for s in a.option_strings if s not in ("-h", "--help"))

    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert len(verbs) >= 10
    for verb, parser in verbs.items():
        page = text_of(site / "reference" / "cli" / verb / "index.html")
        assert f"vlmtrain {verb}" in page
        missing = [o for o in set(options(parser)) if o not in page]
        assert not missing, (verb, missing)


def test_config_reference_lists_every_stage_field(site):
    from vlmtrain.config.stage import RecipeConfig, StageConfig, TrainerConfig

    page = text_of(site / "reference" / "config" / "index.html")
    for cls in (StageConfig, RecipeConfig, TrainerConfig):
        assert cls.__name__ in page
        assert not [f for f in cls.model_fields if f not in page], cls


def test_readme_is_short_and_self_contained():
    text = README.read_text()
    assert len(text.split()) <= 1500
    assert "make demo" in text and "make test" in text
    assert "shared/DESIGN.md" not in text  # a file outside the repository
    quickstart = text.split("## Quickstart")[1].split("\n## ")[0]
    commits = re.findall(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", quickstart)
    assert not commits, f"the quickstart carries a timing log with commit ids: {commits}"


@pytest.mark.parametrize("path", [README, ROOT / "data_prep" / "README.md", *PAGES], ids=lambda p: p.name)
def test_pages_are_wrapped_and_cite_no_issue_numbers(path):
    wide = [n for n, line in prose_lines(path) if len(line) > WIDE]
    assert not wide, f"{path.relative_to(ROOT)}: lines over {WIDE} chars outside code and tables: {wide}"
    cites = [(n, line.strip()) for n, line in prose_lines(path)
             if re.search(r"(?<![\w&/#])#\d+\b|\bissues? \d+|\b(sessions?|sittings?) \d", line, re.I)]
    assert not cites, f"{path.relative_to(ROOT)}: internal issue or session citations: {cites}"


def test_contracts_page_carries_every_contract():
    page = DOCS.joinpath("reference", "contracts.md").read_text()
    flat = " ".join(page.split())
    assert not [t for t in CONTRACT_TERMS if t not in flat]
