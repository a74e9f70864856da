"""The object calls through obstore (Rust ``object_store``): native code, the GIL released.

One ``S3Store`` per bucket, made on first use. Endpoint and region are the ones the consumer's
boto3 S3 client resolved (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, the config file, the
region chain), so both clients always talk to the same place; plain ``http://`` endpoints (moto,
LocalStack) are allowed only when one is configured. Credentials: where boto3 found them in the
environment, the container endpoint that ECS and Batch give a job
(``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI``), a web identity or the instance profile, obstore
resolves and refreshes them itself, natively; anything else boto3 knows (profiles, SSO, assumed
roles from the config file) is handed over through obstore's boto3 credential provider.

Retries happen once, here, in obstore's client (:data:`RETRY`): 5xx (S3's ``SlowDown`` throttling
is a 503), 429, 408, connection failures and, for the idempotent GET and HEAD, timeouts and resets,
with capped exponential backoff and jitter. A create-only PUT whose response was lost is either
retried by obstore (the connection closed before any response: S3 then answers 412 if the first
attempt had landed) or fails as transient; in both cases the write protocol's HEAD + fingerprint
check counts a file that did land as done. What outlives the retries is raised as the consumer's
own :class:`~consumer.errors.PermanentError` / :class:`~consumer.errors.TransientError`, with the
codes that :func:`consumer.errors.classify` gives the same S3 answer from botocore.

obstore parses keys as ``object_store`` paths, which cannot carry every S3 key: a leading or
trailing ``/`` would be dropped silently (another object!), and empty, ``.`` or ``..`` segments
and control characters are refused. Such keys go through the boto3 fallback unchanged.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import AlreadyExistsError, PreconditionError

from consumer.errors import PermanentError, TransientError, aws_failure
from consumer.objects import (
    ConditionFailed,
    Existing,
    Fetched,
    GetAbandoned,
    ObjectClient,
    SizeCallback,
    strip_etag,
)

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3CredentialProvider, S3Store

# The same policy as botocore's standard mode for these calls (up to 5 attempts, backoff doubling
# from 100 ms, capped at 5 s), bounded in total well inside a message's visibility timeout.
RETRY: RetryConfig = {
    "max_retries": 4,
    "backoff": {
        "init_backoff": timedelta(milliseconds=100),
        "max_backoff": timedelta(seconds=5),
        "base": 2,
    },
    "retry_timeout": timedelta(seconds=60),
}
# As the boto3 client's: 5 s to connect; a whole request (a GET of up to --max-image-bytes
# included) within 60 s.
TIMEOUTS: ClientConfig = {"connect_timeout": "5s", "timeout": "60s"}

# Attributes obstore returns beside the user metadata (which it returns under its own names).
_STANDARD_ATTRIBUTES = frozenset(
    {
        "Content-Disposition",
        "Content-Encoding",
        "Content-Language",
        "Content-Type",
        "Cache-Control",
        "Storage-Class",
    }
)
# Credential sources (botocore's names) that object_store resolves natively from the same
# environment variables and endpoints.
_NATIVE_CREDENTIALS = frozenset(
    {"env", "container-role", "iam-role", "assume-role-with-web-identity"}
)
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([^<]+)</Code>")


# Characters obstore refuses in a path. The segments are checked with substring tests and the
# characters with one regular expression, not in a loop over the key in Python: this runs twice
# per image, and such a loop cost more the longer the key.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def native_key(key: str) -> bool:
    """Whether obstore addresses exactly the S3 object ``key`` (see the module docstring)."""
    # No empty, "." or ".." segment: a leading, trailing or doubled slash makes an empty one.
    padded = f"/{key}/"
    if "//" in padded or "/./" in padded or "/../" in padded:
        return False
    return _CONTROL.search(key) is None


class NativeObjects:
    """:class:`~consumer.objects.ObjectClient` over obstore's ``S3Store``; ``fallback`` (boto3)
    serves the keys obstore cannot address."""

    name = "obstore"

    def __init__(
        self,
        fallback: ObjectClient,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        credential_provider: S3CredentialProvider | None = None,
        retry: RetryConfig | None = None,
        client_options: ClientConfig | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.region = region
        self.fallback = fallback
        self.credential_provider = credential_provider
        self.retry = RETRY if retry is None else retry
        self.client_options: ClientConfig = {**TIMEOUTS, **(client_options or {})}
        if endpoint is not None and urlsplit(endpoint).scheme == "http":
            self.client_options["allow_http"] = True
        self._stores: dict[str, S3Store] = {}
        self._lock = threading.Lock()

    @classmethod
    def like(cls, s3: Any, *, fallback: ObjectClient) -> NativeObjects:
        """A native client for where the boto3 client ``s3`` talks, with its credentials."""
        endpoint = s3.meta.endpoint_url
        host = urlsplit(endpoint).hostname or ""
        # AWS's own endpoints are left to obstore, which builds the regional one itself.
        if host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn"):
            endpoint = None
        return cls(
            fallback,
            endpoint=endpoint,
            region=s3.meta.region_name,
            credential_provider=_credential_provider(),
        )

    def get(
        self, bucket: str, key: str, *, max_bytes: int, on_size: SizeCallback | None = None
    ) -> Fetched:
        if not native_key(key):
            return self.fallback.get(bucket, key, max_bytes=max_bytes, on_size=on_size)
        try:
            result = obstore.get(self._store(bucket), key)
            size = int(result.meta["size"])
            if size > max_bytes:
                # Dropping the result closes its connection without reading the body.
                raise PermanentError(
                    "too-large", f"object is {size} bytes; the limit is {max_bytes}"
                )
            if on_size is not None:
                try:
                    on_size(size)
                except GetAbandoned:
                    # The traceback keeps this frame alive: the response (its connection and
                    # the body arriving on it) must go now, not when the caller is done.
                    del result
                    raise
            data = bytes(result.bytes())
            etag = strip_etag(result.meta["e_tag"])
        except (PermanentError, TransientError, GetAbandoned):
            raise
        except Exception as exc:
            raise translate(exc, "GET", bucket, key) from exc
        return Fetched(data, etag)

    def head(self, bucket: str, key: str) -> Existing | None:
        if not native_key(key):
            return self.fallback.head(bucket, key)
        try:
            # A GET with ``head`` is a real HEAD that, unlike ``obstore.head``, returns the
            # object's attributes, user metadata included.
            result = obstore.get(self._store(bucket), key, options={"head": True})
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise translate(exc, "HEAD", bucket, key) from exc
        metadata = {
            str(name): value
            for name, value in result.attributes.items()
            if name not in _STANDARD_ATTRIBUTES
        }
        return Existing(strip_etag(result.meta["e_tag"]), metadata)

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
        if not native_key(key):
            return self.fallback.put(
                bucket, key, body, metadata=metadata, content_type=content_type, if_match=if_match
            )
        # obstore would send UTF-8 bytes that S3 mangles; the contract keeps values ASCII.
        # Checked joined (two calls per image); the pair at fault is looked for only then.
        if not ("".join(metadata).isascii() and "".join(metadata.values()).isascii()):
            name, value = next(
                (n, v) for n, v in metadata.items() if not (n.isascii() and v.isascii())
            )
            raise ValueError(f"metadata {name!r} is not ASCII: {value!r}")
        attributes: dict[str, str] = {"Content-Type": content_type, **metadata}
        mode: Any = "create" if if_match is None else {"e_tag": f'"{if_match}"'}
        try:
            result = obstore.put(
                self._store(bucket),
                key,
                body,
                attributes=attributes,
                mode=mode,
                use_multipart=False,
            )
        except (AlreadyExistsError, PreconditionError) as exc:
            # 412, S3's 409 ConditionalRequestConflict on a create (obstore reports both as
            # "already exists"), or an If-Match on a deleted key: the write protocol looks.
            raise ConditionFailed(f"s3://{bucket}/{key}") from exc
        except Exception as exc:
            raise translate(exc, "PUT", bucket, key) from exc
        return strip_etag(result["e_tag"])

    def delete(self, bucket: str, key: str, *, if_match: str) -> bool:
        # object_store has no conditional delete; this runs only for images deleted while in
        # flight, so botocore's cost here does not matter.
        return self.fallback.delete(bucket, key, if_match=if_match)

    def copy(
        self,
        bucket: str,
        source_key: str,
        key: str,
        *,
        metadata: Mapping[str, str],
        content_type: str,
    ) -> None:
        # object_store's copy keeps the source's metadata; ours must say which image it is for.
        # One request per duplicate image, and it saves a decode and a forward pass.
        self.fallback.copy(bucket, source_key, key, metadata=metadata, content_type=content_type)

    def _store(self, bucket: str) -> S3Store:
        store = self._stores.get(bucket)
        if store is None:
            with self._lock:
                store = self._stores.get(bucket)
                if store is None:
                    store = self._stores[bucket] = self._new_store(bucket)
        return store

    def _new_store(self, bucket: str) -> S3Store:
        from obstore.store import S3Store

        config: dict[str, Any] = {}
        if self.endpoint is not None:
            config["endpoint"] = self.endpoint
        if self.region is not None:
            config["region"] = self.region
        return S3Store(
            bucket,
            config=config,  # type: ignore[arg-type]
            client_options=self.client_options,
            retry_config=self.retry,
            credential_provider=self.credential_provider,
        )


def translate(exc: BaseException, method: str, bucket: str, key: str) -> Exception:
    """An obstore error that outlived its retries, as the consumer's error family."""
    message = str(exc).split("\n\nDebug source:", 1)[0]
    status = _STATUS.search(message)
    code = _CODE.search(message)
    where = f"{method} s3://{bucket}/{key}"
    if isinstance(exc, FileNotFoundError) and code is None:
        code_text = "404"
    elif code is not None:
        code_text = code.group(1)
    elif status is not None:
        code_text = status.group(1)  # HEAD answers carry no body: botocore's code is the status
    else:
        # No HTTP answer at all: connection refused or reset, timeout, DNS, credentials.
        return TransientError("aws-unavailable", f"{where}: {' '.join(message.split())}")
    detail = f"{where}: {code_text}: {' '.join(message.split())}"
    failure = aws_failure(code_text, detail)
    if failure.permanent:
        return PermanentError(failure.error_code, failure.detail)
    return TransientError(failure.error_code, failure.detail)


def _credential_provider() -> S3CredentialProvider | None:
    """``None`` (obstore's own chain) where it resolves what boto3 found; else boto3's."""
    import boto3

    session = boto3.Session()
    credentials = session.get_credentials()
    if credentials is None or credentials.method in _NATIVE_CREDENTIALS:
        return None
    from obstore.auth.boto3 import Boto3CredentialProvider

    # botocore refreshes credentials at least 10 minutes before they expire: holding a frozen
    # copy for 5 minutes never uses an expired one.
    return Boto3CredentialProvider(session, ttl=timedelta(minutes=5))
