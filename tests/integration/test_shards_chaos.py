"""``--layout shards`` against a moto server, the consumer as a real process: killed (SIGKILL) in
the middle of a run with duplicate deliveries injected, and stopped (SIGTERM) with a partial shard.

Whatever the timing, every image must end in exactly one row once the shards are read by the
dedup rule (``bottleneck-collect``), nothing lost, the queue empty and nothing dead-lettered. A
kill leaves rows committed whose messages were never deleted (they come back and are computed
again: duplicates) and possibly a ``.npy`` without its index (ignored); both are counted and
printed (``pytest -s``), not failed.
"""

from __future__ import annotations

import csv
import io
import random
import signal
import time
from collections import Counter
from pathlib import Path

from bottleneck_contract.messages import ImageRef, encode
from bottleneck_contract.shards import INDEX_SUFFIX, NPY_SUFFIX, decode_index
from bottleneck_tools import collect
from tests.corpus import photo_jpeg
from tests.integration.consumer_process import Endpoint

IMAGES = 500
DUPLICATED = 40  # messages sent twice
SEED = 1515
SHARDS_BEFORE_KILL = 2
ARGS = (
    *("--layout", "shards", "--shard-rows", "64", "--shard-max-seconds", "3"),
    *("--batch-size", "8", "--max-wait-ms", "50", "--max-in-flight", "80"),
    # Short visibility: SIGKILLed work comes back within seconds (the heartbeat keeps live work
    # invisible, shards being filled included).
    *("--visibility-timeout", "5", "--stop-grace", "5", "--decode-workers", "1"),
)


def _send(endpoint: Endpoint, bodies: list[str]) -> None:
    for start in range(0, len(bodies), 10):
        entries = [
            {"Id": str(i), "MessageBody": body} for i, body in enumerate(bodies[start : start + 10])
        ]
        sent = endpoint.sqs.send_message_batch(QueueUrl=endpoint.queue_url, Entries=entries)
        assert not sent.get("Failed")


def _load(endpoint: Endpoint, count: int, rng: random.Random, twice: int = 0) -> list[str]:
    keys = [f"img/{i:04d}.jpg" for i in range(count)]
    for i, key in enumerate(keys):
        endpoint.s3.put_object(Bucket="images", Key=key, Body=photo_jpeg(48, 36, seed=i))
    # At-least-once delivery, injected: some messages are sent twice.
    sent = keys + rng.sample(keys, twice)
    rng.shuffle(sent)
    _send(endpoint, [encode(ImageRef("images", key)) for key in sent])
    return keys


def _listed(endpoint: Endpoint, suffix: str) -> list[str]:
    pages = endpoint.s3.get_paginator("list_objects_v2").paginate(
        Bucket=endpoint.features, Prefix="v1/shards/"
    )
    return [o["Key"] for p in pages for o in p.get("Contents", []) if o["Key"].endswith(suffix)]


def _committed_keys(endpoint: Endpoint) -> list[str]:
    """The source key of every row of every committed shard (duplicates included)."""
    keys: list[str] = []
    for index in _listed(endpoint, INDEX_SUFFIX):
        body = endpoint.s3.get_object(Bucket=endpoint.features, Key=index)["Body"].read()
        keys.extend(row.key for row in decode_index(body))
    return keys


def _wait(condition: object, what: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def _collected(endpoint: Endpoint, directory: Path) -> list[dict[str, str]]:
    out, err = io.StringIO(), io.StringIO()
    options = collect.parse(["s3://feats/v1/", "-o", str(directory), "--no-progress"])
    code = collect.run(options, s3=endpoint.s3, stdout=out, stderr=err)
    assert (code, err.getvalue()) == (0, ""), out.getvalue()
    with (directory / "index.csv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_kill_mid_run_and_duplicates_leave_every_image_in_exactly_one_row(
    moto_server: str, tmp_path: Path
) -> None:
    # GIVEN 500 images, 40 of whose messages are sent twice, and a sharded consumer
    endpoint = Endpoint.create(moto_server, visibility=5, max_receive=10)
    keys = _load(endpoint, IMAGES, random.Random(SEED), twice=DUPLICATED)
    log = tmp_path / "consumers.log"
    started = time.monotonic()
    first = endpoint.start(*ARGS, log=log)

    # WHEN it is killed once a few shards are committed, with more still in flight
    _wait(
        lambda: len(_listed(endpoint, INDEX_SUFFIX)) >= SHARDS_BEFORE_KILL or first.poll(),
        "no shard committed",
        log,
    )
    assert first.poll() is None, log.read_text()[-3000:]
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=30) == -signal.SIGKILL
    before_restart = len(set(_committed_keys(endpoint)))
    # AND a new consumer runs until the queue has been idle (the killed one's messages come
    # back once their visibility runs out, as suspects: each runs alone, in its own shard)
    second = endpoint.start(*ARGS, "--idle-exit", "8", log=log)
    assert second.wait(timeout=240) == 0, log.read_text()[-3000:]
    elapsed = time.monotonic() - started

    # THEN the queue is empty and nothing was dead-lettered
    assert endpoint.counts() == (0, 0)
    assert endpoint.counts(endpoint.dlq_url) == (0, 0)
    # AND read by the dedup rule, every image is in exactly one row: nothing lost, no doubles
    rows = _collected(endpoint, tmp_path / "dataset")
    assert len(rows) == IMAGES
    assert sorted(row["source_key"] for row in rows) == keys
    raw = Counter(_committed_keys(endpoint))
    assert set(raw) == set(keys)
    orphans = {k[: -len(NPY_SUFFIX)] for k in _listed(endpoint, NPY_SUFFIX)} - {
        k[: -len(INDEX_SUFFIX)] for k in _listed(endpoint, INDEX_SUFFIX)
    }
    print(
        f"\nshards chaos: {IMAGES} images, {IMAGES + DUPLICATED} messages ({DUPLICATED} sent "
        f"twice), killed after {before_restart} images were committed, "
        f"{len(_listed(endpoint, INDEX_SUFFIX))} shards, {sum(raw.values())} rows committed "
        f"({sum(raw.values()) - IMAGES} duplicates, {sum(1 for n in raw.values() if n > 1)} "
        f"images twice or more), {len(orphans)} .npy without index, {elapsed:.0f} s"
    )
    assert 0 < before_restart < IMAGES


def test_a_graceful_stop_writes_the_partial_shard_and_exits_0(
    moto_server: str, tmp_path: Path
) -> None:
    # GIVEN a consumer whose shards fill only at 1,000 rows or after an hour, and 50 messages
    endpoint = Endpoint.create(moto_server, visibility=30)
    keys = _load(endpoint, 50, random.Random(SEED))
    log = tmp_path / "consumer.log"
    consumer = endpoint.start(
        *("--layout", "shards", "--shard-rows", "1000", "--shard-max-seconds", "3600"),
        *("--batch-size", "8", "--max-wait-ms", "50", "--stop-grace", "20"),
        log=log,
    )
    # WHEN every message is received (the first 20, received carefully after the start, may be
    # in small shards already; the rest are held for the shard being filled)
    _wait(lambda: endpoint.counts()[0] == 0 or consumer.poll() is not None, "not received", log)
    assert consumer.poll() is None, log.read_text()[-3000:]
    held = len(keys) - len(_committed_keys(endpoint))
    assert held > 0
    # AND it is stopped (SIGTERM)
    consumer.send_signal(signal.SIGTERM)
    # THEN it exits 0 with every image in a shard and every message deleted
    assert consumer.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert sorted(_committed_keys(endpoint)) == keys
    assert endpoint.counts() == (0, 0)
