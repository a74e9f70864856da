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


# ---------------------------------------------------------------------------- versions

V1 = "0123456789abcdef"
V2 = "fedcba9876543210"
ROOT = "s3://feats/features/"


@pytest.fixture
def versioned(aws: None) -> Any:
    """GIVEN 4 images (and a text file), and under features/ two versions: resnet50.a1_in1k/V1
    complete, test_vit/V2 with 2 current files, one stale (re-uploaded image), one orphan and
    one file of another fingerprint; beside them a flat output's file from before."""
    client = boto3.client("s3", region_name=REGION)
    client.create_bucket(Bucket="images")
    client.create_bucket(Bucket="feats")
    etags = {name: put_image(client, f"photos/{name}.jpg") for name in "abcd"}
    put_image(client, "photos/notes.txt")
    first = f"features/resnet50.a1_in1k/{V1}/"
    second = f"features/test_vit/{V2}/"
    for name, etag in etags.items():
        put_feature(client, first, f"photos/{name}.jpg", etag=etag, fingerprint=V1)
    for name in "ab":
        put_feature(client, second, f"photos/{name}.jpg", etag=etags[name], fingerprint=V2)
    put_feature(client, second, "photos/c.jpg", etag="before", fingerprint=V2)
    put_feature(client, second, "photos/d.jpg", etag=etags["d"], fingerprint=V1)
    put_feature(client, second, "photos/gone.jpg", etag="e", fingerprint=V2)
    put_feature(client, "features/", "photos/a.jpg", etag="flat")
    return client


@pytest.mark.parametrize("output", [ROOT, ROOT + "{model}/{fingerprint}/"])
def test_a_root_is_reconciled_per_version(versioned: Any, output: str) -> None:
    code, findings, summary = run_json(
        versioned, ["s3://images/photos/", "--output", output, "--json"]
    )
    assert code == 0
    first, second = f"resnet50.a1_in1k/{V1}", f"test_vit/{V2}"
    # THEN each version is held to the fingerprint in its name, its findings named by version
    assert {(f["version"], f["kind"], f["key"]) for f in findings} == {
        (second, "stale-etag", "photos/c.jpg"),
        (second, "stale-fingerprint", "photos/d.jpg"),
        (second, "orphan", "photos/gone.jpg"),
    }
    assert summary["root"] == ROOT
    assert summary["other_folders"] == ["features/photos/"]
    one, two = summary["versions"][first], summary["versions"][second]
    assert (one["accepted"], one["features"], one["complete"], one["percent_complete"]) == (
        4,
        4,
        4,
        100.0,
    )
    assert (two["features"], two["with_file"], two["complete"], two["percent_complete"]) == (
        5,
        4,
        2,
        50.0,
    )
    assert two["expected_fingerprint"] == V2
    assert two["findings"] == {"missing": 0, "stale-etag": 1, "stale-fingerprint": 1, "orphan": 1}
    # the other version's files are not images of this one
    assert one["images"] == two["images"] == 5


def test_the_text_report_starts_with_how_complete_each_version_is(versioned: Any) -> None:
    out = io.StringIO()
    options = reconcile.parse(["s3://images/photos/", "--output", ROOT, "--limit", "1"], {})
    assert reconcile.run(options, s3=versioned, stdout=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[:4] == [
        f"s3://images/photos/ -> {ROOT}: 2 versions (<model>/<fingerprint>)",
        f"  resnet50.a1_in1k/{V1}  4 files, 4 of 4 images current (100.0%)",
        f"  test_vit/{V2}          5 files, 2 of 4 images current (50.0%): stale-etag 1, "
        "stale-fingerprint 1, orphan 1",
        "  also under it, in no version (not compared): photos/",
    ]
    assert f"{ROOT}test_vit/{V2}/: 5 objects, 5 feature files, 4 checked by HEAD" in out.getvalue()
    assert f"expected fingerprint {V2} (its folder's name)" in out.getvalue()


def test_one_versions_prefix_is_reconciled_as_before(versioned: Any) -> None:
    output = f"{ROOT}test_vit/{V2}/"
    code, findings, summary = run_json(
        versioned, ["s3://images/photos/", "--output", output, "--json"]
    )
    assert code == 0
    assert "versions" not in summary and "version" not in findings[0]
    assert summary["findings"]["orphan"] == 1
    assert summary["expected_is_majority"] is True


def test_without_heads_a_version_counts_images_with_a_file(versioned: Any) -> None:
    _, _, summary = run_json(
        versioned, ["s3://images/photos/", "--output", ROOT, "--no-head", "--json"]
    )
    two = summary["versions"][f"test_vit/{V2}"]
    assert (two["with_file"], two["complete"], two["percent_complete"]) == (4, None, 100.0)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--fix", "--dry-run"], "--fix: s3://feats/features/ holds 2 versions"),
        (["--fingerprint", V1], "--fingerprint: s3://feats/features/ is a root of versions"),
    ],
)
def test_what_needs_one_version_says_so_in_one_line(
    versioned: Any, extra: list[str], says: str
) -> None:
    err = io.StringIO()
    options = reconcile.parse(["s3://images/photos/", "--output", ROOT, *extra], {})
    assert reconcile.run(options, s3=versioned, stdout=io.StringIO(), stderr=err) == 2
    assert err.getvalue().startswith(f"bottleneck-reconcile: error: {says}")
    assert f"such as {ROOT}resnet50.a1_in1k/{V1}/" in err.getvalue()
    assert err.getvalue().count("\n") == 1


def test_fix_on_a_root_of_one_version_fixes_that_version(versioned: Any) -> None:
    # GIVEN the root with only its second version left
    for page in versioned.get_paginator("list_objects_v2").paginate(
        Bucket="feats", Prefix="features/resnet50.a1_in1k/"
    ):
        for item in page.get("Contents", []):
            versioned.delete_object(Bucket="feats", Key=item["Key"])
    out = io.StringIO()
    argv = ["s3://images/photos/", "--output", ROOT, "--fix", "--dry-run", "--json"]
    # WHEN --fix --dry-run runs on the root
    assert reconcile.run(reconcile.parse(argv, {}), s3=versioned, stdout=out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    # THEN its plan is that version's: the orphan deleted, the stale images sent
    plans = {(p["would"], p.get("uri") or p["message"]["key"]) for p in lines if "would" in p}
    assert plans == {
        ("delete", f"{ROOT}test_vit/{V2}/photos/gone.jpg.npy"),
        ("enqueue", "photos/c.jpg"),
        ("enqueue", "photos/d.jpg"),
    }
    assert lines[-1]["summary"]["expected_fingerprint"] == V2


def test_a_template_whose_root_is_empty_says_no_version_yet(versioned: Any) -> None:
    out = io.StringIO()
    options = reconcile.parse(["s3://images/photos/", "--output", "s3://feats/new/{model}/"], {})
    assert reconcile.run(options, s3=versioned, stdout=out) == 0
    assert "0 versions" in out.getvalue()
    assert "no version yet" in out.getvalue()
