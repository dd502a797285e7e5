"""The gateway process state: the tunnel dialler and listener, admission, credentials,
`/status` and the admin endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import time
from datetime import timedelta
from typing import Any, cast

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.pki import (
    PkiError,
)
from gateway.runtime.credentials import CredentialFiles, CredentialSource, OwnCertificateExpired
from gateway.runtime.keylog import KeyLogWriter
from gateway.runtime.listener import LocalListener
from gateway.runtime.ops import GatewayOps
from gateway.runtime.psk_store import PskStore, PskStoreError
from gateway.runtime.session import TunnelSession
from gateway.tunnel.admission import (
    Admission,
    ConnectionRefused,
    CookieGate,
    CookieIssued,
    CookieRejected,
    LogThrottle,
)
from gateway.tunnel.connection import ConnectionSettings, TunnelConnection
from gateway.tunnel.handshake import (
    MODE_HYBRID,
    MODE_MLKEM_ONLY,
    Credentials,
    HandshakeParams,
    HandshakePolicy,
)
from gateway.tunnel.record import RecordLimits
from gateway.tunnel.streams import MuxSettings
from qkd.common.backoff import Backoff
from qkd.common.bounded import BoundedSet
from qkd.common.confload import ConfigError
from qkd.common.log import get_logger
from qkd.etsi014.client import EtsiClient
from qkd.skip.client import SkipClient

log = get_logger("qkdgw.gateway")





def load_credentials(config: GatewayConfig) -> Credentials:
    """The gateway's signing key and chain, checked against its own config: key matches
    certificate, certificate chains to the CA, is valid and names this site, and the
    CRL (if set) verifies. Any problem is a ConfigError naming the [pki] field."""
    return credential_source(config).current()


def credential_source(config: GatewayConfig, registry: Any = None) -> CredentialSource:
    """This gateway's credentials from [pki], re-read when the files change
    (gateway/runtime/credentials.py); a set that is invalid at start is a ConfigError."""
    files = CredentialFiles(key=config.key_file, cert=config.cert_file, ca=config.ca_file,
                            crl=config.crl_file)
    try:
        return CredentialSource(files, config.site_id,
                                crl_grace=timedelta(seconds=config.crl_grace),
                                registry=registry)
    except PkiError as exc:
        text = str(exc)
        name = next((n for n, p in (("crl", files.crl), ("key", files.key),
                                    ("cert", files.cert), ("ca", files.ca))
                     if p is not None and text.startswith(str(p))), "cert")
        raise ConfigError(f"{config.source}: [pki] {name}: {text}") from None


# The last QKD key IDs named to this gateway: a cheap replay check in front of the KME's
# durable once-only delivery.
RecentKeyIds = BoundedSet


class Gateway:
    def __init__(self, config: GatewayConfig, *, credentials: Credentials | None = None) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        # Injected credentials (tests) stay fixed; from config they follow the files.
        self.credential_source = None if credentials is not None else credential_source(
            config, self.metrics.registry)
        self.credentials = credentials or cast(CredentialSource,
                                               self.credential_source).current()
        self.services = {s.name: s.target for s in config.services}
        policy = HandshakePolicy(
            kems=config.kems,
            allowed_modes=(MODE_HYBRID, MODE_MLKEM_ONLY) if config.allow_degraded
            else (MODE_HYBRID,),
            qkd_key_size_bits=config.qkd_key_bits,
            pqc_backend=config.pqc_backend,
            its_mac=config.its_mac,
        )
        self.psk: PskStore | None = None
        if config.psk_enabled:
            try:
                self.psk = PskStore(config.state_dir / "psk.sqlite", config.peer_site_id,
                                    pki_rebootstrap=config.pki_rebootstrap)
            except PskStoreError as exc:
                raise ConfigError(f"{config.source}: [gateway] state_dir: {exc} (fix: make "
                                  f"{config.state_dir} a writable local directory that no "
                                  "other running gateway uses)") from None
        self.params = HandshakeParams(
            local_identity=config.site_id, peer_identity=config.peer_site_id,
            local_sae_id=config.sae_id, peer_sae_id=config.peer_sae_id,
            credentials=self.credentials, policy=policy, stream_window=config.stream_window,
            psk_book=self.psk)
        self.settings = ConnectionSettings(
            handshake_timeout=config.handshake_timeout,
            rekey_interval=config.rekey_interval,
            record_limits=RecordLimits(update_after_records=config.key_update_records,
                                       update_after_bytes=config.key_update_bytes),
            mux=MuxSettings(recv_window=config.stream_window, max_streams=config.max_streams),
        )
        client = SkipClient if config.kme_api == "skip" else EtsiClient
        self.kme = client(config.kme_url, ca_file=config.kme_ca, cert_file=config.kme_cert,
                          key_file=config.kme_key, timeout=config.kme_timeout,
                          kme_id=config.kme_name, min_tls=config.kme_min_tls)
        self.keylog: KeyLogWriter | None = None
        self.used_key_ids = RecentKeyIds()
        self.tunnel: TunnelSession | None = None
        self.sessions: set[TunnelSession] = set()
        self.started = time.time()
        self.tunnel_connects = 0
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tunnel_changed = asyncio.Event()
        self._stopping = False
        self._admin_runner: web.AppRunner | None = None
        self.admin_port: int | None = None
        self.tunnel_port: int | None = None
        self.listener_ports: dict[str, int] = {}
        # Only the listening side admits connections; see gateway/tunnel/admission.py.
        self.admission: Admission | None = (
            Admission(config.admission) if config.tunnel_listen is not None else None)
        self._admission_log = LogThrottle(1.0)
        self.totals = {"handshakes": 0, "rekeys": 0, "key_updates": 0,
                       "qkd_keys_consumed": 0, "degraded_handshakes": 0}
        self.ops = GatewayOps(self)  # key budget, status page, probes (gateway/runtime/ops.py)

    def new_connection(self, initiator: bool, now: float,
                       cookie_gate: CookieGate | None = None) -> TunnelConnection:
        if self.credential_source is not None:
            # A renewed certificate or re-signed CRL counts from the next connection on.
            self.credentials = self.credential_source.current()
            if self.params.credentials is not self.credentials:
                self.params = dataclasses.replace(self.params, credentials=self.credentials)
        return TunnelConnection(initiator=initiator, params=self.params,
                                settings=self.settings, now=now, keylog=self.keylog,
                                cookie_gate=cookie_gate)

    def drain_admission(self) -> None:
        """Admission events to metrics and (throttled) log lines."""
        a = self.admission
        if a is None:
            return
        m = self.metrics
        now = time.monotonic()
        while a.events:
            e = a.events.popleft()
            if isinstance(e, ConnectionRefused):
                m.tunnel_refused.labels(e.reason).inc()
                held = self._admission_log.allow("refused:" + e.reason, now)
                if held is not None:
                    log.warning("tunnel.refused", source=e.source, reason=e.reason,
                                pending=a.pending, suppressed_since_last=held)
            elif isinstance(e, CookieIssued):
                m.cookie_retries.inc()
                held = self._admission_log.allow("cookie", now)
                if held is not None:
                    log.info("tunnel.cookie_sent", source=e.source, under_load=e.under_load,
                             pending=a.pending, suppressed_since_last=held)
            elif isinstance(e, CookieRejected):
                m.cookies_rejected.labels(e.reason).inc()
                held = self._admission_log.allow("cookie_rejected:" + e.reason, now)
                if held is not None:
                    log.warning("tunnel.cookie_rejected", source=e.source, reason=e.reason,
                                suppressed_since_last=held)
        m.pending_handshakes.set(a.pending)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        if cfg.keylog_file is not None:
            self.keylog = KeyLogWriter(cfg.keylog_file)
            log.warning("KEYLOG_ENABLED", path=str(cfg.keylog_file),
                        detail="every session's ML-KEM secret and QKD key is written to this "
                               "file: anyone with it and a recording can decrypt the tunnel. "
                               "Never enable this in production.")
        for listener in cfg.listeners:
            server = await loop.create_server(
                functools.partial(LocalListener, self, listener.service),
                listener.listen.host, listener.listen.port)
            self._servers.append(server)
            port = server.sockets[0].getsockname()[1]
            self.listener_ports[listener.service] = port
            log.info("gateway.listening", service=listener.service,
                     address=f"{listener.listen.host}:{port}")
        if cfg.tunnel_listen is not None:
            server = await loop.create_server(lambda: self._accept_tunnel(),
                                              cfg.tunnel_listen.host, cfg.tunnel_listen.port)
            self._servers.append(server)
            self.tunnel_port = server.sockets[0].getsockname()[1]
            log.info("gateway.tunnel_listening",
                     address=f"{cfg.tunnel_listen.host}:{self.tunnel_port}")
        if cfg.admin_listen is not None:
            await self._start_admin()
        if cfg.tunnel_connect is not None:
            self.spawn(self._dial_loop())
        log.info("gateway.started", site=cfg.site_id, peer=cfg.peer_site_id,
                 role="initiator" if cfg.initiator else "responder", kem=cfg.kem,
                 policy="hybrid+degraded" if cfg.allow_degraded else "hybrid-required",
                 rekey_interval_s=cfg.rekey_interval, kme=cfg.kme_url)
        if cfg.allow_degraded:
            log.warning("gateway.DEGRADED_MODE_ALLOWED",
                        detail="sessions may run on ML-KEM alone while the QKD link is down; "
                               "the peer must allow it too")

    def _accept_tunnel(self) -> TunnelSession:
        # Added to `sessions` once admitted (connection_made).
        return TunnelSession(self, initiator=False)

    def _check_bootstrap(self) -> None:
        """Raise OwnCertificateExpired instead of dialling into a PKI bootstrap that
        would present an expired certificate. A PSK reconnect needs no certificate."""
        if self.credential_source is None:
            return
        if self.psk is not None and self.psk.peek() is not None:
            return
        problem = self.credential_source.bootstrap_problem()
        if problem is not None:
            raise OwnCertificateExpired(problem)

    async def _dial_loop(self) -> None:
        cfg = self.config
        assert cfg.tunnel_connect is not None
        loop = asyncio.get_running_loop()
        backoff = Backoff(cfg.reconnect_min, cfg.reconnect_max)
        while not self._stopping:
            session: TunnelSession | None = None
            attempt: TunnelSession | None = None
            try:
                self._check_bootstrap()
                attempt = TunnelSession(self, initiator=True)
                attempt.prestart()
                await attempt.hello_ready.wait()
                if attempt.conn.closed:
                    # No QKD key (or no PSK the policy accepts): logged by the session.
                    await attempt.closed.wait()
                else:
                    _, session = await loop.create_connection(
                        functools.partial(lambda a: a, attempt),
                        cfg.tunnel_connect.host, cfg.tunnel_connect.port)
            except OSError as exc:
                if attempt is not None:
                    attempt.discard()
                log.warning("tunnel.connect_failed", address=str(cfg.tunnel_connect),
                            error=exc.strerror or str(exc), retry_in_s=round(backoff.delay, 2))
            except OwnCertificateExpired as exc:
                self.metrics.handshake_failures.labels("own_certificate_expired").inc()
                self.metrics.own_certificate_refused.labels(
                    "revoked" if "revoked" in str(exc) else "expired").inc()
                log.error("tunnel.BOOTSTRAP_REFUSED", reason=str(exc),
                          retry_in_s=round(backoff.delay, 2))
            if session is not None:
                self.tunnel_connects += 1
                self.sessions.add(session)
                # The session ends by itself: a failed handshake closes it (the handshake
                # has its own deadline), a working tunnel runs until it drops.
                await session.closed.wait()
                if session.ready.is_set():
                    backoff.succeeded()
            if self._stopping:
                break
            await asyncio.sleep(backoff.delay)
            backoff.failed()

    def tunnel_ready(self, session: TunnelSession) -> None:
        old = self.tunnel
        self.tunnel = session
        self.metrics.tunnel_up.set(1)
        self._tunnel_changed.set()
        self._tunnel_changed = asyncio.Event()
        if old is not None and old is not session:
            # A peer that reconnects replaces the old tunnel; one tunnel per peer.
            old.close()

    def tunnel_lost(self, session: TunnelSession) -> None:
        self.sessions.discard(session)
        stats = session.conn.stats
        self.totals["handshakes"] += stats.handshakes
        self.totals["rekeys"] += stats.rekeys
        self.totals["key_updates"] += stats.key_updates
        self.totals["qkd_keys_consumed"] += stats.qkd_keys_consumed
        self.totals["degraded_handshakes"] += stats.degraded_handshakes
        if self.tunnel is session:
            self.tunnel = None
            self.metrics.tunnel_up.set(0)

    async def wait_tunnel(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._tunnel_changed.wait(), timeout)

    def status(self) -> dict[str, Any]:
        t = self.tunnel
        totals = dict(self.totals)
        for s in self.sessions:
            totals["handshakes"] += s.conn.stats.handshakes
            totals["rekeys"] += s.conn.stats.rekeys
            totals["key_updates"] += s.conn.stats.key_updates
            totals["qkd_keys_consumed"] += s.conn.stats.qkd_keys_consumed
            totals["degraded_handshakes"] += s.conn.stats.degraded_handshakes
        peer: dict[str, Any] = {"site_id": self.config.peer_site_id, "tunnel": "down"}
        if t is not None and t.conn.ready and t.conn.session is not None:
            sess = t.conn.session
            next_rekey = t.conn.next_rekey_at
            peer.update(
                tunnel="up", address=t.peer_address, epoch=sess.epoch,
                auth_mode=t.bootstrap_auth,
                bootstrap_psk_epoch=t.psk_epoch or None,
                session_auth=sess.auth, its_mac=sess.its_mac,
                mode=sess.mode, degraded=sess.mode != MODE_HYBRID, kem=sess.kem,
                local_kme=sess.qkd_status, peer_kme=sess.peer_qkd_status,
                qkd_keys_consumed=t.conn.stats.qkd_keys_consumed,
                last_handshake=t.last_handshake.isoformat() if t.last_handshake else None,
                next_rekey_in_s=None if next_rekey is None
                else round(max(0.0, next_rekey - t.loop.time()), 1),
                open_streams=t.conn.open_streams,
            )
            if os.environ.get("QKDGW_DEBUG_STREAMS"):
                peer["streams"] = {
                    sid: dict(window=t.conn.send_window(sid), pending=len(a._pending_out),
                              unconsumed=a._unconsumed, rpaused=a._reading_paused,
                              wpaused=a._writing_paused, eof=a._app_eof, fin=a._fin_sent,
                              peer_fin=a._peer_fin, done=a._done,
                              buf=a.transport.get_write_buffer_size() if a.transport else None)
                    for sid, a in t.streams.items()}
        if self.psk is not None:
            peer["psk"] = self.psk.status().as_dict()
            peer["psk"]["pki_rebootstrap_allowed"] = self.config.pki_rebootstrap
        else:
            peer["psk"] = None
        return {
            "site_id": self.config.site_id,
            "role": "initiator" if self.config.initiator else "responder",
            "uptime_s": round(time.time() - self.started, 1),
            "peer": peer,
            **totals,
            "tunnel_connects": self.tunnel_connects,
            "budget": self.ops.status(),
            "kme_tls": self.kme.tls_info(),
        }

    async def _start_admin(self) -> None:
        cfg = self.config
        assert cfg.admin_listen is not None
        app = web.Application()

        async def status(_request: web.Request) -> web.Response:
            return web.json_response(self.status())

        async def metrics(_request: web.Request) -> web.Response:
            return web.Response(body=self.metrics.render(),
                                content_type="text/plain", charset="utf-8")

        app.router.add_get("/status", status)
        app.router.add_get("/metrics", metrics)
        self.ops.add_routes(app)
        self._admin_runner = web.AppRunner(app, access_log=None)
        await self._admin_runner.setup()
        site = web.TCPSite(self._admin_runner, cfg.admin_listen.host, cfg.admin_listen.port)
        await site.start()
        server = site._server
        assert server is not None
        self.admin_port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("gateway.admin_listening", address=f"{cfg.admin_listen.host}:{self.admin_port}")
        self.ops.start()

    async def close(self) -> None:
        self._stopping = True
        for s in self._servers:
            s.close()
        for session in list(self.sessions):
            session.close()
        for task in list(self._tasks):
            task.cancel()
        for s in self._servers:
            with contextlib.suppress(Exception):
                await s.wait_closed()
        await self.ops.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        await self.kme.close()
        if self.keylog is not None:
            self.keylog.close()
        if self.psk is not None:
            self.psk.close()
        log.info("gateway.stopped", site=self.config.site_id)


# ------------------------------------------------------------------------------ CLI
