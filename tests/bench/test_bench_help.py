"""Every command-line flag of the benchmark scripts under bench/ has a help string.

Users run ``python bench/.../X.py --help``; a flag without ``help=`` shows up there with
no explanation. The scripts import torch and other heavy things, so they are not imported
here: each one is parsed with ``ast`` and every ``<parser>.add_argument(...)`` call is
checked for a ``help`` keyword (``help=argparse.SUPPRESS`` counts: a hidden flag).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
SCRIPTS = sorted(BENCH.rglob("*.py"))
MIN_CALLS = 20  # there are far more: a broken walk must not pass with nothing found


def add_argument_calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_argument"
    ]


def flag_name(call: ast.Call) -> str:
    names = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return "/".join(names) or "<unnamed>"


def test_bench_scripts_found() -> None:
    assert SCRIPTS, f"no Python files under {BENCH}"
    total = sum(len(add_argument_calls(path)) for path in SCRIPTS)
    assert total >= MIN_CALLS, f"only {total} add_argument calls found under {BENCH}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_has_help(path: Path) -> None:
    relative = path.relative_to(ROOT)
    missing = [
        f"{relative}:{call.lineno}: {flag_name(call)}"
        for call in add_argument_calls(path)
        if not any(keyword.arg == "help" for keyword in call.keywords)
    ]
    assert not missing, "add_argument without help=:\n" + "\n".join(missing)
