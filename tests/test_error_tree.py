"""One error tree: every exception class the packages define hangs below its package's root,
so a caller can catch `GatewayError`, `QkdError` or `PqcError` and nothing escapes as a bare
Python exception type of our own making."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import gateway
import pqc
import qkd
from gateway.errors import GatewayError
from qkd.common.errors import QkdError, QkdgwError, UserError

ROOTS = {"gateway": GatewayError, "qkd": QkdError, "pqc": pqc.PqcError}
# Roots themselves, and errors the user acts on (config, command line), which the CLI maps
# to exit 2 whichever package raised them.
EXEMPT = {QkdgwError, QkdError, UserError, GatewayError}


def _own_exception_classes() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for package in (gateway, qkd, pqc):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if (issubclass(obj, BaseException) and obj.__module__ == module.__name__
                        and not obj.__name__.startswith("_")):
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return list(found.values())


def test_every_error_has_its_package_root() -> None:
    classes = _own_exception_classes()
    assert len(classes) > 30  # the walk found the packages' errors at all
    stray = [f"{c.__module__}.{c.__qualname__}" for c in classes
             if c not in EXEMPT and not issubclass(c, UserError)
             and not issubclass(c, ROOTS[c.__module__.split(".")[0]])]
    assert stray == []


def test_roots_share_one_ancestor_except_pqc() -> None:
    # pqc sits below qkd and may not import it, so its root stands alone.
    assert issubclass(GatewayError, QkdgwError) and issubclass(QkdError, QkdgwError)
    assert not issubclass(pqc.PqcError, QkdgwError)
