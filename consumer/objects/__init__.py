"""The hot path's object calls behind one small interface, with two implementations.

The consumer makes three kinds of S3 request per image: a GET into memory, a conditional PUT
(create-only, or ``If-Match`` on a seen ETag) with user metadata, and a HEAD that returns user
metadata; and, rarely, a conditional DELETE (a feature file written for an image deleted
meanwhile) and, with ``--dedupe content``, a server-side COPY. :class:`ObjectClient` is exactly
that surface; :mod:`consumer.storage` builds the idempotent write protocol on top of it.

- :class:`consumer.objects.native.NativeObjects` (obstore, Rust ``object_store``): the request,
  its signing, retries and body handling run in native code with the GIL released. The default
  in production: botocore costs about a millisecond of GIL-holding CPU per request, which is a
  large share of the per-image budget on a GPU instance.
- :class:`consumer.objects.boto.BotoObjects` (boto3): the same calls through a boto3 client, for
  moto in-process tests (``mock_aws`` intercepts only botocore), for object keys that obstore's
  path rules cannot carry exactly, and as a fallback (``--s3-client boto3``).

Both raise the consumer's own error family for failures that outlive their retries
(:class:`~consumer.errors.PermanentError` with ``not-found`` and friends, or a boto3 error that
:func:`~consumer.errors.classify` settles the same way), and :class:`ConditionFailed` when a
conditional PUT's precondition does not hold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from consumer.errors import ConfigError

S3_CLIENTS = ("auto", "obstore", "boto3")


@dataclass(frozen=True, slots=True)
class Fetched:
    """An object's bytes and its ETag (without quotes)."""

    data: bytes
    etag: str


@dataclass(frozen=True, slots=True)
class Existing:
    """What a HEAD returned: the ETag (without quotes) and the user metadata."""

    etag: str
    metadata: dict[str, str]


class ConditionFailed(Exception):
    """A conditional PUT lost: the object exists (create-only) or is not the version named."""


class GetAbandoned(Exception):
    """Raised by a GET's ``on_size`` to end it with its body unread; ``get`` lets it through."""


SizeCallback = Callable[[int], None]


class ObjectClient(Protocol):
    """GET into memory, HEAD with user metadata, the conditional PUT and DELETE, and COPY."""

    name: str

    def get(
        self, bucket: str, key: str, *, max_bytes: int, on_size: SizeCallback | None = None
    ) -> Fetched:
        """The object's bytes; over ``max_bytes`` raises ``PermanentError("too-large")`` before
        the body is read; a missing object or bucket raises ``PermanentError("not-found")``.

        ``on_size`` is called with the object's size once the response's headers are in (and
        within ``max_bytes``), before the body is read: it may wait (for a memory budget), and
        :class:`GetAbandoned` raised there ends the GET unread and reaches the caller as is."""
        ...

    def head(self, bucket: str, key: str) -> Existing | None:
        """The object's ETag and user metadata, or ``None`` when there is no such object."""
        ...

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
        """Write ``body``: create-only (``If-None-Match: *``) when ``if_match`` is ``None``, else
        only over the version whose ETag is ``if_match``; :class:`ConditionFailed` otherwise.
        Metadata values must be ASCII (the contract percent-encodes them). Returns the new
        object's ETag (without quotes)."""
        ...

    def delete(self, bucket: str, key: str, *, if_match: str) -> bool:
        """Delete the object only while its ETag is ``if_match``; ``False`` when it has changed
        or is already gone (nothing deleted)."""
        ...

    def copy(
        self,
        bucket: str,
        source_key: str,
        key: str,
        *,
        metadata: Mapping[str, str],
        content_type: str,
    ) -> None:
        """Copy ``source_key`` to ``key`` in ``bucket`` server-side, with ``metadata`` and
        ``content_type`` instead of the source's; a missing source raises ``not-found``."""
        ...


def strip_etag(etag: str | None) -> str:
    return (etag or "").strip('"')


def native_available() -> bool:
    """Whether obstore can be imported (``auto`` picks it then)."""
    try:
        import obstore  # noqa: F401
    except ImportError:
        return False
    return True


def open_objects(choice: str, s3: Any) -> ObjectClient:
    """The implementation ``--s3-client`` names, talking to where the boto3 client ``s3`` talks.

    ``auto`` is obstore when it can be imported, else boto3. The native client takes its endpoint
    and region from ``s3`` (so ``AWS_ENDPOINT_URL(_S3)``, the config file and the region chain
    resolve exactly as for every other AWS call) and keeps ``s3`` for the keys it cannot carry.
    """
    from consumer.objects.boto import BotoObjects

    boto = BotoObjects(s3)
    if choice == "boto3" or (choice == "auto" and not native_available()):
        return boto
    if not native_available():
        raise ConfigError("--s3-client obstore: the obstore package is not installed")
    from consumer.objects.native import NativeObjects

    return NativeObjects.like(s3, fallback=boto)
