"""The gateway's PKI: `qkdgw pki init`, loading certificates and keys, checking a peer's
handshake certificate and the revocation list.

Two CAs, because two TLS stacks consume them (docs/pki.md): the gateway CA (ML-DSA-65 by
default) signs each site's handshake identity; the TLS CA (ECDSA P-256) signs the ETSI 014
HTTPS certificates. `files` loads, `verify` checks a peer, `crl` handles revocation,
`authority` issues, `cli` is `qkdgw pki`.
"""

from gateway.pki.authority import (
    init_pki,
    parse_serial,
    renew,
    revoke,
    write_crl,
)
from gateway.pki.cli import register_cli
from gateway.pki.crl import (
    CrlError,
    RevocationList,
    issue_crl,
    load_crl,
    revocation_reason,
    verify_crl,
)
from gateway.pki.files import (
    CA_CERT,
    CA_KEY,
    CRL_FILE,
    DEFAULT_ALGORITHM,
    DEFAULT_CRL_DAYS,
    LINK_SECRET,
    PKI_ALGORITHMS,
    REASONS,
    SITE_URI_PREFIX,
    TLS_CA_CERT,
    TLS_CA_KEY,
    PeerCertificateError,
    PkiError,
    SitePaths,
    fingerprint,
    load_certificate,
    load_certificates,
    load_private_key,
    site_paths,
    validate_site_name,
)
from gateway.pki.verify import (
    parse_peer_certificate,
    site_identity,
    verify_peer_certificate,
)

__all__ = [
    'CA_CERT',
    'CA_KEY',
    'CRL_FILE',
    'DEFAULT_ALGORITHM',
    'DEFAULT_CRL_DAYS',
    'LINK_SECRET',
    'PKI_ALGORITHMS',
    'REASONS',
    'SITE_URI_PREFIX',
    'TLS_CA_CERT',
    'TLS_CA_KEY',
    'CrlError',
    'PeerCertificateError',
    'PkiError',
    'RevocationList',
    'SitePaths',
    'fingerprint',
    'init_pki',
    'issue_crl',
    'load_certificate',
    'load_certificates',
    'load_crl',
    'load_private_key',
    'parse_peer_certificate',
    'parse_serial',
    'register_cli',
    'renew',
    'revocation_reason',
    'revoke',
    'site_identity',
    'site_paths',
    'validate_site_name',
    'verify_crl',
    'verify_peer_certificate',
    'write_crl',
]
