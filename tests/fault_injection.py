"""A fault-injecting proxy around boto3 clients: chosen operations fail on chosen calls.

``Faulty(client, {"put_object": Fault("throttle", every=3)})`` behaves like ``client`` except that
every third ``put_object`` raises what AWS would send for throttling. Kinds:

- ``throttle``: ``SlowDown`` / HTTP 503 (S3) or ``ThrottlingException`` / 400 (SQS);
- ``server``: ``InternalError`` / HTTP 500;
- ``reset``: the connection closed under the request (``ConnectionClosedError``);
- ``conflict``: ``ConditionalRequestConflict`` / HTTP 409 (S3's concurrent conditional writes);
- ``partial``: for ``*_batch`` operations, the first entry comes back in ``Failed`` and is not
  carried out, the others are (what SQS does when one entry of a batch hits an internal error).

The proxy counts calls and injected faults so that a test can show its faults really happened.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import botocore.exceptions


@dataclass(frozen=True)
class Fault:
    """Fail calls number ``every``, ``2 * every``, ... of an operation with ``kind``."""

    kind: str
    every: int = 3
    limit: int = 1_000_000  # at most this many injections


def client_error(code: str, status: int, operation: str) -> botocore.exceptions.ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": f"injected {code}"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return botocore.exceptions.ClientError(response, operation)


_ERRORS = {
    "throttle": ("SlowDown", 503),
    "server": ("InternalError", 500),
    "conflict": ("ConditionalRequestConflict", 409),
}


class Faulty:
    """Proxy a boto3 client; inject the planned faults; count calls and injections."""

    def __init__(self, client: Any, plan: dict[str, Fault]) -> None:
        self._client = client
        self._plan = plan
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        fault = self._plan.get(name)
        if fault is None or not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
                due = self.calls[name] % fault.every == 0 and self.injected[name] < fault.limit
                if due:
                    self.injected[name] += 1
            if not due:
                return attribute(*args, **kwargs)
            return self._inject(name, fault.kind, attribute, kwargs)

        return call

    def _inject(self, name: str, kind: str, attribute: Any, kwargs: dict[str, Any]) -> Any:
        operation = "".join(part.title() for part in name.split("_"))
        if kind == "reset":
            raise botocore.exceptions.ConnectionClosedError(endpoint_url="http://injected")
        if kind == "partial":
            return self._partial(attribute, kwargs)
        if kind == "throttle" and self._client.meta.service_model.service_name == "sqs":
            raise client_error("ThrottlingException", 400, operation)
        code, status = _ERRORS[kind]
        raise client_error(code, status, operation)

    @staticmethod
    def _partial(attribute: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        first, *rest = kwargs["Entries"]
        response = attribute(**{**kwargs, "Entries": rest}) if rest else {}
        failed = {
            "Id": first["Id"],
            "SenderFault": False,
            "Code": "InternalError",
            "Message": "injected partial failure",
        }
        return {
            "Successful": list(response.get("Successful", [])),
            "Failed": [*response.get("Failed", []), failed],
        }
