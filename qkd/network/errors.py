"""The network layer's one error type: a code a program can act on and a reason for a
person. Reasons name the field (and for config, the fix) and never hold key bytes."""

from __future__ import annotations

from enum import IntEnum

from qkd.common.errors import QkdError


class NetErrorCode(IntEnum):
    """Why the network layer refused something. Values go on the wire in ABORT."""

    BAD_CONFIG = 1  # a topology config field is missing or wrong
    NO_PATHS = 2  # fewer than k node-disjoint paths satisfy the constraints
    DECODE = 3  # bytes from a peer do not parse canonically
    AUTH = 4  # a per-hop Wegman-Carter tag did not verify
    REPLAY = 5  # a message id this node has already seen
    HOP = 6  # the hop counter does not match where the message arrived
    PATH = 7  # the path is not the one this relay uses, or not node-disjoint
    LINK_KEY = 8  # the hop's link key is exhausted, reused or out of order
    TIMEOUT = 9  # the relay did not finish in time
    PEER_ABORT = 10  # another node on a path ended the relay
    STATE = 11  # a message that does not fit the relay's state (unknown key ID, ...)
    UNKNOWN_NODE = 12  # a node or link the topology does not have
    INTEGRITY = 13  # the assembled key fails its AMD tag (a share was changed)


class NetworkError(QkdError):
    """Raised by qkd.network; `code` for programs, `reason` for people."""

    def __init__(self, code: NetErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code
        self.reason = reason
