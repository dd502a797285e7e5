"""Every value and limit of the BB84 link between two KMEs, one line each with its unit.

Protocol values (changing one changes the wire, or makes a KME disagree with a peer
running the old value) come first; implementation limits (this implementation's
choices: timeouts, retries, queue sizes) after them. `qkd.link.core` (sans-I/O) and
`qkd.link.bb84` (asyncio adapter) import them from here; docs/kme.md ("BB84 link
between the KMEs") says what each one is for.
"""

from __future__ import annotations

from qkd.link.wegman_carter import PAD_BYTES

# ----------------------------------------------------------------- protocol values

# Classical frame types (first byte of every classical frame, core.py).
HELLO = 1  # frame type: connection start, both sides' committed round and watermarks
ROUND_START = 2  # frame type: Alice opens a round (round number, nonce, room)
PP = 3  # frame type: a post-processing message (untagged, in the round transcript)
TRANSCRIPT = 4  # frame type: Bob's outcome, tagged over his post-processing frames
COMMIT = 5  # frame type: Alice's commit, tagged over hers; names blocks and refill
COMMIT_ACK = 6  # frame type: Bob committed the round
RESERVE = 7  # frame type: keys reserved for a (master, slave) pair at the sender
RESERVE_ACK = 8  # frame type: the peer recorded (or refused) that reservation
ABORT = 9  # frame type: the sender drops the round, with a reason
BOOT = 10  # frame type: Alice's bootstrap nonce (first start or after link-reset)
BOOT_ACK = 11  # frame type: Bob's bootstrap nonce, MAC over both
FRAME_NAMES = {HELLO: "HELLO", ROUND_START: "ROUND_START", PP: "PP",
               TRANSCRIPT: "TRANSCRIPT", COMMIT: "COMMIT", COMMIT_ACK: "COMMIT_ACK",
               RESERVE: "RESERVE", RESERVE_ACK: "RESERVE_ACK", ABORT: "ABORT"}

# Frame layouts (struct formats, little-endian).
LENGTH_PREFIX_FORMAT = "<I"  # struct: u32 length before every frame on both connections
CTRL_HEADER_FORMAT = "<BQ16s"  # struct: type u8, pad offset u64, tag 16 (then JSON body)
ALT_TAG_FORMAT = "<BQ16s"  # struct: HELLO's has_alt u8, alt pad offset u64, alt tag 16
BOOT_FORMAT = "<B16s32s"  # struct: type, nonce_a, HMAC-SHA256
BOOT_ACK_FORMAT = "<B16s16s32s"  # struct: type, nonce_a, nonce_b, HMAC-SHA256
NONCE_BYTES = 16  # bytes: BOOT / BOOT_ACK nonces and the ROUND_START nonce
BOOT_SESSION_BYTES = 2 * NONCE_BYTES  # bytes: both bootstrap nonces, into the HKDF

# Labels (domain separation; both KMEs must use the same bytes).
CTRL_LABEL = b"qkdgw link v1\x00"  # prefix of every control tag's message
BLOCK_ID_LABEL = b"qkdgw bb84 block v1"  # hashed with round nonce and index: block IDs
BOOT_MAC_INFO = b"qkdgw link boot mac v1"  # HKDF info: BOOT / BOOT_ACK MAC key
BOOT_MAC_LABEL = b"qkdgw link boot v1\x00"  # prefix of the BOOT / BOOT_ACK MAC message
UNBOOTSTRAPPED = "unbootstrapped"  # auth mode name before the first bootstrap

# Authentication pad budget (per direction; Alice names the refill in COMMIT and Bob
# checks it against these, so both sides must agree).
TARGET_PAD_BYTES = 32 * PAD_BYTES  # bytes: first round's refill (plus the hash key)
RESERVE_PAD_BYTES = 8 * PAD_BYTES  # bytes: reserve only round/connection frames may use
BOOTSTRAP_PAD_BYTES = 256 * PAD_BYTES  # bytes: pads derived at a bootstrap
TOPUP_PAD_BYTES = 256 * PAD_BYTES  # bytes: later rounds top the streams up to this
TOPUP_MAX_SHARE = 4  # 1/n: a round spends at most 1/n of its key per direction on pads
ROUND_PAD_BYTES = 4 * PAD_BYTES  # bytes above the reserve a reservation must leave
LOW_PAD_BYTES = 32 * PAD_BYTES  # bytes above the reserve: below, rounds run on a full pool
ROUND_NEED_BYTES = 2 * PAD_BYTES  # bytes above the reserve a round needs per direction

# Field limits the receiving core enforces (a peer sending more is a protocol error).
MAX_RESERVE_KEYS = 4096  # keys: most one RESERVE may name
MAX_RESERVE_KEY_BITS = 1 << 20  # bits: largest key size a RESERVE may name
MAX_TEXT_FIELD = 1024  # characters: default limit of a string field in a control body
MAX_NONCE_HEX = 64  # characters: ROUND_START nonce field (hex)
MAX_ABORT_REASON_IN = 400  # characters: reason field of a received ABORT
MAX_ABORT_REASON_OUT = 200  # characters: reason this side puts in an ABORT

# State file format name (sealed at rest; an older build refuses a newer one).
STATE_ID = "qkdgw-link-auth-state-v1"

# ------------------------------------------------------------ implementation limits

RESERVE_TIMEOUT_S = 10.0  # s: a RESERVE without RESERVE_ACK fails (503) after this
DEPOSIT_RETRY_S = 1.0  # s: pause before retrying a deposit the store refused
HELLO_TIMEOUT_S = 10.0  # s: Bob closes a new connection without a valid HELLO by then
HELLO_FRAME_LIMIT = 4096  # bytes: largest first frame of a new connection (its HELLO)
MAX_UNVERIFIED_CONNECTIONS = 16  # connections: strangers Bob keeps; more evict the oldest
LOOP_RETRY_S = 0.5  # s: first pause of a task loop after an unexpected error (doubles)
LOOP_RETRY_MAX_S = 10.0  # s: longest such pause
BUSY_BACKOFF_MAX_S = 30.0  # s: Alice's longest pause while Bob cannot store his deposit
# Every aborted round spends pads and makes none, so retrying at full speed would use
# up the pads the reservations need while the pool still has keys.
ABORT_BACKOFF_MAX_S = 8.0  # s: Alice's longest pause after rounds aborted in a row
