"""The backfill's merge-join with the output listing: pure, no AWS."""

from __future__ import annotations

import random
from collections import Counter

from bottleneck_tools.backfill import SKIP_EXISTS, Listed, in_feature_order, without_features


def _listing(keys: list[str]) -> list[Listed]:
    # S3 lists in UTF-8 byte order, which is code point order for str.
    return [Listed(k) for k in sorted(keys, key=lambda k: k.encode())]


def test_feature_order_handles_keys_that_prefix_one_another() -> None:
    # GIVEN keys where appending ".npy" changes their order ("a.jpg" < "a.jpg (1).jpg" but
    # "a.jpg.npy" > "a.jpg (1).jpg.npy")
    keys = ["a.jpg", "a.jpg (1).jpg", "a.jpg-2.jpg", "a.jpg.jpg", "b.png", "a", "a b"]
    # WHEN the listing is re-sorted
    got = [o.key for o in in_feature_order(_listing(keys))]
    # THEN it is in feature-key order
    assert [k + ".npy" for k in got] == sorted(k + ".npy" for k in keys)


def test_feature_order_on_random_keys() -> None:
    rng = random.Random(7)
    alphabet = "ab .-_(1)é"
    keys = list(
        {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(400)}
    )
    got = [o.key for o in in_feature_order(_listing(keys))]
    assert [k + ".npy" for k in got] == sorted(k + ".npy" for k in keys)


def test_without_features_skips_exactly_the_images_with_a_feature_file() -> None:
    # GIVEN images and the feature files of some of them (plus one orphan feature file)
    images = _listing(["x.jpg", "x.jpg (1).jpg", "y.png", "z z.jpg", "é.jpg"])
    features = sorted(["x.jpg.npy", "z z.jpg.npy", "orphan.jpg.npy", "é.jpg.npy"])
    skipped: Counter[str] = Counter()
    # WHEN the two listings are joined
    kept = [o.key for o in without_features(images, features, skipped)]
    # THEN only images without a feature file remain, and the rest are counted
    assert sorted(kept) == ["x.jpg (1).jpg", "y.png"]
    assert skipped == Counter({SKIP_EXISTS: 3})


def test_without_features_with_no_feature_files_keeps_everything() -> None:
    skipped: Counter[str] = Counter()
    kept = list(without_features(_listing(["a.jpg", "b.jpg"]), [], skipped))
    assert [o.key for o in kept] == ["a.jpg", "b.jpg"]
    assert not skipped
