"""qkd.sim.constants: the message types on the wire and the defaults both parties
share come from one place (issue 10)."""

from __future__ import annotations

import dataclasses

from qkd.sim import constants as c
from qkd.sim import messages as m
from qkd.sim.params import LinkParams
from qkd.sim.protocol import PostParams


def test_message_types_are_the_constants_and_unique() -> None:
    by_name = {k: v for k, v in vars(c).items() if k.startswith("MSG_")}
    assert sorted(by_name.values()) == sorted(m._REGISTRY)  # one class per type, none left
    assert len(set(by_name.values())) == len(by_name)
    # The wire values as they were before the move (a change breaks old peers).
    assert (m.CascadeHello.TYPE, m.ParityReply.TYPE, m.ParityQuery.TYPE,
            m.PrivacyAmp.TYPE) == (1, 4, 6, 16)


def test_link_and_post_processing_defaults_agree() -> None:
    link = {f.name: f.default for f in dataclasses.fields(LinkParams)}
    post = {f.name: f.default for f in dataclasses.fields(PostParams)}
    for name, value in (("eps_sec", c.DEFAULT_EPS_SEC), ("eps_cor", c.DEFAULT_EPS_COR),
                        ("qber_abort", c.DEFAULT_QBER_ABORT),
                        ("frame_bits", c.DEFAULT_FRAME_BITS),
                        ("cascade_variant", c.DEFAULT_CASCADE_VARIANT)):
        assert link[name] == post[name] == value, name
    assert c.DEFAULT_CASCADE_VARIANT in c.CASCADE_VARIANTS
    assert LinkParams().eve in c.EVE_MODES
