"""ETSI GS QKD 014 v1.1.1 values, one line each with its unit, then this
implementation's limits (its choices, not the spec's). messages.py and client.py
use these; docs/protocol.md and the spec say what each means."""

from __future__ import annotations

# ----------------------------------------------------------------- spec values

API_PREFIX = "/api/v1/keys"  # URL path: {API_PREFIX}/{SAE_ID}/{STATUS|ENC_KEYS|DEC_KEYS}
STATUS = "status"  # URL path segment: Get status (clause 5.1)
ENC_KEYS = "enc_keys"  # URL path segment: Get key, master SAE (clause 5.2)
DEC_KEYS = "dec_keys"  # URL path segment: Get key with key IDs, slave SAE (clause 5.3)
BAD_REQUEST = 400  # HTTP status: bad request format (clause 5)
UNAUTHORIZED = 401  # HTTP status: unauthorized (clause 5)
SERVER_ERROR = 503  # HTTP status: error on the server side, e.g. no key (clause 5)
DEFAULT_NUMBER = 1  # keys: Key request `number` when absent (clause 6.2)
BITS_PER_BYTE = 8  # key sizes are in bits and whole bytes (clause 6.2)
KEY_ID_CHARS = 36  # characters: key_ID is a UUID in 8-4-4-4-12 form (clause 6.3)
# Status object fields (clause 6.1): strings, then integers.
STATUS_FIELDS_STR = ("source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID")
STATUS_FIELDS_INT = (
    "key_size",  # bits
    "stored_key_count",  # keys
    "max_key_count",  # keys
    "max_key_per_request",  # keys
    "max_key_size",  # bits
    "min_key_size",  # bits
    "max_SAE_ID_count",  # SAE IDs
)

# ------------------------------------------------------- implementation limits

MAX_ID_CHARS = 255  # characters: longest SAE or KME ID accepted (URL path, logs, SQLite)
HKDF_MAX_BITS = 255 * 32 * 8  # bits: largest max_key_size the ideal link derives in one HKDF
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # bytes: largest KME answer the client reads
SEEN_KEY_IDS = 65536  # key IDs: delivered IDs the client remembers to spot replays
NO_KEY_MESSAGE = "no key available"  # text: this KME's 503 message for an empty pool
HYBRID_GROUP = "X25519MLKEM768"  # TLS group: the post-quantum hybrid the client reports
