"""``bottleneck-reconcile`` over a moto prefix holding every kind of mismatch."""

from __future__ import annotations

import io
import json
from typing import Any

import boto3
import pytest

from bottleneck_contract.locations import S3Location
from bottleneck_tools import reconcile
from bottleneck_tools.backfill import Listed
from tests.fakes import put_feature, put_image

REGION = "us-east-1"
SOURCE = S3Location("images", "photos/")
OUTPUT = S3Location("feats", "resnet50/")
FP_A = "a" * 16
FP_B = "b" * 16


@pytest.fixture
def s3(aws: None) -> Any:
    """GIVEN images and feature files with one of each mismatch (and decoys)."""
    client = boto3.client("s3", region_name=REGION)
    client.create_bucket(Bucket="images")
    client.create_bucket(Bucket="feats")
    # Current: same ETag, majority fingerprint. "a.jpg" / "a.jpg (1).jpg" sort differently once
    # ".npy" is appended: the join must still pair them.
    for name in ["ok.jpg", "a.jpg", "a.jpg (1).jpg", "ünï cödé.jpg"]:
        etag = put_image(client, f"photos/{name}")
        put_feature(client, "resnet50/", f"photos/{name}", etag=etag, fingerprint=FP_A)
    put_image(client, "photos/new.jpg")  # missing
    put_image(client, "photos/notes.txt")  # not an image: never missing
    put_image(client, "photos/empty.jpg", b"")  # empty: never missing
    put_image(client, "elsewhere/x.jpg")  # outside the source prefix
    old = put_image(client, "photos/changed.jpg", b"first upload")
    put_image(client, "photos/changed.jpg", b"second upload")  # re-uploaded: stale-etag
    put_feature(client, "resnet50/", "photos/changed.jpg", etag=old, fingerprint=FP_A)
    etag = put_image(client, "photos/oldmodel.jpg")
    # stale-fingerprint
    put_feature(client, "resnet50/", "photos/oldmodel.jpg", etag=etag, fingerprint=FP_B)
    put_feature(client, "resnet50/", "photos/gone.jpg", etag="e", fingerprint=FP_A)  # orphan
    client.put_object(Bucket="feats", Key="resnet50/photos/readme.txt", Body=b"not a feature")
    # outside the source prefix: not compared
    put_feature(client, "resnet50/", "elsewhere/x.jpg", etag="e", fingerprint=FP_A)
    return client


def run_json(s3: Any, argv: list[str]) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
    out, err = io.StringIO(), io.StringIO()
    code = reconcile.run(reconcile.parse(argv, {}), s3=s3, stdout=out, stderr=err)
    assert err.getvalue() == ""
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    return code, lines[:-1], lines[-1]["summary"]


def kinds(findings: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(f["kind"], f["key"]) for f in findings}


def count_heads(s3: Any) -> list[str]:
    heads: list[str] = []
    s3.meta.events.register(
        "before-call.s3.HeadObject", lambda params, **_: heads.append(params["url_path"])
    )
    return heads


def test_each_mismatch_kind_against_the_majority_fingerprint(s3: Any) -> None:
    heads = count_heads(s3)
    code, findings, summary = run_json(s3, [str(SOURCE), "--output", str(OUTPUT), "--json"])
    assert code == 0
    assert kinds(findings) == {
        ("missing", "photos/new.jpg"),
        ("stale-etag", "photos/changed.jpg"),
        ("stale-fingerprint", "photos/oldmodel.jpg"),
        ("orphan", "photos/gone.jpg"),
    }
    orphan = next(f for f in findings if f["kind"] == "orphan")
    assert orphan["feature_key"] == "resnet50/photos/gone.jpg.npy"
    stale = next(f for f in findings if f["kind"] == "stale-fingerprint")
    assert FP_B in stale["detail"]
    assert stale["feature_key"] == "resnet50/photos/oldmodel.jpg.npy"
    assert summary["findings"] == {
        "missing": 1,
        "stale-etag": 1,
        "stale-fingerprint": 1,
        "orphan": 1,
    }
    assert summary["fingerprints"] == {FP_A: 5, FP_B: 1}
    assert summary["expected_fingerprint"] == FP_A
    assert summary["expected_is_majority"] is True
    assert summary["features"] == 7  # the .npy files under resnet50/photos/
    # One HEAD per feature file that has an image; none for orphans.
    assert len(heads) == summary["checked"] == 6


def test_an_expected_fingerprint_flags_the_others(s3: Any) -> None:
    _, findings, summary = run_json(
        s3, [str(SOURCE), "--output", str(OUTPUT), "--fingerprint", FP_B, "--json"]
    )
    stale = {f["key"] for f in findings if f["kind"] == "stale-fingerprint"}
    assert stale == {
        "photos/ok.jpg",
        "photos/a.jpg",
        "photos/a.jpg (1).jpg",
        "photos/ünï cödé.jpg",
        "photos/changed.jpg",
    }
    assert ("stale-etag", "photos/changed.jpg") in kinds(findings)
    assert summary["expected_is_majority"] is False


def test_no_head_reports_listing_findings_without_any_head(s3: Any) -> None:
    heads = count_heads(s3)
    _, findings, summary = run_json(
        s3, [str(SOURCE), "--output", str(OUTPUT), "--no-head", "--json"]
    )
    assert kinds(findings) == {("missing", "photos/new.jpg"), ("orphan", "photos/gone.jpg")}
    assert heads == []
    assert summary["checked"] == 0


def test_text_report(s3: Any) -> None:
    out = io.StringIO()
    options = reconcile.parse([str(SOURCE), "--output", str(OUTPUT), "--limit", "1"], {})
    assert reconcile.run(options, s3=s3, stdout=out) == 0
    text = out.getvalue()
    assert f"expected fingerprint {FP_A} (majority of files)" in text
    assert "  missing            1\n      photos/new.jpg" in text
    assert "      resnet50/photos/gone.jpg.npy" in text


def test_output_inside_the_image_prefix_is_not_taken_for_images(aws: None) -> None:
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="images")
    etag = put_image(s3, "cats/1.jpg")
    put_feature(s3, "feats/", "cats/1.jpg", etag=etag, fingerprint=FP_A, bucket="images")
    _, findings, summary = run_json(
        s3, ["s3://images/", "--output", "s3://images/feats/", "--json"]
    )
    assert findings == []
    assert summary["images"] == 1


def test_listing_error_is_one_line(aws: None) -> None:
    s3 = boto3.client("s3", region_name=REGION)
    err = io.StringIO()
    options = reconcile.parse(["s3://nope/", "--output", "s3://nope2/"], {})
    assert reconcile.run(options, s3=s3, stdout=io.StringIO(), stderr=err) == 1
    assert err.getvalue().count("\n") == 1
    assert "NoSuchBucket" in err.getvalue()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["images/"], "source"),
        (["s3://images/"], "--output"),
        (["s3://images/", "--output", "s3://feats/", "--concurrency", "0"], "--concurrency"),
        (
            ["s3://images/", "--output", "s3://feats/", "--fingerprint", "x", "--no-head"],
            "--no-head",
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        reconcile.parse(argv, {})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert needle in err


def test_merge_join_pairs_keys_that_prefix_one_another() -> None:
    images = [Listed("p/a.jpg"), Listed("p/a.jpg (1).jpg"), Listed("p/b.jpg")]
    features = [Listed("o/p/a.jpg (1).jpg.npy"), Listed("o/p/a.jpg.npy"), Listed("o/p/c.jpg.npy")]
    pairs = [
        (p.image.key if p.image else None, p.feature.key if p.feature else None)
        for p in reconcile.merge_join(images, features, "o/")
    ]
    assert pairs == [
        ("p/a.jpg (1).jpg", "o/p/a.jpg (1).jpg.npy"),
        ("p/a.jpg", "o/p/a.jpg.npy"),
        ("p/b.jpg", None),
        (None, "o/p/c.jpg.npy"),
    ]


def test_ordered_map_keeps_order_and_bounds_the_window() -> None:
    seen: list[int] = []

    def items() -> Any:
        for i in range(50):
            seen.append(i)
            yield i

    out = []
    for item, result in reconcile.ordered_map(lambda x: x * 2, items(), concurrency=3):
        # Never more than 2 * concurrency + 1 items taken ahead of the one being yielded.
        assert len(seen) - item <= 7
        out.append((item, result))
    assert out == [(i, 2 * i) for i in range(50)]
