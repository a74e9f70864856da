"""The stall watch: held work without progress for the timeout, and nothing else, is a stall."""

from __future__ import annotations

import pytest

from consumer.stall import StallWatch

# (busy, progress, now, stalled): successive looks of the worker's loop, timeout 10 s.
Look = tuple[bool, int, float, bool]


@pytest.mark.parametrize(
    "looks",
    [
        pytest.param(
            [(True, 5, 100.0, False), (True, 5, 109.9, False), (True, 5, 110.0, True)],
            id="held work without progress for the timeout",
        ),
        pytest.param(
            [
                (True, 5, 100.0, False),
                (True, 6, 108.0, False),
                (True, 6, 117.0, False),
                (True, 6, 118.0, True),
            ],
            id="progress starts the clock again",
        ),
        pytest.param(
            # idle for an hour (nothing held, no progress either): work that then arrives has
            # the whole timeout
            [
                (False, 0, 0.0, False),
                (False, 0, 3600.0, False),
                (True, 0, 3601.0, False),
                (True, 0, 3610.0, False),
                (True, 0, 3611.0, True),
            ],
            id="an idle spell is no stall",
        ),
        pytest.param(
            [
                (True, 1, 0.0, False),
                (False, 1, 9.0, False),
                (True, 1, 9.5, False),
                (True, 1, 19.0, False),
                (True, 1, 19.5, True),
            ],
            id="a pause between held spells starts the clock again",
        ),
    ],
)
def test_a_stall_is_held_work_without_progress_for_the_timeout(looks: list[Look]) -> None:
    watch = StallWatch(10.0)
    seen = [watch.stalled(busy=busy, progress=n, now=now) for busy, n, now, _ in looks]
    assert seen == [stalled for *_, stalled in looks]
