"""`qkdgw pki ...` subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway.pki.authority import _summary, init_pki, parse_serial, renew, revoke, write_crl
from gateway.pki.files import (
    CRL_FILE,
    DEFAULT_ALGORITHM,
    DEFAULT_CRL_DAYS,
    PKI_ALGORITHMS,
    SITE_URI_PREFIX,
    PkiError,
    site_paths,
)
from qkd.common.errors import UserError


def _cmd_init(args: argparse.Namespace) -> int:
    try:
        init_pki(args.out, args.sites, args.algorithm, args.days, args.kme_hosts, args.force)
        print(_summary(Path(args.out), args.sites))
    except PkiError as exc:
        raise UserError(str(exc)) from None
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    try:
        serials = [parse_serial(text) for text in args.serials]
        reason = x509.ReasonFlags[args.reason] if args.reason else None
        targets, crl = revoke(args.pki, site=args.site, serials=serials, reason=reason,
                              days=args.crl_days)
    except PkiError as exc:
        raise UserError(str(exc)) from None
    assert crl.next_update_utc is not None
    print(f"Revoked serial(s) {', '.join(f'{s:x}' for s in targets)}; "
          f"{Path(args.pki) / CRL_FILE} now lists {len(list(crl))} certificate(s), next "
          f"update due {crl.next_update_utc:%Y-%m-%d %H:%M} UTC. Copy it to every gateway; "
          "they pick it up without a restart.")
    return 0


def _cmd_renew(args: argparse.Namespace) -> int:
    try:
        old, new = renew(args.pki, args.site, args.days, args.revoke_old)
    except PkiError as exc:
        raise UserError(str(exc)) from None
    paths = site_paths(Path(args.pki), args.site)
    print(f"Renewed {paths.gateway_cert} and {paths.gateway_key}: {SITE_URI_PREFIX}{args.site}, "
          f"serial {new.serial_number:x}, valid until {new.not_valid_after_utc:%Y-%m-%d} "
          f"(was serial {old.serial_number:x}"
          f"{', now revoked' if args.revoke_old else ''}). A running gateway picks the new "
          "pair up at its next tunnel connection.")
    return 0


def _cmd_crl(args: argparse.Namespace) -> int:
    try:
        crl = write_crl(args.pki, days=args.crl_days)
    except PkiError as exc:
        raise UserError(str(exc)) from None
    assert crl.next_update_utc is not None
    print(f"Re-signed {Path(args.pki) / CRL_FILE}: {len(list(crl))} revoked certificate(s), "
          f"next update due {crl.next_update_utc:%Y-%m-%d %H:%M} UTC.")
    return 0


def _register_maintenance(actions: Any) -> None:
    reasons = [r.name for r in x509.ReasonFlags if r.name not in ("unspecified", "remove_from_crl")]
    pki_help = "the directory made by `qkdgw pki init` (holds ca.key)"
    crl_days = dict(type=int, default=DEFAULT_CRL_DAYS, metavar="N",
                    help="days until the list's nextUpdate (default: %(default)s)")

    rev = actions.add_parser(
        "revoke", help="add a site's gateway certificate (or a serial) to the CRL",
        description=f"Add certificates to DIR/{CRL_FILE} and re-sign it with the gateway CA. "
                    "Gateways configured with [pki] crl refuse revoked peers at bootstrap.")
    rev.add_argument("--pki", required=True, type=Path, metavar="DIR", help=pki_help)
    rev.add_argument("--site", metavar="NAME", help="revoke this site's current gateway.crt")
    rev.add_argument("--serial", action="append", dest="serials", default=[], metavar="HEX",
                     help="revoke this serial (hex as openssl prints it); repeatable")
    rev.add_argument("--reason", choices=reasons, help="CRL reason code")
    rev.add_argument("--crl-days", **crl_days)  # type: ignore[arg-type]
    rev.set_defaults(handler=_cmd_revoke)

    ren = actions.add_parser(
        "renew", help="issue a site a fresh gateway key and certificate",
        description="Replace DIR/SITE/gateway.key and gateway.crt atomically with a new key "
                    "and certificate for the same identity, signed by the gateway CA.")
    ren.add_argument("--pki", required=True, type=Path, metavar="DIR", help=pki_help)
    ren.add_argument("--site", required=True, metavar="NAME", help="the site, e.g. site-a")
    ren.add_argument("--days", type=int, default=365,
                     help="certificate validity in days (default: %(default)s)")
    ren.add_argument("--revoke-old", action="store_true",
                     help=f"also add the replaced certificate to {CRL_FILE}")
    ren.set_defaults(handler=_cmd_renew)

    crl = actions.add_parser(
        "crl", help="re-sign the CRL with a fresh nextUpdate",
        description=f"Re-sign DIR/{CRL_FILE} with the same entries and a new nextUpdate. "
                    "Run it (e.g. from cron) well before the current one is due.")
    crl.add_argument("--pki", required=True, type=Path, metavar="DIR", help=pki_help)
    crl.add_argument("--crl-days", **crl_days)  # type: ignore[arg-type]
    crl.set_defaults(handler=_cmd_crl)


def register_cli(subparsers: Any) -> None:
    pki = subparsers.add_parser(
        "pki", help="create the gateway and ETSI 014 TLS certificates",
        description="Manage the certificates and keys of a qkdgw deployment.")
    actions = pki.add_subparsers(dest="pki_command", metavar="ACTION")
    actions.required = True
    init = actions.add_parser(
        "init", help="create CAs, per-site certificates and keys, and the link secret",
        description="Create a new PKI in DIR: a gateway CA and each site's handshake "
                    "certificate, an ECDSA P-256 TLS CA with each site's KME server and SAE "
                    "client certificates, and the ideal link's shared secret.")
    init.add_argument("--out", required=True, type=Path, metavar="DIR",
                      help="directory to write (created with mode 0700)")
    init.add_argument("--site", required=True, action="extend", nargs="+", dest="sites",
                      metavar="NAME", help="site name, e.g. site-a; repeat for each site")
    init.add_argument("--algorithm", type=str.lower, choices=list(PKI_ALGORITHMS),
                      default=DEFAULT_ALGORITHM,
                      help="gateway CA and handshake key algorithm (default: %(default)s)")
    init.add_argument("--days", type=int, default=365,
                      help="certificate validity in days (default: %(default)s)")
    init.add_argument("--kme-host", action="extend", nargs="+", dest="kme_hosts", default=[],
                      metavar="[SITE=]HOST",
                      help="extra DNS name or IP for the KME server certificates; "
                           "SITE=HOST adds it to that site's KME only")
    init.add_argument("--force", action="store_true",
                      help="replace an existing PKI in DIR")
    init.set_defaults(handler=_cmd_init)
    _register_maintenance(actions)
