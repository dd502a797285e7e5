"""Coverage-guided fuzz target for the post-processing message decoders (atheris).

Run: python tests/qkd/sim/fuzz_messages_atheris.py -runs=200000
Property: decode() either raises MessageError or returns a message whose encode() is the
input byte for byte (canonical encodings only). Any other exception is a finding.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from qkd.sim import messages as m


def test_one_input(data: bytes) -> None:
    try:
        msg = m.decode(data)
    except m.MessageError:
        return
    if msg.encode() != data:
        raise AssertionError(f"non-canonical encoding accepted: {data.hex()}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
