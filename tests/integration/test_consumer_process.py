"""The integration tests' consumer processes end with their test."""

from __future__ import annotations

import subprocess
import sys

from tests.integration.consumer_process import STARTED, kill_leftovers


def test_a_process_still_running_after_its_test_is_killed() -> None:
    # GIVEN one started process that has ended and one still running (as after a failed wait)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait(timeout=30)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    STARTED.extend([ended, running])

    # WHEN the test's teardown runs
    killed = kill_leftovers()

    # THEN the running one is gone, the list is empty, and the ended one was left as it was
    assert killed == 1
    assert running.returncode is not None
    assert ended.returncode == 0
    assert STARTED == []
