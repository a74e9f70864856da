"""``--layout shards``: the options, the shard writer's rules, and the consumer end to end in moto.

A shard is two create-only PUTs for many images: the rows, then the index that commits them. Its
images are resolved only once both landed, so a failed flush releases their messages (computed
again later) and a reader never sees a half-written shard.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bottleneck_contract.messages import ImageRef, encode
from bottleneck_contract.shards import (
    INDEX_SUFFIX,
    NPY_SUFFIX,
    ShardIndex,
    ShardKey,
    ShardRow,
    decode_index,
    encode_index,
    newest_rows,
    parse_shard_key,
    shard_keys,
)
from bottleneck_tools import collect
from consumer import cli
from consumer.aws import Clients
from consumer.config import Config
from consumer.errors import ConfigError, Failure
from consumer.features import FeatureSettings
from consumer.inflight import InFlight
from consumer.objects import ConditionFailed, Existing, Fetched
from consumer.objects.boto import BotoObjects
from consumer.preprocess import InputSpec
from consumer.runtime import build_runtime
from consumer.settle import Action, Verdict
from consumer.stages.shards import SHARD_MAX_BYTES, ShardWriter, writer_name
from consumer.stats import Stats
from consumer.work import ImageTask, Message
from consumer.worker import Worker
from tests.corpus import photo_jpeg
from tests.faults import client_error
from tests.functional.conftest import Stack, consumer_config

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/work"
FP = "0123456789abcdef"
SETTINGS = FeatureSettings(
    model="test_resnet",
    weights="random:seed=0",
    pool="avg",
    spec=InputSpec((3, 32, 32), "bilinear", (0.5,) * 3, (0.5,) * 3, 0.875, "center"),
    dtype="float16",
    precision="fp32",
    decode="pil",
    head="drop",
    normalize="none",
    libraries="pillow=11.0 timm=1.0 torch=2.9",
)


# ------------------------------------------------------------------------------ configuration


def config(*extra: str) -> Config:
    return Config.from_args(["--queue-url", QUEUE, "--output", "s3://feats/v1/", *extra], {})


def test_files_stay_the_default_and_shards_raise_the_cap_by_a_shard() -> None:
    assert config().layout == "files"
    assert config().in_flight_limit == 3 * 64 + 128 + 128
    sharded = config("--layout", "shards")
    assert (sharded.shard_rows, sharded.shard_max_seconds) == (10_000, 300.0)
    # A shard holds its images until it is written: the cap is a shard plus a pipeline.
    assert sharded.in_flight_limit == 10_000 + 3 * 64 + 128 + 128
    from_env = Config.from_args(
        ["--queue-url", QUEUE, "--output", "s3://feats/v1/"],
        {"BOTTLENECK_LAYOUT": "shards", "BOTTLENECK_SHARD_ROWS": "500"},
    )
    assert (from_env.layout, from_env.in_flight_limit) == ("shards", 500 + 3 * 64 + 128 + 128)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--existing-check", "head"), "--existing-check head: not with --layout shards"),
        (("--orphan-check", "head"), "--orphan-check head: not with --layout shards"),
        (("--dedupe", "content"), "--dedupe content: not with --layout shards"),
        (("--shard-max-seconds", "0"), "--shard-max-seconds: must be above 0"),
        (("--shard-max-seconds", "7200"), "at most 3600"),
        (("--shard-rows", "100", "--max-in-flight", "120"), "--max-in-flight 120: with --layout"),
        (("--shard-rows", "119900"), "--shard-rows 119900: a shard's messages stay in flight"),
        (("--max-in-flight", "130000"), "--max-in-flight 130000: SQS allows 120,000"),
        (("--shard-rows", "0"), "--shard-rows: must be a positive integer"),
    ],
)
def test_what_cannot_work_with_shards_is_one_line_naming_the_option(
    extra: tuple[str, ...], needle: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        config("--layout", "shards", *extra)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_shard_options_without_shards_are_refused() -> None:
    with pytest.raises(ConfigError, match="--shard-rows: only with --layout shards"):
        config("--shard-rows", "100")


def test_the_command_line_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--queue-url",
        QUEUE,
        "--output",
        "s3://feats/v1/",
        "--layout",
        "shards",
        "--dedupe",
        "content",
    ]
    assert cli.main(argv) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dedupe content: not with --layout shards" in err


# ------------------------------------------------------------------------------ the writer


class Store:
    """An in-memory object store with the ObjectClient surface the writer uses; ``fail`` names
    keys (by suffix) whose next PUT raises what S3 sends for an internal error."""

    name = "memory"

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, dict[str, str], str]] = {}
        self.puts: list[str] = []
        self.fail: list[str] = []

    def put(
        self,
        bucket: str,
        key: str,
        body: bytes,
        *,
        metadata: Mapping[str, str],
        content_type: str,
        if_match: str | None = None,
    ) -> str:
        assert if_match is None, "shards are written create-only"
        self.puts.append(key)
        for suffix in list(self.fail):
            if key.endswith(suffix):
                self.fail.remove(suffix)
                raise client_error("InternalError", 500, "PutObject")
        if key in self.objects:
            raise ConditionFailed(key)
        self.objects[key] = (bytes(body), dict(metadata), content_type)
        return f"etag-{len(self.objects)}"

    def get(self, bucket: str, key: str, *, max_bytes: int, on_size: Any = None) -> Fetched:
        raise AssertionError("the writer reads nothing")

    def head(self, bucket: str, key: str) -> Existing | None:
        raise AssertionError("the writer looks for nothing")

    def delete(self, bucket: str, key: str, *, if_match: str) -> bool:
        raise AssertionError("the writer deletes nothing")

    def copy(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("the writer copies nothing")

    def shards(self) -> list[tuple[np.ndarray, list[ShardRow], dict[str, str]]]:
        """Every committed shard (an index and its .npy), in key order."""
        out = []
        for key in sorted(self.objects):
            if key.endswith(INDEX_SUFFIX):
                index, meta, _ = self.objects[key]
                npy = self.objects[key[: -len(INDEX_SUFFIX)] + NPY_SUFFIX][0]
                out.append(
                    (np.load(io.BytesIO(npy), allow_pickle=False), decode_index(index), meta)
                )
        return out


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """A writer over an in-memory store, a real in-flight registry and its settled actions."""

    def __init__(
        self,
        *,
        shard_rows: int = 3,
        max_seconds: float = 60.0,
        flush_partial: Callable[[], bool] = lambda: False,
        shape: tuple[int, ...] = (4,),
    ) -> None:
        self.store = Store()
        self.actions: list[Action] = []
        self.inflight = InFlight(100, self.actions.append)
        self.clock = Clock()
        self.writer = ShardWriter(
            objects=self.store,
            inflight=self.inflight,
            stats=Stats(),
            settings=SETTINGS,
            fingerprint=FP,
            feature_shape=shape,
            output_bucket="feats",
            output_prefix="v1/",
            shard_rows=shard_rows,
            max_seconds=max_seconds,
            writer="w-1-abc",
            flush_partial=flush_partial,
            clock=self.clock,
        )
        self.count = 0

    def image(self) -> ImageTask:
        """A held message with one image, its features computed (row i is all i's)."""
        i = self.count
        self.count += 1
        message = Message(f"m{i}", f"h{i}", "{}", 1, 0.0, 60.0)
        task = ImageTask(message=message, ref=ImageRef("images", f"k/{i}.jpg"))
        task.source_etag, task.content_sha256 = f"e{i}", f"{i:064x}"
        task.features = np.full(self.writer.row_shape, i + 0.5, np.float32)
        message.images = [task]
        assert self.inflight.register(message)
        return task

    def verdicts(self) -> Counter[Verdict]:
        return Counter(action.verdict for action in self.actions)


def test_a_full_shard_is_written_rows_first_then_its_index_and_only_then_deleted() -> None:
    rig = Rig(shard_rows=3)
    tasks = [rig.image() for _ in range(4)]
    for task in tasks[:2]:
        rig.writer.submit(task)
    assert rig.writer.wait_written(10)
    assert rig.store.puts == [] and rig.actions == []  # two rows: held, nothing written

    rig.writer.submit(tasks[2])  # the third fills the shard
    rig.writer.submit(tasks[3])
    assert rig.writer.wait_written(10)

    keys = shard_keys("v1/", FP, "w-1-abc", 0)
    assert rig.store.puts == [keys.npy_key, keys.index_key]  # the index, the commit, last
    [(array, rows, meta)] = rig.store.shards()
    assert array.shape == (3, 4) and array.dtype == np.float16  # the feature dtype
    np.testing.assert_array_equal(array[:, 0], [0.5, 1.5, 2.5])
    assert [(r.row, r.bucket, r.key, r.etag, r.fingerprint) for r in rows] == [
        (i, "images", f"k/{i}.jpg", f"e{i}", FP) for i in range(3)
    ]
    assert rows[1].source_sha256 == f"{1:064x}"
    assert meta["rows"] == "3" and meta["shape"] == "4" and meta["fingerprint"] == FP
    assert meta["model"] == "test_resnet" and meta["dtype"] == "float16"
    assert not any(k.startswith("source-") for k in meta)
    # Its three messages are deleted; the fourth image waits in the next shard.
    assert rig.verdicts() == {Verdict.DELETE: 3}
    assert [t.outcome for t in tasks] == ["sharded"] * 3 + [None]
    assert tasks[3].message.pending == 1


def test_a_partial_shard_is_written_once_its_first_row_is_old_enough() -> None:
    rig = Rig(shard_rows=10, max_seconds=30)
    rig.writer.submit(rig.image())
    rig.clock.now += 29.9
    rig.writer.tick()
    assert rig.writer.wait_written(10) and rig.store.puts == []
    rig.writer.submit(rig.image())
    rig.clock.now += 0.1  # the first row is 30 s old
    rig.writer.tick()
    assert rig.writer.wait_written(10)
    [(array, rows, _)] = rig.store.shards()
    assert len(array) == len(rows) == 2
    assert rig.verdicts() == {Verdict.DELETE: 2}


def test_an_early_flush_waits_for_every_image_on_its_way() -> None:
    # GIVEN a writer asked to write partial shards early (a stop, careful receives)
    rig = Rig(shard_rows=10, flush_partial=lambda: True)
    first, second = rig.image(), rig.image()
    for task in (first, second):
        rig.writer.track(task)  # both sent down the pipeline
    rig.writer.submit(first)
    # WHEN the second is still on its way THEN the shard is not written
    rig.writer.tick()
    assert rig.writer.wait_written(10) and rig.store.puts == []
    assert not rig.writer.drained() and not rig.writer.holds_all()
    # WHEN it arrives THEN one shard holds both
    rig.writer.submit(second)
    assert rig.writer.holds_all()
    rig.writer.tick()
    assert rig.writer.wait_written(10)
    [(_, rows, _)] = rig.store.shards()
    assert [r.key for r in rows] == ["k/0.jpg", "k/1.jpg"]


def test_an_image_that_fails_on_its_way_is_not_waited_for() -> None:
    rig = Rig(shard_rows=10, flush_partial=lambda: True)
    good, bad = rig.image(), rig.image()
    rig.writer.track(good)
    rig.writer.track(bad)
    rig.writer.submit(good)
    rig.inflight.failed(bad, Failure("truncated", "cut short", permanent=True))
    rig.writer.tick()
    assert rig.writer.wait_written(10)
    assert len(rig.store.shards()) == 1


def test_ticks_walk_the_images_in_flight_only_for_a_partial_flush_or_once_a_second() -> None:
    # GIVEN a writer not asked for partial shards, with failed images on their way (which only
    # the walk prunes), and a count of the walks
    partial = False
    rig = Rig(shard_rows=10, flush_partial=lambda: partial)
    for _ in range(3):
        task = rig.image()
        rig.writer.track(task)
        rig.inflight.failed(task, Failure("truncated", "cut short", permanent=True))
    walks = 0
    drained = rig.writer._drained

    def counted() -> bool:
        nonlocal walks
        walks += 1
        return drained()

    rig.writer._drained = counted  # type: ignore[method-assign]

    # WHEN it ticks twenty times a second for two seconds
    for _ in range(40):
        rig.writer.tick()
        rig.clock.now += 0.05
    slow_walks = walks
    pruned = not rig.writer._upstream

    # THEN it walked about once a second (not forty times), and the failed images are pruned;
    # asked for partial shards, it walks at every tick
    assert slow_walks in (2, 3)
    assert pruned
    partial, walks = True, 0
    for _ in range(5):
        rig.writer.tick()
    assert walks == 5


def test_close_writes_the_partial_shard_and_takes_no_row_after() -> None:
    rig = Rig(shard_rows=10)
    rig.writer.submit(rig.image())
    rig.writer.submit(rig.image())
    assert rig.writer.close(timeout=10)
    late = rig.image()
    rig.writer.submit(late)  # computed after the stop's flush: its message is released instead
    [(_, rows, _)] = rig.store.shards()
    assert len(rows) == 2
    assert late.outcome is None and late.message.pending == 1
    assert rig.verdicts() == {Verdict.DELETE: 2}


def test_a_failed_index_put_releases_the_shards_messages_and_commits_nothing() -> None:
    rig = Rig(shard_rows=2)
    rig.store.fail.append(INDEX_SUFFIX)
    tasks = [rig.image() for _ in range(2)]
    for task in tasks:
        rig.writer.submit(task)
    assert rig.writer.wait_written(10)
    # The rows are there, the commit is not: readers see no shard.
    assert list(rig.store.objects) == [shard_keys("v1/", FP, "w-1-abc", 0).npy_key]
    assert rig.store.shards() == []
    # Every message is released (never deleted), as a transient failure
    assert rig.verdicts() == {Verdict.RELEASE: 2}
    assert all(t.failure is not None and not t.failure.permanent for t in tasks)
    assert rig.writer.flushes_failed == 1


def test_a_taken_name_moves_to_the_next_sequence_number() -> None:
    rig = Rig(shard_rows=1)
    taken = shard_keys("v1/", FP, "w-1-abc", 0).npy_key
    rig.store.objects[taken] = (b"someone else's", {}, "")
    rig.writer.submit(rig.image())
    assert rig.writer.wait_written(10)
    assert shard_keys("v1/", FP, "w-1-abc", 1).index_key in rig.store.objects
    assert rig.store.objects[taken][0] == b"someone else's"
    assert rig.verdicts() == {Verdict.DELETE: 1}


def test_a_shard_of_big_rows_is_capped_by_size() -> None:
    rows_fitting = SHARD_MAX_BYTES // (2048 * 7 * 7 * 2)
    rig = Rig(shard_rows=10_000, shape=(2048, 7, 7))
    assert rig.writer.capacity == rows_fitting < 10_000


def test_writer_names_are_unique_and_fit_a_shard_key() -> None:
    names = {writer_name() for _ in range(50)}
    assert len(names) == 50
    for name in names:
        key = shard_keys("p/", FP, name, 7)
        assert key.name == f"{name}-000007"
        assert parse_shard_key("p/", key.npy_key) == key
        assert parse_shard_key("p/", key.index_key) == ShardKey("p/", FP, key.name, is_index=True)


def test_the_newest_shard_holds_an_images_row() -> None:
    def index(name: str, modified: int, *rows: tuple[str, str]) -> ShardIndex:
        key = parse_shard_key("p/", f"p/shards/{FP}/{name}{INDEX_SUFFIX}")
        assert key is not None
        stamp = datetime.fromtimestamp(modified, tz=UTC)
        return ShardIndex(
            key, stamp, tuple(ShardRow(i, "b", k, e, FP) for i, (k, e) in enumerate(rows))
        )

    old = index("w-000009", 100, ("a.jpg", "e1"), ("b.jpg", "e1"))
    new = index("w-000001", 200, ("a.jpg", "e2"))
    tie = index("x-000000", 200, ("b.jpg", "e1"), ("b.jpg", "e3"))
    chosen = newest_rows([tie, new, old])
    # Later LastModified wins over key order; at a tie the greater key; in a shard the last row.
    assert chosen[("b", "a.jpg", FP)][1].etag == "e2"
    assert chosen[("b", "b.jpg", FP)] == (tie, tie.rows[1])


def test_index_lines_round_trip_and_a_damaged_one_is_refused() -> None:
    rows = [
        ShardRow(0, "b", "фото/猫 1.jpg", "e", FP, "ab" * 32),
        ShardRow(1, "b", 'a"b\n.jpg', "f", FP),
    ]
    data = encode_index(rows)
    assert data.count(b"\n") == 2 and "фото/猫 1.jpg".encode() in data  # real keys, UTF-8
    assert decode_index(data) == rows
    assert json.loads(data.splitlines()[1]) == {
        "row": 1,
        "bucket": "b",
        "key": 'a"b\n.jpg',
        "etag": "f",
        "fingerprint": FP,
    }
    for damaged in (data[:-5], data.replace(b'"row":1', b'"row":2'), b"{}\n", b"not json\n"):
        with pytest.raises(ValueError, match="line"):
            decode_index(damaged)


# ------------------------------------------------------------------------------ end to end


def upload(stack: Stack, count: int) -> list[str]:
    keys = [f"photos/{i:03d}.jpg" for i in range(count)]
    for i, key in enumerate(keys):
        stack.s3.put_object(Bucket=stack.images, Key=key, Body=photo_jpeg(64, 48, seed=i))
    return keys


def count_requests(stack: Stack) -> Counter[str]:
    """S3 and SQS calls by operation, from now on."""
    calls: Counter[str] = Counter()

    def seen(event_name: str, **_: Any) -> None:
        calls[event_name.rsplit(".", 1)[-1]] += 1

    stack.s3.meta.events.register("before-call.s3", seen)
    stack.sqs.meta.events.register("before-call.sqs", seen)
    return calls


def committed(stack: Stack, prefix: str) -> list[ShardRow]:
    """Every row of every committed shard under ``prefix`` (duplicates included)."""
    rows = []
    for key in stack.feature_keys(f"{prefix}shards/"):
        if key.endswith(INDEX_SUFFIX):
            body = stack.s3.get_object(Bucket=stack.features, Key=key)["Body"].read()
            rows.extend(decode_index(body))
    return rows


def test_a_sharded_run_collects_to_exactly_what_per_image_files_collect(
    stack: Stack, run_consumer: Callable[..., Any], tmp_path: Path
) -> None:
    # GIVEN 23 images, three of whose messages are sent twice (at-least-once delivery)
    keys = upload(stack, 23)
    bodies = [encode(ImageRef(stack.images, key)) for key in keys]
    twice = bodies[3:6]
    # WHEN one consumer writes per-image files under v1/ and another shards under v2/, from the
    # same messages, seed and settings (one image per batch: the same numbers whatever the timing)
    stack.send(*bodies, *twice)
    files_calls = count_requests(stack)
    run_consumer("--batch-size", "1")
    files_calls = Counter(files_calls)
    stack.send(*bodies, *twice)
    shard_calls = count_requests(stack)
    _, stats = run_consumer(
        *("--batch-size", "1", "--output", f"s3://{stack.features}/v2/"),
        *("--layout", "shards", "--shard-rows", "8", "--shard-max-seconds", "60"),
    )
    shard_calls = Counter(shard_calls)

    # THEN the shards hold every image (the repeats twice at most), and the queue is empty
    rows = committed(stack, "v2/")
    assert Counter(r.key for r in rows).keys() == set(keys)
    assert len(rows) <= len(keys) + len(twice)
    assert stack.depth() == 0 and stack.dead_letters() == []
    assert stats.counts["images_sharded"] == len(rows)
    # AND collecting either gives the same rows, in the same order, bit for bit
    code_a, _, err_a = _collect(stack, "s3://feats/v1/", tmp_path / "files")
    code_b, out_b, err_b = _collect(stack, "s3://feats/v2/", tmp_path / "shards")
    assert (code_a, err_a, code_b, err_b) == (0, "", 0, "")
    assert f"collected {len(keys)} rows" in out_b
    features = (tmp_path / "files" / "features.npy", tmp_path / "shards" / "features.npy")
    assert features[0].read_bytes() == features[1].read_bytes()
    # (feature keys name the prefix: v1/photos/000.jpg.npy, and for the shards' rows the key
    # their per-image file would have, v2/photos/000.jpg.npy)
    index = (tmp_path / "files" / "index.csv").read_text().replace(",v1/photos/", ",v2/photos/")
    assert index == (tmp_path / "shards" / "index.csv").read_text()
    assert index.count("\n") == len(keys) + 1
    manifests = [
        json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("files", "shards")
    ]
    assert manifests[1].pop("layout") == "shards" and manifests[0].pop("layout") == "files"
    assert manifests[1].pop("source") == "s3://feats/v2/"
    assert manifests[0].pop("source") == "s3://feats/v1/"
    assert manifests[0] == manifests[1]
    # AND the shards took two PUTs per shard, where files took one per image
    shards = len([k for k in stack.feature_keys("v2/shards/") if k.endswith(INDEX_SUFFIX)])
    messages = len(bodies) + len(twice)
    assert files_calls["PutObject"] == messages  # a repeat finds its file with a 412
    assert shard_calls["PutObject"] == 2 * shards < files_calls["PutObject"]
    print(
        f"\nrequests per image ({len(keys)} images, {messages} messages): "
        + "; ".join(
            f"{name}: " + ", ".join(f"{op} {n / len(keys):.2f}" for op, n in sorted(calls.items()))
            for name, calls in (("files", files_calls), ("shards", shard_calls))
        )
    )


def _collect(stack: Stack, source: str, directory: Path, *extra: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    options = collect.parse([source, "-o", str(directory), "--no-progress", *extra])
    return collect.run(options, s3=stack.s3, stdout=out, stderr=err), out.getvalue(), err.getvalue()


class FailFirstIndex(BotoObjects):
    """The boto3 object client whose first PUT of a shard index fails for good (retries spent)."""

    def __init__(self, s3: Any) -> None:
        super().__init__(s3)
        self.failed: list[str] = []

    def put(self, bucket: str, key: str, body: bytes, **kwargs: Any) -> str:
        if key.endswith(INDEX_SUFFIX) and not self.failed:
            self.failed.append(key)
            raise client_error("InternalError", 500, "PutObject")
        return super().put(bucket, key, body, **kwargs)


def test_a_failed_flush_is_computed_again_and_its_orphan_rows_are_ignored(
    stack: Stack, tmp_path: Path
) -> None:
    # GIVEN images whose first shard's index PUT fails
    keys = upload(stack, 10)
    stack.send(*(encode(ImageRef(stack.images, key)) for key in keys))
    cfg = consumer_config(
        stack, "--layout", "shards", "--shard-rows", "4", "--shard-max-seconds", "60"
    )
    objects = FailFirstIndex(stack.s3)
    runtime = build_runtime(cfg, Clients(stack.s3, stack.sqs), objects=objects)
    # WHEN the consumer runs until idle (it waits for the messages it released to come back)
    worker = Worker(runtime)
    assert worker.run() == 0
    # THEN the failed shard's .npy is there without its index, and nothing is lost
    [failed] = objects.failed
    orphan = failed[: -len(INDEX_SUFFIX)] + NPY_SUFFIX
    listed = stack.feature_keys("v1/shards/")
    assert orphan in listed and failed not in listed
    rows = committed(stack, "v1/")
    assert sorted(r.key for r in rows) == keys  # each once: the failed rows written again
    lost = stack.s3.get_object(Bucket=stack.features, Key=orphan)["Body"].read()
    assert worker.stats.summary()["retried_by_code"] == {
        "aws-error": len(np.load(io.BytesIO(lost), allow_pickle=False))
    }
    assert stack.depth() == 0 and stack.dead_letters() == []
    # AND collect ignores the orphan
    code, out, err = _collect(stack, "s3://feats/v1/", tmp_path)
    assert (code, err) == (0, "")
    assert f"collected {len(keys)} rows" in out
