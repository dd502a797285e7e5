"""The gateway process: asyncio glue around the sans-I/O tunnel (`gateway.tunnel`).

One module per job: `session` (one tunnel TCP connection), `app_stream` and `listener`
(local applications), `gateway` (dialler, listener, admission, `/status`, admin endpoint),
`keylog`, `transport`, `credentials` and `psk_store` (files and the PSK database), `ops`
(key budget, status page, probes) and `startup` (`qkdgw gateway`, `qkdgw status`). No
protocol decision is made here: the core decides, this code moves bytes, arms timers and
maps events.
"""

from gateway.runtime.gateway import Gateway, RecentKeyIds, credential_source, load_credentials
from gateway.runtime.session import TunnelSession
from gateway.runtime.startup import register_cli, serve

__all__ = [
    "Gateway",
    "RecentKeyIds",
    "TunnelSession",
    "credential_source",
    "load_credentials",
    "register_cli",
    "serve",
]
