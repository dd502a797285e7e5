"""Values of the simulated decoy-state BB84 protocol and its post-processing, one line
each with its unit: protocol values first (both parties must agree; a change changes
the messages or the key), then this implementation's limits and tuning. The meaning
of each is in the module that uses it and docs/qkd.md."""

from __future__ import annotations

# ----------------------------------------------------------------- protocol values

Z_BASIS = 0  # basis index: rectilinear, carries the key
X_BASIS = 1  # basis index: diagonal, estimates the phase error
EVE_MODES = ("none", "intercept-resend", "pns", "beam-splitting", "noise")  # attack names
CASCADE_VARIANTS = ("original", "yanetal", "option7", "option8")  # Cascade parameter sets
DEFAULT_CASCADE_VARIANT = "option8"  # Cascade parameter set both parties use by default
DEFAULT_EPS_SEC = 1e-10  # probability: secrecy parameter of the finite-key bound
DEFAULT_EPS_COR = 1e-15  # probability: correctness (verification hash collision)
DEFAULT_QBER_ABORT = 0.11  # fraction: a round with a higher Z-basis QBER yields no key
DEFAULT_FRAME_BITS = 1 << 14  # bits: sifted key per Cascade frame
DEFAULT_FRAME_TAG_BITS = 32  # bits: per-frame check tag (undetected error <= 2^-32 a frame)
DEFAULT_FRAME_RETRIES = 2  # extra Cascade runs for a frame whose tag differs, then dropped
FRAME_CHECK_VERSION = 1  # version byte of FrameCheck and FrameCheckResult

# Post-processing message types (qkd.sim.messages, one byte on the wire).
MSG_CASCADE_HELLO = 1
MSG_PARITY_REPLY = 4
MSG_CASCADE_DONE = 5
MSG_PARITY_QUERY = 6
MSG_FRAME_CHECK = 7  # per-frame verification tags after a Cascade run
MSG_FRAME_CHECK_RESULT = 8  # which frames' tags differed
MSG_DETECTIONS = 10
MSG_SIFT_REPLY = 11
MSG_TEST_BITS = 12
MSG_ESTIMATION_RESULT = 13
MSG_VERIFY_HASH = 14
MSG_VERIFY_RESULT = 15
MSG_PRIVACY_AMP = 16
MSG_DETECTIONS_PACKED = 17  # Detections with varint slot deltas

# ------------------------------------------------------- implementation limits

VARINT_MAX_BYTES = 9  # bytes: longest varint decoded (63 bits, fits an int64)
ID_LIMIT = 1 << 62  # ids, frames, passes, slots: a sum of two never wraps an int64
CASCADE_MIN_QBER = 1e-5  # fraction: floor of the QBER the block sizes are computed from
FRAME_TAG_MAX_BITS = 64  # bits: longest per-frame tag a decoder accepts
FRAME_CHECK_MAX_FRAMES = 1 << 20  # frames: most a FrameCheck may cover (bounds memory)
MIN_QBER_GUESS = 1e-3  # fraction: Cascade's guess when the test basis shows no error
CHANNEL_CHUNK_PULSES = 1 << 22  # pulses: simulated per numpy batch (bounds memory)
PA_DENSE_MAX_ROWS = 64  # output bits: above this, privacy amplification uses the FFT
PA_MAX_ERROR = 0.25  # absolute: largest float error accepted for one FFT transform
PA_BLOCK_BYTES = 1 << 19  # bytes: spectrum rows handled together (stays in cache)
