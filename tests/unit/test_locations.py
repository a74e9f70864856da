"""The one ``s3://`` parser: a prefix is a folder, however it is spelled."""

from __future__ import annotations

from typing import Any, cast

import pytest

from bottleneck_contract.locations import (
    InvalidS3Uri,
    OutputTemplate,
    S3Location,
    find_versions,
    list_versions,
    model_segment,
    split_s3_uri,
)


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


# ---------------------------------------------------------------------------- output templates

FP_A = "0123456789abcdef"
FP_B = "fedcba9876543210"


def test_a_template_is_a_static_root_and_its_placeholders() -> None:
    # GIVEN the stack's layout WHEN parsed THEN the root is everything before the first
    # placeholder, and the URI reads back as written
    template = OutputTemplate.parse("s3://feats/features/{model}/{fingerprint}")
    assert template.root == S3Location("feats", "features/")
    assert template.fields == ("model", "fingerprint")
    assert template.templated
    assert str(template) == "s3://feats/features/{model}/{fingerprint}/"
    # the bucket root may be the root, and the order is free
    other = OutputTemplate.parse("s3://feats/{fingerprint}/{model}/")
    assert (other.root, other.fields) == (S3Location("feats", ""), ("fingerprint", "model"))


@pytest.mark.parametrize(
    "uri", ["s3://feats", "s3://feats/v1", "s3://feats/a/b/", "s3://feats/a//b"]
)
def test_a_uri_without_placeholders_means_what_it_always_meant(uri: str) -> None:
    template = OutputTemplate.parse(uri)
    assert not template.templated
    assert template.root == S3Location.parse(uri)
    assert str(template) == str(S3Location.parse(uri))


def test_expanding_gives_one_folder_per_model_and_fingerprint() -> None:
    template = OutputTemplate.parse("s3://feats/features/{model}/{fingerprint}/")
    assert template.expand("resnet50.a1_in1k", FP_A) == S3Location(
        "feats", f"features/resnet50.a1_in1k/{FP_A}/"
    )
    assert template.expand("hf-hub:timm/ViT-B-16-SigLIP", FP_B).prefix == (
        f"features/hf-hub-timm-ViT-B-16-SigLIP/{FP_B}/"
    )
    # a plain location expands to itself: the contract's --output, unchanged
    assert OutputTemplate.parse("s3://feats/v1/").expand("x", FP_A) == S3Location("feats", "v1/")
    with pytest.raises(ValueError, match="16 hex"):
        template.expand("resnet50", "not-a-fingerprint")


@pytest.mark.parametrize(
    ("name", "segment"),
    [
        ("resnet50", "resnet50"),
        ("vit_base_patch16_clip_224.openai", "vit_base_patch16_clip_224.openai"),
        ("hf-hub:timm/ViT-B-16-SigLIP", "hf-hub-timm-ViT-B-16-SigLIP"),
        ("hf-hub:org/a b::c", "hf-hub-org-a-b-c"),
    ],
)
def test_a_model_name_becomes_one_safe_segment(name: str, segment: str) -> None:
    assert model_segment(name) == segment
    assert "/" not in segment


@pytest.mark.parametrize("name", ["", "..", "///", "_bottleneck", "shards"])
def test_a_name_that_makes_no_usable_folder_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="no usable folder"):
        model_segment(name)


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("s3://feats/features/{modle}/", "the placeholders are {model} and {fingerprint}"),
        ("s3://feats/features/v{model}/", "the placeholders are"),
        ("s3://feats/features/{model}x/", "the placeholders are"),
        ("s3://feats/{}/", "the placeholders are"),
        ("s3://feats/features/{model}/v1/", "after a placeholder"),
        ("s3://feats/{model}//{fingerprint}/", "after a placeholder"),
        ("s3://feats/{model}/{model}/", "twice"),
        ("s3://feats/{x/", "the placeholders are"),
    ],
)
def test_anything_else_in_braces_is_one_line_naming_the_option(uri: str, says: str) -> None:
    with pytest.raises(InvalidS3Uri, match=r"^--output has ") as info:
        OutputTemplate.parse(uri, "--output")
    assert says in str(info.value)
    assert "\n" not in str(info.value)


def test_a_plain_location_refuses_a_placeholder() -> None:
    # GIVEN a tool that needs one concrete prefix WHEN given a template THEN one line says what
    # to give instead, never a folder literally named "{model}"
    with pytest.raises(InvalidS3Uri, match=r"^source holds the placeholder \{model\}") as info:
        S3Location.parse("s3://feats/features/{model}/{fingerprint}/", "source")
    assert "s3://feats/features/" in str(info.value)
    assert "\n" not in str(info.value)


class FakeListing:
    """ListObjectsV2 with a delimiter over a set of keys, ``page`` folders a call; counts calls."""

    def __init__(self, keys: list[str], page: int = 1000) -> None:
        self.keys = sorted(keys)
        self.page = page
        self.calls: list[str] = []
        self.heads: list[str] = []

    def list_objects_v2(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs["Prefix"])
        keys = [k for k in self.keys if k.startswith(kwargs["Prefix"])][: kwargs["MaxKeys"]]
        return {"Contents": [{"Key": key} for key in keys]}

    def head_object(self, **kwargs: Any) -> dict[str, Any]:
        # A version's files carry its fingerprint, as the consumer writes them; a flat output's
        # images (under uploads/) another one.
        self.heads.append(kwargs["Key"])
        fingerprint = kwargs["Key"].split("/")[2]
        if kwargs["Key"].startswith("features/uploads/"):
            fingerprint = "1111222233334444"
        return {"Metadata": {"fingerprint": fingerprint}}

    def get_paginator(self, name: str) -> FakeListing:
        assert name == "list_objects_v2"
        return self

    def paginate(self, **kwargs: str) -> list[dict[str, Any]]:
        assert (kwargs["Bucket"], kwargs["Delimiter"]) == ("feats", "/")
        prefix = kwargs["Prefix"]
        rests = [k[len(prefix) :] for k in self.keys if k.startswith(prefix)]
        folders = sorted({prefix + rest.split("/")[0] + "/" for rest in rests if "/" in rest})
        pages = [folders[i : i + self.page] for i in range(0, len(folders), self.page)] or [[]]
        self.calls += [prefix] * len(pages)
        return [{"CommonPrefixes": [{"Prefix": folder} for folder in chunk]} for chunk in pages]


def test_versions_are_found_two_levels_down_and_nothing_else_is_one() -> None:
    # GIVEN a root holding two models (one with two fingerprints), a flat output's leftovers,
    # the consumer's own folders and a folder that only looks like a model
    listing = FakeListing(
        [
            f"features/resnet50.a1_in1k/{FP_A}/images/a.jpg.npy",
            f"features/resnet50.a1_in1k/{FP_B}/images/a.jpg.npy",
            f"features/test_vit/{FP_A}/images/a.jpg.npy",
            f"features/test_vit/{FP_A}/_bottleneck/running/x",
            "features/images/cats/a.jpg.npy",
            f"features/_bottleneck/content/{FP_A}/abc",
            f"features/shards/{FP_A}/0001.npy",
            "features/notes/readme/x.txt",
            "features/top.jpg.npy",
        ]
    )
    template = OutputTemplate.parse("s3://feats/features/{model}/{fingerprint}/")
    # WHEN the versions are listed
    versions = list_versions(cast(Any, listing), template)
    # THEN exactly the model/fingerprint folders, in key order; the other folders named
    assert versions.labels == [
        f"resnet50.a1_in1k/{FP_A}",
        f"resnet50.a1_in1k/{FP_B}",
        f"test_vit/{FP_A}",
    ]
    assert versions.found[0] == S3Location("feats", f"features/resnet50.a1_in1k/{FP_A}/")
    assert versions.others == ("features/images/", "features/notes/")
    # one call for the root, one per folder that could be a model (never per file)
    assert listing.calls == [
        "features/",
        "features/images/",
        "features/notes/",
        "features/resnet50.a1_in1k/",
        "features/test_vit/",
    ]
    assert versions.requests == 5


def test_a_guessed_root_with_many_folders_is_taken_as_flat() -> None:
    # GIVEN a flat output at the bucket root whose images lie in many folders
    listing = FakeListing([f"user{i:03d}/a.jpg.npy" for i in range(30)], page=10)
    # WHEN a tool looks for versions under a root it was given without placeholders
    versions = find_versions(
        cast(Any, listing), OutputTemplate.parse("s3://feats/"), max_folders=20
    )
    # THEN it stops after listing the root (3 pages) and finds none: the output is flat
    assert (versions.found, versions.requests) == ((), 3)
    assert listing.calls == ["", "", ""]


def test_a_template_without_placeholders_lists_nothing() -> None:
    listing = FakeListing([f"v1/{FP_A}/x/a.jpg.npy"])
    versions = list_versions(cast(Any, listing), OutputTemplate.parse("s3://feats/v1/"))
    assert (versions.found, versions.requests, listing.calls) == ((), 0, [])


def test_a_guessed_root_keeps_only_folders_its_files_confirm() -> None:
    # GIVEN a root with one real version, and a flat output's images in a folder that happens
    # to be named like a fingerprint (their files carry another fingerprint)
    listing = FakeListing(
        [
            f"features/test_vit/{FP_A}/_bottleneck/running/m",
            f"features/test_vit/{FP_A}/images/a.jpg.npy",
            "features/uploads/0123456789abcdee/a.jpg.npy",
        ]
    )
    # WHEN a tool guesses the layout under the root
    versions = find_versions(cast(Any, listing), OutputTemplate.parse("s3://feats/features/"))
    # THEN one file of each candidate was read, past the consumer's own folder, and only the
    # confirmed folder is a version; the other is named as a folder outside any version
    assert versions.labels == [f"test_vit/{FP_A}"]
    assert versions.others == ("features/uploads/",)
    assert listing.heads == [
        f"features/test_vit/{FP_A}/images/a.jpg.npy",
        "features/uploads/0123456789abcdee/a.jpg.npy",
    ]
    assert versions.requests == 3 + 2 * 2
