"""The object calls through a boto3 client (moto in-process tests, odd keys, the fallback).

Retries are :func:`consumer.aws.call`'s, the one layer of every consumer AWS call (botocore's
own are off, see :mod:`bottleneck_contract.retry`); what outlives them is a botocore error that
:func:`consumer.errors.classify` settles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from consumer import aws
from consumer.errors import PermanentError
from consumer.objects import ConditionFailed, Existing, Fetched, SizeCallback, strip_etag

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


class BotoObjects:
    """:class:`~consumer.objects.ObjectClient` over a boto3 S3 client."""

    name = "boto3"

    def __init__(self, s3: Any) -> None:
        self.s3 = s3

    def get(
        self, bucket: str, key: str, *, max_bytes: int, on_size: SizeCallback | None = None
    ) -> Fetched:
        response = aws.call(self.s3.get_object, Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            length = int(response.get("ContentLength", 0))
            if length > max_bytes:
                raise PermanentError(
                    "too-large", f"object is {length} bytes; the limit is {max_bytes}"
                )
            if on_size is not None:
                on_size(length)
            data = body.read()
        finally:
            body.close()
        return Fetched(data, strip_etag(response.get("ETag")))

    def head(self, bucket: str, key: str) -> Existing | None:
        try:
            response = aws.call(self.s3.head_object, Bucket=bucket, Key=key)
        except Exception as exc:
            if aws.error_code(exc) in _NOT_FOUND:
                return None
            raise
        return Existing(strip_etag(response.get("ETag")), dict(response.get("Metadata", {})))

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
        condition: dict[str, Any] = (
            {"IfNoneMatch": "*"} if if_match is None else {"IfMatch": f'"{if_match}"'}
        )
        try:
            response = aws.call(
                self.s3.put_object,
                Bucket=bucket,
                Key=key,
                Body=body,
                Metadata=dict(metadata),
                ContentType=content_type,
                **condition,
            )
        except Exception as exc:
            code = aws.error_code(exc)
            # S3 answers an If-Match on a key that no longer exists with 404, not 412: either
            # way the version we meant to replace is gone.
            if code == "PreconditionFailed" or (if_match is not None and code in _NOT_FOUND):
                raise ConditionFailed(f"s3://{bucket}/{key}") from exc
            raise
        return strip_etag(response.get("ETag"))

    def delete(self, bucket: str, key: str, *, if_match: str) -> bool:
        try:
            aws.call(self.s3.delete_object, Bucket=bucket, Key=key, IfMatch=f'"{if_match}"')
        except Exception as exc:
            if aws.error_code(exc) == "PreconditionFailed" or aws.error_code(exc) in _NOT_FOUND:
                return False
            raise
        return True

    def copy(
        self,
        bucket: str,
        source_key: str,
        key: str,
        *,
        metadata: Mapping[str, str],
        content_type: str,
    ) -> None:
        aws.call(
            self.s3.copy_object,
            Bucket=bucket,
            Key=key,
            CopySource={"Bucket": bucket, "Key": source_key},
            Metadata=dict(metadata),
            MetadataDirective="REPLACE",
            ContentType=content_type,
        )
