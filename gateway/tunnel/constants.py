"""Every wire value and limit of the qkdgw/1 tunnel protocol, one line each with its
unit. Protocol values (changing one changes the wire) come first; implementation
limits (this implementation's choices, not the protocol's) after them.
docs/protocol.md is the reference for what each means on the wire."""

from __future__ import annotations

# ----------------------------------------------------------------- protocol values

PROTOCOL_VERSION = "qkdgw/1"  # in every hello; a peer speaking another version is refused

# Record layer (record.py)
PLAINTEXT_HANDSHAKE = 0x16  # record type: handshake message before keys exist
PROTECTED = 0x17  # record type: AES-256-GCM protected record
HEADER_LEN = 5  # bytes: type u8, flags u8, body length u24
TAG_LEN = 16  # bytes: AES-GCM tag
MAX_PAYLOAD = 1 << 16  # bytes: largest inner payload of one record
MAX_PROTECTED_BODY = MAX_PAYLOAD + 1 + TAG_LEN  # bytes: payload + inner type + tag
MAX_PLAINTEXT_BODY = MAX_PAYLOAD  # bytes: largest plaintext handshake record body
INNER_HANDSHAKE = 1  # inner type: a handshake message under record protection
INNER_STREAM = 2  # inner type: stream multiplexer frames
INNER_CLOSE = 3  # inner type: the authenticated close
FLAG_KEY_PHASE = 0x01  # record flag: the sender's key phase (key update)

# Stream multiplexer (streams.py)
FRAME_OPEN = 1  # frame type: open a stream to a named service
FRAME_DATA = 2  # frame type: stream bytes
FRAME_WINDOW = 3  # frame type: flow-control credit
FRAME_FIN = 4  # frame type: clean end of one direction
FRAME_RESET = 5  # frame type: abort a stream with a code
FRAME_HEADER_FORMAT = ">BII"  # struct: type (u8), stream id (u32), length (u32)
MAX_SERVICE_NAME = 64  # bytes: longest service name in FRAME_OPEN

# Handshake messages (handshake.py)
MSG_CLIENT_HELLO = 1
MSG_SERVER_HELLO = 2
MSG_CERTIFICATE = 3
MSG_CERTIFICATE_VERIFY = 4
MSG_FINISHED = 5
MSG_HANDSHAKE_DONE = 6
MSG_ALERT = 7
MSG_HELLO_RETRY = 8
NONCE_LEN = 32  # bytes: each hello's random nonce
MAX_COOKIE = 64  # bytes: longest cookie a HelloRetryRequest may carry
MAX_QKD_KEYS = 8  # keys: most QKD key IDs one hello may name
# ClientHello flags: what the initiator's policy turns on; the responder's must match.
FLAG_PSK = 0x01  # this side keeps PSK state: after bootstrap, handshakes run in PSK mode
FLAG_ITS_MAC = 0x02  # handshake also authenticated by one-time MACs keyed by QKD bits
KNOWN_FLAGS = FLAG_PSK | FLAG_ITS_MAC
# Authentication modes and session modes, as named on the wire and in key logs.
AUTH_PKI = "pki"
AUTH_PSK = "psk"
AUTH_CHAIN = "chain"
MODE_HYBRID = "hybrid"
MODE_MLKEM_ONLY = "mlkem-only"
# What each side's own KME said, carried in its hello and so bound into TH. Only the two
# degraded values let a side agree to ML-KEM-only; a key ID the KME refuses (replayed,
# unknown, already delivered) is never one of them: it fails the handshake.
QKD_OK = "ok"  # this side holds the session's QKD keys
QKD_NO_KEY = "no-key"  # this side's KME answered that it has no key for the peer
QKD_UNREACHABLE = "unreachable"  # this side's KME could not be reached

# Key schedule (key_schedule.py): HKDF-SHA-384 labels and output sizes
HASH_NAME = "sha384"
HASH_LEN = 48  # bytes: SHA-384 output, every secret's size
INITIAL_SALT = b"qkdgw/1 hybrid initial salt"
TRANSCRIPT_LABEL = b"qkdgw/1 transcript"
SIG_LABEL_INITIATOR = b"qkdgw/1 initiator signature\x00"
SIG_LABEL_RESPONDER = b"qkdgw/1 responder signature\x00"
LABEL_PSK_BINDER = b"qkdgw/1 psk binder"
LABEL_INITIATOR_CONFIRM = b"qkdgw/1 initiator confirm"
LABEL_RESPONDER_CONFIRM = b"qkdgw/1 responder confirm"
LABEL_I2R_TRAFFIC = b"qkdgw/1 i2r traffic"
LABEL_R2I_TRAFFIC = b"qkdgw/1 r2i traffic"
LABEL_CHAIN_KEY = b"qkdgw/1 chain key"
LABEL_NEXT_PSK = b"qkdgw/1 next psk"
# Record-layer derivations from a traffic secret (TLS 1.3 style: a secret per direction,
# from which the AES key, the IV and, on key update, the next secret are expanded).
LABEL_RECORD_KEY = b"qkdgw/1 record key"
LABEL_RECORD_IV = b"qkdgw/1 record iv"
LABEL_KEY_UPDATE = b"qkdgw/1 key update"
AES_KEY_LEN = 32  # bytes: AES-256 key
GCM_IV_LEN = 12  # bytes: AES-GCM nonce

# One-time MAC (otmac.py): polynomial MAC over GF(2^127 - 1) keyed by QKD bits
OTMAC_KEY_BYTES = 32  # bytes: one tag's key
OTMAC_TAG_BYTES = 16  # bytes: one tag

# Cookies (admission.py)
COOKIE_LABEL = b"qkdgw/1 cookie\x00"
COOKIE_MAC_LEN = 32  # bytes: HMAC-SHA-256 of a cookie
HELLO_DIGEST_LEN = 48  # bytes: SHA-384 of the hello a cookie answers

# ----------------------------------------------------------- implementation limits

OTMAC_MAX_MESSAGE_BYTES = 1 << 16  # bytes: longest message the forgery bound covers
COOKIE_CLOCK_SLACK_MS = 1000  # ms: a cookie stamped further ahead was not made here
