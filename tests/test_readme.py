"""The README as a new user reads it: each Python snippet stands alone, the V2 requests
name the input the sklearn runtime's metadata gives, the quick start is short, and
`make clean` removes nothing that no longer exists."""

from __future__ import annotations

import ast
import builtins
import json
import re
from pathlib import Path

from cachemesh.runtimes.sklearn import INPUT

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.DOTALL)


def unbound_names(code: str) -> set[str]:
    """Names a snippet reads that it neither imports nor assigns (nor are builtins)."""
    tree = ast.parse(code)
    bound, read = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return read - bound


def test_each_python_snippet_stands_alone():
    snippets = python_snippets()
    assert len(snippets) >= 4
    for code in snippets:
        assert unbound_names(code) == set(), code


def test_the_check_finds_a_snippet_that_leans_on_another():
    assert unbound_names("x = tg.InferInput('input-0', [1], 'FP32')\nprint(body)") == {
        "tg", "body"}


def test_v2_requests_name_the_sklearn_input():
    names = re.findall(r'"name":\s*"([^"]+)",\s*"shape"', README)
    names += re.findall(r'InferInput\("([^"]+)"', README)
    assert names and set(names) == {INPUT}
    for body in re.findall(r"-d '(\{\"inputs\".*?\})'", README):
        assert {t["name"] for t in json.loads(body)["inputs"]} == {INPUT}


def test_the_quick_start_reads_in_a_minute():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert len(quick.split()) < 200  # about a minute at a reader's pace
    assert "~/.cache/cachemesh" in quick and "cachemesh-demo-origin" in quick
    assert "rm -rf" in quick  # how to remove what the demo made


def test_make_clean_names_only_what_exists():
    clean = re.search(r"^clean:\n\t(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert clean and ".demo" not in clean.group(1)
