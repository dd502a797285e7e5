"""Prometheus metrics of one gateway process. Counts and states only, never key material."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class GatewayMetrics:
    """A registry per gateway, so several gateways in one test process do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.handshakes = Counter("qkdgw_handshakes", "Completed tunnel handshakes",
                                  ["auth", "mode"], registry=r)
        self.handshake_failures = Counter("qkdgw_handshake_failures",
                                          "Handshakes that failed", ["reason"], registry=r)
        self.rekeys = Counter("qkdgw_rekeys", "Completed hybrid re-handshakes", registry=r)
        self.key_updates = Counter("qkdgw_key_updates", "Record-layer key updates", registry=r)
        self.qkd_keys = Counter("qkdgw_qkd_keys_consumed", "QKD keys mixed into sessions",
                                registry=r)
        self.kme_errors = Counter("qkdgw_kme_errors", "Failed KME requests", ["kind"],
                                  registry=r)
        self.tunnel_closes = Counter("qkdgw_tunnel_closes", "Tunnel connections ended",
                                     ["code", "clean"], registry=r)
        self.streams_opened = Counter("qkdgw_streams_opened", "Streams opened",
                                      ["direction"], registry=r)
        self.streams_reset = Counter("qkdgw_streams_reset", "Streams reset", ["code"],
                                     registry=r)
        self.tunnel_bytes = Counter("qkdgw_tunnel_bytes", "Bytes on the tunnel socket",
                                    ["direction"], registry=r)
        self.tunnel_up = Gauge("qkdgw_tunnel_up", "1 while the tunnel is ready", registry=r)
        self.degraded = Gauge("qkdgw_degraded", "1 while the session runs without QKD key",
                              registry=r)
        self.degraded_handshakes = Counter(
            "qkdgw_degraded_handshakes", "Handshakes completed on ML-KEM alone, by what each "
            "side's own KME said (no-key or unreachable)", ["local_kme", "peer_kme"],
            registry=r)
        self.own_certificate_refused = Counter(
            "qkdgw_own_certificate_refused", "Handshakes in which this side refused to "
            "present its own certificate (expired, not_yet_valid, revoked)", ["kind"],
            registry=r)
        self.unexpected_errors = Counter(
            "qkdgw_unexpected_errors", "Exceptions no layer turned into its own error "
            "(the connection closed with INTERNAL_ERROR): a bug to report", ["where", "type"],
            registry=r)
        self.epoch = Gauge("qkdgw_session_epoch", "Current session epoch", registry=r)
        self.psk_epoch = Gauge("qkdgw_psk_epoch", "Epoch of the current authentication PSK "
                               "shared with the peer (0: none yet)", registry=r)
        self.psk_rejected = Counter("qkdgw_psk_rejected", "PSK epochs the peer refused",
                                    registry=r)
        self.psk_store_failures = Counter("qkdgw_psk_store_failures",
                                          "PSK state writes that failed", registry=r)
        # Admission control on the tunnel listener (gateway/tunnel/admission.py).
        self.tunnel_refused = Counter(
            "qkdgw_tunnel_refused", "Tunnel connections refused or cut before a confirmed "
            "handshake (rate_limited, pending_cap, source_pending_cap, first_record_timeout, "
            "cookie_retry_timeout, handshake_bytes)", ["reason"], registry=r)
        self.cookie_retries = Counter(
            "qkdgw_cookie_retries", "HelloRetryRequests with a cookie sent instead of "
            "handshake work", registry=r)
        self.cookies_rejected = Counter("qkdgw_cookies_rejected", "Cookies that failed "
                                        "validation", ["reason"], registry=r)
        self.pending_handshakes = Gauge("qkdgw_pending_handshakes", "Accepted tunnel "
                                        "connections without a confirmed handshake", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
