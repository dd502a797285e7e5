"""The project's error roots, below every package that raises them.

`QkdgwError` is the root of everything qkd-gateway raises on purpose. `UserError` is
what a person can act on (bad config, bad command line, missing file): the CLI prints
it as one line and exits 2. Protocol errors carry a code and a reason per layer and live
with their layer; they derive from `QkdgwError` too.
"""

from __future__ import annotations


class QkdgwError(Exception):
    """Root of the errors qkd-gateway raises on purpose."""


class UserError(QkdgwError):
    """An error the user can act on; printed as one line, exit code 2."""


class ConfigError(UserError):
    """A config value is missing or wrong; the message names the field and the fix."""


class QkdError(QkdgwError):
    """Root of the errors raised by the `qkd` package (KME, ETSI 014, link, simulator)."""
