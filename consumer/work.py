"""The units of work that flow through the pipeline: a received message and its images."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bottleneck_contract.messages import ImageRef
from consumer.byte_budget import ByteBudget
from consumer.errors import Failure


@dataclass(eq=False)
class Message:
    """One SQS message held by this worker, from receive until it is settled."""

    message_id: str
    receipt_handle: str
    body: str
    receive_count: int
    received_at: float
    visible_until: float
    images: list[ImageTask] = field(default_factory=list)
    # Set when the body itself could not be parsed: the whole message is dead-lettered.
    malformed: Failure | None = None
    # Set when SQS says our receipt handle is no longer valid: another worker owns the message,
    # so this one neither writes its features nor deletes it.
    lost: bool = False
    # Images not yet resolved, and whether the settlement decision has been taken.
    pending: int = 0
    settled: bool = False
    # A redelivery this worker can vouch for (it holds the copy received just before, or
    # released it after throttling or a 5xx, that copy having run with others): no consumer
    # died with it, so it is not a quarantine suspect (see :func:`consumer.quarantine.is_suspect`).
    vouched: bool = False


@dataclass(eq=False)
class ImageTask:
    """One image of a message as it moves through fetch, decode, model and write."""

    message: Message
    ref: ImageRef
    output_key: str = ""
    source_etag: str = ""
    content_sha256: str = ""  # of the fetched bytes: metadata, and --dedupe content's index
    data: bytes | None = None
    pixels: np.ndarray | torch.Tensor | None = None  # on the device with --decode cuda
    features: np.ndarray | None = None
    outcome: str | None = (
        None  # written | replaced | exists | superseded | source-gone | copied | dropped
    )
    failure: Failure | None = None
    # The share of the worker's budget of encoded bytes that ``data`` holds (consumer.byte_budget).
    budget: ByteBudget | None = None
    budgeted: int = 0

    def drop_data(self) -> None:
        """Let go of the encoded bytes and give their share of the budget back (once)."""
        self.data = None
        budget, self.budget = self.budget, None
        if budget is not None:
            budget.give(self.budgeted)
