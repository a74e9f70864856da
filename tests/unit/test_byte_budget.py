"""The budget of encoded bytes: takes wait while it is spent, in arrival order, and a close
wakes every waiter empty-handed."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import pytest

from consumer import byte_budget
from consumer.byte_budget import ByteBudget


def taker(budget: ByteBudget, size: int, got: list[tuple[int, bool]]) -> threading.Thread:
    thread = threading.Thread(target=lambda: got.append((size, budget.take(size))), daemon=True)
    thread.start()
    return thread


def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def waiting(budget: ByteBudget) -> int:
    with budget._lock:
        return len(budget._line)


def test_takes_that_fit_do_not_wait_and_one_that_does_not_waits_for_a_give() -> None:
    # GIVEN a budget of 100 bytes with 70 taken
    budget = ByteBudget(100)
    assert budget.take(70)
    got: list[tuple[int, bool]] = []

    # WHEN 40 more are asked for
    thread = taker(budget, 40, got)
    wait_for(lambda: waiting(budget) == 1)

    # THEN they wait until 10 of the 70 come back, and are then held
    assert got == []
    budget.give(10)
    thread.join(10)
    assert got == [(40, True)]
    assert budget.held == 100


def test_an_image_larger_than_the_whole_budget_goes_through_once_nothing_is_held() -> None:
    # GIVEN a budget of 100 bytes with 1 held
    budget = ByteBudget(100)
    assert budget.take(1)
    got: list[tuple[int, bool]] = []

    # WHEN 500 are asked for
    thread = taker(budget, 500, got)
    wait_for(lambda: waiting(budget) == 1)

    # THEN they are held as soon as the 1 comes back (never starved for being too large)
    budget.give(1)
    thread.join(10)
    assert got == [(500, True)]


def test_a_large_take_is_not_overtaken_by_small_ones_that_arrive_after_it() -> None:
    # GIVEN a budget of 100 with 60 held, and a take of 80 waiting
    budget = ByteBudget(100)
    assert budget.take(60)
    got: list[tuple[int, bool]] = []
    large = taker(budget, 80, got)
    wait_for(lambda: waiting(budget) == 1)

    # WHEN takes of 10 arrive after it (each would fit beside the 60)
    small = [taker(budget, 10, got) for _ in range(3)]
    wait_for(lambda: waiting(budget) == 4)

    # THEN they wait behind it; once the 60 come back the 80 go first, then two of the tens
    # (had the tens gone first, 30 held, the 80 would still be waiting)
    assert got == []
    budget.give(60)
    large.join(10)
    assert not large.is_alive()
    wait_for(lambda: len(got) == 3)
    assert (80, True) in got
    assert budget.held == 100
    assert waiting(budget) == 1
    budget.close()
    for thread in small:
        thread.join(10)
    assert got[-1] == (10, False)


def test_a_close_wakes_every_waiter_empty_handed_and_refuses_later_takes() -> None:
    # GIVEN a spent budget with three takes waiting
    budget = ByteBudget(10)
    assert budget.take(10)
    got: list[tuple[int, bool]] = []
    threads = [taker(budget, 5, got) for _ in range(3)]
    wait_for(lambda: waiting(budget) == 3)

    # WHEN it is closed
    budget.close()
    for thread in threads:
        thread.join(10)

    # THEN each returns False holding nothing, and so does any later take, even one that fits
    assert got == [(5, False)] * 3
    assert budget.held == 10
    budget.give(10)
    assert not budget.take(1)
    assert budget.held == 0


def test_a_try_take_holds_only_what_fits_now_and_never_jumps_the_line() -> None:
    # GIVEN a budget of 100 with 60 held
    budget = ByteBudget(100)
    assert budget.take(60)

    # WHEN 30 bytes are tried, then 30 more, then (with a taker waiting) 5, then after a close
    fits, spent = budget.try_take(30), budget.try_take(30)
    got: list[tuple[int, bool]] = []
    taker(budget, 50, got)
    wait_for(lambda: waiting(budget) == 1)
    behind = budget.try_take(5)
    budget.close()

    # THEN only the first held its bytes, none waited, and the waiter kept its turn
    assert (fits, spent, behind) == (True, False, False)
    assert budget.held == 90
    assert budget.try_take(1) is False


def test_a_give_wakes_the_head_of_the_line_not_every_waiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a spent budget with ten takes of its whole size waiting, its conditions counting
    # how often their waits return (only those the budget makes: threads wait on others)
    wakes: list[int] = []

    class Counted(threading.Condition):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.counted = sys._getframe(1).f_globals["__name__"] == byte_budget.__name__

        def wait(self, timeout: float | None = None) -> bool:
            woken = super().wait(timeout)
            if self.counted:
                wakes.append(1)
            return woken

    monkeypatch.setattr(byte_budget.threading, "Condition", Counted)
    budget = ByteBudget(100)
    assert budget.take(100)
    got: list[tuple[int, bool]] = []
    threads = [taker(budget, 100, got) for _ in range(10)]
    wait_for(lambda: waiting(budget) == 10)

    # WHEN the bytes come back: one of the ten can go on
    budget.give(100)
    wait_for(lambda: got == [(100, True)] and waiting(budget) == 9 and len(wakes) >= 2)
    time.sleep(0.2)  # any other waiter woken would count by now

    # THEN two waits returned: the head's, which took the bytes, and the next one's, which
    # found they do not fit and waits on (one condition for all woke all ten, then nine more)
    assert len(wakes) == 2
    budget.close()
    for thread in threads:
        thread.join(10)
    assert sorted(got) == [(100, False)] * 9 + [(100, True)]


def test_a_budget_needs_at_least_one_byte() -> None:
    with pytest.raises(ValueError, match="at least 1 byte"):
        ByteBudget(0)
