"""The compiled kernels let go of the interpreter lock around their long loops (issue 17:
a KME's event loop answers requests while a round's kernels run on worker threads).

- A Python thread looping as fast as it can is hardly ever stopped for long while a
  long kernel call runs, and stopped nearly throughout a control call that holds the
  lock (`photon_sum`, which keeps it); main's kernels fail this test.
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
# A stop of the counting thread longer than this is a block: longer than the OS's
# time slices on a loaded machine, shorter than one long kernel call (20-90 ms here).
GAP_S = 0.008


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
    """A Python thread looping as fast as it can (it runs only with the lock), noting
    every stretch of more than GAP_S in which it could not run."""

    def __init__(self) -> None:
        self.gaps: list[tuple[float, float]] = []
        self._stop = False
        self._started = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.perf_counter()
        self._started.set()
        while not self._stop:
            now = time.perf_counter()
            if now - last > GAP_S:
                self.gaps.append((last, now))
            last = now

    def __enter__(self) -> _Counter:
        self._t.start()
        self._started.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()


@pytest.fixture
def short_switch() -> Iterator[None]:
    # A short switch interval: the counter gets the lock soon whenever it is free.
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    yield
    sys.setswitchinterval(old)


def _blocked_fraction(call: Callable[[], Any], seconds: float) -> float:
    """The fraction of the time spent inside call() (called repeatedly) during which
    the counter thread was stopped for more than GAP_S at a stretch. What happens
    between calls does not count, so the lock changing hands there does not blur it;
    the OS descheduling the counter on a loaded machine does count (a floor)."""
    windows: list[tuple[float, float]] = []
    with _Counter() as c:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            call()
            windows.append((t0, time.perf_counter()))
    inside = sum(t1 - t0 for t0, t1 in windows)
    blocked = sum(max(0.0, min(t1, g1) - max(t0, g0))
                  for t0, t1 in windows for g0, g1 in c.gaps)
    return blocked / inside


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
    # photon_sum keeps the lock throughout: the control, measured the same way, shows
    # that a held lock is seen. Measured: ~0.0-0.05 with these kernels, 0.8-0.87 with
    # main's (which hold the lock), 0.87-0.93 for the control.
    held = np.full(1 << 26, 3, np.uint8)
    tries = []
    for _ in range(3):  # the machine is shared: the clearest of three tries
        released = _blocked_fraction(call, 0.3)
        control = _blocked_fraction(lambda: K.photon_sum(held), 0.3)
        tries.append((released, control))
        if released < 0.4 and control > 0.6:
            break
    else:
        pytest.fail(f"{name}: (blocked fraction with the kernel, control) {tries}")



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
