"""The stall watch: held work without progress for the timeout, and nothing else, is a stall."""

from __future__ import annotations

from consumer.stall import StallWatch


def test_held_work_without_progress_for_the_timeout_is_a_stall() -> None:
    watch = StallWatch(10.0)
    assert not watch.stalled(busy=True, progress=5, now=100.0)
    assert not watch.stalled(busy=True, progress=5, now=109.9)
    assert watch.stalled(busy=True, progress=5, now=110.0)


def test_progress_starts_the_clock_again() -> None:
    watch = StallWatch(10.0)
    assert not watch.stalled(busy=True, progress=5, now=100.0)
    assert not watch.stalled(busy=True, progress=6, now=108.0)
    assert not watch.stalled(busy=True, progress=6, now=117.0)
    assert watch.stalled(busy=True, progress=6, now=118.0)


def test_an_idle_spell_is_no_stall_and_the_clock_starts_when_work_arrives() -> None:
    # GIVEN a worker idle for an hour (nothing held, so no progress either)
    watch = StallWatch(10.0)
    assert not watch.stalled(busy=False, progress=0, now=0.0)
    assert not watch.stalled(busy=False, progress=0, now=3600.0)

    # WHEN work arrives, THEN it has the whole timeout from then on
    assert not watch.stalled(busy=True, progress=0, now=3601.0)
    assert not watch.stalled(busy=True, progress=0, now=3610.0)
    assert watch.stalled(busy=True, progress=0, now=3611.0)


def test_a_pause_between_held_spells_starts_the_clock_again() -> None:
    watch = StallWatch(10.0)
    assert not watch.stalled(busy=True, progress=1, now=0.0)
    assert not watch.stalled(busy=False, progress=1, now=9.0)
    assert not watch.stalled(busy=True, progress=1, now=9.5)
    assert not watch.stalled(busy=True, progress=1, now=19.0)
    assert watch.stalled(busy=True, progress=1, now=19.5)
