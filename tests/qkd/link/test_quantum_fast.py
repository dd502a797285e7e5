"""The chunked `emit` / `measure` draw from the same distributions as the plain
per-slot reference forms (`emit_reference`, `measure_reference`) and the physics.

Seeded outputs differ between the two (the draws are made differently), so these are
statistical checks at 5 sigma, with parameters chosen so that each mix-up they guard
against (a swapped bit field, a wrong threshold, a lost dark click) moves a count by
far more than that."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from qkd.link import quantum as q
from qkd.link.csprng import SecretRng
from qkd.sim.params import LinkParams

PARAMS = LinkParams(distance_km=10.0, detector_efficiency=0.8, misalignment=0.03,
                    dark_count_prob=1e-7, pulses=3_000_000, mu=0.9, nu=0.2,
                    p_mu=0.6, p_nu=0.25, basis_bias=0.3)


def _close(k: int, n: int, p: float) -> bool:
    return abs(k - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


def test_poisson_tails_are_the_survival_function() -> None:
    for mu in (0.0, 1e-4, 0.1, 0.5, 0.9, 3.0):
        tails = q._poisson_tails(mu)
        for k, t in enumerate(tails):
            want = 0.0 if mu == 0 else float(stats.poisson.sf(k, mu))
            assert t / 2.0**64 == pytest.approx(want, rel=1e-9, abs=2.0**-64)


@pytest.mark.parametrize("secret", [False, True])
@pytest.mark.parametrize("emit", ["dense", "sparse"])
def test_emit_draws_classes_bases_bits_and_photons_as_specified(secret: bool,
                                                                emit: str) -> None:
    rng = np.random.default_rng(11)
    fn = q.emit_dense if emit == "dense" else q.emit
    rec, frame = fn(PARAMS, 3, rng, SecretRng() if secret else None)
    n = PARAMS.pulses
    if emit == "sparse":
        # Only the pulses are drawn at emission; announcing every slot draws the rest.
        assert np.array_equal(rec.slots, frame.slots)
        assert np.array_equal(rec.lookup(np.arange(n)), np.arange(n))
        assert np.array_equal(rec.slots, np.arange(n))
    assert rec.intensity.size == rec.basis.size == rec.bit.size == n
    for k, p in enumerate(PARAMS.intensity_probs):
        assert _close(int(np.count_nonzero(rec.intensity == k)), n, p)
    assert list(rec.sent_per_intensity) == list(np.bincount(rec.intensity, minlength=3))
    # basis 1 (X) with probability 1 - basis_bias, independent of the class.
    for k in range(3):
        sel = rec.intensity == k
        assert _close(int(np.count_nonzero(rec.basis[sel])), int(sel.sum()),
                      1 - PARAMS.basis_bias)
    assert _close(int(np.count_nonzero(rec.bit)), n, 0.5)
    both = np.count_nonzero((rec.bit == 1) & (rec.basis == 1))
    assert _close(int(both), n, 0.5 * (1 - PARAMS.basis_bias))
    # The frame: every slot with a photon, in order, with that slot's basis and bit.
    assert np.all(np.diff(frame.slots) > 0)
    photons = frame.state & 0x1F
    assert np.all(photons >= 1)
    assert np.array_equal((frame.state >> 5) & 1, rec.basis[frame.slots])
    assert np.array_equal((frame.state >> 6) & 1, rec.bit[frame.slots])
    assert np.all(frame.state >> 7 == 0)
    cls = rec.intensity[frame.slots]
    for k, mu in enumerate(PARAMS.intensities):
        nk = int(rec.sent_per_intensity[k])
        counts = np.bincount(photons[cls == k], minlength=8)
        for j in range(1, 6):
            assert _close(int(counts[j]), nk, float(stats.poisson.pmf(j, mu))), (k, j)
        if mu == 0:
            assert counts.sum() == 0


@pytest.mark.parametrize("emit", [q.emit_dense, q.emit])
def test_emit_is_reproducible_from_a_seed(emit: object) -> None:
    a = emit(PARAMS, 1, np.random.default_rng(5))  # type: ignore[operator]
    b = emit(PARAMS, 1, np.random.default_rng(5))  # type: ignore[operator]
    assert np.array_equal(a[1].slots, b[1].slots)
    assert np.array_equal(a[1].state, b[1].state)
    assert np.array_equal(a[0].bit, b[0].bit)


def _categories(rec_a: q.SlotRecord, frame: q.PulseFrame, rec_b: object
                ) -> dict[tuple[int, int, int], tuple[int, int, int]]:
    """(photons capped at 3, bypass, bases match) -> (pulses, clicks, wrong bits)."""
    slots = frame.slots
    clicked = np.isin(slots, rec_b.slots)  # type: ignore[attr-defined]
    bob_basis = np.full(slots.size, 255, np.uint8)
    bob_bit = np.full(slots.size, 255, np.uint8)
    pos = np.searchsorted(slots, rec_b.slots)  # type: ignore[attr-defined]
    inside = (pos < slots.size) & (slots[np.minimum(pos, slots.size - 1)]
                                   == rec_b.slots)  # type: ignore[attr-defined]
    bob_basis[pos[inside]] = rec_b.basis[inside]  # type: ignore[attr-defined]
    bob_bit[pos[inside]] = rec_b.bit[inside]  # type: ignore[attr-defined]
    ph = np.minimum(frame.state & 0x1F, 3)
    bp = frame.state >> 7
    s_basis = (frame.state >> 5) & 1
    s_bit = (frame.state >> 6) & 1
    out = {}
    for p in (1, 2, 3):
        for b in (0, 1):
            for match in (0, 1):
                sel = (ph == p) & (bp == b) & ((bob_basis == s_basis) == bool(match))
                sel &= clicked
                wrong = int(np.count_nonzero(bob_bit[sel] != s_bit[sel]))
                total = int(np.count_nonzero((ph == p) & (bp == b)))
                out[(p, b, match)] = (total, int(sel.sum()), wrong)
    return out


@pytest.mark.parametrize("eve", [None, "pns"])
def test_measure_matches_the_reference_per_pulse_category(eve: str | None) -> None:
    params = PARAMS.with_(pulses=4_000_000)
    rec_a, frame = q.emit(params, 1, np.random.default_rng(2))
    if eve:
        frame = q.attack(frame, eve, 0.5, np.random.default_rng(3))
    fast = q.measure(frame, params, np.random.default_rng(4), SecretRng())
    ref = q.measure_reference(frame, params, np.random.default_rng(5), SecretRng())
    for rec in (fast, ref):
        assert np.all(np.diff(rec.slots) > 0)
    cf, cr = _categories(rec_a, frame, fast), _categories(rec_a, frame, ref)
    for key, (total, clicks_r, wrong_r) in cr.items():
        _, clicks_f, wrong_f = cf[key]
        if total == 0:
            continue
        # Two independent samples of the same binomial: their difference within 5 sigma.
        for kf, kr, n in ((clicks_f, clicks_r, total), (wrong_f, wrong_r, max(clicks_r, 1))):
            p = (kf + kr) / (2 * n)
            assert abs(kf - kr) <= 5 * math.sqrt(2 * n * p * (1 - p)) + 2, (key, kf, kr)


def test_measure_dark_clicks_in_pulse_slots_and_empty_slots() -> None:
    # Nothing reaches Bob (3000 km), so every click is a dark click: in the pulses'
    # slots (the sparse per-detector draw, against Y0) and in the empty slots (the
    # same code as the reference, which it is compared with).
    params = PARAMS.with_(distance_km=3000.0, dark_count_prob=0.02, pulses=1_000_000)
    _, frame = q.emit(params, 1, np.random.default_rng(6))
    rec = q.measure(frame, params, np.random.default_rng(7), SecretRng())
    ref = q.measure_reference(frame, params, np.random.default_rng(8), SecretRng())
    in_frame = np.isin(rec.slots, frame.slots)
    assert _close(int(in_frame.sum()), frame.slots.size, params.dark_count_prob)
    empty_f = int((~in_frame).sum())
    empty_r = int((~np.isin(ref.slots, frame.slots)).sum())
    assert abs(empty_f - empty_r) <= 5 * math.sqrt(2 * empty_r) + 2
    assert _close(int(rec.bit.sum()), rec.bit.size, 0.5)
    assert _close(int(rec.basis.sum()), rec.basis.size, 1 - params.basis_bias)


def _encode_plain(frame: q.PulseFrame) -> bytes:
    """The version-1 frame layout of the module docstring, written out byte by byte."""
    deltas = np.diff(frame.slots, prepend=0).astype("<u4")
    return (q._HDR.pack(q.MAGIC, q.VERSION_U32, frame.round, frame.pulses,
                        frame.slots.size)
            + deltas.tobytes() + frame.state.astype(np.uint8).tobytes())


def _leb128(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v >= 0x80 else 0))
        v >>= 7
        if not v:
            return bytes(out)


def _encode_plain_v2(frame: q.PulseFrame) -> bytes:
    """The version-2 layout (states, then varint slot deltas), byte by byte."""
    deltas = np.diff(frame.slots, prepend=0)
    return (q._HDR.pack(q.MAGIC, 2, frame.round, frame.pulses, frame.slots.size)
            + frame.state.astype(np.uint8).tobytes()
            + b"".join(_leb128(int(d)) for d in deltas))


@pytest.mark.parametrize("count", [0, 1, 2, 3, 1000, 300_000])
def test_frame_encoding_is_the_documented_layout(count: int) -> None:
    _, frame = q.emit(PARAMS.with_(pulses=1_000_000), 9, np.random.default_rng(count))
    frame = q.PulseFrame(frame.round, frame.pulses, frame.slots[:count], frame.state[:count],
                         q.VERSION_U32)
    data = frame.encode()
    assert data == _encode_plain(frame)
    back = q.PulseFrame.decode(data)
    assert np.array_equal(back.slots, frame.slots)
    assert np.array_equal(back.state, frame.state)
    assert back.version == q.VERSION_U32 and back.encode() == data  # eve keeps version 1


@pytest.mark.parametrize("count", [0, 1, 2, 3, 1000, 300_000])
@pytest.mark.parametrize("eve", [None, "pns"])
def test_frame_v2_encoding_is_the_documented_layout(count: int, eve: str | None) -> None:
    params = PARAMS.with_(pulses=1_000_000)
    _, frame = q.emit(params, 9, np.random.default_rng(count))
    if eve:  # PNS on every pulse: sparse frames, some deltas of two varint bytes
        frame = q.attack(frame, eve, 1.0, np.random.default_rng(1))
    frame = q.PulseFrame(frame.round, frame.pulses, frame.slots[:count], frame.state[:count])
    data = frame.encode()
    assert data[4] == q.VERSION == 2
    if count <= 1000:
        assert data == _encode_plain_v2(frame)
    back = q.PulseFrame.decode(data)
    assert np.array_equal(back.slots, frame.slots)
    assert np.array_equal(back.state, frame.state)
    # The same frame in version 1 decodes to the same pulses.
    v1 = q.PulseFrame.decode(_encode_plain(frame))
    assert np.array_equal(v1.slots, back.slots) and np.array_equal(v1.state, back.state)


def test_frame_v2_long_deltas_and_rejections() -> None:
    slots = np.array([0, 1, 200, 20_000, 3_000_000, 2**31 - 2], np.int64)
    frame = q.PulseFrame(4, 2**31 - 1, slots, np.arange(1, 7, dtype=np.uint8))
    data = frame.encode()
    assert data == _encode_plain_v2(frame)
    assert np.array_equal(q.PulseFrame.decode(data).slots, slots)
    hdr = q._HDR.size
    for bad in (data[:-1], data + b"\x00", data[:hdr + 6] + b"\x80" * 6,
                data[:hdr + 6] + b"\x00\x00" + data[hdr + 8:]):  # truncated, trailing,
        with pytest.raises(q.FrameError):  # over-long, a repeated slot
            q.PulseFrame.decode(bad)
    past = q.PulseFrame(4, 100, np.array([0, 100]), np.ones(2, np.uint8)).encode()
    with pytest.raises(q.FrameError, match="outside"):
        q.PulseFrame.decode(past)


def _emit_sparse_plain(params: LinkParams, rng: np.random.Generator,
                       sec: SecretRng) -> tuple[list[int], list[int], list[int]]:
    """`emit`'s recipe slot by slot in plain Python integers (same draws, same order):
    the bit-for-bit reference of its vectorised form."""
    t_any, tails, t_mu, _ = q._mixture_tables(params)
    slots, states, classes = [], [], []
    n = params.pulses
    for lo in range(0, n, q._CHUNK):
        c = min(q._CHUNK, n - lo)
        words = [int(w) for w in q._words(rng, -(-c // 4))]
        u16 = [(words[i // 4] >> (16 * (i % 4))) & 0xFFFF for i in range(c)]
        ties = [i for i in range(c) if u16[i] == t_any >> 48]
        tie_words = [int(w) for w in q._words(rng, len(ties))]
        carry = {i for i in range(c) if u16[i] < t_any >> 48}
        carry |= {i for i, w in zip(ties, tie_words, strict=True)
                  if (w >> 16) < t_any & ((1 << 48) - 1)}
        idx = sorted(carry)
        phys = [int(w) for w in q._words(rng, len(idx))]
        secw = [int(w) for w in q._words(sec, len(idx))]
        for i, r, s in zip(idx, phys, secw, strict=True):
            photons = 1 + sum(1 for t in tails if r < t)
            low, high = s & 0xFFFFFFFF, s >> 32
            classes.append(0 if low < t_mu[photons] else 1)
            basis = 1 if (high & 0x7FFFFFFF) >= q._below(params.basis_bias, 31) else 0
            states.append(photons | basis << 5 | (high >> 31) << 6)
            slots.append(lo + i)
    return slots, states, classes


class _SeededSecret(SecretRng):
    """A SecretRng whose keystream is a fixed numpy stream, so two runs draw alike."""

    def __init__(self, seed: int) -> None:
        self._g = np.random.default_rng(seed)

    def _stream(self, length: int) -> np.ndarray:
        return self._g.integers(0, 256, length, dtype=np.uint8)


def test_sparse_emit_is_bit_for_bit_its_plain_recipe(monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    monkeypatch.setattr(q, "_CHUNK", 1 << 14)  # several chunks, and a partial last one
    # A strong source so multi-photon pulses (and the class given N) are exercised.
    params = PARAMS.with_(pulses=70_001, mu=2.5, nu=0.4)
    rec, frame = q.emit(params, 2, np.random.default_rng(21), _SeededSecret(4))
    slots, states, classes = _emit_sparse_plain(params, np.random.default_rng(21),
                                                _SeededSecret(4))
    assert frame.slots.tolist() == slots
    assert frame.state.tolist() == states
    assert rec.intensity.tolist() == classes
    assert max(states) & 0x1F >= 6 and 0 < sum(classes) < len(classes)


def test_sparse_emit_photon_numbers_match_the_dense_source() -> None:
    # Photon numbers per class, and classes per photon number, as the dense emit makes
    # them: two independent samples of the same multinomials, within 5 sigma.
    params = PARAMS.with_(pulses=2_000_000, mu=1.5)
    got = []
    for fn in (q.emit_dense, q.emit):
        rec, frame = fn(params, 1, np.random.default_rng(8), SecretRng())
        cls = rec.intensity[rec.lookup(frame.slots)]
        ph = np.minimum(frame.state & 0x1F, 5)
        got.append(np.bincount(cls.astype(np.int64) * 6 + ph, minlength=18))
    n = params.pulses
    for kd, ks in zip(*got, strict=True):
        p = (kd + ks) / (2 * n)
        assert abs(int(kd) - int(ks)) <= 5 * math.sqrt(2 * n * p * (1 - p)) + 2


def test_sparse_record_draws_announced_vacuum_slots_once() -> None:
    params = PARAMS.with_(pulses=200_000)
    rec, frame = q.emit(params, 1, np.random.default_rng(3), SecretRng())
    empty = np.setdiff1d(np.arange(params.pulses), frame.slots)[[0, 5, 77]]
    ask = np.sort(np.concatenate([frame.slots[:10], empty]))
    idx = rec.lookup(ask)
    assert np.array_equal(rec.slots[idx], ask)
    first = (rec.intensity[idx].copy(), rec.basis[idx].copy(), rec.bit[idx].copy())
    again = rec.lookup(ask)  # drawn once: the same settings the second time
    assert np.array_equal(again, idx)
    assert np.array_equal(rec.intensity[again], first[0])
    assert np.array_equal(rec.bit[again], first[2])
    assert rec.slots.size == frame.slots.size + 3
    with pytest.raises(ValueError, match="outside"):
        rec.lookup(np.array([params.pulses]))
    assert "bit" not in repr(rec) and "intensity" not in repr(rec)


@pytest.mark.parametrize(("distance", "dark", "eve"), [
    (25.0, 1e-7, None), (25.0, 1e-7, "pns"), (25.0, 0.05, None), (25.0, 0.05, "pns"),
    (3000.0, 0.02, None)])
def test_measure_per_photon_draws_like_measure_prev(distance: float, dark: float,
                                                    eve: str | None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # `measure` draws one word per photon where `measure_prev` (the binomial form it
    # replaced) draws two binomials per multi-photon pulse: the same law, so clicks and
    # errors per category (photons, bypass, bases match) agree within 5 sigma. Multi-
    # photon pulses (PNS forwards them losslessly), dark clicks on pulses that also
    # clicked, double clicks, several chunks.
    monkeypatch.setattr(q, "_CHUNK", 1 << 16)
    params = PARAMS.with_(distance_km=distance, dark_count_prob=dark, pulses=1_500_000)
    rec_a, frame = q.emit(params, 1, np.random.default_rng(1))
    if eve:
        frame = q.attack(frame, eve, 0.5, np.random.default_rng(9))
    fast = q.measure(frame, params, np.random.default_rng(2), _SeededSecret(3))
    prev = q.measure_prev(frame, params, np.random.default_rng(4), _SeededSecret(5))
    assert fast.slots.size > 1000 and np.all(np.diff(fast.slots) > 0)
    cf, cp = _categories(rec_a, frame, fast), _categories(rec_a, frame, prev)
    for key, (total, clicks_p, wrong_p) in cp.items():
        _, clicks_f, wrong_f = cf[key]
        for kf, kp, n in ((clicks_f, clicks_p, total), (wrong_f, wrong_p, max(clicks_p, 1))):
            p = (kf + kp) / (2 * max(n, 1))
            assert abs(kf - kp) <= 5 * math.sqrt(2 * n * p * (1 - p)) + 2, (key, kf, kp)
    # Empty-slot dark clicks (the slots no pulse took) as often as before.
    dark_f = np.setdiff1d(fast.slots, frame.slots).size
    dark_p = np.setdiff1d(prev.slots, frame.slots).size
    assert abs(dark_f - dark_p) <= 5 * math.sqrt(dark_f + dark_p) + 2


def test_add_dark_clicks_is_the_stable_sort_of_the_concatenation() -> None:
    rng = np.random.default_rng(12)
    slots = np.unique(rng.integers(0, 10**6, 50_000))
    basis = rng.integers(0, 2, slots.size, dtype=np.uint8)
    bits = rng.integers(0, 2, slots.size, dtype=np.uint8)
    dark = np.unique(np.concatenate([rng.integers(0, 10**6, 300), slots[:3], [10**7]]))
    got = q._add_dark_clicks(slots, basis, bits, dark, PARAMS, _SeededSecret(1))
    ref_sec = _SeededSecret(1)
    d_basis = (ref_sec.random(dark.size) >= PARAMS.basis_bias).astype(np.uint8)
    d_bits = ref_sec.integers(0, 2, dark.size, dtype=np.uint8)
    all_slots = np.concatenate([slots, dark])
    order = np.argsort(all_slots, kind="stable")
    want = (all_slots[order], np.concatenate([basis, d_basis])[order],
            np.concatenate([bits, d_bits])[order])
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)
