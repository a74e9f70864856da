"""``bottleneck-reconcile --fix``: orphans deleted, missing and stale images enqueued with the
messages ``bottleneck-enqueue`` sends, and the consumer (in-process, a tiny timm model) leaving one
current feature file per image and none other."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from bottleneck_contract.messages import ImageRef, encode
from bottleneck_tools import enqueue, reconcile, reconcile_fix
from bottleneck_tools.backfill import Listed
from tests.corpus import photo_jpeg
from tests.fakes import put_feature, put_image
from tests.functional.conftest import Stack

SOURCE = "s3://images/photos/"
OUTPUT = "s3://feats/v1/"  # where the functional consumer writes
OLD_FINGERPRINT = "0" * 16


def fix(stack: Stack, *extra: str, s3: Any = None, sqs: Any = None) -> tuple[int, str, str]:
    """Run ``bottleneck-reconcile SOURCE --output OUTPUT --fix --queue-url <work> *extra``."""
    argv = [SOURCE, "--output", OUTPUT, "--fix", *extra]
    if "--dry-run" not in extra:
        argv += ["--queue-url", stack.queue_url]
    out, err = io.StringIO(), io.StringIO()
    code = reconcile.run(
        reconcile.parse(argv, {}),
        s3=s3 or stack.s3,
        sqs=None if "--dry-run" in extra else (sqs or stack.sqs),
        stdout=out,
        stderr=err,
        sleep=lambda _: None,
    )
    return code, out.getvalue(), err.getvalue()


def summary_of(out: str) -> dict[str, Any]:
    return dict(json.loads(out.splitlines()[-1])["summary"])


def drain(stack: Stack) -> list[str]:
    """Every message body on the work queue (moto delivers each message once)."""
    bodies: list[str] = []
    while got := stack.sqs.receive_message(QueueUrl=stack.queue_url, MaxNumberOfMessages=10).get(
        "Messages"
    ):
        bodies += [m["Body"] for m in got]
    return bodies


def etag_of(stack: Stack, key: str, bucket: str = "images") -> str:
    return str(stack.s3.head_object(Bucket=bucket, Key=key)["ETag"]).strip('"')


def capture_sends(stack: Stack) -> tuple[list[str], Callable[[], None]]:
    """The bodies of every SendMessageBatch entry from now on, and a way to stop listening."""
    bodies: list[str] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        bodies.extend(entry["MessageBody"] for entry in params["Entries"])

    event = "provide-client-params.sqs.SendMessageBatch"
    stack.sqs.meta.events.register(event, record)
    return bodies, lambda: stack.sqs.meta.events.unregister(event, record)


@pytest.fixture
def drifted(stack: Stack) -> Stack:
    """GIVEN images and feature files with every mismatch (no consumer run: the tools never
    decode): current files, a missing image, a re-uploaded one, one of other settings, one
    stale both ways, and two orphans."""
    for name in ["ok.jpg", "a.jpg (1).jpg", "ünï cödé.jpg"]:
        etag = put_image(stack.s3, f"photos/{name}")
        put_feature(stack.s3, "v1/", f"photos/{name}", etag=etag)
    put_image(stack.s3, "photos/new.jpg")
    old = put_image(stack.s3, "photos/changed.jpg", b"first upload")
    put_image(stack.s3, "photos/changed.jpg", b"second upload")
    put_feature(stack.s3, "v1/", "photos/changed.jpg", etag=old)
    etag = put_image(stack.s3, "photos/oldmodel.jpg")
    put_feature(stack.s3, "v1/", "photos/oldmodel.jpg", etag=etag, fingerprint=OLD_FINGERPRINT)
    put_image(stack.s3, "photos/both.jpg", b"now")
    put_feature(stack.s3, "v1/", "photos/both.jpg", etag="then", fingerprint=OLD_FINGERPRINT)
    put_feature(stack.s3, "v1/", "photos/gone.jpg", etag="e")
    put_feature(stack.s3, "v1/", "photos/gone too.jpg", etag="e")
    return stack


# Both ways the consumer can find a file out of date: at write time (a conditional put, then a
# HEAD on the conflict) and before fetching (a HEAD against the message's ETag).
@pytest.mark.parametrize("existing_check", ["write", "head"])
def test_fix_then_the_consumer_leaves_one_current_feature_file_per_image(
    stack: Stack, run_consumer: Callable[..., Any], existing_check: str
) -> None:
    # GIVEN feature files the consumer wrote for seven images
    images = {f"photos/{n}.jpg": photo_jpeg(64, 48, seed=i) for i, n in enumerate("abcdefg")}
    for key, data in images.items():
        stack.s3.put_object(Bucket=stack.images, Key=key, Body=data)
    stack.send(*(encode(ImageRef(stack.images, key)) for key in images))
    runtime, _ = run_consumer()
    fingerprint = runtime.fingerprint
    # AND then drift: b re-uploaded, c's file made with other settings, d's file stale both
    # ways, g's image deleted, an orphan whose image never was, and a new image (the consumer's
    # fingerprint stays the majority: a, b, e and f)
    stack.s3.put_object(Bucket=stack.images, Key="photos/b.jpg", Body=photo_jpeg(64, 48, seed=9))
    put_feature(stack.s3, "v1/", "photos/c.jpg", etag=etag_of(stack, "photos/c.jpg"),
                fingerprint=OLD_FINGERPRINT)  # fmt: skip
    stack.s3.put_object(Bucket=stack.images, Key="photos/d.jpg", Body=photo_jpeg(64, 48, seed=8))
    put_feature(stack.s3, "v1/", "photos/d.jpg", etag="then", fingerprint=OLD_FINGERPRINT)
    stack.s3.delete_object(Bucket=stack.images, Key="photos/g.jpg")
    put_feature(stack.s3, "v1/", "photos/never.jpg", etag="e", fingerprint=fingerprint)
    stack.s3.put_object(Bucket=stack.images, Key="photos/new.jpg", Body=photo_jpeg(48, 64, seed=7))
    sent, stop_capture = capture_sends(stack)

    # WHEN reconcile --fix runs, then the consumer works through the queue
    code, out, err = fix(stack, "--json")
    stop_capture()
    _, stats = run_consumer("--existing-check", existing_check)

    # THEN the fix did all it set out to: two orphans deleted, one missing and three stale sent
    # (d, stale both ways, once)
    assert (code, err) == (0, "")
    done = summary_of(out)["fix"]
    assert done["orphan"] == {
        "found": 2,
        "deleted": 2,
        "kept": {"changed": 0, "already-gone": 0, "other-source": 0},
        "failed": 0,
        "not_done": 0,
    }
    assert done["missing"] == {"found": 1, "enqueued": 1, "failed": 0, "not_done": 0}
    assert done["stale"] == {"found": 3, "enqueued": 3, "failed": 0, "not_done": 0}
    assert done["complete"] is True
    assert sorted(json.loads(body)["key"] for body in sent) == [
        "photos/b.jpg",
        "photos/c.jpg",
        "photos/d.jpg",
        "photos/new.jpg",
    ]
    # AND the consumer replaced the three stale files and wrote the missing one, skipping none
    summary = stats.summary()
    assert (summary["images_replaced"], summary["images_written"]) == (3, 1)
    assert summary["images_skipped"] == 0
    # AND there is a feature file for every image and none other, each from the image's current
    # upload and the consumer's settings
    keys = [f"photos/{n}.jpg" for n in ["a", "b", "c", "d", "e", "f", "new"]]
    assert sorted(stack.feature_keys("v1/")) == [f"v1/{key}.npy" for key in keys]
    for key in keys:
        meta = stack.s3.head_object(Bucket=stack.features, Key=f"v1/{key}.npy")["Metadata"]
        assert meta["source-etag"] == etag_of(stack, key), key
        assert meta["fingerprint"] == fingerprint, key
    assert stack.depth() == 0
    assert stack.dead_letters() == []


def test_messages_equal_what_bottleneck_enqueue_sends(drifted: Stack) -> None:
    # WHEN reconcile --fix sends the missing and stale images
    code, _, err = fix(drifted, "--no-progress")
    assert (code, err) == (0, "")
    fixed = drain(drifted)
    # AND bottleneck-enqueue sends every image under the same prefix
    options = enqueue.parse([SOURCE, "--queue-url", drifted.queue_url, "--no-progress"], {})
    sent = enqueue.run(options, s3=drifted.s3, sqs=drifted.sqs, batch=None, stdout=io.StringIO())
    assert sent == 0
    by_enqueue = {json.loads(body)["key"]: body for body in drain(drifted)}
    # THEN each message reconcile sent is, byte for byte, the one enqueue sends for that key
    keys = sorted(json.loads(body)["key"] for body in fixed)
    assert keys == [
        "photos/both.jpg",
        "photos/changed.jpg",
        "photos/new.jpg",
        "photos/oldmodel.jpg",
    ]
    assert sorted(fixed) == sorted(by_enqueue[key] for key in keys)
    body = json.loads(by_enqueue["photos/changed.jpg"])
    assert body["etag"] == etag_of(drifted, "photos/changed.jpg")  # the current upload's


def test_text_summary_says_what_it_did(drifted: Stack) -> None:
    code, out, err = fix(drifted)
    assert (code, err) == (0, "")
    assert "  fix: deleted 2 orphans, enqueued 1 missing + 3 stale\n" in out
    # The majority fingerprint is a guess: the report says what the consumer must run with.
    assert "note: a consumer replaces stale-fingerprint files only if" in out


def test_dry_run_changes_nothing_and_prints_the_plan(drifted: Stack) -> None:
    # GIVEN every object and its ETag
    def objects() -> set[tuple[str, str, str]]:
        return {
            (bucket, obj["Key"], obj["ETag"])
            for bucket in ("images", "feats")
            for obj in drifted.s3.list_objects_v2(Bucket=bucket).get("Contents", [])
        }

    before = objects()
    # WHEN a dry run of the fix runs (no queue URL needed, no SQS client given)
    code, out, err = fix(drifted, "--dry-run")
    # THEN nothing changed and nothing was sent
    assert (code, err) == (0, "")
    assert objects() == before
    assert drifted.depth() == 0
    # AND it printed the files it would delete and the messages it would send
    lines = out.splitlines()
    deletes = sorted(line for line in lines if line.startswith("would delete "))
    assert deletes == [
        "would delete s3://feats/v1/photos/gone too.jpg.npy",
        "would delete s3://feats/v1/photos/gone.jpg.npy",
    ]
    bodies = [line.removeprefix("would enqueue ") for line in lines if "would enqueue" in line]
    assert sorted(json.loads(body)["key"] for body in bodies) == [
        "photos/both.jpg",
        "photos/changed.jpg",
        "photos/new.jpg",
        "photos/oldmodel.jpg",
    ]
    new = ImageRef("images", "photos/new.jpg", etag=etag_of(drifted, "photos/new.jpg"), size=10)
    assert encode(new) in bodies
    assert "  fix: dry run: would delete 2 orphans, enqueue 1 missing + 3 stale" in out


def test_dry_run_json_lines(drifted: Stack) -> None:
    code, out, _ = fix(drifted, "--dry-run", "--json")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    plan = [line for line in lines if "would" in line]
    assert {"would": "delete", "uri": "s3://feats/v1/photos/gone.jpg.npy"} in plan
    assert sum(line["would"] == "enqueue" for line in plan) == 4
    fixed = lines[-1]["summary"]["fix"]
    assert fixed["dry_run"] is True
    assert (fixed["orphan"]["deleted"], fixed["stale"]["enqueued"]) == (2, 3)
    assert drifted.depth() == 0


class FailingS3:
    """The moto S3 client, with DeleteObjects refusing the chosen keys (AccessDenied)."""

    def __init__(self, real: Any, refused: set[str]) -> None:
        self.real = real
        self.refused = refused

    def delete_objects(self, *, Bucket: str, Delete: dict[str, Any]) -> dict[str, Any]:  # noqa: N803
        objects = Delete["Objects"]
        passed = [o for o in objects if o["Key"] not in self.refused]
        errors = [
            {"Key": o["Key"], "Code": "AccessDenied", "Message": "Access Denied"}
            for o in objects
            if o["Key"] in self.refused
        ]
        response: dict[str, Any] = {"Deleted": [], "Errors": errors}
        if passed:
            real = self.real.delete_objects(Bucket=Bucket, Delete={**Delete, "Objects": passed})
            response["Deleted"] = real.get("Deleted", [])
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class FailingSQS:
    """The moto SQS client, with SendMessageBatch rejecting the chosen keys as the sender's
    fault (never retried)."""

    def __init__(self, real: Any, rejected: set[str]) -> None:
        self.real = real
        self.rejected = rejected

    def send_message_batch(self, *, QueueUrl: str, Entries: list[dict[str, Any]]) -> dict[str, Any]:  # noqa: N803
        def key(entry: dict[str, Any]) -> str:
            return str(json.loads(entry["MessageBody"])["key"])

        failed = [
            {"Id": e["Id"], "SenderFault": True, "Code": "InvalidParameterValue",
             "Message": "rejected"}
            for e in Entries
            if key(e) in self.rejected
        ]  # fmt: skip
        passed = [e for e in Entries if key(e) not in self.rejected]
        response: dict[str, Any] = {"Successful": [], "Failed": failed}
        if passed:
            response["Successful"] = self.real.send_message_batch(
                QueueUrl=QueueUrl, Entries=passed
            ).get("Successful", [])
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_failed_delete_and_a_failed_send_exit_1_and_are_named(drifted: Stack) -> None:
    # GIVEN S3 refusing to delete one orphan and SQS rejecting one image's message
    s3 = FailingS3(drifted.s3, {"v1/photos/gone.jpg.npy"})
    sqs = FailingSQS(drifted.sqs, {"photos/new.jpg"})
    # WHEN the fix runs
    code, out, err = fix(drifted, "--json", s3=s3, sqs=sqs)
    # THEN it exits 1 and names each failure in one line (in the order they happened)
    assert code == reconcile.EXIT_FAILED
    assert sorted(err.splitlines()) == [
        "bottleneck-reconcile: failed: delete s3://feats/v1/photos/gone.jpg.npy: AccessDenied: "
        "Access Denied",
        "bottleneck-reconcile: failed: enqueue s3://images/photos/new.jpg: InvalidParameterValue: "
        "rejected",
    ]
    # AND did everything else
    fixed = summary_of(out)["fix"]
    assert fixed["complete"] is False
    assert (fixed["orphan"]["deleted"], fixed["orphan"]["failed"]) == (1, 1)
    assert fixed["missing"] == {"found": 1, "enqueued": 0, "failed": 1, "not_done": 0}
    assert fixed["stale"]["enqueued"] == 3
    assert len(fixed["failures"]) == 2
    assert "v1/photos/gone.jpg.npy" in drifted.feature_keys("v1/")
    assert "v1/photos/gone too.jpg.npy" not in drifted.feature_keys("v1/")
    assert len(drain(drifted)) == 3


def test_orphans_are_confirmed_before_they_are_deleted(stack: Stack) -> None:
    # GIVEN three orphans: one of another source bucket (a mistyped source would make it look
    # like ours), one rewritten between the listing and its check, and a real one
    put_feature(stack.s3, "v1/", "photos/theirs.jpg", etag="e", source_bucket="other-images")
    put_feature(stack.s3, "v1/", "photos/rewritten.jpg", etag="e")
    put_feature(stack.s3, "v1/", "photos/gone.jpg", etag="e")
    rewritten = "v1/photos/rewritten.jpg.npy"

    def rewrite_once(params: dict[str, Any], **_: Any) -> None:
        if params["Key"] == rewritten and not rewrites:
            other_numbers = np.ones(4, np.float32)  # other bytes: another ETag
            rewrites.append(
                put_feature(stack.s3, "v1/", "photos/rewritten.jpg", etag="f", array=other_numbers)
            )

    rewrites: list[str] = []
    stack.s3.meta.events.register("provide-client-params.s3.HeadObject", rewrite_once)
    # WHEN the fix runs
    code, out, err = fix(stack, "--json")
    # THEN only the real orphan is deleted; the others are left in place, with their reason
    assert (code, err) == (0, "")
    assert rewrites
    assert sorted(stack.feature_keys("v1/")) == [rewritten, "v1/photos/theirs.jpg.npy"]
    fixed = summary_of(out)["fix"]["orphan"]
    assert fixed["deleted"] == 1
    assert fixed["kept"] == {"changed": 1, "already-gone": 0, "other-source": 1}


def test_ctrl_c_stops_and_reports_exactly_what_was_done(stack: Stack) -> None:
    # GIVEN 30 images without features, listed 23 a page, and a Ctrl-C at the second page
    for i in range(30):
        put_image(stack.s3, f"photos/{i:02d}.jpg")
    calls = 0

    def interrupt_second_page(params: dict[str, Any], **_: Any) -> None:
        nonlocal calls
        if params["Bucket"] != "images":
            return
        calls += 1
        params["MaxKeys"] = 23
        if calls == 2:
            raise KeyboardInterrupt

    stack.s3.meta.events.register("provide-client-params.s3.ListObjectsV2", interrupt_second_page)
    # WHEN the fix runs (two threads a kind: findings come out a few behind the listing)
    code, out, err = fix(stack, "--json", "--concurrency", "2")
    # THEN it exits 130 and says so in one line
    assert code == reconcile.EXIT_INTERRUPTED
    assert err.count("\n") == 1 and "interrupted: deleted 0 orphans, enqueued " in err
    # AND every image it took up is either on the queue or reported not done: whole batches of
    # ten went out, the partial one did not
    missing = summary_of(out)["fix"]["missing"]
    assert 10 < missing["found"] < 23
    assert missing["enqueued"] + missing["not_done"] == missing["found"]
    assert missing["enqueued"] % 10 == 0
    assert missing["not_done"] >= missing["found"] % 10 > 0
    assert len(drain(stack)) == missing["enqueued"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--fix"], "--fix needs --queue-url (or BOTTLENECK_QUEUE_URL)"),
        (["--dry-run"], "--dry-run only applies with --fix"),
        (["--queue-url", "https://q"], "--queue-url only applies with --fix"),
    ],
)
def test_fix_arguments_exit_2_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        reconcile.parse([SOURCE, "--output", OUTPUT, *argv], {})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert needle in err


def test_the_queue_url_comes_from_the_environment_too() -> None:
    options = reconcile.parse(
        [SOURCE, "--output", OUTPUT, "--fix"], {"BOTTLENECK_QUEUE_URL": "https://q"}
    )
    assert (options.fix, options.queue_url) == (True, "https://q")
    assert reconcile.parse([SOURCE, "--output", OUTPUT, "--fix", "--dry-run"], {}).queue_url is None


def test_an_unusable_queue_fails_before_anything_is_changed(drifted: Stack) -> None:
    drifted.sqs.delete_queue(QueueUrl=drifted.queue_url)
    before = sorted(drifted.feature_keys())
    code, out, err = fix(drifted)
    assert code == reconcile.EXIT_FAILED
    assert err.count("\n") == 1 and "cannot use queue" in err
    assert out == ""
    assert sorted(drifted.feature_keys()) == before


class FlakyDeletes:
    """DeleteObjects answers: the first call fails one key with SlowDown and finds another
    changed (its precondition failed), the second deletes what is asked."""

    def __init__(self) -> None:
        self.calls: list[list[dict[str, Any]]] = []

    def delete_objects(self, *, Bucket: str, Delete: dict[str, Any]) -> dict[str, Any]:  # noqa: N803
        objects = Delete["Objects"]
        self.calls.append(objects)
        if len(self.calls) > 1:
            return {"Deleted": [{"Key": o["Key"]} for o in objects]}
        return {
            "Deleted": [{"Key": "a"}],
            "Errors": [
                {"Key": "b", "Code": "SlowDown", "Message": "slow down"},
                {"Key": "c", "Code": "PreconditionFailed", "Message": "changed"},
            ],
        }


def test_delete_batch_retries_throttled_keys_and_leaves_changed_files() -> None:
    fake = FlakyDeletes()
    files = [Listed("a", "ea"), Listed("b", "eb"), Listed("c", "ec")]
    outcome = reconcile_fix.delete_batch(fake, "feats", files, sleep=lambda _: None)  # type: ignore[arg-type]
    # Every delete is conditional on the ETag the file was listed with.
    assert fake.calls[0] == [
        {"Key": "a", "ETag": '"ea"'},
        {"Key": "b", "ETag": '"eb"'},
        {"Key": "c", "ETag": '"ec"'},
    ]
    assert fake.calls[1] == [{"Key": "b", "ETag": '"eb"'}]
    assert outcome == reconcile_fix.DeleteOutcome(
        deleted=("a", "b"), kept=(("c", reconcile_fix.CHANGED),), failed=()
    )


def test_a_file_stale_both_ways_is_fixed_once() -> None:
    image = Listed("k", "e", 1)
    metadata = {"source-etag": "old", "fingerprint": OLD_FINGERPRINT}
    findings = reconcile.judge(image, "o/k.npy", metadata, "f" * 16)
    assert [f.kind for f in findings] == ["stale-etag", "stale-fingerprint"]
    assert [reconcile_fix.fix_group(f) for f in findings] == ["stale", None]
