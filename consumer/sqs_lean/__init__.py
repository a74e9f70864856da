"""SQS's hot-path calls without botocore's per-call Python: the AWS JSON 1.0 protocol, signed here.

A boto3 SQS call costs 0.9-1.7 ms of CPU, nearly all of it Python holding the GIL (parameter
validation, serialisation, a dozen event hooks, endpoint rules, signing, parsing the response
against the model, then urllib3's and ``http.client``'s own Python); the consumer makes about
one ReceiveMessage and one DeleteMessageBatch per 10 images, plus the heartbeat's extensions.
:class:`LeanSQS` makes exactly those calls (and the dead-letter ``SendMessageBatch``): the boto3
parameters POSTed as JSON, signed by :mod:`consumer.sqs_lean.sigv4` (the signing key made once a
day) and sent by :mod:`consumer.sqs_lean.keepalive` (one ``sendall`` per request, the response
parsed from a ``recv`` or two), answered with the dict boto3 returns: 0.2-0.4 ms of CPU a call
over kept-alive connections, a quarter of boto3's, and a tenth of a millisecond or less of it
holding the GIL (``python -m benchmarks.sqs_cpu``). Every other attribute is the boto3 client's
own: ``GetQueueAttributes`` and friends are unchanged.

The same as boto3, by construction: the endpoint and region (the boto3 client's ``meta``: the
``AWS_ENDPOINT_URL(_SQS)`` variables and the region chain resolve once, for both); the credentials
(the session's, refreshed by botocore before they expire, frozen per request as botocore does);
TLS verification (the CA bundle that client's HTTP session resolved), timeouts and TCP keep-alive
(its config); errors: an error response is parsed by botocore's own JSON parser and raised as the
client's modeled exception, so the codes (``AWS.SimpleQueueService.NonExistentQueue`` from the
``x-amzn-query-error`` header, ``ThrottlingException``...) are the ones boto3 gives, and connection
failures are botocore's exceptions (``EndpointConnectionError``, ``ConnectionClosedError``,
``ReadTimeoutError``...), so :func:`consumer.aws.is_retryable` and the stale-receipt checks of
:mod:`consumer.sqs` see what they see with boto3. Skipped: parameter validation (the callers are
:class:`consumer.sqs.WorkQueue`'s fixed calls), botocore's event hooks but ``before-call``, which
is emitted for observers only (the benchmarks count requests with it; the consumer registers
none), and botocore's retries (off on the consumer's clients anyway, see
:mod:`bottleneck_contract.retry`). Where that client goes through a proxy, or moto's in-process
mock answers inside botocore, :func:`open_queue_client` keeps boto3.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore
import botocore.client
import botocore.exceptions
import botocore.httpsession
import botocore.parsers
from botocore.credentials import ReadOnlyCredentials

from consumer.errors import ConfigError
from consumer.sqs_lean.keepalive import HttpResponse, KeepAliveHttp
from consumer.sqs_lean.sigv4 import SigV4Signer, amz_timestamp, host_header

SQS_CLIENTS = ("auto", "lean", "boto3")

_TARGET = "AmazonSQS."
_USER_AGENT = f"serverless-bottleneck-lean-sqs Botocore/{botocore.__version__}"
# One attempt, none retried: what botocore reports for the consumer's clients (one attempt
# each, see bottleneck_contract.retry), and what its error messages then say.
_ONE_ATTEMPT = {"RetryAttempts": 0, "MaxAttemptsReached": True}
_OPERATIONS = (
    "ReceiveMessage",
    "DeleteMessageBatch",
    "ChangeMessageVisibilityBatch",
    "SendMessageBatch",
)


class LeanSQS:
    """The boto3 SQS client ``client`` with its hot-path calls made here (module docstring).

    ``credentials`` is a botocore ``Credentials`` (``session.get_credentials()``): refreshable
    ones refresh themselves in ``get_frozen_credentials``, which is called per request, as botocore
    does. ``http`` is the transport (:meth:`like` builds it from the client's settings).
    """

    name = "lean"

    def __init__(
        self,
        client: Any,
        credentials: Any,
        http: KeepAliveHttp,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._credentials = credentials
        self._http = http
        self._clock = clock
        self.endpoint_url: str = client.meta.endpoint_url
        self.region: str = client.meta.region_name
        # The JSON protocol's request URI is "/", joined to the endpoint's path as botocore does.
        self._path = urlsplit(self.endpoint_url).path.rstrip("/") + "/"
        self._host = host_header(self.endpoint_url)
        self._signer = SigV4Signer(self.region)
        service = client.meta.service_model
        self._models = {name: service.operation_model(name) for name in _OPERATIONS}
        self._events = client.meta.events
        self._before_call = {
            name: f"before-call.{service.service_id.hyphenize()}.{name}" for name in _OPERATIONS
        }
        self._parser = botocore.parsers.create_parser("json")

    @classmethod
    def like(cls, client: Any, credentials: Any) -> LeanSQS:
        """A lean client for where the boto3 client ``client`` talks, as it talks there."""
        config = client.meta.config
        https = urlsplit(client.meta.endpoint_url).scheme == "https"
        http = KeepAliveHttp(
            client.meta.endpoint_url,
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            tls=_tls_context(_verify_setting(client)) if https else None,
            tcp_keepalive=bool(config.tcp_keepalive),
            max_idle=config.max_pool_connections,
        )
        return cls(client, credentials, http)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def receive_message(self, **params: Any) -> dict[str, Any]:
        response = self._call("ReceiveMessage", params)
        for message in response.get("Messages", ()):
            if "MessageAttributes" in message:
                _decode_blobs(message["MessageAttributes"])
        return response

    def delete_message_batch(self, **params: Any) -> dict[str, Any]:
        return self._call("DeleteMessageBatch", params)

    def change_message_visibility_batch(self, **params: Any) -> dict[str, Any]:
        return self._call("ChangeMessageVisibilityBatch", params)

    def send_message_batch(self, **params: Any) -> dict[str, Any]:
        return self._call("SendMessageBatch", params)

    def close(self) -> None:
        """Close this client's connections (the boto3 client's are its own, and stay open)."""
        self._http.close()

    def _call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        # The one botocore event kept (3 µs): observers registered on the boto3 client, such as
        # the benchmarks' request counter, see every call. What handlers change is not applied.
        self._events.emit(
            self._before_call[operation],
            model=self._models[operation],
            params={"url_path": self._path, "method": "POST", "headers": {}, "body": params},
            request_signer=None,
            context={},
        )
        body = json.dumps(params, default=_encode_blob).encode()
        headers = {
            "X-Amz-Target": _TARGET + operation,
            "Content-Type": "application/x-amz-json-1.0",
            # As botocore sends it to this query-compatible service: errors then carry their
            # legacy code in x-amzn-query-error, which botocore's parser reports.
            "x-amzn-query-mode": "true",
        }
        now = amz_timestamp(self._clock())
        self._signer.sign(self._host, self._path, headers, body, self._frozen(), now)
        head = (
            f"POST {self._path} HTTP/1.1\r\nHost: {self._host}\r\nUser-Agent: {_USER_AGENT}\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            + f"Content-Length: {len(body)}\r\n\r\n"
        )
        response = self._http.post(head.encode(), body)
        if response.status >= 300:
            raise self._error(operation, response)
        parsed: dict[str, Any] = json.loads(response.body) if response.body else {}
        parsed["ResponseMetadata"] = {
            "RequestId": response.headers.get("x-amzn-requestid", ""),
            "HTTPStatusCode": response.status,
            "HTTPHeaders": response.headers,
            **_ONE_ATTEMPT,
        }
        return parsed

    def _frozen(self) -> ReadOnlyCredentials:
        if self._credentials is None:
            raise botocore.exceptions.NoCredentialsError()
        frozen: ReadOnlyCredentials = self._credentials.get_frozen_credentials()
        return frozen

    def _error(self, operation: str, response: HttpResponse) -> Exception:
        """The exception boto3 raises for this error response (botocore parses it: it is rare)."""
        raw = {"status_code": response.status, "headers": response.headers, "body": response.body}
        parsed = self._parser.parse(raw, self._models[operation].output_shape)
        parsed["ResponseMetadata"].update(_ONE_ATTEMPT)
        # As botocore's SQS handler picks the class: by the modeled name (QueryErrorCode) that the
        # legacy code in Error.Code replaced, e.g. QueueDoesNotExist.
        error = parsed.get("Error", {})
        error_class = self._client.exceptions.from_code(
            error.get("QueryErrorCode") or error.get("Code")
        )
        exception: Exception = error_class(parsed, operation)
        return exception


def _encode_blob(value: Any) -> str:
    # The JSON protocol carries blobs (a message attribute's BinaryValue) as base64 text...
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode()
    raise TypeError(f"cannot send a {type(value).__name__} to SQS")


def _decode_blobs(attributes: dict[str, Any]) -> None:
    # ...and botocore hands them back as bytes.
    for value in attributes.values():
        if "BinaryValue" in value:
            value["BinaryValue"] = base64.b64decode(value["BinaryValue"])
        if "BinaryListValues" in value:
            value["BinaryListValues"] = [base64.b64decode(v) for v in value["BinaryListValues"]]


def _tls_context(verify: bool | str) -> ssl.SSLContext:
    """TLS as botocore's session sets it up: ``verify`` is its resolved setting (``True``, a CA
    bundle from ``AWS_CA_BUNDLE`` or the config file, or ``False``)."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    bundle: str | None = botocore.httpsession.get_cert_path(verify)  # type: ignore[arg-type]
    if bundle is not None and os.path.isdir(bundle):
        return ssl.create_default_context(capath=bundle)
    return ssl.create_default_context(cafile=bundle)


def _verify_setting(client: Any) -> bool | str:
    # The boto3 client's HTTP session holds the TLS setting botocore resolved (client argument,
    # AWS_CA_BUNDLE, the config file's ca_bundle, REQUESTS_CA_BUNDLE): read, never re-derived.
    verify: bool | str = client._endpoint.http_session._verify
    return verify


def _proxy_for(client: Any) -> str | None:
    # The same session knows whether the endpoint is reached through a proxy (HTTPS_PROXY and
    # friends, NO_PROXY, the client's config).
    proxy: str | None = client._endpoint.http_session._proxy_config.proxy_url_for(
        client.meta.endpoint_url
    )
    return proxy


def lean_unavailable(client: Any) -> str | None:
    """Why the lean client cannot stand in for the boto3 SQS client ``client`` (None: it can)."""
    if not isinstance(client, botocore.client.BaseClient):
        return "the SQS client is not a boto3 client"
    meta: Any = client.meta  # botocore's stubs lack some Config attributes
    if meta.service_model.protocol != "json":
        return f"botocore {botocore.__version__} speaks SQS's query protocol, not JSON"
    if meta.config.signature_version not in (None, "v4"):
        return f"the SQS client signs with {meta.config.signature_version}, not SigV4"
    if _moto_in_process():
        return "moto's in-process mock answers inside botocore, which the lean client bypasses"
    try:
        proxy = _proxy_for(client)
        _verify_setting(client)
    except AttributeError:
        return f"botocore {botocore.__version__} does not expose its HTTP session's settings"
    if proxy:
        return "the SQS endpoint is reached through a proxy"
    if meta.config.client_cert:
        return "the SQS client presents a client certificate"
    return None


def _moto_in_process() -> bool:
    # mock_aws answers requests from a botocore "before-send" hook that is switched on while a
    # mock is active; a request made past botocore would go to the real endpoint instead.
    models = sys.modules.get("moto.core.models")
    return bool(getattr(getattr(models, "botocore_stubber", None), "enabled", False))


def open_queue_client(choice: str, client: Any, session: boto3.Session | None = None) -> Any:
    """The SQS client that ``--sqs-client`` names, for :class:`consumer.sqs.WorkQueue`.

    ``auto`` is the lean client wherever it can stand in for the boto3 client ``client``
    (:func:`lean_unavailable`), else ``client`` itself; ``lean`` where it cannot is a
    configuration error. ``session`` is where ``client`` came from: the lean client signs with
    its credentials (the default session's when None).
    """
    if choice == "boto3":
        return client
    reason = lean_unavailable(client)
    if reason is None:
        return LeanSQS.like(client, (session or boto3.Session()).get_credentials())
    if choice == "lean":
        raise ConfigError(f"--sqs-client lean: {reason}")
    return client


def queue_client_name(client: Any) -> str:
    """``lean`` or ``boto3``, for the log."""
    return LeanSQS.name if isinstance(client, LeanSQS) else "boto3"
