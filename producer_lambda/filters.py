"""Which object keys are work: the same rules for S3 events and for backfill listings.

Pure: no AWS calls. The output-prefix rule comes first and is unconditional, so that feature files
the consumer writes can never be fed back into the queue, whatever the other settings say.
"""

from __future__ import annotations

from dataclasses import dataclass

from bottleneck_contract.locations import S3Location
from producer_lambda.settings import DEFAULT_SUFFIXES

__all__ = [
    "SKIP_EMPTY",
    "SKIP_OUTPUT",
    "SKIP_OUTSIDE_INPUT",
    "SKIP_SUFFIX",
    "KeyFilter",
]

SKIP_OUTPUT = "output-prefix"
SKIP_OUTSIDE_INPUT = "outside-input-prefix"
SKIP_SUFFIX = "suffix"
SKIP_EMPTY = "empty-object"


@dataclass(frozen=True, slots=True)
class KeyFilter:
    """Keys under ``input_prefix`` ending in one of ``suffixes`` (any case), outside ``output``."""

    suffixes: tuple[str, ...] = DEFAULT_SUFFIXES
    input_prefix: str = ""
    output: S3Location | None = None

    def __post_init__(self) -> None:
        # str.endswith wants a tuple, and the comparison is against the lower-cased key.
        object.__setattr__(self, "suffixes", tuple(s.lower() for s in self.suffixes))

    def reason(self, bucket: str, key: str, size: int | None = None) -> str | None:
        """Why ``bucket``/``key`` is not work (a short stable word), or ``None`` if it is.

        ``size`` is the object's size when known; zero-byte objects (folder placeholders,
        failed uploads) are never images.
        """
        if self.output is not None and self.output.contains(bucket, key):
            return SKIP_OUTPUT
        if not key.startswith(self.input_prefix):
            return SKIP_OUTSIDE_INPUT
        if not key.lower().endswith(self.suffixes):
            return SKIP_SUFFIX
        if size == 0:
            return SKIP_EMPTY
        return None
