"""Feature files: key mapping, metadata within S3's limits, fingerprints, serialisation."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import pytest

from bottleneck_contract.features import (
    MAX_METADATA_BYTES,
    decode_key,
    encode_key,
    feature_key,
    for_source,
    is_current,
    metadata_size,
    source_key_of,
)
from consumer.errors import PermanentError
from consumer.features import (
    FeatureSettings,
    library_versions,
    major_minor,
    metadata,
    output_key,
    serialise,
)
from consumer.preprocess import InputSpec

SPEC = InputSpec(
    input_size=(3, 224, 224),
    interpolation="bicubic",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    crop_pct=0.95,
    crop_mode="center",
)
SETTINGS = FeatureSettings(
    model="resnet50.a1_in1k",
    weights="pretrained:timm/resnet50.a1_in1k",
    pool="avg",
    spec=SPEC,
    dtype="float32",
    precision="fp32",
    decode="pil",
    head="drop",
    normalize="none",
    libraries="pillow=13.0 timm=1.0 torch=2.14",
)


@pytest.mark.parametrize(
    ("prefix", "key", "expected"),
    [
        ("resnet50/", "photos/cat 1.jpg", "resnet50/photos/cat 1.jpg.npy"),
        ("", "a+b.jpg", "a+b.jpg.npy"),
        ("f/", "100%/x.png", "f/100%/x.png.npy"),
        ("f/", "фото/猫.jpg", "f/фото/猫.jpg.npy"),
        ("f/", "dir//double.jpg", "f/dir//double.jpg.npy"),
    ],
)
def test_output_key_appends_npy_to_the_real_key(prefix: str, key: str, expected: str) -> None:
    # GIVEN an output prefix and a real (decoded) source key WHEN mapped THEN nothing is escaped
    assert output_key(prefix, key) == expected
    # AND the tools map the feature key back to the same source key
    assert source_key_of(prefix, expected) == key


def test_source_key_of_refuses_keys_that_are_not_feature_files() -> None:
    assert source_key_of("f/", feature_key("f/", "a.jpg")) == "a.jpg"
    assert source_key_of("f/", "f/notes.txt") is None
    assert source_key_of("f/", "g/a.jpg.npy") is None


def test_output_key_over_s3_limit_is_a_permanent_failure() -> None:
    # GIVEN a key that fits S3 but not once the prefix and .npy are added
    key = "k" * 1020
    # WHEN mapped THEN it fails permanently with a stable code
    with pytest.raises(PermanentError) as info:
        output_key("features/", key)
    assert info.value.error_code == "key-too-long"


@pytest.mark.parametrize("key", ["cat 1.jpg", "a+b%20c.jpg", "фото/猫.jpg", "x?y#z&.png"])
def test_source_key_metadata_is_ascii_and_round_trips(key: str) -> None:
    # GIVEN any key WHEN percent-encoded for metadata THEN it is ASCII and decodes back exactly
    encoded = encode_key(key)
    assert encoded.isascii()
    assert decode_key(encoded) == key


def _meta(key: str) -> dict[str, str]:
    return metadata(
        source_bucket="images",
        source_key=key,
        source_etag="0123456789abcdef0123456789abcdef",
        settings=SETTINGS,
        fingerprint=SETTINGS.fingerprint(),
        shape=(2048,),
    )


def test_metadata_has_exactly_the_contract_keys() -> None:
    meta = _meta("photos/cat 1.jpg")
    assert set(meta) == {
        "source-bucket",
        "source-key",
        "source-etag",
        "model",
        "weights",
        "pool",
        "shape",
        "dtype",
        "fingerprint",
        # additions: which space the vector is in
        "head",
        "normalize",
    }
    assert meta["source-key"] == "photos/cat%201.jpg"
    assert (meta["head"], meta["normalize"]) == ("drop", "none")
    assert meta["shape"] == "2048"
    assert all(v.isascii() for v in meta.values())


@pytest.mark.parametrize("key", ["a" * 1000, "猫" * 341, "%" * 1000])
def test_metadata_fits_2kb_for_the_longest_keys(key: str) -> None:
    # GIVEN keys at S3's 1024-byte limit whose encoding would blow past 2 KB
    meta = _meta(key)
    # THEN the metadata still fits, and the key is identified by its hash when it had to be
    assert metadata_size(meta) <= MAX_METADATA_BYTES
    if len(encode_key(key)) > 1500:
        assert meta["source-key"].startswith("sha256:")


def test_short_key_metadata_keeps_the_key_itself() -> None:
    assert decode_key(_meta("猫" * 100)["source-key"]) == "猫" * 100


NUMERIC_CHANGES = {
    "model": "resnet50.tv_in1k",
    "weights": "sha256:0011223344556677",
    "pool": "none",
    "dtype": "float16",
    "precision": "bf16",
    "decode": "pil-draft",
    "head": "keep",
    "normalize": "l2",
    "libraries": "pillow=13.0 timm=1.1 torch=2.14",
    "spec.input_size": (3, 256, 256),
    "spec.interpolation": "bilinear",
    "spec.mean": (0.5, 0.5, 0.5),
    "spec.std": (0.5, 0.5, 0.5),
    "spec.crop_pct": 0.875,
    "spec.crop_mode": "squash",
}


@pytest.mark.parametrize(("field", "value"), list(NUMERIC_CHANGES.items()))
def test_fingerprint_changes_with_every_numeric_setting(field: str, value: Any) -> None:
    # GIVEN the settings with one field changed
    if field.startswith("spec."):
        spec = dataclasses.replace(SPEC, **{field[5:]: value})
        changed = dataclasses.replace(SETTINGS, spec=spec)
    else:
        changed = dataclasses.replace(SETTINGS, **{field: value})
    # THEN the fingerprint differs
    assert changed.fingerprint() != SETTINGS.fingerprint()


def test_fingerprint_is_stable_for_equal_settings() -> None:
    # GIVEN an equal copy built separately (lists vs tuples must not matter either)
    copy = FeatureSettings(**dataclasses.asdict(SETTINGS) | {"spec": dataclasses.replace(SPEC)})
    assert copy.fingerprint() == SETTINGS.fingerprint()
    assert len(SETTINGS.fingerprint()) == 16


@pytest.mark.parametrize(
    ("version", "expected"),
    [("2.14.1+cu130", "2.14"), ("1.0.31", "1.0"), ("13.0.0", "13.0"), ("2.6.0.dev20250101", "2.6")],
)
def test_versions_count_to_the_minor_release(version: str, expected: str) -> None:
    assert major_minor(version) == expected


def test_a_patch_release_keeps_the_fingerprint_and_a_minor_one_changes_it() -> None:
    # GIVEN the libraries' versions as the runtime reads them
    def fingerprint(torch: str, timm: str, pillow: str) -> str:
        libraries = library_versions({"torch": torch, "timm": timm, "pillow": pillow})
        return dataclasses.replace(SETTINGS, libraries=libraries).fingerprint()

    base = fingerprint("2.14.1+cu130", "1.0.31", "13.0.0")
    # THEN a patch release of any of them changes nothing
    assert fingerprint("2.14.2+cu130", "1.0.32", "13.0.1") == base
    # AND a minor release of each one does
    assert fingerprint("2.15.0+cu130", "1.0.31", "13.0.0") != base
    assert fingerprint("2.14.1+cu130", "1.1.0", "13.0.0") != base
    assert fingerprint("2.14.1+cu130", "1.0.31", "13.1.0") != base


def test_is_current_needs_both_etag_and_fingerprint() -> None:
    meta = _meta("k.jpg")
    fp = SETTINGS.fingerprint()
    assert is_current(meta, "0123456789abcdef0123456789abcdef", fp)
    assert not is_current(meta, "ffffffffffffffffffffffffffffffff", fp)
    assert not is_current(meta, "0123456789abcdef0123456789abcdef", "0" * 16)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_serialise_round_trips_without_pickle(dtype: str) -> None:
    features = np.random.default_rng(0).standard_normal((7, 3, 2)).astype(np.float32)
    loaded = np.load(io.BytesIO(serialise(features, dtype)), allow_pickle=False)
    assert loaded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(loaded, features.astype(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", [(192,), (2048,), (7, 3, 2), (0,)])
def test_serialise_writes_what_np_save_writes(shape: tuple[int, ...], dtype: str) -> None:
    # Its header is made once per shape and dtype: the bytes must still be np.save's, byte for
    # byte, on the first call and on the next (rows of a batch are views, not owners).
    batch = np.random.default_rng(1).standard_normal((3, *shape)).astype(np.float32)
    for row in batch:
        expected = io.BytesIO()
        np.save(expected, row.astype(dtype), allow_pickle=False)
        assert serialise(row, dtype) == expected.getvalue()


def test_a_copys_metadata_names_its_own_image_within_2_kb() -> None:
    # GIVEN a feature file's metadata (--dedupe content copies it for identical bytes)
    original = {"source-bucket": "a", "source-key": "x.jpg", "source-etag": "e1", "model": "m"}

    # WHEN it is made to name another image, with an ordinary key and with a very long one
    moved = for_source(original, source_bucket="b", source_key="dir/cat 1.jpg", source_etag="e2")
    long_key = "k/" + "é" * 1000
    long = for_source(original, source_bucket="b", source_key=long_key, source_etag="e2")

    # THEN the source fields are the new image's, the rest is kept, the original untouched,
    # and the long key is replaced by its sha256 to stay within S3's 2 KB
    assert moved == {
        "source-bucket": "b",
        "source-key": "dir/cat%201.jpg",
        "source-etag": "e2",
        "model": "m",
    }
    assert original["source-key"] == "x.jpg"
    assert long["source-key"].startswith("sha256:")
    assert metadata_size(long) <= MAX_METADATA_BYTES
