"""The one ``s3://`` parser: a prefix is a folder, however it is spelled."""

from __future__ import annotations

import pytest

from bottleneck_contract.locations import InvalidS3Uri, S3Location, split_s3_uri


@pytest.mark.parametrize(
    ("uri", "bucket", "prefix"),
    [
        ("s3://feats", "feats", ""),
        ("s3://feats/", "feats", ""),
        ("s3://feats/resnet50", "feats", "resnet50/"),
        ("s3://feats/resnet50/", "feats", "resnet50/"),
        ("s3://feats/a/b", "feats", "a/b/"),
        ("  s3://feats/a/b/\n", "feats", "a/b/"),
        ("s3://Old_Bucket/x", "Old_Bucket", "x/"),  # legacy us-east-1 names
    ],
)
def test_a_location_is_a_folder_or_the_bucket_root(uri: str, bucket: str, prefix: str) -> None:
    # GIVEN any spelling WHEN parsed THEN the prefix is empty or ends with one "/"
    assert S3Location.parse(uri) == S3Location(bucket, prefix)
    assert str(S3Location.parse(uri)) == f"s3://{bucket}/{prefix}"


def test_the_folder_never_takes_in_its_siblings() -> None:
    # GIVEN s3://feats/resnet50 without its slash
    location = S3Location.parse("s3://feats/resnet50")
    # THEN resnet50-old/ is not under it, resnet50/ is, and the feature key goes inside
    assert not location.contains("feats", "resnet50-old/cat.jpg.npy")
    assert location.contains("feats", "resnet50/cat.jpg.npy")
    assert not location.contains("images", "resnet50/cat.jpg.npy")
    assert location.feature_key("photos/cat 1.jpg") == "resnet50/photos/cat 1.jpg.npy"


def test_an_object_uri_keeps_its_key_as_written() -> None:
    assert split_s3_uri("s3://models/r50/w.safetensors") == ("models", "r50/w.safetensors")
    assert split_s3_uri("s3://models") == ("models", "")


@pytest.mark.parametrize("uri", ["https://feats/", "feats/x", "s3://", "s3:///x", "s3://a b/x"])
def test_a_bad_uri_is_one_line_naming_the_option(uri: str) -> None:
    with pytest.raises(InvalidS3Uri, match=r"^--output ") as info:
        S3Location.parse(uri, "--output")
    assert "\n" not in str(info.value)
