"""The compiled kernels let go of the interpreter lock around their long loops (issue 17:
a KME's event loop answers requests while a round's kernels run on worker threads).

- A Python thread counting in a loop makes progress while a long kernel call runs, and
  next to none while a control call of the same length that holds the lock runs
  (`photon_sum`, which keeps it).
- Several threads calling the kernels at once get, bit for bit, what numpy computes
  single-threaded from the same inputs.
- An error found inside a released loop is still the ValueError it was (with large
  inputs, so the released path is the one taken)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from qkd import native

K = native.load("bb84")
C = native.load("cascade")
pytestmark = pytest.mark.skipif(K is None or C is None, reason="kernels not built")

BIG = 1 << 21  # items per call: well above the kernels' 4096-item threshold


# ------------------------------------------------------------------ numpy references

def _emit_inputs(rng: np.random.Generator, m: int) -> tuple[Any, ...]:
    r = rng.integers(0, 2**64, m, dtype=np.uint64)
    sec = rng.integers(0, 2**64, m, dtype=np.uint64)
    tails = np.sort(rng.integers(0, 2**64, 5, dtype=np.uint64))[::-1].copy()
    t_mu = rng.integers(0, 2**32, 7, dtype=np.uint32)
    t_basis = int(rng.integers(0, 2**31))
    return r, sec, tails, t_mu, t_basis


def _emit_kernel(inp: tuple[Any, ...]) -> tuple[Any, ...]:
    r, sec, tails, t_mu, t_basis = inp
    m = len(r)
    outs = [np.empty(m, np.uint8) for _ in range(4)]
    ones = K.emit_fill(m, r, sec, tails, t_mu, t_basis, *outs)
    return (ones, *outs)


def _emit_ref(inp: tuple[Any, ...]) -> tuple[Any, ...]:
    r, sec, tails, t_mu, t_basis = inp
    ph = 1 + np.cumprod(r[:, None] < tails[None, :], axis=1).sum(axis=1)
    half = sec.view(np.uint32)
    low, high = half[0::2], half[1::2]
    cls = (low >= t_mu[ph]).astype(np.uint8)
    basis = ((high & 0x7FFFFFFF) >= t_basis).astype(np.uint8)
    bit = (high >> 31).astype(np.uint8)
    state = (ph | basis.astype(np.int64) << 5 | bit.astype(np.int64) << 6).astype(np.uint8)
    return int(cls.sum()), state, cls, basis, bit


def _sift_inputs(rng: np.random.Generator, n: int) -> tuple[Any, ...]:
    return (rng.integers(0, 2, n, dtype=np.uint8), rng.integers(0, 2, n, dtype=np.uint8),
            rng.integers(0, 4, n, dtype=np.uint8))


def _sift_kernel(inp: tuple[Any, ...]) -> tuple[Any, ...]:
    a, b, c = inp
    zs, xs = np.empty(len(a), np.int64), np.empty(len(a), np.int64)
    nz, nx, cz, cx = K.sift_select(a, b, c, 0, 1, zs, xs)
    return zs[:nz], xs[:nx], cz, cx


def _sift_ref(inp: tuple[Any, ...]) -> tuple[Any, ...]:
    a, b, c = inp
    z, x = np.flatnonzero((a == b) & (a == 0)), np.flatnonzero((a == b) & (a == 1))
    return (z, x, tuple(np.bincount(c[z], minlength=4)[:3].tolist()),
            tuple(np.bincount(c[x], minlength=4)[:3].tolist()))


def _insert_inputs(rng: np.random.Generator, n: int) -> tuple[Any, ...]:
    src = rng.integers(0, 2**63, n, dtype=np.int64)
    pos = np.sort(rng.integers(0, n + 1, n // 8, dtype=np.int64))
    return src, pos, rng.integers(0, 2**63, len(pos), dtype=np.int64)


def _insert_kernel(inp: tuple[Any, ...]) -> tuple[Any, ...]:
    src, pos, vals = inp
    out = np.empty(len(src) + len(pos), np.int64)
    K.insert_sorted(src, pos, vals, 8, out)
    buf = np.zeros(len(src) + len(pos), np.int64)
    buf[:len(src)] = src
    K.insert_inplace(buf, len(src), pos, vals, 8)
    return out, buf


def _insert_ref(inp: tuple[Any, ...]) -> tuple[Any, ...]:
    src, pos, vals = inp
    want = np.insert(src, pos, vals)
    return want, want


def _rank_inputs(rng: np.random.Generator, n: int) -> tuple[Any, ...]:
    pulses = 64 * (n // 64) + 17
    words = rng.integers(0, 2**64, (pulses + 63) // 64, dtype=np.uint64)
    counts = np.unpackbits(words.view(np.uint8), bitorder="little").reshape(-1, 64).sum(1)
    before = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return words, before, pulses, rng.integers(0, pulses, n, dtype=np.int64)


def _rank_kernel(inp: tuple[Any, ...]) -> tuple[Any, ...]:
    words, before, pulses, slots = inp
    idx, found = np.empty(len(slots), np.int64), np.empty(len(slots), np.uint8)
    allf = K.rank_lookup(words, before, pulses, slots, idx, found)
    return allf, idx, found


def _rank_ref(inp: tuple[Any, ...]) -> tuple[Any, ...]:
    # from the bits alone: the before counts _rank_inputs made must agree with them
    words, _before, _pulses, slots = inp
    bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(np.int64)
    cums = np.concatenate([[0], np.cumsum(bits)])
    found = bits[slots].astype(np.uint8)
    return bool(found.all()), cums[slots], found


def _varint_inputs(rng: np.random.Generator, n: int) -> tuple[Any, ...]:
    one_byte = rng.integers(0, 128, n, dtype=np.uint8).tobytes()
    values = rng.integers(0, 2**40, n // 4, dtype=np.uint64)
    return one_byte, values


def _varint_kernel(inp: tuple[Any, ...]) -> tuple[Any, ...]:
    one_byte, values = inp
    out = np.empty(len(one_byte), np.uint64)
    head = K.varints_decode(one_byte, 0, len(one_byte), out, True)
    enc = K.varints_encode(values, False)
    back = np.empty(len(values), np.uint64)
    K.varints_decode(enc, 0, len(values), back, False)
    deltas = K.varints_encode(np.frombuffer(one_byte, np.uint8).astype(np.int64).cumsum(),
                              True)
    return head[0], out, back, deltas


def _varint_ref(inp: tuple[Any, ...]) -> tuple[Any, ...]:
    one_byte, values = inp
    raw = np.frombuffer(one_byte, np.uint8)
    return len(one_byte), raw.astype(np.uint64).cumsum(), values, one_byte


def _pack_inputs(rng: np.random.Generator, n: int) -> tuple[Any, ...]:
    frames = 130
    return rng.integers(0, 3, frames * (n // frames), dtype=np.uint8), frames, n // frames


def _pack_kernel(inp: tuple[Any, ...]) -> tuple[Any, ...]:
    bits, frames, n = inp
    words = (frames + 63) // 64
    out = np.full((n + 1) * words, 0xFFFF, np.uint64)
    C.pack(bits, frames, n, out)
    return (out,)


def _pack_ref(inp: tuple[Any, ...]) -> tuple[Any, ...]:
    bits, frames, n = inp
    words = (frames + 63) // 64
    cols = np.packbits(bits.reshape(frames, n).T != 0, axis=1, bitorder="little")
    rows = np.zeros((n + 1, words * 8), np.uint8)
    rows[:n, :cols.shape[1]] = cols
    return (rows.view("<u8").reshape(-1).astype(np.uint64),)


def _count_inputs(rng: np.random.Generator, n: int) -> tuple[Any, ...]:
    return (rng.integers(0, 8, n, dtype=np.uint16),)


def _count_kernel(inp: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(K.count_eq(inp[0], len(inp[0]), v) for v in range(9))


def _count_ref(inp: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(int((inp[0] == v).sum()) for v in range(9))


CASES: dict[str, tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]] = {
    "count_eq": (_count_inputs, _count_kernel, _count_ref),
    "emit_fill": (_emit_inputs, _emit_kernel, _emit_ref),
    "sift_select": (_sift_inputs, _sift_kernel, _sift_ref),
    "insert": (_insert_inputs, _insert_kernel, _insert_ref),
    "rank_lookup": (_rank_inputs, _rank_kernel, _rank_ref),
    "varints": (_varint_inputs, _varint_kernel, _varint_ref),
    "pack": (_pack_inputs, _pack_kernel, _pack_ref),
}


def _same(got: tuple[Any, ...], want: tuple[Any, ...]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if isinstance(w, np.ndarray):
            np.testing.assert_array_equal(np.asarray(g), w)
            assert np.asarray(g).tobytes() == np.ascontiguousarray(w).astype(
                np.asarray(g).dtype).tobytes()
        else:
            assert g == w


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 4095, 4096, 4097])
def test_kernels_match_numpy_at_edge_sizes(name: str, n: int) -> None:
    make, kernel, ref = CASES[name]
    for seed in range(3):
        inp = make(np.random.default_rng(seed * 1000 + n), n)
        _same(kernel(inp), ref(inp))


@pytest.mark.parametrize("name", sorted(CASES))
def test_concurrent_calls_are_bit_for_bit_the_numpy_reference(name: str) -> None:
    make, kernel, ref = CASES[name]
    inputs = [make(np.random.default_rng(100 + t), 1 << 17) for t in range(4)]
    wants = [ref(inp) for inp in inputs]  # single-threaded
    errors: list[BaseException] = []
    start = threading.Barrier(len(inputs))

    def worker(t: int) -> None:
        try:
            start.wait()
            for _ in range(4):
                _same(kernel(inputs[t]), wants[t])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(inputs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors


# --------------------------------------------------------------- the lock is let go

class _Counter:
    """A Python thread counting as fast as it can: it runs only with the lock."""

    def __init__(self) -> None:
        self.count = 0
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop:
            self.count += 1

    def __enter__(self) -> _Counter:
        self._t.start()
        while self.count == 0:
            time.sleep(0.001)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()


@pytest.fixture
def short_switch() -> Iterator[None]:
    # A short switch interval bounds what the counter gets in before a call that holds
    # the lock starts, so the control's count stays small.
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    yield
    sys.setswitchinterval(old)


def _progress_during(call: Callable[[], Any], seconds: float) -> tuple[float, float]:
    """(counts per second of call time, call time) over repeated calls, counting only
    what the counter thread did while a call ran."""
    done, spent = 0, 0.0
    with _Counter() as c:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            c0, t0 = c.count, time.perf_counter()
            call()
            t1, c1 = time.perf_counter(), c.count
            done += c1 - c0
            spent += t1 - t0
    return done / spent, spent


def _released_calls() -> dict[str, Callable[[], Any]]:
    rng = np.random.default_rng(7)
    emit = _emit_inputs(rng, BIG)
    m = len(emit[0])
    outs = [np.empty(m, np.uint8) for _ in range(4)]
    a, b, cl = _sift_inputs(rng, 4 * BIG)
    zs, xs = np.empty(len(a), np.int64), np.empty(len(a), np.int64)
    bits = rng.integers(0, 2, 64 * (BIG // 4), dtype=np.uint8)
    pk = np.empty((BIG // 4 + 1) * 1, np.uint64)
    return {
        "emit_fill": lambda: K.emit_fill(m, *emit[:4], emit[4], *outs),
        "sift_select": lambda: K.sift_select(a, b, cl, 0, 1, zs, xs),
        "pack": lambda: C.pack(bits, 64, BIG // 4, pk),
    }


@pytest.mark.parametrize("name", ["emit_fill", "sift_select", "pack"])
def test_a_python_thread_runs_while_a_long_kernel_runs(name: str,
                                                       short_switch: None) -> None:
    call = _released_calls()[name]
    # photon_sum keeps the lock throughout: the control of the same measurement. Its
    # calls are long (~0.1 s) so that what the counter gets in around a call (when the
    # OS is slow to run the caller again on a loaded machine) stays small beside it.
    held = np.full(1 << 27, 3, np.uint8)
    best = 0.0
    for _ in range(3):  # the machine is shared: the clearest of three tries
        released_rate, released_s = _progress_during(call, 0.3)
        held_rate, held_s = _progress_during(lambda: K.photon_sum(held), 0.3)
        assert released_s > 0.1 and held_s > 0.1
        best = max(best, released_rate / max(held_rate, 1.0))
        if best > 30:
            break
    # Measured: ~100x here; 4-15x with main's kernels, which hold the lock (the counter
    # still gets in between calls), so the bound is well above that.
    assert best > 30, (name, released_rate, held_rate)


# ------------------------------------------------- errors found in a released loop

def test_errors_inside_released_loops_are_value_errors() -> None:
    n = 5000
    u16 = np.full(n, 7, np.uint16)
    with pytest.raises(ValueError, match="fewer tie words"):
        K.carry_scan(u16, n, 7, np.zeros(0, np.uint64), 0, 0, np.empty(n, np.int64))
    ok = K.carry_scan(u16, n, 7, np.zeros(n, np.uint64), 1, 0, np.empty(n, np.int64))
    assert ok == n  # positive control: enough tie words, all below lo48
    state = np.ones(n, np.uint8)
    args = (np.zeros(n, np.uint32), None, np.zeros(16, np.uint64), np.zeros(16, np.uint64),
            0, np.zeros(0, np.int64), np.zeros(0, np.int64), np.arange(n, dtype=np.int64),
            np.empty(n, np.int64), np.empty(n, np.uint8), np.empty(n, np.uint8),
            np.empty(n, np.int64))
    with pytest.raises(ValueError, match="fewer words than photons"):
        K.measure_chunk(n, state, args[0], np.zeros(n - 1, np.uint64), *args[2:])
    assert K.measure_chunk(n, state, args[0], np.zeros(n, np.uint64), *args[2:]) == (0, 0)
    words = np.zeros(n // 64 + 1, np.uint64)
    before = np.zeros(len(words), np.int64)
    slots = np.arange(n, dtype=np.int64)
    idx, found = np.empty(n, np.int64), np.empty(n, np.uint8)
    assert K.rank_lookup(words, before, n, slots, idx, found) is False
    slots[-1] = n
    with pytest.raises(ValueError, match="outside the sent pulse train"):
        K.rank_lookup(words, before, n, slots, idx, found)
    m8 = np.zeros(n, np.uint8)
    pick = np.arange(n, dtype=np.int64)
    outs = [np.empty(n, np.uint8) for _ in range(5)]
    assert K.sift_pick(True, pick, m8, m8, m8, m8, 0, 1, *outs)[0] == n
    pick[n // 2] = n
    with pytest.raises(ValueError, match="index out of range"):
        K.sift_pick(True, pick, m8, m8, m8, m8, 0, 1, *outs)
    data = bytes([0x80]) * n
    with pytest.raises(ValueError, match="message truncated"):
        K.varints_decode(data, 0, n, np.empty(n, np.uint64), False)
