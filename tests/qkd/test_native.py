"""Every kernel source under qkd/native is built by the install and loads; QKDGW_NATIVE=0
turns them all off. The bit-for-bit comparisons with the references sit beside each
caller's tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qkd import native

REPO = Path(__file__).resolve().parents[2]
SOURCES = native.kernel_names()


@pytest.mark.parametrize("name", SOURCES)
def test_every_kernel_source_was_built(name: str) -> None:
    if native.load(name) is None and os.environ.get("QKDGW_REQUIRE_TOOLS") != "1":
        pytest.skip(f"_qkdgw_{name} not built here (no C compiler at install time?)")
    assert native.load(name) is not None, f"_qkdgw_{name} missing: reinstall with gcc"
    assert name not in native.missing_kernels()


def test_native_off_gives_the_references() -> None:
    code = ("from qkd import native; import sys; "
            "sys.exit(any(native.load(n) is not None for n in sys.argv[1:]))")
    env = {**os.environ, "QKDGW_NATIVE": "0"}
    proc = subprocess.run([sys.executable, "-c", code, *SOURCES, "nonexistent"], env=env,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0
    assert native.load("nonexistent") is None  # control: a module that was never built
