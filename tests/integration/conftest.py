"""Integration fixtures: no consumer process outlives its test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.consumer_process import kill_leftovers


@pytest.fixture(autouse=True)
def _no_consumer_outlives_its_test() -> Iterator[None]:
    yield
    kill_leftovers()
