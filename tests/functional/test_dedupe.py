"""``--dedupe content``: identical bytes under another key are copied, not computed."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from bottleneck_contract.features import decode_key
from consumer.dedupe import ContentIndex
from consumer.objects.boto import BotoObjects
from tests.corpus import photo_jpeg
from tests.functional.conftest import Stack
from tests.functional.test_faults import upload_and_send


def feature(stack: Stack, key: str) -> tuple[bytes, dict[str, str]]:
    got = stack.s3.get_object(Bucket=stack.features, Key=f"v1/{key}.npy")
    return got["Body"].read(), got["Metadata"]


def test_a_duplicate_under_another_key_is_copied_not_computed(
    stack: Stack, run_consumer: Callable[..., Any]
) -> None:
    # GIVEN an image whose features exist (computed by a first run with --dedupe content)
    photo = photo_jpeg(96, 72, seed=900)
    upload_and_send(stack, {"albums/a/cat.jpg": photo})
    _, first = run_consumer("--dedupe", "content")
    assert first.summary()["images_computed"] == 1

    # WHEN the same bytes arrive under two other keys, next to a different image
    other = photo_jpeg(96, 72, seed=901)
    upload_and_send(stack, {"backup/cat.jpg": photo, "albums/b/cat.jpg": photo, "dog.jpg": other})
    _, second = run_consumer("--dedupe", "content")

    # THEN only the different image goes through the model; the copies hold the same bytes
    # with their own source metadata, and every file records the SHA-256 of its image
    assert second.summary()["images_computed"] == 1
    assert second.counts["images_copied"] == 2
    body, meta = feature(stack, "albums/a/cat.jpg")
    for key in ("backup/cat.jpg", "albums/b/cat.jpg"):
        copy_body, copy_meta = feature(stack, key)
        assert copy_body == body
        assert decode_key(copy_meta["source-key"]) == key
        assert copy_meta["source-etag"] == hashlib.md5(photo).hexdigest()
        assert copy_meta["fingerprint"] == meta["fingerprint"]
    assert meta["source-sha256"] == hashlib.sha256(photo).hexdigest()
    assert feature(stack, "dog.jpg")[1]["source-sha256"] == hashlib.sha256(other).hexdigest()
    assert stack.dead_letters() == []


def test_without_dedupe_duplicates_are_computed(
    stack: Stack, run_consumer: Callable[..., Any]
) -> None:
    # GIVEN the same bytes under two keys, and no --dedupe
    photo = photo_jpeg(96, 72, seed=902)
    upload_and_send(stack, {"x/1.jpg": photo})
    run_consumer()
    upload_and_send(stack, {"x/2.jpg": photo})

    # WHEN the consumer runs, THEN the duplicate goes through the model, with equal features
    _, stats = run_consumer()
    assert stats.summary()["images_computed"] == 1
    assert stats.counts["images_copied"] == 0
    first = np.load(io.BytesIO(feature(stack, "x/1.jpg")[0]))
    second = np.load(io.BytesIO(feature(stack, "x/2.jpg")[0]))
    np.testing.assert_array_equal(first, second)


@pytest.fixture
def index(stack: Stack) -> ContentIndex:
    return ContentIndex(BotoObjects(stack.s3), stack.features, "v1/", "fp")


def put_feature(stack: Stack, key: str, sha: str, fingerprint: str = "fp") -> None:
    meta = {"fingerprint": fingerprint, "source-sha256": sha, "source-etag": "e"}
    stack.s3.put_object(Bucket=stack.features, Key=key, Body=b"npy", Metadata=meta)


def test_the_index_is_a_hint_never_trusted(stack: Stack, index: ContentIndex) -> None:
    # GIVEN an entry naming a file that matches
    put_feature(stack, "v1/a.jpg.npy", "aa")
    index.record("aa", "v1/a.jpg.npy")
    found = index.find("aa")
    assert found is not None and found.key == "v1/a.jpg.npy"

    # WHEN the file is replaced by other content, or computed with other settings, or deleted
    # THEN the entry no longer finds it
    put_feature(stack, "v1/a.jpg.npy", "bb")
    assert index.find("aa") is None
    put_feature(stack, "v1/a.jpg.npy", "aa", fingerprint="other")
    assert index.find("aa") is None
    stack.s3.delete_object(Bucket=stack.features, Key="v1/a.jpg.npy")
    assert index.find("aa") is None
    assert index.find("never-seen") is None


def test_a_stale_entry_is_replaced_and_a_good_one_kept(stack: Stack, index: ContentIndex) -> None:
    # GIVEN an entry whose file now holds other content
    put_feature(stack, "v1/old.jpg.npy", "cc")
    index.record("cc", "v1/old.jpg.npy")
    put_feature(stack, "v1/old.jpg.npy", "dd")

    # WHEN a new file with that content is recorded, THEN the entry names it
    put_feature(stack, "v1/new.jpg.npy", "cc")
    index.record("cc", "v1/new.jpg.npy")
    found = index.find("cc")
    assert found is not None and found.key == "v1/new.jpg.npy"

    # AND recording a third file while the entry is good keeps the entry as it is
    put_feature(stack, "v1/third.jpg.npy", "cc")
    index.record("cc", "v1/third.jpg.npy")
    found = index.find("cc")
    assert found is not None and found.key == "v1/new.jpg.npy"
