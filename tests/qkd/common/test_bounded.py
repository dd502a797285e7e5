"""qkd.common.bounded.BoundedSet: forgets the oldest entries past its limit."""

from __future__ import annotations

import pytest

from qkd.common.bounded import BoundedSet


def test_keeps_the_newest_and_re_adding_refreshes() -> None:
    s = BoundedSet(limit=3)
    s.update(["a", "b", "c"])
    s.update(["a"])  # "a" is now the newest; "b" the oldest
    s.update(["d"])
    assert list(s) == ["c", "a", "d"] and "b" not in s and len(s) == 3


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit"):
        BoundedSet(limit=0)
