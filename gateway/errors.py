"""The root of the errors raised by the `gateway` package.

Each layer has its own error below it: `DecodeError` (wire), `HandshakeError` and
`RecordError` (tunnel core, carrying an alert code and a reason), `MuxError` (streams),
`PkiError` (certificates and CRLs), `PskStoreError` (the PSK store).
"""

from __future__ import annotations

from qkd.common.errors import QkdgwError


class GatewayError(QkdgwError):
    """Root of the errors raised by the `gateway` package."""
