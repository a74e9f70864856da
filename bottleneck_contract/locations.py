"""``s3://`` URIs: the one parser, and the one rule for what a prefix means.

A location names a folder: ``s3://feats/resnet50`` and ``s3://feats/resnet50/`` are both the
prefix ``resnet50/``, never the keys that merely start with ``resnet50`` (``resnet50-old/...``);
``s3://feats`` and ``s3://feats/`` are both the bucket root. The consumer writes feature files,
and every tool looks for them, by this rule, so that one spelling cannot send them to different
places. A URI that names one object (``--weights s3://models/r50.safetensors``) is read with
:func:`split_s3_uri`, which keeps the key exactly as written.

An output may be a template (:class:`OutputTemplate`): ``s3://feats/features/{model}/{fingerprint}/``
puts the features of each model and setting into a folder of their own, a *version*, beside
the others instead of over them. Placeholders are whole path segments after a static *root*
(``features/``); the consumer expands them once it knows its model and fingerprint, and the
producer and the tools find the versions by listing the root (:func:`list_versions`). A plain
:class:`S3Location` never holds a placeholder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bottleneck_contract.features import feature_key

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = [
    "DEFAULT_FIELDS",
    "PLACEHOLDERS",
    "InvalidS3Uri",
    "OutputTemplate",
    "S3Location",
    "Versions",
    "find_versions",
    "list_versions",
    "model_segment",
    "split_s3_uri",
]

# Lenient on purpose: old us-east-1 buckets may have capitals and underscores.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")


class InvalidS3Uri(ValueError):
    """Not an ``s3://bucket[/key]`` URI; the message is one line, naming the option if given."""


def split_s3_uri(uri: str, option: str = "") -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``, the key exactly as written (possibly empty).

    Surrounding whitespace is ignored. ``option`` (a flag or variable name) starts the error
    message of :class:`InvalidS3Uri`.
    """
    text = uri.strip()
    lead = f"{option} " if option else ""
    if not text.startswith("s3://"):
        raise InvalidS3Uri(f"{lead}must look like s3://bucket/prefix/, got {uri!r}")
    bucket, _, key = text[len("s3://") :].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise InvalidS3Uri(f"{lead}has an invalid bucket name {bucket!r} in {uri!r}")
    return bucket, key


@dataclass(frozen=True, slots=True)
class S3Location:
    """A bucket and a key prefix that is empty (the bucket root) or ends with ``/``."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, uri: str, option: str = "") -> S3Location:
        """Parse ``s3://bucket[/prefix[/]]``; a prefix without its trailing ``/`` gains one."""
        bucket, prefix = split_s3_uri(uri, option)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        for segment in prefix.split("/"):
            if segment in _PLACEHOLDER_SEGMENTS:
                # Taken literally it would name a folder called "{model}": never what was meant.
                lead = f"{option} " if option else ""
                raise InvalidS3Uri(
                    f"{lead}holds the placeholder {segment} in {uri!r}: give the root "
                    f"s3://{bucket}/{prefix[: prefix.index(segment)]} or one version's prefix"
                )
        return cls(bucket, prefix)

    def contains(self, bucket: str, key: str) -> bool:
        """Whether ``bucket``/``key`` lies under this location."""
        return bucket == self.bucket and key.startswith(self.prefix)

    def feature_key(self, source_key: str) -> str:
        """The feature file key for a source key: ``<prefix><source key>.npy``."""
        return feature_key(self.prefix, source_key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


# ---------------------------------------------------------------------------- output templates

# What an output template may hold, each at most once, each a whole path segment.
PLACEHOLDERS = ("model", "fingerprint")
_PLACEHOLDER_SEGMENTS = frozenset("{" + name + "}" for name in PLACEHOLDERS)
# The stack's layout, and what the tools look for under a root given without placeholders.
DEFAULT_FIELDS = ("model", "fingerprint")
# consumer.features.FeatureSettings.fingerprint(): 16 hex digits. A folder of another shape is
# never a version, which keeps a flat output's own folders (images/, cats/) out of the list.
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Folders the consumer keeps beside its feature files (the quarantine's markers and the dedupe
# index in _bottleneck/, --layout shards in shards/): never a model's folder.
RESERVED_FOLDERS = frozenset({"_bottleneck", "shards"})


def model_segment(name: str) -> str:
    """A timm model name as one safe path segment.

    Letters, digits, ``.``, ``_`` and ``-`` are kept; every run of anything else (the ``:`` and
    ``/`` of ``hf-hub:timm/ViT-B-16-SigLIP``, spaces) becomes one ``-``:
    ``resnet50.a1_in1k`` stays as it is, ``hf-hub:timm/ViT-B-16-SigLIP`` becomes
    ``hf-hub-timm-ViT-B-16-SigLIP``. Two names can meet in one segment (``a:b`` and ``a/b``);
    the fingerprint beside it, which covers the exact name, still keeps their files apart.
    Raises ``ValueError`` for a name that leaves no usable segment.
    """
    segment = _UNSAFE.sub("-", name.strip())
    if segment.strip("-.") == "" or segment in RESERVED_FOLDERS:
        raise ValueError(f"model name {name!r} makes no usable folder name ({segment!r})")
    return segment


@dataclass(frozen=True, slots=True)
class OutputTemplate:
    """An output location whose last segments may be placeholders: ``root`` + ``fields``.

    ``s3://feats/features/{model}/{fingerprint}/`` is the root ``s3://feats/features/`` with
    the fields ``("model", "fingerprint")``; a URI without placeholders is its own root, with no
    fields, and means exactly what :meth:`S3Location.parse` makes of it.
    """

    root: S3Location
    fields: tuple[str, ...] = ()

    @classmethod
    def parse(cls, uri: str, option: str = "") -> OutputTemplate:
        """Parse ``s3://bucket/static/prefix/{model}/{fingerprint}/`` (placeholders optional).

        Placeholders are ``{model}`` and ``{fingerprint}``, each at most once, each a whole
        path segment, after every static segment. Anything else in braces is an
        :class:`InvalidS3Uri` whose one line names ``option``.
        """
        bucket, key = split_s3_uri(uri, option)
        segments = key.split("/")
        first = next((i for i, s in enumerate(segments) if "{" in s or "}" in s), None)
        if first is None:
            return cls(S3Location.parse(uri, option))
        lead = f"{option} " if option else ""
        tail = segments[first:]
        if tail[-1] == "":
            tail.pop()
        fields: list[str] = []
        for segment in tail:
            if segment not in _PLACEHOLDER_SEGMENTS:
                if "{" in segment or "}" in segment:
                    raise InvalidS3Uri(
                        f"{lead}has {segment!r} in {uri!r}: the placeholders are {{model}} and "
                        "{fingerprint}, each a whole path segment"
                    )
                raise InvalidS3Uri(
                    f"{lead}has {segment!r} after a placeholder in {uri!r}: placeholders come "
                    "last (s3://bucket/prefix/{model}/{fingerprint}/)"
                )
            if segment[1:-1] in fields:
                raise InvalidS3Uri(f"{lead}has {segment} twice in {uri!r}")
            fields.append(segment[1:-1])
        # The root is the key up to the first placeholder, exactly as written.
        root = "".join(f"{segment}/" for segment in segments[:first])
        return cls(S3Location(bucket, root), tuple(fields))

    @property
    def key_prefix(self) -> str:
        """The prefix as written, placeholders included (``features/{model}/{fingerprint}/``)."""
        return self.root.prefix + "".join("{" + name + "}/" for name in self.fields)

    @property
    def templated(self) -> bool:
        """Whether the output holds placeholders (else it is one concrete location)."""
        return bool(self.fields)

    def expand(self, model: str, fingerprint: str) -> S3Location:
        """The concrete output for a model (any timm name: see :func:`model_segment`) and a
        fingerprint (16 hex digits); the root itself when there are no placeholders."""
        if not _FINGERPRINT.fullmatch(fingerprint):
            raise ValueError(f"fingerprint must be 16 hex digits, got {fingerprint!r}")
        values = {"model": model_segment(model), "fingerprint": fingerprint}
        prefix = self.root.prefix + "".join(f"{values[name]}/" for name in self.fields)
        return S3Location(self.root.bucket, prefix)

    def fits(self, depth: int, segment: str) -> bool:
        """Whether ``segment`` can be the value of the field at ``depth`` (0 under the root)."""
        if segment in RESERVED_FOLDERS:
            return False
        if self.fields[depth] == "fingerprint":
            return bool(_FINGERPRINT.fullmatch(segment))
        return bool(_SEGMENT.fullmatch(segment)) and segment.strip(".") != ""

    def __str__(self) -> str:
        return f"s3://{self.root.bucket}/{self.key_prefix}"


@dataclass(frozen=True, slots=True)
class Versions:
    """The versions found under a root: their locations in key order, the root's other
    folders (holding no version: files of a flat output, say), and the listing calls made."""

    root: S3Location
    found: tuple[S3Location, ...] = ()
    others: tuple[str, ...] = ()
    requests: int = 0

    def label(self, version: S3Location) -> str:
        """``<model>/<fingerprint>``: a version's path under the root, without its last ``/``."""
        return version.prefix[len(self.root.prefix) :].rstrip("/")

    @property
    def labels(self) -> list[str]:
        return [self.label(version) for version in self.found]


def list_versions(
    s3: S3Client, template: OutputTemplate, *, max_folders: int | None = None
) -> Versions:
    """The versions under ``template``'s root: a ListObjectsV2 with ``Delimiter='/'`` per folder
    and page of 1,000 folders, level by level (one call for the root, then one per folder it
    holds for a two-field template); files are never listed.

    A folder is a version when each segment fits its field (a fingerprint is 16 hex digits; a
    model any safe segment but ``_bottleneck`` and ``shards``). ``max_folders`` gives up where
    the root holds more folders than that (``Versions`` then finds none): a root that was guessed,
    not named by a template, may be a flat output with thousands of folders. A template without
    fields finds nothing. AWS errors are raised.
    """
    root = template.root
    if not template.fields:
        return Versions(root)
    top, requests = _folders(s3, root.bucket, root.prefix)
    if max_folders is not None and len(top) > max_folders:
        return Versions(root, requests=requests)
    frontier = [folder for folder in top if template.fits(0, folder[len(root.prefix) : -1])]
    for depth in range(1, len(template.fields)):
        deeper: list[str] = []
        for prefix in frontier:
            folders, calls = _folders(s3, root.bucket, prefix)
            requests += calls
            deeper += [f for f in folders if template.fits(depth, f[len(prefix) : -1])]
        frontier = deeper
    found = tuple(S3Location(root.bucket, prefix) for prefix in sorted(frontier))
    others = tuple(
        folder
        for folder in top
        if folder[len(root.prefix) : -1] not in RESERVED_FOLDERS
        and not any(version.prefix.startswith(folder) for version in found)
    )
    return Versions(root, found, others, requests)


def find_versions(s3: S3Client, template: OutputTemplate, *, max_folders: int = 100) -> Versions:
    """The versions a tool should look at for an output it was given.

    A template is listed by its own fields. A plain location is a guess: it is listed as the
    stack's layout (:data:`DEFAULT_FIELDS`), giving up past ``max_folders`` folders in it (a
    root of versions holds a few model folders, a flat output's folders can be many), and each
    folder found is confirmed by one of its feature files, whose ``fingerprint`` metadata must
    be the folder's name (a ListObjectsV2 and a HeadObject each): a flat output whose images
    happen to lie in 16-hex-digit folders stays flat. No version found means a flat output, to
    be treated as it always was.
    """
    if template.templated:
        return list_versions(s3, template)
    guess = OutputTemplate(template.root, DEFAULT_FIELDS)
    listed = list_versions(s3, guess, max_folders=max_folders)
    requests = listed.requests
    kept: list[S3Location] = []
    others = set(listed.others)
    for version in listed.found:
        confirmed, calls = _confirm(s3, version, listed.label(version).rsplit("/", 1)[-1])
        requests += calls
        if confirmed:
            kept.append(version)
        else:
            others.add(listed.root.prefix + listed.label(version).split("/", 1)[0] + "/")
    others -= {folder for folder in others if any(v.prefix.startswith(folder) for v in kept)}
    return Versions(listed.root, tuple(kept), tuple(sorted(others)), requests)


def _confirm(s3: S3Client, version: S3Location, fingerprint: str) -> tuple[bool, int]:
    """Whether a feature file in ``version`` carries ``fingerprint``, and the calls it took."""
    page = s3.list_objects_v2(Bucket=version.bucket, Prefix=version.prefix, MaxKeys=100)
    for item in page.get("Contents", []):
        rest = item["Key"][len(version.prefix) :]
        if not rest.endswith(".npy") or rest.startswith(tuple(f"{f}/" for f in RESERVED_FOLDERS)):
            continue
        try:
            head = s3.head_object(Bucket=version.bucket, Key=item["Key"])
        except Exception as exc:  # botocore's ClientError; this module imports no botocore
            status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                return True, 2  # deleted since the listing: nothing says otherwise
            raise
        metadata = {k.lower(): v for k, v in head.get("Metadata", {}).items()}
        return metadata.get("fingerprint") == fingerprint, 2
    # Only the consumer's own folders so far: nothing of a flat output's kind.
    return True, 1


def _folders(s3: S3Client, bucket: str, prefix: str) -> tuple[list[str], int]:
    """The folders directly under ``prefix``, and the calls it took (one per page)."""
    folders: list[str] = []
    calls = 0
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        calls += 1
        folders += [str(item["Prefix"]) for item in page.get("CommonPrefixes", [])]
    return folders, calls
