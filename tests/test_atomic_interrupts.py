"""atomic.no_interrupts / defer_interrupt: an interrupt inside the block is held and raised once,
when the outermost block ends; outside a block it is not deferred."""

from __future__ import annotations

import pytest

from templatetool.atomic import defer_interrupt, no_interrupts


def test_interrupt_deferred_to_the_outermost_block() -> None:
    first, second = KeyboardInterrupt("first"), KeyboardInterrupt("second")
    assert defer_interrupt(first) is False  # not in a block: the handler raises it now
    reached = []
    with pytest.raises(KeyboardInterrupt) as ex, no_interrupts():
        with no_interrupts():
            assert defer_interrupt(first) is True
        reached.append("inner ended, nothing raised")
        assert defer_interrupt(second) is True  # only the first one is kept
        reached.append("outer body done")
    assert ex.value is first
    assert reached == ["inner ended, nothing raised", "outer body done"]
    with no_interrupts():  # the pending one was cleared
        pass
    assert defer_interrupt(first) is False
