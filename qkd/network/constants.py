"""Every limit of the network layer in one place, with its unit.

Decoders check these before allocating, so a hostile length field costs nothing."""

from __future__ import annotations

import re

# Node names (KME ids) and SAE ids: short printable ASCII, so they can go into logs,
# paths and error messages as they are.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
MAX_NAME_BYTES = 64  # bytes per node or SAE name on the wire

MAX_NODES = 256  # nodes in one topology
MAX_LINKS = 4096  # links in one topology
MAX_POOL_BITS = 1 << 62  # bits a link's pool may report (u64 on the wire, kept sane)

MAX_PATH_NODES = 16  # nodes on one relay path, both ends included (15 hops)
DEFAULT_MAX_HOPS = 8  # hops per path unless the caller asks otherwise
MAX_SHARES = 8  # k, node-disjoint paths per relayed key

KEY_ID_BYTES = 16  # a relayed key's id (a UUID's 16 bytes)
MIN_KEY_BYTES = 16  # bytes of a relayed key: 128 bits at least ...
MAX_KEY_BYTES = 128  # ... and 1024 bits at most (ETSI 014 sizes a gateway asks for)

TAG_BYTES = 16  # Wegman-Carter tag per hop message
PAD_BYTES = 16  # one-time pad under the tag, taken from the hop's link key
ABORT_BODY_BYTES = 1  # the error code an ABORT carries
AMD_BYTES = 32  # x and t of the AMD code after the key in every share (qkd.network.amd)

# A per-hop frame: fixed header, two SAE names, the path, the body and the tag. The
# bound lets the adapter refuse an oversize frame before decoding it.
MAX_FRAME_BYTES = (
    1 + 1 + 8 + KEY_ID_BYTES + 4 + 2 * (1 + MAX_NAME_BYTES)
    + 1 + MAX_PATH_NODES * (1 + MAX_NAME_BYTES) + 2 + MAX_KEY_BYTES + AMD_BYTES + TAG_BYTES
)

RELAY_TIMEOUT_S = 10.0  # seconds from start until every share is acknowledged
DEST_TIMEOUT_S = 10.0  # seconds a destination waits for the rest of a key's shares
SEEN_TTL_S = 60.0  # seconds a node remembers a finished relay's message ids
MAX_ACTIVE_RELAYS = 4096  # relays a node tracks at once (source, transit, destination)

MAX_LSA_LINKS = 256  # links in one link-state advertisement
LSA_VERSION = 1
RELAY_VERSION = 2  # 2: SHARE carries a share of the AMD-encoded key E(K) = K | x | t
