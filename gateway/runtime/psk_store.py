"""The authentication PSKs a gateway shares with its peer, kept in SQLite.

After the first PKI-authenticated session every confirmed session derives the next PSK
(`next psk` output of the key schedule, so it depends on that session's QKD key), and
later tunnels authenticate with it instead of signatures. Each PSK has an epoch number;
the number travels in the ClientHello, the key never does.

Slots, per peer:

    initiator  current  the newest PSK the responder is known to hold
               pending  a newer one this side derived; the responder holds it only if
                        it saw our Finished (we learn that from HandshakeDone)
    responder  current  the PSK of the last confirmed session
               previous the one before, accepted for one retry only

Ordering, which is what makes every interruption recoverable:

1. the initiator stores `pending` before its Finished leaves;
2. the responder, after checking that Finished, stores `current` (and moves the old
   current to `previous`) before HandshakeDone leaves;
3. the initiator promotes `pending` on HandshakeDone, or on the responder accepting it
   in a later handshake. Nothing it sends depends on this write, so it runs in the
   store's worker thread, off the tunnel's way to ready; until it lands the file holds
   the state of a crash before promoting (step 3 by the next handshake), and a failed
   one is written again with the next change, before that change's bytes leave.

So the responder holding epoch n implies the initiator holds n (step 1 came first),
and an initiator offering n that the responder never stored gets an "unknown PSK"
alert and falls back to its `current`, which the responder still holds. Epoch numbers
only grow (`max_epoch` survives deleted slots), and `previous` is dropped the moment
it is used or superseded, so an older epoch is never accepted twice.

Every change is one SQLite transaction with `synchronous=FULL`; the file is the
owner's only (0600). A failed write raises `PskStoreError` and the caller must drop the
connection before anything else is sent.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError
from gateway.tunnel import events as ev
from gateway.tunnel.handshake import PskKey
from gateway.tunnel.steptimes import step
from qkd.common.errors import UserError
from qkd.common.log import get_logger
from qkd.common.private_db import open_private_db
from qkd.common.storage_key import private_dir

log = get_logger("qkdgw.psk")

SCHEMA_VERSION = 1
SLOTS = ("current", "previous", "pending")


REBOOTSTRAP_AFTER = 2  # rounds of "every PSK refused" before a PKI fallback (if allowed)


class PskStoreError(GatewayError):
    """The PSK state could not be read or written."""


class StalePskUpdate(PskStoreError):
    """A handshake finished after the PSK state it started from had moved on."""


@dataclass(frozen=True)
class PskStatus:
    """What `/status` shows: epochs and times, never a key."""

    current_epoch: int
    previous_epoch: int
    pending_epoch: int
    max_epoch: int
    bootstraps: int
    last_change: float
    out_of_step: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "current_epoch": self.current_epoch or None,
            "previous_epoch": self.previous_epoch or None,
            "pending_epoch": self.pending_epoch or None,
            "max_epoch": self.max_epoch,
            "bootstraps": self.bootstraps,
            "last_change": self.last_change or None,
            "out_of_step": self.out_of_step,
        }


class PskStore:
    """One peer's PSK slots. Implements `handshake.PskBook` (reads from memory) and
    applies the handshake's PSK events (writes to disk first)."""

    def __init__(self, path: Path, peer: str, *, pki_rebootstrap: bool = False,
                 lock: bool = True) -> None:
        self.path = path
        self.peer = peer
        self.pki_rebootstrap = pki_rebootstrap
        self._slots: dict[str, PskKey] = {}
        self._max_epoch = 0
        self._bootstraps = 0
        self._last_change = 0.0
        self._out_of_step = False
        self._refused: set[int] = set()
        self._refusal_rounds = 0
        self._reserved = 0
        # The initiator's promotion is written in a worker thread (see `_commit`).
        self._worker: ThreadPoolExecutor | None = None
        self._background: Future[list[str]] | None = None
        self._unsynced: set[str] = set()
        private_dir(path.parent)
        self._lock_fd = self._lock(path) if lock else None
        try:
            self._db = open_private_db(path, self._init)
        except (sqlite3.Error, PskStoreError) as exc:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            if isinstance(exc, PskStoreError):
                raise
            raise PskStoreError(f"cannot open the PSK store {str(path)!r}: {exc}") from None
        self._load()

    def __repr__(self) -> str:
        return f"PskStore({str(self.path)!r}, peer={self.peer!r}, epochs={self._epochs()})"

    def close(self) -> None:
        self._settle()
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @staticmethod
    def _lock(path: Path) -> int:
        """One process at a time: a running gateway keeps slots and epoch counters in
        memory, so a second writer (say `qkdgw psk reset`) would be silently undone."""
        fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise PskStoreError(f"{str(path)!r} is in use by another process (a running "
                                "gateway?); stop it first") from None
        return fd

    @staticmethod
    def _init(db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise PskStoreError(f"PSK store schema {version} is newer than this program's "
                                f"{SCHEMA_VERSION}; upgrade qkdgw")
        db.execute("CREATE TABLE IF NOT EXISTS psk (peer TEXT NOT NULL, slot TEXT NOT NULL, "
                   "epoch INTEGER NOT NULL, key BLOB NOT NULL, at REAL NOT NULL, "
                   "PRIMARY KEY (peer, slot))")
        db.execute("CREATE TABLE IF NOT EXISTS peer (peer TEXT PRIMARY KEY, "
                   "max_epoch INTEGER NOT NULL, bootstraps INTEGER NOT NULL, "
                   "last_change REAL NOT NULL)")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _load(self) -> None:
        rows = self._db.execute("SELECT slot, epoch, key FROM psk WHERE peer = ?",
                                (self.peer,)).fetchall()
        self._slots = {slot: PskKey(int(epoch), bytes(key)) for slot, epoch, key in rows
                       if slot in SLOTS}
        row = self._db.execute("SELECT max_epoch, bootstraps, last_change FROM peer "
                               "WHERE peer = ?", (self.peer,)).fetchone()
        if row is not None:
            self._max_epoch, self._bootstraps, self._last_change = int(row[0]), int(row[1]), \
                float(row[2])

    def _epochs(self) -> dict[str, int]:
        return {slot: k.epoch for slot, k in self._slots.items()}

    def _settle(self) -> None:
        """Wait for the background write, if one runs (the database is used by one
        thread at a time). A failed one leaves its slots in `_unsynced`, so the next
        commit writes them again."""
        future, self._background = self._background, None
        if future is None:
            return
        try:
            written = future.result()
        except PskStoreError as exc:
            log.error("psk.background_write_failed", peer=self.peer, error=str(exc),
                      detail="the promotion is written again with the next change; until "
                             "then the file holds it as pending, which a restart recovers "
                             "from")
            return
        self._unsynced.difference_update(written)

    def _commit(self, slots: dict[str, PskKey | None], *, bootstrap: bool = False,
                background: bool = False) -> None:
        """Replace the given slots (None deletes) and bump the bookkeeping, atomically.

        `background`: update memory now and write in the store's worker thread; only for
        a change whose loss in a crash the protocol already recovers from (the
        initiator's promotion). Every other commit waits for that write first and is on
        disk when it returns."""
        self._settle()
        # Slots whose last write failed (or is not known to have landed) go along, with
        # their values in memory: the file never keeps an older slot than memory holds.
        changes = {slot: self._slots.get(slot) for slot in self._unsynced} | slots
        now = time.time()
        new_max = max([self._max_epoch] + [k.epoch for k in changes.values() if k is not None])
        bootstraps = self._bootstraps + int(bootstrap)
        if background:
            self._unsynced.update(changes)
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="psk-store")
            self._background = self._worker.submit(self._write, changes, now, new_max,
                                                   bootstraps, "sqlite_commit (background)")
        else:
            self._write(changes, now, new_max, bootstraps, "sqlite_commit")
            self._unsynced.difference_update(changes)
        for slot, key in changes.items():
            if key is None:
                self._slots.pop(slot, None)
            else:
                self._slots[slot] = key
        self._max_epoch = new_max
        self._bootstraps = bootstraps
        self._last_change = now

    def _write(self, slots: dict[str, PskKey | None], now: float, new_max: int,
               bootstraps: int, step_name: str) -> list[str]:
        """One transaction; the slots written. Raises PskStoreError."""
        db = self._db
        with step(step_name):
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    for slot, key in slots.items():
                        db.execute("DELETE FROM psk WHERE peer = ? AND slot = ?",
                                   (self.peer, slot))
                        if key is not None:
                            db.execute("INSERT INTO psk VALUES (?, ?, ?, ?, ?)",
                                       (self.peer, slot, key.epoch, key.key, now))
                    db.execute("INSERT INTO peer VALUES (?, ?, ?, ?) ON CONFLICT(peer) DO "
                               "UPDATE SET max_epoch = excluded.max_epoch, bootstraps = "
                               "excluded.bootstraps, last_change = excluded.last_change",
                               (self.peer, new_max, bootstraps, now))
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise PskStoreError(f"cannot write the PSK store {str(self.path)!r}: {exc}"
                                    ) from None
        return list(slots)

    # -- PskBook -----------------------------------------------------------------------

    def offer(self) -> PskKey | None:
        """The newest PSK not refused since the last success. Alerts are
        unauthenticated, so a refusal never deletes a slot: once both were refused we
        offer them again, and only fall back to PKI (where allowed) after every slot was
        refused REBOOTSTRAP_AFTER times in a row. Call once per connection attempt: it
        counts the rounds (`peek` looks without counting)."""
        key, new_round = self._plan()
        if new_round is not None:
            self._refused.clear()
            self._refusal_rounds += int(new_round)
        return key

    def peek(self) -> PskKey | None:
        """What `offer` would return now, without counting an attempt."""
        return self._plan()[0]

    def _plan(self) -> tuple[PskKey | None, bool | None]:
        """(the PSK to offer, None: keep the refusal record / False: clear it / True:
        clear it and count a round of refusals)."""
        pending, current = self._slots.get("pending"), self._slots.get("current")
        if current is None:
            # Still bootstrapping: the pending PSK of an unconfirmed PKI session and PKI
            # itself, in turn (the responder accepts PKI while it holds no PSK).
            if pending is None or pending.epoch in self._refused:
                return None, False
            return pending, None
        candidates = [k for k in (pending, current) if k is not None]
        fresh = [k for k in candidates if k.epoch not in self._refused]
        if fresh:
            return fresh[0], None
        if self.pki_rebootstrap and self._refusal_rounds + 1 >= REBOOTSTRAP_AFTER:
            return None, True
        return candidates[0], True

    def lookup(self, epoch: int) -> PskKey | None:
        for slot in ("current", "previous"):
            key = self._slots.get(slot)
            if key is not None and key.epoch == epoch and epoch > 0:
                return key
        return None

    def next_epoch(self) -> int:
        # Reserved per handshake, so two handshakes in flight never get the same number.
        self._reserved = max(self._reserved, self._max_epoch) + 1
        return self._reserved

    def pki_allowed(self) -> bool:
        return "current" not in self._slots or self.pki_rebootstrap

    # -- events ------------------------------------------------------------------------

    @property
    def out_of_step(self) -> bool:
        """Initiator: the responder refused every PSK we hold since our last success.
        Either its state is gone (an operator reset or a PKI re-bootstrap, where
        allowed, fixes that) or someone forges refusals."""
        return self._out_of_step

    def apply(self, event: ev.Event) -> None:
        if isinstance(event, ev.NextPskDerived):
            if event.confirmed:
                self._responder_confirmed(event)
            else:
                self._initiator_derived(event)
            self._succeeded()
        elif isinstance(event, ev.PskConfirmed):
            pending = self._slots.get("pending")
            if pending is not None and pending.epoch == event.epoch:
                # Nothing this side sends depends on the promotion being on disk, and a
                # crash before it lands leaves `pending`, which the next handshake
                # promotes (the "initiator_crash_before_promoting" case): written in
                # the background, off the tunnel's way to ready.
                self._commit({"current": pending, "pending": None}, background=True)
                log.info("psk_confirmed", peer=self.peer, epoch=event.epoch)
            self._succeeded()
        elif isinstance(event, ev.PskRejected):
            self._initiator_rejected(event.epoch)

    def _succeeded(self) -> None:
        self._refused.clear()
        self._refusal_rounds = 0
        self._out_of_step = False

    def _responder_confirmed(self, event: ev.NextPskDerived) -> None:
        # Compare-and-swap against what this handshake saw: a handshake that finishes
        # late (its Finished held back) must not overwrite a newer PSK, nor spend a
        # slot another handshake has spent meanwhile.
        if event.epoch <= self._max_epoch:
            raise StalePskUpdate(f"a handshake that derived PSK epoch {event.epoch} "
                                 f"finished after epoch {self._max_epoch} was stored")
        if event.used_epoch and self.lookup(event.used_epoch) is None:
            raise StalePskUpdate(f"PSK epoch {event.used_epoch} was spent or replaced while "
                                 "this handshake ran")
        new = PskKey(event.epoch, event.psk)
        current = self._slots.get("current")
        previous = self._slots.get("previous")
        if event.used_epoch and previous is not None and event.used_epoch == previous.epoch:
            # The one retry of the previous epoch is spent; the unused current is dropped
            # with it, since the initiator evidently never stored it.
            self._commit({"current": new, "previous": None})
            log.warning("psk_previous_epoch_used", peer=self.peer, epoch=event.used_epoch,
                        new_epoch=new.epoch)
        elif event.bootstrap:
            # A PKI (re-)bootstrap restarts the chain: nothing older stays acceptable.
            self._commit({"current": new, "previous": None}, bootstrap=True)
            if current is not None:
                log.warning("psk_rebootstrapped", peer=self.peer, dropped_epoch=current.epoch,
                            new_epoch=new.epoch)
        else:
            self._commit({"current": new, "previous": current})
        log.info("psk_advanced", peer=self.peer, epoch=new.epoch, used_epoch=event.used_epoch)

    def _initiator_derived(self, event: ev.NextPskDerived) -> None:
        new = PskKey(event.epoch, event.psk)
        pending = self._slots.get("pending")
        # The new PSK replaces any older pending one: the responder accepted the PSK this
        # handshake used, so an older pending PSK is dead on its side too.
        changes: dict[str, PskKey | None] = {"pending": new}
        if event.used_epoch and pending is not None and pending.epoch == event.used_epoch:
            # The responder authenticated with our pending PSK, so it holds it.
            changes["current"] = pending
        if event.bootstrap:
            # A PKI (re-)bootstrap: whatever we held before is void.
            changes["current"] = None
        self._commit(changes, bootstrap=event.bootstrap)

    def _initiator_rejected(self, epoch: int) -> None:
        self._refused.add(epoch)
        held = {k.epoch for k in (self._slots.get("pending"), self._slots.get("current"))
                if k is not None}
        log.warning("psk_rejected_by_peer", peer=self.peer, epoch=epoch,
                    refused_epochs=sorted(self._refused), held_epochs=sorted(held))
        if "current" not in self._slots or not held <= self._refused or self._out_of_step:
            return
        self._out_of_step = True
        if self.pki_rebootstrap:
            log.warning("psk_out_of_step", peer=self.peer,
                        detail=f"the peer refused every PSK we hold; after "
                               f"{REBOOTSTRAP_AFTER} such rounds the next connection "
                               "bootstraps by PKI, as [auth] pki_rebootstrap allows")
        else:
            log.error("psk_out_of_step", peer=self.peer,
                      fix="if the peer lost its PSK state, run `qkdgw psk reset --yes` at "
                          "both sites (gateways stopped) or set [auth] pki_rebootstrap = "
                          "true at both; if it did not, someone is forging refusals")

    # -- operator ----------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every PSK for this peer; the next tunnel bootstraps by PKI. Epoch
        numbers keep growing from where they were."""
        self._commit({slot: None for slot in SLOTS})
        self._succeeded()

    def status(self) -> PskStatus:
        def epoch(slot: str) -> int:
            key = self._slots.get(slot)
            return key.epoch if key is not None else 0

        return PskStatus(epoch("current"), epoch("previous"), epoch("pending"),
                         self._max_epoch, self._bootstraps, self._last_change,
                         self._out_of_step)


# ------------------------------------------------------------------------------ CLI


def _open_for(config_path: str, *, lock: bool = True) -> PskStore:
    from gateway.config import GatewayConfig

    config = GatewayConfig.load(config_path)
    if not config.psk_enabled:

        raise UserError(f"{config_path}: [auth] psk is off, so this site keeps no PSK state")
    try:
        return PskStore(config.state_dir / "psk.sqlite", config.peer_site_id,
                        pki_rebootstrap=config.pki_rebootstrap, lock=lock)
    except PskStoreError as exc:

        raise UserError(f"{exc} (fix: check [gateway] state_dir in {config_path})") from None


def _cmd_show(args: argparse.Namespace) -> int:
    # Reading needs no lock: show works while the gateway runs (WAL readers never block).
    store = _open_for(args.config, lock=False)
    try:
        print(json.dumps({"peer": store.peer, "path": str(store.path),
                          **store.status().as_dict()}, indent=2))
    finally:
        store.close()
    return 0


def _cmd_reset(args: argparse.Namespace) -> int:

    if not args.yes:
        raise UserError("this forgets every PSK shared with the peer, so the next tunnel "
                        "must bootstrap by PKI again (fix: stop the gateway, run it again "
                        "with --yes, and do the same at the peer site)")
    store = _open_for(args.config)
    try:
        before = store.status()
        store.reset()
        log.warning("psk_reset", peer=store.peer, dropped_epoch=before.current_epoch or None)
        print(f"PSK state for peer {store.peer} cleared (was epoch {before.current_epoch}); "
              "the next tunnel bootstraps by PKI")
    finally:
        store.close()
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("psk", help="show or reset the PSK state shared with the peer")
    psub = p.add_subparsers(dest="psk_command", metavar="ACTION")
    psub.required = True
    show = psub.add_parser("show", help="epochs and counters (never the keys)")
    show.add_argument("--config", required=True, help="this site's gateway config")
    show.set_defaults(handler=_cmd_show)
    reset = psub.add_parser("reset", help="forget the PSKs; the next tunnel bootstraps by "
                            "PKI (run at both sites, gateways stopped)")
    reset.add_argument("--config", required=True, help="this site's gateway config")
    reset.add_argument("--yes", action="store_true", help="really forget them")
    reset.set_defaults(handler=_cmd_reset)
