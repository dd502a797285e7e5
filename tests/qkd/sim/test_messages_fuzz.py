"""Decoders accept canonical encodings only: whatever decode() accepts, encode() gives back
byte for byte, and anything else ends in MessageError (never another exception)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkd.sim import messages as m

_SAMPLES = [
    m.CascadeHello("original", 0.02, 10000, 3, 7).encode(),
    m.ParityQuery(np.array([0, 5, 300, 2**40]), np.array([0, 1]), np.array([2, 0])).encode(),
    m.ParityReply(np.array([1, 0, 1, 1, 0], np.uint8)).encode(),
    m.CascadeDone(42).encode(),
    m.Detections(np.array([3, 10, 2**40]), np.array([0, 1, 1], np.uint8)).encode(),
    m.SiftReply(np.array([1, 0], np.uint8), np.array([0, 2], np.uint8)).encode(),
    m.TestBits(np.array([1, 1, 0], np.uint8)).encode(),
    m.EstimationResult((1, 2, 3), "").encode(),
    m.VerifyHash(np.ones(9, np.uint8), np.zeros(3, np.uint8)).encode(),
    m.VerifyResult(False).encode(),
    m.PrivacyAmp(5, np.ones(11, np.uint8), "x").encode(),
    m.FrameCheck(1, 3, np.ones(6, np.uint8), np.array([[1, 0, 1], [0, 0, 1]], np.uint8)).encode(),
    m.FrameCheckResult(0, np.array([1, 0, 0, 1], np.uint8)).encode(),
]


def _check(data: bytes) -> None:
    try:
        msg = m.decode(data)
    except m.MessageError:
        return
    assert msg.encode() == data


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(_SAMPLES), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                          max_size=4), st.integers(0, 3))
def test_mutated_samples_canonical(sample: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(sample)
    for pos, val in edits:
        if pos < len(data):
            data[pos] = val
    _check(bytes(data[: len(data) - cut] if cut < len(data) else data))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted({s[0] for s in _SAMPLES})), st.binary(max_size=64))
def test_random_bodies_canonical(t: int, body: bytes) -> None:
    _check(bytes([t]) + body)


def test_samples_round_trip() -> None:
    for s in _SAMPLES:
        assert m.decode(s).encode() == s


@pytest.mark.slow
def test_atheris_decoders(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, s in enumerate(_SAMPLES):
        (corpus / f"seed{i}").write_bytes(s)
    target = Path(__file__).with_name("fuzz_messages_atheris.py")
    proc = subprocess.run([sys.executable, str(target), "-runs=300000", "-max_len=256",
                           str(corpus)], capture_output=True, text=True, timeout=1800,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done 300000 runs" in proc.stderr
