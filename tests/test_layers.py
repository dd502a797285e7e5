"""The import contracts in pyproject.toml ([tool.importlinter]) hold: pqc <- qkd <- gateway,
qkd.common below the rest of qkd, and a tunnel core that does no I/O."""

from __future__ import annotations

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
    assert "4 kept, 0 broken" in proc.stdout


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
