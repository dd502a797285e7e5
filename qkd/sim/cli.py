"""`qkdgw qkd simulate|sweep|reconcile`."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, TextIO

import numpy as np

from qkd.common.errors import UserError
from qkd.sim.cascade import reconcile_frames
from qkd.sim.constants import CASCADE_VARIANTS as VARIANTS
from qkd.sim.constants import EVE_MODES
from qkd.sim.estimation import h2
from qkd.sim.params import LinkParams, ParamError
from qkd.sim.session import run_session

# Option name -> LinkParams field, for error messages that name what the user typed.
_OPTION_OF_FIELD = {
    "distance_km": "--distance-km", "fiber_loss_db_km": "--fiber-loss-db-km",
    "detector_efficiency": "--detector-efficiency", "dark_count_prob": "--dark-count-prob",
    "misalignment": "--misalignment", "afterpulse_prob": "--afterpulse-prob",
    "dead_time_s": "--dead-time-ns", "mu": "--mu", "nu": "--nu", "p_mu": "--p-mu",
    "p_nu": "--p-nu", "basis_bias": "--basis-bias", "rep_rate_hz": "--rep-rate-hz",
    "pulses": "--pulses", "eve": "--eve", "eve_fraction": "--eve-fraction",
    "ec_efficiency": "--ec-efficiency", "eps_sec": "--eps-sec", "eps_cor": "--eps-cor",
    "qber_abort": "--qber-abort", "frame_bits": "--frame-bits",
    "cascade_variant": "--variant",
}


def _user_error(msg: str) -> Exception:

    return UserError(msg)


def _count(text: str) -> int:
    """Integers that may be typed in scientific notation (1e9)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(v)


def _add_link_options(p: argparse.ArgumentParser, with_distance: bool) -> None:
    d = LinkParams()
    g = p.add_argument_group("link")
    if with_distance:
        g.add_argument("--distance-km", type=float, default=d.distance_km)
    g.add_argument("--fiber-loss-db-km", type=float, default=d.fiber_loss_db_km)
    g.add_argument("--detector-efficiency", type=float, default=d.detector_efficiency)
    g.add_argument("--dark-count-prob", type=float, default=d.dark_count_prob,
                   help="Y0: background click probability per pulse (both detectors)")
    g.add_argument("--misalignment", type=float, default=d.misalignment, help="e_d")
    g.add_argument("--afterpulse-prob", type=float, default=d.afterpulse_prob)
    g.add_argument("--dead-time-ns", type=float, default=d.dead_time_s * 1e9)
    g.add_argument("--mu", type=float, default=d.mu, help="signal intensity")
    g.add_argument("--nu", type=float, default=d.nu, help="weak decoy (vacuum is implied)")
    g.add_argument("--p-mu", type=float, default=d.p_mu)
    g.add_argument("--p-nu", type=float, default=d.p_nu)
    g.add_argument("--basis-bias", type=float, default=d.basis_bias,
                   help="probability of the Z (key) basis for Alice and Bob")
    g.add_argument("--rep-rate-hz", type=float, default=d.rep_rate_hz)
    g.add_argument("--pulses", type=_count, default=d.pulses)
    g.add_argument("--eve", choices=EVE_MODES, default="none")
    g.add_argument("--eve-fraction", type=float, default=d.eve_fraction)
    pp = p.add_argument_group("post-processing")
    pp.add_argument("--ec-efficiency", type=float, default=d.ec_efficiency,
                    help="f used by the theory curves")
    pp.add_argument("--eps-sec", type=float, default=d.eps_sec)
    pp.add_argument("--eps-cor", type=float, default=d.eps_cor)
    pp.add_argument("--qber-abort", type=float, default=d.qber_abort)
    pp.add_argument("--frame-bits", type=_count, default=d.frame_bits)
    pp.add_argument("--variant", choices=VARIANTS, default=d.cascade_variant)
    p.add_argument("--sampler", choices=("auto", "full", "detected"), default="auto",
                   help="full: one draw per pulse; detected: sample only the clicks")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true")


def _params(args: argparse.Namespace, distance: float | None = None) -> LinkParams:
    p = LinkParams(
        distance_km=args.distance_km if distance is None else distance,
        fiber_loss_db_km=args.fiber_loss_db_km,
        detector_efficiency=args.detector_efficiency,
        dark_count_prob=args.dark_count_prob,
        misalignment=args.misalignment,
        afterpulse_prob=args.afterpulse_prob,
        dead_time_s=args.dead_time_ns * 1e-9,
        mu=args.mu, nu=args.nu, p_mu=args.p_mu, p_nu=args.p_nu,
        basis_bias=args.basis_bias, rep_rate_hz=args.rep_rate_hz, pulses=args.pulses,
        eve=args.eve, eve_fraction=args.eve_fraction,
        ec_efficiency=args.ec_efficiency, eps_sec=args.eps_sec, eps_cor=args.eps_cor,
        qber_abort=args.qber_abort, frame_bits=args.frame_bits,
        cascade_variant=args.variant,
    )
    try:
        return p.validate()
    except ParamError as exc:
        opt = _OPTION_OF_FIELD.get(exc.field_name, exc.field_name)
        detail = str(exc).split(": ", 1)[1]
        raise _user_error(f"{opt} {detail}") from None


class Progress:
    """A one-line progress bar on stderr (only drawn on a terminal unless forced)."""

    def __init__(self, total: int, label: str, enabled: bool, stream: TextIO | None = None):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.t0 = time.monotonic()

    def step(self, note: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        frac = self.done / self.total
        width = 30
        bar = "#" * int(frac * width)
        el = time.monotonic() - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        self.stream.write(f"\r{self.label} [{bar:<{width}}] {self.done}/{self.total} "
                          f"{el:5.1f}s eta {eta:5.1f}s {note:<20}")
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _print_report(r: dict[str, Any]) -> None:
    th = r["theory"]
    lines = [
        f"pulses sent            {r['pulses']:.4g} ({r['sampler']} sampler)",
        f"detections             {r['detections']} "
        f"(mu {r['detections_per_intensity']['mu']}, nu {r['detections_per_intensity']['nu']}, "
        f"vacuum {r['detections_per_intensity']['vacuum']})",
        f"sifted key bits        {r['sifted_bits']} (+{r['test_bits']} test-basis bits)",
        f"QBER key / test basis  {_fmt(r['qber'])} / {_fmt(r['qber_test_basis'])}",
    ]
    est = r["decoy_estimates"]
    if est:
        lines.append(f"decoy bounds           s_z1 >= {est['s_z1']:.6g}, phase error <= "
                     f"{est['phase_error']:.4g}")
    lines += [
        f"reconciliation         {r['cascade_variant']}: leaked {r['leaked_ec_bits']} bits, "
        f"f = {_fmt(r['ec_efficiency'])}, {r['cascade_round_trips']} round trips",
        f"per-frame check        {r['leaked_frame_check_bits']} tag bits leaked, "
        f"{r['frames_checked_bad']} frames bad after the first run, "
        f"{r['frames_dropped']} dropped",
        f"verification           {_fmt(r['verification_ok'])} "
        f"(collision prob {r['verification_collision_prob']:.3g})",
        f"final key bits         {r['final_key_bits']}",
        f"key rate               {r['key_rate_per_pulse']:.4g} bit/pulse "
        f"(+- {r['key_rate_per_pulse_std']:.2g}), {r['key_rate_bps']:.4g} bit/s",
        f"theory (bit/pulse)     GLLP inf. decoy {_fmt(th['gllp_infinite_decoy'])}, "
        f"vac+weak {_fmt(th['gllp_vacuum_weak'])}, finite-key expected "
        f"{_fmt(th['finite_key_expected_measured_f'])}, PLOB {_fmt(th['plob'])}",
    ]
    if r["aborted"]:
        lines.append(f"ABORTED                {r['abort_reason']}")
    print("\n".join(lines))


def _cmd_simulate(args: argparse.Namespace) -> int:
    params = _params(args)
    report = run_session(params, args.seed, args.sampler)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0


def _parse_distances(text: str) -> list[float]:
    try:
        if ":" in text:
            parts = [float(x) for x in text.split(":")]
            if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
                raise ValueError
            start, stop, step = parts
            count = math.floor((stop - start) / step + 1e-9) + 1
            return [start + i * step for i in range(count)]
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise _user_error(
            f"--distances: expected START:STOP:STEP (e.g. 0:150:10) or a comma list, "
            f"got {text!r}") from None


def _plot(rows: list[dict[str, Any]], path: str, params: LinkParams) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise _user_error("--plot needs matplotlib: pip install 'qkd-gateway[plot]'") from None
    from qkd.sim.theory import theory_rates

    dense = np.linspace(min(r["distance_km"] for r in rows),
                        max(r["distance_km"] for r in rows), 200)
    th = [theory_rates(params.with_(distance_km=float(x))) for x in dense]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(dense, [t.plob for t in th], "k-", label="PLOB bound")
    ax.plot(dense, [t.gllp_infinite_decoy for t in th], "C0-", label="GLLP, infinite decoys")
    ax.plot(dense, [t.gllp_vacuum_weak for t in th], "C1--", label="GLLP, vacuum+weak decoy")
    ax.plot(dense, [t.finite_key_expected for t in th], "C2:",
            label=f"finite key (Lim 2014), N={params.pulses:.0e}, f={params.ec_efficiency}")
    ok = [r for r in rows if r["key_rate_per_pulse"] > 0]
    ax.errorbar([r["distance_km"] for r in ok], [r["key_rate_per_pulse"] for r in ok],
                yerr=[2 * r["key_rate_per_pulse_std"] for r in ok], fmt="o", color="C3",
                capsize=3, label="simulation (±2σ)")
    ax.set_yscale("log")
    ax.set_xlabel("fibre length (km)")
    ax.set_ylabel("secret key rate (bit/pulse)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"decoy BB84, mu={params.mu}, nu={params.nu}, "
                 f"eta_det={params.detector_efficiency}, Y0={params.dark_count_prob:g}")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise _user_error(f"--plot: cannot write {path}: {exc.strerror}") from None
    finally:
        plt.close(fig)


def _cmd_sweep(args: argparse.Namespace) -> int:
    distances = _parse_distances(args.distances)
    params = _params(args, distance=distances[0])
    for d in distances:
        _params(args, distance=d)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise _user_error("--plot needs matplotlib: pip install "
                              "'qkd-gateway[plot]'") from None
    progress = Progress(len(distances), "sweep", args.progress if args.progress is not None
                        else sys.stderr.isatty())
    rows = []
    for i, d in enumerate(distances):
        seed = None if args.seed is None else args.seed + i
        r = run_session(params.with_(distance_km=d), seed, args.sampler)
        r["distance_km"] = d
        r.pop("params")
        rows.append(r)
        progress.step(f"{d:g} km")
    if args.plot:
        _plot(rows, args.plot, params)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'km':>6} {'sifted':>10} {'QBER':>7} {'f':>6} {'final':>9} {'bit/pulse':>10} "
              f"{'+-':>8} {'GLLP-vw':>10} {'finite-exp':>10} {'PLOB':>8}  abort")
        for r in rows:
            th = r["theory"]
            print(f"{r['distance_km']:6g} {r['sifted_bits']:10d} {_fmt(r['qber']):>7} "
                  f"{_fmt(r['ec_efficiency']):>6} {r['final_key_bits']:9d} "
                  f"{r['key_rate_per_pulse']:10.3e} {r['key_rate_per_pulse_std']:8.1e} "
                  f"{th['gllp_vacuum_weak']:10.3e} "
                  f"{th['finite_key_expected_measured_f'] or 0:10.3e} "
                  f"{th['plob'] or math.inf:8.2e}  {r['abort_reason'] or ''}")
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def reconcile_rows(qbers: list[float], frame_bits: int, frames: int, variants: list[str],
                   seed: int | None, group: int = 128,
                   progress: Progress | None = None) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for variant in variants:
        for q in qbers:
            leaks, fails, uses, elapsed = [], 0, 0, 0.0
            done = 0
            while done < frames:
                g = min(group, frames - done)
                a = rng.integers(0, 2, (g, frame_bits), dtype=np.uint8)
                b = a ^ (rng.random((g, frame_bits)) < q).astype(np.uint8)
                t = time.perf_counter()
                res = reconcile_frames(a, b, q, variant, int(rng.integers(0, 2**63)))
                elapsed += time.perf_counter() - t
                fails += int(np.count_nonzero(np.any(res.corrected != a, axis=1)))
                leaks.append(res.leak_per_frame)
                uses += res.messages
                done += g
            eff = np.concatenate(leaks) / (frame_bits * h2(q))
            rows.append({
                "qber": q,
                "variant": variant,
                "frame_bits": frame_bits,
                "frames": frames,
                "mean_efficiency": float(eff.mean()),
                "efficiency_std": float(eff.std()),
                "frame_error_rate": fails / frames,
                "frame_errors": fails,
                "channel_uses": uses,
                "throughput_mbps": frames * frame_bits / elapsed / 1e6,
            })
            if progress:
                progress.step(f"{variant} {q:g}")
    return rows


def _cmd_reconcile(args: argparse.Namespace) -> int:
    try:
        qbers = [float(x) for x in args.qber.split(",")]
    except ValueError:
        raise _user_error(f"--qber: expected numbers like 0.01,0.02, got {args.qber!r}") from None
    for q in qbers:
        if not 0 < q < 0.5:
            raise _user_error(f"--qber: each value must be in (0, 0.5), got {q:g}")
    if args.frame_bits < 64 or args.frame_bits > 1 << 22:
        raise _user_error(f"--frame-bits must be in [64, 4194304], got {args.frame_bits}")
    if args.frames < 1:
        raise _user_error(f"--frames must be at least 1, got {args.frames}")
    variants = list(VARIANTS) if args.variant == "all" else [args.variant]
    progress = Progress(len(qbers) * len(variants), "reconcile",
                        args.progress if args.progress is not None else sys.stderr.isatty())
    rows = reconcile_rows(qbers, args.frame_bits, args.frames, variants, args.seed,
                          args.group_frames, progress)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'variant':>9} {'QBER':>6} {'f mean':>7} {'f std':>7} {'FER':>9} "
              f"{'uses':>7} {'Mbit/s':>7}")
        for r in rows:
            print(f"{r['variant']:>9} {r['qber']:6g} {r['mean_efficiency']:7.4f} "
                  f"{r['efficiency_std']:7.4f} {r['frame_error_rate']:9.2e} "
                  f"{r['channel_uses']:7d} {r['throughput_mbps']:7.2f}")
    return 0


def register_cli(subparsers: Any) -> None:
    qkd = subparsers.add_parser("qkd", help="QKD link simulator (decoy BB84, post-processing)")
    sub = qkd.add_subparsers(dest="qkd_command", metavar="SUBCOMMAND")
    sub.required = True

    sim = sub.add_parser("simulate", help="run one link session and report it")
    _add_link_options(sim, with_distance=True)
    sim.set_defaults(handler=_cmd_simulate)

    sw = sub.add_parser("sweep", help="key rate against distance, with theory curves")
    sw.add_argument("--distances", default="0:150:10", help="START:STOP:STEP km or a list")
    sw.add_argument("--plot", metavar="FILE.png", default=None)
    sw.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar on stderr (default: when stderr is a terminal)")
    _add_link_options(sw, with_distance=False)
    sw.set_defaults(handler=_cmd_sweep)

    rc = sub.add_parser("reconcile", help="Cascade alone on a binary symmetric channel")
    rc.add_argument("--qber", required=True, help="Q[,Q...]")
    rc.add_argument("--frame-bits", type=_count, default=1 << 14)
    rc.add_argument("--frames", type=_count, default=256)
    rc.add_argument("--variant", choices=(*VARIANTS, "all"), default="option8")
    rc.add_argument("--group-frames", type=_count, default=128,
                    help="frames reconciled together in one vectorised run")
    rc.add_argument("--seed", type=int, default=None)
    rc.add_argument("--json", action="store_true")
    rc.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    rc.set_defaults(handler=_cmd_reconcile)
