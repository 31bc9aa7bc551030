"""`HeldOffsets`: the commit positions both stages keep (design §5)."""

from __future__ import annotations

from streams.worker.watermark import HeldOffsets, Partition

P0: Partition = ("samples", 0)
P1: Partition = ("samples", 1)


def test_nothing_held_commits_the_next_offset_to_read() -> None:
    held = HeldOffsets()
    held.consumed(P0, 4)
    held.consumed(P0, 2)  # an older offset never moves the position back
    assert held.positions() == {P0: 5}


def test_the_position_is_the_earliest_offset_any_window_holds() -> None:
    held = HeldOffsets()
    a: dict[Partition, int] = {}
    b: dict[Partition, int] = {}
    for offset, (window, unit) in enumerate([(0, a), (60, b), (0, a), (60, b)]):
        held.consumed(P0, offset)
        held.hold(window, unit, P0, offset)
    assert a == {P0: 0} and b == {P0: 1}
    assert held.positions() == {P0: 0}
    held.release(0)
    assert held.windows() == [60]
    assert held.positions() == {P0: 1}
    held.release(60)
    assert held.positions() == {P0: 4}


def test_a_revoke_rebuilds_the_windows_from_the_units_kept() -> None:
    held = HeldOffsets()
    lost_unit: dict[Partition, int] = {}
    kept_unit: dict[Partition, int] = {}
    held.consumed(P0, 3)
    held.consumed(P1, 9)
    held.hold(0, lost_unit, P0, 3)
    held.hold(0, lost_unit, P1, 5)  # the lost unit also held P1, which this worker keeps
    held.hold(0, kept_unit, P1, 8)
    assert held.positions() == {P0: 3, P1: 5}
    held.revoke({P0}, [(0, kept_unit)])
    assert held.positions() == {P1: 8}
