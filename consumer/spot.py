"""Spot watch: start the graceful stop when EC2 posts a Spot interruption notice.

EC2 gives a Spot instance two minutes' notice through the instance metadata service
(``/latest/meta-data/spot/instance-action``: 404 until a notice exists, then a small JSON body).
Batch only sends SIGTERM when the instance is already going, so polling buys the worker time to
finish its batch, write it, and release everything else for a worker elsewhere. IMDSv2 is used
(a session token first), since instances launched with IMDSv1 disabled refuse plain GETs.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0
_TOKEN_TTL = "21600"
_TIMEOUT = 2.0


class SpotWatch(threading.Thread):
    """Polls the metadata service every ``interval`` seconds; calls ``on_notice`` once."""

    def __init__(
        self,
        endpoint: str,
        on_notice: Callable[[str], None],
        *,
        interval: float = POLL_SECONDS,
    ) -> None:
        super().__init__(name="spot-watch", daemon=True)
        self.endpoint = endpoint.rstrip("/")
        self.on_notice = on_notice
        self.interval = interval
        self.notice: dict[str, str] | None = None
        self._halt = threading.Event()
        self._token: str | None = None
        self._failures = 0

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.is_set():
            notice = self.check()
            if notice is not None:
                self.notice = notice
                log.warning(
                    "spot interruption notice; stopping gracefully", extra={"fields": notice}
                )
                self.on_notice("spot-interruption")
                return
            self._halt.wait(self.interval)

    def check(self) -> dict[str, str] | None:
        """One poll: the notice (``{"action": ..., "time": ...}``) if EC2 has posted one."""
        try:
            body = self._get("/latest/meta-data/spot/instance-action")
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                self._token = None  # expired session token: fetch a new one next time
            elif exc.code != 404:
                self._unreachable(exc)
            return None
        except (OSError, ValueError) as exc:
            self._unreachable(exc)
            return None
        self._failures = 0
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {"action": body.strip()[:100]}
        return {str(k): str(v) for k, v in dict(parsed).items()}

    def _get(self, path: str) -> str:
        headers = {}
        token = self._session_token()
        if token:
            headers["X-aws-ec2-metadata-token"] = token
        request = urllib.request.Request(self.endpoint + path, headers=headers)
        with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
            return str(response.read().decode("utf-8", "replace"))

    def _session_token(self) -> str | None:
        if self._token is None:
            request = urllib.request.Request(
                self.endpoint + "/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": _TOKEN_TTL},
            )
            try:
                with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
                    self._token = response.read().decode("ascii", "replace").strip()
            except urllib.error.HTTPError as exc:
                if exc.code not in (403, 404, 405):
                    raise
                self._token = ""  # IMDSv1 only: plain GETs then work without a token
        return self._token or None

    def _unreachable(self, exc: BaseException) -> None:
        self._failures += 1
        if self._failures in (3, 60):
            log.warning(
                "instance metadata unreachable; Spot notices may be missed",
                extra={"fields": {"endpoint": self.endpoint, "error": str(exc)[:200]}},
            )
