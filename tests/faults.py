"""A fault-injecting proxy around boto3 clients: chosen operations fail on chosen call numbers.

``Faulty(client, {"put_object": Fault("throttle", calls={2, 3})})`` behaves like ``client``
except that the 2nd and 3rd ``put_object`` calls raise what AWS sends when it throttles.
``Fault("server", every=3)`` fails every third call instead, and ``key="a.jpg"`` counts (and
fails) only the calls on that object key, so that one image's retries can be exhausted whatever
the other threads do. Kinds:

- ``throttle``: ``SlowDown`` / HTTP 503 (S3) or ``ThrottlingException`` / 400 (SQS);
- ``server``: ``InternalError`` (S3) or ``InternalFailure`` (SQS) / HTTP 500;
- ``reset``: the connection closed under the request (``ConnectionClosedError``);
- ``unreachable``: no connection at all (``EndpointConnectionError``);
- ``conflict``: ``ConditionalRequestConflict`` / HTTP 409 (S3's concurrent conditional writes);
- ``partial``: for ``*_batch`` operations, the first entry comes back in ``Failed`` (an
  ``InternalError`` on SQS's side) and is not carried out; the others are;
- ``stale``: like ``partial``, but the entry fails with ``ReceiptHandleIsInvalid`` (the message
  has been delivered to someone else since).

``after=True`` carries the call out first and then raises: the request reached AWS but the
response was lost (a reset while reading it), so a retry repeats a call that already happened.

The proxy bypasses the client's own (botocore) retries: every injected fault reaches the
consumer's code, which must cope with it. It counts calls and injections so that a test can show
that its faults really happened.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import botocore.exceptions

KINDS = ("throttle", "server", "reset", "unreachable", "conflict", "partial", "stale")


@dataclass(frozen=True)
class Fault:
    """Fail the calls numbered in ``calls`` (1-based), or every ``every``-th call, with ``kind``."""

    kind: str
    calls: Collection[int] = ()
    every: int = 0
    limit: int = 1_000_000  # at most this many injections
    after: bool = False  # carry the call out, then fail (the response was lost)
    key: str | None = None  # only calls with this ``Key`` count

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if not self.calls and self.every <= 0:
            raise ValueError("a fault needs call numbers or every=N")

    def due(self, number: int) -> bool:
        return number in self.calls or (self.every > 0 and number % self.every == 0)


def client_error(code: str, status: int, operation: str) -> botocore.exceptions.ClientError:
    """The exception botocore raises for an AWS error response."""
    response: Any = {
        "Error": {"Code": code, "Message": f"injected {code}"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return botocore.exceptions.ClientError(response, operation)


_ERRORS = {
    ("s3", "throttle"): ("SlowDown", 503),
    ("sqs", "throttle"): ("ThrottlingException", 400),
    ("s3", "server"): ("InternalError", 500),
    ("sqs", "server"): ("InternalFailure", 500),
    ("s3", "conflict"): ("ConditionalRequestConflict", 409),
}
_FAILED_ENTRY = {
    "partial": ("InternalError", False),
    "stale": ("ReceiptHandleIsInvalid", True),
}


class Faulty:
    """Proxy a boto3 client; inject the planned faults; count calls and injections."""

    def __init__(self, client: Any, plan: dict[str, Fault]) -> None:
        self._client = client
        self._plan = plan
        self._service = client.meta.service_model.service_name
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        fault = self._plan.get(name)
        if fault is None or not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            if fault.key is not None and kwargs.get("Key") != fault.key:
                return attribute(*args, **kwargs)
            with self._lock:
                self.calls[name] += 1
                due = fault.due(self.calls[name]) and self.injected[name] < fault.limit
                if due:
                    self.injected[name] += 1
            if not due:
                return attribute(*args, **kwargs)
            return self._inject(name, fault, attribute, kwargs)

        return call

    def _inject(self, name: str, fault: Fault, attribute: Any, kwargs: dict[str, Any]) -> Any:
        if fault.kind in _FAILED_ENTRY:
            return self._failed_entry(fault.kind, attribute, kwargs)
        if fault.after:
            attribute(**kwargs)
        operation = "".join(part.title() for part in name.split("_"))
        if fault.kind == "reset":
            raise botocore.exceptions.ConnectionClosedError(endpoint_url="http://injected")
        if fault.kind == "unreachable":
            raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://injected")
        code, status = _ERRORS[(self._service, fault.kind)]
        raise client_error(code, status, operation)

    @staticmethod
    def _failed_entry(kind: str, attribute: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        first, *rest = kwargs["Entries"]
        response = attribute(**{**kwargs, "Entries": rest}) if rest else {}
        code, sender_fault = _FAILED_ENTRY[kind]
        failed = {
            "Id": first["Id"],
            "SenderFault": sender_fault,
            "Code": code,
            "Message": f"injected {code}",
        }
        return {
            "Successful": list(response.get("Successful", [])),
            "Failed": [*response.get("Failed", []), failed],
        }
