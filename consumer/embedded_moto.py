"""moto as the embedded AWS of the demo, the benchmarks and the tests: one fix to how it receives.

moto 5.2's SQS ReceiveMessage checks that a message is visible and then marks it received, two
steps with no lock between them. Two receives at once (the consumer runs eight long polls) can
both pass the check on a loaded machine and both return the message, the second with a receive
count of 2. The consumer rightly takes that for a redelivery, runs the message alone and receives
one message at a time for a while (:mod:`consumer.quarantine`): a test waiting for a batch of 48
waited forever, and a benchmark measured batches of 16. SQS can deliver a message twice too, but
rarely; the tests that need it inject it. Here receives take their messages one at a time.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

_RECEIVING = threading.Lock()
# How deep this thread is in moto's receive: moto receives from within a receive when a message
# it moves to a dead-letter queue meets that queue's Lambda mapping, and the lock is not
# re-entrant.
_DEPTH = threading.local()


def receive_each_message_once() -> None:
    """Make moto's ReceiveMessage check and mark messages under one lock, for the process.

    A long poll with nothing to take waits for messages without the lock, as on SQS, so polls
    still wait side by side. A receive moto makes from within one runs under the lock its caller
    holds. Idempotent.
    """
    from moto.sqs.models import Queue, SQSBackend

    if getattr(SQSBackend.receive_message, "takes_each_message_once", False):
        return
    receive = SQSBackend.receive_message
    wait = Queue.wait_for_messages

    @functools.wraps(receive)
    def receive_message(self: SQSBackend, *args: Any, **kwargs: Any) -> Any:
        depth = getattr(_DEPTH, "value", 0)
        if depth:  # moto receiving from within a receive: this thread holds the lock already
            _DEPTH.value = depth + 1
            try:
                return receive(self, *args, **kwargs)
            finally:
                _DEPTH.value = depth
        with _RECEIVING:
            _DEPTH.value = 1
            try:
                return receive(self, *args, **kwargs)
            finally:
                _DEPTH.value = 0

    @functools.wraps(wait)
    def wait_for_messages(self: Queue, timeout: int) -> None:
        # Called only from receive_message, with the lock held: free it while nothing comes,
        # unless a receive further out is in the middle of its own scan.
        if getattr(_DEPTH, "value", 0) != 1:
            wait(self, timeout)
            return
        _RECEIVING.release()
        try:
            wait(self, timeout)
        finally:
            _RECEIVING.acquire()

    receive_message.takes_each_message_once = True  # type: ignore[attr-defined]
    SQSBackend.receive_message = receive_message  # type: ignore[method-assign]
    Queue.wait_for_messages = wait_for_messages  # type: ignore[method-assign]
