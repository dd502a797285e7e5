"""The import contracts in pyproject.toml ([tool.importlinter]) hold: pqc <- qkd <- gateway,
qkd.common below the rest of qkd, and a tunnel core that does no I/O; and no module
import runs in a circle, not even through a function-level import."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a test dependency (pip install '.[test]')"
    return subprocess.run([exe], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_layer_contracts_hold() -> None:
    proc = _lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "5 kept, 0 broken" in proc.stdout


def test_contracts_catch_an_upward_import(tmp_path: Path) -> None:
    """Control: the same contracts on a copy where qkd imports gateway are broken."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(
        ".venv", ".git", "tests", "*.egg-info", "__pycache__", "docs", "benchmarks", "deploy"))
    bad = copy / "qkd" / "common" / "upward.py"
    bad.write_text(textwrap.dedent("""\
        from gateway import config  # noqa: F401
        """))
    proc = _lint_imports(copy)
    assert proc.returncode != 0
    assert "qkd.common.upward -> gateway.config" in proc.stdout


def _import_cycles(root: Path) -> list[tuple[str, str]]:
    """Every direct import a -> b (function-level imports included, TYPE_CHECKING
    ones not) where b also reaches a: each is part of an import circle."""
    code = textwrap.dedent("""\
        import grimp, json
        g = grimp.build_graph("pqc", "qkd", "gateway", exclude_type_checking_imports=True)
        out = []
        for a in sorted(g.modules):
            for b in sorted(g.find_modules_directly_imported_by(a)):
                related = b == a or b.startswith(a + ".") or a.startswith(b + ".")
                if b in g.modules and not related and g.chain_exists(importer=b, imported=a):
                    out.append((a, b))
        print(json.dumps(out))
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [tuple(x) for x in json.loads(proc.stdout)]


def test_no_import_circles() -> None:
    assert _import_cycles(REPO) == []


def test_circle_check_catches_a_lazy_circle(tmp_path: Path) -> None:
    """Control: a function-level import back into its importer is found."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(
        ".venv", ".git", "tests", "*.egg-info", "__pycache__", "docs", "benchmarks", "deploy"))
    kem = copy / "pqc" / "kem.py"
    kem.write_text(kem.read_text() + "\n\ndef _late() -> object:\n"
                   "    from pqc import factory\n    return factory\n")
    assert ("pqc.kem", "pqc.factory") in _import_cycles(copy)
