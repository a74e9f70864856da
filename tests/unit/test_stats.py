"""The consumer's exit summary counts every way an image's features come to exist."""

from __future__ import annotations

import pytest

from consumer.stats import Stats


def test_summary_counts_copies_shards_and_deleted_images() -> None:
    # GIVEN a run that wrote, replaced, copied (--dedupe content), sharded (--layout shards),
    # found existing, and found deleted images
    stats = Stats()
    for outcome, n in {
        "written": 2,
        "replaced": 1,
        "copied": 3,
        "sharded": 4,
        "exists": 5,
        "source-gone": 6,
    }.items():
        for _ in range(n):
            stats.image_done(outcome)

    # WHEN it is summarised, 10 s after it started
    stats.started -= 10
    summary = stats.summary()

    # THEN each outcome is counted under its own name, and the rate counts every image whose
    # features this run made exist (not the skipped or deleted ones)
    assert (summary["images_written"], summary["images_replaced"]) == (2, 1)
    assert (summary["images_copied"], summary["images_sharded"]) == (3, 4)
    assert (summary["images_skipped"], summary["images_source_gone"]) == (5, 6)
    assert summary["images_per_second"] == pytest.approx(1.0, rel=0.02)
