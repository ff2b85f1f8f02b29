"""House rules checked on the source itself (`ast`, no import of the package): no function in src/ over 80 lines
without a one-line reason in its docstring ("long because ..."). Which layer may import which: tests/test_layers.py
(import-linter's contracts in pyproject.toml)."""

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
