"""Binary entropy is written once, in qkd.sim.estimation (issue 10): every other use
imports it, so a fix to the end points or the base reaches every rate formula."""

from __future__ import annotations

import ast
import importlib
import math
from pathlib import Path

import pytest

from qkd.sim.estimation import h2

ROOT = Path(__file__).resolve().parents[3]


def _entropy_like(fn: ast.FunctionDef) -> bool:
    """A function that takes log2(x) and log2(1 - x) of the same x."""
    args = [ast.unparse(n.args[0]) for n in ast.walk(fn) if isinstance(n, ast.Call)
            and ast.unparse(n.func) in ("math.log2", "np.log2", "log2") and n.args]
    return any(f"{one} - {a}" in args for a in args for one in ("1", "1.0"))


def test_only_estimation_defines_binary_entropy() -> None:
    found = []
    for top in ("qkd", "gateway", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.FunctionDef) and (node.name == "h2"
                                                          or _entropy_like(node)):
                    found.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert found == ["qkd/sim/estimation.py:h2"]


def test_detector_sees_a_copy() -> None:
    # Positive control: the scan recognises a hand-written copy under another name.
    src = "def ent(p):\n    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)\n"
    fn = ast.parse(src).body[0]
    assert isinstance(fn, ast.FunctionDef) and _entropy_like(fn)


@pytest.mark.parametrize("module", ["qkd.sim.theory", "qkd.sim.session", "qkd.sim.cli"])
def test_users_import_the_one_h2(module: str) -> None:
    assert importlib.import_module(module).h2 is h2


def test_h2_values() -> None:
    assert h2(0.5) == 1.0 and h2(0.0) == 0.0 and h2(1.0) == 0.0
    assert h2(0.11) == pytest.approx(-0.11 * math.log2(0.11) - 0.89 * math.log2(0.89))
